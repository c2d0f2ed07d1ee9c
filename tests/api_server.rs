//! The test control plane itself: the pinned Kubernetes release runs, our
//! CRDs install, and it stops leaving nothing behind.

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
