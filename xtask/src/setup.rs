//! `cargo xtask setup`: detect what building, testing and running the lab
//! need, and install only what is missing. Running it again installs nothing.
//! It prints one line per install step (their output goes to logs under
//! `target/xtask-logs/`, shown when a step fails) and one summary line.
//!
//! The eBPF side needs a toolchain that can build `core` for
//! `bpfel-unknown-none` (nightly + rust-src, or Debian's rustc with its library
//! source linked as the rustup toolchain `bpf`) and `bpf-linker`. See
//! "Building the kernel side on these machines" in the design notes.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Result};

use crate::{
    progress::{self, Stage},
    run::{self, is_root, output},
};

/// rustup toolchain name for Debian's rustc (must match `agent/build.rs`).
const LINKED_TOOLCHAIN: &str = "bpf";
/// Debian's rustc 1.96 with the library source, linked as `bpf`.
const DEBIAN_TOOLCHAIN: &[&str] = &["rustc-web", "cargo-web", "rust-web-src"];
/// What building bpf-linker against the system LLVM needs.
const LINKER_BUILD_DEPS: &[&str] = &["llvm-22-dev", "libpolly-22-dev", "libzstd-dev"];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_FEATURE: &str = "llvm-22";
/// Needed by the lab (ip), the benchmarks (iptables) and the metrics tests
/// (prometheus, promtool).
/// The mesh tests capture the node-to-pod wire (tcpdump) and read the TLS
/// records back (tshark).
/// The mTLS bench drives nginx (its own configuration and process, not the
/// service), iperf3 and wrk, and compares with a pair of stunnel processes.
const RUNTIME: &[&str] = &[
    "iproute2",
    "iptables",
    "prometheus",
    "tcpdump",
    "tshark",
    "stunnel4",
    "iperf3",
    "wrk",
    "nginx-light",
];
const BPFFS: &str = "/sys/fs/bpf";

/// What is missing, found before anything is changed.
#[derive(Default)]
struct Plan {
    /// Debian packages to install, in one apt-get run.
    apt: Vec<&'static str>,
    link_toolchain: bool,
    /// The eBPF toolchain is not usable yet; check again after installing.
    toolchain_pending: bool,
    install_linker: bool,
    /// Where a found or installed bpf-linker lives, if not on PATH yet.
    path_dir: Option<PathBuf>,
}

