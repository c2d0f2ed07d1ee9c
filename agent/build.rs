//! Builds the kernel object (`portcullis-ebpf`) for the BPF target, so a plain
//! `cargo build` yields a working agent. `AYA_BUILD_SKIP=1` skips it (lint-only
//! runs); `cargo xtask setup` installs the toolchain this needs.
//!
//! This does what `aya_build::build_ebpf` does, except for the nested cargo's
//! output: aya-build relays every line as a `cargo:warning`, so a first build
//! printed some 60 warning lines. Here the output goes to a log file in
//! `OUT_DIR`; a successful build prints nothing, a failed one fails this
//! script with the log's path and its last lines (cargo prints a build
//! script's error in full).

use std::{
    fs::File,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _};

/// Toolchain that `cargo xtask setup` links when nightly lacks rust-src.
const LINKED_TOOLCHAIN: &str = "bpf";
const PACKAGE: &str = "portcullis-ebpf";
/// The binary target of `PACKAGE`; the agent embeds `OUT_DIR/<BIN>`.
const BIN: &str = "portcullis";
const LOG: &str = "ebpf-build.log";
/// How much of the log a failure shows.
const TAIL_LINES: usize = 40;

fn has_rust_src(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    out.status.success()
        && Path::new(&sysroot)
            .join("lib/rustlib/src/rust/library/core")
            .exists()
}

/// `AYA_BUILD_SKIP` as aya-build reads it: `1` or `true`.
fn skip_requested() -> bool {
    std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

fn env(key: &str) -> anyhow::Result<String> {
    std::env::var(key).with_context(|| format!("{key} is not set"))
}

fn main() {
    // Printed by hand: returning the error from main would add anyhow's
    // backtrace under RUST_BACKTRACE, burying the log tail.
    if let Err(e) = build() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn build() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("agent/ lives inside the workspace")?;
    let ebpf_dir = workspace.join("ebpf");
    // Rebuild when the kernel programs, the ABI they share with the agent, or
    // the workspace's dependency versions change (directories are scanned
    // recursively), or when the toolchain choice or skip flag does.
    for path in [
        ebpf_dir.clone(),
        workspace.join("common"),
        workspace.join("Cargo.toml"),
        workspace.join("Cargo.lock"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    println!("cargo:rerun-if-env-changed=PORTCULLIS_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");

    let out_dir = PathBuf::from(env("OUT_DIR")?);
    let object = out_dir.join(BIN);
    if skip_requested() {
        // Leave an empty object so the agent still compiles (lint-only runs);
        // it refuses to load an empty one with a clear error.
        if !object.exists() {
            std::fs::write(&object, [])?;
        }
        return Ok(());
    }

    let toolchain = match std::env::var("PORTCULLIS_EBPF_TOOLCHAIN") {
        Ok(t) => t,
        Err(_) if has_rust_src("nightly") => "nightly".to_string(),
        Err(_) if has_rust_src(LINKED_TOOLCHAIN) => LINKED_TOOLCHAIN.to_string(),
        Err(_) => bail!(
            "no Rust toolchain can build the eBPF programs: nightly has no rust-src and the \
             '{LINKED_TOOLCHAIN}' toolchain is not linked; run `cargo xtask setup` first"
        ),
    };

    let endian = env("CARGO_CFG_TARGET_ENDIAN")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other}"),
    };
    // aya-ebpf reads the architecture it runs on from `bpf_target_arch`.
    let arch = env("CARGO_CFG_TARGET_ARCH")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64"
    } else {
        &arch
    };

    // The nested cargo gets a target directory of its own: sharing ours would
    // deadlock on cargo's lock.
    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &toolchain, "cargo", "build"])
        .args(["--package", PACKAGE, "--bin", BIN, "--release"])
        .args(["--target", target])
        // `core` is not shipped for the BPF targets: build it from rust-src.
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--color=never")
        .current_dir(&ebpf_dir)
        // Overrides any RUSTFLAGS; \x1f separates the flags.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
        )
        // Set by our own cargo for the host toolchain; the nested build must
        // use `toolchain`'s rustc.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    if toolchain != "nightly" {
        // A stable toolchain with library source builds `core` for the BPF
        // target only with unstable flags enabled.
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }

    let log_path = out_dir.join(LOG);
    let log = File::create(&log_path)
        .with_context(|| format!("creating the eBPF build log {}", log_path.display()))?;
    cmd.stdout(log.try_clone()?).stderr(log);
    // The command as a user would retype it (RUSTFLAGS left out).
    let shown = format!(
        "{}rustup run {toolchain} cargo build -p {PACKAGE} --release --target {target} \
         -Z build-std=core",
        if toolchain == "nightly" {
            ""
        } else {
            "RUSTC_BOOTSTRAP=1 "
        },
    );
    let status = match cmd.status() {
        Ok(status) => status,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("building the eBPF object needs rustup (https://rustup.rs), which was not found")
        }
        Err(e) => return Err(anyhow!(e).context(format!("could not start `{shown}`"))),
    };
    if !status.success() {
        bail!(
            "building the eBPF object ({PACKAGE}) failed: `{shown}` ended with {status}\n\
             full log: {}\n\
             {}",
            log_path.display(),
            tail(&log_path, TAIL_LINES)
        );
    }

    let built = target_dir.join(target).join("release").join(BIN);
    std::fs::copy(&built, &object).with_context(|| {
        format!(
            "the eBPF build succeeded but copying {} to {} failed (log: {})",
            built.display(),
            object.display(),
            log_path.display()
        )
    })?;
    Ok(())
}

/// The last `n` lines of the log at `path`, under a header saying so.
fn tail(path: &Path, n: usize) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("(could not read the log: {e})"),
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    let mut out = if start == 0 {
        "log:".to_string()
    } else {
        format!("last {} of {} log lines:", lines.len() - start, lines.len())
    };
    for line in &lines[start..] {
        out.push_str("\n  ");
        out.push_str(line);
    }
    out
}
