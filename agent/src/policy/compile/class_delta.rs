//! A change of peer classes, as far as rules can tell.
//!
//! When a pod takes a label value no other pod has, or the last pod of a
//! label set goes, one class comes or goes; every other class stays, with
//! its identity. A rule's entries depend on the classes only through which
//! of them its peer list names (and, for named egress ports, every pod
//! class). So the previous compile's answer for each peer list is carried
//! over to the new classes — classes kept are renumbered, classes gone are
//! dropped, new classes are tested against the list — and only the lists
//! whose set of identities changed reach their endpoints. Without this, any
//! new class sent every endpoint down the full path.

use std::cmp::Ordering;

use foldhash::{HashMap, HashMapExt as _};

use super::classes::{PeerClass, PeerClasses};
use crate::policy::model::{NamespaceScope, Peer, Peers, PolicyKind, PortSpec, Rule};

/// Which classes each distinct rule peer list named, for one list of
/// classes with their identities.
#[derive(Debug, Clone, Default)]
pub struct NamedCache {
    pub classes: Vec<PeerClass>,
    pub identities: Vec<u32>,
    /// Peer list → indexes into `classes`, ascending.
    pub by_peers: HashMap<Peers, Vec<usize>>,
}

/// How the classes changed since the previous compile.
#[derive(Debug, PartialEq, Eq)]
pub enum ClassDelta {
    /// The same classes with the same identities.
    Same,
    /// Classes came or went; every class kept has its identity.
    Changed {
        /// The classes that came or went: a peer list names another set of
        /// identities exactly when it names one of these (classes kept are
        /// named as before, with their identities), whether or not it has
        /// a previous answer.
        came_or_went: Vec<PeerClass>,
        /// A pod class whose pods name a port some rule names came or went:
        /// a named egress port resolves against every pod class, so rules
        /// naming a port are reached. (A class without such ports decides
        /// like the wildcard wherever no rule's peers name it.)
        port_classes: bool,
    },
    /// Nothing can be assumed the same (no previous compile, or a kept
    /// class changed identity).
    Unknown,
}

impl NamedCache {
    /// The previous answers, valid for `now` (whose classes have
    /// `identities`), and how the classes changed.
    pub fn carry(
        self,
        now: &PeerClasses,
        identities: &[u32],
    ) -> (HashMap<Peers, Vec<usize>>, ClassDelta) {
        let unknown = || (HashMap::new(), ClassDelta::Unknown);
        if self.identities.len() != self.classes.len() {
            return unknown();
        }
        if self.classes == now.classes && self.identities == identities {
            return (self.by_peers, ClassDelta::Same);
        }
        // Both lists are sorted: one merge finds what was kept and what came.
        let mut kept_as: Vec<Option<usize>> = vec![None; self.classes.len()];
        let mut added = Vec::new();
        let mut old = 0;
        for (index, class) in now.classes.iter().enumerate() {
            while old < self.classes.len() && self.classes[old] < *class {
                old += 1;
            }
            match self.classes.get(old).map(|c| c.cmp(class)) {
                Some(Ordering::Equal) => {
                    if self.identities[old] != identities[index] {
                        return unknown();
                    }
                    kept_as[old] = Some(index);
                    old += 1;
                }
                _ => added.push(index),
            }
        }
        let came_or_went: Vec<PeerClass> = added
            .iter()
            .map(|&i| now.classes[i].clone())
            .chain(
                self.classes
                    .iter()
                    .zip(&kept_as)
                    .filter(|(_, kept)| kept.is_none())
                    .map(|(c, _)| c.clone()),
            )
            .collect();
        let port_classes = came_or_went
            .iter()
            .any(|c| matches!(c, PeerClass::Pod { named_ports, .. } if !named_ports.is_empty()));
        // Answered again in place: thousands of peer lists, each costly to
        // hash again.
        let mut carried = self.by_peers;
        for (peers, named) in carried.iter_mut() {
            named.retain_mut(|index| match kept_as.get(*index).copied().flatten() {
                Some(now) => {
                    *index = now;
                    true
                }
                None => false,
            });
            named.extend(
                added
                    .iter()
                    .copied()
                    .filter(|&index| named_by(&now.classes[index], peers)),
            );
            named.sort_unstable();
        }
        (
            carried,
            ClassDelta::Changed {
                came_or_went,
                port_classes,
            },
        )
    }
}

/// Whether a peer list names the class (as `named_classes` would say).
fn named_by(class: &PeerClass, peers: &Peers) -> bool {
    match peers {
        Peers::All => false,
        Peers::Only(list) => list.iter().any(|peer| class.matched_by(peer)),
    }
}

