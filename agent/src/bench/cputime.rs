//! CPU time used by processes, to the nanosecond: what a benchmark's
//! workload cost, whatever else took turns on the same CPUs.

/// CPU time all threads of `pids` have used so far, in nanoseconds (the
/// scheduler's own account, /proc/<pid>/task/<tid>/schedstat). Threads that
/// exited are not counted: measure processes whose threads live on.
pub fn used_ns(pids: &[u32]) -> u64 {
    pids.iter().map(|&pid| process_ns(pid)).sum()
}

fn process_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    // A busy child process, not this one: the test harness's other threads
    // exit while we measure, and exited threads leave the account.
    #[test]
    fn a_busy_process_gains_cpu_time() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("spawn sh");
        let before = used_ns(&[child.id()]);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut gained = false;
        while Instant::now() < deadline && !gained {
            std::thread::sleep(Duration::from_millis(20));
            gained = used_ns(&[child.id()]) > before;
        }
        child.kill().ok();
        child.wait().ok();
        assert!(gained, "a spinning process used no CPU time in 10 s");
    }

    #[test]
    fn no_processes_or_gone_ones_used_nothing() {
        assert_eq!(used_ns(&[]), 0);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(used_ns(&[pid]), 0);
    }
}
