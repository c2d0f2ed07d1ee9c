//! When a pass that met missing cgroups runs again.
//!
//! A pod's cgroup usually appears moments after the pod is bound, so the
//! places a pass could not find are checked often, a stat or a cgroup walk
//! each, and a pass follows when one appeared. Until this, every check was
//! a whole pass: at 5,000 pods a pod whose cgroup was gone for good (it is
//! stopping, and its object is not deleted yet) cost a pass of tens of
//! milliseconds every 200 ms. A full pass still comes now and then, for a
//! cgroup that appears where neither the pass nor the source looks.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::source::Source;

/// How often a pass runs while a cgroup is missing and no check saw one
/// appear.
pub const FULL_RETRY: Duration = Duration::from_secs(5);

/// The missing cgroups of the latest successful pass.
pub struct CgroupWait {
    awaited: Vec<PathBuf>,
    checked: Instant,
    passed: Instant,
}

impl CgroupWait {
    /// After a pass that could not find the cgroups at `awaited` (`None`
    /// when nothing is missing).
    pub fn after_pass(missing: bool, awaited: Vec<PathBuf>) -> Option<Self> {
        let now = Instant::now();
        missing.then_some(Self {
            awaited,
            checked: now,
            passed: now,
        })
    }

    /// How long until the next check is due, checked every `every`.
    pub fn due(&self, every: Duration) -> Duration {
        every.saturating_sub(self.checked.elapsed())
    }

    /// Whether a pass should run now: at most one check every `every`,
    /// and yes when `source` saw a cgroup appear or [`FULL_RETRY`] passed.
    pub fn pass_now(&mut self, source: &dyn Source, every: Duration) -> bool {
        if self.checked.elapsed() < every {
            return false;
        }
        self.checked = Instant::now();
        self.passed.elapsed() >= FULL_RETRY || source.cgroups_appeared(&self.awaited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::file::FileSource;

    /// Only a cgroup that appeared makes the check say yes, and a check
    /// comes no sooner than asked.
    #[test]
    fn a_check_passes_only_once_an_awaited_cgroup_exists() {
        let dir = tempfile::tempdir().unwrap();
        let source = FileSource::new(dir.path().join("policies"), dir.path().join("workloads"));
        let cgroup = dir.path().join("pod-cgroup");
        let mut wait = CgroupWait::after_pass(true, vec![cgroup.clone()]).unwrap();
        assert!(!wait.pass_now(&source, Duration::ZERO), "not there yet");
        std::fs::create_dir(&cgroup).unwrap();
        assert!(
            !wait.pass_now(&source, Duration::from_secs(60)),
            "not due yet"
        );
        assert!(wait.pass_now(&source, Duration::ZERO), "it appeared");
        assert!(CgroupWait::after_pass(false, Vec::new()).is_none());
    }
}
