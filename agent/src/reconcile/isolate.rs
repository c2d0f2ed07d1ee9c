//! Per-object fault isolation: when the desired state does not fit a kernel
//! map, find the one object to hold back instead of freezing every update.
//!
//! Only a *change* can be the culprit: an object that is new, or differs
//! from the version last applied ([`crate::source::Snapshot::previous`]).
//! What was applied before fitted, so holding changes back converges on a
//! state that fits or on the previous state itself. Among the changes, the
//! one whose own entries in the overflowing map are the most goes first:
//! the map is measured by compiling that object alone, a cost paid only
//! when a map overflows.
//!
//! A held-back object keeps its previous version enforced when it has one
//! (the same rule as an invalid edit), so its pods are never less
//! restricted than they were; a new object has none and is left out, loudly
//! (a problem naming it, and in Kubernetes mode `Accepted=False` and an
//! Event), since nothing that fits can stand in for what its author meant.

use std::collections::BTreeMap;

use portcullis_common::{IDENTITIES_MAP, POLICY_MAP};

use crate::{
    bpf::writer::MapUsage,
    policy::{compile::Compiler, model::Inventory, PolicyObject, PolicyRef},
};

/// A map whose entries exceed one generation's capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    pub map: &'static str,
    pub needed: usize,
    pub capacity: usize,
}

/// The first map `used` does not fit in, in the order the writer checks.
pub fn overflow(used: MapUsage, capacity: MapUsage) -> Option<Overflow> {
    use portcullis_common::{BACKENDS_MAP, ENDPOINTS_MAP, SERVICES_MAP};
    [
        (ENDPOINTS_MAP, used.endpoints, capacity.endpoints),
        (IDENTITIES_MAP, used.identities, capacity.identities),
        (POLICY_MAP, used.policy, capacity.policy),
        (SERVICES_MAP, used.services, capacity.services),
        (BACKENDS_MAP, used.backends, capacity.backends),
    ]
    .into_iter()
    .find(|(_, needed, capacity)| needed > capacity)
    .map(|(map, needed, capacity)| Overflow {
        map,
        needed,
        capacity,
    })
}

/// What one object needs alone, per map policies fill (the endpoint,
/// service and backend maps follow the workloads, not the policies).
#[derive(Clone, Copy, Debug)]
struct Footprint {
    identities: usize,
    policy: usize,
}

/// Measures objects alone, each once per pass.
#[derive(Default)]
pub struct Culprits {
    footprints: BTreeMap<PolicyRef, Footprint>,
}

impl Culprits {
    /// The change to hold back for `overflow`, with its own entry count in
    /// that map; `None` when no change adds to that map (then the previous
    /// state itself does not fit, or the workloads overflow it).
    pub fn pick(
        &mut self,
        inventory: &Inventory,
        policies: &[PolicyObject],
        previous: &BTreeMap<PolicyRef, PolicyObject>,
        overflow: &Overflow,
    ) -> Option<(PolicyRef, usize)> {
        let measure = |f: &Footprint| match overflow.map {
            IDENTITIES_MAP => Some(f.identities),
            POLICY_MAP => Some(f.policy),
            _ => None,
        };
        let mut best: Option<(PolicyRef, usize)> = None;
        for p in policies {
            if previous.get(&p.reference) == Some(p) {
                continue;
            }
            let footprint = *self
                .footprints
                .entry(p.reference.clone())
                .or_insert_with(|| alone(inventory, p));
            let size = measure(&footprint)?;
            // Largest first; among equals the last in name order, so the
            // choice does not depend on input order.
            if best
                .as_ref()
                .is_none_or(|(r, s)| (size, &p.reference) > (*s, r))
            {
                best = Some((p.reference.clone(), size));
            }
        }
        best.filter(|(_, size)| *size > 0)
    }
}

fn alone(inventory: &Inventory, policy: &PolicyObject) -> Footprint {
    match Compiler::new().compile(inventory, std::slice::from_ref(policy)) {
        Ok(c) => Footprint {
            identities: c.identities.len(),
            policy: c.rules.len(),
        },
        // It cannot even be compiled alone: first to go.
        Err(_) => Footprint {
            identities: usize::MAX,
            policy: usize::MAX,
        },
    }
}
