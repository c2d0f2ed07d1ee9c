//! Desired state → compiled map contents → kernel. One pass per change.

mod services;

use std::{collections::BTreeMap, path::PathBuf};

use portcullis_common::{
    ipv4_mapped, EndpointValue, ENDPOINT_FLAG_HAS_IPV4, ENDPOINT_FLAG_HAS_IPV6,
    ENDPOINT_FLAG_PENDING, ENDPOINT_FLAG_UNENFORCED, ENDPOINT_ID_NONE, MAX_CGROUP_DEPTH,
};

use crate::{
    bpf::{writer::MapUsage, DesiredState, WriteError},
    cgroup,
    policy::{
        compile::{Attribution, CompileError, Compiled, Compiler},
        describe,
        model::Inventory,
        PolicyObject, PolicyRef,
    },
    source::Snapshot,
};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("compiling policies")]
    Compile {
        #[source]
        source: CompileError,
    },
    #[error("writing the kernel maps (what was enforced before stays enforced)")]
    Write {
        #[source]
        source: WriteError,
    },
}

/// Anything that can take a complete desired state.
pub trait MapSink {
    fn apply(&mut self, desired: &DesiredState) -> Result<MapUsage, WriteError>;
}

impl MapSink for crate::bpf::writer::MapWriter {
    fn apply(&mut self, desired: &DesiredState) -> Result<MapUsage, WriteError> {
        crate::bpf::writer::MapWriter::apply(self, desired)
    }
}

/// Result of one successful pass.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub usage: MapUsage,
    pub endpoints: usize,
    /// Local workloads whose cgroup was not found: not enforced until it is.
    pub missing_cgroups: Vec<String>,
    /// What the kernel's ids mean, for `portcullis explain` and flow output.
    pub names: PublishedNames,
}

/// Endpoint ids and rule cookies as people read them. Cookie numbers belong
/// to the running agent's compiler, so the agent publishes them.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PublishedNames {
    /// Endpoint id → `namespace/name`.
    pub endpoints: BTreeMap<u32, String>,
    /// Rule cookie → what decided.
    pub cookies: BTreeMap<u32, String>,
    /// Rule cookie → the policies it stands for, structured (metrics labels
    /// come from here): the deciding policy, or for a default deny every
    /// isolating policy, sorted. Cookies no policy made (0) are absent.
    #[serde(default)]
    pub cookie_policies: BTreeMap<u32, Vec<PolicyName>>,
}

/// A policy object as named in metrics and published names.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PolicyName {
    /// `NetworkPolicy`, `L4Policy` or `ClusterL4Policy`.
    pub kind: String,
    /// Empty for cluster-scoped policies.
    pub namespace: String,
    pub name: String,
}

impl From<&PolicyRef> for PolicyName {
    fn from(p: &PolicyRef) -> Self {
        Self {
            kind: p.kind.as_str().to_string(),
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        }
    }
}

/// The policies an attribution names, in its order.
pub fn attribution_policies(a: &Attribution) -> Vec<PolicyName> {
    match a {
        Attribution::DefaultDeny { isolated_by, .. } => {
            isolated_by.iter().map(PolicyName::from).collect()
        }
        Attribution::Rule { policy, .. }
        | Attribution::DenyRule { policy, .. }
        | Attribution::TierRule { policy, .. }
        | Attribution::AuditDenyRule { policy, .. }
        | Attribution::AuditDefaultDeny { policy, .. } => vec![PolicyName::from(policy)],
    }
}

pub struct Reconciler {
    compiler: Compiler,
    cgroup_mount: PathBuf,
    /// The latest compile and what it was made from: a pass repeated only
    /// to look for missing cgroups again reuses it instead of compiling.
    last: Option<LastCompile>,
}

struct LastCompile {
    inventory: Inventory,
    policies: Vec<PolicyObject>,
    compiled: Compiled,
}

impl Reconciler {
    pub fn new(cgroup_mount: PathBuf) -> Self {
        Self {
            compiler: Compiler::new(),
            cgroup_mount,
            last: None,
        }
    }

    /// Compiles the snapshot, unless it is what was compiled last time.
    fn compile(&mut self, snapshot: &Snapshot) -> Result<(), ReconcileError> {
        let unchanged = self
            .last
            .as_ref()
            .is_some_and(|l| l.inventory == snapshot.inventory && l.policies == snapshot.policies);
        if !unchanged {
            let compiled = self
                .compiler
                .compile(&snapshot.inventory, &snapshot.policies)
                .map_err(|source| ReconcileError::Compile { source })?;
            self.last = Some(LastCompile {
                inventory: snapshot.inventory.clone(),
                policies: snapshot.policies.clone(),
                compiled,
            });
        }
        Ok(())
    }

