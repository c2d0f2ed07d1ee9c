//! What counting and flow events cost: the connection rate of an allowed
//! client while another pod floods denied connections, with the kernel's
//! counters and events on (as deployed) and off (the `quiet` switch).
//! Every decision of the flood is counted and offered to the event ring,
//! so this is their worst case.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::ensure;

use super::BenchArgs;
use crate::{
    bpf::counters::set_quiet,
    lab::{
        topology::{LabNamespace, LabPort, LabWorkload, Topology},
        Lab, LabOptions,
    },
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
    let pod = |name: &str| LabWorkload {
        name: name.into(),
        namespace: "obs".into(),
        labels: BTreeMap::from([("pod".to_string(), name.to_string())]),
        ports: vec![LabPort {
            name: Some("http".into()),
            container_port: PORT,
            protocol: "TCP".into(),
        }],
    };
    Topology {
        namespaces: vec![LabNamespace {
            name: "obs".into(),
            labels: BTreeMap::new(),
        }],
        workloads: vec![pod("client"), pod("server"), pod("flooder")],
    }
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

async fn measure(lab: &Lab, args: &BenchArgs) -> anyhow::Result<String> {
    lab.write_policy("obs.yaml", POLICY)?;
    let status = lab.wait_applied().await?;
    ensure!(status.problems.is_empty(), "{:?}", status.problems);
    let duration = Duration::from_secs_f64(args.seconds);
    let mut rates: BTreeMap<bool, Vec<f64>> = BTreeMap::new();
    let mut flood_rates = Vec::new();
    for round in 1..=args.rounds {
        for observed in [true, false] {
            set_quiet(lab.pin_dir(), !observed)?;
            tokio::time::sleep(SETTLE).await;
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
            ensure!(
                flood.connections == 0 && flood.failures > 0,
                "the flood must be denied ({} connected)",
                flood.connections
            );
            let secs = client.elapsed_ms as f64 / 1000.0;
            let rate = client.connections as f64 / secs;
            flood_rates.push(flood.failures as f64 / (flood.elapsed_ms as f64 / 1000.0));
            eprintln!(
                "round {round}/{}: counters+events {:<3} {rate:>10.0} conn/s under {:.0} denied/s",
                args.rounds,
                if observed { "on" } else { "off" },
                flood_rates.last().copied().unwrap_or(0.0)
            );
            rates.entry(observed).or_default().push(rate);
        }
    }
    let all = |k: bool| rates.get(&k).cloned().unwrap_or_default();
    let (mut on, mut off) = (all(true), all(false));
    let (on_m, off_m) = (median(&mut on), median(&mut off));
    let ratio = if off_m > 0.0 { on_m / off_m } else { 0.0 };
    let mut out = String::new();
    let _ = writeln!(out, "## Cost of counters and flow events under a flood\n");
    let _ = writeln!(
        out,
        "A client opens and closes allowed TCP connections to a server ({} loops) while a \
         third pod floods denied connections (median {:.0} denied connects/s, each counted \
         and offered to the rate-limited event ring). Counters and events on (as deployed) \
         vs off (`quiet` switch); medians of {} interleaved rounds of {}s.\n",
        args.concurrency,
        median(&mut flood_rates),
        args.rounds,
        args.seconds
    );
    let _ = writeln!(
        out,
        "| counters + events | median conn/s | rounds (conn/s) |"
    );
    let _ = writeln!(out, "|---|---:|---|");
    for (label, m, v) in [("on", on_m, &on), ("off", off_m, &off)] {
        let list: Vec<String> = v.iter().map(|r| format!("{r:.0}")).collect();
        let _ = writeln!(out, "| {label} | {m:.0} | {} |", list.join(", "));
    }
    let verdict = if ratio >= 0.97 { "met" } else { "NOT met" };
    let _ = writeln!(
        out,
        "\n- on/off = {ratio:.3}: observability costs {:.1}% (target < 3%: {verdict})\n",
        (1.0 - ratio) * 100.0
    );
    Ok(out)
}
