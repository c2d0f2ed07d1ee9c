//! `cargo xtask kube build`: a real Kubernetes control plane for the tests,
//! built from Go modules (xtask/kube): one binary that is etcd,
//! kube-apiserver or kubectl by the name it runs under.
//!
//! Builds are cached in `~/.cache/portcullis/kube/builds/<key>`, keyed by
//! the Go sources and the Go version, so only the first run pays (about
//! 4 minutes on 2 cores, most of it compiling Kubernetes); `bin` next to
//! `builds` points at the newest, which is where the tests look.

use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    progress::{self, Stage},
    run,
};

/// The names the binary answers to.
const PROGRAMS: [&str; 3] = ["etcd", "kube-apiserver", "kubectl"];
/// The Kubernetes release go.mod pins (kept in step by `version()`).
const GO_MOD: &str = "go.mod";

fn sources() -> PathBuf {
    run::workspace_root().join("xtask").join("kube")
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| "/root/.cache".into())
        .join("portcullis")
        .join("kube")
}

/// The directory with the three programs, for `PORTCULLIS_KUBE_BIN`.
pub fn bin_dir() -> PathBuf {
    cache_root().join("bin")
}

/// The Kubernetes version go.mod requires (`k8s.io/kubernetes vX.Y.Z`).
fn version(go_mod: &str) -> Result<String> {
    go_mod
        .lines()
        .filter_map(|l| l.trim().strip_prefix("k8s.io/kubernetes "))
        .map(|v| v.trim().to_string())
        .next()
        .context("xtask/kube/go.mod requires no k8s.io/kubernetes version")
}

/// FNV-1a: a cache key that is the same in every Rust release.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for byte in part.iter().chain(&[0xff]) {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// `go` from PATH, or where the official archive installs it.
fn go() -> Command {
    let official = Path::new("/usr/local/go/bin/go");
    let on_path = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("go").exists()));
    if !on_path && official.exists() {
        return Command::new(official);
    }
    Command::new("go")
}

fn go_version() -> Result<String> {
    let out = go().arg("version").output().context(
        "Go is needed to build the test control plane (kube-apiserver, etcd, kubectl) \
         and `go` was not found on PATH; install Go 1.25 or newer",
    )?;
    if !out.status.success() {
        bail!(
            "`go version` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds (or finds in the cache) the control plane and returns the
/// directory holding etcd, kube-apiserver and kubectl.
pub fn build() -> Result<PathBuf> {
    let src = sources();
    let read = |name: &str| -> Result<Vec<u8>> {
        fs::read(src.join(name)).with_context(|| format!("reading xtask/kube/{name}"))
    };
    let (go_mod, go_sum, main_go) = (read(GO_MOD)?, read("go.sum")?, read("main.go")?);
    let version = version(&String::from_utf8_lossy(&go_mod))?;
    let go = go_version()?;
    let key = format!(
        "{version}-{:016x}",
        fnv1a(&[&go_mod, &go_sum, &main_go, go.as_bytes()])
    );
    let build_dir = cache_root().join("builds").join(&key);
    let binary = build_dir.join("kube");
    if binary.exists() {
        println!(
            "test control plane {version} … cached in {}",
            run::pretty_path(&build_dir)
        );
    } else {
        compile(&src, &version, &go, &build_dir, &binary)?;
    }
    for name in PROGRAMS {
        let link = build_dir.join(name);
        if fs::symlink_metadata(&link).is_err() {
            symlink("kube", &link).with_context(|| format!("linking {}", link.display()))?;
        }
    }
    // `bin` → the newest build, atomically (a rename over the old link).
    let bin = bin_dir();
    let tmp = cache_root().join("bin.tmp");
    let _ = fs::remove_file(&tmp);
    symlink(&build_dir, &tmp).with_context(|| format!("linking {}", tmp.display()))?;
    fs::rename(&tmp, &bin).with_context(|| format!("replacing {}", bin.display()))?;
    Ok(bin)
}

fn compile(
    src: &Path,
    version: &str,
    go_says: &str,
    build_dir: &Path,
    binary: &Path,
) -> Result<()> {
    fs::create_dir_all(build_dir).with_context(|| format!("creating {}", build_dir.display()))?;
    let (major, minor) = split_version(version);
    // client-go and component-base report their version from these; an
    // unset one reads v0.0.0-master, and kubectl warns about skew.
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion={version} \
         -X k8s.io/component-base/version.gitMajor={major} \
         -X k8s.io/component-base/version.gitMinor={minor} \
         -X k8s.io/client-go/pkg/version.gitVersion={version} \
         -X k8s.io/client-go/pkg/version.gitMajor={major} \
         -X k8s.io/client-go/pkg/version.gitMinor={minor}"
    );
    let partial = build_dir.join("kube.partial");
    let mut stage = Stage::start(
        format!(
            "building the test control plane (etcd, kube-apiserver, kubectl {version}) with \
             {go_says}, first time only, about 5 min"
        ),
        progress::log_path("kube-build"),
    )?;
    let result = stage.command(
        go().current_dir(src)
            // No VCS stamp: git may refuse a checkout owned by another
            // user (CI runs as root), and the cache key covers the sources.
            .args([
                "build",
                "-trimpath",
                "-buildvcs=false",
                "-ldflags",
                &ldflags,
                "-o",
            ])
            .arg(&partial)
            .arg(".")
            .stdin(Stdio::null()),
    );
    stage.finish(result)?;
    // Only a finished binary gets the cached name.
    fs::rename(&partial, binary).with_context(|| format!("renaming {}", partial.display()))
}

/// `cargo xtask kube up`: builds it, then runs tests/src/bin/pcl-kube.rs
/// (the tests' own harness) in the foreground.
pub fn up() -> Result<()> {
    let bin = build()?;
    let status = run::cargo()
        .env("PORTCULLIS_KUBE_BIN", &bin)
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "portcullis-tests",
            "--bin",
            "pcl-kube",
        ])
        .status()
        .context("running pcl-kube")?;
    if !status.success() {
        bail!("pcl-kube ended with {status}");
    }
    Ok(())
}

/// "v1.35.4" → ("1", "35").
fn split_version(version: &str) -> (String, String) {
    let mut parts = version.trim_start_matches('v').split('.');
    let major = parts.next().unwrap_or("1").to_string();
    let minor = parts.next().unwrap_or("0").to_string();
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_version_is_read_from_go_mod() {
        let go_mod = "module x\n\nrequire (\n\tk8s.io/kubernetes v1.35.4\n)\n";
        assert_eq!(version(go_mod).unwrap(), "v1.35.4");
        assert!(version("module x\n").is_err());
        assert_eq!(split_version("v1.35.4"), ("1".into(), "35".into()));
    }

    #[test]
    fn the_cache_key_changes_with_any_input() {
        let a = fnv1a(&[b"go.mod", b"main"]);
        assert_ne!(a, fnv1a(&[b"go.mod", b"main2"]));
        assert_ne!(a, fnv1a(&[b"go.modm", b"ain"]), "parts are delimited");
        assert_eq!(a, fnv1a(&[b"go.mod", b"main"]));
    }
}
