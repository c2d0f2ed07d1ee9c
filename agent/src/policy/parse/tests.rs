//! Parsing: the full v1 shape is accepted, and every mistake is reported
//! with file, document, object and field.

use super::*;
use crate::policy::{model::NAMESPACE_NAME_LABEL, test_support::chain};

fn parse(text: &str) -> Result<Vec<PolicyObject>, ParseError> {
    parse_policies(Path::new("policies/test.yaml"), text)
}

/// The whole error chain on one line.
fn error(text: &str) -> String {
    match parse(text) {
        Ok(p) => panic!("expected an error, parsed {p:?}"),
        Err(e) => chain(&e),
    }
}

/// A policy named x/p whose spec is `spec` (indented by two spaces).
fn with_spec(spec: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: x\nspec:\n{spec}\n")
}

/// Asserts the message names the file, document, object and field, and
/// says `what`.
fn assert_error(text: &str, field: &str, what: &str) {
    let message = error(text);
    for part in [
        "policies/test.yaml (document 1)",
        "NetworkPolicy x/p",
        field,
        what,
    ] {
        assert!(
            message.contains(part),
            "{message:?} should mention {part:?}"
        );
    }
}

#[test]
fn the_full_v1_shape_is_accepted() {
    let text = r#"
# a comment, then an empty document
---
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web
  namespace: shop
  uid: 0d2c4d8e-1111-2222-3333-444455556666
  resourceVersion: "1234"
  generation: 3
  creationTimestamp: "2024-01-01T00:00:00Z"
  labels: {team: shop}
  annotations: {note: hi}
  managedFields: [{manager: kubectl}]
spec:
  podSelector:
    matchLabels: {app: web}
    matchExpressions: [{key: tier, operator: In, values: [front]}]
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: lb}}
    - namespaceSelector: {matchLabels: {team: ops}}
      podSelector: {}
    - ipBlock: {cidr: 10.0.0.1/8, except: [10.1.0.0/16]}
    ports:
    - port: 80
    - {protocol: UDP, port: 8000, endPort: 8100}
    - {protocol: TCP, port: http}
    - protocol: UDP
  egress:
  - to: []
  - {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny}
spec: {podSelector: {}}
"#;
    let parsed = parse(text).unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(parsed.len(), 2);
    let web = &parsed[0];
    assert_eq!(web.policy_ref().to_string(), "shop/web");
    assert_eq!(
        web.origin,
        Origin::File {
            path: "policies/test.yaml".into(),
            document: 2
        }
    );
    let PolicyKind::NetworkPolicy(np) = &web.kind else {
        panic!("not a NetworkPolicy")
    };
    assert!(np.isolates_ingress && np.isolates_egress);
    assert_eq!(np.pod_selector.requirements.len(), 1);
    let rule = &np.ingress[0];
    let Peers::Only(peers) = &rule.peers else {
        panic!("peers")
    };
    assert_eq!(
        peers[0],
        Peer::Pods {
            namespaces: NamespaceScope::Exactly("shop".into()),
            pods: Selector {
                match_labels: [("app".to_string(), "lb".to_string())].into(),
                requirements: vec![],
            }
        }
    );
    assert!(
        matches!(&peers[1], Peer::Pods { namespaces: NamespaceScope::Matching(_), pods } if pods.is_everything())
    );
    assert_eq!(
        peers[2],
        Peer::Block {
            cidr: "10.0.0.0/8".parse().unwrap(),
            except: vec!["10.1.0.0/16".parse().unwrap()],
        },
        "host bits are cleared"
    );
    let ports: Vec<_> = rule
        .ports
        .iter()
        .map(|p| (p.protocol, p.port.clone()))
        .collect();
    assert_eq!(
        ports,
        [
            (
                Protocol::Tcp,
                PortSpec::Range {
                    first: 80,
                    last: 80
                }
            ),
            (
                Protocol::Udp,
                PortSpec::Range {
                    first: 8000,
                    last: 8100
                }
            ),
            (Protocol::Tcp, PortSpec::Named("http".into())),
            (Protocol::Udp, PortSpec::All),
        ]
    );
    assert_eq!(np.egress.len(), 2);
    assert!(np
        .egress
        .iter()
        .all(|r| r.peers == Peers::All && r.ports.is_empty()));

    let deny = &parsed[1];
    assert_eq!(
        deny.policy_ref().to_string(),
        "default/default-deny",
        "namespace defaults to default"
    );
    let PolicyKind::NetworkPolicy(np) = &deny.kind else {
        panic!("not a NetworkPolicy")
    };
    assert!(np.isolates_ingress && !np.isolates_egress);
    assert!(np.pod_selector.is_everything());
}

