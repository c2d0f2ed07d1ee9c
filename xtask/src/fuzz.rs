//! `cargo xtask fuzz`: the cargo-fuzz targets in agent/fuzz (the parsers of
//! untrusted input). Without `--replay` each target runs for `--seconds`
//! from its committed corpus; with it, every corpus input runs once through
//! its target (fast, for CI). Either fails when a target crashes.
//!
//! cargo-fuzz needs nightly flags; `RUSTC_BOOTSTRAP=1` lets the toolchain
//! at hand accept them, so no nightly toolchain is needed.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::run;

pub struct Options {
    /// How long each target runs (ignored with `replay`).
    pub seconds: u64,
    pub replay: bool,
    /// Only these targets; empty means all.
    pub targets: Vec<String>,
}

fn fuzz_dir() -> PathBuf {
    run::workspace_root().join("agent").join("fuzz")
}

/// `cargo fuzz …` in agent/fuzz, with the environment every run needs.
fn cargo_fuzz() -> Command {
    let mut cmd = run::cargo();
    cmd.current_dir(fuzz_dir())
        .env("RUSTC_BOOTSTRAP", "1")
        // The parsers need no kernel object.
        .env("AYA_BUILD_SKIP", "1")
        .arg("fuzz");
    cmd
}

fn ensure_cargo_fuzz() -> Result<()> {
    if run::output(cargo_fuzz().arg("--version")).is_some() {
        return Ok(());
    }
    println!("== installing cargo-fuzz");
    run::run(
        "installing cargo-fuzz",
        run::cargo().args(["install", "cargo-fuzz", "--locked"]),
    )
}

fn targets(only: &[String]) -> Result<Vec<String>> {
    let listed = run::output(cargo_fuzz().arg("list")).context("`cargo fuzz list` failed")?;
    let all: Vec<String> = listed.lines().map(str::trim).map(String::from).collect();
    if let Some(unknown) = only.iter().find(|t| !all.contains(t)) {
        bail!("no fuzz target {unknown:?} (targets: {})", all.join(", "));
    }
    Ok(if only.is_empty() { all } else { only.to_vec() })
}

/// What one target's run showed.
struct Outcome {
    target: String,
    /// libFuzzer's count of executions, if it printed one.
    runs: Option<u64>,
    crashed: bool,
    artifacts: Vec<PathBuf>,
}

pub fn fuzz(options: &Options) -> Result<()> {
    ensure_cargo_fuzz()?;
    let targets = targets(&options.targets)?;
    let target_dir = run::target_dir().join("fuzz");
    let mut outcomes = Vec::new();
    for target in &targets {
        let corpus = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let artifacts = fuzz_dir().join("artifacts").join(target);
        let before = files(&artifacts);
        let mut cmd = cargo_fuzz();
        cmd.args(["run", "--target-dir"])
            .arg(&target_dir)
            .arg(target)
            .arg(&corpus)
            .args(["--", "-timeout=10", "-rss_limit_mb=2048"]);
        if options.replay {
            // Run the corpus once, add nothing to it.
            cmd.arg("-runs=0");
        } else {
            cmd.arg(format!("-max_total_time={}", options.seconds));
        }
        println!("== fuzz {target}");
        let (crashed, runs) = run_counting(target, &mut cmd)?;
        let artifacts: Vec<PathBuf> = files(&artifacts)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        outcomes.push(Outcome {
            target: target.clone(),
            runs,
            crashed,
            artifacts,
        });
    }
    println!("== fuzz summary");
    for o in &outcomes {
        let runs = o.runs.map_or("? runs".to_string(), |r| format!("{r} runs"));
        let verdict = if o.crashed { "CRASHED" } else { "0 crashes" };
        println!("{}: {runs}, {verdict}", o.target);
        for a in &o.artifacts {
            println!("  crashing input: {}", a.display());
        }
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.crashed)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (reproduce with `RUSTC_BOOTSTRAP=1 AYA_BUILD_SKIP=1 cargo fuzz run <target> <input>` in agent/fuzz)",
            crashed.join(", ")
        );
    }
    println!("✓ fuzz: {} targets, 0 crashes", outcomes.len());
    Ok(())
}

/// Runs libFuzzer, echoing its stderr and reading the number of
/// executions from it. Returns (crashed, runs).
fn run_counting(step: &str, cmd: &mut Command) -> Result<(bool, Option<u64>)> {
    println!("$ {}", run::display(cmd));
    let _ = std::io::stdout().flush();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{step}: could not start `{}`", run::display(cmd)))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut runs = None;
    let mut err = std::io::stderr().lock();
    for line in BufReader::new(stderr).split(b'\n') {
        let line = line.with_context(|| format!("{step}: reading output"))?;
        let _ = err.write_all(&line);
        let _ = err.write_all(b"\n");
        if let Some(n) = executions(&String::from_utf8_lossy(&line)) {
            runs = Some(n);
        }
    }
    let status = child.wait().with_context(|| format!("{step}: waiting"))?;
    Ok((!status.success(), runs))
}

/// The execution count in a libFuzzer status line: `#12345\t…` while
/// running, `Done 12345 runs in 600 second(s)` at the end.
fn executions(line: &str) -> Option<u64> {
    if let Some(rest) = line.strip_prefix("Done ") {
        return rest.split_whitespace().next()?.parse().ok();
    }
    let rest = line.strip_prefix('#')?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::executions;

    #[test]
    fn execution_counts_are_read_from_libfuzzer_lines() {
        assert_eq!(
            executions("Done 123456 runs in 600 second(s)"),
            Some(123456)
        );
        assert_eq!(
            executions("#52213\tNEW    cov: 1234 ft: 5678 corp: 90/12Kb"),
            Some(52213)
        );
        assert_eq!(executions("#2\tINITED cov: 10"), Some(2));
        assert_eq!(executions("INFO: Seed: 1"), None);
        assert_eq!(executions("==1234== ERROR: libFuzzer: deadly signal"), None);
    }
}
