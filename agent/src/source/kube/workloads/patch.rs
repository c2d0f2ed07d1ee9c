//! The next view from the few pods that changed, without reading the rest.
//!
//! A view is mostly a list of pods that do not depend on each other: each
//! pod's workload depends on that pod alone, and on the others only where
//! two claim one address or one cgroup (or a pod takes the node's CIDR
//! gateway). So when the events name the pods that changed, and none of
//! them touches such a claim, in the old view or in the new, the new view is
//! the old one with those pods' workloads put in, taken out or replaced.
//! Anything else, however rare, is left to the full view, which settles
//! every claim: a patch gives exactly what the full view would, or nothing.
//! At five thousand pods the full view was most of a pod change's load.

use std::{net::IpAddr, path::PathBuf, sync::Arc};

use super::{order_key, CgroupLookup, LocalPods, Pod, Translated, Translations};
use crate::policy::model::{Inventory, Workload, WorkloadRef};

/// A named pod as the patch found it.
struct Changed {
    /// Its kept entry's key in `by_object`, if one is kept.
    before: Option<usize>,
    /// The store's object and its translation, if the pod exists.
    now: Option<(Arc<Pod>, Translated)>,
    /// (namespace, name) and its workload in the new view.
    workload: (WorkloadRef, Option<Arc<Workload>>),
}

impl Translations {
    /// The changes that bring `last` (the last view this made, unchanged
    /// since) to what a full view of the store would be now, when only the
    /// pods `named` (namespace, name) changed, the node is `node_name` and
    /// `cgroups` is the listing the last view looked pods up in. `None`
    /// when only a full view can tell: a named pod, before or after, is on
    /// the host's network, or holds an address or cgroup another claims,
    /// the node's, a gateway, or a Service's cluster IP. The kept
    /// translations then stay as they were.
    pub fn patch<'a>(
        &mut self,
        node_name: &str,
        last: &Inventory,
        named: impl IntoIterator<Item = (&'a str, &'a str)>,
        current: impl Fn(&str, &str) -> Option<Arc<Pod>>,
        cgroups: &impl CgroupLookup,
    ) -> Option<Vec<(WorkloadRef, Option<Arc<Workload>>)>> {
        if self.views == 0 || self.node_name != node_name || self.cgroup_taken {
            return None;
        }
        // Each pod once, however often it is named.
        let mut named: Vec<(&str, &str)> = named.into_iter().collect();
        named.sort_unstable();
        named.dedup();
        let mut changes: Vec<Changed> = Vec::new();
        for (namespace, name) in named {
            let kept = self.kept(namespace, name);
            let now = current(namespace, name);
            let before = match (kept, &now) {
                (None, None) => continue,
                (Some((pod, _)), Some(now)) if Arc::ptr_eq(pod, now) => continue,
                (Some((pod, translated)), _) => {
                    if translated.host_network || self.claims_shared(&translated.workload.ips) {
                        return None;
                    }
                    Some((Arc::as_ptr(pod) as usize, pod, translated))
                }
                (None, Some(_)) => None,
            };
            let reference = WorkloadRef {
                namespace: namespace.to_string(),
                name: name.to_string(),
            };
            let Some(pod) = now else {
                changes.push(Changed {
                    before: before.map(|(at, ..)| at),
                    now: None,
                    workload: (reference, None),
                });
                continue;
            };
            let mut translated = Translated::of(&pod, &self.node_name);
            if let Some((_, kept_pod, kept)) = &before {
                if kept_pod.metadata.uid == pod.metadata.uid {
                    translated.share_workload_of(kept);
                }
            }
            if translated.host_network || order_key(&pod) != (namespace, name) {
                return None;
            }
            let mut unused = LocalPods::default();
            let workload = translated.in_view(&pod, cgroups, &mut unused);
            if let Some(w) = &workload {
                if self.claims_shared(&w.ips) {
                    return None;
                }
            }
            changes.push(Changed {
                before: before.map(|(at, ..)| at),
                now: Some((pod, translated)),
                workload: (reference, workload),
            });
        }
        if !claims_are_free(last, &changes) {
            return None;
        }
        Some(self.commit(changes))
    }

    /// Whether any of `ips` is one the last view settled between claimants
    /// (a pod, a node address) or is a gateway, which is the node's only
    /// while no pod holds it. For a pod's old addresses this is what lets
    /// another claimant have one; for its new ones `claims_are_free`
    /// finds the holder too, and this is the cheaper test.
    fn claims_shared(&self, ips: &[IpAddr]) -> bool {
        ips.iter()
            .any(|ip| self.contested.contains(ip) || self.gateways.contains(ip))
    }

    /// Keeps the named pods' new translations in place of the old ones, as
    /// a full view would have, and hands out their workloads.
    fn commit(&mut self, changes: Vec<Changed>) -> Vec<(WorkloadRef, Option<Arc<Workload>>)> {
        let view = self.views;
        let mut out = Vec::with_capacity(changes.len());
        for changed in changes {
            if let Some(at) = changed.before {
                self.by_object.remove(&at);
                self.order.retain(|kept| *kept != at);
            }
            if let Some((pod, mut translated)) = changed.now {
                translated.seen_in = view;
                let at = Arc::as_ptr(&pod) as usize;
                let key = order_key(&pod);
                let by_object = &self.by_object;
                let place = self
                    .order
                    .partition_point(|other| order_key(&by_object[other].0) <= key);
                self.order.insert(place, at);
                self.by_object.insert(at, (pod, translated));
            }
            out.push(changed.workload);
        }
        out
    }
}

