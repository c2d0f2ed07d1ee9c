//! Data types: the workloads a node knows about ([`Inventory`]), the
//! `networking.k8s.io/v1` NetworkPolicy wire format ([`NetworkPolicy`]), and
//! the validated policy form ([`PolicyObject`]) that the compiler and the
//! evaluator consume.

mod inventory;
mod network_policy;

use std::{collections::BTreeMap, fmt, path::PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use self::{
    inventory::{ContainerPort, Inventory, InventoryError, Namespace, Workload, WorkloadRef},
    network_policy::{
        IntOrString, IpBlock, LabelSelector, LabelSelectorRequirement, NetworkPolicy,
        NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
        NetworkPolicySpec, ObjectMeta,
    },
};
use crate::policy::selector::Selector;

pub type Labels = BTreeMap<String, String>;

/// The label Kubernetes puts on every namespace, naming it.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    /// Valid on container ports; policies using it are rejected.
    Sctp,
}

impl Protocol {
    /// The protocols the data path enforces.
    pub const ENFORCED: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// IP protocol number, as the kernel sees it.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => portcullis_common::PROTO_TCP,
            Self::Udp => portcullis_common::PROTO_UDP,
            Self::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
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

/// Identifies a policy object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
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
    pub kind: PolicyKind,
}

impl PolicyObject {
    /// The policy's namespace/name.
    pub fn policy_ref(&self) -> PolicyRef {
        self.reference.clone()
    }
}

/// The policy kinds Portcullis understands. Portcullis' own CRDs (explicit
/// deny, tiers, audit, mTLS) will be further variants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyKind {
    NetworkPolicy(NetworkPolicyRules),
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

/// One ingress or egress rule: it allows traffic to/from `peers` on `ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub peers: Peers,
    /// Empty means every port of every protocol.
    pub ports: Vec<PortMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// `from`/`to` absent or empty: every peer.
    All,
    Only(Vec<Peer>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// Pods matching `pods` in the namespaces `namespaces` selects.
    Pods {
        namespaces: NamespaceScope,
        pods: Selector,
    },
    /// Addresses in `cidr` but in none of `except`. Never matches this
    /// node's own addresses (see [`crate::policy::evaluate`]).
    Block { cidr: IpNet, except: Vec<IpNet> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceScope {
    /// Only this namespace (a `podSelector` without `namespaceSelector`).
    Exactly(String),
    /// Namespaces whose labels match.
    Matching(Selector),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
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
