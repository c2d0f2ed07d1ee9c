//! Stable ids: the same key gets the same id in every compile it appears in,
//! so consecutive generations differ only where the policy did.
//!
//! Ids are never reused: one that disappears and comes back gets a new id.
//! That keeps counters keyed by id from silently changing meaning, and
//! forgetting keys that were not used keeps memory bounded under churn.

use std::hash::Hash;

// foldhash, not SipHash: keys are peer classes (labels, namespaces), hashed
// once per class per compile; foldhash is seeded per process.
use foldhash::{HashMap, HashMapExt as _};

#[derive(Debug, Clone)]
pub struct IdAllocator<K> {
    ids: HashMap<K, u32>,
    next: u32,
    /// First id that must never be handed out.
    end: u32,
}

impl<K: Hash + Eq + Clone> IdAllocator<K> {
    /// Hands out ids from `first` up to, not including, `end`.
    pub fn new(first: u32, end: u32) -> Self {
        Self {
            ids: HashMap::new(),
            next: first,
            end,
        }
    }

    /// Starts a compile: ids are looked up or allocated in the round and only
    /// kept if the compile succeeds ([`IdAllocator::apply`]).
    pub fn round(&self) -> IdRound<'_, K> {
        IdRound {
            previous: self,
            kept: IdSet::below(self.next),
            fresh: HashMap::new(),
            next: self.next,
        }
    }

    /// Ends a successful round: the allocator then knows only its keys.
    pub fn apply(&mut self, sweep: Sweep<K>) {
        self.ids.retain(|_, id| sweep.kept.contains(*id));
        self.ids.extend(sweep.fresh);
        self.next = sweep.next;
    }
}

/// The ids a round used, one bit each: ids are dense (handed out in
/// sequence), and a compile marks one per replayed entry, thousands a
/// pass, which a hash set spent milliseconds on.
#[derive(Default)]
struct IdSet {
    words: Vec<u64>,
}

impl IdSet {
    /// Room for the ids below `end` without growing.
    fn below(end: u32) -> Self {
        Self {
            words: vec![0; (end as usize).div_ceil(64)],
        }
    }

    fn insert(&mut self, id: u32) {
        let word = id as usize / 64;
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        self.words[word] |= 1 << (id % 64);
    }

    fn contains(&self, id: u32) -> bool {
        self.words
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    }
}

/// A compile's use of ids: previous ids it used (marked, by id alone, so a
/// replay need not hash its keys) and keys new to it.
pub struct IdRound<'a, K> {
    previous: &'a IdAllocator<K>,
    kept: IdSet,
    fresh: HashMap<K, u32>,
    next: u32,
}

/// What a finished round used, for [`IdAllocator::apply`].
pub struct Sweep<K> {
    kept: IdSet,
    fresh: HashMap<K, u32>,
    next: u32,
}

impl<K: Hash + Eq + Clone> IdRound<'_, K> {
    /// The id of `key`, or `None` when the id space is exhausted.
    pub fn id(&mut self, key: &K) -> Option<u32> {
        if let Some(&id) = self.previous.ids.get(key) {
            self.kept.insert(id);
            return Some(id);
        }
        if let Some(&id) = self.fresh.get(key) {
            return Some(id);
        }
        if self.next >= self.previous.end {
            return None;
        }
        let id = self.next;
        self.next += 1;
        self.fresh.insert(key.clone(), id);
        Some(id)
    }

    /// Keeps `id`, which the previous round handed out to a key this round
    /// uses unchanged (a replayed entry's cookie): as [`IdRound::id`] of
    /// that key, without hashing it.
    pub fn keep(&mut self, id: u32) {
        debug_assert!(id < self.previous.next, "id {id} was never handed out");
        self.kept.insert(id);
    }

    /// Whether the round uses `id`, which the previous round handed out.
    pub fn kept(&self, id: u32) -> bool {
        self.kept.contains(id)
    }

    pub fn finish(self) -> Sweep<K> {
        Sweep {
            kept: self.kept,
            fresh: self.fresh,
            next: self.next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_never_reused_and_bounded() {
        let mut alloc = IdAllocator::new(16, 19);
        let mut round = alloc.round();
        assert_eq!(round.id(&"a"), Some(16));
        assert_eq!(round.id(&"b"), Some(17));
        assert_eq!(round.id(&"a"), Some(16));
        let sweep = round.finish();
        alloc.apply(sweep);

        let mut round = alloc.round();
        assert_eq!(round.id(&"b"), Some(17), "kept across rounds");
        assert_eq!(round.id(&"c"), Some(18), "a's id is not reused");
        assert_eq!(round.id(&"d"), None, "space exhausted");
        let sweep = round.finish();
        alloc.apply(sweep);

        let mut round = alloc.round();
        assert_eq!(
            round.id(&"a"),
            None,
            "a was forgotten and the space is full"
        );
        assert_eq!(round.id(&"c"), Some(18));
    }

    #[test]
    fn a_kept_id_survives_the_round_and_an_unused_one_is_forgotten() {
        let mut alloc = IdAllocator::new(1, 100);
        let mut round = alloc.round();
        let (a, b) = (round.id(&"a").unwrap(), round.id(&"b").unwrap());
        let sweep = round.finish();
        alloc.apply(sweep);

        // "a" is kept by id alone (a replay), "b" is not used.
        let mut round = alloc.round();
        round.keep(a);
        let sweep = round.finish();
        alloc.apply(sweep);

        let mut round = alloc.round();
        assert_eq!(round.id(&"a"), Some(a), "kept by its id");
        assert_ne!(round.id(&"b"), Some(b), "forgotten, so it gets a new id");
    }

    #[test]
    fn a_round_that_is_not_applied_changes_nothing() {
        let mut alloc = IdAllocator::new(1, 100);
        let mut round = alloc.round();
        let a = round.id(&"a").unwrap();
        let sweep = round.finish();
        alloc.apply(sweep);

        // A failed compile: its round is dropped.
        let mut round = alloc.round();
        assert!(round.id(&"new").is_some());
        drop(round);

        let mut round = alloc.round();
        assert_eq!(round.id(&"a"), Some(a), "still known");
        assert_eq!(
            round.id(&"new"),
            Some(a + 1),
            "the failed round's id was never kept"
        );
    }
}
