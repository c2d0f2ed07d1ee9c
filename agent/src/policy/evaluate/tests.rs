//! NetworkPolicy semantics, scenario by scenario. Every decision is made by
//! the evaluator and by the kernel model over the compiled maps, which must
//! agree (see `test_support::decide`).

use super::*;
use crate::policy::{
    model::PolicyRef,
    test_support::{decide, inventory, policies, tcp, udp},
};

const A: &str = "198.18.0.10"; // x/a, local, web=80
const A6: &str = "fd70::10"; // x/a's IPv6
const B: &str = "198.18.0.11"; // x/b, local, web=8080, dns=53/UDP
const C: &str = "198.18.0.12"; // y/c, local
const R: &str = "198.18.0.20"; // y/r, remote (no cgroup)
const NODE: &str = "198.18.0.1";
const EXT: &str = "203.0.113.5";
const EXT6: &str = "2001:db8::5";

fn lab() -> Inventory {
    inventory(
        r#"
nodeIPs: [198.18.0.1, "fd70::1"]
namespaces:
  - {name: x, labels: {team: a}}
  - {name: y, labels: {team: b}}
workloads:
  - name: a
    namespace: x
    labels: {pod: a, tier: front}
    cgroup: /lab/x-a
    ips: [198.18.0.10, "fd70::10"]
    ports: [{name: web, containerPort: 80}]
  - name: b
    namespace: x
    labels: {pod: b, tier: back}
    cgroup: /lab/x-b
    ips: [198.18.0.11]
    ports:
      - {name: web, containerPort: 8080}
      - {name: dns, containerPort: 53, protocol: UDP}
  - {name: c, namespace: y, labels: {pod: c}, cgroup: /lab/y-c, ips: [198.18.0.12]}
  - {name: r, namespace: y, labels: {pod: r}, ips: [198.18.0.20]}
"#,
    )
}

fn policy_ref(namespace: &str, name: &str) -> PolicyRef {
    PolicyRef::network_policy(namespace, name)
}

fn allowed_by(namespace: &str, name: &str, rule_index: usize) -> DirectionVerdict {
    DirectionVerdict::Allowed {
        policy: policy_ref(namespace, name),
        rule_index,
    }
}

fn denied_by(refs: &[(&str, &str)]) -> DirectionVerdict {
    DirectionVerdict::DefaultDeny {
        isolated_by: refs.iter().map(|(ns, n)| policy_ref(ns, n)).collect(),
    }
}

/// Header of a NetworkPolicy in namespace `ns` named `name`.
fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
    )
}

#[test]
fn without_policies_everything_passes() {
    let d = decide(&lab(), &[], &tcp(A, B, 80));
    assert!(d.allowed);
    assert_eq!(d.egress, DirectionVerdict::NotIsolated);
    assert_eq!(d.ingress, DirectionVerdict::NotIsolated);
    let d = decide(&lab(), &[], &tcp(R, EXT, 80));
    assert_eq!(
        d.egress,
        DirectionVerdict::NotEnforced,
        "remote pods are not enforced here"
    );
    assert_eq!(d.ingress, DirectionVerdict::NotEnforced);
}

#[test]
fn empty_pod_selector_with_policy_types_denies_everything() {
    let p = policies(&np(
        "x",
        "deny",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
    ));
    let deny = denied_by(&[("x", "deny")]);

    let d = decide(&lab(), &p, &tcp(A, B, 80));
    assert!(!d.allowed);
    assert_eq!(d.egress, deny);
    assert_eq!(d.ingress, deny);

    let d = decide(&lab(), &p, &tcp(C, A, 80));
    assert_eq!(d.egress, DirectionVerdict::NotIsolated, "y is not isolated");
    assert_eq!(d.ingress, deny);
    assert!(!decide(&lab(), &p, &udp(A, EXT, 53)).allowed);
    assert!(!decide(&lab(), &p, &tcp(A6, EXT6, 443)).allowed);

    // What NetworkPolicy never blocks.
    let d = decide(&lab(), &p, &tcp(NODE, A, 8080));
    assert!(d.allowed, "kubelet probes from the node");
    assert_eq!(d.ingress, DirectionVerdict::Host);
    let d = decide(&lab(), &p, &tcp("fd70::1", A6, 8080));
    assert_eq!(d.ingress, DirectionVerdict::Host);
    let d = decide(&lab(), &p, &tcp(A, A, 80));
    assert!(d.allowed, "a pod talking to itself");
    assert_eq!(
        (d.egress, d.ingress),
        (DirectionVerdict::Local, DirectionVerdict::Local)
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(A, "127.0.0.1", 80)).egress,
        DirectionVerdict::Local
    );
    assert_eq!(
        decide(&lab(), &p, &tcp("::1", A6, 80)).ingress,
        DirectionVerdict::Local
    );
}

