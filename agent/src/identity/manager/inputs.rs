//! What the manager and the data path follow besides the demand: the
//! revocations and the trust bundle, from files or the CA directory
//! (polled: small files, no inotify in containers' bind mounts), or from
//! the API ([`crate::identity::kube_watch`]).

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::identity::{
    authority::CaDir,
    bundle::TrustBundle,
    revocation::{RevocationSet, RevocationView},
};
use crate::source::file::error_chain;

/// How often files are checked: revocations reach the data path within it.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What identifies a version of a file without reading it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Stamp {
    Present {
        ino: u64,
        len: u64,
        mtime_ns: i128,
        ctime_ns: i128,
    },
    Missing,
    /// The directory holding it is gone (e.g. the CA directory moved).
    NoDirectory,
    Unreadable(String),
}

fn stamp(path: &Path) -> Stamp {
    match std::fs::metadata(path) {
        Ok(m) => Stamp::Present {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
            if parent.is_some_and(|p| !p.is_dir()) {
                Stamp::NoDirectory
            } else {
                Stamp::Missing
            }
        }
        Err(e) => Stamp::Unreadable(e.to_string()),
    }
}

/// The revocations in `path`, re-read whenever it changes. A missing file
/// revokes nothing (as [`RevocationSet::read_file`] says), but a missing
/// *directory* is unknown: the file's home is gone, not the revocations.
pub fn poll_revocations_file(
    path: PathBuf,
    interval: Duration,
) -> (watch::Receiver<RevocationView>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(RevocationView::default());
    let task = tokio::spawn(async move {
        let mut seen: Option<Stamp> = None;
        loop {
            let now = stamp(&path);
            if seen.as_ref() != Some(&now) {
                let view = match &now {
                    Stamp::NoDirectory => RevocationView::Unknown {
                        why: format!(
                            "the directory of the revocations file {} is missing",
                            path.display()
                        ),
                    },
                    _ => RevocationView::of_file(&path),
                };
                match &view {
                    RevocationView::Known(set) => info!(
                        file = %path.display(),
                        entries = set.len(),
                        "revocations read"
                    ),
                    RevocationView::Unknown { why } => {
                        warn!("revocations unknown (nothing is trusted or issued): {why}")
                    }
                }
                tx.send_if_modified(|current| {
                    let changed = *current != view;
                    *current = view;
                    changed
                });
                seen = Some(now);
            }
            tokio::time::sleep(interval).await;
        }
    });
    (rx, task)
}

/// A bundle read by `read` every `interval`: `None` until one is valid; an
/// invalid or missing one later keeps the last valid bundle (warned once),
/// as [`crate::identity::kube_watch::watch_bundle`] does.
pub fn poll_bundle(
    what: String,
    interval: Duration,
    read: impl Fn() -> Result<TrustBundle, String> + Send + 'static,
) -> (watch::Receiver<Option<TrustBundle>>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(None);
    let task = tokio::spawn(async move {
        let mut last_error: Option<String> = None;
        loop {
            match read() {
                Ok(bundle) => {
                    last_error = None;
                    tx.send_if_modified(|current| {
                        let changed = current.as_ref() != Some(&bundle);
                        if changed {
                            info!(roots = bundle.roots().len(), "trust bundle from {what}");
                        }
                        *current = Some(bundle);
                        changed
                    });
                }
                Err(e) => {
                    if last_error.as_ref() != Some(&e) {
                        warn!("trust bundle from {what}: {e}; keeping the last valid one");
                        last_error = Some(e);
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
    });
    (rx, task)
}

/// The roots of a CA directory, as its rotation steps change them.
pub fn poll_ca_dir_bundle(ca: CaDir) -> (watch::Receiver<Option<TrustBundle>>, JoinHandle<()>) {
    let what = format!("CA directory {}", ca.path().display());
    poll_bundle(what, Duration::from_secs(1), move || {
        ca.bundle().map_err(|e| error_chain(&e))
    })
}

/// The roots in a PEM file.
pub fn poll_bundle_file(path: PathBuf) -> (watch::Receiver<Option<TrustBundle>>, JoinHandle<()>) {
    let what = format!("file {}", path.display());
    poll_bundle(what, Duration::from_secs(1), move || {
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading: {e}"))?;
        TrustBundle::from_pem(&text, &path.display().to_string()).map_err(|e| error_chain(&e))
    })
}

/// Known and empty: for tests and callers without revocations.
pub fn no_revocations() -> RevocationView {
    RevocationView::Known(std::sync::Arc::new(RevocationSet::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{revocation::RevocationStatus, spiffe::SpiffeId};

    async fn next(rx: &mut watch::Receiver<RevocationView>) -> RevocationView {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("a new view in time")
            .unwrap();
        rx.borrow_and_update().clone()
    }

    #[tokio::test]
    async fn the_revocations_file_is_followed_and_its_directory_vanishing_is_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("ca");
        std::fs::create_dir(&home).unwrap();
        let path = home.join("revocations.yaml");
        let (mut rx, task) = poll_revocations_file(path.clone(), Duration::from_millis(20));
        let web: SpiffeId = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        assert_eq!(
            next(&mut rx).await.check(&web, None),
            RevocationStatus::Good
        );
        std::fs::write(
            &path,
            "revocations:\n- spiffeId: spiffe://cluster.local/ns/shop/sa/web\n",
        )
        .unwrap();
        assert!(matches!(
            next(&mut rx).await.check(&web, None),
            RevocationStatus::Revoked { .. }
        ));
        std::fs::write(&path, "revocations: [").unwrap();
        assert!(matches!(
            next(&mut rx).await.check(&web, None),
            RevocationStatus::Unknown { .. }
        ));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            next(&mut rx).await.check(&web, None),
            RevocationStatus::Good
        );
        std::fs::rename(&home, dir.path().join("away")).unwrap();
        assert!(matches!(
            next(&mut rx).await.check(&web, None),
            RevocationStatus::Unknown { why } if why.contains("directory")
        ));
        task.abort();
    }

    #[tokio::test]
    async fn a_bundle_is_kept_through_a_bad_read_and_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaDir::init(dir.path().join("ca"), "r1").unwrap();
        let file = dir.path().join("roots.pem");
        std::fs::write(&file, ca.bundle().unwrap().to_pem()).unwrap();
        let (mut rx, task) = poll_bundle_file(file.clone());
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|b| b.is_some()))
            .await
            .unwrap()
            .unwrap();
        std::fs::write(&file, "garbage").unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(rx.borrow().as_ref(), Some(&ca.bundle().unwrap()));
        ca.add_root("r2").unwrap();
        std::fs::write(&file, ca.bundle().unwrap().to_pem()).unwrap();
        let two = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|b| b.as_ref().is_some_and(|b| b.roots().len() == 2)),
        )
        .await;
        assert!(two.is_ok(), "the second root arrives");
        task.abort();
    }
}
