//! Policy objects served by the API → validated [`PolicyObject`]s, with the
//! last valid version of each object kept in force while an edit is
//! invalid, and a report per object for the status writer.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
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
}

/// One served object as the last track saw it, kept while its version is
/// served: the API server gives every write a new `resourceVersion`, so an
/// object whose UID and version are unchanged validates the same way again.
/// Without this every pass re-serialized and re-parsed every policy.
struct Served {
    key: ObjectKey,
    uid: String,
    resource_version: String,
    outcome: Result<(PolicyObject, Arc<[u8]>), String>,
    report: ObjectReport,
    /// The track that last saw it.
    seen_in: u64,
}

impl Served {
    fn of(object: &ApiPolicy<'_>, key: ObjectKey, seen_in: u64) -> Self {
        let meta = object.meta();
        let outcome = object.validate().map(|policy| (policy, object.to_record()));
        let uid = meta.uid.clone().unwrap_or_default();
        Self {
            report: ObjectReport {
                kind: key.kind,
                namespace: key.namespace.to_string(),
                name: key.name.to_string(),
                uid: uid.clone(),
                generation: meta.generation,
                problem: outcome.as_ref().err().cloned(),
            },
            key,
            uid,
            resource_version: meta.resource_version.clone().unwrap_or_default(),
            outcome,
            seen_in,
        }
    }

    /// Whether `object` is this version of this object. An object without
    /// a UID or a `resourceVersion` is never the same.
    fn is(&self, object: &ApiPolicy<'_>) -> bool {
        let meta = object.meta();
        let version = meta.resource_version.as_deref().unwrap_or_default();
        !self.uid.is_empty()
            && !version.is_empty()
            && self.resource_version == version
            && self.key.kind == object.kind()
            && *self.key.namespace == *meta.namespace.as_deref().unwrap_or_default()
            && *self.key.name == *meta.name.as_deref().unwrap_or_default()
    }
}

/// Where a served object is kept: by UID, so an unchanged object is found
/// without building its key; one without a UID by its key.
fn served_id<'a>(object: &'a ApiPolicy<'_>) -> Cow<'a, str> {
    let meta = object.meta();
    id_of(
        object.kind(),
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
        meta.uid.as_deref().unwrap_or_default(),
    )
}

fn id_of<'a>(kind: ObjectKind, namespace: &str, name: &str, uid: &'a str) -> Cow<'a, str> {
    if uid.is_empty() {
        format!("\0{}\0{namespace}\0{name}", kind.as_str()).into()
    } else {
        uid.into()
    }
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
    /// The objects the last track was given, by [`served_id`].
    served: HashMap<String, Served>,
    /// Counts tracks.
    tracks: u64,
    store: Option<StateStore>,
    /// `served` is what the last track offered, not settled yet.
    unsettled: bool,
    /// The last track's answer, and the commits it saw: answered again
    /// while the same object versions are served and nothing was committed
    /// since (most passes follow a pod or a Service).
    last: Option<(u64, TrackedPolicies)>,
}

