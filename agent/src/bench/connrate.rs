//! TCP connection rate between two lab pods with
//! (a) no enforcement, (b) Portcullis holding N rules, (c) an iptables chain
//! of N rules — the measured flow allowed by the last rule in (b) and (c),
//! the worst case for a linear scan. Rounds interleave the scenarios, in
//! alternating order, so drift on a busy machine hits all three alike; the
//! ratio b/a is taken per round and judged by its median's confidence
//! interval, as the overhead bench does.
//!
//! A SYN lost to a full accept queue stalls one connect loop for a whole
//! 1 s retransmission timeout, which swings a round's rate by more than any
//! policy cost. The pods' listen queues are sized for the rate
//! ([`crate::lab::pod::LISTEN_BACKLOG`]), and a round in which either pod's
//! kernel counted a SYN retransmission or a listen drop is invalid: shown,
//! counted, and left out of every ratio and median.

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
    tcpstat::{self, TcpCounters},
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

    let mut rates: BTreeMap<Scenario, Vec<Sample>> = BTreeMap::new();
    let (client_pid, server_pid) = (lab.pod_pid(CLIENT)?, lab.pod_pid(SERVER)?);
    let counters = || -> anyhow::Result<(TcpCounters, TcpCounters)> {
        Ok((tcpstat::read(client_pid)?, tcpstat::read(server_pid)?))
    };
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
            let before = counters()?;
            let r = lab
                .load(CLIENT, SERVER, PORT, duration, args.concurrency)
                .await?;
            let after = counters()?;
            ensure!(
                r.failures == 0 && r.connections > 0,
                "{}: {} of {} connections failed",
                scenario.label(),
                r.failures,
                r.connections + r.failures
            );
            let sample = Sample {
                rate: r.connections as f64 / (r.elapsed_ms as f64 / 1000.0),
                p50_us: r.connect_p50_us,
                p99_us: r.connect_p99_us,
                client: before.0.until(&after.0),
                server: before.1.until(&after.1),
            };
            eprintln!(
                "round {round}/{}: {:<16} {:>10.0} conn/s, connect p50 {} µs p99 {} µs{}",
                args.rounds,
                scenario.label(),
                sample.rate,
                sample.p50_us,
                sample.p99_us,
                sample
                    .stall_note()
                    .map(|n| format!(" — INVALID: {n}"))
                    .unwrap_or_default()
            );
            rates.entry(scenario).or_default().push(sample);
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

/// One scenario measured in one round.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Sample {
    rate: f64,
    /// Connect latency percentiles, µs.
    p50_us: u64,
    p99_us: u64,
    /// What each pod's kernel counted during the load.
    client: TcpCounters,
    server: TcpCounters,
}

impl Sample {
    /// Why this measurement says nothing about policy, if it does not.
    fn stall_note(&self) -> Option<String> {
        if !self.client.stalled() && !self.server.stalled() {
            return None;
        }
        let (c, s) = (&self.client, &self.server);
        Some(format!(
            "SYN retransmissions {} (client) {} (server), listen overflows {}, listen drops {}",
            c.syn_retrans,
            s.syn_retrans,
            c.listen_overflows + s.listen_overflows,
            c.listen_drops + s.listen_drops
        ))
    }

    fn valid(&self) -> bool {
        self.stall_note().is_none()
    }
}

/// Pairs each round's rates: drift between rounds cancels out of the ratios.
/// Only valid rounds (no scenario stalled on a lost SYN) count.
fn judge(rates: &BTreeMap<Scenario, Vec<Sample>>) -> Judged {
    let of = |s: Scenario| rates.get(&s).map_or(&[][..], Vec::as_slice);
    let rounds = SCENARIOS.iter().map(|s| of(*s).len()).max().unwrap_or(0);
    let valid: Vec<usize> = (0..rounds)
        .filter(|&i| {
            SCENARIOS
                .iter()
                .all(|s| of(*s).get(i).is_some_and(Sample::valid))
        })
        .collect();
    let invalid_rounds = (0..rounds).filter(|i| !valid.contains(i)).collect();
    let valid_rates = |s: Scenario| -> Vec<f64> { valid.iter().map(|&i| of(s)[i].rate).collect() };
    let per_round = |x: Scenario, y: Scenario| -> Vec<f64> {
        valid
            .iter()
            .map(|&i| of(x)[i].rate / of(y)[i].rate)
            .collect()
    };
    let b_over_a = per_round(Scenario::Portcullis, Scenario::NoAgent);
    let latency = |s: Scenario| -> (f64, f64) {
        let pick = |f: fn(&Sample) -> u64| {
            median(
                &valid
                    .iter()
                    .map(|&i| f(&of(s)[i]) as f64)
                    .collect::<Vec<_>>(),
            )
        };
        (pick(|x| x.p50_us), pick(|x| x.p99_us))
    };
    Judged {
        medians: (
            median(&valid_rates(Scenario::NoAgent)),
            median(&valid_rates(Scenario::Portcullis)),
            median(&valid_rates(Scenario::Iptables)),
        ),
        latency: SCENARIOS.map(latency),
        b_over_a: verdict::assess(&b_over_a, MAX_COST),
        b_over_c: median(&per_round(Scenario::Portcullis, Scenario::Iptables)),
        b_over_a_rounds: (0..rounds)
            .map(|i| {
                valid
                    .contains(&i)
                    .then(|| of(Scenario::Portcullis)[i].rate / of(Scenario::NoAgent)[i].rate)
            })
            .collect(),
        invalid_rounds,
    }
}

