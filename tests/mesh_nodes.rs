//! The two-node lab (`portcullis lab --nodes 2`): pods on two simulated
//! nodes, each with its own bridge and agent, joined by a link. Plain
//! reachability and policy across the link, then the mesh as a cluster
//! shows it: only HBONE (TLS 1.3, both SPIFFE IDs) crosses between nodes,
//! real addresses on both ends, STRICT refusing an unmeshed pod of the
//! other node.

use std::{collections::BTreeSet, net::IpAddr};

use portcullis_agent::{
    lab::{
        node::pin_dir_for_node,
        pin_dir_for,
        plumbing::netns_path,
        pod::ProbeOutcome,
        topology::{default_topology, Topology},
        Family, Lab, LabOptions,
    },
    mesh::mode::{MeshMode, MODE_LABEL},
};
use portcullis_common::{mesh, DIRECTION_INGRESS, REASON_PLAINTEXT, VERDICT_DENY};
use portcullis_tests::{
    attack::Place,
    mesh_wire::{
        exchange, keylog_file, pod_ip, read_line, start_server, start_server_on, tcp,
        tshark_fields, until_outcome, Capture,
    },
    start_lab_with_options, TestLab,
};

/// A two-node lab on `topology`, policies applied (and, when meshed, every
/// pod's listeners and certificate ready on both nodes). Every test names
/// the key log: the process's first handshake decides whether keys are
/// logged.
async fn two_nodes(name: &str, topology: Topology) -> TestLab {
    keylog_file();
    let mut opts = LabOptions::new(name, topology);
    opts.nodes = 2;
    let lab = start_lab_with_options(opts).await;
    lab.wait_applied().await.expect("both agents apply");
    lab
}

/// The default topology with every namespace STRICT, then `adjust`.
fn meshed(adjust: impl FnOnce(&mut Topology)) -> Topology {
    let mut topology = default_topology();
    topology.mesh_all(MeshMode::Strict);
    adjust(&mut topology);
    topology
}

fn set_namespace_mode(t: &mut Topology, ns: &str, mode: &str) {
    let n = t
        .namespaces
        .iter_mut()
        .find(|n| n.name == ns)
        .expect("namespace");
    n.labels.insert(MODE_LABEL.into(), mode.into());
}

/// Asserts the pods of a test sit where the test means them to.
fn assert_nodes(lab: &Lab, placed: &[(&str, usize)]) {
    for (key, node) in placed {
        assert_eq!(lab.pod_node(key).expect("pod"), *node, "{key}'s node");
    }
}

