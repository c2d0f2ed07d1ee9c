//! `cargo xtask kube up`: the tests' control plane for a person — etcd and
//! kube-apiserver on loopback with our CRDs installed, until Ctrl-C; then
//! both stop and their directory is removed.

use portcullis_tests::kube_api::ControlPlane;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let plane = match ControlPlane::start().await {
        Ok(plane) => plane,
        Err(e) => {
            eprintln!("✗ starting the control plane: {e}");
            std::process::exit(1);
        }
    };
    let kubectl = portcullis_tests::kube_api::program("kubectl");
    println!(
        "API server {} is ready (admin token, our CRDs installed).",
        plane.url()
    );
    println!("  export KUBECONFIG={}", plane.kubeconfig().display());
    println!("  alias kubectl={}", kubectl.display());
    println!("Ctrl-C stops it and removes its data.");
    let _ = tokio::signal::ctrl_c().await;
    drop(plane);
    println!("stopped");
}
