//! One agent per pin directory.
//!
//! The maps in a pin directory have one writer by design: the agent writes
//! the policy generation not in force, then flips to it, and the kernel
//! keeps decisions per epoch on the strength of that (docs/policy.md). Two
//! agents on one directory (a DaemonSet rolled with a surge, a standalone
//! agent started beside the DaemonSet's) would both write the generation
//! "not in force" and flip in turn, so the kernel could enforce one's
//! half-written maps. An exclusive `flock` on the directory, held for the
//! agent's life, makes the second agent wait for the first to exit, and
//! then refuse to start. The kernel drops the lock when its holder dies,
//! however it dies.

use std::{
    fs::File,
    io,
    os::{fd::AsRawFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How long a starting agent waits for the previous one to exit (a
/// restart, or a pod replaced on its node) before refusing to start.
pub const WAIT_FOR_HOLDER: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PinLockError {
    #[error(
        "another Portcullis agent is using {pin_dir} (it holds the directory's lock, and did \
         not exit within {waited:?}): two agents on one node would overwrite each other's \
         policy; stop the other agent, or give this one its own --pin-dir"
    )]
    Held { pin_dir: PathBuf, waited: Duration },
    #[error("locking {pin_dir}")]
    Io {
        pin_dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The lock on a pin directory; released when dropped (or the process ends).
#[derive(Debug)]
pub struct PinDirLock {
    _dir: File,
}

impl PinDirLock {
    /// Takes the lock of `pin_dir` (an existing directory), waiting up to
    /// `wait` for another holder to let go; `on_wait` is called once if it
    /// has to wait.
    pub fn acquire(
        pin_dir: &Path,
        wait: Duration,
        on_wait: impl FnOnce(),
    ) -> Result<Self, PinLockError> {
        let io_error = |source| PinLockError::Io {
            pin_dir: pin_dir.to_path_buf(),
            source,
        };
        let deadline = Instant::now() + wait;
        let mut on_wait = Some(on_wait);
        let mut dir = File::open(pin_dir).map_err(io_error)?;
        loop {
            // SAFETY: flock(2) on a descriptor this function owns.
            let ret = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if ret == 0 {
                // The holder may have removed the directory (`portcullis
                // uninstall`) and another agent made a new one: a lock on
                // the old inode guards nothing. Lock what the path names.
                let held = dir.metadata().map_err(io_error)?;
                let named = std::fs::metadata(pin_dir).map_err(io_error)?;
                if (held.dev(), held.ino()) == (named.dev(), named.ino()) {
                    return Ok(Self { _dir: dir });
                }
                dir = File::open(pin_dir).map_err(io_error)?;
                continue;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io_error(err));
            }
            if Instant::now() >= deadline {
                return Err(PinLockError::Held {
                    pin_dir: pin_dir.to_path_buf(),
                    waited: wait,
                });
            }
            if let Some(f) = on_wait.take() {
                f();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_and_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let first = PinDirLock::acquire(dir.path(), Duration::ZERO, || {}).unwrap();
        let mut waited = false;
        let err = PinDirLock::acquire(dir.path(), Duration::from_millis(250), || waited = true)
            .expect_err("the directory is held");
        assert!(waited, "the caller is told it waits");
        let message = err.to_string();
        assert!(
            message.contains(&dir.path().display().to_string()) && message.contains("--pin-dir"),
            "{message}"
        );
        drop(first);
        PinDirLock::acquire(dir.path(), Duration::ZERO, || panic!("free: no wait"))
            .expect("released with its holder");
    }

    /// A holder that removes the directory (uninstall) while another waits:
    /// the waiter must lock the directory the path names now, not the old
    /// inode, or two agents would each hold "the" lock.
    #[test]
    fn a_waiter_locks_the_directory_the_path_names_now() {
        let parent = tempfile::tempdir().unwrap();
        let pins = parent.path().join("pins");
        std::fs::create_dir(&pins).unwrap();
        let first = PinDirLock::acquire(&pins, Duration::ZERO, || {}).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let pins = pins.clone();
            std::thread::spawn(move || {
                PinDirLock::acquire(&pins, Duration::from_secs(10), || tx.send(()).unwrap())
            })
        };
        rx.recv().unwrap();
        std::fs::remove_dir(&pins).unwrap();
        std::fs::create_dir(&pins).unwrap();
        let newcomer = PinDirLock::acquire(&pins, Duration::ZERO, || {}).unwrap();
        drop(first);
        // The waiter gets the old inode's lock, sees the path moved on, and
        // then waits for the newcomer, who holds the directory in place.
        std::thread::sleep(Duration::from_millis(300));
        assert!(!waiter.is_finished(), "the new directory is held");
        drop(newcomer);
        waiter
            .join()
            .unwrap()
            .expect("its holder gone, the waiter takes it");
    }
}
