//! Data types: the workloads a node knows about ([`Inventory`]), the wire
//! formats of `networking.k8s.io/v1` NetworkPolicy ([`NetworkPolicy`]) and of
//! Portcullis' `L4Policy` and `ClusterL4Policy` ([`L4Policy`],
//! [`ClusterL4Policy`]), and the validated policy form ([`PolicyObject`])
//! that the compiler and the evaluator consume.

mod checked;
mod inventory;
pub mod names;
mod network_policy;
mod portcullis;

use std::{collections::BTreeMap, fmt, path::PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::{
    checked::CheckedInventory,
    inventory::{
        unusable_reason, ContainerPort, Inventory, InventoryError, Namespace, Service,
        ServiceBackend, ServicePort, Workload, WorkloadRef,
    },
    network_policy::{
        IdentityPeer, IntOrString, IpBlock, LabelSelector, LabelSelectorRequirement, NetworkPolicy,
        NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
        NetworkPolicySpec, ObjectMeta,
    },
    portcullis::{
        ClusterL4Policy, ClusterL4PolicyEgressRule, ClusterL4PolicyIngressRule,
        ClusterL4PolicySpec, ClusterL4PolicySubject, L4Policy, L4PolicySpec,
    },
};
use crate::{identity::spiffe::SpiffeId, policy::selector::Selector};

pub type Labels = BTreeMap<String, String>;

/// The label Kubernetes puts on every namespace, naming it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// Every IP protocol other than TCP, UDP and SCTP (ICMP, UDP-Lite, ...),
    /// and packets whose transport cannot be classified: judged without
    /// ports, so only rules without `ports` apply. Never written in a
    /// policy.
    #[serde(skip)]
    Other,
}

impl Protocol {
    /// What policy is compiled for: every packet falls under one of these.
    pub const JUDGED: [Protocol; 4] = [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Sctp,
        Protocol::Other,
    ];
    /// The protocols whose sockets the socket hooks see (and can translate
    /// service addresses for).
    pub const SOCKET: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// IP protocol number, as the kernel sees it.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => portcullis_common::PROTO_TCP,
            Self::Udp => portcullis_common::PROTO_UDP,
            Self::Sctp => portcullis_common::PROTO_SCTP,
            Self::Other => portcullis_common::PROTO_OTHER,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Other => "other",
        })
    }
}

/// Direction of a flow, seen from the enforced workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The kernel's `DIRECTION_*` value.
    pub fn kernel_value(self) -> u8 {
        match self {
            Self::Ingress => portcullis_common::DIRECTION_INGRESS,
            Self::Egress => portcullis_common::DIRECTION_EGRESS,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// Kubernetes' IANA_SVC_NAME rule for port names: 1-15 characters of
/// `a-z0-9-`, at least one letter, no leading, trailing or doubled `-`.
pub fn is_valid_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// The namespace of objects that do not name one.
pub fn default_namespace() -> String {
    "default".to_string()
}

/// The kinds of policy object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    NetworkPolicy,
    L4Policy,
    ClusterL4Policy,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NetworkPolicy => "NetworkPolicy",
            Self::L4Policy => "L4Policy",
            Self::ClusterL4Policy => "ClusterL4Policy",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies a policy object. A NetworkPolicy and an L4Policy may share a
/// namespace/name (they are different resources), so the kind is part of
/// it. Cluster-scoped policies have an empty namespace. Orders by namespace,
/// name, kind: the order allow rules are credited in.
///
/// Its names are shared, not copied: a pass clones references to every
/// policy many times (the policy list, the last valid versions, the rule
/// cookies' attributions).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub namespace: std::sync::Arc<str>,
    pub name: std::sync::Arc<str>,
    pub kind: ObjectKind,
}

impl PolicyRef {
    pub fn network_policy(namespace: &str, name: &str) -> Self {
        Self::new(ObjectKind::NetworkPolicy, namespace, name)
    }

    pub fn l4_policy(namespace: &str, name: &str) -> Self {
        Self::new(ObjectKind::L4Policy, namespace, name)
    }

    pub fn cluster_l4_policy(name: &str) -> Self {
        Self::new(ObjectKind::ClusterL4Policy, "", name)
    }

    fn new(kind: ObjectKind, namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            kind,
        }
    }
}

/// NetworkPolicies print as `namespace/name` (as kubectl names them); the
/// other kinds are prefixed with their kind.
impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ObjectKind::NetworkPolicy => write!(f, "{}/{}", self.namespace, self.name),
            ObjectKind::L4Policy => write!(f, "L4Policy {}/{}", self.namespace, self.name),
            ObjectKind::ClusterL4Policy => write!(f, "ClusterL4Policy {}", self.name),
        }
    }
}

/// Where a policy came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// `document` is 1-based and counts empty documents too.
    File { path: PathBuf, document: usize },
    /// Served by the Kubernetes API.
    Kubernetes,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, document } => {
                write!(f, "{} (document {document})", path.display())
            }
            Self::Kubernetes => f.write_str("Kubernetes API"),
        }
    }
}

/// A validated policy with its identity and origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyObject {
    pub reference: PolicyRef,
    pub origin: Origin,
    /// Shared: a pass clones the policy list several times (what was
    /// compiled, what is enforced, what was held back), and at 10,000 rules
    /// deep copies were a large part of a pass. Equal when the same
    /// allocation, without a deep comparison.
    pub kind: std::sync::Arc<PolicyKind>,
}

impl PolicyObject {
    /// The policy's namespace/name.
    pub fn policy_ref(&self) -> PolicyRef {
        self.reference.clone()
    }

    /// Every rule of the policy, of every direction and kind.
    pub fn rules(&self) -> Box<dyn Iterator<Item = &Rule> + '_> {
        self.kind.rules()
    }
}

