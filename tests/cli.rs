//! The `portcullis` binary as a user runs it.

use std::{path::PathBuf, process::Command};

use serde_json::Value;

fn portcullis() -> Command {
    // target/<profile>/deps/cli-xxxx → target/<profile>/portcullis
    let exe = std::env::current_exe().unwrap();
    let bin: PathBuf = exe.parent().unwrap().parent().unwrap().join("portcullis");
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
