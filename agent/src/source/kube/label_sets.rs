//! One copy of each label set the pods carry. A Deployment's replicas
//! carry the same labels (`app`, `pod-template-hash`), so the watched pods
//! and their workloads share one map instead of each holding a copy (two
//! per pod, about 700 bytes each).

use std::{
    collections::HashSet,
    sync::{Arc, LazyLock, Mutex},
};

use crate::policy::model::Labels;

/// The table the pod watcher shares labels through. Process-wide because
/// the watcher's prune step, which takes each pod's labels as it arrives,
/// has no state of its own to keep it in.
static POD_LABELS: LazyLock<Mutex<LabelSets>> = LazyLock::new(Default::default);

/// The shared copy of a pod's `labels`.
pub fn shared(labels: &Labels) -> Arc<Labels> {
    let mut sets = POD_LABELS.lock().unwrap_or_else(|e| e.into_inner());
    let copy = sets.share(labels);
    sets.sweep();
    copy
}

/// Sets no pod carries are forgotten once the table has doubled since the
/// last sweep (and has at least this many): sweeping on every pod stored
/// would walk every set each time.
const SWEEP_FLOOR: usize = 1024;

#[derive(Debug)]
struct LabelSets {
    sets: HashSet<Arc<Labels>>,
    sweep_at: usize,
}

impl Default for LabelSets {
    fn default() -> Self {
        Self {
            sets: HashSet::new(),
            sweep_at: SWEEP_FLOOR,
        }
    }
}

impl LabelSets {
    /// The shared copy of `labels`, made on first sight.
    fn share(&mut self, labels: &Labels) -> Arc<Labels> {
        if let Some(kept) = self.sets.get(labels) {
            return Arc::clone(kept);
        }
        let new = Arc::new(labels.clone());
        self.sets.insert(Arc::clone(&new));
        new
    }

    /// Forgets the sets only this table still holds, when it has grown
    /// enough since the last sweep to be worth walking.
    fn sweep(&mut self) {
        if self.sets.len() < self.sweep_at {
            return;
        }
        self.sets.retain(|s| Arc::strong_count(s) > 1);
        self.sweep_at = (self.sets.len() * 2).max(SWEEP_FLOOR);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(app: &str, hash: &str) -> Labels {
        Labels::from([
            ("app".to_string(), app.to_string()),
            ("pod-template-hash".to_string(), hash.to_string()),
        ])
    }

    #[test]
    fn equal_sets_share_one_copy_and_different_ones_do_not() {
        let mut sets = LabelSets::default();
        let a = sets.share(&labels("web", "abc"));
        let b = sets.share(&labels("web", "abc"));
        let c = sets.share(&labels("web", "xyz"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(*c, labels("web", "xyz"));
        assert_eq!(sets.len(), 2);
    }

    #[test]
    fn sets_no_pod_carries_are_forgotten_once_the_table_has_grown() {
        let mut sets = LabelSets::default();
        let kept = sets.share(&labels("web", "kept"));
        for i in 0..SWEEP_FLOOR {
            // Dropped at once: no pod carries them.
            sets.share(&labels("gone", &i.to_string()));
        }
        sets.sweep();
        assert_eq!(sets.len(), 1, "only the set still carried stays");
        assert!(Arc::ptr_eq(&kept, &sets.share(&labels("web", "kept"))));
        // Below the next sweep point a sweep walks nothing.
        sets.share(&labels("gone", "again"));
        sets.sweep();
        assert_eq!(sets.len(), 2);
    }
}
