//! The compiler's key property: for random inventories and policies, the
//! kernel's lookup procedure over the compiled maps reaches the same verdict,
//! with the same attribution, as the evaluator reading the policies directly.
//!
//! Addresses, CIDRs, ports and labels come from small pools that overlap on
//! purpose (pods inside and outside CIDRs and excepts, node addresses inside
//! CIDRs, ports at range edges, IPv6 blocks covering the IPv4-mapped range),
//! so the corner cases are hit often.

use std::{collections::BTreeMap, net::IpAddr, path::Path, sync::Arc};

use proptest::{collection::vec, option, prelude::*, sample::select};

use crate::policy::{
    compile::{Compiled, Compiler},
    evaluate::{evaluate, FlowQuery},
    model::{
        ClusterL4Policy, ClusterL4PolicyEgressRule, ClusterL4PolicyIngressRule,
        ClusterL4PolicySpec, ClusterL4PolicySubject, ContainerPort, IntOrString, Inventory,
        IpBlock, L4Policy, L4PolicySpec, LabelSelector, LabelSelectorRequirement, Namespace,
        NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
        NetworkPolicyPort, NetworkPolicySpec, ObjectMeta, PolicyObject, Protocol, Workload,
    },
    parse::{parse_inventory, parse_policies},
    test_support::{chain, kernel_decide},
};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const V4_POOL: [&str; 8] = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.3",
    "10.0.0.5",
    "10.0.1.1",
    "10.0.1.2",
    "10.1.0.1",
    "192.168.0.1",
];
const V6_POOL: [&str; 6] = [
    "fd00::1",
    "fd00::2",
    "fd00::5",
    "fd00::1:1",
    "fd01::1",
    "2001:db8::7",
];
const NODE_V4: &str = "10.0.0.254";
const NODE_V6: &str = "fd00::fe";
/// Addresses that are never workloads or nodes.
const OUTSIDERS: [&str; 10] = [
    "10.0.0.7",
    "10.0.2.9",
    "203.0.113.1",
    "127.0.0.1",
    "::ffff:10.0.0.1",
    "fd00::3",
    "fd00::ff",
    "2001:db8::1",
    "::1",
    "fe80::1",
];
const CIDRS: [&str; 20] = [
    "0.0.0.0/0",
    "10.0.0.0/8",
    "10.0.0.0/16",
    "10.0.0.0/24",
    "10.0.1.0/24",
    "10.0.0.0/29",
    "10.0.0.0/30",
    "10.0.0.0/31",
    "10.0.0.2/31",
    "10.0.0.3/32",
    "10.0.0.254/32",
    "10.1.0.0/16",
    "::/0",
    "fd00::/8",
    "fd00::/112",
    "fd00::/126",
    "fd00::4/126",
    "fd00::1/128",
    "fd00::fe/128",
    "2001:db8::/32",
];
const RULE_PORTS: [u16; 8] = [1, 53, 79, 80, 81, 443, 8080, 65535];
const QUERY_PORTS: [u16; 14] = [0, 1, 2, 52, 53, 54, 79, 80, 81, 82, 443, 8080, 8081, 65535];
const PORT_NAMES: [&str; 3] = ["http", "dns", "metrics"];

/// Label keys with their possible values.
const POD_LABELS: [(&str, [&str; 2]); 2] = [("app", ["web", "db"]), ("tier", ["front", "back"])];
const NAMESPACE_LABELS: [(&str, [&str; 2]); 2] = [("team", ["a", "b"]), ("env", ["a", "b"])];

