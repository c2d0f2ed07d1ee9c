//! Reachability matrices: measuring them and showing them to people and
//! programs.

use std::{collections::BTreeMap, fmt::Write as _, str::FromStr};

use serde_json::{json, Value};

use super::{pod::ProbeOutcome, pod::Protocol, topology::PlannedPod};

/// One port/protocol to probe, written `80/tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, thiserror::Error)]
#[error("probe {given:?}: expected PORT/PROTOCOL such as 80/tcp or 81/udp (port 1-65535)")]
pub struct ProbeSpecError {
    given: String,
}

impl FromStr for ProbeSpec {
    type Err = ProbeSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ProbeSpecError { given: s.into() };
        let (port, proto) = s.split_once('/').ok_or_else(err)?;
        let port: u16 = port.parse().map_err(|_| err())?;
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(err()),
        };
        if port == 0 {
            return Err(err());
        }
        Ok(Self { port, protocol })
    }
}

impl ProbeSpec {
    pub fn all_default() -> Vec<ProbeSpec> {
        [
            (80, Protocol::Tcp),
            (81, Protocol::Tcp),
            (80, Protocol::Udp),
            (81, Protocol::Udp),
        ]
        .into_iter()
        .map(|(port, protocol)| ProbeSpec { port, protocol })
        .collect()
    }
}

/// Outcomes of probing every ordered pair of pods on one port/protocol:
/// `cells[from][to]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub spec: ProbeSpec,
    pub cells: BTreeMap<String, BTreeMap<String, ProbeOutcome>>,
}

impl Matrix {
    pub fn reached(&self, from: &str, to: &str) -> bool {
        self.cells
            .get(from)
            .and_then(|row| row.get(to))
            .is_some_and(|o| o.reached())
    }

    /// `from → to → reached`, the shape tests compare against.
    pub fn booleans(&self) -> BTreeMap<String, BTreeMap<String, bool>> {
        self.cells
            .iter()
            .map(|(f, row)| {
                (
                    f.clone(),
                    row.iter().map(|(t, o)| (t.clone(), o.reached())).collect(),
                )
            })
            .collect()
    }
}

/// Pods and their addresses; with more than one node, their nodes too.
pub fn pods_json(pods: &[PlannedPod]) -> Value {
    let nodes = pods.iter().any(|p| p.node > 1);
    let map: serde_json::Map<String, Value> = pods
        .iter()
        .map(|p| {
            let mut pod = json!({"ipv4": p.ipv4.to_string(), "ipv6": p.ipv6.to_string()});
            if nodes {
                pod["node"] = json!(p.node);
            }
            (p.key.clone(), pod)
        })
        .collect();
    Value::Object(map)
}

pub fn matrices_json(pods: &[PlannedPod], matrices: &[Matrix]) -> Value {
    let probes: Vec<Value> = matrices
        .iter()
        .map(|m| {
            json!({
                "port": m.spec.port,
                "protocol": m.spec.protocol.as_str(),
                "matrix": m.booleans(),
            })
        })
        .collect();
    json!({"pods": pods_json(pods), "probes": probes})
}

/// A table per port: rows are sources, columns destinations.
/// `✓` reached, `✗` dropped (timed out), `EPERM` refused at connect/send.
pub fn render(pods: &[PlannedPod], matrices: &[Matrix], family: &str) -> String {
    let keys: Vec<&str> = pods.iter().map(|p| p.key.as_str()).collect();
    let width = keys.iter().map(|k| k.len()).max().unwrap_or(3).max(5) + 1;
    let mut out = String::new();
    for m in matrices {
        let allowed: usize = m
            .cells
            .values()
            .flat_map(|r| r.values())
            .filter(|o| o.reached())
            .count();
        let total: usize = m.cells.values().map(|r| r.len()).sum();
        let _ = writeln!(
            out,
            "{}/{} over {family}: {allowed}/{total} allowed (rows: from, columns: to)",
            m.spec.port,
            m.spec.protocol.as_str()
        );
        let _ = write!(out, "{:width$}", "");
        for k in &keys {
            let _ = write!(out, "{k:>width$}");
        }
        out.push('\n');
        for from in &keys {
            let _ = write!(out, "{from:width$}");
            for to in &keys {
                let cell = match m.cells.get(*from).and_then(|r| r.get(*to)) {
                    Some(ProbeOutcome::Reached) => "✓",
                    Some(ProbeOutcome::Denied) => "EPERM",
                    Some(ProbeOutcome::TimedOut) => "✗",
                    Some(ProbeOutcome::Refused) => "RST",
                    Some(ProbeOutcome::Failed { .. }) => "ERR",
                    Some(ProbeOutcome::Elsewhere { .. }) => "PEER",
                    Some(ProbeOutcome::Reset) => "RESET",
                    None => "?",
                };
                let _ = write!(out, "{cell:>width$}");
            }
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_specs_parse_and_reject_garbage() {
        assert_eq!(
            "81/UDP".parse::<ProbeSpec>().unwrap(),
            ProbeSpec {
                port: 81,
                protocol: Protocol::Udp
            }
        );
        for bad in ["80", "0/tcp", "70000/tcp", "80/sctp", "x/tcp"] {
            assert!(bad.parse::<ProbeSpec>().is_err(), "{bad}");
        }
    }
}
