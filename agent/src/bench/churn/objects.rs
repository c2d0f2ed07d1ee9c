//! The churn bench's cluster as API objects: namespaces, nodes, pods shaped
//! as Deployments and StatefulSets make them, NetworkPolicies and Services
//! with their EndpointSlices. Pure: numbers in, JSON out.

use std::net::Ipv4Addr;

use serde_json::{json, Value};

/// The node the agent under test runs on.
pub const NODE: &str = "churn-node";
const OTHER_NODES: usize = 4;
pub const NAMESPACES: usize = 50;
const APPS: usize = 100;
/// Pods per Deployment or StatefulSet.
const REPLICAS: usize = 10;
/// One workload in this many is a StatefulSet.
const STATEFUL_EVERY: usize = 5;
/// One pod in this many runs on this node (1,000 of 5,000).
pub const LOCAL_EVERY: usize = 5;
pub const RULES_PER_POLICY: usize = 10;
pub const SERVICES: usize = 100;
/// Addresses in each Service's EndpointSlice.
const ENDPOINTS_PER_SERVICE: usize = 5;

pub fn namespace(n: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": format!("churn-{n}"), "labels": {"team": namespace_team(n)}}})
}

/// The `team` label of namespace `n`.
fn namespace_team(n: usize) -> String {
    format!("t-{}", n % 5)
}

/// This node (with an InternalIP, as the source wants for its own node)
/// and the others, whose pods are only peers here.
pub fn nodes() -> Vec<Value> {
    let node = |name: String, ip: String| {
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
               "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
    };
    let mut all = vec![node(NODE.into(), "172.30.0.1".into())];
    all.extend(
        (0..OTHER_NODES).map(|i| node(format!("churn-other-{i}"), format!("172.30.0.{}", i + 2))),
    );
    all
}

/// Pod number `i` of the cluster: where it runs, its address and labels.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSpec {
    pub index: usize,
    pub namespace: String,
    pub name: String,
    pub local: bool,
    pub ip: Ipv4Addr,
    pub labels: serde_json::Map<String, Value>,
}

/// A short stable hash-like suffix, as controllers put in names and labels.
fn suffix(seed: usize, len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5851_F42D;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            ALPHABET[(x >> 33) as usize % ALPHABET.len()] as char
        })
        .collect()
}

impl PodSpec {
    /// Pods come in runs of REPLICAS per workload; every STATEFUL_EVERY-th
    /// workload is a StatefulSet (ordinal names), the rest Deployments
    /// (ReplicaSet hash plus a random suffix).
    pub fn nth(index: usize) -> Self {
        let workload = index / REPLICAS;
        let replica = index % REPLICAS;
        let namespace = format!("churn-{}", workload % NAMESPACES);
        let app = format!("app-{}", workload % APPS);
        let mut labels = serde_json::Map::new();
        labels.insert("app".into(), app.clone().into());
        let name = if workload.is_multiple_of(STATEFUL_EVERY) {
            let set = format!("{app}-db{workload}");
            let name = format!("{set}-{replica}");
            labels.insert(
                "statefulset.kubernetes.io/pod-name".into(),
                name.clone().into(),
            );
            labels.insert(
                "controller-revision-hash".into(),
                format!("{set}-{}", suffix(workload, 10)).into(),
            );
            name
        } else {
            let hash = suffix(workload, 10);
            labels.insert("pod-template-hash".into(), hash.clone().into());
            format!("{app}-w{workload}-{hash}-{}", suffix(index, 5))
        };
        Self {
            index,
            namespace,
            name,
            local: index.is_multiple_of(LOCAL_EVERY),
            ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 10)) + index as u32),
            labels,
        }
    }

    pub fn node(&self) -> String {
        match self.local {
            true => NODE.into(),
            false => format!("churn-other-{}", self.index % OTHER_NODES),
        }
    }

    /// The pod as the scheduler leaves it: bound, no address yet.
    pub fn object(&self) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
               "spec": {"nodeName": self.node(), "containers": [{"name": "main", "image": "x"}]}})
    }

    /// What the kubelet writes once the sandbox runs.
    pub fn running_status(&self) -> Value {
        let ip = self.ip.to_string();
        json!({"status": {"phase": "Running", "qosClass": "BestEffort",
                          "podIP": ip, "podIPs": [{"ip": ip}]}})
    }
}

/// Policies whose number is a multiple of this have rules whose peers are
/// pods of the cluster: a pod's namespace team follows its app modulo 5,
/// and rule `j` of policy `p` names app `7p + j` with team `p + j`, which
/// agree only when `p` is a multiple of 5. The others isolate their pods
/// and admit no one.
pub const PEERED_EVERY: usize = 5;

