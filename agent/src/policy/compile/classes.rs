//! Peer classes: sets of addresses that every policy predicate treats alike,
//! each becoming one identity in the kernel's address → identity trie.
//!
//! A peer predicate looks at a pod's namespace, labels and namespace labels
//! (selectors), its named ports (named egress ports), and which policy CIDRs
//! contain the address (ipBlock). The CIDRs any policy mentions that contain
//! one address form a chain, so the most specific one decides every ipBlock
//! test: the address is in `cidr` iff that prefix is inside `cidr`, and in an
//! `except` iff that prefix is inside the `except`.
//!
//! A class keeps only what some rule can look at: the label keys peer
//! selectors name, the namespace label keys namespace selectors name, the
//! port names rules name. Real pods carry per-pod and per-rollout labels
//! (`pod-template-hash`, `controller-revision-hash`,
//! `statefulset.kubernetes.io/pod-name`) that no policy selects on; kept,
//! they would make every pod its own class and identity.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt as _};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{
    class_cache::{ClassCache, ClassPass},
    AddrPrefix,
};
use crate::policy::model::{Inventory, Labels, NamespaceScope, Peer, PolicyKind, Protocol, Rule};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerClass {
    /// Pod addresses.
    Pod {
        namespace: String,
        labels: Labels,
        namespace_labels: Labels,
        /// (name, protocol, port), sorted.
        named_ports: Vec<(String, Protocol, u16)>,
        /// Most specific policy CIDR containing the address.
        cidr: Option<IpNet>,
    },
    /// Other addresses whose most specific policy CIDR is this one.
    Cidr(IpNet),
}

/// What an identity-trie prefix stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Member {
    /// Index into [`PeerClasses::classes`].
    Class(usize),
    /// This node's addresses: the kernel's reserved HOST identity.
    Host,
    /// Explicitly no identity (see [`PeerClasses::build`]).
    World,
}

pub struct PeerClasses {
    /// Sorted, so identities are allocated in a deterministic order.
    pub classes: Vec<PeerClass>,
    pub prefixes: BTreeMap<AddrPrefix, Member>,
    /// Classes by their most specific policy CIDR, for ipBlock peers.
    by_cidr: BTreeMap<IpNet, Vec<usize>>,
    /// Pod classes, for selector peers.
    pods: Vec<usize>,
}

