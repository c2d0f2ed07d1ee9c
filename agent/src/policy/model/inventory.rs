//! The standalone "workloads file": this node's addresses, namespace labels,
//! and every workload (local ones, with a cgroup, are enforced here).

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
};

use foldhash::{HashMap, HashMapExt as _};

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

use super::{
    default_namespace, is_valid_port_name,
    names::{self, abbreviate, NameError},
    Labels, Protocol, NAMESPACE_NAME_LABEL,
};

/// Everything the node knows about workloads: its own addresses, namespace
/// labels, and every workload (local ones have a cgroup).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Inventory {
    /// Addresses of this node; ingress from them is always allowed.
    #[serde(default, rename = "nodeIPs", skip_serializing_if = "Vec::is_empty")]
    pub node_ips: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<Namespace>,
    /// Shared: a source that rebuilds its view keeps the workloads that
    /// did not change, and the passes that hold two views hold them once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Arc<Workload>>,
    /// Virtual service addresses (ClusterIPs) and the backends each port
    /// leads to. Connections to them are translated to a backend at
    /// connect time, so policy judges the backend really reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
}

/// A Service as the data path needs it: its virtual addresses and, per
/// port, the ready backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// At most one IPv4 and one IPv6 address.
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(deserialize_with = "deserialize_container_port")]
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Ready backends; none means connections to this port are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<ServiceBackend>,
}

/// One ready endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceBackend {
    pub ip: IpAddr,
    #[serde(deserialize_with = "deserialize_container_port")]
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
}

