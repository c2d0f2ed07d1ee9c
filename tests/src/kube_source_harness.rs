//! The Kubernetes source against a real API server, driven as the sync
//! loop drives it: objects in through the API, map contents out (a
//! recorder stands in for the kernel maps), verdicts from the kernel's own
//! decision code, and pod cgroups in a temporary directory laid out as the
//! kubelet lays them out.

use std::{
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use portcullis_agent::{
    bpf::{writer::MapUsage, DesiredState, WriteError},
    reconcile::{Applied, MapSink, Reconciler},
    source::{
        kube::{KubeOptions, KubeSource},
        Snapshot, Source,
    },
};
use portcullis_common::{decide::Flow, ipv4_mapped, PROTO_TCP};
use serde_json::{json, Value};

use crate::kube_api::{self, ControlPlane};

/// The node the agent under test runs on.
pub const NODE: &str = "n1";
/// Another node: its pods are peers, never local endpoints.
pub const OTHER_NODE: &str = "n2";

/// Records what would be written to the kernel maps.
#[derive(Default)]
pub struct Recorder {
    pub desired: DesiredState,
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
pub fn decide(d: &DesiredState, cgroup: u64, direction: u8, peer: IpAddr, port: u16) -> u8 {
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

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The identity map key of an IPv4 address (a /128 of the mapped form).
pub fn identity_key(v4: [u8; 4]) -> (u8, [u8; 16]) {
    (128, ipv4_mapped(v4))
}

/// A node's cgroup tree as the kubelet (systemd driver) lays it out.
pub struct NodeCgroups {
    mount: tempfile::TempDir,
}

impl Default for NodeCgroups {
    fn default() -> Self {
        Self {
            mount: tempfile::tempdir().expect("a directory for the cgroup tree"),
        }
    }
}

impl NodeCgroups {
    /// Where the cgroup2 hierarchy is "mounted".
    pub fn mount(&self) -> &Path {
        self.mount.path()
    }

    fn pod_dir(&self, uid: &str) -> PathBuf {
        self.mount.path().join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ))
    }

    /// The kubelet creates a pod's cgroup; returns its id.
    pub fn create_pod_cgroup(&self, uid: &str) -> u64 {
        let dir = self.pod_dir(uid);
        std::fs::create_dir_all(&dir).unwrap();
        portcullis_agent::cgroup::cgroup_id(&dir).unwrap()
    }
}

/// Polls `check` until it holds; the bound only turns a hang into a
/// failure, it is not a speed target.
pub async fn until<T>(what: &str, bound: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How long an event may take to reach the source.
pub const EVENT_BOUND: Duration = Duration::from_secs(20);

/// How long the watchers may take to catch up after an outage or a
/// partition: the next retry of their backoff (source/kube/backoff.rs)
/// and, as a restarted API server's watch cache starts over at the
/// current version, a `410 Gone` that waits one more step before the
/// relist. Generous: the machines running these tests are busy.
pub const RECOVERY_BOUND: Duration = Duration::from_secs(60);

pub async fn start_plane() -> ControlPlane {
    ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("starting the test control plane: {e}"))
}

// Objects, as JSON with their apiVersion and kind (what kube_api takes).

pub fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
}

/// A Node object; `internal_ip` becomes its InternalIP address.
pub fn node(name: &str, internal_ip: Option<&str>) -> Value {
    let addresses: Vec<Value> = internal_ip
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .into_iter()
        .collect();
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": addresses}})
}

/// A running pod bound to `node` with address `ip` and label app=`app`
/// (no kubelet: the test plays its part and writes the status).
pub fn pod(namespace: &str, name: &str, node: &str, ip: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

/// A NetworkPolicy in x: pods app=`target` accept only app=`from_app` on
/// TCP `port`.
pub fn allow_ingress_from(name: &str, target: &str, from_app: &str, port: u16) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "x"},
        "spec": {
            "podSelector": {"matchLabels": {"app": target}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": from_app}}}],
                         "ports": [{"port": port, "protocol": "TCP"}]}]
        }
    })
}

pub fn l4_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "L4Policy",
           "metadata": {"name": name, "namespace": namespace}, "spec": spec})
}

/// The UID the API server gave a created object.
pub fn uid_of(object: &kube::api::DynamicObject) -> String {
    object
        .metadata
        .uid
        .clone()
        .expect("the server assigns a uid")
}

/// Source options for tests: a quick probe, and no status writer (the
/// tests that want one turn it back on).
pub fn test_options(client: kube::Client) -> KubeOptions {
    let mut options = KubeOptions::new(client, NODE);
    options.probe_interval = Duration::from_millis(100);
    options.reporter = None;
    options
}

