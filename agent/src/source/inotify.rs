//! Wakes the sync loop when the standalone source's files change: inotify
//! on the policy directory and on the directories holding it and the
//! workloads file (editors and `kubectl`-style tools replace files by
//! renaming, and the directory itself may be created later).

use std::{
    ffi::CString,
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
};

use super::wake::Wakeup;

/// Stops the watching thread when dropped (it ends at its next look at
/// the flag; nothing waits for it).
pub struct FileWatch {
    stop: Arc<AtomicBool>,
    _thread: JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Not `IN_MODIFY`: a file being written would wake the loop before its
/// writer is done, and a pass could read half of it (a truncated
/// multi-document file is valid YAML with policies missing). The writer's
/// close (`IN_CLOSE_WRITE`) or rename says it is complete.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// A burst of events ends after this long without one...
const BURST_QUIET_MS: i32 = 5;
/// ...or this long after its first.
const BURST_MAX: std::time::Duration = std::time::Duration::from_millis(50);

/// How often the thread looks at its stop flag while no event comes.
const STOP_CHECK_MS: i32 = 500;

/// Watches `paths` (directories; those missing are skipped) and signals
/// `wake` on every event.
pub fn watch(paths: &[PathBuf], wake: Arc<Wakeup>) -> std::io::Result<FileWatch> {
    // SAFETY: plain syscall; the fd is owned below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    for path in paths.iter().filter(|p| p.is_dir()) {
        add_watch(&fd, path, MASK)?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("portcullis-inotify".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while !flag.load(Ordering::Relaxed) {
                let mut poll = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let ready = unsafe { libc::poll(&mut poll, 1, STOP_CHECK_MS) };
                if ready <= 0 {
                    continue;
                }
                // Drain, and let a burst (several files saved together)
                // finish first, so one pass sees all of it; what the events
                // say does not matter, only that something changed.
                let started = std::time::Instant::now();
                loop {
                    // SAFETY: reading into a buffer we own.
                    let n =
                        unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                    if n > 0 {
                        continue;
                    }
                    if started.elapsed() >= BURST_MAX {
                        break;
                    }
                    let mut poll = libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut poll, 1, BURST_QUIET_MS) } <= 0 {
                        break;
                    }
                }
                wake.signal();
            }
        })?;
    Ok(FileWatch {
        stop,
        _thread: thread,
    })
}

/// Watches `path` for `mask`. Watching it again returns its existing watch.
pub(crate) fn add_watch(fd: &std::os::fd::OwnedFd, path: &Path, mask: u32) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: valid fd and NUL-terminated path.
    if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), mask) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_new_renamed_or_edited_file_wakes_the_loop() {
        let dir = tempfile::tempdir().unwrap();
        let wake = Wakeup::new();
        let _watch = watch(&[dir.path().to_path_buf()], wake.clone()).unwrap();
        assert!(!wake.wait(Duration::from_millis(50)));
        std::fs::write(dir.path().join("p.yaml.tmp"), "x").unwrap();
        assert!(wake.wait(Duration::from_secs(5)), "created");
        while wake.wait(Duration::from_millis(50)) {}
        std::fs::rename(dir.path().join("p.yaml.tmp"), dir.path().join("p.yaml")).unwrap();
        assert!(wake.wait(Duration::from_secs(5)), "renamed into place");
        while wake.wait(Duration::from_millis(50)) {}
        std::fs::write(dir.path().join("p.yaml"), "y").unwrap();
        assert!(wake.wait(Duration::from_secs(5)), "edited");
    }
}
