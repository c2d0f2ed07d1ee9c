//! The node's pod cgroups, walked again only when the tree changed.
//!
//! A walk reads every directory between the kubelet's cgroup root and the
//! pod cgroups: milliseconds at a thousand local pods, on every pass, and
//! most passes follow a change elsewhere in the cluster. cgroupfs reports
//! a directory made or removed below a watched directory through inotify,
//! so every directory the walk reads is watched (before it is read, so
//! nothing made in between is missed), and the listing is kept until an
//! event arrives. A pod cgroup removed and made again at the same path
//! (a new cgroup id) is such an event, so a kept listing never carries an
//! id that is gone. Where inotify is not available, or a watch cannot be
//! added (the per-user watch limit), every listing walks, as before.

use std::{
    collections::{BTreeMap, HashMap},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use super::cgroups::{PodCgroupError, PodCgroupFinder, PodDir, PodUid};
use crate::source::inotify::add_watch;

/// Anything that changes which directories exist below a watched one.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;

/// The latest walk's pod cgroups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub pods: BTreeMap<PodUid, PodDir>,
    /// Each pod cgroup's id by its absolute path, shared with the passes
    /// that use them until the next walk.
    pub ids: Arc<HashMap<PathBuf, u64>>,
}

/// See the module docs.
pub struct PodCgroupTree {
    finder: PodCgroupFinder,
    /// `None`: no watching, every listing walks.
    watch: Option<OwnedFd>,
    /// The latest walk's result; `None` until one succeeds.
    listing: Option<Listing>,
    walks: u64,
}

impl PodCgroupTree {
    pub fn new(finder: PodCgroupFinder) -> Self {
        // SAFETY: plain syscall; the fd is owned below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        let watch = if fd < 0 {
            tracing::warn!(
                "inotify unavailable ({}): pod cgroups are walked on every pass",
                std::io::Error::last_os_error()
            );
            None
        } else {
            // SAFETY: a fresh fd nobody else owns.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Self {
            finder,
            watch,
            listing: None,
            walks: 0,
        }
    }

    pub fn finder(&self) -> &PodCgroupFinder {
        &self.finder
    }

    /// The pod cgroups now: the kept listing while nothing changed below a
    /// watched directory, a new walk otherwise.
    pub fn list(&mut self) -> Result<&Listing, PodCgroupError> {
        let unchanged = self.listing.is_some() && self.watch.is_some() && !self.drain();
        if !unchanged {
            // Events are drained before the walk: one that comes during it
            // makes the next listing walk again.
            self.listing = None;
            self.walks += 1;
            let mut failed = None;
            let pods = {
                let watch = self.watch.as_ref();
                self.finder.list_visiting(|dir| {
                    if let (Some(fd), None) = (watch, &failed) {
                        if let Err(e) = add_watch(fd, dir, MASK) {
                            failed = Some((dir.to_path_buf(), e));
                        }
                    }
                })?
            };
            if let Some((dir, e)) = failed {
                // Vanished directories fail too, harmlessly: the walk skips
                // them as well. Anything else ends watching for good.
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(
                        "watching cgroup {}: {e}; pod cgroups are walked on every pass",
                        dir.display()
                    );
                    self.watch = None;
                }
            }
            let ids = pods
                .values()
                .map(|dir| (self.finder.mount().join(&dir.path), dir.id))
                .collect();
            self.listing = Some(Listing {
                pods,
                ids: Arc::new(ids),
            });
        }
        Ok(self.listing.as_ref().expect("listed above"))
    }

    /// The latest listing, without looking again.
    pub fn last(&self) -> Option<&Listing> {
        self.listing.as_ref()
    }

    /// Whether the tree may differ from the latest listing: something
    /// changed below a watched directory, or nothing is watched or listed.
    /// Looks without taking the events, so the next listing walks.
    pub fn may_have_changed(&self) -> bool {
        let Some(fd) = self.watch.as_ref().filter(|_| self.listing.is_some()) else {
            return true;
        };
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no waiting.
        unsafe { libc::poll(&mut poll, 1, 0) != 0 }
    }

    /// How many walks the listings took: the latest listing's number.
    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// Takes every pending event: whether there was any. An error reading
    /// counts as a change (and ends watching), never as none.
    fn drain(&mut self) -> bool {
        let Some(fd) = &self.watch else {
            return true;
        };
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: reading into a buffer we own.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                any = true;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if n < 0 && e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::warn!("reading cgroup events: {e}; pod cgroups are walked on every pass");
                self.watch = None;
                return true;
            }
            return any;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::MetadataExt as _};

    use super::*;
    use crate::source::kube::cgroups::tests::TestTree;

    const UID: &str = "3f2a9c1e-5b7d-4e8f-9a0b-1c2d3e4f5a6b";
    const OTHER: &str = "8e1d7c3b-2a4f-4b6e-8c9d-0e1f2a3b4c5d";

    fn id_of(tree: &mut PodCgroupTree, uid: &str) -> Option<u64> {
        let uid = PodUid::new(uid).unwrap();
        tree.list().unwrap().pods.get(&uid).map(|d| d.id)
    }

    /// Nothing changed: the listing is kept. A pod cgroup made, removed, or
    /// removed and made again at the same path (a new id: the kept one
    /// would name a cgroup that is gone) is seen at the next listing.
    #[test]
    fn a_listing_is_kept_until_the_tree_changes() {
        let test = TestTree::new();
        test.mkdir("kubepods/burstable");
        let mut tree = PodCgroupTree::new(test.finder());
        assert_eq!(id_of(&mut tree, UID), None);
        assert_eq!(tree.walks(), 1);
        assert!(!tree.may_have_changed());
        assert_eq!(id_of(&mut tree, UID), None);
        assert_eq!(tree.walks(), 1, "nothing changed: no walk");

        let pod = test.mkdir(format!("kubepods/burstable/pod{UID}"));
        assert!(tree.may_have_changed(), "a pod cgroup made is noticed");
        let first = id_of(&mut tree, UID).expect("the new pod cgroup is listed");
        assert_eq!(first, fs::metadata(&pod).unwrap().ino());
        assert_eq!(tree.walks(), 2);
        // Below a pod, containers come and go unwatched.
        test.mkdir(format!("kubepods/burstable/pod{UID}/c1"));
        assert_eq!(id_of(&mut tree, UID), Some(first));
        assert_eq!(tree.walks(), 2, "a container cgroup is not a change");

        fs::remove_dir(pod.join("c1")).unwrap();
        fs::remove_dir(&pod).unwrap();
        fs::create_dir(&pod).unwrap();
        let again = id_of(&mut tree, UID).expect("made again");
        assert_ne!(again, first, "the new cgroup's id, not the gone one's");
        assert_eq!(again, fs::metadata(&pod).unwrap().ino());

        // A QoS directory made later is watched from the walk that finds it.
        test.mkdir("kubepods/besteffort");
        assert_eq!(id_of(&mut tree, OTHER), None);
        test.mkdir(format!("kubepods/besteffort/pod{OTHER}"));
        assert!(id_of(&mut tree, OTHER).is_some());

        fs::remove_dir(&pod).unwrap();
        assert_eq!(id_of(&mut tree, UID), None, "a removed pod cgroup is gone");
    }
}