impl Namespace {
    /// The labels namespace selectors see: its own, and its name under
    /// `kubernetes.io/metadata.name`, which no label of its own overrides.
    pub fn selector_labels(&self) -> Labels {
        let mut labels = self.labels.clone();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), self.name.clone());
        labels
    }

    /// [`Namespace::selector_labels`] of a namespace the inventory does not
    /// list: its name only.
    pub fn unlisted_labels(name: &str) -> Labels {
        Labels::from([(NAMESPACE_NAME_LABEL.to_string(), name.to_string())])
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Arc<Labels>,
    /// cgroup v2 path (absolute, or relative to the cgroup2 mount). Present
    /// for workloads enforced on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// At most one IPv4 and one IPv6 address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
    /// Named container ports, for policies that name ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    /// The pod's ServiceAccount: its workload identity
    /// (`spiffe://<trust domain>/ns/<namespace>/sa/<this>`). `default`
    /// when unset, as in Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl Workload {
    /// The labels to change: this workload's own copy from now on (others
    /// that shared the set keep theirs).
    pub fn labels_mut(&mut self) -> &mut Labels {
        Arc::make_mut(&mut self.labels)
    }

    /// What a workload must be on its own: valid names and labels, at most
    /// one address per family, valid and distinct port names. (Whether an
    /// address is usable is checked where every address is claimed.)
    fn check_alone(&self, at: &dyn Fn() -> String) -> Result<(), InventoryError> {
        if self.name.is_empty() || self.namespace.is_empty() {
            return Err(InventoryError::EmptyName {
                field: format!(
                    "{}.{}",
                    at(),
                    if self.name.is_empty() {
                        "name"
                    } else {
                        "namespace"
                    }
                ),
            });
        }
        check_name(
            &self.name,
            || format!("{}.name", at()),
            names::dns1123_subdomain,
        )?;
        check_name(
            &self.namespace,
            || format!("{}.namespace", at()),
            names::dns1123_label,
        )?;
        check_labels(&self.labels, || format!("{}.labels", at()))?;
        if let Some(account) = &self.service_account {
            check_name(
                account,
                || format!("{}.serviceAccount", at()),
                names::dns1123_subdomain,
            )?;
        }
        let (mut v4, mut v6): (Option<IpAddr>, Option<IpAddr>) = (None, None);
        for (j, ip) in self.ips.iter().enumerate() {
            let slot = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
            if let Some(first) = *slot {
                return Err(InventoryError::SecondAddressOfFamily {
                    field: format!("{}.ips[{j}]", at()),
                    workload: self.reference(),
                    first,
                    second: *ip,
                });
            }
            *slot = Some(*ip);
        }
        let mut port_names: HashMap<&str, usize> = HashMap::new();
        for (j, port) in self.ports.iter().enumerate() {
            let field = || format!("{}.ports[{j}]", at());
            if !is_valid_port_name(&port.name) {
                return Err(InventoryError::InvalidPortName {
                    field: format!("{}.name", field()),
                    workload: self.reference(),
                    name: abbreviate(&port.name),
                });
            }
            if port.container_port == 0 {
                return Err(InventoryError::PortOutOfRange {
                    field: format!("{}.containerPort", field()),
                    workload: self.reference(),
                    port: 0,
                });
            }
            if let Some(first) = port_names.insert(&port.name, j) {
                return Err(InventoryError::DuplicatePortName {
                    field: format!("{}.name", field()),
                    workload: self.reference(),
                    name: abbreviate(&port.name),
                    first: format!("{}.ports[{first}]", at()),
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    pub name: String,
    #[serde(deserialize_with = "deserialize_container_port")]
    pub container_port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

/// Reads a container port as a wide integer so out-of-range values get a
/// clear message (the parser adds the path of the port entry).
fn deserialize_container_port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let n = i64::deserialize(d)?;
    u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| {
        serde::de::Error::custom(format!("containerPort {n} is out of range 1-65535"))
    })
}

/// Identifies a workload.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Workload {
    pub fn reference(&self) -> WorkloadRef {
        WorkloadRef {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// The ServiceAccount, `default` when unset.
    pub fn service_account(&self) -> &str {
        self.service_account
            .as_deref()
            .unwrap_or(crate::identity::spiffe::DEFAULT_SERVICE_ACCOUNT)
    }

    /// Enforced on this node?
    pub fn is_local(&self) -> bool {
        self.cgroup.is_some()
    }

    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
    }

    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.ips.iter().find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
    }

    /// Resolves a named port the way Kubernetes does: same name and protocol.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.container_port)
    }
}

impl Inventory {
    /// Labels of a namespace, including the `kubernetes.io/metadata.name`
    /// label every namespace carries; unlisted namespaces have only that one.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        match self.namespaces.iter().find(|n| n.name == namespace) {
            Some(listed) => listed.selector_labels(),
            None => Namespace::unlisted_labels(namespace),
        }
    }

    /// Checks what the type cannot express: unique names, addresses and
    /// cgroups, one address per family, usable addresses and port names;
    /// services with usable cluster IPs no workload or node uses, one per
    /// family, and each port and protocol once.
    pub fn check(&self) -> Result<(), InventoryError> {
        self.check_reusing(|_| false).map(|_in_name_order| ())
    }

    /// [`Inventory::check`], trusting what a workload says of itself (its
    /// names, labels, addresses and ports) where `known_valid` vouches for
    /// it; what workloads must not share is always checked. Tells whether
    /// the workloads are in strict name order, as sources list them.
    pub(crate) fn check_reusing(
        &self,
        known_valid: impl Fn(&Arc<Workload>) -> bool,
    ) -> Result<bool, InventoryError> {
        // Field names are only spelled out for an error: this runs on every
        // pass over thousands of pods.
        // Sized up front: growing maps of thousands of entries rehashes them.
        let addresses =
            self.node_ips.len() + self.workloads.iter().map(|w| w.ips.len()).sum::<usize>();
        let mut address_owners: HashMap<IpAddr, Claimant> = HashMap::with_capacity(addresses);
        let mut claim = |address: IpAddr, claimant: Claimant| -> Result<(), InventoryError> {
            check_address(address, || claimant.to_string())?;
            match address_owners.get(&address) {
                Some(first) => Err(InventoryError::DuplicateAddress {
                    field: claimant.to_string(),
                    address,
                    first: first.to_string(),
                }),
                None => {
                    address_owners.insert(address, claimant);
                    Ok(())
                }
            }
        };
        for (i, ip) in self.node_ips.iter().enumerate() {
            claim(*ip, Claimant::Node(i))?;
        }

        let mut namespaces: HashMap<&str, usize> = HashMap::new();
        for (i, ns) in self.namespaces.iter().enumerate() {
            if ns.name.is_empty() {
                return Err(InventoryError::EmptyName {
                    field: format!("namespaces[{i}].name"),
                });
            }
            check_name(
                &ns.name,
                || format!("namespaces[{i}].name"),
                names::dns1123_label,
            )?;
            check_labels(&ns.labels, || format!("namespaces[{i}].labels"))?;
            if let Some(first) = namespaces.insert(&ns.name, i) {
                return Err(InventoryError::DuplicateNamespace {
                    field: format!("namespaces[{i}]"),
                    namespace: ns.name.clone(),
                    first: format!("namespaces[{first}]"),
                });
            }
        }

        // Sources list workloads in name order: then a name given twice
        // would sit next to itself, and no map is needed to find it.
        let strictly_sorted = self
            .workloads
            .windows(2)
            .all(|p| (&p[0].namespace, &p[0].name) < (&p[1].namespace, &p[1].name));
        let mut workloads: HashMap<(&str, &str), usize> = HashMap::new();
        let mut cgroups: HashMap<&Path, usize> = HashMap::with_capacity(self.workloads.len());
        for (i, w) in self.workloads.iter().enumerate() {
            let at = || format!("workloads[{i}]");
            if !known_valid(w) {
                w.check_alone(&at)?;
            }
            if !strictly_sorted {
                if let Some(first) = workloads.insert((&w.namespace, &w.name), i) {
                    return Err(InventoryError::DuplicateWorkload {
                        field: at(),
                        workload: w.reference(),
                        first: format!("workloads[{first}]"),
                    });
                }
            }
            for (j, ip) in w.ips.iter().enumerate() {
                claim(*ip, Claimant::Workload(i, j))?;
            }
            if let Some(cgroup) = &w.cgroup {
                if let Some(first) = cgroups.insert(cgroup, i) {
                    return Err(InventoryError::DuplicateCgroup {
                        cgroup: cgroup.clone(),
                        first: self.workloads[first].reference(),
                        second: w.reference(),
                    });
                }
            }
        }

        let mut services: HashMap<String, usize> = HashMap::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = || format!("services[{i}]");
            for (field, value) in [("name", &svc.name), ("namespace", &svc.namespace)] {
                if value.is_empty() {
                    return Err(InventoryError::EmptyName {
                        field: format!("{}.{field}", at()),
                    });
                }
            }
            check_name(&svc.name, || format!("{}.name", at()), names::dns1123_label)?;
            check_name(
                &svc.namespace,
                || format!("{}.namespace", at()),
                names::dns1123_label,
            )?;
            let service = format!("{}/{}", svc.namespace, svc.name);
            if let Some(first) = services.insert(service.clone(), i) {
                return Err(InventoryError::DuplicateService {
                    field: at(),
                    service,
                    first: format!("services[{first}]"),
                });
            }
            // A cluster IP is claimed like a pod or node address: the kernel
            // translates every connection to it, so it must mean one thing.
            let (mut v4, mut v6): (Option<IpAddr>, Option<IpAddr>) = (None, None);
            for (j, ip) in svc.cluster_ips.iter().enumerate() {
                let slot = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
                if let Some(first) = *slot {
                    return Err(InventoryError::SecondServiceAddressOfFamily {
                        field: Claimant::Service(i, j).to_string(),
                        service,
                        first,
                        second: *ip,
                    });
                }
                *slot = Some(*ip);
                claim(*ip, Claimant::Service(i, j))?;
            }
            let mut ports: HashMap<(u16, Protocol), usize> = HashMap::new();
            for (j, port) in svc.ports.iter().enumerate() {
                let field = || format!("{}.ports[{j}]", at());
                if port.port == 0 {
                    return Err(InventoryError::ServicePortOutOfRange {
                        field: format!("{}.port", field()),
                        service,
                        port: 0,
                    });
                }
                if let Some(first) = ports.insert((port.port, port.protocol), j) {
                    return Err(InventoryError::DuplicateServicePort {
                        field: format!("{}.port", field()),
                        service,
                        port: port.port,
                        protocol: port.protocol,
                        first: format!("{}.ports[{first}]", at()),
                    });
                }
                for (k, backend) in port.backends.iter().enumerate() {
                    let backend_field = || format!("{}.backends[{k}]", field());
                    check_address(backend.ip, || format!("{}.ip", backend_field()))?;
                    if backend.port == 0 {
                        return Err(InventoryError::ServicePortOutOfRange {
                            field: format!("{}.port", backend_field()),
                            service,
                            port: 0,
                        });
                    }
                }
            }
        }
        Ok(strictly_sorted)
    }
}

