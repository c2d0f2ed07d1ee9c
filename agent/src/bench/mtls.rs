//! Transparent mTLS against what users would otherwise deploy: the same
//! client and server pods with (1) plaintext, no mesh; (2) Portcullis's
//! mesh, both pods STRICT, the agent a process of its own; (3) a
//! sidecar-style pair of stunnel processes doing mutual TLS 1.3. Each round
//! measures the three in alternating order, so drift on a busy machine hits
//! all alike; Portcullis's numbers are divided by stunnel's of the same
//! round, and the median of those ratios is judged by its sign-test
//! interval, as the other sections do.
//!
//! Every scenario proves its path before its numbers count: Portcullis's
//! /metrics must show the measured connections carried over HBONE and the
//! server pod's kernel the bytes arriving on HBONE's port, plaintext must
//! leave the mesh untouched, and the server-side stunnel must log the
//! connections and the bytes it decrypted.

mod agent;
mod inpod;
mod load;
mod servers;
mod sockets;
mod stunnel;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _};

use self::{
    agent::{AgentProcess, MeshCounters},
    inpod::InPod,
    load::{Requests, Throughput},
    sockets::Received,
    stunnel::{StunnelPair, TlsSeen},
};
use super::{
    cputime,
    verdict::{self, median, Assessment, Verdict},
    BenchArgs,
};
use crate::{
    lab::{pod::Protocol, report::ProbeSpec, Family, Lab, LabOptions},
    mesh::mode::MeshMode,
};

const LAB: &str = "mtls";
const CLIENT: &str = "mtls/client";
const SERVER: &str = "mtls/server";
/// The lab pods' own echo port: how a mesh switch is checked.
const ECHO_PORT: u16 = 80;
/// wrk's connections, on one thread.
const CONNECTIONS: u32 = 16;
/// How long the mesh may take to be on (or off) after the pass.
const SWITCH_WITHIN: Duration = Duration::from_secs(30);
/// How long a path check waits for counters of connections that are
/// still closing (bytes are counted when a relay ends).
const SETTLE_WITHIN: Duration = Duration::from_secs(5);
/// The target for the agent's peak memory.
const MAX_RSS_MIB: f64 = 40.0;
const MIB: f64 = 1024.0 * 1024.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Scenario {
    Plaintext,
    Portcullis,
    Stunnel,
}

const SCENARIOS: [Scenario; 3] = [Scenario::Plaintext, Scenario::Portcullis, Scenario::Stunnel];

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::Plaintext => "(1) plaintext",
            Scenario::Portcullis => "(2) Portcullis mTLS",
            Scenario::Stunnel => "(3) stunnel pair",
        }
    }
}

/// One scenario measured in one round.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Sample {
    single: Throughput,
    multi: Throughput,
    keepalive: Requests,
    close: Requests,
    /// The proxies' CPU time (ns) during the single-stream, keep-alive
    /// and new-connection runs.
    cpu_single: u64,
    cpu_keepalive: u64,
    cpu_close: u64,
}

fn cpu_per(cpu_ns: u64, amount: f64) -> f64 {
    cpu_ns as f64 / 1e9 / amount.max(1e-12)
}

/// What a measure's ratio should be to meet its target.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    AtLeast(f64),
    AtMost(f64),
}

impl Target {
    fn assess(self, ratios: &[f64]) -> Assessment {
        match self {
            Target::AtLeast(line) => verdict::assess_at_least(ratios, line),
            Target::AtMost(line) => verdict::assess_at_most(ratios, line),
        }
    }

    fn describe(self) -> String {
        match self {
            Target::AtLeast(line) => format!("≥ {line}×"),
            Target::AtMost(line) => format!("≤ {line}×"),
        }
    }
}

/// One row of the results.
struct Measure {
    name: &'static str,
    value: fn(&Sample) -> f64,
    /// Only the proxied scenarios have it (CPU of proxies).
    proxied_only: bool,
    target: Option<Target>,
    decimals: usize,
}