#[test]
fn a_rule_with_nothing_allows_all_but_no_rules_allow_nothing() {
    let allow_all = policies(&np("x", "p", "  podSelector: {}\n  ingress: [{}]"));
    let d = decide(&lab(), &allow_all, &udp(EXT, B, 9999));
    assert!(d.allowed);
    assert_eq!(d.ingress, allowed_by("x", "p", 0));

    let allow_none = policies(&np("x", "p", "  podSelector: {}\n  ingress: []"));
    let d = decide(&lab(), &allow_none, &udp(EXT, B, 9999));
    assert_eq!(d.ingress, denied_by(&[("x", "p")]));
}

#[test]
fn empty_and_absent_peer_lists_both_mean_every_peer() {
    let empty = "  podSelector: {}\n  ingress:\n  - from: []\n    ports: [{port: 80}]";
    let absent = "  podSelector: {}\n  ingress:\n  - ports: [{port: 80}]";
    for spec in [empty, absent] {
        let p = policies(&np("x", "p", spec));
        for src in [B, C, R, EXT, "2001:db8::1"] {
            let dst = if src.contains(':') { A6 } else { A };
            assert!(
                decide(&lab(), &p, &tcp(src, dst, 80)).allowed,
                "{spec}: {src} on 80"
            );
            assert!(
                !decide(&lab(), &p, &tcp(src, dst, 81)).allowed,
                "{spec}: {src} on 81"
            );
        }
    }
}

#[test]
fn namespace_and_pod_selector_in_one_peer_and_but_separate_peers_or() {
    let and = policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: b}}\n      podSelector: {matchLabels: {pod: c}}",
    ));
    assert!(decide(&lab(), &and, &tcp(C, A, 80)).allowed);
    assert!(
        !decide(&lab(), &and, &tcp(R, A, 80)).allowed,
        "right namespace, wrong pod"
    );
    assert!(
        !decide(&lab(), &and, &tcp(B, A, 80)).allowed,
        "wrong namespace"
    );

    let or = policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {team: b}}\n    - podSelector: {matchLabels: {pod: b}}",
    ));
    assert!(decide(&lab(), &or, &tcp(C, A, 80)).allowed);
    assert!(
        decide(&lab(), &or, &tcp(R, A, 80)).allowed,
        "any pod of team b"
    );
    assert!(
        decide(&lab(), &or, &tcp(B, A, 80)).allowed,
        "pod b of the policy's namespace"
    );
    assert!(!decide(&lab(), &or, &tcp(EXT, A, 80)).allowed);

    // namespaceSelector alone, by the automatic name label.
    let by_name = policies(&np(
        "x",
        "p",
        "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: y}}",
    ));
    assert!(decide(&lab(), &by_name, &tcp(R, B, 80)).allowed);
    assert!(!decide(&lab(), &by_name, &tcp(A, B, 80)).allowed);
}

#[test]
fn match_expressions_select_targets_and_peers() {
    let p = policies(&np(
        "x",
        "p",
        r#"  podSelector:
    matchExpressions: [{key: tier, operator: In, values: [back]}]
  ingress:
  - from:
    - namespaceSelector: {}
      podSelector:
        matchExpressions:
        - {key: pod, operator: NotIn, values: [r]}
        - {key: tier, operator: DoesNotExist}"#,
    ));
    assert_eq!(
        decide(&lab(), &p, &tcp(R, A, 80)).ingress,
        DirectionVerdict::NotIsolated,
        "a is not tier=back"
    );
    assert!(decide(&lab(), &p, &tcp(C, B, 80)).allowed);
    assert!(
        !decide(&lab(), &p, &tcp(R, B, 80)).allowed,
        "pod r is excluded"
    );
    assert!(!decide(&lab(), &p, &tcp(A, B, 80)).allowed, "a has a tier");
}