impl PolicyKind {
    /// Every rule of the policy, of every direction and kind.
    pub fn rules(&self) -> Box<dyn Iterator<Item = &Rule> + '_> {
        match self {
            PolicyKind::NetworkPolicy(np) => Box::new(np.ingress.iter().chain(&np.egress)),
            PolicyKind::L4Policy(lp) => Box::new(
                lp.allow
                    .ingress
                    .iter()
                    .chain(&lp.allow.egress)
                    .chain(&lp.ingress_deny)
                    .chain(&lp.egress_deny),
            ),
            PolicyKind::ClusterL4Policy(cp) => {
                Box::new(cp.ingress.iter().chain(&cp.egress).map(|r| &r.rule))
            }
        }
    }
}

/// The policy kinds Portcullis understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyKind {
    NetworkPolicy(NetworkPolicyRules),
    L4Policy(L4PolicyRules),
    ClusterL4Policy(ClusterPolicyRules),
}

/// A validated `networking.k8s.io/v1` NetworkPolicy spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPolicyRules {
    /// Pods of the policy's namespace it applies to.
    pub pod_selector: Selector,
    /// Directions the policy isolates (its effective `policyTypes`).
    pub isolates_ingress: bool,
    pub isolates_egress: bool,
    /// Rules as written, so indexes match the source. Rules of a direction
    /// the policy does not isolate are ignored, as in Kubernetes.
    pub ingress: Vec<Rule>,
    pub egress: Vec<Rule>,
}

impl NetworkPolicyRules {
    pub fn isolates(&self, direction: Direction) -> bool {
        match direction {
            Direction::Ingress => self.isolates_ingress,
            Direction::Egress => self.isolates_egress,
        }
    }

    /// The rules that take effect in `direction`.
    pub fn effective_rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            _ if !self.isolates(direction) => &[],
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// Whether an L4Policy changes what passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Enforce,
    /// Evaluated as if enforced; flows it would deny pass and are counted.
    Audit,
}

/// A validated L4Policy spec: NetworkPolicy-style isolation and allows
/// (in `allow`), plus explicit deny rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L4PolicyRules {
    pub mode: Mode,
    /// Isolation and allow rules, with NetworkPolicy semantics.
    pub allow: NetworkPolicyRules,
    /// `ingressDeny` / `egressDeny`, as written. They apply whatever the
    /// policy isolates.
    pub ingress_deny: Vec<Rule>,
    pub egress_deny: Vec<Rule>,
}

impl L4PolicyRules {
    pub fn deny_rules(&self, direction: Direction) -> &[Rule] {
        match direction {
            Direction::Ingress => &self.ingress_deny,
            Direction::Egress => &self.egress_deny,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Before NetworkPolicies and L4Policies.
    Admin,
    /// Only where no NetworkPolicy or L4Policy isolates.
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Admin => "Admin",
            Self::Baseline => "Baseline",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Leave the Admin tier; NetworkPolicies and L4Policies decide.
    Pass,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Allow => "Allow",
            Self::Deny => "Deny",
            Self::Pass => "Pass",
        })
    }
}

/// A validated ClusterL4Policy spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicyRules {
    pub tier: Tier,
    /// 0..=1000; lower first.
    pub priority: u32,
    /// Subject: pods matching `pods` in namespaces matching `namespaces`.
    pub namespaces: Selector,
    pub pods: Selector,
    pub ingress: Vec<TierRule>,
    pub egress: Vec<TierRule>,
}

impl ClusterPolicyRules {
    pub fn rules(&self, direction: Direction) -> &[TierRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// A ClusterL4Policy rule. Its peers never use [`NamespaceScope::Exactly`]:
/// a peer without `namespaceSelector` matches every namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierRule {
    pub action: Action,
    pub rule: Rule,
}

/// One ingress or egress rule: it allows traffic to/from `peers` on `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub peers: Peers,
    /// Empty means every port of every protocol.
    pub ports: Vec<PortMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peers {
    /// `from`/`to` absent or empty: every peer.
    All,
    Only(Vec<Peer>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces `namespaces` selects.
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    /// Addresses in `cidr` but in none of `except`. Never matches this
    /// node's own addresses (see [`crate::policy::evaluate`]).
    Block { cidr: IpNet, except: Vec<IpNet> },
    /// An mTLS client proving this identity (ingress of Portcullis'
    /// policies only). The kernel never sees identities, so it compiles to
    /// nothing there; the destination's inbound proxy judges it.
    Identity(IdentityMatch),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentityMatch {
    Exact(SpiffeId),
    /// Every identity of the namespace (the trust domain is the agent's:
    /// certificates of any other were refused before policy).
    Namespace(String),
}

impl IdentityMatch {
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::Namespace(ns) => id.namespace() == ns,
        }
    }
}

impl fmt::Display for IdentityMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "identity {id}"),
            Self::Namespace(ns) => write!(f, "any identity of namespace {ns}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NamespaceScope {
    /// Only this namespace (a `podSelector` without `namespaceSelector`).
    Exactly(String),
    /// Namespaces whose labels match.
    Matching(Selector),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// Every port of the protocol (port 0 included).
    All,
    /// `port`..=`endPort` (a single port when equal); never includes 0.
    Range { first: u16, last: u16 },
    /// A container port name, resolved per pod.
    Named(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_follow_kubernetes_rules() {
        for ok in ["http", "serve-80-tcp", "a", "dns-udp", "h2c"] {
            assert!(is_valid_port_name(ok), "{ok}");
        }
        for bad in [
            "",
            "80",
            "HTTP",
            "-http",
            "http-",
            "ht--tp",
            "a234567890123456",
            "a_b",
        ] {
            assert!(!is_valid_port_name(bad), "{bad}");
        }
    }
}
