//! The flow-event reader of the overhead bench: the real `portcullis flows
//! --json` on the lab, pinned to a CPU. Its output is discarded: what it
//! costs to read and name events is Portcullis's, what a terminal or log
//! shipper does with them is not. Without a reader the ring fills within
//! seconds and every later event fails cheaply in the kernel, which would
//! understate what events cost.

use std::{path::Path, process::Stdio};

use nix::{
    sched::{sched_setaffinity, CpuSet},
    unistd::Pid,
};
use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    #[error("CPU {cpu} is beyond what a CPU set can hold")]
    Cpu {
        cpu: usize,
        #[source]
        source: nix::Error,
    },
    #[error("starting portcullis flows")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
}

pub struct FlowReader {
    child: Child,
}

impl FlowReader {
    /// Starts `exe flows --lab <lab> --json` on `cpu`.
    pub fn start(exe: &Path, lab: &str, cpu: usize) -> Result<Self, ReaderError> {
        let mut set = CpuSet::new();
        set.set(cpu)
            .map_err(|source| ReaderError::Cpu { cpu, source })?;
        let mut cmd = Command::new(exe);
        cmd.args(["flows", "--lab", lab, "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: one syscall between fork and exec; pinned before exec, so
        // every thread of the reader inherits the CPU.
        unsafe {
            cmd.pre_exec(move || {
                sched_setaffinity(Pid::from_raw(0), &set).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| ReaderError::Spawn { source })?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the reader still runs (it exits on errors, e.g. no ring).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
