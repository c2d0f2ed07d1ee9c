//! Where the CA's keys come from.
//!
//! - A directory (`--dir`): read as it stands at every issuance, so
//!   `portcullis ca activate --dir D` on the live directory takes effect at
//!   once.
//! - A Secret (`--secret ns/name`): read through the API (one GET-and-watch
//!   of that one name, no volume mount), each version written into a fresh
//!   0700 directory under `--work-dir` (an in-memory emptyDir in the
//!   Deployment) and used as a [`CaDir`]. A rotation step applied to the
//!   Secret is picked up within seconds, with no restart and no kubelet
//!   sync delay. A version that is not a usable CA, or a deleted Secret,
//!   keeps the last good one (with a warning): a bad edit must not stop
//!   issuance.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    identity::authority::{AuthorityError, CaDir},
    source::file::error_chain,
};

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("creating the private directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Secret {secret} key {key:?}: not a CA file name (letters, digits, '.', '-', not starting with '.')")]
    FileName { secret: String, key: String },
    #[error("Secret {secret} does not hold a usable CA")]
    NotACa {
        secret: String,
        #[source]
        source: Box<AuthorityError>,
    },
}

/// Where the keys are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Dir(PathBuf),
    Secret {
        namespace: String,
        name: String,
        /// Private copies are made under here (0700).
        work_dir: PathBuf,
    },
}

/// One version of the CA's files. A copy made from a Secret is removed
/// when the last user of this version drops it, so an issuance in flight
/// during a rotation finishes on the files it started with.
#[derive(Debug)]
pub struct CaFiles {
    pub dir: CaDir,
    /// Where the files came from, for logs.
    pub origin: String,
    owned: bool,
}

impl Drop for CaFiles {
    fn drop(&mut self) {
        if self.owned {
            let _ = fs::remove_dir_all(self.dir.path());
        }
    }
}

pub type CaFilesRx = watch::Receiver<Option<Arc<CaFiles>>>;

/// Starts providing the CA files: at once for a directory, after the first
/// read of the Secret otherwise (`None` until then).
pub fn start(source: &KeySource, client: Client) -> Result<(CaFilesRx, JoinHandle<()>), KeysError> {
    match source {
        KeySource::Dir(dir) => {
            let files = CaFiles {
                dir: CaDir::at(dir),
                origin: dir.display().to_string(),
                owned: false,
            };
            let (tx, rx) = watch::channel(Some(Arc::new(files)));
            // Keep the sender alive: receivers see no change, ever.
            let task = tokio::spawn(async move {
                tx.closed().await;
            });
            Ok((rx, task))
        }
        KeySource::Secret {
            namespace,
            name,
            work_dir,
        } => {
            private_dir(work_dir)?;
            let (tx, rx) = watch::channel(None);
            let api: Api<Secret> = Api::namespaced(client, namespace);
            let what = format!("{namespace}/{name}");
            let work_dir = work_dir.clone();
            let stream = crate::identity::kube_watch::watch_one(api, name);
            let task = tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    let secret = match event {
                        Ok(secret) => secret,
                        Err(e) => {
                            warn!("watching the CA Secret {what}: {}", error_chain(&e));
                            continue;
                        }
                    };
                    match materialize(&secret, &what, &work_dir) {
                        Ok(files) => {
                            let version = secret.metadata.resource_version.unwrap_or_default();
                            info!(secret = %what, %version, "CA key material loaded");
                            tx.send_replace(Some(Arc::new(files)));
                        }
                        Err(e) => {
                            warn!("{}; keeping the last good CA key material", error_chain(&e))
                        }
                    }
                }
            });
            Ok((rx, task))
        }
    }
}

/// Writes a Secret's files into a fresh private directory and checks they
/// make a CA that can sign.
fn materialize(secret: &Secret, what: &str, work_dir: &Path) -> Result<CaFiles, KeysError> {
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    let dir = work_dir.join(format!(
        "ca-{}-{}",
        std::process::id(),
        GENERATION.fetch_add(1, Ordering::Relaxed)
    ));
    private_dir(&dir)?;
    // Owned from here: an error below removes the partial copy.
    let files = CaFiles {
        dir: CaDir::at(&dir),
        origin: format!("Secret {what}"),
        owned: true,
    };
    let empty = Default::default();
    let data = secret.data.as_ref().unwrap_or(&empty);
    for (key, value) in data {
        if !file_name_ok(key) {
            return Err(KeysError::FileName {
                secret: what.into(),
                key: key.clone(),
            });
        }
        let path = dir.join(key);
        let write = || -> std::io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            file.write_all(&value.0)
        };
        write().map_err(|source| KeysError::Io {
            path: path.clone(),
            source,
        })?;
    }
    files.dir.authority().map_err(|source| KeysError::NotACa {
        secret: what.into(),
        source: Box::new(source),
    })?;
    Ok(files)
}

/// Secret keys become file names: nothing that could leave the directory
/// or hide in it.
fn file_name_ok(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

fn private_dir(path: &Path) -> Result<(), KeysError> {
    let io = |source| KeysError::Io {
        path: path.into(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io)?;
    // An existing directory keeps its mode: make sure it is ours alone.
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret_of(dir: &Path) -> Secret {
        let mut data = std::collections::BTreeMap::new();
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            data.insert(name, ByteString(fs::read(entry.path()).unwrap()));
        }
        Secret {
            data: Some(data),
            ..Default::default()
        }
    }

    #[test]
    fn a_secret_becomes_a_private_ca_directory_removed_when_dropped() {
        let source = tempfile::tempdir().unwrap();
        CaDir::init(source.path(), "one").unwrap();
        let work = tempfile::tempdir().unwrap();
        let files = materialize(&secret_of(source.path()), "ns/ca", work.path()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(files.dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(files.dir.authority().unwrap().issuer_name(), "one");
        let path = files.dir.path().to_path_buf();
        drop(files);
        assert!(!path.exists());
    }

    #[test]
    fn a_secret_that_is_no_ca_or_names_a_path_is_refused_and_leaves_nothing() {
        let work = tempfile::tempdir().unwrap();
        let mut secret = Secret::default();
        let e = materialize(&secret, "ns/ca", work.path()).unwrap_err();
        assert!(matches!(e, KeysError::NotACa { .. }), "{e}");
        secret.data = Some([("../x".to_string(), ByteString(b"y".to_vec()))].into());
        let e = materialize(&secret, "ns/ca", work.path()).unwrap_err();
        assert!(e.to_string().contains("\"../x\""), "{e}");
        assert_eq!(fs::read_dir(work.path()).unwrap().count(), 0);
    }
}
