//! Endpoints no change since the previous compile can reach: the compile
//! replays their entries without working out their layers or fingerprint,
//! so a change costs what it touches rather than a walk over every
//! endpoint's rules.
//!
//! An endpoint-direction's entries are worked out from (see [`super::memo`]):
//! the ClusterL4Policies; its namespace's labels, NetworkPolicies and
//! L4Policies; its own endpoint id, labels and named ports; and the peer
//! classes with their identities (which classes a rule names, and for named
//! egress ports every pod class). When every one of these is what the
//! previous compile saw, the previous entries are the answer. Classes may
//! come and go meanwhile, as long as no rule of the endpoint's namespace or
//! of a ClusterL4Policy names another set of identities because of it (see
//! [`super::class_delta`]). Anything else
//! falls back to the fingerprint, so a wrong "unchanged" is the only way
//! this can err; hence each input is compared exactly: policies by
//! allocation (an object not re-parsed shares its rules) and else by value.

use std::sync::Arc;

use foldhash::{HashMap, HashSet};

use crate::policy::model::{
    ContainerPort, Inventory, Labels, PolicyKind, PolicyObject, PolicyRef, Workload,
};

/// A policy as the previous compile saw it. The `Arc` is kept, so its
/// address cannot be reused by another object while it is compared against.
#[derive(Debug, Clone)]
struct Seen {
    reference: PolicyRef,
    kind: Arc<PolicyKind>,
}

impl Seen {
    fn of(p: &PolicyObject) -> Self {
        Self {
            reference: p.reference.clone(),
            kind: p.kind.clone(),
        }
    }

    fn same(&self, other: &Seen) -> bool {
        self.reference == other.reference
            && (Arc::ptr_eq(&self.kind, &other.kind) || *self.kind == *other.kind)
    }
}

/// What one namespace contributes to its endpoints' layers.
#[derive(Debug, Clone, Default)]
struct NamespaceInputs {
    labels: Labels,
    /// Its NetworkPolicies and L4Policies, in [`PolicyRef`] order.
    policies: Vec<Seen>,
}

/// The policies and namespace labels of a compile: inputs shared by many
/// endpoints. (The classes are compared by [`super::class_delta`].)
#[derive(Debug, Clone, Default)]
pub struct SharedInputs {
    cluster: Vec<Seen>,
    namespaces: HashMap<String, NamespaceInputs>,
}

impl SharedInputs {
    /// `policies` sorted by reference (as the compile sorts them).
    pub fn of(inventory: &Inventory, policies: &[&PolicyObject]) -> Self {
        let mut inputs = Self::default();
        for n in &inventory.namespaces {
            inputs.namespaces.entry(n.name.clone()).or_default().labels = n.labels.clone();
        }
        for p in policies {
            match &*p.kind {
                PolicyKind::ClusterL4Policy(_) => inputs.cluster.push(Seen::of(p)),
                PolicyKind::NetworkPolicy(_) | PolicyKind::L4Policy(_) => inputs
                    .namespaces
                    .entry(p.reference.namespace.to_string())
                    .or_default()
                    .policies
                    .push(Seen::of(p)),
            }
        }
        inputs
    }

    /// Which namespaces' endpoints may have been reached by what changed
    /// since `before`. `reached`: whether the change of peer classes can
    /// reach the entries of a policy's rules (which classes they name).
    pub fn unchanged_since(
        &self,
        before: &SharedInputs,
        reached: impl Fn(&Arc<PolicyKind>) -> bool,
    ) -> Unchanged {
        let same_list = |now: &[Seen], then: &[Seen]| {
            now.len() == then.len()
                && now
                    .iter()
                    .zip(then)
                    .all(|(n, t)| n.same(t) && !reached(&n.kind))
        };
        if !same_list(&self.cluster, &before.cluster) {
            return Unchanged::default();
        }
        let empty = NamespaceInputs::default();
        let namespaces = self
            .namespaces
            .iter()
            .filter(|(name, now)| {
                let then = before.namespaces.get(*name).unwrap_or(&empty);
                now.labels == then.labels && same_list(&now.policies, &then.policies)
            })
            .map(|(name, _)| name.clone())
            .collect();
        // A namespace with no record and no policy now may have had either
        // before: it is not in `namespaces`, so it counts as changed.
        Unchanged { namespaces }
    }
}

/// Namespaces whose shared inputs are as the previous compile saw them.
#[derive(Debug, Default)]
pub struct Unchanged {
    namespaces: HashSet<String>,
}

impl Unchanged {
    pub fn namespace(&self, namespace: &str) -> bool {
        self.namespaces.contains(namespace)
    }
}