impl ClassDelta {
    /// Whether the change can reach the entries a policy's rules make.
    /// Asks only the classes that came or went (usually one or two), never
    /// the answers carried: looking a rule's peer list up costs a hash of
    /// its selectors, and ten thousand rules made that milliseconds.
    ///
    /// `reach`, the policy's [`Reach`] when it is known, answers for most
    /// policies without reading their rules: at ten thousand rules, reading
    /// them (scattered over the heap) was a tenth of a compile after a
    /// label change.
    pub fn reaches(&self, policy: &PolicyKind, reach: Option<&Reach>) -> bool {
        match self {
            Self::Same => false,
            Self::Unknown => true,
            Self::Changed {
                came_or_went,
                port_classes,
            } => {
                if let Some(reach) = reach {
                    let may = came_or_went.iter().any(|c| reach.may_name(c))
                        || (*port_classes && reach.named_ports);
                    if !may {
                        return false;
                    }
                }
                policy.rules().any(|rule| {
                    let names_a_port = || {
                        rule.ports
                            .iter()
                            .any(|p| matches!(p.port, PortSpec::Named(_)))
                    };
                    came_or_went.iter().any(|c| named_by(c, &rule.peers))
                        || (*port_classes && names_a_port())
                })
            }
        }
    }
}

/// Which classes a policy's rules could name, in brief: a class none of
/// these admits is named by none of its rules (each is implied by
/// [`PeerClass::matched_by`]), so it cannot reach the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reach {
    /// Namespaces its pod peers name exactly.
    namespaces: Vec<String>,
    /// A pod peer selects namespaces by their labels.
    by_namespace_labels: bool,
    /// An ipBlock peer.
    blocks: bool,
    /// A rule names a port by name.
    named_ports: bool,
}

