//! The commands that build, test, lint and run the agent. Building and
//! testing print one progress line each; cargo's output goes to
//! `target/xtask-logs/{build,test}.log` and is shown when they fail.

use std::{ffi::OsString, path::PathBuf, process::Command};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    progress::{self, Stage},
    run::{self, is_root},
    setup::setup,
};

/// At most this many lines of a failed cargo command's errors are shown.
const MAX_REPORT_LINES: usize = 150;

const AGENT_PACKAGE: &str = "portcullis-agent";
const AGENT_BIN: &str = "portcullis";

/// `cargo xtask build`: setup, then the release agent binary.
pub fn build() -> Result<()> {
    setup()?;
    build_agent()?;
    Ok(())
}

/// `building target/release/portcullis … done in 4 min 2 s`; the agent's
/// build script builds the eBPF object (see agent/build.rs).
fn build_agent() -> Result<PathBuf> {
    let bin = run::target_dir().join("release").join(AGENT_BIN);
    let mut stage = Stage::start(
        format!("building {}", run::pretty_path(&bin)),
        progress::log_path("build"),
    )?;
    let mut cmd = run::cargo();
    cmd.args(["build", "--release", "-p", AGENT_PACKAGE]);
    let mut warnings = 0;
    let status = match stage.command_with_lines(&mut cmd, |line| warnings += warning_count(line)) {
        Ok(status) => status,
        Err(e) => return Err(stage.fail(e)),
    };
    if !status.success() {
        let err = anyhow!(
            "`{}` ended with {}",
            run::display(&cmd),
            run::describe(status)
        );
        return Err(fail_cargo(stage, err));
    }
    if !bin.exists() {
        let err = anyhow!("cargo succeeded but {} is missing", bin.display());
        return Err(stage.fail(err));
    }
    let note = match warnings {
        0 => String::new(),
        n => format!(
            "{n} compiler warning{} (see {})",
            if n == 1 { "" } else { "s" },
            run::pretty_path(stage.log_path())
        ),
    };
    stage.done(&note);
    Ok(bin)
}

