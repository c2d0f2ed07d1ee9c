//! Running child processes: echo the command and let it print, or run it
//! quietly; errors name the step. Progress lines with logs: `progress.rs`.

use std::{
    ffi::OsStr,
    io::Write as _,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// `path` relative to the current directory if it lies below it (as a user
/// would type it), else as it is.
pub fn pretty_path(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A `cargo` command (the same cargo that runs xtask) in the workspace root.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    // `cargo run` describes xtask's own package in the environment
    // (CARGO_PKG_NAME=xtask, CARGO_MANIFEST_DIR=…/xtask). Build scripts that
    // watch those (ring's, through cc) would rerun whenever builds alternate
    // between `cargo build` and `cargo xtask build`, rebuilding ring, rustls
    // and the agent for nothing.
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("CARGO_PKG_")
            || key_str.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
            ]
            .contains(&key_str.as_ref())
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `cmd` as a shell-like line, with the environment it sets in front.
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    let program = Path::new(cmd.get_program());
    // Print `cargo` rather than the full path of the toolchain's cargo.
    let program = match program.file_name() {
        Some(name) if name == OsStr::new("cargo") => name,
        _ => program.as_os_str(),
    };
    parts.push(quote(program));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `exit status 1` or `signal 9`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// Runs `cmd` with inherited stdio and returns its status.
pub fn status(step: &str, cmd: &mut Command) -> Result<ExitStatus> {
    println!("$ {}", display(cmd));
    let _ = std::io::stdout().flush();
    cmd.status()
        .with_context(|| format!("{step}: could not start `{}`", display(cmd)))
}

/// Runs `cmd` with inherited stdio; an error names `step` if it fails.
pub fn run(step: &str, cmd: &mut Command) -> Result<()> {
    let st = status(step, cmd)?;
    if !st.success() {
        bail!(
            "{step} failed: `{}` ended with {}",
            display(cmd),
            describe(st)
        );
    }
    Ok(())
}

/// Runs `cmd` quietly; its trimmed stdout if it ran and succeeded.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Exits this process the way `status` ended (for pass-through commands).
pub fn exit_like(status: ExitStatus) -> ! {
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    std::process::exit(code)
}