fn labels(
    keys: &'static [(&'static str, [&'static str; 2])],
) -> impl Strategy<Value = BTreeMap<String, String>> {
    vec(option::of(0..2usize), keys.len()).prop_map(move |choice| {
        keys.iter()
            .zip(choice)
            .filter_map(|((k, values), c)| c.map(|i| (k.to_string(), values[i].to_string())))
            .collect()
    })
}

fn inventory() -> impl Strategy<Value = Inventory> {
    let workload = (
        0..NAMESPACES.len(),
        labels(&POD_LABELS),
        prop::bool::weighted(0.7),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.4),
        vec(
            (0..PORT_NAMES.len(), select(&RULE_PORTS[..]), any::<bool>()),
            0..3,
        ),
    );
    (
        vec(workload, 1..=6),
        vec(labels(&NAMESPACE_LABELS), NAMESPACES.len()),
        (any::<bool>(), any::<bool>()),
        Just(V4_POOL.to_vec()).prop_shuffle(),
        Just(V6_POOL.to_vec()).prop_shuffle(),
    )
        .prop_map(|(seeds, ns_labels, (node4, node6), v4, v6)| {
            let workloads = seeds
                .into_iter()
                .enumerate()
                .map(|(i, (ns, labels, local, has_v4, has_v6, ports))| {
                    let mut ips: Vec<IpAddr> = Vec::new();
                    if has_v4 {
                        ips.push(v4[i].parse().unwrap());
                    }
                    if has_v6 {
                        ips.push(v6[i].parse().unwrap());
                    }
                    let mut named: BTreeMap<&str, ContainerPort> = BTreeMap::new();
                    for (name, port, udp) in ports {
                        named.entry(PORT_NAMES[name]).or_insert(ContainerPort {
                            name: PORT_NAMES[name].to_string(),
                            container_port: port,
                            protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
                        });
                    }
                    Arc::new(Workload {
                        name: format!("w{i}"),
                        namespace: NAMESPACES[ns].to_string(),
                        labels: Arc::new(labels),
                        cgroup: local.then(|| format!("/lab/w{i}").into()),
                        ips,
                        ports: named.into_values().collect(),
                        service_account: None,
                    })
                })
                .collect();
            let mut node_ips = Vec::new();
            if node4 {
                node_ips.push(NODE_V4.parse().unwrap());
            }
            if node6 {
                node_ips.push(NODE_V6.parse().unwrap());
            }
            Inventory {
                node_ips,
                namespaces: NAMESPACES
                    .iter()
                    .zip(ns_labels)
                    .map(|(n, labels)| Namespace {
                        name: n.to_string(),
                        labels,
                    })
                    .collect(),
                workloads,
                services: Vec::new(),
            }
        })
}

fn expression() -> impl Strategy<Value = LabelSelectorRequirement> {
    let keys: Vec<(&str, [&str; 2])> = POD_LABELS
        .iter()
        .chain(&NAMESPACE_LABELS)
        .copied()
        .chain([("kubernetes.io/metadata.name", ["x", "y"])])
        .collect();
    (
        select(keys),
        0..4usize,
        prop::sample::subsequence(vec![0usize, 1], 1..=2),
    )
        .prop_map(|((key, values), op, chosen)| {
            let (operator, values) = match op {
                0 => (
                    "In",
                    Some(chosen.iter().map(|i| values[*i].to_string()).collect()),
                ),
                1 => (
                    "NotIn",
                    Some(chosen.iter().map(|i| values[*i].to_string()).collect()),
                ),
                2 => ("Exists", None),
                _ => ("DoesNotExist", None),
            };
            LabelSelectorRequirement {
                key: key.to_string(),
                operator: operator.to_string(),
                values,
            }
        })
}

