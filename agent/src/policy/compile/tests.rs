//! What the compiler writes: entry shapes, identities, attribution and id
//! stability. Verdict semantics are covered by the evaluator's scenario
//! tests (which also run the kernel model) and the agreement property test.

use std::{collections::BTreeSet, str::FromStr, sync::Arc};

use portcullis_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, PROTO_OTHER, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

use super::*;
use crate::policy::{
    model::{ContainerPort, InventoryError, Labels, Namespace},
    test_support::{chain, inventory, policies},
};

fn lab() -> Inventory {
    inventory(
        r#"
nodeIPs: [198.18.0.1]
workloads:
  - {name: a, namespace: x, labels: {app: web}, cgroup: /lab/x-a, ips: [198.18.0.10], ports: [{name: http, containerPort: 80}]}
  - {name: b, namespace: x, labels: {app: web}, cgroup: /lab/x-b, ips: [198.18.0.11], ports: [{name: http, containerPort: 80}]}
  - {name: c, namespace: x, labels: {app: db}, cgroup: /lab/x-c, ips: [198.18.0.12, "fd70::12"], ports: [{name: http, containerPort: 8080}]}
  - {name: r, namespace: y, labels: {app: web}, ips: [198.18.0.20]}
"#,
    )
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
    )
}

fn compile(inv: &Inventory, text: &str) -> Compiled {
    Compiler::new()
        .compile(inv, &policies(text))
        .unwrap_or_else(|e| panic!("{}", chain(&e)))
}

fn endpoint(c: &Compiled, name: &str) -> u32 {
    c.endpoints
        .iter()
        .find(|e| e.workload.name == name)
        .map(|e| e.id)
        .expect("endpoint")
}

fn identity(c: &Compiled, ip: &str) -> u32 {
    let ip = IpAddr::from_str(ip).expect("address");
    c.identities[&AddrPrefix::host(ip)]
}

/// The (port, prefix length, verdict) entries of one partition.
fn entries(
    c: &Compiled,
    endpoint_id: u32,
    peer: u32,
    direction: u8,
    protocol: u8,
) -> Vec<(u16, u8, u8)> {
    c.rules
        .iter()
        .filter(|(k, _)| {
            (k.endpoint_id, k.peer_identity, k.direction, k.protocol)
                == (endpoint_id, peer, direction, protocol)
        })
        .map(|(k, v)| (k.port, k.port_prefix_len, v.verdict))
        .collect()
}

fn policy_ref(ns: &str, name: &str) -> PolicyRef {
    PolicyRef::network_policy(ns, name)
}

#[test]
fn endpoints_are_the_local_workloads() {
    let c = compile(&lab(), "");
    let names: Vec<_> = c.endpoints.iter().map(|e| e.workload.to_string()).collect();
    assert_eq!(names, ["x/a", "x/b", "x/c"]);
    let ep = &c.endpoints[2];
    assert_eq!(ep.cgroup, PathBuf::from("/lab/x-c"));
    assert_eq!(ep.ipv4, Some(Ipv4Addr::new(198, 18, 0, 12)));
    assert_eq!(ep.ipv6, Some("fd70::12".parse().unwrap()));
    assert!(
        c.rules.is_empty() && c.cookies.is_empty(),
        "nothing is isolated"
    );
}

#[test]
fn default_deny_is_one_wildcard_entry_per_direction_and_protocol() {
    let c = compile(
        &lab(),
        &np(
            "x",
            "deny",
            "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress, Egress]",
        ),
    );
    let id = endpoint(&c, "c");
    // TCP, UDP, SCTP, and everything judged without ports: an isolated
    // pod is closed to every protocol, not only to the ones with ports.
    assert_eq!(c.rules.len(), 8);
    for direction in [DIRECTION_INGRESS, DIRECTION_EGRESS] {
        for protocol in [PROTO_TCP, PROTO_UDP, PROTO_SCTP, PROTO_OTHER] {
            assert_eq!(
                entries(&c, id, IDENTITY_ANY, direction, protocol),
                [(0, 0, VERDICT_DENY)]
            );
        }
    }
    let value = c.rules.values().next().unwrap();
    assert_eq!(value.reason, REASON_DEFAULT_DENY);
    assert_eq!(
        c.cookies[&value.rule_cookie],
        Attribution::DefaultDeny {
            direction: Direction::Ingress,
            isolated_by: vec![policy_ref("x", "deny")],
        }
    );
    assert_eq!(c.cookies.len(), 2, "one default-deny cookie per direction");
}

