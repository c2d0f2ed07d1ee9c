//! Kubernetes CustomResourceDefinitions for Portcullis' policy kinds
//! (`portcullis.dev/v1alpha1` L4Policy, ClusterL4Policy and
//! PortcullisRevocation), and the YAML
//! written to `deploy/crds` by `portcullis crdgen` (`cargo xtask crdgen`).
//!
//! The wire types live in [`crate::policy::model`] as plain serde types
//! (with schemars schemas, no kube), so `policy/` stays free of kube and
//! parses files and API objects alike. Here they are wrapped: each spec is
//! flattened into a kube `CustomResource`, which adds the group, version,
//! scope and the CEL rules that only matter to the API server.

use std::path::Path;

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::policy::{
    model::{self, ObjectMeta, Origin},
    parse::{self, ParseError},
    PolicyObject,
};

/// Spec of a namespaced L4Policy.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "L4Policy",
    plural = "l4policies",
    shortname = "l4p",
    namespaced,
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "NetworkPolicy-style L4 allows plus explicit denies and an audit mode."
)]
pub struct L4PolicySpec {
    #[serde(flatten)]
    pub spec: model::L4PolicySpec,
}

/// Spec of a cluster-scoped ClusterL4Policy.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "ClusterL4Policy",
    plural = "clusterl4policies",
    shortname = "cl4p",
    status = "PolicyStatus",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "Tiered, prioritised cluster-wide L4 policy (Admin before, Baseline after namespace policies)."
)]
// The agent rejects these too; CEL rejects them at `kubectl apply` already.
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.tier == 'Admin' || ((!has(self.ingress) || self.ingress.all(r, r.action != 'Pass')) && (!has(self.egress) || self.egress.all(r, r.action != 'Pass')))",
    "message": "action Pass is only allowed in tier Admin",
}]))]
pub struct ClusterL4PolicySpec {
    #[serde(flatten)]
    pub spec: model::ClusterL4PolicySpec,
}

/// Spec of a cluster-scoped PortcullisRevocation: one revoked identity or
/// certificate serial.
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "PortcullisRevocation",
    plural = "portcullisrevocations",
    shortname = "prev",
    printcolumn = r#"{"name":"SPIFFE ID","type":"string","jsonPath":".spec.spiffeId"}"#,
    printcolumn = r#"{"name":"Serial","type":"string","jsonPath":".spec.serial"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "Revokes every certificate of a workload identity, or one certificate by serial."
)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.spiffeId) != has(self.serial)",
    "message": "set exactly one of spiffeId and serial",
}]))]
pub struct PortcullisRevocationSpec {
    #[serde(flatten)]
    pub spec: crate::identity::revocation::RevocationEntry,
}

/// Written only by the Portcullis agent holding the status Lease.
// Written by crate::kube_report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PolicyStatus {
    /// `Accepted`: True when the agents enforce this generation, False
    /// (reason `Invalid`) when they rejected it and keep its last valid one.
    // A map keyed by type, so server-side apply owns only our entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Converts Kubernetes object metadata to the fields policies use.
fn metadata(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        labels: meta.labels.clone().unwrap_or_default(),
        annotations: meta.annotations.clone().unwrap_or_default(),
    }
}

impl L4Policy {
    /// The wire form [`parse::l4_policy`] validates.
    pub fn to_wire(&self) -> model::L4Policy {
        model::L4Policy {
            api_version: parse::PORTCULLIS_API_VERSION.to_string(),
            kind: parse::L4_POLICY_KIND.to_string(),
            metadata: metadata(&self.metadata),
            spec: self.spec.spec.clone(),
        }
    }

    pub fn to_policy(&self) -> Result<PolicyObject, ParseError> {
        parse::l4_policy(Origin::Kubernetes, &self.to_wire())
    }
}

impl ClusterL4Policy {
    /// The wire form [`parse::cluster_l4_policy`] validates.
    pub fn to_wire(&self) -> model::ClusterL4Policy {
        model::ClusterL4Policy {
            api_version: parse::PORTCULLIS_API_VERSION.to_string(),
            kind: parse::CLUSTER_L4_POLICY_KIND.to_string(),
            metadata: metadata(&self.metadata),
            spec: self.spec.spec.clone(),
        }
    }

    pub fn to_policy(&self) -> Result<PolicyObject, ParseError> {
        parse::cluster_l4_policy(Origin::Kubernetes, &self.to_wire())
    }
}

#[derive(Debug, Error)]
pub enum CrdError {
    #[error("serializing the {name} CRD")]
    Serialize {
        name: &'static str,
        #[source]
        source: serde_saphyr::SerializeError,
    },
    #[error("writing {}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Every CRD as (file name, YAML text).
pub fn generate() -> Result<Vec<(String, String)>, CrdError> {
    let crds: [(&'static str, CustomResourceDefinition); 3] = [
        ("l4policies", L4Policy::crd()),
        ("clusterl4policies", ClusterL4Policy::crd()),
        ("portcullisrevocations", PortcullisRevocation::crd()),
    ];
    crds.into_iter()
        .map(|(name, crd)| {
            let yaml = serde_saphyr::to_string(&crd)
                .map_err(|source| CrdError::Serialize { name, source })?;
            Ok((
                format!("portcullis.dev_{name}.yaml"),
                format!("# Generated by `cargo xtask crdgen` from agent/src/crd.rs; do not edit.\n{yaml}"),
            ))
        })
        .collect()
}

/// Writes every CRD into `dir` (created if missing); returns the paths.
pub fn write_all(dir: &Path) -> Result<Vec<std::path::PathBuf>, CrdError> {
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CrdError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_error(dir))?;
    let mut written = Vec::new();
    for (name, yaml) in generate()? {
        let path = dir.join(name);
        std::fs::write(&path, yaml).map_err(write_error(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// `portcullis crdgen`: writes every CRD into `dir` and prints the paths.
pub fn crdgen(dir: &Path) -> Result<(), CrdError> {
    for path in write_all(dir)? {
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