fn selector(
    keys: &'static [(&'static str, [&'static str; 2])],
) -> impl Strategy<Value = LabelSelector> {
    prop_oneof![
        2 => Just(LabelSelector::default()),
        3 => (labels(keys), vec(expression(), 0..2)).prop_map(|(match_labels, exprs)| LabelSelector {
            match_labels: Some(match_labels),
            match_expressions: Some(exprs),
        }),
    ]
}

fn peer() -> impl Strategy<Value = NetworkPolicyPeer> {
    prop_oneof![
        3 => selector(&POD_LABELS).prop_map(|s| NetworkPolicyPeer { pod_selector: Some(s), ..Default::default() }),
        2 => selector(&NAMESPACE_LABELS).prop_map(|s| NetworkPolicyPeer { namespace_selector: Some(s), ..Default::default() }),
        2 => (selector(&NAMESPACE_LABELS), selector(&POD_LABELS)).prop_map(|(n, p)| NetworkPolicyPeer {
            namespace_selector: Some(n),
            pod_selector: Some(p),
            ..Default::default()
        }),
        4 => (select(&CIDRS[..]), vec(select(&CIDRS[..]), 0..3)).prop_map(|(cidr, excepts)| {
            let net: ipnet::IpNet = cidr.parse().unwrap();
            let except: Vec<String> = excepts
                .into_iter()
                .filter(|e| {
                    let e: ipnet::IpNet = e.parse().unwrap();
                    net.contains(&e) && e.prefix_len() > net.prefix_len()
                })
                .map(str::to_string)
                .collect();
            NetworkPolicyPeer {
                ip_block: Some(IpBlock { cidr: cidr.to_string(), except: Some(except) }),
                ..Default::default()
            }
        }),
    ]
}

fn port() -> impl Strategy<Value = NetworkPolicyPort> {
    let protocol = prop_oneof![Just(None), Just(Some("TCP")), Just(Some("UDP"))];
    let spec = prop_oneof![
        1 => Just((None, None)),
        3 => select(&RULE_PORTS[..]).prop_map(|p| (Some(IntOrString::Int(p.into())), None)),
        3 => (select(&RULE_PORTS[..]), select(&RULE_PORTS[..]))
            .prop_map(|(a, b)| (Some(IntOrString::Int(a.min(b).into())), Some(i64::from(a.max(b))))),
        3 => select(&["http", "dns", "metrics", "nope"][..]).prop_map(|n| (Some(IntOrString::String(n.to_string())), None)),
    ];
    (protocol, spec).prop_map(|(protocol, (port, end_port))| NetworkPolicyPort {
        protocol: protocol.map(str::to_string),
        port,
        end_port,
    })
}

/// A rule's `from`/`to` and `ports`.
type RuleParts = (
    Option<Vec<NetworkPolicyPeer>>,
    Option<Vec<NetworkPolicyPort>>,
);

/// `from`/`to` and `ports`: absent, empty or a short list.
fn rule_parts() -> impl Strategy<Value = RuleParts> {
    (
        option::weighted(0.75, vec(peer(), 0..3)),
        option::weighted(0.6, vec(port(), 0..3)),
    )
}

fn network_policy() -> impl Strategy<Value = NetworkPolicy> {
    let types = option::weighted(
        0.5,
        prop::sample::subsequence(vec!["Ingress", "Egress"], 0..=2),
    );
    (
        0..NAMESPACES.len(),
        selector(&POD_LABELS),
        types,
        option::weighted(0.8, vec(rule_parts(), 0..4)),
        option::weighted(0.6, vec(rule_parts(), 0..4)),
    )
        .prop_map(|(ns, pod_selector, types, ingress, egress)| NetworkPolicy {
            api_version: "networking.k8s.io/v1".into(),
            kind: "NetworkPolicy".into(),
            metadata: ObjectMeta {
                namespace: Some(NAMESPACES[ns].to_string()),
                ..Default::default()
            },
            spec: NetworkPolicySpec {
                pod_selector,
                policy_types: types.map(|t| t.into_iter().map(str::to_string).collect()),
                ingress: ingress.map(|rules| {
                    rules
                        .into_iter()
                        .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
                        .collect()
                }),
                egress: egress.map(|rules| {
                    rules
                        .into_iter()
                        .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
                        .collect()
                }),
            },
        })
}

fn ingress_rules(rules: Option<Vec<RuleParts>>) -> Option<Vec<NetworkPolicyIngressRule>> {
    rules.map(|rules| {
        rules
            .into_iter()
            .map(|(from, ports)| NetworkPolicyIngressRule { from, ports })
            .collect()
    })
}

fn egress_rules(rules: Option<Vec<RuleParts>>) -> Option<Vec<NetworkPolicyEgressRule>> {
    rules.map(|rules| {
        rules
            .into_iter()
            .map(|(to, ports)| NetworkPolicyEgressRule { to, ports })
            .collect()
    })
}

/// L4Policies: allows, denies, either mode, with and without policyTypes.
fn l4_policy() -> impl Strategy<Value = L4Policy> {
    let types = option::weighted(
        0.3,
        prop::sample::subsequence(vec!["Ingress", "Egress"], 0..=2),
    );
    (
        0..NAMESPACES.len(),
        selector(&POD_LABELS),
        prop_oneof![Just(None), Just(Some("Enforce")), Just(Some("Audit"))],
        types,
        (
            option::weighted(0.5, vec(rule_parts(), 0..3)),
            option::weighted(0.5, vec(rule_parts(), 0..3)),
            option::weighted(0.6, vec(rule_parts(), 0..3)),
            option::weighted(0.6, vec(rule_parts(), 0..3)),
        ),
    )
        .prop_map(
            |(ns, pod_selector, mode, types, (ingress, egress, ingress_deny, egress_deny))| {
                L4Policy {
                    api_version: "portcullis.dev/v1alpha1".into(),
                    kind: "L4Policy".into(),
                    metadata: ObjectMeta {
                        namespace: Some(NAMESPACES[ns].to_string()),
                        ..Default::default()
                    },
                    spec: L4PolicySpec {
                        pod_selector: Some(pod_selector),
                        mode: mode.map(str::to_string),
                        policy_types: types.map(|t| t.into_iter().map(str::to_string).collect()),
                        ingress: ingress_rules(ingress),
                        egress: egress_rules(egress),
                        ingress_deny: ingress_rules(ingress_deny),
                        egress_deny: egress_rules(egress_deny),
                    },
                }
            },
        )
}

/// ClusterL4Policies: both tiers, every action, priorities that often tie.
fn cluster_policy() -> impl Strategy<Value = ClusterL4Policy> {
    let tiered_rules = |admin: bool| {
        let actions: &'static [&'static str] = if admin {
            &["Allow", "Deny", "Pass"]
        } else {
            &["Allow", "Deny"]
        };
        vec((select(actions), rule_parts()), 0..3)
    };
    (any::<bool>(), select(&[0i64, 5, 5, 1000][..]))
        .prop_flat_map(move |(admin, priority)| {
            (
                Just((admin, priority)),
                option::weighted(
                    0.7,
                    (
                        option::of(selector(&NAMESPACE_LABELS)),
                        option::of(selector(&POD_LABELS)),
                    ),
                ),
                option::weighted(0.8, tiered_rules(admin)),
                option::weighted(0.8, tiered_rules(admin)),
            )
        })
        .prop_map(
            |((admin, priority), subject, ingress, egress)| ClusterL4Policy {
                api_version: "portcullis.dev/v1alpha1".into(),
                kind: "ClusterL4Policy".into(),
                metadata: ObjectMeta::default(),
                spec: ClusterL4PolicySpec {
                    tier: Some(if admin { "Admin" } else { "Baseline" }.to_string()),
                    priority: Some(priority),
                    subject: subject.map(|(namespace_selector, pod_selector)| {
                        ClusterL4PolicySubject {
                            namespace_selector,
                            pod_selector,
                        }
                    }),
                    ingress: ingress.map(|rules| {
                        rules
                            .into_iter()
                            .map(|(action, (from, ports))| ClusterL4PolicyIngressRule {
                                action: Some(action.to_string()),
                                from,
                                ports,
                            })
                            .collect()
                    }),
                    egress: egress.map(|rules| {
                        rules
                            .into_iter()
                            .map(|(action, (to, ports))| ClusterL4PolicyEgressRule {
                                action: Some(action.to_string()),
                                to,
                                ports,
                            })
                            .collect()
                    }),
                },
            },
        )
}

