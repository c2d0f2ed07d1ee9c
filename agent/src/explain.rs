//! `portcullis explain`: why would x/a → y/b:80/tcp pass or not? The
//! evaluator answers from the policies, per direction, naming the deciding
//! policy and rule; the answer is then checked against what the kernel maps
//! actually hold. A disagreement is reported loudly: it means the kernel
//! does not enforce what the policies say.

use std::{fmt::Write as _, net::IpAddr, path::PathBuf};

use portcullis_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, MAX_CGROUP_DEPTH, REASON_HOST, REASON_LOCAL,
    REASON_NOT_ISOLATED, VERDICT_DENY,
};
use serde::Serialize;

use crate::{
    bpf::{inspect::KernelView, LoadError},
    cgroup::{self, CgroupError},
    identity::spiffe::SpiffeId,
    lab::{report::ProbeSpec, Family},
    policy::{
        describe,
        evaluate::{evaluate, evaluate_authenticated, DirectionVerdict, FlowQuery},
        model::{Inventory, Protocol},
    },
    reconcile::{addr16, PublishedNames},
    source::file::{error_chain, FileSource, FileSourceError},
};

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("reading the policies and workloads")]
    Source {
        #[source]
        source: FileSourceError,
    },
    #[error("no workload {workload} in the workloads file (workloads are namespace/name)")]
    UnknownWorkload { workload: String },
    #[error("workload {workload} has no {family} address")]
    NoAddress {
        workload: String,
        family: &'static str,
    },
    #[error("reading the kernel maps")]
    Kernel {
        #[source]
        source: LoadError,
    },
    #[error("finding the cgroup of {workload}")]
    Cgroup {
        workload: String,
        #[source]
        source: CgroupError,
    },
    #[error("reading published names from {path}; is the agent running?")]
    Names {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a running agent keeps its inputs and state.
#[derive(Clone, Debug)]
pub struct AgentPaths {
    pub policies_dir: PathBuf,
    pub workloads: PathBuf,
    pub pin_dir: PathBuf,
    pub names_file: PathBuf,
}

/// One direction: what the policies say and what the kernel holds.
#[derive(Clone, Debug, Serialize)]
pub struct DirectionExplanation {
    pub workload: String,
    pub allowed: bool,
    pub decided_by: String,
    /// `None` when the workload is not enforced on this node.
    pub kernel: Option<KernelSide>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelSide {
    pub allowed: bool,
    pub decided_by: String,
    pub agrees: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub port: u16,
    pub protocol: &'static str,
    pub family: &'static str,
    pub allowed: bool,
    pub egress: DirectionExplanation,
    pub ingress: DirectionExplanation,
    /// When both workloads are meshed (TCP): what the destination's
    /// inbound proxy decides for the client's proven identity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsExplanation>,
    /// Problems reading the policy files (their last valid versions apply).
    pub problems: Vec<String>,
}

/// A meshed flow as the inbound proxy judges it: rules naming identities
/// apply, which the kernel never sees.
#[derive(Clone, Debug, Serialize)]
pub struct MtlsExplanation {
    /// The SPIFFE ID the client's certificate proves.
    pub client_identity: String,
    pub allowed: bool,
    /// The destination's ingress verdict for that identity.
    pub decided_by: String,
}

impl Explanation {
    /// Does the kernel hold what the policies say, in both directions?
    pub fn kernel_agrees(&self) -> bool {
        [&self.egress, &self.ingress]
            .iter()
            .all(|d| d.kernel.as_ref().is_none_or(|k| k.agrees))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} → {} {}/{} over {}: {}",
            self.from,
            self.to,
            self.port,
            self.protocol,
            self.family,
            if self.allowed { "ALLOWED" } else { "DENIED" }
        );
        for (name, d) in [("egress ", &self.egress), ("ingress", &self.ingress)] {
            let _ = writeln!(out, "  {name} of {:<12} {}", d.workload, d.decided_by);
            match &d.kernel {
                Some(k) if k.agrees => {
                    let _ = writeln!(out, "  {:<20} kernel agrees", "");
                }
                Some(k) => {
                    let _ = writeln!(
                        out,
                        "  {:<20} MISMATCH: the kernel has {} ({})",
                        "",
                        k.decided_by,
                        if k.allowed { "passes" } else { "drops" }
                    );
                }
                None => {}
            }
        }
        if let Some(m) = &self.mtls {
            let _ = writeln!(
                out,
                "  over mTLS as {}: {} (the inbound proxy: ingress {})",
                m.client_identity,
                if m.allowed { "ALLOWED" } else { "DENIED" },
                m.decided_by
            );
        }
        for p in &self.problems {
            let _ = writeln!(out, "  warning: {p}");
        }
        out
    }
}

