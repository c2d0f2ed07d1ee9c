//! CPU time used by processes, to the nanosecond: what a benchmark's
//! workload cost, whatever else took turns on the same CPUs.

/// CPU time all threads of `pids` have used so far, in nanoseconds (the
/// scheduler's own account, /proc/<pid>/task/<tid>/schedstat). Threads that
/// exited are not counted: measure processes whose threads live on.
pub fn used_ns(pids: &[u32]) -> u64 {
    pids.iter().map(|&pid| process_ns(pid)).sum()
}

/// CPU time `pids` have used so far, threads that exited included (the
/// process's own account, /proc/<pid>/stat utime + stime, in clock ticks:
/// 10 ms here). For processes with a thread per connection (stunnel),
/// whose threads' time [`used_ns`] would lose.
pub fn total_ns(pids: &[u32]) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    pids.iter()
        .filter_map(|&pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name, which may hold spaces: state
            // is the 3rd field, utime the 14th and stime the 15th.
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .map(|t| t * 1_000_000_000 / ticks)
        .sum()
}

/// The peak resident memory of process `pid` so far (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse::<u64>()
        .ok()
        .map(|kib| kib * 1024)
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
    fn a_busy_process_shows_in_the_total_and_has_a_peak_memory() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("spawn sh");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && total_ns(&[child.id()]) < 20_000_000 {
            std::thread::sleep(Duration::from_millis(20));
        }
        let total = total_ns(&[child.id()]);
        assert!(peak_rss(child.id()).is_some_and(|b| b > 0));
        child.kill().ok();
        child.wait().ok();
        assert!(total >= 20_000_000, "{total} ns");
    }

    #[test]
    fn no_processes_or_gone_ones_used_nothing() {
        assert_eq!(used_ns(&[]), 0);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(used_ns(&[pid]), 0);
        assert_eq!(total_ns(&[pid]), 0);
    }
}
