//! The lab in Kubernetes mode: the same network namespaces and pod
//! processes, with cgroups laid out as a kubelet (systemd driver) lays them
//! out and the agent reading pods and policies from an API server (in
//! tests, a real one built by `cargo xtask kube build`, or a mock one for
//! faults). This module says what the API should hold so it matches the lab.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::topology::{PlannedPod, Topology, NODE_IPV4, NODE_IPV6};

/// The API-server side of a Kubernetes-mode lab.
#[derive(Clone)]
pub struct LabKube {
    pub client: ::kube::Client,
    pub node_name: String,
    /// Deny a pod's traffic until the API has it and it is programmed.
    pub deny_unprogrammed: bool,
    /// The pod the agent takes as its own (exempt from enforcement).
    pub own_pod_uid: Option<String>,
    /// The UIDs the API server gave the pods (`namespace/name` → uid): a
    /// real server assigns its own, and the kubelet names cgroups by them.
    /// Pods not listed get [`pod_uid`] (a mock keeps what it is given).
    pub pod_uids: BTreeMap<String, String>,
    /// Take the status Lease and write Events and `Accepted` conditions
    /// for policy objects, as a deployed agent does.
    pub report_status: bool,
}

impl LabKube {
    pub fn new(client: ::kube::Client, node_name: &str) -> Self {
        Self {
            client,
            node_name: node_name.to_string(),
            deny_unprogrammed: false,
            own_pod_uid: None,
            pod_uids: BTreeMap::new(),
            report_status: false,
        }
    }
}

impl std::fmt::Debug for LabKube {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabKube")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

/// The pod UID the lab uses for a pod: also part of its cgroup's name.
pub fn pod_uid(pod: &PlannedPod) -> String {
    format!("00000000-0000-4000-8000-{:012}", pod.index + 1)
}

/// Where the kubelet (systemd driver) puts a BestEffort pod's cgroup,
/// relative to its cgroup root.
pub fn pod_cgroup_relative(uid: &str) -> String {
    format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
        uid.replace('-', "_")
    )
}

/// The Node object of the lab's node.
pub fn node_object(node_name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node_name},
        "status": {"addresses": [
            {"type": "InternalIP", "address": NODE_IPV4.to_string()},
            {"type": "InternalIP", "address": NODE_IPV6.to_string()},
        ]}
    })
}

pub fn namespace_objects(t: &Topology) -> Vec<Value> {
    t.namespaces
        .iter()
        .map(|n| {
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": n.name, "labels": n.labels}})
        })
        .collect()
}

/// A running pod object for each lab pod, scheduled on `node_name`.
pub fn pod_objects(pods: &[PlannedPod], node_name: &str) -> Vec<Value> {
    pods.iter()
        .map(|p| {
            let ports: Vec<Value> = p
                .workload
                .ports
                .iter()
                .map(|port| {
                    json!({"name": port.name, "containerPort": port.container_port,
                           "protocol": port.protocol})
                })
                .collect();
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": p.workload.name, "namespace": p.workload.namespace,
                             "uid": pod_uid(p), "labels": p.workload.labels},
                "spec": {"nodeName": node_name,
                         "serviceAccountName": p.workload.service_account(),
                         "containers": [{"name": "main", "image": "lab", "ports": ports}]},
                "status": {"phase": "Running", "qosClass": "BestEffort",
                           "podIP": p.ipv4.to_string(),
                           "podIPs": [{"ip": p.ipv4.to_string()}, {"ip": p.ipv6.to_string()}]}
            })
        })
        .collect()
}
