//! Each workload's peer classes, kept from one compile to the next.
//!
//! A pod's classes depend on the pod itself, on what the rules look at (the
//! lens: pod label keys, namespace label keys, port names and policy CIDRs)
//! and on its namespace's labels under that lens. A pod event replaces the
//! workload's `Arc`, so a workload served as the very same `Arc`, under the
//! same lens and the same namespace labels, has the classes it had. At 5,000
//! pods working every pod's classes out again was more than half of a
//! compile that followed one pod.
//!
//! Equal classes are one shared value (`canonical`), so a compile can tell
//! classes apart by address and compare values only to sort the distinct
//! ones. A class no kept workload uses any more is dropped after the pass.
//!
//! The lens itself is kept per policy object (by its `Arc`, which a policy
//! event replaces): scanning 10,000 rules for it was milliseconds of every
//! compile, most of them for policies that had not changed.
//!
//! So are the pod addresses, sorted, each with its class: a workload worked
//! out again, or gone, patches them. Sorting and collecting 5,000 addresses
//! afresh was a sixth of a compile that followed one pod.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt as _, HashSet};

use ipnet::IpNet;

use super::{class_delta::Reach, classes::PeerClass, AddrPrefix};
use crate::policy::model::{
    Inventory, Labels, NamespaceScope, Peer, Peers, PolicyKind, PortSpec, Rule, Workload,
};

/// Classes kept between compiles (see the module docs).
#[derive(Default, Clone)]
pub struct ClassCache {
    lens: Lens,
    /// Each policy's part of the lens, by the address of the policy, which
    /// the kept `Arc` pins.
    policy_lenses: HashMap<usize, (Arc<PolicyKind>, Lens, Reach)>,
    /// Each namespace's labels under the lens, as of the last compile.
    namespaces: HashMap<String, Arc<Labels>>,
    /// Those of the namespaces listed, as of the last compile.
    listed: HashMap<String, Arc<Labels>>,
    /// By the address of the workload, which `Kept::workload` pins.
    workloads: HashMap<usize, Kept>,
    /// The kept workloads' addresses: each with its class and the address
    /// of the workload that claims it (a checked inventory names each
    /// address once, but a pod that took a gone pod's address may be
    /// worked out before the gone one is dropped).
    hosts: BTreeMap<AddrPrefix, (usize, Arc<PeerClass>)>,
    canonical: HashSet<Arc<PeerClass>>,
    /// Counts compiles.
    passes: u64,
}

#[derive(Clone)]
struct Kept {
    /// Held: while it is kept no other workload can live at its address,
    /// which is its key. Its classes are in `ClassCache::hosts`, by its
    /// addresses.
    workload: Arc<Workload>,
    /// The namespace labels the classes were made with.
    namespace_labels: Arc<Labels>,
    /// The last compile that used them.
    seen_in: u64,
}

/// What the rules' peers and ports can look at in a pod.
#[derive(Default, Clone, Debug, PartialEq, Eq)]
struct Lens {
    pod_keys: BTreeSet<String>,
    namespace_keys: BTreeSet<String>,
    port_names: BTreeSet<String>,
    /// Every `cidr` and `except` of the rules.
    cidrs: BTreeSet<IpNet>,
}

impl Lens {
    fn of(rules: &[&Rule]) -> Self {
        // Borrowed while scanning: ten thousand rules name the same few
        // keys, so only the distinct ones are copied.
        let mut pod_keys = BTreeSet::new();
        let mut namespace_keys = BTreeSet::new();
        let mut port_names = BTreeSet::new();
        let mut cidrs = BTreeSet::new();
        for rule in rules {
            if let Peers::Only(peers) = &rule.peers {
                for peer in peers {
                    match peer {
                        Peer::Pods { namespaces, pods } => {
                            pod_keys.extend(pods.keys());
                            if let NamespaceScope::Matching(selector) = namespaces {
                                namespace_keys.extend(selector.keys());
                            }
                        }
                        Peer::Block { cidr, except } => {
                            cidrs.insert(*cidr);
                            cidrs.extend(except.iter().copied());
                        }
                        Peer::Identity(_) => {}
                    }
                }
            }
            for port in &rule.ports {
                if let PortSpec::Named(name) = &port.port {
                    port_names.insert(name.as_str());
                }
            }
        }
        let owned = |keys: BTreeSet<&str>| keys.into_iter().map(str::to_string).collect();
        Self {
            pod_keys: owned(pod_keys),
            namespace_keys: owned(namespace_keys),
            port_names: owned(port_names),
            cidrs,
        }
    }

