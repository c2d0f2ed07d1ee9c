//! Pinning lab processes to CPUs, so a benchmark can keep a load generator
//! off the CPU of the workload it measures.

use nix::{
    errno::Errno,
    sched::{sched_getaffinity, sched_setaffinity, CpuSet},
    unistd::Pid,
};

#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    #[error("reading the CPUs this process may run on")]
    Get {
        #[source]
        source: nix::Error,
    },
    #[error("CPU {cpu} is beyond what a CPU set can hold")]
    Cpu {
        cpu: usize,
        #[source]
        source: nix::Error,
    },
    #[error("listing the threads of process {pid}")]
    Threads {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning thread {tid} to CPUs {cpus:?}")]
    Set {
        tid: i32,
        cpus: Vec<usize>,
        #[source]
        source: nix::Error,
    },
}

/// The CPUs this process may run on, in order. Its affinity, not the CPU
/// count: taskset and cpusets narrow what a benchmark can use.
pub fn allowed_cpus() -> Result<Vec<usize>, AffinityError> {
    let set =
        sched_getaffinity(Pid::from_raw(0)).map_err(|source| AffinityError::Get { source })?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Pins every thread of process `pid` to `cpus`. sched_setaffinity acts on
/// one thread, and the pod processes are multi-threaded (tokio); threads
/// started later inherit the affinity of the thread that starts them.
pub fn pin_process(pid: u32, cpus: &[usize]) -> Result<(), AffinityError> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu)
            .map_err(|source| AffinityError::Cpu { cpu, source })?;
    }
    let dir = format!("/proc/{pid}/task");
    let threads =
        std::fs::read_dir(&dir).map_err(|source| AffinityError::Threads { pid, source })?;
    for entry in threads {
        let entry = entry.map_err(|source| AffinityError::Threads { pid, source })?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        match sched_setaffinity(Pid::from_raw(tid), &set) {
            // A thread that exited since the listing needs no pinning.
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(source) => {
                return Err(AffinityError::Set {
                    tid,
                    cpus: cpus.to_vec(),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_this_process_to_what_it_may_use_changes_nothing() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        pin_process(std::process::id(), &cpus).unwrap();
        assert_eq!(allowed_cpus().unwrap(), cpus);
    }
}
