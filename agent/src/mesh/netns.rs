//! Working inside a pod's network namespace, as ztunnel's in-pod mode
//! does: a thread that entered the namespace makes the sockets (a socket
//! belongs to the namespace it was made in, whatever thread uses it later)
//! and runs the few commands that prepare the namespace.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    thread,
};

use portcullis_common::mesh::{MARK, MARK_MASK};
use tokio::sync::oneshot;

/// The routing table that sends the applications' replies to proxied
/// connections back to the inbound proxy (see [`prepare`]).
pub const ROUTE_TABLE: u32 = 0x5043;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("the thread working in network namespace {path} has ended")]
    Gone { path: PathBuf },
    #[error("in network namespace {path}: {action}")]
    Prepare {
        path: PathBuf,
        action: String,
        #[source]
        source: io::Error,
    },
    #[error("no network namespace for cgroup {cgroup}: it has no process")]
    NoProcess { cgroup: PathBuf },
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in one pod's network namespace.
pub struct PodNetns {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl PodNetns {
    /// Starts a thread in the namespace at `path` (a netns file or a
    /// process's `ns/net`). It ends when this value is dropped.
    pub fn enter(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.into(),
            source,
        })?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (entered_tx, entered_rx) = mpsc::channel();
        let name = format!("netns-{}", path.display());
        thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let entered = nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ = entered_tx.send(entered);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Open {
                path: path.into(),
                source,
            })?;
        match entered_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                path: path.into(),
                jobs,
            }),
            Ok(Err(source)) => Err(NetnsError::Enter {
                path: path.into(),
                source,
            }),
            Err(_) => Err(NetnsError::Gone { path: path.into() }),
        }
    }

    /// Runs `f` in the namespace and waits for it without blocking the
    /// async runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<io::Result<T>, NetnsError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Gone {
                path: self.path.clone(),
            })?;
        rx.await.map_err(|_| NetnsError::Gone {
            path: self.path.clone(),
        })
    }

    /// Prepares the namespace for the inbound proxy, idempotently: replies
    /// to the proxy's connections (which carry [`MARK`] or `MARK_JUDGE`,
    /// one rule under [`MARK_MASK`], and which the
    /// applications' accepted sockets inherit with `tcp_fwmark_accept`)
    /// are delivered locally, to the proxy's transparent socket, instead
    /// of being routed out to the client's address.
    /// With `ipv6`, for IPv6 too.
    pub async fn prepare(&self, ipv6: bool) -> Result<(), NetnsError> {
        let path = self.path.clone();
        let fail = |action: &str, source| NetnsError::Prepare {
            path: path.clone(),
            action: action.into(),
            source,
        };
        self.run(move || {
            std::fs::write("/proc/sys/net/ipv4/tcp_fwmark_accept", "1")?;
            let mark = format!("{:#x}/{MARK_MASK:#x}", MARK & MARK_MASK);
            let table = ROUTE_TABLE.to_string();
            let families: &[(&str, &str)] = if ipv6 {
                &[("-4", "0.0.0.0/0"), ("-6", "::/0")]
            } else {
                &[("-4", "0.0.0.0/0")]
            };
            for (family, everything) in families {
                // Delete first, so a restarted agent does not stack rules
                // (nor keep an older version's unmasked one).
                for old in [mark.as_str(), &format!("{MARK:#x}")] {
                    while ip(&[family, "rule", "del", "fwmark", old, "lookup", &table]).is_ok() {}
                }
                ip(&[family, "rule", "add", "fwmark", &mark, "lookup", &table])?;
                let route = [family, "route", "replace", "local", everything, "dev", "lo"];
                ip(&[&route[..], &["table", &table]].concat())?;
            }
            ip(&["link", "set", "lo", "up"])
        })
        .await?
        .map_err(|e| fail("setting up the return route of proxied connections", e))
    }
}

/// Runs iproute2's `ip` (in the calling thread's network namespace: a
/// child process starts in it).
fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// The network namespace of the processes of a pod's cgroup: the first
/// process found in it or below it.
pub fn of_cgroup(cgroup: &Path) -> Result<PathBuf, NetnsError> {
    crate::bpf::frames::first_process(cgroup, crate::bpf::frames::PROCESS_SEARCH_DEPTH)
        .map(|pid| PathBuf::from(format!("/proc/{pid}/ns/net")))
        .ok_or_else(|| NetnsError::NoProcess {
            cgroup: cgroup.into(),
        })
}

/// The kernel's cookie of a socket's network namespace
/// (`SO_NETNS_COOKIE`), which the kernel programs file connections under.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a buffer of the length given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets an integer socket option.
pub fn set_int_option(
    socket: &impl AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: valid fd, and an int option.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