/// What one pass over the policy objects produced.
#[derive(Clone)]
pub struct TrackedPolicies {
    pub policies: Arc<Vec<PolicyObject>>,
    /// The last applied version of each object that has one.
    pub previous: Arc<BTreeMap<PolicyRef, PolicyObject>>,
    pub problems: Vec<String>,
    /// Shared with the tracker's last answer: most passes report what the
    /// last one did, and a thousand reports were a copy each pass.
    pub reports: Arc<Vec<ObjectReport>>,
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
            committed.insert(key, Committed { uid, policy });
        }
        Ok(Self {
            committed,
            store: Some(store),
            ..Self::default()
        })
    }

    /// The policies to enforce from the objects served now (a complete
    /// list): each valid object as served, each invalid one by its last
    /// valid version if it has one. Only objects whose version is new are
    /// validated; the answer is built again only when some object came,
    /// went or changed, or a settle committed something.
    pub fn track<'a>(
        &mut self,
        objects: impl IntoIterator<Item = ApiPolicy<'a>>,
    ) -> TrackedPolicies {
        self.tracks += 1;
        self.unsettled = true;
        let round = self.tracks;
        let mut fresh = Vec::new();
        let mut kept = 0;
        for object in objects {
            let id = served_id(&object);
            match self.served.get_mut(&*id) {
                Some(served) if served.seen_in != round && served.is(&object) => {
                    served.seen_in = round;
                    kept += 1;
                }
                _ => {
                    let key = ObjectKey::of(object.kind(), object.meta());
                    fresh.push((id.into_owned(), Served::of(&object, key, round)));
                }
            }
        }
        let changed = !fresh.is_empty() || kept != self.served.len();
        if changed {
            // A reflector's store holds one object per name: a name served
            // again under a new UID (re-created) replaces the old object,
            // which this list no longer has.
            self.served.retain(|_, served| served.seen_in == round);
            self.served.extend(fresh);
        }
        match &self.last {
            Some((commits, answer)) if !changed && *commits == self.committed_changes => {
                answer.clone()
            }
            _ => {
                let answer = self.answer();
                self.last = Some((self.committed_changes, answer.clone()));
                answer
            }
        }
    }

    /// The last track's answer again, for a pass whose events named no
    /// policy object (the stores serve what the last track was given),
    /// unless a settle committed something since. Saves walking and
    /// comparing every served object: at a thousand policies that was
    /// about 2 ms of every pod's pass.
    pub fn repeat(&mut self) -> Option<TrackedPolicies> {
        let (commits, answer) = self.last.as_ref()?;
        if *commits != self.committed_changes {
            return None;
        }
        // Settled as a full track would be: a change held back before may
        // be applied by this pass.
        self.unsettled = true;
        Some(answer.clone())
    }

    /// What the served objects mean for enforcement, in key order.
    fn answer(&self) -> TrackedPolicies {
        let mut served: Vec<&Served> = self.served.values().collect();
        served.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        let mut out = TrackedPolicies {
            policies: Arc::default(),
            previous: Arc::default(),
            problems: Vec::new(),
            reports: Arc::default(),
        };
        let mut reports = Vec::with_capacity(served.len());
        let mut policies = Vec::with_capacity(served.len());
        let mut previous = Vec::new();
        // Both in key order: walked side by side.
        let mut committed = self.committed.iter().peekable();
        for s in served {
            while committed.next_if(|(key, _)| **key < s.key).is_some() {}
            let last = committed
                .peek()
                .filter(|(key, c)| **key == s.key && c.uid == s.uid)
                .map(|(_, c)| *c);
            if let Some(last) = last {
                previous.push((s.key.policy_ref(), last.policy.clone()));
            }
            match &s.outcome {
                Ok((policy, _)) => policies.push(policy.clone()),
                Err(e) => {
                    let consequence = match last {
                        Some(previous) => {
                            policies.push(previous.policy.clone());
                            "its last valid version stays enforced"
                        }
                        None => "it is not applied",
                    };
                    out.problems.push(format!("{}: {e} ({consequence})", s.key));
                }
            }
            reports.push(s.report.clone());
        }
        out.reports = Arc::new(reports);
        out.policies = Arc::new(policies);
        out.previous = Arc::new(previous.into_iter().collect());
        out
    }

    /// Records what the latest [`PolicyTracker::track`] applied: valid
    /// objects not in `rejected` become their last valid version (on disk
    /// first, when durable); deleted or re-created objects are forgotten.
    /// `None`: nothing was applied, nothing changes. Returns problems.
    pub fn settle(&mut self, outcome: Option<&BTreeMap<PolicyRef, String>>) -> Vec<String> {
        let (true, Some(rejected)) = (std::mem::take(&mut self.unsettled), outcome) else {
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
        let served = &self.served;
        let gone: Vec<ObjectKey> = self
            .committed
            .iter()
            .filter(|(key, c)| {
                let id = id_of(key.kind, &key.namespace, &key.name, &c.uid);
                !served
                    .get(&*id)
                    .is_some_and(|s| s.key == **key && s.uid == c.uid)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            if persist(store.map_or(Ok(()), |s| s.remove(&key.store_key()))) {
                self.committed.remove(&key);
                self.committed_changes += 1;
            }
        }
        for s in self.served.values() {
            let Ok((policy, record)) = &s.outcome else {
                continue;
            };
            if !rejected.is_empty() && rejected.contains_key(&s.key.policy_ref()) {
                continue;
            }
            let unchanged = self
                .committed
                .get(&s.key)
                .is_some_and(|c| c.uid == s.uid && c.policy == *policy);
            if unchanged {
                continue;
            }
            let stored = store.map_or(Ok(()), |st| st.put(&s.key.store_key(), record));
            if persist(stored) {
                self.committed.insert(
                    s.key.clone(),
                    Committed {
                        uid: s.uid.clone(),
                        policy: policy.clone(),
                    },
                );
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
            *first.policies,
            "a commit since the last track is seen"
        );
        // With no policy event the answer is repeated, committed v1 included,
        // and settled like a full track's.
        tracker.settle(Some(&BTreeMap::new()));
        let repeated = tracker.repeat().expect("nothing committed since");
        assert_eq!(repeated.policies, after_commit.policies);
        assert_eq!(repeated.previous, after_commit.previous);
        assert!(tracker.settle(Some(&BTreeMap::new())).is_empty());
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
        // The settle forgets v1: a commit, so the last answer is stale.
        tracker.settle(Some(&BTreeMap::new()));
        assert!(tracker.repeat().is_none(), "a commit since the last track");
    }

    #[test]
    fn nothing_is_repeated_before_a_first_track() {
        assert!(PolicyTracker::default().repeat().is_none());
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
        let problem_of = |name: &str| {
            let report = out.reports.iter().find(|r| r.name.starts_with(name));
            report.and_then(|r| r.problem.clone()).unwrap()
        };
        let problem = problem_of("www");
        assert!(
            problem.contains("metadata.name") && problem.contains("at most 253 characters"),
            "{problem}"
        );
        let problem = problem_of("labels");
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

    /// The tracker answers from what it kept of unchanged objects; its
    /// answers must be those of a tracker that validates every object
    /// afresh (objects without a `resourceVersion` are never kept), through
    /// random adds, valid and invalid edits, deletions, re-creations and
    /// held-back settles.
    #[test]
    fn kept_answers_equal_answers_worked_out_afresh() {
        use proptest::{prelude::*, test_runner::TestRunner};
        let step = (0usize..6, 0u8..5, any::<bool>());
        TestRunner::default()
            .run(&proptest::collection::vec(step, 1..40), |steps| {
                let mut kept = PolicyTracker::default();
                let mut afresh = PolicyTracker::default();
                // name → (uid generation, version, port)
                let mut live: BTreeMap<usize, (u32, u32, i64)> = BTreeMap::new();
                let mut version = 0;
                for (name, action, hold_back) in steps {
                    version += 1;
                    match action {
                        0 => {
                            live.remove(&name);
                        }
                        1 => {
                            // Re-created: a new UID.
                            let uid = live.get(&name).map_or(0, |l| l.0 + 1);
                            live.insert(name, (uid, version, 80));
                        }
                        2 => {
                            // An invalid edit.
                            let uid = live.get(&name).map_or(0, |l| l.0);
                            live.insert(name, (uid, version, 70000));
                        }
                        _ => {
                            let uid = live.get(&name).map_or(0, |l| l.0);
                            live.insert(name, (uid, version, 1000 + version as i64));
                        }
                    }
                    let objects = |versioned: bool| -> Vec<DynamicObject> {
                        live.iter()
                            .map(|(name, (uid, version, port))| {
                                let mut o =
                                    l4(&format!("p{name}"), &format!("u{name}-{uid}"), json!(port));
                                if versioned {
                                    o.metadata.resource_version = Some(version.to_string());
                                }
                                o
                            })
                            .collect()
                    };
                    let (with, without) = (objects(true), objects(false));
                    let a = kept.track(with.iter().map(ApiPolicy::L4));
                    let b = afresh.track(without.iter().map(ApiPolicy::L4));
                    prop_assert_eq!(&a.policies, &b.policies);
                    prop_assert_eq!(&a.previous, &b.previous);
                    prop_assert_eq!(&a.problems, &b.problems);
                    prop_assert_eq!(&a.reports, &b.reports);
                    let rejected: BTreeMap<PolicyRef, String> = if hold_back {
                        a.policies
                            .iter()
                            .take(1)
                            .map(|p| (p.reference.clone(), "too big".into()))
                            .collect()
                    } else {
                        BTreeMap::new()
                    };
                    kept.settle(Some(&rejected));
                    afresh.settle(Some(&rejected));
                }
                Ok(())
            })
            .unwrap();
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
            *v1.policies
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
