//! Policy objects served by the API → validated [`PolicyObject`]s, with the
//! last valid version of each object kept in force while an edit is
//! invalid, and a report per object for the status writer.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::{
    api::networking::v1::NetworkPolicy as ApiNetworkPolicy,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::api::DynamicObject;

use crate::{
    crd,
    kube_report::ObjectReport,
    policy::{
        model::{self, ObjectKind, Origin},
        parse, PolicyObject, PolicyRef,
    },
    source::{
        file::error_chain,
        state::{key_of, StateError, StateStore},
    },
};

/// A policy object as the watchers hold it. Portcullis' own kinds are
/// watched untyped, so one object that does not decode is reported on its
/// own instead of failing the whole list.
pub enum ApiPolicy<'a> {
    Network(&'a ApiNetworkPolicy),
    L4(&'a DynamicObject),
    ClusterL4(&'a DynamicObject),
}

impl ApiPolicy<'_> {
    fn kind(&self) -> ObjectKind {
        match self {
            Self::Network(_) => ObjectKind::NetworkPolicy,
            Self::L4(_) => ObjectKind::L4Policy,
            Self::ClusterL4(_) => ObjectKind::ClusterL4Policy,
        }
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Self::Network(o) => &o.metadata,
            Self::L4(o) | Self::ClusterL4(o) => &o.metadata,
        }
    }

    /// The object as the API served it, as the state store keeps it: a
    /// [`Record`], serialized. Kept as bytes, not as a JSON value: at a
    /// thousand policies the values were a third of the agent's memory.
    fn to_record(&self) -> Arc<[u8]> {
        let kind = self.kind().as_str();
        match self {
            Self::Network(object) => serde_json::to_vec(&RecordOf { kind, object }),
            Self::L4(object) | Self::ClusterL4(object) => {
                serde_json::to_vec(&RecordOf { kind, object })
            }
        }
        .expect("API objects serialize")
        .into()
    }

    /// Validates the object as the file source validates a document.
    fn validate(&self) -> Result<PolicyObject, String> {
        match self {
            Self::Network(o) => {
                // Same wire form as a file: serialize, then read it strictly.
                let raw: model::NetworkPolicy = serde_json::to_value(o)
                    .and_then(serde_json::from_value)
                    .map_err(|e| format!("does not match the NetworkPolicy schema: {e}"))?;
                parse::network_policy(Origin::Kubernetes, &raw).map_err(|e| error_chain(&e))
            }
            Self::L4(o) => {
                let typed: crd::L4Policy = decode(o, "L4Policy")?;
                typed.to_policy().map_err(|e| error_chain(&e))
            }
            Self::ClusterL4(o) => {
                let typed: crd::ClusterL4Policy = decode(o, "ClusterL4Policy")?;
                typed.to_policy().map_err(|e| error_chain(&e))
            }
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(o: &DynamicObject, kind: &str) -> Result<T, String> {
    serde_json::to_value(o)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("does not match the {kind} schema: {e}"))
}

/// Identifies an object across its versions: a delete and re-create under
/// the same name is a new object (new UID) and inherits nothing.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ObjectKey {
    kind: ObjectKind,
    /// Shared with the [`PolicyRef`]s made from it.
    namespace: Arc<str>,
    name: Arc<str>,
}

impl ObjectKey {
    fn of(kind: ObjectKind, meta: &ObjectMeta) -> Self {
        Self {
            kind,
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
        }
    }

    fn policy_ref(&self) -> PolicyRef {
        PolicyRef {
            kind: self.kind,
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The object's file name in the state store.
    fn store_key(&self) -> String {
        key_of(&[
            &self.kind.as_str().to_ascii_lowercase(),
            &self.namespace,
            &self.name,
        ])
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ObjectKind::ClusterL4Policy => write!(f, "ClusterL4Policy {}", self.name),
            kind => write!(f, "{kind} {}/{}", self.namespace, self.name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("opening the last-valid policy state")]
    State {
        #[source]
        source: StateError,
    },
    #[error(
        "state file {path} holds no valid policy object ({reason}); refusing to guess \
         what was enforced: check it, then remove it to drop that last valid version"
    )]
    Invalid { path: PathBuf, reason: String },
}

/// How an object's last valid version is kept on disk: its kind, and the
/// object as the API served it (validated again when read back).
#[derive(serde::Deserialize)]
struct Record {
    kind: String,
    object: serde_json::Value,
}

/// A [`Record`] written straight from the served object.
#[derive(serde::Serialize)]
struct RecordOf<'a, T> {
    kind: &'a str,
    object: &'a T,
}

/// The last valid and applied version of an object.
#[derive(Clone, Debug)]
struct Committed {
    uid: String,
    policy: PolicyObject,
    /// The object as served, as the state store's record.
    record: Arc<[u8]>,
}

/// One object's validation, kept while its version is served: the API
/// server gives every write a new `resourceVersion`, so an object whose
/// UID and version are unchanged validates the same way again. Without
/// this every pass re-serialized and re-parsed every policy.
struct Validated {
    uid: String,
    resource_version: String,
    outcome: Result<(PolicyObject, Arc<[u8]>), String>,
}

/// What the latest pass offered, until [`PolicyTracker::settle`].
#[derive(Default)]
struct Pending {
    valid: BTreeMap<ObjectKey, Committed>,
    /// Every object present, by its UID.
    present: BTreeMap<ObjectKey, String>,
}

/// Remembers the last valid and applied version of every object, in
/// memory and (when durable) on disk, so an object edited into something
/// validation rejects keeps its last valid version enforced, across agent
/// restarts too. The API server's schema catches much, but not what only
/// our validation rejects.
#[derive(Default)]
pub struct PolicyTracker {
    committed: BTreeMap<ObjectKey, Committed>,
    /// Counts changes to `committed`: what a track answers depends on it.
    committed_changes: u64,
    validated: BTreeMap<ObjectKey, Validated>,
    store: Option<StateStore>,
    pending: Option<Arc<Pending>>,
    last: Option<LastTrack>,
}

/// The latest track, answered again while the same object versions are
/// served and nothing was committed since: most passes follow a pod or a
/// Service, and tracking a thousand unchanged policies cost milliseconds.
struct LastTrack {
    /// Kind, UID and `resourceVersion` of each object, in the order served.
    inputs: Vec<(ObjectKind, String, String)>,
    committed_changes: u64,
    output: TrackedPolicies,
    pending: Arc<Pending>,
}

impl LastTrack {
    /// Whether `objects` are the versions this track was made from. An
    /// object without a `resourceVersion` is never the same.
    fn same_inputs(&self, objects: &[ApiPolicy<'_>]) -> bool {
        self.inputs.len() == objects.len()
            && self
                .inputs
                .iter()
                .zip(objects)
                .all(|((kind, uid, version), o)| {
                    let meta = o.meta();
                    *kind == o.kind()
                        && !version.is_empty()
                        && meta.uid.as_deref().unwrap_or_default() == uid
                        && meta.resource_version.as_deref().unwrap_or_default() == version
                })
    }
}

/// What one pass over the policy objects produced.
#[derive(Clone)]
pub struct TrackedPolicies {
    pub policies: Vec<PolicyObject>,
    /// The last applied version of each object that has one.
    pub previous: BTreeMap<PolicyRef, PolicyObject>,
    pub problems: Vec<String>,
    pub reports: Vec<ObjectReport>,
}

impl PolicyTracker {
    /// A tracker whose last valid versions survive restarts in `dir`. Fails
    /// when a stored object cannot be read or is not valid.
    pub fn durable(dir: &Path) -> Result<Self, TrackerError> {
        let store = StateStore::open(dir).map_err(|source| TrackerError::State { source })?;
        let mut committed = BTreeMap::new();
        for (name, bytes) in store
            .load_all()
            .map_err(|source| TrackerError::State { source })?
        {
            let path = store.dir().join(&name);
            let invalid = |reason: String| TrackerError::Invalid {
                path: path.clone(),
                reason,
            };
            let record: Record =
                serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
            let (key, uid, policy) = revalidate(&record).map_err(invalid)?;
            if key.store_key() != name {
                return Err(invalid(format!("it holds {key}")));
            }
            committed.insert(
                key,
                Committed {
                    uid,
                    policy,
                    record: bytes.into(),
                },
            );
        }
        Ok(Self {
            committed,
            store: Some(store),
            ..Self::default()
        })
    }

    pub fn track<'a>(
        &mut self,
        objects: impl IntoIterator<Item = ApiPolicy<'a>>,
    ) -> TrackedPolicies {
        let objects: Vec<ApiPolicy<'a>> = objects.into_iter().collect();
        if let Some(last) = self.last.as_ref().filter(|last| {
            last.committed_changes == self.committed_changes && last.same_inputs(&objects)
        }) {
            self.pending = Some(Arc::clone(&last.pending));
            return last.output.clone();
        }
        let inputs = objects
            .iter()
            .map(|o| {
                let meta = o.meta();
                (
                    o.kind(),
                    meta.uid.clone().unwrap_or_default(),
                    meta.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect();
        let mut out = TrackedPolicies {
            policies: Vec::new(),
            previous: BTreeMap::new(),
            problems: Vec::new(),
            reports: Vec::new(),
        };
        let mut pending = Pending::default();
        let mut in_force = BTreeMap::new();
        let mut earlier = std::mem::take(&mut self.validated);
        for object in objects {
            let meta = object.meta();
            let key = ObjectKey::of(object.kind(), meta);
            let uid = meta.uid.clone().unwrap_or_default();
            pending.present.insert(key.clone(), uid.clone());
            let last = self.committed.get(&key).filter(|c| c.uid == uid);
            if let Some(last) = last {
                out.previous.insert(key.policy_ref(), last.policy.clone());
            }
            let version = meta.resource_version.as_deref().unwrap_or_default();
            // An object seen before at this version is not validated (nor
            // copied) again.
            let validated = match earlier.remove(&key) {
                Some(v) if !version.is_empty() && v.uid == uid && v.resource_version == version => {
                    v
                }
                _ => Validated {
                    uid: uid.clone(),
                    resource_version: version.to_string(),
                    outcome: object.validate().map(|policy| (policy, object.to_record())),
                },
            };
            let problem = match &validated.outcome {
                Ok((policy, json)) => {
                    in_force.insert(key.clone(), policy.clone());
                    pending.valid.insert(
                        key.clone(),
                        Committed {
                            uid: uid.clone(),
                            policy: policy.clone(),
                            record: Arc::clone(json),
                        },
                    );
                    None
                }
                Err(e) => {
                    let consequence = match last {
                        Some(previous) => {
                            in_force.insert(key.clone(), previous.policy.clone());
                            "its last valid version stays enforced"
                        }
                        None => "it is not applied",
                    };
                    out.problems.push(format!("{key}: {e} ({consequence})"));
                    Some(e.clone())
                }
            };
            if !version.is_empty() {
                self.validated.insert(key.clone(), validated);
            }
            out.reports.push(ObjectReport {
                kind: key.kind,
                namespace: key.namespace.to_string(),
                name: key.name.to_string(),
                uid,
                generation: meta.generation,
                problem,
            });
        }
        out.policies = in_force.into_values().collect();
        let pending = Arc::new(pending);
        self.pending = Some(Arc::clone(&pending));
        self.last = Some(LastTrack {
            inputs,
            committed_changes: self.committed_changes,
            output: out.clone(),
            pending,
        });
        out
    }

    /// Records what the latest [`PolicyTracker::track`] applied: valid
    /// objects not in `rejected` become their last valid version (on disk
    /// first, when durable); deleted or re-created objects are forgotten.
    /// `None`: nothing was applied, nothing changes. Returns problems.
    pub fn settle(&mut self, outcome: Option<&BTreeMap<PolicyRef, String>>) -> Vec<String> {
        let (Some(pending), Some(rejected)) = (self.pending.take(), outcome) else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        let store = self.store.as_ref();
        let mut persist = |result: Result<(), StateError>| match result {
            Ok(()) => true,
            Err(e) => {
                problems.push(format!(
                    "{} (after a restart an older version may stand in for it)",
                    error_chain(&e)
                ));
                false
            }
        };
        let gone: Vec<ObjectKey> = self
            .committed
            .iter()
            .filter(|(key, c)| pending.present.get(*key) != Some(&c.uid))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            if persist(store.map_or(Ok(()), |s| s.remove(&key.store_key()))) {
                self.committed.remove(&key);
                self.committed_changes += 1;
            }
        }
        for (key, version) in &pending.valid {
            if rejected.contains_key(&key.policy_ref()) {
                continue;
            }
            let unchanged = self
                .committed
                .get(key)
                .is_some_and(|c| c.uid == version.uid && c.policy == version.policy);
            if unchanged {
                continue;
            }
            let stored = store.map_or(Ok(()), |s| s.put(&key.store_key(), &version.record));
            if persist(stored) {
                self.committed.insert(key.clone(), version.clone());
                self.committed_changes += 1;
            }
        }
        problems
    }
}

/// Reads a stored object back through the same validation as a live one.
fn revalidate(record: &Record) -> Result<(ObjectKey, String, PolicyObject), String> {
    let decoded = |e: serde_json::Error| format!("not a {}: {e}", record.kind);
    let (kind, meta, policy) = match record.kind.as_str() {
        "NetworkPolicy" => {
            let o: ApiNetworkPolicy =
                serde_json::from_value(record.object.clone()).map_err(decoded)?;
            let policy = ApiPolicy::Network(&o).validate()?;
            (ObjectKind::NetworkPolicy, o.metadata, policy)
        }
        "L4Policy" | "ClusterL4Policy" => {
            let o: DynamicObject =
                serde_json::from_value(record.object.clone()).map_err(decoded)?;
            let (kind, api) = if record.kind == "L4Policy" {
                (ObjectKind::L4Policy, ApiPolicy::L4(&o))
            } else {
                (ObjectKind::ClusterL4Policy, ApiPolicy::ClusterL4(&o))
            };
            let policy = api.validate()?;
            (kind, o.metadata, policy)
        }
        other => return Err(format!("unknown kind {other:?}")),
    };
    let uid = meta.uid.clone().unwrap_or_default();
    Ok((ObjectKey::of(kind, &meta), uid, policy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ApiResource;
    use serde_json::json;

    fn l4(name: &str, uid: &str, port: serde_json::Value) -> DynamicObject {
        let ar = ApiResource::erase::<crd::L4Policy>(&());
        let mut o = DynamicObject::new(name, &ar).within("x");
        o.metadata.uid = Some(uid.into());
        o.data = json!({"spec": {
            "podSelector": {},
            "ingress": [{"ports": [{"port": port}]}],
        }});
        o
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_valid_version_and_is_reported() {
        let mut tracker = PolicyTracker::default();
        let good = l4("web", "u1", json!(80));
        let first = tracker.track([ApiPolicy::L4(&good)]);
        assert_eq!(first.policies.len(), 1);
        assert!(first.reports[0].problem.is_none());
        tracker.settle(Some(&BTreeMap::new()));

        let bad = l4("web", "u1", json!(70000));
        let second = tracker.track([ApiPolicy::L4(&bad)]);
        assert_eq!(second.policies, first.policies, "last valid version kept");
        let problem = second.reports[0].problem.as_deref().unwrap();
        assert!(problem.contains("70000"), "{problem}");
        assert!(
            second.problems[0].contains("L4Policy x/web")
                && second.problems[0].contains("last valid version stays enforced"),
            "{:?}",
            second.problems
        );
    }

    #[test]
    fn a_served_version_is_validated_once_and_every_new_version_again() {
        let versioned = |uid: &str, version: &str, port| {
            let mut o = l4("web", uid, port);
            o.metadata.resource_version = Some(version.into());
            o
        };
        let mut tracker = PolicyTracker::default();
        let first = tracker.track([ApiPolicy::L4(&versioned("u1", "7", json!(80)))]);
        tracker.settle(Some(&BTreeMap::new()));
        let again = tracker.track([ApiPolicy::L4(&versioned("u1", "7", json!(80)))]);
        assert!(
            std::sync::Arc::ptr_eq(&first.policies[0].kind, &again.policies[0].kind),
            "the same version is not validated again"
        );
        tracker.settle(Some(&BTreeMap::new()));
        // A new version (an invalid edit) and a re-created object under the
        // same version string are both validated afresh.
        let edited = tracker.track([ApiPolicy::L4(&versioned("u1", "8", json!(70000)))]);
        assert!(edited.reports[0].problem.is_some(), "the edit was judged");
        assert_eq!(edited.policies, first.policies, "last valid version kept");
        tracker.settle(Some(&BTreeMap::new()));
        let recreated = tracker.track([ApiPolicy::L4(&versioned("u2", "8", json!(443)))]);
        assert!(recreated.reports[0].problem.is_none());
        assert_ne!(recreated.policies, first.policies, "the new object's rules");
    }

    #[test]
    fn unchanged_versions_are_answered_again_until_a_settle_commits_something() {
        let versioned = |uid: &str, version: &str, port| {
            let mut o = l4("web", uid, port);
            o.metadata.resource_version = Some(version.into());
            o
        };
        let v1 = versioned("u1", "7", json!(80));
        let mut tracker = PolicyTracker::default();
        let first = tracker.track([ApiPolicy::L4(&v1)]);
        assert!(first.previous.is_empty(), "nothing committed yet");
        // Held back: nothing is committed, so the same versions give the
        // same answer (from the last track).
        let rejected = BTreeMap::from([(PolicyRef::l4_policy("x", "web"), "too big".into())]);
        tracker.settle(Some(&rejected));
        let again = tracker.track([ApiPolicy::L4(&v1)]);
        assert!(again.previous.is_empty());
        assert_eq!(again.policies, first.policies);
        // Applied now: the settle commits v1, so the same versions must be
        // answered afresh, naming v1 as the last valid version.
        tracker.settle(Some(&BTreeMap::new()));
        let after_commit = tracker.track([ApiPolicy::L4(&v1)]);
        assert_eq!(
            after_commit.previous.values().cloned().collect::<Vec<_>>(),
            first.policies,
            "a commit since the last track is seen"
        );
        // An invalid edit is judged, not answered from the last track, and
        // the committed v1 stays in force.
        tracker.settle(Some(&BTreeMap::new()));
        let bad = versioned("u1", "8", json!(70000));
        let edited = tracker.track([ApiPolicy::L4(&bad)]);
        assert!(edited.reports[0].problem.is_some(), "the edit was judged");
        assert_eq!(edited.policies, first.policies, "last valid version kept");
        // A deletion is a change too.
        tracker.settle(Some(&BTreeMap::new()));
        let gone = tracker.track(Vec::<ApiPolicy>::new());
        assert!(gone.policies.is_empty() && gone.reports.is_empty());
    }

    #[test]
    fn a_recreated_object_inherits_nothing() {
        let mut tracker = PolicyTracker::default();
        tracker.track([ApiPolicy::L4(&l4("web", "u1", json!(80)))]);
        tracker.settle(Some(&BTreeMap::new()));
        let recreated = l4("web", "u2", json!(0));
        let out = tracker.track([ApiPolicy::L4(&recreated)]);
        assert!(out.policies.is_empty());
        assert!(
            out.problems[0].contains("it is not applied"),
            "{:?}",
            out.problems
        );
    }

    #[test]
    fn an_over_long_name_from_the_api_is_a_problem_for_that_object() {
        let mut tracker = PolicyTracker::default();
        let long = l4(&"w".repeat(300), "u5", json!(80));
        let fine = l4("fine", "u6", json!(443));
        let bad_label = {
            let mut o = l4("labels", "u7", json!(80));
            o.data["spec"]["podSelector"] = json!({"matchLabels": {"app": "a b"}});
            o
        };
        let out = tracker.track([
            ApiPolicy::L4(&long),
            ApiPolicy::L4(&fine),
            ApiPolicy::L4(&bad_label),
        ]);
        assert_eq!(out.policies.len(), 1);
        assert_eq!(out.policies[0].reference.name.as_ref(), "fine");
        let problem = out.reports[0].problem.as_deref().unwrap();
        assert!(
            problem.contains("metadata.name") && problem.contains("at most 253 characters"),
            "{problem}"
        );
        let problem = out.reports[2].problem.as_deref().unwrap();
        assert!(
            problem.contains("spec.podSelector.matchLabels")
                && problem.contains("label value \"a b\" of key \"app\" is invalid"),
            "{problem}"
        );
    }

    #[test]
    fn an_object_that_does_not_decode_is_reported_alone() {
        let mut tracker = PolicyTracker::default();
        let mut broken = l4("broken", "u3", json!(80));
        broken.data = json!({"spec": {"podSelector": {}, "ingress": "not a list"}});
        let fine = l4("fine", "u4", json!(443));
        let out = tracker.track([ApiPolicy::L4(&broken), ApiPolicy::L4(&fine)]);
        assert_eq!(out.policies.len(), 1);
        assert_eq!(out.policies[0].reference.name.as_ref(), "fine");
        assert!(out.reports[0]
            .problem
            .as_deref()
            .unwrap()
            .contains("does not match the L4Policy schema"));
    }

    fn applied_whole(tracker: &mut PolicyTracker) {
        assert!(tracker.settle(Some(&BTreeMap::new())).is_empty());
    }

    #[test]
    fn the_last_valid_version_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut tracker = PolicyTracker::durable(dir.path()).unwrap();
        let good = l4("web", "u1", json!(80));
        let first = tracker.track([ApiPolicy::L4(&good)]);
        applied_whole(&mut tracker);

        // A new agent process meets the object edited into something only
        // our validation rejects.
        let mut restarted = PolicyTracker::durable(dir.path()).unwrap();
        let bad = l4("web", "u1", json!(70000));
        let out = restarted.track([ApiPolicy::L4(&bad)]);
        assert_eq!(out.policies, first.policies, "the last valid version holds");
        assert!(
            out.problems[0].contains("last valid version stays enforced"),
            "{:?}",
            out.problems
        );
        assert!(out.reports[0].problem.is_some(), "and it is reported");
        applied_whole(&mut restarted);

        // Deleted (absent from a complete list): forgotten on disk too.
        restarted.track([]);
        applied_whole(&mut restarted);
        let out = PolicyTracker::durable(dir.path())
            .unwrap()
            .track([ApiPolicy::L4(&bad)]);
        assert!(out.policies.is_empty());
    }

    #[test]
    fn a_held_back_version_is_not_recorded_and_nothing_is_on_a_failed_pass() {
        let dir = tempfile::tempdir().unwrap();
        let mut tracker = PolicyTracker::durable(dir.path()).unwrap();
        let v1 = tracker.track([ApiPolicy::L4(&l4("web", "u1", json!(80)))]);
        applied_whole(&mut tracker);
        let v2 = tracker.track([ApiPolicy::L4(&l4("web", "u1", json!(81)))]);
        assert_eq!(
            v2.previous.values().cloned().collect::<Vec<_>>(),
            v1.policies
        );
        let rejected = BTreeMap::from([(PolicyRef::l4_policy("x", "web"), "too big".into())]);
        tracker.settle(Some(&rejected));
        tracker.track([ApiPolicy::L4(&l4("web", "u1", json!(82)))]);
        tracker.settle(None);
        let out = PolicyTracker::durable(dir.path())
            .unwrap()
            .track([ApiPolicy::L4(&l4("web", "u1", json!(70000)))]);
        assert_eq!(out.policies, v1.policies);
    }

    #[test]
    fn a_damaged_state_file_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut tracker = PolicyTracker::durable(dir.path()).unwrap();
        tracker.track([ApiPolicy::L4(&l4("web", "u1", json!(80)))]);
        applied_whole(&mut tracker);
        let store = StateStore::open(dir.path()).unwrap();
        let key = ObjectKey {
            kind: ObjectKind::L4Policy,
            namespace: "x".into(),
            name: "web".into(),
        }
        .store_key();
        store
            .put(&key, b"{\"kind\": \"L4Policy\", \"object\": 7}")
            .unwrap();
        let e = error_chain(&PolicyTracker::durable(dir.path()).err().unwrap());
        assert!(
            e.contains(&key) && e.contains("no valid policy object"),
            "{e}"
        );
        let mut raw = std::fs::read(dir.path().join(&key)).unwrap();
        raw.pop();
        std::fs::write(dir.path().join(&key), raw).unwrap();
        let e = error_chain(&PolicyTracker::durable(dir.path()).err().unwrap());
        assert!(e.contains(&key) && e.contains("corrupt"), "{e}");
    }
}
