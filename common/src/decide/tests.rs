//! Host tests of the shared decision, on maps held in plain collections.

use super::*;
use crate::{ipv4_mapped, DIRECTION_EGRESS, REASON_DEFAULT_DENY, REASON_POLICY};

extern crate std;
use std::{collections::BTreeMap, convert::Infallible};

/// Exact identities and (endpoint, peer, direction, protocol) → port blocks.
#[derive(Default)]
struct Maps {
    identities: BTreeMap<[u8; 16], u32>,
    /// (peer identity, protocol, first port, last port) → value.
    policy: std::vec::Vec<(u32, u8, u16, u16, PolicyValue)>,
}

impl PolicyMaps for Maps {
    type Error = Infallible;
    fn identity(&self, _generation: u32, addr: &[u8; 16]) -> Result<Option<u32>, Infallible> {
        Ok(self.identities.get(addr).copied())
    }
    fn policy(&self, key: &PolicyKeyData) -> Result<Option<PolicyValue>, Infallible> {
        let port = u16::from_be(key.port_be);
        let peer = u32::from_be(key.peer_identity_be);
        Ok(self
            .policy
            .iter()
            .filter(|(p, proto, first, last, _)| {
                *p == peer && *proto == key.protocol && (*first..=*last).contains(&port)
            })
            .min_by_key(|(_, _, first, last, _)| last - first)
            .map(|e| e.4))
    }
}

const POD: [u8; 4] = [10, 0, 0, 5];
const PEER: [u8; 4] = [10, 0, 0, 9];
const NODE: [u8; 4] = [10, 0, 0, 1];

fn endpoint() -> EndpointValue {
    EndpointValue {
        endpoint_id: 7,
        flags: 0,
        ipv4_mapped: ipv4_mapped(POD),
        ipv6: [0; 16],
    }
}

fn flow(direction: u8, protocol: u8, peer: [u8; 16], port: u16) -> Flow {
    Flow {
        generation: 0,
        direction,
        protocol,
        peer_addr: peer,
        peer_port: 40000,
        policy_port: port,
    }
}

fn value(verdict: u8, reason: u8, rule_cookie: u32) -> PolicyValue {
    PolicyValue {
        verdict,
        reason,
        _pad: 0,
        rule_cookie,
    }
}

fn isolated_maps() -> Maps {
    let mut maps = Maps::default();
    maps.identities.insert(ipv4_mapped(PEER), 20);
    maps.identities.insert(ipv4_mapped(NODE), IDENTITY_HOST);
    let deny = value(VERDICT_DENY, REASON_DEFAULT_DENY, 1);
    for protocol in [PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_OTHER] {
        maps.policy
            .push((IDENTITY_ANY, protocol, 0, u16::MAX, deny));
    }
    maps.policy.push((20, PROTO_TCP, 0, u16::MAX, deny));
    maps.policy.push((
        20,
        PROTO_TCP,
        80,
        80,
        value(VERDICT_ALLOW, REASON_POLICY, 2),
    ));
    maps
}

fn decide_now(maps: &Maps, f: &Flow) -> Decision {
    match decide(maps, &endpoint(), f) {
        Ok(d) => d,
        Err(never) => match never {},
    }
}

#[test]
fn named_peer_port_is_allowed_others_fall_to_the_wildcard() {
    let maps = isolated_maps();
    let d = decide_now(
        &maps,
        &flow(DIRECTION_INGRESS, PROTO_TCP, ipv4_mapped(PEER), 80),
    );
    assert_eq!(
        (d.value.verdict, d.value.rule_cookie, d.peer_identity),
        (VERDICT_ALLOW, 2, 20)
    );
    let d = decide_now(
        &maps,
        &flow(DIRECTION_INGRESS, PROTO_TCP, ipv4_mapped(PEER), 81),
    );
    assert_eq!(d.value.verdict, VERDICT_DENY);
    let stranger = ipv4_mapped([192, 0, 2, 1]);
    let d = decide_now(&maps, &flow(DIRECTION_INGRESS, PROTO_UDP, stranger, 80));
    assert_eq!(
        (d.value.verdict, d.peer_identity),
        (VERDICT_DENY, IDENTITY_WORLD)
    );
}