fn find_address(
    inventory: &Inventory,
    key: &str,
    family: Family,
) -> Result<(IpAddr, Option<PathBuf>), ExplainError> {
    let w = inventory
        .workloads
        .iter()
        .find(|w| format!("{}/{}", w.namespace, w.name) == key)
        .ok_or_else(|| ExplainError::UnknownWorkload {
            workload: key.into(),
        })?;
    let ip = match family {
        Family::Ipv4 => w.ipv4().map(IpAddr::from),
        Family::Ipv6 => w.ipv6().map(IpAddr::from),
    };
    let ip = ip.ok_or_else(|| ExplainError::NoAddress {
        workload: key.into(),
        family: family.as_str(),
    })?;
    Ok((ip, w.cgroup.clone()))
}

fn kernel_description(reason: u8, cookie: u32, names: &PublishedNames) -> String {
    match reason {
        REASON_LOCAL => describe::verdict(&DirectionVerdict::Local),
        REASON_HOST => describe::verdict(&DirectionVerdict::Host),
        REASON_NOT_ISOLATED => describe::verdict(&DirectionVerdict::NotIsolated),
        _ => names
            .cookies
            .get(&cookie)
            .cloned()
            .unwrap_or_else(|| format!("rule cookie {cookie}, unknown to the agent's names")),
    }
}

/// Explains a flow between two workloads from a running agent's files and
/// pinned maps.
pub fn explain(
    paths: &AgentPaths,
    from: &str,
    to: &str,
    spec: ProbeSpec,
    family: Family,
) -> Result<Explanation, ExplainError> {
    let mut source = FileSource::new(paths.policies_dir.clone(), paths.workloads.clone());
    let snapshot = source
        .load()
        .map_err(|source| ExplainError::Source { source })?;
    let inventory = &snapshot.inventory;
    let (src, src_cgroup) = find_address(inventory, from, family)?;
    let (dst, dst_cgroup) = find_address(inventory, to, family)?;
    let protocol = match spec.protocol {
        crate::lab::pod::Protocol::Tcp => Protocol::Tcp,
        crate::lab::pod::Protocol::Udp => Protocol::Udp,
    };
    let decision = evaluate(
        inventory,
        &snapshot.policies,
        &FlowQuery {
            src,
            dst,
            port: spec.port,
            protocol,
        },
    );
    let names: PublishedNames = match std::fs::read(&paths.names_file) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_default(),
        Err(source) => {
            return Err(ExplainError::Names {
                path: paths.names_file.clone(),
                source,
            })
        }
    };
    let view =
        KernelView::open(&paths.pin_dir).map_err(|source| ExplainError::Kernel { source })?;
    let mount = cgroup::cgroup2_mount().map_err(|source| ExplainError::Cgroup {
        workload: from.into(),
        source,
    })?;

    let side = |workload: &str,
                cgroup_path: &Option<PathBuf>,
                verdict: &DirectionVerdict,
                direction: u8,
                peer: IpAddr|
     -> Result<DirectionExplanation, ExplainError> {
        let decided_by = describe::verdict(verdict);
        let kernel = match cgroup_path {
            None => None,
            Some(path) => {
                let id = cgroup::cgroup_id(&cgroup::resolve(&mount, path)).map_err(|source| {
                    ExplainError::Cgroup {
                        workload: workload.into(),
                        source,
                    }
                })?;
                let kernel_err = |source| ExplainError::Kernel { source };
                let resolved = cgroup::resolve(&mount, path);
                let depth = cgroup::depth(&mount, &resolved);
                if depth > MAX_CGROUP_DEPTH as usize {
                    // Whatever the maps hold for it, the kernel's ancestry
                    // search never reaches this cgroup.
                    return Ok(DirectionExplanation {
                        workload: workload.into(),
                        allowed: verdict.allows(),
                        decided_by,
                        kernel: Some(KernelSide {
                            allowed: false,
                            decided_by: format!(
                                "no endpoint: the cgroup is {depth} levels deep, past the \
                                 {MAX_CGROUP_DEPTH} the kernel searches (its traffic is denied \
                                 by a guard)"
                            ),
                            agrees: false,
                        }),
                    });
                }
                Some(match view.endpoint(id).map_err(kernel_err)? {
                    None => KernelSide {
                        allowed: true,
                        decided_by: "not an enforced endpoint in the kernel".into(),
                        agrees: false,
                    },
                    Some(ep) => {
                        let k = view
                            .decide(&ep, direction, protocol.number(), addr16(peer), spec.port)
                            .map_err(kernel_err)?;
                        let kernel_by = kernel_description(k.reason, k.rule_cookie, &names);
                        let allowed = k.verdict != VERDICT_DENY;
                        KernelSide {
                            agrees: allowed == verdict.allows() && kernel_by == decided_by,
                            allowed,
                            decided_by: kernel_by,
                        }
                    }
                })
            }
        };
        Ok(DirectionExplanation {
            workload: workload.into(),
            allowed: verdict.allows(),
            decided_by,
            kernel,
        })
    };
    let egress = side(from, &src_cgroup, &decision.egress, DIRECTION_EGRESS, dst)?;
    let ingress = side(to, &dst_cgroup, &decision.ingress, DIRECTION_INGRESS, src)?;
    let mtls = match (&names.trust_domain, protocol) {
        (Some(td), Protocol::Tcp) => mtls_explanation(
            inventory,
            &snapshot.policies,
            td,
            (from, to),
            &FlowQuery {
                src,
                dst,
                port: spec.port,
                protocol,
            },
        ),
        _ => None,
    };
    Ok(Explanation {
        from: from.into(),
        to: to.into(),
        port: spec.port,
        protocol: spec.protocol.as_str(),
        family: family.as_str(),
        allowed: decision.allowed,
        egress,
        ingress,
        mtls,
        problems: snapshot.problems,
    })
}