    pub fn reconcile(
        &mut self,
        snapshot: &Snapshot,
        sink: &mut impl MapSink,
    ) -> Result<Applied, ReconcileError> {
        self.compile(snapshot)?;
        let compiled = &self.last.as_ref().expect("compiled above").compiled;
        let (desired, missing_cgroups) = self.desired_state(compiled, snapshot);
        let usage = sink
            .apply(&desired)
            .map_err(|source| ReconcileError::Write { source })?;
        let names = PublishedNames {
            endpoints: compiled
                .endpoints
                .iter()
                .map(|e| (e.id, e.workload.to_string()))
                .collect(),
            cookies: compiled
                .cookies
                .iter()
                .map(|(c, a)| (*c, describe::attribution(a)))
                .collect(),
            cookie_policies: compiled
                .cookies
                .iter()
                .map(|(c, a)| (*c, attribution_policies(a)))
                .collect(),
        };
        Ok(Applied {
            usage,
            endpoints: desired
                .endpoints
                .values()
                .filter(|e| e.endpoint_id != ENDPOINT_ID_NONE)
                .count(),
            missing_cgroups,
            names,
        })
    }

    /// Translates compiler output into map contents. An endpoint whose cgroup
    /// does not exist (yet) has no process to enforce on; it is skipped and
    /// reported.
    fn desired_state(&self, c: &Compiled, snapshot: &Snapshot) -> (DesiredState, Vec<String>) {
        let mut desired = DesiredState::default();
        let mut missing = Vec::new();
        // Guards first: a pod registered as an endpoint overrides a guard on
        // the same cgroup.
        let guards = &snapshot.guards;
        for (paths, flags, kind) in [
            (
                &guards.pending_roots,
                ENDPOINT_FLAG_PENDING,
                "pending guard",
            ),
            (
                &guards.unenforced,
                ENDPOINT_FLAG_UNENFORCED,
                "unenforced pod",
            ),
        ] {
            for path in paths {
                match cgroup::cgroup_id(&cgroup::resolve(&self.cgroup_mount, path)) {
                    Ok(id) => {
                        let guard = EndpointValue {
                            endpoint_id: ENDPOINT_ID_NONE,
                            flags,
                            ..Default::default()
                        };
                        desired.endpoints.insert(id, guard);
                    }
                    Err(e) => missing.push(format!("{kind} {}: {e}", path.display())),
                }
            }
        }
        for ep in &c.endpoints {
            let path = cgroup::resolve(&self.cgroup_mount, &ep.cgroup);
            let id = match cgroup::cgroup_id(&path) {
                Ok(id) => id,
                Err(e) => {
                    missing.push(format!("{}: {e}", ep.workload));
                    continue;
                }
            };
            let depth = cgroup::depth(&self.cgroup_mount, &path);
            if depth > MAX_CGROUP_DEPTH as usize {
                // The kernel's ancestry search would never reach this
                // cgroup: rather than leave the workload unenforced, guard
                // the deepest ancestor it does reach, so the workload's
                // traffic is denied until it is moved up, and say so.
                let visible = cgroup::deepest_visible(&self.cgroup_mount, &path);
                missing.push(format!(
                    "{}: cgroup {} is {depth} levels deep, past the {MAX_CGROUP_DEPTH} the \
                     kernel searches: not enforced as an endpoint; its traffic is denied \
                     (guard on {})",
                    ep.workload,
                    path.display(),
                    visible.display()
                ));
                if let Ok(guard_id) = cgroup::cgroup_id(&visible) {
                    desired.endpoints.entry(guard_id).or_insert(EndpointValue {
                        endpoint_id: ENDPOINT_ID_NONE,
                        flags: ENDPOINT_FLAG_PENDING,
                        ..Default::default()
                    });
                }
                continue;
            }
            let mut value = EndpointValue {
                endpoint_id: ep.id,
                ..Default::default()
            };
            if let Some(v4) = ep.ipv4 {
                value.ipv4_mapped = ipv4_mapped(v4.octets());
                value.flags |= ENDPOINT_FLAG_HAS_IPV4;
            }
            if let Some(v6) = ep.ipv6 {
                value.ipv6 = v6.octets();
                value.flags |= ENDPOINT_FLAG_HAS_IPV6;
            }
            desired.endpoints.insert(id, value);
        }
        for (prefix, identity) in &c.identities {
            desired
                .identities
                .insert((prefix.len, prefix.addr), *identity);
        }
        desired.policy = c.rules.clone();
        (desired.services, desired.backends) = services::desired(&snapshot.inventory.services);
        (desired, missing)
    }
}

/// The 16-byte form the kernel uses for an address.
pub use crate::policy::compile::addr16;
