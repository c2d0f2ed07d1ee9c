//! L4Policy and ClusterL4Policy semantics, one bullet of the spec at a time.
//! Every decision is made by the evaluator and by the kernel model over the
//! compiled maps, which must agree (see `test_support::decide`).

use super::*;
use crate::policy::test_support::{decide, inventory, policies, tcp, udp};

const A: &str = "198.18.1.10"; // x/a
const B: &str = "198.18.1.11"; // x/b
const C: &str = "198.18.1.12"; // y/c
const Z: &str = "198.18.1.13"; // z/c, remote
const NODE: &str = "198.18.0.1";
const EXT: &str = "203.0.113.5";

fn lab() -> Inventory {
    inventory(
        r#"
nodeIPs: [198.18.0.1]
namespaces:
  - {name: x, labels: {ns: x}}
  - {name: y, labels: {ns: y}}
  - {name: z, labels: {ns: z}}
workloads:
  - {name: a, namespace: x, labels: {pod: a}, cgroup: /lab/x-a, ips: [198.18.1.10], ports: [{name: serve-80-tcp, containerPort: 80}]}
  - {name: b, namespace: x, labels: {pod: b}, cgroup: /lab/x-b, ips: [198.18.1.11]}
  - {name: c, namespace: y, labels: {pod: c}, cgroup: /lab/y-c, ips: [198.18.1.12]}
  - {name: c, namespace: z, labels: {pod: c}, ips: [198.18.1.13]}
"#,
    )
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n")
}

fn l4(ns: &str, name: &str, spec: &str) -> String {
    format!("---\napiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n")
}

fn cluster(name: &str, tier: &str, priority: u32, rest: &str) -> String {
    format!("---\napiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n{rest}\n")
}

fn l4_ref(ns: &str, name: &str) -> PolicyRef {
    PolicyRef::l4_policy(ns, name)
}

fn tier(
    name: &str,
    tier: Tier,
    priority: u32,
    rule_index: usize,
    action: Action,
) -> DirectionVerdict {
    DirectionVerdict::Tier {
        tier,
        priority,
        policy: PolicyRef::cluster_l4_policy(name),
        rule_index,
        action,
    }
}

#[test]
fn l4_policy_allows_join_network_policy_allows() {
    let p = policies(
        &[
            np(
                "x",
                "web",
                "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{ports: [{port: 80}]}]",
            ),
            l4(
                "x",
                "web",
                "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{ports: [{port: 81}]}]",
            ),
        ]
        .concat(),
    );
    // Same name, different kinds: two policies.
    assert_eq!(p.len(), 2);
    let d = decide(&lab(), &p, &tcp(A, B, 81));
    assert_eq!(
        d.ingress,
        DirectionVerdict::Allowed {
            policy: l4_ref("x", "web"),
            rule_index: 0
        }
    );
    let d = decide(&lab(), &p, &tcp(A, B, 82));
    assert_eq!(
        d.ingress,
        DirectionVerdict::DefaultDeny {
            isolated_by: vec![PolicyRef::network_policy("x", "web"), l4_ref("x", "web")]
        }
    );
}

#[test]
fn isolation_follows_policy_types_or_present_allow_lists() {
    // Deny-only: isolates nothing.
    let p = policies(&l4(
        "x",
        "d",
        "  podSelector: {}\n  egressDeny: [{ports: [{port: 81}]}]",
    ));
    assert_eq!(
        decide(&lab(), &p, &tcp(A, C, 80)).egress,
        DirectionVerdict::NotIsolated
    );
    // An empty allow list isolates: nothing allowed.
    let p = policies(&l4("x", "i", "  podSelector: {}\n  egress: []"));
    assert!(!decide(&lab(), &p, &tcp(A, C, 80)).allowed);
    assert_eq!(
        decide(&lab(), &p, &tcp(C, A, 80)).ingress,
        DirectionVerdict::NotIsolated
    );
    // Explicit policyTypes.
    let p = policies(&l4("x", "t", "  podSelector: {}\n  policyTypes: [Ingress]"));
    assert!(!decide(&lab(), &p, &tcp(C, A, 80)).allowed);
    assert_eq!(
        decide(&lab(), &p, &tcp(A, C, 80)).egress,
        DirectionVerdict::NotIsolated
    );
}