/// The inbound proxy's view, when both ends are meshed.
fn mtls_explanation(
    inventory: &Inventory,
    policies: &[crate::policy::model::PolicyObject],
    trust_domain: &str,
    (from, to): (&str, &str),
    query: &FlowQuery,
) -> Option<MtlsExplanation> {
    let workload = |key: &str| {
        inventory
            .workloads
            .iter()
            .find(|w| format!("{}/{}", w.namespace, w.name) == key)
    };
    let (client, server) = (workload(from)?, workload(to)?);
    let meshed = |w| crate::mesh::mode::of_workload(inventory, w).0.is_meshed();
    if !meshed(client) || !meshed(server) {
        return None;
    }
    let id = SpiffeId::new(trust_domain, &client.namespace, client.service_account()).ok()?;
    let decision = evaluate_authenticated(inventory, policies, query, Some(&id));
    Some(MtlsExplanation {
        client_identity: id.to_string(),
        allowed: decision.allowed,
        decided_by: describe::verdict(&decision.ingress),
    })
}

/// Paths of a lab started with `portcullis lab --keep --name NAME`.
pub fn lab_paths(name: &str) -> AgentPaths {
    let state = crate::lab::state_dir_for(name);
    AgentPaths {
        policies_dir: state.join("policies"),
        workloads: state.join("workloads.yaml"),
        pin_dir: crate::lab::pin_dir_for(name),
        names_file: state.join(crate::lab::NAMES_FILE),
    }
}

/// Renders an error chain for the CLI.
pub fn render_error(e: &ExplainError) -> String {
    error_chain(e)
}

/// A flow to a Service: the kernel translates the connection to one of the
/// backends at connect time, so each backend is explained as a destination.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceExplanation {
    pub from: String,
    /// `namespace/name` of the service.
    pub service: String,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub protocol: &'static str,
    /// One per backend that is a known workload, with the backend's port.
    pub backends: Vec<Explanation>,
    /// Backends that are no workload of the inventory (not explained).
    pub unknown_backends: Vec<String>,
}

