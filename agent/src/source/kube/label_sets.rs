//! One copy of each label set the pods carry. A Deployment's replicas
//! carry the same labels (`app`, `pod-template-hash`), so the watched pods
//! and their workloads share one map instead of each holding a copy (two
//! per pod, about 700 bytes each).

use std::sync::Arc;

use crate::{intern::Table, policy::model::Labels};

/// The table the pod watcher shares labels through. Process-wide because
/// the watcher's prune step, which takes each pod's labels as it arrives,
/// has no state of its own to keep it in.
static POD_LABELS: Table<Labels> = Table::new();

/// The shared copy of a pod's `labels`.
pub fn shared(labels: &Labels) -> Arc<Labels> {
    POD_LABELS.share(labels)
}
