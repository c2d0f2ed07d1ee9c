//! Reports the validity of policy objects back to Kubernetes: an Event per
//! newly invalid object and an `Accepted` status condition on Portcullis'
//! own kinds. Only the agent holding the Lease writes, so nodes do not race.

use crate::policy::model::ObjectKind;

/// What the kube source concluded about one policy object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectReport {
    pub kind: ObjectKind,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `metadata.generation`, for the condition's `observedGeneration`.
    pub generation: Option<i64>,
    /// Why the object is not applied (its last valid version, if any, stays
    /// enforced); `None` when it is valid and applied.
    pub problem: Option<String>,
}
