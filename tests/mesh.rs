//! Transparent mTLS through the real kernel and the agent's proxies: lab
//! pods meshed by their namespaces' `portcullis.dev/mtls` label, the
//! kernel redirecting their connects to the agent's listener in each pod's
//! network namespace, HBONE between the pods, and the application handed
//! the connection from the client's own address.

use std::time::{Duration, Instant};

use portcullis_agent::{
    bpf::events::EventReader,
    flows::Namer,
    lab::{pod::ProbeOutcome, topology::default_topology, Family, Lab, LabOptions},
    mesh::mode::{MeshMode, MODE_LABEL},
    policy::parse::parse_inventory,
    reconcile::PublishedNames,
};
use portcullis_common::{mesh, DIRECTION_INGRESS, REASON_PLAINTEXT, VERDICT_DENY};
use portcullis_tests::{
    agent_process::AgentProcess,
    mesh_wire::{
        exchange, keylog_file, pod_ip, python_in, read_line, start_server, start_server_on, tcp,
        tshark_fields, until_outcome, Capture,
    },
    start_lab_with, start_lab_with_options, TestLab,
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

/// What the kernel counted in one direction with one verdict, all rules.
fn kernel_count(lab: &Lab, direction: u8, verdict: u8) -> u64 {
    lab.counters()
        .expect("kernel counters")
        .iter()
        .filter(|s| s.key.direction == direction && s.key.verdict == verdict)
        .map(|s| s.count)
        .sum()
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
    let client = exchange(&lab, "x/a", server_ip, 8080, &marker).await;
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

/// IPv6 is meshed as IPv4 is: captured to the pod's IPv6 listener, carried
/// as HBONE to the peer's IPv6 address, handed to the application from the
/// client's own IPv6 address; nothing in plaintext on the wire.
#[tokio::test]
async fn ipv6_is_meshed_like_ipv4() {
    let lab = meshed_lab("mesh-ipv6", |_| {}).await;
    let v6 = |key: &str| lab.pods().iter().find(|p| p.key == key).expect("pod").ipv6;
    let (client_ip, server_ip) = (v6("x/a"), v6("x/b"));
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("v6.pcap");
    let capture = Capture::start(&lab, "x/b", &pcap).await;
    let mut server = start_server_on(&lab, "x/b", "AF_INET6", "::", 8080);
    assert_eq!(read_line(&mut server).await, "ready");
    let marker = format!("portcullis-v6-marker-{}", std::process::id());
    let client = exchange(&lab, "x/a", server_ip.into(), 8080, &marker).await;
    assert!(
        client.contains(&format!("peername {server_ip} 8080")),
        "the client's getpeername() names the original destination: {client}"
    );
    assert!(client.contains(&format!("echo {marker}")), "{client}");
    assert_eq!(
        read_line(&mut server).await,
        format!("peer {client_ip}"),
        "the server sees the client pod's IPv6 address"
    );
    let wire = capture.stop().await;
    assert!(
        !wire.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "the marker crossed the wire in plaintext"
    );
    let ports: std::collections::BTreeSet<String> = tshark_fields(
        &pcap,
        &format!("ipv6.dst == {server_ip}"),
        "tcp.dstport",
        &[],
    )
    .lines()
    .map(|l| l.trim().to_string())
    .collect();
    assert_eq!(
        ports,
        [mesh::INBOUND_PORT.to_string()].into(),
        "x/a sent x/b only HBONE over IPv6"
    );
    let metrics = lab.agent_metrics().expect("metrics").encode().unwrap();
    assert!(
        metrics.contains(
            "portcullis_mesh_connections_total{direction=\"outbound\",mode=\"strict\",result=\"mtls\"}"
        ),
        "{metrics}"
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
    let mut reader = EventReader::open(lab.pin_dir()).unwrap();
    while reader.next(Duration::from_millis(300)).is_some() {}
    let denied_before = kernel_count(&lab, DIRECTION_INGRESS, VERDICT_DENY);
    let o = lab
        .probe("x/c", "x/b", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert!(
        !o.reached(),
        "x/c is not allowed into x/b through the mesh: {o:?}"
    );
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    // The kernel judged both handovers as it judges plaintext: the refused
    // one is counted, and both are flow events from the real client, over
    // mTLS with the client's SPIFFE ID.
    assert!(
        kernel_count(&lab, DIRECTION_INGRESS, VERDICT_DENY) > denied_before,
        "the kernel counted x/c's refused flow"
    );
    let names: PublishedNames =
        serde_json::from_slice(&std::fs::read(lab.names_file()).unwrap()).unwrap();
    let inventory = parse_inventory(
        lab.workloads_file(),
        &std::fs::read_to_string(lab.workloads_file()).unwrap(),
    )
    .unwrap();
    let namer = Namer::new(&inventory, names);
    let mut flows = Vec::new();
    while let Some(e) = reader.next(Duration::from_millis(300)) {
        flows.push(namer.name(&e));
    }
    let seen = |from: &str, verdict: &str| {
        flows.iter().any(|f| {
            f.from == from
                && f.to == "x/b"
                && f.port == 80
                && f.direction == "ingress"
                && f.verdict == verdict
                && f.mesh == Some("mtls")
                && f.peer_identity.as_deref()
                    == Some(&*format!("spiffe://cluster.local/ns/x/sa/{}", &from[2..]))
        })
    };
    let shown: Vec<String> = flows.iter().map(|f| f.render()).collect();
    assert!(seen("x/c", "deny"), "x/c's refusal over mTLS: {shown:#?}");
    assert!(seen("x/a", "allow"), "x/a's flow over mTLS: {shown:#?}");
    assert!(
        flows.iter().any(|f| f.from == "x/a"
            && f.to == "x/b"
            && f.direction == "egress"
            && f.mesh == Some("mtls")),
        "x/a's connect, captured for mTLS: {shown:#?}"
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

/// Rules naming identities: the right service account gets in, the wrong
/// one does not, though the kernel alone (blind to certificates) would
/// deny both; `explain` shows both views.
#[tokio::test]
async fn identity_rules_admit_the_right_service_account_only() {
    let lab = meshed_lab("mesh-identity", |_| {}).await;
    lab.write_policy(
        "identities.yaml",
        "apiVersion: portcullis.dev/v1alpha1\nkind: L4Policy\n\
         metadata: {name: by-identity, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: b}}\n  ingress:\n\
         \x20 - from: [{identity: {spiffeId: 'spiffe://cluster.local/ns/x/sa/a'}}]\n\
         \x20   ports: [{port: 80}]\n\
         \x20 - from: [{identity: {namespace: y}}]\n\
         \x20   ports: [{port: 81}]\n",
    )
    .unwrap();
    lab.wait_applied().await.unwrap();
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let refused_before = mesh_refusals(&lab);
    for (from, port, allowed) in [
        ("x/c", 80, false),
        ("x/a", 81, false),
        ("y/a", 81, true),
        ("y/b", 81, true),
        ("y/a", 80, false),
        ("z/a", 81, false),
    ] {
        let o = lab
            .probe(from, "x/b", tcp(port), Family::Ipv4)
            .await
            .unwrap();
        assert_eq!(o.reached(), allowed, "{from} → x/b:{port}: {o:?}");
    }
    assert!(
        mesh_refusals(&lab) >= refused_before + 4,
        "the inbound proxy refused the four wrong identities"
    );
    let paths = portcullis_agent::explain::lab_paths("mesh-identity");
    let e = portcullis_agent::explain::explain(&paths, "x/a", "x/b", tcp(80), Family::Ipv4)
        .expect("explain");
    assert!(!e.allowed, "plaintext, no rule admits x/a: {}", e.render());
    assert!(e.kernel_agrees(), "{}", e.render());
    let m = e.mtls.as_ref().expect("both ends are meshed");
    assert!(m.allowed, "{}", e.render());
    assert_eq!(m.client_identity, "spiffe://cluster.local/ns/x/sa/a");
    assert!(
        e.render()
            .contains("over mTLS as spiffe://cluster.local/ns/x/sa/a: ALLOWED"),
        "{}",
        e.render()
    );
    let wrong = portcullis_agent::explain::explain(&paths, "x/c", "x/b", tcp(80), Family::Ipv4)
        .expect("explain");
    assert!(!wrong.mtls.expect("meshed").allowed);
    lab.lab.shutdown().await.expect("shutdown");
}

/// Inbound connections the mesh refused, every reason.
fn mesh_refusals(lab: &Lab) -> u64 {
    let text = lab.agent_metrics().expect("metrics").encode().unwrap();
    text.lines()
        .filter(|l| {
            l.starts_with("portcullis_mesh_connections_total{direction=\"inbound\"")
                && l.contains("result=\"refused\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
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
/// the HBONE port from outside the mesh with TLS but no certificate, or
/// with a certificate naming a meshed pod's identity from another root.
/// Each is refused before any application is connected to.
#[tokio::test]
async fn the_mesh_ports_are_no_way_in() {
    let lab = meshed_lab("mesh-attack", |t| set_namespace_mode(t, "z", "disabled")).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let x_b = pod_ip(&lab, "x/b");
    // Prints how the exchange ended: `echo` only if data came back.
    let attempt = |host: String, port: u16| {
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
        &attempt("127.0.0.1".into(), mesh::OUTBOUND_PORT),
    )
    .await;
    assert!(
        !direct.contains("echo"),
        "the outbound listener, dialled directly: {direct}"
    );
    let nested = python_in(&lab, "x/a", &attempt(x_b.to_string(), mesh::INBOUND_PORT)).await;
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
    // A certificate naming x/a's very identity, from another root.
    let foreign = tempfile::tempdir().unwrap();
    let (cert, key) = (foreign.path().join("c.pem"), foreign.path().join("k.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=impostor"])
        .args([
            "-addext",
            "subjectAltName=URI:spiffe://cluster.local/ns/x/sa/a",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let other_root = python_in(
        &lab,
        "z/a",
        &format!(
            "import socket, ssl\n\
             ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False\n\
             ctx.verify_mode = ssl.CERT_NONE; ctx.set_alpn_protocols(['h2'])\n\
             ctx.load_cert_chain('{}', '{}')\n\
             try:\n    s = ctx.wrap_socket(socket.create_connection(('{x_b}', {}), timeout=5))\n\
             \x20   s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n'); d = s.recv(64)\n\
             \x20   print('sent', len(d)) if d else print('refused: closed')\n\
             except (OSError, ssl.SSLError) as e:\n    print('refused', e)\n",
            cert.display(),
            key.display(),
            mesh::INBOUND_PORT
        ),
    )
    .await;
    assert!(
        other_root.contains("refused"),
        "a certificate from another root: {other_root}"
    );
    let metrics = lab.agent_metrics().expect("metrics").encode().unwrap();
    assert!(
        metrics.contains(
            "portcullis_mesh_failures_total{direction=\"inbound\",reason=\"peer_untrusted\"}"
        ) || metrics.contains(
            "portcullis_mesh_failures_total{direction=\"inbound\",reason=\"tls_handshake\"}"
        ),
        "the foreign root is counted as a handshake failure:\n{metrics}"
    );
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

/// A redirected connect whose connection the outbound listener never
/// accepts (here: the agent is down, so it is refused) still had its SYN
/// leave, and the kernel filed its original destination. Later, after x/a
/// is egress-isolated, a process in x/a connects to the outbound listener
/// itself from the same address and port: the agent must not carry that
/// connection to the destination judged allowed minutes of policy ago.
/// Control: x/a's ordinary connect to x/b is refused by then.
#[tokio::test]
async fn a_destination_filed_for_a_refused_connect_cannot_be_claimed_later() {
    const CLIENT_PORT: u16 = 47001;
    let mut lab = meshed_lab("mesh-stale", |_| {}).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let x_b = pod_ip(&lab, "x/b");
    let mut server = start_server(&lab, "x/b", 7070);
    assert_eq!(read_line(&mut server).await, "ready");
    let connect_from = |host: String, port: u16, bind: &str| {
        format!(
            "import socket\n\
             c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             c.bind(('{bind}', {CLIENT_PORT})); c.settimeout(5)\n\
             try:\n    c.connect(('{host}', {port})); c.sendall(b'claim'); d = c.recv(16)\n\
             \x20   print('echo' if d else 'closed')\n\
             except OSError as e:\n    print('error', e.errno)\n"
        )
    };
    lab.stop_agent();
    let planted = python_in(&lab, "x/a", &connect_from(x_b.to_string(), 7070, "0.0.0.0")).await;
    let filed = Instant::now();
    assert_eq!(
        planted.trim(),
        format!("error {}", libc::ECONNREFUSED),
        "with the agent down, the captured connect is refused"
    );
    lab.write_policy(
        "a-no-egress.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: a-no-egress, namespace: x}\n\
         spec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
    )
    .unwrap();
    lab.reattach_agent().await.expect("agent restarts");
    let o = lab
        .probe("x/a", "x/b", tcp(80), Family::Ipv4)
        .await
        .unwrap();
    assert!(!o.reached(), "x/a is egress-isolated now: {o:?}");
    let max_age = Duration::from_nanos(mesh::ORIGINAL_MAX_AGE_NS);
    tokio::time::sleep((max_age + Duration::from_millis(500)).saturating_sub(filed.elapsed()))
        .await;
    let claimed = python_in(
        &lab,
        "x/a",
        &connect_from("127.0.0.1".into(), mesh::OUTBOUND_PORT, "127.0.0.1"),
    )
    .await;
    assert!(
        !claimed.contains("echo"),
        "the filed destination was claimed from the same port: {claimed}"
    );
    let stale = metric_sum(
        &lab,
        "portcullis_mesh_failures_total{direction=\"outbound\",reason=\"stale_original_destination\"}",
    );
    assert_eq!(stale, 1.0, "the stale claim is counted");
    let _ = server.kill().await;
    lab.lab.shutdown().await.expect("shutdown");
}

/// The sum of a metric's samples (every label set).
fn metric_sum(lab: &Lab, name: &str) -> f64 {
    let text = lab.agent_metrics().expect("metrics").encode().unwrap();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Certificates that live 30 s, renewed at half-life, under two minutes of
/// continuous requests: new connections (over pooled HBONE connections and
/// over fresh handshakes, a new pod pair every two seconds) and one
/// connection held throughout. Not one request fails.
#[tokio::test]
async fn thirty_second_certificates_renew_under_load_without_a_failure() {
    let mut topology = default_topology();
    topology.mesh_all(MeshMode::Strict);
    let mut options = LabOptions::new("mesh-rotation", topology);
    options.leaf_lifetime = Duration::from_secs(30);
    let lab = start_lab_with_options(options).await;
    lab.wait_applied().await.expect("agent applies");
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let (held, o) = lab.hold("x/a", "x/b", 80, Family::Ipv4).await.unwrap();
    assert_eq!(o, ProbeOutcome::Reached);
    let renewals_before = metric_sum(&lab, "portcullis_identity_renewals_total");
    let keys: Vec<String> = lab.pods().iter().map(|p| p.key.clone()).collect();
    let pairs: Vec<(String, String)> = keys
        .iter()
        .flat_map(|f| {
            keys.iter()
                .filter(move |t| *t != f)
                .map(move |t| (f.clone(), t.clone()))
        })
        .filter(|(f, t)| (f.as_str(), t.as_str()) != ("x/a", "x/b"))
        .collect();
    let start = Instant::now();
    let (mut requests, mut failures) = (0u32, Vec::new());
    let mut next_pair = 0;
    while start.elapsed() < Duration::from_secs(120) {
        let fresh = (start.elapsed().as_secs() / 2) as usize;
        while next_pair <= fresh.min(pairs.len() - 1) {
            let (f, t) = &pairs[next_pair];
            let o = lab.probe(f, t, tcp(80), Family::Ipv4).await.unwrap();
            requests += 1;
            if o != ProbeOutcome::Reached {
                failures.push(format!("{:?} {f} → {t}: {o:?}", start.elapsed()));
            }
            next_pair += 1;
        }
        for (f, t) in [("x/a", "x/b"), ("y/c", "z/a")] {
            let o = lab.probe(f, t, tcp(80), Family::Ipv4).await.unwrap();
            requests += 1;
            if o != ProbeOutcome::Reached {
                failures.push(format!("{:?} {f} → {t}: {o:?}", start.elapsed()));
            }
        }
        let o = lab.ping(&held).await.unwrap();
        requests += 1;
        if o != ProbeOutcome::Reached {
            failures.push(format!("{:?} held x/a → x/b: {o:?}", start.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let renewals = metric_sum(&lab, "portcullis_identity_renewals_total") - renewals_before;
    eprintln!("{requests} requests, {renewals} renewals, {next_pair} fresh pairs");
    assert!(
        failures.is_empty(),
        "{} of {requests} failed: {failures:#?}",
        failures.len()
    );
    // Nine pods, renewed about every 15 s for 2 minutes.
    assert!(
        renewals >= 9.0 * 5.0,
        "only {renewals} renewals: not a rotation test"
    );
    lab.lab.shutdown().await.expect("shutdown");
}

/// Revoking an identity closes its established proxied connections within
/// 2 s and refuses its new ones; other identities keep theirs.
#[tokio::test]
async fn a_revoked_identity_is_cut_off_within_two_seconds() {
    let lab = meshed_lab("mesh-revoke", |_| {}).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    until_outcome(&lab, "y/a", "x/b", 80, ProbeOutcome::Reached).await;
    let (revoked, o) = lab.hold("x/a", "x/b", 80, Family::Ipv4).await.unwrap();
    assert_eq!(o, ProbeOutcome::Reached);
    let (kept, o) = lab.hold("y/a", "x/b", 80, Family::Ipv4).await.unwrap();
    assert_eq!(o, ProbeOutcome::Reached);
    std::fs::write(
        lab.ca_dir().join("revocations.yaml"),
        "revocations:\n- spiffeId: spiffe://cluster.local/ns/x/sa/a\n  reason: test\n",
    )
    .unwrap();
    let revoked_at = Instant::now();
    loop {
        let o = lab.ping(&revoked).await.unwrap();
        if !o.reached() {
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(2),
            "x/a's connection still carries data {:?} after its revocation",
            revoked_at.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let closed_after = revoked_at.elapsed();
    assert!(closed_after <= Duration::from_secs(2), "{closed_after:?}");
    assert_eq!(
        lab.ping(&kept).await.unwrap(),
        ProbeOutcome::Reached,
        "y/a's connection is not x/a's"
    );
    for to in ["x/b", "y/b"] {
        let o = lab.probe("x/a", to, tcp(80), Family::Ipv4).await.unwrap();
        assert!(!o.reached(), "x/a → {to} after revocation: {o:?}");
    }
    assert_eq!(
        lab.probe("y/a", "x/b", tcp(80), Family::Ipv4)
            .await
            .unwrap(),
        ProbeOutcome::Reached
    );
    eprintln!("x/a's connection closed {closed_after:?} after the revocation");
    lab.lab.shutdown().await.expect("shutdown");
}

/// The agent as a process of its own, killed with SIGKILL: STRICT connects
/// are refused while it is gone, the wire shows no plaintext, and a new
/// process serves again within a second of its first applied pass.
#[tokio::test]
async fn kill_9_of_the_agent_process_leaves_no_plaintext_and_recovers() {
    let mut lab = meshed_lab("mesh-kill9", |_| {}).await;
    lab.stop_agent();
    let state = tempfile::tempdir().unwrap();
    let ca_dir = lab.ca_dir();
    let identities = state.path().join("identities.json");
    let extra = [
        std::ffi::OsStr::new("--ca-dir"),
        ca_dir.as_os_str(),
        std::ffi::OsStr::new("--identities-file"),
        identities.as_os_str(),
    ];
    let agent = AgentProcess::start_with(&lab, &state.path().join("agent"), &extra);
    agent.wait_applied(0).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("kill9.pcap");
    let capture = Capture::start(&lab, "x/a", &pcap).await;
    agent.kill(libc::SIGKILL);
    for _ in 0..5 {
        let o = lab
            .probe("x/a", "x/b", tcp(80), Family::Ipv4)
            .await
            .unwrap();
        assert_eq!(o, ProbeOutcome::Refused, "no listener: refused at once");
    }
    let agent = AgentProcess::start_with(&lab, &state.path().join("agent"), &extra);
    agent.wait_applied(0).await;
    let applied = Instant::now();
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let recovered = applied.elapsed();
    capture.stop().await;
    let to_b = format!("ip.dst == {}", pod_ip(&lab, "x/b"));
    let ports: std::collections::BTreeSet<String> = tshark_fields(&pcap, &to_b, "tcp.dstport", &[])
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(
        ports,
        [mesh::INBOUND_PORT.to_string()].into(),
        "x/a sent x/b nothing but HBONE across the kill and the restart"
    );
    assert!(
        recovered <= Duration::from_secs(1),
        "new connections work {recovered:?} after the restarted agent's first pass"
    );
    drop(agent);
    lab.lab.shutdown().await.expect("shutdown");
}

/// `portcullis connections` answers "is this connection encrypted, to
/// whom, with which certificate, until when", for both ends, and shows a
/// passthrough connection as plaintext.
#[tokio::test]
async fn connections_show_encryption_peer_and_certificate() {
    let lab = meshed_lab("mesh-conns", |t| set_namespace_mode(t, "z", "disabled")).await;
    until_outcome(&lab, "x/a", "x/b", 80, ProbeOutcome::Reached).await;
    let (_mtls, o) = lab.hold("x/a", "x/b", 80, Family::Ipv4).await.unwrap();
    assert_eq!(o, ProbeOutcome::Reached);
    let (_plain, o) = lab.hold("x/a", "z/a", 80, Family::Ipv4).await.unwrap();
    assert_eq!(o, ProbeOutcome::Reached);
    let path = portcullis_agent::mesh::connections::lab_file("mesh-conns");
    let deadline = Instant::now() + Duration::from_secs(5);
    let records = loop {
        let records = portcullis_agent::mesh::connections::read(&path).unwrap_or_default();
        if records.len() >= 3 || Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let find = |direction: &str, pod: &str, to: &str| {
        records
            .iter()
            .find(|r| r.direction == direction && r.pod == pod && r.to.starts_with(to))
            .unwrap_or_else(|| panic!("no {direction} {pod} → {to} in {records:#?}"))
    };
    let (b, z) = (
        pod_ip(&lab, "x/b").to_string(),
        pod_ip(&lab, "z/a").to_string(),
    );
    let out = find("outbound", "x/a", &b);
    assert_eq!(out.transport, "mtls");
    assert_eq!(
        out.peer_identity.as_deref(),
        Some("spiffe://cluster.local/ns/x/sa/b")
    );
    assert!(out.peer_serial.is_some() && out.peer_not_after.is_some());
    let inbound = find("inbound", "x/b", &b);
    assert_eq!(
        inbound.peer_identity.as_deref(),
        Some("spiffe://cluster.local/ns/x/sa/a")
    );
    assert!(inbound.from.starts_with(&pod_ip(&lab, "x/a").to_string()));
    let plain = find("outbound", "x/a", &z);
    assert_eq!(
        (plain.transport.as_str(), plain.peer_identity.as_deref()),
        ("passthrough", None)
    );
    let cli = std::process::Command::new(portcullis_agent::lab::portcullis_exe().unwrap())
        .args(["connections", "--lab", "mesh-conns", "--pod", "x/a"])
        .output()
        .expect("portcullis connections");
    let text = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(
        text.contains("[MTLS] peer spiffe://cluster.local/ns/x/sa/b (certificate "),
        "{text}"
    );
    assert!(text.contains("[PASSTHROUGH] peer plaintext"), "{text}");
    assert!(!text.contains("x/b inbound"), "--pod filters: {text}");
    lab.lab.shutdown().await.expect("shutdown");
}