#[test]
fn an_empty_file_has_no_policies() {
    assert!(parse("").unwrap().is_empty());
    assert!(parse("# nothing here\n---\n").unwrap().is_empty());
}

#[test]
fn malformed_yaml_names_file_and_document() {
    let message = error(&format!("{}---\nkind: [\n", with_spec("  podSelector: {}")));
    assert!(
        message.contains("policies/test.yaml (document 2): malformed YAML"),
        "{message}"
    );
    assert!(message.contains("line"), "{message}");
}

#[test]
fn unknown_fields_and_wrong_types_name_the_field() {
    assert_error(
        &with_spec("  podSelector: {}\n  ingress:\n  - ports:\n    - port: 80\n    - prot: UDP"),
        "spec.ingress[0].ports[1]: unknown field `prot`",
        "does not match the NetworkPolicy schema",
    );
    assert_error(
        &with_spec("  podSelectr: {}"),
        "unknown field `podSelectr`",
        "line 7",
    );
    assert_error(
        &with_spec("  podSelector: {matchLabels: [a]}"),
        "spec.podSelector.matchLabels: expected mapping start at line 7",
        "schema",
    );
    assert_error(
        &with_spec("  podSelector: {}\n  ingress: [{from: [{ipBlock: {}}]}]"),
        "missing field `cidr`",
        "schema",
    );
}

#[test]
fn missing_identity_fields_and_unknown_kinds() {
    let message = error("kind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {}\n");
    assert!(
        message
            .contains("policies/test.yaml (document 1): NetworkPolicy x/p: apiVersion is missing"),
        "{message}"
    );
    let message = error("apiVersion: networking.k8s.io/v1\nmetadata: {name: p, namespace: x}\n");
    assert!(message.contains("object x/p: kind is missing"), "{message}");
    let message =
        error("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {namespace: x}\n");
    assert!(
        message.contains("unnamed NetworkPolicy in namespace x: metadata.name is missing"),
        "{message}"
    );
    let message = error("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nspec: {}\n");
    assert!(message.contains("metadata.name is missing"), "{message}");
    let message = error("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p, namespace: x}\n");
    assert!(
        message.contains("ConfigMap x/p: unsupported kind v1 ConfigMap"),
        "{message}"
    );
    let message =
        error("apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: p}\n");
    assert!(
        message.contains("unsupported kind extensions/v1beta1 NetworkPolicy"),
        "{message}"
    );
    let message = error("- just\n- a list\n");
    assert!(
        message.contains("document 1): expected an object"),
        "{message}"
    );
}

#[test]
fn bad_ports() {
    let ports = |p: &str| {
        with_spec(&format!(
            "  podSelector: {{}}\n  ingress:\n  - ports:\n    - port: 80\n    - {p}"
        ))
    };
    assert_error(
        &ports("port: 0"),
        "spec.ingress[0].ports[1].port",
        "port 0 is out of range 1-65535",
    );
    assert_error(
        &ports("port: 65536"),
        "spec.ingress[0].ports[1].port",
        "port 65536 is out of range",
    );
    assert_error(
        &ports("{port: 80, endPort: 70000}"),
        "spec.ingress[0].ports[1].endPort",
        "port 70000 is out of range",
    );
    assert_error(
        &ports("{port: 90, endPort: 80}"),
        "spec.ingress[0].ports[1].endPort",
        "endPort 80 is less than port 90",
    );
    assert_error(
        &ports("{port: http, endPort: 90}"),
        "spec.ingress[0].ports[1].endPort",
        "named port \"http\"",
    );
    assert_error(
        &ports("{endPort: 90}"),
        "spec.ingress[0].ports[1].endPort",
        "endPort needs a numeric port",
    );
    assert_error(
        &ports("port: \"80\""),
        "spec.ingress[0].ports[1].port",
        "\"80\" is not a valid port name",
    );
    assert_error(
        &ports("{port: 80, protocol: SCTP}"),
        "spec.ingress[0].ports[1].protocol",
        "SCTP is not supported by Portcullis",
    );
    assert_error(
        &ports("{port: 80, protocol: tcp}"),
        "spec.ingress[0].ports[1].protocol",
        "unknown protocol \"tcp\"",
    );
    assert_error(
        &ports("port: [1]"),
        "spec.ingress[0].ports[1].port",
        "expected a port number or a port name",
    );
}