#[test]
fn explicit_deny_beats_every_allow() {
    let p = policies(&[
        np("x", "all", "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{}]"),
        l4("x", "open", "  podSelector: {}\n  egress: [{}]"),
        // Deny rules apply whatever policyTypes says.
        l4("x", "deny", "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress: [{}]\n  egressDeny:\n  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]\n    ports: [{protocol: UDP, port: 81}]\n  - to: [{ipBlock: {cidr: 203.0.113.0/24}}]"),
    ].concat());
    let d = decide(&lab(), &p, &udp(A, C, 81));
    assert!(!d.allowed);
    assert_eq!(
        d.egress,
        DirectionVerdict::Denied {
            policy: l4_ref("x", "deny"),
            rule_index: 0
        }
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(A, EXT, 443)).egress,
        DirectionVerdict::Denied {
            policy: l4_ref("x", "deny"),
            rule_index: 1
        }
    );
    assert!(
        decide(&lab(), &p, &tcp(A, C, 81)).allowed,
        "TCP 81 is not denied"
    );
    assert!(
        decide(&lab(), &p, &udp(B, C, 81)).allowed,
        "b is not selected"
    );
}

#[test]
fn audit_deny_rule_passes_and_is_counted() {
    let p = policies(&l4("x", "audit", "  podSelector: {matchLabels: {pod: a}}\n  mode: Audit\n  egressDeny: [{ports: [{port: 81}]}]"));
    let d = decide(&lab(), &p, &tcp(A, C, 81));
    assert!(d.allowed, "audit never drops");
    assert!(d.audited());
    assert_eq!(
        d.egress,
        DirectionVerdict::Audit {
            policy: l4_ref("x", "audit"),
            cause: AuditCause::DenyRule { rule_index: 0 }
        }
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(A, C, 80)).egress,
        DirectionVerdict::NotIsolated
    );
}

#[test]
fn audit_isolation_flags_what_it_would_not_allow() {
    let audit = l4(
        "x",
        "audit",
        "  podSelector: {}\n  mode: Audit\n  ingress: [{ports: [{port: 80}]}]",
    );
    let p = policies(&audit);
    assert_eq!(
        decide(&lab(), &p, &tcp(C, A, 80)).ingress,
        DirectionVerdict::NotIsolated
    );
    let d = decide(&lab(), &p, &tcp(C, A, 81));
    assert!(d.allowed);
    assert_eq!(
        d.ingress,
        DirectionVerdict::Audit {
            policy: l4_ref("x", "audit"),
            cause: AuditCause::DefaultDeny
        }
    );

    // Already isolated and allowed: enforcing the audit policy too would
    // only add allows, so no audit.
    let p = policies(
        &[
            audit.clone(),
            np(
                "x",
                "np",
                "  podSelector: {}\n  ingress: [{ports: [{port: 81}]}]",
            ),
        ]
        .concat(),
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(C, A, 81)).ingress,
        DirectionVerdict::Allowed {
            policy: PolicyRef::network_policy("x", "np"),
            rule_index: 0
        }
    );
    // Already denied: denied, not audit.
    let d = decide(&lab(), &p, &tcp(C, A, 82));
    assert!(!d.allowed);
    assert!(matches!(d.ingress, DirectionVerdict::DefaultDeny { .. }));
    // Allowed by the Baseline tier: the audit policy would isolate.
    let p = policies(
        &[
            audit,
            cluster("base", "Baseline", 1, "  ingress: [{action: Allow}]"),
        ]
        .concat(),
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(C, A, 81)).ingress,
        DirectionVerdict::Audit {
            policy: l4_ref("x", "audit"),
            cause: AuditCause::DefaultDeny
        }
    );
}

#[test]
fn audit_cannot_override_admin_allow() {
    let p = policies(
        &[
            l4(
                "x",
                "audit",
                "  podSelector: {}\n  mode: Audit\n  ingressDeny: [{}]",
            ),
            cluster(
                "admin",
                "Admin",
                1,
                "  ingress: [{action: Allow, ports: [{port: 80}]}]",
            ),
        ]
        .concat(),
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(C, A, 80)).ingress,
        tier("admin", Tier::Admin, 1, 0, Action::Allow)
    );
    assert!(decide(&lab(), &p, &tcp(C, A, 81)).audited());
}

