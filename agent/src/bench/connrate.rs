//! TCP connection rate between two lab pods with
//! (a) no enforcement, (b) Portcullis holding N rules, (c) an iptables chain
//! of N rules — the measured flow allowed by the last rule in (b) and (c),
//! the worst case for a linear scan. Rounds interleave the scenarios, in
//! alternating order, so drift on a busy machine hits all three alike; the
//! ratio b/a is taken per round and judged by its median's confidence
//! interval, as the overhead bench does.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};

use super::{
    verdict::{self, median, Assessment},
    BenchArgs,
};
use crate::lab::{
    pod::ProbeOutcome, report::ProbeSpec, topology::Topology, Family, Lab, LabOptions,
};

const PORT: u16 = 80;
const SETTLE: Duration = Duration::from_millis(500);
const CLIENT: &str = "bench/client";
const SERVER: &str = "bench/server";
/// A pod no rule allows: proves each scenario really enforces.
const OUTSIDER: &str = "bench/outsider";
/// Issue #2's target: Portcullis keeps at least 95% of the unenforced rate.
const MAX_COST: f64 = 0.05;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    NoAgent,
    Portcullis,
    Iptables,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::NoAgent => "(a) no agent",
            Scenario::Portcullis => "(b) Portcullis",
            Scenario::Iptables => "(c) iptables",
        }
    }
}

fn topology() -> Topology {
    super::pods_serving("bench", &["client", "server", "outsider"], PORT)
}

/// The i-th decoy peer: addresses in 198.19.0.0/16 that no pod uses.
fn decoy(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be_bytes([198, 19, 0, 0]) + i as u32 + 1)
}

fn decoy_port(i: usize) -> u16 {
    10_000 + (i % 50_000) as u16
}

/// One NetworkPolicy on the server with `rules` ingress rules; only the last
/// one allows the client.
fn policy_yaml(rules: usize) -> String {
    let mut y = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bench, namespace: bench}\n\
         spec:\n  podSelector: {matchLabels: {pod: server}}\n  ingress:\n",
    );
    for i in 0..rules.saturating_sub(1) {
        let _ = writeln!(
            y,
            "    - from: [{{ipBlock: {{cidr: {}/32}}}}]\n      ports: [{{port: {}}}]",
            decoy(i),
            decoy_port(i)
        );
    }
    let _ = writeln!(
        y,
        "    - from: [{{podSelector: {{matchLabels: {{pod: client}}}}}}]\n      ports: [{{port: {PORT}}}]"
    );
    y
}

/// The equivalent iptables chain for the server's network namespace.
fn iptables_rules(rules: usize, client: Ipv4Addr) -> String {
    let mut r = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:PCL-BENCH - [0:0]\n-A INPUT -p tcp --syn -j PCL-BENCH\n",
    );
    for i in 0..rules.saturating_sub(1) {
        let _ = writeln!(
            r,
            "-A PCL-BENCH -s {}/32 -p tcp --dport {} -j ACCEPT",
            decoy(i),
            decoy_port(i)
        );
    }
    let _ = writeln!(
        r,
        "-A PCL-BENCH -s {client}/32 -p tcp --dport {PORT} -j ACCEPT"
    );
    r.push_str("-A PCL-BENCH -j DROP\nCOMMIT\n");
    r
}

fn iptables_restore(netns: &str, rules: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running iptables-restore (is iptables installed?)")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(rules.as_bytes())?;
    ensure!(
        child.wait()?.success(),
        "iptables-restore failed in {netns}"
    );
    Ok(())
}

fn iptables_flush(netns: &str) -> anyhow::Result<()> {
    iptables_restore(netns, "*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n")
}

/// Measures the three scenarios and returns the report section.
pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    ensure!(args.rules >= 1, "--rules must be at least 1");
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    let duration = Duration::from_secs_f64(args.seconds);
    let mut lab = Lab::start(LabOptions::new("bench", topology())).await?;
    let result = measure(&mut lab, args, duration).await;
    lab.shutdown().await?;
    result
}

async fn expect_blocked(lab: &Lab, what: &str) -> anyhow::Result<()> {
    let spec = ProbeSpec {
        port: PORT,
        protocol: crate::lab::pod::Protocol::Tcp,
    };
    let o = lab.probe(OUTSIDER, SERVER, spec, Family::Ipv4).await?;
    ensure!(
        o == ProbeOutcome::TimedOut,
        "{what}: the outsider pod should be dropped but got {o:?}; the scenario does not enforce"
    );
    Ok(())
}

