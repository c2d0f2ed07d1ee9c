//! Keeping the agent's resident memory down. glibc's allocator keeps
//! freed memory resident until it is trimmed. The agent frees a lot at two
//! moments: after loading the eBPF programs (the kernel's BTF, about 17
//! MiB here), and after each pass (the compile and map contents it
//! replaced, tens of MiB at 20,000 pods).

use std::time::{Duration, Instant};

/// Keeps glibc to one heap arena unless the operator chose a number
/// (`MALLOC_ARENA_MAX`, or `glibc.malloc.arena_max` in `GLIBC_TUNABLES`).
/// glibc gives a thread that finds the arenas busy one of its own (up to
/// eight per core), and memory freed into an arena is reused only through
/// it. The agent's threads take
/// turns more than they contend (watchers fill the stores, then the sync
/// thread compiles), so extra arenas mostly kept freed memory resident: at
/// 20,000 pods the churn bench's peak went from 143.9 MiB (default) and
/// 141.1 MiB (two arenas) to 139.2 MiB with one. Call before any thread
/// starts: a limit set later leaves the arenas threads already took.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    if !arenas_chosen(
        std::env::var_os("MALLOC_ARENA_MAX").is_some(),
        std::env::var("GLIBC_TUNABLES").ok().as_deref(),
    ) {
        // SAFETY: mallopt only sets the allocator's own parameter; no
        // other thread runs yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// Whether the operator set the arena count: other tunables leave it to
/// [`limit_arenas`].
fn arenas_chosen(malloc_arena_max: bool, tunables: Option<&str>) -> bool {
    malloc_arena_max
        || tunables.is_some_and(|t| {
            t.split(':')
                .any(|setting| setting.split('=').next() == Some("glibc.malloc.arena_max"))
        })
}

/// Returns freed heap memory to the kernel (glibc's `malloc_trim`).
/// Call after a large transient allocation has been dropped.
pub fn release_freed() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// When to give back what passes freed: once no pass has run for
/// [`TrimWhenQuiet::QUIET`]. A trim walks the whole heap (milliseconds at
/// cluster scale), so it waits for a lull instead of following each pass
/// of a burst, and never runs while a change is waiting.
#[derive(Debug, Default)]
pub struct TrimWhenQuiet {
    last_pass: Option<Instant>,
}

impl TrimWhenQuiet {
    pub const QUIET: Duration = Duration::from_secs(1);

    /// A pass ended at `now`: what it freed is due back after a lull.
    pub fn after_pass(&mut self, now: Instant) {
        self.last_pass = Some(now);
    }

    /// How long until a trim is due (`None`: nothing to give back).
    pub fn due_in(&self, now: Instant) -> Option<Duration> {
        self.last_pass
            .map(|at| Self::QUIET.saturating_sub(now.saturating_duration_since(at)))
    }

    /// Whether to trim now; a trim is taken once per lull.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.due_in(now).is_some_and(|d| d.is_zero()) {
            self.last_pass = None;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_arena_count_the_operator_set_overrides_the_limit() {
        assert!(!arenas_chosen(false, None));
        assert!(arenas_chosen(true, None));
        assert!(arenas_chosen(
            false,
            Some("glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4")
        ));
        assert!(!arenas_chosen(false, Some("glibc.malloc.tcache_count=0")));
        assert!(!arenas_chosen(
            false,
            Some("glibc.malloc.arena_test=2:glibc.mem.tagging=1")
        ));
    }

    #[test]
    fn a_trim_waits_for_a_lull_after_the_last_pass_and_comes_once() {
        let start = Instant::now();
        let mut trim = TrimWhenQuiet::default();
        assert_eq!(trim.due_in(start), None, "nothing freed, nothing due");
        assert!(!trim.take(start + Duration::from_secs(5)));

        trim.after_pass(start);
        let half = TrimWhenQuiet::QUIET / 2;
        assert!(!trim.take(start + half), "a burst is still going");
        // Another pass inside the lull puts the trim off again.
        trim.after_pass(start + half);
        assert_eq!(
            trim.due_in(start + TrimWhenQuiet::QUIET),
            Some(TrimWhenQuiet::QUIET - half)
        );
        assert!(!trim.take(start + TrimWhenQuiet::QUIET));
        assert!(trim.take(start + half + TrimWhenQuiet::QUIET));
        assert!(
            !trim.take(start + TrimWhenQuiet::QUIET * 3),
            "one trim per lull"
        );
        assert_eq!(trim.due_in(start + TrimWhenQuiet::QUIET * 3), None);
    }
}
