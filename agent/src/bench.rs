//! `portcullis bench`: the numbers behind the performance claims, written to
//! BENCHMARKS.md — connection rate against no agent and iptables, and how
//! compile time, map entries and kernel memory grow with the rule count.

pub mod connrate;
pub mod cputime;
pub mod layout;
pub mod overhead;
pub mod reader;
pub mod scale;
pub mod tcpstat;
pub mod verdict;

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use anyhow::Context as _;

use crate::lab::topology::{LabNamespace, LabPort, LabWorkload, Topology};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Rules installed for the connection-rate scenarios (b) and (c).
    #[arg(long, default_value_t = 10_000)]
    pub rules: usize,
    /// Seconds of load per scenario and round.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Rounds of the connection-rate measurement; each measures every
    /// scenario once. Fifteen let the verdict's interval for b/a (96%)
    /// leave out the three best and three worst rounds, as the overhead
    /// bench does: this VM's neighbours halve single rounds at times.
    #[arg(long, default_value_t = 15)]
    pub rounds: usize,
    /// Rounds of the overhead measurement, each an on/off pair. Fifteen
    /// let the verdict's confidence interval (96%) leave out the three best
    /// and three worst rounds, which a shared machine needs to be decisive.
    #[arg(long, default_value_t = 15)]
    pub overhead_rounds: usize,
    /// Concurrent connect loops in the client pod.
    #[arg(long, default_value_t = 2)]
    pub concurrency: u32,
    /// Workloads in the scale check.
    #[arg(long, default_value_t = 1_000)]
    pub workloads: usize,
    /// Rule counts in the scale check.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000")]
    pub scale_rules: Vec<usize>,
    /// Skip the connection-rate measurement.
    #[arg(long)]
    pub skip_rate: bool,
    /// Skip the scale check.
    #[arg(long)]
    pub skip_scale: bool,
    /// Skip measuring what counters and flow events cost.
    #[arg(long)]
    pub skip_overhead: bool,
    /// Where to write the results for people to read.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub output: PathBuf,
}

/// A lab of one namespace whose pods (labelled `pod=<name>`) serve TCP on
/// `port`: the scenarios' client, server and bystanders.
fn pods_serving(namespace: &str, pods: &[&str], port: u16) -> Topology {
    let pod = |name: &&str| LabWorkload {
        name: name.to_string(),
        namespace: namespace.into(),
        labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
        ports: vec![LabPort {
            name: Some("http".into()),
            container_port: port,
            protocol: "TCP".into(),
        }],
        service_account: None,
        node: None,
    };
    Topology {
        namespaces: vec![LabNamespace {
            name: namespace.into(),
            labels: BTreeMap::new(),
        }],
        workloads: pods.iter().map(pod).collect(),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut report = String::from("# Portcullis benchmarks\n\n");
    let _ = writeln!(
        report,
        "- Machine: {} ({} CPUs), kernel {}\n- Date: {}\n- Command: `cargo xtask bench` \
         (`portcullis bench --help` lists the knobs)\n",
        cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        command_line("uname", &["-r"]),
        command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
    );
    if !args.skip_rate {
        report.push_str(&connrate::run(&args).await?);
    }
    if !args.skip_overhead {
        report.push_str(&overhead::run(&args).await?);
    }
    if !args.skip_scale {
        let points = scale::run(&args.scale_rules, args.workloads)?;
        report.push_str(&scale::render(&points, args.workloads));
    }
    print!("{report}");
    std::fs::write(&args.output, &report)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("results written to {}", args.output.display());
    Ok(())
}

/// The first line(s) a command prints, trimmed; empty if it cannot run.
fn command_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