impl PeerClasses {
    /// `rules`: every rule of every policy (of any kind).
    pub fn build<'a>(inventory: &Inventory, rules: impl IntoIterator<Item = &'a Rule>) -> Self {
        let rules: Vec<&Rule> = rules.into_iter().collect();
        let mut cache = ClassCache::default();
        Self::from_pass(inventory, cache.pass(inventory, &rules))
    }

    /// [`PeerClasses::build`] for the rules of `policies`, reusing what
    /// `cache` kept from its last compile: the classes of workloads and the
    /// lens of policies that did not change since.
    pub fn build_cached(
        inventory: &Inventory,
        policies: &[&Arc<PolicyKind>],
        cache: &mut ClassCache,
    ) -> Self {
        Self::from_pass(inventory, cache.pass_policies(inventory, policies))
    }

    fn from_pass(inventory: &Inventory, mut pass: ClassPass<'_>) -> Self {
        // Each prefix points at its class, each distinct class kept once:
        // thousands of pods share a few label sets. Classes are shared
        // values (see `class_cache`), told apart here by address.
        let mut interned: Vec<Arc<PeerClass>> = Vec::new();
        let mut index_of: HashMap<*const PeerClass, usize> = HashMap::new();
        let mut intern = |class: &Arc<PeerClass>| -> usize {
            *index_of.entry(Arc::as_ptr(class)).or_insert_with(|| {
                interned.push(Arc::clone(class));
                interned.len() - 1
            })
        };
        let mut prefixes: BTreeMap<AddrPrefix, Member> = BTreeMap::new();
        // Node addresses are HOST even if a policy CIDR names them exactly:
        // the kernel lets HOST in unconditionally and ipBlocks never match it.
        for ip in &inventory.node_ips {
            prefixes.insert(AddrPrefix::host(*ip), Member::Host);
        }
        for w in &inventory.workloads {
            pass.visit(w);
        }
        // The kept addresses come sorted; each distinct class is interned
        // once (its address tells equal classes apart).
        let mut members: Vec<(AddrPrefix, usize)> = pass
            .hosts()
            .map(|(prefix, class)| (*prefix, intern(class)))
            .collect();
        let is_member = |members: &[(AddrPrefix, usize)], prefix: &AddrPrefix| {
            members.binary_search_by_key(prefix, |(p, _)| *p).is_ok()
        };
        let mentioned: Vec<IpNet> = pass.cidrs().copied().collect();
        // Link-local addresses are nobody's in policy terms: ipBlocks never
        // match them (see `evaluate::is_ipv6_link_local`), so no class may
        // claim any part of fe80::/10.
        let link_local = IpNet::V6(Ipv6Net::new_assert(
            std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
            10,
        ));
        if mentioned
            .iter()
            .any(|net| net.contains(&link_local) || link_local.contains(net))
        {
            prefixes.insert(AddrPrefix::from_net(link_local), Member::World);
        }
        let mut cidr_members: BTreeMap<AddrPrefix, usize> = BTreeMap::new();
        for net in &mentioned {
            if link_local.contains(net) {
                continue;
            }
            let prefix = AddrPrefix::from_net(*net);
            // A /32 or /128 naming a pod or node: the host entry already
            // carries (or overrides) what the CIDR would say.
            // (An IPv4 CIDR and its IPv4-mapped IPv6 twin are one prefix:
            // the first, the IPv4 one, names it.)
            if !is_member(&members, &prefix)
                && !prefixes.contains_key(&prefix)
                && !cidr_members.contains_key(&prefix)
            {
                let class = pass.canonical(PeerClass::Cidr(*net));
                cidr_members.insert(prefix, intern(&class));
            }
        }
        if !cidr_members.is_empty() {
            // Distinct from every host prefix (checked above): a merge.
            members.extend(cidr_members);
            members.sort_unstable_by_key(|(prefix, _)| *prefix);
        }
        // IPv4 lives at ::ffff:0:0/96 in the kernel's trie, so an IPv6 policy
        // CIDR covering that range (e.g. ::/0) would capture IPv4 addresses
        // that no IPv4 CIDR names. Pin that range to "no identity" unless
        // 0.0.0.0/0 itself is a policy CIDR.
        let ipv4_space = AddrPrefix::from_net(IpNet::V4(Ipv4Net::default()));
        let mapped_root = IpAddr::V6(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped());
        if !is_member(&members, &ipv4_space)
            && mentioned
                .iter()
                .any(|net| matches!(net, IpNet::V6(_)) && net.contains(&mapped_root))
        {
            prefixes.insert(ipv4_space, Member::World);
        }

        // Every class interned is some member's: sorted, each numbered by
        // its rank.
        let mut order: Vec<usize> = (0..interned.len()).collect();
        order.sort_by(|a, b| interned[*a].cmp(&interned[*b]));
        let mut rank = vec![0; interned.len()];
        let classes: Vec<PeerClass> = order
            .iter()
            .enumerate()
            .map(|(index, &provisional)| {
                rank[provisional] = index;
                PeerClass::clone(&interned[provisional])
            })
            .collect();
        let classed = members
            .into_iter()
            .map(|(prefix, provisional)| (prefix, Member::Class(rank[provisional])));
        let prefixes = overriding(prefixes, classed);
        drop(interned);
        pass.finish();
        let mut by_cidr: BTreeMap<IpNet, Vec<usize>> = BTreeMap::new();
        let mut pods = Vec::new();
        for (index, class) in classes.iter().enumerate() {
            let cidr = match class {
                PeerClass::Pod { cidr, .. } => {
                    pods.push(index);
                    *cidr
                }
                PeerClass::Cidr(cidr) => Some(*cidr),
            };
            if let Some(cidr) = cidr {
                by_cidr.entry(cidr).or_default().push(index);
            }
        }
        Self {
            classes,
            prefixes,
            by_cidr,
            pods,
        }
    }

    /// Indexes of the classes a peer matches, ascending.
    pub fn matching(&self, peer: &Peer) -> Vec<usize> {
        let mut matched: Vec<usize> = match peer {
            Peer::Pods { .. } => self.pods.clone(),
            // Judged by the inbound proxy, never by the kernel.
            Peer::Identity(_) => return Vec::new(),
            // Only classes whose CIDR lies inside the block can match; they
            // sort between (network, /0) and (broadcast, /max).
            Peer::Block { cidr, .. } => {
                let (low, high) = match cidr {
                    IpNet::V4(net) => (
                        IpNet::V4(Ipv4Net::new_assert(net.network(), 0)),
                        IpNet::V4(Ipv4Net::new_assert(net.broadcast(), 32)),
                    ),
                    IpNet::V6(net) => (
                        IpNet::V6(Ipv6Net::new_assert(net.network(), 0)),
                        IpNet::V6(Ipv6Net::new_assert(net.broadcast(), 128)),
                    ),
                };
                self.by_cidr
                    .range(low..=high)
                    .flat_map(|(_, classes)| classes.iter().copied())
                    .collect()
            }
        };
        matched.retain(|i| self.classes[*i].matched_by(peer));
        matched.sort_unstable();
        matched
    }

    /// Indexes of the pod classes, ascending.
    pub fn pod_classes(&self) -> &[usize] {
        &self.pods
    }
}

