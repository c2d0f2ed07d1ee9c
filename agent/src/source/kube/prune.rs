//! What the watchers keep of each object: only the fields Portcullis
//! reads, so the agent's memory grows with the number of pods, not with
//! their specs (container images, env, volumes, probes, status conditions)
//! or annotations (`last-applied-configuration` alone can double an
//! object).

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Container, Namespace, Node, Pod, PodSpec, PodStatus, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{api::DynamicObject, Resource};

use super::cgroups::MIRROR_ANNOTATION;

/// Drops what the agent never reads.
pub trait Prune {
    fn prune(&mut self);
}

/// Managed fields and annotations: never read (except a static pod's
/// mirror annotation, which names its cgroup).
fn metadata<K: Resource>(o: &mut K) {
    let meta = o.meta_mut();
    meta.managed_fields = None;
    meta.owner_references = None;
    let mirror = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(MIRROR_ANNOTATION))
        .cloned();
    meta.annotations = mirror.map(|m| BTreeMap::from([(MIRROR_ANNOTATION.to_string(), m)]));
}

impl Prune for Pod {
    fn prune(&mut self) {
        metadata(self);
        // Its node, network mode, identity and named ports.
        self.spec = self.spec.take().map(|s| PodSpec {
            node_name: s.node_name,
            host_network: s.host_network,
            service_account_name: s.service_account_name,
            containers: s
                .containers
                .into_iter()
                .map(|c| Container {
                    name: c.name,
                    ports: c.ports,
                    ..Container::default()
                })
                .collect(),
            ..PodSpec::default()
        });
        // Its phase, addresses and QoS class (which names its cgroup).
        self.status = self.status.take().map(|s| PodStatus {
            phase: s.phase,
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            qos_class: s.qos_class,
            ..PodStatus::default()
        });
    }
}

macro_rules! metadata_only {
    ($($kind:ty),*) => {
        $(impl Prune for $kind {
            fn prune(&mut self) {
                metadata(self);
            }
        })*
    };
}

metadata_only!(
    Namespace,
    Node,
    NetworkPolicy,
    Service,
    EndpointSlice,
    DynamicObject
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_keeps_what_the_agent_reads_and_nothing_else() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "u",
                "labels": {"app": "web"},
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "x".repeat(10_000),
                    MIRROR_ANNOTATION: "abc"
                },
                "managedFields": [{"manager": "kubectl"}]
            },
            "spec": {
                "nodeName": "n1", "serviceAccountName": "web", "hostNetwork": false,
                "containers": [{
                    "name": "app", "image": "registry/web:1",
                    "env": [{"name": "SECRET", "value": "y".repeat(10_000)}],
                    "ports": [{"name": "http", "containerPort": 80}]
                }],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                "qosClass": "Burstable",
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))
        .unwrap();
        let before = serde_json::to_vec(&pod).unwrap().len();
        pod.prune();
        let after = serde_json::to_vec(&pod).unwrap();
        assert!(after.len() * 10 < before, "{} → {}", before, after.len());
        let v: serde_json::Value = serde_json::from_slice(&after).unwrap();
        assert_eq!(v["metadata"]["labels"]["app"], "web");
        assert_eq!(v["metadata"]["annotations"][MIRROR_ANNOTATION], "abc");
        assert!(v["metadata"]["annotations"]
            .get("kubectl.kubernetes.io/last-applied-configuration")
            .is_none());
        assert_eq!(v["spec"]["nodeName"], "n1");
        assert_eq!(v["spec"]["serviceAccountName"], "web");
        assert_eq!(v["spec"]["containers"][0]["ports"][0]["name"], "http");
        assert!(v["spec"]["containers"][0].get("env").is_none());
        assert!(v["spec"].get("volumes").is_none());
        assert_eq!(v["status"]["podIPs"][0]["ip"], "10.0.0.1");
        assert_eq!(v["status"]["qosClass"], "Burstable");
        assert!(v["status"].get("conditions").is_none());
    }
}
