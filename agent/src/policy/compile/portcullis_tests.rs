//! What the compiler writes for L4Policy and ClusterL4Policy: entries for
//! endpoints no policy isolates, AUDIT verdicts, and their attribution.

use portcullis_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, PROTO_TCP, REASON_DEFAULT_DENY, REASON_NOT_ISOLATED,
};

use super::*;
use crate::policy::test_support::{chain, inventory, policies};

fn lab() -> Inventory {
    inventory(
        r#"
workloads:
  - {name: a, namespace: x, labels: {app: web}, cgroup: /lab/x-a, ips: [198.18.0.10]}
  - {name: b, namespace: y, labels: {app: db}, cgroup: /lab/y-b, ips: [198.18.0.11]}
"#,
    )
}

fn compile(compiler: &mut Compiler, text: &str) -> Compiled {
    compiler
        .compile(&lab(), &policies(text))
        .unwrap_or_else(|e| panic!("{}", chain(&e)))
}

/// (peer, port, prefix length, verdict, reason, attribution) of an
/// endpoint's entries in one direction (TCP).
fn entries(
    c: &Compiled,
    name: &str,
    direction: u8,
) -> Vec<(u32, u16, u8, u8, u8, Option<Attribution>)> {
    let id = c
        .endpoints
        .iter()
        .find(|e| e.workload.name == name)
        .unwrap()
        .id;
    c.rules
        .iter()
        .filter(|(k, _)| k.endpoint_id == id && k.direction == direction && k.protocol == PROTO_TCP)
        .map(|(k, v)| {
            (
                k.peer_identity,
                k.port,
                k.port_prefix_len,
                v.verdict,
                v.reason,
                c.cookies.get(&v.rule_cookie).cloned(),
            )
        })
        .collect()
}

#[test]
fn a_baseline_deny_needs_entries_without_isolation() {
    let text = "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {name: base}\nspec:\n  tier: Baseline\n  priority: 7\n  subject: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}}\n  egress: [{action: Deny, ports: [{port: 81}]}]\n";
    let c = compile(&mut Compiler::new(), text);
    let deny = Attribution::TierRule {
        tier: Tier::Baseline,
        priority: 7,
        policy: PolicyRef::cluster_l4_policy("base"),
        direction: Direction::Egress,
        rule_index: 0,
        action: Action::Deny,
    };
    // Only port 81 gets an entry: the rest is what the kernel does anyway.
    assert_eq!(
        entries(&c, "a", DIRECTION_EGRESS),
        [(
            IDENTITY_ANY,
            81,
            16,
            VERDICT_DENY,
            REASON_POLICY,
            Some(deny)
        )]
    );
    assert!(entries(&c, "a", DIRECTION_INGRESS).is_empty());
    assert!(
        entries(&c, "b", DIRECTION_EGRESS).is_empty(),
        "b is no subject"
    );
}

#[test]
fn a_peer_specific_tier_rule_keeps_unaffected_ports_not_isolated() {
    let text = "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {name: admin}\nspec:\n  tier: Admin\n  priority: 0\n  ingress: [{action: Deny, from: [{podSelector: {matchLabels: {app: db}}}], ports: [{port: 5432}]}]\n";
    let c = compile(&mut Compiler::new(), text);
    let b = c.identities[&AddrPrefix::host("198.18.0.11".parse().unwrap())];
    let got = entries(&c, "a", DIRECTION_INGRESS);
    // b's partition is complete: not isolated by default, 5432 denied.
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].0, got[0].1, got[0].2, got[0].3, got[0].4),
        (b, 0, 0, VERDICT_ALLOW, REASON_NOT_ISOLATED)
    );
    assert_eq!(
        (got[1].0, got[1].1, got[1].2, got[1].3),
        (b, 5432, 16, VERDICT_DENY)
    );
}

#[test]
fn audit_verdicts_carry_the_audit_policys_cookie() {
    let text = "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\nmetadata: {name: audit, namespace: x}\nspec:\n  podSelector: {}\n  mode: Audit\n  ingress: [{ports: [{port: 80}]}]\n  ingressDeny: [{ports: [{port: 81}]}]\n";
    let mut compiler = Compiler::new();
    let c = compile(&mut compiler, text);
    let policy = PolicyRef::l4_policy("x", "audit");
    let got = entries(&c, "a", DIRECTION_INGRESS);
    let default = Attribution::AuditDefaultDeny {
        policy: policy.clone(),
        direction: Direction::Ingress,
    };
    let rule = Attribution::AuditDenyRule {
        policy,
        direction: Direction::Ingress,
        rule_index: 0,
    };
    assert_eq!(
        got,
        [
            (
                IDENTITY_ANY,
                0,
                0,
                VERDICT_AUDIT,
                REASON_DEFAULT_DENY,
                Some(default)
            ),
            (
                IDENTITY_ANY,
                80,
                16,
                VERDICT_ALLOW,
                REASON_NOT_ISOLATED,
                None
            ),
            (
                IDENTITY_ANY,
                81,
                16,
                VERDICT_AUDIT,
                REASON_POLICY,
                Some(rule)
            ),
        ]
    );
    // Cookies are stable across compiles.
    assert_eq!(compile(&mut compiler, text), c);
}
