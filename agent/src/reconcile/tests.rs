//! Fault isolation: a change that does not fit is held back alone.

use super::*;
use std::path::Path;

use portcullis_common::{ENDPOINT_FLAG_MESHED, ENDPOINT_FLAG_MESH_STRICT, IDENTITIES_MAP};

use crate::policy::{
    model::Inventory,
    parse::{parse_inventory, parse_policies},
};

fn inventory(yaml: &str) -> Inventory {
    parse_inventory(Path::new("workloads.yaml"), yaml).unwrap()
}

fn policies(yaml: &str) -> Vec<PolicyObject> {
    parse_policies(Path::new("test.yaml"), yaml).unwrap()
}

/// Records what reached the "kernel".
#[derive(Default)]
struct Recorder {
    applied: Vec<DesiredState>,
}

impl MapSink for Recorder {
    fn apply(&mut self, desired: DesiredState) -> Result<MapUsage, WriteError> {
        let usage = desired.usage();
        self.applied.push(desired);
        Ok(usage)
    }
}

fn lab() -> Inventory {
    inventory(
        "workloads:\n\
         - {name: a, namespace: x, labels: {app: a}, cgroup: /nowhere/a, ips: [198.18.0.10]}\n\
         - {name: b, namespace: y, labels: {app: b}, cgroup: /nowhere/b, ips: [198.18.0.11]}\n",
    )
}

/// A policy isolating namespace `ns` that admits `cidrs` on port 80.
fn admit(ns: &str, name: &str, cidrs: usize) -> PolicyObject {
    // Each policy its own CIDRs, so their identities add up.
    let net = name.bytes().map(u32::from).sum::<u32>() % 200 + 1;
    let from: Vec<String> = (0..cidrs)
        .map(|i| format!("{{ipBlock: {{cidr: 10.{net}.{}.{}/32}}}}", i / 256, i % 256))
        .collect();
    let yaml = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: {name}, namespace: {ns}}}\n\
         spec:\n  podSelector: {{}}\n  ingress:\n    - from: [{}]\n      ports: [{{port: 80}}]\n",
        from.join(", ")
    );
    policies(&yaml).remove(0)
}

