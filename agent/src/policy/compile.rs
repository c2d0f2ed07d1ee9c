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
//! For every endpoint, direction and protocol the compiler works out the
//! verdict of every port for each peer view: the wildcard peer ANY (only
//! rules that name every peer apply) and each peer class some rule names.
//! The verdict follows the full evaluation order (see
//! [`crate::policy::evaluate`]): Admin tier, L4Policy denies, NetworkPolicy
//! and L4Policy isolation, Baseline tier, default allow, then audit. A class
//! gets entries only where its verdicts differ from the wildcard's, and the
//! wildcard only where some port is not simply "not isolated", so an
//! endpoint nothing applies to has no entries at all. Each written partition
//! is complete (a port-0/0 default plus disjoint blocks), because the kernel
//! falls back to ANY when a specific identity has no covering entry.

mod class_cache;
mod class_delta;
mod classes;
mod ids;
pub mod lookup;
mod memo;
mod ports;
mod rule_table;
mod unaffected;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt as _};

use ipnet::IpNet;
use portcullis_common::{
    PolicyValue, IDENTITY_ANY, IDENTITY_FIRST_ALLOCATED, IDENTITY_HOST, IDENTITY_WORLD,
    REASON_DEFAULT_DENY, REASON_NOT_ISOLATED, REASON_POLICY, VERDICT_ALLOW, VERDICT_AUDIT,
    VERDICT_DENY,
};
use thiserror::Error;

pub use self::memo::Reuse;
pub use self::rule_table::{Block, RuleTable};
use self::{
    class_cache::ClassCache,
    class_delta::{ClassDelta, NamedCache},
    classes::{Member, PeerClass, PeerClasses},
    ids::IdAllocator,
    memo::{withdraw, Memo, MemoKey, Memoized, Recorder},
    ports::{prefix_blocks, PortPartition, Segment},
    unaffected::{EndpointInputs, SharedInputs, Unchanged},
};
use crate::policy::model::{
    Action, CheckedInventory, ClusterPolicyRules, Direction, Inventory, InventoryError,
    L4PolicyRules, Mode, NetworkPolicyRules, Origin, Peers, PolicyKind, PolicyObject, PolicyRef,
    PortSpec, Protocol, Rule, Tier, Workload, WorkloadRef,
};

/// Everything the kernel maps should contain (without generations).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// One per local workload (one with a cgroup), sorted by workload.
    pub endpoints: Vec<CompiledEndpoint>,
    /// Address prefix → peer identity.
    pub identities: BTreeMap<AddrPrefix, u32>,
    /// Shared with the map state written from it, not copied (and each
    /// endpoint's block with the compiles that did not change it).
    pub rules: Arc<RuleTable>,
    /// Rule cookie → what decided; every cookie in `rules` is here. Shared
    /// with the next compile, which starts from it.
    pub cookies: memo::Cookies,
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

/// A policy map key (the kernel ABI's generation-free key).
pub use portcullis_common::PolicySlot;

