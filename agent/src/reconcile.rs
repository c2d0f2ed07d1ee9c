//! Desired state → compiled map contents → kernel. One pass per change.
//!
//! A change that does not fit the kernel maps is held back alone (see
//! [`isolate`]): every other change still applies.

mod isolate;
mod kept;
mod services;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use foldhash::HashMap;
use portcullis_common::{
    ipv4_mapped, EndpointValue, PolicySlot, PolicyValue, DIRECTION_INGRESS, ENDPOINT_FLAG_HAS_IPV4,
    ENDPOINT_FLAG_HAS_IPV6, ENDPOINT_FLAG_INGRESS_RESTRICTED, ENDPOINT_FLAG_PENDING,
    ENDPOINT_FLAG_UNENFORCED, ENDPOINT_ID_NONE, MAX_CGROUP_DEPTH, VERDICT_DENY,
};

use crate::{
    bpf::{
        writer::{generation_capacity, MapUsage},
        DesiredState, WriteError,
    },
    cgroup, mesh,
    policy::{
        compile::{Attribution, Block, CompileError, Compiled, Compiler, RuleTable},
        describe,
        model::{CheckedInventory, Workload, WorkloadRef},
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

/// Anything that can take a complete desired state (kept, not copied: at
/// tens of thousands of entries a copy costs milliseconds of every pass).
pub trait MapSink {
    fn apply(&mut self, desired: DesiredState) -> Result<MapUsage, WriteError>;
    /// Whether the enforced state is known to be exactly `desired`.
    fn holds(&self, _desired: &DesiredState) -> bool {
        false
    }
}

impl MapSink for crate::bpf::writer::MapWriter {
    fn apply(&mut self, desired: DesiredState) -> Result<MapUsage, WriteError> {
        crate::bpf::writer::MapWriter::apply(self, desired)
    }

    fn holds(&self, desired: &DesiredState) -> bool {
        crate::bpf::writer::MapWriter::holds(self, desired)
    }
}

/// Cgroups a pass did not find: what to report, and where they were
/// looked for.
struct MissingCgroups {
    problems: Vec<String>,
    paths: Vec<PathBuf>,
}

/// Result of one successful pass.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub usage: MapUsage,
    pub endpoints: usize,
    /// Local workloads whose cgroup was not found: not enforced until it is.
    pub missing_cgroups: Vec<String>,
    /// Where those cgroups were looked for (guards' too), so a retry can
    /// wait for one to appear instead of passing again blindly.
    pub missing_cgroup_paths: Vec<PathBuf>,
    /// Whether the pass wrote and flipped a generation; `false` when the
    /// kernel already held exactly what it worked out.
    pub wrote: bool,
    /// When the flip was done (the end of apply latency: what follows, the
    /// names for people and metrics, is after the kernel holds the change).
    pub flipped_at: Option<std::time::SystemTime>,
    /// What the kernel's ids mean, for `portcullis explain` and flow output.
    /// The same `Arc` as the last pass's while the compile is the same, so
    /// what follows a pass (metrics labels, the names file) is redone only
    /// when the meanings changed.
    pub names: Arc<PublishedNames>,
    /// Objects held back because they did not fit (their previous version,
    /// if any, applied instead), with the problem to report.
    pub rejected: BTreeMap<PolicyRef, String>,
    /// The cgroup directories of the enforced endpoints, for what is
    /// attached per pod rather than per node (the frame program).
    pub endpoint_cgroups: Vec<PathBuf>,
    /// The policies now enforced (held-back objects at their previous
    /// version, or absent), for rules judged outside the kernel.
    pub enforced: Arc<Vec<PolicyObject>>,
    /// Where the pass spent its time (logged with each pass).
    pub timings: PassTimings,
}

/// How long each stage of a pass took, for the log line operators read
/// when a change is slow to reach the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassTimings {
    /// Working out the entries (replayed ones included).
    pub compile: std::time::Duration,
    /// Map contents from the compile: cgroup ids, guards, services.
    pub desired: std::time::Duration,
    /// Writing the inactive generation and flipping to it.
    pub write: std::time::Duration,
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
    /// The workload identities' trust domain, when identity (and so the
    /// mesh) is on: `flows` names the peers of mTLS connections with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
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
            namespace: p.namespace.to_string(),
            name: p.name.to_string(),
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
    held_back: Option<HeldBack>,
    /// The compile `last` replaced, dropped after the write: freeing a
    /// whole compile (and the view it came from) costs milliseconds that
    /// need not delay the flip.
    retired: Option<LastCompile>,
    /// Entries one generation of each map holds.
    capacity: MapUsage,
    /// What the last desired state was worked out from, for the next.
    kept: Kept,
    /// The names last published, and the compile they were worked out
    /// from: at 10,000 rules spelling every cookie out again was
    /// milliseconds of each pass, and a compile that keeps every cookie
    /// and endpoint (most passes) has the same names.
    names: Option<NamesOf>,
    /// Published with the names (see [`PublishedNames::trust_domain`]).
    trust_domain: Option<String>,
    last_pass: Option<LastPass>,
}

