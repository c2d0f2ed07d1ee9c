//! An inventory that passed [`Inventory::check`], shared and immutable.
//!
//! The source checks the view it built once; the mesh, the identity demand
//! and the compile all act on that same checked value instead of checking
//! it again (at 5,000 pods a check costs milliseconds of every pass). It
//! cannot change without being checked again: there is no `&mut` access.

use std::{ops::Deref, sync::Arc};

use foldhash::HashSet;

use super::{Inventory, InventoryError, Workload, WorkloadRef};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedInventory {
    inventory: Arc<Inventory>,
    /// The workloads are in strict (namespace, name) order, as sources
    /// list them: a patch can find its place by bisection.
    in_name_order: bool,
}

impl CheckedInventory {
    /// Checks `inventory`; only a valid one becomes a `CheckedInventory`.
    pub fn new(inventory: Inventory) -> Result<Self, InventoryError> {
        let in_name_order = inventory.check_reusing(|_| false)?;
        Ok(Self::checked(inventory, in_name_order))
    }

    fn checked(inventory: Inventory, in_name_order: bool) -> Self {
        Self {
            inventory: Arc::new(inventory),
            in_name_order,
        }
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
        let in_name_order = inventory.check_reusing(|w| checked.contains(&Arc::as_ptr(w)))?;
        Ok(Self::checked(inventory, in_name_order))
    }

    /// This view with some workloads replaced, added or removed: each of
    /// `changes` names a workload (namespace, name) and what it is now
    /// (`None`: gone), under that same name. The workloads stay in name
    /// order, and only the changed ones are checked, each against all the
    /// rest (see [`Inventory::check_in_place`]): everything else passed
    /// together here already. A view not in name order, or a change whose
    /// workload has another name than the one it names, is checked whole.
    /// Changes that leave every entry as it was give this very view, so a
    /// pass can tell it unchanged by address.
    pub fn patch(
        &self,
        changes: impl IntoIterator<Item = (WorkloadRef, Option<Arc<Workload>>)>,
    ) -> Result<Self, InventoryError> {
        fn key(w: &Workload) -> (&str, &str) {
            (&w.namespace, &w.name)
        }
        fn place(ws: &[Arc<Workload>], k: (&str, &str)) -> Result<usize, usize> {
            ws.binary_search_by(|w| key(w).cmp(&k))
        }
        let changes: Vec<_> = changes.into_iter().collect();
        let renamed = changes.iter().any(|(named, now)| {
            now.as_ref()
                .is_some_and(|w| key(w) != (&named.namespace, &named.name))
        });
        debug_assert!(!renamed, "a patch names each workload by its own name");
        let whole_check = renamed || !self.in_name_order;
        let unchanged = !whole_check
            && changes.iter().all(|(named, now)| {
                let before = place(&self.workloads, (&named.namespace, &named.name))
                    .ok()
                    .map(|at| &self.workloads[at]);
                match (before, now) {
                    (None, None) => true,
                    (Some(before), Some(now)) => Arc::ptr_eq(before, now),
                    _ => false,
                }
            });
        if unchanged {
            return Ok(self.clone());
        }
        let mut inventory = Inventory::clone(&self.inventory);
        if !self.in_name_order {
            inventory.workloads.sort_by(|a, b| key(a).cmp(&key(b)));
        }
        let mut changed: Vec<WorkloadRef> = Vec::new();
        for (named, now) in changes {
            let workloads = &mut inventory.workloads;
            if let Ok(at) = place(workloads, (&named.namespace, &named.name)) {
                workloads.remove(at);
            }
            let Some(now) = now else { continue };
            match place(workloads, key(&now)) {
                // Its name taken by another: the check below reports it.
                Ok(at) | Err(at) => workloads.insert(at, Arc::clone(&now)),
            }
            changed.push(now.reference());
        }
        if whole_check {
            return Self::new(inventory);
        }
        for named in &changed {
            // None if a later change took it out again.
            let k = (named.namespace.as_str(), named.name.as_str());
            if let Ok(at) = place(&inventory.workloads, k) {
                inventory.check_in_place(at)?;
            }
        }
        Ok(Self::checked(inventory, true))
    }

    /// The view itself, to change (copied only if it is shared).
    pub fn into_inner(self) -> Inventory {
        Arc::unwrap_or_clone(self.inventory)
    }

    /// A changed copy, checked again.
    pub fn edit(&self, change: impl FnOnce(&mut Inventory)) -> Result<Self, InventoryError> {
        let mut inventory = Inventory::clone(&self.inventory);
        change(&mut inventory);
        Self::new(inventory)
    }

    /// Whether both are the very same value (not merely equal): a cheap
    /// test for a pass repeated on the same view.
    pub fn same(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.inventory, &b.inventory)
    }
}

/// The empty inventory, which is valid (no names, addresses or cgroups to
/// conflict).
impl Default for CheckedInventory {
    fn default() -> Self {
        Self::checked(Inventory::default(), true)
    }
}

impl Deref for CheckedInventory {
    type Target = Inventory;