/// The `N` of cargo's `warning: `foo` (lib) generated N warnings` lines.
fn warning_count(line: &str) -> u32 {
    let Some(rest) = line.strip_prefix("warning: `") else {
        return 0;
    };
    let Some((_, tail)) = rest.split_once(" generated ") else {
        return 0;
    };
    tail.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Fails a stage that ran cargo, showing cargo's errors (or the log's tail
/// if it printed none).
fn fail_cargo(stage: Stage, err: anyhow::Error) -> anyhow::Error {
    let text = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
    match progress::cargo_errors(&text, MAX_REPORT_LINES) {
        Some(report) => stage.fail_showing(err, &report),
        None => stage.fail(err),
    }
}

/// `cargo xtask crdgen`: writes deploy/crds with the agent's hidden
/// `crdgen` command. Schemas need no kernel object, so the eBPF build is
/// skipped and no setup is needed.
pub fn crdgen() -> Result<()> {
    let out = run::workspace_root().join("deploy").join("crds");
    println!("== crdgen");
    run::run(
        "crdgen",
        run::cargo()
            .env("AYA_BUILD_SKIP", "1")
            .args([
                "run",
                "--quiet",
                "-p",
                AGENT_PACKAGE,
                "--bin",
                AGENT_BIN,
                "--",
                "crdgen",
                "--out",
            ])
            .arg(&out),
    )?;
    println!("✓ wrote {}", out.display());
    Ok(())
}

/// `cargo xtask test`: every test of the default members (ebpf is not a host
/// crate), one at a time: the privileged tests share kernel state.
pub fn test(args: &[OsString]) -> Result<()> {
    if !is_root() {
        bail!(
            "the privileged tests load eBPF programs and create network namespaces; \
             run as root (sudo -E cargo xtask test)"
        );
    }
    setup()?;
    let bin = build_agent()?;
    // The Kubernetes tests run against a real API server.
    let kube_bin = crate::kube::build()?;
    let mut stage = Stage::start("testing", progress::log_path("test"))?;
    let serial = match serial_test_targets() {
        Ok(targets) => targets,
        Err(e) => return Err(stage.fail(e)),
    };
    let test = || {
        let mut cmd = run::cargo();
        cmd.env("PORTCULLIS_BIN", &bin)
            .env("PORTCULLIS_KUBE_BIN", &kube_bin)
            .args(["test", "--release", "--no-fail-fast"]);
        cmd
    };
    // Tests of the API server alone run with libtest's threads; everything
    // else shares the kernel (labs, bpffs, cgroups) and runs one at a time;
    // then the doc tests.
    // No `-p`: both runs select the same packages, so features unify the
    // same way and the second run builds nothing again.
    let mut parallel = test();
    for name in PARALLEL_TESTS {
        parallel.args(["--test", name]);
    }
    parallel.arg("--").args(args);
    let mut serialized = test();
    serialized.args(["--lib", "--bins"]);
    for name in &serial {
        serialized.args(["--test", name]);
    }
    serialized.args(["--", "--test-threads=1"]).args(args);
    let mut doc = test();
    doc.arg("--doc").arg("--").args(args);
    let mut totals = Totals::default();
    let mut status = None;
    for cmd in [&mut parallel, &mut serialized, &mut doc] {
        match stage.command_with_lines(cmd, |line| totals.add(line)) {
            // The first failure decides the exit status; all runs go on.
            Ok(s) => {
                status = status
                    .filter(|s: &std::process::ExitStatus| !s.success())
                    .or(Some(s))
            }
            Err(e) => return Err(stage.fail(e)),
        }
    }
    let status = status.expect("three runs");
    if !status.success() || totals.failed > 0 {
        let err = anyhow!("{} ({})", totals.summary(), run::describe(status));
        let text = std::fs::read_to_string(stage.log_path()).unwrap_or_default();
        let report = test_failures(&text);
        return Err(if report.is_empty() {
            stage.fail(err)
        } else {
            stage.fail_showing(err, &report)
        });
    }
    stage.done(&totals.summary());
    Ok(())
}

/// The integration tests' binaries that use only a test API server and temporary
/// directories, never the kernel's shared state: safe to run in parallel
/// (a third of the time, on 2 cores).
const PARALLEL_TESTS: [&str; 4] = ["api_source", "crds", "api_server", "identity_ca"];

/// Every other test target of the default members (from `cargo metadata`),
/// so a new test file is run without being listed anywhere.
fn serial_test_targets() -> Result<Vec<String>> {
    let out = run::cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading cargo metadata")?;
    let members: Vec<&str> = metadata["workspace_default_members"]
        .as_array()
        .context("cargo metadata without workspace_default_members")?
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let mut names = Vec::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        if !members.contains(&package["id"].as_str().unwrap_or_default()) {
            continue;
        }
        for target in package["targets"].as_array().into_iter().flatten() {
            let is_test = target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"));
            let name = target["name"].as_str().unwrap_or_default();
            if is_test && !PARALLEL_TESTS.contains(&name) {
                names.push(name.to_string());
            }
        }
    }
    if names.is_empty() {
        bail!("cargo metadata lists no test targets");
    }
    Ok(names)
}