impl ServiceExplanation {
    pub fn kernel_agrees(&self) -> bool {
        self.backends.iter().all(Explanation::kernel_agrees)
    }

    pub fn render(&self) -> String {
        let mut out = format!(
            "{} → service {} ({}:{}/{}): ",
            self.from, self.service, self.cluster_ip, self.port, self.protocol
        );
        if self.backends.is_empty() && self.unknown_backends.is_empty() {
            out.push_str("DENIED: no ready backend, connections are refused (no-backend)\n");
            return out;
        }
        let _ = writeln!(
            out,
            "translated at connect time to one of {} backend(s)",
            self.backends.len() + self.unknown_backends.len()
        );
        for b in &self.backends {
            for line in b.render().lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        for b in &self.unknown_backends {
            let _ = writeln!(out, "  {b}: not a known workload, not explained");
        }
        out
    }
}

/// What `portcullis explain` was asked about: a workload or a service.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Explained {
    Workload(Box<Explanation>),
    Service(ServiceExplanation),
}

impl Explained {
    pub fn kernel_agrees(&self) -> bool {
        match self {
            Self::Workload(e) => e.kernel_agrees(),
            Self::Service(s) => s.kernel_agrees(),
        }
    }

    pub fn render(&self) -> String {
        match self {
            Self::Workload(e) => e.render(),
            Self::Service(s) => s.render(),
        }
    }
}

/// Like [`explain`], but `to` may also be a service: its `namespace/name`
/// (when no workload has that name) or one of its cluster IPs.
pub fn explain_target(
    paths: &AgentPaths,
    from: &str,
    to: &str,
    spec: ProbeSpec,
    family: Family,
) -> Result<Explained, ExplainError> {
    let mut source = FileSource::new(paths.policies_dir.clone(), paths.workloads.clone());
    let snapshot = source
        .load()
        .map_err(|source| ExplainError::Source { source })?;
    let inventory = &snapshot.inventory;
    let is_workload = inventory
        .workloads
        .iter()
        .any(|w| format!("{}/{}", w.namespace, w.name) == to);
    let as_ip: Option<IpAddr> = to.parse().ok();
    let service = inventory.services.iter().find(|s| match as_ip {
        Some(ip) => s.cluster_ips.contains(&ip),
        None => !is_workload && format!("{}/{}", s.namespace, s.name) == to,
    });
    let Some(service) = service else {
        return explain(paths, from, to, spec, family).map(|e| Explained::Workload(Box::new(e)));
    };
    let cluster_ip = match as_ip {
        Some(ip) => ip,
        None => *service
            .cluster_ips
            .iter()
            .find(|ip| ip.is_ipv4() == (family == Family::Ipv4))
            .ok_or_else(|| ExplainError::NoAddress {
                workload: to.into(),
                family: family.as_str(),
            })?,
    };
    let protocol = match spec.protocol {
        crate::lab::pod::Protocol::Tcp => Protocol::Tcp,
        crate::lab::pod::Protocol::Udp => Protocol::Udp,
    };
    let backends = service
        .ports
        .iter()
        .find(|p| p.port == spec.port && p.protocol == protocol)
        .map(|p| p.backends.as_slice())
        .unwrap_or_default();
    let mut out = ServiceExplanation {
        from: from.into(),
        service: format!("{}/{}", service.namespace, service.name),
        cluster_ip,
        port: spec.port,
        protocol: spec.protocol.as_str(),
        backends: Vec::new(),
        unknown_backends: Vec::new(),
    };
    let backend_family = if cluster_ip.is_ipv4() {
        Family::Ipv4
    } else {
        Family::Ipv6
    };
    for b in backends
        .iter()
        .filter(|b| b.ip.is_ipv4() == cluster_ip.is_ipv4())
    {
        let workload = inventory
            .workloads
            .iter()
            .find(|w| w.ips.contains(&b.ip))
            .map(|w| format!("{}/{}", w.namespace, w.name));
        match workload {
            Some(w) => {
                let spec = ProbeSpec {
                    port: b.port,
                    ..spec
                };
                out.backends
                    .push(explain(paths, from, &w, spec, backend_family)?);
            }
            None => out.unknown_backends.push(format!("{}:{}", b.ip, b.port)),
        }
    }
    Ok(Explained::Service(out))
}
