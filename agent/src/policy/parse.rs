//! YAML → validated policies and inventories, with errors that say which
//! file, document, object and field is wrong, and why.
//!
//! Each policy document is read twice: once as a generic YAML value to learn
//! its kind and name (so every later error can name the object), then into
//! the typed wire form straight from the text, so schema errors (unknown
//! field, wrong type) carry serde_yaml's field path and line.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::Deserialize;
use thiserror::Error;

use crate::policy::{
    model::{
        default_namespace, is_valid_port_name, IntOrString, Inventory, InventoryError,
        LabelSelector, NamespaceScope, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
        NetworkPolicyRules, Origin, Peer, Peers, PolicyKind, PolicyObject, PolicyRef, PortMatch,
        PortSpec, Protocol, Rule,
    },
    selector::{Selector, SelectorError},
};

pub const NETWORK_POLICY_API_VERSION: &str = "networking.k8s.io/v1";
pub const NETWORK_POLICY_KIND: &str = "NetworkPolicy";

/// The object a message is about, as far as it is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub kind: Option<String>,
    pub namespace: String,
    pub name: Option<String>,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.as_deref().unwrap_or("object");
        match &self.name {
            Some(name) => write!(f, "{kind} {}/{name}", self.namespace),
            None => write!(f, "unnamed {kind} in namespace {}", self.namespace),
        }
    }
}

/// File, document, object and field of a problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    pub origin: Origin,
    pub object: ObjectName,
    /// Path inside the object, e.g. `spec.ingress[0].ports[1].port`.
    pub field: String,
}

impl Context {
    fn at(&self, field: impl Into<String>) -> Self {
        Self {
            origin: self.origin.clone(),
            object: self.object.clone(),
            field: field.into(),
        }
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.origin, self.object, self.field)
    }
}

#[derive(Debug, Error)]
pub enum ParseError {
    #[error("{origin}: malformed YAML")]
    Yaml {
        origin: Origin,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{origin}: expected an object with apiVersion, kind and metadata")]
    NotAnObject { origin: Origin },
    #[error("{origin}: {object}: {field} is missing or not a string")]
    MissingField {
        origin: Origin,
        object: Box<ObjectName>,
        field: &'static str,
    },
    #[error("{origin}: {object}: unsupported kind {api_version} {kind} (Portcullis reads {NETWORK_POLICY_API_VERSION} {NETWORK_POLICY_KIND})")]
    UnsupportedKind {
        origin: Origin,
        object: Box<ObjectName>,
        api_version: String,
        kind: String,
    },
    #[error("{origin}: {object}: does not match the {NETWORK_POLICY_KIND} schema")]
    Schema {
        origin: Origin,
        object: Box<ObjectName>,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{origin}: {policy} is defined twice (first in {first})")]
    DuplicatePolicy {
        origin: Origin,
        policy: PolicyRef,
        first: Origin,
    },
    #[error("{at}: {value:?} is not Ingress or Egress")]
    UnknownPolicyType { at: Box<Context>, value: String },
    #[error("{at}: invalid label selector")]
    Selector {
        at: Box<Context>,
        #[source]
        source: SelectorError,
    },
    #[error("{at}: a peer needs podSelector, namespaceSelector or ipBlock")]
    EmptyPeer { at: Box<Context> },
    #[error("{at}: ipBlock cannot be combined with podSelector or namespaceSelector")]
    IpBlockWithSelector { at: Box<Context> },
    #[error("{at}: {value:?} is not a CIDR")]
    InvalidCidr {
        at: Box<Context>,
        value: String,
        #[source]
        source: ipnet::AddrParseError,
    },
    #[error("{at}: {value} is an IPv4-mapped IPv6 CIDR; write it in IPv4 form")]
    MappedCidr { at: Box<Context>, value: IpNet },
    #[error("{at}: except {except} is not strictly inside cidr {cidr}")]
    ExceptOutsideCidr {
        at: Box<Context>,
        except: IpNet,
        cidr: IpNet,
    },
    #[error("{at}: SCTP is not supported by Portcullis")]
    SctpUnsupported { at: Box<Context> },
    #[error("{at}: unknown protocol {protocol:?} (expected TCP or UDP)")]
    UnknownProtocol { at: Box<Context>, protocol: String },
    #[error("{at}: port {port} is out of range 1-65535")]
    PortOutOfRange { at: Box<Context>, port: i64 },
    #[error("{at}: endPort {end_port} is less than port {port}")]
    EndPortBelowPort {
        at: Box<Context>,
        port: u16,
        end_port: u16,
    },
    #[error("{at}: endPort cannot be used with the named port {name:?}")]
    EndPortWithNamedPort { at: Box<Context>, name: String },
    #[error("{at}: endPort needs a numeric port")]
    EndPortWithoutPort { at: Box<Context> },
    #[error(
        "{at}: {name:?} is not a valid port name (1-15 characters a-z, 0-9, '-', with a letter)"
    )]
    InvalidPortName { at: Box<Context>, name: String },
    #[error("{}: malformed inventory", path.display())]
    InventoryYaml {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{}: invalid inventory", path.display())]
    Inventory {
        path: PathBuf,
        #[source]
        source: Box<InventoryError>,
    },
}

/// Parses a multi-document YAML file of policies. Empty documents are
/// skipped; a policy defined twice in the file is an error.
pub fn parse_policies(path: &Path, text: &str) -> Result<Vec<PolicyObject>, ParseError> {
    let origin = |document: usize| Origin::File {
        path: path.to_path_buf(),
        document: document + 1,
    };
    // serde_yaml keeps yielding the same error after a syntax error, so stop
    // at the first one.
    let mut values = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value =
            serde_yaml::Value::deserialize(document).map_err(|source| ParseError::Yaml {
                origin: origin(i),
                source,
            })?;
        values.push(value);
    }

