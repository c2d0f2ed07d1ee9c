//! Which series a kernel decision counter feeds, and with which labels.
//! Pure: no kernel, no registry. Every label value comes from a fixed enum
//! or from a configured policy object, which bounds cardinality (see
//! docs/metrics.md).

use std::collections::BTreeMap;

use portcullis_common::{
    CounterKey, DIRECTION_EGRESS, DIRECTION_INGRESS, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
    REASON_DEFAULT_DENY, REASON_HOST, REASON_LOCAL, REASON_MALFORMED, REASON_NOT_ISOLATED,
    REASON_NOT_PROGRAMMED, REASON_NO_BACKEND, REASON_PACKET_SOCKET, REASON_PLAINTEXT,
    REASON_POLICY, REASON_REPLY, REASON_SPOOFED, REASON_UNCLASSIFIED, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_DENY,
};
use prometheus_client::encoding::EncodeLabelSet;

use crate::reconcile::PolicyName;

/// Labels of `portcullis_drops_total`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct DropLabels {
    pub direction: &'static str,
    pub reason: &'static str,
    pub protocol: &'static str,
    pub namespace: String,
    pub policy: String,
}

/// Labels of `portcullis_forwards_total`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct ForwardLabels {
    pub direction: &'static str,
    pub reason: &'static str,
    pub protocol: &'static str,
}

/// Labels of `portcullis_audit_total`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, EncodeLabelSet)]
pub struct AuditLabels {
    pub direction: &'static str,
    pub protocol: &'static str,
    pub namespace: String,
    pub policy: String,
}

/// The series one kernel counter feeds. A drop feeds `drop`; an allowed flow
/// `forward`; an audit verdict (the flow passed, an audit-mode policy would
/// have dropped it) both `forward` (reason `audit`) and `audit`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Series {
    pub drop: Option<DropLabels>,
    pub forward: Option<ForwardLabels>,
    pub audit: Option<AuditLabels>,
}

pub fn direction(d: u8) -> &'static str {
    match d {
        DIRECTION_INGRESS => "ingress",
        DIRECTION_EGRESS => "egress",
        _ => "unknown",
    }
}

pub fn protocol(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        PROTO_SCTP => "sctp",
        _ => "other",
    }
}

pub fn reason(r: u8) -> &'static str {
    match r {
        REASON_POLICY => "policy",
        REASON_DEFAULT_DENY => "default_deny",
        REASON_NOT_ISOLATED => "not_isolated",
        REASON_LOCAL => "local",
        REASON_HOST => "host",
        REASON_REPLY => "reply",
        REASON_NO_BACKEND => "no_backend",
        REASON_NOT_PROGRAMMED => "not_programmed",
        REASON_SPOOFED => "spoofed",
        REASON_MALFORMED => "malformed",
        REASON_UNCLASSIFIED => "unclassified",
        REASON_PACKET_SOCKET => "packet_socket",
        REASON_PLAINTEXT => "plaintext",
        _ => "unknown",
    }
}

/// `policy` label of a policy object: `<Kind>/<name>`, e.g.
/// `NetworkPolicy/default-deny`, `ClusterL4Policy/quarantine`. The kind is
/// part of the value because a NetworkPolicy and an L4Policy may share a
/// name in one namespace.
pub fn policy_label(p: &PolicyName) -> String {
    format!("{}/{}", p.kind, p.name)
}

/// (namespace, policy) labels of a rule cookie: the deciding policy; for a
/// default deny the first of the isolating policies (sorted by kind,
/// namespace, name), so that every decision is counted exactly once and
/// sums over `policy` stay exact. Cookie 0 and unknown cookies give empty
/// labels.
pub fn attribution(cookie: u32, names: &BTreeMap<u32, Vec<PolicyName>>) -> (String, String) {
    match names.get(&cookie).and_then(|ps| ps.first()) {
        Some(p) => (p.namespace.clone(), policy_label(p)),
        None => (String::new(), String::new()),
    }
}