#[test]
fn port_ranges_become_aligned_prefix_blocks() {
    let c = compile(
        &lab(),
        &np(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - ports: [{port: 80, endPort: 81}, {port: 443}, {protocol: UDP, port: 1, endPort: 65535}]",
        ),
    );
    let id = endpoint(&c, "c");
    assert_eq!(
        entries(&c, id, IDENTITY_ANY, DIRECTION_INGRESS, PROTO_TCP),
        [
            (0, 0, VERDICT_DENY),
            (80, 15, VERDICT_ALLOW),
            (443, 16, VERDICT_ALLOW)
        ]
    );
    // 1-65535 would take 16 allow blocks; an allow default with port 0
    // denied takes two entries.
    assert_eq!(
        entries(&c, id, IDENTITY_ANY, DIRECTION_INGRESS, PROTO_UDP),
        [(0, 0, VERDICT_ALLOW), (0, 16, VERDICT_DENY)]
    );
}

#[test]
fn a_rule_allowing_every_port_needs_no_default_entry() {
    let c = compile(
        &lab(),
        &np(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: db}}\n  ingress: [{}]",
        ),
    );
    let id = endpoint(&c, "c");
    for protocol in [PROTO_TCP, PROTO_UDP] {
        assert_eq!(
            entries(&c, id, IDENTITY_ANY, DIRECTION_INGRESS, protocol),
            [(0, 0, VERDICT_ALLOW)]
        );
    }
    let cookie = c.rules.values().next().unwrap().rule_cookie;
    assert_eq!(
        c.cookies[&cookie],
        Attribution::Rule {
            policy: policy_ref("x", "p"),
            direction: Direction::Ingress,
            rule_index: 0,
        }
    );
    assert_eq!(
        c.cookies.len(),
        1,
        "the unused default-deny cookie is not listed"
    );
}

#[test]
fn identities_group_alike_pods_and_reserve_the_node() {
    let c = compile(&lab(), "");
    assert_eq!(identity(&c, "198.18.0.1"), IDENTITY_HOST);
    let (a, b) = (identity(&c, "198.18.0.10"), identity(&c, "198.18.0.11"));
    assert_eq!(a, b, "same namespace, labels and ports: one identity");
    assert!(a >= IDENTITY_FIRST_ALLOCATED);
    assert_ne!(identity(&c, "198.18.0.20"), a, "another namespace");
    assert_eq!(
        identity(&c, "198.18.0.12"),
        identity(&c, "fd70::12"),
        "both addresses of c"
    );

    // A policy CIDR containing only one of them splits the class.
    let c = compile(
        &lab(),
        &np(
            "x",
            "p",
            "  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 198.18.0.10/32}}]",
        ),
    );
    assert_ne!(identity(&c, "198.18.0.10"), identity(&c, "198.18.0.11"));
}

/// Labels no selector names (rollout hashes, per-pod names) and port names
/// no rule names do not split classes: identities grow with what policies
/// select on, not with the pods.
#[test]
fn classes_ignore_labels_and_port_names_no_rule_looks_at() {
    let mut text = String::from("workloads:\n");
    for i in 0..50 {
        text.push_str(&format!(
            "  - {{name: web-{i}, namespace: x, labels: {{app: web, pod-template-hash: h{}, \
             statefulset.kubernetes.io/pod-name: web-{i}}}, ips: [10.1.0.{i}], \
             ports: [{{name: p{i}, containerPort: 80}}]}}\n",
            i % 7
        ));
    }
    text.push_str(
        "  - {name: db, namespace: x, labels: {app: db}, cgroup: /lab/db, ips: [10.1.1.1]}\n",
    );
    let inv = inventory(&text);
    let by_app = np(
        "x",
        "p",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]",
    );
    let c = compile(&inv, &by_app);
    let ids: BTreeSet<u32> = (0..50)
        .map(|i| identity(&c, &format!("10.1.0.{i}")))
        .collect();
    assert_eq!(ids.len(), 1, "50 web pods, one identity: {ids:?}");
    // A selector on the hash makes its key matter again.
    let by_hash = np(
        "x",
        "p",
        "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod-template-hash: h1}}}]",
    );
    let c = compile(&inv, &by_hash);
    let ids: BTreeSet<u32> = (0..50)
        .map(|i| identity(&c, &format!("10.1.0.{i}")))
        .collect();
    assert_eq!(ids.len(), 7, "one class per value of the key: {ids:?}");
    // So does a rule naming a port.
    let by_port = np(
        "x",
        "p",
        "  podSelector: {matchLabels: {app: db}}\n  egress:\n  - ports: [{port: p3}]",
    );
    let c = compile(&inv, &by_port);
    let ids: BTreeSet<u32> = (0..50)
        .map(|i| identity(&c, &format!("10.1.0.{i}")))
        .collect();
    assert_eq!(ids.len(), 2, "the pod with port p3 and the rest: {ids:?}");
}