    /// What all of `parts` look at.
    fn union<'l>(parts: impl IntoIterator<Item = &'l Lens>) -> Self {
        let mut all = Self::default();
        for part in parts {
            all.pod_keys.extend(part.pod_keys.iter().cloned());
            all.namespace_keys
                .extend(part.namespace_keys.iter().cloned());
            all.port_names.extend(part.port_names.iter().cloned());
            all.cidrs.extend(part.cidrs.iter().copied());
        }
        all
    }

    fn keep(labels: &Labels, keys: &BTreeSet<String>) -> Labels {
        labels
            .iter()
            .filter(|(k, _)| keys.contains(k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The most specific policy CIDR holding `ip`: one lookup per prefix
    /// length, longest first (policies may mention thousands of CIDRs).
    fn most_specific(&self, ip: IpAddr) -> Option<IpNet> {
        let max_len = if ip.is_ipv4() { 32 } else { 128 };
        (0..=max_len)
            .rev()
            .filter_map(|len| IpNet::new(ip, len).ok().map(|net| net.trunc()))
            .find(|net| self.cidrs.contains(net))
    }

    /// A pod address's class.
    fn pod_class(&self, w: &Workload, ip: IpAddr, namespace_labels: &Labels) -> PeerClass {
        let mut named_ports: Vec<_> = w
            .ports
            .iter()
            .filter(|p| self.port_names.contains(p.name.as_str()))
            .map(|p| (p.name.clone(), p.protocol, p.container_port))
            .collect();
        named_ports.sort();
        PeerClass::Pod {
            namespace: w.namespace.clone(),
            labels: Self::keep(&w.labels, &self.pod_keys),
            namespace_labels: namespace_labels.clone(),
            named_ports,
            cidr: self.most_specific(ip),
        }
    }
}

impl std::fmt::Debug for ClassCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClassCache")
            .field("workloads", &self.workloads.len())
            .field("classes", &self.canonical.len())
            .finish_non_exhaustive()
    }
}

/// One compile's use of the cache: from [`ClassCache::pass`] until it is
/// dropped ([`ClassPass::finish`] says so).
pub struct ClassPass<'c> {
    cache: &'c mut ClassCache,
    inventory: &'c Inventory,
    namespaces: HashMap<String, Arc<Labels>>,
    /// No namespace came into or left the list, and none listed changed
    /// its labels, since the last pass: a kept workload's classes hold
    /// without looking its namespace up (a read of the pod's own memory,
    /// most of what visiting it cost).
    namespaces_unchanged: bool,
}

impl ClassCache {
    /// Starts a compile of `inventory` under `rules`: a changed lens
    /// forgets every workload's classes.
    pub fn pass<'c>(&'c mut self, inventory: &'c Inventory, rules: &[&Rule]) -> ClassPass<'c> {
        self.policy_lenses.clear();
        self.start(inventory, Some(Lens::of(rules)))
    }

