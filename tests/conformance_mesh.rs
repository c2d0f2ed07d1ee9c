//! The conformance scenarios of `conformance.rs`, unchanged, with every lab
//! pod meshed STRICT: TCP between pods travels as HBONE through the agent's
//! proxies, the inbound proxy hands each flow to the kernel to judge from
//! the client's own address, and every matrix, counter and flow must come
//! out exactly as without the mesh.

use portcullis_agent::mesh::mode::MeshMode;

async fn start_lab(name: &str) -> portcullis_tests::TestLab {
    start_lab_with(name, portcullis_agent::lab::topology::default_topology()).await
}

/// The scenario's lab, meshed: probes start once every pod's listeners and
/// certificate are ready.
async fn start_lab_with(
    name: &str,
    mut topology: portcullis_agent::lab::topology::Topology,
) -> portcullis_tests::TestLab {
    topology.mesh_all(MeshMode::Strict);
    let lab = portcullis_tests::start_lab_with(&format!("m{name}"), topology).await;
    lab.wait_applied()
        .await
        .expect("every meshed pod's listeners and certificate are ready");
    lab
}

include!("scenarios/conformance.rs");