#[test]
fn numeric_ports_and_port_ranges() {
    let p = policies(&np(
        "x",
        "p",
        "  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n    - {protocol: UDP, port: 8000, endPort: 8080}",
    ));
    let allowed = |q| decide(&lab(), &p, &q).allowed;
    assert!(allowed(tcp(C, A, 80)));
    assert!(!allowed(tcp(C, A, 81)));
    assert!(!allowed(udp(C, A, 80)), "the protocol defaults to TCP");
    assert!(allowed(udp(C, A, 8000)));
    assert!(allowed(udp(C, A, 8080)));
    assert!(allowed(udp(C, A, 8042)));
    assert!(!allowed(udp(C, A, 8081)));
    assert!(!allowed(udp(C, A, 7999)));
    assert!(!allowed(tcp(C, A, 8000)));
    assert!(!allowed(tcp(C, A, 0)), "port 0 is never a numeric port");
}

#[test]
fn named_ports_resolve_per_pod() {
    // Ingress: against the protected pod's own ports.
    let ingress = policies(&np(
        "x",
        "p",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: web}, {protocol: UDP, port: dns}]",
    ));
    let allowed = |p: &[PolicyObject], q| decide(&lab(), p, &q).allowed;
    assert!(allowed(&ingress, tcp(C, A, 80)));
    assert!(!allowed(&ingress, tcp(C, A, 8080)));
    assert!(allowed(&ingress, tcp(C, B, 8080)));
    assert!(!allowed(&ingress, tcp(C, B, 80)));
    assert!(allowed(&ingress, udp(C, B, 53)));
    assert!(!allowed(&ingress, tcp(C, B, 53)), "dns is a UDP port");
    assert!(!allowed(&ingress, udp(C, A, 53)), "a has no dns port");

    // Egress: against the destination pod's ports.
    let egress = policies(&np(
        "y",
        "p",
        "  podSelector: {}\n  egress:\n  - ports: [{port: web}]",
    ));
    assert!(allowed(&egress, tcp(C, A, 80)));
    assert!(!allowed(&egress, tcp(C, A, 8080)));
    assert!(allowed(&egress, tcp(C, B, 8080)));
    assert!(!allowed(&egress, tcp(C, B, 80)));
    assert!(
        !allowed(&egress, tcp(C, EXT, 80)),
        "a non-pod has no named ports"
    );
    assert!(!allowed(&egress, tcp(C, NODE, 80)));
}

#[test]
fn ip_blocks_with_except_match_pods_and_external_addresses() {
    let p = policies(&np(
        "x",
        "p",
        r#"  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{ipBlock: {cidr: 198.18.0.0/24, except: [198.18.0.12/32]}}]
  egress:
  - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [198.18.0.0/16]}}]"#,
    ));
    let d = |q| decide(&lab(), &p, &q);
    assert!(d(tcp(R, A, 80)).allowed, "a remote pod inside the block");
    assert!(d(tcp(B, A, 80)).allowed);
    assert!(!d(tcp(C, A, 80)).allowed, "excepted pod");
    assert!(!d(tcp(EXT, A, 80)).allowed, "outside the block");
    assert!(!d(tcp("198.18.1.1", A, 80)).allowed);
    assert!(d(tcp(A, EXT, 443)).allowed);
    assert!(
        !d(tcp(A, R, 443)).allowed,
        "pods are inside the excepted range"
    );
    assert!(!d(tcp(A, "198.18.200.1", 443)).allowed);
    assert!(
        !d(tcp(A, EXT6, 443)).allowed,
        "an IPv4 block says nothing about IPv6"
    );
}

#[test]
fn ip_blocks_never_match_this_node() {
    let p = policies(&np(
        "x",
        "p",
        "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{ipBlock: {cidr: 198.18.0.0/16}}, {ipBlock: {cidr: 198.18.0.1/32}}]",
    ));
    assert!(decide(&lab(), &p, &tcp(A, B, 80)).allowed);
    assert!(!decide(&lab(), &p, &tcp(A, NODE, 80)).allowed);
    let every_peer = policies(&np(
        "x",
        "p",
        "  podSelector: {}\n  egress:\n  - ports: [{port: 53, protocol: UDP}]",
    ));
    assert!(decide(&lab(), &every_peer, &udp(A, NODE, 53)).allowed);
    assert!(!decide(&lab(), &every_peer, &tcp(A, NODE, 53)).allowed);
}