fn snapshot(policies: Vec<PolicyObject>, previous: &[PolicyObject]) -> Snapshot {
    Snapshot {
        inventory: CheckedInventory::new(lab()).unwrap(),
        policies: Arc::new(policies),
        previous: Arc::new(
            previous
                .iter()
                .map(|p| (p.policy_ref(), p.clone()))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Room for the small policies here, not for one admitting 50 CIDRs.
fn small_maps() -> MapUsage {
    MapUsage {
        identities: 40,
        ..generation_capacity()
    }
}

fn reconciler() -> Reconciler {
    Reconciler::new(PathBuf::from("/nonexistent-cgroup-mount")).with_capacity(small_maps())
}

fn rules_of(desired: &DesiredState, compiled_for: &[PolicyObject]) -> bool {
    // Same rule count as compiling exactly these policies.
    let c = Compiler::new().compile(&lab(), compiled_for).unwrap();
    desired.policy.len() == c.rules.len() && desired.identities.len() == c.identities.len()
}

#[test]
fn a_new_object_that_does_not_fit_is_left_out_alone_and_reported() {
    let big = admit("x", "big", 50);
    let small = admit("y", "small", 2);
    let mut sink = Recorder::default();
    let applied = reconciler()
        .reconcile(&snapshot(vec![big.clone(), small.clone()], &[]), &mut sink)
        .expect("the rest applies");
    assert_eq!(sink.applied.len(), 1);
    assert!(rules_of(&sink.applied[0], &[small]), "only the small one");
    let why = &applied.rejected[&big.policy_ref()];
    assert_eq!(applied.rejected.len(), 1, "{:?}", applied.rejected);
    for needle in [
        "test.yaml",
        "x/big",
        IDENTITIES_MAP,
        "at most 40",
        "NOT enforced",
    ] {
        assert!(why.contains(needle), "{needle:?} in {why}");
    }
}

#[test]
fn a_changed_object_that_does_not_fit_keeps_its_previous_version() {
    let before = admit("x", "web", 2);
    let grown = admit("x", "web", 50);
    let other_before = admit("y", "other", 1);
    let other_after = admit("y", "other", 3);
    let mut sink = Recorder::default();
    let applied = reconciler()
        .reconcile(
            &snapshot(
                vec![grown.clone(), other_after.clone()],
                &[before.clone(), other_before],
            ),
            &mut sink,
        )
        .expect("the rest applies");
    assert!(
        rules_of(&sink.applied[0], &[before, other_after]),
        "the previous version and the other change"
    );
    let why = &applied.rejected[&grown.policy_ref()];
    assert!(why.contains("previous version stays enforced"), "{why}");
}

#[test]
fn the_largest_of_several_changes_goes_first() {
    let medium = admit("x", "medium", 20);
    let large = admit("y", "large", 30);
    let mut sink = Recorder::default();
    let applied = reconciler()
        .reconcile(
            &snapshot(vec![medium.clone(), large.clone()], &[]),
            &mut sink,
        )
        .unwrap();
    assert_eq!(
        applied.rejected.keys().collect::<Vec<_>>(),
        [&large.policy_ref()],
        "holding back the larger suffices"
    );
    assert!(rules_of(&sink.applied[0], &[medium]));
}

#[test]
fn when_what_was_applied_does_not_fit_nothing_changes() {
    let big = admit("x", "big", 50);
    let mut sink = Recorder::default();
    let e = reconciler()
        .reconcile(&snapshot(vec![big.clone()], &[big]), &mut sink)
        .unwrap_err();
    assert!(sink.applied.is_empty(), "nothing reached the kernel");
    let text = crate::source::file::error_chain(&e);
    assert!(
        text.contains("nothing was changed") && text.contains(IDENTITIES_MAP),
        "{text}"
    );
}

#[test]
fn objects_that_fit_are_never_held_back() {
    let a = admit("x", "a", 3);
    let b = admit("y", "b", 3);
    let mut sink = Recorder::default();
    let applied = reconciler()
        .reconcile(&snapshot(vec![a.clone(), b.clone()], &[]), &mut sink)
        .unwrap();
    assert!(applied.rejected.is_empty());
    assert!(rules_of(&sink.applied[0], &[a, b]));
}

#[test]
fn a_repeated_pass_holds_back_the_same_object() {
    let big = admit("x", "big", 50);
    let small = admit("y", "small", 2);
    let snap = snapshot(vec![big, small], &[]);
    let mut r = reconciler();
    let mut sink = Recorder::default();
    let first = r.reconcile(&snap, &mut sink).unwrap();
    let again = r.reconcile(&snap, &mut sink).unwrap();
    assert_eq!(first.rejected, again.rejected);
    assert_eq!(sink.applied[0], sink.applied[1]);
}

/// The packet-socket refusal follows ingress policy: an endpoint is
/// restricted when some ingress entry denies, never for egress, allow or
/// audit entries alone.
#[test]
fn endpoints_are_flagged_restricted_when_ingress_policy_denies() {
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                metadata: {name: a-in, namespace: x}\n\
                spec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress]}\n\
                ---\n\
                apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                metadata: {name: b-out, namespace: y}\n\
                spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Egress]}\n";
    let compiled = Compiler::new().compile(&lab(), &policies(yaml)).unwrap();
    let id = |name: &str| {
        compiled
            .endpoints
            .iter()
            .find(|e| e.workload.name == name)
            .unwrap()
            .id
    };
    // b's egress is denied to every peer; only a's ingress counts.
    assert_eq!(
        ingress_restricted(&compiled.rules),
        BTreeSet::from([id("a")])
    );
    // Kept for the same rules; worked out again for other rules.
    let mut kept = KeptRestricted::default();
    let first = kept.of(&compiled.rules);
    assert_eq!(*first, BTreeSet::from([id("a")]));
    assert!(Arc::ptr_eq(&first, &kept.of(&compiled.rules)));
    // An endpoint whose block changed is looked at again: a's ingress
    // entries withdrawn, a is no longer restricted.
    let mut open = (*compiled.rules).clone();
    open.withdraw(id("a"), DIRECTION_INGRESS);
    assert_eq!(*kept.of(&Arc::new(open.clone())), BTreeSet::new());
    assert_eq!(ingress_restricted(&open), BTreeSet::new());
    // And back: the unchanged blocks answered from before, a's again.
    assert_eq!(*kept.of(&compiled.rules), BTreeSet::from([id("a")]));
    let none = kept.of(&Arc::new(RuleTable::default()));
    assert!(
        none.is_empty(),
        "a new rule set is not answered from the old"
    );
}

