//! Deny-until-programmed guards on the real kernel: a socket below a pending
//! guard whose pod cgroup is not registered is denied, until it is; an
//! unenforced cgroup below the guard is allowed without judging.
//!
//! The lab's agent reads files and has no guards, so the test stops it
//! (programs and maps stay pinned) and drives a reconciler with guards
//! itself over the same pinned maps.

use std::{fs, path::Path, time::Duration};

use portcullis_agent::{
    bpf::{events::EventReader, Dataplane, DataplaneOptions},
    cgroup,
    flows::Namer,
    lab::{
        plumbing::netns_path,
        pod::{Placement, PodClient, ProbeOutcome, Protocol},
    },
    policy::model::Workload,
    reconcile::Reconciler,
    source::{file::FileSource, Guards, Snapshot},
};
use portcullis_common::{DIRECTION_EGRESS, ENDPOINT_ID_NONE, REASON_NOT_PROGRAMMED, VERDICT_DENY};
use portcullis_tests::start_lab;

const NEW_POD_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: new-to-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: new}}
  policyTypes: [Egress]
  egress:
    - to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]
"#;

async fn spawn_in(netns: &Path, cgroup: &Path) -> PodClient {
    fs::create_dir_all(cgroup).unwrap();
    PodClient::spawn(
        &portcullis_agent::lab::portcullis_exe().unwrap(),
        Placement {
            netns,
            cgroup: Some(cgroup),
        },
        &[],
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn an_unregistered_pod_below_a_pending_guard_is_denied_until_programmed() {
    let mut lab = start_lab("guards").await;
    lab.write_policy("new.yaml", NEW_POD_POLICY).unwrap();
    lab.wait_applied().await.unwrap();
    lab.stop_agent();

    let mount = cgroup::cgroup2_mount().unwrap();
    let root = portcullis_agent::lab::plumbing::LabNames::new("guards", &mount).cgroup_root;
    let pending = root.join("kubepods");
    let new_pod = pending.join("pod-new");
    let host_net = pending.join("pod-hostnet");
    let mut dataplane = Dataplane::load(&DataplaneOptions {
        pin_dir: lab.pin_dir().to_path_buf(),
        cgroup_root: root.clone(),
        capacities: Default::default(),
    })
    .unwrap();
    let mut source = FileSource::new(
        lab.policies_dir().to_path_buf(),
        lab.workloads_file().to_path_buf(),
    );
    let mut snapshot: Snapshot = source.load().unwrap();
    snapshot.guards = Guards {
        pending_roots: vec![pending.clone()],
        unenforced: vec![host_net.clone()],
    };

    // Processes in x/a's network namespace, in cgroups below the guard.
    let netns = netns_path(&lab.pod_netns("x/a").unwrap());
    let new_client = spawn_in(&netns, &new_pod).await;
    let host_client = spawn_in(&netns, &host_net).await;
    let mut reconciler = Reconciler::new(mount.clone());
    let applied = reconciler
        .reconcile(&snapshot, &mut dataplane.writer)
        .unwrap();
    assert!(
        applied.missing_cgroups.is_empty(),
        "{:?}",
        applied.missing_cgroups
    );

    let y_b = lab
        .pods()
        .iter()
        .find(|p| p.key == "y/b")
        .unwrap()
        .ipv4
        .into();
    let y_c = lab
        .pods()
        .iter()
        .find(|p| p.key == "y/c")
        .unwrap()
        .ipv4
        .into();
    let limit = Duration::from_millis(1000);
    let mut reader = EventReader::open(lab.pin_dir()).unwrap();
    while reader.next(Duration::from_millis(100)).is_some() {}

    // Not registered: denied, with its own reason, counted and evented.
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let o = new_client.probe(y_b, 80, protocol, limit).await.unwrap();
        assert_eq!(o, ProbeOutcome::Denied, "{protocol:?}");
    }
    // Loopback stays allowed (nothing listens: refused, not denied).
    let o = new_client
        .probe("127.0.0.1".parse().unwrap(), 9, Protocol::Tcp, limit)
        .await
        .unwrap();
    assert_eq!(o, ProbeOutcome::Refused);
    // Unenforced (host network) below the same guard: allowed, not judged.
    let o = host_client
        .probe(y_c, 80, Protocol::Tcp, limit)
        .await
        .unwrap();
    assert_eq!(o, ProbeOutcome::Reached);

    let counted: u64 = portcullis_agent::bpf::read_counters(lab.pin_dir())
        .unwrap()
        .0
        .iter()
        .filter(|s| {
            s.key.endpoint_id == ENDPOINT_ID_NONE
                && s.key.reason == REASON_NOT_PROGRAMMED
                && s.key.verdict == VERDICT_DENY
                && s.key.direction == DIRECTION_EGRESS
        })
        .map(|s| s.count)
        .sum();
    assert!(counted >= 2, "not-programmed denies counted: {counted}");
    let namer = Namer::new(&snapshot.inventory, (*applied.names).clone());
    let mut flows = Vec::new();
    while let Some(e) = reader.next(Duration::from_millis(300)) {
        flows.push(namer.name(&e));
    }
    assert!(
        flows.iter().any(|f| f.reason == "not-programmed"
            && f.to == "y/b"
            && f.decided_by == "pod not programmed yet"),
        "{flows:#?}"
    );

    // Registered: judged by its policy (egress only to y/b). The client
    // lives in x/a's network namespace and so sends from x/a's addresses;
    // an enforced pod may send only from its own, so it takes them over.
    let mut registered = snapshot.clone();
    registered.inventory = snapshot
        .inventory
        .edit(|inventory| {
            let x_a = inventory
                .workloads
                .iter_mut()
                .find(|w| w.namespace == "x" && w.name == "a")
                .expect("x/a in the lab inventory");
            let ips = std::mem::take(&mut std::sync::Arc::make_mut(x_a).ips);
            inventory.workloads.push(std::sync::Arc::new(Workload {
                name: "new".into(),
                namespace: "x".into(),
                labels: std::sync::Arc::new(std::collections::BTreeMap::from([(
                    "pod".to_string(),
                    "new".to_string(),
                )])),
                cgroup: Some(new_pod.clone()),
                ips,
                ports: vec![],
                service_account: None,
            }));
        })
        .expect("a consistent inventory");
    let applied = reconciler
        .reconcile(&registered, &mut dataplane.writer)
        .unwrap();
    assert!(
        applied.missing_cgroups.is_empty(),
        "{:?}",
        applied.missing_cgroups
    );
    let o = new_client
        .probe(y_b, 80, Protocol::Tcp, limit)
        .await
        .unwrap();
    assert_eq!(o, ProbeOutcome::Reached);
    let o = new_client
        .probe(y_c, 80, Protocol::Tcp, limit)
        .await
        .unwrap();
    assert_eq!(o, ProbeOutcome::Denied, "policy still applies");

    // A guard whose cgroup is missing is reported like a missing workload.
    let mut missing = registered.clone();
    missing
        .guards
        .pending_roots
        .push(root.join("no-such-slice"));
    let applied = reconciler
        .reconcile(&missing, &mut dataplane.writer)
        .unwrap();
    assert!(
        applied
            .missing_cgroups
            .iter()
            .any(|m| m.contains("no-such-slice")),
        "{:?}",
        applied.missing_cgroups
    );

    new_client.stop().await;
    host_client.stop().await;
    drop(dataplane);
}

/// A workload whose cgroup is deeper than the kernel's 12-level ancestry
/// search cannot be an endpoint: the agent guards the deepest ancestor the
/// kernel does see, so the workload's traffic is denied (not left
/// unjudged), and says why. Without the guard this process, below no
/// registered cgroup, would reach y/b unjudged.
#[tokio::test]
async fn a_workload_deeper_than_the_kernel_searches_is_denied_and_reported() {
    let mut lab = start_lab("deepcg").await;
    lab.wait_applied().await.unwrap();
    lab.stop_agent();

    let mount = cgroup::cgroup2_mount().unwrap();
    let root = portcullis_agent::lab::plumbing::LabNames::new("deepcg", &mount).cgroup_root;
    // The lab's root is 1 level below the mount, `deep` 2, and l13 15.
    let deep = (1..=13).fold(root.join("deep"), |p, i| p.join(format!("l{i}")));
    assert_eq!(cgroup::depth(&mount, &deep), 15);
    let mut dataplane = Dataplane::load(&DataplaneOptions {
        pin_dir: lab.pin_dir().to_path_buf(),
        cgroup_root: root.clone(),
        capacities: Default::default(),
    })
    .unwrap();
    let mut source = FileSource::new(
        lab.policies_dir().to_path_buf(),
        lab.workloads_file().to_path_buf(),
    );
    let mut snapshot: Snapshot = source.load().unwrap();
    snapshot.inventory = snapshot
        .inventory
        .edit(|inventory| {
            inventory.workloads.push(std::sync::Arc::new(Workload {
                name: "deep".into(),
                namespace: "x".into(),
                labels: std::sync::Arc::new(std::collections::BTreeMap::from([(
                    "pod".to_string(),
                    "deep".to_string(),
                )])),
                cgroup: Some(deep.clone()),
                ips: vec![],
                ports: vec![],
                service_account: None,
            }))
        })
        .expect("a consistent inventory");
    let netns = netns_path(&lab.pod_netns("x/a").unwrap());
    let client = spawn_in(&netns, &deep).await;
    let applied = Reconciler::new(mount.clone())
        .reconcile(&snapshot, &mut dataplane.writer)
        .unwrap();
    let visible = cgroup::deepest_visible(&mount, &deep);
    assert!(
        applied.missing_cgroups.iter().any(|m| m.contains("x/deep")
            && m.contains("levels deep")
            && m.contains(&visible.display().to_string())),
        "reported, naming the guarded ancestor: {:?}",
        applied.missing_cgroups
    );

    let y_b = lab
        .pods()
        .iter()
        .find(|p| p.key == "y/b")
        .unwrap()
        .ipv4
        .into();
    let limit = Duration::from_millis(1000);
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let o = client.probe(y_b, 80, protocol, limit).await.unwrap();
        assert_eq!(o, ProbeOutcome::Denied, "{protocol:?} from 15 levels deep");
    }
    client.stop().await;
    drop(dataplane);
}