impl Reach {
    pub fn of<'r>(rules: impl IntoIterator<Item = &'r Rule>) -> Self {
        let mut reach = Self::default();
        for rule in rules {
            if let Peers::Only(peers) = &rule.peers {
                for peer in peers {
                    match peer {
                        Peer::Pods {
                            namespaces: NamespaceScope::Exactly(ns),
                            ..
                        } => reach.namespaces.push(ns.clone()),
                        Peer::Pods {
                            namespaces: NamespaceScope::Matching(_),
                            ..
                        } => reach.by_namespace_labels = true,
                        Peer::Block { .. } => reach.blocks = true,
                        Peer::Identity(_) => {}
                    }
                }
            }
            reach.named_ports |= rule
                .ports
                .iter()
                .any(|p| matches!(p.port, PortSpec::Named(_)));
        }
        reach.namespaces.sort_unstable();
        reach.namespaces.dedup();
        reach
    }

    fn may_name(&self, class: &PeerClass) -> bool {
        match class {
            PeerClass::Pod {
                namespace, cidr, ..
            } => {
                self.by_namespace_labels
                    || (self.blocks && cidr.is_some())
                    || self.namespaces.binary_search(namespace).is_ok()
            }
            PeerClass::Cidr(_) => self.blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        model::{
            Inventory, LabelSelector, Labels, Namespace, NamespaceScope, NetworkPolicyRules, Peer,
            Rule, Workload,
        },
        selector::Selector,
    };
    use std::sync::Arc;

    /// Whether `delta` reaches `policy`, asked with and without the
    /// policy's [`Reach`]: the brief may only spare reading the rules,
    /// never change the answer.
    fn reaches(delta: &ClassDelta, policy: &PolicyKind) -> bool {
        let in_full = delta.reaches(policy, None);
        let briefed = delta.reaches(policy, Some(&Reach::of(policy.rules())));
        assert_eq!(briefed, in_full, "{policy:?}");
        in_full
    }

    fn workload(name: &str, app: &str, ip: &str) -> Workload {
        Workload {
            name: name.into(),
            namespace: "x".into(),
            labels: Labels::from([("app".to_string(), app.to_string())]).into(),
            cgroup: None,
            ips: vec![ip.parse().unwrap()],
            ports: Vec::new(),
            service_account: None,
        }
    }

    fn selecting(app: &str) -> Peers {
        selecting_in(NamespaceScope::Exactly("x".into()), app)
    }

    /// Pods labelled `app` in the namespaces `namespaces` names.
    fn selecting_in(namespaces: NamespaceScope, app: &str) -> Peers {
        let pods = Selector::from_label_selector(&LabelSelector {
            match_labels: Some([("app".to_string(), app.to_string())].into()),
            match_expressions: None,
        })
        .unwrap();
        Peers::Only(vec![Peer::Pods { namespaces, pods }])
    }

    fn every_namespace() -> NamespaceScope {
        NamespaceScope::Matching(Selector::from_label_selector(&LabelSelector::default()).unwrap())
    }

    fn rule(peers: &Peers) -> Rule {
        Rule {
            peers: peers.clone(),
            ports: Vec::new(),
        }
    }

    fn inventory(workloads: Vec<Workload>) -> Inventory {
        Inventory {
            namespaces: vec![Namespace {
                name: "x".into(),
                labels: Labels::new(),
            }],
            workloads: workloads.into_iter().map(Arc::new).collect(),
            ..Inventory::default()
        }
    }

    /// The cache a compile over `inventory` leaves, with identities 100, 101…
    fn cache(inventory: &Inventory, rules: &[Rule]) -> NamedCache {
        let classes = PeerClasses::build(inventory, rules);
        let by_peers = rules
            .iter()
            .map(|r| (r.peers.clone(), names(&classes, &r.peers)))
            .collect();
        NamedCache {
            identities: (100..).take(classes.classes.len()).collect(),
            classes: classes.classes,
            by_peers,
        }
    }

    fn names(classes: &PeerClasses, peers: &Peers) -> Vec<usize> {
        (0..classes.classes.len())
            .filter(|&i| named_by(&classes.classes[i], peers))
            .collect()
    }

    #[test]
    fn a_new_class_renames_only_the_lists_that_select_it() {
        let (web, db, api) = (selecting("web"), selecting("db"), selecting("api"));
        let rules = [rule(&web), rule(&db), rule(&api)];
        let before = inventory(vec![
            workload("a", "web", "10.0.0.1"),
            workload("b", "db", "10.0.0.2"),
        ]);
        let old = cache(&before, &rules);
        let old_identity = |peers: &Peers| -> Vec<u32> {
            old.by_peers[peers]
                .iter()
                .map(|&i| old.identities[i])
                .collect()
        };
        let (web_before, db_before) = (old_identity(&web), old_identity(&db));
        // a moves to app=api: the web class goes, an api class comes.
        let after = inventory(vec![
            workload("a", "api", "10.0.0.1"),
            workload("b", "db", "10.0.0.2"),
        ]);
        let now = PeerClasses::build(&after, &rules);
        // db keeps its identity; api is new.
        let db_index = now.classes.iter().position(|c| named_by(c, &db)).unwrap();
        let mut identities = vec![0; now.classes.len()];
        identities[db_index] = db_before[0];
        for (i, id) in identities.iter_mut().enumerate() {
            if i != db_index {
                *id = 200 + i as u32;
            }
        }
        let (carried, delta) = old.carry(&now, &identities);
        for peers in [&web, &db, &api] {
            assert_eq!(carried[peers], names(&now, peers), "{peers:?}");
        }
        let ClassDelta::Changed {
            came_or_went,
            port_classes,
        } = &delta
        else {
            panic!("{delta:?}");
        };
        assert_eq!(came_or_went.len(), 2, "web went, api came");
        assert!(!port_classes, "no pod names a port");
        assert_eq!(web_before.len(), 1);
        // Reached exactly where the list's identities changed: web's class
        // went, api's came, db's stayed with its identity.
        let identities_now =
            |peers: &Peers| -> Vec<u32> { carried[peers].iter().map(|&i| identities[i]).collect() };
        assert_ne!(identities_now(&web), web_before);
        assert_eq!(identities_now(&db), db_before);
        assert!(!reaches(&delta, &np_with(&[rule(&db)])));
        assert!(reaches(&delta, &np_with(&[rule(&web)])));
        assert!(reaches(&delta, &np_with(&[rule(&api)])));
        // Lists with no previous answer (their policy selected nothing
        // here): reached when they name a class that came or went.
        let (api_anywhere, db_anywhere) = (
            selecting_in(every_namespace(), "api"),
            selecting_in(every_namespace(), "db"),
        );
        let api_in_y = selecting_in(NamespaceScope::Exactly("y".into()), "api");
        assert!(!carried.contains_key(&api_anywhere));
        assert!(reaches(&delta, &np_with(&[rule(&api_anywhere)])));
        assert!(!reaches(&delta, &np_with(&[rule(&db_anywhere)])));
        assert!(!reaches(&delta, &np_with(&[rule(&api_in_y)])));
    }

    #[test]
    fn the_same_classes_reach_nothing_and_an_identity_change_is_unknown() {
        let web = selecting("web");
        let rules = [rule(&web)];
        let inv = inventory(vec![workload("a", "web", "10.0.0.1")]);
        let old = cache(&inv, &rules);
        let now = PeerClasses::build(&inv, &rules);
        let (_, delta) = old.clone().carry(&now, &old.identities);
        assert_eq!(delta, ClassDelta::Same);
        assert!(!reaches(&delta, &np_with(&[rule(&web)])));

        let moved: Vec<u32> = old.identities.iter().map(|i| i + 1).collect();
        let (carried, delta) = old.carry(&now, &moved);
        assert_eq!(delta, ClassDelta::Unknown);
        assert!(carried.is_empty());
        assert!(reaches(&delta, &np_with(&[])));
    }

    fn np_with(rules: &[Rule]) -> PolicyKind {
        PolicyKind::NetworkPolicy(NetworkPolicyRules {
            pod_selector: Selector::from_label_selector(&LabelSelector::default()).unwrap(),
            isolates_ingress: true,
            isolates_egress: false,
            ingress: rules.to_vec(),
            egress: Vec::new(),
        })
    }
}