#[test]
fn bad_peers_and_cidrs() {
    let peer = |p: &str| {
        with_spec(&format!(
            "  podSelector: {{}}\n  egress:\n  - to:\n    - podSelector: {{}}\n    - {p}"
        ))
    };
    assert_error(
        &peer("ipBlock: {cidr: 10.0.0.300/8}"),
        "spec.egress[0].to[1].ipBlock.cidr",
        "\"10.0.0.300/8\" is not a CIDR",
    );
    assert_error(
        &peer("ipBlock: {cidr: 10.0.0.1}"),
        "spec.egress[0].to[1].ipBlock.cidr",
        "is not a CIDR",
    );
    assert_error(
        &peer("ipBlock: {cidr: 10.0.0.0/16, except: [10.0.1.0/24, 10.1.0.0/24]}"),
        "spec.egress[0].to[1].ipBlock.except[1]",
        "except 10.1.0.0/24 is not strictly inside cidr 10.0.0.0/16",
    );
    assert_error(
        &peer("ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}"),
        "ipBlock.except[0]",
        "not strictly inside",
    );
    assert_error(
        &peer("ipBlock: {cidr: 10.0.0.0/16, except: ['fd00::/64']}"),
        "ipBlock.except[0]",
        "not strictly inside",
    );
    assert_error(
        &peer("ipBlock: {cidr: '::ffff:10.0.0.0/104'}"),
        "ipBlock.cidr",
        "IPv4-mapped IPv6 CIDR",
    );
    assert_error(
        &peer("{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}"),
        "spec.egress[0].to[1]",
        "ipBlock cannot be combined",
    );
    assert_error(
        &peer("{}"),
        "spec.egress[0].to[1]",
        "a peer needs podSelector, namespaceSelector or ipBlock",
    );
}

#[test]
fn bad_label_selectors() {
    let peer = |s: &str| {
        with_spec(&format!("  podSelector: {{}}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions: [{s}]"))
    };
    let field = "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0]";
    assert_error(
        &peer("{key: team, operator: Equals, values: [a]}"),
        &format!("{field}.operator"),
        "unknown operator \"Equals\"",
    );
    assert_error(
        &peer("{key: team, operator: In}"),
        &format!("{field}.values"),
        "operator In on key \"team\" needs at least one value",
    );
    assert_error(
        &peer("{key: team, operator: NotIn, values: []}"),
        &format!("{field}.values"),
        "needs at least one value",
    );
    assert_error(
        &peer("{key: team, operator: Exists, values: [a]}"),
        &format!("{field}.values"),
        "takes no values",
    );
    assert_error(
        &with_spec(
            "  podSelector:\n    matchExpressions: [{key: a, operator: DoesNotExist, values: [b]}]",
        ),
        "spec.podSelector.matchExpressions[0].values",
        "operator DoesNotExist on key \"a\" takes no values",
    );
}

#[test]
fn bad_policy_types_and_duplicates() {
    assert_error(
        &with_spec("  podSelector: {}\n  policyTypes: [Ingress, Both]"),
        "spec.policyTypes[1]",
        "\"Both\" is not Ingress or Egress",
    );
    let one = with_spec("  podSelector: {}");
    let message = error(&format!("{one}---\n{one}"));
    assert!(
        message.contains("policies/test.yaml (document 2): x/p is defined twice (first in policies/test.yaml (document 1))"),
        "{message}"
    );
}