/// See [`kept`].
#[derive(Default)]
struct Kept {
    paths: kept::EndpointPaths,
    endpoints: kept::KeptEndpoints,
    identities: kept::KeptIdentities,
    restricted: KeptRestricted,
}

/// [`ingress_restricted`] of the rules it was worked out from: a pass that
/// kept the compile's rules (a pod's address, a Service) reuses it, and a
/// pass that changed some endpoints' entries looks again only at theirs,
/// rather than walk every entry (26,000 at 5,000 pods).
#[derive(Default)]
struct KeptRestricted {
    from: Option<Arc<RuleTable>>,
    restricted: Arc<BTreeSet<u32>>,
    /// Each endpoint's answer, with the very block it came from.
    blocks: BTreeMap<u32, (Arc<Block>, bool)>,
}

impl KeptRestricted {
    fn of(&mut self, rules: &Arc<RuleTable>) -> Arc<BTreeSet<u32>> {
        if self.from.as_ref().is_some_and(|r| Arc::ptr_eq(r, rules)) {
            return Arc::clone(&self.restricted);
        }
        let mut restricted = BTreeSet::new();
        let mut blocks = BTreeMap::new();
        for (id, block) in rules.blocks() {
            let answer = match self.blocks.get(id) {
                Some((seen, answer)) if Arc::ptr_eq(seen, block) => *answer,
                _ => restricts_ingress(block.iter()),
            };
            if answer {
                restricted.insert(*id);
            }
            blocks.insert(*id, (Arc::clone(block), answer));
        }
        self.blocks = blocks;
        self.restricted = Arc::new(restricted);
        self.from = Some(Arc::clone(rules));
        Arc::clone(&self.restricted)
    }
}

/// Published names, with what they were worked out from.
struct NamesOf {
    /// Carries the trust domain it was given.
    names: Arc<PublishedNames>,
    cookies: Arc<BTreeMap<u32, Attribution>>,
    endpoints: Vec<(u32, WorkloadRef)>,
}

impl NamesOf {
    fn hold_for(&self, compiled: &Compiled, trust_domain: &Option<String>) -> bool {
        self.names.trust_domain == *trust_domain
            && Arc::ptr_eq(&self.cookies, &compiled.cookies)
            && self.endpoints.len() == compiled.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&compiled.endpoints)
                .all(|((id, workload), e)| *id == e.id && *workload == e.workload)
    }
}

struct LastCompile {
    inventory: CheckedInventory,
    policies: Arc<Vec<PolicyObject>>,
    compiled: Compiled,
}

