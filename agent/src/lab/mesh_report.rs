//! What the lab shows of the mesh: one live connection between two meshed
//! pods, as `portcullis connections` sees it — encrypted, to whom, with
//! which certificate, until when.

use std::time::{Duration, Instant, SystemTime};

use super::{pod::Protocol, report::Matrix, Family, Lab};
use crate::mesh::{connections, mode};

/// Holds one TCP connection between meshed pods that the matrix says
/// reach each other, and renders its entries in the connections table
/// (both ends). `None` when no such pair was measured.
pub async fn encrypted_connection(
    lab: &Lab,
    name: &str,
    matrices: &[Matrix],
) -> anyhow::Result<Option<String>> {
    let text = std::fs::read_to_string(lab.workloads_file())?;
    let inventory = crate::policy::parse::parse_inventory(lab.workloads_file(), &text)?;
    let meshed = |key: &str| {
        inventory.workloads.iter().any(|w| {
            w.reference().to_string() == key && mode::of_workload(&inventory, w).0.is_meshed()
        })
    };
    let Some((m, from, to)) = matrices
        .iter()
        .filter(|m| m.spec.protocol == Protocol::Tcp)
        .find_map(|m| {
            let keys = lab.pods().iter().map(|p| p.key.as_str());
            keys.clone()
                .flat_map(|f| keys.clone().map(move |t| (f, t)))
                .find(|(f, t)| f != t && meshed(f) && meshed(t) && m.reached(f, t))
                .map(|(f, t)| (m, f.to_string(), t.to_string()))
        })
    else {
        return Ok(None);
    };
    let (_held, _) = lab.hold(&from, &to, m.spec.port, Family::Ipv4).await?;
    // Every node's agent publishes its own pods' ends (one file per node).
    let paths: Vec<_> = lab
        .nodes
        .iter()
        .map(|n| n.connections_file.clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    let records = loop {
        let records: Vec<_> = paths
            .iter()
            .flat_map(|path| connections::read(path).unwrap_or_default())
            .filter(|r| r.pod == from || r.pod == to)
            .collect();
        if records.len() >= 2 || Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok(Some(format!(
        "A connection {from} → {to}:{} held open, as `portcullis connections --lab {name}` shows it:\n{}",
        m.spec.port,
        connections::render(&records, SystemTime::now())
    )))
}