#[test]
fn api_objects_validate_through_the_same_path() {
    let raw = NetworkPolicy {
        api_version: NETWORK_POLICY_API_VERSION.into(),
        kind: NETWORK_POLICY_KIND.into(),
        metadata: crate::policy::model::ObjectMeta {
            name: Some("p".into()),
            namespace: Some("x".into()),
            ..Default::default()
        },
        spec: Default::default(),
    };
    let p = network_policy(Origin::Kubernetes, &raw).unwrap();
    assert_eq!(p.policy_ref().to_string(), "x/p");
    let mut bad = raw.clone();
    bad.spec.policy_types = Some(vec!["Sideways".into()]);
    let message = chain(&network_policy(Origin::Kubernetes, &bad).unwrap_err());
    assert!(
        message.starts_with("Kubernetes API: NetworkPolicy x/p: spec.policyTypes[0]"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------
// Inventory

fn inventory_error(text: &str) -> String {
    match parse_inventory(Path::new("lab/workloads.yaml"), text) {
        Ok(i) => panic!("expected an error, parsed {i:?}"),
        Err(e) => chain(&e),
    }
}

fn assert_inventory_error(text: &str, parts: &[&str]) {
    let message = inventory_error(text);
    assert!(message.starts_with("lab/workloads.yaml: "), "{message}");
    for part in parts {
        assert!(
            message.contains(part),
            "{message:?} should mention {part:?}"
        );
    }
}

#[test]
fn the_inventory_format() {
    let text = r#"
nodeIPs: [198.18.0.1, "fd70:6c61:6200::1"]
namespaces:
  - name: x
    labels: {ns: x}
workloads:
  - name: a
    namespace: x
    labels: {pod: a}
    cgroup: /portcullis-lab/x-a
    ips: [198.18.0.10, "fd70:6c61:6200::10"]
    ports:
      - {name: serve-80-tcp, containerPort: 80, protocol: TCP}
      - {name: dns, containerPort: 53, protocol: UDP}
  - name: remote
    ips: [198.18.1.10]
"#;
    let inv =
        parse_inventory(Path::new("w.yaml"), text).unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(inv.node_ips.len(), 2);
    let a = &inv.workloads[0];
    assert!(a.is_local());
    assert_eq!(a.ipv4(), Some("198.18.0.10".parse().unwrap()));
    assert_eq!(a.ipv6(), Some("fd70:6c61:6200::10".parse().unwrap()));
    assert_eq!(a.named_port("serve-80-tcp", Protocol::Tcp), Some(80));
    assert_eq!(a.named_port("dns", Protocol::Tcp), None);
    let remote = &inv.workloads[1];
    assert!(!remote.is_local());
    assert_eq!(remote.namespace, "default");
    assert_eq!(
        inv.namespace_labels("x")
            .get(NAMESPACE_NAME_LABEL)
            .map(String::as_str),
        Some("x")
    );

    // It round-trips, so tools (the lab) can write it.
    let written = serde_saphyr::to_string(&inv).unwrap();
    assert_eq!(parse_inventory(Path::new("w.yaml"), &written).unwrap(), inv);
    assert_eq!(
        parse_inventory(Path::new("w.yaml"), "").unwrap(),
        Inventory::default()
    );
    assert_eq!(
        parse_inventory(Path::new("w.yaml"), "# none\n").unwrap(),
        Inventory::default()
    );
}

#[test]
fn inventory_mistakes_are_named() {
    assert_inventory_error(
        "workloads:\n  - {name: a, ips: [10.0.0.300]}\n",
        &["workloads[0].ips[0]", "invalid IP address"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, ipz: []}\n",
        &["workloads[0]: unknown field `ipz`"],
    );
    assert_inventory_error("nodeIps: []\n", &["unknown field `nodeIps`"]);
    assert_inventory_error(
        "workloads:\n  - {name: a, namespace: x, ips: [10.0.0.1, 10.0.0.2]}\n",
        &[
            "workloads[0].ips[1]",
            "x/a has a second IPv4 address 10.0.0.2 (already has 10.0.0.1)",
        ],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, namespace: x}\n  - {name: b, namespace: x}\n  - {name: a, namespace: x}\n",
        &["workloads[2]: workload x/a is listed twice (first at workloads[0])"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, ips: [10.0.0.1]}\n  - {name: b, ips: ['fd00::1', 10.0.0.1]}\n",
        &["workloads[1].ips[1]: address 10.0.0.1 is already used at workloads[0].ips[0]"],
    );
    assert_inventory_error(
        "nodeIPs: [10.0.0.1]\nworkloads:\n  - {name: a, ips: [10.0.0.1]}\n",
        &["already used at nodeIPs[0]"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, ports: [{name: web, containerPort: 70000}]}\n",
        &[
            "workloads[0].ports[0]",
            "containerPort 70000 is out of range 1-65535",
            "line 2",
        ],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, ports: [{name: web, containerPort: 0}]}\n",
        &["workloads[0].ports[0]", "containerPort 0 is out of range"],
    );
    assert_inventory_error(
        "workloads:\n  - name: a\n    ports:\n      - {name: web, containerPort: 80}\n      - {name: web, containerPort: 81, protocol: UDP}\n",
        &["workloads[0].ports[1].name", "port name \"web\" is used twice (first at workloads[0].ports[0])"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, ports: [{name: Web, containerPort: 80}]}\n",
        &[
            "workloads[0].ports[0].name",
            "\"Web\" is not a valid port name",
        ],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, ports: [{name: web, containerPort: 80, protocol: ICMP}]}\n",
        &["workloads[0].ports[0].protocol", "unknown variant `ICMP`"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, ips: [127.0.0.2]}\n",
        &["workloads[0].ips[0]", "loopback"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, ips: ['::ffff:10.0.0.1']}\n",
        &["IPv4-mapped"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: a, cgroup: /lab/a}\n  - {name: b, cgroup: /lab/a}\n",
        &["invalid inventory: workloads default/a and default/b share cgroup /lab/a"],
    );
    assert_inventory_error(
        "namespaces:\n  - {name: x}\n  - {name: x}\n",
        &["namespaces[1]: namespace \"x\" is listed twice"],
    );
    assert_inventory_error("workloads: [\n", &["malformed inventory"]);
}

