//! YAML → validated policies and inventories, with errors that say which
//! file, document, object and field is wrong, and why.
//!
//! Files may mix `networking.k8s.io/v1` NetworkPolicy with Portcullis'
//! `portcullis.dev/v1alpha1` L4Policy and ClusterL4Policy documents.
//!
//! Each policy document is read twice: once as a generic YAML value to learn
//! its kind and name (so every later error can name the object), then into
//! the typed wire form straight from the text, so schema errors (unknown
//! field, wrong type) carry the field path and line (see [`yaml`]).

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use thiserror::Error;

pub use self::yaml::YamlError;

use crate::identity::spiffe::SpiffeId;
use crate::policy::{
    model::{
        default_namespace, is_valid_port_name,
        names::{self, abbreviate, NameError},
        Action, CheckedInventory, ClusterL4Policy, ClusterPolicyRules, IdentityMatch, IdentityPeer,
        IntOrString, Inventory, InventoryError, L4Policy, L4PolicyRules, LabelSelector, Mode,
        NamespaceScope, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicyRules,
        ObjectKind, Origin, Peer, Peers, PolicyKind, PolicyObject, PolicyRef, PortMatch, PortSpec,
        Protocol, Rule, Tier, TierRule,
    },
    selector::{Selector, SelectorError},
};

pub const NETWORK_POLICY_API_VERSION: &str = "networking.k8s.io/v1";
pub const NETWORK_POLICY_KIND: &str = "NetworkPolicy";
pub const PORTCULLIS_API_VERSION: &str = "portcullis.dev/v1alpha1";
pub const L4_POLICY_KIND: &str = "L4Policy";
pub const CLUSTER_L4_POLICY_KIND: &str = "ClusterL4Policy";
/// ClusterL4Policy priorities.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i64> = 0..=1000;
/// Largest policy or workloads file read. Kubernetes refuses objects over
/// about 1.5 MiB; a file may hold many (10,000 benchmark rules take 1.3 MB).
pub const MAX_FILE_BYTES: usize = 4 << 20;
/// Most documents (objects) in one policy file.
pub const MAX_DOCUMENTS: usize = 10_000;
/// Most namespaces, workloads and services, together, in a workloads file.
pub const MAX_INVENTORY_ENTRIES: usize = 50_000;