/// A sink that knows what it enforces, as the map writer does.
#[derive(Default)]
struct Enforcing(Recorder);

impl MapSink for Enforcing {
    fn apply(&mut self, desired: DesiredState) -> Result<MapUsage, WriteError> {
        self.0.apply(desired)
    }

    fn holds(&self, desired: &DesiredState) -> bool {
        self.0.applied.last() == Some(desired)
    }
}

/// A pass that works out what the kernel already holds (a deleted pod's
/// second event) writes nothing and says so; a real change still writes.
#[test]
fn a_pass_that_changes_nothing_writes_nothing() {
    let mut sink = Enforcing::default();
    let mut reconciler = reconciler();
    let first = admit("x", "first", 1);
    let applied = reconciler
        .reconcile(&snapshot(vec![first.clone()], &[]), &mut sink)
        .unwrap();
    assert!(applied.wrote);
    assert!(applied.flipped_at.is_some(), "a flip ends apply latency");
    let again = reconciler
        .reconcile(&snapshot(vec![first.clone()], &[]), &mut sink)
        .unwrap();
    assert!(!again.wrote, "nothing changed");
    assert_eq!(again.flipped_at, None, "no flip, nothing to time");
    assert_eq!(sink.0.applied.len(), 1);
    assert_eq!(again.usage, applied.usage, "what is enforced is reported");
    let changed = reconciler
        .reconcile(
            &snapshot(vec![first, admit("y", "second", 1)], &[]),
            &mut sink,
        )
        .unwrap();
    assert!(changed.wrote);
    assert_eq!(sink.0.applied.len(), 2);
}

/// The names a compile gives are worked out once: a pass that compiled
/// nothing new, or a compile that kept every rule cookie and endpoint (a
/// pod elsewhere came), hands on the very same names (so they are not
/// published again), and a changed policy gives new names that say so.
/// The trust domain goes with them.
#[test]
fn names_are_worked_out_again_only_for_a_new_compile() {
    let mut sink = Enforcing::default();
    let mut reconciler = reconciler().with_trust_domain(Some("cluster.local".into()));
    let first = admit("x", "first", 1);
    let one = reconciler
        .reconcile(&snapshot(vec![first.clone()], &[]), &mut sink)
        .unwrap();
    let again = reconciler
        .reconcile(&snapshot(vec![first.clone()], &[]), &mut sink)
        .unwrap();
    assert!(Arc::ptr_eq(&one.names, &again.names), "the same compile");
    assert_eq!(again.names.trust_domain.as_deref(), Some("cluster.local"));
    let mut elsewhere = lab();
    elsewhere.workloads.push(Arc::new(
        inventory(
            "workloads:\n\
             - {name: c, namespace: z, labels: {app: c}, ips: [198.18.0.12]}\n",
        )
        .workloads[0]
            .as_ref()
            .clone(),
    ));
    let remote_came = reconciler
        .reconcile(
            &Snapshot {
                inventory: CheckedInventory::new(elsewhere).unwrap(),
                ..snapshot(vec![first.clone()], &[])
            },
            &mut sink,
        )
        .unwrap();
    assert!(remote_came.wrote, "a new compile: the pod has an identity");
    assert!(
        Arc::ptr_eq(&one.names, &remote_came.names),
        "the same cookies and endpoints"
    );
    let named =
        |names: &PublishedNames, policy: &str| names.cookies.values().any(|c| c.contains(policy));
    assert!(named(&one.names, "first"));
    let two = reconciler
        .reconcile(
            &snapshot(vec![first, admit("y", "second", 1)], &[]),
            &mut sink,
        )
        .unwrap();
    assert!(!Arc::ptr_eq(&one.names, &two.names));
    assert!(named(&two.names, "second"), "{:?}", two.names.cookies);
    assert_eq!(two.names.trust_domain.as_deref(), Some("cluster.local"));
}

/// A sink that counts how often it is asked what it holds.
#[derive(Default)]
struct Asked {
    inner: Enforcing,
    asked: std::cell::Cell<usize>,
}

impl MapSink for Asked {
    fn apply(&mut self, desired: DesiredState) -> Result<MapUsage, WriteError> {
        self.inner.apply(desired)
    }

    fn holds(&self, desired: &DesiredState) -> bool {
        self.asked.set(self.asked.get() + 1);
        self.inner.holds(desired)
    }
}

