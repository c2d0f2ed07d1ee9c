//! Transparent mTLS through the real kernel and the agent's proxies: lab
//! pods meshed by their namespaces' `portcullis.dev/mtls` label, the
//! kernel redirecting their connects to the agent's listener in each pod's
//! network namespace, HBONE between the pods, and the application handed
//! the connection from the client's own address.

use portcullis_agent::{
    lab::{pod::ProbeOutcome, topology::default_topology, Family, Lab},
    mesh::mode::{MeshMode, MODE_LABEL},
};
use portcullis_common::{mesh, DIRECTION_INGRESS, REASON_PLAINTEXT, VERDICT_DENY};
use portcullis_tests::{
    mesh_wire::{
        keylog_file, pod_ip, python_in, read_line, start_server, tcp, tshark_fields, until_outcome,
        Capture,
    },
    start_lab_with, TestLab,
};

/// The default lab with every namespace STRICT, except what `adjust` changes.
async fn meshed_lab(
    name: &str,
    adjust: impl FnOnce(&mut portcullis_agent::lab::topology::Topology),
) -> TestLab {
    let mut topology = default_topology();
    topology.mesh_all(MeshMode::Strict);
    adjust(&mut topology);
    keylog_file();
    let lab = start_lab_with(name, topology).await;
    lab.wait_applied().await.expect("agent applies");
    lab
}

fn set_namespace_mode(t: &mut portcullis_agent::lab::topology::Topology, ns: &str, mode: &str) {
    let n = t
        .namespaces
        .iter_mut()
        .find(|n| n.name == ns)
        .expect("namespace");
    n.labels.insert(MODE_LABEL.into(), mode.into());
}

/// The whole promise on the wire: a marker sent between two STRICT pods
/// never crosses in plaintext, the records are TLS 1.3, the client's
/// certificate names its SPIFFE ID; the server sees the client pod's
/// address, and the client's getpeername() the server's.
#[tokio::test]
async fn strict_pods_talk_tls13_with_spiffe_certificates_and_real_addresses() {
    let keylog = keylog_file();
    let lab = meshed_lab("mesh-wire", |_| {}).await;
    // From before the first connection: x/a's connections to x/b share one
    // pooled HBONE connection, whose handshake the capture must hold.
    let dir = tempfile::tempdir().unwrap();
    let capture = Capture::start(&lab, "x/b", &dir.path().join("wire.pcap")).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;

    let mut server = start_server(&lab, "x/b", 8080);
    assert_eq!(read_line(&mut server).await, "ready");
    let server_ip = pod_ip(&lab, "x/b");
    let marker = format!("portcullis-marker-{}", std::process::id());
    let client = python_in(
        &lab,
        "x/a",
        &format!(
            "import socket\n\
             c = socket.create_connection(('{server_ip}', 8080), timeout=10)\n\
             print('peername', c.getpeername()[0], c.getpeername()[1])\n\
             c.sendall(b'{marker}'); print('echo', c.recv(4096).decode())\n"
        ),
    )
    .await;
    assert!(
        client.contains(&format!("peername {server_ip} 8080")),
        "the client's getpeername() names the original destination: {client}"
    );
    assert!(client.contains(&format!("echo {marker}")), "{client}");
    assert_eq!(
        read_line(&mut server).await,
        format!("peer {}", pod_ip(&lab, "x/a")),
        "the server sees the client pod's address"
    );
    let wire = capture.stop().await;
    assert!(!wire.is_empty(), "the capture holds the exchange");
    assert!(
        !wire.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the wire in plaintext"
    );
    let pcap = dir.path().join("wire.pcap");
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
    let sans = tshark(
        "tls.handshake.type == 11",
        "x509ce.uniformResourceIdentifier",
    );
    assert!(
        sans.contains("spiffe://cluster.local/ns/x/sa/a"),
        "the client's certificate names its SPIFFE ID: {sans:?}"
    );
    assert!(
        sans.contains("spiffe://cluster.local/ns/x/sa/b"),
        "the server's certificate names its SPIFFE ID: {sans:?}"
    );
    drop(server);
    lab.lab.shutdown().await.expect("shutdown");
}

