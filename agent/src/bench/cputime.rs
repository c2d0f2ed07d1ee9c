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

    #[test]
    fn this_process_uses_cpu_time() {
        let me = std::process::id();
        let before = used_ns(&[me]);
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(used_ns(&[me]) > before);
        assert_eq!(used_ns(&[]), 0);
    }
}