/// What a rule cookie stands for. Verdicts no policy made (not isolated,
/// local, host) carry cookie 0, which has no attribution.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attribution {
    /// Allow rule `rule_index` of `direction` in `policy` (a NetworkPolicy
    /// or enforced L4Policy) allowed the flow.
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
    /// Deny rule `rule_index` (of `ingressDeny`/`egressDeny`) of the enforced
    /// L4Policy `policy` denied the flow.
    DenyRule {
        policy: PolicyRef,
        direction: Direction,
        rule_index: usize,
    },
    /// Rule `rule_index` of `direction` of the ClusterL4Policy `policy`
    /// decided (`action` Allow or Deny).
    TierRule {
        tier: Tier,
        priority: u32,
        policy: PolicyRef,
        direction: Direction,
        rule_index: usize,
        action: Action,
    },
    /// AUDIT: the audit-mode L4Policy `policy` would deny the flow by its
    /// deny rule `rule_index`.
    AuditDenyRule {
        policy: PolicyRef,
        direction: Direction,
        rule_index: usize,
    },
    /// AUDIT: the audit-mode L4Policy `policy` would isolate the endpoint
    /// and none of its allow rules matches.
    AuditDefaultDeny {
        policy: PolicyRef,
        direction: Direction,
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
/// Each compile replays what it can of the previous one (see [`memo`]).
#[derive(Debug, Clone)]
pub struct Compiler {
    endpoint_ids: IdAllocator<WorkloadRef>,
    identity_ids: IdAllocator<PeerClass>,
    cookie_ids: IdAllocator<Attribution>,
    /// `None`: every compile works everything out (the reference the
    /// incremental compile is tested against).
    memo: Option<Memo>,
    /// The classes each distinct rule peer list named in the previous
    /// compile (carried over to the next compile's classes).
    named_cache: NamedCache,
    /// Each workload's peer classes, kept between compiles (with the memo).
    class_cache: ClassCache,
    reuse: Reuse,
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
            memo: Some(Memo::default()),
            named_cache: NamedCache::default(),
            class_cache: ClassCache::default(),
            reuse: Reuse::default(),
        }
    }

    /// A compiler that never replays: the full compile the incremental one
    /// must always equal.
    #[cfg(test)]
    pub fn without_memo() -> Self {
        Self {
            memo: None,
            ..Self::new()
        }
    }

    /// What the latest successful compile replayed and worked out.
    pub fn reuse(&self) -> Reuse {
        self.reuse
    }

    /// Compiles after checking the inventory.
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
        self.compile_valid(inventory, policies)
    }

    /// Compiles an inventory checked already (the sources check the view
    /// they build; checking it again cost milliseconds of every pass).
    pub fn compile_checked(
        &mut self,
        inventory: &CheckedInventory,
        policies: &[PolicyObject],
    ) -> Result<Compiled, CompileError> {
        self.compile_valid(inventory, policies)
    }

    /// `inventory` passed [`Inventory::check`].
    fn compile_valid(
        &mut self,
        inventory: &Inventory,
        policies: &[PolicyObject],
    ) -> Result<Compiled, CompileError> {
        let policies = Sorted::new(policies)?;
        let classes = match self.memo {
            Some(_) => {
                let kinds: Vec<_> = policies.all.iter().map(|p| &p.kind).collect();
                PeerClasses::build_cached(inventory, &kinds, &mut self.class_cache)
            }
            None => PeerClasses::build(inventory, policies.all.iter().flat_map(|p| p.rules())),
        };

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

        // Taken out: a failed compile leaves no memo, so the next one starts
        // from scratch instead of from entries whose cookies were not kept.
        let memo::Taken {
            entries: previous,
            shared: shared_before,
            rules: rules_before,
            cookies: cookies_before,
        } = self.memo.as_mut().map(Memo::take).unwrap_or_default();
        // Which classes a rule names depends only on its peers and the
        // classes: the previous answers are carried over to these classes.
        let named_before = std::mem::take(&mut self.named_cache);
        let (named_before, delta) = match self.memo {
            Some(_) => named_before.carry(&classes, &class_identities),
            None => (HashMap::new(), ClassDelta::Unknown),
        };
        let shared = self
            .memo
            .is_some()
            .then(|| SharedInputs::of(inventory, &policies.all));
        let unchanged = match (&shared, &shared_before, &delta) {
            (_, _, ClassDelta::Unknown) => Unchanged::default(),
            (Some(now), Some(before), _) => {
                let class_cache = &self.class_cache;
                now.unchanged_since(before, |policy| {
                    delta.reaches(policy, class_cache.reach(policy))
                })
            }
            _ => Unchanged::default(),
        };
        let memo_size = previous.len();
        let mut pass = Pass {
            policies,
            inventory,
            classes,
            class_identities,
            named: HashMap::new(),
            named_before,
            named_now: HashMap::new(),
            memo: self.memo.as_ref(),
            previous,
            unchanged,
            next: HashMap::with_capacity_and_hasher(memo_size, Default::default()),
            pod_classes_print: None,
            reuse: Reuse::default(),
            out: Compiled {
                identities,
                // Exactly the entries of `previous` (the memo keeps both
                // from one compile): a replay leaves its entries there, and
                // an endpoint-direction worked out again or gone withdraws
                // its old ones.
                rules: rules_before.unwrap_or_default(),
                ..Default::default()
            },
        };
        let mut local: Vec<&Workload> = inventory
            .workloads
            .iter()
            .filter(|w| w.is_local())
            .map(|w| &**w)
            .collect();
        local.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for w in local {
            let workload = w.reference();
            let id = endpoint_ids
                .id(&workload)
                .ok_or_else(|| exhausted("endpoint"))?;
            pass.out.endpoints.push(CompiledEndpoint {
                id,
                workload,
                cgroup: w.cgroup.clone().unwrap_or_default(),
                ipv4: w.ipv4(),
                ipv6: w.ipv6(),
            });
            for direction in Direction::BOTH {
                pass.endpoint_direction(&mut cookie_ids, w, id, direction)?;
            }
        }

        // What is left was made for endpoints that are gone: their ids are
        // never handed out again, so nothing written above is withdrawn.
        for (key, _) in pass.previous.drain() {
            withdraw(&mut pass.out, key);
        }
        let rules: usize = pass.policies.all.iter().map(|p| p.rules().count()).sum();
        let Pass {
            mut out,
            next,
            reuse,
            classes,
            class_identities,
            named_now,
            named_before,
            ..
        } = pass;
        out.cookies = memo::all_cookies(cookies_before, out.cookies, |id| cookie_ids.kept(id));
        if let (Some(memo), Some(shared)) = (self.memo.as_mut(), shared) {
            memo.restore(
                next,
                shared,
                Arc::clone(&out.rules),
                Arc::clone(&out.cookies),
            );
            // Peer lists only endpoints replayed unexamined use were not
            // looked up; their answers still hold for these classes (they
            // were cleared above otherwise). Lists of removed rules are
            // carried too, so the cache is dropped when it outgrows the rules.
            // This compile's answers join the carried ones, not the other
            // way round: they are few, the carried ones about one a rule.
            let mut by_peers = named_before;
            by_peers.extend(named_now);
            if by_peers.len() > 2 * rules + 64 {
                by_peers.clear();
            }
            self.named_cache = NamedCache {
                classes: classes.classes,
                identities: class_identities,
                by_peers,
            };
        }
        self.reuse = reuse;
        let (endpoints, identities, cookies) = (
            endpoint_ids.finish(),
            identity_ids.finish(),
            cookie_ids.finish(),
        );
        self.endpoint_ids.apply(endpoints);
        self.identity_ids.apply(identities);
        self.cookie_ids.apply(cookies);
        Ok(out)
    }
}