    let mut policies = Vec::new();
    let mut first_seen: HashMap<PolicyRef, Origin> = HashMap::new();
    let documents = serde_yaml::Deserializer::from_str(text);
    for (i, (value, document)) in values.iter().zip(documents).enumerate() {
        if value.is_null() {
            continue;
        }
        let origin = origin(i);
        let header = Header::read(value, &origin)?;
        if header.api_version != NETWORK_POLICY_API_VERSION || header.kind != NETWORK_POLICY_KIND {
            return Err(ParseError::UnsupportedKind {
                origin,
                object: header.object.into(),
                api_version: header.api_version,
                kind: header.kind,
            });
        }
        let raw = NetworkPolicy::deserialize(document).map_err(|source| ParseError::Schema {
            origin: origin.clone(),
            object: header.object.clone().into(),
            source,
        })?;
        let policy = network_policy(origin, &raw)?;
        if let Some(first) = first_seen.get(&policy.reference) {
            return Err(ParseError::DuplicatePolicy {
                origin: policy.origin,
                policy: policy.reference,
                first: first.clone(),
            });
        }
        first_seen.insert(policy.reference.clone(), policy.origin.clone());
        policies.push(policy);
    }
    Ok(policies)
}

/// What a document says it is, read before its schema is checked.
struct Header {
    api_version: String,
    kind: String,
    object: ObjectName,
}

impl Header {
    fn read(value: &serde_yaml::Value, origin: &Origin) -> Result<Self, ParseError> {
        if !value.is_mapping() {
            return Err(ParseError::NotAnObject {
                origin: origin.clone(),
            });
        }
        let text = |v: Option<&serde_yaml::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
        let metadata = value.get("metadata");
        let kind = text(value.get("kind"));
        let object = ObjectName {
            kind: kind.clone(),
            namespace: text(metadata.and_then(|m| m.get("namespace")))
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(default_namespace),
            name: text(metadata.and_then(|m| m.get("name"))).filter(|n| !n.is_empty()),
        };
        let missing = |field| ParseError::MissingField {
            origin: origin.clone(),
            object: object.clone().into(),
            field,
        };
        let api_version = text(value.get("apiVersion")).ok_or_else(|| missing("apiVersion"))?;
        let kind = kind.ok_or_else(|| missing("kind"))?;
        if object.name.is_none() {
            return Err(missing("metadata.name"));
        }
        Ok(Self {
            api_version,
            kind,
            object,
        })
    }
}

