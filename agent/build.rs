//! Builds the kernel object (`portcullis-ebpf`) for the BPF target, so a plain
//! `cargo build` yields a working agent. `AYA_BUILD_SKIP=1` skips it (lint-only
//! runs); `cargo xtask setup` installs the toolchain this needs.

use std::{path::Path, process::Command};

use anyhow::{bail, Context as _};
use aya_build::{Package, Toolchain};

/// Toolchain that `cargo xtask setup` links when nightly lacks rust-src.
const LINKED_TOOLCHAIN: &str = "bpf";

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

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PORTCULLIS_EBPF_TOOLCHAIN");
    let toolchain = match std::env::var("PORTCULLIS_EBPF_TOOLCHAIN") {
        Ok(t) => t,
        Err(_) if has_rust_src("nightly") => "nightly".to_string(),
        Err(_) if has_rust_src(LINKED_TOOLCHAIN) => LINKED_TOOLCHAIN.to_string(),
        Err(_) if std::env::var_os("AYA_BUILD_SKIP").is_some() => String::new(),
        Err(_) => bail!(
            "no Rust toolchain can build the eBPF programs: nightly has no rust-src and the \
             '{LINKED_TOOLCHAIN}' toolchain is not linked; run `cargo xtask setup` first"
        ),
    };
    if toolchain != "nightly" {
        // A stable toolchain with library source builds `core` for the BPF
        // target only with unstable flags enabled.
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let ebpf = Package {
        name: "portcullis-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain))
        .context("building the eBPF object (portcullis-ebpf)")?;
    // With AYA_BUILD_SKIP the object is not built; leave an empty one so the
    // agent still compiles (lint-only runs) and fails clearly when loading.
    let object = Path::new(&std::env::var("OUT_DIR")?).join("portcullis");
    if !object.exists() {
        std::fs::write(&object, [])?;
    }
    Ok(())
}