/// The policies of one compile, by kind, in the order they are credited.
struct Sorted<'p> {
    /// Every policy, by [`PolicyRef`].
    all: Vec<&'p PolicyObject>,
    /// NetworkPolicies and L4Policies by namespace (they select pods of
    /// their own namespace only), each list by [`PolicyRef`]: an endpoint
    /// looks only at its namespace's policies.
    network: HashMap<&'p str, Vec<(&'p PolicyRef, &'p NetworkPolicyRules)>>,
    l4: HashMap<&'p str, Vec<(&'p PolicyRef, &'p L4PolicyRules)>>,
    /// ClusterL4Policies by (priority, name).
    cluster: Vec<(&'p PolicyRef, &'p ClusterPolicyRules)>,
}

impl<'p> Sorted<'p> {
    /// Sorts and splits; a policy given twice is an error.
    fn new(policies: &'p [PolicyObject]) -> Result<Self, CompileError> {
        let mut all: Vec<&PolicyObject> = policies.iter().collect();
        all.sort_by(|a, b| a.reference.cmp(&b.reference));
        for pair in all.windows(2) {
            if pair[0].reference == pair[1].reference {
                return Err(CompileError::DuplicatePolicy {
                    policy: pair[0].reference.clone(),
                    first: pair[0].origin.clone(),
                    second: pair[1].origin.clone(),
                });
            }
        }
        let mut sorted = Self {
            all: all.clone(),
            network: HashMap::new(),
            l4: HashMap::new(),
            cluster: Vec::new(),
        };
        for p in all {
            match &*p.kind {
                PolicyKind::NetworkPolicy(np) => sorted
                    .network
                    .entry(&*p.reference.namespace)
                    .or_default()
                    .push((&p.reference, np)),
                PolicyKind::L4Policy(lp) => sorted
                    .l4
                    .entry(&*p.reference.namespace)
                    .or_default()
                    .push((&p.reference, lp)),
                PolicyKind::ClusterL4Policy(cp) => sorted.cluster.push((&p.reference, cp)),
            }
        }
        sorted
            .cluster
            .sort_by(|a, b| (a.1.priority, &a.0.name).cmp(&(b.1.priority, &b.0.name)));
        Ok(sorted)
    }
}

/// One compile's working state.
struct Pass<'p> {
    policies: Sorted<'p>,
    inventory: &'p Inventory,
    classes: PeerClasses,
    /// Identity of each class.
    class_identities: Vec<u32>,
    /// Classes each rule names (keyed by the rule's address; the policies
    /// outlive the pass). A policy applies to many endpoints, so this is
    /// worked out once per rule.
    named: HashMap<*const Rule, Vec<usize>>,
    /// The same by peer list: from the previous compile (carried over to
    /// these classes) and from this one.
    named_before: HashMap<Peers, Vec<usize>>,
    named_now: HashMap<Peers, Vec<usize>>,
    /// The compiler's memo (for its fingerprint keys), the previous
    /// compile's entries and this compile's.
    memo: Option<&'p Memo>,
    previous: HashMap<MemoKey, Memoized>,
    /// Namespaces nothing their endpoints depend on changed in (beyond the
    /// endpoints themselves) since the previous compile.
    unchanged: Unchanged,
    next: HashMap<MemoKey, Memoized>,
    /// Fingerprint of every pod class's identity and named ports, for
    /// endpoints whose egress rules name ports; worked out once.
    pod_classes_print: Option<u128>,
    reuse: Reuse,
    out: Compiled,
}

