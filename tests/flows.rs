//! Flow events from the kernel: named, attributed, and rate-limited.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use portcullis_agent::{
    bpf::events::{events_lost, EventReader},
    flows::{NamedFlow, Namer},
    lab::Family,
    policy::parse::parse_inventory,
    reconcile::PublishedNames,
};
use portcullis_common::{EVENTS_BURST, EVENTS_PER_SECOND_PER_CPU};
use portcullis_tests::{start_lab, TestLab, ALL_DECIDERS};

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: y}
spec:
  podSelector: {}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: x}}}]
      ports: [{port: 80}]
"#;

fn namer(lab: &TestLab) -> Namer {
    let inv_text = std::fs::read_to_string(lab.workloads_file()).unwrap();
    let inventory = parse_inventory(lab.workloads_file(), &inv_text).unwrap();
    let names: PublishedNames =
        serde_json::from_slice(&std::fs::read(lab.names_file()).unwrap()).unwrap();
    Namer::new(&inventory, names)
}

fn drain(reader: &mut EventReader, namer: &Namer) -> Vec<NamedFlow> {
    let mut out = Vec::new();
    while let Some(e) = reader.next(Duration::from_millis(300)) {
        out.push(namer.name(&e));
    }
    out
}

#[tokio::test]
async fn flow_events_name_both_ends_and_the_deciding_rule() {
    let lab = start_lab("flows").await;
    lab.apply("policies.yaml", POLICIES).await;
    let mut reader = EventReader::open(lab.pin_dir()).unwrap();
    drain(&mut reader, &namer(&lab));

    let spec = "80/tcp".parse().unwrap();
    lab.probe("z/a", "y/a", spec, Family::Ipv4).await.unwrap();
    lab.probe("x/a", "y/b", spec, Family::Ipv4).await.unwrap();
    let flows = drain(&mut reader, &namer(&lab));
    let find = |from: &str, to: &str, direction: &str| {
        flows
            .iter()
            .find(|f| f.from == from && f.to == to && f.direction == direction && f.port == 80)
            .unwrap_or_else(|| panic!("no {direction} event {from} → {to}: {flows:#?}"))
    };

    let dropped = find("z/a", "y/a", "ingress");
    assert_eq!(
        (dropped.verdict, dropped.reason, dropped.protocol),
        ("deny", "default-deny", "TCP")
    );
    assert_eq!(
        dropped.decided_by,
        "denied by default: isolated by y/default-deny"
    );

    let allowed = find("x/a", "y/b", "ingress");
    assert_eq!((allowed.verdict, allowed.reason), ("allow", "policy"));
    assert_eq!(allowed.decided_by, "allowed by y/web rule 0");

    // The client's side of the same flow: its egress is not isolated.
    let egress = find("x/a", "y/b", "egress");
    assert_eq!((egress.verdict, egress.reason), ("allow", "not-isolated"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (now - allowed.time).abs() < 30.0,
        "events carry wall-clock time"
    );
}

const X_A_NO_EGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: no-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
"#;

/// A pod hammering denied connections gets EPERM each time; the kernel
/// emits events only within its per-CPU budget, counts the rest as lost,
/// and the agent keeps applying policy.
#[tokio::test]
async fn a_flood_of_denied_connections_is_rate_limited() {
    let lab = start_lab("flood").await;
    lab.apply("deny.yaml", X_A_NO_EGRESS).await;
    let pin_dir = lab.pin_dir().to_path_buf();
    let lost_before = events_lost(&pin_dir).unwrap();

    // Consume concurrently, so the bound is the rate limit, not the ring size.
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let stop = stop.clone();
        let mut reader = EventReader::open(&pin_dir).unwrap();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if reader.next(Duration::from_millis(50)).is_some() {
                    n += 1;
                }
            }
            while reader.next(Duration::from_millis(100)).is_some() {
                n += 1;
            }
            n
        })
    };
    let started = Instant::now();
    let load = lab
        .load("x/a", "y/b", 80, Duration::from_secs(2), 2)
        .await
        .unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let received = consumer.join().unwrap();
    let lost = events_lost(&pin_dir).unwrap() - lost_before;

    assert_eq!(load.connections, 0, "every connect is denied");
    assert!(
        load.failures > 20_000,
        "a real flood: {} denied connects",
        load.failures
    );
    let cpus = std::thread::available_parallelism().unwrap().get() as f64;
    let budget = cpus * (EVENTS_BURST as f64 + EVENTS_PER_SECOND_PER_CPU as f64 * (elapsed + 0.5));
    assert!(
        (received as f64) <= budget,
        "{received} events exceed the budget of {budget:.0} for {elapsed:.1}s"
    );
    assert!(received > 0, "some drops are reported");
    assert!(
        lost + received >= load.failures,
        "every denied connect is an event or counted lost: {received} + {lost} < {}",
        load.failures
    );

    // The agent is not starved: a change still applies and takes effect.
    lab.remove("deny.yaml").await;
    let o = lab
        .probe("x/a", "y/b", "80/tcp".parse().unwrap(), Family::Ipv4)
        .await
        .unwrap();
    assert!(o.reached(), "{o:?}");
}

/// Explicit deny, a cluster tier rule and an audit verdict each reach the
/// flow events with the policy that decided.
#[tokio::test]
async fn flow_events_attribute_every_kind_of_decision() {
    let lab = start_lab("flows-all").await;
    lab.apply("policies.yaml", ALL_DECIDERS).await;
    let mut reader = EventReader::open(lab.pin_dir()).unwrap();
    drain(&mut reader, &namer(&lab));

    let spec = "80/tcp".parse().unwrap();
    for (from, to) in [("x/c", "y/b"), ("x/b", "z/c"), ("y/a", "x/a")] {
        lab.probe(from, to, spec, Family::Ipv4).await.unwrap();
    }
    let flows = drain(&mut reader, &namer(&lab));
    let ingress = |from: &str, to: &str| {
        flows
            .iter()
            .find(|f| f.from == from && f.to == to && f.direction == "ingress")
            .unwrap_or_else(|| panic!("no ingress event {from} → {to}: {flows:#?}"))
    };
    let deny = ingress("x/c", "y/b");
    assert_eq!((deny.verdict, deny.reason), ("deny", "policy"));
    assert_eq!(deny.decided_by, "denied by L4Policy y/no-c deny rule 0");
    let tier = ingress("x/b", "z/c");
    assert_eq!(tier.verdict, "deny");
    assert_eq!(
        tier.decided_by,
        "Deny by ClusterL4Policy quarantine rule 0 (Admin tier, priority 5)"
    );
    let audit = ingress("y/a", "x/a");
    assert_eq!(audit.verdict, "audit");
    assert!(
        audit
            .decided_by
            .starts_with("audit: L4Policy x/trial would deny by default"),
        "{audit:?}"
    );
}
