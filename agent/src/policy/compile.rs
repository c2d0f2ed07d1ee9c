//! Compiles an inventory and policies to the kernel's map contents.
//!
//! For a flow of local endpoint E in direction D (protocol P, destination
//! port p, peer address A) the kernel (ebpf/src/verdict.rs):
//! 1. allows loopback and E's own addresses;
//! 2. maps A to an identity by longest prefix in [`Compiled::identities`]
//!    (WORLD when nothing matches; node addresses are HOST, always allowed
//!    in ingress);
//! 3. looks up (E, identity, D, P, p) by longest port prefix in
//!    [`Compiled::rules`]; if there is no entry, (E, ANY, D, P, p); if there
//!    is none either, E is not isolated in D and the flow passes.
//!
//! So for every endpoint and direction it is isolated in, and each of TCP and
//! UDP, the compiler writes a complete port partition for the wildcard peer
//! ANY (rules that allow every peer and whose ports do not depend on the
//! peer), and one for each peer class whose verdict differs from that.

mod classes;
mod ids;
mod ports;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use ipnet::IpNet;
use portcullis_common::{
    PolicyValue, IDENTITY_ANY, IDENTITY_FIRST_ALLOCATED, IDENTITY_HOST, IDENTITY_WORLD,
    REASON_DEFAULT_DENY, REASON_POLICY, VERDICT_ALLOW, VERDICT_DENY,
};
use thiserror::Error;

use self::{
    classes::{Member, PeerClass, PeerClasses},
    ids::IdAllocator,
    ports::{covers_all_ports, prefix_blocks, PortPartition, Segment},
};
use crate::policy::model::{
    Direction, Inventory, InventoryError, NetworkPolicyRules, Origin, Peers, PolicyKind,
    PolicyObject, PolicyRef, PortSpec, Protocol, Rule, Workload, WorkloadRef,
};

/// Everything the kernel maps should contain (without generations).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// One per local workload (one with a cgroup), sorted by workload.
    pub endpoints: Vec<CompiledEndpoint>,
    /// Address prefix → peer identity.
    pub identities: BTreeMap<AddrPrefix, u32>,
    pub rules: BTreeMap<RuleKey, PolicyValue>,
    /// Rule cookie → what decided; every cookie in `rules` is here.
    pub cookies: BTreeMap<u32, Attribution>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledEndpoint {
    pub id: u32,
    pub workload: WorkloadRef,
    /// As given in the inventory.
    pub cgroup: PathBuf,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// A prefix in the kernel's 128-bit address space: IPv4 is IPv4-mapped
/// (`::ffff:a.b.c.d`) with `len` = 96 + the IPv4 prefix length. Bits past
/// `len` are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrPrefix {
    pub addr: [u8; 16],
    pub len: u8,
}

impl AddrPrefix {
    /// The prefix holding exactly `ip`.
    pub fn host(ip: IpAddr) -> Self {
        Self {
            addr: addr16(ip),
            len: 128,
        }
    }

    pub fn from_net(net: IpNet) -> Self {
        let net = net.trunc();
        let len = match net {
            IpNet::V4(v4) => 96 + v4.prefix_len(),
            IpNet::V6(v6) => v6.prefix_len(),
        };
        Self {
            addr: addr16(net.network()),
            len,
        }
    }

    /// Does the prefix contain this 16-byte address?
    pub fn contains(&self, addr: &[u8; 16]) -> bool {
        let len = u32::from(self.len);
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        u128::from_be_bytes(self.addr) & mask == u128::from_be_bytes(*addr) & mask
    }
}

impl fmt::Display for AddrPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match addr_from16(self.addr) {
            IpAddr::V4(v4) if self.len >= 96 => write!(f, "{v4}/{}", self.len - 96),
            _ => write!(f, "{}/{}", Ipv6Addr::from(self.addr), self.len),
        }
    }
}

/// The kernel's 16-byte form of an address (IPv4 as IPv4-mapped IPv6).
pub fn addr16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The address a 16-byte form stands for (IPv4 when mapped).
pub fn addr_from16(addr: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(addr).to_canonical()
}

/// A policy map key: `port_prefix_len` leading bits of `port` must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleKey {
    pub endpoint_id: u32,
    /// A peer identity, or `IDENTITY_ANY`.
    pub peer_identity: u32,
    /// `DIRECTION_*`.
    pub direction: u8,
    /// `PROTO_*`.
    pub protocol: u8,
    pub port: u16,
    pub port_prefix_len: u8,
}