/// The very same input again (the view, cgroup listing, policies and
/// guards the last pass had: a deletion mark's pass) has the outcome the
/// kernel holds, so nothing is worked out and the sink is not even asked.
/// An equal view that is not the same one is worked out and compared, and
/// a pass that missed a cgroup is worked out again to look for it.
#[test]
fn the_same_input_again_is_not_worked_out_again() {
    let remote = CheckedInventory::new(inventory(
        "workloads:\n\
         - {name: a, namespace: x, labels: {app: a}, ips: [198.18.0.10]}\n",
    ))
    .unwrap();
    let pass = |inventory: &CheckedInventory| Snapshot {
        inventory: inventory.clone(),
        policies: Arc::new(vec![admit("x", "first", 1)]),
        ..Default::default()
    };
    let mut sink = Asked::default();
    let mut reconciler = reconciler();
    let snapshot = pass(&remote);
    let first = reconciler.reconcile(&snapshot, &mut sink).unwrap();
    assert!(first.wrote);
    assert_eq!(sink.asked.get(), 1);
    let again = reconciler.reconcile(&snapshot, &mut sink).unwrap();
    assert!(!again.wrote && again.flipped_at.is_none());
    assert_eq!(sink.asked.get(), 1, "worked out again");
    assert_eq!(again.usage, first.usage);
    assert!(Arc::ptr_eq(&again.names, &first.names));
    assert_eq!(again.enforced, first.enforced);

    let equal = CheckedInventory::new(Inventory::clone(&remote)).unwrap();
    let compared = reconciler.reconcile(&pass(&equal), &mut sink).unwrap();
    assert!(!compared.wrote);
    assert_eq!(
        sink.asked.get(),
        2,
        "an equal view is compared with the kernel"
    );
    // A changed policy on the same view: worked out, written.
    let mut changed = pass(&equal);
    Arc::make_mut(&mut changed.policies).push(admit("x", "second", 1));
    assert!(reconciler.reconcile(&changed, &mut sink).unwrap().wrote);
    assert_eq!(sink.inner.0.applied.len(), 2);

    // lab()'s pods have no cgroup on this machine: each pass looks again.
    let missing = snapshot_of(lab());
    for round in 1..=2 {
        let before = sink.asked.get();
        let applied = reconciler.reconcile(&missing, &mut sink).unwrap();
        assert!(!applied.missing_cgroups.is_empty());
        assert_eq!(sink.asked.get(), before + 1, "round {round} not worked out");
    }
}

fn snapshot_of(inventory: Inventory) -> Snapshot {
    Snapshot {
        inventory: CheckedInventory::new(inventory).unwrap(),
        policies: Arc::new(vec![admit("x", "first", 1)]),
        ..Default::default()
    }
}