#[test]
fn admin_tier_comes_first() {
    let p = policies(&[
        np("x", "np", "  podSelector: {}\n  ingress: [{}]"),
        l4("x", "deny", "  podSelector: {}\n  ingressDeny: [{ports: [{port: 80}]}]"),
        cluster("block-y", "Admin", 10, "  subject: {namespaceSelector: {matchLabels: {ns: x}}}\n  ingress:\n  - {action: Pass, from: [{podSelector: {matchLabels: {pod: c}}}], ports: [{port: 81}]}\n  - {action: Deny, from: [{namespaceSelector: {matchLabels: {ns: y}}}]}\n  - {action: Allow, ports: [{port: 80}]}"),
    ].concat());
    // Deny beats the NetworkPolicy allow.
    assert_eq!(
        decide(&lab(), &p, &tcp(C, A, 82)).ingress,
        tier("block-y", Tier::Admin, 10, 1, Action::Deny)
    );
    // Pass hands over: the NetworkPolicy allows.
    assert!(matches!(
        decide(&lab(), &p, &tcp(C, A, 81)).ingress,
        DirectionVerdict::Allowed { .. }
    ));
    // Allow beats the L4Policy deny.
    assert_eq!(
        decide(&lab(), &p, &tcp(B, A, 80)).ingress,
        tier("block-y", Tier::Admin, 10, 2, Action::Allow)
    );
    // y/c is no subject, and nothing isolates it.
    assert_eq!(
        decide(&lab(), &p, &tcp(A, C, 80)).ingress,
        DirectionVerdict::NotIsolated
    );
}

#[test]
fn priorities_then_names_order_the_tier() {
    let p = policies(
        &[
            cluster("b", "Admin", 5, "  egress: [{action: Allow}]"),
            cluster(
                "a",
                "Admin",
                5,
                "  egress: [{action: Deny, ports: [{port: 80}]}]",
            ),
            cluster(
                "c",
                "Admin",
                1,
                "  egress: [{action: Pass, ports: [{port: 80}]}]",
            ),
        ]
        .concat(),
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(A, C, 81)).egress,
        tier("b", Tier::Admin, 5, 0, Action::Allow)
    );
    // c (priority 1) passes port 80 before a or b see it.
    assert_eq!(
        decide(&lab(), &p, &tcp(A, C, 80)).egress,
        DirectionVerdict::NotIsolated
    );
    let p = policies(
        &[
            cluster("b", "Admin", 5, "  egress: [{action: Allow}]"),
            cluster(
                "a",
                "Admin",
                5,
                "  egress: [{action: Deny, ports: [{port: 80}]}]",
            ),
        ]
        .concat(),
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(A, C, 80)).egress,
        tier("a", Tier::Admin, 5, 0, Action::Deny)
    );
}

#[test]
fn baseline_only_decides_for_pods_nothing_isolates() {
    let p = policies(&[
        cluster("base", "Baseline", 0, "  ingress:\n  - {action: Deny, from: [{podSelector: {matchLabels: {pod: c}}}]}\n  - {action: Allow, ports: [{port: 80}]}"),
        np("y", "np", "  podSelector: {}\n  ingress: [{ports: [{port: 81}]}]"),
    ].concat());
    // x/a is not isolated: the baseline decides. A podSelector-only peer
    // matches pods of every namespace (y/c and z/c).
    assert_eq!(
        decide(&lab(), &p, &tcp(C, A, 81)).ingress,
        tier("base", Tier::Baseline, 0, 0, Action::Deny)
    );
    assert!(!decide(&lab(), &p, &tcp(Z, A, 81)).allowed);
    assert_eq!(
        decide(&lab(), &p, &tcp(B, A, 80)).ingress,
        tier("base", Tier::Baseline, 0, 1, Action::Allow)
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(B, A, 81)).ingress,
        DirectionVerdict::NotIsolated
    );
    // y/c is isolated by a NetworkPolicy: the baseline does not apply.
    assert!(decide(&lab(), &p, &tcp(A, C, 81)).allowed);
    assert!(!decide(&lab(), &p, &tcp(A, C, 80)).allowed);
    // The node is never a selector or ipBlock peer.
    assert_eq!(
        decide(&lab(), &p, &tcp(NODE, A, 81)).ingress,
        DirectionVerdict::Host
    );
}

#[test]
fn named_ports_and_ranges_work_in_tier_rules() {
    let p = policies(&cluster("named", "Admin", 0, "  egress:\n  - {action: Deny, ports: [{port: serve-80-tcp}]}\n  - {action: Deny, to: [{ipBlock: {cidr: 203.0.113.0/24, except: [203.0.113.5/32]}}], ports: [{port: 1000, endPort: 2000}]}"));
    assert!(
        !decide(&lab(), &p, &tcp(B, A, 80)).allowed,
        "a's port named serve-80-tcp"
    );
    assert!(
        decide(&lab(), &p, &tcp(B, C, 80)).allowed,
        "c has no such port"
    );
    assert!(!decide(&lab(), &p, &tcp(A, "203.0.113.6", 1500)).allowed);
    assert!(decide(&lab(), &p, &tcp(A, EXT, 1500)).allowed, "except");
}