#[test]
fn other_protocols_are_judged_by_their_own_entries() {
    let maps = isolated_maps();
    let d = decide_now(
        &maps,
        &flow(DIRECTION_INGRESS, PROTO_OTHER, ipv4_mapped(PEER), 0),
    );
    assert_eq!(d.value.verdict, VERDICT_DENY);
    // Nothing at all for the endpoint: not isolated.
    let d = decide_now(
        &Maps::default(),
        &flow(DIRECTION_EGRESS, PROTO_OTHER, ipv4_mapped(PEER), 0),
    );
    assert_eq!(
        (d.value.verdict, d.value.reason),
        (VERDICT_ALLOW, REASON_NOT_ISOLATED)
    );
}

#[test]
fn the_node_is_let_in_but_not_out() {
    let maps = isolated_maps();
    let d = decide_now(
        &maps,
        &flow(DIRECTION_INGRESS, PROTO_TCP, ipv4_mapped(NODE), 9),
    );
    assert_eq!(
        (d.value.verdict, d.value.reason),
        (VERDICT_ALLOW, REASON_HOST)
    );
    let d = decide_now(
        &maps,
        &flow(DIRECTION_EGRESS, PROTO_TCP, ipv4_mapped(NODE), 9),
    );
    assert_eq!(d.value.verdict, VERDICT_DENY);
}

#[test]
fn local_means_loopback_or_an_address_the_endpoint_has() {
    let ep = endpoint();
    assert!(is_local(&ep, &ipv4_mapped(POD)));
    assert!(is_local(&ep, &ipv4_mapped([127, 3, 2, 1])));
    let mut v6_loopback = [0u8; 16];
    v6_loopback[15] = 1;
    assert!(is_local(&ep, &v6_loopback));
    // The endpoint has no IPv6 address: the unspecified address is not it.
    assert!(!is_local(&ep, &[0u8; 16]));
    assert!(!is_local(&ep, &ipv4_mapped(PEER)));
    let mut link_local = [0u8; 16];
    link_local[0] = 0xfe;
    link_local[1] = 0x80;
    link_local[15] = 5;
    assert!(!is_local(&ep, &link_local));
}

#[test]
fn unprogrammed_pods_reach_only_loopback_and_are_reached_only_by_the_node() {
    let maps = isolated_maps();
    let unprogrammed = |f: &Flow| match decide_unprogrammed(&maps, f) {
        Ok(v) => v,
        Err(never) => match never {},
    };
    let v = unprogrammed(&flow(
        DIRECTION_EGRESS,
        PROTO_TCP,
        ipv4_mapped([127, 0, 0, 1]),
        80,
    ));
    assert_eq!(v.verdict, VERDICT_ALLOW);
    let v = unprogrammed(&flow(DIRECTION_INGRESS, PROTO_TCP, ipv4_mapped(NODE), 80));
    assert_eq!(v.reason, REASON_HOST);
    let v = unprogrammed(&flow(DIRECTION_EGRESS, PROTO_TCP, ipv4_mapped(NODE), 80));
    assert_eq!(v.verdict, VERDICT_DENY);
    let v = unprogrammed(&flow(DIRECTION_INGRESS, PROTO_UDP, [0; 16], 80));
    assert_eq!(v.verdict, VERDICT_DENY);
}

#[test]
fn policy_protocol_folds_everything_without_ports() {
    for p in [PROTO_TCP, PROTO_UDP, PROTO_SCTP] {
        assert_eq!(policy_protocol(p), p);
    }
    for p in [0u8, 1, 2, 41, 47, 58, 136, 253, 255] {
        assert_eq!(policy_protocol(p), PROTO_OTHER, "{p}");
    }
}