/// What an endpoint itself contributes to its entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInputs {
    endpoint_id: u32,
    labels: Arc<Labels>,
    ports: Vec<ContainerPort>,
}

impl EndpointInputs {
    pub fn of(endpoint: &Workload, endpoint_id: u32) -> Self {
        Self {
            endpoint_id,
            labels: endpoint.labels.clone(),
            ports: endpoint.ports.clone(),
        }
    }

    pub fn same(&self, endpoint: &Workload, endpoint_id: u32) -> bool {
        self.endpoint_id == endpoint_id
            && self.labels == endpoint.labels
            && self.ports == endpoint.ports
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::Namespace;

    fn policy(namespace: &str, name: &str, text: &str) -> PolicyObject {
        let yaml = format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, \
             namespace: {namespace}}}\nspec:\n  podSelector: {{matchLabels: {{app: {text}}}}}\n"
        );
        crate::policy::parse::parse_policies(std::path::Path::new("test.yaml"), &yaml)
            .expect("valid policy")
            .remove(0)
    }

    fn inventory(team: &str) -> Inventory {
        Inventory {
            namespaces: vec![
                Namespace {
                    name: "a".into(),
                    labels: [("team".to_string(), team.to_string())].into(),
                },
                Namespace {
                    name: "b".into(),
                    labels: Labels::new(),
                },
            ],
            ..Inventory::default()
        }
    }

    fn inputs(inventory: &Inventory, policies: &[PolicyObject]) -> SharedInputs {
        let refs: Vec<&PolicyObject> = policies.iter().collect();
        SharedInputs::of(inventory, &refs)
    }

    #[test]
    fn only_the_namespace_a_change_is_in_counts_as_reached() {
        let web = policy("a", "web", "web");
        let db = policy("b", "db", "db");
        let before = inputs(&inventory("x"), &[web.clone(), db.clone()]);

        // Shared, not re-parsed: nothing reached.
        let same = inputs(&inventory("x"), &[web.clone(), db.clone()]);
        let u = same.unchanged_since(&before, |_| false);
        assert!(u.namespace("a") && u.namespace("b"));

        // Re-parsed to an equal object: still nothing reached.
        let reparsed = inputs(&inventory("x"), &[policy("a", "web", "web"), db.clone()]);
        assert!(reparsed.unchanged_since(&before, |_| false).namespace("a"));

        // An edit in a: a is reached, b is not.
        let edited = inputs(&inventory("x"), &[policy("a", "web", "api"), db.clone()]);
        let u = edited.unchanged_since(&before, |_| false);
        assert!(!u.namespace("a") && u.namespace("b"));

        // A namespace label: only that namespace.
        let relabelled = inputs(&inventory("y"), &[web.clone(), db.clone()]);
        let u = relabelled.unchanged_since(&before, |_| false);
        assert!(!u.namespace("a") && u.namespace("b"));

        // A policy gone from b, and one appearing in a namespace with no
        // record: both reached.
        let moved = inputs(&inventory("x"), &[web.clone(), policy("c", "new", "x")]);
        let u = moved.unchanged_since(&before, |_| false);
        assert!(u.namespace("a") && !u.namespace("b") && !u.namespace("c"));

        // A class change that reaches b's policy reaches b only.
        let u = same.unchanged_since(&before, |p| **p == *db.kind);
        assert!(u.namespace("a") && !u.namespace("b"));
    }

    #[test]
    fn an_endpoint_is_reached_by_its_id_labels_and_ports_only() {
        let w = Workload {
            name: "p".into(),
            namespace: "a".into(),
            labels: Arc::new(Labels::from([("app".to_string(), "web".to_string())])),
            cgroup: None,
            ips: Vec::new(),
            ports: Vec::new(),
            service_account: None,
        };
        let seen = EndpointInputs::of(&w, 3);
        assert!(seen.same(&w, 3));
        assert!(!seen.same(&w, 4));
        let mut relabelled = w.clone();
        relabelled.labels_mut().insert("tier".into(), "1".into());
        assert!(!seen.same(&relabelled, 3));
        let mut ported = w.clone();
        ported.ports.push(ContainerPort {
            name: "http".into(),
            container_port: 80,
            protocol: crate::policy::model::Protocol::Tcp,
        });
        assert!(!seen.same(&ported, 3));
        let mut moved = w.clone();
        moved.ips.push("10.0.0.1".parse().unwrap());
        assert!(
            seen.same(&moved, 3),
            "an address is not an input of entries"
        );
    }
}