/// Policies of every kind as one multi-document YAML file, named p0, p1,
/// ... (NetworkPolicies and L4Policies share names on purpose).
fn policy_file() -> impl Strategy<Value = String> {
    (
        vec(network_policy(), 0..4),
        vec(l4_policy(), 0..3),
        vec(cluster_policy(), 0..4),
    )
        .prop_map(|(network, l4, cluster)| {
            let document = |yaml: String| format!("---\n{yaml}");
            let network = network.into_iter().enumerate().map(|(i, mut p)| {
                p.metadata.name = Some(format!("p{i}"));
                document(serde_saphyr::to_string(&p).unwrap())
            });
            let l4 = l4.into_iter().enumerate().map(|(i, mut p)| {
                p.metadata.name = Some(format!("p{i}"));
                document(serde_saphyr::to_string(&p).unwrap())
            });
            let cluster = cluster.into_iter().enumerate().map(|(i, mut p)| {
                p.metadata.name = Some(format!("c{i}"));
                document(serde_saphyr::to_string(&p).unwrap())
            });
            network.chain(l4).chain(cluster).collect()
        })
}

/// Every address worth asking about: workloads, node, outsiders.
fn addresses(inventory: &Inventory) -> Vec<IpAddr> {
    V4_POOL
        .iter()
        .chain(&V6_POOL)
        .chain(&[NODE_V4, NODE_V6])
        .chain(&OUTSIDERS)
        .map(|a| a.parse().unwrap())
        .chain(
            inventory
                .workloads
                .iter()
                .flat_map(|w| w.ips.iter().copied()),
        )
        .collect::<std::collections::BTreeSet<IpAddr>>()
        .into_iter()
        .collect()
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical().is_ipv4() == b.to_canonical().is_ipv4()
}

