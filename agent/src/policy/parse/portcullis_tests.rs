//! Parsing L4Policy and ClusterL4Policy: the documented shapes are accepted,
//! and every mistake names file, document, object and field.

use super::*;
use crate::policy::test_support::chain;

fn parse(text: &str) -> Result<Vec<PolicyObject>, ParseError> {
    parse_policies(Path::new("policies/crd.yaml"), text)
}

fn l4(spec: &str) -> String {
    format!("apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\nmetadata: {{name: p, namespace: x}}\nspec:\n{spec}\n")
}

fn cluster(metadata: &str, spec: &str) -> String {
    format!("apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {metadata}\nspec:\n{spec}\n")
}

/// Asserts the error names the file, document, object and field, and says
/// `what`.
fn assert_error(text: &str, object: &str, field: &str, what: &str) {
    let message = match parse(text) {
        Ok(p) => panic!("expected an error, parsed {p:?}"),
        Err(e) => chain(&e),
    };
    for part in ["policies/crd.yaml (document 1)", object, field, what] {
        assert!(
            message.contains(part),
            "{message:?} should mention {part:?}"
        );
    }
}

fn l4_error(spec: &str, field: &str, what: &str) {
    assert_error(&l4(spec), "L4Policy x/p", field, what);
}

fn cluster_error(spec: &str, field: &str, what: &str) {
    assert_error(
        &cluster("{name: c}", spec),
        "ClusterL4Policy c",
        field,
        what,
    );
}

#[test]
fn the_documented_shapes_are_accepted_next_to_network_policies() {
    let text = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec: {podSelector: {}}
---
apiVersion: portcullis.dev/v1alpha1
kind: L4Policy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  mode: Audit
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
      ports: [{protocol: TCP, port: 80, endPort: 90}]
  egress:
    - to: [{ipBlock: {cidr: 198.18.1.0/24}}]
  ingressDeny:
    - from: [{podSelector: {matchLabels: {pod: c}}}]
  egressDeny:
    - to: [{namespaceSelector: {}}]
      ports: [{protocol: UDP, port: 81}]
---
apiVersion: portcullis.dev/v1alpha1
kind: ClusterL4Policy
metadata: {name: block-z}
spec:
  tier: Admin
  priority: 10
  subject:
    namespaceSelector: {matchLabels: {ns: z}}
    podSelector: {}
  ingress:
    - action: Deny
      from:
        - namespaceSelector: {matchLabels: {ns: x}}
          podSelector: {matchLabels: {pod: a}}
        - ipBlock: {cidr: 198.18.1.0/24, except: [198.18.1.12/32]}
      ports: [{protocol: TCP, port: 80}]
  egress:
    - action: Allow
      to: [{podSelector: {matchLabels: {pod: a}}}]
      ports: [{port: serve-80-tcp}]
"#;
    let p = parse(text).unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(p.len(), 3);
    let PolicyKind::L4Policy(lp) = &*p[1].kind else {
        panic!("not an L4Policy")
    };
    assert_eq!(lp.mode, Mode::Audit);
    assert!(lp.allow.isolates_ingress && lp.allow.isolates_egress);
    assert_eq!((lp.ingress_deny.len(), lp.egress_deny.len()), (1, 1));
    let PolicyKind::ClusterL4Policy(cp) = &*p[2].kind else {
        panic!("not a ClusterL4Policy")
    };
    assert_eq!((cp.tier, cp.priority), (Tier::Admin, 10));
    assert_eq!(p[2].reference, PolicyRef::cluster_l4_policy("block-z"));
    assert_eq!(p[2].reference.to_string(), "ClusterL4Policy block-z");
    // A podSelector-only peer of a cluster policy spans every namespace.
    let Peers::Only(peers) = &cp.egress[0].rule.peers else {
        panic!("peers")
    };
    assert!(matches!(
        &peers[0],
        Peer::Pods { namespaces: NamespaceScope::Matching(s), .. } if s.is_everything()
    ));
}