#[test]
fn peers_get_entries_only_where_their_verdict_differs() {
    let c = compile(
        &lab(),
        &np(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: db}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 5432}]\n  - ports: [{port: 9090}]",
        ),
    );
    let id = endpoint(&c, "c");
    let web = identity(&c, "198.18.0.10");
    assert_eq!(
        entries(&c, id, web, DIRECTION_INGRESS, PROTO_TCP),
        [
            (0, 0, VERDICT_DENY),
            (5432, 16, VERDICT_ALLOW),
            (9090, 16, VERDICT_ALLOW)
        ],
        "a named peer's entries include the rules for every peer"
    );
    assert_eq!(
        entries(&c, id, IDENTITY_ANY, DIRECTION_INGRESS, PROTO_TCP),
        [(0, 0, VERDICT_DENY), (9090, 16, VERDICT_ALLOW)]
    );
    assert!(
        entries(&c, id, web, DIRECTION_INGRESS, PROTO_UDP).is_empty(),
        "no UDP rule names web, so the wildcard entry decides"
    );
    let remote = identity(&c, "198.18.0.20");
    assert!(
        entries(&c, id, remote, DIRECTION_INGRESS, PROTO_TCP).is_empty(),
        "y/r is in another namespace"
    );
}

#[test]
fn named_egress_ports_get_an_entry_per_destination_class() {
    let c = compile(
        &lab(),
        &np(
            "x",
            "p",
            "  podSelector: {matchLabels: {app: web}}\n  egress:\n  - ports: [{port: http}]",
        ),
    );
    let a = endpoint(&c, "a");
    assert_eq!(
        entries(&c, a, IDENTITY_ANY, DIRECTION_EGRESS, PROTO_TCP),
        [(0, 0, VERDICT_DENY)]
    );
    let web = identity(&c, "198.18.0.11");
    let db = identity(&c, "198.18.0.12");
    assert_eq!(
        entries(&c, a, web, DIRECTION_EGRESS, PROTO_TCP),
        [(0, 0, VERDICT_DENY), (80, 16, VERDICT_ALLOW)]
    );
    assert_eq!(
        entries(&c, a, db, DIRECTION_EGRESS, PROTO_TCP),
        [(0, 0, VERDICT_DENY), (8080, 16, VERDICT_ALLOW)]
    );
}

#[test]
fn ip_blocks_become_cidr_identities() {
    let c = compile(
        &lab(),
        &np(
            "x",
            "p",
            "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}, {ipBlock: {cidr: '2001:db8::/32'}}]",
        ),
    );
    let prefix = |s: &str| AddrPrefix::from_net(s.parse().unwrap());
    let ten = c.identities[&prefix("10.0.0.0/8")];
    let except = c.identities[&prefix("10.1.0.0/16")];
    assert!(ten >= IDENTITY_FIRST_ALLOCATED && except >= IDENTITY_FIRST_ALLOCATED && ten != except);
    assert_eq!(prefix("10.0.0.0/8").len, 104);
    assert!(c.identities.contains_key(&prefix("2001:db8::/32")));
    let a = endpoint(&c, "a");
    assert_eq!(
        entries(&c, a, ten, DIRECTION_EGRESS, PROTO_TCP),
        [(0, 0, VERDICT_ALLOW)]
    );
    assert!(entries(&c, a, except, DIRECTION_EGRESS, PROTO_TCP).is_empty());
}