/// A rule in an endpoint's ordered rule lists.
struct Entry<'a> {
    rule: &'a Rule,
    /// Index into [`Layers::attributions`].
    attribution: usize,
    /// Meaningful in the tier lists only.
    action: Action,
}

/// An audit-mode L4Policy applying to the endpoint.
struct AuditLayer<'a> {
    deny: Vec<Entry<'a>>,
    isolates: bool,
    allow: Vec<Entry<'a>>,
    default_deny: usize,
}

/// What applies to one endpoint in one direction, in evaluation order.
#[derive(Default)]
struct Layers<'a> {
    attributions: Vec<Attribution>,
    admin: Vec<Entry<'a>>,
    deny: Vec<Entry<'a>>,
    isolated: bool,
    allow: Vec<Entry<'a>>,
    default_deny: usize,
    baseline: Vec<Entry<'a>>,
    audits: Vec<AuditLayer<'a>>,
}

impl<'a> Layers<'a> {
    fn attribution(&mut self, attribution: Attribution) -> usize {
        self.attributions.push(attribution);
        self.attributions.len() - 1
    }

    fn entries(
        &mut self,
        rules: &'a [Rule],
        attribution: impl Fn(usize) -> Attribution,
    ) -> Vec<Entry<'a>> {
        rules
            .iter()
            .enumerate()
            .map(|(rule_index, rule)| Entry {
                rule,
                attribution: self.attribution(attribution(rule_index)),
                action: Action::Allow,
            })
            .collect()
    }

    fn is_empty(&self) -> bool {
        self.admin.is_empty()
            && self.deny.is_empty()
            && !self.isolated
            && self.baseline.is_empty()
            && self.audits.is_empty()
    }

    fn all_entries(&self) -> impl Iterator<Item = &Entry<'a>> {
        self.admin
            .iter()
            .chain(&self.deny)
            .chain(&self.allow)
            .chain(&self.baseline)
            .chain(
                self.audits
                    .iter()
                    .flat_map(|a| a.deny.iter().chain(&a.allow)),
            )
    }
}

/// A port's verdict; `attribution` indexes [`Layers::attributions`] (none:
/// cookie 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Outcome {
    verdict: u8,
    reason: u8,
    attribution: Option<usize>,
}

const NOT_ISOLATED: Outcome = Outcome {
    verdict: VERDICT_ALLOW,
    reason: REASON_NOT_ISOLATED,
    attribution: None,
};

/// A run of ports with one outcome.
type Run = (u16, u16, Outcome);