/// Pods of both nodes reach each other on TCP and UDP, over IPv4 and IPv6,
/// with unique addresses; ingress policy holds on the destination's node
/// for sources on the other node, egress policy on the source's node for
/// destinations on the other; and stopping the lab removes both nodes.
#[tokio::test]
async fn pods_on_two_nodes_reach_each_other_and_policy_holds_across_the_link() {
    let lab = two_nodes("nodes-plain", default_topology()).await;
    assert_nodes(&lab, &[("x/a", 1), ("x/b", 2), ("x/c", 1), ("y/a", 2)]);
    let addresses: BTreeSet<_> = lab.pods().iter().map(|p| p.ipv4).collect();
    assert_eq!(addresses.len(), lab.pods().len(), "unique pod addresses");
    for spec in ["80/tcp", "81/udp"] {
        lab.assert_matrix(spec, Family::Ipv4, |_, _| true).await;
    }
    lab.assert_matrix("80/tcp", Family::Ipv6, |_, _| true).await;

    // Node 2's agent keeps pods named a (x/a and z/a on node 1, y/a on
    // node 2) out of x/b; node 1's keeps x/c from every pod but b's.
    lab.apply(
        "policies.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: not-from-a, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n\
         \x20 ingress:\n  - from:\n    - namespaceSelector: {}\n\
         \x20     podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [a]}]}\n\
         ---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: c-to-b-only, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: c}}\n  policyTypes: [Egress]\n\
         \x20 egress:\n  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: b}}}]\n",
    )
    .await;
    let expected = |from: &str, to: &str| {
        let into_x_b = to == "x/b" && from.ends_with("/a");
        // A pod's own address is loopback: always allowed.
        let out_of_x_c = from == "x/c" && !to.ends_with("/b") && to != from;
        !into_x_b && !out_of_x_c
    };
    for spec in ["80/tcp", "81/udp"] {
        lab.assert_matrix(spec, Family::Ipv4, expected).await;
    }
    let o = lab
        .probe("x/a", "x/b", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert_eq!(o, ProbeOutcome::TimedOut, "x/b's node drops x/a's SYN");
    let o = lab
        .probe("x/c", "y/a", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert_eq!(o, ProbeOutcome::Denied, "x/c's node refuses the connect");

    let lab_cgroup = lab
        .cgroup_root()
        .parent()
        .expect("lab cgroup")
        .to_path_buf();
    let netns = [
        lab.node_netns_of(1).unwrap(),
        lab.node_netns_of(2).unwrap(),
        lab.pod_netns("x/b").unwrap(),
    ];
    lab.lab.shutdown().await.expect("shutdown");
    for ns in netns {
        assert!(!netns_path(&ns).exists(), "{ns} removed");
    }
    for pins in [
        pin_dir_for("nodes-plain"),
        pin_dir_for_node("nodes-plain", 2),
    ] {
        assert!(!pins.exists(), "{} removed", pins.display());
    }
    assert!(!lab_cgroup.exists(), "{} removed", lab_cgroup.display());
}

/// Everything that crosses the node-to-node link between meshed pods is
/// HBONE: a marker never shows in plaintext, every ServerHello picks TLS
/// 1.3, each side's certificate names its own SPIFFE ID (read from the
/// handshake with the agents' key log), and port 15008 is the only TCP
/// port on the link.
#[tokio::test]
async fn only_hbone_with_both_spiffe_ids_crosses_the_node_link() {
    let keylog = keylog_file();
    let lab = two_nodes("nodes-wire", meshed(|_| {})).await;
    assert_nodes(&lab, &[("x/a", 1), ("x/b", 2), ("y/a", 2), ("y/b", 1)]);
    // Each agent holds certificates for its own node's pods, and only those.
    for node in [1, 2] {
        let held: BTreeSet<String> = lab
            .node_agent_certificates(node)
            .expect("identities on")
            .borrow()
            .keys()
            .map(|id| id.to_string())
            .collect();
        let own: BTreeSet<String> = lab
            .pods()
            .iter()
            .filter(|p| p.node == node)
            .map(|p| format!("spiffe://cluster.local/ns/{}", p.key.replace('/', "/sa/")))
            .collect();
        assert_eq!(held, own, "node {node}'s agent's certificates");
    }
    let [link, _] = lab.node_link().expect("two nodes have a link");
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("link.pcap");
    // From before the first connection: pooled HBONE connections carry
    // every later one, and the capture must hold their handshakes.
    let capture = Capture::on(Place::netns(&link.netns), &link.interface, &pcap).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    until_outcome(&lab, "y/a", "y/b", 80, ProbeOutcome::Reached).await;

    let mut server = start_server(&lab, "x/b", 8080);
    assert_eq!(read_line(&mut server).await, "ready");
    let marker = format!("portcullis-two-node-marker-{}", std::process::id());
    let client = exchange(&lab, "x/a", pod_ip(&lab, "x/b"), 8080, &marker).await;
    assert!(client.contains(&format!("echo {marker}")), "{client}");
    drop(server);
    let wire = capture.stop().await;

    assert!(!wire.is_empty(), "the capture holds the exchange");
    assert!(
        !wire.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the node link in plaintext"
    );
    let keys = format!("tls.keylog_file:{}", keylog.display());
    let hbone = format!("tcp.port=={},tls", mesh::INBOUND_PORT);
    let tshark = |filter: &str, field: &str| {
        tshark_fields(&pcap, filter, field, &["-o", &keys, "-d", &hbone])
    };
    let versions = tshark(
        "tls.handshake.type == 2",
        "tls.handshake.extensions.supported_version",
    );
    assert!(
        !versions.trim().is_empty() && versions.lines().all(|v| v.trim() == "0x0304"),
        "every ServerHello selects TLS 1.3: {versions:?}"
    );
    // Each pod's Certificate message, by the address that sent it: x/a and
    // y/a as clients, x/b and y/b as servers, across the link both ways.
    for key in ["x/a", "x/b", "y/a", "y/b"] {
        let sans = tshark(
            &format!(
                "tls.handshake.type == 11 && ip.src == {}",
                pod_ip(&lab, key)
            ),
            "x509ce.uniformResourceIdentifier",
        );
        let (ns, sa) = key.split_once('/').unwrap();
        let want = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}");
        assert!(
            !sans.trim().is_empty() && sans.lines().all(|l| l.trim() == want),
            "{key}'s certificate on the link names {want}: {sans:?}"
        );
    }
    let hbone_packets = tshark(
        &format!("tcp.port == {}", mesh::INBOUND_PORT),
        "frame.number",
    );
    assert!(!hbone_packets.trim().is_empty(), "HBONE crossed the link");
    let other = tshark(
        &format!("tcp && !(tcp.port == {})", mesh::INBOUND_PORT),
        "tcp.dstport",
    );
    assert!(
        other.trim().is_empty(),
        "TCP ports other than {} crossed the node link: {other:?}",
        mesh::INBOUND_PORT
    );
    lab.lab.shutdown().await.expect("shutdown");
}

/// Across nodes, the server's application sees the client pod's own
/// address, and the client's getpeername() the original destination, both
/// ways and over IPv4 and IPv6.
#[tokio::test]
async fn meshed_pods_on_two_nodes_see_real_addresses() {
    let lab = two_nodes("nodes-addr", meshed(|_| {})).await;
    assert_nodes(&lab, &[("x/a", 1), ("x/b", 2)]);
    let address = |key: &str, family: Family| -> IpAddr {
        let pod = lab.pods().iter().find(|p| p.key == key).expect("pod");
        match family {
            Family::Ipv4 => pod.ipv4.into(),
            Family::Ipv6 => pod.ipv6.into(),
        }
    };
    for (client, server) in [("x/a", "x/b"), ("x/b", "x/a")] {
        until_outcome(&lab, client, server, 80, ProbeOutcome::Reached).await;
        for (family, socket_family, any) in [
            (Family::Ipv4, "AF_INET", "0.0.0.0"),
            (Family::Ipv6, "AF_INET6", "::"),
        ] {
            let mut app = start_server_on(&lab, server, socket_family, any, 8080);
            assert_eq!(read_line(&mut app).await, "ready");
            let server_ip = address(server, family);
            let said = exchange(&lab, client, server_ip, 8080, "hello").await;
            assert!(
                said.contains(&format!("peername {server_ip} 8080")),
                "{client}'s getpeername() names the original destination: {said}"
            );
            assert!(said.contains("echo hello"), "{said}");
            assert_eq!(
                read_line(&mut app).await,
                format!("peer {}", address(client, family)),
                "{server} sees {client}'s address over {family:?}"
            );
        }
    }
    lab.lab.shutdown().await.expect("shutdown");
}

/// A STRICT pod on node 2 refuses plaintext from an unmeshed pod on node 1
/// (node 2's kernel drops it, counted as plaintext), while a meshed pod of
/// node 1 gets through, and a meshed pod still reaches an unmeshed one on
/// the other node.
#[tokio::test]
async fn strict_on_one_node_refuses_an_unmeshed_pod_of_the_other() {
    let lab = two_nodes(
        "nodes-strict",
        meshed(|t| set_namespace_mode(t, "z", "disabled")),
    )
    .await;
    assert_nodes(&lab, &[("x/a", 1), ("z/a", 1), ("x/b", 2), ("z/b", 2)]);
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let plaintext_drops = |lab: &Lab| -> u64 {
        lab.node_counters(2)
            .expect("node 2's counters")
            .iter()
            .filter(|s| {
                s.key.direction == DIRECTION_INGRESS
                    && s.key.verdict == VERDICT_DENY
                    && s.key.reason == REASON_PLAINTEXT
            })
            .map(|s| s.count)
            .sum()
    };
    let before = plaintext_drops(&lab);
    let o = lab
        .probe("z/a", "x/b", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert_eq!(
        o,
        ProbeOutcome::TimedOut,
        "STRICT x/b (node 2) refuses plaintext from unmeshed z/a (node 1)"
    );
    assert!(
        plaintext_drops(&lab) > before,
        "node 2 counts the refusal as plaintext"
    );
    let o = lab
        .probe("x/a", "z/b", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert_eq!(
        o,
        ProbeOutcome::Reached,
        "meshed x/a reaches unmeshed z/b on the other node"
    );
    let inbound = lab.node_agent_metrics(2).expect("node 2's metrics");
    let text = inbound.encode().unwrap();
    let series =
        "portcullis_mesh_connections_total{direction=\"inbound\",mode=\"strict\",result=\"mtls\"}";
    assert!(text.contains(series), "{series} missing from:\n{text}");
    lab.lab.shutdown().await.expect("shutdown");
}