#[test]
fn an_ipv6_block_containing_the_ipv4_mapped_range_leaves_ipv4_unnamed() {
    let c = compile(
        &lab(),
        &np(
            "x",
            "p",
            "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: '::/0'}}]",
        ),
    );
    let ipv4_space = AddrPrefix::from_net("0.0.0.0/0".parse().unwrap());
    assert_eq!(ipv4_space.len, 96);
    assert_eq!(c.identities[&ipv4_space], IDENTITY_WORLD);

    let c = compile(
        &lab(),
        &np("x", "p", "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: '::/0'}}, {ipBlock: {cidr: 0.0.0.0/0}}]"),
    );
    assert!(c.identities[&ipv4_space] >= IDENTITY_FIRST_ALLOCATED);
}

#[test]
fn ids_are_stable_across_recompiles() {
    let text = [
        np("x", "web", "  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: db}}}]"),
        np("x", "db", "  podSelector: {matchLabels: {app: db}}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8}}]"),
    ]
    .concat();
    let inv = lab();
    let pols = policies(&text);
    let mut compiler = Compiler::new();
    let first = compiler.compile(&inv, &pols).unwrap();
    assert_eq!(
        compiler.compile(&inv, &pols).unwrap(),
        first,
        "same input, same output"
    );
    assert_eq!(
        Compiler::new().compile(&inv, &pols).unwrap(),
        first,
        "deterministic"
    );

    // A new workload and a new policy: what was there keeps its ids.
    let mut grown = inv.clone();
    grown.workloads.insert(
        0,
        Arc::new(Workload {
            name: "new".into(),
            namespace: "x".into(),
            labels: Arc::new(Labels::from([("app".to_string(), "cache".to_string())])),
            cgroup: Some("/lab/x-new".into()),
            ips: vec!["198.18.0.30".parse().unwrap()],
            ports: vec![],
            service_account: None,
        }),
    );
    let mut more = pols.clone();
    more.extend(policies(&np(
        "x",
        "cache",
        "  podSelector: {matchLabels: {app: cache}}\n  ingress: [{}]",
    )));
    let second = compiler.compile(&grown, &more).unwrap();

    for ep in &first.endpoints {
        let again = second
            .endpoints
            .iter()
            .find(|e| e.workload == ep.workload)
            .unwrap();
        assert_eq!(again.id, ep.id, "{}", ep.workload);
    }
    for (prefix, id) in &first.identities {
        assert_eq!(second.identities.get(prefix), Some(id), "{prefix}");
    }
    for (cookie, attribution) in first.cookies.iter() {
        assert_eq!(second.cookies.get(cookie), Some(attribution));
    }
    for (key, value) in first.rules.iter() {
        assert_eq!(
            second.rules.get(key),
            Some(value),
            "{key:?} is still there unchanged"
        );
    }
}

#[test]
fn two_local_workloads_cannot_share_a_cgroup() {
    let mut inv = lab();
    Arc::make_mut(&mut inv.workloads[1]).cgroup = Some("/lab/x-a/".into());
    let err = Compiler::new().compile(&inv, &[]).unwrap_err();
    assert!(
        matches!(&err, CompileError::Inventory { source } if matches!(&**source,
            InventoryError::DuplicateCgroup { first, second, .. } if first.name == "a" && second.name == "b")),
        "{err:?}"
    );
    assert!(
        chain(&err).contains("workloads x/a and x/b share cgroup /lab/x-a"),
        "{}",
        chain(&err)
    );
}