async fn measure(lab: &mut Lab, args: &BenchArgs, duration: Duration) -> anyhow::Result<String> {
    let client_ip = lab
        .pods()
        .iter()
        .find(|p| p.key == CLIENT)
        .map(|p| p.ipv4)
        .expect("client pod");
    let server_netns = lab.pod_netns(SERVER)?;
    let ipt_rules = iptables_rules(args.rules, client_ip);

    eprintln!("compiling and applying {} rules …", args.rules);
    let started = Instant::now();
    lab.write_policy("bench.yaml", &policy_yaml(args.rules))?;
    let status = lab.wait_applied().await?;
    let apply_secs = started.elapsed().as_secs_f64();
    if !status.problems.is_empty() {
        bail!("the benchmark policy did not apply: {:?}", status.problems);
    }
    let entries = status.usage;
    expect_blocked(lab, "Portcullis").await?;
    lab.detach_agent()?;

    let mut rates: BTreeMap<Scenario, Vec<f64>> = BTreeMap::new();
    for round in 1..=args.rounds {
        let mut order = [Scenario::NoAgent, Scenario::Portcullis, Scenario::Iptables];
        if round % 2 == 0 {
            order.reverse();
        }
        for scenario in order {
            match scenario {
                Scenario::NoAgent => {}
                Scenario::Portcullis => {
                    let s = lab.reattach_agent().await?;
                    ensure!(s.problems.is_empty(), "{:?}", s.problems);
                    expect_blocked(lab, scenario.label()).await?;
                }
                Scenario::Iptables => {
                    iptables_restore(&server_netns, &ipt_rules)?;
                    expect_blocked(lab, scenario.label()).await?;
                }
            }
            // Let deferred kernel work of the switch (freeing detached
            // programs and maps) finish before measuring.
            tokio::time::sleep(SETTLE).await;
            let r = lab
                .load(CLIENT, SERVER, PORT, duration, args.concurrency)
                .await?;
            ensure!(
                r.failures == 0 && r.connections > 0,
                "{}: {} of {} connections failed",
                scenario.label(),
                r.failures,
                r.connections + r.failures
            );
            let rate = r.connections as f64 / (r.elapsed_ms as f64 / 1000.0);
            eprintln!(
                "round {round}/{}: {:<16} {rate:>10.0} conn/s",
                args.rounds,
                scenario.label()
            );
            rates.entry(scenario).or_default().push(rate);
            match scenario {
                Scenario::NoAgent => {}
                Scenario::Portcullis => lab.detach_agent()?,
                Scenario::Iptables => iptables_flush(&server_netns)?,
            }
        }
    }
    let judged = judge(&rates);
    Ok(render(args, &judged, &rates, apply_secs, entries))
}

/// Pairs each round's rates: drift between rounds cancels out of the ratios.
fn judge(rates: &BTreeMap<Scenario, Vec<f64>>) -> Judged {
    let of = |s: Scenario| rates.get(&s).map_or(&[][..], Vec::as_slice);
    let per_round = |x: Scenario, y: Scenario| -> Vec<f64> {
        of(x).iter().zip(of(y)).map(|(p, q)| p / q).collect()
    };
    let b_over_a = per_round(Scenario::Portcullis, Scenario::NoAgent);
    Judged {
        medians: (
            median(of(Scenario::NoAgent)),
            median(of(Scenario::Portcullis)),
            median(of(Scenario::Iptables)),
        ),
        b_over_a: verdict::assess(&b_over_a, MAX_COST),
        b_over_c: median(&per_round(Scenario::Portcullis, Scenario::Iptables)),
        b_over_a_rounds: b_over_a,
    }
}

/// The medians of the three scenarios and what the paired rounds say.
struct Judged {
    medians: (f64, f64, f64),
    b_over_a: Assessment,
    b_over_c: f64,
    /// b/a of each round, in round order.
    b_over_a_rounds: Vec<f64>,
}