/// Checks every flow between same-family addresses with a local end, on
/// every interesting port, and the shape of the compiled maps.
fn check_agreement(
    inventory: &Inventory,
    policies: &[PolicyObject],
    compiled: &Compiled,
    context: &str,
) -> Result<(), TestCaseError> {
    check_shape(compiled)?;
    let addresses = addresses(inventory);
    let local = |a: IpAddr| {
        let a = a.to_canonical();
        inventory
            .workloads
            .iter()
            .any(|w| w.is_local() && w.ips.contains(&a))
    };
    for &src in &addresses {
        let others = addresses
            .iter()
            .filter(|d| same_family(src, **d) && (local(src) || local(**d)));
        for &dst in others {
            for port in QUERY_PORTS {
                for protocol in Protocol::JUDGED {
                    let query = FlowQuery {
                        src,
                        dst,
                        port,
                        protocol,
                    };
                    let expected = evaluate(inventory, policies, &query);
                    let kernel = kernel_decide(compiled, &query);
                    prop_assert_eq!(&kernel, &expected, "{:?}\n{}", query, context);
                }
            }
        }
    }
    Ok(())
}

/// Structural promises: aligned, disjoint port blocks; reserved ids kept
/// out of allocation; every cookie attributed and every attribution used.
fn check_shape(compiled: &Compiled) -> Result<(), TestCaseError> {
    use portcullis_common::{
        IDENTITY_ANY, IDENTITY_FIRST_ALLOCATED, IDENTITY_HOST, IDENTITY_WORLD,
    };
    for id in compiled.identities.values() {
        prop_assert!(
            *id == IDENTITY_HOST
                || *id == IDENTITY_WORLD
                || (*id >= IDENTITY_FIRST_ALLOCATED && *id != IDENTITY_ANY)
        );
    }
    let mut used_cookies = std::collections::BTreeSet::new();
    // (endpoint, peer, direction, protocol) → [start, end) of each block
    // below the port-0/0 default.
    type Partition = (u32, u32, u8, u8);
    let mut blocks: BTreeMap<Partition, Vec<(u32, u32)>> = BTreeMap::new();
    for (key, value) in compiled.rules.iter() {
        prop_assert!(key.port_prefix_len <= 16);
        let size = 1u32 << (16 - u32::from(key.port_prefix_len));
        prop_assert_eq!(u32::from(key.port) % size, 0, "unaligned block {:?}", key);
        if value.rule_cookie == 0 {
            prop_assert_eq!(
                value.reason,
                portcullis_common::REASON_NOT_ISOLATED,
                "cookie 0 {:?}",
                value
            );
        } else {
            prop_assert!(
                compiled.cookies.contains_key(&value.rule_cookie),
                "unattributed {:?}",
                value
            );
            used_cookies.insert(value.rule_cookie);
        }
        if key.port_prefix_len > 0 {
            blocks
                .entry((
                    key.endpoint_id,
                    key.peer_identity,
                    key.direction,
                    key.protocol,
                ))
                .or_default()
                .push((u32::from(key.port), u32::from(key.port) + size));
        }
    }
    prop_assert_eq!(
        used_cookies.len(),
        compiled.cookies.len(),
        "attributions without entries"
    );
    for ranges in blocks.values_mut() {
        ranges.sort();
        for pair in ranges.windows(2) {
            prop_assert!(pair[0].1 <= pair[1].0, "overlapping blocks {:?}", pair);
        }
    }
    Ok(())
}

