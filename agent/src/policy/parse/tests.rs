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
    let PolicyKind::NetworkPolicy(np) = &*web.kind else {
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
            pods: Selector::new([("app".to_string(), "lb".to_string())].into(), vec![])
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
    let PolicyKind::NetworkPolicy(np) = &*deny.kind else {
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

/// Runs `f` and asserts it took under five seconds (debug build, loaded
/// machine: well under one; an expanded bomb would take minutes).
fn quickly<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = std::time::Instant::now();
    let out = f();
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(5),
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
    // Compact block sequences: one line, 10,000 levels.
    let block = format!("spec:\n  {}x\n", "- ".repeat(10_000));
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

// ---------------------------------------------------------------------------
// Names, labels and sizes, as Kubernetes validates them.

fn named(name: &str, namespace: &str) -> String {
    format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: '{name}', namespace: '{namespace}'}}\nspec: {{podSelector: {{}}}}\n")
}

#[test]
fn policy_names_are_dns_subdomains_and_namespaces_dns_labels() {
    assert!(parse(&named("web.v2-1", "shop-1")).is_ok());
    assert!(parse(&named(&"a".repeat(253), &"n".repeat(63))).is_ok());
    let message = error(&named("Web", "x"));
    assert!(
        message.contains("NetworkPolicy x/Web: metadata.name: \"Web\" is not valid: a name (DNS-1123 subdomain) may contain only lowercase"),
        "{message}"
    );
    for bad in ["-web", "web-", "a..b", "a_b", "a/b"] {
        let message = error(&named(bad, "x"));
        assert!(message.contains("metadata.name"), "{bad}: {message}");
    }
    let message = error(&named(&"a".repeat(254), "x"));
    assert!(
        message.contains("metadata.name")
            && message.contains("at most 253 characters; this one has 254"),
        "{message}"
    );
    let message = error(&named("web", "shop.a"));
    assert!(
        message.contains("NetworkPolicy shop.a/web: metadata.namespace: \"shop.a\" is not valid: a namespace name (DNS-1123 label)"),
        "{message}"
    );
    let message = error(&named("web", &"n".repeat(64)));
    assert!(
        message.contains("metadata.namespace") && message.contains("at most 63"),
        "{message}"
    );
    // The same rules for Portcullis' own kinds.
    let message = error(
        "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {name: Block_All}\nspec: {tier: Admin, priority: 1}\n",
    );
    assert!(
        message.contains("ClusterL4Policy Block_All: metadata.name"),
        "{message}"
    );
    let message = error(
        "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\nmetadata: {name: p, namespace: X}\nspec: {podSelector: {}}\n",
    );
    assert!(
        message.contains("L4Policy X/p: metadata.namespace"),
        "{message}"
    );
}

#[test]
fn a_ten_megabyte_name_is_rejected_with_a_short_message() {
    let huge = "a".repeat(10 << 20);
    // Over the file limit: refused before parsing.
    let message = error(&named(&huge, "x"));
    assert!(
        message.contains("policies/test.yaml: the file is 10485")
            && message.contains("at most 4194304"),
        "{message}"
    );
    assert!(message.len() < 200, "{} bytes", message.len());
    // Within the file limit, the name rule refuses it, and the message
    // stays short.
    let big = "a".repeat(3 << 20);
    let message = error(&named(&big, "x"));
    assert!(
        message.contains("metadata.name")
            && message.contains("at most 253 characters; this one has 3145728"),
        "{}",
        &message[..message.len().min(500)]
    );
    assert!(message.len() < 600, "{} bytes", message.len());
    // Through the path API objects take.
    let raw = NetworkPolicy {
        api_version: NETWORK_POLICY_API_VERSION.into(),
        kind: NETWORK_POLICY_KIND.into(),
        metadata: crate::policy::model::ObjectMeta {
            name: Some(huge),
            namespace: Some("x".into()),
            ..Default::default()
        },
        spec: Default::default(),
    };
    let message = chain(&network_policy(Origin::Kubernetes, &raw).unwrap_err());
    assert!(
        message.starts_with("Kubernetes API: NetworkPolicy x/aaaa")
            && message.contains("metadata.name")
            && message.contains("at most 253"),
        "{}",
        &message[..message.len().min(500)]
    );
    assert!(message.len() < 600, "{} bytes", message.len());
}