impl Inventory {
    /// [`Inventory::check`] for a view in which only `workloads[i]` is new,
    /// everything else having passed together already: each rule is about
    /// one item or a pair of them, so what can break one involves this
    /// workload. It is checked alone, and against the node's addresses,
    /// every other workload and every service for what they must not share
    /// (addresses, cgroups, names). A scan, not a map: one workload against
    /// thousands costs a few microseconds, a map of them milliseconds.
    pub(crate) fn check_in_place(&self, i: usize) -> Result<(), InventoryError> {
        let w = &self.workloads[i];
        w.check_alone(&|| format!("workloads[{i}]"))?;
        let duplicate = |a: Claimant, b: Claimant, address: IpAddr| {
            // Reported as the full check reports it, the later claimant
            // first (of several clashes, the two checks may meet another
            // one first).
            let (first, field) = if a.precedes(&b) { (a, b) } else { (b, a) };
            InventoryError::DuplicateAddress {
                field: field.to_string(),
                address,
                first: first.to_string(),
            }
        };
        for (j, ip) in w.ips.iter().enumerate() {
            let here = Claimant::Workload(i, j);
            check_address(*ip, || here.to_string())?;
            if let Some(k) = self.node_ips.iter().position(|n| n == ip) {
                return Err(duplicate(Claimant::Node(k), here, *ip));
            }
            for (m, other) in self.workloads.iter().enumerate() {
                if m == i {
                    continue;
                }
                if let Some(n) = other.ips.iter().position(|o| o == ip) {
                    return Err(duplicate(Claimant::Workload(m, n), here, *ip));
                }
            }
            for (s, svc) in self.services.iter().enumerate() {
                if let Some(t) = svc.cluster_ips.iter().position(|c| c == ip) {
                    return Err(duplicate(Claimant::Service(s, t), here, *ip));
                }
            }
        }
        fn key(w: &Workload) -> (&str, &str) {
            (&w.namespace, &w.name)
        }
        for (m, other) in self.workloads.iter().enumerate() {
            if m == i {
                continue;
            }
            if key(other) == key(w) {
                return Err(InventoryError::DuplicateWorkload {
                    field: format!("workloads[{}]", m.max(i)),
                    workload: w.reference(),
                    first: format!("workloads[{}]", m.min(i)),
                });
            }
            if let (Some(cgroup), Some(theirs)) = (&w.cgroup, &other.cgroup) {
                if cgroup == theirs {
                    let (first, second) = if m < i { (other, w) } else { (w, other) };
                    return Err(InventoryError::DuplicateCgroup {
                        cgroup: cgroup.clone(),
                        first: first.reference(),
                        second: second.reference(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Who claimed an address, named as the inventory's field when reported.
#[derive(Clone, Copy)]
enum Claimant {
    Node(usize),
    Workload(usize, usize),
    Service(usize, usize),
}

impl Claimant {
    /// Whether the full check meets this claimant first: node addresses,
    /// then workloads, then services, each in order.
    fn precedes(&self, other: &Self) -> bool {
        let rank = |c: &Self| match *c {
            Self::Node(i) => (0, i, 0),
            Self::Workload(i, j) => (1, i, j),
            Self::Service(i, j) => (2, i, j),
        };
        rank(self) < rank(other)
    }
}

impl fmt::Display for Claimant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(i) => write!(f, "nodeIPs[{i}]"),
            Self::Workload(i, j) => write!(f, "workloads[{i}].ips[{j}]"),
            Self::Service(i, j) => write!(f, "services[{i}].clusterIPs[{j}]"),
        }
    }
}

fn check_name(
    value: &str,
    field: impl FnOnce() -> String,
    rule: fn(&str) -> Result<(), NameError>,
) -> Result<(), InventoryError> {
    rule(value).map_err(|source| InventoryError::InvalidName {
        field: field(),
        value: abbreviate(value),
        source,
    })
}

fn check_labels(labels: &Labels, field: impl Fn() -> String) -> Result<(), InventoryError> {
    for (key, value) in labels {
        names::label_key(key).map_err(|source| InventoryError::InvalidLabelKey {
            field: field(),
            key: abbreviate(key),
            source,
        })?;
        names::label_value(value).map_err(|source| InventoryError::InvalidLabelValue {
            field: field(),
            key: abbreviate(key),
            value: abbreviate(value),
            source,
        })?;
    }
    Ok(())
}

/// Why an address cannot identify a workload, node or service, if it
/// cannot: the kernel treats loopback as local, and stores IPv4 as
/// IPv4-mapped IPv6, so a mapped IPv6 address would alias an IPv4 one.
pub fn unusable_reason(address: IpAddr) -> Option<&'static str> {
    if address.is_loopback() {
        Some("a loopback address")
    } else if address.is_unspecified() {
        Some("the unspecified address")
    } else if address.is_multicast() {
        Some("a multicast address")
    } else if matches!(address, IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        Some("an IPv4-mapped IPv6 address (write the IPv4 form)")
    } else {
        None
    }
}

fn check_address(address: IpAddr, field: impl FnOnce() -> String) -> Result<(), InventoryError> {
    match unusable_reason(address) {
        Some(reason) => Err(InventoryError::UnusableAddress {
            field: field(),
            address,
            reason,
        }),
        None => Ok(()),
    }
}

fn family(address: &IpAddr) -> &'static str {
    if address.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// An inventory that is well-formed YAML but inconsistent. `field` is the
/// path of the offending entry, e.g. `workloads[2].ips[1]`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InventoryError {
    #[error("{field}: name must not be empty")]
    EmptyName { field: String },
    /// The value is abbreviated when long.
    #[error("{field}: {value:?} is not valid")]
    InvalidName {
        field: String,
        value: String,
        #[source]
        source: NameError,
    },
    #[error("{field}: label key {key:?} is invalid")]
    InvalidLabelKey {
        field: String,
        key: String,
        #[source]
        source: NameError,
    },
    #[error("{field}: label value {value:?} of key {key:?} is invalid")]
    InvalidLabelValue {
        field: String,
        key: String,
        value: String,
        #[source]
        source: NameError,
    },
    #[error("{field}: namespace {namespace:?} is listed twice (first at {first})")]
    DuplicateNamespace {
        field: String,
        namespace: String,
        first: String,
    },
    #[error("{field}: workload {workload} is listed twice (first at {first})")]
    DuplicateWorkload {
        field: String,
        workload: WorkloadRef,
        first: String,
    },
    #[error("{field}: workload {workload} has a second {} address {second} (already has {first}); at most one per family", family(second))]
    SecondAddressOfFamily {
        field: String,
        workload: WorkloadRef,
        first: IpAddr,
        second: IpAddr,
    },
    #[error("{field}: address {address} is already used at {first}")]
    DuplicateAddress {
        field: String,
        address: IpAddr,
        first: String,
    },
    #[error("{field}: {address} is {reason}")]
    UnusableAddress {
        field: String,
        address: IpAddr,
        reason: &'static str,
    },
    #[error("{field}: workload {workload}: port {port} is out of range 1-65535")]
    PortOutOfRange {
        field: String,
        workload: WorkloadRef,
        port: u16,
    },
    #[error("{field}: workload {workload}: {name:?} is not a valid port name (1-15 characters a-z, 0-9, '-', with a letter)")]
    InvalidPortName {
        field: String,
        workload: WorkloadRef,
        name: String,
    },
    #[error("{field}: workload {workload}: port name {name:?} is used twice (first at {first})")]
    DuplicatePortName {
        field: String,
        workload: WorkloadRef,
        name: String,
        first: String,
    },
    #[error("{field}: service {service} is listed twice (first at {first})")]
    DuplicateService {
        field: String,
        service: String,
        first: String,
    },
    #[error("{field}: service {service} has a second {} cluster IP {second} (already has {first}); at most one per family", family(second))]
    SecondServiceAddressOfFamily {
        field: String,
        service: String,
        first: IpAddr,
        second: IpAddr,
    },
    #[error("{field}: service {service}: port {port} is out of range 1-65535")]
    ServicePortOutOfRange {
        field: String,
        service: String,
        port: u16,
    },
    #[error(
        "{field}: service {service}: port {port}/{protocol} is listed twice (first at {first})"
    )]
    DuplicateServicePort {
        field: String,
        service: String,
        port: u16,
        protocol: Protocol,
        first: String,
    },
    #[error("workloads {first} and {second} share cgroup {}", cgroup.display())]
    DuplicateCgroup {
        cgroup: PathBuf,
        first: WorkloadRef,
        second: WorkloadRef,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_services(yaml: &str) -> Result<(), InventoryError> {
        let base = "nodeIPs: [10.0.0.1]\nworkloads: [{name: b, namespace: y, ips: [10.0.1.2]}]\n";
        let inv: Inventory = serde_saphyr::from_str(&format!("{base}{yaml}")).unwrap();
        inv.check()
    }

    /// A workload listed twice is refused whether the list is in name
    /// order (the twice-listed name side by side) or not.
    #[test]
    fn a_workload_listed_twice_is_refused_in_any_order() {
        let check = |names: &[&str]| {
            let workloads: Vec<String> = names
                .iter()
                .enumerate()
                .map(|(i, n)| format!("{{name: {n}, namespace: y, ips: [10.0.1.{}]}}", i + 2))
                .collect();
            let yaml = format!("workloads: [{}]", workloads.join(", "));
            let inv: Inventory = serde_saphyr::from_str(&yaml).unwrap();
            inv.check().map_err(|e| e.to_string())
        };
        assert_eq!(check(&["a", "b", "c"]), Ok(()));
        assert_eq!(check(&["c", "a", "b"]), Ok(()));
        let twice = "workloads[1]: workload y/a is listed twice (first at workloads[0])";
        assert_eq!(check(&["a", "a", "b"]).unwrap_err(), twice);
        assert_eq!(
            check(&["a", "b", "a"]).unwrap_err(),
            "workloads[2]: workload y/a is listed twice (first at workloads[0])"
        );
    }

    #[test]
    fn services_are_checked_field_by_field() {
        let ok = "services: [{name: web, namespace: y, clusterIPs: [10.96.0.10, 'fd00::a'], \
                  ports: [{port: 80, backends: [{ip: 10.0.1.2, port: 8080}]}, {port: 80, protocol: UDP}]}]";
        assert_eq!(with_services(ok), Ok(()));
        let cases = [
            (
                "services: [{name: web, clusterIPs: [10.0.1.2], ports: []}]",
                "services[0].clusterIPs[0]: address 10.0.1.2 is already used at workloads[0].ips[0]",
            ),
            (
                "services: [{name: web, clusterIPs: [10.0.0.1], ports: []}]",
                "services[0].clusterIPs[0]: address 10.0.0.1 is already used at nodeIPs[0]",
            ),
            (
                "services: [{name: web, clusterIPs: [127.0.0.5], ports: []}]",
                "services[0].clusterIPs[0]: 127.0.0.5 is a loopback address",
            ),
            (
                "services: [{name: web, clusterIPs: [10.96.0.1, 10.96.0.2], ports: []}]",
                "services[0].clusterIPs[1]: service default/web has a second IPv4 cluster IP",
            ),
            (
                "services: [{name: web, clusterIPs: [10.96.0.1], ports: [{port: 80}, {port: 81}, {port: 81, protocol: TCP}]}]",
                "services[0].ports[2].port: service default/web: port 81/TCP is listed twice (first at services[0].ports[1])",
            ),
            (
                "services: [{name: web, clusterIPs: [10.96.0.1], ports: []}, {name: web, clusterIPs: [], ports: []}]",
                "services[1]: service default/web is listed twice (first at services[0])",
            ),
            (
                "services: [{name: '', clusterIPs: [], ports: []}]",
                "services[0].name: name must not be empty",
            ),
            (
                "services: [{name: web, clusterIPs: [10.96.0.1], ports: [{port: 80, backends: [{ip: 0.0.0.0, port: 80}]}]}]",
                "services[0].ports[0].backends[0].ip: 0.0.0.0 is the unspecified address",
            ),
        ];
        for (yaml, want) in cases {
            let got = with_services(yaml).unwrap_err().to_string();
            assert!(got.starts_with(want), "{yaml}\n got: {got}\nwant: {want}");
        }
        let e = serde_saphyr::from_str::<Inventory>(
            "services: [{name: web, clusterIPs: [10.96.0.1], ports: [{port: 0}]}]",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("services[0].ports[0].port") || e.contains("out of range"),
            "{e}"
        );
    }

    #[test]
    fn namespaces_carry_their_name_label() {
        let inv = Inventory {
            namespaces: vec![Namespace {
                name: "x".into(),
                labels: [("team".to_string(), "a".to_string())].into(),
            }],
            ..Default::default()
        };
        let x = inv.namespace_labels("x");
        assert_eq!(x.get("team").map(String::as_str), Some("a"));
        assert_eq!(x.get(NAMESPACE_NAME_LABEL).map(String::as_str), Some("x"));
        let y = inv.namespace_labels("unlisted");
        assert_eq!(y.len(), 1);
        assert_eq!(
            y.get(NAMESPACE_NAME_LABEL).map(String::as_str),
            Some("unlisted")
        );
    }
}
