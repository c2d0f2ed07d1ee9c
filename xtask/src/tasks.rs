//! The commands that build, test, lint and run the agent.

use std::{ffi::OsString, path::PathBuf, process::Command, time::Instant};

use anyhow::{bail, Result};

use crate::{
    run::{self, is_root},
    setup::setup,
};

const AGENT_PACKAGE: &str = "portcullis-agent";
const AGENT_BIN: &str = "portcullis";

/// `cargo xtask build`: setup, then the release agent binary.
pub fn build() -> Result<()> {
    setup()?;
    build_agent()?;
    Ok(())
}

fn build_agent() -> Result<PathBuf> {
    let start = Instant::now();
    println!("== build");
    run::run(
        "build",
        run::cargo().args(["build", "--release", "-p", AGENT_PACKAGE]),
    )?;
    let bin = run::target_dir().join("release").join(AGENT_BIN);
    if !bin.exists() {
        bail!("build succeeded but {} is missing", bin.display());
    }
    println!(
        "✓ built {} in {:.1} s",
        bin.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(bin)
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
    let start = Instant::now();
    println!("== test");
    let mut cmd = run::cargo();
    cmd.env("PORTCULLIS_BIN", &bin)
        .env("PORTCULLIS_KUBE_BIN", &kube_bin)
        .args([
            "test",
            "--release",
            "--no-fail-fast",
            "--",
            "--test-threads=1",
        ])
        .args(args);
    let mut totals = Totals::default();
    let status = run::status_with_lines("test", &mut cmd, |line| totals.add(line))?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() || totals.failed > 0 {
        bail!(
            "test failed: {} ({status}) in {secs:.1} s",
            totals.summary()
        );
    }
    println!("✓ tests passed: {} in {secs:.1} s", totals.summary());
    Ok(())
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
    let mut lab: Vec<OsString> = ["lab", "--policies", "deploy/examples", "--show-before"]
        .map(OsString::from)
        .to_vec();
    lab.extend_from_slice(args);
    run_agent("demo", &lab)
}

/// `cargo xtask bench`: `portcullis bench` with the given arguments.
pub fn bench(args: &[OsString]) -> Result<()> {
    let mut bench = vec![OsString::from("bench")];
    bench.extend_from_slice(args);
    run_agent("bench", &bench)
}

/// Builds the agent and runs it from the workspace root; exits with its
/// status.
fn run_agent(step: &str, args: &[OsString]) -> Result<()> {
    setup()?;
    let bin = build_agent()?;
    if !is_root() {
        println!("! not root: the lab needs root for network namespaces and eBPF");
    }
    println!("== {step}");
    let mut cmd = Command::new(&bin);
    cmd.current_dir(run::workspace_root()).args(args);
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
    let mut clippy = run::cargo();
    clippy
        .env("AYA_BUILD_SKIP", "1")
        .args(["clippy", "--all-targets", "--", "-D", "warnings"]);
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
    use super::Totals;

    #[test]
    fn sums_test_results() {
        let mut t = Totals::default();
        t.add("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add("running 2 tests");
        t.add("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.50s");
        assert_eq!((t.suites, t.passed, t.failed, t.ignored), (2, 4, 2, 1));
    }
}
