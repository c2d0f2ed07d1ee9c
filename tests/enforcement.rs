//! The kernel data path on real network namespaces: connections refused or
//! allowed by NetworkPolicy, TCP and UDP, IPv4 and IPv6, ingress and egress.

use std::time::{Duration, Instant};

use portcullis_agent::lab::{pod::ProbeOutcome, Family};
use portcullis_tests::{start_lab, TestLab};

fn ns(pod: &str) -> &str {
    pod.split('/').next().unwrap()
}

const Y_DEFAULT_DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

const Y_B_FROM_X_TCP80: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-x, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: x}}}]
      ports: [{protocol: TCP, port: 80}]
"#;

async fn ingress_default_deny_then_allow(family: Family) {
    let lab = start_lab(&format!("ingress-{family:?}").to_lowercase()).await;
    lab.assert_matrix("80/tcp", family, |_, _| true).await;

    lab.apply("deny.yaml", Y_DEFAULT_DENY).await;
    let isolated = |f: &str, t: &str| f == t || ns(t) != "y";
    lab.assert_matrix("80/tcp", family, isolated).await;
    lab.assert_matrix("81/udp", family, isolated).await;

    lab.apply("allow.yaml", Y_B_FROM_X_TCP80).await;
    lab.assert_matrix("80/tcp", family, |f, t| {
        isolated(f, t) || (t == "y/b" && ns(f) == "x")
    })
    .await;
    // The allow names TCP 80 only.
    lab.assert_matrix("81/tcp", family, isolated).await;
    lab.assert_matrix("80/udp", family, isolated).await;

    // An ingress drop is silent for the client: the SYN never gets an answer.
    let o = lab
        .probe("z/a", "y/b", "80/tcp".parse().unwrap(), family)
        .await
        .unwrap();
    assert_eq!(o, ProbeOutcome::TimedOut);
}

#[tokio::test]
async fn ingress_default_deny_then_allow_ipv4() {
    ingress_default_deny_then_allow(Family::Ipv4).await;
}

#[tokio::test]
async fn ingress_default_deny_then_allow_ipv6() {
    ingress_default_deny_then_allow(Family::Ipv6).await;
}

const X_A_EGRESS_TO_Y_TCP80: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
    - to: [{namespaceSelector: {matchLabels: {ns: y}}}]
      ports: [{protocol: TCP, port: 80}]
"#;

#[tokio::test]
async fn egress_deny_fails_connect_with_eperm_at_once() {
    let lab = start_lab("egress").await;
    lab.apply("egress.yaml", X_A_EGRESS_TO_Y_TCP80).await;
    for family in [Family::Ipv4, Family::Ipv6] {
        lab.assert_matrix("80/tcp", family, |f, t| {
            f != "x/a" || t == "x/a" || ns(t) == "y"
        })
        .await;
        lab.assert_matrix("81/tcp", family, |f, t| f != "x/a" || t == "x/a")
            .await;
        lab.assert_matrix("80/udp", family, |f, t| f != "x/a" || t == "x/a")
            .await;

        let started = Instant::now();
        let o = lab
            .probe("x/a", "z/b", "80/tcp".parse().unwrap(), family)
            .await
            .unwrap();
        assert_eq!(
            o,
            ProbeOutcome::Denied,
            "egress deny must fail connect() with EPERM"
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "EPERM must come at once, not after a timeout ({:?})",
            started.elapsed()
        );
        let o = lab
            .probe("x/a", "y/c", "80/udp".parse().unwrap(), family)
            .await
            .unwrap();
        assert_eq!(
            o,
            ProbeOutcome::Denied,
            "unconnected UDP sendmsg must fail with EPERM"
        );
    }
}

/// Both ends isolated in both directions, with only the request direction
/// allowed: UDP replies must still flow (and TCP's handshake completes).
const BOTH_ISOLATED: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lockdown, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: lockdown, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-to-y-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
    - to: [{namespaceSelector: {matchLabels: {ns: y}}, podSelector: {matchLabels: {pod: b}}}]
      ports: [{protocol: UDP, port: 81}, {protocol: TCP, port: 81}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-x-a, namespace: y}
spec:
  podSelector: {matchLabels: {pod: b}}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}]
      ports: [{protocol: UDP, port: 81}, {protocol: TCP, port: 81}]
"#;