fn parse_case(
    inventory: &Inventory,
    policy_text: &str,
) -> Result<(Inventory, Vec<PolicyObject>), TestCaseError> {
    // Through the text formats, so parsing accepts all it should.
    let inventory_text = serde_saphyr::to_string(inventory).unwrap();
    let inventory = parse_inventory(Path::new("workloads.yaml"), &inventory_text)
        .map_err(|e| TestCaseError::fail(format!("{}\n{inventory_text}", chain(&e))))?;
    let policies = parse_policies(Path::new("policies.yaml"), policy_text)
        .map_err(|e| TestCaseError::fail(format!("{}\n{policy_text}", chain(&e))))?;
    Ok((inventory, policies))
}

proptest! {
    // 256 cases by default; PROPTEST_CASES=10000 for a longer hunt.
    #[test]
    fn compiled_maps_decide_like_the_policies(
        first_inventory in inventory(),
        first_policies in policy_file(),
        second_inventory in inventory(),
        second_policies in policy_file(),
    ) {
        // One compiler for two different states, as the agent uses it: ids
        // carried over from the first compile must not confuse the second.
        let mut compiler = Compiler::new();
        for (inventory, text) in [(&first_inventory, &first_policies), (&second_inventory, &second_policies)] {
            let (inventory, policies) = parse_case(inventory, text)?;
            let compiled = compiler
                .compile(&inventory, &policies)
                .map_err(|e| TestCaseError::fail(chain(&e)))?;
            let context = format!("--- workloads\n{}\n--- policies\n{text}", serde_saphyr::to_string(&inventory).unwrap());
            check_agreement(&inventory, &policies, &compiled, &context)?;
            prop_assert_eq!(&compiler.compile(&inventory, &policies).unwrap(), &compiled, "recompiling changed the output");
        }
    }
}

/// One step of a change sequence: which policies are in force (each name
/// from the first set, the second, or neither) and a change to the pods.
#[derive(Debug, Clone)]
struct Step {
    /// Per policy name: 0 absent, 1 the first set's version, 2 the
    /// second's (the same name in both is a policy changed in place).
    versions: Vec<u8>,
    change: PodChange,
}

#[derive(Debug, Clone)]
enum PodChange {
    None,
    /// Flip the `app` label of a workload (by index modulo their number).
    Relabel(usize),
    /// Flip a namespace's `team` label.
    RelabelNamespace(usize),
    /// Take a namespace out of the inventory's list (its pods stay), or
    /// put it back.
    Unlist(usize),
    /// Drop a workload, or bring back the last dropped.
    Remove(usize),
    Restore,
    /// Give a workload another named port, or take its ports away.
    Ports(usize),
    /// Two workloads trade addresses: each address changes hands within
    /// one compile.
    SwapAddresses(usize),
}

fn step() -> impl Strategy<Value = Step> {
    (
        vec(0..3u8, 12),
        prop_oneof![
            Just(PodChange::None),
            (0..6usize).prop_map(PodChange::Relabel),
            (0..NAMESPACES.len()).prop_map(PodChange::RelabelNamespace),
            (0..NAMESPACES.len()).prop_map(PodChange::Unlist),
            (0..6usize).prop_map(PodChange::Remove),
            Just(PodChange::Restore),
            (0..6usize).prop_map(PodChange::Ports),
            (0..6usize).prop_map(PodChange::SwapAddresses),
        ],
    )
        .prop_map(|(versions, change)| Step { versions, change })
}

fn flip(labels: &mut BTreeMap<String, String>, key: &str, values: [&str; 2]) {
    let next = match labels.get(key).map(String::as_str) {
        Some(v) if v == values[0] => Some(values[1]),
        Some(_) => None,
        None => Some(values[0]),
    };
    match next {
        Some(v) => labels.insert(key.to_string(), v.to_string()),
        None => labels.remove(key),
    };
}

