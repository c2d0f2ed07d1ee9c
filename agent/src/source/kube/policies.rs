//! Policy objects served by the API → validated [`PolicyObject`]s, with the
//! last valid version of each object kept in force while an edit is
//! invalid, and a report per object for the status writer.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy as ApiNetworkPolicy;
use kube::api::DynamicObject;

use crate::{
    crd,
    kube_report::ObjectReport,
    policy::{
        model::{self, ObjectKind, Origin},
        parse, PolicyObject,
    },
    source::file::error_chain,
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

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Self::Network(o) => &o.metadata,
            Self::L4(o) | Self::ClusterL4(o) => &o.metadata,
        }
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
    namespace: String,
    name: String,
}

/// Remembers the last valid version of every object.
#[derive(Default)]
pub struct PolicyTracker {
    last_good: BTreeMap<ObjectKey, (String, PolicyObject)>,
}

/// What one pass over the policy objects produced.
pub struct TrackedPolicies {
    pub policies: Vec<PolicyObject>,
    pub problems: Vec<String>,
    pub reports: Vec<ObjectReport>,
}

impl PolicyTracker {
    pub fn track<'a>(
        &mut self,
        objects: impl IntoIterator<Item = ApiPolicy<'a>>,
    ) -> TrackedPolicies {
        let mut out = TrackedPolicies {
            policies: Vec::new(),
            problems: Vec::new(),
            reports: Vec::new(),
        };
        let mut next = BTreeMap::new();
        for object in objects {
            let meta = object.meta();
            let key = ObjectKey {
                kind: object.kind(),
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: meta.name.clone().unwrap_or_default(),
            };
            let uid = meta.uid.clone().unwrap_or_default();
            let problem = match object.validate() {
                Ok(policy) => {
                    next.insert(key.clone(), (uid.clone(), policy));
                    None
                }
                Err(e) => {
                    let kept = self.last_good.get(&key).filter(|(u, _)| *u == uid);
                    let consequence = match kept {
                        Some(previous) => {
                            next.insert(key.clone(), previous.clone());
                            "its last valid version stays enforced"
                        }
                        None => "it is not applied",
                    };
                    let display = match key.kind {
                        ObjectKind::ClusterL4Policy => format!("ClusterL4Policy {}", key.name),
                        kind => format!("{kind} {}/{}", key.namespace, key.name),
                    };
                    out.problems.push(format!("{display}: {e} ({consequence})"));
                    Some(e)
                }
            };
            out.reports.push(ObjectReport {
                kind: key.kind,
                namespace: key.namespace,
                name: key.name,
                uid,
                generation: meta.generation,
                problem,
            });
        }
        out.policies = next.values().map(|(_, p)| p.clone()).collect();
        self.last_good = next;
        out
    }
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
    fn a_recreated_object_inherits_nothing() {
        let mut tracker = PolicyTracker::default();
        tracker.track([ApiPolicy::L4(&l4("web", "u1", json!(80)))]);
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
        assert_eq!(out.policies[0].reference.name, "fine");
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
        assert_eq!(out.policies[0].reference.name, "fine");
        assert!(out.reports[0]
            .problem
            .as_deref()
            .unwrap()
            .contains("does not match the L4Policy schema"));
    }
}