/// STRICT refuses an unmeshed client (counted, with its reason), PERMISSIVE
/// accepts one, the node reaches pods in every mode, and a meshed pod
/// still reaches a pod outside the mesh.
#[tokio::test]
async fn strict_refuses_plaintext_permissive_accepts_it_and_the_node_always_reaches() {
    let lab = meshed_lab("mesh-modes", |t| {
        set_namespace_mode(t, "y", "permissive");
        set_namespace_mode(t, "z", "disabled");
    })
    .await;
    until_outcome(&lab, "x/a", "y/a", 80, ProbeOutcome::Reached).await;
    let plaintext_drops = |lab: &Lab| -> u64 {
        lab.counters()
            .expect("counters")
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
        .probe("z/a", "x/a", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert_eq!(
        o,
        ProbeOutcome::TimedOut,
        "STRICT x/a refuses plaintext from unmeshed z/a"
    );
    assert!(
        plaintext_drops(&lab) > before,
        "the refusal is counted as plaintext"
    );
    let o = lab
        .probe("z/a", "y/a", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert_eq!(o, ProbeOutcome::Reached, "PERMISSIVE y/a accepts plaintext");
    for to in ["x/a", "y/a", "z/a"] {
        let o = lab
            .probe_from_node(to, tcp(80), Family::Ipv4)
            .await
            .unwrap();
        assert_eq!(o, ProbeOutcome::Reached, "the node reaches {to}");
    }
    let o = lab
        .probe("x/a", "z/a", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert_eq!(
        o,
        ProbeOutcome::Reached,
        "a meshed pod reaches one outside the mesh"
    );
    let metrics = lab.agent_metrics().expect("metrics").encode().unwrap();
    for needle in [
        "portcullis_mesh_connections_total{direction=\"outbound\",mode=\"strict\",result=\"mtls\"}",
        "portcullis_mesh_connections_total{direction=\"outbound\",mode=\"strict\",result=\"passthrough\"}",
        "portcullis_mesh_connections_total{direction=\"inbound\",mode=\"permissive\",result=\"mtls\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from:\n{metrics}");
    }
    lab.lab.shutdown().await.expect("shutdown");
}

/// Policy holds through the proxies: port 15008 is no way around it.
#[tokio::test]
async fn policy_applies_to_proxied_connections() {
    let lab = meshed_lab("mesh-policy", |_| {}).await;
    lab.write_policy(
        "only-a.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: only-a, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: b}}\n  policyTypes: [Ingress]\n\
         \x20 ingress:\n  - from: [{podSelector: {matchLabels: {pod: a}}}]\n",
    )
    .unwrap();
    lab.wait_applied().await.unwrap();
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let o = lab
        .probe("x/c", "x/b", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert!(
        !o.reached(),
        "x/c is not allowed into x/b through the mesh: {o:?}"
    );
    let metrics = lab.agent_metrics().expect("metrics").encode().unwrap();
    assert!(
        metrics.contains(
            "portcullis_mesh_failures_total{direction=\"inbound\",reason=\"policy_denied\"}"
        ),
        "{metrics}"
    );
    lab.lab.shutdown().await.expect("shutdown");
}

/// With the agent gone, a STRICT pod's connects are refused and not one
/// byte leaves in plaintext; a new agent serves again at once.
#[tokio::test]
async fn strict_connects_fail_closed_while_the_agent_is_down() {
    let mut lab = meshed_lab("mesh-down", |_| {}).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    lab.stop_agent();
    let dir = tempfile::tempdir().unwrap();
    let capture = Capture::start(&lab, "x/a", &dir.path().join("down.pcap")).await;
    let o = lab
        .probe("x/a", "x/b", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert_eq!(
        o,
        ProbeOutcome::Refused,
        "no listener: the connect is refused"
    );
    lab.reattach_agent().await.expect("agent restarts");
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    capture.stop().await;
    // Over the whole outage and the recovery, x/a sent x/b nothing but
    // HBONE (the capture saw that much, so it was working).
    let to_b = format!("ip.dst == {}", pod_ip(&lab, "x/b"));
    let ports: std::collections::BTreeSet<String> =
        tshark_fields(&dir.path().join("down.pcap"), &to_b, "tcp.dstport", &[])
            .lines()
            .map(|l| l.trim().to_string())
            .collect();
    assert_eq!(
        ports,
        std::collections::BTreeSet::from([mesh::INBOUND_PORT.to_string()]),
        "x/a → x/b carried only HBONE, never plaintext"
    );
    lab.lab.shutdown().await.expect("shutdown");
}

/// What a process inside a pod would try against the mesh's own ports:
/// the outbound listener with no redirected connection behind it, the
/// HBONE port of a peer through the mesh (a tunnel into the tunnel), and
/// the HBONE port from outside the mesh with TLS but no certificate. Each
/// is refused before any application is connected to.
#[tokio::test]
async fn the_mesh_ports_are_no_way_in() {
    let lab = meshed_lab("mesh-attack", |t| set_namespace_mode(t, "z", "disabled")).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let x_b = pod_ip(&lab, "x/b");
    // Prints how the exchange ended: `echo` only if data came back.
    let exchange = |host: String, port: u16| {
        format!(
            "import socket\n\
             try:\n    c = socket.create_connection(('{host}', {port}), timeout=5)\n\
             \x20   c.sendall(b'ping'); d = c.recv(16)\n    print('echo' if d else 'closed')\n\
             except OSError as e:\n    print('error', e.errno)\n"
        )
    };
    let direct = python_in(
        &lab,
        "x/a",
        &exchange("127.0.0.1".into(), mesh::OUTBOUND_PORT),
    )
    .await;
    assert!(
        !direct.contains("echo"),
        "the outbound listener, dialled directly: {direct}"
    );
    let nested = python_in(&lab, "x/a", &exchange(x_b.to_string(), mesh::INBOUND_PORT)).await;
    assert!(
        !nested.contains("echo"),
        "a peer's HBONE port through the mesh: {nested}"
    );
    let no_certificate = python_in(
        &lab,
        "z/a",
        &format!(
            "import socket, ssl\n\
             ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False\n\
             ctx.verify_mode = ssl.CERT_NONE; ctx.set_alpn_protocols(['h2'])\n\
             try:\n    s = ctx.wrap_socket(socket.create_connection(('{x_b}', {}), timeout=5))\n\
             \x20   s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n'); print('sent', len(s.recv(64)))\n\
             except (OSError, ssl.SSLError) as e:\n    print('refused', e)\n",
            mesh::INBOUND_PORT
        ),
    )
    .await;
    assert!(
        no_certificate.contains("refused"),
        "TLS without a certificate: {no_certificate}"
    );
    let metrics = lab.agent_metrics().expect("metrics").encode().unwrap();
    for (direction, reason) in [
        ("outbound", "no_original_destination"),
        ("inbound", "reserved_port"),
    ] {
        let series = format!(
            "portcullis_mesh_failures_total{{direction=\"{direction}\",reason=\"{reason}\"}}"
        );
        assert!(
            metrics.contains(&series),
            "{series} missing from:\n{metrics}"
        );
    }
    lab.lab.shutdown().await.expect("shutdown");
}
