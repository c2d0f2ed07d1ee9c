//! The one decision every hook makes — may this endpoint talk to this peer?
//! — written once: the kernel programs run it on their maps, `portcullis
//! explain` on the pinned maps, and the agent's tests on compiled map
//! contents, each through [`PolicyMaps`].

use crate::{
    EndpointValue, PolicyKeyData, PolicyValue, DIRECTION_INGRESS, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_WORLD, PROTO_OTHER, PROTO_SCTP, PROTO_TCP, PROTO_UDP, REASON_HOST, REASON_LOCAL,
    REASON_NOT_ISOLATED, REASON_NOT_PROGRAMMED, VERDICT_ALLOW, VERDICT_DENY,
};

/// The identity and policy maps of one generation, however they are held.
pub trait PolicyMaps {
    type Error;
    /// The identity of the longest prefix holding `addr`, if any.
    fn identity(&self, generation: u32, addr: &[u8; 16]) -> Result<Option<u32>, Self::Error>;
    /// The entry whose port block holds `key.port_be` with the longest
    /// prefix, if any (the other key fields match exactly).
    fn policy(&self, key: &PolicyKeyData) -> Result<Option<PolicyValue>, Self::Error>;
}

/// A flow as the hooks see it, from the endpoint's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub generation: u32,
    pub direction: u8,
    /// The protocol policy judges: TCP, UDP, SCTP or [`PROTO_OTHER`] (see
    /// [`policy_protocol`]).
    pub protocol: u8,
    /// The other side's address (16-byte form) and port.
    pub peer_addr: [u8; 16],
    pub peer_port: u16,
    /// The port policy is written against: the destination port (0 for
    /// [`PROTO_OTHER`]).
    pub policy_port: u16,
}

/// What decided, and whom the peer address was taken for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub value: PolicyValue,
    pub peer_identity: u32,
}

/// The protocol under which policy judges IP protocol `protocol`: TCP,
/// UDP and SCTP by port, everything else as [`PROTO_OTHER`].
#[inline(always)]
pub fn policy_protocol(protocol: u8) -> u8 {
    match protocol {
        PROTO_TCP | PROTO_UDP | PROTO_SCTP => protocol,
        _ => PROTO_OTHER,
    }
}

/// Loopback, or one of the endpoint's own addresses (an endpoint without
/// an address of a family has none in it). Traffic to these is always
/// allowed, and an enforced endpoint may send from nothing else.
#[inline(always)]
pub fn is_local(ep: &EndpointValue, addr: &[u8; 16]) -> bool {
    let unset = [0u8; 16];
    is_loopback(addr) || (*addr != unset && (*addr == ep.ipv4_mapped || *addr == ep.ipv6))
}

/// 127.0.0.0/8 (mapped) or ::1.
#[inline(always)]
pub fn is_loopback(addr: &[u8; 16]) -> bool {
    let loopback4 = crate::is_ipv4_mapped(addr) && addr[12] == 127;
    let mut loopback6 = [0u8; 16];
    loopback6[15] = 1;
    loopback4 || *addr == loopback6
}

/// Decides a flow of an enforced endpoint. The compiler emits, per endpoint,
/// direction and protocol, complete entries for every peer identity any rule
/// names (wildcard rules folded in), plus an [`IDENTITY_ANY`] entry for all
/// other peers; so one specific lookup, then at most one wildcard lookup.
#[inline(always)]
pub fn decide<M: PolicyMaps>(
    maps: &M,
    ep: &EndpointValue,
    flow: &Flow,
) -> Result<Decision, M::Error> {
    if is_local(ep, &flow.peer_addr) {
        return Ok(Decision {
            value: allow(REASON_LOCAL),
            peer_identity: IDENTITY_WORLD,
        });
    }
    let identity = maps
        .identity(flow.generation, &flow.peer_addr)?
        .unwrap_or(IDENTITY_WORLD);
    let decided = |value| Decision {
        value,
        peer_identity: identity,
    };
    if flow.direction == DIRECTION_INGRESS && identity == IDENTITY_HOST {
        return Ok(decided(allow(REASON_HOST)));
    }
    if let Some(v) = maps.policy(&policy_key(flow, ep.endpoint_id, identity))? {
        return Ok(decided(v));
    }
    if let Some(v) = maps.policy(&policy_key(flow, ep.endpoint_id, IDENTITY_ANY))? {
        return Ok(decided(v));
    }
    Ok(decided(allow(REASON_NOT_ISOLATED)))
}

/// Decides a flow of a pod that is not programmed yet (below a pending
/// guard): its own addresses are unknown, so only loopback and, on ingress,
/// the node pass.
#[inline(always)]
pub fn decide_unprogrammed<M: PolicyMaps>(maps: &M, flow: &Flow) -> Result<PolicyValue, M::Error> {
    if is_loopback(&flow.peer_addr) {
        return Ok(allow(REASON_LOCAL));
    }
    if flow.direction == DIRECTION_INGRESS
        && maps.identity(flow.generation, &flow.peer_addr)? == Some(IDENTITY_HOST)
    {
        return Ok(allow(REASON_HOST));
    }
    Ok(deny(REASON_NOT_PROGRAMMED))
}

/// The full-length key of a flow's policy lookup for `peer_identity`.
#[inline(always)]
pub fn policy_key(flow: &Flow, endpoint_id: u32, peer_identity: u32) -> PolicyKeyData {
    PolicyKeyData {
        generation_be: flow.generation.to_be(),
        endpoint_id_be: endpoint_id.to_be(),
        peer_identity_be: peer_identity.to_be(),
        direction: flow.direction,
        protocol: flow.protocol,
        port_be: flow.policy_port.to_be(),
    }
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

#[cfg(test)]
mod tests;
