//! Pods, Namespaces and this node's Node object → the [`Inventory`] the
//! compiler reads. Every pod with an address is a peer; pods scheduled on
//! this node are also enforced (they get a cgroup).
//!
//! The API can momentarily disagree with itself (a terminating pod and its
//! replacement sharing an address, a pod listing a port name twice across
//! containers). Such conflicts are resolved here, deterministically, so one
//! odd object never stops the whole node from being reconciled.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};

use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::slim_pod::SlimPod as Pod;

mod patch;

use crate::policy::model::{
    is_valid_port_name, ContainerPort, Inventory, Namespace, Protocol, Workload,
};

/// Where a local pod's cgroup is, or why it is not known yet.
pub trait CgroupLookup {
    /// The pod's cgroup (absolute). `Err` carries the path the pod is
    /// expected at, which the reconciler reports as missing and retries.
    fn pod_cgroup(&self, pod: &Pod) -> Result<PathBuf, PathBuf>;
    /// Which listing of the cgroups answers: a pod unchanged since it was
    /// looked up in the same listing has the same answer. `None` (the
    /// default): look every pod up every time.
    fn listing(&self) -> Option<u64> {
        None
    }
}

/// The node-local part of a translation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LocalPods {
    /// Host-network pods on this node: policy does not apply to them.
    pub host_network: Vec<PathBuf>,
}

/// Pods that still hold their address and may run: not finished.
fn is_live(pod: &Pod) -> bool {
    !matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    )
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let mut ips: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        );
    }
    // At most one per family, as the inventory requires (and as the API
    // guarantees for dual-stack pods).
    let mut seen_v4 = false;
    let mut seen_v6 = false;
    ips.retain(|ip| {
        let seen: &mut bool = if ip.is_ipv4() {
            &mut seen_v4
        } else {
            &mut seen_v6
        };
        !std::mem::replace(seen, true)
    });
    ips
}

/// Named container ports; the first of a duplicated name wins.
fn named_ports(pod: &Pod) -> Vec<ContainerPort> {
    let mut ports: Vec<ContainerPort> = Vec::new();
    let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
    for port in containers.flat_map(|c| c.ports.iter().flatten()) {
        let Some(name) = port.name.as_deref().filter(|n| is_valid_port_name(n)) else {
            continue;
        };
        let Ok(number) = u16::try_from(port.container_port) else {
            continue;
        };
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "UDP" => Protocol::Udp,
            "SCTP" => Protocol::Sctp,
            _ => Protocol::Tcp,
        };
        if number == 0 || ports.iter().any(|p| p.name == name) {
            continue;
        }
        ports.push(ContainerPort {
            name: name.to_string(),
            container_port: number,
            protocol,
        });
    }
    ports
}

/// Addresses of this node that traffic from the host comes from: the
/// Node's addresses, and the gateway (first) address of each pod CIDR,
/// which bridge-based CNIs give the host side and which kubelet probes
/// then come from. Returns (node addresses, gateways): a pod holding a
/// "gateway" address shows the CNI does not use it so, and keeps it.
pub fn node_ips(node: Option<&Node>) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let Some(node) = node else {
        return (Vec::new(), Vec::new());
    };
    let mut ips: Vec<IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    let cidrs = node.spec.iter().flat_map(|s| {
        s.pod_cidrs
            .iter()
            .flatten()
            .chain(s.pod_cidr.iter())
            .cloned()
            .collect::<Vec<_>>()
    });
    let mut gateways: Vec<IpAddr> = cidrs
        .filter_map(|cidr| first_address(&cidr.parse::<ipnet::IpNet>().ok()?))
        .filter(|gateway| !ips.contains(gateway))
        .collect();
    ips.sort();
    ips.dedup();
    gateways.sort();
    gateways.dedup();
    (ips, gateways)
}

/// The network address plus one: the conventional gateway.
fn first_address(net: &ipnet::IpNet) -> Option<IpAddr> {
    match net {
        ipnet::IpNet::V4(n) if n.prefix_len() < 31 => {
            Some(IpAddr::V4((u32::from(n.network()) + 1).into()))
        }
        ipnet::IpNet::V6(n) if n.prefix_len() < 127 => {
            Some(IpAddr::V6((u128::from(n.network()) + 1).into()))
        }
        _ => None,
    }
}

/// Which of two pods keeps a contested address: a running pod over a
/// terminating one, then the newer one (the old one is on its way out).
fn outranks(a: &Pod, b: &Pod) -> bool {
    let rank = |p: &Pod| {
        (
            p.metadata.deletion_timestamp.is_none(),
            p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            p.metadata.name.clone(),
        )
    };
    rank(a) > rank(b)
}