fn measures() -> [Measure; 10] {
    let row = |name, value, target, decimals| Measure {
        name,
        value,
        proxied_only: false,
        target,
        decimals,
    };
    let cpu = |name, value: fn(&Sample) -> f64, target| Measure {
        name,
        value,
        proxied_only: true,
        target,
        decimals: 3,
    };
    [
        row(
            "iperf3, 1 stream, Gbit/s",
            |s| s.single.gbit_per_s(),
            Some(Target::AtLeast(1.0)),
            2,
        ),
        row(
            "iperf3, 4 streams, Gbit/s",
            |s| s.multi.gbit_per_s(),
            None,
            2,
        ),
        row(
            "keep-alive, requests/s",
            |s| s.keepalive.per_second,
            Some(Target::AtLeast(1.3)),
            0,
        ),
        row(
            "keep-alive, p50 latency, ms",
            |s| s.keepalive.p50.as_secs_f64() * 1e3,
            None,
            3,
        ),
        row(
            "keep-alive, p99 latency, ms",
            |s| s.keepalive.p99.as_secs_f64() * 1e3,
            None,
            3,
        ),
        row(
            "new connection per request, requests/s",
            |s| s.close.per_second,
            Some(Target::AtLeast(8.0)),
            0,
        ),
        row(
            "new connection per request, p99 latency, ms",
            |s| s.close.p99.as_secs_f64() * 1e3,
            None,
            3,
        ),
        cpu(
            "proxy CPU-s per GB (1 stream)",
            |s| cpu_per(s.cpu_single, s.single.bytes as f64 / 1e9),
            None,
        ),
        cpu(
            "proxy CPU-s per 1k keep-alive requests",
            |s| cpu_per(s.cpu_keepalive, s.keepalive.requests as f64 / 1e3),
            Some(Target::AtMost(0.5)),
        ),
        cpu(
            "proxy CPU-s per 1k new-connection requests",
            |s| cpu_per(s.cpu_close, s.close.requests as f64 / 1e3),
            None,
        ),
    ]
}

fn topology() -> crate::lab::topology::Topology {
    super::pods_serving(LAB, &["client", "server"], ECHO_PORT)
}

/// Measures the three scenarios and returns the report section.
pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    ensure!(args.mtls_rounds >= 1, "--mtls-rounds must be at least 1");
    ensure!(args.mtls_seconds >= 1, "--mtls-seconds must be at least 1");
    let mut lab = Lab::start(LabOptions::new(LAB, topology())).await?;
    // Configurations, certificates and logs live with the lab's state,
    // which its shutdown removes.
    let work = crate::lab::state_dir_for(LAB).join("bench");
    let result = match std::fs::create_dir_all(&work) {
        Ok(()) => measure(&mut lab, args, &work).await,
        Err(e) => Err(anyhow::Error::new(e).context(format!("creating {}", work.display()))),
    };
    lab.shutdown().await?;
    result
}

/// Everything the scenarios run on, started once.
struct Bed {
    client: InPod,
    server: InPod,
    server_ip: Ipv4Addr,
    agent: AgentProcess,
    stunnel: StunnelPair,
    /// Whether the pods are in the mesh now.
    meshed: bool,
}

