//! The churn section of `portcullis bench`, tiny: a real API server with
//! 200 pods and 100 rules, two changes of each kind and 3 s of sustained
//! churn, through the CLI as `cargo xtask bench` runs it. Checks it still
//! runs, reports every kind of change with a latency and misses no update
//! under sustained churn, not how fast it is. A missing control
//! plane build or privilege fails the test; nothing is skipped.

use std::process::Command;

const SECTION: &str = "## Churn: single changes through the real Kubernetes source";

#[test]
fn a_tiny_cluster_reports_every_kind_of_change() {
    portcullis_tests::require_root();
    let _kernel = portcullis_tests::kernel_lock();
    // Fails loudly when `cargo xtask kube build` has not run.
    portcullis_tests::kube_api::program("kube-apiserver");
    let dir = tempfile::tempdir().expect("temporary directory");
    let output = dir.path().join("BENCHMARKS.md");
    let exe = portcullis_agent::lab::portcullis_exe().expect("the portcullis binary");
    let out = Command::new(&exe)
        .args(["bench", "--only", "churn", "--churn-pods", "200"])
        .args(["--churn-rules", "100", "--churn-changes", "2"])
        .args(["--churn-from", "100", "--churn-growth", "300"])
        .args(["--churn-rate", "20", "--churn-seconds", "3"])
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "portcullis bench failed:\n{stderr}");

    let text = std::fs::read_to_string(&output).expect("the output file");
    let section = &text[text.find(SECTION).expect("the churn section")..];
    for kind in [
        "pod added",
        "pod deleted",
        "label changed",
        "policy added",
        "policy changed",
        "Service endpoints changed",
    ] {
        let row = section
            .lines()
            .find(|l| l.starts_with(&format!("| {kind}")))
            .unwrap_or_else(|| panic!("no row for {kind}:\n{section}"));
        // The histogram's bucket bound for the median: there for every
        // kind. (Exact values need each change to be one pass; at this
        // size a deletion can be two, which the row then says.)
        let bound: f64 = row
            .split('|')
            .nth(5)
            .and_then(|c| c.split('/').next()?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no bucket p50 for {kind}: {row}"));
        assert!(bound > 0.0, "{row}");
    }
    let idle: f64 = section
        .lines()
        .find_map(|l| l.strip_prefix("Idle CPU, "))
        .and_then(|l| {
            l.rsplit_once(": ")?
                .1
                .strip_suffix("% of one core.")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no idle CPU line:\n{section}"));
    assert!((0.0..=200.0).contains(&idle), "idle CPU {idle}%");
    // Sustained churn: the row's "missed updates" column, and its verdict.
    let header = table_header(section, "| pods added / deleted");
    let column = column_of(header, "missed updates");
    let row = section
        .lines()
        .skip_while(|l| *l != header)
        .nth(2)
        .expect("a sustained churn row");
    assert!(row.starts_with("| 60 / 60 |"), "20 a second for 3 s: {row}");
    let missed: usize = row
        .split('|')
        .nth(column)
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no missed updates count: {row}"));
    assert_eq!(missed, 0, "the agent missed updates:\n{section}");
    // Some sampled flows are ones a rule admits, or the check would only
    // ever compare denies.
    let column = column_of(header, "flows checked (allowed)");
    let allowed: usize = row
        .split('|')
        .nth(column)
        .and_then(|c| c.trim().split_once('(')?.1.strip_suffix(')')?.parse().ok())
        .unwrap_or_else(|| panic!("no allowed flows count: {row}"));
    assert!(allowed > 0, "no sampled flow was allowed:\n{section}");
    // Growth rows from the size the agent started on, each with where its
    // pods-added passes spent their time, by stage.
    let header = table_header(section, "| cluster pods");
    let column = column_of(header, "load / compile / desired / write ms");
    for pods in ["| 100 |", "| 200 |", "| 300 |"] {
        let row = section
            .lines()
            .find(|l| l.starts_with(pods))
            .unwrap_or_else(|| panic!("no growth row {pods}:\n{section}"));
        let stages: Vec<f64> = row
            .split('|')
            .nth(column)
            .map(|c| c.split('/').filter_map(|v| v.trim().parse().ok()).collect())
            .unwrap_or_default();
        assert_eq!(stages.len(), 4, "four stage times: {row}");
        assert!(stages.iter().all(|ms| *ms >= 0.0), "{row}");
        assert!(
            stages[0] + stages[1] > 0.0,
            "load and compile took time: {row}"
        );
    }
    let mount = portcullis_agent::cgroup::cgroup2_mount().expect("a cgroup v2 mount");
    assert!(
        !mount.join("churn-bench").exists(),
        "the bench's cgroups are left behind"
    );
}

/// The header line of the table whose header starts with `start`.
fn table_header<'a>(section: &'a str, start: &str) -> &'a str {
    section
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("no table starting {start:?}:\n{section}"))
}

/// Where the column `name` is in a table row split at `|`.
fn column_of(header: &str, name: &str) -> usize {
    header
        .split('|')
        .position(|c| c.trim() == name)
        .unwrap_or_else(|| panic!("no {name:?} column in {header}"))
}