/// Validates a NetworkPolicy in wire form (from a file, or converted from
/// the Kubernetes API) into a [`PolicyObject`].
pub fn network_policy(origin: Origin, raw: &NetworkPolicy) -> Result<PolicyObject, ParseError> {
    let namespace = raw
        .metadata
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(default_namespace);
    let object = ObjectName {
        kind: Some(raw.kind.clone()),
        namespace: namespace.clone(),
        name: raw.metadata.name.clone().filter(|n| !n.is_empty()),
    };
    let Some(name) = object.name.clone() else {
        return Err(ParseError::MissingField {
            origin,
            object: object.into(),
            field: "metadata.name",
        });
    };
    if raw.api_version != NETWORK_POLICY_API_VERSION || raw.kind != NETWORK_POLICY_KIND {
        return Err(ParseError::UnsupportedKind {
            origin,
            object: object.into(),
            api_version: raw.api_version.clone(),
            kind: raw.kind.clone(),
        });
    }
    let cx = Context {
        origin: origin.clone(),
        object,
        field: String::new(),
    };
    let spec = &raw.spec;
    let pod_selector = selector(&cx.at("spec.podSelector"), &spec.pod_selector)?;

    // Kubernetes defaults policyTypes to Ingress, plus Egress when the policy
    // has egress rules.
    let (isolates_ingress, isolates_egress) = match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => {
            let mut isolates = (false, false);
            for (i, value) in types.iter().enumerate() {
                match value.as_str() {
                    "Ingress" => isolates.0 = true,
                    "Egress" => isolates.1 = true,
                    _ => {
                        return Err(ParseError::UnknownPolicyType {
                            at: cx.at(format!("spec.policyTypes[{i}]")).into(),
                            value: value.clone(),
                        })
                    }
                }
            }
            isolates
        }
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    };

    let ingress = spec
        .ingress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("spec.ingress[{i}]");
            rule(
                &cx,
                &namespace,
                &field,
                "from",
                r.from.as_deref(),
                r.ports.as_deref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let egress = spec
        .egress
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("spec.egress[{i}]");
            rule(
                &cx,
                &namespace,
                &field,
                "to",
                r.to.as_deref(),
                r.ports.as_deref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;

    Ok(PolicyObject {
        reference: PolicyRef { namespace, name },
        origin,
        kind: PolicyKind::NetworkPolicy(NetworkPolicyRules {
            pod_selector,
            isolates_ingress,
            isolates_egress,
            ingress,
            egress,
        }),
    })
}

fn selector(at: &Context, raw: &LabelSelector) -> Result<Selector, ParseError> {
    Selector::from_label_selector(raw).map_err(|source| ParseError::Selector {
        at: at.at(format!("{}.{}", at.field, source.field())).into(),
        source,
    })
}

fn rule(
    cx: &Context,
    namespace: &str,
    field: &str,
    peers_name: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
) -> Result<Rule, ParseError> {
    let peers = match peers {
        None | Some([]) => Peers::All,
        Some(list) => Peers::Only(
            list.iter()
                .enumerate()
                .map(|(j, p)| peer(&cx.at(format!("{field}.{peers_name}[{j}]")), namespace, p))
                .collect::<Result<_, _>>()?,
        ),
    };
    let ports = ports
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(k, p)| port(&cx.at(format!("{field}.ports[{k}]")), p))
        .collect::<Result<_, _>>()?;
    Ok(Rule { peers, ports })
}

