//! Where desired state comes from. Every source yields a [`Snapshot`] that
//! feeds the same reconcile path.

pub mod file;
pub mod kube;

use crate::policy::{model::Inventory, PolicyObject};

/// Desired state read from a source, plus the problems found reading it.
/// Objects that failed to parse are represented by their last good version
/// (if any), so a broken edit never loosens what is enforced.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub inventory: Inventory,
    pub policies: Vec<PolicyObject>,
    pub problems: Vec<String>,
}
