//! The lab's model of namespaces and pods, and the addresses it assigns.
//!
//! Same YAML shape as the standalone workloads file, minus `cgroup` and `ips`
//! (the lab assigns those), plus an optional `node`. Addresses come from the
//! benchmarking range 198.18.0.0/15 and a ULA prefix, deterministic in the
//! pod's position: one node has all of 198.18.0.0/15; two nodes split it,
//! 198.18.0.0/16 for node 1 and 198.19.0.0/16 for node 2 (see [`NodeNet`]).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
    #[error("{file}: invalid YAML")]
    Yaml {
        file: String,
        #[source]
        source: crate::policy::parse::YamlError,
    },
    #[error("--nodes {nodes}: the lab has 1 or 2 nodes")]
    Nodes { nodes: usize },
    #[error("pod {pod} asks for node {node}, but the lab has {nodes} node(s)")]
    NoSuchNode { pod: String, node: u8, nodes: usize },
    #[error("at most {room} pods fit the address range of a {nodes}-node lab")]
    Full { nodes: usize, room: usize },
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Topology {
    #[serde(default)]
    pub namespaces: Vec<LabNamespace>,
    pub workloads: Vec<LabWorkload>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabNamespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabWorkload {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<LabPort>,
    /// Its ServiceAccount, the workload identity (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The node (1 or 2) of a two-node lab it runs on; round-robin by
    /// position when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u8>,
}

impl Topology {
    /// Puts every namespace of the lab in the mesh with `mode` (the
    /// namespace label; pods' own labels still win).
    pub fn mesh_all(&mut self, mode: crate::mesh::mode::MeshMode) {
        let mut names: Vec<String> = self.workloads.iter().map(|w| w.namespace.clone()).collect();
        names.sort();
        names.dedup();
        for name in names {
            if !self.namespaces.iter().any(|n| n.name == name) {
                self.namespaces.push(LabNamespace {
                    name,
                    labels: BTreeMap::new(),
                });
            }
        }
        for ns in &mut self.namespaces {
            ns.labels
                .insert(crate::mesh::mode::MODE_LABEL.into(), mode.as_str().into());
        }
    }
}

impl LabWorkload {
    pub fn service_account(&self) -> &str {
        self.service_account
            .as_deref()
            .unwrap_or(crate::identity::spiffe::DEFAULT_SERVICE_ACCOUNT)
    }
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "TCP".into()
}

pub const NODE_IPV4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7063, 0x6c00, 0, 0, 0, 0, 1);
pub const IPV4_PREFIX_LEN: u8 = 15;
pub const IPV6_PREFIX_LEN: u8 = 64;
const FIRST_POD_IPV4: u32 = u32::from_be_bytes([198, 18, 1, 10]);
/// A pod's host part, from its node's subnet: x.x.1.10 for the first.
const FIRST_POD_HOST: u32 = FIRST_POD_IPV4 - u32::from_be_bytes([198, 18, 0, 0]);
/// 198.18.0.0/15 ends at 198.19.255.255.
const LAST_POD_IPV4: u32 = u32::from_be_bytes([198, 19, 255, 254]);

/// The lab's standard topology: namespaces x, y, z with pods a, b, c, each
/// serving TCP and UDP on 80 and 81.
pub fn default_topology() -> Topology {
    let namespaces = ["x", "y", "z"];
    let pods = ["a", "b", "c"];
    let ports = [(80, "TCP"), (81, "TCP"), (80, "UDP"), (81, "UDP")]
        .into_iter()
        .map(|(p, proto)| LabPort {
            name: Some(format!("serve-{p}-{}", proto.to_lowercase())),
            container_port: p,
            protocol: proto.into(),
        })
        .collect::<Vec<_>>();
    Topology {
        namespaces: namespaces
            .iter()
            .map(|n| LabNamespace {
                name: n.to_string(),
                labels: BTreeMap::from([("ns".to_string(), n.to_string())]),
            })
            .collect(),
        workloads: namespaces
            .iter()
            .flat_map(|n| {
                let ports = ports.clone();
                pods.iter().map(move |p| LabWorkload {
                    name: p.to_string(),
                    namespace: n.to_string(),
                    labels: BTreeMap::from([("pod".to_string(), p.to_string())]),
                    ports: ports.clone(),
                    // One identity per pod: spiffe://…/ns/x/sa/a.
                    service_account: Some(p.to_string()),
                    node: None,
                })
            })
            .collect(),
    }
}