/// The input of the last pass that ended with the kernel holding its
/// outcome and every cgroup found, with that outcome. The same input again
/// (a deletion mark before the removal, a pod's new conditions) has the
/// same outcome, which the kernel holds already: nothing is worked out
/// again. At 5,000 pods working out the map contents alone was 2–4 ms.
struct LastPass {
    inventory: CheckedInventory,
    policies: Arc<Vec<PolicyObject>>,
    previous: Arc<BTreeMap<PolicyRef, PolicyObject>>,
    /// The listing the cgroup ids came from: another listing may differ.
    cgroup_ids: Arc<std::collections::HashMap<PathBuf, u64>>,
    guards: crate::source::Guards,
    applied: Applied,
}

impl LastPass {
    /// The very inventory (not merely an equal one, which would take a
    /// deep comparison) and cgroup listing, and equal policies and guards.
    fn repeated_by(&self, snapshot: &Snapshot) -> bool {
        CheckedInventory::same(&self.inventory, &snapshot.inventory)
            && Arc::ptr_eq(&self.cgroup_ids, &snapshot.cgroup_ids)
            && self.guards == snapshot.guards
            && self.policies == snapshot.policies
            && self.previous == snapshot.previous
    }
}

/// The changes the latest pass held back, and what it was asked to apply:
/// a pass repeated on the same input starts from its outcome instead of
/// searching again.
struct HeldBack {
    inventory: CheckedInventory,
    input: Arc<Vec<PolicyObject>>,
    previous: Arc<BTreeMap<PolicyRef, PolicyObject>>,
    policies: Arc<Vec<PolicyObject>>,
    rejected: BTreeMap<PolicyRef, String>,
}

impl Reconciler {
    pub fn new(cgroup_mount: PathBuf) -> Self {
        Self {
            compiler: Compiler::new(),
            cgroup_mount,
            last: None,
            held_back: None,
            retired: None,
            capacity: generation_capacity(),
            kept: Kept::default(),
            names: None,
            trust_domain: None,
            last_pass: None,
        }
    }

    /// The trust domain the published names give (identity is on).
    pub fn with_trust_domain(mut self, trust_domain: Option<String>) -> Self {
        self.trust_domain = trust_domain;
        self
    }

    /// Holds changes back as if each map's generation held only
    /// `capacity` entries (tests; the kernel's real limits still apply).
    pub fn with_capacity(mut self, capacity: MapUsage) -> Self {
        self.capacity = capacity;
        self
    }

    /// Compiles, unless it is what was compiled last time.
    fn compile(
        &mut self,
        inventory: &CheckedInventory,
        policies: &Arc<Vec<PolicyObject>>,
    ) -> Result<(), ReconcileError> {
        // `Arc`'s equality takes the very same list as equal at once.
        let unchanged = self.last.as_ref().is_some_and(|l| {
            (CheckedInventory::same(&l.inventory, inventory) || l.inventory == *inventory)
                && l.policies == *policies
        });
        if !unchanged {
            let compiled = self
                .compiler
                .compile_checked(inventory, policies)
                .map_err(|source| ReconcileError::Compile { source })?;
            let replaced = self.last.replace(LastCompile {
                inventory: inventory.clone(),
                policies: Arc::clone(policies),
                compiled,
            });
            // A search for culprits compiles more than once a pass: only
            // the first replaced compile waits, later ones go at once.
            if self.retired.is_none() {
                self.retired = replaced;
            }
        }
        Ok(())
    }

