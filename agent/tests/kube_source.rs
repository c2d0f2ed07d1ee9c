//! The Kubernetes source against a mock API server: realistic list/watch
//! streams in, map contents out. Checks the requests the watchers make
//! (field selectors, bookmarks, resource versions), that add/modify/delete
//! events change what would be enforced, that bookmarks, `410 Gone` and
//! outages never drop enforcement, and that invalid objects are reported
//! while the rest apply.

mod support;

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use portcullis_agent::{
    bpf::{writer::MapUsage, DesiredState, WriteError},
    reconcile::{Applied, MapSink, Reconciler},
    source::{
        kube::{KubeOptions, KubeSource},
        Revision, Snapshot, Source,
    },
};
use portcullis_common::{
    decide::Flow, ipv4_mapped, DIRECTION_EGRESS, DIRECTION_INGRESS, PROTO_TCP, VERDICT_ALLOW,
    VERDICT_DENY,
};
use serde_json::{json, Value};
use support::mock_api::*;

const NODE: &str = "n1";

/// Records what would be written to the kernel maps.
#[derive(Default)]
struct Recorder {
    desired: DesiredState,
}

impl MapSink for Recorder {
    fn apply(&mut self, desired: &DesiredState) -> Result<MapUsage, WriteError> {
        self.desired = desired.clone();
        Ok(MapUsage {
            endpoints: desired.endpoints.len(),
            identities: desired.identities.len(),
            policy: desired.policy.len(),
            services: desired.services.len(),
            backends: desired.backends.len(),
        })
    }
}

/// Decides one direction of a TCP flow from map contents with the
/// kernel's own decision code.
fn decide(d: &DesiredState, cgroup: u64, direction: u8, peer: IpAddr, port: u16) -> u8 {
    let ep = d.endpoints.get(&cgroup).expect("endpoint programmed");
    let peer_addr = match peer {
        IpAddr::V4(v4) => ipv4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    let flow = Flow {
        generation: 0,
        direction,
        protocol: PROTO_TCP,
        peer_addr,
        peer_port: 0,
        policy_port: port,
    };
    match portcullis_common::decide::decide(d, ep, &flow) {
        Ok(decision) => decision.value.verdict,
        Err(never) => match never {},
    }
}

/// A node's cgroup tree as the kubelet (systemd driver) lays it out.
struct Node {
    mount: tempfile::TempDir,
}

impl Node {
    fn new() -> Self {
        Self {
            mount: tempfile::tempdir().unwrap(),
        }
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.mount.path().join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
    }

    /// The kubelet creates the pod cgroup; returns its id.
    fn create_pod_cgroup(&self, uid: &str) -> u64 {
        let dir = self.pod_dir(uid);
        std::fs::create_dir_all(&dir).unwrap();
        portcullis_agent::cgroup::cgroup_id(&dir).unwrap()
    }
}

fn uid(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn pod(namespace: &str, name: &str, n: u32, node: &str, ip: &str, app: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid(n), "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn namespace(name: &str) -> Value {
    json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

fn allow_ingress_from(name: &str, target: &str, from_app: &str, port: u16) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "x"},
        "spec": {
            "podSelector": {"matchLabels": {"app": target}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from_app}}}],
                         "ports": [{"port": port, "protocol": "TCP"}]}]
        }
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Polls `check` until it holds; a generous bound only turns a hang into
/// a failure, it is not a speed target.
async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Harness {
    api: MockApi,
    node: Node,
    source: KubeSource,
    reconciler: Reconciler,
    maps: Recorder,
    seen: Option<Revision>,
}

