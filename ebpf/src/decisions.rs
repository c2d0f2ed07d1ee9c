//! Decisions already made under the policy epoch in force, so a repeated
//! flow costs two lookups in one hash table instead of the identity and
//! policy tries.
//!
//! Every TCP connection is decided three times (its connect, its SYN as it
//! leaves, the server's SYN as it arrives), each by two or three
//! longest-prefix lookups; those tries were the largest share of what the
//! programs add to a connection. A decision depends only on the endpoint,
//! the flow and the maps of one epoch, and the agent never writes the maps
//! of the epoch in force (it writes the other generation, then flips):
//! keyed by the epoch, an entry can only be read while it is still true.
//! The epoch is a u32 that wraps after 2^32 flips; an entry older than
//! [`MAX_AGE_NS`] is decided again, so a wrapped epoch can never meet an
//! entry of its namesake.
//!
//! The map is not pinned: each loaded program set has its own, created
//! empty, so no entry outlives the programs that made it.
//!
//! Kept decisions carry their key and are read through [`crate::lru`]: an
//! LRU map may hand an element to another flow while it is read.

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU, helpers::bpf_ktime_get_coarse_ns, macros::map, maps::LruHashMap,
};
use portcullis_common::{decide::Flow, EndpointValue, PolicyValue};

use crate::lru::{self, Keyed};

/// Distinct (endpoint, peer, port) flows remembered; LRU, so a table full
/// of other flows only means deciding this one in full. With a list per
/// CPU the kernel splits these among the *possible* CPUs, online or not.
const CAPACITY: u32 = 32_768;

/// How long an entry is used; its flow is then decided afresh.
const MAX_AGE_NS: u64 = 1_000_000_000;

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
struct DecisionKey {
    epoch: u32,
    endpoint_id: u32,
    peer_addr: [u8; 16],
    policy_port: u16,
    direction: u8,
    protocol: u8,
}

const _: () = assert!(core::mem::size_of::<DecisionKey>() == 28);

#[repr(C)]
#[derive(Clone, Copy)]
struct Decided {
    at_ns: u64,
    value: PolicyValue,
    /// The key it was kept under (see [`crate::lru`]).
    key: DecisionKey,
    _pad: u32,
}
// No implicit padding: the verifier refuses to copy unwritten stack bytes
// into a map.
const _: () = assert!(core::mem::size_of::<Decided>() == 48);

impl Keyed<DecisionKey> for Decided {
    fn key(&self) -> &DecisionKey {
        &self.key
    }
}

/// Each CPU evicts from its own LRU list: no lock shared between CPUs, and
/// a pod churning through flows evicts only what its CPU kept.
#[map]
static DECISIONS: LruHashMap<DecisionKey, Decided> =
    LruHashMap::with_max_entries(CAPACITY, BPF_F_NO_COMMON_LRU);

/// Where one flow's decision is kept.
pub struct Slot {
    key: DecisionKey,
    now: u64,
}

impl Slot {
    /// The slot of `flow` for endpoint `ep`, decided under `epoch` (the
    /// epoch `flow.generation` was read with).
    #[inline(always)]
    pub fn of(epoch: u32, ep: &EndpointValue, flow: &Flow) -> Self {
        Self {
            key: DecisionKey {
                epoch,
                endpoint_id: ep.endpoint_id,
                peer_addr: flow.peer_addr,
                policy_port: flow.policy_port,
                direction: flow.direction,
                protocol: flow.protocol,
            },
            // The coarse clock (a tick's resolution is plenty for an age)
            // reads no hardware counter: under a hypervisor the precise
            // one cost a fifth of a decision.
            // SAFETY: helper without arguments.
            now: unsafe { bpf_ktime_get_coarse_ns() },
        }
    }

    /// The decision made for this slot, if it is recent enough to use.
    #[inline(always)]
    pub fn get(&self) -> Option<PolicyValue> {
        let d = lru::copy(&DECISIONS, &self.key)?;
        (self.now.wrapping_sub(d.at_ns) < MAX_AGE_NS).then_some(d.value)
    }

    /// Keeps a decision just made for this slot.
    #[inline(always)]
    pub fn keep(&self, value: PolicyValue) {
        let d = Decided {
            at_ns: self.now,
            value,
            key: self.key,
            _pad: 0,
        };
        // A failed insert only means the next packet decides in full.
        let _ = DECISIONS.insert(&self.key, &d, 0);
    }
}