fn render(
    args: &BenchArgs,
    judged: &Judged,
    rates: &BTreeMap<Scenario, Vec<f64>>,
    apply_secs: f64,
    entries: crate::bpf::writer::MapUsage,
) -> String {
    let (a, b, c) = judged.medians;
    let mut out = String::new();
    let _ = writeln!(out, "## TCP connection rate between two lab pods\n");
    let _ = writeln!(
        out,
        "- iptables: {}\n",
        super::command_line("iptables", &["--version"])
    );
    let _ = writeln!(
        out,
        "A client pod opens and closes TCP connections to a server pod for {}s per round \
         ({} connect loops, connections closed with RST). In (b) and (c) the server is \
         isolated by {} rules for other peers and ports, and the measured flow is allowed by \
         the last one. A third pod, allowed by no rule, is checked to be dropped in (b) and \
         (c) before each measurement. {} rounds measure every scenario once, in alternating \
         order (a, b, c then c, b, a), so drift on a busy machine hits all three alike.\n",
        args.seconds, args.concurrency, args.rules, args.rounds
    );
    let _ = writeln!(out, "| scenario | median conn/s | rounds (conn/s) |");
    let _ = writeln!(out, "|---|---:|---|");
    for (s, med) in [
        (Scenario::NoAgent, a),
        (Scenario::Portcullis, b),
        (Scenario::Iptables, c),
    ] {
        let all: Vec<String> = rates
            .get(&s)
            .map(|v| v.iter().map(|r| format!("{r:.0}")).collect())
            .unwrap_or_default();
        let _ = writeln!(out, "| {} | {med:.0} | {} |", s.label(), all.join(", "));
    }
    let j = &judged.b_over_a;
    let interval = match j.interval {
        Some((lo, hi, conf)) => format!("{lo:.3}–{hi:.3} ({:.0}% confidence)", conf * 100.0),
        None => "none (too few rounds)".into(),
    };
    let each: Vec<String> = judged
        .b_over_a_rounds
        .iter()
        .map(|r| format!("{r:.3}"))
        .collect();
    let _ = writeln!(
        out,
        "\n- b/a per round: {}\n- b/a = {:.3} (median of the rounds; interval for it {interval}); \
         target ≥ 0.95: **{}**\n- b/c = {:.3} (median of the rounds)\n",
        each.join(", "),
        j.median,
        j.verdict.as_str(),
        judged.b_over_c
    );
    let _ = writeln!(
        out,
        "The target is met when the whole interval (sign test over the rounds, no \
         assumption about the noise) lies at or above 0.95, NOT met when it lies wholly below, \
         and inconclusive when it straddles 0.95. Medians of the rates themselves: a {a:.0}, \
         b {b:.0}, c {c:.0} conn/s.\n"
    );
    let _ = writeln!(
        out,
        "Compiling and applying the {} rules took {apply_secs:.2}s and produced {} policy, \
         {} identity and {} endpoint map entries.\n",
        args.rules, entries.policy, entries.identities, entries.endpoints
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowed_flow_is_the_last_rule() {
        let y = policy_yaml(3);
        assert_eq!(y.matches("- from:").count(), 3);
        assert!(y.trim_end().ends_with("ports: [{port: 80}]"));
        let r = iptables_rules(3, Ipv4Addr::new(198, 18, 1, 10));
        let accepts: Vec<&str> = r
            .lines()
            .filter(|l| l.contains("ACCEPT") && l.starts_with("-A PCL"))
            .collect();
        assert_eq!(accepts.len(), 3);
        assert!(accepts[2].contains("198.18.1.10/32"));
        assert!(r.contains("-A PCL-BENCH -j DROP"));
    }

    #[test]
    fn rounds_are_paired_so_drift_between_rounds_cancels() {
        // The machine slows down round by round; each round b costs 3%.
        let a: Vec<f64> = (0..9).map(|i| 10_000.0 - 800.0 * i as f64).collect();
        let b: Vec<f64> = a.iter().map(|x| x * 0.97).collect();
        let c: Vec<f64> = a.iter().map(|x| x * 0.2).collect();
        let rates = BTreeMap::from([
            (Scenario::NoAgent, a),
            (Scenario::Portcullis, b),
            (Scenario::Iptables, c),
        ]);
        let j = judge(&rates);
        assert_eq!(j.b_over_a.verdict, verdict::Verdict::Met);
        assert!((j.b_over_a.median - 0.97).abs() < 1e-9);
        assert!((j.b_over_c - 4.85).abs() < 1e-9);
        assert_eq!(j.b_over_a_rounds.len(), 9);
    }

    #[test]
    fn a_real_cost_is_not_met() {
        let a = vec![10_000.0; 9];
        let b: Vec<f64> = (0..9).map(|i| 9_000.0 + 10.0 * i as f64).collect();
        let rates = BTreeMap::from([
            (Scenario::NoAgent, a),
            (Scenario::Portcullis, b),
            (Scenario::Iptables, vec![2_000.0; 9]),
        ]);
        assert_eq!(judge(&rates).b_over_a.verdict, verdict::Verdict::NotMet);
    }
}