    /// [`ClassCache::pass`] for the rules of `policies`, each policy's part
    /// of the lens kept while it is the same object: the lens is worked out
    /// again only when a policy came, went or changed.
    pub fn pass_policies<'c>(
        &'c mut self,
        inventory: &'c Inventory,
        policies: &[&Arc<PolicyKind>],
    ) -> ClassPass<'c> {
        let mut earlier = std::mem::replace(
            &mut self.policy_lenses,
            HashMap::with_capacity(policies.len()),
        );
        let mut changed = false;
        for policy in policies {
            let at = Arc::as_ptr(policy) as usize;
            if self.policy_lenses.contains_key(&at) {
                continue;
            }
            let (part, reach) = match earlier.remove(&at) {
                Some((kept, lens, reach)) if Arc::ptr_eq(&kept, policy) => (lens, reach),
                _ => {
                    changed = true;
                    let rules: Vec<&Rule> = policy.rules().collect();
                    (Lens::of(&rules), Reach::of(rules))
                }
            };
            self.policy_lenses
                .insert(at, (Arc::clone(policy), part, reach));
        }
        // A policy gone changes the lens as much as one added.
        changed |= !earlier.is_empty();
        let lens = changed.then(|| Lens::union(self.policy_lenses.values().map(|(_, l, _)| l)));
        self.start(inventory, lens)
    }

    /// The [`Reach`] of `policy`, if the last pass over policies met this
    /// very object.
    pub fn reach(&self, policy: &Arc<PolicyKind>) -> Option<&Reach> {
        self.policy_lenses
            .get(&(Arc::as_ptr(policy) as usize))
            .filter(|(kept, _, _)| Arc::ptr_eq(kept, policy))
            .map(|(_, _, reach)| reach)
    }

    /// `lens`: the new lens, or `None` when it is the last one.
    fn start<'c>(&'c mut self, inventory: &'c Inventory, lens: Option<Lens>) -> ClassPass<'c> {
        if let Some(lens) = lens.filter(|lens| *lens != self.lens) {
            self.workloads.clear();
            self.hosts.clear();
            self.lens = lens;
        }
        // Per namespace, not per pod, from the namespaces listed (a pod in
        // a namespace not listed gets its labels when it is first met, in
        // `visit`). An unchanged namespace keeps its `Arc`, so its pods'
        // kept classes stay valid.
        let mut namespaces = HashMap::with_capacity(inventory.namespaces.len());
        for ns in &inventory.namespaces {
            if namespaces.contains_key(ns.name.as_str()) {
                // The first of a name counts, as in `namespace_labels`.
                continue;
            }
            // From the entry itself: looking each up by name would scan
            // the list once per namespace.
            let labels = under_lens(&self.namespaces, &ns.name, ns.selector_labels(), &self.lens);
            namespaces.insert(ns.name.clone(), labels);
        }
        // A kept workload's namespace labels still hold when no namespace
        // came into or left the list, and none listed changed: a namespace
        // not listed has labels its name alone decides.
        let namespaces_unchanged = namespaces.len() == self.listed.len()
            && namespaces.iter().all(|(name, labels)| {
                self.listed
                    .get(name)
                    .is_some_and(|before| Arc::ptr_eq(before, labels))
            });
        if !namespaces_unchanged {
            self.listed = namespaces.clone();
        }
        // Workloads are marked in place (see `visit`): moving five
        // thousand to a new map each compile cost more than the few that
        // changed.
        self.passes += 1;
        ClassPass {
            cache: self,
            inventory,
            namespaces,
            namespaces_unchanged,
        }
    }
}

impl ClassPass<'_> {
    /// Every CIDR the rules name (`cidr` and `except`).
    pub fn cidrs(&self) -> impl Iterator<Item = &IpNet> + '_ {
        self.cache.lens.cidrs.iter()
    }

    /// The one shared value equal to `class`.
    pub fn canonical(&mut self, class: PeerClass) -> Arc<PeerClass> {
        canonical(&mut self.cache.canonical, class)
    }

    /// Works out `w`'s classes unless they are kept (see the module docs),
    /// and marks them used by this pass.
    pub fn visit(&mut self, w: &Arc<Workload>) {
        let at = Arc::as_ptr(w) as usize;
        let pass = self.cache.passes;
        if self.namespaces_unchanged {
            // A kept workload was visited by the last pass (see `Drop`),
            // under labels its namespace still has.
            if let Some(kept) = self.cache.workloads.get_mut(&at) {
                kept.seen_in = pass;
                return;
            }
        }
        let namespace_labels = match self.namespaces.get(w.namespace.as_str()) {
            Some(labels) => Arc::clone(labels),
            None => {
                let labels = under_lens(
                    &self.cache.namespaces,
                    &w.namespace,
                    self.inventory.namespace_labels(&w.namespace),
                    &self.cache.lens,
                );
                self.namespaces
                    .insert(w.namespace.clone(), Arc::clone(&labels));
                labels
            }
        };
        let cache = &mut *self.cache;
        if let Some(kept) = cache.workloads.get_mut(&at) {
            // Kept pins the workload, so no other one lives at its address.
            if Arc::ptr_eq(&kept.namespace_labels, &namespace_labels) {
                kept.seen_in = pass;
                return;
            }
        }
        for ip in &w.ips {
            let class = cache.lens.pod_class(w, *ip, &namespace_labels);
            let class = canonical(&mut cache.canonical, class);
            cache.hosts.insert(AddrPrefix::host(*ip), (at, class));
        }
        cache.workloads.insert(
            at,
            Kept {
                workload: Arc::clone(w),
                namespace_labels,
                seen_in: pass,
            },
        );
    }

    /// `w`'s classes, one per address (after [`ClassPass::visit`]).
    #[cfg(test)]
    pub fn classes_of(&mut self, w: &Arc<Workload>) -> Vec<Arc<PeerClass>> {
        self.visit(w);
        w.ips
            .iter()
            .map(|ip| Arc::clone(&self.cache.hosts[&AddrPrefix::host(*ip)].1))
            .collect()
    }

    /// Drops the workloads this pass did not visit, and the addresses they
    /// still claim.
    fn retire_unvisited(&mut self) {
        let pass = self.cache.passes;
        let ClassCache {
            workloads, hosts, ..
        } = &mut *self.cache;
        workloads.retain(|at, kept| {
            if kept.seen_in == pass {
                return true;
            }
            for ip in &kept.workload.ips {
                let prefix = AddrPrefix::host(*ip);
                if hosts.get(&prefix).is_some_and(|(owner, _)| owner == at) {
                    hosts.remove(&prefix);
                }
            }
            false
        });
    }

    /// Every address of the workloads visited so far and its class, in
    /// address order; the workloads not visited are retired first.
    pub fn hosts(&mut self) -> impl Iterator<Item = (&AddrPrefix, &Arc<PeerClass>)> {
        self.retire_unvisited();
        self.cache
            .hosts
            .iter()
            .map(|(prefix, (_, class))| (prefix, class))
    }

    /// Ends the pass (as dropping it does).
    pub fn finish(self) {}
}

