//! Stable ids: the same key gets the same id in every compile it appears in,
//! so consecutive generations differ only where the policy did.
//!
//! Ids are never reused: one that disappears and comes back gets a new id.
//! That keeps counters keyed by id from silently changing meaning, and
//! forgetting keys that were not used keeps memory bounded under churn.

use std::{collections::HashMap, hash::Hash};

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
    /// kept if the compile succeeds ([`IdRound::finish`]).
    pub fn round(&self) -> IdRound<'_, K> {
        IdRound {
            previous: self,
            used: HashMap::new(),
            next: self.next,
        }
    }
}

pub struct IdRound<'a, K> {
    previous: &'a IdAllocator<K>,
    used: HashMap<K, u32>,
    next: u32,
}

impl<K: Hash + Eq + Clone> IdRound<'_, K> {
    /// The id of `key`, or `None` when the id space is exhausted.
    pub fn id(&mut self, key: &K) -> Option<u32> {
        if let Some(id) = self.used.get(key) {
            return Some(*id);
        }
        let id = match self.previous.ids.get(key) {
            Some(id) => *id,
            None if self.next < self.previous.end => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.used.insert(key.clone(), id);
        Some(id)
    }

    /// The allocator for the next compile: knows only this round's keys.
    pub fn finish(self) -> IdAllocator<K> {
        IdAllocator {
            ids: self.used,
            next: self.next,
            end: self.previous.end,
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
        alloc = round.finish();

        let mut round = alloc.round();
        assert_eq!(round.id(&"b"), Some(17), "kept across rounds");
        assert_eq!(round.id(&"c"), Some(18), "a's id is not reused");
        assert_eq!(round.id(&"d"), None, "space exhausted");
        alloc = round.finish();

        let mut round = alloc.round();
        assert_eq!(
            round.id(&"a"),
            None,
            "a was forgotten and the space is full"
        );
        assert_eq!(round.id(&"c"), Some(18));
    }
}