pub fn parse_topology(file: &Path, text: &str) -> Result<Topology, TopologyError> {
    let file = file.display().to_string();
    let t: Topology = crate::policy::parse::yaml::single(text)
        .map_err(|source| TopologyError::Yaml {
            file: file.clone(),
            source,
        })?
        .ok_or_else(|| TopologyError::Invalid {
            file: file.clone(),
            message: "the file is empty".into(),
        })?;
    validate(&file, &t)?;
    Ok(t)
}

fn validate(file: &str, t: &Topology) -> Result<(), TopologyError> {
    let invalid = |message: String| TopologyError::Invalid {
        file: file.to_string(),
        message,
    };
    if t.workloads.is_empty() {
        return Err(invalid("workloads: at least one workload is needed".into()));
    }
    let max = (LAST_POD_IPV4 - FIRST_POD_IPV4) as usize;
    if t.workloads.len() > max {
        return Err(invalid(format!(
            "workloads: at most {max} fit the lab's address range"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, w) in t.workloads.iter().enumerate() {
        let key = format!("{}/{}", w.namespace, w.name);
        if !seen.insert(key.clone()) {
            return Err(invalid(format!("workloads[{i}]: duplicate workload {key}")));
        }
        if let Some(n) = w.node.filter(|n| !(1..=MAX_NODES as u8).contains(n)) {
            return Err(invalid(format!(
                "workloads[{i}] ({key}).node: {n} is not a node of the lab (1 or 2)"
            )));
        }
        for (j, p) in w.ports.iter().enumerate() {
            if p.container_port == 0 {
                return Err(invalid(format!(
                    "workloads[{i}] ({key}).ports[{j}].containerPort: must be 1-65535"
                )));
            }
            if !matches!(p.protocol.as_str(), "TCP" | "UDP") {
                return Err(invalid(format!(
                    "workloads[{i}] ({key}).ports[{j}].protocol: {:?} is not TCP or UDP",
                    p.protocol
                )));
            }
        }
    }
    Ok(())
}

/// A pod as the lab builds it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedPod {
    /// `namespace/name`.
    pub key: String,
    pub workload: LabWorkload,
    pub index: usize,
    /// The node it runs on, from 1 (always 1 in a one-node lab).
    pub node: usize,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// Assigns each pod its addresses, by position in the topology, all on one
/// node (whatever their `node` says; [`plan_on`] checks it).
pub fn plan(t: &Topology) -> Vec<PlannedPod> {
    let mut one = t.clone();
    for w in &mut one.workloads {
        w.node = None;
    }
    plan_on(&one, 1).expect("a valid topology fits one node")
}

/// Places each pod on one of `nodes` nodes (its `node`, else round-robin
/// by position) and assigns its addresses in that node's subnet. The host
/// part follows the pod's position in the whole topology, so addresses
/// stay unique across nodes and a one-node plan is [`plan`]'s.
pub fn plan_on(t: &Topology, nodes: usize) -> Result<Vec<PlannedPod>, TopologyError> {
    if !(1..=MAX_NODES).contains(&nodes) {
        return Err(TopologyError::Nodes { nodes });
    }
    let room = (LAST_POD_IPV4 - FIRST_POD_IPV4) as usize / nodes;
    if t.workloads.len() > room {
        return Err(TopologyError::Full { nodes, room });
    }
    t.workloads
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let key = format!("{}/{}", w.namespace, w.name);
            let node = match w.node {
                Some(n) if (1..=nodes).contains(&(n as usize)) => n as usize,
                Some(n) => {
                    return Err(TopologyError::NoSuchNode {
                        pod: key,
                        node: n,
                        nodes,
                    })
                }
                None => 1 + i % nodes,
            };
            let net = NodeNet::of(node, nodes);
            Ok(PlannedPod {
                key,
                workload: w.clone(),
                index: i,
                node,
                ipv4: Ipv4Addr::from(u32::from(net.subnet_v4) + FIRST_POD_HOST + i as u32),
                ipv6: Ipv6Addr::from(u128::from(net.ipv6) + 0x1_0000 + i as u128),
            })
        })
        .collect()
}

/// The most nodes a lab simulates.
pub const MAX_NODES: usize = 2;

/// One node's place in the lab's address plan: its own addresses (on its
/// bridge), and the subnets its pods take theirs from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeNet {
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub subnet_v4: Ipv4Addr,
    pub prefix_v4: u8,
    pub subnet_v6: Ipv6Addr,
    pub prefix_v6: u8,
}