impl PeerClass {
    /// Does the peer (of a policy in `policy_namespace`) match this class?
    pub fn matched_by(&self, peer: &Peer) -> bool {
        match (peer, self) {
            (
                Peer::Pods { namespaces, pods },
                PeerClass::Pod {
                    namespace,
                    labels,
                    namespace_labels,
                    ..
                },
            ) => {
                let namespace_ok = match namespaces {
                    NamespaceScope::Exactly(ns) => ns == namespace,
                    NamespaceScope::Matching(selector) => selector.matches(namespace_labels),
                };
                namespace_ok && pods.matches(labels)
            }
            (Peer::Pods { .. }, PeerClass::Cidr(_)) | (Peer::Identity(_), _) => false,
            (Peer::Block { cidr, except }, class) => {
                let most_specific = match class {
                    PeerClass::Pod { cidr, .. } => match cidr {
                        Some(c) => c,
                        None => return false,
                    },
                    PeerClass::Cidr(c) => c,
                };
                cidr.contains(most_specific) && !except.iter().any(|e| e.contains(most_specific))
            }
        }
    }

    /// Resolves a container port name against the pods of this class.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        match self {
            PeerClass::Pod { named_ports, .. } => named_ports
                .iter()
                .find(|(n, p, _)| n == name && *p == protocol)
                .map(|(_, _, port)| *port),
            PeerClass::Cidr(_) => None,
        }
    }
}

/// `base` with every entry of `over` (sorted, each key once) put in, an
/// entry of `over` replacing one of `base`: one pass over both, and the
/// map built in one go.
fn overriding<K: Ord + Copy, V>(
    base: BTreeMap<K, V>,
    over: impl Iterator<Item = (K, V)>,
) -> BTreeMap<K, V> {
    let mut merged = Vec::with_capacity(base.len());
    let mut base = base.into_iter().peekable();
    for (key, value) in over {
        while let Some(kept) = base.next_if(|(k, _)| *k < key) {
            merged.push(kept);
        }
        base.next_if(|(k, _)| *k == key);
        merged.push((key, value));
    }
    merged.extend(base);
    merged.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overriding_puts_every_entry_in_and_replaces_equal_keys() {
        let base = BTreeMap::from([(1, "host"), (3, "world"), (9, "host")]);
        let over = [(1, "a"), (2, "b"), (4, "c"), (10, "d")];
        assert_eq!(
            overriding(base, over.into_iter()),
            BTreeMap::from([
                (1, "a"),
                (2, "b"),
                (3, "world"),
                (4, "c"),
                (9, "host"),
                (10, "d")
            ])
        );
        assert_eq!(
            overriding(BTreeMap::from([(5, "x")]), std::iter::empty()),
            BTreeMap::from([(5, "x")])
        );
    }
}
