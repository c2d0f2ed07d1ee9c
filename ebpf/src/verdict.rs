//! The one decision every hook makes: may this endpoint talk to this peer?

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use portcullis_common::{
    CounterKey, EndpointValue, IdentityKeyData, PolicyKeyData, PolicyValue, UdpFlowKey,
    UdpFlowValue, DIRECTION_EGRESS, DIRECTION_INGRESS, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_KEY_FIXED_BITS, IDENTITY_WORLD, POLICY_KEY_FIXED_BITS, REASON_HOST, REASON_LOCAL,
    REASON_NOT_ISOLATED, REASON_NOT_PROGRAMMED, UDP_FLOW_TIMEOUT_NS, VERDICT_ALLOW, VERDICT_DENY,
};

use crate::maps::{COUNTERS, COUNTERS_LOST, IDENTITIES, POLICY, UDP_FLOWS};

/// A flow as the hooks see it, from the endpoint's point of view.
pub struct Flow {
    pub generation: u32,
    pub direction: u8,
    pub protocol: u8,
    /// The other side's address (16-byte form) and port.
    pub peer_addr: [u8; 16],
    pub peer_port: u16,
    /// The port policy is written against: the destination port.
    pub policy_port: u16,
}

/// Looks up the peer's identity: the longest matching prefix, or WORLD.
#[inline(always)]
fn peer_identity(generation: u32, addr: &[u8; 16]) -> u32 {
    let key = Key::new(
        IDENTITY_KEY_FIXED_BITS + 128,
        IdentityKeyData {
            generation_be: generation.to_be(),
            addr: *addr,
        },
    );
    match IDENTITIES.get(&key) {
        Some(v) => v.identity,
        None => IDENTITY_WORLD,
    }
}

#[inline(always)]
fn policy_lookup(flow: &Flow, endpoint_id: u32, identity: u32) -> Option<PolicyValue> {
    let key = Key::new(
        POLICY_KEY_FIXED_BITS + 16,
        PolicyKeyData {
            generation_be: flow.generation.to_be(),
            endpoint_id_be: endpoint_id.to_be(),
            peer_identity_be: identity.to_be(),
            direction: flow.direction,
            protocol: flow.protocol,
            port_be: flow.policy_port.to_be(),
        },
    );
    POLICY.get(&key).copied()
}

#[inline(always)]
fn is_local(ep: &EndpointValue, addr: &[u8; 16]) -> bool {
    let loopback4 =
        addr[..10] == [0u8; 10] && addr[10] == 0xff && addr[11] == 0xff && addr[12] == 127;
    let mut loopback6 = [0u8; 16];
    loopback6[15] = 1;
    loopback4 || *addr == loopback6 || *addr == ep.ipv4_mapped || *addr == ep.ipv6
}

/// Decides a flow of an enforced endpoint. The compiler emits, per endpoint,
/// direction and protocol, complete entries for every peer identity any rule
/// names (wildcard rules folded in), plus an `IDENTITY_ANY` entry for all
/// other peers; so one specific lookup, then at most one wildcard lookup.
#[inline(always)]
pub fn decide(ep: &EndpointValue, flow: &Flow) -> PolicyValue {
    if is_local(ep, &flow.peer_addr) {
        return allow(REASON_LOCAL);
    }
    let identity = peer_identity(flow.generation, &flow.peer_addr);
    if flow.direction == DIRECTION_INGRESS && identity == IDENTITY_HOST {
        return allow(REASON_HOST);
    }
    if let Some(v) = policy_lookup(flow, ep.endpoint_id, identity) {
        return v;
    }
    if let Some(v) = policy_lookup(flow, ep.endpoint_id, IDENTITY_ANY) {
        return v;
    }
    allow(REASON_NOT_ISOLATED)
}

/// Decides a flow of a pod that is not programmed yet (see
/// `endpoint::Owner::NotProgrammed`): its own addresses are unknown, so
/// only loopback and, on ingress, the node pass.
#[inline(always)]
pub fn decide_unprogrammed(flow: &Flow) -> PolicyValue {
    if is_local(&EndpointValue::default(), &flow.peer_addr) {
        return allow(REASON_LOCAL);
    }
    if flow.direction == DIRECTION_INGRESS
        && peer_identity(flow.generation, &flow.peer_addr) == IDENTITY_HOST
    {
        return allow(REASON_HOST);
    }
    deny(REASON_NOT_PROGRAMMED)
}

#[inline(always)]
pub fn allow(reason: u8) -> PolicyValue {
    PolicyValue {
        verdict: VERDICT_ALLOW,
        reason,
        _pad: 0,
        rule_cookie: 0,
    }
}

#[inline(always)]
pub fn deny(reason: u8) -> PolicyValue {
    PolicyValue {
        verdict: VERDICT_DENY,
        reason,
        _pad: 0,
        rule_cookie: 0,
    }
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

/// The conversation a datagram belongs to, as its initiator recorded it.
#[inline(always)]
fn udp_flow_key(ep: &EndpointValue, flow: &Flow, local_port: u16, initiated: u8) -> UdpFlowKey {
    UdpFlowKey {
        endpoint_id: ep.endpoint_id,
        peer_addr: flow.peer_addr,
        peer_port: flow.peer_port,
        local_port,
        initiated,
        _pad: [0; 3],
    }
}

/// Is this datagram a reply within a live conversation that the other side
/// (the peer, for an egress datagram; this endpoint, for an ingress one)
/// started with an allowed datagram? A live one is refreshed.
#[inline(always)]
pub fn udp_reply(ep: &EndpointValue, flow: &Flow, local_port: u16) -> bool {
    let initiated = if flow.direction == DIRECTION_INGRESS {
        DIRECTION_EGRESS
    } else {
        DIRECTION_INGRESS
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let mut key = udp_flow_key(ep, flow, local_port, initiated);
    if refresh_if_live(&key, now) {
        return true;
    }
    // A conversation started with connect() was recorded without a port.
    if initiated == DIRECTION_EGRESS {
        key.local_port = 0;
        return refresh_if_live(&key, now);
    }
    false
}

#[inline(always)]
fn refresh_if_live(key: &UdpFlowKey, now: u64) -> bool {
    match UDP_FLOWS.get_ptr_mut(key) {
        Some(v) => {
            // SAFETY: plain data; a racing writer only stores a time too.
            let last = unsafe { (*v).last_seen_ns };
            if now.saturating_sub(last) >= UDP_FLOW_TIMEOUT_NS {
                return false;
            }
            unsafe { (*v).last_seen_ns = now };
            true
        }
        None => false,
    }
}

/// Remembers a conversation this datagram (allowed by policy) starts.
#[inline(always)]
pub fn remember_udp(ep: &EndpointValue, flow: &Flow, local_port: u16) {
    let key = udp_flow_key(ep, flow, local_port, flow.direction);
    let value = UdpFlowValue {
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    // An LRU map evicts old conversations instead of failing when full.
    let _ = UDP_FLOWS.insert(&key, &value, 0);
}
