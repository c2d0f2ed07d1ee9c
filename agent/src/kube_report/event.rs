//! The Warning Event for an invalid policy object, as an events.k8s.io/v1
//! Event: the current Events API (core/v1 Event is its legacy view of the
//! same storage, so `kubectl describe` and `kubectl events` show ours), with
//! first-class `reportingController`/`reportingInstance`/`action` fields.

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};

use super::ObjectReport;
use crate::policy::model::ObjectKind;

pub const REASON: &str = "InvalidPolicy";
pub const REPORTING_CONTROLLER: &str = "portcullis.dev/agent";
/// What the agent was doing; required by events.k8s.io/v1.
const ACTION: &str = "Validate";
/// Where Kubernetes puts Events about cluster-scoped objects.
const CLUSTER_EVENTS_NAMESPACE: &str = "default";
/// The API server rejects longer notes.
const NOTE_LIMIT: usize = 1024;
/// The API server rejects longer reporting instances.
const INSTANCE_LIMIT: usize = 128;
/// Longest object name (a DNS subdomain).
const NAME_LIMIT: usize = 253;

/// The namespace an Event about `report`'s object goes to.
pub fn namespace(report: &ObjectReport) -> &str {
    if report.namespace.is_empty() {
        CLUSTER_EVENTS_NAMESPACE
    } else {
        &report.namespace
    }
}

/// The Event for `report`'s problem; `None` when it has none.
pub fn invalid_policy(report: &ObjectReport, instance: &str, now: Timestamp) -> Option<Event> {
    let problem = report.problem.as_deref()?;
    Some(Event {
        metadata: ObjectMeta {
            name: Some(name(report, problem)),
            namespace: Some(namespace(report).to_string()),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".to_string()),
        reason: Some(REASON.to_string()),
        action: Some(ACTION.to_string()),
        note: Some(truncate(problem, NOTE_LIMIT).to_string()),
        regarding: Some(reference(report)),
        reporting_controller: Some(REPORTING_CONTROLLER.to_string()),
        reporting_instance: Some(truncate(instance, INSTANCE_LIMIT).to_string()),
        ..Default::default()
    })
}

fn reference(report: &ObjectReport) -> ObjectReference {
    let api_version = match report.kind {
        ObjectKind::NetworkPolicy => "networking.k8s.io/v1",
        ObjectKind::L4Policy | ObjectKind::ClusterL4Policy => "portcullis.dev/v1alpha1",
    };
    ObjectReference {
        api_version: Some(api_version.to_string()),
        kind: Some(report.kind.as_str().to_string()),
        name: Some(report.name.clone()),
        namespace: (!report.namespace.is_empty()).then(|| report.namespace.clone()),
        uid: Some(report.uid.clone()),
        ..Default::default()
    }
}

/// `<object>.<hash of uid, generation, problem>`: the same problem gets the
/// same name on every node, so an agent that takes over the Lease and
/// reports it again gets AlreadyExists instead of a duplicate Event.
pub fn name(report: &ObjectReport, problem: &str) -> String {
    let mut hash = Fnv1a::default();
    hash.write(report.uid.as_bytes());
    hash.write(&[0]);
    hash.write(&report.generation.unwrap_or(0).to_le_bytes());
    hash.write(problem.as_bytes());
    let suffix = format!(".{:016x}", hash.0);
    let prefix = truncate(&report.name, NAME_LIMIT - suffix.len());
    // A name must end alphanumeric; a cut may leave a '.' or '-' last.
    let prefix = prefix.trim_end_matches(['.', '-']);
    format!("{prefix}{suffix}")
}

/// The longest prefix of `text` within `limit` bytes, on a char boundary.
pub fn truncate(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// FNV-1a, 64 bit: stable across builds and platforms, unlike std's
/// `DefaultHasher`, so every agent version names an Event alike.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
