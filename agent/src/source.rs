//! Where desired state comes from. Every source yields a [`Snapshot`] that
//! feeds the same reconcile path.

pub mod file;
pub mod inotify;
pub mod kube;
pub mod state;
pub mod wake;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::policy::{model::CheckedInventory, PolicyObject, PolicyRef};

/// Desired state read from a source, plus the problems found reading it.
/// Objects that failed to parse are represented by their last good version
/// (if any), so a broken edit never loosens what is enforced.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Checked by the source, and shared: the reconciler keeps the
    /// inventory it compiled last, to know a repeated pass by; at 5,000
    /// pods a copy cost milliseconds.
    pub inventory: CheckedInventory,
    /// cgroup ids the source read while finding the workloads' cgroups in
    /// this load (absolute paths), so the pass need not look them up again;
    /// any other cgroup is looked up when the pass needs it.
    pub cgroup_ids: Arc<HashMap<PathBuf, u64>>,
    /// Shared, as `previous` is: passes whose events named no policy
    /// object hand on the last ones, and the reconciler keeps what it
    /// compiled from; a thousand policies were copied several times a pass.
    pub policies: Arc<Vec<PolicyObject>>,
    /// The version of each object in `policies` that was last valid and
    /// applied, where one is known: what the reconciler keeps enforced when
    /// the new version cannot be (see [`crate::reconcile`]). An object equal
    /// to its entry here is not a change.
    pub previous: Arc<BTreeMap<PolicyRef, PolicyObject>>,
    pub problems: Vec<String>,
    /// Node-level guards beyond the workloads (Kubernetes mode).
    pub guards: Guards,
}

/// cgroups the data path treats specially, paths absolute or relative to
/// the cgroup2 mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guards {
    /// Deny-until-programmed: a socket below one of these cgroups whose own
    /// pod cgroup is not registered yet is denied (the kubelet's pod parent
    /// cgroups, so a new pod never runs unenforced).
    pub pending_roots: Vec<PathBuf>,
    /// Local pods policy does not apply to (host network): allowed, not
    /// judged, even below a pending root.
    pub unenforced: Vec<PathBuf>,
}

/// What a source looks like now; a pass runs when it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revision {
    /// The files' names, sizes and modification times.
    Files(file::Fingerprint),
    /// How many changes the API watchers have seen.
    Events(u64),
}

impl Default for Revision {
    fn default() -> Self {
        Self::Events(0)
    }
}

/// A source of desired state. It signals the sync loop's [`wake::Wakeup`]
/// whenever its revision may have changed; the loop then compares
/// revisions and runs a pass.
pub trait Source: Send + 'static {
    /// From now on, signal `wake` on every change (and on changes of
    /// [`Source::degraded`]).
    fn wake_on_change(&mut self, wake: Arc<wake::Wakeup>);
    /// The current revision, or `None` while the source has nothing
    /// complete to offer (no initial list yet): nothing is applied then, so
    /// a partial view never replaces what is enforced.
    fn revision(&self) -> Option<Revision>;
    /// When the changes between `previous` (the last applied revision) and
    /// `now` were made: where apply latency starts. The Kubernetes source
    /// gives the oldest change not yet applied; files, whose revision only
    /// tells the newest modification, give that.
    fn changed_at(&self, now: &Revision, previous: Option<&Revision>) -> Option<SystemTime>;
    /// Reads the complete desired state.
    fn load(&mut self) -> Result<Snapshot, Box<dyn std::error::Error + Send + Sync>>;
    /// What became of the latest [`Source::load`]: `Some(rejected)` when it
    /// reached the kernel except for the objects in `rejected` (with why),
    /// `None` when nothing reached the kernel. Durable sources record what
    /// is now enforced; returns problems to report (a failed write).
    fn settle(&mut self, outcome: Option<&BTreeMap<PolicyRef, String>>) -> Vec<String> {
        let _ = outcome;
        Vec::new()
    }
    /// Why the source may be out of date (API unreachable, initial list
    /// pending); what is enforced stays enforced meanwhile.
    fn degraded(&self) -> Option<String> {
        None
    }
    /// Whether this agent holds the Lease that makes it the one reporting
    /// invalid policy objects to the API.
    fn is_report_leader(&self) -> bool {
        false
    }
    /// How soon to retry a pass that met workloads whose cgroup does not
    /// exist yet.
    fn missing_cgroup_retry(&self) -> Duration {
        Duration::from_secs(2)
    }
    /// Whether a cgroup the last pass did not find (looked for at
    /// `awaited`) may exist now: checked at every retry, and only a yes
    /// costs a pass. A source that finds cgroups elsewhere than where it
    /// expected them says so too.
    fn cgroups_appeared(&self, awaited: &[PathBuf]) -> bool {
        awaited.iter().any(|path| path.exists())
    }
}
