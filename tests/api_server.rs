//! The test control plane itself (the pinned Kubernetes release runs, our
//! CRDs install), and the agent's permissions as deploy/ grants them.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use portcullis_agent::source::{
    kube::{KubeOptions, KubeSource},
    Source,
};
use portcullis_tests::kube_api::ControlPlane;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_serves_the_pinned_release_with_our_crds() {
    let plane = ControlPlane::start().await.unwrap();
    let client = plane.client().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "35")
    );
    let out = plane
        .kubectl()
        .args(["get", "l4policies,clusterl4policies", "-A"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// deploy/rbac.yaml with the EndpointSlice rule removed: what an operator
/// who trimmed the ClusterRole, or an older manifest, gives the agent.
fn rbac_without_endpointslices() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rbac.yaml");
    let rbac = std::fs::read_to_string(&path).unwrap();
    let rule = "  - apiGroups: [discovery.k8s.io]\n    resources: [endpointslices]\n    \
                verbs: [get, list, watch]\n";
    assert!(
        rbac.contains(rule),
        "deploy/rbac.yaml grants EndpointSlices"
    );
    rbac.replace(rule, "")
}

/// The agent, as the ServiceAccount of deploy/, names the permission it
/// lacks and stays not ready; once the ClusterRole is fixed it becomes
/// ready without a restart, although no EndpointSlice ever changed (its
/// resumed watch has nothing to deliver).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_is_named_and_a_fixed_role_is_picked_up() {
    let plane = ControlPlane::start().await.unwrap();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    plane.kubectl_ok(
        &[
            "apply",
            "-f",
            deploy.join("namespace.yaml").to_str().unwrap(),
        ],
        "",
    );
    plane.kubectl_ok(&["apply", "-f", "-"], &rbac_without_endpointslices());
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
    let client = plane
        .client_with(&plane.kubeconfig_for("agent", token.trim()))
        .await;
    let cgroups = tempfile::tempdir().unwrap();
    let mut options = KubeOptions::new(client, "n1");
    options.reporter = None;
    options.probe_interval = Duration::from_millis(200);
    let source = KubeSource::start(options, cgroups.path()).unwrap();
    let why = until("the missing permission to be reported", || {
        source
            .degraded()
            .filter(|d| d.contains("endpointslices: 403"))
    })
    .await;
    assert!(
        why.contains("cannot list resource \"endpointslices\"") && why.contains("ClusterRole"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(source.degraded().is_some(), "still not ready");

    plane.kubectl_ok(
        &["apply", "-f", deploy.join("rbac.yaml").to_str().unwrap()],
        "",
    );
    until("the fixed role to be picked up", || {
        source.degraded().is_none().then_some(())
    })
    .await;
    assert!(source.revision().is_some(), "every list arrived");
}

/// Polls `check` until it holds; the bound only turns a hang into a
/// failure.
async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
