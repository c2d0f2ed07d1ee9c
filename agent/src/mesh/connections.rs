//! The mesh's live connections, for `portcullis connections`: is this
//! connection encrypted, to whom, with which certificate, until when. The
//! proxies track each connection while it is relayed; the runtime
//! publishes the table to a file, as `portcullis identity` reads its own.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

/// Where the agent publishes the table by default.
pub const DEFAULT_FILE: &str = "/run/portcullis/connections.json";
/// The file's name in a lab's state directory.
pub const LAB_FILE: &str = "connections.json";

pub fn lab_file(name: &str) -> PathBuf {
    crate::lab::state_dir_for(name).join(LAB_FILE)
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionsError {
    #[error("reading {path}; is the agent running with identity (and so the mesh) on?")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a connections table")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One proxied connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// `outbound` (the pod connected) or `inbound` (to the pod).
    pub direction: String,
    /// The meshed pod, `namespace/name`.
    pub pod: String,
    /// The client's address.
    pub from: String,
    /// Where the client connected (its original destination).
    pub to: String,
    /// `mtls`, or `passthrough` (plaintext to a pod outside the mesh).
    pub transport: String,
    /// The pod's own SPIFFE ID.
    pub local_identity: String,
    /// The other side's proven SPIFFE ID (mTLS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<String>,
    /// Serial of the other side's certificate (lowercase hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_serial: Option<String>,
    /// When the other side's certificate expires (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_not_after: Option<u64>,
    /// When the connection was opened (Unix seconds).
    pub since: u64,
}

/// Live connections; clones share the table.
#[derive(Clone, Default)]
pub struct ConnectionTable {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    live: BTreeMap<u64, ConnectionRecord>,
    /// Changed since the last publication.
    dirty: bool,
}

impl ConnectionTable {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tracks a connection until the returned guard is dropped.
    pub fn track(&self, record: ConnectionRecord) -> Tracked {
        let mut inner = self.lock();
        let key = inner.next;
        inner.next += 1;
        inner.live.insert(key, record);
        inner.dirty = true;
        Tracked {
            table: self.clone(),
            key,
        }
    }

    pub fn snapshot(&self) -> Vec<ConnectionRecord> {
        self.lock().live.values().cloned().collect()
    }

    /// Writes the table to `path` (aside, then renamed) if it changed since
    /// the last call.
    pub fn publish_if_changed(&self, path: &Path) -> Result<(), ConnectionsError> {
        let records = {
            let mut inner = self.lock();
            if !std::mem::take(&mut inner.dirty) {
                return Ok(());
            }
            inner.live.values().cloned().collect::<Vec<_>>()
        };
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&records)?)?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|source| {
            // Try again next time.
            self.lock().dirty = true;
            ConnectionsError::Write {
                path: path.into(),
                source,
            }
        })
    }
}

/// Keeps a connection in the table while it lives.
pub struct Tracked {
    table: ConnectionTable,
    key: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut inner = self.table.lock();
        inner.live.remove(&self.key);
        inner.dirty = true;
    }
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads what an agent published.
pub fn read(path: &Path) -> Result<Vec<ConnectionRecord>, ConnectionsError> {
    let bytes = std::fs::read(path).map_err(|source| ConnectionsError::Read {
        path: path.into(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| ConnectionsError::Parse {
        path: path.into(),
        source,
    })
}

/// A table for people: one line per connection, oldest first.
pub fn render(records: &[ConnectionRecord], now: SystemTime) -> String {
    if records.is_empty() {
        return "no proxied connections\n".into();
    }
    let mut sorted: Vec<&ConnectionRecord> = records.iter().collect();
    sorted.sort_by_key(|r| (r.since, r.pod.clone()));
    let now = unix(now);
    let mut out = String::new();
    for r in sorted {
        let peer = match (&r.peer_identity, &r.peer_serial, r.peer_not_after) {
            (Some(id), Some(serial), Some(until)) => {
                let left = until.saturating_sub(now);
                format!(
                    "{id} (certificate {serial}, expires {}, in {}m{:02}s)",
                    crate::clock::utc(until),
                    left / 60,
                    left % 60
                )
            }
            (Some(id), _, _) => id.clone(),
            _ => "plaintext: the destination is outside the mesh".into(),
        };
        let _ = writeln!(
            out,
            "{} {:<8} {} {} → {} [{}] peer {} (open {}s)",
            r.pod,
            r.direction,
            r.local_identity,
            r.from,
            r.to,
            r.transport.to_uppercase(),
            peer,
            now.saturating_sub(r.since)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(direction: &str) -> ConnectionRecord {
        ConnectionRecord {
            direction: direction.into(),
            pod: "x/a".into(),
            from: "198.18.1.10:40000".into(),
            to: "198.18.1.11:80".into(),
            transport: "mtls".into(),
            local_identity: "spiffe://cluster.local/ns/x/sa/a".into(),
            peer_identity: Some("spiffe://cluster.local/ns/x/sa/b".into()),
            peer_serial: Some("0a1b".into()),
            peer_not_after: Some(1_796_190_000),
            since: 1_796_186_400,
        }
    }

    #[test]
    fn the_table_follows_the_guards_and_publishes_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let table = ConnectionTable::default();
        let guard = table.track(record("outbound"));
        table.publish_if_changed(&path).unwrap();
        assert_eq!(read(&path).unwrap(), vec![record("outbound")]);
        std::fs::remove_file(&path).unwrap();
        table.publish_if_changed(&path).unwrap();
        assert!(!path.exists(), "unchanged: not written again");
        drop(guard);
        table.publish_if_changed(&path).unwrap();
        assert!(read(&path).unwrap().is_empty());
    }

    #[test]
    fn the_rendering_says_encrypted_to_whom_and_until_when() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_186_460);
        let text = render(&[record("outbound")], now);
        assert!(text.contains("[MTLS]"), "{text}");
        assert!(
            text.contains(
                "peer spiffe://cluster.local/ns/x/sa/b (certificate 0a1b, expires 2026-12-02"
            ),
            "{text}"
        );
        assert!(text.contains("in 59m00s"), "{text}");
        let mut plain = record("outbound");
        plain.transport = "passthrough".into();
        plain.peer_identity = None;
        assert!(render(&[plain], now).contains("plaintext"));
    }
}