#[test]
fn a_policy_given_twice_is_an_error() {
    let mut pols = policies(&np("x", "p", "  podSelector: {}"));
    pols.push(pols[0].clone());
    let err = Compiler::new().compile(&lab(), &pols).unwrap_err();
    assert!(
        matches!(err, CompileError::DuplicatePolicy { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("x/p"));
}

/// The benchmark's shape: one policy with thousands of single-address
/// rules. Each address gets a CIDR identity with its own TCP partition
/// (default deny + one port); UDP, SCTP, other protocols and unnamed peers
/// share the wildcard.
#[test]
fn thousands_of_cidr_rules_compile_to_two_entries_each() {
    let n = 2000;
    let inv = inventory(
        "workloads:\n  - {name: client, namespace: bench, labels: {pod: client}, cgroup: /b/c, ips: [198.18.0.10]}\n  - {name: server, namespace: bench, labels: {pod: server}, cgroup: /b/s, ips: [198.18.0.11]}\n",
    );
    let mut text = String::from("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bench, namespace: bench}\nspec:\n  podSelector: {matchLabels: {pod: server}}\n  ingress:\n");
    for i in 0..n {
        let ip = Ipv4Addr::from(u32::from_be_bytes([198, 19, 0, 0]) + i + 1);
        text.push_str(&format!(
            "    - from: [{{ipBlock: {{cidr: {ip}/32}}}}]\n      ports: [{{port: {}}}]\n",
            10_000 + i
        ));
    }
    let c = compile(&inv, &text);
    assert_eq!(c.identities.len(), n as usize + 2);
    assert_eq!(c.rules.len(), 2 * n as usize + 4);
}

/// The incremental compile's unit is an endpoint in one direction: a pod
/// joining an existing peer class, or leaving a policy's selection, works
/// out nothing again, and what is replayed equals a full compile with the
/// same history (the property test checks this on random sequences).
#[test]
fn unaffected_endpoints_are_replayed_not_recompiled() {
    let text = np(
        "x",
        "web-from-db",
        "  podSelector: {matchLabels: {app: web}}\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: db}}}]\n      ports: [{port: 80}]",
    ) + &np(
        "x",
        "db-isolated",
        "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress, Egress]",
    );
    let policies = policies(&text);
    let mut joined = lab();
    joined.workloads.push(Arc::new(Workload {
        name: "s".into(),
        ips: vec!["198.18.0.21".parse().unwrap()],
        ..joined.workloads[3].as_ref().clone()
    }));
    let mut left = joined.clone();
    Arc::make_mut(&mut left.workloads[0])
        .labels_mut()
        .insert("app".into(), "api".into());

    let mut incremental = Compiler::new();
    let mut full = Compiler::without_memo();
    // a and b ingress, c ingress and egress: four partitions with entries;
    // then the same again and a remote pod like r (same class), where no
    // endpoint's rules are even looked at; a leaves the web pods (a new
    // class, which no peer list names: a's partition goes, the others are
    // replayed without being looked at).
    let expected_reuse = [
        (
            lab(),
            Reuse {
                replayed: 0,
                unexamined: 0,
                computed: 4,
            },
        ),
        (
            lab(),
            Reuse {
                replayed: 4,
                unexamined: 4,
                computed: 0,
            },
        ),
        (
            joined,
            Reuse {
                replayed: 4,
                unexamined: 4,
                computed: 0,
            },
        ),
        (
            left,
            Reuse {
                replayed: 3,
                unexamined: 3,
                computed: 0,
            },
        ),
    ];
    for (inventory, reuse) in expected_reuse {
        let got = incremental.compile(&inventory, &policies).unwrap();
        assert_eq!(got, full.compile(&inventory, &policies).unwrap());
        assert_eq!(incremental.reuse(), reuse);
    }
}

/// An incremental compiler and one that replays nothing, given the same
/// history: every compile must agree (the property test does this on
/// random sequences; the tests using this pin the class changes it finds
/// only rarely).
struct Agreeing {
    incremental: Compiler,
    full: Compiler,
}

impl Agreeing {
    fn new() -> Self {
        Self {
            incremental: Compiler::new(),
            full: Compiler::without_memo(),
        }
    }

    fn compile(&mut self, inventory: &Inventory, policies: &[PolicyObject]) -> Compiled {
        let got = self.incremental.compile(inventory, policies).unwrap();
        assert_eq!(got, self.full.compile(inventory, policies).unwrap());
        got
    }

    /// Compiles `before`, then returns the compile of `after`.
    fn across(before: &Inventory, after: &Inventory, text: &str) -> Compiled {
        let policies = policies(text);
        let mut both = Self::new();
        both.compile(before, &policies);
        both.compile(after, &policies)
    }
}

/// A new peer class reaches only the endpoints whose rules name it: when a
/// pod takes a label value no pod had, a rule selecting that value is
/// worked out again, while endpoints whose rules name classes that kept
/// their identities are replayed without being looked at.
#[test]
fn a_new_class_reaches_only_the_endpoints_whose_rules_name_it() {
    let before = inventory(
        r#"
workloads:
  - {name: a, namespace: x, labels: {app: web}, cgroup: /lab/x-a, ips: [198.18.0.10]}
  - {name: b, namespace: x, labels: {app: web}, cgroup: /lab/x-b, ips: [198.18.0.11]}
  - {name: d, namespace: y, labels: {app: db}, cgroup: /lab/y-d, ips: [198.18.0.12]}
  - {name: e, namespace: z, labels: {app: db}, cgroup: /lab/z-e, ips: [198.18.0.13]}
"#,
    );
    let from = |app: &str| {
        format!(
            "  podSelector: {{}}\n  ingress:\n    - from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: {app}}}}}}}]"
        )
    };
    let text = np("y", "db-from-api", &from("api"))
        + &np("z", "db-from-web", &from("web"))
        + &np(
            "x",
            "web-isolated",
            "  podSelector: {}\n  policyTypes: [Ingress]",
        );
    let policies = policies(&text);
    let mut after = before.clone();
    Arc::make_mut(&mut after.workloads[0])
        .labels_mut()
        .insert("app".into(), "api".into());

    let mut both = Agreeing::new();
    both.compile(&before, &policies);
    let compiled = both.compile(&after, &policies);
    // d (its rule names the new class) is worked out; a changed itself, so
    // it is looked at (and replayed by fingerprint); b and e are not.
    assert_eq!(
        both.incremental.reuse(),
        Reuse {
            replayed: 3,
            unexamined: 2,
            computed: 1,
        }
    );
    let d = endpoint(&compiled, "d");
    let a = identity(&compiled, "198.18.0.10");
    assert!(
        compiled
            .rules
            .keys()
            .any(|slot| slot.endpoint_id == d && slot.peer_identity == a),
        "d's rule names a's new class"
    );
}

/// A policy that selects no endpoint here never has its peer lists looked
/// up; a new class it cannot name must still leave its namespace's other
/// endpoints unexamined, and one it names must reach them.
#[test]
fn lists_never_looked_up_are_judged_by_the_classes_that_came() {
    let before = inventory(
        r#"
workloads:
  - {name: a, namespace: x, labels: {app: web}, cgroup: /lab/x-a, ips: [198.18.0.10]}
  - {name: d, namespace: y, labels: {app: db}, ips: [198.18.0.12]}
"#,
    );
    let from = |app: &str, peer: &str| {
        format!(
            "  podSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n    - from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: {peer}}}}}}}]"
        )
    };
    // web-from-db selects a; nobody-from-cache selects no pod here, so its
    // peer list is never looked up.
    let text = np("x", "web-from-db", &from("web", "db"))
        + &np("x", "nobody-from-cache", &from("nobody", "cache"));
    let policies = policies(&text);
    let with = |(namespace, name): (&str, &str), app: &str, ip: &str| {
        let mut inventory = before.clone();
        inventory.workloads.push(Arc::new(Workload {
            name: name.into(),
            namespace: namespace.into(),
            labels: Arc::new(Labels::from([("app".to_string(), app.to_string())])),
            ips: vec![ip.parse().unwrap()],
            ..before.workloads[1].as_ref().clone()
        }));
        inventory
    };
    let mut both = Agreeing::new();
    let steps = [
        (before.clone(), 0),
        // A new class (y, api) no list names: a is not looked at.
        (with(("y", "e"), "api", "198.18.0.13"), 1),
        // A new cache class: the list never looked up names it, so x's
        // endpoints are looked at again.
        (with(("z", "f"), "cache", "198.18.0.14"), 0),
    ];
    for (inventory, unexamined) in steps {
        both.compile(&inventory, &policies);
        assert_eq!(
            both.incremental.reuse().unexamined,
            unexamined,
            "{inventory:?}"
        );
    }
}

/// The last pod of a class going takes the entries naming its identity
/// with it, though no policy and no endpoint changed.
#[test]
fn a_class_that_goes_takes_the_entries_naming_it() {
    let before = inventory(
        r#"
workloads:
  - {name: a, namespace: x, labels: {app: web}, cgroup: /lab/x-a, ips: [198.18.0.10]}
  - {name: d, namespace: y, labels: {app: db}, ips: [198.18.0.12]}
  - {name: e, namespace: y, labels: {app: web}, ips: [198.18.0.13]}
"#,
    );
    let text = np(
        "x",
        "web-from-db",
        "  podSelector: {}\n  ingress:\n    - from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}]",
    );
    let mut after = before.clone();
    after.workloads.remove(1);
    let compiled = Agreeing::across(&before, &after, &text);
    let a = endpoint(&compiled, "a");
    assert_eq!(
        compiled
            .rules
            .keys()
            .filter(|slot| slot.endpoint_id == a && slot.peer_identity != IDENTITY_ANY)
            .count(),
        0,
        "no entry may name the gone db class"
    );
}

/// A named egress port resolves against every pod class: a new class whose
/// pods name the port gets its entry though no rule's peers name it.
#[test]
fn a_new_class_reaches_rules_with_named_egress_ports() {
    let before = inventory(
        r#"
workloads:
  - {name: a, namespace: x, labels: {app: web}, cgroup: /lab/x-a, ips: [198.18.0.10]}
  - {name: r, namespace: y, labels: {app: db}, ips: [198.18.0.12], ports: [{name: http, containerPort: 80}]}
"#,
    );
    let text = np(
        "x",
        "web-egress-http",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n    - ports: [{port: http}]",
    );
    let mut after = before.clone();
    after.workloads.push(Arc::new(Workload {
        name: "s".into(),
        labels: Arc::new(Labels::from([("app".to_string(), "api".to_string())])),
        ips: vec!["198.18.0.14".parse().unwrap()],
        ports: vec![ContainerPort {
            name: "http".into(),
            container_port: 8080,
            protocol: Protocol::Tcp,
        }],
        ..after.workloads[1].as_ref().clone()
    }));
    let compiled = Agreeing::across(&before, &after, &text);
    let s = identity(&compiled, "198.18.0.14");
    assert!(
        compiled
            .rules
            .keys()
            .any(|slot| slot.peer_identity == s && slot.port == 8080),
        "egress to the new class's http port (8080) must be allowed"
    );
}

/// A namespace label only a ClusterL4Policy's subject looks at makes no
/// peer class, so the classes stay the same when it changes; the endpoints
/// of that namespace must still be worked out again (and only they).
#[test]
fn a_namespace_label_that_only_selects_subjects_reaches_its_endpoints() {
    let text = "apiVersion: portcullis.dev/v1alpha1\nkind: ClusterL4Policy\nmetadata: {name: guarded}\nspec:\n  tier: Admin\n  priority: 1\n  subject: {namespaceSelector: {matchLabels: {guard: on}}}\n  ingress: [{action: Deny, ports: [{port: 22}]}]\n";
    let policies = policies(text);
    let mut guarded = lab();
    guarded.namespaces = vec![
        Namespace {
            name: "x".into(),
            labels: [("guard".to_string(), "on".to_string())].into(),
        },
        Namespace {
            name: "y".into(),
            labels: Labels::new(),
        },
    ];
    let mut unguarded = guarded.clone();
    unguarded.namespaces[0].labels.clear();

    let mut incremental = Compiler::new();
    let mut full = Compiler::without_memo();
    for inventory in [&guarded, &unguarded, &guarded] {
        let got = incremental.compile(inventory, &policies).unwrap();
        assert_eq!(got, full.compile(inventory, &policies).unwrap());
        assert_eq!(incremental.reuse().unexamined, 0, "x's endpoints looked at");
    }
    let denied = |c: &Compiled| !c.rules.is_empty();
    assert!(denied(&incremental.compile(&guarded, &policies).unwrap()));
    assert_eq!(
        incremental.reuse().unexamined,
        3,
        "nothing changed: a, b and c ingress replayed unexamined"
    );
    assert!(!denied(
        &incremental.compile(&unguarded, &policies).unwrap()
    ));
}
