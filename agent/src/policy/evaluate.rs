//! Decides a flow straight from the policy objects: the semantics written as
//! plainly as possible. It shares nothing with the compiler beyond the data
//! types and label matching, so it serves as the compiler's oracle and as the
//! explanation of a verdict ("allowed by rule 2 of x/web").
//!
//! Per direction (both the source's egress and the destination's ingress
//! must pass):
//! 1. Admin-tier ClusterL4Policy rules whose subject selects the workload,
//!    by (priority, name, rule index): the first matching rule decides
//!    (Allow, Deny) or hands over to step 2 (Pass);
//! 2. an enforced L4Policy deny rule denies; else, if any NetworkPolicy or
//!    enforced L4Policy isolates the workload, their allow rules decide;
//! 3. if not isolated, the first matching Baseline-tier rule decides;
//! 4. otherwise the flow passes.
//!
//! A flow allowed by steps 2-4 that an audit-mode L4Policy would deny is an
//! AUDIT verdict: it passes and is counted against that policy.
//!
//! Portcullis' reading of the implementation-defined corners, shared with
//! the kernel data path:
//! - a pod may always talk to itself, and loopback is always allowed;
//! - ingress from this node's own addresses is always allowed;
//! - ipBlock peers match pod addresses, but never this node's addresses
//!   (the kernel knows them only as the single HOST identity); egress to
//!   the node is matched only by rules that name every peer.

use std::net::IpAddr;

use crate::identity::spiffe::SpiffeId;

use crate::policy::model::{
    Action, ClusterPolicyRules, Direction, Inventory, L4PolicyRules, Mode, NamespaceScope,
    NetworkPolicyRules, Peer, Peers, PolicyKind, PolicyObject, PolicyRef, PortSpec, Protocol, Rule,
    Tier, Workload,
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
    /// Both directions let it pass (an AUDIT verdict passes).
    pub allowed: bool,
    /// Judged for the source workload, if it is local.
    pub egress: DirectionVerdict,
    /// Judged for the destination workload, if it is local.
    pub ingress: DirectionVerdict,
}