impl Plan {
    fn add_apt(&mut self, pkgs: Vec<&'static str>) {
        for p in pkgs {
            if !self.apt.contains(&p) {
                self.apt.push(p);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.apt.is_empty() && !self.link_toolchain && !self.install_linker
    }

    fn describe(&self) -> String {
        let mut what = Vec::new();
        if !self.apt.is_empty() {
            what.push(format!("Debian packages ({})", self.apt.join(" ")));
        }
        if self.link_toolchain {
            what.push(format!("the `{LINKED_TOOLCHAIN}` rustup toolchain"));
        }
        if self.install_linker {
            what.push(format!("bpf-linker {BPF_LINKER_VERSION}"));
        }
        what.join(", ")
    }
}

pub fn setup() -> Result<()> {
    let start = Instant::now();
    let mut plan = Plan::default();

    let toolchain = check_toolchain(&mut plan)?;
    check_linker(&mut plan);
    check_runtime(&mut plan);

    if !plan.is_empty() {
        if !is_root() {
            bail!(
                "setup must install {}; run as root (sudo -E cargo xtask setup)",
                plan.describe()
            );
        }
        install(&plan)?;
    }
    if let Some(dir) = &plan.path_dir {
        prepend_path(dir);
    }
    let linker = verify(&toolchain, &plan)?;
    let bpffs = mount_bpffs()?;

    println!(
        "setup … ready in {}: eBPF toolchain `{toolchain}` ({}), {linker}{bpffs}",
        progress::format_duration(start.elapsed()),
        rustc_version(&toolchain)
    );
    Ok(())
}

/// Picks the toolchain `agent/build.rs` will use and plans what it lacks.
fn check_toolchain(plan: &mut Plan) -> Result<String> {
    // Toolchains are picked and linked through rustup; say so up front
    // rather than fail later at `rustup toolchain link`.
    let rustup = std::process::Command::new("rustup")
        .arg("--version")
        .output();
    if !rustup.is_ok_and(|o| o.status.success()) {
        bail!("rustup is needed to manage the eBPF toolchain: install it from https://rustup.rs");
    }
    if let Ok(tc) = std::env::var("PORTCULLIS_EBPF_TOOLCHAIN") {
        if !has_rust_src(&tc) {
            bail!("PORTCULLIS_EBPF_TOOLCHAIN={tc}, but that toolchain has no rust-src");
        }
        return Ok(tc);
    }
    if has_rust_src("nightly") {
        return Ok("nightly".into());
    }
    // nightly has no rust-src: Debian's rustc, linked as `bpf`.
    plan.add_apt(missing_packages(DEBIAN_TOOLCHAIN));

    if !toolchain_linked(LINKED_TOOLCHAIN) {
        plan.link_toolchain = true;
        plan.toolchain_pending = true;
    } else if has_rust_src(LINKED_TOOLCHAIN) {
        return Ok(LINKED_TOOLCHAIN.into());
    } else if plan.apt.contains(&"rust-web-src") {
        // Linked; the library source comes with the packages.
        plan.toolchain_pending = true;
    } else {
        bail!(
            "toolchain `{LINKED_TOOLCHAIN}` is linked but has no library source under \
             <sysroot>/lib/rustlib/src/rust/library; it should point at /usr: \
             `rustup toolchain uninstall {LINKED_TOOLCHAIN}` and run setup again"
        );
    }
    Ok(LINKED_TOOLCHAIN.into())
}

fn check_linker(plan: &mut Plan) {
    if linker_version(None).is_some() {
        return;
    }
    let dir = install_bin_dir();
    if dir
        .as_deref()
        .and_then(|d| linker_version(Some(d)))
        .is_some()
    {
        // Found in cargo's bin directory: added to PATH.
        plan.path_dir = dir;
        return;
    }
    plan.install_linker = true;
    plan.path_dir = dir;
    plan.add_apt(missing_packages(LINKER_BUILD_DEPS));
}

fn check_runtime(plan: &mut Plan) {
    plan.add_apt(missing_packages(RUNTIME));
}

fn install(plan: &Plan) -> Result<()> {
    if !plan.apt.is_empty() {
        if output(Command::new("apt-get").arg("--version")).is_none() {
            bail!(
                "apt-get not found: this host is not Debian-like; install by hand: {} \
                 (or a nightly toolchain with rust-src and bpf-linker)",
                plan.apt.join(" ")
            );
        }
        let apt = |args: &[&str]| {
            let mut cmd = Command::new("apt-get");
            cmd.env("DEBIAN_FRONTEND", "noninteractive")
                // Wait for a boot-time unattended-upgrades instead of failing.
                .args(["-o", "DPkg::Lock::Timeout=600"])
                .args(args)
                .stdin(Stdio::null());
            cmd
        };
        let mut stage = Stage::start(
            format!("installing Debian packages ({})", plan.apt.join(" ")),
            progress::log_path("setup-apt"),
        )?;
        let result = stage
            .command(&mut apt(&["update"]))
            .and_then(|()| stage.command(apt(&["install", "-y"]).args(&plan.apt)));
        stage.finish(result)?;
    }
    if plan.link_toolchain {
        Stage::run(
            &format!("linking Debian's rustc as the rustup toolchain `{LINKED_TOOLCHAIN}`"),
            &progress::log_path("setup-rustup-link"),
            Command::new("rustup").args(["toolchain", "link", LINKED_TOOLCHAIN, "/usr"]),
        )?;
    }
    if plan.install_linker {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let path = std::env::join_paths(
            std::iter::once(PathBuf::from(LLVM_PREFIX).join("bin"))
                .chain(std::env::split_paths(&path)),
        )?;
        let mut cmd = run::cargo();
        cmd.env("PATH", path)
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", BPF_LINKER_FEATURE])
            .stdin(Stdio::null());
        Stage::run(
            &format!("installing bpf-linker {BPF_LINKER_VERSION} (about 2 min)"),
            &progress::log_path("setup-bpf-linker"),
            &mut cmd,
        )?;
    }
    Ok(())
}

/// Checks, after installing, that the eBPF build will find what it needs;
/// returns `bpf-linker --version`.
fn verify(toolchain: &str, plan: &Plan) -> Result<String> {
    if plan.toolchain_pending && !has_rust_src(toolchain) {
        bail!(
            "toolchain `{toolchain}` still has no library source under \
             <sysroot>/lib/rustlib/src/rust/library; it should point at /usr: \
             `rustup toolchain uninstall {toolchain}` and run setup again"
        );
    }
    match linker_version(None) {
        Some(v) => Ok(v),
        None => bail!(
            "bpf-linker does not run after setup; is cargo's bin directory ({}) on PATH?",
            plan.path_dir
                .as_deref()
                .map_or_else(|| "~/.cargo/bin".into(), |d| d.display().to_string())
        ),
    }
}

/// Mounts bpffs if it is not; says how it is for the summary line.
fn mount_bpffs() -> Result<&'static str> {
    if bpffs_mounted() {
        return Ok(", bpffs mounted");
    }
    if !is_root() {
        println!("! bpffs not mounted at {BPFFS} (mounting needs root; the agent needs it)");
        return Ok("");
    }
    std::fs::create_dir_all(BPFFS).ok();
    Stage::run(
        &format!("mounting bpffs at {BPFFS}"),
        &progress::log_path("setup-bpffs"),
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
    )?;
    Ok(", bpffs mounted")
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|l| {
            let mut f = l.split_whitespace().skip(1);
            f.next() == Some(BPFFS) && f.next() == Some("bpf")
        })
    })
}