async fn measure(lab: &mut Lab, args: &BenchArgs, work: &Path) -> anyhow::Result<String> {
    let exe = crate::lab::portcullis_exe().context("locating the portcullis binary")?;
    // The lab's in-process agent makes way for one in a process of its
    // own, on the same pins and files: its CPU and memory are then its own.
    lab.stop_agent();
    let mut agent = AgentProcess::start(lab, &exe, work)?;
    agent.wait_applied(0).await?;
    let client = InPod::new(lab, CLIENT)?;
    let server = InPod::new(lab, SERVER)?;
    let server_ip = lab.pod_ipv4(SERVER)?;
    eprintln!("mtls: starting nginx, iperf3 and the stunnel pair …");
    let _apps = servers::start(&server, work).await?;
    let stunnel = StunnelPair::start(&client, &server, server_ip, work).await?;
    let mut bed = Bed {
        client,
        server,
        server_ip,
        agent,
        stunnel,
        meshed: false,
    };
    let load_before = load_average();
    let mut samples: BTreeMap<Scenario, Vec<Sample>> = BTreeMap::new();
    let mut busy = Neighbours::default();
    for round in 1..=args.mtls_rounds {
        let mut order = SCENARIOS;
        if round % 2 == 0 {
            order.reverse();
        }
        for scenario in order {
            switch(lab, &mut bed, scenario == Scenario::Portcullis).await?;
            busy.look();
            let sample = measure_one(&bed, scenario, args.mtls_seconds).await?;
            busy.look();
            eprintln!(
                "mtls round {round}/{}: {:<20} 1 stream {:.2} Gbit/s, 4 streams {:.2} Gbit/s, \
                 keep-alive {:.0} req/s (p99 {:.2} ms), new connection {:.0} req/s, proxy \
                 CPU {:.4} s per 1k keep-alive requests",
                args.mtls_rounds,
                scenario.label(),
                sample.single.gbit_per_s(),
                sample.multi.gbit_per_s(),
                sample.keepalive.per_second,
                sample.keepalive.p99.as_secs_f64() * 1e3,
                sample.close.per_second,
                cpu_per(sample.cpu_keepalive, sample.keepalive.requests as f64 / 1e3),
            );
            samples.entry(scenario).or_default().push(sample);
        }
    }
    let seen = bed.stunnel.seen();
    ensure!(
        seen.verified_clients > 0,
        "the server-side stunnel never logged a verified client certificate"
    );
    let memory = Memory {
        agent: cputime::peak_rss(bed.agent.pid()).context("the agent's VmHWM")?,
        stunnel: bed
            .stunnel
            .pids()
            .iter()
            .map(|&p| cputime::peak_rss(p).unwrap_or(0))
            .sum(),
    };
    bed.agent.stop().await;
    let context = Context {
        rounds: args.mtls_rounds,
        seconds: args.mtls_seconds,
        load: [load_before, load_average()],
        busy,
        tools: tools(),
    };
    Ok(render(&context, &samples, &memory))
}

