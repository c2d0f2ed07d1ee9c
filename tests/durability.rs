//! What is enforced survives what users and operators do to the agent: an
//! invalid edit followed by `kill -9` and a restart, and a policy too large
//! for the kernel maps arriving together with an unrelated change.

use std::time::{Duration, Instant};

use portcullis_agent::lab::{pod::ProbeOutcome, Family};
use portcullis_tests::{agent_process::AgentProcess, start_lab, TestLab};

const TIMEOUT: Duration = Duration::from_secs(30);

fn ns(pod: &str) -> &str {
    pod.split('/').next().unwrap()
}

const Z_DEFAULT_DENY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: z}
spec:
  podSelector: {}
"#;

/// z admits x on port 80 only.
const Z_FROM_X: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: z}
spec:
  podSelector: {}
  ingress:
    - from: [{namespaceSelector: {matchLabels: {ns: x}}}]
      ports: [{port: 80}]
"#;

/// Probes until the outcome is `want` (a new state may take a pass to
/// arrive), failing after the timeout with the last outcome.
async fn probe_until(lab: &TestLab, from: &str, to: &str, want: ProbeOutcome) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = lab
            .probe(from, to, "80/tcp".parse().unwrap(), Family::Ipv4)
            .await
            .unwrap();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{from} → {to}:80/tcp: still {got:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_invalid_edit_stays_harmless_across_kill_9_and_restart() {
    let mut lab = start_lab("durable").await;
    // The lab's own agent makes way for one in a process of its own.
    lab.stop_agent();
    let state = tempfile::tempdir().unwrap();
    let agent = AgentProcess::start(&lab, state.path());
    let at = agent.wait_applied(0).await;

    lab.write_policy("z.yaml", Z_DEFAULT_DENY).unwrap();
    agent.wait_applied(at + 1).await;
    probe_until(&lab, "x/a", "z/b", ProbeOutcome::TimedOut).await;
    probe_until(&lab, "x/a", "y/b", ProbeOutcome::Reached).await;

    // Edited into invalid YAML: the running agent keeps the deny, and says so.
    let at = agent.lines();
    lab.write_policy("z.yaml", "kind: NetworkPolicy\n  spec: [unclosed")
        .unwrap();
    agent
        .wait_line(at, "the invalid file to be reported", |l| {
            l.contains("z.yaml") && l.contains("last valid version stays enforced")
        })
        .await;
    agent.kill(libc::SIGKILL);

    // A new agent meets the invalid file: the deny still holds, reported.
    let agent = AgentProcess::start(&lab, state.path());
    let applied = agent.wait_applied(0).await;
    lab.assert_kernel_matrix("80/tcp", Family::Ipv4, |f, t| f == t || ns(t) != "z")
        .await;
    agent
        .wait_line(0, "the restarted agent to report the invalid file", |l| {
            l.contains("z.yaml") && l.contains("last valid version stays enforced")
        })
        .await;

    // Fixed: the new version applies.
    lab.write_policy("z.yaml", Z_FROM_X).unwrap();
    agent.wait_applied(applied + 1).await;
    probe_until(&lab, "x/a", "z/b", ProbeOutcome::Reached).await;
    lab.assert_kernel_matrix("80/tcp", Family::Ipv4, |f, t| {
        f == t || ns(t) != "z" || ns(f) == "x"
    })
    .await;
    agent.kill(libc::SIGTERM);
}

/// A NetworkPolicy for namespace y admitting `addresses` distinct,
/// non-adjacent /32s: each is an entry of the address → identity map, whose
/// generation holds 65,536.
fn too_large_for_the_identity_map(addresses: u32) -> String {
    let from: Vec<String> = (0..addresses)
        .map(|i| {
            let a = 64 + (i >> 15);
            let b = (i >> 7) & 255;
            let c = (i & 127) * 2;
            format!("{{ipBlock: {{cidr: 10.{a}.{b}.{c}/32}}}}")
        })
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {{name: huge, namespace: y}}\n\
         spec:\n  podSelector: {{}}\n  ingress:\n    - from: [{}]\n      ports: [{{port: 80}}]\n",
        from.join(", ")
    )
}

