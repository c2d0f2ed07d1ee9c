//! The `Accepted` condition on L4Policy and ClusterL4Policy status, written
//! with server-side apply: `conditions` is a list map keyed by type (see
//! crate::crd), so we own our entry and nothing else.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use serde_json::{json, Value};

use super::{event::truncate, ObjectReport};
use crate::{crd::PolicyStatus, policy::model::ObjectKind};

pub const TYPE: &str = "Accepted";
pub const FIELD_MANAGER: &str = "portcullis-agent";
/// Far below the API's 32768-byte limit; a problem is one line.
const MESSAGE_LIMIT: usize = 4096;

/// The condition's content, without its transition time: what decides
/// whether it needs writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
    pub observed_generation: Option<i64>,
}

impl Accepted {
    /// `None` for kinds without a status (NetworkPolicy has none in
    /// networking.k8s.io/v1 as of Kubernetes 1.35).
    pub fn of(report: &ObjectReport) -> Option<Self> {
        if report.kind == ObjectKind::NetworkPolicy {
            return None;
        }
        let (status, reason, message) = match &report.problem {
            Some(problem) => (
                false,
                "Invalid",
                truncate(problem, MESSAGE_LIMIT).to_string(),
            ),
            None => (
                true,
                "Valid",
                "enforced by the Portcullis agents".to_string(),
            ),
        };
        Some(Self {
            status,
            reason,
            message,
            observed_generation: report.generation,
        })
    }

    /// The server-side apply body for `report`'s object's status.
    pub fn apply_patch(&self, report: &ObjectReport, last_transition: Timestamp) -> Value {
        let status = PolicyStatus {
            conditions: vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: TYPE.to_string(),
                status: if self.status { "True" } else { "False" }.to_string(),
                reason: self.reason.to_string(),
                message: self.message.clone(),
                observed_generation: self.observed_generation,
                last_transition_time: Time(last_transition),
            }],
        };
        let mut metadata = json!({ "name": report.name });
        if !report.namespace.is_empty() {
            metadata["namespace"] = json!(report.namespace);
        }
        json!({
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": report.kind.as_str(),
            "metadata": metadata,
            "status": status,
        })
    }
}
