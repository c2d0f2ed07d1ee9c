//! An inventory that passed [`Inventory::check`], shared and immutable.
//!
//! The source checks the view it built once; the mesh, the identity demand
//! and the compile all act on that same checked value instead of checking
//! it again (at 5,000 pods a check costs milliseconds of every pass). It
//! cannot change without being checked again: there is no `&mut` access.

use std::{ops::Deref, sync::Arc};

use foldhash::HashSet;

use super::{Inventory, InventoryError, Workload};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedInventory(Arc<Inventory>);

impl CheckedInventory {
    /// Checks `inventory`; only a valid one becomes a `CheckedInventory`.
    pub fn new(inventory: Inventory) -> Result<Self, InventoryError> {
        inventory.check()?;
        Ok(Self(Arc::new(inventory)))
    }

    /// [`CheckedInventory::new`] for a view rebuilt from `previous`: a
    /// workload it shares with `previous` (the very same `Arc`, immutable,
    /// so unchanged since it was checked there) is not checked on its own
    /// again; what workloads must not share (names, addresses, cgroups) is
    /// checked across all of them as always.
    pub fn new_after(inventory: Inventory, previous: &Self) -> Result<Self, InventoryError> {
        // `previous` keeps these alive, so no other workload has their address.
        let checked: HashSet<*const Workload> =
            previous.workloads.iter().map(Arc::as_ptr).collect();
        inventory.check_reusing(|w| checked.contains(&Arc::as_ptr(w)))?;
        Ok(Self(Arc::new(inventory)))
    }

    /// The view itself, to change (copied only if it is shared).
    pub fn into_inner(self) -> Inventory {
        Arc::unwrap_or_clone(self.0)
    }

    /// A changed copy, checked again.
    pub fn edit(&self, change: impl FnOnce(&mut Inventory)) -> Result<Self, InventoryError> {
        let mut inventory = Inventory::clone(&self.0);
        change(&mut inventory);
        Self::new(inventory)
    }

    /// Whether both are the very same value (not merely equal): a cheap
    /// test for a pass repeated on the same view.
    pub fn same(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

/// The empty inventory, which is valid (no names, addresses or cgroups to
/// conflict).
impl Default for CheckedInventory {
    fn default() -> Self {
        Self(Arc::new(Inventory::default()))
    }
}

impl Deref for CheckedInventory {
    type Target = Inventory;

    fn deref(&self) -> &Inventory {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, cgroup: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "x".into(),
            labels: Default::default(),
            cgroup: Some(cgroup.into()),
            ips: Vec::new(),
            ports: Vec::new(),
            service_account: None,
        })
    }

    #[test]
    fn the_empty_inventory_is_valid() {
        assert!(Inventory::default().check().is_ok());
        assert_eq!(*CheckedInventory::default(), Inventory::default());
    }

    #[test]
    fn an_invalid_inventory_is_refused_and_an_invalid_edit_too() {
        let bad = Inventory {
            workloads: vec![workload("a", "/cg/1"), workload("b", "/cg/1")],
            ..Default::default()
        };
        assert!(matches!(
            CheckedInventory::new(bad),
            Err(InventoryError::DuplicateCgroup { .. })
        ));
        let good = CheckedInventory::new(Inventory {
            workloads: vec![workload("a", "/cg/1")],
            ..Default::default()
        })
        .expect("valid");
        let edited = good.edit(|i| i.workloads.push(workload("b", "/cg/1")));
        assert!(matches!(
            edited,
            Err(InventoryError::DuplicateCgroup { .. })
        ));
        let renamed = good
            .edit(|i| Arc::make_mut(&mut i.workloads[0]).name = "c".into())
            .expect("valid");
        assert_eq!(renamed.workloads[0].name, "c");
        assert_eq!(good.workloads[0].name, "a", "the original is untouched");
        assert!(CheckedInventory::same(&good, &good.clone()));
        assert!(!CheckedInventory::same(&good, &renamed));
    }

    /// Reusing the last view's checks skips only the shared workloads'
    /// own checks: a new workload with a bad label, or a shared one whose
    /// cgroup a new one takes, is still refused.
    #[test]
    fn a_view_built_after_another_is_checked_where_it_is_new() {
        let previous = CheckedInventory::new(Inventory {
            workloads: vec![workload("a", "/cg/1")],
            ..Default::default()
        })
        .expect("valid");
        let shared = Arc::clone(&previous.workloads[0]);
        let mut bad_label = Workload::clone(&shared);
        bad_label.name = "b".into();
        bad_label.cgroup = Some("/cg/2".into());
        bad_label
            .labels_mut()
            .insert("not a key!".into(), "v".into());
        let with = |w: Arc<Workload>| Inventory {
            workloads: vec![Arc::clone(&shared), w],
            ..Default::default()
        };
        assert!(matches!(
            CheckedInventory::new_after(with(Arc::new(bad_label)), &previous),
            Err(InventoryError::InvalidLabelKey { .. })
        ));
        assert!(matches!(
            CheckedInventory::new_after(with(workload("b", "/cg/1")), &previous),
            Err(InventoryError::DuplicateCgroup { .. })
        ));
        let fine =
            CheckedInventory::new_after(with(workload("b", "/cg/2")), &previous).expect("valid");
        assert_eq!(fine.workloads.len(), 2);
    }
}