/// The object a message is about, as far as it is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub kind: Option<String>,
    /// `None` for cluster-scoped objects.
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = self.kind.as_deref().unwrap_or("object");
        match (&self.namespace, &self.name) {
            (Some(namespace), Some(name)) => write!(f, "{kind} {namespace}/{name}"),
            (None, Some(name)) => write!(f, "{kind} {name}"),
            (Some(namespace), None) => write!(f, "unnamed {kind} in namespace {namespace}"),
            (None, None) => write!(f, "unnamed {kind}"),
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
    #[error("{}: the file is {size} bytes; at most {MAX_FILE_BYTES} are read", path.display())]
    TooLarge { path: PathBuf, size: usize },
    #[error("{origin}: a policy file holds at most {MAX_DOCUMENTS} documents")]
    TooManyDocuments { origin: Origin },
    #[error("{}: {count} namespaces, workloads and services; at most {MAX_INVENTORY_ENTRIES} are allowed", path.display())]
    TooManyEntries { path: PathBuf, count: usize },
    #[error("{at}: {value:?} is not valid")]
    InvalidName {
        at: Box<Context>,
        /// Abbreviated when long.
        value: String,
        #[source]
        source: NameError,
    },
    #[error("{origin}: malformed YAML")]
    Yaml {
        origin: Origin,
        #[source]
        source: YamlError,
    },
    #[error("{origin}: expected an object with apiVersion, kind and metadata")]
    NotAnObject { origin: Origin },
    #[error("{origin}: {object}: {field} is missing or not a string")]
    MissingField {
        origin: Origin,
        object: Box<ObjectName>,
        field: &'static str,
    },
    #[error("{origin}: {object}: unsupported kind {api_version} {kind} (Portcullis reads {NETWORK_POLICY_API_VERSION} {NETWORK_POLICY_KIND}, {PORTCULLIS_API_VERSION} {L4_POLICY_KIND} and {CLUSTER_L4_POLICY_KIND})")]
    UnsupportedKind {
        origin: Origin,
        object: Box<ObjectName>,
        api_version: String,
        kind: String,
    },
    #[error("{origin}: {object}: does not match the {kind} schema")]
    Schema {
        origin: Origin,
        object: Box<ObjectName>,
        kind: ObjectKind,
        #[source]
        source: YamlError,
    },
    #[error("{origin}: {policy} is defined twice (first in {first})")]
    DuplicatePolicy {
        origin: Origin,
        policy: PolicyRef,
        first: Origin,
    },
    #[error(
        "{origin}: {object}: {kind} is cluster-scoped; remove metadata.namespace ({namespace:?})"
    )]
    NamespaceOnClusterPolicy {
        origin: Origin,
        object: Box<ObjectName>,
        kind: ObjectKind,
        namespace: String,
    },
    #[error("{at}: is required")]
    Required { at: Box<Context> },
    #[error("{at}: priority {priority} is out of range 0-1000")]
    PriorityOutOfRange { at: Box<Context>, priority: i64 },
    #[error("{at}: {value:?} is not a tier (expected Admin or Baseline)")]
    UnknownTier { at: Box<Context>, value: String },
    #[error("{at}: {value:?} is not an action (expected Allow, Deny or Pass)")]
    UnknownAction { at: Box<Context>, value: String },
    #[error("{at}: action Pass is only allowed in tier Admin")]
    PassInBaseline { at: Box<Context> },
    #[error("{at}: {value:?} is not a mode (expected Enforce or Audit)")]
    UnknownMode { at: Box<Context>, value: String },
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
    #[error(
        "{at}: identity peers belong only in ingress rules (`from`) of L4Policy and \
         ClusterL4Policy: an identity is proven by the client's certificate, which only the \
         destination's proxy sees"
    )]
    IdentityNotHere { at: Box<Context> },
    #[error("{at}: identity cannot be combined with podSelector, namespaceSelector or ipBlock")]
    IdentityWithOther { at: Box<Context> },
    #[error("{at}: {message}")]
    InvalidIdentity { at: Box<Context>, message: String },
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
    #[error("{at}: unknown protocol {protocol:?} (expected TCP, UDP or SCTP)")]
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
        source: YamlError,
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
    check_size(path, text)?;
    let origin = |document: usize| Origin::File {
        path: path.to_path_buf(),
        document,
    };
    let documents = yaml::documents(text, MAX_DOCUMENTS).map_err(|e| match e.kind {
        yaml::StreamErrorKind::Syntax(source) => ParseError::Yaml {
            origin: origin(e.document),
            source,
        },
        yaml::StreamErrorKind::TooManyDocuments { .. } => ParseError::TooManyDocuments {
            origin: origin(e.document),
        },
    })?;

    let mut policies = Vec::new();
    let mut first_seen: HashMap<PolicyRef, Origin> = HashMap::new();
    for document in documents.iter().filter(|d| !d.is_null) {
        let origin = origin(document.number);
        let value: serde_json::Value =
            document.deserialize().map_err(|source| ParseError::Yaml {
                origin: origin.clone(),
                source,
            })?;
        let header = Header::read(&value, &origin)?;
        let Some(kind) = object_kind(&header.api_version, &header.kind) else {
            return Err(ParseError::UnsupportedKind {
                origin,
                object: header.object.into(),
                api_version: abbreviate(&header.api_version),
                kind: abbreviate(&header.kind),
            });
        };
        let schema_error = |source| ParseError::Schema {
            origin: origin.clone(),
            object: header.object.clone().into(),
            kind,
            source,
        };
        let policy = match kind {
            ObjectKind::NetworkPolicy => network_policy(
                origin.clone(),
                &document
                    .deserialize::<NetworkPolicy>()
                    .map_err(schema_error)?,
            )?,
            ObjectKind::L4Policy => l4_policy(
                origin.clone(),
                &document.deserialize::<L4Policy>().map_err(schema_error)?,
            )?,
            ObjectKind::ClusterL4Policy => cluster_l4_policy(
                origin.clone(),
                &document
                    .deserialize::<ClusterL4Policy>()
                    .map_err(schema_error)?,
            )?,
        };
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

/// Refuses a file over [`MAX_FILE_BYTES`] before any parsing.
fn check_size(path: &Path, text: &str) -> Result<(), ParseError> {
    if text.len() > MAX_FILE_BYTES {
        return Err(ParseError::TooLarge {
            path: path.to_path_buf(),
            size: text.len(),
        });
    }
    Ok(())
}

/// The kind an apiVersion and kind name, if Portcullis reads it.
fn object_kind(api_version: &str, kind: &str) -> Option<ObjectKind> {
    match (api_version, kind) {
        (NETWORK_POLICY_API_VERSION, NETWORK_POLICY_KIND) => Some(ObjectKind::NetworkPolicy),
        (PORTCULLIS_API_VERSION, L4_POLICY_KIND) => Some(ObjectKind::L4Policy),
        (PORTCULLIS_API_VERSION, CLUSTER_L4_POLICY_KIND) => Some(ObjectKind::ClusterL4Policy),
        _ => None,
    }
}

/// What a document says it is, read before its schema is checked.
struct Header {
    api_version: String,
    kind: String,
    object: ObjectName,
}

impl Header {
    fn read(value: &serde_json::Value, origin: &Origin) -> Result<Self, ParseError> {
        if !value.is_object() {
            return Err(ParseError::NotAnObject {
                origin: origin.clone(),
            });
        }
        let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
        let metadata = value.get("metadata");
        let kind = text(value.get("kind"));
        let cluster_scoped = kind.as_deref() == Some(CLUSTER_L4_POLICY_KIND);
        let object = ObjectName {
            kind: kind.as_deref().map(abbreviate),
            namespace: object_namespace(
                cluster_scoped,
                text(metadata.and_then(|m| m.get("namespace"))),
            )
            .as_deref()
            .map(abbreviate),
            name: text(metadata.and_then(|m| m.get("name")))
                .filter(|n| !n.is_empty())
                .as_deref()
                .map(abbreviate),
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
    let (cx, reference) = identify(
        origin,
        ObjectKind::NetworkPolicy,
        &raw.api_version,
        &raw.kind,
        &raw.metadata,
    )?;
    let spec = &raw.spec;
    let pod_selector = selector(&cx.at("spec.podSelector"), &spec.pod_selector)?;
    // Kubernetes defaults policyTypes to Ingress, plus Egress when the policy
    // has egress rules.
    let defaults = (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()));
    let (isolates_ingress, isolates_egress) =
        policy_types(&cx, spec.policy_types.as_deref(), defaults)?;
    let scope = Some(&*reference.namespace);
    let ingress = ingress_rules(&cx, scope, "spec.ingress", spec.ingress.as_deref())?;
    let egress = egress_rules(&cx, scope, "spec.egress", spec.egress.as_deref())?;
    Ok(PolicyObject {
        reference,
        origin: cx.origin,
        kind: std::sync::Arc::new(PolicyKind::NetworkPolicy(NetworkPolicyRules {
            pod_selector,
            isolates_ingress,
            isolates_egress,
            ingress,
            egress,
        })),
    })
}

/// Validates an L4Policy in wire form (from a file, or converted from the
/// Kubernetes API) into a [`PolicyObject`].
pub fn l4_policy(origin: Origin, raw: &L4Policy) -> Result<PolicyObject, ParseError> {
    let (cx, reference) = identify(
        origin,
        ObjectKind::L4Policy,
        &raw.api_version,
        &raw.kind,
        &raw.metadata,
    )?;
    let spec = &raw.spec;
    // Required (unlike NetworkPolicy's) so "applies to every pod" is never
    // an accident.
    let Some(raw_selector) = &spec.pod_selector else {
        return Err(ParseError::Required {
            at: cx.at("spec.podSelector").into(),
        });
    };
    let pod_selector = selector(&cx.at("spec.podSelector"), raw_selector)?;
    let mode = match spec.mode.as_deref() {
        None | Some("Enforce") => Mode::Enforce,
        Some("Audit") => Mode::Audit,
        Some(other) => {
            return Err(ParseError::UnknownMode {
                at: cx.at("spec.mode").into(),
                value: abbreviate(other),
            })
        }
    };
    // A direction is isolated when its allow list is present (even empty):
    // a deny-only policy isolates nothing.
    let defaults = (spec.ingress.is_some(), spec.egress.is_some());
    let (isolates_ingress, isolates_egress) =
        policy_types(&cx, spec.policy_types.as_deref(), defaults)?;
    let scope = Some(&*reference.namespace);
    let ingress = ingress_rules(&cx, scope, "spec.ingress", spec.ingress.as_deref())?;
    let egress = egress_rules(&cx, scope, "spec.egress", spec.egress.as_deref())?;
    let ingress_deny = ingress_rules(&cx, scope, "spec.ingressDeny", spec.ingress_deny.as_deref())?;
    let egress_deny = egress_rules(&cx, scope, "spec.egressDeny", spec.egress_deny.as_deref())?;
    Ok(PolicyObject {
        reference,
        origin: cx.origin,
        kind: std::sync::Arc::new(PolicyKind::L4Policy(L4PolicyRules {
            mode,
            allow: NetworkPolicyRules {
                pod_selector,
                isolates_ingress,
                isolates_egress,
                ingress,
                egress,
            },
            ingress_deny,
            egress_deny,
        })),
    })
}

/// Validates a ClusterL4Policy in wire form into a [`PolicyObject`].
pub fn cluster_l4_policy(
    origin: Origin,
    raw: &ClusterL4Policy,
) -> Result<PolicyObject, ParseError> {
    let (cx, reference) = identify(
        origin,
        ObjectKind::ClusterL4Policy,
        &raw.api_version,
        &raw.kind,
        &raw.metadata,
    )?;
    let spec = &raw.spec;
    let required = |field: &str| ParseError::Required {
        at: cx.at(field).into(),
    };
    let tier = match spec.tier.as_deref() {
        None => return Err(required("spec.tier")),
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(other) => {
            return Err(ParseError::UnknownTier {
                at: cx.at("spec.tier").into(),
                value: abbreviate(other),
            })
        }
    };
    let priority = spec.priority.ok_or_else(|| required("spec.priority"))?;
    let priority = u32::try_from(priority)
        .ok()
        .filter(|_| PRIORITY_RANGE.contains(&priority))
        .ok_or_else(|| ParseError::PriorityOutOfRange {
            at: cx.at("spec.priority").into(),
            priority,
        })?;
    let subject = spec.subject.clone().unwrap_or_default();
    let everything = LabelSelector::default();
    let namespaces = selector(
        &cx.at("spec.subject.namespaceSelector"),
        subject.namespace_selector.as_ref().unwrap_or(&everything),
    )?;
    let pods = selector(
        &cx.at("spec.subject.podSelector"),
        subject.pod_selector.as_ref().unwrap_or(&everything),
    )?;
    let tier_rule = |field: String, action: Option<&str>, rule: Rule| {
        let action = match action {
            None => return Err(required(&format!("{field}.action"))),
            Some("Allow") => Action::Allow,
            Some("Deny") => Action::Deny,
            Some("Pass") if tier == Tier::Admin => Action::Pass,
            Some("Pass") => {
                return Err(ParseError::PassInBaseline {
                    at: cx.at(format!("{field}.action")).into(),
                })
            }
            Some(other) => {
                return Err(ParseError::UnknownAction {
                    at: cx.at(format!("{field}.action")).into(),
                    value: abbreviate(other),
                })
            }
        };
        Ok(TierRule { action, rule })
    };
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let field = format!("spec.ingress[{i}]");
        let parsed = rule(
            &cx,
            None,
            &field,
            "from",
            r.from.as_deref(),
            r.ports.as_deref(),
        )?;
        ingress.push(tier_rule(field, r.action.as_deref(), parsed)?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let field = format!("spec.egress[{i}]");
        let parsed = rule(&cx, None, &field, "to", r.to.as_deref(), r.ports.as_deref())?;
        egress.push(tier_rule(field, r.action.as_deref(), parsed)?);
    }
    Ok(PolicyObject {
        reference,
        origin: cx.origin,
        kind: std::sync::Arc::new(PolicyKind::ClusterL4Policy(ClusterPolicyRules {
            tier,
            priority,
            namespaces,
            pods,
            ingress,
            egress,
        })),
    })
}

/// The namespace an object is named with: none for cluster-scoped kinds,
/// else as given or `default`.
fn object_namespace(cluster_scoped: bool, namespace: Option<String>) -> Option<String> {
    if cluster_scoped {
        return None;
    }
    Some(
        namespace
            .filter(|ns| !ns.is_empty())
            .unwrap_or_else(default_namespace),
    )
}

/// Checks the header fields of a wire object; returns the context for
/// field errors and the policy's reference.
fn identify(
    origin: Origin,
    expected: ObjectKind,
    api_version: &str,
    kind: &str,
    metadata: &crate::policy::model::ObjectMeta,
) -> Result<(Context, PolicyRef), ParseError> {
    let cluster_scoped = expected == ObjectKind::ClusterL4Policy;
    let namespace = object_namespace(cluster_scoped, metadata.namespace.clone());
    let name = metadata.name.clone().filter(|n| !n.is_empty());
    // Names are shortened for messages: they are checked only below.
    let object = ObjectName {
        kind: Some(abbreviate(kind)),
        namespace: namespace.as_deref().map(abbreviate),
        name: name.as_deref().map(abbreviate),
    };
    let Some(name) = name else {
        return Err(ParseError::MissingField {
            origin,
            object: object.into(),
            field: "metadata.name",
        });
    };
    if object_kind(api_version, kind) != Some(expected) {
        return Err(ParseError::UnsupportedKind {
            origin,
            object: object.into(),
            api_version: abbreviate(api_version),
            kind: abbreviate(kind),
        });
    }
    let cx = Context {
        origin,
        object,
        field: String::new(),
    };
    let invalid = |field: &str, value: &str, source| ParseError::InvalidName {
        at: cx.at(field).into(),
        value: abbreviate(value),
        source,
    };
    names::dns1123_subdomain(&name).map_err(|e| invalid("metadata.name", &name, e))?;
    if let Some(namespace) = metadata.namespace.as_deref() {
        if cluster_scoped {
            return Err(ParseError::NamespaceOnClusterPolicy {
                origin: cx.origin,
                object: cx.object.into(),
                kind: expected,
                namespace: abbreviate(namespace),
            });
        }
    }
    if let Some(namespace) = &namespace {
        names::dns1123_label(namespace).map_err(|e| invalid("metadata.namespace", namespace, e))?;
    }
    let reference = PolicyRef {
        namespace: namespace.unwrap_or_default().into(),
        name: name.into(),
        kind: expected,
    };
    Ok((cx, reference))
}

/// The directions a policy isolates: `policyTypes` if given and not empty,
/// else `defaults` (ingress, egress).
fn policy_types(
    cx: &Context,
    types: Option<&[String]>,
    defaults: (bool, bool),
) -> Result<(bool, bool), ParseError> {
    let Some(types) = types.filter(|t| !t.is_empty()) else {
        return Ok(defaults);
    };
    let mut isolates = (false, false);
    for (i, value) in types.iter().enumerate() {
        match value.as_str() {
            "Ingress" => isolates.0 = true,
            "Egress" => isolates.1 = true,
            _ => {
                return Err(ParseError::UnknownPolicyType {
                    at: cx.at(format!("spec.policyTypes[{i}]")).into(),
                    value: abbreviate(value),
                })
            }
        }
    }
    Ok(isolates)
}

fn ingress_rules(
    cx: &Context,
    namespace: Option<&str>,
    field: &str,
    rules: Option<&[crate::policy::model::NetworkPolicyIngressRule]>,
) -> Result<Vec<Rule>, ParseError> {
    rules
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("{field}[{i}]");
            rule(
                cx,
                namespace,
                &field,
                "from",
                r.from.as_deref(),
                r.ports.as_deref(),
            )
        })
        .collect()
}

