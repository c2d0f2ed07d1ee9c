//! `portcullis bench`: the numbers behind the performance claims, written to
//! BENCHMARKS.md — connection rate against no agent and iptables, how
//! compile time, map entries and kernel memory grow with the rule count,
//! transparent mTLS against a stunnel pair, and how fast single changes
//! reach the kernel through the Kubernetes source at cluster scale.

pub mod churn;
pub mod connrate;
pub mod cputime;
pub mod layout;
pub mod mtls;
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
    /// Skip the mTLS comparison.
    #[arg(long)]
    pub skip_mtls: bool,
    /// Rounds of the mTLS comparison, each measuring plaintext, Portcullis
    /// and the stunnel pair once. Seven are the fewest whose full range is
    /// an interval for the median at 98%.
    #[arg(long, default_value_t = 7)]
    pub mtls_rounds: usize,
    /// Seconds of each mTLS measure (iperf3 and wrk take whole seconds).
    #[arg(long, default_value_t = 3)]
    pub mtls_seconds: u32,
    /// Skip the churn measurement (a real API server with thousands of pods).
    #[arg(long)]
    pub skip_churn: bool,
    /// Cluster pods in the churn measurement (a fifth on this node).
    #[arg(long, default_value_t = 5_000)]
    pub churn_pods: usize,
    /// Rules in the churn measurement, in NetworkPolicies of ten.
    #[arg(long, default_value_t = 10_000)]
    pub churn_rules: usize,
    /// Changes of each kind in the churn measurement.
    #[arg(long, default_value_t = 20)]
    pub churn_changes: usize,
    /// Pods added, and as many deleted, per second in the sustained churn
    /// measurement.
    #[arg(long, default_value_t = 100)]
    pub churn_rate: usize,
    /// Seconds of sustained churn (0: not measured).
    #[arg(long, default_value_t = 60)]
    pub churn_seconds: usize,
    /// Cluster sizes the churn measurement grows to afterwards, for the
    /// agent's memory (sizes up to --churn-pods add nothing).
    #[arg(long, value_delimiter = ',', default_value = "20000")]
    pub churn_growth: Vec<usize>,
    /// A smaller cluster the churn measurement starts the agent on, measured
    /// before it grows to --churn-pods: where the growth rows begin (0: start
    /// at --churn-pods).
    #[arg(long, default_value_t = 1_000)]
    pub churn_from: usize,
    /// Run only these sections; the output file keeps its other sections
    /// as they are (each run section replaces its own).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Section>,
    /// Where to write the results for people to read.
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub output: PathBuf,
}

/// The sections of BENCHMARKS.md, for `--only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Rate,
    Overhead,
    Scale,
    Mtls,
    Churn,
}

impl BenchArgs {
    fn runs(&self, section: Section) -> bool {
        let skipped = match section {
            Section::Rate => self.skip_rate,
            Section::Overhead => self.skip_overhead,
            Section::Scale => self.skip_scale,
            Section::Mtls => self.skip_mtls,
            Section::Churn => self.skip_churn,
        };
        !skipped && (self.only.is_empty() || self.only.contains(&section))
    }
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
    let mut report = header();
    let mut sections = Vec::new();
    if args.runs(Section::Rate) {
        sections.push(connrate::run(&args).await?);
    }
    if args.runs(Section::Overhead) {
        sections.push(overhead::run(&args).await?);
    }
    if args.runs(Section::Scale) {
        let points = scale::run(&args.scale_rules, args.workloads)?;
        sections.push(scale::render(&points, args.workloads));
    }
    if args.runs(Section::Mtls) {
        sections.push(mtls::run(&args).await?);
    }
    if args.runs(Section::Churn) {
        let options = churn::ChurnOptions {
            pods: args.churn_pods,
            rules: args.churn_rules,
            changes: args.churn_changes,
            growth: args.churn_growth.clone(),
            from: (args.churn_from > 0 && args.churn_from < args.churn_pods)
                .then_some(args.churn_from),
            sustained: (args.churn_seconds > 0 && args.churn_rate > 0).then_some(
                churn::sustained::SustainedOptions {
                    rate: args.churn_rate,
                    seconds: args.churn_seconds,
                },
            ),
        };
        sections.push(churn::render(&churn::run(&options).await?));
    }
    let existing = std::fs::read_to_string(&args.output).ok();
    match existing.filter(|_| !args.only.is_empty()) {
        // Some sections: the others stay as they were.
        Some(text) => report = sections.iter().fold(text, |t, s| splice(&t, s)),
        None => sections.iter().for_each(|s| report.push_str(s)),
    }
    print!("{report}");
    std::fs::write(&args.output, &report)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("results written to {}", args.output.display());
    Ok(())
}

/// `section` (a `## ` heading and its text) in place of the section of the
/// same heading in `text`, or after it when it has none.
fn splice(text: &str, section: &str) -> String {
    let heading = section.lines().next().unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| *l == heading) else {
        let mut out = text.trim_end().to_string();
        out.push_str("\n\n");
        out.push_str(section);
        return out;
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out = lines[..start].join("\n");
    if start > 0 {
        out.push('\n');
    }
    out.push_str(section);
    if end < lines.len() {
        out.push_str(&lines[end..].join("\n"));
        out.push('\n');
    }
    out
}

fn header() -> String {
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
    report
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_replaces_its_own_and_leaves_the_others() {
        let text = "# B\n\n- Date: old\n\n## One\n\nold one\n\n## Two\n\ntwo\n";
        assert_eq!(
            splice(text, "## One\n\nnew one\n\n"),
            "# B\n\n- Date: old\n\n## One\n\nnew one\n\n## Two\n\ntwo\n"
        );
        assert_eq!(
            splice(text, "## Two\n\nnew two\n"),
            "# B\n\n- Date: old\n\n## One\n\nold one\n\n## Two\n\nnew two\n"
        );
        assert_eq!(
            splice(text, "## Three\n\nthree\n"),
            "# B\n\n- Date: old\n\n## One\n\nold one\n\n## Two\n\ntwo\n\n## Three\n\nthree\n"
        );
    }

    #[test]
    fn only_runs_the_named_sections_unless_skipped() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BenchArgs,
        }
        let parse = |a: &[&str]| <Cli as clap::Parser>::parse_from(a).args;
        let all = parse(&["bench"]);
        assert!([
            Section::Rate,
            Section::Overhead,
            Section::Scale,
            Section::Mtls,
            Section::Churn
        ]
        .iter()
        .all(|s| all.runs(*s)));
        let only = parse(&["bench", "--only", "mtls"]);
        assert!(only.runs(Section::Mtls) && !only.runs(Section::Rate));
        let skipped = parse(&["bench", "--only", "mtls,scale", "--skip-mtls"]);
        assert!(!skipped.runs(Section::Mtls) && skipped.runs(Section::Scale));
    }
}