/// A pod as a workload, before this node's cgroup and the view's address
/// conflicts are applied.
struct Translated {
    /// The pod still holds its address and may run, and has a name.
    usable: bool,
    /// Scheduled on this node.
    local: bool,
    host_network: bool,
    /// `cgroup` is the one given the last time it was used.
    workload: Arc<Workload>,
    /// The listing `workload.cgroup` was looked up in.
    looked_up_in: Option<u64>,
    /// The last view that had the pod.
    seen_in: u64,
}

impl Translated {
    fn of(pod: &Pod, node_name: &str) -> Self {
        let spec = pod.spec.as_ref();
        let workload = Workload {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            labels: pod.labels(),
            cgroup: None,
            ips: pod_ips(pod),
            ports: named_ports(pod),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|a| !a.is_empty()),
        };
        Self {
            usable: is_live(pod) && pod.metadata.name.is_some() && pod.metadata.namespace.is_some(),
            local: spec.and_then(|s| s.node_name.as_deref()) == Some(node_name),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            workload: Arc::new(workload),
            looked_up_in: None,
            seen_in: 0,
        }
    }

    /// Shares `before`'s workload when this translation says the same: the
    /// pod changed only where the view does not look (its conditions, the
    /// deletion mark that comes before its removal), so the view stays the
    /// same and the pass has nothing to work out. Its cgroup is looked up
    /// again all the same.
    fn share_workload_of(&mut self, before: &Translated) {
        let flags = |t: &Translated| (t.usable, t.local, t.host_network);
        if flags(self) != flags(before) {
            return;
        }
        let mut probe = Workload::clone(&self.workload);
        probe.cgroup = before.workload.cgroup.clone();
        if probe == *before.workload {
            self.workload = Arc::clone(&before.workload);
        }
    }

    /// The pod's workload in a view, before addresses and cgroups claimed
    /// twice are settled: `None` for a pod that is not a peer of its own
    /// (finished, unnamed, or on the host's network: a local host-network
    /// pod's cgroup goes to `local`), or that has neither an address nor a
    /// cgroup.
    fn in_view(
        &mut self,
        pod: &Pod,
        cgroups: &impl CgroupLookup,
        local: &mut LocalPods,
    ) -> Option<Arc<Workload>> {
        let workload = if !self.usable {
            None
        } else if self.host_network {
            // Shares the node's addresses: not a peer of its own, and
            // NetworkPolicy does not apply to it.
            if self.local {
                if let Ok(cgroup) = cgroups.pod_cgroup(pod) {
                    local.host_network.push(cgroup);
                }
            }
            None
        } else {
            let listing = cgroups.listing();
            if !self.local {
                Some(self.with_cgroup(None))
            } else if listing.is_some() && self.looked_up_in == listing {
                // Looked up in this very listing: the workload has it
                // (copying and comparing a thousand paths was a tenth of
                // the view).
                Some(Arc::clone(&self.workload))
            } else {
                self.looked_up_in = listing;
                let cgroup = cgroups.pod_cgroup(pod).unwrap_or_else(|expected| expected);
                Some(self.with_cgroup(Some(cgroup)))
            }
        };
        workload.filter(|w| !w.ips.is_empty() || w.cgroup.is_some())
    }

    /// The workload with this cgroup, shared with the last view when the
    /// cgroup is the same.
    fn with_cgroup(&mut self, cgroup: Option<PathBuf>) -> Arc<Workload> {
        if self.workload.cgroup != cgroup {
            Arc::make_mut(&mut self.workload).cgroup = cgroup;
        }
        Arc::clone(&self.workload)
    }
}

/// Each pod's translation, kept while the store holds the same object: the
/// reflector replaces a pod's `Arc` when the pod changes, so an unchanged
/// pod is neither translated again nor copied, and the views of two passes
/// share its workload.
#[derive(Default)]
pub struct Translations {
    /// By the address of the pod object, which the kept `Arc` pins.
    by_object: HashMap<usize, (Arc<Pod>, Translated)>,
    /// The keys of `by_object` by namespace and name: the store hands pods
    /// out in no order, and sorting five thousand by name took longer than
    /// placing the few that changed.
    order: Vec<usize>,
    /// The node the translations were made for.
    node_name: String,
    /// Counts views.
    views: u64,
    /// Addresses more than one pod (or a pod and the node) claimed in the
    /// last view: who keeps one depends on the pods' deletion marks and
    /// ages, so a change to those decides the view there.
    contested: HashSet<IpAddr>,
    /// The node's pod CIDR gateways in the last view: one is a node
    /// address only while no pod holds it.
    gateways: Vec<IpAddr>,
    /// The last view gave a cgroup two pods claimed to the first only:
    /// which one keeps it depends on all of them.
    cgroup_taken: bool,
}