/// NetworkPolicy `p` with RULES_PER_POLICY ingress rules, each naming
/// peers by namespace and app and a port of its own (no two collapse).
/// `port_shift` moves every port: a changed policy.
pub fn policy(p: usize, port_shift: usize) -> Value {
    let rules: Vec<Value> = (0..RULES_PER_POLICY)
        .map(|j| {
            json!({
                "from": [{"namespaceSelector": {"matchLabels": {"team": format!("t-{}", (p + j) % 5)}},
                          "podSelector": {"matchLabels": {"app": format!("app-{}", (p * 7 + j) % APPS)}}}],
                "ports": [{"protocol": "TCP", "port": 1000 + (p * RULES_PER_POLICY + j + port_shift) % 60_000}]
            })
        })
        .collect();
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": format!("churn-pol-{p}"), "namespace": format!("churn-{}", p % NAMESPACES)},
           "spec": {"podSelector": {"matchLabels": {"app": format!("app-{}", p % APPS)}},
                    "policyTypes": ["Ingress"], "ingress": rules}})
}

/// Service `s`, selecting one app, with a fixed ClusterIP.
pub fn service(s: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("churn-svc-{s}"), "namespace": format!("churn-{}", s % NAMESPACES)},
           "spec": {"clusterIP": format!("10.96.{}.{}", 1 + s / 250, 1 + s % 250),
                    "selector": {"app": format!("app-{}", s % APPS)},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}})
}

/// Service `s`'s EndpointSlice, its backends picked from the pods
/// starting at `first` (a change moves `first`).
pub fn endpoint_slice(s: usize, first: usize, pods: usize) -> Value {
    let endpoints: Vec<Value> = (0..ENDPOINTS_PER_SERVICE)
        .map(|k| {
            let pod = PodSpec::nth((first + k * 97) % pods.max(1));
            json!({"addresses": [pod.ip.to_string()], "conditions": {"ready": true}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("churn-svc-{s}-slice"), "namespace": format!("churn-{}", s % NAMESPACES),
                        "labels": {"kubernetes.io/service-name": format!("churn-svc-{s}")}},
           "addressType": "IPv4",
           "endpoints": endpoints,
           "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_carry_controller_labels_and_a_fifth_are_local() {
        let pods: Vec<PodSpec> = (0..5_000).map(PodSpec::nth).collect();
        assert_eq!(pods.iter().filter(|p| p.local).count(), 1_000);
        let stateful = pods
            .iter()
            .filter(|p| p.labels.contains_key("statefulset.kubernetes.io/pod-name"))
            .count();
        assert_eq!(stateful, 1_000);
        assert!(pods
            .iter()
            .filter(|p| !p.labels.contains_key("statefulset.kubernetes.io/pod-name"))
            .all(|p| p.labels.contains_key("pod-template-hash")));
        let names: std::collections::BTreeSet<_> =
            pods.iter().map(|p| (&p.namespace, &p.name)).collect();
        assert_eq!(names.len(), pods.len(), "names are unique");
        let ips: std::collections::BTreeSet<_> = pods.iter().map(|p| p.ip).collect();
        assert_eq!(ips.len(), pods.len(), "addresses are unique");
    }

    /// Rules name pods that exist exactly in every PEERED_EVERY-th policy.
    #[test]
    fn every_fifth_policy_names_pods_that_exist() {
        let pods: Vec<PodSpec> = (0..1_000).map(PodSpec::nth).collect();
        let team_of = |namespace: &str| {
            let n: usize = namespace.trim_start_matches("churn-").parse().unwrap();
            namespace_team(n)
        };
        for p in 0..20 {
            let policy = policy(p, 0);
            let peered = policy["spec"]["ingress"]
                .as_array()
                .unwrap()
                .iter()
                .all(|rule| {
                    let from = &rule["from"][0];
                    let team = from["namespaceSelector"]["matchLabels"]["team"]
                        .as_str()
                        .unwrap();
                    let app = from["podSelector"]["matchLabels"]["app"].as_str().unwrap();
                    pods.iter()
                        .any(|pod| pod.labels["app"] == app && team_of(&pod.namespace) == team)
                });
            assert_eq!(peered, p % PEERED_EVERY == 0, "policy {p}");
        }
    }

    #[test]
    fn a_changed_policy_moves_its_ports() {
        assert_ne!(policy(3, 0)["spec"], policy(3, 1)["spec"]);
        assert_eq!(
            policy(3, 0)["spec"]["ingress"].as_array().unwrap().len(),
            RULES_PER_POLICY
        );
    }
}