impl NodeNet {
    /// Node `node` (from 1) of a lab of `nodes`. One node keeps the whole
    /// /15 on its bridge (the lab as it always was); two nodes take a /16
    /// and a /64 each, routed to each other over the link between them.
    pub fn of(node: usize, nodes: usize) -> Self {
        if nodes <= 1 {
            return Self {
                ipv4: NODE_IPV4,
                ipv6: NODE_IPV6,
                subnet_v4: Ipv4Addr::new(198, 18, 0, 0),
                prefix_v4: IPV4_PREFIX_LEN,
                subnet_v6: Ipv6Addr::from(u128::from(NODE_IPV6) - 1),
                prefix_v6: IPV6_PREFIX_LEN,
            };
        }
        let n = node.saturating_sub(1);
        let subnet_v4 = Ipv4Addr::new(198, 18 + n as u8, 0, 0);
        let subnet_v6 = Ipv6Addr::from(u128::from(NODE_IPV6) - 1 + ((n as u128) << 64));
        Self {
            ipv4: Ipv4Addr::from(u32::from(subnet_v4) + 1),
            ipv6: Ipv6Addr::from(u128::from(subnet_v6) + 1),
            subnet_v4,
            prefix_v4: 16,
            subnet_v6,
            prefix_v6: IPV6_PREFIX_LEN,
        }
    }
}

/// Namespace labels, including the one Kubernetes sets on every namespace.
pub fn namespace_labels(t: &Topology, ns: &str) -> BTreeMap<String, String> {
    let mut labels = t
        .namespaces
        .iter()
        .find(|n| n.name == ns)
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), ns.into());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_topology_has_nine_pods_with_four_named_ports() {
        let t = default_topology();
        assert_eq!(t.workloads.len(), 9);
        let names: Vec<_> = t.workloads[0]
            .ports
            .iter()
            .map(|p| p.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "serve-80-tcp",
                "serve-81-tcp",
                "serve-80-udp",
                "serve-81-udp"
            ]
        );
        assert_eq!(
            namespace_labels(&t, "y").get("kubernetes.io/metadata.name"),
            Some(&"y".to_string())
        );
    }

    #[test]
    fn addresses_are_deterministic_and_distinct() {
        let p = plan(&default_topology());
        assert_eq!(p[0].ipv4, Ipv4Addr::new(198, 18, 1, 10));
        assert_eq!(p[8].ipv4, Ipv4Addr::new(198, 18, 1, 18));
        assert_eq!(
            p[0].ipv6,
            "fd00:7063:6c00::1:1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(plan(&default_topology()), p);
    }

    #[test]
    fn two_nodes_take_turns_and_split_the_range() {
        let one = plan(&default_topology());
        let two = plan_on(&default_topology(), 2).unwrap();
        let nodes: Vec<usize> = two.iter().map(|p| p.node).collect();
        assert_eq!(nodes, [1, 2, 1, 2, 1, 2, 1, 2, 1]);
        assert_eq!(
            two[0].ipv4, one[0].ipv4,
            "node 1 keeps the one-node addresses"
        );
        assert_eq!(two[0].ipv6, one[0].ipv6);
        assert_eq!(two[1].ipv4, Ipv4Addr::new(198, 19, 1, 11));
        assert_eq!(
            two[1].ipv6,
            "fd00:7063:6c00:1::1:2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(NodeNet::of(1, 2).ipv4, NODE_IPV4);
        assert_eq!(NodeNet::of(2, 2).ipv4, Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(NodeNet::of(1, 1).prefix_v4, IPV4_PREFIX_LEN);
    }

    #[test]
    fn a_pod_may_name_its_node() {
        let mut t = default_topology();
        t.workloads[1].node = Some(1);
        assert_eq!(plan_on(&t, 2).unwrap()[1].node, 1);
        assert!(matches!(
            plan_on(&t, 1),
            Ok(p) if p.iter().all(|p| p.node == 1)
        ));
        t.workloads[1].node = Some(2);
        assert!(matches!(
            plan_on(&t, 1),
            Err(TopologyError::NoSuchNode { pod, node: 2, nodes: 1 }) if pod == "x/b"
        ));
        assert!(plan_on(&t, 3).is_err());
        let e = parse_topology(
            Path::new("t.yaml"),
            "workloads: [{name: a, namespace: x, node: 3}]",
        )
        .unwrap_err();
        assert!(e.to_string().contains("node"), "{e}");
    }

    #[test]
    fn topology_rejects_lab_assigned_fields() {
        let e = parse_topology(
            Path::new("t.yaml"),
            "workloads: [{name: a, namespace: x, ips: [1.2.3.4]}]",
        )
        .unwrap_err();
        let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(msg.contains("t.yaml") && msg.contains("ips"), "{msg}");
    }
}