impl<'p> Pass<'p> {
    /// The rules that apply to `endpoint` in `direction`, in order.
    fn layers(&self, endpoint: &Workload, direction: Direction) -> Layers<'p> {
        let mut layers = Layers::default();
        let policies = &self.policies;
        let namespace_labels = self.inventory.namespace_labels(&endpoint.namespace);
        for &(policy, cp) in &policies.cluster {
            if !(cp.namespaces.matches(&namespace_labels) && cp.pods.matches(&endpoint.labels)) {
                continue;
            }
            for (rule_index, tier_rule) in cp.rules(direction).iter().enumerate() {
                let attribution = layers.attribution(Attribution::TierRule {
                    tier: cp.tier,
                    priority: cp.priority,
                    policy: policy.clone(),
                    direction,
                    rule_index,
                    action: tier_rule.action,
                });
                let entry = Entry {
                    rule: &tier_rule.rule,
                    attribution,
                    action: tier_rule.action,
                };
                match cp.tier {
                    Tier::Admin => layers.admin.push(entry),
                    Tier::Baseline => layers.baseline.push(entry),
                }
            }
        }
        // The lists below hold only the endpoint's namespace's policies.
        let selects = |np: &NetworkPolicyRules| np.pod_selector.matches(&endpoint.labels);
        let mut isolating: Vec<(&PolicyRef, &NetworkPolicyRules)> = Vec::new();
        let namespace = endpoint.namespace.as_str();
        for &(policy, lp) in policies.l4.get(namespace).into_iter().flatten() {
            if !selects(&lp.allow) {
                continue;
            }
            let deny_rule = |rule_index| Attribution::DenyRule {
                policy: policy.clone(),
                direction,
                rule_index,
            };
            match lp.mode {
                Mode::Enforce => {
                    let deny = layers.entries(lp.deny_rules(direction), deny_rule);
                    layers.deny.extend(deny);
                    if lp.allow.isolates(direction) {
                        isolating.push((policy, &lp.allow));
                    }
                }
                Mode::Audit => {
                    let deny = layers.entries(lp.deny_rules(direction), |rule_index| {
                        Attribution::AuditDenyRule {
                            policy: policy.clone(),
                            direction,
                            rule_index,
                        }
                    });
                    let default_deny = layers.attribution(Attribution::AuditDefaultDeny {
                        policy: policy.clone(),
                        direction,
                    });
                    // Audit allows never decide, so never need a cookie of
                    // their own: they point at the default deny.
                    let allow = lp
                        .allow
                        .effective_rules(direction)
                        .iter()
                        .map(|rule| Entry {
                            rule,
                            attribution: default_deny,
                            action: Action::Allow,
                        })
                        .collect();
                    layers.audits.push(AuditLayer {
                        deny,
                        isolates: lp.allow.isolates(direction),
                        allow,
                        default_deny,
                    });
                }
            }
        }
        for &(policy, np) in policies.network.get(namespace).into_iter().flatten() {
            if selects(np) && np.isolates(direction) {
                isolating.push((policy, np));
            }
        }
        isolating.sort_by(|a, b| a.0.cmp(b.0));
        layers.isolated = !isolating.is_empty();
        for (policy, np) in &isolating {
            let allow = layers.entries(np.effective_rules(direction), |rule_index| {
                Attribution::Rule {
                    policy: (*policy).clone(),
                    direction,
                    rule_index,
                }
            });
            layers.allow.extend(allow);
        }
        layers.default_deny = layers.attribution(Attribution::DefaultDeny {
            direction,
            isolated_by: isolating.iter().map(|(r, _)| (*r).clone()).collect(),
        });
        layers
    }

    /// Writes the entries of one endpoint in one direction.
    fn endpoint_direction(
        &mut self,
        cookie_ids: &mut ids::IdRound<'_, Attribution>,
        endpoint: &Workload,
        endpoint_id: u32,
        direction: Direction,
    ) -> Result<(), CompileError> {
        // An endpoint id names one workload for the compiler's life (ids are
        // never handed out again), and hashes without copying its name.
        let memo_key = (endpoint_id, direction);
        let before = self.previous.remove(&memo_key);
        if let Some(memoized) = before.as_ref().filter(|m| {
            self.unchanged.namespace(&endpoint.namespace) && m.made_for(endpoint, endpoint_id)
        }) {
            memoized.replay(cookie_ids);
            if memoized.applies() {
                self.reuse.replayed += 1;
                self.reuse.unexamined += 1;
            }
            self.next.insert(memo_key, before.expect("matched above"));
            return Ok(());
        }
        // Worked out from here on (or replayed after a fingerprint check):
        // the old entries leave `out.rules` unless replayed.
        let layers = self.layers(endpoint, direction);
        if layers.is_empty() {
            if before.is_some() {
                withdraw(&mut self.out, memo_key);
            }
            if self.memo.is_some() {
                let made_for = EndpointInputs::of(endpoint, endpoint_id);
                self.next
                    .insert(memo_key, Memoized::nothing_applies(made_for));
            }
            return Ok(());
        }
        for entry in layers.all_entries() {
            if self.named.contains_key(&(entry.rule as *const Rule)) {
                continue;
            }
            let peers = &entry.rule.peers;
            let named = match self.named_now.get(peers) {
                Some(named) => named.clone(),
                None => {
                    let named = self
                        .named_before
                        .remove(peers)
                        .unwrap_or_else(|| named_classes(&self.classes, entry.rule));
                    self.named_now.insert(peers.clone(), named.clone());
                    named
                }
            };
            self.named.insert(entry.rule as *const Rule, named);
        }
        // Classes no rule names decide like the wildcard, except that for
        // egress a named port resolves against the destination pod's ports.
        let mut by_class: Vec<usize> = layers
            .all_entries()
            .flat_map(|e| self.named[&(e.rule as *const Rule)].iter().copied())
            .collect();
        let named_egress_ports = direction == Direction::Egress
            && layers.all_entries().any(|e| {
                e.rule
                    .ports
                    .iter()
                    .any(|p| matches!(p.port, PortSpec::Named(_)))
            });
        if named_egress_ports {
            by_class.extend(self.classes.pod_classes());
        }
        by_class.sort_unstable();
        by_class.dedup();

        let fingerprint = self.memo.map(|memo| {
            self.fingerprint(
                memo,
                &layers,
                endpoint,
                endpoint_id,
                direction,
                named_egress_ports,
            )
        });
        let before = match (fingerprint, before) {
            (Some(fingerprint), Some(memoized)) if memoized.fingerprint() == Some(fingerprint) => {
                memoized.replay(cookie_ids);
                let made_for = EndpointInputs::of(endpoint, endpoint_id);
                self.next.insert(memo_key, memoized.now_for(made_for));
                self.reuse.replayed += 1;
                return Ok(());
            }
            (_, before) => before,
        };
        if before.is_some() {
            withdraw(&mut self.out, memo_key);
        }
        let mut recorder = Recorder::default();

        for protocol in Protocol::JUDGED {
            let key = |peer_identity| PolicySlot {
                endpoint_id,
                peer_identity,
                direction: direction.kernel_value(),
                protocol: protocol.number(),
                port: 0,
                port_prefix_len: 0,
            };
            let scope = Scope {
                layers: &layers,
                named: &self.named,
                endpoint,
                direction,
                protocol,
                index: Default::default(),
            };
            let wildcard = scope.runs(PeerView::Unnamed);
            emit(
                &mut self.out,
                &mut recorder,
                cookie_ids,
                key(IDENTITY_ANY),
                &wildcard,
                &layers.attributions,
                true,
            )?;
            for &class in &by_class {
                let specific = scope.runs(PeerView::Class(class, &self.classes.classes[class]));
                if specific != wildcard {
                    emit(
                        &mut self.out,
                        &mut recorder,
                        cookie_ids,
                        key(self.class_identities[class]),
                        &specific,
                        &layers.attributions,
                        false,
                    )?;
                }
            }
        }
        if let Some(fingerprint) = fingerprint {
            let made_for = EndpointInputs::of(endpoint, endpoint_id);
            self.next
                .insert(memo_key, recorder.finish(fingerprint, made_for));
        }
        self.reuse.computed += 1;
        Ok(())
    }

    /// Everything the entries of `endpoint` in `direction` are worked out
    /// from (see [`memo`] for the argument that nothing else matters).
    fn fingerprint(
        &mut self,
        memo: &Memo,
        layers: &Layers,
        endpoint: &Workload,
        endpoint_id: u32,
        direction: Direction,
        named_egress_ports: bool,
    ) -> u128 {
        let mut f = memo.fingerprinter();
        f.add(&endpoint_id);
        f.add(&direction);
        f.add(&endpoint.ports);
        let named = &self.named;
        let identities = &self.class_identities;
        let entries = |f: &mut memo::Fingerprinter, list: &[Entry]| {
            f.add(&list.len());
            for e in list {
                f.add(&e.attribution);
                f.add(&e.action);
                f.add(&e.rule.ports);
                f.add(&(e.rule.peers == Peers::All));
                let classes = &named[&(e.rule as *const Rule)];
                f.add(&classes.len());
                for &class in classes {
                    f.add(&identities[class]);
                }
            }
        };
        entries(&mut f, &layers.admin);
        entries(&mut f, &layers.deny);
        entries(&mut f, &layers.allow);
        entries(&mut f, &layers.baseline);
        f.add(&layers.audits.len());
        for audit in &layers.audits {
            entries(&mut f, &audit.deny);
            f.add(&audit.isolates);
            entries(&mut f, &audit.allow);
            f.add(&audit.default_deny);
        }
        f.add(&layers.isolated);
        f.add(&layers.default_deny);
        f.add(&layers.attributions);
        f.add(&named_egress_ports);
        if named_egress_ports {
            let print = match self.pod_classes_print {
                Some(print) => print,
                None => {
                    let mut p = memo.fingerprinter();
                    for &class in self.classes.pod_classes() {
                        p.add(&self.class_identities[class]);
                        if let PeerClass::Pod { named_ports, .. } = &self.classes.classes[class] {
                            p.add(named_ports);
                        }
                    }
                    *self.pod_classes_print.insert(p.fingerprint())
                }
            };
            f.add(&print);
        }
        f.fingerprint()
    }
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

