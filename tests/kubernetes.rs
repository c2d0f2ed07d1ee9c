//! Kubernetes mode on the real data path: the agent takes pods and
//! policies from an API server (a mock one, the requests of which
//! `agent/tests/kube_source.rs` checks in detail), pods run in network
//! namespaces with cgroups laid out as a kubelet lays them out, and the
//! kernel enforces what the API says — through an API outage too.

#[path = "../agent/tests/support/mock_api.rs"]
mod mock_api;

use std::time::Duration;

use mock_api::{MockApi, NAMESPACES, NETWORK_POLICIES, NODES, PODS};
use portcullis_agent::lab::{
    kube::{namespace_objects, node_object, pod_objects, pod_uid, LabKube},
    pod::ProbeOutcome,
    topology::{default_topology, plan},
    Family, Lab, LabOptions,
};
use portcullis_tests::{http_get, start_lab_with_options};
use serde_json::json;

const NODE: &str = "lab-node";

/// x/a accepts TCP 80 only from pods labelled pod=b of its namespace.
fn only_b_to_a() -> serde_json::Value {
    json!({
        "metadata": {"name": "only-b", "namespace": "x"},
        "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}],
                         "ports": [{"port": 80, "protocol": "TCP"}]}]
        }
    })
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_from_the_api_is_enforced_and_survives_an_api_outage() {
    let (client, api) = MockApi::start();
    let topology = default_topology();
    populate(&api, &topology);
    let mut options = LabOptions::new("kube", topology);
    options.admin_addr = Some("127.0.0.1:0".parse().unwrap());
    options.kubernetes = Some(LabKube::new(client, NODE));
    let lab = start_lab_with_options(options).await;
    let status = lab.wait_applied().await.unwrap();
    assert!(
        status.waiting_for_cgroup.is_empty(),
        "every pod's kubelet-style cgroup was found: {:?}",
        status.waiting_for_cgroup
    );
    assert_eq!(status.usage.endpoints, 9, "nine local pods programmed");
    assert_eq!(probe(&lab, "y/c", "x/a").await, ProbeOutcome::Reached);

    // A NetworkPolicy arrives over the watch.
    let before = status.applied;
    api.apply(NETWORK_POLICIES, only_b_to_a());
    lab.wait_status(|s| s.applied > before).await.unwrap();
    assert_eq!(probe(&lab, "x/b", "x/a").await, ProbeOutcome::Reached);
    assert_eq!(probe(&lab, "y/c", "x/a").await, ProbeOutcome::TimedOut);

    // The API server goes away: not ready, and the kernel keeps enforcing.
    api.set_down(true);
    let degraded = lab
        .wait_status(|s| s.degraded.is_some())
        .await
        .unwrap()
        .degraded
        .unwrap();
    assert!(
        degraded.contains("unreachable") || degraded.contains("503"),
        "{degraded}"
    );
    let admin = lab.admin_addr().unwrap();
    let ready = http_get(admin, "/readyz", None).await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert!(ready.body.contains("last applied state"), "{}", ready.body);
    let metrics = http_get(admin, "/metrics", None).await.body;
    assert!(
        metrics.contains("\nportcullis_source_degraded 1\n"),
        "the outage shows in the metrics:\n{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(probe(&lab, "y/c", "x/a").await, ProbeOutcome::TimedOut);
    assert_eq!(probe(&lab, "x/b", "x/a").await, ProbeOutcome::Reached);

    // Back: ready again, and a deletion made afterwards is enforced.
    api.set_down(false);
    let status = lab.wait_status(|s| s.degraded.is_none()).await.unwrap();
    assert_eq!(http_get(admin, "/readyz", None).await.status, 200);
    let metrics = http_get(admin, "/metrics", None).await.body;
    assert!(
        metrics.contains("\nportcullis_source_degraded 0\n"),
        "{metrics}"
    );
    api.delete(NETWORK_POLICIES, "x", "only-b");
    lab.wait_status(|s| s.applied > status.applied)
        .await
        .unwrap();
    assert_eq!(probe(&lab, "y/c", "x/a").await, ProbeOutcome::Reached);

    // A deleted pod is no longer a known peer: x/a isolated again, now
    // allowing pod=b; deleting x/b makes its address unknown (world).
    let status = lab.agent_status().unwrap().borrow().clone();
    api.apply(NETWORK_POLICIES, only_b_to_a());
    let status = lab
        .wait_status(|s| s.applied > status.applied)
        .await
        .unwrap();
    api.delete(PODS, "x", "b");
    lab.wait_status(|s| s.applied > status.applied)
        .await
        .unwrap();
    assert_eq!(probe(&lab, "x/b", "x/a").await, ProbeOutcome::TimedOut);
    lab.lab.shutdown().await.unwrap();
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
