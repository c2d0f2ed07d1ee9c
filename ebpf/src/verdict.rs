//! The kernel's side of the shared decision (`portcullis_common::decide`):
//! its maps, its counters, and the conversation table that lets replies in.

use aya_ebpf::{bindings::BPF_EXIST, helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key};
use portcullis_common::{
    decide::{self, Decision, Flow, PolicyMaps},
    ConversationKey, ConversationValue, CounterKey, EndpointValue, IdentityKeyData, PolicyKeyData,
    PolicyValue, CONVERSATION_TIMEOUT_NS, DIRECTION_EGRESS, DIRECTION_INGRESS,
    IDENTITY_KEY_FIXED_BITS, POLICY_KEY_FIXED_BITS, VERDICT_DENY,
};

use crate::{
    decisions::Slot,
    lru::{self, Keyed},
    maps::{CONVERSATIONS, COUNTERS, COUNTERS_LOST, IDENTITIES, POLICY},
};

pub use decide::deny;

/// The identity and policy tries of the kernel.
struct KernelMaps;

impl PolicyMaps for KernelMaps {
    type Error = ();

    #[inline(always)]
    fn identity(&self, generation: u32, addr: &[u8; 16]) -> Result<Option<u32>, ()> {
        let key = Key::new(
            IDENTITY_KEY_FIXED_BITS + 128,
            IdentityKeyData {
                generation_be: generation.to_be(),
                addr: *addr,
            },
        );
        Ok(IDENTITIES.get(&key).map(|v| v.identity))
    }

    #[inline(always)]
    fn policy(&self, key: &PolicyKeyData) -> Result<Option<PolicyValue>, ()> {
        Ok(POLICY
            .get(&Key::new(POLICY_KEY_FIXED_BITS + 16, *key))
            .copied())
    }
}

/// Decides a flow of an enforced endpoint (see `decide::decide`) under
/// policy epoch `epoch`, the one `flow.generation` was read with: from the
/// decisions of that epoch if this flow was decided already.
#[inline(always)]
pub fn decide(epoch: u32, ep: &EndpointValue, flow: &Flow) -> PolicyValue {
    let slot = Slot::of(epoch, ep, flow);
    if let Some(v) = slot.get() {
        return v;
    }
    match decide::decide(&KernelMaps, ep, flow) {
        Ok(Decision { value, .. }) => {
            slot.keep(value);
            value
        }
        // The kernel's lookups cannot fail; a map that could would deny.
        Err(()) => deny(portcullis_common::REASON_MALFORMED),
    }
}

/// Decides a flow of a pod below a pending guard (see
/// `decide::decide_unprogrammed`).
#[inline(always)]
pub fn decide_unprogrammed(flow: &Flow) -> PolicyValue {
    decide::decide_unprogrammed(&KernelMaps, flow)
        .unwrap_or(deny(portcullis_common::REASON_NOT_PROGRAMMED))
}

/// Adds one to the counter of this decision.
#[inline(always)]
pub fn count(ep: &EndpointValue, flow: &Flow, v: &PolicyValue) {
    let key = CounterKey {
        endpoint_id: ep.endpoint_id,
        rule_cookie: v.rule_cookie,
        direction: flow.direction,
        verdict: v.verdict,
        reason: v.reason,
        protocol: flow.protocol,
    };
    if let Some(c) = COUNTERS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, only this CPU writes it.
        unsafe { *c += 1 };
        return;
    }
    if COUNTERS.insert(&key, &1, 0).is_err() {
        if let Some(lost) = COUNTERS_LOST.get_ptr_mut(0) {
            // SAFETY: per-CPU value, only this CPU writes it.
            unsafe { *lost += 1 };
        }
    }
}

impl Keyed<ConversationKey> for ConversationValue {
    fn key(&self) -> &ConversationKey {
        &self.key
    }
}

/// A packet of a datagram conversation, from the endpoint's point of view.
pub struct Datagram {
    /// The IP protocol (UDP, or one judged without ports).
    pub protocol: u8,
    pub local_port: u16,
    /// The policy epoch the flow's generation was read with.
    pub epoch: u32,
}

#[inline(always)]
fn conversation_key(
    ep: &EndpointValue,
    flow: &Flow,
    d: &Datagram,
    initiated: u8,
) -> ConversationKey {
    ConversationKey {
        endpoint_id: ep.endpoint_id,
        peer_addr: flow.peer_addr,
        peer_port: flow.peer_port,
        local_port: d.local_port,
        initiated,
        protocol: d.protocol,
        _pad: [0; 2],
    }
}

