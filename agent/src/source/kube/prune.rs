//! What the watchers keep of each object: only the fields Portcullis
//! reads, so the agent's memory grows with the number of pods, not with
//! their specs (container images, env, volumes, probes, status conditions)
//! or annotations (`last-applied-configuration` alone can double an
//! object).

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{api::DynamicObject, Resource};

use super::{cgroups::MIRROR_ANNOTATION, slim_pod::SlimPod};

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

/// Decoded slim already (see [`SlimPod`]): only its metadata to trim.
impl Prune for SlimPod {
    fn prune(&mut self) {
        metadata(self);
        self.share_labels();
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
        let full = serde_json::json!({
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
        });
        let before = serde_json::to_vec(&full).unwrap().len();
        let mut pod: SlimPod = serde_json::from_value(full).unwrap();
        pod.prune();
        let after = serde_json::to_vec(&pod).unwrap();
        assert!(after.len() * 10 < before, "{} → {}", before, after.len());
        let v: serde_json::Value = serde_json::from_slice(&after).unwrap();
        assert_eq!(pod.labels()["app"], "web", "kept, in the shared copy");
        assert!(v["metadata"].get("labels").is_none());
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

    /// Replicas with the same labels hold one copy of them between them.
    #[test]
    fn pods_with_the_same_labels_share_one_copy() {
        let pod = |name: &str, hash: &str| {
            let mut pod: SlimPod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop",
                             "labels": {"app": "web", "pod-template-hash": hash}}
            }))
            .unwrap();
            pod.prune();
            pod
        };
        let (a, b, c) = (pod("a", "h1"), pod("b", "h1"), pod("c", "h2"));
        assert!(std::sync::Arc::ptr_eq(&a.labels(), &b.labels()));
        assert!(!std::sync::Arc::ptr_eq(&a.labels(), &c.labels()));
        assert_eq!(c.labels()["pod-template-hash"], "h2");
    }
}