/// What a rule cookie stands for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attribution {
    /// Rule `rule_index` of `direction` in `policy` allowed the flow.
    Rule {
        policy: PolicyRef,
        direction: Direction,
        rule_index: usize,
    },
    /// The endpoint is isolated in `direction` by these policies (sorted)
    /// and none of their rules allowed the flow.
    DefaultDeny {
        direction: Direction,
        isolated_by: Vec<PolicyRef>,
    },
}

#[derive(Debug, Error)]
pub enum CompileError {
    #[error("the workload inventory is inconsistent")]
    Inventory {
        #[source]
        source: Box<InventoryError>,
    },
    #[error("policy {policy} is given twice ({first} and {second})")]
    DuplicatePolicy {
        policy: PolicyRef,
        first: Origin,
        second: Origin,
    },
    #[error("no {what} ids left")]
    IdsExhausted { what: &'static str },
}

/// Compiles, keeping ids stable across compiles: the same workload keeps its
/// endpoint id, the same peer class its identity, the same rule its cookie.
#[derive(Debug, Clone)]
pub struct Compiler {
    endpoint_ids: IdAllocator<WorkloadRef>,
    identity_ids: IdAllocator<PeerClass>,
    cookie_ids: IdAllocator<Attribution>,
}

impl Default for Compiler {
    fn default() -> Self {
        Self::new()
    }
}

impl Compiler {
    pub fn new() -> Self {
        Self {
            endpoint_ids: IdAllocator::new(1, u32::MAX),
            identity_ids: IdAllocator::new(IDENTITY_FIRST_ALLOCATED, IDENTITY_ANY),
            // Cookie 0 marks verdicts no rule made (local, host, not isolated).
            cookie_ids: IdAllocator::new(1, u32::MAX),
        }
    }

    pub fn compile(
        &mut self,
        inventory: &Inventory,
        policies: &[PolicyObject],
    ) -> Result<Compiled, CompileError> {
        inventory
            .check()
            .map_err(|source| CompileError::Inventory {
                source: source.into(),
            })?;
        let policies = sorted_network_policies(policies)?;
        let classes = PeerClasses::build(inventory, policies.iter().map(|(_, np)| *np));

        let mut endpoint_ids = self.endpoint_ids.round();
        let mut identity_ids = self.identity_ids.round();
        let mut cookie_ids = self.cookie_ids.round();
        let exhausted = |what| CompileError::IdsExhausted { what };

        let mut class_identities = Vec::with_capacity(classes.classes.len());
        for class in &classes.classes {
            class_identities.push(
                identity_ids
                    .id(class)
                    .ok_or_else(|| exhausted("identity"))?,
            );
        }
        let identities = classes
            .prefixes
            .iter()
            .map(|(prefix, member)| {
                let identity = match member {
                    Member::Class(i) => class_identities[*i],
                    Member::Host => IDENTITY_HOST,
                    Member::World => IDENTITY_WORLD,
                };
                (*prefix, identity)
            })
            .collect();

        let mut pass = Pass {
            policies,
            classes,
            class_identities,
            named: HashMap::new(),
            out: Compiled {
                identities,
                ..Default::default()
            },
        };
        let mut local: Vec<&Workload> = inventory
            .workloads
            .iter()
            .filter(|w| w.is_local())
            .collect();
        local.sort_by_key(|w| w.reference());
        for w in local {
            let id = endpoint_ids
                .id(&w.reference())
                .ok_or_else(|| exhausted("endpoint"))?;
            pass.out.endpoints.push(CompiledEndpoint {
                id,
                workload: w.reference(),
                cgroup: w.cgroup.clone().unwrap_or_default(),
                ipv4: w.ipv4(),
                ipv6: w.ipv6(),
            });
            for direction in Direction::BOTH {
                pass.endpoint_direction(&mut cookie_ids, w, id, direction)?;
            }
        }

        self.endpoint_ids = endpoint_ids.finish();
        self.identity_ids = identity_ids.finish();
        self.cookie_ids = cookie_ids.finish();
        Ok(pass.out)
    }
}

/// One compile's working state.
struct Pass<'p> {
    /// Sorted by namespace/name.
    policies: Vec<(&'p PolicyRef, &'p NetworkPolicyRules)>,
    classes: PeerClasses,
    /// Identity of each class.
    class_identities: Vec<u32>,
    /// Classes each (policy, direction, rule) names. A policy applies to many
    /// endpoints, so this is worked out once per rule.
    named: HashMap<(usize, Direction, usize), Vec<usize>>,
    out: Compiled,
}