fn rustup(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    // Never let a probe download a toolchain.
    cmd.env("RUSTUP_AUTO_INSTALL", "0").args(args);
    cmd
}

fn has_rust_src(toolchain: &str) -> bool {
    output(&mut rustup(&[
        "run", toolchain, "rustc", "--print", "sysroot",
    ]))
    .is_some_and(|sysroot| {
        Path::new(&sysroot)
            .join("lib/rustlib/src/rust/library/core")
            .exists()
    })
}

/// `rustc 1.96.0`: the version without commit and build notes.
fn rustc_version(toolchain: &str) -> String {
    output(&mut rustup(&["run", toolchain, "rustc", "--version"]))
        .map(|v| v.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "rustc version unknown".into())
}

fn toolchain_linked(name: &str) -> bool {
    output(&mut rustup(&["toolchain", "list"])).is_some_and(|list| {
        list.lines()
            .any(|l| l.split_whitespace().next() == Some(name))
    })
}

/// `bpf-linker --version`, from PATH or from `dir`.
fn linker_version(dir: Option<&Path>) -> Option<String> {
    let exe = dir.map_or_else(|| PathBuf::from("bpf-linker"), |d| d.join("bpf-linker"));
    output(Command::new(exe).arg("--version")).filter(|v| !v.is_empty())
}

/// Where `cargo install` puts binaries.
fn install_bin_dir() -> Option<PathBuf> {
    if let Some(root) = std::env::var_os("CARGO_INSTALL_ROOT") {
        return Some(PathBuf::from(root).join("bin"));
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// Puts `dir` first on PATH for this process and every command it starts.
fn prepend_path(dir: &Path) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if dirs.iter().any(|d| d == dir) {
        return;
    }
    dirs.insert(0, dir.to_path_buf());
    if let Ok(joined) = std::env::join_paths(dirs) {
        // Edition 2021: set_var is safe; xtask is single-threaded here.
        std::env::set_var("PATH", joined);
    }
}

/// Those of `pkgs` that dpkg does not report as installed.
fn missing_packages(pkgs: &[&'static str]) -> Vec<&'static str> {
    // Unknown packages make dpkg-query exit 1 but it still lists the rest.
    let listed = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Status}\n"])
        .args(pkgs)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let installed: Vec<&str> = listed
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.trim() == "installed")
        .map(|(name, _)| name)
        .collect();
    pkgs.iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect()
}
