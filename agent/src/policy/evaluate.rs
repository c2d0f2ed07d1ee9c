//! Decides a flow straight from the policy objects: NetworkPolicy semantics
//! written as plainly as possible. It shares nothing with the compiler beyond
//! the data types and label matching, so it serves as the compiler's oracle
//! and as the explanation of a verdict ("allowed by rule 2 of x/web").
//!
//! Portcullis' reading of the implementation-defined corners, shared with
//! the kernel data path:
//! - a pod may always talk to itself, and loopback is always allowed;
//! - ingress from this node's own addresses is always allowed;
//! - ipBlock peers match pod addresses, but never this node's addresses
//!   (the kernel knows them only as the single HOST identity); egress to
//!   the node is allowed only by rules that allow every peer.

use std::net::IpAddr;

use crate::policy::model::{
    Direction, Inventory, NamespaceScope, NetworkPolicyRules, Peer, Peers, PolicyKind,
    PolicyObject, PolicyRef, PortSpec, Protocol, Rule, Workload,
};

/// A new flow: `src` connects to `dst` on `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowQuery {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Both directions allow it.
    pub allowed: bool,
    /// Judged for the source workload, if it is local.
    pub egress: DirectionVerdict,
    /// Judged for the destination workload, if it is local.
    pub ingress: DirectionVerdict,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectionVerdict {
    /// The address is not a workload enforced on this node.
    NotEnforced,
    /// No policy isolates the workload in this direction.
    NotIsolated,
    /// Loopback, or the workload's own address.
    Local,
    /// Ingress from this node.
    Host,
    /// Rule `rule_index` (of this direction) of `policy` allowed it; the
    /// first such rule, policies taken in namespace/name order.
    Allowed {
        policy: PolicyRef,
        rule_index: usize,
    },
    /// Isolated by these policies (sorted) and no rule allowed it.
    DefaultDeny { isolated_by: Vec<PolicyRef> },
}

impl DirectionVerdict {
    pub fn allows(&self) -> bool {
        !matches!(self, Self::DefaultDeny { .. })
    }
}

pub fn evaluate(inventory: &Inventory, policies: &[PolicyObject], query: &FlowQuery) -> Decision {
    // The kernel sees IPv4-mapped IPv6 as IPv4.
    let src = query.src.to_canonical();
    let dst = query.dst.to_canonical();
    let judge = |address: IpAddr, direction: Direction, peer: IpAddr| match local_workload(
        inventory, address,
    ) {
        Some(w) => judge(inventory, policies, w, direction, peer, query),
        None => DirectionVerdict::NotEnforced,
    };
    let egress = judge(src, Direction::Egress, dst);
    let ingress = judge(dst, Direction::Ingress, src);
    Decision {
        allowed: egress.allows() && ingress.allows(),
        egress,
        ingress,
    }
}

fn local_workload(inventory: &Inventory, address: IpAddr) -> Option<&Workload> {
    workload_with(inventory, address).filter(|w| w.is_local())
}

fn workload_with(inventory: &Inventory, address: IpAddr) -> Option<&Workload> {
    inventory
        .workloads
        .iter()
        .find(|w| w.ips.contains(&address))
}

/// The verdict for `workload`'s side of the flow; `peer` is the other end.
fn judge(
    inventory: &Inventory,
    policies: &[PolicyObject],
    workload: &Workload,
    direction: Direction,
    peer: IpAddr,
    query: &FlowQuery,
) -> DirectionVerdict {
    if peer.is_loopback() || workload.ips.contains(&peer) {
        return DirectionVerdict::Local;
    }
    if direction == Direction::Ingress && inventory.node_ips.contains(&peer) {
        return DirectionVerdict::Host;
    }
    let mut isolating: Vec<(&PolicyRef, &NetworkPolicyRules)> = policies
        .iter()
        .map(|p| match &p.kind {
            PolicyKind::NetworkPolicy(np) => (&p.reference, np),
        })
        .filter(|(r, np)| {
            r.namespace == workload.namespace
                && np.pod_selector.matches(&workload.labels)
                && np.isolates(direction)
        })
        .collect();
    if isolating.is_empty() {
        return DirectionVerdict::NotIsolated;
    }
    isolating.sort_by(|a, b| a.0.cmp(b.0));
    for (reference, np) in &isolating {
        let rules = match direction {
            Direction::Ingress => &np.ingress,
            Direction::Egress => &np.egress,
        };
        for (rule_index, rule) in rules.iter().enumerate() {
            if rule_allows(inventory, workload, direction, rule, peer, query) {
                return DirectionVerdict::Allowed {
                    policy: (*reference).clone(),
                    rule_index,
                };
            }
        }
    }
    DirectionVerdict::DefaultDeny {
        isolated_by: isolating.into_iter().map(|(r, _)| r.clone()).collect(),
    }
}

fn rule_allows(
    inventory: &Inventory,
    workload: &Workload,
    direction: Direction,
    rule: &Rule,
    peer: IpAddr,
    query: &FlowQuery,
) -> bool {
    let peer_ok = match &rule.peers {
        Peers::All => true,
        Peers::Only(peers) => peers.iter().any(|p| peer_matches(inventory, p, peer)),
    };
    if !peer_ok {
        return false;
    }
    if rule.ports.is_empty() {
        return true;
    }
    rule.ports
        .iter()
        .filter(|p| p.protocol == query.protocol)
        .any(|p| match &p.port {
            PortSpec::All => true,
            PortSpec::Range { first, last } => (*first..=*last).contains(&query.port),
            PortSpec::Named(name) => {
                // A named port is the destination's: ours for ingress, the
                // peer pod's for egress.
                let destination = match direction {
                    Direction::Ingress => Some(workload),
                    Direction::Egress => workload_with(inventory, peer),
                };
                destination.and_then(|d| d.named_port(name, query.protocol)) == Some(query.port)
            }
        })
}

fn peer_matches(inventory: &Inventory, peer: &Peer, address: IpAddr) -> bool {
    match peer {
        Peer::Pods { namespaces, pods } => {
            let Some(pod) = workload_with(inventory, address) else {
                return false;
            };
            let namespace_ok = match namespaces {
                NamespaceScope::Exactly(ns) => *ns == pod.namespace,
                NamespaceScope::Matching(selector) => {
                    selector.matches(&inventory.namespace_labels(&pod.namespace))
                }
            };
            namespace_ok && pods.matches(&pod.labels)
        }
        Peer::Block { cidr, except } => {
            !inventory.node_ips.contains(&address)
                && cidr.contains(&address)
                && !except.iter().any(|e| e.contains(&address))
        }
    }
}

#[cfg(test)]
mod tests;
