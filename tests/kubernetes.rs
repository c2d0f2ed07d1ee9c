//! Kubernetes mode on the real data path: the agent takes pods and
//! policies from a real API server (`cargo xtask kube build`), pods run in
//! network namespaces with cgroups laid out as a kubelet lays them out for
//! the UIDs the API server gave them, and the kernel enforces what
//! `kubectl apply` says — through an API outage too.
//!
//! One test stays on the mock API server: a pod that leaves the API while
//! its process runs on, then comes back with the same UID — a real server
//! never reuses a UID, so only a mock can replay the kubelet's lag.

#[path = "../agent/tests/support/mock_api.rs"]
mod mock_api;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use mock_api::{MockApi, NAMESPACES, NODES, PODS};
use portcullis_agent::lab::{
    kube::{namespace_objects, node_object, pod_objects, pod_uid, LabKube},
    pod::ProbeOutcome,
    topology::{default_topology, plan},
    Family, Lab, LabOptions,
};
use portcullis_tests::{
    http_get,
    kube_api::{create, ControlPlane},
    start_lab_with_options,
};
use serde_json::json;

const NODE: &str = "lab-node";

/// What the API holds for a lab: its node, namespaces and running pods
/// (returned, to re-add one later).
fn populate(
    api: &MockApi,
    topology: &portcullis_agent::lab::topology::Topology,
) -> Vec<serde_json::Value> {
    api.apply(NODES, node_object(NODE));
    for ns in namespace_objects(topology) {
        api.apply(NAMESPACES, ns);
    }
    let objects = pod_objects(&plan(topology), NODE);
    for pod in &objects {
        api.apply(PODS, pod.clone());
    }
    objects
}

async fn probe(lab: &Lab, from: &str, to: &str) -> ProbeOutcome {
    lab.probe(from, to, "80/tcp".parse().unwrap(), Family::Ipv4)
        .await
        .unwrap()
}

/// An address for the agent's admin server on the host that the API
/// server's pod proxy accepts (it refuses loopback ones): a documentation
/// address on `lo` (this kernel may have no dummy interfaces), removed
/// when dropped.
struct AdminAddress;

impl AdminAddress {
    const ADDR: &'static str = "192.0.2.10";

    fn ip(verb: &str) -> std::process::Output {
        let cidr = format!("{}/32", Self::ADDR);
        Command::new("ip")
            .args(["addr", verb, &cidr, "dev", "lo"])
            .output()
            .expect("running ip")
    }

    fn add() -> Self {
        let _ = Self::ip("del");
        let out = Self::ip("add");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self
    }
}

impl Drop for AdminAddress {
    fn drop(&mut self) {
        let _ = Self::ip("del");
    }
}

/// Probes until the outcome is `want` (a change takes a watch event and a
/// pass to reach the kernel), then once more: it must stay.
async fn eventually(lab: &Lab, from: &str, to: &str, port: &str, want: ProbeOutcome) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let spec = port.parse().unwrap();
    loop {
        let got = lab.probe(from, to, spec, Family::Ipv4).await.unwrap();
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{from} → {to} {port}: {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = lab.probe(from, to, spec, Family::Ipv4).await.unwrap();
    assert_eq!(again, want, "{from} → {to} {port} stays {want:?}");
}

const ONLY_B_TO_A: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {pod: b}}}]
      ports: [{port: 80, protocol: TCP}]
";

const NO_WEB_FROM_Y_C: &str = "
apiVersion: portcullis.dev/v1alpha1
kind: L4Policy
metadata: {name: no-web-out, namespace: 'y'}
spec:
  podSelector: {matchLabels: {pod: c}}
  egressDeny: [{ports: [{protocol: TCP, port: 81}]}]
";

const QUARANTINE_Z_C: &str = "
apiVersion: portcullis.dev/v1alpha1
kind: ClusterL4Policy
metadata: {name: quarantine}
spec:
  tier: Admin
  priority: 10
  subject:
    namespaceSelector: {matchLabels: {ns: z}}
    podSelector: {matchLabels: {pod: c}}
  ingress: [{action: Deny, from: [{namespaceSelector: {}}]}]
";

