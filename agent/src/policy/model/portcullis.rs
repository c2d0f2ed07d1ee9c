//! Portcullis' own policy kinds (`portcullis.dev/v1alpha1`) as written in
//! YAML or served by the API. Validate with
//! [`crate::policy::parse::l4_policy`] and
//! [`crate::policy::parse::cluster_l4_policy`].
//!
//! Enumerations are kept as text so a bad value gets a precise error naming
//! the field; the schema attributes give the CRD the same constraints at
//! `kubectl apply` time.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    LabelSelector, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, ObjectMeta,
};

/// A namespaced L4Policy: NetworkPolicy-style allows plus explicit denies
/// and an audit mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Policy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: L4PolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("required" = ["podSelector"]))]
pub struct L4PolicySpec {
    /// Pods of the policy's namespace it applies to (`{}`: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// `Enforce` (default) or `Audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Enforce", "Audit"]))]
    pub mode: Option<String>,
    /// Directions the policy isolates; by default those whose allow list
    /// (`ingress`, `egress`) is present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("items" = {"type": "string", "enum": ["Ingress", "Egress"]}))]
    pub policy_types: Option<Vec<String>>,
    /// Allow rules, as in a NetworkPolicy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<NetworkPolicyIngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<NetworkPolicyEgressRule>>,
    /// Deny rules: a matching flow is denied whatever any allow says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_deny: Option<Vec<NetworkPolicyIngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_deny: Option<Vec<NetworkPolicyEgressRule>>,
}

/// A cluster-scoped, tiered and prioritised policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterL4Policy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ClusterL4PolicySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("required" = ["tier", "priority"]))]
pub struct ClusterL4PolicySpec {
    /// `Admin` (before NetworkPolicies) or `Baseline` (only for pods no
    /// NetworkPolicy or L4Policy isolates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Admin", "Baseline"]))]
    pub tier: Option<String>,
    /// 0-1000; lower is evaluated first, ties broken by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: Option<i64>,
    /// The pods the policy applies to; absent means every pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<ClusterL4PolicySubject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<ClusterL4PolicyIngressRule>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<ClusterL4PolicyEgressRule>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterL4PolicySubject {
    /// Absent: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Absent: every pod of the selected namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("required" = ["action"]))]
pub struct ClusterL4PolicyIngressRule {
    /// `Allow`, `Deny` or `Pass` (Admin tier only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Allow", "Deny", "Pass"]))]
    pub action: Option<String>,
    /// Absent: every peer. A peer with only `podSelector` matches pods of
    /// every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<NetworkPolicyPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("required" = ["action"]))]
pub struct ClusterL4PolicyEgressRule {
    /// `Allow`, `Deny` or `Pass` (Admin tier only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Allow", "Deny", "Pass"]))]
    pub action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<NetworkPolicyPeer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}