    /// Makes the snapshot enforced, except changes that do not fit: each is
    /// held back alone (its previous version applies if it has one) and
    /// reported in [`Applied::rejected`]. Fails, changing nothing, only when
    /// even without them the maps would overflow, or compiling fails (a
    /// fault of the whole view: the inventory, or ids running out).
    pub fn reconcile(
        &mut self,
        snapshot: &Snapshot,
        sink: &mut impl MapSink,
    ) -> Result<Applied, ReconcileError> {
        if let Some(last) = self.last_pass.as_ref().filter(|l| l.repeated_by(snapshot)) {
            return Ok(Applied {
                wrote: false,
                flipped_at: None,
                timings: PassTimings::default(),
                ..last.applied.clone()
            });
        }
        // Recorded again below only if this pass ends as cleanly.
        self.last_pass = None;
        let same_input = |h: &&HeldBack| {
            h.inventory == snapshot.inventory
                && h.input == snapshot.policies
                && h.previous == snapshot.previous
        };
        let (mut policies, mut rejected) = match self.held_back.as_ref().filter(same_input) {
            Some(h) => (h.policies.clone(), h.rejected.clone()),
            None => (snapshot.policies.clone(), BTreeMap::new()),
        };
        let mut culprits = isolate::Culprits::default();
        let mut timings = PassTimings::default();
        let (desired, missing, endpoint_cgroups) = loop {
            let started = Instant::now();
            self.compile(&snapshot.inventory, &policies)?;
            let compiled = &self.last.as_ref().expect("compiled above").compiled;
            let compiled_at = Instant::now();
            timings.compile += compiled_at - started;
            let (desired, missing, cgroups) =
                desired_state(&mut self.kept, &self.cgroup_mount, compiled, snapshot);
            timings.desired += compiled_at.elapsed();
            let Some(over) = isolate::overflow(desired.usage(), self.capacity) else {
                break (desired, missing, cgroups);
            };
            let picked = culprits.pick(&snapshot.inventory, &policies, &snapshot.previous, &over);
            let Some((culprit, alone)) = picked else {
                return Err(ReconcileError::Write {
                    source: WriteError::Capacity {
                        map: over.map,
                        needed: over.needed,
                        capacity: over.capacity,
                    },
                });
            };
            let at = policies
                .iter()
                .position(|p| p.reference == culprit)
                .expect("picked among the policies");
            let origin = policies[at].origin.clone();
            let consequence = match snapshot.previous.get(&culprit) {
                Some(before) => {
                    Arc::make_mut(&mut policies)[at] = before.clone();
                    "its previous version stays enforced"
                }
                None => {
                    Arc::make_mut(&mut policies).remove(at);
                    "it is NOT enforced: the pods it selects are not restricted by it \
                     until it fits"
                }
            };
            rejected.insert(
                culprit.clone(),
                format!(
                    "{origin}: {culprit} does not fit the kernel maps: with it, map {} would \
                     need {} entries but one generation holds at most {} (this object alone \
                     needs {alone}); {consequence}; every other change was applied",
                    over.map, over.needed, over.capacity
                ),
            );
        };
        self.held_back = (!rejected.is_empty()).then(|| HeldBack {
            inventory: snapshot.inventory.clone(),
            input: snapshot.policies.clone(),
            previous: snapshot.previous.clone(),
            policies: policies.clone(),
            rejected: rejected.clone(),
        });
        let compiled = &self.last.as_ref().expect("compiled above").compiled;
        let programmed = |id: &u64| {
            desired
                .endpoints
                .get(id)
                .is_some_and(|e| e.endpoint_id != ENDPOINT_ID_NONE)
        };
        let endpoints = desired
            .endpoints
            .values()
            .filter(|e| e.endpoint_id != ENDPOINT_ID_NONE)
            .count();
        let endpoint_cgroups: Vec<PathBuf> = endpoint_cgroups
            .into_iter()
            .filter(|(id, _)| programmed(id))
            .map(|(_, path)| path)
            .collect();
        // A pass that would write what the kernel already enforces (a pod
        // deletion's second event, a Service nothing here uses) neither
        // writes nor flips: it did not reach the kernel.
        let wrote = !sink.holds(&desired);
        let started = Instant::now();
        let written = match wrote {
            true => sink.apply(desired),
            false => Ok(desired.usage()),
        };
        timings.write = started.elapsed();
        let flipped_at = (wrote && written.is_ok()).then(std::time::SystemTime::now);
        self.retired = None;
        let usage = written.map_err(|source| ReconcileError::Write { source })?;
        let trust_domain = &self.trust_domain;
        if !self
            .names
            .as_ref()
            .is_some_and(|n| n.hold_for(compiled, trust_domain))
        {
            self.names = Some(NamesOf {
                names: Arc::new(published_names(compiled, self.trust_domain.clone())),
                cookies: Arc::clone(&compiled.cookies),
                endpoints: compiled
                    .endpoints
                    .iter()
                    .map(|e| (e.id, e.workload.clone()))
                    .collect(),
            });
        }
        let names = Arc::clone(&self.names.as_ref().expect("worked out above").names);
        let applied = Applied {
            usage,
            endpoints,
            missing_cgroups: missing.problems,
            missing_cgroup_paths: missing.paths,
            wrote,
            flipped_at,
            names,
            rejected,
            endpoint_cgroups,
            enforced: policies,
            timings,
        };
        // A missing cgroup (or one past the depth the kernel searches) is
        // looked for again by the next pass, even on the same input.
        if applied.missing_cgroups.is_empty() && applied.missing_cgroup_paths.is_empty() {
            self.last_pass = Some(LastPass {
                inventory: snapshot.inventory.clone(),
                policies: snapshot.policies.clone(),
                previous: snapshot.previous.clone(),
                cgroup_ids: Arc::clone(&snapshot.cgroup_ids),
                guards: snapshot.guards.clone(),
                applied: applied.clone(),
            });
        }
        Ok(applied)
    }
}

