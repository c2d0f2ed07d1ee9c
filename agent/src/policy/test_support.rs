//! Helpers shared by the policy tests, chiefly the kernel's decision
//! (`portcullis_common::decide`, the code the kernel runs) over
//! [`Compiled`] maps, read back in evaluator terms.

use std::{net::IpAddr, path::Path};

use portcullis_common::{
    decide::{self, Flow},
    EndpointValue, DIRECTION_INGRESS, PROTO_OTHER, REASON_DEFAULT_DENY, REASON_HOST, REASON_LOCAL,
    REASON_NOT_ISOLATED, REASON_POLICY, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DENY,
};

use crate::policy::{
    compile::{addr16, Attribution, Compiled, CompiledEndpoint, Compiler},
    evaluate::{evaluate, AuditCause, Decision, DirectionVerdict, FlowQuery},
    model::{Action, Direction, Inventory, PolicyObject, Protocol},
    parse::{parse_inventory, parse_policies},
};

/// An error and its causes on one line.
pub use crate::source::file::error_chain as chain;

pub fn policies(yaml: &str) -> Vec<PolicyObject> {
    parse_policies(Path::new("test.yaml"), yaml).unwrap_or_else(|e| panic!("{}", chain(&e)))
}

pub fn inventory(yaml: &str) -> Inventory {
    parse_inventory(Path::new("workloads.yaml"), yaml).unwrap_or_else(|e| panic!("{}", chain(&e)))
}

pub fn tcp(src: &str, dst: &str, port: u16) -> FlowQuery {
    flow(src, dst, port, Protocol::Tcp)
}

pub fn udp(src: &str, dst: &str, port: u16) -> FlowQuery {
    flow(src, dst, port, Protocol::Udp)
}

pub fn flow(src: &str, dst: &str, port: u16, protocol: Protocol) -> FlowQuery {
    FlowQuery {
        src: src.parse().expect("src address"),
        dst: dst.parse().expect("dst address"),
        port,
        protocol,
    }
}

/// Decides with the evaluator and with the kernel model over the compiled
/// maps, insists they agree, and returns the decision.
pub fn decide(inventory: &Inventory, policies: &[PolicyObject], query: &FlowQuery) -> Decision {
    let compiled = Compiler::new()
        .compile(inventory, policies)
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    let expected = evaluate(inventory, policies, query);
    let kernel = kernel_decide(&compiled, query);
    assert_eq!(
        kernel, expected,
        "kernel model disagrees with evaluate for {query:?}"
    );
    expected
}

/// The kernel's decision for both ends of a flow, in evaluator terms.
pub fn kernel_decide(compiled: &Compiled, query: &FlowQuery) -> Decision {
    let src = addr16(query.src);
    let dst = addr16(query.dst);
    let judge = |own: [u8; 16], direction: u8, peer: [u8; 16]| match endpoint_with(compiled, own) {
        Some(ep) => kernel_judge(
            compiled,
            ep,
            direction,
            query.protocol.number(),
            query.port,
            peer,
        ),
        None => DirectionVerdict::NotEnforced,
    };
    let egress = judge(src, portcullis_common::DIRECTION_EGRESS, dst);
    let ingress = judge(dst, DIRECTION_INGRESS, src);
    Decision {
        allowed: egress.allows() && ingress.allows(),
        egress,
        ingress,
    }
}

fn endpoint_with(compiled: &Compiled, addr: [u8; 16]) -> Option<&CompiledEndpoint> {
    compiled.endpoints.iter().find(|e| own_address(e, &addr))
}

fn own_address(ep: &CompiledEndpoint, addr: &[u8; 16]) -> bool {
    ep.ipv4.map(|v4| addr16(IpAddr::V4(v4))) == Some(*addr)
        || ep.ipv6.map(|v6| v6.octets()) == Some(*addr)
}

/// The kernel's decision for one side of a flow.
fn kernel_judge(
    compiled: &Compiled,
    ep: &CompiledEndpoint,
    direction: u8,
    protocol: u8,
    port: u16,
    peer: [u8; 16],
) -> DirectionVerdict {
    let endpoint = EndpointValue {
        endpoint_id: ep.id,
        flags: 0,
        ipv4_mapped: ep.ipv4.map_or([0; 16], |v4| addr16(IpAddr::V4(v4))),
        ipv6: ep.ipv6.map_or([0; 16], |v6| v6.octets()),
    };
    let flow = Flow {
        generation: 0,
        direction,
        protocol,
        peer_addr: peer,
        peer_port: 0,
        policy_port: if protocol == PROTO_OTHER { 0 } else { port },
    };
    let value = match decide::decide(compiled, &endpoint, &flow) {
        Ok(d) => d.value,
        Err(never) => match never {},
    };
    match value.reason {
        REASON_LOCAL => return DirectionVerdict::Local,
        REASON_HOST => return DirectionVerdict::Host,
        REASON_NOT_ISOLATED if value.rule_cookie == 0 => return DirectionVerdict::NotIsolated,
        _ => {}
    }
    if value.rule_cookie == 0 {
        assert_eq!(
            (value.verdict, value.reason),
            (VERDICT_ALLOW, REASON_NOT_ISOLATED),
            "only 'not isolated' entries carry cookie 0"
        );
        return DirectionVerdict::NotIsolated;
    }
    let attribution = compiled
        .cookies
        .get(&value.rule_cookie)
        .unwrap_or_else(|| panic!("cookie {} has no attribution", value.rule_cookie));
    let expected_direction = if direction == DIRECTION_INGRESS {
        Direction::Ingress
    } else {
        Direction::Egress
    };
    // (verdict, reason) the entry must carry, and the evaluator's terms.
    let (expected, verdict, attributed_direction) = match attribution.clone() {
        Attribution::Rule {
            policy,
            direction,
            rule_index,
        } => (
            (VERDICT_ALLOW, REASON_POLICY),
            DirectionVerdict::Allowed { policy, rule_index },
            direction,
        ),
        Attribution::DefaultDeny {
            direction,
            isolated_by,
        } => (
            (VERDICT_DENY, REASON_DEFAULT_DENY),
            DirectionVerdict::DefaultDeny { isolated_by },
            direction,
        ),
        Attribution::DenyRule {
            policy,
            direction,
            rule_index,
        } => (
            (VERDICT_DENY, REASON_POLICY),
            DirectionVerdict::Denied { policy, rule_index },
            direction,
        ),
        Attribution::TierRule {
            tier,
            priority,
            policy,
            direction,
            rule_index,
            action,
        } => (
            (
                if action == Action::Deny {
                    VERDICT_DENY
                } else {
                    VERDICT_ALLOW
                },
                REASON_POLICY,
            ),
            DirectionVerdict::Tier {
                tier,
                priority,
                policy,
                rule_index,
                action,
            },
            direction,
        ),
        Attribution::AuditDenyRule {
            policy,
            direction,
            rule_index,
        } => (
            (VERDICT_AUDIT, REASON_POLICY),
            DirectionVerdict::Audit {
                policy,
                cause: AuditCause::DenyRule { rule_index },
            },
            direction,
        ),
        Attribution::AuditDefaultDeny { policy, direction } => (
            (VERDICT_AUDIT, REASON_DEFAULT_DENY),
            DirectionVerdict::Audit {
                policy,
                cause: AuditCause::DefaultDeny,
            },
            direction,
        ),
    };
    assert_eq!((value.verdict, value.reason), expected, "{attribution:?}");
    assert_eq!(attributed_direction, expected_direction);
    verdict
}