    fn deref(&self) -> &Inventory {
        &self.inventory
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

#[cfg(test)]
mod patch_tests {
    use std::{collections::BTreeMap, net::IpAddr};

    use proptest::prelude::*;

    use super::*;
    use crate::policy::model::Service;

    /// A workload over a few names, addresses and cgroups, now and then
    /// with a label key the check refuses.
    fn workload() -> impl Strategy<Value = Workload> {
        (
            0..6u8,
            prop::option::of(0..8u8),
            prop::option::of(0..5u8),
            prop::bool::weighted(0.05),
        )
            .prop_map(|(name, ip, cgroup, bad_label)| {
                let mut w = Workload {
                    name: format!("w{name}"),
                    namespace: "x".into(),
                    labels: Default::default(),
                    cgroup: cgroup.map(|c| format!("/cg/{c}").into()),
                    ips: ip
                        .map(|i| IpAddr::from([10, 0, 0, i]))
                        .into_iter()
                        .collect(),
                    ports: Vec::new(),
                    service_account: None,
                };
                if bad_label {
                    w.labels_mut().insert("not a key!".into(), "v".into());
                }
                w
            })
    }

    /// Node address 10.0.0.0 and a Service on 10.0.0.7, which workloads
    /// may also claim.
    fn base(workloads: Vec<Workload>) -> Inventory {
        let by_name: BTreeMap<String, Workload> =
            workloads.into_iter().map(|w| (w.name.clone(), w)).collect();
        Inventory {
            node_ips: vec![IpAddr::from([10, 0, 0, 0])],
            namespaces: Vec::new(),
            workloads: by_name.into_values().map(Arc::new).collect(),
            services: vec![Service {
                name: "s".into(),
                namespace: "x".into(),
                cluster_ips: vec![IpAddr::from([10, 0, 0, 7])],
                ports: Vec::new(),
            }],
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

        /// A patch is accepted exactly when the whole patched view passes
        /// the full check, and then it is that view.
        #[test]
        fn a_patch_is_checked_as_the_whole_view_would_be(
            before in prop::collection::vec(workload(), 0..6),
            changes in prop::collection::vec((0..6u8, prop::option::of(workload())), 1..4),
        ) {
            let Ok(previous) = CheckedInventory::new(base(before)) else {
                return Ok(());
            };
            let changes: Vec<(WorkloadRef, Option<Arc<Workload>>)> = changes
                .into_iter()
                .map(|(name, now)| {
                    let named = WorkloadRef { namespace: "x".into(), name: format!("w{name}") };
                    let now = now.map(|mut w| {
                        w.name = named.name.clone();
                        Arc::new(w)
                    });
                    (named, now)
                })
                .collect();
            let mut by_name: BTreeMap<String, Arc<Workload>> = previous
                .workloads
                .iter()
                .map(|w| (w.name.clone(), Arc::clone(w)))
                .collect();
            for (named, now) in &changes {
                match now {
                    Some(w) => by_name.insert(named.name.clone(), Arc::clone(w)),
                    None => by_name.remove(&named.name),
                };
            }
            let whole = Inventory {
                workloads: by_name.into_values().collect(),
                ..Inventory::clone(&previous)
            };
            let full = CheckedInventory::new(whole);
            let patched = previous.patch(changes);
            prop_assert_eq!(patched.is_ok(), full.is_ok(), "{:?} / {:?}", patched, full);
            if let (Ok(patched), Ok(full)) = (patched, full) {
                prop_assert_eq!(patched, full);
            }
        }
    }

    /// A workload with one clash has it named as the full check names it:
    /// the later claimant, and the first. (With several, each check may
    /// report a different one first.)
    #[test]
    fn a_patch_names_the_clash_as_the_full_check_does() {
        let w = |name: &str, ip: u8, cgroup: &str| Workload {
            name: name.into(),
            namespace: "x".into(),
            labels: Default::default(),
            cgroup: Some(cgroup.into()),
            ips: vec![IpAddr::from([10, 0, 0, ip])],
            ports: Vec::new(),
            service_account: None,
        };
        let previous = CheckedInventory::new(base(vec![w("a", 1, "/cg/a"), w("c", 3, "/cg/c")]))
            .expect("valid");
        let put = |w: Workload| (w.reference(), Some(Arc::new(w)));
        for (change, message) in [
            (w("b", 3, "/cg/b"), "workloads[2].ips[0]"),
            (w("0", 1, "/cg/0"), "workloads[1].ips[0]"),
            (w("b", 0, "/cg/b"), "workloads[1].ips[0]"),
            (w("b", 7, "/cg/b"), "services[0].clusterIPs[0]"),
        ] {
            let patched = previous.patch([put(change.clone())]).unwrap_err();
            let mut whole = Inventory::clone(&previous);
            whole.workloads.push(Arc::new(change));
            whole.workloads.sort_by(|a, b| a.name.cmp(&b.name));
            let full = whole.check().unwrap_err();
            assert_eq!(patched.to_string(), full.to_string());
            assert!(patched.to_string().contains(message), "{patched}");
        }
        let taken = previous.patch([put(w("b", 2, "/cg/c"))]).unwrap_err();
        assert!(
            matches!(taken, InventoryError::DuplicateCgroup { .. }),
            "{taken}"
        );
        let removed = previous
            .patch([(w("a", 1, "/cg/a").reference(), None)])
            .expect("a removal breaks nothing");
        assert_eq!(removed.workloads.len(), 1);

        // Changes that change nothing give the very same view.
        let same = previous
            .patch([
                (w("b", 2, "/cg/b").reference(), None),
                (
                    previous.workloads[0].reference(),
                    Some(Arc::clone(&previous.workloads[0])),
                ),
            ])
            .expect("valid");
        assert!(CheckedInventory::same(&same, &previous));

        // A view out of name order (a source that does not sort) is
        // patched all the same, and checked whole.
        let unordered = CheckedInventory::new(Inventory {
            workloads: vec![Arc::new(w("c", 3, "/cg/c")), Arc::new(w("a", 1, "/cg/a"))],
            ..Default::default()
        })
        .expect("valid");
        let patched = unordered
            .patch([
                (w("a", 1, "/cg/a").reference(), None),
                put(w("b", 2, "/cg/b")),
            ])
            .expect("valid");
        let names: Vec<&str> = patched.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["b", "c"]);
        assert!(unordered.patch([put(w("b", 3, "/cg/b"))]).is_err());
    }
}