/// Puts the pods in the mesh (STRICT) or takes them out, and returns
/// once a probe from the client shows the path is the one wanted.
async fn switch(lab: &mut Lab, bed: &mut Bed, mesh: bool) -> anyhow::Result<()> {
    if bed.meshed == mesh {
        return Ok(());
    }
    let passes = bed.agent.passes();
    lab.set_mesh_mode(if mesh {
        MeshMode::Strict
    } else {
        MeshMode::Disabled
    })?;
    bed.agent.wait_applied(passes).await?;
    let spec = ProbeSpec {
        port: ECHO_PORT,
        protocol: Protocol::Tcp,
    };
    let deadline = Instant::now() + SWITCH_WITHIN;
    loop {
        let before = bed.agent.mesh().await?;
        let outcome = lab.probe(CLIENT, SERVER, spec, Family::Ipv4).await?;
        let tunnelled = bed.agent.mesh().await?.mtls > before.mtls;
        if outcome.reached() && tunnelled == mesh {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the mesh did not turn {} within {SWITCH_WITHIN:?}: the last probe was \
                 {outcome:?}, {}over HBONE",
                if mesh { "on" } else { "off" },
                if tunnelled { "" } else { "not " }
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bed.meshed = mesh;
    Ok(())
}

/// What shows which path a measure's traffic took.
#[derive(Clone, Debug)]
enum Witness {
    /// The agent's counters, and what the server pod received on 15008.
    Mesh(MeshCounters, Received),
    Tls(TlsSeen),
}

async fn witness(bed: &Bed, scenario: Scenario) -> anyhow::Result<Witness> {
    Ok(match scenario {
        Scenario::Stunnel => Witness::Tls(bed.stunnel.seen()),
        _ => Witness::Mesh(
            bed.agent.mesh().await?,
            Received::read(&bed.server, crate::mesh::hbone::HBONE_PORT).await?,
        ),
    })
}

/// Checks that a measure that opened at least `connections` connections
/// and moved `bytes` from client to server took the scenario's path:
/// over HBONE for Portcullis, not through the mesh for plaintext, as TLS
/// into the server-side stunnel for stunnel.
async fn prove(
    bed: &Bed,
    scenario: Scenario,
    before: Witness,
    connections: u64,
    bytes: u64,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETTLE_WITHIN;
    loop {
        let now = witness(bed, scenario).await?;
        let problem = match (scenario, &before, &now) {
            (Scenario::Plaintext, Witness::Mesh(b, _), Witness::Mesh(n, _)) => {
                (n.mtls != b.mtls || n.other != b.other).then(|| {
                    format!(
                        "the agent's proxies handled {} connections",
                        n.mtls + n.other - b.mtls - b.other
                    )
                })
            }
            (Scenario::Portcullis, Witness::Mesh(b, b_wire), Witness::Mesh(n, n_wire)) => {
                let (conns, moved) = (n.mtls - b.mtls, n_wire.since(b_wire));
                (conns < connections || moved < bytes * 9 / 10).then(|| {
                    format!(
                        "HBONE carried {conns} connections and the server pod received {moved} \
                         bytes on port {}, expected at least {connections} and {bytes}",
                        crate::mesh::hbone::HBONE_PORT
                    )
                })
            }
            (Scenario::Stunnel, Witness::Tls(b), Witness::Tls(n)) => {
                let d = n.since(b);
                (d.accepted < connections || d.to_app < bytes * 9 / 10).then(|| {
                    format!(
                        "the server-side stunnel accepted {} TLS connections and decrypted {} \
                         bytes, expected at least {connections} and {bytes}",
                        d.accepted, d.to_app
                    )
                })
            }
            _ => Some("no witness".into()),
        };
        match problem {
            None => return Ok(()),
            Some(p) if Instant::now() > deadline => {
                bail!("{}, {what}: not the scenario's path: {p}", scenario.label())
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn measure_one(bed: &Bed, scenario: Scenario, seconds: u32) -> anyhow::Result<Sample> {
    let (host, iperf_port, url) = match scenario {
        Scenario::Stunnel => (
            "127.0.0.1".to_string(),
            stunnel::IPERF_LOCAL,
            format!("http://127.0.0.1:{}/", stunnel::HTTP_LOCAL),
        ),
        _ => (
            bed.server_ip.to_string(),
            servers::IPERF_PORT,
            format!("http://{}:{}/", bed.server_ip, servers::HTTP_PORT),
        ),
    };
    let proxies: Vec<u32> = match scenario {
        Scenario::Plaintext => Vec::new(),
        Scenario::Portcullis => vec![bed.agent.pid()],
        Scenario::Stunnel => bed.stunnel.pids().to_vec(),
    };
    let cpu = || cputime::total_ns(&proxies);
    let mut s = Sample::default();

    let w = witness(bed, scenario).await?;
    let c = cpu();
    s.single = load::iperf3(&bed.client, &host, iperf_port, 1, seconds).await?;
    s.cpu_single = cpu() - c;
    // iperf3: a control connection and a connection per stream.
    prove(bed, scenario, w, 2, s.single.bytes, "iperf3 1 stream").await?;

    let w = witness(bed, scenario).await?;
    s.multi = load::iperf3(&bed.client, &host, iperf_port, 4, seconds).await?;
    prove(bed, scenario, w, 5, s.multi.bytes, "iperf3 4 streams").await?;

    let w = witness(bed, scenario).await?;
    let c = cpu();
    s.keepalive = load::wrk(&bed.client, &url, CONNECTIONS, seconds, false).await?;
    s.cpu_keepalive = cpu() - c;
    prove(bed, scenario, w, 1, 0, "wrk keep-alive").await?;

    let w = witness(bed, scenario).await?;
    let c = cpu();
    s.close = load::wrk(&bed.client, &url, CONNECTIONS, seconds, true).await?;
    s.cpu_close = cpu() - c;
    // Every answered request had a connection of its own.
    prove(bed, scenario, w, s.close.requests, 0, "wrk new connections").await?;

    ensure!(
        s.single.bytes > 0 && s.multi.bytes > 0,
        "{}: iperf3 moved nothing",
        scenario.label()
    );
    ensure!(
        s.keepalive.requests > 0 && s.close.requests > 0,
        "{}: wrk got no answer",
        scenario.label()
    );
    Ok(s)
}

/// Peak resident memory, bytes.
struct Memory {
    agent: u64,
    /// Both stunnel processes together.
    stunnel: u64,
}

/// Compilers and linkers seen running beside the bench: a shared machine.
#[derive(Clone, Debug, Default)]
struct Neighbours {
    looks: usize,
    busy: usize,
    names: std::collections::BTreeSet<String>,
}

impl Neighbours {
    fn look(&mut self) {
        const BUILDERS: [&str; 5] = ["rustc", "cargo", "cc1", "cc1plus", "ld"];
        let seen: Vec<String> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .filter(|c| BUILDERS.contains(&c.as_str()))
            .collect();
        self.looks += 1;
        if !seen.is_empty() {
            self.busy += 1;
        }
        self.names.extend(seen);
    }
}

/// What the section says about how it was run.
struct Context {
    rounds: usize,
    seconds: u32,
    load: [String; 2],
    busy: Neighbours,
    tools: String,
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// The tools' versions, as they print them (some on stderr).
fn tools() -> String {
    // The first line naming the tool, up to a copyright notice.
    let version = |cmd: &str, args: &[&str], names: &str| -> String {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = [o.stdout, o.stderr].concat();
                String::from_utf8_lossy(&text)
                    .lines()
                    .map(str::trim)
                    .find(|l| l.contains(names))
                    .unwrap_or_default()
                    .split(" Copyright")
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default()
    };
    [
        version("iperf3", &["--version"], "iperf"),
        version("wrk", &["-v"], "wrk"),
        version("nginx", &["-v"], "nginx"),
        version("stunnel", &["-version"], "stunnel"),
        version("openssl", &["version"], "OpenSSL"),
    ]
    .into_iter()
    .filter(|l| !l.is_empty())
    .collect::<Vec<_>>()
    .join("; ")
}

/// Per-round ratios x/y of a measure.
fn ratios(
    samples: &BTreeMap<Scenario, Vec<Sample>>,
    m: &Measure,
    x: Scenario,
    y: Scenario,
) -> Vec<f64> {
    let of = |s| samples.get(&s).map_or(&[][..], Vec::as_slice);
    of(x)
        .iter()
        .zip(of(y))
        .map(|(a, b)| (m.value)(a) / (m.value)(b))
        .filter(|r| r.is_finite())
        .collect()
}

fn fmt(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "—".into()
    }
}

fn render(ctx: &Context, samples: &BTreeMap<Scenario, Vec<Sample>>, memory: &Memory) -> String {
    let mut out = String::from("## Transparent mTLS: Portcullis against a stunnel pair\n\n");
    let _ = writeln!(
        out,
        "- Machine: {} ({} CPUs), kernel {}\n- Date: {}\n- Tools: {}\n- Command: \
         `cargo xtask bench --only mtls` (`--mtls-rounds {}`, `--mtls-seconds {}`)\n",
        super::cpu_model(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        super::command_line("uname", &["-r"]),
        super::command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        ctx.tools,
        ctx.rounds,
        ctx.seconds,
    );
    let _ = writeln!(
        out,
        "A client pod and a server pod of one lab. The server pod runs nginx (one worker, a \
         {}-byte static body, keep-alive on, no access log) and an iperf3 server. Three \
         scenarios: **(1) plaintext**, no mesh; **(2) Portcullis mTLS**, both pods STRICT: \
         the kernel redirects the client's connects to the agent's listener in the client \
         pod, which carries them over HBONE (mutual TLS 1.3, HTTP/2 CONNECT, one pooled \
         connection) to the agent's listener in the server pod, which connects to the \
         application; **(3) stunnel pair**: stunnel in the client pod accepts plaintext on \
         loopback and speaks TLS 1.3 only, with a client certificate, to stunnel in the \
         server pod, which verifies it and forwards to the application (ECDSA P-256 \
         certificates from a CA made at bench start, TCP_NODELAY on every socket, stunnel's \
         own TLS session resumption left on). The Portcullis agent runs as a process of its \
         own throughout (the lab's policy agent too, on the same pins: with the mesh off it \
         only enforces L4, with no policy), and each round switches the mesh on or off by \
         the pods' namespace label.\n",
        servers::BODY.len(),
    );
    let _ = writeln!(
        out,
        "Measures, {}s each: iperf3 with 1 and 4 streams, client to server (Gbit/s as the \
         server counted them); wrk (1 thread, {CONNECTIONS} connections, `--latency`) \
         against nginx, keep-alive and with `Connection: close` (a new TCP connection per \
         request). Proxy CPU is the CPU time of the whole agent process (both pods' \
         proxies and everything else it does) or of both stunnel processes, threads that \
         exited included, during the single-stream, keep-alive and new-connection runs. \
         Before its numbers count, each measure proves its path: for Portcullis the \
         agent's `portcullis_mesh_connections_total{{result=\"mtls\"}}` must have grown by \
         at least the connections the measure opened (every new-connection request \
         included) and the server pod's kernel must have received at least 90% of the \
         bytes iperf3 moved on HBONE connections (port 15008, `ss -ti`); for plaintext those counters must not move; for stunnel the server-side \
         stunnel's log must show the TLS connections accepted (again at least one per \
         request) and at least 90% of the bytes decrypted, and it must have logged a \
         verified client certificate. Peak memory is VmHWM at the end of the run.\n",
        ctx.seconds
    );
    let _ = writeln!(
        out,
        "{} round(s) measure every scenario once, in alternating order ((1), (2), (3) then \
         (3), (2), (1)), so drift on a busy machine hits all three alike. Ratios are taken \
         per round; a target is met when the whole interval for the median ratio (sign test \
         over the rounds, no assumption about the noise) lies on the target's side, NOT met \
         when it lies wholly on the other, inconclusive when it straddles the target.\n",
        ctx.rounds
    );
    let _ = writeln!(
        out,
        "| measure | (1) plaintext | (2) Portcullis | (3) stunnel | (2)/(3) | interval for \
         (2)/(3) | target | verdict | (2)/(1) | (3)/(1) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|---|---|---:|---:|");
    let all = |s: Scenario, m: &Measure| -> Vec<f64> {
        samples
            .get(&s)
            .map(|v| v.iter().map(m.value).collect())
            .unwrap_or_default()
    };
    let mut verdicts: Vec<(String, Verdict)> = Vec::new();
    let mut per_round = String::new();
    for m in &measures() {
        let med = |s| median(&all(s, m));
        let plaintext = if m.proxied_only {
            "—".into()
        } else {
            fmt(med(Scenario::Plaintext), m.decimals)
        };
        let p_s = ratios(samples, m, Scenario::Portcullis, Scenario::Stunnel);
        let (interval, target, judged) = match m.target {
            Some(t) => {
                let a = t.assess(&p_s);
                verdicts.push((m.name.to_string(), a.verdict));
                let each: Vec<String> = p_s.iter().map(|r| format!("{r:.3}")).collect();
                let _ = writeln!(per_round, "- {}: {}", m.name, each.join(", "));
                let interval = match a.interval {
                    Some((lo, hi, c)) => format!("{lo:.3}–{hi:.3} ({:.0}%)", c * 100.0),
                    None => "— (too few rounds)".into(),
                };
                (
                    interval,
                    t.describe(),
                    format!("**{}**", a.verdict.as_str()),
                )
            }
            None => ("".into(), "".into(), "".into()),
        };
        let vs_plain = |x| {
            if m.proxied_only {
                "—".into()
            } else {
                fmt(median(&ratios(samples, m, x, Scenario::Plaintext)), 3)
            }
        };
        let _ = writeln!(
            out,
            "| {} | {plaintext} | {} | {} | {} | {interval} | {target} | {judged} | {} | {} |",
            m.name,
            fmt(med(Scenario::Portcullis), m.decimals),
            fmt(med(Scenario::Stunnel), m.decimals),
            fmt(median(&p_s), 3),
            vs_plain(Scenario::Portcullis),
            vs_plain(Scenario::Stunnel),
        );
    }
    let agent_mib = memory.agent as f64 / MIB;
    let rss_verdict = if agent_mib <= MAX_RSS_MIB {
        Verdict::Met
    } else {
        Verdict::NotMet
    };
    verdicts.push(("agent peak RSS".into(), rss_verdict));
    let _ = writeln!(
        out,
        "| peak RSS (VmHWM), MiB | — | {agent_mib:.1} (agent) | {:.1} (both) | {:.3} | one \
         number per run | ≤ {MAX_RSS_MIB} MiB | **{}** | — | — |",
        memory.stunnel as f64 / MIB,
        memory.agent as f64 / memory.stunnel.max(1) as f64,
        rss_verdict.as_str()
    );
    let _ = writeln!(
        out,
        "\nEach cell is the median over the rounds; the ratio columns are medians of the \
         per-round ratios (lower is better for latency and CPU). (2)/(3) per round, for \
         the targets:\n\n{per_round}"
    );
    let errors: Vec<String> = SCENARIOS
        .iter()
        .filter_map(|&s| {
            let e: u64 = samples
                .get(&s)?
                .iter()
                .map(|x| x.keepalive.errors + x.close.errors)
                .sum();
            (e > 0).then(|| format!("{} {e}", s.label()))
        })
        .collect();
    let _ = writeln!(
        out,
        "wrk errors (socket errors and non-2xx answers, all rounds): {}.\n",
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join(", ")
        }
    );
    let _ = writeln!(
        out,
        "Anchors for context, measured elsewhere on this kind of machine (not in this run):\n\n\
         | anchor | plaintext | stunnel pair | Istio ztunnel |\n|---|---:|---:|---:|\n\
         | 1 stream, Gbit/s | 11.2 | 4.8 | 3.8 |\n\
         | keep-alive, requests/s | 68k | 17.5k | 18.6k |\n\
         | new connection per request, requests/s | 27k | 0.7k | 4.3k |\n\
         | proxy CPU-s per 1k keep-alive requests | — | 0.076 | 0.050 |\n\
         | peak RSS, MiB | — | 52 | 51 |\n"
    );
    let summary: Vec<String> = verdicts
        .iter()
        .map(|(name, v)| format!("{name}: {}", v.as_str()))
        .collect();
    let _ = writeln!(
        out,
        "Issue #12 (mTLS benchmark targets against the stunnel pair): {}.\n",
        summary.join("; ")
    );
    let shared = if ctx.busy.busy == 0 {
        "no compiler or linker was seen running beside it".to_string()
    } else {
        format!(
            "the machine was shared: compilers or linkers ({}) were running beside the \
             bench at {} of {} looks (before and after each scenario's measures), so \
             absolute numbers are lower and noisier than on an idle machine; the per-round \
             ratios cancel much of that",
            ctx.busy
                .names
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            ctx.busy.busy,
            ctx.busy.looks
        )
    };
    let _ = writeln!(
        out,
        "Load average (1 min) {} before the rounds, {} after; {shared}.\n",
        ctx.load[0], ctx.load[1]
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(gbit: f64, ka: f64, close: f64, cpu_ka_s: f64) -> Sample {
        let secs = 2.0;
        let requests = |rate: f64| Requests {
            requests: (rate * secs) as u64,
            per_second: rate,
            p50: Duration::from_micros(200),
            p99: Duration::from_micros(900),
            errors: 0,
        };
        Sample {
            single: Throughput {
                bytes: (gbit * 1e9 / 8.0 * secs) as u64,
                seconds: secs,
            },
            multi: Throughput {
                bytes: (gbit * 1e9 / 8.0 * secs) as u64,
                seconds: secs,
            },
            keepalive: requests(ka),
            close: requests(close),
            cpu_single: 1_000_000_000,
            cpu_keepalive: (cpu_ka_s * 1e9) as u64,
            cpu_close: 1_000_000_000,
        }
    }

    #[test]
    fn the_section_judges_each_target_against_stunnel() {
        let rounds = 7;
        let samples = BTreeMap::from([
            (
                Scenario::Plaintext,
                vec![sample(11.0, 60_000.0, 25_000.0, 0.0); rounds],
            ),
            (
                Scenario::Portcullis,
                vec![sample(6.0, 30_000.0, 9_000.0, 1.0); rounds],
            ),
            (
                Scenario::Stunnel,
                vec![sample(5.0, 15_000.0, 800.0, 2.0); rounds],
            ),
        ]);
        let ctx = Context {
            rounds,
            seconds: 2,
            load: ["1.0".into(), "1.5".into()],
            busy: Neighbours::default(),
            tools: "iperf 3.12".into(),
        };
        let memory = Memory {
            agent: 30 << 20,
            stunnel: 50 << 20,
        };
        let text = render(&ctx, &samples, &memory);
        // 1 stream: 6/5 = 1.2 ≥ 1.0.
        assert!(
            text.contains("| iperf3, 1 stream, Gbit/s | 11.00 | 6.00 | 5.00 | 1.200 |"),
            "{text}"
        );
        // keep-alive 2× ≥ 1.3×; new connection 11.25× ≥ 8×; CPU per 1k
        // keep-alive requests (1 s / 60k) / (2 s / 30k) = 0.25 ≤ 0.5.
        assert_eq!(text.matches("**met**").count(), 5, "{text}");
        assert!(text.contains("| 0.250 |"), "{text}");
        assert!(text.contains("| peak RSS (VmHWM), MiB | — | 30.0 (agent) | 50.0 (both) |"));
        assert!(text.contains("no compiler or linker was seen"), "{text}");
        for s in SCENARIOS {
            assert!(text.contains(s.label()), "{text}");
        }
    }

    #[test]
    fn a_slower_portcullis_is_not_met() {
        let rounds = 7;
        let samples = BTreeMap::from([
            (
                Scenario::Plaintext,
                vec![sample(11.0, 60_000.0, 25_000.0, 0.0); rounds],
            ),
            (
                Scenario::Portcullis,
                vec![sample(4.0, 15_000.0, 4_000.0, 2.0); rounds],
            ),
            (
                Scenario::Stunnel,
                vec![sample(5.0, 15_000.0, 800.0, 2.0); rounds],
            ),
        ]);
        let ctx = Context {
            rounds,
            seconds: 2,
            load: ["1.0".into(), "1.5".into()],
            busy: Neighbours {
                looks: 4,
                busy: 2,
                names: ["rustc".to_string()].into(),
            },
            tools: String::new(),
        };
        let memory = Memory {
            agent: 45 << 20,
            stunnel: 50 << 20,
        };
        let text = render(&ctx, &samples, &memory);
        assert_eq!(text.matches("**NOT met**").count(), 5, "{text}");
        assert!(text.contains("the machine was shared: compilers or linkers (rustc)"));
    }
}
