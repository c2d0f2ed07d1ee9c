//! What the mesh should look like, from the inventory: the local pods to
//! proxy for, and every meshed pod's address with its identity (so the
//! outbound proxy knows which destinations speak HBONE, and whom to
//! expect there).

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use crate::{
    cgroup,
    identity::spiffe::SpiffeId,
    policy::model::{Inventory, WorkloadRef},
};

use super::mode::{self, MeshMode};

/// A local meshed pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub reference: WorkloadRef,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, if it has one: then it is proxied over IPv6 too.
    pub ipv6: Option<Ipv6Addr>,
    pub id: SpiffeId,
    pub mode: MeshMode,
    /// The pod's cgroup directory, resolved.
    pub cgroup: PathBuf,
}

impl LocalPod {
    /// Is `ip` one of the pod's addresses?
    pub fn owns(&self, ip: IpAddr) -> bool {
        ip == IpAddr::V4(self.ip) || Some(ip) == self.ipv6.map(IpAddr::V6)
    }

    /// The pod's address of `other`'s family (IPv4 when it has no IPv6).
    pub fn address_like(&self, other: IpAddr) -> IpAddr {
        match (other, self.ipv6) {
            (IpAddr::V6(_), Some(v6)) => IpAddr::V6(v6),
            _ => IpAddr::V4(self.ip),
        }
    }
}

/// A meshed pod anywhere in the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub reference: WorkloadRef,
    pub id: SpiffeId,
    pub mode: MeshMode,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshPlan {
    pub local: BTreeMap<WorkloadRef, LocalPod>,
    pub peers: HashMap<IpAddr, Peer>,
    /// Bad mode labels, pods without an identity or an IPv4 address.
    pub problems: Vec<String>,
}

impl MeshPlan {
    pub fn new(inventory: &Inventory, trust_domain: &str, cgroup_mount: &Path) -> Self {
        let mut plan = Self::default();
        let modes = mode::NamespaceModes::of(inventory);
        for w in &inventory.workloads {
            let (mode, error) = modes.of_workload(w);
            plan.problems.extend(error.map(|e| e.to_string()));
            if !mode.is_meshed() {
                continue;
            }
            let id = match SpiffeId::new(trust_domain, &w.namespace, w.service_account()) {
                Ok(id) => id,
                Err(e) => {
                    plan.problems.push(format!(
                        "pod {}: not meshed, no identity: {e}",
                        w.reference()
                    ));
                    continue;
                }
            };
            for ip in &w.ips {
                plan.peers.insert(
                    *ip,
                    Peer {
                        reference: w.reference(),
                        id: id.clone(),
                        mode,
                    },
                );
            }
            let Some(cg) = &w.cgroup else { continue };
            let Some(ip) = w.ips.iter().find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            }) else {
                plan.problems.push(format!(
                    "pod {}: meshed ({mode}) but has no IPv4 address; the mesh carries IPv4 \
                     only, so its TCP is not proxied",
                    w.reference()
                ));
                continue;
            };
            plan.local.insert(
                w.reference(),
                LocalPod {
                    reference: w.reference(),
                    ip,
                    ipv6: w.ips.iter().find_map(|ip| match ip {
                        IpAddr::V6(v6) => Some(*v6),
                        IpAddr::V4(_) => None,
                    }),
                    id,
                    mode,
                    cgroup: cgroup::resolve(cgroup_mount, cg),
                },
            );
        }
        plan
    }

    /// The meshed pod at `ip`, if any.
    pub fn peer(&self, ip: IpAddr) -> Option<&Peer> {
        self.peers.get(&ip)
    }
}
