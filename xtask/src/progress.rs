//! One progress line per stage: `name … done in 12.3 s`. The output of a
//! stage's commands goes to a log file under `target/xtask-logs/`; when the
//! stage fails, its last lines and the log's path are printed instead.
//!
//! ```ignore
//! Stage::run("installing bpf-linker", &progress::log_path("bpf-linker"), &mut cmd)?;
//! ```
//! or, for a stage of several commands or a custom report:
//! ```ignore
//! let mut stage = Stage::start("installing packages", progress::log_path("apt"))?;
//! let result = stage.command(&mut update).and_then(|()| stage.command(&mut install));
//! stage.finish(result)?;
//! ```
//! On a terminal the line shows the elapsed time and the command's latest
//! output line while it runs; elsewhere (CI, a pipe) it is printed whole.

use std::{
    fs::File,
    io::{BufRead as _, BufReader, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::run;

/// How many of the log's last lines a failed stage shows.
pub const TAIL_LINES: usize = 40;
/// How often the live line is redrawn at most for new output…
const REDRAW: Duration = Duration::from_millis(100);
/// …and at least, for its clock.
const TICK: Duration = Duration::from_secs(1);

/// `target/xtask-logs/<name>.log`.
pub fn log_path(name: &str) -> PathBuf {
    run::target_dir()
        .join("xtask-logs")
        .join(format!("{name}.log"))
}

/// A running stage: its line is printed up to `name … ` until it finishes.
pub struct Stage {
    name: String,
    log_path: PathBuf,
    log: File,
    start: Instant,
    /// Redraws the line in place (stdout is a terminal).
    live: bool,
    last_draw: Option<Instant>,
}

impl Stage {
    /// Runs `cmd` as a stage of its own, its output in `log_path`.
    pub fn run(name: &str, log_path: &Path, cmd: &mut Command) -> Result<()> {
        let mut stage = Stage::start(name, log_path)?;
        let result = stage.command(cmd);
        stage.finish(result)
    }

    /// Prints `name … ` and starts a fresh log at `log_path`.
    pub fn start(name: impl Into<String>, log_path: impl Into<PathBuf>) -> Result<Stage> {
        let name = name.into();
        let log_path = log_path.into();
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{name}: creating {}", dir.display()))?;
        }
        let log = File::create(&log_path)
            .with_context(|| format!("{name}: creating the log {}", log_path.display()))?;
        let live = std::io::stdout().is_terminal()
            && std::env::var_os("CI").is_none()
            && std::env::var("TERM").map_or(true, |t| t != "dumb");
        let stage = Stage {
            name,
            log_path,
            log,
            start: Instant::now(),
            live,
            last_draw: None,
        };
        print!("{} … ", stage.name);
        let _ = std::io::stdout().flush();
        Ok(stage)
    }

    /// The log file's path.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Runs `cmd` with its output appended to the log; an error if it does
    /// not succeed.
    pub fn command(&mut self, cmd: &mut Command) -> Result<()> {
        let status = self.command_with_lines(cmd, |_| {})?;
        if !status.success() {
            bail!(
                "`{}` ended with {}",
                run::display(cmd),
                run::describe(status)
            );
        }
        Ok(())
    }

    /// Runs `cmd` with its output (stdout and stderr, interleaved as
    /// written) appended to the log, handing each line to `on_line`.
    /// Returns its exit status; an error only if it could not run.
    pub fn command_with_lines(
        &mut self,
        cmd: &mut Command,
        mut on_line: impl FnMut(&str),
    ) -> Result<ExitStatus> {
        let shown = run::display(cmd);
        writeln!(self.log, "$ {shown}").context("writing the log")?;
        let (reader, writer) = std::io::pipe().context("creating a pipe")?;
        cmd.stdout(writer.try_clone().context("creating a pipe")?)
            .stderr(writer);
        let spawned = cmd.spawn();
        // Close our copies of the write end, or the reader never sees EOF.
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let mut child =
            spawned.with_context(|| format!("{}: could not start `{shown}`", self.name))?;
        // Lines arrive from a thread so the live line's clock ticks between
        // them (rustc can be silent for minutes).
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(reader).split(b'\n') {
                let stop = line.is_err();
                if tx.send(line).is_err() || stop {
                    break;
                }
            }
        });
        let mut last = String::new();
        loop {
            match rx.recv_timeout(TICK) {
                Ok(line) => {
                    let line = line.with_context(|| format!("{}: reading output", self.name))?;
                    self.log
                        .write_all(&line)
                        .and_then(|()| self.log.write_all(b"\n"))
                        .context("writing the log")?;
                    let line = String::from_utf8_lossy(&line);
                    on_line(&line);
                    if !line.trim().is_empty() {
                        last = line.into_owned();
                    }
                    self.redraw(&last, false);
                }
                Err(RecvTimeoutError::Timeout) => self.redraw(&last, true),
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let _ = reader.join();
        child
            .wait()
            .with_context(|| format!("{}: waiting for `{shown}`", self.name))
    }

    /// Ends the line with `done`, or `failed` and the log's tail.
    pub fn finish(self, result: Result<()>) -> Result<()> {
        match result {
            Ok(()) => {
                self.done("");
                Ok(())
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Ends the line with `done in <time>` and `note` (if not empty).
    pub fn done(self, note: &str) {
        let took = format_duration(self.start.elapsed());
        let note = if note.is_empty() {
            String::new()
        } else {
            format!(": {note}")
        };
        self.end_line(&format!("done in {took}{note}"));
    }

    /// Ends the line with `failed`, shows the log's last lines and returns
    /// `err` with the stage's name and the log's path.
    pub fn fail(self, err: anyhow::Error) -> anyhow::Error {
        let report = tail(&self.log_path, TAIL_LINES);
        self.fail_showing(err, &report)
    }

    /// Like [`Stage::fail`], showing `report` instead of the log's tail.
    pub fn fail_showing(self, err: anyhow::Error, report: &str) -> anyhow::Error {
        let took = format_duration(self.start.elapsed());
        self.end_line(&format!("failed after {took}"));
        let _ = self.log.sync_all();
        let log = run::pretty_path(&self.log_path);
        let mut stderr = std::io::stderr().lock();
        for line in report.lines() {
            let _ = writeln!(stderr, "    {line}");
        }
        let _ = writeln!(stderr, "    (full log: {log})");
        err.context(format!("{} failed (log: {log})", self.name))
    }

    fn end_line(&self, outcome: &str) {
        if self.last_draw.is_some() {
            // Replace the live status with the plain line.
            print!("\r\x1b[K{} … ", self.name);
        }
        println!("{outcome}");
    }

    /// On a terminal: `name … 1:23 <latest output line>`, cut to fit. Not
    /// drawn when it would not fit on one line (`\r` returns to the start
    /// of the last screen line only).
    fn redraw(&mut self, line: &str, tick: bool) {
        if !self.live || (!tick && self.last_draw.is_some_and(|t| t.elapsed() < REDRAW)) {
            return;
        }
        let line = line.trim();
        let secs = self.start.elapsed().as_secs();
        let head = format!("{} … {}:{:02} ", self.name, secs / 60, secs % 60);
        let room = terminal_width().saturating_sub(head.chars().count() + 1);
        if room < 10 {
            return;
        }
        self.last_draw = Some(Instant::now());
        let shown: String = line.chars().take(room).collect();
        print!("\r\x1b[K{head}{shown}");
        let _ = std::io::stdout().flush();
    }
}

/// `12.3 s`, or `3 min 58 s` from a minute on.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = d.as_secs();
        format!("{} min {} s", whole / 60, whole % 60)
    }
}

/// The last `n` lines of the file at `path`, under a header saying so.
pub fn tail(path: &Path, n: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("(could not read {}: {e})", path.display()),
    };
    tail_of(&text, n)
}

fn tail_of(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = if start == 0 {
        "--- output:".to_string()
    } else {
        format!("--- last {} of {} lines:", lines.len() - start, lines.len())
    };
    for line in &lines[start..] {
        out.push('\n');
        out.push_str(line);
    }
    out
}

/// Cargo's own status lines (`   Compiling foo v1.0`), which say nothing
/// about a failure.
pub fn is_cargo_status(line: &str) -> bool {
    const VERBS: &[&str] = &[
        "Adding",
        "Blocking",
        "Building",
        "Checking",
        "Compiling",
        "Doc-tests",
        "Documenting",
        "Downloaded",
        "Downloading",
        "Executable",
        "Finished",
        "Fresh",
        "Ignored",
        "Installed",
        "Installing",
        "Locking",
        "Packaging",
        "Replaced",
        "Replacing",
        "Running",
        "Updating",
    ];
    line.starts_with(' ')
        && line
            .split_whitespace()
            .next()
            .is_some_and(|verb| VERBS.contains(&verb))
}

/// What a failed cargo command's output says: everything from its first
/// error on, without cargo's status lines and the `cargo:` directives of a
/// failed build script, at most `max` lines; `None` if it reported no error.
pub fn cargo_errors(text: &str, max: usize) -> Option<String> {
    let mut lines = text.lines().skip_while(|l| !l.starts_with("error"));
    let first = lines.next()?;
    let kept: Vec<&str> = std::iter::once(first)
        .chain(lines.filter(|l| !is_cargo_status(l) && !l.trim_start().starts_with("cargo:")))
        .collect();
    let mut out = kept[..kept.len().min(max)].join("\n");
    if kept.len() > max {
        out.push_str(&format!("\n… {} more lines", kept.len() - max));
    }
    Some(out)
}

fn terminal_width() -> usize {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a `winsize` to the pointer it is given,
    // which points at one; on failure `ws` stays zeroed.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        usize::from(ws.ws_col)
    } else {
        80
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations() {
        assert_eq!(format_duration(Duration::from_millis(12_345)), "12.3 s");
        assert_eq!(format_duration(Duration::from_secs(238)), "3 min 58 s");
    }

    #[test]
    fn tails_long_and_short_output() {
        let text: String = (1..=50).map(|i| format!("line {i}\n")).collect();
        let t = tail_of(&text, 3);
        assert_eq!(t, "--- last 3 of 50 lines:\nline 48\nline 49\nline 50");
        assert_eq!(tail_of("a\nb\n", 40), "--- output:\na\nb");
    }

    #[test]
    fn finds_cargo_errors() {
        let log = "   Compiling a v0.1.0\nwarning: unused\nerror[E0308]: mismatched types\n  --> a.rs:1:1\n   Compiling b v0.1.0\n  cargo:rerun-if-changed=x\nerror: could not compile `a`\n";
        assert_eq!(
            cargo_errors(log, 10).as_deref(),
            Some("error[E0308]: mismatched types\n  --> a.rs:1:1\nerror: could not compile `a`")
        );
        assert_eq!(
            cargo_errors(log, 1).as_deref(),
            Some("error[E0308]: mismatched types\n… 2 more lines")
        );
        assert_eq!(cargo_errors("   Compiling a v0.1.0\n", 10), None);
    }

    #[test]
    fn logs_a_stage_and_reports_its_failure() {
        let dir = std::env::temp_dir().join(format!("xtask-progress-{}", std::process::id()));
        let log = dir.join("stage.log");
        let mut ok = Command::new("sh");
        ok.args(["-c", "echo out; echo err >&2"]);
        Stage::run("a passing stage", &log, &mut ok).expect("passes");
        let text = std::fs::read_to_string(&log).expect("log written");
        assert!(text.contains("out\n") && text.contains("err\n"), "{text}");

        let mut bad = Command::new("sh");
        bad.args(["-c", "echo why; exit 3"]);
        let err = Stage::run("a failing stage", &log, &mut bad).expect_err("fails");
        let msg = format!("{err:#}");
        assert!(msg.starts_with("a failing stage failed (log: "), "{msg}");
        assert!(msg.contains("exit status 3"), "{msg}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