/// What the conversation table says about a datagram as a reply.
pub enum Conversation {
    /// A reply within a live conversation whose start the current policy
    /// allows: pass without judging.
    Live,
    /// A reply within a live conversation the peer started, whose start the
    /// current policy no longer allows: drop, with the start's verdict.
    Revoked(PolicyValue),
    /// Not a reply: judge the datagram as a flow of its own.
    New,
}

/// Is the datagram a reply within a conversation the other side started
/// (same protocol, addresses and both ports, opposite direction)? A
/// conversation whose start was judged under an older policy epoch is
/// judged again, so a policy change reaches live conversations.
#[inline(always)]
pub fn reply(ep: &EndpointValue, flow: &Flow, d: &Datagram) -> Conversation {
    let now = coarse_now();
    let opposite = if flow.direction == DIRECTION_INGRESS {
        DIRECTION_EGRESS
    } else {
        DIRECTION_INGRESS
    };
    let key = conversation_key(ep, flow, d, opposite);
    let Some(entry) = live(&key, now) else {
        return Conversation::New;
    };
    if entry.epoch != d.epoch {
        // The start went the other way, to the initiator's destination port.
        let start = Flow {
            direction: opposite,
            policy_port: if opposite == DIRECTION_INGRESS {
                d.local_port
            } else {
                flow.peer_port
            },
            ..*flow
        };
        let v = decide(d.epoch, ep, &start);
        if v.verdict == VERDICT_DENY {
            return Conversation::Revoked(v);
        }
    }
    refresh(&key, &entry, now, d.epoch);
    Conversation::Live
}

/// Is the datagram a further packet of a live conversation this side
/// started, judged under the current policy epoch?
#[inline(always)]
pub fn onward(ep: &EndpointValue, flow: &Flow, d: &Datagram) -> bool {
    let now = coarse_now();
    let key = conversation_key(ep, flow, d, flow.direction);
    match live(&key, now) {
        Some(entry) if entry.epoch == d.epoch => {
            refresh(&key, &entry, now, d.epoch);
            true
        }
        _ => false,
    }
}

/// How stale a live conversation's time may get before a packet writes it
/// again: a write per packet would bounce the entry between CPUs, and a
/// second is nothing against [`CONVERSATION_TIMEOUT_NS`].
const REFRESH_NS: u64 = 1_000_000_000;

/// The clock of conversations: a tick's resolution is plenty for a timeout
/// of minutes, and it reads no hardware counter.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// A copy of the conversation kept under `key`, if it has not timed out.
#[inline(always)]
fn live(key: &ConversationKey, now: u64) -> Option<ConversationValue> {
    let v = lru::copy(&CONVERSATIONS, key)?;
    (now.saturating_sub(v.last_seen_ns) < CONVERSATION_TIMEOUT_NS).then_some(v)
}

/// Records that the live conversation `entry` carried an allowed packet at
/// `now`, its start allowed under `epoch`. Replaced whole, and only if it
/// is still there: never written in place (see [`crate::lru`]).
#[inline(always)]
fn refresh(key: &ConversationKey, entry: &ConversationValue, now: u64, epoch: u32) {
    if entry.epoch == epoch && now.saturating_sub(entry.last_seen_ns) < REFRESH_NS {
        return;
    }
    let value = ConversationValue {
        last_seen_ns: now,
        epoch,
        _pad: 0,
        key: *key,
        _pad2: 0,
    };
    // Gone since the copy (evicted): the next packet is judged afresh.
    let _ = CONVERSATIONS.insert(key, &value, BPF_EXIST as u64);
}

/// Remembers a conversation this allowed datagram starts (or continues
/// under a new policy epoch).
#[inline(always)]
pub fn remember(ep: &EndpointValue, flow: &Flow, d: &Datagram) {
    let key = conversation_key(ep, flow, d, flow.direction);
    let value = ConversationValue {
        last_seen_ns: coarse_now(),
        epoch: d.epoch,
        _pad: 0,
        key,
        _pad2: 0,
    };
    // An LRU map evicts old conversations instead of failing when full.
    let _ = CONVERSATIONS.insert(&key, &value, 0);
}