/// What the log of a failed `cargo test` says about its failures: each
/// failing test binary's `failures:` section (the tests' output and
/// panics), and cargo's errors (a test that did not compile, a binary that
/// crashed), without cargo's status lines; at most `MAX_REPORT_LINES`.
fn test_failures(log: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut binary = None;
    let mut in_failures = false;
    let mut in_error = false;
    for line in log.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("Running ") || trimmed.starts_with("Doc-tests ") {
            binary = Some(trimmed);
            in_error = false;
            continue;
        }
        if in_failures {
            out.push(line);
            if line.starts_with("test result:") {
                in_failures = false;
            }
            continue;
        }
        if line == "failures:" {
            in_failures = true;
            in_error = false;
            out.extend(binary.take());
            out.push(line);
            continue;
        }
        if line.starts_with("error") {
            in_error = true;
        } else if in_error && (progress::is_cargo_status(line) || !line.starts_with([' ', '\t'])) {
            // Diagnostics continue with indented lines (`  --> src/x.rs`)
            // and blank ones; anything else ends them.
            in_error = line.is_empty();
        }
        if in_error {
            out.push(line);
        }
    }
    if out.len() > MAX_REPORT_LINES {
        let more = out.len() - MAX_REPORT_LINES;
        out.truncate(MAX_REPORT_LINES);
        return format!("{}\n… {more} more lines", out.join("\n"));
    }
    out.join("\n")
}

/// Sums libtest's `test result:` lines.
#[derive(Default)]
struct Totals {
    suites: u32,
    passed: u32,
    failed: u32,
    ignored: u32,
}

impl Totals {
    fn add(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.suites += 1;
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u32>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }

    fn summary(&self) -> String {
        format!(
            "{} passed, {} failed, {} ignored in {} test binaries",
            self.passed, self.failed, self.ignored, self.suites
        )
    }
}

/// `cargo xtask demo`: the lab on the example policies.
pub fn demo(args: &[OsString]) -> Result<()> {
    // Every pod meshed STRICT: the matrices are those of plaintext, and the
    // lab then shows one connection as encrypted, to whom, with which
    // certificate.
    let mut lab: Vec<OsString> = [
        "lab",
        "--policies",
        "deploy/examples",
        "--show-before",
        "--mtls",
        "strict",
    ]
    .map(OsString::from)
    .to_vec();
    lab.extend_from_slice(args);
    run_agent("demo", &lab, None)
}

/// `cargo xtask bench`: `portcullis bench` with the given arguments.
pub fn bench(args: &[OsString]) -> Result<()> {
    let mut bench = vec![OsString::from("bench")];
    bench.extend_from_slice(args);
    // The churn section runs a real API server.
    let kube_bin = runs_churn(args).then(crate::kube::build).transpose()?;
    run_agent("bench", &bench, kube_bin)
}

/// Whether `portcullis bench` with `args` runs the churn section.
fn runs_churn(args: &[OsString]) -> bool {
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.iter().any(|a| a == "--skip-churn") {
        return false;
    }
    let only = args
        .iter()
        .enumerate()
        .find_map(|(i, a)| match a.strip_prefix("--only") {
            Some("") => args.get(i + 1).cloned(),
            Some(v) => v.strip_prefix('=').map(str::to_string),
            None => None,
        });
    only.is_none_or(|v| v.split(',').any(|s| s == "churn"))
}

/// Builds the agent and runs it from the workspace root; exits with its
/// status.
fn run_agent(step: &str, args: &[OsString], kube_bin: Option<PathBuf>) -> Result<()> {
    setup()?;
    let bin = build_agent()?;
    if !is_root() {
        println!("! not root: the lab needs root for network namespaces and eBPF");
    }
    let mut cmd = Command::new(&bin);
    cmd.current_dir(run::workspace_root()).args(args);
    if let Some(dir) = kube_bin {
        cmd.env("PORTCULLIS_KUBE_BIN", dir);
    }
    let status = run::status(step, &mut cmd)?;
    if !status.success() {
        eprintln!(
            "✗ xtask: {step} failed: `{}` ended with {status}",
            run::display(&cmd)
        );
    }
    run::exit_like(status)
}