#[tokio::test]
async fn replies_pass_when_both_ends_are_isolated() {
    let lab = start_lab("replies").await;
    lab.apply("lockdown.yaml", BOTH_ISOLATED).await;
    for family in [Family::Ipv4, Family::Ipv6] {
        for spec in ["81/udp", "81/tcp"] {
            lab.assert_matrix(spec, family, |f, t| {
                let locked = |p: &str| ns(p) == "x" || ns(p) == "y";
                f == t || (f == "x/a" && t == "y/b") || (!locked(f) && !locked(t))
            })
            .await;
        }
        // The reverse direction is not a reply: y/b cannot start a flow to x/a.
        let o = lab
            .probe("y/b", "x/a", "81/udp".parse().unwrap(), family)
            .await
            .unwrap();
        assert_eq!(o, ProbeOutcome::Denied);
    }
}

#[tokio::test]
async fn node_and_own_address_are_always_allowed() {
    let lab = start_lab("node").await;
    lab.apply("deny.yaml", Y_DEFAULT_DENY).await;
    for family in [Family::Ipv4, Family::Ipv6] {
        for spec in ["80/tcp", "81/udp"] {
            let spec = spec.parse().unwrap();
            let o = lab.probe_from_node("y/a", spec, family).await.unwrap();
            assert_eq!(o, ProbeOutcome::Reached, "node → y/a {spec:?} {family:?}");
            let o = lab.probe("y/a", "y/a", spec, family).await.unwrap();
            assert_eq!(o, ProbeOutcome::Reached, "y/a → itself {spec:?} {family:?}");
            let o = lab.probe("x/a", "y/a", spec, family).await.unwrap();
            assert_eq!(o, ProbeOutcome::TimedOut, "x/a → y/a {spec:?} {family:?}");
        }
    }
}

/// The kernel keeps the decisions it made under the policy in force, so a
/// repeated flow is not decided in full each time: the very next
/// connection after a change must still meet the new policy, however often
/// the flow was decided just before, on egress (EPERM at connect) and on
/// ingress (the SYN dropped), closing and opening again.
#[tokio::test]
async fn a_policy_change_reaches_the_next_connection_at_once() {
    let lab = start_lab("recheck").await;
    lab.apply("egress.yaml", X_A_EGRESS_TO_Y_TCP80).await;
    withdraw_and_give_back(
        &lab,
        ("egress.yaml", X_A_EGRESS_TO_Y_TCP80),
        "x/a",
        ProbeOutcome::Denied,
        (
            "an egress allow",
            "refuse the next connect",
            "let the next connect out",
        ),
    )
    .await;

    lab.apply("deny.yaml", Y_DEFAULT_DENY).await;
    lab.apply("allow.yaml", Y_B_FROM_X_TCP80).await;
    withdraw_and_give_back(
        &lab,
        ("allow.yaml", Y_B_FROM_X_TCP80),
        "x/b",
        ProbeOutcome::TimedOut,
        (
            "an ingress allow",
            "drop the next SYN",
            "admit the next SYN",
        ),
    )
    .await;
}

/// With `allow` (a policy file naming TCP 80) in force, connects `from` to
/// y/b five times, so the flow's decision is kept; then moves the allow to
/// port 81 and back, probing the very next connection after each change:
/// `withdrawn` after the first, reached after the second. `what` names the
/// allow and what each change must do, for the failure messages.
async fn withdraw_and_give_back(
    lab: &TestLab,
    (file, allow): (&str, &str),
    from: &str,
    withdrawn: ProbeOutcome,
    (what, when_withdrawn, when_given_back): (&str, &str, &str),
) {
    let probe = || lab.probe(from, "y/b", "80/tcp".parse().unwrap(), Family::Ipv4);
    for _ in 0..5 {
        assert_eq!(
            probe().await.unwrap(),
            ProbeOutcome::Reached,
            "{from} → y/b warming"
        );
    }
    lab.apply(file, &allow.replace("port: 80", "port: 81"))
        .await;
    assert_eq!(
        probe().await.unwrap(),
        withdrawn,
        "{what} withdrawn must {when_withdrawn}"
    );
    lab.apply(file, allow).await;
    assert_eq!(
        probe().await.unwrap(),
        ProbeOutcome::Reached,
        "{what} given back must {when_given_back}"
    );
}