/// Whether the changed pods' new addresses and cgroups are free: held by
/// no other workload of `last` (nor by a named pod's old workload, which
/// may or may not leave first), by no node address or cluster IP, and by
/// no two of the changed pods.
fn claims_are_free(last: &Inventory, changes: &[Changed]) -> bool {
    let mut ips: Vec<IpAddr> = Vec::new();
    let mut cgroups: Vec<&PathBuf> = Vec::new();
    for (_, workload) in changes.iter().map(|c| &c.workload) {
        let Some(w) = workload else { continue };
        for ip in &w.ips {
            if ips.contains(ip) {
                return false;
            }
            ips.push(*ip);
        }
        if let Some(cgroup) = &w.cgroup {
            if cgroups.contains(&cgroup) {
                return false;
            }
            cgroups.push(cgroup);
        }
    }
    if ips.is_empty() && cgroups.is_empty() {
        return true;
    }
    let taken_by_node_or_service = last.node_ips.iter().any(|n| ips.contains(n))
        || last
            .services
            .iter()
            .flat_map(|s| s.cluster_ips.iter())
            .any(|c| ips.contains(c));
    if taken_by_node_or_service {
        return false;
    }
    // Every workload of the last view, the named pods' old ones included:
    // an address moving between two named pods is left to the full view.
    // A named pod's own old address or cgroup is its own, though.
    last.workloads.iter().all(|w| {
        let own = changes.iter().find(|c| {
            let (named, _) = &c.workload;
            named.namespace == w.namespace && named.name == w.name
        });
        let own_now = own.and_then(|c| c.workload.1.as_ref());
        let free_ips = w
            .ips
            .iter()
            .all(|ip| !ips.contains(ip) || own_now.is_some_and(|now| now.ips.contains(ip)));
        let free_cgroup = w.cgroup.as_ref().is_none_or(|cgroup| {
            !cgroups.contains(&cgroup)
                || own_now.is_some_and(|now| now.cgroup.as_ref() == Some(cgroup))
        });
        free_ips && free_cgroup
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Node;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::policy::model::{CheckedInventory, Service};

    /// Cgroups by UID, so two pods given one UID claim one cgroup; the
    /// listing never changes.
    struct ByUid;
    impl CgroupLookup for ByUid {
        fn pod_cgroup(&self, pod: &Pod) -> Result<PathBuf, PathBuf> {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            Ok(PathBuf::from(format!("/cg/{uid}")))
        }
        fn listing(&self) -> Option<u64> {
            Some(1)
        }
    }

    /// The node: 10.0.0.1, with the gateway 10.0.1.1 of its pod CIDR.
    fn node() -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.0.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}
        }))
        .unwrap()
    }

    /// A pod of a few shapes, over a few names, addresses and UIDs, so that
    /// pods collide on addresses (the node's and the gateway among them),
    /// cgroups and names, finish, go to the host's network and come back.
    #[derive(Clone, Debug)]
    struct PodSpec {
        namespace: &'static str,
        name: u8,
        uid: u8,
        local: bool,
        ip: Option<u8>,
        ipv6: bool,
        app: &'static str,
        host_network: bool,
        finished: bool,
        terminating: bool,
        age: u8,
    }

    impl PodSpec {
        fn key(&self) -> (String, String) {
            (self.namespace.to_string(), format!("p{}", self.name))
        }

        fn pod(&self) -> Arc<Pod> {
            let (namespace, name) = self.key();
            // 10.0.0.1 is the node's, 10.0.1.1 the gateway.
            let ip = self.ip.map(|i| match i {
                0 => "10.0.0.1".to_string(),
                i => format!("10.0.1.{i}"),
            });
            let mut ips: Vec<serde_json::Value> = ip.iter().map(|ip| json!({"ip": ip})).collect();
            if self.ipv6 {
                ips.push(json!({"ip": format!("fd00::{}", self.name + 1)}));
            }
            let mut pod: Pod = serde_json::from_value(json!({
                "metadata": {
                    "name": name, "namespace": namespace, "uid": format!("u{}", self.uid),
                    "labels": {"app": self.app},
                    "creationTimestamp": format!("2026-01-01T00:00:0{}Z", self.age),
                },
                "spec": {"nodeName": if self.local { "n1" } else { "n2" },
                         "hostNetwork": self.host_network,
                         "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
                "status": {"phase": if self.finished { "Succeeded" } else { "Running" },
                           "podIPs": ips}
            }))
            .unwrap();
            if self.terminating {
                pod.metadata.deletion_timestamp =
                    Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        "2026-01-02T00:00:00Z".parse().unwrap(),
                    ));
            }
            Arc::new(pod)
        }
    }

    fn pod_spec() -> impl Strategy<Value = PodSpec> {
        (
            (
                prop::sample::select(vec!["x", "y"]),
                0..6u8,
                0..30u8,
                any::<bool>(),
            ),
            (
                prop::option::weighted(0.9, 0..12u8),
                prop::bool::weighted(0.2),
            ),
            (
                prop::sample::select(vec!["web", "db"]),
                prop::bool::weighted(0.1),
            ),
            (
                prop::bool::weighted(0.1),
                prop::bool::weighted(0.15),
                0..3u8,
            ),
        )
            .prop_map(
                |((namespace, name, uid, local), (ip, ipv6), (app, host_network), rest)| {
                    let (finished, terminating, age) = rest;
                    PodSpec {
                        namespace,
                        name,
                        uid,
                        local,
                        ip,
                        ipv6,
                        app,
                        host_network,
                        finished,
                        terminating,
                        age,
                    }
                },
            )
    }

    /// A pod put in the store (new or changed), or one taken out.
    #[derive(Clone, Debug)]
    enum Event {
        Put(PodSpec),
        Remove(&'static str, u8),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => pod_spec().prop_map(Event::Put),
            1 => (prop::sample::select(vec!["x", "y"]), 0..6u8)
                .prop_map(|(ns, name)| Event::Remove(ns, name)),
        ]
    }

    type Store = BTreeMap<(String, String), Arc<Pod>>;

    fn full_view(translations: &mut Translations, store: &Store) -> (Inventory, LocalPods) {
        let node = node();
        translations.inventory("n1", Some(&node), [], store.values(), &ByUid)
    }

    /// A translation of the store from scratch: what every view must be.
    fn fresh_view(store: &Store) -> (Inventory, LocalPods) {
        full_view(&mut Translations::default(), store)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// After every batch of pod events, the view patched from the
        /// pods the events name (each named once or more) is a fresh
        /// translation of the store, host-network pods included, or the
        /// patch declines and the full view is taken.
        #[test]
        fn a_patched_view_is_the_full_view(
            initial in prop::collection::vec(pod_spec(), 0..10),
            batches in prop::collection::vec(prop::collection::vec(event(), 1..4), 1..12),
        ) {
            let mut store: Store = initial.iter().map(|p| (p.key(), p.pod())).collect();
            let mut patched = Translations::default();
            let (first, mut local) = full_view(&mut patched, &store);
            prop_assert_eq!((&first, &local), (&fresh_view(&store).0, &fresh_view(&store).1));
            let mut last = CheckedInventory::new(first).expect("the full view is valid");
            for batch in batches {
                let mut named = Vec::new();
                for event in batch {
                    match event {
                        Event::Put(spec) => {
                            named.push(spec.key());
                            store.insert(spec.key(), spec.pod());
                        }
                        Event::Remove(ns, name) => {
                            let key = (ns.to_string(), format!("p{name}"));
                            store.remove(&key);
                            named.push(key);
                        }
                    }
                }
                let (expected, expected_local) = fresh_view(&store);
                let expected = CheckedInventory::new(expected).expect("the full view is valid");
                let changes = patched.patch(
                    "n1",
                    &last,
                    named.iter().map(|(ns, n)| (ns.as_str(), n.as_str())),
                    |ns, n| store.get(&(ns.to_string(), n.to_string())).cloned(),
                    &ByUid,
                );
                let now = match changes {
                    Some(changes) => last.patch(changes).expect("a patch the full view takes"),
                    None => {
                        let (view, now_local) = full_view(&mut patched, &store);
                        local = now_local;
                        CheckedInventory::new(view).expect("the full view is valid")
                    }
                };
                prop_assert_eq!(&*now, &*expected);
                // A patched view keeps the last view's host-network pods.
                prop_assert_eq!(&local, &expected_local);
                last = now;
            }
        }
    }

    fn web(name: &str, ip: &str) -> Arc<Pod> {
        PodSpec {
            namespace: "x",
            name: name.parse().unwrap(),
            uid: name.parse().unwrap(),
            local: false,
            ip: Some(ip.parse().unwrap()),
            ipv6: false,
            app: "web",
            host_network: false,
            finished: false,
            terminating: false,
            age: 0,
        }
        .pod()
    }

    /// A pod taking a Service's cluster IP is left to the full view, which
    /// reads the Services again and drops the one that clashes.
    #[test]
    fn a_pod_on_a_cluster_ip_is_left_to_the_full_view() {
        let mut translations = Translations::default();
        let mut store: Store = [(("x".into(), "p1".into()), web("1", "2"))].into();
        let (mut last, _) = full_view(&mut translations, &store);
        last.services.push(Service {
            name: "s".into(),
            namespace: "x".into(),
            cluster_ips: vec!["10.0.1.3".parse().unwrap()],
            ports: Vec::new(),
        });
        store.insert(("x".into(), "p2".into()), web("2", "3"));
        let lookup = |ns: &str, n: &str| store.get(&(ns.to_string(), n.to_string())).cloned();
        assert!(translations
            .patch("n1", &last, [("x", "p2")], lookup, &ByUid)
            .is_none());
        // Elsewhere the same pod is patched in.
        store.insert(("x".into(), "p2".into()), web("2", "4"));
        let lookup = |ns: &str, n: &str| store.get(&(ns.to_string(), n.to_string())).cloned();
        let changes = translations
            .patch("n1", &last, [("x", "p2")], lookup, &ByUid)
            .expect("patched");
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0].1.as_ref().unwrap().ips,
            ["10.0.1.4".parse::<IpAddr>().unwrap()]
        );
    }

    /// Without a full view to start from, or for another node, nothing is
    /// patched.
    #[test]
    fn a_patch_needs_a_full_view_of_the_same_node() {
        let mut translations = Translations::default();
        let store: Store = [(("x".into(), "p1".into()), web("1", "2"))].into();
        let lookup = |ns: &str, n: &str| store.get(&(ns.to_string(), n.to_string())).cloned();
        let empty = Inventory::default();
        assert!(translations
            .patch("n1", &empty, [("x", "p1")], lookup, &ByUid)
            .is_none());
        let (last, _) = full_view(&mut translations, &store);
        assert!(translations
            .patch("n2", &last, [("x", "p1")], lookup, &ByUid)
            .is_none());
        assert!(translations
            .patch("n1", &last, [("x", "p1")], lookup, &ByUid)
            .is_some());
    }
}