#[tokio::test]
async fn a_policy_too_large_for_a_map_is_held_back_alone() {
    let lab = start_lab("toolarge").await;
    // Both land in one pass: the over-size policy and an unrelated deny.
    lab.write_policy("huge.yaml", &too_large_for_the_identity_map(66_000))
        .unwrap();
    lab.write_policy("z.yaml", Z_DEFAULT_DENY).unwrap();
    // Reading and compiling 66,000 addresses takes a debug build a while on
    // a busy machine: allow a few of the harness' apply timeouts.
    let mut status = lab.wait_applied().await;
    for _ in 0..3 {
        if status.is_ok() {
            break;
        }
        status = lab.wait_applied().await;
    }
    let status = status.expect("the agent finishes the pass");
    assert_eq!(status.pass_error, None, "the pass reached the kernel");
    let report = status.problems.join("\n");
    for needle in [
        "huge.yaml",
        "y/huge",
        "does not fit",
        portcullis_common::IDENTITIES_MAP,
        "NOT enforced",
    ] {
        assert!(report.contains(needle), "{needle:?} in: {report}");
    }
    assert_eq!(status.problems.len(), 1, "{report}");

    // Measured: the deny on z applies; y is open, as without the policy.
    lab.assert_kernel_matrix("80/tcp", Family::Ipv4, |f, t| f == t || ns(t) != "z")
        .await;

    // Removing the culprit clears the problem, and later changes apply as usual.
    lab.remove_policy("huge.yaml").unwrap();
    lab.write_policy("z.yaml", Z_FROM_X).unwrap();
    let status = lab.wait_applied().await.unwrap();
    assert!(status.problems.is_empty(), "{:?}", status.problems);
    lab.assert_kernel_matrix("80/tcp", Family::Ipv4, |f, t| {
        f == t || ns(t) != "z" || ns(f) == "x"
    })
    .await;
}

/// Map capacities are configurable; a map an earlier agent pinned keeps its
/// size (asking for another is a clear error at start, and what is
/// enforced stays enforced), and a policy state that does not fit the
/// configured size is held back with an error naming the map, the previous
/// state kept.
#[tokio::test]
async fn map_capacities_are_configurable_and_never_silently_resized() {
    let mut lab = start_lab("map-capacity").await;
    lab.write_policy("z.yaml", Z_DEFAULT_DENY).unwrap();
    lab.wait_applied().await.unwrap();
    probe_until(&lab, "x/a", "z/a", ProbeOutcome::TimedOut).await;
    lab.stop_agent();
    let state = tempfile::tempdir().unwrap();
    let small = [
        std::ffi::OsStr::new("--map-capacity"),
        std::ffi::OsStr::new("policy=64"),
    ];
    let mut agent = AgentProcess::start_with(&lab, state.path(), &small);
    let status = agent.wait_exit(TIMEOUT);
    assert!(!status.success());
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "map {} is pinned with {} entries, but 64 were asked for",
            portcullis_common::POLICY_MAP,
            portcullis_common::POLICY_CAPACITY
        )),
        "{log}"
    );
    // The earlier agent's programs and maps still enforce.
    probe_until(&lab, "x/a", "z/a", ProbeOutcome::TimedOut).await;

    // Resized the documented way: uninstall, then start with the new size.
    let out = std::process::Command::new(portcullis_agent::lab::portcullis_exe().unwrap())
        .args(["uninstall", "--pin-dir"])
        .arg(lab.pin_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = AgentProcess::start_with(&lab, state.path(), &small);
    agent.wait_applied(0).await;
    probe_until(&lab, "x/a", "z/a", ProbeOutcome::TimedOut).await;
    // 32 entries per generation: z admitting x on 40 scattered ports does
    // not fit.
    let at = agent.lines();
    let ports: Vec<String> = (0..40)
        .map(|i| format!("{{port: {}}}", 1000 + 7 * i))
        .collect();
    lab.write_policy(
        "z.yaml",
        &Z_FROM_X.replace(
            "ports: [{port: 80}]",
            &format!("ports: [{}]", ports.join(", ")),
        ),
    )
    .unwrap();
    agent
        .wait_line(at, "the over-capacity report", |l| {
            l.contains("does not fit")
                && l.contains(portcullis_common::POLICY_MAP)
                && l.contains("at most 32")
        })
        .await;
    // Its previous version (default deny) stays enforced.
    probe_until(&lab, "x/a", "z/a", ProbeOutcome::TimedOut).await;
    drop(agent);
}