/// A cluster of two nodes, x/a and x/b running on this one and y/c on the
/// other, and a Kubernetes source watching it for this node.
pub struct Harness {
    pub plane: ControlPlane,
    pub admin: kube::Client,
    pub cgroups: NodeCgroups,
    pub source: KubeSource,
    pub reconciler: Reconciler,
    pub maps: Recorder,
    pub cg_a: u64,
    pub cg_b: u64,
}

impl Harness {
    /// A fresh control plane, the agent talking to it directly.
    pub async fn start() -> Self {
        let plane = start_plane().await;
        let client = plane.client().await;
        Self::start_on(plane, client, |_| {}).await
    }

    /// The cluster on `plane`, with the agent's requests going through
    /// `agent_client` and its options adjusted by `configure`. Returns
    /// once the initial lists are applied.
    pub async fn start_on(
        plane: ControlPlane,
        agent_client: kube::Client,
        configure: impl FnOnce(&mut KubeOptions),
    ) -> Self {
        let admin = plane.client().await;
        let cgroups = NodeCgroups::default();
        create_all(
            &admin,
            [
                node(NODE, Some("172.18.0.2")),
                node(OTHER_NODE, None),
                namespace("x"),
                namespace("y"),
            ],
        )
        .await;
        let a = kube_api::create(&admin, pod("x", "a", NODE, "10.0.0.2", "a")).await;
        let b = kube_api::create(&admin, pod("x", "b", NODE, "10.0.0.3", "b")).await;
        kube_api::create(&admin, pod("y", "c", OTHER_NODE, "10.0.1.2", "c")).await;
        let cg_a = cgroups.create_pod_cgroup(&uid_of(&a));
        let cg_b = cgroups.create_pod_cgroup(&uid_of(&b));
        let mut options = test_options(agent_client);
        configure(&mut options);
        let source = KubeSource::start(options, cgroups.mount()).expect("starting the source");
        let reconciler = Reconciler::new(cgroups.mount().to_path_buf());
        let mut h = Self {
            plane,
            admin,
            cgroups,
            source,
            reconciler,
            maps: Recorder::default(),
            cg_a,
            cg_b,
        };
        // Every store is complete once every initial list is: one pass.
        h.apply_until("the initial lists", |_| true).await;
        h
    }

    pub fn load(&mut self) -> Snapshot {
        self.source.load().expect("a snapshot")
    }

    /// One reconcile pass, as the sync loop runs it.
    pub fn reconcile(&mut self) -> Applied {
        let snapshot = self.load();
        let applied = self
            .reconciler
            .reconcile(&snapshot, &mut self.maps)
            .expect("reconcile");
        self.source.settle(Some(&applied.rejected));
        applied
    }

    /// Reconciles, as the sync loop does, until `check` holds (the API
    /// server's events arrive in their own time); returns the last pass.
    pub async fn apply_until(&mut self, what: &str, check: impl Fn(&Self) -> bool) -> Applied {
        self.apply_until_within(what, EVENT_BOUND, check).await
    }

    /// [`Harness::apply_until`] with another bound.
    pub async fn apply_until_within(
        &mut self,
        what: &str,
        bound: Duration,
        check: impl Fn(&Self) -> bool,
    ) -> Applied {
        let deadline = Instant::now() + bound;
        loop {
            if self.source.revision().is_some() {
                let applied = self.reconcile();
                if check(self) {
                    return applied;
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the source says {:?}",
                self.source.degraded()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn verdict(&self, cgroup: u64, direction: u8, peer: &str, port: u16) -> u8 {
        decide(&self.maps.desired, cgroup, direction, ip(peer), port)
    }
}

/// Creates every object, in order.
pub async fn create_all(client: &kube::Client, objects: impl IntoIterator<Item = Value>) {
    for object in objects {
        kube_api::create(client, object).await;
    }
}

fn pods(client: &kube::Client, namespace: &str) -> kube::Api<k8s_openapi::api::core::v1::Pod> {
    kube::Api::namespaced(client.clone(), namespace)
}

/// Deletes a pod as a user does: gracefully. A pod bound to a node only
/// becomes terminating (its containers may still run) until the kubelet
/// removes it ([`kubelet_removes_pod`]).
pub async fn delete_pod(client: &kube::Client, namespace: &str, name: &str) {
    pods(client, namespace)
        .delete(name, &kube::api::DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("deleting pod {namespace}/{name}: {e}"));
}

/// What the kubelet does once a terminating pod's containers stopped:
/// deletes it with grace 0, and it is gone.
pub async fn kubelet_removes_pod(client: &kube::Client, namespace: &str, name: &str) {
    pods(client, namespace)
        .delete(name, &kube::api::DeleteParams::default().grace_period(0))
        .await
        .unwrap_or_else(|e| panic!("removing pod {namespace}/{name}: {e}"));
}

/// Polls an async `check` until it gives a value; the bound only turns a
/// hang into a failure.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + EVENT_BOUND;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
