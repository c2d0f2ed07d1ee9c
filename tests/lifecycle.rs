//! Policies changing under a running agent: added, changed, removed, broken.
//! And the counters a user would watch while that happens.

use portcullis_agent::lab::Family;
use portcullis_common::{
    DIRECTION_INGRESS, REASON_DEFAULT_DENY, REASON_POLICY, VERDICT_ALLOW, VERDICT_DENY,
};
use portcullis_tests::start_lab;

fn ns(pod: &str) -> &str {
    pod.split('/').next().unwrap()
}

fn z_policy(ports: &str) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: z-web, namespace: z}}
spec:
  podSelector: {{}}
  ingress:
    - from: [{{namespaceSelector: {{matchLabels: {{ns: x}}}}}}]
      ports: [{ports}]
"#
    )
}

#[tokio::test]
async fn policy_added_changed_and_removed_while_running() {
    let lab = start_lab("lifecycle").await;
    let z_open_to_x_on = |port: &'static str| {
        move |f: &str, t: &str| f == t || ns(t) != "z" || (ns(f) == "x" && port == "yes")
    };

    lab.apply("z.yaml", &z_policy("{port: 80}")).await;
    lab.assert_matrix("80/tcp", Family::Ipv4, z_open_to_x_on("yes"))
        .await;
    lab.assert_matrix("81/tcp", Family::Ipv4, z_open_to_x_on("no"))
        .await;

    // Changed in place: 81 instead of 80.
    lab.apply("z.yaml", &z_policy("{port: 81}")).await;
    lab.assert_matrix("80/tcp", Family::Ipv4, z_open_to_x_on("no"))
        .await;
    lab.assert_matrix("81/tcp", Family::Ipv4, z_open_to_x_on("yes"))
        .await;

    // Removed: z is no longer isolated.
    lab.remove("z.yaml").await;
    lab.assert_matrix("80/tcp", Family::Ipv4, |_, _| true).await;
    lab.assert_matrix("81/tcp", Family::Ipv4, |_, _| true).await;
}

#[tokio::test]
async fn invalid_policy_file_leaves_enforcement_intact() {
    let lab = start_lab("invalid").await;
    lab.apply("z.yaml", &z_policy("{port: 80}")).await;
    let enforced = |f: &str, t: &str| f == t || ns(t) != "z" || ns(f) == "x";

    // A broken edit of an enforced file: reported with file, object and
    // field; the last valid version stays in force.
    lab.write_policy("z.yaml", &z_policy("{port: 70000}"))
        .unwrap();
    let status = lab.wait_applied().await.unwrap();
    let report = status.problems.join("\n");
    assert!(report.contains("z.yaml"), "names the file: {report}");
    assert!(report.contains("z/z-web"), "names the object: {report}");
    assert!(report.contains("port"), "names the field: {report}");
    lab.assert_kernel_matrix("80/tcp", Family::Ipv4, enforced)
        .await;

    // Malformed YAML in a new file changes nothing either.
    lab.write_policy("broken.yaml", "kind: NetworkPolicy\n  spec: [unclosed")
        .unwrap();
    let status = lab.wait_applied().await.unwrap();
    assert!(
        status.problems.iter().any(|p| p.contains("broken.yaml")),
        "{:?}",
        status.problems
    );
    lab.assert_kernel_matrix("80/tcp", Family::Ipv4, enforced)
        .await;

    // Fixing the files applies them again.
    lab.remove_policy("broken.yaml").unwrap();
    lab.apply("z.yaml", &z_policy("{port: 81}")).await;
    lab.assert_matrix("80/tcp", Family::Ipv4, |f, t| f == t || ns(t) != "z")
        .await;
}

#[tokio::test]
async fn counters_move_with_decisions() {
    let lab = start_lab("counters").await;
    lab.apply("z.yaml", &z_policy("{port: 80}")).await;
    let count = |verdict: u8, reason: u8| {
        lab.counters()
            .unwrap()
            .iter()
            .filter(|s| {
                s.key.direction == DIRECTION_INGRESS
                    && s.key.verdict == verdict
                    && s.key.reason == reason
            })
            .map(|s| s.count)
            .sum::<u64>()
    };
    let denied_before = count(VERDICT_DENY, REASON_DEFAULT_DENY);
    let allowed_before = count(VERDICT_ALLOW, REASON_POLICY);

    // 80/tcp: x/* → z/* allowed (9 flows), y/* → z/* dropped (9 flows).
    lab.matrix("80/tcp", Family::Ipv4).await;
    let denied = count(VERDICT_DENY, REASON_DEFAULT_DENY) - denied_before;
    let allowed = count(VERDICT_ALLOW, REASON_POLICY) - allowed_before;
    assert_eq!(allowed, 9, "one allowed SYN per x → z pair");
    // A dropped SYN is retransmitted within the probe timeout: at least one
    // drop per y → z pair.
    assert!(
        denied >= 9,
        "at least one dropped SYN per y → z pair, got {denied}"
    );
    let default_deny_cookie = lab
        .counters()
        .unwrap()
        .iter()
        .find(|s| s.key.reason == REASON_DEFAULT_DENY)
        .map(|s| s.key.rule_cookie)
        .unwrap();
    assert_ne!(
        default_deny_cookie, 0,
        "a default deny is attributed to its policy"
    );
}