fn peer(at: &Context, namespace: &str, raw: &NetworkPolicyPeer) -> Result<Peer, ParseError> {
    let field = |name: &str| at.at(format!("{}.{name}", at.field));
    match raw {
        NetworkPolicyPeer {
            ip_block: Some(block),
            pod_selector: None,
            namespace_selector: None,
        } => {
            let cidr = cidr(&field("ipBlock.cidr"), &block.cidr)?;
            let mut except = Vec::new();
            for (k, text) in block.except.iter().flatten().enumerate() {
                let at = field(&format!("ipBlock.except[{k}]"));
                let e = self::cidr(&at, text)?;
                if !(cidr.contains(&e) && e.prefix_len() > cidr.prefix_len()) {
                    return Err(ParseError::ExceptOutsideCidr {
                        at: at.into(),
                        except: e,
                        cidr,
                    });
                }
                except.push(e);
            }
            Ok(Peer::Block { cidr, except })
        }
        NetworkPolicyPeer {
            ip_block: Some(_), ..
        } => Err(ParseError::IpBlockWithSelector {
            at: at.clone().into(),
        }),
        NetworkPolicyPeer {
            pod_selector: None,
            namespace_selector: None,
            ..
        } => Err(ParseError::EmptyPeer {
            at: at.clone().into(),
        }),
        NetworkPolicyPeer {
            pod_selector,
            namespace_selector,
            ..
        } => {
            let pods = match pod_selector {
                Some(s) => selector(&field("podSelector"), s)?,
                None => Selector::everything(),
            };
            let namespaces = match namespace_selector {
                Some(s) => NamespaceScope::Matching(selector(&field("namespaceSelector"), s)?),
                None => NamespaceScope::Exactly(namespace.to_string()),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

/// Parses a CIDR, clearing host bits (`10.0.0.1/24` means `10.0.0.0/24`).
fn cidr(at: &Context, text: &str) -> Result<IpNet, ParseError> {
    let net: IpNet = text.parse().map_err(|source| ParseError::InvalidCidr {
        at: at.clone().into(),
        value: text.to_string(),
        source,
    })?;
    let net = net.trunc();
    // The kernel keys IPv4 as IPv4-mapped IPv6; a mapped IPv6 CIDR would
    // silently alias IPv4 addresses there but not in policy semantics.
    if let IpNet::V6(v6) = net {
        if v6.prefix_len() >= 96 && v6.network().to_ipv4_mapped().is_some() {
            return Err(ParseError::MappedCidr {
                at: at.clone().into(),
                value: net,
            });
        }
    }
    Ok(net)
}

fn port(at: &Context, raw: &NetworkPolicyPort) -> Result<PortMatch, ParseError> {
    let field = |name: &str| at.at(format!("{}.{name}", at.field));
    let protocol = match raw.protocol.as_deref() {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => {
            return Err(ParseError::SctpUnsupported {
                at: field("protocol").into(),
            })
        }
        Some(other) => {
            return Err(ParseError::UnknownProtocol {
                at: field("protocol").into(),
                protocol: other.to_string(),
            })
        }
    };
    let number = |name: &str, n: i64| {
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| ParseError::PortOutOfRange {
                at: field(name).into(),
                port: n,
            })
    };
    let port = match (&raw.port, raw.end_port) {
        (None, None) => PortSpec::All,
        (None, Some(_)) => {
            return Err(ParseError::EndPortWithoutPort {
                at: field("endPort").into(),
            })
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = number("port", *n)?;
            let last = match end {
                Some(e) => number("endPort", e)?,
                None => first,
            };
            if last < first {
                return Err(ParseError::EndPortBelowPort {
                    at: field("endPort").into(),
                    port: first,
                    end_port: last,
                });
            }
            PortSpec::Range { first, last }
        }
        (Some(IntOrString::String(name)), end) => {
            if !is_valid_port_name(name) {
                return Err(ParseError::InvalidPortName {
                    at: field("port").into(),
                    name: name.clone(),
                });
            }
            if end.is_some() {
                return Err(ParseError::EndPortWithNamedPort {
                    at: field("endPort").into(),
                    name: name.clone(),
                });
            }
            PortSpec::Named(name.clone())
        }
    };
    Ok(PortMatch { protocol, port })
}

/// Parses the workloads file (one YAML document; empty means no workloads).
pub fn parse_inventory(path: &Path, text: &str) -> Result<Inventory, ParseError> {
    let yaml_error = |source| ParseError::InventoryYaml {
        path: path.to_path_buf(),
        source,
    };
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(yaml_error)?;
    if value.is_null() {
        return Ok(Inventory::default());
    }
    // Again from the text, so errors carry field paths and lines.
    let inventory: Inventory = serde_yaml::from_str(text).map_err(yaml_error)?;
    inventory.check().map_err(|source| ParseError::Inventory {
        path: path.to_path_buf(),
        source: source.into(),
    })?;
    Ok(inventory)
}

#[cfg(test)]
mod tests;