/// Two agents on one pin directory would both write the generation not in
/// force and flip in turn. A second agent, here one whose policy directory
/// is empty and would open every pod, waits for the first, refuses to
/// start, and says why; the first keeps enforcing its policy.
#[tokio::test]
async fn a_second_agent_on_the_same_pins_is_refused() {
    let mut lab = start_lab("twoagent").await;
    lab.stop_agent();
    let state = tempfile::tempdir().unwrap();
    let first = AgentProcess::start(&lab, state.path());
    let at = first.wait_applied(0).await;
    lab.write_policy("z.yaml", Z_DEFAULT_DENY).unwrap();
    first.wait_applied(at + 1).await;
    probe_until(&lab, "x/a", "z/b", ProbeOutcome::TimedOut).await;

    let other = tempfile::tempdir().unwrap();
    let empty = other.path().join("policies");
    std::fs::create_dir(&empty).unwrap();
    let mut args = lab.agent_args();
    let policies = args.iter().position(|a| a == "--policies").unwrap() + 1;
    args[policies] = empty.into_os_string();
    let names = args.iter().position(|a| a == "--names-file").unwrap() + 1;
    args[names] = other.path().join("names").into_os_string();
    let mut second = AgentProcess::spawn(args, &other.path().join("state"));
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the second agent must not run");
    let log = second.log();
    assert!(
        log.contains("another Portcullis agent is using")
            && log.contains(&lab.pin_dir().display().to_string()),
        "the refusal names the pin directory; the second agent logged:\n{log}"
    );
    assert!(
        !log.contains("policy applied"),
        "the second agent wrote nothing:\n{log}"
    );
    probe_until(&lab, "x/a", "z/b", ProbeOutcome::TimedOut).await;
    probe_until(&lab, "x/a", "y/b", ProbeOutcome::Reached).await;

    // The first keeps applying changes.
    let at = first.lines();
    lab.write_policy("z.yaml", Z_FROM_X).unwrap();
    first.wait_applied(at).await;
    probe_until(&lab, "x/a", "z/b", ProbeOutcome::Reached).await;

    // A successor started while the first still runs (a restart whose old
    // process is slow to go) waits, then takes over once it has gone.
    lab.write_policy("z.yaml", Z_DEFAULT_DENY).unwrap();
    first.wait_applied(at + 1).await;
    probe_until(&lab, "x/a", "z/b", ProbeOutcome::TimedOut).await;
    let successor = AgentProcess::start(&lab, &other.path().join("successor"));
    successor
        .wait_line(0, "the successor to wait for the pins", |l| {
            l.contains("another agent holds the pin directory")
        })
        .await;
    first.kill(libc::SIGTERM);
    let at = successor.wait_applied(0).await;
    lab.write_policy("z.yaml", Z_FROM_X).unwrap();
    successor.wait_applied(at + 1).await;
    probe_until(&lab, "x/a", "z/b", ProbeOutcome::Reached).await;
    successor.kill(libc::SIGTERM);
}
