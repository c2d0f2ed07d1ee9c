//! Services: connections to a cluster IP are translated to a backend at
//! connect/sendmsg time, so policy, counters and flow events see the backend.
//! The cluster IPs below are on no interface: without translation nothing
//! would answer them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use portcullis_agent::{
    bpf::events::EventReader,
    explain::{explain_target, lab_paths, Explained},
    flows::{NamedFlow, Namer},
    lab::{pod::ProbeOutcome, Family},
    policy::{
        model::{Protocol, Service, ServiceBackend, ServicePort},
        parse::parse_inventory,
    },
    reconcile::PublishedNames,
};
use portcullis_common::{DIRECTION_EGRESS, REASON_NO_BACKEND, VERDICT_DENY};
use portcullis_tests::{start_lab, TestLab};

const WEB_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 200, 10));
const WEB_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x7063, 0x6c00, 0, 0, 0, 0xc8, 0xa));
const EMPTY_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 200, 11));

/// y/web: port 8080 (TCP and UDP) leads to y/b:80, over both families.
fn web(lab: &TestLab) -> Service {
    let b = lab.pods().iter().find(|p| p.key == "y/b").unwrap();
    let backends: Vec<ServiceBackend> = [IpAddr::from(b.ipv4), IpAddr::from(b.ipv6)]
        .into_iter()
        .map(|ip| ServiceBackend { ip, port: 80 })
        .collect();
    let port = |protocol| ServicePort {
        port: 8080,
        protocol,
        backends: backends.clone(),
    };
    Service {
        name: "web".into(),
        namespace: "y".into(),
        cluster_ips: vec![WEB_V4, WEB_V6],
        ports: vec![port(Protocol::Tcp), port(Protocol::Udp)],
    }
}

/// y/empty: a port with no ready backend.
fn empty() -> Service {
    Service {
        name: "empty".into(),
        namespace: "y".into(),
        cluster_ips: vec![EMPTY_V4],
        ports: vec![ServicePort {
            port: 80,
            protocol: Protocol::Tcp,
            backends: vec![],
        }],
    }
}

fn names(lab: &TestLab) -> PublishedNames {
    serde_json::from_slice(&std::fs::read(lab.names_file()).unwrap()).unwrap()
}

fn namer(lab: &TestLab) -> Namer {
    let text = std::fs::read_to_string(lab.workloads_file()).unwrap();
    let inventory = parse_inventory(lab.workloads_file(), &text).unwrap();
    Namer::new(&inventory, names(lab))
}

fn drain(reader: &mut EventReader, namer: &Namer) -> Vec<NamedFlow> {
    let mut out = Vec::new();
    while let Some(e) = reader.next(Duration::from_millis(300)) {
        out.push(namer.name(&e));
    }
    out
}

async fn probe(lab: &TestLab, from: &str, addr: IpAddr, spec: &str) -> ProbeOutcome {
    lab.probe_address(from, addr, spec.parse().unwrap())
        .await
        .unwrap()
}

const X_A_EGRESS_ONLY_TO_Z: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-z, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
    - to: [{namespaceSelector: {matchLabels: {ns: z}}}]
"#;