/// The whole path on a real API server: the agent runs as the
/// ServiceAccount and ClusterRole of deploy/ (any missing permission
/// stalls its watches and fails the test), pods exist in the API with
/// their IPs and node, `kubectl apply` of each kind of policy reaches the
/// kernel, label changes and deletions follow, a Service's ClusterIP leads
/// to its backend, enforcement holds while the API server is down, and the
/// drop counters are read through the API server's pod proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_apply_reaches_the_kernel_with_the_agents_own_permissions() {
    portcullis_tests::require_root();
    let mut plane = ControlPlane::start().await.unwrap();
    let admin = plane.client().await;
    let topology = default_topology();
    let pods = plan(&topology);
    create(&admin, node_object(NODE)).await;
    for ns in namespace_objects(&topology) {
        create(&admin, ns).await;
    }
    let mut uids = BTreeMap::new();
    for (pod, object) in pods.iter().zip(pod_objects(&pods, NODE)) {
        let created = create(&admin, object).await;
        assert_eq!(created.data["status"]["podIP"], pod.ipv4.to_string());
        uids.insert(pod.key.clone(), created.metadata.uid.unwrap());
    }

    // The agent's identity, exactly as deploy/ grants it.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in ["deploy/namespace.yaml", "deploy/rbac.yaml"] {
        let path = root.join(file);
        plane.kubectl_ok(&["apply", "-f", path.to_str().unwrap()], "");
    }
    let token = plane.kubectl_ok(
        &[
            "create",
            "token",
            "portcullis-agent",
            "-n",
            "portcullis-system",
        ],
        "",
    );
    let agent_client = plane
        .client_with(&plane.kubeconfig_for("agent", token.trim()))
        .await;
    // The agent's own pod: host network, so its IP is one the API server's
    // pod proxy can reach on this host.
    let address = AdminAddress::add();
    create(
        &admin,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "portcullis-agent-lab", "namespace": "portcullis-system"},
            "spec": {"nodeName": NODE, "hostNetwork": true, "serviceAccountName": "portcullis-agent",
                     "containers": [{"name": "agent", "image": "portcullis"}]},
            "status": {"phase": "Running", "podIP": AdminAddress::ADDR,
                       "podIPs": [{"ip": AdminAddress::ADDR}]}
        }),
    )
    .await;

    let mut kube = LabKube::new(agent_client, NODE);
    kube.pod_uids = uids;
    kube.report_status = true;
    let mut options = LabOptions::new("kube", topology);
    options.admin_addr = Some(format!("{}:0", AdminAddress::ADDR).parse().unwrap());
    options.kubernetes = Some(kube);
    let lab = start_lab_with_options(options).await;
    let status = lab.wait_applied().await.unwrap();
    assert!(status.problems.is_empty(), "{:?}", status.problems);
    assert!(
        status.waiting_for_cgroup.is_empty(),
        "{:?}",
        status.waiting_for_cgroup
    );
    assert_eq!(status.usage.endpoints, 9, "nine local pods programmed");
    assert_eq!(probe(&lab, "y/c", "x/a").await, ProbeOutcome::Reached);

    // One policy of each kind, applied as a user applies them.
    plane.kubectl_ok(&["apply", "-f", "-"], ONLY_B_TO_A);
    eventually(&lab, "y/c", "x/a", "80/tcp", ProbeOutcome::TimedOut).await;
    assert_eq!(probe(&lab, "x/b", "x/a").await, ProbeOutcome::Reached);
    plane.kubectl_ok(&["apply", "-f", "-"], NO_WEB_FROM_Y_C);
    eventually(&lab, "y/c", "z/a", "81/tcp", ProbeOutcome::Denied).await;
    assert_eq!(
        lab.probe("y/c", "z/a", "80/tcp".parse().unwrap(), Family::Ipv4)
            .await
            .unwrap(),
        ProbeOutcome::Reached
    );
    plane.kubectl_ok(&["apply", "-f", "-"], QUARANTINE_Z_C);
    eventually(&lab, "z/a", "z/c", "80/tcp", ProbeOutcome::TimedOut).await;
    assert_eq!(
        lab.probe("z/a", "z/b", "80/tcp".parse().unwrap(), Family::Ipv4)
            .await
            .unwrap(),
        ProbeOutcome::Reached
    );
    // The agent, holding the Lease, accepted both of our objects.
    let accepted = plane.kubectl_ok(
        &[
            "get",
            "l4policy",
            "no-web-out",
            "-n",
            "y",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Accepted\")].status}",
        ],
        "",
    );
    assert_eq!(accepted, "True");

    // The drop counters, through the API server's pod proxy, as a user
    // without a port-forward reads them.
    let metrics = plane.kubectl_ok(
        &[
            "get",
            "--raw",
            &format!(
                "/api/v1/namespaces/portcullis-system/pods/portcullis-agent-lab:{}/proxy/metrics",
                lab.admin_addr().unwrap().port()
            ),
        ],
        "",
    );
    let drops = |policy: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("portcullis_drops_total{") && l.contains(policy))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(drops("policy=\"NetworkPolicy/only-b\"") >= 2, "{metrics}");
    assert!(drops("policy=\"L4Policy/no-web-out\"") >= 2, "{metrics}");
    assert!(
        drops("policy=\"ClusterL4Policy/quarantine\"") >= 2,
        "{metrics}"
    );

    // A label change: x/b is no longer pod=b, and loses the allow.
    plane.kubectl_ok(
        &["label", "pod", "b", "-n", "x", "pod=other", "--overwrite"],
        "",
    );
    eventually(&lab, "x/b", "x/a", "80/tcp", ProbeOutcome::TimedOut).await;

    // A Service: its ClusterIP (allocated by the API server) leads to y/b.
    let service = create(
        &admin,
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "web", "namespace": "y"},
               "spec": {"ports": [{"name": "http", "port": 8080, "targetPort": 80, "protocol": "TCP"}]}}),
    )
    .await;
    let cluster_ip: IpAddr = service.data["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let y_b = pods.iter().find(|p| p.key == "y/b").unwrap();
    create(
        &admin,
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-1", "namespace": "y",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
               "endpoints": [{"addresses": [y_b.ipv4.to_string()], "conditions": {"ready": true}}]}),
    )
    .await;
    let spec = "8080/tcp".parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.probe_address("x/a", cluster_ip, spec).await.unwrap() != ProbeOutcome::Reached {
        assert!(
            Instant::now() < deadline,
            "{cluster_ip}:8080 never led to y/b"
        );
    }

    // The API server goes away: not ready, and enforcement holds.
    plane.stop_apiserver();
    lab.wait_status(|s| s.degraded.is_some()).await.unwrap();
    let admin_addr = lab.admin_addr().unwrap();
    assert_eq!(http_get(admin_addr, "/readyz", None).await.status, 503);
    assert_eq!(probe(&lab, "y/c", "x/a").await, ProbeOutcome::TimedOut);
    assert_eq!(
        lab.probe("y/c", "z/a", "81/tcp".parse().unwrap(), Family::Ipv4)
            .await
            .unwrap(),
        ProbeOutcome::Denied
    );
    // Back: ready again, and a deletion made afterwards is enforced.
    plane.start_apiserver().await.unwrap();
    lab.wait_status(|s| s.degraded.is_none()).await.unwrap();
    plane.kubectl_ok(&["delete", "networkpolicy", "only-b", "-n", "x"], "");
    eventually(&lab, "y/c", "x/a", "80/tcp", ProbeOutcome::Reached).await;

    lab.lab.shutdown().await.unwrap();
    drop(address);
}

