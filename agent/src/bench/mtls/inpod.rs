//! Running a tool (nginx, iperf3, wrk, stunnel) inside a lab pod: in the
//! pod's cgroup, joined before any socket exists, and its network
//! namespace, so the kernel programs treat it as the pod's own process.

use std::{
    fs::{File, OpenOptions},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Stdio,
};

use tokio::process::Command;

use crate::lab::{plumbing, Lab, LabError};

#[derive(Debug, thiserror::Error)]
pub enum InPodError {
    #[error("pod {pod}")]
    Lab {
        pod: String,
        // Boxed: the lab's errors are large, and every tool error holds one.
        #[source]
        source: Box<LabError>,
    },
    #[error("opening {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a pod's tools run.
#[derive(Clone, Debug)]
pub struct InPod {
    pub pod: String,
    netns: PathBuf,
    cgroup: PathBuf,
}

impl InPod {
    pub fn new(lab: &Lab, pod: &str) -> Result<Self, InPodError> {
        let lab_error = |source| InPodError::Lab {
            pod: pod.into(),
            source: Box::new(source),
        };
        Ok(Self {
            pod: pod.into(),
            netns: plumbing::netns_path(&lab.pod_netns(pod).map_err(lab_error)?),
            cgroup: lab.pod_cgroup(pod).map_err(lab_error)?,
        })
    }

    /// `program` to be spawned in the pod; killed with the bench (also if
    /// the bench dies), its stdin closed.
    pub fn command(&self, program: &str) -> Result<Command, InPodError> {
        let open = |path: &Path, write: bool| -> Result<File, InPodError> {
            OpenOptions::new()
                .read(!write)
                .write(write)
                .open(path)
                .map_err(|source| InPodError::Open {
                    path: path.into(),
                    source,
                })
        };
        let netns = open(&self.netns, false)?;
        let procs = open(&self.cgroup.join("cgroup.procs"), true)?;
        let mut cmd = Command::new(program);
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        // SAFETY: only async-signal-safe syscalls on fds the closure owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process: the cgroup before any socket.
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}