/// A pass ends whole, even one cut short: what `visit` may skip rests on
/// every kept workload having been visited by the last pass, under the
/// namespace labels the cache keeps.
impl Drop for ClassPass<'_> {
    fn drop(&mut self) {
        self.retire_unvisited();
        self.cache.namespaces = std::mem::take(&mut self.namespaces);
        self.cache
            .canonical
            .retain(|class| Arc::strong_count(class) > 1);
    }
}

/// `all` (a namespace's labels) under `lens`, as the `Arc` kept in
/// `before` when it is equal, so kept workloads' classes stay valid.
fn under_lens(
    before: &HashMap<String, Arc<Labels>>,
    namespace: &str,
    all: Labels,
    lens: &Lens,
) -> Arc<Labels> {
    let labels = Lens::keep(&all, &lens.namespace_keys);
    match before.get(namespace) {
        Some(kept) if **kept == labels => Arc::clone(kept),
        _ => Arc::new(labels),
    }
}

fn canonical(set: &mut HashSet<Arc<PeerClass>>, class: PeerClass) -> Arc<PeerClass> {
    if let Some(shared) = set.get(&class) {
        return Arc::clone(shared);
    }
    let shared = Arc::new(class);
    set.insert(Arc::clone(&shared));
    shared
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{model::Namespace, selector::Selector};

    fn workload(name: &str, app: &str, ip: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "shop".into(),
            labels: [("app", app), ("pod-template-hash", name)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Labels>()
                .into(),
            cgroup: None,
            ips: vec![ip.parse().unwrap()],
            ports: Vec::new(),
            service_account: None,
        })
    }

    fn labelled(key: &str, value: &str) -> Selector {
        Selector::new([(key.to_string(), value.to_string())].into(), Vec::new())
    }

    /// Pods of namespace shop with `key` = "a".
    fn selecting(key: &str) -> Rule {
        Rule {
            peers: Peers::Only(vec![Peer::Pods {
                namespaces: NamespaceScope::Exactly("shop".into()),
                pods: labelled(key, "a"),
            }]),
            ports: Vec::new(),
        }
    }

    /// Two pods of app `web` that differ only in their template hash.
    fn two_web_pods() -> Inventory {
        Inventory {
            workloads: vec![
                workload("a", "web", "10.0.0.1"),
                workload("b", "web", "10.0.0.2"),
            ],
            ..Default::default()
        }
    }

    fn classes(
        cache: &mut ClassCache,
        inventory: &Inventory,
        rules: &[&Rule],
    ) -> Vec<Arc<PeerClass>> {
        every_class(cache.pass(inventory, rules), inventory)
    }

    /// Each workload's classes in `pass`, in order; ends the pass.
    fn every_class(mut pass: ClassPass<'_>, inventory: &Inventory) -> Vec<Arc<PeerClass>> {
        let out = inventory
            .workloads
            .iter()
            .flat_map(|w| pass.classes_of(w))
            .collect();
        pass.finish();
        out
    }

    /// Pods that differ only in labels no rule looks at share one class
    /// value, and a second compile of the same workloads reuses it.
    #[test]
    fn equal_classes_are_one_value_and_are_kept_for_the_same_workload() {
        let rule = selecting("app");
        let inventory = two_web_pods();
        let mut cache = ClassCache::default();
        let first = classes(&mut cache, &inventory, &[&rule]);
        assert!(
            Arc::ptr_eq(&first[0], &first[1]),
            "one value for equal classes"
        );
        let second = classes(&mut cache, &inventory, &[&rule]);
        assert!(
            Arc::ptr_eq(&first[0], &second[0]),
            "kept for the same workload"
        );
    }

    /// A new lens, a changed namespace or a replaced workload is worked
    /// out again; unused classes are dropped.
    #[test]
    fn a_new_lens_namespace_or_workload_is_worked_out_again() {
        let by_app = selecting("app");
        let by_hash = selecting("pod-template-hash");
        let mut inventory = two_web_pods();
        let mut cache = ClassCache::default();
        let first = classes(&mut cache, &inventory, &[&by_app]);
        assert_eq!(cache.canonical.len(), 1);
        drop(first);

        let per_pod = classes(&mut cache, &inventory, &[&by_hash]);
        assert!(
            !Arc::ptr_eq(&per_pod[0], &per_pod[1]),
            "the lens now sees the hash"
        );
        assert_eq!(cache.canonical.len(), 2, "the by-app class is gone");

        inventory.workloads[1] = workload("b", "db", "10.0.0.2");
        let replaced = classes(&mut cache, &inventory, &[&by_app]);
        let PeerClass::Pod { labels, .. } = &*replaced[1] else {
            panic!("a pod class")
        };
        assert_eq!(labels["app"], "db");

        let ns_rule = Rule {
            peers: Peers::Only(vec![Peer::Pods {
                namespaces: NamespaceScope::Matching(labelled("team", "x")),
                pods: Selector::default(),
            }]),
            ports: Vec::new(),
        };
        let before = classes(&mut cache, &inventory, &[&ns_rule]);
        inventory.namespaces.push(Namespace {
            name: "shop".into(),
            labels: [("team".to_string(), "x".to_string())].into(),
        });
        let after = classes(&mut cache, &inventory, &[&ns_rule]);
        assert!(!Arc::ptr_eq(&before[0], &after[0]));
        let PeerClass::Pod {
            namespace_labels, ..
        } = &*after[0]
        else {
            panic!("a pod class")
        };
        assert_eq!(namespace_labels["team"], "x");
    }

    fn team_rule(team: &str) -> Rule {
        Rule {
            peers: Peers::Only(vec![Peer::Pods {
                namespaces: NamespaceScope::Matching(labelled("team", team)),
                pods: Selector::default(),
            }]),
            ports: Vec::new(),
        }
    }

    fn team_of(class: &PeerClass) -> Option<&str> {
        let PeerClass::Pod {
            namespace_labels, ..
        } = class
        else {
            panic!("a pod class")
        };
        namespace_labels.get("team").map(String::as_str)
    }

    /// A namespace taken out of the list and put back with other labels
    /// gives its kept pods the new labels: the passes in between may skip
    /// looking pods up by namespace, this one may not.
    #[test]
    fn a_namespace_listed_again_with_other_labels_is_worked_out_again() {
        let rule = team_rule("x");
        let listed = |team: &str| Namespace {
            name: "shop".into(),
            labels: [("team".to_string(), team.to_string())].into(),
        };
        let mut inventory = two_web_pods();
        inventory.namespaces.push(listed("x"));
        let mut cache = ClassCache::default();
        let first = classes(&mut cache, &inventory, &[&rule]);
        assert_eq!(team_of(&first[0]), Some("x"));
        inventory.namespaces.clear();
        let unlisted = classes(&mut cache, &inventory, &[&rule]);
        assert_eq!(team_of(&unlisted[0]), None);
        let again = classes(&mut cache, &inventory, &[&rule]);
        assert_eq!(team_of(&again[0]), None, "still not listed");
        inventory.namespaces.push(listed("y"));
        let relisted = classes(&mut cache, &inventory, &[&rule]);
        assert_eq!(team_of(&relisted[0]), Some("y"));
        assert_eq!(team_of(&relisted[1]), Some("y"));
    }

    /// A pass dropped half way (a compile cut short) leaves the cache as
    /// a finished pass over the workloads it visited would: the next pass
    /// gives what a fresh cache gives, addresses included.
    #[test]
    fn a_pass_cut_short_leaves_a_cache_the_next_pass_can_trust() {
        let rule = team_rule("x");
        let mut inventory = two_web_pods();
        inventory.namespaces.push(Namespace {
            name: "shop".into(),
            labels: [("team".to_string(), "x".to_string())].into(),
        });
        let mut cache = ClassCache::default();
        drop(classes(&mut cache, &inventory, &[&rule]));
        // Relabelled namespace, and only the first pod visited.
        inventory.namespaces[0].labels = [("team".to_string(), "y".to_string())].into();
        {
            let mut cut = cache.pass(&inventory, &[&rule]);
            cut.visit(&inventory.workloads[0]);
        }
        let mut fresh = ClassCache::default();
        let expected = classes(&mut fresh, &inventory, &[&rule]);
        let got = classes(&mut cache, &inventory, &[&rule]);
        assert_eq!(got, expected);
        assert_eq!(team_of(&got[1]), Some("y"), "the pod not visited too");
        let hosts = |cache: &mut ClassCache| -> Vec<(AddrPrefix, PeerClass)> {
            let mut pass = cache.pass(&inventory, &[&rule]);
            for w in &inventory.workloads {
                pass.visit(w);
            }
            pass.hosts()
                .map(|(prefix, class)| (*prefix, PeerClass::clone(class)))
                .collect()
        };
        assert_eq!(hosts(&mut cache), hosts(&mut fresh));
    }

    fn ingress_policy(rule: Rule) -> Arc<PolicyKind> {
        Arc::new(PolicyKind::NetworkPolicy(
            crate::policy::model::NetworkPolicyRules {
                pod_selector: Selector::default(),
                isolates_ingress: true,
                isolates_egress: false,
                ingress: vec![rule],
                egress: Vec::new(),
            },
        ))
    }

    fn classes_under(
        cache: &mut ClassCache,
        inventory: &Inventory,
        policies: &[&Arc<PolicyKind>],
    ) -> Vec<Arc<PeerClass>> {
        every_class(cache.pass_policies(inventory, policies), inventory)
    }

    /// The lens kept per policy follows policies that come, change and go:
    /// a policy gone no longer splits pods by what only it looked at.
    #[test]
    fn the_kept_lens_follows_policies_added_changed_and_removed() {
        let inventory = two_web_pods();
        let by_app = ingress_policy(selecting("app"));
        let by_hash = ingress_policy(selecting("pod-template-hash"));
        let mut cache = ClassCache::default();
        let first = classes_under(&mut cache, &inventory, &[&by_app]);
        assert!(Arc::ptr_eq(&first[0], &first[1]), "one class by app");
        let again = classes_under(&mut cache, &inventory, &[&by_app]);
        assert!(Arc::ptr_eq(&first[0], &again[0]), "same policies: kept");

        let added = classes_under(&mut cache, &inventory, &[&by_app, &by_hash]);
        assert!(!Arc::ptr_eq(&added[0], &added[1]), "the hash is looked at");

        let removed = classes_under(&mut cache, &inventory, &[&by_app]);
        assert!(
            Arc::ptr_eq(&removed[0], &removed[1]),
            "the removed policy's keys are no longer looked at"
        );

        // The same policy, changed (a new object): its new rules count.
        let changed = ingress_policy(selecting("pod-template-hash"));
        let replaced = classes_under(&mut cache, &inventory, &[&changed]);
        assert!(!Arc::ptr_eq(&replaced[0], &replaced[1]));
        assert_eq!(cache.lens, Lens::of(&[&selecting("pod-template-hash")]));
    }
}