fn egress_rules(
    cx: &Context,
    namespace: Option<&str>,
    field: &str,
    rules: Option<&[crate::policy::model::NetworkPolicyEgressRule]>,
) -> Result<Vec<Rule>, ParseError> {
    rules
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let field = format!("{field}[{i}]");
            rule(
                cx,
                namespace,
                &field,
                "to",
                r.to.as_deref(),
                r.ports.as_deref(),
            )
        })
        .collect()
}

fn selector(at: &Context, raw: &LabelSelector) -> Result<Selector, ParseError> {
    Selector::from_label_selector(raw).map_err(|source| ParseError::Selector {
        at: at.at(format!("{}.{}", at.field, source.field())).into(),
        source,
    })
}

/// `namespace` is the policy's, which a peer without `namespaceSelector`
/// is limited to; `None` (cluster-scoped policies) means every namespace.
fn rule(
    cx: &Context,
    namespace: Option<&str>,
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
                .map(|(j, p)| {
                    let at = cx.at(format!("{field}.{peers_name}[{j}]"));
                    peer(&at, namespace, peers_name == "from", p)
                })
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

/// `ingress`: the peer is a rule's `from`, where identities may appear
/// (in Portcullis' own kinds).
fn peer(
    at: &Context,
    namespace: Option<&str>,
    ingress: bool,
    raw: &NetworkPolicyPeer,
) -> Result<Peer, ParseError> {
    let field = |name: &str| at.at(format!("{}.{name}", at.field));
    match raw {
        NetworkPolicyPeer {
            identity: Some(identity),
            pod_selector: None,
            namespace_selector: None,
            ip_block: None,
        } => {
            let network_policy = at.object.kind.as_deref() == Some("NetworkPolicy");
            if !ingress || network_policy {
                return Err(ParseError::IdentityNotHere {
                    at: field("identity").into(),
                });
            }
            identity_peer(&field("identity"), identity).map(Peer::Identity)
        }
        NetworkPolicyPeer {
            identity: Some(_), ..
        } => Err(ParseError::IdentityWithOther {
            at: at.clone().into(),
        }),
        NetworkPolicyPeer {
            ip_block: Some(block),
            pod_selector: None,
            namespace_selector: None,
            ..
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
            let namespaces = match (namespace_selector, namespace) {
                (Some(s), _) => NamespaceScope::Matching(selector(&field("namespaceSelector"), s)?),
                (None, Some(ns)) => NamespaceScope::Exactly(ns.to_string()),
                (None, None) => NamespaceScope::Matching(Selector::everything()),
            };
            Ok(Peer::Pods { namespaces, pods })
        }
    }
}

fn identity_peer(at: &Context, raw: &IdentityPeer) -> Result<IdentityMatch, ParseError> {
    let invalid = |field: &str, message: String| ParseError::InvalidIdentity {
        at: at.at(format!("{}{field}", at.field)).into(),
        message,
    };
    match (&raw.spiffe_id, &raw.namespace) {
        (Some(id), None) => id
            .parse::<SpiffeId>()
            .map(IdentityMatch::Exact)
            .map_err(|e| invalid(".spiffeId", format!("{:?}: {e}", abbreviate(id)))),
        (None, Some(ns)) if is_dns_label(ns) => Ok(IdentityMatch::Namespace(ns.clone())),
        (None, Some(ns)) => Err(invalid(
            ".namespace",
            format!("{:?} is not a namespace name", abbreviate(ns)),
        )),
        _ => Err(invalid(
            "",
            "an identity is exactly one of spiffeId and namespace".into(),
        )),
    }
}

/// A Kubernetes namespace name (RFC 1123 label).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Parses a CIDR, clearing host bits (`10.0.0.1/24` means `10.0.0.0/24`).
fn cidr(at: &Context, text: &str) -> Result<IpNet, ParseError> {
    let net: IpNet = text.parse().map_err(|source| ParseError::InvalidCidr {
        at: at.clone().into(),
        value: abbreviate(text),
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
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            return Err(ParseError::UnknownProtocol {
                at: field("protocol").into(),
                protocol: abbreviate(other),
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
                    name: abbreviate(name),
                });
            }
            if end.is_some() {
                return Err(ParseError::EndPortWithNamedPort {
                    at: field("endPort").into(),
                    name: abbreviate(name),
                });
            }
            PortSpec::Named(name.clone())
        }
    };
    Ok(PortMatch { protocol, port })
}

/// Parses the workloads file (one YAML document; empty means no workloads).
pub fn parse_inventory(path: &Path, text: &str) -> Result<Inventory, ParseError> {
    parse_checked_inventory(path, text).map(CheckedInventory::into_inner)
}

/// [`parse_inventory`], keeping the proof that the view passed its check.
pub fn parse_checked_inventory(path: &Path, text: &str) -> Result<CheckedInventory, ParseError> {
    check_size(path, text)?;
    let inventory = yaml::single::<Inventory>(text)
        .map_err(|source| ParseError::InventoryYaml {
            path: path.to_path_buf(),
            source,
        })?
        .unwrap_or_default();
    let count = inventory.namespaces.len() + inventory.workloads.len() + inventory.services.len();
    if count > MAX_INVENTORY_ENTRIES {
        return Err(ParseError::TooManyEntries {
            path: path.to_path_buf(),
            count,
        });
    }
    CheckedInventory::new(inventory).map_err(|source| ParseError::Inventory {
        path: path.to_path_buf(),
        source: source.into(),
    })
}

pub mod yaml;

#[cfg(test)]
mod portcullis_tests;
#[cfg(test)]
mod tests;
