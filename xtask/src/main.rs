//! `cargo xtask`: Portcullis build helpers. Every command that builds runs
//! `setup` first, so a fresh machine needs no manual step.

mod fuzz;
mod kube;
mod progress;
mod run;
mod setup;
mod tasks;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Portcullis build helpers"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the eBPF toolchain, bpf-linker and runtime packages that are
    /// missing, and mount bpffs (idempotent; installing needs root).
    Setup,
    /// Setup, then build the agent (target/release/portcullis).
    Build,
    /// Setup and build, then run every test serialized (needs root).
    Test {
        /// Passed to the test binaries (e.g. a name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Setup and build, then run `portcullis lab` on deploy/examples.
    Demo {
        /// Passed to `portcullis lab`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Setup and build, then run `portcullis bench`.
    Bench {
        /// Passed to `portcullis bench`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// rustfmt check and clippy with warnings denied (no eBPF build).
    Lint,
    /// Regenerate the CRD manifests in deploy/crds from agent/src/crd.rs.
    Crdgen,
    /// The test control plane (etcd, kube-apiserver, kubectl) built from
    /// Go modules; `cargo xtask test` builds it first.
    Kube {
        #[command(subcommand)]
        cmd: KubeCmd,
    },
    /// Run the cargo-fuzz targets in agent/fuzz (installs cargo-fuzz).
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Run each committed corpus once through its target and stop
        /// (for CI); fails on any crash.
        #[arg(long)]
        replay: bool,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KubeCmd {
    /// Build it (or take it from the cache) and print where it is.
    Build,
    /// Build it, then run it on loopback with our CRDs until Ctrl-C
    /// (prints a KUBECONFIG for kubectl and the agent).
    Up,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Build => tasks::build(),
        Cmd::Test { args } => tasks::test(&args),
        Cmd::Demo { args } => tasks::demo(&args),
        Cmd::Bench { args } => tasks::bench(&args),
        Cmd::Lint => tasks::lint(),
        Cmd::Crdgen => tasks::crdgen(),
        Cmd::Kube {
            cmd: KubeCmd::Build,
        } => kube::build().map(|bin| println!("{}", bin.display())),
        Cmd::Kube { cmd: KubeCmd::Up } => kube::up(),
        Cmd::Fuzz {
            seconds,
            replay,
            targets,
        } => fuzz::fuzz(&fuzz::Options {
            seconds,
            replay,
            targets,
        }),
    };
    if let Err(e) = result {
        eprintln!("✗ xtask: {e:#}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passed(argv: &[&str]) -> Vec<OsString> {
        match Cli::try_parse_from(argv).expect("parses").cmd {
            Cmd::Demo { args } | Cmd::Bench { args } | Cmd::Test { args } => args,
            _ => panic!("not a pass-through command"),
        }
    }

    #[test]
    fn passes_arguments_through() {
        let want: Vec<OsString> = ["--duration", "5", "x"].map(OsString::from).to_vec();
        assert_eq!(
            passed(&["xtask", "demo", "--", "--duration", "5", "x"]),
            want
        );
        assert_eq!(passed(&["xtask", "bench", "--duration", "5", "x"]), want);
        assert_eq!(
            passed(&["xtask", "test", "--", "--duration", "5", "x"]),
            want
        );
        assert!(passed(&["xtask", "bench"]).is_empty());
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