#[test]
fn l4_policy_defaults() {
    let p = parse(&l4("  podSelector: {}\n  egressDeny: [{}]")).unwrap();
    let PolicyKind::L4Policy(lp) = &*p[0].kind else {
        panic!("not an L4Policy")
    };
    assert_eq!(lp.mode, Mode::Enforce);
    assert!(
        !lp.allow.isolates_ingress && !lp.allow.isolates_egress,
        "deny-only isolates nothing"
    );
    let p = parse(&l4("  podSelector: {}\n  egress: []")).unwrap();
    let PolicyKind::L4Policy(lp) = &*p[0].kind else {
        panic!("not an L4Policy")
    };
    assert!(
        !lp.allow.isolates_ingress && lp.allow.isolates_egress,
        "a present egress list isolates"
    );
}

#[test]
fn l4_policy_errors() {
    l4_error("  mode: Audit", "spec.podSelector", "is required");
    l4_error(
        "  podSelector: {}\n  mode: DryRun",
        "spec.mode",
        "\"DryRun\" is not a mode",
    );
    l4_error(
        "  podSelector: {}\n  policyTypes: [Sideways]",
        "spec.policyTypes[0]",
        "not Ingress or Egress",
    );
    l4_error(
        "  podSelector: {}\n  colour: red",
        "unknown field `colour`",
        "L4Policy schema",
    );
    l4_error(
        "  podSelector: {}\n  egressDeny: [{to: [{}]}]",
        "spec.egressDeny[0].to[0]",
        "a peer needs",
    );
    l4_error(
        "  podSelector: {}\n  ingress: [{ports: [{port: 90, endPort: 80}]}]",
        "spec.ingress[0].ports[0].endPort",
        "less than port",
    );
    l4_error(
        "  podSelector: {matchExpressions: [{key: k, operator: Is}]}",
        "spec.podSelector.matchExpressions[0].operator",
        "invalid label selector",
    );
    l4_error("  podSelector: {}\n  egressDeny: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/8]}}]}]", "spec.egressDeny[0].to[0].ipBlock.except[0]", "not strictly inside");
}

#[test]
fn cluster_policy_errors() {
    cluster_error("  priority: 1", "spec.tier", "is required");
    cluster_error("  tier: Admin", "spec.priority", "is required");
    cluster_error(
        "  tier: Middle\n  priority: 1",
        "spec.tier",
        "\"Middle\" is not a tier",
    );
    cluster_error(
        "  tier: Admin\n  priority: 1001",
        "spec.priority",
        "out of range 0-1000",
    );
    cluster_error(
        "  tier: Admin\n  priority: -1",
        "spec.priority",
        "out of range 0-1000",
    );
    cluster_error(
        "  tier: Baseline\n  priority: 1\n  egress: [{action: Pass}]",
        "spec.egress[0].action",
        "only allowed in tier Admin",
    );
    cluster_error(
        "  tier: Admin\n  priority: 1\n  ingress: [{action: Reject}]",
        "spec.ingress[0].action",
        "\"Reject\" is not an action",
    );
    cluster_error(
        "  tier: Admin\n  priority: 1\n  ingress: [{from: []}]",
        "spec.ingress[0].action",
        "is required",
    );
    cluster_error(
        "  tier: Admin\n  priority: 1\n  ingress: [{action: Deny, froms: []}]",
        "unknown field `froms`",
        "ClusterL4Policy schema",
    );
    cluster_error("  tier: Admin\n  priority: 1\n  subject: {podSelector: {matchExpressions: [{key: k, operator: In}]}}", "spec.subject.podSelector.matchExpressions[0].values", "invalid label selector");
    cluster_error(
        "  tier: Admin\n  priority: 1\n  egress: [{action: Allow, to: [{ipBlock: {cidr: nope}}]}]",
        "spec.egress[0].to[0].ipBlock.cidr",
        "not a CIDR",
    );
    cluster_error(
        "  tier: Admin\n  priority: 1\n  egress: [{action: Allow, ports: [{port: 70000}]}]",
        "spec.egress[0].ports[0].port",
        "out of range",
    );
    assert_error(
        &cluster("{name: c, namespace: x}", "  tier: Admin\n  priority: 1"),
        "ClusterL4Policy c",
        "metadata.namespace",
        "cluster-scoped",
    );
}