/// How the view orders pods: by namespace, then name.
fn order_key(pod: &Pod) -> (&str, &str) {
    (
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default(),
    )
}

impl Translations {
    /// The last view's translation of this pod (by namespace, name and
    /// UID), while the last view's pods are still in `order`.
    fn translated_before(&self, pod: &Pod) -> Option<&Translated> {
        let (namespace, name) = order_key(pod);
        let (before, translated) = self.kept(namespace, name)?;
        (before.metadata.uid == pod.metadata.uid).then_some(translated)
    }

    /// The last view's pod of this namespace and name, with its
    /// translation.
    fn kept(&self, namespace: &str, name: &str) -> Option<&(Arc<Pod>, Translated)> {
        let key = (namespace, name);
        let place = self
            .order
            .partition_point(|other| order_key(&self.by_object[other].0) < key);
        let kept = self.by_object.get(self.order.get(place)?)?;
        (order_key(&kept.0) == key).then_some(kept)
    }

    /// Whether the last view stays as it is with the pods `named` (by
    /// namespace and name) as `current` has them now: each is gone from
    /// both, or reads exactly as its kept translation did, names the same
    /// cgroup, and holds no contested address (where its deletion mark or
    /// age would decide who keeps it). A pod's conditions, and the deletion
    /// mark that comes before its removal, change nothing the view reads;
    /// telling so from the few named pods saves translating them all.
    pub fn read_alike<'a>(
        &self,
        named: impl IntoIterator<Item = (&'a str, &'a str)>,
        current: impl Fn(&str, &str) -> Option<Arc<Pod>>,
    ) -> bool {
        named.into_iter().all(|(namespace, name)| {
            match (self.kept(namespace, name), current(namespace, name)) {
                (None, None) => true,
                (Some((before, _)), Some(now)) if Arc::ptr_eq(before, &now) => true,
                (Some((before, translated)), Some(now)) => {
                    fn rank(p: &Pod) -> (bool, Option<&Time>) {
                        (
                            p.metadata.deletion_timestamp.is_none(),
                            p.metadata.creation_timestamp.as_ref(),
                        )
                    }
                    /// What the cgroup lookup reads.
                    fn cgroup_of(p: &Pod) -> (Option<&BTreeMap<String, String>>, Option<&str>) {
                        (
                            p.metadata.annotations.as_ref(),
                            p.status.as_ref().and_then(|s| s.qos_class.as_deref()),
                        )
                    }
                    let mut again = Translated::of(&now, &self.node_name);
                    again.share_workload_of(translated);
                    before.metadata.uid == now.metadata.uid
                        && Arc::ptr_eq(&again.workload, &translated.workload)
                        && cgroup_of(before) == cgroup_of(&now)
                        && (rank(before) == rank(&now)
                            || !translated
                                .workload
                                .ips
                                .iter()
                                .any(|ip| self.contested.contains(ip)))
                }
                _ => false,
            }
        })
    }

    /// The view of pods, namespaces and the node (see the module docs).
    pub fn inventory<'n, 'p>(
        &mut self,
        node_name: &str,
        node: Option<&Node>,
        namespaces: impl IntoIterator<Item = &'n ApiNamespace>,
        pods: impl IntoIterator<Item = &'p Arc<Pod>>,
        cgroups: &impl CgroupLookup,
    ) -> (Inventory, LocalPods) {
        if self.node_name != node_name {
            self.by_object.clear();
            self.order.clear();
            self.node_name = node_name.to_string();
        }
        self.views += 1;
        let view = self.views;
        let mut local = LocalPods::default();
        let mut namespace_list: Vec<Namespace> = namespaces
            .into_iter()
            .filter_map(|ns| {
                Some(Namespace {
                    name: ns.metadata.name.clone()?,
                    labels: ns.metadata.labels.clone().unwrap_or_default(),
                })
            })
            .collect();
        namespace_list.sort_by(|a, b| a.name.cmp(&b.name));
        namespace_list.dedup_by(|a, b| a.name == b.name);

        let (mut node_ips, gateways) = node_ips(node);
        // Address → index of the pod holding it; node addresses are never
        // handed to a pod.
        let mut holders: HashMap<IpAddr, usize> = HashMap::new();
        let mut added: Vec<usize> = Vec::new();
        // Marked in place: moving five thousand entries to a new map each
        // view cost more than translating the few that changed. A kept pod
        // pins its address, so no other pod can have it: an address seen
        // before is the same pod exactly when it is the same `Arc`.
        let mut replaced = false;
        for pod in pods {
            let at = Arc::as_ptr(pod) as usize;
            match self.by_object.get_mut(&at) {
                Some((kept, t)) if Arc::ptr_eq(kept, pod) => t.seen_in = view,
                _ => {
                    let mut translated = Translated::of(pod, node_name);
                    if let Some(before) = self.translated_before(pod) {
                        translated.share_workload_of(before);
                    }
                    translated.seen_in = view;
                    replaced |= self
                        .by_object
                        .insert(at, (Arc::clone(pod), translated))
                        .is_some();
                    added.push(at);
                }
            }
        }
        self.by_object.retain(|_, (_, t)| t.seen_in == view);
        let by_object = &mut self.by_object;
        self.order.retain(|at| by_object.contains_key(at));
        if replaced {
            // Not possible while pods are pinned; placed again below if so.
            self.order.retain(|at| !added.contains(at));
        }
        for at in added {
            let key = order_key(&by_object[&at].0);
            let place = self
                .order
                .partition_point(|other| order_key(&by_object[other].0) <= key);
            self.order.insert(place, at);
        }
        let mut candidates: Vec<(Arc<Pod>, Arc<Workload>)> = Vec::new();
        for at in &self.order {
            let (pod, translated) = by_object.get_mut(at).expect("ordered pods are kept");
            if let Some(w) = translated.in_view(pod, cgroups, &mut local) {
                candidates.push((Arc::clone(pod), w));
            }
        }
        self.contested.clear();
        for i in 0..candidates.len() {
            // Nearly every pod's addresses are its own: claimed without
            // copying its address list (five thousand copies a view).
            let own = &candidates[i].1.ips;
            let uncontested = own.iter().enumerate().all(|(k, ip)| {
                !node_ips.contains(ip) && !holders.contains_key(ip) && !own[..k].contains(ip)
            });
            if uncontested {
                holders.extend(own.iter().map(|ip| (*ip, i)));
                continue;
            }
            let ips = candidates[i].1.ips.clone();
            for ip in ips {
                if node_ips.contains(&ip) {
                    self.contested.insert(ip);
                    Arc::make_mut(&mut candidates[i].1).ips.retain(|a| *a != ip);
                    continue;
                }
                match holders.get(&ip).copied() {
                    None => {
                        holders.insert(ip, i);
                        continue;
                    }
                    Some(j) if outranks(&candidates[i].0, &candidates[j].0) => {
                        Arc::make_mut(&mut candidates[j].1).ips.retain(|a| *a != ip);
                        holders.insert(ip, i);
                    }
                    Some(_) => Arc::make_mut(&mut candidates[i].1).ips.retain(|a| *a != ip),
                }
                self.contested.insert(ip);
            }
        }
        node_ips.extend(gateways.iter().filter(|g| !holders.contains_key(g)));
        self.gateways = gateways;
        self.cgroup_taken = false;
        node_ips.sort();
        // Two local pods never share a cgroup unless the lookup is confused;
        // keep the first rather than reject the node's whole state.
        let mut cgroup_owners: HashSet<&Path> = HashSet::new();
        let mut workloads: Vec<Arc<Workload>> = Vec::with_capacity(candidates.len());
        for (_, candidate) in &candidates {
            let mut w = Arc::clone(candidate);
            // Remote pods have none: only the local fifth is hashed.
            if let Some(cgroup) = candidate.cgroup.as_deref() {
                if !cgroup_owners.insert(cgroup) {
                    self.cgroup_taken = true;
                    Arc::make_mut(&mut w).cgroup = None;
                }
            }
            if w.ips.is_empty() && w.cgroup.is_none() {
                continue;
            }
            workloads.push(w);
        }
        // In order already (see `order`); one name twice in the store is
        // not possible, but the view must not have it either.
        workloads.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
        (
            Inventory {
                node_ips,
                namespaces: namespace_list,
                workloads,
                services: Vec::new(),
            },
            local,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fixed;
    impl CgroupLookup for Fixed {
        fn pod_cgroup(&self, pod: &Pod) -> Result<PathBuf, PathBuf> {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if uid.starts_with("missing") {
                Err(PathBuf::from(format!("/cg/expected/{uid}")))
            } else {
                Ok(PathBuf::from(format!("/cg/{uid}")))
            }
        }
    }

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    /// A first translation (nothing kept from an earlier view).
    fn inventory<'a>(
        node_name: &str,
        node: Option<&Node>,
        namespaces: impl IntoIterator<Item = &'a ApiNamespace>,
        pods: &[Pod],
        cgroups: &impl CgroupLookup,
    ) -> (Inventory, LocalPods) {
        let pods: Vec<Arc<Pod>> = pods.iter().cloned().map(Arc::new).collect();
        Translations::default().inventory(node_name, node, namespaces, &pods, cgroups)
    }

    /// The cgroups of the fixture, except pods whose cgroup is not there yet.
    struct Listed(Vec<&'static str>);
    impl CgroupLookup for Listed {
        fn pod_cgroup(&self, pod: &Pod) -> Result<PathBuf, PathBuf> {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if self.0.contains(&uid.as_str()) {
                Ok(PathBuf::from(format!("/cg/{uid}")))
            } else {
                Err(PathBuf::from(format!("/cg/expected/{uid}")))
            }
        }
    }

    /// An unchanged pod object (the same `Arc` in the store) keeps its
    /// workload, shared with the earlier view; a changed object, or a local
    /// pod whose cgroup appeared, gets a new one with the change.
    #[test]
    fn unchanged_pods_share_their_workload_with_the_last_view() {
        let mut translations = Translations::default();
        let a = Arc::new(web("a", "n1", "10.0.0.2"));
        let b = Arc::new(web("b", "n2", "10.0.1.2"));
        let (first, _) = translations.inventory("n1", None, [], [&a, &b], &Listed(vec![]));
        assert_eq!(
            first.workloads[0].cgroup.as_deref(),
            Some(Path::new("/cg/expected/a"))
        );
        let mut relabelled = web("b", "n2", "10.0.1.2");
        relabelled
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("app".into(), "db".into());
        let b2 = Arc::new(relabelled);
        let (second, _) = translations.inventory("n1", None, [], [&a, &b2], &Listed(vec!["a"]));
        second.check().unwrap();
        assert_eq!(
            second.workloads[0].cgroup.as_deref(),
            Some(Path::new("/cg/a"))
        );
        assert!(!Arc::ptr_eq(&first.workloads[0], &second.workloads[0]));
        assert_eq!(second.workloads[1].labels["app"], "db");
        assert_eq!(
            first.workloads[1].labels["app"], "web",
            "the old view stands"
        );
        let (third, _) = translations.inventory("n1", None, [], [&a, &b2], &Listed(vec!["a"]));
        assert!(Arc::ptr_eq(&second.workloads[0], &third.workloads[0]));
        assert!(Arc::ptr_eq(&second.workloads[1], &third.workloads[1]));
        assert_eq!(second, third);
    }

    /// A kept translation is for one node: the agent told another node name
    /// translates again, so no pod stays local to the wrong node.
    #[test]
    fn a_new_node_name_translates_every_pod_again() {
        let mut translations = Translations::default();
        let a = Arc::new(web("a", "n1", "10.0.0.2"));
        let (on_n1, _) = translations.inventory("n1", None, [], [&a], &Fixed);
        assert!(on_n1.workloads[0].cgroup.is_some());
        let (on_n2, _) = translations.inventory("n2", None, [], [&a], &Fixed);
        assert!(on_n2.workloads[0].cgroup.is_none(), "a peer on n2");
    }

    /// Address conflicts are settled on the view's copy: the kept
    /// translation still has the address, so it is back once the other pod
    /// is gone.
    #[test]
    fn an_address_taken_away_returns_when_the_conflict_ends() {
        let mut translations = Translations::default();
        let mut old = web("old", "n2", "10.0.0.7");
        old.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ));
        let old = Arc::new(old);
        let new = Arc::new(web("new", "n2", "10.0.0.7"));
        let (both, _) = translations.inventory("n1", None, [], [&old, &new], &Fixed);
        assert_eq!(both.workloads.len(), 1);
        assert_eq!(both.workloads[0].name, "new");
        let (alone, _) = translations.inventory("n1", None, [], [&old], &Fixed);
        assert_eq!(alone.workloads.len(), 1);
        assert_eq!(alone.workloads[0].name, "old");
        assert_eq!(
            alone.workloads[0].ips,
            vec!["10.0.0.7".parse::<IpAddr>().unwrap()]
        );
    }

    fn web(name: &str, node: &str, ip: &str) -> Pod {
        pod(json!({
            "metadata": {"name": name, "namespace": "x", "uid": name, "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": [
                {"name": "c", "ports": [{"name": "http", "containerPort": 8080},
                                         {"name": "http", "containerPort": 9090},
                                         {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
    }

    /// However the store hands pods out, and whatever changed since the
    /// last view, the view is in namespace and name order and equals a
    /// translation from scratch.
    #[test]
    fn the_kept_order_follows_pods_added_changed_and_removed() {
        let in_ns = |ns: &str, name: &str, ip: &str| {
            let mut p = web(name, "n2", ip);
            p.metadata.namespace = Some(ns.into());
            p.metadata.uid = Some(format!("{ns}-{name}"));
            Arc::new(p)
        };
        let mut pods: Vec<Arc<Pod>> = (0..40u8)
            .map(|i| {
                in_ns(
                    ["b", "a", "c"][usize::from(i % 3)],
                    &format!("p{}", 97 - i),
                    &format!("10.0.0.{i}"),
                )
            })
            .collect();
        let mut translations = Translations::default();
        let mut seed = 7u32;
        for round in 0..30u8 {
            // A deterministic shuffle, then an add, a change or a removal.
            for i in (1..pods.len()).rev() {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                pods.swap(i, (seed as usize >> 8) % (i + 1));
            }
            match round % 3 {
                0 => pods.push(in_ns(
                    "b",
                    &format!("new{round}"),
                    &format!("10.0.1.{round}"),
                )),
                1 => {
                    let mut changed = (*pods[0]).clone();
                    changed.metadata.labels = Some([("app".into(), format!("v{round}"))].into());
                    pods[0] = Arc::new(changed);
                }
                _ => {
                    pods.pop();
                }
            }
            let (view, _) = translations.inventory("n1", None, [], &pods, &Fixed);
            let keys: Vec<_> = view
                .workloads
                .iter()
                .map(|w| (w.namespace.clone(), w.name.clone()))
                .collect();
            let mut sorted = keys.clone();
            sorted.sort();
            assert_eq!(keys, sorted, "round {round}: not in order");
            let (fresh, _) = Translations::default().inventory("n1", None, [], &pods, &Fixed);
            assert_eq!(view, fresh, "round {round}");
        }
    }

    /// Looks pods up in listing `.1`, counting the look-ups.
    struct Counted(std::cell::Cell<usize>, Option<u64>, &'static str);
    impl CgroupLookup for Counted {
        fn pod_cgroup(&self, pod: &Pod) -> Result<PathBuf, PathBuf> {
            self.0.set(self.0.get() + 1);
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            Ok(PathBuf::from(format!("/cg/{}/{uid}", self.2)))
        }
        fn listing(&self) -> Option<u64> {
            self.1
        }
    }

    /// An unchanged local pod is not looked up again in the same listing;
    /// a new listing, a changed pod, or a lookup without listings is.
    #[test]
    fn a_pod_is_looked_up_once_per_listing() {
        let a = Arc::new(web("a", "n1", "10.0.0.2"));
        let b = Arc::new(web("b", "n1", "10.0.0.3"));
        let mut translations = Translations::default();
        // Look-ups made translating `pods` with listing `listing`, whose
        // cgroups are below `/cg/{tag}`.
        let mut looked_up = |pods: &[&Arc<Pod>], listing: Option<u64>, tag: &'static str| {
            let lookup = Counted(Default::default(), listing, tag);
            let (view, _) = translations.inventory("n1", None, [], pods.iter().copied(), &lookup);
            (lookup.0.get(), view)
        };
        let (n, _) = looked_up(&[&a, &b], Some(1), "x");
        assert_eq!(n, 2);
        let (n, view) = looked_up(&[&a, &b], Some(1), "y");
        assert_eq!(n, 0, "same listing, same pods: nothing to look up");
        assert_eq!(
            view.workloads[0].cgroup.as_deref(),
            Some(Path::new("/cg/x/a"))
        );
        let b2 = Arc::new(web("b", "n1", "10.0.0.4"));
        let (n, _) = looked_up(&[&a, &b2], Some(1), "y");
        assert_eq!(n, 1, "the changed pod only");
        let (n, view) = looked_up(&[&a, &b2], Some(2), "z");
        assert_eq!(n, 2, "a new listing");
        assert_eq!(
            view.workloads[0].cgroup.as_deref(),
            Some(Path::new("/cg/z/a"))
        );
        let (n, _) = looked_up(&[&a, &b2], None, "z");
        assert_eq!(n, 2, "no listing: every time");
    }

    /// A pod object replaced by one the view reads the same (a deletion
    /// mark, a new resourceVersion) keeps its workload, so the pass finds
    /// nothing changed; a change the view reads, or a new pod under the
    /// same name, does not.
    #[test]
    fn a_pod_changed_where_the_view_does_not_look_keeps_its_workload() {
        let view = |translations: &mut Translations, pods: &[&Arc<Pod>]| {
            translations
                .inventory("n1", None, [], pods.iter().copied(), &Fixed)
                .0
        };
        let (a, b) = (
            Arc::new(web("a", "n1", "10.0.0.2")),
            Arc::new(web("b", "n2", "10.0.0.3")),
        );
        let mut translations = Translations::default();
        let first = view(&mut translations, &[&a, &b]);
        let marked = |p: &Pod| {
            let mut p = p.clone();
            p.metadata.resource_version = Some("9".into());
            p.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
            );
            Arc::new(p)
        };
        let (a2, b2) = (marked(&a), marked(&b));
        let second = view(&mut translations, &[&a2, &b2]);
        for (now, then) in second.workloads.iter().zip(&first.workloads) {
            assert!(Arc::ptr_eq(now, then), "{} was made again", now.name);
        }
        assert_eq!(second, first);

        let mut relabelled = (*b2).clone();
        relabelled.metadata.labels = Some([("app".to_string(), "db".to_string())].into());
        let recreated = {
            let mut p = (*a2).clone();
            p.metadata.uid = Some("a-again".into());
            Arc::new(p)
        };
        let third = view(&mut translations, &[&recreated, &Arc::new(relabelled)]);
        assert!(!Arc::ptr_eq(&third.workloads[0], &second.workloads[0]));
        assert_eq!(third.workloads[1].labels["app"], "db");
        assert_eq!(
            third.workloads[0].cgroup.as_deref(),
            Some(Path::new("/cg/a-again")),
            "the new pod's own cgroup"
        );
    }

    /// The named pods read alike exactly when the view could not change:
    /// a deletion mark or a new resourceVersion on a pod with an address of
    /// its own reads alike; so does a pod gone from both. A change the view
    /// reads, a removal, a new pod, a re-created one, a changed QoS class
    /// (which names the cgroup) or a mark on a contested address does not.
    /// Whenever it says alike, a translation of the new store equals the
    /// kept view.
    #[test]
    fn named_pods_read_alike_only_when_the_view_stays_the_same() {
        let marked = |p: &Pod| {
            let mut p = p.clone();
            p.metadata.resource_version = Some("9".into());
            p.metadata.deletion_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()),
            );
            p
        };
        let with = |p: &Pod, change: &dyn Fn(&mut Pod)| {
            let mut p = p.clone();
            change(&mut p);
            p
        };
        let a = web("a", "n1", "10.0.0.2");
        let b = web("b", "n2", "10.0.0.3");
        // c and d claim one address: the deletion mark decides who keeps it.
        let c = web("c", "n2", "10.0.0.4");
        let d = web("d", "n2", "10.0.0.4");
        let before = [&a, &b, &c, &d];
        // (what changed, the store after it, the pod it names, alike)
        let qos = |p: &mut Pod| p.status.as_mut().unwrap().qos_class = Some("Burstable".into());
        let relabel =
            |p: &mut Pod| p.metadata.labels = Some([("app".to_string(), "db".to_string())].into());
        let recreate = |p: &mut Pod| p.metadata.uid = Some("again".into());
        let cases: Vec<(&str, Vec<Pod>, &str, bool)> = vec![
            (
                "marked",
                vec![marked(&a), b.clone(), c.clone(), d.clone()],
                "a",
                true,
            ),
            (
                "marked remote",
                vec![a.clone(), marked(&b), c.clone(), d.clone()],
                "b",
                true,
            ),
            (
                "never there",
                vec![a.clone(), b.clone(), c.clone(), d.clone()],
                "zz",
                true,
            ),
            (
                "relabelled",
                vec![with(&a, &relabel), b.clone(), c.clone(), d.clone()],
                "a",
                false,
            ),
            ("removed", vec![b.clone(), c.clone(), d.clone()], "a", false),
            (
                "added",
                vec![
                    a.clone(),
                    b.clone(),
                    c.clone(),
                    d.clone(),
                    web("e", "n2", "10.0.0.5"),
                ],
                "e",
                false,
            ),
            (
                "re-created",
                vec![with(&a, &recreate), b.clone(), c.clone(), d.clone()],
                "a",
                false,
            ),
            (
                "QoS",
                vec![with(&a, &qos), b.clone(), c.clone(), d.clone()],
                "a",
                false,
            ),
            (
                "contested",
                vec![a.clone(), b.clone(), c.clone(), marked(&d)],
                "d",
                false,
            ),
        ];
        for (what, after, name, alike) in cases {
            let mut translations = Translations::default();
            let kept: Vec<Arc<Pod>> = before.iter().map(|p| Arc::new((*p).clone())).collect();
            let view = translations.inventory("n1", None, [], &kept, &Fixed).0;
            let store: Vec<Arc<Pod>> = after.into_iter().map(Arc::new).collect();
            let current =
                |ns: &str, name: &str| store.iter().find(|p| order_key(p) == (ns, name)).cloned();
            assert_eq!(
                translations.read_alike([("x", name)], current),
                alike,
                "{what}"
            );
            if alike {
                let again = Translations::default()
                    .inventory("n1", None, [], &store, &Fixed)
                    .0;
                assert_eq!(again, view, "{what}: said alike, but the view changed");
            }
        }
    }

    #[test]
    fn local_pods_get_cgroups_and_remote_pods_are_peers() {
        let pods = [web("a", "n1", "10.0.0.2"), web("b", "n2", "10.0.1.2")];
        let (inv, _) = inventory("n1", None, [], &pods, &Fixed);
        inv.check().unwrap();
        let a = &inv.workloads[0];
        assert_eq!(a.cgroup.as_deref(), Some(std::path::Path::new("/cg/a")));
        assert_eq!(a.ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            a.named_port("http", Protocol::Tcp),
            Some(8080),
            "first name wins"
        );
        assert_eq!(a.named_port("dns", Protocol::Udp), Some(53));
        assert!(inv.workloads[1].cgroup.is_none());
    }

    #[test]
    fn a_local_pod_without_a_cgroup_yet_is_listed_at_its_expected_path() {
        let mut p = web("missing-1", "n1", "10.0.0.3");
        p.status.as_mut().unwrap().pod_ip = None;
        p.status.as_mut().unwrap().pod_ips = None;
        let (inv, _) = inventory("n1", None, [], &[p], &Fixed);
        assert_eq!(
            inv.workloads[0].cgroup.as_deref(),
            Some(std::path::Path::new("/cg/expected/missing-1"))
        );
        assert!(inv.workloads[0].ips.is_empty());
    }

    #[test]
    fn finished_and_host_network_pods_are_not_peers() {
        let mut done = web("done", "n2", "10.0.0.9");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut host = web("host", "n1", "192.168.1.10");
        host.spec.as_mut().unwrap().host_network = Some(true);
        let (inv, local) = inventory("n1", None, [], &[done, host], &Fixed);
        assert!(inv.workloads.is_empty());
        assert_eq!(local.host_network, vec![PathBuf::from("/cg/host")]);
    }

    #[test]
    fn a_reused_address_goes_to_the_pod_that_is_not_terminating() {
        let mut old = web("old", "n2", "10.0.0.7");
        old.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-01-01T00:00:00Z".parse().unwrap(),
            ));
        let new = web("new", "n2", "10.0.0.7");
        let (inv, _) = inventory("n1", None, [], &[old, new], &Fixed);
        inv.check().unwrap();
        assert_eq!(inv.workloads.len(), 1, "the old pod has no other address");
        assert_eq!(inv.workloads[0].name, "new");
    }

    #[test]
    fn node_addresses_include_the_pod_cidr_gateway() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": "n1"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00:10:244:1::/64"]},
            "status": {"addresses": [
                {"type": "InternalIP", "address": "172.18.0.2"},
                {"type": "Hostname", "address": "n1"}]}
        }))
        .unwrap();
        let (ips, gateways) = node_ips(Some(&node));
        let text = |v: Vec<IpAddr>| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
        assert_eq!(text(ips), ["172.18.0.2"]);
        assert_eq!(text(gateways), ["10.244.1.1", "fd00:10:244:1::1"]);
        // A pod holding the "gateway" keeps it; the node does not claim it.
        let p = web("p", "n1", "10.244.1.1");
        let (inv, _) = inventory("n1", Some(&node), [], &[p], &Fixed);
        inv.check().unwrap();
        assert_eq!(text(inv.node_ips), ["172.18.0.2", "fd00:10:244:1::1"]);
        assert_eq!(text(inv.workloads[0].ips.clone()), ["10.244.1.1"]);
    }
}