impl PodChange {
    fn apply(
        &self,
        inventory: &mut Inventory,
        dropped: &mut Vec<Arc<Workload>>,
        unlisted: &mut Vec<Namespace>,
    ) {
        let n = inventory.workloads.len();
        match *self {
            Self::None => {}
            Self::Relabel(i) if n > 0 => {
                flip(
                    Arc::make_mut(&mut inventory.workloads[i % n]).labels_mut(),
                    "app",
                    ["web", "db"],
                );
            }
            Self::RelabelNamespace(i) => {
                if let Some(ns) = inventory
                    .namespaces
                    .iter_mut()
                    .find(|n| n.name == NAMESPACES[i])
                {
                    flip(&mut ns.labels, "team", ["a", "b"]);
                }
            }
            Self::Unlist(i) => match inventory
                .namespaces
                .iter()
                .position(|n| n.name == NAMESPACES[i])
            {
                Some(at) => unlisted.push(inventory.namespaces.remove(at)),
                None => inventory.namespaces.push(
                    unlisted
                        .iter()
                        .position(|n| n.name == NAMESPACES[i])
                        .map(|at| unlisted.remove(at))
                        .unwrap_or(Namespace {
                            name: NAMESPACES[i].to_string(),
                            labels: Default::default(),
                        }),
                ),
            },
            Self::Remove(i) if n > 1 => dropped.push(inventory.workloads.remove(i % n)),
            Self::Restore => inventory.workloads.extend(dropped.pop()),
            Self::Ports(i) if n > 0 => {
                let ports = &mut Arc::make_mut(&mut inventory.workloads[i % n]).ports;
                if ports.is_empty() {
                    ports.push(ContainerPort {
                        name: PORT_NAMES[i % PORT_NAMES.len()].to_string(),
                        container_port: RULE_PORTS[i % RULE_PORTS.len()],
                        protocol: Protocol::Tcp,
                    });
                } else {
                    ports.clear();
                }
            }
            Self::SwapAddresses(i) if n > 1 => {
                let (a, b) = (i % n, (i + 1) % n);
                let ips_of_a = inventory.workloads[a].ips.clone();
                let ips_of_b = std::mem::replace(
                    &mut Arc::make_mut(&mut inventory.workloads[b]).ips,
                    ips_of_a,
                );
                Arc::make_mut(&mut inventory.workloads[a]).ips = ips_of_b;
            }
            _ => {}
        }
    }
}

proptest! {
    // The incremental compile's property (issue #13): after every step of
    // a random sequence of pod, namespace and policy changes, the compiler
    // that replays its previous output produces exactly the maps of one
    // that works everything out, given the same history (so the same ids).
    #[test]
    fn incremental_compile_equals_full_compile(
        inventory in inventory(),
        first in policy_file(),
        second in policy_file(),
        steps in vec(step(), 1..10),
    ) {
        let (mut inventory, first) = parse_case(&inventory, &first)?;
        let (_, second) = parse_case(&inventory, &second)?;
        let mut names: Vec<_> = first.iter().chain(&second).map(|p| p.reference.clone()).collect();
        names.sort();
        names.dedup();
        let version = |set: &[PolicyObject], name| set.iter().find(|p| &p.reference == name).cloned();

        let mut incremental = Compiler::new();
        let mut full = Compiler::without_memo();
        let mut dropped = Vec::new();
        let mut unlisted = Vec::new();
        for step in &steps {
            step.change.apply(&mut inventory, &mut dropped, &mut unlisted);
            let policies: Vec<PolicyObject> = names
                .iter()
                .zip(step.versions.iter().cycle())
                .filter_map(|(name, v)| match v {
                    1 => version(&first, name).or_else(|| version(&second, name)),
                    2 => version(&second, name).or_else(|| version(&first, name)),
                    _ => None,
                })
                .collect();
            let context = format!("{step:?}\n--- workloads\n{}", serde_saphyr::to_string(&inventory).unwrap());
            let expected = full.compile(&inventory, &policies).map_err(|e| TestCaseError::fail(chain(&e)))?;
            let got = incremental.compile(&inventory, &policies).map_err(|e| TestCaseError::fail(chain(&e)))?;
            prop_assert_eq!(&got, &expected, "incremental differs from full\n{}", context);
            // Both share the class derivation: the evaluator is the oracle
            // for that (a namespace taken out of the list, for one).
            check_agreement(&inventory, &policies, &got, &context)?;
        }
    }
}