/// `cargo xtask lint`: rustfmt and clippy; reports both before failing.
pub fn lint() -> Result<()> {
    println!("== lint");
    for (tool, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if run::output(run::cargo().args([tool, "--version"])).is_none() {
            bail!("lint needs `cargo {tool}` (`cargo {tool} --version` failed): rustup component add {component}");
        }
    }
    let mut failed = Vec::new();
    if !run::status("fmt", run::cargo().args(["fmt", "--all", "--", "--check"]))?.success() {
        failed.push("rustfmt (run `cargo fmt --all`)");
    }
    // Default members only: `--workspace` would build the eBPF crate for the
    // host. AYA_BUILD_SKIP: linting does not need the kernel object.
    // --quiet: only the diagnostics (in full, in colour), not the hundreds
    // of `Checking` lines of a first run.
    let mut clippy = run::cargo();
    clippy
        .env("AYA_BUILD_SKIP", "1")
        .args(["clippy", "--quiet", "--all-targets"])
        .args(["--", "-D", "warnings"]);
    if !run::status("clippy", &mut clippy)?.success() {
        failed.push("clippy");
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    println!("✓ lint passed (rustfmt, clippy)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::{
        runs_churn, serial_test_targets, test_failures, warning_count, Totals, PARALLEL_TESTS,
    };

    #[test]
    fn the_control_plane_is_built_only_when_churn_runs() {
        let runs = |a: &[&str]| runs_churn(&a.iter().map(OsString::from).collect::<Vec<_>>());
        assert!(runs(&[]));
        assert!(runs(&["--only", "mtls,churn"]));
        assert!(runs(&["--only=churn"]));
        assert!(!runs(&["--only", "mtls"]));
        assert!(!runs(&["--skip-churn"]));
    }

    /// Every test file runs in one of the two groups: the serialized group
    /// comes from cargo metadata, so a new file cannot be left out.
    #[test]
    fn every_test_target_runs_in_exactly_one_group() {
        let serial = serial_test_targets().expect("cargo metadata");
        for name in [
            "guards",
            "kubernetes",
            "adversarial",
            "kube_source",
            "manifests",
        ] {
            assert!(
                serial.iter().any(|s| s == name),
                "{name} missing: {serial:?}"
            );
        }
        for name in PARALLEL_TESTS {
            assert!(!serial.iter().any(|s| s == name), "{name} in both");
        }
    }

    #[test]
    fn counts_compiler_warnings() {
        assert_eq!(
            warning_count("warning: `portcullis-agent` (lib) generated 2 warnings"),
            2
        );
        assert_eq!(
            warning_count("warning: `x` (bin \"x\") generated 1 warning (run `cargo fix`)"),
            1
        );
        assert_eq!(warning_count("warning: unused variable: `a`"), 0);
    }

    #[test]
    fn reports_test_failures() {
        let log = "\
   Compiling portcullis-tests v0.1.0
     Running unittests src/lib.rs (target/release/deps/a-1)

running 2 tests
test a::ok ... ok
test a::bad ... FAILED

failures:

---- a::bad stdout ----
thread 'a::bad' panicked at src/lib.rs:3:5:
boom

failures:
    a::bad

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

     Running tests/lab.rs (target/release/deps/lab-2)

running 1 test
test lab ... ok

test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s

error: test failed, to rerun pass `--lib`
error: 1 target failed:
    `--lib`
";
        let want = "\
     Running unittests src/lib.rs (target/release/deps/a-1)
failures:

---- a::bad stdout ----
thread 'a::bad' panicked at src/lib.rs:3:5:
boom

failures:
    a::bad

test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s
error: test failed, to rerun pass `--lib`
error: 1 target failed:
    `--lib`";
        assert_eq!(test_failures(log), want);
        let compile = "   Compiling a v0.1.0\nerror[E0425]: cannot find value `x`\n --> a.rs:1:1\n  |\n\nFor more information, try `rustc --explain E0425`.\nerror: could not compile `a` (lib test) due to 1 previous error\n";
        assert_eq!(
            test_failures(compile),
            "error[E0425]: cannot find value `x`\n --> a.rs:1:1\n  |\n\nerror: could not compile `a` (lib test) due to 1 previous error"
        );
    }

    #[test]
    fn sums_test_results() {
        let mut t = Totals::default();
        t.add("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add("running 2 tests");
        t.add("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.50s");
        assert_eq!((t.suites, t.passed, t.failed, t.ignored), (2, 4, 2, 1));
    }
}