#[test]
fn an_ipv6_block_covering_everything_does_not_capture_ipv4() {
    let p = policies(&np(
        "x",
        "p",
        "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: '::/0', except: ['fd70::/64']}}]",
    ));
    assert!(decide(&lab(), &p, &tcp(A6, EXT6, 443)).allowed);
    assert!(!decide(&lab(), &p, &tcp(A6, "fd70::99", 443)).allowed);
    assert!(!decide(&lab(), &p, &tcp(A, EXT, 443)).allowed);
    assert!(!decide(&lab(), &p, &tcp(A, C, 443)).allowed);
    // An IPv4-mapped destination is an IPv4 destination.
    assert!(!decide(&lab(), &p, &tcp(A6, "::ffff:203.0.113.5", 443)).allowed);
}

#[test]
fn policy_types_default_to_ingress_plus_egress_when_egress_rules_exist() {
    let ingress_only = policies(&np("x", "p", "  podSelector: {}\n  ingress: []"));
    let d = decide(&lab(), &ingress_only, &tcp(A, EXT, 80));
    assert_eq!(d.egress, DirectionVerdict::NotIsolated);

    let empty_egress = policies(&np("x", "p", "  podSelector: {}\n  egress: []"));
    let d = decide(&lab(), &empty_egress, &tcp(A, B, 80));
    assert_eq!(
        d.egress,
        DirectionVerdict::NotIsolated,
        "egress: [] adds no Egress type"
    );
    assert_eq!(d.ingress, denied_by(&[("x", "p")]));

    let with_egress = policies(&np(
        "x",
        "p",
        "  podSelector: {}\n  egress: [{ports: [{port: 53}]}]",
    ));
    let d = decide(&lab(), &with_egress, &tcp(A, B, 80));
    assert_eq!(d.egress, denied_by(&[("x", "p")]));
    assert_eq!(
        d.ingress,
        denied_by(&[("x", "p")]),
        "Ingress is always a default type"
    );
    assert_eq!(
        decide(&lab(), &with_egress, &tcp(A, EXT, 53)).egress,
        allowed_by("x", "p", 0)
    );

    let egress_type_only = policies(&np(
        "x",
        "p",
        "  podSelector: {}\n  policyTypes: [Egress]\n  ingress: []\n  egress: []",
    ));
    let d = decide(&lab(), &egress_type_only, &tcp(C, A, 80));
    assert_eq!(
        d.ingress,
        DirectionVerdict::NotIsolated,
        "ingress rules without the type are ignored"
    );
    assert_eq!(
        decide(&lab(), &egress_type_only, &tcp(A, C, 80)).egress,
        denied_by(&[("x", "p")])
    );
}

#[test]
fn policies_add_up_and_the_first_matching_rule_is_credited() {
    let text = [
        np("x", "web", "  podSelector: {}\n  ingress:\n  - ports: [{port: 80}]\n  - ports: [{port: 80, endPort: 90}]"),
        np("x", "api", "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 85}]"),
        np("x", "deny", "  podSelector: {}\n  policyTypes: [Ingress]"),
    ]
    .concat();
    let p = policies(&text);
    let d = |port| decide(&lab(), &p, &tcp(C, A, port)).ingress;
    assert_eq!(d(80), allowed_by("x", "web", 0));
    assert_eq!(d(85), allowed_by("x", "api", 0), "x/api sorts before x/web");
    assert_eq!(d(86), allowed_by("x", "web", 1));
    assert_eq!(
        d(91),
        denied_by(&[("x", "api"), ("x", "deny"), ("x", "web")])
    );
    assert_eq!(
        decide(&lab(), &p, &tcp(C, B, 85)).ingress,
        allowed_by("x", "web", 1),
        "x/api does not select b"
    );
}

#[test]
fn both_ends_must_allow() {
    let text = [
        np("x", "a-out", "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{podSelector: {matchLabels: {pod: b}}}]"),
        np("x", "b-in", "  podSelector: {matchLabels: {pod: b}}\n  ingress:\n  - ports: [{port: 8080}]"),
    ]
    .concat();
    let p = policies(&text);
    let d = decide(&lab(), &p, &tcp(A, B, 8080));
    assert!(d.allowed);
    assert_eq!(d.egress, allowed_by("x", "a-out", 0));
    assert_eq!(d.ingress, allowed_by("x", "b-in", 0));
    let d = decide(&lab(), &p, &tcp(A, B, 80));
    assert!(!d.allowed);
    assert!(d.egress.allows() && !d.ingress.allows());
}