/// With `--deny-unprogrammed`, a pod the agent has not programmed (here: one
/// the API no longer lists, its process still running) gets no traffic at
/// all; programmed again, it follows policy. The agent's own pod stays
/// exempt throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unprogrammed_pods_get_no_traffic_and_the_agent_is_exempt() {
    let (client, api) = MockApi::start();
    let topology = default_topology();
    let pods = plan(&topology);
    let objects = populate(&api, &topology);
    // x/c plays the agent's own pod.
    let agent_pod = pods.iter().find(|p| p.key == "x/c").unwrap();
    let mut kube = LabKube::new(client, NODE);
    kube.deny_unprogrammed = true;
    kube.own_pod_uid = Some(pod_uid(agent_pod));
    let mut options = LabOptions::new("kubeguard", topology);
    options.kubernetes = Some(kube);
    let lab = start_lab_with_options(options).await;
    let status = lab.wait_applied().await.unwrap();
    assert!(
        status.waiting_for_cgroup.is_empty(),
        "{:?}",
        status.waiting_for_cgroup
    );
    assert_eq!(probe(&lab, "x/b", "y/a").await, ProbeOutcome::Reached);

    // The API stops listing x/b and x/c while their processes run on.
    for name in ["b", "c"] {
        let applied = lab.agent_status().unwrap().borrow().applied;
        api.delete(PODS, "x", name);
        lab.wait_status(|s| s.applied > applied).await.unwrap();
    }
    assert_eq!(
        probe(&lab, "x/b", "y/a").await,
        ProbeOutcome::Denied,
        "an unprogrammed pod's connect() is refused"
    );
    assert_eq!(
        probe(&lab, "y/a", "x/b").await,
        ProbeOutcome::TimedOut,
        "and nothing reaches it"
    );
    assert_eq!(
        probe(&lab, "x/c", "y/a").await,
        ProbeOutcome::Reached,
        "the agent's own pod is exempt"
    );
    let counted = lab
        .counters()
        .unwrap()
        .iter()
        .filter(|c| c.key.reason == portcullis_common::REASON_NOT_PROGRAMMED)
        .map(|c| c.count)
        .sum::<u64>();
    assert!(counted >= 2, "the denials are counted as not programmed");

    // Listed again, x/b is programmed and reachable.
    let applied = lab.agent_status().unwrap().borrow().applied;
    let b = objects
        .iter()
        .find(|o| o["metadata"]["name"] == "b" && o["metadata"]["namespace"] == "x")
        .unwrap();
    api.apply(PODS, b.clone());
    lab.wait_status(|s| s.applied > applied).await.unwrap();
    assert_eq!(probe(&lab, "x/b", "y/a").await, ProbeOutcome::Reached);
    assert_eq!(probe(&lab, "y/a", "x/b").await, ProbeOutcome::Reached);
    lab.lab.shutdown().await.unwrap();
}