impl Decision {
    /// Did an audit-mode policy flag either direction?
    pub fn audited(&self) -> bool {
        matches!(self.egress, DirectionVerdict::Audit { .. })
            || matches!(self.ingress, DirectionVerdict::Audit { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectionVerdict {
    /// The address is not a workload enforced on this node.
    NotEnforced,
    /// Nothing decided: no policy isolates the workload in this direction
    /// and no tier rule matched.
    NotIsolated,
    /// Loopback, or the workload's own address.
    Local,
    /// Ingress from this node.
    Host,
    /// Allow rule `rule_index` (of this direction) of a NetworkPolicy or
    /// L4Policy allowed it; the first such rule, policies taken in
    /// [`PolicyRef`] order.
    Allowed {
        policy: PolicyRef,
        rule_index: usize,
    },
    /// Isolated by these policies (sorted) and no rule allowed it.
    DefaultDeny { isolated_by: Vec<PolicyRef> },
    /// Rule `rule_index` of an enforced L4Policy's `ingressDeny` or
    /// `egressDeny` denied it.
    Denied {
        policy: PolicyRef,
        rule_index: usize,
    },
    /// Rule `rule_index` of a ClusterL4Policy decided (`action` is Allow or
    /// Deny).
    Tier {
        tier: Tier,
        priority: u32,
        policy: PolicyRef,
        rule_index: usize,
        action: Action,
    },
    /// The enforced policies let it pass, but the audit-mode L4Policy
    /// `policy` would deny it: it passes and is counted as AUDIT.
    Audit {
        policy: PolicyRef,
        cause: AuditCause,
    },
}

/// Why an audit-mode policy would deny a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuditCause {
    /// Its deny rule `rule_index` matches.
    DenyRule { rule_index: usize },
    /// It would isolate the workload and none of its allow rules matches.
    DefaultDeny,
}

impl DirectionVerdict {
    /// Does the flow pass this side?
    pub fn allows(&self) -> bool {
        !matches!(
            self,
            Self::DefaultDeny { .. }
                | Self::Denied { .. }
                | Self::Tier {
                    action: Action::Deny,
                    ..
                }
        )
    }
}

/// The decision for a plaintext flow: identity peers never match.
pub fn evaluate(inventory: &Inventory, policies: &[PolicyObject], query: &FlowQuery) -> Decision {
    evaluate_authenticated(inventory, policies, query, None)
}

/// The decision for a flow whose client proved `client` with its mTLS
/// certificate (`None`: plaintext): identity peers of the destination's
/// ingress rules match it.
pub fn evaluate_authenticated(
    inventory: &Inventory,
    policies: &[PolicyObject],
    query: &FlowQuery,
    client: Option<&SpiffeId>,
) -> Decision {
    // The kernel sees IPv4-mapped IPv6 as IPv4.
    let src = query.src.to_canonical();
    let dst = query.dst.to_canonical();
    let judge = |address: IpAddr, direction: Direction, peer: IpAddr| match local_workload(
        inventory, address,
    ) {
        Some(workload) => Judge {
            inventory,
            workload,
            direction,
            peer,
            query,
            client: client.filter(|_| direction == Direction::Ingress),
        }
        .verdict(policies),
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
        .map(|w| &**w)
}

/// One side of a flow: `workload` in `direction`; `peer` is the other end.
struct Judge<'a> {
    inventory: &'a Inventory,
    workload: &'a Workload,
    direction: Direction,
    peer: IpAddr,
    query: &'a FlowQuery,
    /// The peer's proven identity, on the destination's (ingress) side.
    client: Option<&'a SpiffeId>,
}

impl Judge<'_> {
    fn verdict(&self, policies: &[PolicyObject]) -> DirectionVerdict {
        let workload = self.workload;
        if self.peer.is_loopback() || workload.ips.contains(&self.peer) {
            return DirectionVerdict::Local;
        }
        if self.direction == Direction::Ingress && self.inventory.node_ips.contains(&self.peer) {
            return DirectionVerdict::Host;
        }
        let mut sorted: Vec<&PolicyObject> = policies.iter().collect();
        sorted.sort_by(|a, b| a.reference.cmp(&b.reference));
        let namespace_labels = self.inventory.namespace_labels(&workload.namespace);
        let mut tiered: Vec<(&PolicyRef, &ClusterPolicyRules)> = Vec::new();
        let mut network: Vec<(&PolicyRef, &NetworkPolicyRules)> = Vec::new();
        let mut l4: Vec<(&PolicyRef, &L4PolicyRules)> = Vec::new();
        for p in &sorted {
            let selects = |selector: &crate::policy::selector::Selector| {
                *p.reference.namespace == *workload.namespace && selector.matches(&workload.labels)
            };
            match &*p.kind {
                PolicyKind::NetworkPolicy(np) if selects(&np.pod_selector) => {
                    network.push((&p.reference, np))
                }
                PolicyKind::L4Policy(lp) if selects(&lp.allow.pod_selector) => {
                    l4.push((&p.reference, lp))
                }
                PolicyKind::ClusterL4Policy(cp)
                    if cp.namespaces.matches(&namespace_labels)
                        && cp.pods.matches(&workload.labels) =>
                {
                    tiered.push((&p.reference, cp))
                }
                _ => {}
            }
        }
        // Ties in priority are broken by name.
        tiered.sort_by(|a, b| (a.1.priority, &a.0.name).cmp(&(b.1.priority, &b.0.name)));

        if let Some(v) = self.tier(&tiered, Tier::Admin) {
            return v;
        }
        let enforced: Vec<_> = l4.iter().filter(|(_, p)| p.mode == Mode::Enforce).collect();
        for (reference, lp) in &enforced {
            if let Some(rule_index) = self.first_match(lp.deny_rules(self.direction)) {
                return DirectionVerdict::Denied {
                    policy: (*reference).clone(),
                    rule_index,
                };
            }
        }
        let mut isolating: Vec<(&PolicyRef, &NetworkPolicyRules)> = network
            .iter()
            .copied()
            .chain(enforced.iter().map(|(r, lp)| (*r, &lp.allow)))
            .filter(|(_, np)| np.isolates(self.direction))
            .collect();
        isolating.sort_by(|a, b| a.0.cmp(b.0));
        let verdict = if isolating.is_empty() {
            self.tier(&tiered, Tier::Baseline)
                .unwrap_or(DirectionVerdict::NotIsolated)
        } else {
            self.allowed_by(&isolating)
                .unwrap_or_else(|| DirectionVerdict::DefaultDeny {
                    isolated_by: isolating.iter().map(|(r, _)| (*r).clone()).collect(),
                })
        };
        if !verdict.allows() {
            return verdict;
        }
        // Would enforcing one audit policy as well deny it? Audit policies
        // are tried in PolicyRef order; the first that would deny is named.
        for (reference, lp) in l4.iter().filter(|(_, p)| p.mode == Mode::Audit) {
            let cause = match self.first_match(lp.deny_rules(self.direction)) {
                Some(rule_index) => Some(AuditCause::DenyRule { rule_index }),
                // Its allows only join a union that already allowed the flow
                // if the workload was isolated anyway.
                None if isolating.is_empty()
                    && lp.allow.isolates(self.direction)
                    && self.allowed_by(&[(reference, &lp.allow)]).is_none() =>
                {
                    Some(AuditCause::DefaultDeny)
                }
                None => None,
            };
            if let Some(cause) = cause {
                return DirectionVerdict::Audit {
                    policy: (*reference).clone(),
                    cause,
                };
            }
        }
        verdict
    }

    /// The first matching rule of the tier decides; `None` when no rule
    /// matches or a Pass rule matches first.
    fn tier(
        &self,
        tiered: &[(&PolicyRef, &ClusterPolicyRules)],
        tier: Tier,
    ) -> Option<DirectionVerdict> {
        for (reference, cp) in tiered.iter().filter(|(_, cp)| cp.tier == tier) {
            for (rule_index, rule) in cp.rules(self.direction).iter().enumerate() {
                if !self.matches(&rule.rule) {
                    continue;
                }
                return match rule.action {
                    Action::Pass => None,
                    action => Some(DirectionVerdict::Tier {
                        tier,
                        priority: cp.priority,
                        policy: (*reference).clone(),
                        rule_index,
                        action,
                    }),
                };
            }
        }
        None
    }

    /// The first allow rule (policies in the given order) that matches.
    fn allowed_by(
        &self,
        isolating: &[(&PolicyRef, &NetworkPolicyRules)],
    ) -> Option<DirectionVerdict> {
        isolating.iter().find_map(|(reference, np)| {
            self.first_match(np.effective_rules(self.direction))
                .map(|rule_index| DirectionVerdict::Allowed {
                    policy: (*reference).clone(),
                    rule_index,
                })
        })
    }

    fn first_match(&self, rules: &[Rule]) -> Option<usize> {
        rules.iter().position(|r| self.matches(r))
    }

    fn matches(&self, rule: &Rule) -> bool {
        rule_allows(
            self.inventory,
            self.workload,
            self.direction,
            rule,
            (self.peer, self.client),
            self.query,
        )
    }
}

/// Does the rule match the flow (peer and port)?
fn rule_allows(
    inventory: &Inventory,
    workload: &Workload,
    direction: Direction,
    rule: &Rule,
    (peer, client): (IpAddr, Option<&SpiffeId>),
    query: &FlowQuery,
) -> bool {
    let peer_ok = match &rule.peers {
        Peers::All => true,
        Peers::Only(peers) => peers.iter().any(|p| match p {
            Peer::Identity(m) => client.is_some_and(|c| m.matches(c)),
            _ => peer_matches(inventory, p, peer),
        }),
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
        Peer::Identity(_) => false,
        Peer::Block { cidr, except } => {
            !inventory.node_ips.contains(&address)
                && !is_ipv6_link_local(address)
                && cidr.contains(&address)
                && !except.iter().any(|e| e.contains(&address))
        }
    }
}

/// fe80::/10: on-link addresses (the node's and pods' interfaces), which
/// ipBlocks never match, as with the node's own addresses: a "world"
/// ipBlock must not admit a neighbour by its link-local address.
pub fn is_ipv6_link_local(address: IpAddr) -> bool {
    matches!(address, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

#[cfg(test)]
mod portcullis_tests;
#[cfg(test)]
mod protocol_tests;
#[cfg(test)]
mod tests;