/// The endpoints' entries kept from the last pass equal entries worked out
/// afresh, through every input they are made from: the cgroup listing, a
/// namespace's or a pod's mesh label, a policy that restricts ingress, and
/// a cgroup missing from the listing (read from the file system every
/// pass, so never kept).
#[test]
fn kept_endpoint_entries_equal_entries_worked_out_afresh() {
    let mount = Path::new("/nonexistent-cgroup-mount");
    let base = inventory(
        "namespaces:\n\
         - {name: x, labels: {}}\n\
         - {name: y, labels: {}}\n\
         workloads:\n\
         - {name: a, namespace: x, labels: {app: a}, cgroup: /pods/a, ips: [198.18.0.10]}\n\
         - {name: b, namespace: y, labels: {app: b}, cgroup: /pods/b, ips: [198.18.0.11]}\n\
         - {name: c, namespace: y, labels: {app: c}, ips: [198.18.0.12]}\n",
    );
    let listing = |ids: &[(&str, u64)]| {
        Arc::new(
            ids.iter()
                .map(|(pod, id)| (mount.join("pods").join(pod), *id))
                .collect::<std::collections::HashMap<_, _>>(),
        )
    };
    let isolate_a = policies(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: a-in, namespace: x}\n\
         spec: {podSelector: {matchLabels: {app: a}}, policyTypes: [Ingress]}\n",
    );
    let with_labels = |namespace: Option<&str>, pod: Option<&str>| {
        let mut inv = base.clone();
        if let Some(mode) = namespace {
            inv.namespaces[1]
                .labels
                .insert(mesh::mode::MODE_LABEL.into(), mode.into());
        }
        if let Some(mode) = pod {
            Arc::make_mut(&mut inv.workloads[1])
                .labels_mut()
                .insert(mesh::mode::MODE_LABEL.into(), mode.into());
        }
        CheckedInventory::new(inv).unwrap()
    };
    let plain = CheckedInventory::new(base.clone()).unwrap();
    let strict_ns = with_labels(Some("strict"), None);
    let permissive_pod = with_labels(Some("strict"), Some("permissive"));
    let both = listing(&[("a", 11), ("b", 12)]);
    let remade = listing(&[("a", 11), ("b", 13)]);
    let b_unlisted = listing(&[("a", 11)]);
    // a's cgroup past the depth the kernel searches (listed all the same).
    let deep_path = format!(
        "/{}/a",
        (0..MAX_CGROUP_DEPTH)
            .map(|i| format!("l{i}"))
            .collect::<Vec<_>>()
            .join("/")
    );
    let mut deep = base.clone();
    Arc::make_mut(&mut deep.workloads[0]).cgroup = Some(PathBuf::from(&deep_path));
    let deep = CheckedInventory::new(deep).unwrap();
    let deep_listed = Arc::new(
        [
            (mount.join(deep_path.trim_start_matches('/')), 11),
            (mount.join("pods/b"), 12),
        ]
        .into_iter()
        .collect::<std::collections::HashMap<_, _>>(),
    );
    // Each step: whether the entries kept from the step before are used.
    let steps: Vec<(&str, &CheckedInventory, &Arc<_>, &[PolicyObject], bool)> = vec![
        ("first", &plain, &both, &[], false),
        ("the same again", &plain, &both, &[], true),
        ("b's namespace STRICT", &strict_ns, &both, &[], false),
        (
            "b's own label PERMISSIVE",
            &permissive_pod,
            &both,
            &[],
            false,
        ),
        (
            "a's ingress restricted",
            &permissive_pod,
            &both,
            &isolate_a,
            false,
        ),
        (
            "b's cgroup made again",
            &permissive_pod,
            &remade,
            &isolate_a,
            false,
        ),
        (
            "b's cgroup not listed",
            &permissive_pod,
            &b_unlisted,
            &isolate_a,
            false,
        ),
        (
            "still not listed",
            &permissive_pod,
            &b_unlisted,
            &isolate_a,
            false,
        ),
        ("listed again", &plain, &both, &[], false),
        ("a too deep", &deep, &deep_listed, &[], false),
        ("still too deep", &deep, &deep_listed, &[], false),
        ("back", &plain, &both, &[], false),
        ("back, the same again", &plain, &both, &[], true),
    ];
    let mut compiler = Compiler::new();
    let mut kept = Kept::default();
    for (step, inventory, listed, policies, reused) in steps {
        let reused_before = kept.endpoints.reused();
        let compiled = compiler.compile_checked(inventory, policies).unwrap();
        let snapshot = Snapshot {
            inventory: inventory.clone(),
            cgroup_ids: Arc::clone(listed),
            ..Default::default()
        };
        let (desired, missing, cgroups) = desired_state(&mut kept, mount, &compiled, &snapshot);
        let (fresh, fresh_missing, fresh_cgroups) =
            desired_state(&mut Kept::default(), mount, &compiled, &snapshot);
        assert_eq!(desired.endpoints, fresh.endpoints, "{step}");
        assert_eq!(missing.problems, fresh_missing.problems, "{step}");
        assert_eq!(cgroups, fresh_cgroups, "{step}");
        assert_eq!(
            kept.endpoints.reused() - reused_before,
            u64::from(reused),
            "{step}"
        );
        if step.contains("too deep") {
            assert!(
                missing.problems.iter().any(|p| p.contains("levels deep")),
                "{step}: {:?}",
                missing.problems
            );
        }
    }
    // What the steps went through reached the entries.
    let compiled = compiler
        .compile_checked(&permissive_pod, &isolate_a)
        .unwrap();
    let snapshot = Snapshot {
        inventory: permissive_pod.clone(),
        cgroup_ids: Arc::clone(&remade),
        ..Default::default()
    };
    let (desired, _, _) = desired_state(&mut kept, mount, &compiled, &snapshot);
    let b = desired.endpoints[&13];
    assert_eq!(
        b.flags & (ENDPOINT_FLAG_MESHED | ENDPOINT_FLAG_MESH_STRICT),
        ENDPOINT_FLAG_MESHED
    );
    assert_ne!(
        desired.endpoints[&11].flags & ENDPOINT_FLAG_INGRESS_RESTRICTED,
        0
    );
}