/// The series a counter feeds, given what the cookies mean.
pub fn classify(key: &CounterKey, names: &BTreeMap<u32, Vec<PolicyName>>) -> Series {
    let direction = direction(key.direction);
    let protocol = protocol(key.protocol);
    match key.verdict {
        VERDICT_DENY => {
            let (namespace, policy) = attribution(key.rule_cookie, names);
            Series {
                drop: Some(DropLabels {
                    direction,
                    reason: reason(key.reason),
                    protocol,
                    namespace,
                    policy,
                }),
                ..Default::default()
            }
        }
        VERDICT_ALLOW => Series {
            forward: Some(ForwardLabels {
                direction,
                reason: reason(key.reason),
                protocol,
            }),
            ..Default::default()
        },
        VERDICT_AUDIT => {
            let (namespace, policy) = attribution(key.rule_cookie, names);
            Series {
                forward: Some(ForwardLabels {
                    direction,
                    reason: "audit",
                    protocol,
                }),
                audit: Some(AuditLabels {
                    direction,
                    protocol,
                    namespace,
                    policy,
                }),
                ..Default::default()
            }
        }
        // The kernel writes no other verdict; counting it anywhere would
        // make the sums lie.
        _ => Series::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(kind: &str, namespace: &str, name: &str) -> PolicyName {
        PolicyName {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    fn names() -> BTreeMap<u32, Vec<PolicyName>> {
        BTreeMap::from([
            (
                7,
                vec![
                    name("NetworkPolicy", "y", "default-deny"),
                    name("NetworkPolicy", "y", "web"),
                ],
            ),
            (8, vec![name("L4Policy", "y", "no-c")]),
            (9, vec![name("ClusterL4Policy", "", "quarantine")]),
            (10, vec![name("L4Policy", "x", "trial")]),
        ])
    }

    fn key(verdict: u8, reason: u8, cookie: u32) -> CounterKey {
        CounterKey {
            endpoint_id: 1,
            rule_cookie: cookie,
            direction: DIRECTION_INGRESS,
            verdict,
            reason,
            protocol: PROTO_TCP,
        }
    }

    #[test]
    fn default_deny_is_attributed_to_the_first_isolating_policy() {
        let s = classify(&key(VERDICT_DENY, REASON_DEFAULT_DENY, 7), &names());
        assert_eq!(
            s.drop,
            Some(DropLabels {
                direction: "ingress",
                reason: "default_deny",
                protocol: "tcp",
                namespace: "y".into(),
                policy: "NetworkPolicy/default-deny".into(),
            })
        );
        assert_eq!((s.forward, s.audit), (None, None));
    }

    #[test]
    fn explicit_and_cluster_denies_name_their_policy() {
        let l4 = classify(&key(VERDICT_DENY, REASON_POLICY, 8), &names())
            .drop
            .unwrap();
        assert_eq!(
            (l4.namespace.as_str(), l4.policy.as_str()),
            ("y", "L4Policy/no-c")
        );
        assert_eq!(l4.reason, "policy");
        let cluster = classify(&key(VERDICT_DENY, REASON_POLICY, 9), &names())
            .drop
            .unwrap();
        assert_eq!(
            (cluster.namespace.as_str(), cluster.policy.as_str()),
            ("", "ClusterL4Policy/quarantine")
        );
    }

    #[test]
    fn audit_counts_as_a_forward_and_an_audit() {
        let s = classify(&key(VERDICT_AUDIT, REASON_DEFAULT_DENY, 10), &names());
        assert_eq!(s.drop, None);
        assert_eq!(s.forward.unwrap().reason, "audit");
        let a = s.audit.unwrap();
        assert_eq!(
            (a.namespace.as_str(), a.policy.as_str()),
            ("x", "L4Policy/trial")
        );
    }

    #[test]
    fn allows_carry_no_policy_and_unknown_cookies_empty_labels() {
        let s = classify(&key(VERDICT_ALLOW, REASON_NOT_ISOLATED, 0), &names());
        assert_eq!(
            s.forward,
            Some(ForwardLabels {
                direction: "ingress",
                reason: "not_isolated",
                protocol: "tcp"
            })
        );
        let d = classify(&key(VERDICT_DENY, REASON_POLICY, 12345), &names())
            .drop
            .unwrap();
        assert_eq!((d.namespace.as_str(), d.policy.as_str()), ("", ""));
        assert_eq!(
            classify(&key(9, REASON_POLICY, 8), &names()),
            Series::default()
        );
    }
}
