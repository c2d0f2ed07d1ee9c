//! The `portcullis` binary as a user runs it.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

fn portcullis() -> Command {
    let bin = portcullis_agent::lab::portcullis_exe().unwrap();
    assert!(
        bin.exists(),
        "{} not built; run through cargo xtask test",
        bin.display()
    );
    Command::new(bin)
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn topology_only_prints_deterministic_addresses() {
    let out = portcullis()
        .args(["lab", "--topology-only", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pods = v["pods"].as_object().unwrap();
    assert_eq!(pods.len(), 9);
    assert_eq!(v["pods"]["x/a"]["ipv4"], "198.18.1.10");
    assert_eq!(v["pods"]["z/c"]["ipv4"], "198.18.1.18");
    assert!(v["pods"]["y/b"]["ipv6"]
        .as_str()
        .unwrap()
        .starts_with("fd00:7063:6c00::"));
}

#[test]
fn lab_json_on_the_examples() {
    portcullis_tests::require_root();
    let _guard = portcullis_tests::kernel_lock();
    let out = portcullis()
        .args([
            "lab", "--name", "cli", "--json", "--probe", "80/tcp", "--probe", "81/udp",
        ])
        .arg("--policies")
        .arg(repo().join("deploy/examples"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let probes = v["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2);
    assert_eq!(probes[0]["port"], 80);
    assert_eq!(probes[0]["protocol"], "TCP");
    assert_eq!(probes[1]["protocol"], "UDP");
    let tcp80 = &probes[0]["matrix"];
    assert_eq!(tcp80.as_object().unwrap().len(), 9);
    // 01: y is default-deny; 02: y/b takes TCP 80 from x/* and y/a.
    assert_eq!(tcp80["x/a"]["y/b"], true);
    assert_eq!(tcp80["y/a"]["y/b"], true);
    assert_eq!(tcp80["z/a"]["y/b"], false);
    assert_eq!(tcp80["x/a"]["y/a"], false);
    assert_eq!(tcp80["y/c"]["y/c"], true);
    // 03: z/c may only send UDP 81 to x.
    assert_eq!(tcp80["z/c"]["x/a"], false);
    assert_eq!(tcp80["z/b"]["x/a"], true);
    let udp81 = &probes[1]["matrix"];
    assert_eq!(udp81["z/c"]["x/b"], true);
    assert_eq!(udp81["z/c"]["z/a"], false);
    assert_eq!(v["pods"]["x/a"]["ipv4"], "198.18.1.10");
    // Everything is gone afterwards.
    assert!(!std::path::Path::new("/run/netns/pcl-cli-node").exists());
    assert!(!std::path::Path::new("/sys/fs/bpf/portcullis-lab-cli").exists());
}

#[test]
fn lab_refuses_invalid_policies_with_a_clear_error() {
    portcullis_tests::require_root();
    let _guard = portcullis_tests::kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n\
         spec:\n  podSelector: {}\n  ingress:\n    - from: [{ipBlock: {cidr: 10.0.0.0/33}}]\n",
    )
    .unwrap();
    let out = portcullis()
        .args([
            "lab",
            "--name",
            "cli-bad",
            "--probe",
            "80/tcp",
            "--policies",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("x/p") && err.contains("cidr"),
        "{err}"
    );
}

#[test]
fn agent_rejects_a_missing_policy_directory() {
    let out = portcullis()
        .args([
            "agent",
            "--policies",
            "/nonexistent",
            "--workloads",
            "/nonexistent.yaml",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent"));
}

#[test]
fn lab_runs_a_user_topology() {
    portcullis_tests::require_root();
    let _guard = portcullis_tests::kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let topology = dir.path().join("shop.yaml");
    std::fs::write(
        &topology,
        "namespaces: [{name: shop, labels: {team: web}}]\n\
         workloads:\n\
         - {name: front, namespace: shop, labels: {app: front}, ports: [{name: http, containerPort: 8080}]}\n\
         - {name: db, namespace: shop, labels: {app: db}, ports: [{name: sql, containerPort: 5432}]}\n",
    )
    .unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("db.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n\
         \x20   - from: [{podSelector: {matchLabels: {app: front}}}]\n      ports: [{port: sql}]\n",
    )
    .unwrap();
    let out = portcullis()
        .args([
            "lab", "--name", "cli-topo", "--json", "--probe", "5432/tcp", "--probe", "8080/tcp",
        ])
        .arg("--topology")
        .arg(&topology)
        .arg("--policies")
        .arg(&policies)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pods"].as_object().unwrap().len(), 2);
    let sql = &v["probes"][0]["matrix"];
    assert_eq!(
        sql["shop/front"]["shop/db"], true,
        "front may reach db on the named port"
    );
    // db does not listen on 8080, and front is not isolated: nothing to
    // connect to, so not reached; front does listen on 8080.
    let http = &v["probes"][1]["matrix"];
    assert_eq!(http["shop/db"]["shop/front"], true);
    assert_eq!(http["shop/front"]["shop/db"], false);
}

/// A crashed lab leaves namespaces, cgroups (with processes) and pins; the
/// next run of the same name removes them and succeeds.
#[test]
fn lab_cleans_up_after_a_crashed_run() {
    portcullis_tests::require_root();
    let _guard = portcullis_tests::kernel_lock();
    let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(Command::new("ip").args(["netns", "add", "pcl-crash-node"]));
    ok(Command::new("ip").args(["netns", "add", "pcl-crash-3"]));
    let cgroup_mount = portcullis_agent::cgroup::cgroup2_mount().unwrap();
    let pod_cgroup = cgroup_mount.join("portcullis-lab-crash/x-a");
    std::fs::create_dir_all(&pod_cgroup).unwrap();
    let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
    std::fs::write(pod_cgroup.join("cgroup.procs"), sleeper.id().to_string()).unwrap();

    let out = portcullis()
        .args(["lab", "--name", "crash", "--json", "--probe", "80/tcp"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = sleeper.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the leftover process in the lab's cgroup was killed"
    );
    assert!(!PathBuf::from("/run/netns/pcl-crash-node").exists());
    assert!(!PathBuf::from("/run/netns/pcl-crash-3").exists());
    assert!(!cgroup_mount.join("portcullis-lab-crash").exists());
}

/// The standalone agent as a user runs it: applies the files, picks up an
/// edit without a restart, keeps enforcement pinned after SIGTERM, and
/// `uninstall` removes it.
#[test]
fn standalone_agent_applies_watches_and_uninstalls() {
    portcullis_tests::require_root();
    let _guard = portcullis_tests::kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let cgroup_mount = portcullis_agent::cgroup::cgroup2_mount().unwrap();
    let root = cgroup_mount.join("portcullis-cli-agent");
    std::fs::create_dir_all(root.join("web")).unwrap();
    let workloads = dir.path().join("workloads.yaml");
    std::fs::write(
        &workloads,
        "workloads:\n  - {name: web, namespace: shop, labels: {app: web}, \
         cgroup: /portcullis-cli-agent/web, ips: [198.18.7.10]}\n",
    )
    .unwrap();
    let pin_dir = PathBuf::from("/sys/fs/bpf/portcullis-cli-agent");
    let names = dir.path().join("names.json");
    let _ = portcullis()
        .args(["uninstall", "--pin-dir"])
        .arg(&pin_dir)
        .output();

    let agent = portcullis()
        .args(["agent", "--admin-addr", "none", "--policies"])
        .arg(&policies)
        .arg("--workloads")
        .arg(&workloads)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .arg("--cgroup-root")
        .arg(&root)
        .arg("--names-file")
        .arg(&names)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let cookies = || -> Vec<String> {
        std::fs::read(&names)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| {
                v["cookies"]
                    .as_object()
                    .map(|m| m.values().map(|c| c.to_string()).collect())
            })
            .unwrap_or_default()
    };
    wait_for("the agent to publish its first state", &|| names.exists());
    assert!(cookies().is_empty(), "no policies yet: {:?}", cookies());

    // An edit is picked up without a restart.
    std::fs::write(
        policies.join("web.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  podSelector: {}\n",
    )
    .unwrap();
    wait_for("the policy to be applied", &|| {
        cookies().iter().any(|c| c.contains("isolated by shop/web"))
    });

    // SIGTERM: the agent exits cleanly and enforcement stays pinned.
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let out = agent.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("policy applied"), "{log}");
    assert!(
        pin_dir.join("PCL_POLICY").exists(),
        "maps stay pinned after the agent exits"
    );
    let links = portcullis_tests::cgroup_links(&pin_dir);
    assert_eq!(links, portcullis_agent::bpf::loader::PROGRAM_COUNT);

    let counters = portcullis()
        .args(["counters", "--json", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert!(
        counters.status.success(),
        "{}",
        String::from_utf8_lossy(&counters.stderr)
    );
    let v: Value = serde_json::from_slice(&counters.stdout).unwrap();
    assert!(v["counters"].is_array());

    let un = portcullis()
        .args(["uninstall", "--pin-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert!(
        un.status.success(),
        "{}",
        String::from_utf8_lossy(&un.stderr)
    );
    assert!(!pin_dir.exists(), "uninstall removes every pin");
    let _ = std::fs::remove_dir(root.join("web"));
    let _ = std::fs::remove_dir(&root);
}

/// `lab --keep` runs until Ctrl-C, then removes everything and exits 0.
#[test]
fn lab_keep_tears_down_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    portcullis_tests::require_root();
    let _guard = portcullis_tests::kernel_lock();
    let mut lab = portcullis()
        .args(["lab", "--name", "ctrlc", "--keep", "--probe", "80/tcp"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = lab.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .any(|l| l.contains("keeps running"));
    assert!(ready, "the lab announces it keeps running");
    assert!(PathBuf::from("/run/netns/pcl-ctrlc-node").exists());
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(lab.id() as i32, libc::SIGINT) };
    let status = lab.wait().unwrap();
    assert!(
        status.success(),
        "Ctrl-C ends a kept lab normally: {status:?}"
    );
    assert!(!PathBuf::from("/run/netns/pcl-ctrlc-node").exists());
    assert!(!PathBuf::from("/sys/fs/bpf/portcullis-lab-ctrlc").exists());
}
