//! What isolation means beyond TCP and UDP: SCTP ports, protocols judged
//! without ports (ICMP, UDP-Lite, ...), and link-local peers. Every
//! decision is made by the evaluator and by the kernel's decision over the
//! compiled maps, which must agree (`test_support::decide`).

use super::*;
use crate::policy::{
    model::{PolicyRef, Protocol},
    test_support::{decide, flow, inventory, policies},
};

const A: &str = "198.18.0.10"; // x/a, local
const B: &str = "198.18.0.11"; // x/b, local
const A6: &str = "fd70::10";
const B6: &str = "fd70::11";
const LINK_LOCAL: &str = "fe80::5";

fn lab() -> Inventory {
    inventory(
        r#"
nodeIPs: [198.18.0.1, "fd70::1"]
namespaces:
  - {name: x, labels: {team: a}}
workloads:
  - {name: a, namespace: x, labels: {pod: a}, cgroup: /lab/x-a, ips: [198.18.0.10, "fd70::10"]}
  - {name: b, namespace: x, labels: {pod: b}, cgroup: /lab/x-b, ips: [198.18.0.11, "fd70::11"]}
"#,
    )
}

fn np(spec: &str) -> Vec<PolicyObject> {
    policies(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: b}}}}\n{spec}"
    ))
}

fn isolated() -> DirectionVerdict {
    DirectionVerdict::DefaultDeny {
        isolated_by: vec![PolicyRef::network_policy("x", "p")],
    }
}

#[test]
fn a_policy_naming_only_sctp_isolates_and_never_matches_tcp_or_udp() {
    let p = np("  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}], ports: [{protocol: SCTP, port: 80}]}]");
    let inv = lab();
    let sctp = decide(&inv, &p, &flow(A, B, 80, Protocol::Sctp));
    assert!(sctp.allowed, "{sctp:?}");
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Other] {
        let d = decide(&inv, &p, &flow(A, B, 80, protocol));
        assert_eq!(d.ingress, isolated(), "{protocol}");
    }
    let other_port = decide(&inv, &p, &flow(A, B, 81, Protocol::Sctp));
    assert_eq!(other_port.ingress, isolated());
}

#[test]
fn protocols_without_ports_pass_only_rules_without_ports() {
    let with_ports =
        np("  ingress: [{from: [{podSelector: {}}], ports: [{port: 80}, {protocol: UDP}]}]");
    let inv = lab();
    let d = decide(&inv, &with_ports, &flow(A, B, 0, Protocol::Other));
    assert_eq!(d.ingress, isolated());
    let portless = np("  ingress: [{from: [{podSelector: {matchLabels: {pod: a}}}]}]");
    let d = decide(&inv, &portless, &flow(A, B, 0, Protocol::Other));
    assert!(d.allowed, "{d:?}");
    let d = decide(&inv, &portless, &flow(A6, B6, 0, Protocol::Other));
    assert!(d.allowed, "{d:?}");
    // Egress is not isolated by an ingress-only policy.
    let d = decide(&inv, &with_ports, &flow(B, A, 0, Protocol::Other));
    assert!(d.allowed, "{d:?}");
}

#[test]
fn egress_isolation_closes_every_protocol() {
    let p = np("  policyTypes: [Egress]\n  egress: [{ports: [{port: 53, protocol: UDP}]}]");
    let inv = lab();
    for (protocol, port) in [
        (Protocol::Tcp, 80),
        (Protocol::Sctp, 53),
        (Protocol::Other, 0),
    ] {
        let d = decide(&inv, &p, &flow(B, A, port, protocol));
        assert!(!d.allowed, "{protocol}: {d:?}");
    }
    assert!(decide(&inv, &p, &flow(B, A, 53, Protocol::Udp)).allowed);
}

#[test]
fn ip_blocks_never_match_link_local_peers() {
    let world_not_pods = np(
        "  ingress: [{from: [{ipBlock: {cidr: '::/0', except: ['fd70::/16']}}, {ipBlock: {cidr: 'fe80::/10'}}]}]",
    );
    let inv = lab();
    for protocol in [Protocol::Tcp, Protocol::Udp, Protocol::Other] {
        let d = decide(&inv, &world_not_pods, &flow(LINK_LOCAL, B6, 80, protocol));
        assert_eq!(d.ingress, isolated(), "{protocol}");
    }
    // A global address the block names still matches.
    let d = decide(
        &inv,
        &world_not_pods,
        &flow("2001:db8::7", B6, 80, Protocol::Tcp),
    );
    assert!(d.allowed, "{d:?}");
    // Rules naming every peer still admit link-local ones.
    let everyone = np("  ingress: [{}]");
    let d = decide(&inv, &everyone, &flow(LINK_LOCAL, B6, 80, Protocol::Tcp));
    assert!(d.allowed, "{d:?}");
    assert!(is_ipv6_link_local("fe80::1".parse().unwrap()));
    assert!(is_ipv6_link_local("febf::1".parse().unwrap()));
    assert!(!is_ipv6_link_local("fec0::1".parse().unwrap()));
    assert!(!is_ipv6_link_local("169.254.1.1".parse().unwrap()));
}