/// What a compile's endpoint ids and rule cookies mean.
fn published_names(compiled: &Compiled, trust_domain: Option<String>) -> PublishedNames {
    PublishedNames {
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
        trust_domain,
    }
}

/// Translates compiler output into map contents. An endpoint whose cgroup
/// does not exist (yet) has no process to enforce on; it is skipped and
/// reported. Also returns each endpoint's cgroup (id and directory).
fn desired_state(
    kept: &mut Kept,
    mount: &Path,
    c: &Compiled,
    snapshot: &Snapshot,
) -> (DesiredState, MissingCgroups, Vec<(u64, PathBuf)>) {
    let mut desired = DesiredState::default();
    let mut missing = Vec::new();
    let mut missing_paths = Vec::new();
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
            let path = cgroup::resolve(mount, path);
            match cgroup::cgroup_id(&path) {
                Ok(id) => {
                    let guard = EndpointValue {
                        endpoint_id: ENDPOINT_ID_NONE,
                        flags,
                        ..Default::default()
                    };
                    desired.endpoints.insert(id, guard);
                }
                Err(e) => {
                    missing.push(format!("{kind} {}: {e}", path.display()));
                    missing_paths.push(path);
                }
            }
        }
    }
    let restricted = kept.restricted.of(&c.rules);
    let inputs = kept::EndpointInputs {
        endpoints: &c.endpoints,
        listed: &snapshot.cgroup_ids,
        restricted: &restricted,
        local: snapshot
            .inventory
            .workloads
            .iter()
            .filter(|w| w.is_local())
            .collect(),
        namespace_modes: mesh::mode::NamespaceModes::of(&snapshot.inventory),
    };
    let entries = match kept.endpoints.of(&inputs) {
        Some(entries) => entries.clone(),
        None => {
            let mut all_listed = true;
            let entries = endpoint_entries(
                &mut kept.paths,
                mount,
                c,
                &inputs,
                &mut desired,
                &mut missing,
                &mut missing_paths,
                &mut all_listed,
            );
            if all_listed {
                kept.endpoints.keep(&inputs, entries.clone());
            } else {
                kept.endpoints.forget();
            }
            entries
        }
    };
    desired.endpoints.extend(entries.values);
    let cgroups = entries.cgroups;
    desired.identities = kept.identities.of(&c.identities);
    desired.policy = Arc::clone(&c.rules);
    (desired.services, desired.backends) = services::desired(&snapshot.inventory.services);
    let missing = MissingCgroups {
        problems: missing,
        paths: missing_paths,
    };
    (desired, missing, cgroups)
}