#[tokio::test]
async fn a_cluster_ip_leads_to_a_backend_and_policy_judges_the_backend() {
    let mut lab = start_lab("services").await;
    lab.apply_services(vec![web(&lab), empty()]).await;

    // (a) TCP to the cluster IP reaches y/b, and carries data, both families.
    // A TCP probe only counts as reached when getpeername() names the address
    // it connected to: the cluster IP, not the backend behind it.
    for addr in [WEB_V4, WEB_V6] {
        assert_eq!(
            probe(&lab, "x/a", addr, "8080/tcp").await,
            ProbeOutcome::Reached,
            "{addr}"
        );
        let (held, o) = lab.hold_address("x/a", addr, 8080).await.unwrap();
        assert_eq!(o, ProbeOutcome::Reached);
        assert_eq!(
            lab.ping(&held).await.unwrap(),
            ProbeOutcome::Reached,
            "echo via {addr}"
        );
    }
    // (d) Unconnected UDP: the probe only counts an echo whose source is the
    // address it sent to, so this needs the reply rewritten back to the
    // cluster IP.
    for addr in [WEB_V4, WEB_V6] {
        assert_eq!(
            probe(&lab, "x/b", addr, "8080/udp").await,
            ProbeOutcome::Reached,
            "{addr}"
        );
    }
    // The backend port is only reachable through the service port.
    assert_ne!(
        probe(&lab, "x/a", WEB_V4, "80/tcp").await,
        ProbeOutcome::Reached
    );

    // (b) Egress policy that does not allow y/b: refused at connect(), and
    // the drop is reported against the backend and the deciding policy.
    lab.apply("only-z.yaml", X_A_EGRESS_ONLY_TO_Z).await;
    let mut reader = EventReader::open(lab.pin_dir()).unwrap();
    drain(&mut reader, &namer(&lab));
    for addr in [WEB_V4, WEB_V6] {
        assert_eq!(
            probe(&lab, "x/a", addr, "8080/tcp").await,
            ProbeOutcome::Denied,
            "{addr}"
        );
        assert_eq!(
            probe(&lab, "x/a", addr, "8080/udp").await,
            ProbeOutcome::Denied,
            "{addr}"
        );
    }
    // Other pods are not isolated: still translated and allowed.
    assert_eq!(
        probe(&lab, "x/b", WEB_V4, "8080/tcp").await,
        ProbeOutcome::Reached
    );
    // explain follows the translation: the backend is what is judged.
    let why = explain_target(
        &lab_paths("services"),
        "x/a",
        "198.18.200.10",
        "8080/tcp".parse().unwrap(),
        Family::Ipv4,
    )
    .unwrap();
    let Explained::Service(svc) = &why else {
        panic!("a cluster IP is explained as a service: {}", why.render());
    };
    assert_eq!(svc.backends.len(), 1, "{}", why.render());
    let backend = &svc.backends[0];
    assert_eq!((backend.to.as_str(), backend.port), ("y/b", 80));
    assert!(!backend.allowed, "{}", why.render());
    assert!(
        backend.egress.decided_by.contains("x/only-z"),
        "{}",
        why.render()
    );
    assert!(why.kernel_agrees(), "{}", why.render());

    let flows = drain(&mut reader, &namer(&lab));
    let denied: Vec<_> = flows
        .iter()
        .filter(|f| f.from == "x/a" && f.direction == "egress" && f.verdict == "deny")
        .collect();
    assert!(
        denied.len() >= 4 && denied.iter().all(|f| f.to == "y/b" && f.port == 80),
        "drops name the backend y/b:80, not the service: {flows:#?}"
    );
    assert!(
        denied
            .iter()
            .all(|f| f.reason == "default-deny" && f.decided_by.contains("x/only-z")),
        "{denied:#?}"
    );
    let published = names(&lab);
    let x_a = *published
        .endpoints
        .iter()
        .find(|(_, n)| *n == "x/a")
        .unwrap()
        .0;
    let counted: u64 = lab
        .counters()
        .unwrap()
        .iter()
        .filter(|s| {
            s.key.endpoint_id == x_a
                && s.key.direction == DIRECTION_EGRESS
                && s.key.verdict == VERDICT_DENY
                && published
                    .cookies
                    .get(&s.key.rule_cookie)
                    .is_some_and(|c| c.contains("x/only-z"))
        })
        .map(|s| s.count)
        .sum();
    assert!(counted >= 4, "denied connects counted: {counted}");

    // (c) A service port without backends is refused, with its own reason,
    // whatever policy says (x/b is not isolated).
    assert_eq!(
        probe(&lab, "x/b", EMPTY_V4, "80/tcp").await,
        ProbeOutcome::Denied
    );
    let flows = drain(&mut reader, &namer(&lab));
    let refused = flows
        .iter()
        .find(|f| f.from == "x/b" && f.reason == "no-backend")
        .unwrap_or_else(|| panic!("a no-backend event: {flows:#?}"));
    assert_eq!(
        (refused.to.as_str(), refused.port, refused.verdict),
        ("service y/empty", 80, "deny")
    );
    assert!(lab
        .counters()
        .unwrap()
        .iter()
        .any(|s| s.key.reason == REASON_NO_BACKEND && s.key.verdict == VERDICT_DENY));

    // Backends appear: the same address now leads somewhere.
    let mut filled = empty();
    filled.ports[0].backends = web(&lab).ports[0].backends.clone();
    lab.apply_services(vec![web(&lab), filled]).await;
    assert_eq!(
        probe(&lab, "x/b", EMPTY_V4, "80/tcp").await,
        ProbeOutcome::Reached
    );
    // And the service goes away: no more translation (nothing answers).
    lab.apply_services(vec![]).await;
    assert_ne!(
        probe(&lab, "x/b", WEB_V4, "8080/tcp").await,
        ProbeOutcome::Reached
    );
}