/// Whose verdict a partition describes.
#[derive(Clone, Copy)]
enum PeerView<'a> {
    /// Any peer that has no entry of its own (IDENTITY_ANY).
    Unnamed,
    /// A class (its index and the class).
    Class(usize, &'a PeerClass),
}

/// An endpoint's rules in one direction, for one protocol.
struct Scope<'a> {
    layers: &'a Layers<'a>,
    named: &'a HashMap<*const Rule, Vec<usize>>,
    endpoint: &'a Workload,
    direction: Direction,
    protocol: Protocol,
    /// Per entry list (by address): which positions apply to which peer.
    /// Built on first use, so deciding one class looks at the entries that
    /// can match it instead of scanning every rule once per class.
    index: std::cell::RefCell<HashMap<*const Entry<'a>, EntryIndex>>,
}

/// Positions of an entry list's entries by the peers they match.
#[derive(Default)]
struct EntryIndex {
    /// Entries matching every peer.
    all: Vec<usize>,
    /// Entries naming a class, by class.
    by_class: HashMap<usize, Vec<usize>>,
}

/// Which entry (by position in its list) decides each port, first match.
struct Claims(Vec<Segment>);

impl Claims {
    fn at(&self, port: u16) -> Option<usize> {
        let i = self.0.partition_point(|s| s.last < port);
        self.0.get(i).filter(|s| s.first <= port).map(|s| s.rule)
    }
}

