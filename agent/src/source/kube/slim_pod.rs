//! The pod as the agent watches it: only the fields it reads, decoded
//! straight from the API's JSON.
//!
//! `k8s_openapi::Pod` is several kilobytes in memory even with every
//! optional field empty (a `Container` alone is kilobytes of `None`s), and
//! the pod store is the one part of the agent that grows with the whole
//! cluster. Decoding into this type instead keeps a pod to its metadata
//! and a few strings. Field names follow the API's, so the translation
//! reads it as it would read a `Pod`.

use std::{borrow::Cow, sync::Arc};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

use super::label_sets;
use crate::policy::model::Labels;

/// A `v1/Pod`, reduced to what the agent reads (see the module docs).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct SlimPod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<SlimPodSpec>,
    pub status: Option<SlimPodStatus>,
    /// `metadata.labels`, moved to their shared copy as the watcher
    /// stores the pod ([`SlimPod::share_labels`]). Not serialized: the
    /// agent reads pods and never writes them back.
    #[serde(skip)]
    pub shared_labels: Option<Arc<Labels>>,
}

impl SlimPod {
    /// Moves the labels to the copy every pod with the same ones shares.
    pub fn share_labels(&mut self) {
        if let Some(labels) = self.metadata.labels.take() {
            self.shared_labels = Some(label_sets::shared(&labels));
        }
    }

    /// The pod's labels, shared (a pod not stored by the watcher has its
    /// own until now).
    pub fn labels(&self) -> Arc<Labels> {
        match (&self.shared_labels, &self.metadata.labels) {
            (Some(shared), _) => Arc::clone(shared),
            (None, Some(own)) => label_sets::shared(own),
            (None, None) => label_sets::shared(&Labels::new()),
        }
    }
}

/// Where the pod runs, how it is networked, who it is, its named ports.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodSpec {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<SlimContainer>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct SlimContainer {
    pub ports: Option<Vec<SlimContainerPort>>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimContainerPort {
    pub name: Option<String>,
    pub container_port: i32,
    pub protocol: Option<String>,
}

/// Whether it still runs, its addresses and its QoS class (which names its
/// cgroup).
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlimPodStatus {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pub pod_ips: Option<Vec<SlimPodIp>>,
    pub qos_class: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct SlimPodIp {
    pub ip: String,
}

impl kube::Resource for SlimPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use kube::Resource as _;

    use super::*;

    /// A full pod as the API serves it decodes to what the agent reads,
    /// and the slim form is a fraction of the full one in memory.
    #[test]
    fn a_served_pod_decodes_to_what_the_agent_reads() {
        let served = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "shop", "uid": "u",
                         "labels": {"app": "web"}},
            "spec": {
                "nodeName": "n1", "serviceAccountName": "web", "hostNetwork": false,
                "containers": [{
                    "name": "app", "image": "registry/web:1",
                    "env": [{"name": "SECRET", "value": "y"}],
                    "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]
                }],
                "volumes": [{"name": "v", "emptyDir": {}}]
            },
            "status": {
                "phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
                "qosClass": "Burstable",
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        });
        let pod: SlimPod = serde_json::from_value(served.clone()).unwrap();
        assert_eq!(pod.metadata.labels.as_ref().unwrap()["app"], "web");
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
        assert_eq!(spec.host_network, Some(false));
        let port = &spec.containers[0].ports.as_ref().unwrap()[0];
        assert_eq!(
            (
                port.name.as_deref(),
                port.container_port,
                port.protocol.as_deref()
            ),
            (Some("http"), 80, Some("TCP"))
        );
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(status.pod_ips.as_ref().unwrap()[0].ip, "10.0.0.1");
        assert_eq!(status.qos_class.as_deref(), Some("Burstable"));
        // The API path is the Pod's.
        assert_eq!(
            SlimPod::url_path(&(), Some("shop")),
            Pod::url_path(&(), Some("shop"))
        );
        assert_eq!(SlimPod::api_version(&()), Pod::api_version(&()));

        let full: Pod = serde_json::from_value(served).unwrap();
        let full_size = std::mem::size_of::<k8s_openapi::api::core::v1::PodSpec>()
            + std::mem::size_of::<k8s_openapi::api::core::v1::Container>()
                * full.spec.as_ref().unwrap().containers.len();
        let slim_size = std::mem::size_of::<SlimPodSpec>()
            + std::mem::size_of::<SlimContainer>() * spec.containers.len();
        assert!(
            slim_size * 10 < full_size,
            "slim {slim_size} B vs full {full_size} B"
        );
    }
}