const SCENARIOS: [Scenario; 3] = [Scenario::NoAgent, Scenario::Portcullis, Scenario::Iptables];

/// The medians of the three scenarios and what the paired rounds say.
struct Judged {
    /// Median rates over the valid rounds.
    medians: (f64, f64, f64),
    /// Median connect p50 and p99 (µs) over the valid rounds, per scenario
    /// in [`SCENARIOS`] order.
    latency: [(f64, f64); 3],
    b_over_a: Assessment,
    b_over_c: f64,
    /// b/a of each round, in round order; `None` for an invalid round.
    b_over_a_rounds: Vec<Option<f64>>,
    /// Rounds (0-based) left out because a SYN was lost in them.
    invalid_rounds: Vec<usize>,
}

fn render(
    args: &BenchArgs,
    judged: &Judged,
    rates: &BTreeMap<Scenario, Vec<Sample>>,
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
         order (a, b, c then c, b, a), so drift on a busy machine hits all three alike. \
         The pods' accept queues and `net.core.somaxconn` are {}. A round in which either \
         pod's kernel counted a SYN retransmission (TcpExt TCPSynRetrans) or a listen \
         overflow or drop (TcpExt ListenOverflows, ListenDrops) is invalid — a lost SYN \
         stalls a connect loop for a 1 s timeout, which says nothing about policy — and is \
         left out of the medians and ratios below (marked `*`).\n",
        args.seconds,
        args.concurrency,
        args.rules,
        args.rounds,
        crate::lab::pod::LISTEN_BACKLOG
    );
    let _ = writeln!(
        out,
        "| scenario | median conn/s | connect p50 | connect p99 | rounds (conn/s) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    for (i, (s, med)) in [
        (Scenario::NoAgent, a),
        (Scenario::Portcullis, b),
        (Scenario::Iptables, c),
    ]
    .into_iter()
    .enumerate()
    {
        let all: Vec<String> = rates
            .get(&s)
            .map(|v| {
                v.iter()
                    .enumerate()
                    .map(|(round, x)| {
                        let mark = if judged.invalid_rounds.contains(&round) {
                            "*"
                        } else {
                            ""
                        };
                        format!("{:.0}{mark}", x.rate)
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (p50, p99) = judged.latency[i];
        let _ = writeln!(
            out,
            "| {} | {med:.0} | {p50:.0} µs | {p99:.0} µs | {} |",
            s.label(),
            all.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\n{} of {} rounds invalid{}",
        judged.invalid_rounds.len(),
        args.rounds,
        if judged.invalid_rounds.is_empty() {
            "."
        } else {
            ":"
        }
    );
    for &round in &judged.invalid_rounds {
        for s in SCENARIOS {
            if let Some(note) = rates.get(&s).and_then(|v| v.get(round)?.stall_note()) {
                let _ = writeln!(out, "- round {}, {}: {note}", round + 1, s.label());
            }
        }
    }
    let j = &judged.b_over_a;
    let interval = match j.interval {
        Some((lo, hi, conf)) => format!("{lo:.3}–{hi:.3} ({:.0}% confidence)", conf * 100.0),
        None => "none (too few rounds)".into(),
    };
    let each: Vec<String> = judged
        .b_over_a_rounds
        .iter()
        .map(|r| r.map_or("invalid".into(), |r| format!("{r:.3}")))
        .collect();
    let _ = writeln!(
        out,
        "\n- b/a per round: {}\n- b/a = {:.3} (median of the valid rounds; interval for it \
         {interval}); target ≥ 0.95: **{}**\n- b/c = {:.3} (median of the valid rounds)\n",
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

    /// A measurement in which no SYN was lost.
    fn clean(rate: f64) -> Sample {
        Sample {
            rate,
            p50_us: 100,
            p99_us: 400,
            ..Sample::default()
        }
    }

    fn scenarios(
        a: Vec<Sample>,
        b: Vec<Sample>,
        c: Vec<Sample>,
    ) -> BTreeMap<Scenario, Vec<Sample>> {
        BTreeMap::from([
            (Scenario::NoAgent, a),
            (Scenario::Portcullis, b),
            (Scenario::Iptables, c),
        ])
    }

    #[test]
    fn rounds_are_paired_so_drift_between_rounds_cancels() {
        // The machine slows down round by round; each round b costs 3%.
        let a: Vec<f64> = (0..9).map(|i| 10_000.0 - 800.0 * i as f64).collect();
        let b: Vec<Sample> = a.iter().map(|x| clean(x * 0.97)).collect();
        let c: Vec<Sample> = a.iter().map(|x| clean(x * 0.2)).collect();
        let j = judge(&scenarios(a.into_iter().map(clean).collect(), b, c));
        assert_eq!(j.b_over_a.verdict, verdict::Verdict::Met);
        assert!((j.b_over_a.median - 0.97).abs() < 1e-9);
        assert!((j.b_over_c - 4.85).abs() < 1e-9);
        assert_eq!(j.b_over_a_rounds.len(), 9);
        assert!(j.invalid_rounds.is_empty());
        assert_eq!(j.latency[1], (100.0, 400.0));
    }

    #[test]
    fn a_real_cost_is_not_met() {
        let a = vec![clean(10_000.0); 9];
        let b: Vec<Sample> = (0..9).map(|i| clean(9_000.0 + 10.0 * i as f64)).collect();
        let rates = scenarios(a, b, vec![clean(2_000.0); 9]);
        assert_eq!(judge(&rates).b_over_a.verdict, verdict::Verdict::NotMet);
    }

    /// The run: an unenforced round that lost SYNs ran at a fifth of
    /// its rate, and one that happened not to, at five times. Neither may
    /// sway b/a; both are shown as invalid.
    #[test]
    fn rounds_that_lost_a_syn_are_left_out_and_counted() {
        let mut a = vec![clean(5_000.0); 9];
        let b = vec![clean(4_900.0); 9];
        let c = vec![clean(4_800.0); 9];
        // Round 2: the server's accept queue overflowed during (a).
        a[1] = Sample {
            server: TcpCounters {
                listen_overflows: 3,
                listen_drops: 3,
                ..TcpCounters::default()
            },
            ..clean(1_000.0)
        };
        // Round 5: the client retransmitted a SYN during (c).
        let mut c = c;
        c[4] = Sample {
            client: TcpCounters {
                syn_retrans: 1,
                retrans_segs: 1,
                ..TcpCounters::default()
            },
            ..clean(900.0)
        };
        let j = judge(&scenarios(a, b, c));
        assert_eq!(j.invalid_rounds, [1, 4]);
        assert_eq!(j.b_over_a_rounds[1], None);
        assert_eq!(j.b_over_a_rounds[4], None, "a round is invalid as a whole");
        assert!((j.b_over_a.median - 0.98).abs() < 1e-9);
        assert_eq!(
            j.b_over_a.range,
            (0.98, 0.98),
            "no invalid ratio slipped in"
        );
        assert_eq!(j.b_over_a.verdict, verdict::Verdict::Met);
        assert_eq!(j.medians.0, 5_000.0);
        assert_eq!(j.medians.2, 4_800.0);
    }

    #[test]
    fn too_few_valid_rounds_leave_the_verdict_inconclusive() {
        let stalled = Sample {
            client: TcpCounters {
                syn_retrans: 2,
                ..TcpCounters::default()
            },
            ..clean(5_000.0)
        };
        // Seven rounds, three of them stalled: four valid ratios are too
        // few for an interval, however good they look.
        let mut a = vec![clean(5_000.0); 7];
        for i in [0, 3, 6] {
            a[i] = stalled;
        }
        let j = judge(&scenarios(
            a,
            vec![clean(5_000.0); 7],
            vec![clean(4_000.0); 7],
        ));
        assert_eq!(j.invalid_rounds.len(), 3);
        assert_eq!(j.b_over_a.verdict, verdict::Verdict::TooFewRounds);
        // With every round valid, the same numbers are met.
        let j = judge(&scenarios(
            vec![clean(5_000.0); 7],
            vec![clean(5_000.0); 7],
            vec![clean(4_000.0); 7],
        ));
        assert_eq!(j.b_over_a.verdict, verdict::Verdict::Met);
    }

    #[test]
    fn the_report_marks_invalid_rounds_and_says_why() {
        let mut a = vec![clean(5_000.0); 5];
        a[2].server.listen_drops = 4;
        let rates = scenarios(a, vec![clean(4_900.0); 5], vec![clean(4_800.0); 5]);
        let judged = judge(&rates);
        let args = <BenchArgsForTest as clap::Parser>::parse_from(["bench", "--rounds", "5"]).args;
        let text = render(&args, &judged, &rates, 0.1, Default::default());
        assert!(text.contains("1 of 5 rounds invalid:"), "{text}");
        assert!(text.contains("- round 3, (a) no agent: SYN retransmissions 0 (client) 0 (server), listen overflows 0, listen drops 4"), "{text}");
        assert!(text.contains("5000, 5000, 5000*, 5000, 5000"), "{text}");
        assert!(
            text.contains("b/a per round: 0.980, 0.980, invalid, 0.980, 0.980"),
            "{text}"
        );
        assert!(
            text.contains("| (b) Portcullis | 4900 | 100 µs | 400 µs |"),
            "{text}"
        );
    }

    #[derive(clap::Parser)]
    struct BenchArgsForTest {
        #[command(flatten)]
        args: BenchArgs,
    }
}