/// The counters a removed policy's rules left in the kernel map are
/// retired at the next pass, so policy (and pod) churn cannot fill it for
/// good; what is current stays.
#[tokio::test]
async fn counters_of_removed_rules_are_retired() {
    let lab = start_lab("counters-gc").await;
    lab.apply("z.yaml", &z_policy("{port: 80}")).await;
    lab.matrix("80/tcp", Family::Ipv4).await;
    let cookies = |lab: &portcullis_tests::TestLab| {
        lab.counters()
            .unwrap()
            .iter()
            .filter(|s| s.key.rule_cookie != 0)
            .map(|s| s.key.rule_cookie)
            .collect::<std::collections::BTreeSet<u32>>()
    };
    let with_policy = cookies(&lab);
    assert!(!with_policy.is_empty(), "the policy's rules counted");
    lab.apply("z.yaml", &z_policy("{port: 81}")).await;
    lab.matrix("81/tcp", Family::Ipv4).await;
    let after_change = cookies(&lab);
    let names: portcullis_agent::reconcile::PublishedNames =
        serde_json::from_slice(&std::fs::read(lab.names_file()).unwrap()).unwrap();
    assert!(
        after_change.iter().all(|c| names.cookies.contains_key(c)),
        "only current rules' counters remain: {after_change:?}, current {:?}",
        names.cookies.keys().collect::<Vec<_>>()
    );
    lab.remove("z.yaml").await;
    assert!(
        cookies(&lab).is_empty(),
        "with no policy, no rule's counter remains: {:?}",
        cookies(&lab)
    );
}

const Z_DEFAULT_DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: z}
spec:
  podSelector: {}
"#;

/// Policy is checked when a connection starts: a TCP connection established
/// before a deny keeps carrying data; new ones are refused at once.
#[tokio::test]
async fn established_connections_survive_a_new_deny() {
    let lab = start_lab("established").await;
    let (held, o) = lab.hold("x/a", "z/b", 80, Family::Ipv4).await.unwrap();
    assert_eq!(o, portcullis_agent::lab::pod::ProbeOutcome::Reached);
    assert_eq!(
        lab.ping(&held).await.unwrap(),
        portcullis_agent::lab::pod::ProbeOutcome::Reached
    );

    lab.apply("deny.yaml", Z_DEFAULT_DENY).await;
    lab.assert_matrix("80/tcp", Family::Ipv4, |f, t| f == t || ns(t) != "z")
        .await;
    assert_eq!(
        lab.ping(&held).await.unwrap(),
        portcullis_agent::lab::pod::ProbeOutcome::Reached,
        "the connection established before the deny keeps flowing"
    );
}

/// Maps and links are pinned: enforcement continues while no agent runs,
/// and a restarted agent takes over without duplicating programs.
#[tokio::test]
async fn enforcement_survives_agent_stop_and_restart() {
    let mut lab = start_lab("restart").await;
    lab.apply("deny.yaml", Z_DEFAULT_DENY).await;
    let isolated = |f: &str, t: &str| f == t || ns(t) != "z";

    lab.stop_agent();
    lab.assert_kernel_matrix("80/tcp", Family::Ipv4, isolated)
        .await;

    let status = lab.restart_agent().await.unwrap();
    assert!(status.problems.is_empty(), "{:?}", status.problems);
    lab.assert_matrix("80/tcp", Family::Ipv4, isolated).await;
    let links = portcullis_tests::cgroup_links(lab.pin_dir());
    assert_eq!(
        links,
        portcullis_agent::bpf::loader::PROGRAM_COUNT,
        "one pinned link per program after a restart"
    );

    // The new agent applies changes as usual.
    lab.remove("deny.yaml").await;
    lab.assert_matrix("80/tcp", Family::Ipv4, |_, _| true).await;
}

/// The benchmark's `quiet` switch really stops counting (so "off" in the
/// overhead benchmark is off), and turning it back on resumes.
#[tokio::test]
async fn quiet_switch_stops_and_resumes_counting() {
    let lab = start_lab("quiet").await;
    lab.apply("z.yaml", &z_policy("{port: 80}")).await;
    let total = || lab.counters().unwrap().iter().map(|s| s.count).sum::<u64>();

    portcullis_agent::bpf::counters::set_quiet(lab.pin_dir(), true).unwrap();
    let before = total();
    lab.matrix("80/tcp", Family::Ipv4).await;
    assert_eq!(total(), before, "nothing is counted while quiet");

    portcullis_agent::bpf::counters::set_quiet(lab.pin_dir(), false).unwrap();
    lab.matrix("80/tcp", Family::Ipv4).await;
    assert!(total() >= before + 81, "every probed pair is counted again");
}