impl Scope<'_> {
    /// The outcome of every port for the peer view, as maximal runs.
    fn runs(&self, peer: PeerView) -> Vec<Run> {
        let layers = self.layers;
        let claims = |entries: &[Entry]| self.claims(entries, peer);
        let admin = claims(&layers.admin);
        let deny = claims(&layers.deny);
        let allow = claims(&layers.allow);
        let baseline = claims(&layers.baseline);
        let audits: Vec<(Claims, Claims)> = layers
            .audits
            .iter()
            .map(|a| (claims(&a.deny), claims(&a.allow)))
            .collect();

        // Outcomes only change where some claim starts or ends.
        let mut starts: Vec<u32> = vec![0];
        for c in [&admin, &deny, &allow, &baseline]
            .into_iter()
            .chain(audits.iter().flat_map(|(d, a)| [d, a]))
        {
            for s in &c.0 {
                starts.push(u32::from(s.first));
                starts.push(u32::from(s.last) + 1);
            }
        }
        starts.retain(|s| *s <= u32::from(u16::MAX));
        starts.sort_unstable();
        starts.dedup();

        let outcome = |port: u16| -> Outcome {
            let decided = |entry: &Entry, reason| Outcome {
                verdict: if entry.action == Action::Deny {
                    VERDICT_DENY
                } else {
                    VERDICT_ALLOW
                },
                reason,
                attribution: Some(entry.attribution),
            };
            if let Some(i) = admin.at(port) {
                if layers.admin[i].action != Action::Pass {
                    return decided(&layers.admin[i], REASON_POLICY);
                }
            }
            let enforced = if let Some(i) = deny.at(port) {
                Outcome {
                    verdict: VERDICT_DENY,
                    reason: REASON_POLICY,
                    attribution: Some(layers.deny[i].attribution),
                }
            } else if layers.isolated {
                match allow.at(port) {
                    Some(i) => decided(&layers.allow[i], REASON_POLICY),
                    None => Outcome {
                        verdict: VERDICT_DENY,
                        reason: REASON_DEFAULT_DENY,
                        attribution: Some(layers.default_deny),
                    },
                }
            } else if let Some(i) = baseline.at(port) {
                decided(&layers.baseline[i], REASON_POLICY)
            } else {
                NOT_ISOLATED
            };
            if enforced.verdict == VERDICT_DENY {
                return enforced;
            }
            for (audit, (deny, allow)) in layers.audits.iter().zip(&audits) {
                if let Some(i) = deny.at(port) {
                    return Outcome {
                        verdict: VERDICT_AUDIT,
                        reason: REASON_POLICY,
                        attribution: Some(audit.deny[i].attribution),
                    };
                }
                if !layers.isolated && audit.isolates && allow.at(port).is_none() {
                    return Outcome {
                        verdict: VERDICT_AUDIT,
                        reason: REASON_DEFAULT_DENY,
                        attribution: Some(audit.default_deny),
                    };
                }
            }
            enforced
        };

        let mut runs: Vec<Run> = Vec::new();
        for (i, &start) in starts.iter().enumerate() {
            let end = starts
                .get(i + 1)
                .map_or(u32::from(u16::MAX), |next| next - 1);
            // Both bounds are ports (checked above), so the casts are lossless.
            let (first, last) = (start as u16, end as u16);
            let o = outcome(first);
            match runs.last_mut() {
                Some(prev) if prev.2 == o => prev.1 = last,
                _ => runs.push((first, last, o)),
            }
        }
        runs
    }

    /// Positions (ascending) of the entries that match the peer view.
    fn matching_positions(&self, entries: &[Entry<'_>], peer: PeerView) -> Vec<usize> {
        let mut index = self.index.borrow_mut();
        let idx = index.entry(entries.as_ptr().cast()).or_insert_with(|| {
            let mut idx = EntryIndex::default();
            for (position, entry) in entries.iter().enumerate() {
                if entry.rule.peers == Peers::All {
                    idx.all.push(position);
                } else {
                    for &class in &self.named[&(entry.rule as *const Rule)] {
                        idx.by_class.entry(class).or_default().push(position);
                    }
                }
            }
            idx
        });
        match peer {
            PeerView::Unnamed => idx.all.clone(),
            PeerView::Class(class, _) => {
                let mut positions = idx.all.clone();
                if let Some(named) = idx.by_class.get(&class) {
                    positions.extend(named);
                    positions.sort_unstable();
                }
                positions
            }
        }
    }

    /// Which entry matches each port (first one wins), for the peer view.
    fn claims(&self, entries: &[Entry], peer: PeerView) -> Claims {
        let mut partition = PortPartition::default();
        for position in self.matching_positions(entries, peer) {
            let entry = &entries[position];
            let rule = entry.rule;
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
                            (Direction::Egress, PeerView::Class(_, class)) => {
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
        Claims(partition.into_segments())
    }
}

/// Writes one (endpoint, peer, direction, protocol) partition: the outcome
/// that saves the most entries as the port-0/0 default, and aligned blocks
/// for the other runs. The blocks are disjoint, so the longest match is the
/// block's verdict inside a block and the default outside. For the
/// wildcard, "not isolated" is what the kernel does without an entry, so it
/// needs none.
fn emit(
    out: &mut Compiled,
    recorder: &mut Recorder,
    cookie_ids: &mut ids::IdRound<'_, Attribution>,
    key: PolicySlot,
    runs: &[Run],
    attributions: &[Attribution],
    wildcard: bool,
) -> Result<(), CompileError> {
    let blocks: Vec<Vec<(u16, u8)>> = runs.iter().map(|r| prefix_blocks(r.0, r.1)).collect();
    // Entries each outcome would need explicitly, summed once: choosing the
    // default is then linear in the runs.
    let total: usize = blocks.iter().map(Vec::len).sum();
    let mut per_outcome: std::collections::HashMap<Outcome, usize> =
        std::collections::HashMap::new();
    for (run, b) in runs.iter().zip(&blocks) {
        *per_outcome.entry(run.2).or_default() += b.len();
    }
    let cost = |default: Outcome| -> usize {
        let explicit = total - per_outcome.get(&default).copied().unwrap_or(0);
        explicit + usize::from(!(wildcard && default == NOT_ISOLATED))
    };
    let mut default = NOT_ISOLATED;
    let mut best = if wildcard {
        cost(NOT_ISOLATED)
    } else {
        usize::MAX
    };
    for run in runs {
        let c = cost(run.2);
        if c < best {
            (default, best) = (run.2, c);
        }
    }
    let mut cookie = |outcome: Outcome| -> Result<u32, CompileError> {
        match outcome.attribution {
            Some(index) => cookie_id(out, cookie_ids, &attributions[index]),
            None => Ok(0),
        }
    };
    let mut entries = Vec::new();
    if !(wildcard && default == NOT_ISOLATED) {
        entries.push((0, 0, default, cookie(default)?));
    }
    for (run, blocks) in runs.iter().zip(blocks) {
        if run.2 == default {
            continue;
        }
        let rule_cookie = cookie(run.2)?;
        entries.extend(
            blocks
                .into_iter()
                .map(|(port, len)| (port, len, run.2, rule_cookie)),
        );
    }
    for (port, port_prefix_len, outcome, rule_cookie) in entries {
        let slot = PolicySlot {
            port,
            port_prefix_len,
            ..key
        };
        let value = PolicyValue {
            verdict: outcome.verdict,
            reason: outcome.reason,
            _pad: 0,
            rule_cookie,
        };
        recorder.record(&value, outcome.attribution);
        Arc::make_mut(&mut out.rules).insert(slot, value);
    }
    Ok(())
}

/// The cookie of `attribution` in this round, recorded in `out.cookies`
/// (which holds, during the compile, the cookies of the entries it worked
/// out; replayed ones join at the end, see [`memo::all_cookies`]).
fn cookie_id(
    out: &mut Compiled,
    cookie_ids: &mut ids::IdRound<'_, Attribution>,
    attribution: &Attribution,
) -> Result<u32, CompileError> {
    let id = cookie_ids
        .id(attribution)
        .ok_or(CompileError::IdsExhausted {
            what: "rule cookie",
        })?;
    Arc::make_mut(&mut out.cookies)
        .entry(id)
        .or_insert_with(|| attribution.clone());
    Ok(id)
}

#[cfg(test)]
mod portcullis_tests;
#[cfg(test)]
mod tests;
