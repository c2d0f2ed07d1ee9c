//! What counting and flow events cost: the connection rate of an allowed
//! client while another pod floods denied connections, with the kernel's
//! counters and events on (as deployed) and off (the `quiet` switch).
//! Every decision of the flood is counted and offered to the event ring,
//! so this is their worst case.

use std::{fmt::Write as _, time::Duration};

use anyhow::ensure;

use super::BenchArgs;
use crate::{
    bpf::counters::set_quiet,
    lab::{topology::Topology, Lab, LabOptions},
};

const PORT: u16 = 80;
const CLIENT: &str = "obs/client";
const SERVER: &str = "obs/server";
const FLOODER: &str = "obs/flooder";
const SETTLE: Duration = Duration::from_millis(300);

/// The server takes the client only; the flooder may not connect anywhere
/// (every attempt fails with EPERM at once, so it floods).
const POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: obs}
spec:
  podSelector: {matchLabels: {pod: server}}
  ingress:
    - from: [{podSelector: {matchLabels: {pod: client}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: flooder, namespace: obs}
spec:
  podSelector: {matchLabels: {pod: flooder}}
  policyTypes: [Egress]
"#;

fn topology() -> Topology {
    super::pods_serving("obs", &["client", "server", "flooder"], PORT)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<String> {
    let lab = Lab::start(LabOptions::new("obs", topology())).await?;
    let result = measure(&lab, args).await;
    // Never leave the switch off, even on error.
    let _ = set_quiet(lab.pin_dir(), false);
    lab.shutdown().await?;
    result
}

/// One on/off pair, measured back to back so slow drift cancels out.
struct Pair {
    /// Denied connects per second of the flood alone: every one is a
    /// counted decision offered to the event ring, so this is where their
    /// cost shows first.
    flood: [f64; 2],
    /// Allowed connections per second of the client during the flood.
    client: [f64; 2],
}

async fn one_run(lab: &Lab, args: &BenchArgs, observed: bool) -> anyhow::Result<(f64, f64)> {
    let duration = Duration::from_secs_f64(args.seconds);
    set_quiet(lab.pin_dir(), !observed)?;
    tokio::time::sleep(SETTLE).await;
    let alone = lab.load(FLOODER, SERVER, PORT, duration, 1).await?;
    ensure!(
        alone.connections == 0 && alone.failures > 0,
        "the flood must be denied"
    );
    let (client, flood) = tokio::join!(
        lab.load(CLIENT, SERVER, PORT, duration, args.concurrency),
        lab.load(FLOODER, SERVER, PORT, duration, 1),
    );
    let (client, flood) = (client?, flood?);
    ensure!(
        client.failures == 0 && client.connections > 0,
        "the allowed client failed {} times",
        client.failures
    );
    ensure!(flood.connections == 0, "the flood must be denied");
    let per_s = |n: u64, ms: u64| n as f64 / (ms as f64 / 1000.0);
    Ok((
        per_s(alone.failures, alone.elapsed_ms),
        per_s(client.connections, client.elapsed_ms),
    ))
}

async fn measure(lab: &Lab, args: &BenchArgs) -> anyhow::Result<String> {
    lab.write_policy("obs.yaml", POLICY)?;
    let status = lab.wait_applied().await?;
    ensure!(status.problems.is_empty(), "{:?}", status.problems);
    let mut pairs = Vec::new();
    for round in 1..=args.rounds {
        // Alternate which goes first so order effects cancel too.
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        let mut pair = Pair {
            flood: [0.0; 2],
            client: [0.0; 2],
        };
        for observed in order {
            let (flood, client) = one_run(lab, args, observed).await?;
            let i = usize::from(!observed);
            pair.flood[i] = flood;
            pair.client[i] = client;
        }
        eprintln!(
            "round {round}/{}: flood {:.0} vs {:.0} denied/s, client {:.0} vs {:.0} conn/s (on vs off)",
            args.rounds, pair.flood[0], pair.flood[1], pair.client[0], pair.client[1]
        );
        pairs.push(pair);
    }
    let ratios = |f: fn(&Pair) -> [f64; 2]| -> Vec<f64> {
        pairs
            .iter()
            .map(f)
            .filter(|v| v[1] > 0.0)
            .map(|v| v[0] / v[1])
            .collect()
    };
    let mut flood_ratios = ratios(|p| p.flood);
    let mut client_ratios = ratios(|p| p.client);
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.3}–{hi:.3}")
    };
    let (flood_spread, client_spread) = (spread(&flood_ratios), spread(&client_ratios));
    let flood_m = median(&mut flood_ratios);
    let client_m = median(&mut client_ratios);
    let mut flood_on: Vec<f64> = pairs.iter().map(|p| p.flood[0]).collect();
    let mut flood_off: Vec<f64> = pairs.iter().map(|p| p.flood[1]).collect();
    let mut client_on: Vec<f64> = pairs.iter().map(|p| p.client[0]).collect();
    let mut client_off: Vec<f64> = pairs.iter().map(|p| p.client[1]).collect();

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## Cost of counters and flow events under a flood
"
    );
    let _ = writeln!(
        out,
        "A pod floods denied connections (each fails with EPERM; each is a counted decision \
         offered to the rate-limited event ring). Measured with counters and events on (as \
         deployed) and off (the `quiet` switch), on and off back to back in each of {} rounds \
         of {}s, in alternating order; ratios are per round, then the median. (1) the flood's \
         own rate of denied decisions, alone; (2) an allowed client's connection rate while \
         the flood runs ({} loops).\n",
        args.rounds, args.seconds, args.concurrency
    );
    let _ = writeln!(
        out,
        "| measurement | median on | median off | on/off (median of rounds) | spread of rounds |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    let _ = writeln!(
        out,
        "| (1) denied decisions/s, flood alone | {:.0} | {:.0} | {flood_m:.3} | {flood_spread} |",
        median(&mut flood_on),
        median(&mut flood_off)
    );
    let _ = writeln!(
        out,
        "| (2) allowed conn/s during the flood | {:.0} | {:.0} | {client_m:.3} | {client_spread} |",
        median(&mut client_on),
        median(&mut client_off)
    );
    // A ratio whose rounds spread wider than the effect sought says nothing.
    let resolved = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        hi - lo <= 0.1
    };
    let (flood_ok, client_ok) = (resolved(&flood_ratios), resolved(&client_ratios));
    let verdict = |r: f64, ok: bool| match (ok, r >= 0.97) {
        (false, _) => "inconclusive: the rounds spread wider than the effect",
        (true, true) => "met",
        (true, false) => "NOT met",
    };
    let _ = writeln!(
        out,
        "\n- Cost per denied decision: {:.1}% (target < 3%: {})\n- Cost to allowed \
         connections under the flood: {:.1}% (target < 3%: {})\n- On this 2-CPU VM the \
         rounds of (2) vary a lot (see the spread): the flood and the client share both CPUs.\n",
        (1.0 - flood_m) * 100.0,
        verdict(flood_m, flood_ok),
        (1.0 - client_m) * 100.0,
        verdict(client_m, client_ok)
    );
    Ok(out)
}