impl Pass<'_> {
    /// Writes the entries of one endpoint in one direction, if isolated.
    fn endpoint_direction(
        &mut self,
        cookie_ids: &mut ids::IdRound<'_, Attribution>,
        endpoint: &Workload,
        endpoint_id: u32,
        direction: Direction,
    ) -> Result<(), CompileError> {
        let applicable: Vec<usize> = (0..self.policies.len())
            .filter(|i| {
                let (r, np) = self.policies[*i];
                r.namespace == endpoint.namespace
                    && np.isolates(direction)
                    && np.pod_selector.matches(&endpoint.labels)
            })
            .collect();
        if applicable.is_empty() {
            return Ok(());
        }
        for &index in &applicable {
            let rules = self.policies[index].1.effective_rules(direction);
            for (rule_index, rule) in rules.iter().enumerate() {
                self.named
                    .entry((index, direction, rule_index))
                    .or_insert_with(|| named_classes(&self.classes, rule));
            }
        }
        let mut ordered = Vec::new();
        for &index in &applicable {
            let (reference, np) = self.policies[index];
            for (rule_index, rule) in np.effective_rules(direction).iter().enumerate() {
                ordered.push(OrderedRule {
                    attribution: Attribution::Rule {
                        policy: reference.clone(),
                        direction,
                        rule_index,
                    },
                    rule,
                    named: &self.named[&(index, direction, rule_index)],
                });
            }
        }
        let default_deny = Attribution::DefaultDeny {
            direction,
            isolated_by: applicable
                .iter()
                .map(|i| self.policies[*i].0.clone())
                .collect(),
        };

        // Rules for every peer, and the rules naming each class. Classes no
        // rule names decide like the wildcard, except that for egress a named
        // port resolves against the destination pod's ports.
        let for_all: Vec<usize> = (0..ordered.len())
            .filter(|p| ordered[*p].rule.peers == Peers::All)
            .collect();
        let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (position, r) in ordered.iter().enumerate() {
            for &class in r.named {
                by_class.entry(class).or_default().push(position);
            }
        }
        let named_egress_ports = direction == Direction::Egress
            && ordered.iter().any(|r| {
                r.rule
                    .ports
                    .iter()
                    .any(|p| matches!(p.port, PortSpec::Named(_)))
            });
        if named_egress_ports {
            for &class in self.classes.pod_classes() {
                by_class.entry(class).or_default();
            }
        }

        for protocol in Protocol::ENFORCED {
            let key = |peer_identity| RuleKey {
                endpoint_id,
                peer_identity,
                direction: direction.kernel_value(),
                protocol: protocol.number(),
                port: 0,
                port_prefix_len: 0,
            };
            let scope = Scope {
                ordered: &ordered,
                endpoint,
                direction,
                protocol,
            };
            let wildcard = scope.segments(for_all.iter().copied(), PeerView::Unnamed);
            emit(
                &mut self.out,
                cookie_ids,
                key(IDENTITY_ANY),
                &wildcard,
                &ordered,
                &default_deny,
            )?;
            for (&class, positions) in &by_class {
                let view = PeerView::Class(&self.classes.classes[class]);
                let specific = scope.segments(merge_sorted(&for_all, positions), view);
                if specific != wildcard {
                    emit(
                        &mut self.out,
                        cookie_ids,
                        key(self.class_identities[class]),
                        &specific,
                        &ordered,
                        &default_deny,
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// The two ascending lists as one.
fn merge_sorted(a: &[usize], b: &[usize]) -> impl Iterator<Item = usize> {
    let mut merged: Vec<usize> = a.iter().chain(b).copied().collect();
    merged.sort_unstable();
    merged.into_iter()
}

/// NetworkPolicies sorted by namespace/name (the order rules are credited
/// in); a policy given twice is an error.
fn sorted_network_policies(
    policies: &[PolicyObject],
) -> Result<Vec<(&PolicyRef, &NetworkPolicyRules)>, CompileError> {
    let mut sorted: Vec<&PolicyObject> = policies.iter().collect();
    sorted.sort_by(|a, b| a.reference.cmp(&b.reference));
    for pair in sorted.windows(2) {
        if pair[0].reference == pair[1].reference {
            return Err(CompileError::DuplicatePolicy {
                policy: pair[0].reference.clone(),
                first: pair[0].origin.clone(),
                second: pair[1].origin.clone(),
            });
        }
    }
    Ok(sorted
        .into_iter()
        .map(|p| match &p.kind {
            PolicyKind::NetworkPolicy(np) => (&p.reference, np),
        })
        .collect())
}

/// Classes the rule's peers select (none when it allows every peer).
fn named_classes(classes: &PeerClasses, rule: &Rule) -> Vec<usize> {
    match &rule.peers {
        Peers::All => Vec::new(),
        Peers::Only(peers) => {
            let mut named: Vec<usize> = peers.iter().flat_map(|p| classes.matching(p)).collect();
            named.sort_unstable();
            named.dedup();
            named
        }
    }
}

/// An applicable rule, in crediting order, with the classes its peers name
/// (ascending; empty when it allows every peer).
struct OrderedRule<'a> {
    attribution: Attribution,
    rule: &'a Rule,
    named: &'a [usize],
}

/// Whose verdict a partition describes.
#[derive(Clone, Copy)]
enum PeerView<'a> {
    /// Any peer that has no entry of its own (IDENTITY_ANY).
    Unnamed,
    Class(&'a PeerClass),
}

/// An endpoint's rules in one direction, for one protocol.
struct Scope<'a> {
    ordered: &'a [OrderedRule<'a>],
    endpoint: &'a Workload,
    direction: Direction,
    protocol: Protocol,
}

impl Scope<'_> {
    /// Which rule allows each port, given the positions (ascending) of the
    /// rules that match the peer.
    fn segments(&self, positions: impl Iterator<Item = usize>, peer: PeerView) -> Vec<Segment> {
        let mut partition = PortPartition::default();
        for position in positions {
            let rule = self.ordered[position].rule;
            if rule.ports.is_empty() {
                partition.claim(0, u16::MAX, position);
                continue;
            }
            for port in rule.ports.iter().filter(|p| p.protocol == self.protocol) {
                match &port.port {
                    PortSpec::All => partition.claim(0, u16::MAX, position),
                    PortSpec::Range { first, last } => partition.claim(*first, *last, position),
                    PortSpec::Named(name) => {
                        // Ingress names the endpoint's own port; egress the
                        // destination's, which only a pod class has.
                        let resolved = match (self.direction, peer) {
                            (Direction::Ingress, _) => {
                                self.endpoint.named_port(name, self.protocol)
                            }
                            (Direction::Egress, PeerView::Class(class)) => {
                                class.named_port(name, self.protocol)
                            }
                            (Direction::Egress, PeerView::Unnamed) => None,
                        };
                        if let Some(p) = resolved {
                            partition.claim(p, p, position);
                        }
                    }
                }
            }
        }
        partition.into_segments()
    }
}

/// Writes one (endpoint, peer, direction, protocol) partition: a default
/// deny for the whole port space (unless rules cover it all) and an allow
/// per aligned block. The blocks are disjoint, so the longest match is the
/// block's verdict inside a block and the default outside.
fn emit(
    out: &mut Compiled,
    cookie_ids: &mut ids::IdRound<'_, Attribution>,
    key: RuleKey,
    segments: &[Segment],
    ordered: &[OrderedRule],
    default_deny: &Attribution,
) -> Result<(), CompileError> {
    let mut cookie = |attribution: &Attribution| -> Result<u32, CompileError> {
        let id = cookie_ids
            .id(attribution)
            .ok_or(CompileError::IdsExhausted {
                what: "rule cookie",
            })?;
        out.cookies.entry(id).or_insert_with(|| attribution.clone());
        Ok(id)
    };
    let mut entries = Vec::new();
    if !covers_all_ports(segments) {
        entries.push((
            0,
            0,
            VERDICT_DENY,
            REASON_DEFAULT_DENY,
            cookie(default_deny)?,
        ));
    }
    for segment in segments {
        let rule_cookie = cookie(&ordered[segment.rule].attribution)?;
        for (port, len) in prefix_blocks(segment.first, segment.last) {
            entries.push((port, len, VERDICT_ALLOW, REASON_POLICY, rule_cookie));
        }
    }
    for (port, port_prefix_len, verdict, reason, rule_cookie) in entries {
        out.rules.insert(
            RuleKey {
                port,
                port_prefix_len,
                ..key
            },
            PolicyValue {
                verdict,
                reason,
                _pad: 0,
                rule_cookie,
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests;
