//! Reading a value out of an LRU hash map without trusting it in place.
//!
//! An LRU map hands an evicted element to a new key at once, not after the
//! programs reading it are done (its free lists do not wait for an RCU
//! grace period). A value read in place may therefore be, or become
//! halfway, another key's: another flow's decision, another
//! conversation's time, another socket's destination. So every value kept
//! in one of our LRU maps carries the key it was kept under, is copied out
//! in one go, and the copy counts only if it names the key asked for and
//! the lookup, made again, finds the same element. Writes go through
//! `insert`, which replaces the element under the bucket's lock, never
//! into the element found.
//!
//! What stays possible: the element is reused twice within the copy, the
//! second time for this very key, so the copy mixes two values of the key
//! (each one true when written). The reasoning assumes the loads of the
//! copy complete before the second lookup's, which x86 guarantees.

use aya_ebpf::maps::LruHashMap;

/// A value that names the key it is kept under.
pub trait Keyed<K> {
    fn key(&self) -> &K;
}

/// A copy of the value kept under `key`, if there is one and it is that
/// key's (see the module's comment).
#[inline(always)]
pub fn copy<K: PartialEq, V: Copy + Keyed<K>>(map: &LruHashMap<K, V>, key: &K) -> Option<V> {
    let found = map.get_ptr(key)?;
    // SAFETY: map memory, valid for the program's run; copied in one go,
    // then checked, as another key may be writing it.
    let value = unsafe { core::ptr::read_volatile(found) };
    if value.key() != key {
        return None;
    }
    let again = map.get_ptr(key)?;
    core::ptr::eq(found, again).then_some(value)
}
