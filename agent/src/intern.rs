//! One shared copy of equal immutable values. Thousands of pods carry the
//! same few label sets, and thousands of policy rules the same few
//! selectors; a small `BTreeMap` costs a half-kilobyte node whatever it
//! holds, so equal values share one `Arc` instead of each keeping a copy.

use std::{
    collections::HashSet,
    hash::Hash,
    sync::{Arc, LazyLock, Mutex},
};

/// Values no one else holds are forgotten once the table has doubled
/// since the last sweep (and has at least this many): sweeping on every
/// insertion would walk every value each time.
const SWEEP_FLOOR: usize = 1024;

/// The shared copies, and when to forget the unused ones.
#[derive(Debug)]
pub struct Interner<T> {
    values: HashSet<Arc<T>>,
    sweep_at: usize,
}

impl<T> Default for Interner<T> {
    fn default() -> Self {
        Self {
            values: HashSet::new(),
            sweep_at: SWEEP_FLOOR,
        }
    }
}

impl<T: Hash + Eq> Interner<T> {
    /// The shared copy of `value`, made on first sight.
    pub fn share(&mut self, value: &T) -> Arc<T>
    where
        T: Clone,
    {
        match self.values.get(value) {
            Some(kept) => Arc::clone(kept),
            None => self.insert(Arc::new(value.clone())),
        }
    }

    /// [`Interner::share`] for a value made only to be looked up.
    pub fn share_owned(&mut self, value: T) -> Arc<T> {
        match self.values.get(&value) {
            Some(kept) => Arc::clone(kept),
            None => self.insert(Arc::new(value)),
        }
    }

    fn insert(&mut self, new: Arc<T>) -> Arc<T> {
        self.values.insert(Arc::clone(&new));
        if self.values.len() >= self.sweep_at {
            self.values.retain(|v| Arc::strong_count(v) > 1);
            self.sweep_at = (self.values.len() * 2).max(SWEEP_FLOOR);
        }
        new
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.values.len()
    }
}

/// A process-wide [`Interner`], for values made where no state of the
/// caller's own could keep a table (a watcher's prune step, a parser).
pub struct Table<T>(LazyLock<Mutex<Interner<T>>>);

impl<T> Table<T> {
    pub const fn new() -> Self {
        Self(LazyLock::new(|| Mutex::new(Interner::default())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Interner<T>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Hash + Eq> Table<T> {
    /// See [`Interner::share`].
    pub fn share(&self, value: &T) -> Arc<T>
    where
        T: Clone,
    {
        self.lock().share(value)
    }

    /// See [`Interner::share_owned`].
    pub fn share_owned(&self, value: T) -> Arc<T> {
        self.lock().share_owned(value)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn labels(app: &str, hash: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app".to_string(), app.to_string()),
            ("pod-template-hash".to_string(), hash.to_string()),
        ])
    }

    #[test]
    fn equal_values_share_one_copy_and_different_ones_do_not() {
        let mut table = Interner::default();
        let a = table.share(&labels("web", "abc"));
        let b = table.share_owned(labels("web", "abc"));
        let c = table.share(&labels("web", "xyz"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(*c, labels("web", "xyz"));
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn values_no_one_holds_are_forgotten_once_the_table_has_grown() {
        let mut table = Interner::default();
        let kept = table.share(&labels("web", "kept"));
        for i in 0..SWEEP_FLOOR - 1 {
            // Dropped at once: no one holds them.
            table.share(&labels("gone", &i.to_string()));
        }
        // The insertion that filled the table swept it: left are the value
        // still held and the one being handed out then.
        assert_eq!(table.len(), 2);
        assert!(Arc::ptr_eq(&kept, &table.share(&labels("web", "kept"))));
        // Below the next sweep point nothing is walked.
        table.share(&labels("gone", "again"));
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn a_process_wide_table_shares_across_callers() {
        static TABLE: Table<BTreeMap<String, String>> = Table::new();
        let a = TABLE.share(&labels("api", "1"));
        let b = std::thread::spawn(|| TABLE.share_owned(labels("api", "1")))
            .join()
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
