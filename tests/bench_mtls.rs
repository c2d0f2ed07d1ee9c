//! The mTLS section of `portcullis bench`, tiny: one round of one-second
//! measures into a temporary file, through the CLI as `cargo xtask bench`
//! runs it. A missing tool (nginx, iperf3, wrk, stunnel) or a missing
//! privilege fails the test; nothing is skipped.

use std::{path::Path, process::Command};

const SECTION: &str = "## Transparent mTLS: Portcullis against a stunnel pair";

/// The numbers of a table row (cells that parse as numbers, in order).
fn row_numbers(section: &str, name: &str) -> Vec<f64> {
    let row = section
        .lines()
        .find(|l| l.starts_with(&format!("| {name} |")))
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{section}"));
    row.split('|')
        .skip(2)
        .filter_map(|cell| cell.split_whitespace().next()?.parse::<f64>().ok())
        .collect()
}

fn run_bench(output: &Path) -> String {
    let exe = portcullis_agent::lab::portcullis_exe().expect("the portcullis binary");
    let out = Command::new(&exe)
        .args([
            "bench",
            "--only",
            "mtls",
            "--mtls-rounds",
            "1",
            "--mtls-seconds",
            "1",
        ])
        .arg("--output")
        .arg(output)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "portcullis bench failed:\n{stderr}");
    stderr
}

#[test]
fn one_tiny_round_writes_the_section_with_all_three_scenarios() {
    portcullis_tests::require_root();
    let _kernel = portcullis_tests::kernel_lock();
    let dir = tempfile::tempdir().expect("temporary directory");
    let output = dir.path().join("BENCHMARKS.md");
    let stderr = run_bench(&output);
    for scenario in ["(1) plaintext", "(2) Portcullis mTLS", "(3) stunnel pair"] {
        assert!(
            stderr.contains(&format!("mtls round 1/1: {scenario}")),
            "no progress line for {scenario}:\n{stderr}"
        );
    }

    let text = std::fs::read_to_string(&output).expect("the output file");
    let section = &text[text.find(SECTION).expect("the mTLS section")..];
    for header in ["(1) plaintext", "(2) Portcullis", "(3) stunnel"] {
        assert!(section.contains(&format!("| {header} |")), "{section}");
    }
    // Plaintext, Portcullis, stunnel, then the ratio (2)/(3): all > 0.
    for row in [
        "iperf3, 1 stream, Gbit/s",
        "iperf3, 4 streams, Gbit/s",
        "keep-alive, requests/s",
        "keep-alive, p99 latency, ms",
        "new connection per request, requests/s",
    ] {
        let n = row_numbers(section, row);
        assert!(
            n.len() >= 4 && n[..4].iter().all(|&x| x > 0.0),
            "{row}: {n:?}"
        );
    }
    // Proxies only: Portcullis, stunnel, the ratio.
    for row in [
        "proxy CPU-s per GB (1 stream)",
        "proxy CPU-s per 1k keep-alive requests",
        "proxy CPU-s per 1k new-connection requests",
        "peak RSS (VmHWM), MiB",
    ] {
        let n = row_numbers(section, row);
        assert!(
            n.len() >= 3 && n[..3].iter().all(|&x| x > 0.0),
            "{row}: {n:?}"
        );
    }
    assert!(section.contains("Anchors for context"), "{section}");
}