// ---------------------------------------------------------------------------
// Hostile input: each must fail fast with an error naming the document,
// never hang, exhaust memory or overflow the stack.

/// Runs `f` and asserts it took under two seconds (debug build included).
fn quickly<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let out = f();
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(2),
        "{what} took {took:?}"
    );
    out
}

/// Nine anchors, each nine aliases of the one before: 9^9 nodes expanded.
fn yaml_bomb() -> String {
    let mut text = String::from("a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..9 {
        let p = i - 1;
        text.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    text
}

#[test]
fn a_yaml_bomb_is_rejected() {
    let bomb = yaml_bomb();
    let policy = format!(
        "{}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p}}\nspec:\n  podSelector: {{}}\n  x: *a8\n{}",
        with_spec("  podSelector: {}"),
        bomb.replace('\n', "\n  ")
    );
    let message = quickly("the policy bomb", || error(&policy));
    assert!(message.contains("(document 2)"), "{message}");
    let message = quickly("a bare bomb", || error(&bomb));
    assert!(message.contains("(document 1)"), "{message}");
    let message = quickly("the workloads bomb", || {
        inventory_error(&format!("{bomb}workloads: [{{name: a, labels: *a8}}]\n"))
    });
    assert!(message.starts_with("lab/workloads.yaml: "), "{message}");
}

#[test]
fn deep_nesting_is_rejected_without_overflowing_the_stack() {
    for (open, close) in [("[", "]"), ("{a: ", "}")] {
        let deep = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p}}\nspec: {}{}\n",
            open.repeat(10_000),
            close.repeat(10_000)
        );
        let message = quickly("10,000 flow levels", || error(&deep));
        assert!(
            message.contains("policies/test.yaml (document 1): malformed YAML"),
            "{message}"
        );
    }
    let mut block = String::from("spec:\n");
    for level in 1..10_000 {
        block.push_str(&" ".repeat(level));
        block.push_str("- \n");
    }
    let message = quickly("10,000 block levels", || error(&block));
    assert!(message.contains("malformed YAML"), "{message}");
    let message = quickly("a deep workloads file", || {
        inventory_error(&format!(
            "workloads: {}{}\n",
            "[".repeat(10_000),
            "]".repeat(10_000)
        ))
    });
    assert!(message.contains("malformed inventory"), "{message}");
}

#[test]
fn binary_garbage_is_an_error_not_a_crash() {
    // A fixed pseudo-random byte string, read as a file would be.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let bytes: Vec<u8> = (0..64 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let text = String::from_utf8_lossy(&bytes);
    let message = quickly("garbage", || error(&text));
    assert!(
        message.starts_with("policies/test.yaml (document "),
        "{message}"
    );
    quickly("garbage workloads", || inventory_error(&text));
    // Control characters in an otherwise plausible document.
    let message = error("apiVersion: networking.k8s.io/v1\nkind: Network\u{0}Policy\n");
    assert!(message.contains("document 1"), "{message}");
}
