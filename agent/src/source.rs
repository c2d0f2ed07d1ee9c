//! Where desired state comes from. Every source yields a [`Snapshot`] that
//! feeds the same reconcile path.

pub mod file;
pub mod kube;

use std::path::PathBuf;

use crate::policy::{model::Inventory, PolicyObject};

/// Desired state read from a source, plus the problems found reading it.
/// Objects that failed to parse are represented by their last good version
/// (if any), so a broken edit never loosens what is enforced.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub inventory: Inventory,
    pub policies: Vec<PolicyObject>,
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
