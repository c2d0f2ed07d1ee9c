//! The Kubernetes source against a mock API server, for what a real one
//! cannot show; everything else runs against a real kube-apiserver in
//! tests/api_source.rs. What stays here:
//! - the exact requests the watchers make (a list then a watch of every
//!   resource, bookmarks asked for, resource versions, this node's field
//!   selector): a real server does not show a test its requests;
//! - a dropped watch resuming from an injected bookmark: the real server
//!   sends bookmarks about once a minute and cannot drop a watch on cue;
//! - an API server answering 503: a real one that is down refuses
//!   connections instead.

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
    decide::Flow, ipv4_mapped, DIRECTION_INGRESS, PROTO_TCP, VERDICT_ALLOW, VERDICT_DENY,
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
    fn apply(&mut self, desired: DesiredState) -> Result<MapUsage, WriteError> {
        let usage = MapUsage {
            endpoints: desired.endpoints.len(),
            identities: desired.identities.len(),
            policy: desired.policy.len(),
            services: desired.services.len(),
            backends: desired.backends.len(),
        };
        self.desired = desired;
        Ok(usage)
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
    /// The cgroup tree the source reads, kept until the test ends.
    _node: Node,
    source: KubeSource,
    reconciler: Reconciler,
    maps: Recorder,
    seen: Option<Revision>,
}

impl Harness {
    /// A cluster of two nodes: x/a and x/b run here, y/c on n2. Returns
    /// x/a's cgroup id too.
    async fn start() -> (Self, u64) {
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
        node.create_pod_cgroup(&uid(2));
        let mut options = KubeOptions::new(client, NODE);
        options.probe_interval = Duration::from_millis(100);
        // The status writer has tests of its own (kube_report).
        options.reporter = None;
        let source = KubeSource::start(options, node.mount.path()).unwrap();
        let reconciler = Reconciler::new(node.mount.path().to_path_buf());
        let mut h = Self {
            api,
            _node: node,
            source,
            reconciler,
            maps: Recorder::default(),
            seen: None,
        };
        until("the initial lists", || h.source.revision()).await;
        h.pass().await;
        (h, cg_a)
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
async fn watchers_list_then_watch_with_bookmarks_and_read_only_this_node() {
    let (h, _) = Harness::start().await;
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
async fn a_dropped_watch_resumes_from_the_last_bookmark() {
    let (mut h, _) = Harness::start().await;
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
}

/// An API server that answers 503 (up, but its etcd is not, say) is
/// reported with that answer; a stopped one is in tests/api_source.rs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_answer_keeps_the_last_state_and_reports_not_ready() {
    let (mut h, cg_a) = Harness::start().await;
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