/// The endpoints' map entries, worked out afresh: each endpoint's cgroup
/// located, its flags from its policy and mesh mode. An endpoint whose
/// cgroup is missing or too deep is reported in `missing` (a guard is put
/// in `desired` for one too deep); `all_listed` is cleared when any cgroup
/// was not found in the listing (the file system was asked).
#[allow(clippy::too_many_arguments)]
fn endpoint_entries(
    paths: &mut kept::EndpointPaths,
    mount: &Path,
    c: &Compiled,
    inputs: &kept::EndpointInputs<'_>,
    desired: &mut DesiredState,
    missing: &mut Vec<String>,
    missing_paths: &mut Vec<PathBuf>,
    all_listed: &mut bool,
) -> kept::EndpointEntries {
    let mut entries = kept::EndpointEntries {
        values: Vec::with_capacity(c.endpoints.len()),
        cgroups: Vec::with_capacity(c.endpoints.len()),
    };
    let workloads: HashMap<(&str, &str), &Workload> = inputs
        .local
        .iter()
        .map(|w| ((&*w.namespace, &*w.name), &***w))
        .collect();
    paths.begin();
    for ep in &c.endpoints {
        let located = paths.locate(mount, ep.id, &ep.cgroup, inputs.listed);
        let (path, depth) = (located.resolved, located.depth);
        *all_listed &= located.from_listing;
        let id = match located.id {
            Ok(id) => id,
            Err(e) => {
                missing.push(format!("{}: {e}", ep.workload));
                missing_paths.push(path.to_path_buf());
                continue;
            }
        };
        if depth > MAX_CGROUP_DEPTH as usize {
            // The kernel's ancestry search would never reach this cgroup:
            // rather than leave the workload unenforced, guard the deepest
            // ancestor it does reach, so the workload's traffic is denied
            // until it is moved up, and say so.
            *all_listed = false;
            let visible = cgroup::deepest_visible(mount, path);
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
            flags: if inputs.restricted.contains(&ep.id) {
                ENDPOINT_FLAG_INGRESS_RESTRICTED
            } else {
                0
            },
            ..Default::default()
        };
        if let Some(w) = workloads.get(&(&*ep.workload.namespace, &*ep.workload.name)) {
            // A bad mode label is reported by the mesh (it is STRICT
            // meanwhile), not as a missing cgroup.
            let (mode, _) = inputs.namespace_modes.of_workload(w);
            value.flags |= mode.endpoint_flags();
        }
        if let Some(v4) = ep.ipv4 {
            value.ipv4_mapped = ipv4_mapped(v4.octets());
            value.flags |= ENDPOINT_FLAG_HAS_IPV4;
        }
        if let Some(v6) = ep.ipv6 {
            value.ipv6 = v6.octets();
            value.flags |= ENDPOINT_FLAG_HAS_IPV6;
        }
        entries.values.push((id, value));
        entries.cgroups.push((id, path.to_path_buf()));
    }
    entries
}

/// The endpoints some ingress entry of whose policy denies
/// (`ENDPOINT_FLAG_INGRESS_RESTRICTED`), so the kernel can refuse packet
/// sockets to their processes without a policy lookup. Taken from the
/// entries written with them, so the two never disagree. Worked out from
/// scratch here; passes keep it ([`KeptRestricted`]), and the tests check
/// the kept answer against this one.
#[cfg(test)]
fn ingress_restricted(rules: &RuleTable) -> BTreeSet<u32> {
    rules
        .blocks()
        .iter()
        .filter(|(_, block)| restricts_ingress(block.iter()))
        .map(|(id, _)| *id)
        .collect()
}

/// Whether some ingress entry among one endpoint's denies.
fn restricts_ingress<'a>(
    mut entries: impl Iterator<Item = (&'a PolicySlot, &'a PolicyValue)>,
) -> bool {
    entries.any(|(slot, v)| slot.direction == DIRECTION_INGRESS && v.verdict == VERDICT_DENY)
}

/// The 16-byte form the kernel uses for an address.
pub use crate::policy::compile::addr16;

#[cfg(test)]
mod tests;