#[test]
fn selector_label_keys_and_values_are_checked() {
    let selector = |s: &str| {
        with_spec(&format!(
            "  podSelector: {{}}\n  ingress:\n  - from:\n    - podSelector: {s}"
        ))
    };
    let field = "spec.ingress[0].from[0].podSelector";
    assert!(parse(&selector(
        "{matchLabels: {app.kubernetes.io/name: web, tier: ''}}"
    ))
    .is_ok());
    assert_error(
        &selector("{matchLabels: {'bad key': web}}"),
        &format!("{field}.matchLabels"),
        "label key \"bad key\" is invalid: a label key name may contain only",
    );
    assert_error(
        &selector("{matchLabels: {app: 'web server'}}"),
        &format!("{field}.matchLabels"),
        "label value \"web server\" of key \"app\" is invalid",
    );
    assert_error(
        &selector(&format!("{{matchLabels: {{app: {}}}}}", "v".repeat(64))),
        &format!("{field}.matchLabels"),
        "a label value must be at most 63 characters; this one has 64",
    );
    assert_error(
        &selector("{matchLabels: {Example.com/app: web}}"),
        &format!("{field}.matchLabels"),
        "a label key prefix (DNS-1123 subdomain)",
    );
    assert_error(
        &selector("{matchLabels: {a/b/c: web}}"),
        &format!("{field}.matchLabels"),
        "at most one '/'",
    );
    assert_error(
        &selector("{matchExpressions: [{key: -tier, operator: Exists}]}"),
        &format!("{field}.matchExpressions[0].key"),
        "label key \"-tier\" is invalid",
    );
    assert_error(
        &selector("{matchExpressions: [{key: tier, operator: In, values: [front, 'a,b']}]}"),
        &format!("{field}.matchExpressions[0].values"),
        "label value \"a,b\" of key \"tier\" is invalid",
    );
}

#[test]
fn too_many_documents_are_refused() {
    let one = "---\n# empty\n";
    assert!(parse(&one.repeat(MAX_DOCUMENTS)).unwrap().is_empty());
    let message = error(&one.repeat(MAX_DOCUMENTS + 1));
    assert!(
        message.contains(
            "policies/test.yaml (document 10001): a policy file holds at most 10000 documents"
        ),
        "{message}"
    );
}

#[test]
fn oversized_workloads_files_are_refused() {
    let message = inventory_error(&format!("# {}\n", "x".repeat(MAX_FILE_BYTES)));
    assert!(
        message
            .starts_with("lab/workloads.yaml: the file is 4194307 bytes; at most 4194304 are read"),
        "{message}"
    );
    let mut text = String::from("namespaces:\n");
    for i in 0..=MAX_INVENTORY_ENTRIES {
        text.push_str(&format!("- {{name: n{i}}}\n"));
    }
    let message = inventory_error(&text);
    assert!(
        message.starts_with(
            "lab/workloads.yaml: 50001 namespaces, workloads and services; at most 50000"
        ),
        "{message}"
    );
}

#[test]
fn workload_and_namespace_names_and_labels_are_checked() {
    assert_inventory_error(
        "namespaces:\n  - {name: Shop}\n",
        &["namespaces[0].name: \"Shop\" is not valid: a namespace name (DNS-1123 label)"],
    );
    assert_inventory_error(
        "namespaces:\n  - {name: shop, labels: {'team name': web}}\n",
        &["namespaces[0].labels: label key \"team name\" is invalid"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: web_1, namespace: x}\n",
        &["workloads[0].name: \"web_1\" is not valid: a name (DNS-1123 subdomain)"],
    );
    assert_inventory_error(
        "workloads:\n  - {name: web, namespace: shop.eu}\n",
        &["workloads[0].namespace: \"shop.eu\" is not valid"],
    );
    assert_inventory_error(
        &format!(
            "workloads:\n  - {{name: web, labels: {{app: {}}}}}\n",
            "v".repeat(64)
        ),
        &[
            "workloads[0].labels: label value",
            "at most 63 characters; this one has 64",
        ],
    );
    assert_inventory_error(
        &format!("workloads:\n  - {{name: '{}'}}\n", "w".repeat(300_000)),
        &[
            "workloads[0].name",
            "at most 253 characters; this one has 300000",
        ],
    );
    assert_inventory_error(
        "services:\n  - {name: Web, clusterIPs: [], ports: []}\n",
        &["services[0].name: \"Web\" is not valid"],
    );
    assert!(
        inventory_error(&format!(
            "workloads:\n  - {{name: '{}'}}\n",
            "w".repeat(300_000)
        ))
        .len()
            < 400
    );
}

#[test]
fn messages_never_quote_megabytes_of_the_input() {
    let huge = "x".repeat(1 << 20);
    let cases = [
        // The YAML library quotes the value it did not expect.
        with_spec(&format!("  podSelector: {{matchLabels: '{huge}'}}")),
        // An unknown field with a huge name.
        with_spec(&format!("  {huge}: 1")),
        // Values Portcullis quotes itself.
        with_spec(&format!("  podSelector: {{}}\n  ingress: [{{ports: [{{port: '{huge}'}}]}}]")),
        with_spec(&format!("  podSelector: {{}}\n  policyTypes: ['{huge}']")),
        with_spec(&format!("  podSelector: {{}}\n  egress: [{{to: [{{ipBlock: {{cidr: '{huge}'}}}}]}}]")),
        format!("apiVersion: networking.k8s.io/v1\nkind: '{huge}'\nmetadata: {{name: p}}\n"),
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: '{huge}'}}\n"),
    ];
    for text in cases {
        let message = error(&text);
        assert!(
            message.len() < 1000 && message.contains("policies/test.yaml (document 1)"),
            "{} bytes: {}",
            message.len(),
            &message[..message.len().min(400)]
        );
    }
    let message = inventory_error(&format!(
        "workloads:\n  - {{name: a, ports: [{{name: '{huge}', containerPort: 80}}]}}\n"
    ));
    assert!(message.len() < 1000, "{} bytes", message.len());
}