impl Harness {
    /// A cluster of two nodes: x/a and x/b run here, y/c on n2.
    async fn start() -> (Self, u64, u64) {
        let (client, api) = MockApi::start();
        let node = Node::new();
        api.apply(
            NODES,
            json!({"metadata": {"name": NODE},
                   "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}}),
        );
        api.apply(NODES, json!({"metadata": {"name": "n2"}}));
        for ns in ["x", "y"] {
            api.apply(NAMESPACES, namespace(ns));
        }
        api.apply(PODS, pod("x", "a", 1, NODE, "10.0.0.2", "a"));
        api.apply(PODS, pod("x", "b", 2, NODE, "10.0.0.3", "b"));
        api.apply(PODS, pod("y", "c", 3, "n2", "10.0.1.2", "c"));
        let cg_a = node.create_pod_cgroup(&uid(1));
        let cg_b = node.create_pod_cgroup(&uid(2));
        let mut options = KubeOptions::new(client, NODE);
        options.probe_interval = Duration::from_millis(100);
        // The status writer has tests of its own (kube_report).
        options.reporter = None;
        let source = KubeSource::start(options, node.mount.path()).unwrap();
        let reconciler = Reconciler::new(node.mount.path().to_path_buf());
        let mut h = Self {
            api,
            node,
            source,
            reconciler,
            maps: Recorder::default(),
            seen: None,
        };
        until("the initial lists", || h.source.revision()).await;
        h.pass().await;
        (h, cg_a, cg_b)
    }

    fn load(&mut self) -> Snapshot {
        self.source.load().unwrap()
    }

    /// One reconcile pass, as the sync loop runs it.
    fn reconcile(&mut self) -> Applied {
        let snapshot = self.load();
        let applied = self
            .reconciler
            .reconcile(&snapshot, &mut self.maps)
            .expect("reconcile");
        self.source.settle(Some(&applied.rejected));
        applied
    }

    /// Waits for the watchers to report a change, then reconciles.
    async fn pass(&mut self) -> Applied {
        let seen = self.seen.clone();
        let now = until("a change from the watchers", || {
            self.source.revision().filter(|r| Some(r) != seen.as_ref())
        })
        .await;
        self.seen = Some(now);
        // Let a burst of events settle into the stores, as the 100 ms
        // poll of the sync loop does.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.reconcile()
    }

    fn verdict(&self, cgroup: u64, direction: u8, peer: &str, port: u16) -> u8 {
        decide(&self.maps.desired, cgroup, direction, ip(peer), port)
    }
}

fn watches_of(requests: &[Recorded], path: &str) -> Vec<Recorded> {
    requests
        .iter()
        .filter(|r| r.path == path && r.is_watch())
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_lists_program_local_endpoints_and_every_peer() {
    let (h, cg_a, cg_b) = Harness::start().await;
    let d = &h.maps.desired;
    assert_eq!(d.endpoints.len(), 2, "x/a and x/b run on this node");
    assert_eq!(d.endpoints[&cg_a].ipv4_mapped, ipv4_mapped([10, 0, 0, 2]));
    assert_eq!(d.endpoints[&cg_b].ipv4_mapped, ipv4_mapped([10, 0, 0, 3]));
    let peer_c = (128u8, ipv4_mapped([10, 0, 1, 2]));
    assert!(
        d.identities.contains_key(&peer_c),
        "the remote pod y/c is a known peer"
    );
    assert!(h.source.degraded().is_none(), "{:?}", h.source.degraded());

    // What the watchers asked for: a list then a watch of every resource,
    // bookmarks on, and only this node's Node object.
    let requests = h.api.requests();
    for path in [
        PODS,
        NAMESPACES,
        NODES,
        SERVICES,
        ENDPOINT_SLICES,
        NETWORK_POLICIES,
        L4_POLICIES,
        CLUSTER_L4_POLICIES,
    ] {
        let list = requests
            .iter()
            .position(|r| r.path == path && !r.is_watch());
        let watch = requests.iter().position(|r| r.path == path && r.is_watch());
        assert!(
            matches!((list, watch), (Some(l), Some(w)) if l < w),
            "{path}: expected a list, then a watch; got {requests:#?}"
        );
        let w = &watches_of(&requests, path)[0];
        assert_eq!(
            w.query.get("allowWatchBookmarks").map(String::as_str),
            Some("true")
        );
        assert!(
            w.query.contains_key("resourceVersion"),
            "{path}: the watch resumes from the list's version"
        );
    }
    for r in requests.iter().filter(|r| r.path == NODES) {
        assert_eq!(
            r.query.get("fieldSelector").map(String::as_str),
            Some("metadata.name=n1"),
            "only this node's object is read"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_modified_and_deleted_objects_change_the_maps() {
    let (mut h, cg_a, _) = Harness::start().await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_ALLOW
    );

    // Added: x/a accepts only app=b on 80.
    h.api
        .apply(NETWORK_POLICIES, allow_ingress_from("only-b", "a", "b", 80));
    h.pass().await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 80),
        VERDICT_ALLOW
    );
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_DENY
    );
    assert_eq!(
        h.verdict(cg_a, DIRECTION_EGRESS, "10.0.1.2", 80),
        VERDICT_ALLOW
    );

    // Modified: the port moves to 8080.
    h.api.apply(
        NETWORK_POLICIES,
        allow_ingress_from("only-b", "a", "b", 8080),
    );
    h.pass().await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 80),
        VERDICT_DENY
    );
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 8080),
        VERDICT_ALLOW
    );

    // A pod's labels change: x/b loses app=b and with it the allow.
    h.api
        .apply(PODS, pod("x", "b", 2, NODE, "10.0.0.3", "other"));
    h.pass().await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 8080),
        VERDICT_DENY
    );
    // A new pod with the label is allowed at once.
    h.api.apply(PODS, pod("x", "e", 5, "n2", "10.0.1.5", "b"));
    h.pass().await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.5", 8080),
        VERDICT_ALLOW
    );

    // Deleted pod: x/b is gone from this node's endpoints and as a peer.
    h.api.delete(PODS, "x", "b");
    h.pass().await;
    assert_eq!(h.maps.desired.endpoints.len(), 1);
    assert!(
        !h.maps
            .desired
            .identities
            .contains_key(&(128, ipv4_mapped([10, 0, 0, 3]))),
        "a deleted pod's address is no longer known"
    );

    // Deleted policy: x/a is no longer isolated.
    h.api.delete(NETWORK_POLICIES, "x", "only-b");
    h.pass().await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.9", 22),
        VERDICT_ALLOW
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_pod_is_enforced_once_the_kubelet_creates_its_cgroup() {
    let (mut h, _, _) = Harness::start().await;
    h.api.apply(PODS, pod("x", "d", 4, NODE, "10.0.0.4", "d"));
    let applied = h.pass().await;
    assert_eq!(
        applied.missing_cgroups.len(),
        1,
        "not programmed before its cgroup exists: {:?}",
        applied.missing_cgroups
    );
    assert!(applied.missing_cgroups[0].contains("x/d"));
    assert_eq!(
        h.source.missing_cgroup_retry(),
        Duration::from_millis(200),
        "a starting pod is retried quickly"
    );
    let cg_d = h.node.create_pod_cgroup(&uid(4));
    // The sync loop retries without any API event; so does the test.
    let applied = h.reconcile();
    assert!(applied.missing_cgroups.is_empty());
    assert_eq!(
        h.maps.desired.endpoints[&cg_d].ipv4_mapped,
        ipv4_mapped([10, 0, 0, 4])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookmarks_and_410_gone_resume_without_dropping_enforcement() {
    let (mut h, cg_a, _) = Harness::start().await;
    h.api
        .apply(NETWORK_POLICIES, allow_ingress_from("only-b", "a", "b", 80));
    h.pass().await;
    let enforced = h.maps.desired.clone();

    // A bookmark moves the watchers' resource version forward; a dropped
    // connection then resumes from it, not from the last policy event.
    let last_policy_event = h.api.current_version();
    h.api.apply(NAMESPACES, namespace("z"));
    h.pass().await;
    let bookmark_rv = h.api.current_version();
    assert!(bookmark_rv > last_policy_event);
    h.api.bookmark();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = h.api.requests().len();
    h.api.drop_watches();
    let resumed = until("the policy watch to resume", || {
        watches_of(&h.api.requests()[before..], NETWORK_POLICIES)
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(
        resumed.query["resourceVersion"],
        bookmark_rv.to_string(),
        "resumed from the bookmark"
    );
    assert_eq!(
        h.maps.desired, enforced,
        "a namespace without policy changed nothing"
    );

    // 410 Gone: history is compacted while a change happens; the watchers
    // relist, the stores swap in the new list whole, and the change lands.
    let before = h.api.requests().len();
    h.api.compact();
    h.api.apply(
        NETWORK_POLICIES,
        allow_ingress_from("only-b", "a", "b", 443),
    );
    // Throughout the relist the source keeps offering a complete view.
    let mut saw_new_port = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        assert!(
            h.source.revision().is_some(),
            "a relist never empties the view"
        );
        let snapshot = h.load();
        assert_eq!(snapshot.policies.len(), 1, "the policy is never dropped");
        h.reconcile();
        if h.verdict(cg_a, DIRECTION_INGRESS, "10.0.0.3", 443) == VERDICT_ALLOW {
            saw_new_port = true;
            break;
        }
        // Until the relist, the old rule stays in force.
        assert_eq!(h.maps.desired, enforced);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(saw_new_port, "the change made during the gap was applied");
    let after = &h.api.requests()[before..];
    assert!(
        after
            .iter()
            .any(|r| r.path == NETWORK_POLICIES && !r.is_watch()),
        "410 Gone led to a relist: {after:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_outage_keeps_the_last_state_and_reports_not_ready() {
    let (mut h, cg_a, _) = Harness::start().await;
    h.api
        .apply(NETWORK_POLICIES, allow_ingress_from("only-b", "a", "b", 80));
    h.pass().await;
    let enforced = h.maps.desired.clone();
    let revision = h.source.revision();

    h.api.set_down(true);
    let why = until("the outage to be noticed", || {
        h.source
            .degraded()
            .filter(|d| d.contains("API server unreachable"))
    })
    .await;
    assert!(why.contains("503"), "{why}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h.source.revision(), revision, "nothing new to apply");
    h.reconcile();
    assert_eq!(h.maps.desired, enforced, "the last state stays enforced");
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_DENY
    );

    // Back: ready again, and changes flow.
    h.api.set_down(false);
    until("recovery", || h.source.degraded().is_none().then_some(())).await;
    h.api.delete(NETWORK_POLICIES, "x", "only-b");
    h.pass().await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_ALLOW
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_reported_while_the_rest_apply() {
    let (mut h, cg_a, _) = Harness::start().await;
    let reports = h.source.reports();
    h.api
        .apply(NETWORK_POLICIES, allow_ingress_from("only-b", "a", "b", 80));
    h.api.apply(
        L4_POLICIES,
        json!({"metadata": {"name": "bad-port", "namespace": "x"},
               "spec": {"podSelector": {}, "ingressDeny": [{"ports": [{"port": 70000}]}]}}),
    );
    let snapshot = until("both objects", || {
        let s = h.source.load().ok()?;
        // Reports are published once the pass's outcome is known.
        h.source.settle(None);
        (s.problems.len() == 1 && !s.policies.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(
        snapshot.policies.len(),
        1,
        "the valid NetworkPolicy applies"
    );
    let problem = &snapshot.problems[0];
    assert!(
        problem.contains("L4Policy x/bad-port") && problem.contains("70000"),
        "names the object and the value: {problem}"
    );
    let reports = reports.borrow().clone();
    let bad = reports.iter().find(|r| r.name == "bad-port").unwrap();
    assert!(bad.problem.as_deref().unwrap().contains("70000"));
    let good = reports.iter().find(|r| r.name == "only-b").unwrap();
    assert_eq!(good.problem, None);
    h.pass().await;
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_DENY
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_crd_keeps_the_agent_not_ready_with_a_clear_reason() {
    let (client, api) = MockApi::start();
    api.remove_collection(L4_POLICIES);
    api.apply(NODES, json!({"metadata": {"name": NODE}}));
    let node = Node::new();
    let mut options = KubeOptions::new(client, NODE);
    options.probe_interval = Duration::from_millis(100);
    options.reporter = None;
    let source = KubeSource::start(options, node.mount.path()).unwrap();
    let why = until("the failing watch", || {
        source.degraded().filter(|d| d.contains("watch failing"))
    })
    .await;
    assert!(
        why.contains("l4policies.portcullis.dev: 404") && why.contains("CRD installed"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        source.revision(),
        None,
        "nothing is applied without every list"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_lead_to_their_ready_backends() {
    let (mut h, _, _) = Harness::start().await;
    h.api.apply(
        SERVICES,
        json!({"metadata": {"name": "web", "namespace": "y"},
               "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
    );
    h.api.apply(
        ENDPOINT_SLICES,
        json!({"metadata": {"name": "web-1", "namespace": "y",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
               "endpoints": [{"addresses": ["10.0.1.2"], "conditions": {"ready": true}},
                             {"addresses": ["10.0.1.3"], "conditions": {"ready": false}}]}),
    );
    let snapshot = until("the service", || {
        let s = h.source.load().ok()?;
        s.inventory
            .services
            .first()
            .filter(|s| !s.ports[0].backends.is_empty())
            .cloned()
    })
    .await;
    assert_eq!(snapshot.cluster_ips, vec![ip("10.96.0.10")]);
    let backends: Vec<String> = snapshot.ports[0]
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.ip, b.port))
        .collect();
    assert_eq!(backends, ["10.0.1.2:8080"], "only ready endpoints");
}

/// The whole loop for invalid objects: the source finds the problem, the
/// status writer (holding the Lease) writes a Warning Event and an
/// `Accepted=False` condition for the invalid L4Policy and `Accepted=True`
/// for the valid one, and the valid NetworkPolicy is enforced meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_get_an_event_and_a_condition_from_the_lease_holder() {
    let (client, api) = MockApi::start();
    let node = Node::new();
    api.apply(NODES, json!({"metadata": {"name": NODE}}));
    api.apply(NAMESPACES, namespace("x"));
    api.apply(PODS, pod("x", "a", 1, NODE, "10.0.0.2", "a"));
    let cg_a = node.create_pod_cgroup(&uid(1));
    api.apply(NETWORK_POLICIES, allow_ingress_from("only-b", "a", "b", 80));
    let l4 = |name: &str, port: u32| {
        json!({"metadata": {"name": name, "namespace": "x", "generation": 1},
               "spec": {"podSelector": {}, "ingressDeny": [{"ports": [{"port": port}]}]}})
    };
    api.apply(L4_POLICIES, l4("bad-port", 70000));
    api.apply(L4_POLICIES, l4("no-telnet", 23));
    let mut options = KubeOptions::new(client, NODE);
    options.probe_interval = Duration::from_millis(100);
    let mut source = KubeSource::start(options, node.mount.path()).unwrap();
    until("the initial lists", || source.revision()).await;
    let snapshot = source.load().unwrap();
    assert_eq!(
        snapshot.policies.len(),
        2,
        "the NetworkPolicy and the valid L4Policy"
    );
    let mut maps = Recorder::default();
    let applied = Reconciler::new(node.mount.path().to_path_buf())
        .reconcile(&snapshot, &mut maps)
        .unwrap();
    source.settle(Some(&applied.rejected));
    assert_eq!(
        decide(&maps.desired, cg_a, DIRECTION_INGRESS, ip("10.0.1.2"), 80),
        VERDICT_DENY
    );

    let writes = |method: &str, path: &str| -> Vec<Value> {
        api.requests()
            .into_iter()
            .filter(|r| r.method.as_str() == method && r.path == path)
            .filter_map(|r| r.body)
            .collect()
    };
    let event = until("the Event", || {
        writes("POST", "/apis/events.k8s.io/v1/namespaces/x/events")
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(event["reason"], "InvalidPolicy");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "L4Policy");
    assert_eq!(event["regarding"]["name"], "bad-port");
    assert!(event["note"].as_str().unwrap().contains("70000"), "{event}");
    let condition = |name: &str| {
        let path = format!("/apis/portcullis.dev/v1alpha1/namespaces/x/l4policies/{name}/status");
        let patch = writes("PATCH", &path).into_iter().last()?;
        Some(patch["status"]["conditions"][0].clone())
    };
    let bad = until("the bad-port condition", || condition("bad-port")).await;
    assert_eq!(
        (bad["type"].as_str(), bad["status"].as_str()),
        (Some("Accepted"), Some("False"))
    );
    let good = until("the no-telnet condition", || condition("no-telnet")).await;
    assert_eq!(good["status"], "True");
    assert_eq!(
        writes("POST", "/apis/events.k8s.io/v1/namespaces/x/events").len(),
        1,
        "valid objects get no Event"
    );
    assert!(
        !writes(
            "POST",
            "/apis/coordination.k8s.io/v1/namespaces/portcullis-system/leases"
        )
        .is_empty(),
        "the writer took the Lease first"
    );
    until("the source to know it leads", || {
        source.is_report_leader().then_some(())
    })
    .await;
}

/// Deny-until-programmed guards the kubelet's pod parent cgroup, and says
/// so loudly when there is none to guard (a kubelet with another cgroup
/// root), rather than leave new pods unguarded in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_unprogrammed_guards_kubepods_or_says_it_cannot() {
    let (client, api) = MockApi::start();
    api.apply(NODES, json!({"metadata": {"name": NODE}}));
    let node = Node::new();
    let mut options = KubeOptions::new(client, NODE);
    options.reporter = None;
    options.deny_unprogrammed = true;
    let mut source = KubeSource::start(options, node.mount.path()).unwrap();
    until("the initial lists", || source.revision()).await;
    let snapshot = source.load().unwrap();
    assert!(snapshot.guards.pending_roots.is_empty());
    assert!(
        snapshot
            .problems
            .iter()
            .any(|p| p.contains("--deny-unprogrammed") && p.contains("--kubelet-cgroup-root")),
        "{:?}",
        snapshot.problems
    );
    node.create_pod_cgroup(&uid(9));
    let snapshot = source.load().unwrap();
    assert_eq!(
        snapshot.guards.pending_roots,
        vec![node.mount.path().join("kubepods.slice")]
    );
    assert!(snapshot.problems.is_empty(), "{:?}", snapshot.problems);
}

/// An object that does not fit the maps is held back alone and reported
/// like an invalid one (what the status writer turns into an Event and
/// `Accepted=False`), while the NetworkPolicy that arrived with it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_that_does_not_fit_is_reported_while_the_rest_apply() {
    let (mut h, cg_a, _) = Harness::start().await;
    // Room for the pods' addresses and a few CIDRs, not for 40 more.
    h.reconciler = Reconciler::new(h.node.mount.path().to_path_buf()).with_capacity(MapUsage {
        identities: 30,
        ..portcullis_agent::bpf::writer::generation_capacity()
    });
    let reports = h.source.reports();
    let from: Vec<Value> = (0..40)
        .map(|i| json!({"ipBlock": {"cidr": format!("10.99.0.{i}/32")}}))
        .collect();
    h.api.apply(
        L4_POLICIES,
        json!({"metadata": {"name": "huge", "namespace": "y"},
               "spec": {"podSelector": {}, "ingress": [{"from": from, "ports": [{"port": 80}]}]}}),
    );
    h.api
        .apply(NETWORK_POLICIES, allow_ingress_from("only-b", "a", "b", 80));
    let applied = until("both objects in one pass", || {
        let snapshot = h.source.load().ok()?;
        (snapshot.policies.len() == 2).then_some(())?;
        let applied = h.reconciler.reconcile(&snapshot, &mut h.maps).ok()?;
        h.source.settle(Some(&applied.rejected));
        Some(applied)
    })
    .await;
    let why = applied.rejected.values().next().expect("one held back");
    assert_eq!(applied.rejected.len(), 1, "{:?}", applied.rejected);
    assert!(
        why.contains("L4Policy y/huge")
            && why.contains("does not fit")
            && why.contains("NOT enforced"),
        "{why}"
    );
    assert_eq!(
        h.verdict(cg_a, DIRECTION_INGRESS, "10.0.1.2", 80),
        VERDICT_DENY,
        "the NetworkPolicy applies"
    );
    let reports = reports.borrow().clone();
    let huge = reports.iter().find(|r| r.name == "huge").unwrap();
    assert_eq!(huge.problem.as_deref(), Some(why.as_str()));
    let fine = reports.iter().find(|r| r.name == "only-b").unwrap();
    assert_eq!(fine.problem, None);
}