#[test]
fn unknown_portcullis_kinds_and_duplicates_are_rejected() {
    let text =
        "apiVersion: portcullis.dev/v1alpha1\nkind: L7Policy\nmetadata: {name: p, namespace: x}\n";
    assert_error(text, "L7Policy x/p", "unsupported kind", "L4Policy");
    let twice = format!(
        "{}---\n{}",
        l4("  podSelector: {}"),
        l4("  podSelector: {}")
    );
    let message = chain(&parse(&twice).unwrap_err());
    assert!(
        message.contains("defined twice") && message.contains("L4Policy x/p"),
        "{message}"
    );
}

#[test]
fn identity_peers_parse_in_ingress_of_portcullis_kinds() {
    let parsed = parse(&l4(
        "  podSelector: {}\n  ingress:\n  - from:\n    - identity: {spiffeId: 'spiffe://cluster.local/ns/x/sa/api'}\n    - identity: {namespace: y}\n  ingressDeny:\n  - from: [{identity: {namespace: z}}]",
    ))
    .expect("valid");
    let PolicyKind::L4Policy(lp) = &*parsed[0].kind else {
        panic!("{parsed:?}")
    };
    let Peers::Only(peers) = &lp.allow.ingress[0].peers else {
        panic!("{lp:?}")
    };
    assert_eq!(
        peers,
        &vec![
            Peer::Identity(IdentityMatch::Exact(
                "spiffe://cluster.local/ns/x/sa/api".parse().unwrap()
            )),
            Peer::Identity(IdentityMatch::Namespace("y".into())),
        ]
    );
    parse(&cluster(
        "{name: c}",
        "  tier: Admin\n  priority: 1\n  ingress:\n  - action: Allow\n    from: [{identity: {namespace: y}}]",
    ))
    .expect("ClusterL4Policy ingress takes identities");
}

#[test]
fn identity_peers_are_refused_where_no_certificate_is_checked() {
    l4_error(
        "  podSelector: {}\n  egress:\n  - to: [{identity: {namespace: y}}]",
        "spec.egress[0].to[0].identity",
        "only in ingress rules",
    );
    cluster_error(
        "  tier: Admin\n  priority: 1\n  egress:\n  - action: Deny\n    to: [{identity: {namespace: y}}]",
        "spec.egress[0].to[0].identity",
        "only in ingress rules",
    );
    assert_error(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: np, namespace: x}\n\
         spec:\n  podSelector: {}\n  ingress:\n  - from: [{identity: {namespace: y}}]\n",
        "NetworkPolicy x/np",
        "spec.ingress[0].from[0].identity",
        "L4Policy and ClusterL4Policy",
    );
}

#[test]
fn malformed_identity_peers_name_the_field() {
    let with = |peer: &str| format!("  podSelector: {{}}\n  ingress:\n  - from: [{peer}]");
    l4_error(
        &with("{identity: {spiffeId: 'spiffe://cluster.local/ns/x'}}"),
        "spec.ingress[0].from[0].identity.spiffeId",
        "spiffe://cluster.local/ns/x",
    );
    l4_error(
        &with("{identity: {namespace: Not_A_Namespace}}"),
        "spec.ingress[0].from[0].identity.namespace",
        "not a namespace name",
    );
    l4_error(
        &with("{identity: {}}"),
        "spec.ingress[0].from[0].identity",
        "exactly one of spiffeId and namespace",
    );
    l4_error(
        &with("{identity: {namespace: y, spiffeId: 'spiffe://cluster.local/ns/y/sa/a'}}"),
        "spec.ingress[0].from[0].identity",
        "exactly one of spiffeId and namespace",
    );
    l4_error(
        &with("{identity: {namespace: y}, podSelector: {}}"),
        "spec.ingress[0].from[0]",
        "identity cannot be combined",
    );
    l4_error(
        &with("{identity: {namespace: y, serviceAccount: a}}"),
        "spec.ingress[0].from[0]",
        "serviceAccount",
    );
}
