//! What a pod's kernel received on its TCP connections of one local port
//! (`ss -tin` in the pod): how the bench sees the bytes of a measure
//! arrive at the server pod on HBONE's port 15008, whatever the agent's
//! own counters say.

use std::collections::BTreeMap;

use super::inpod::{InPod, InPodError};

#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error(transparent)]
    Place(#[from] InPodError),
    #[error("running ss in {pod} (iproute2)")]
    Run {
        pod: String,
        #[source]
        source: std::io::Error,
    },
}

/// Bytes received so far by each established connection on local `port`,
/// by its local and peer addresses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Received(BTreeMap<String, u64>);

impl Received {
    pub async fn read(pod: &InPod, port: u16) -> Result<Self, SocketsError> {
        let out = pod
            .command("ss")?
            .args([
                "-Htin",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{port}"),
            ])
            .output()
            .await
            .map_err(|source| SocketsError::Run {
                pod: pod.pod.clone(),
                source,
            })?;
        Ok(parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Bytes received since `earlier` (connections opened since count whole).
    pub fn since(&self, earlier: &Received) -> u64 {
        self.0
            .iter()
            .map(|(k, &n)| n.saturating_sub(earlier.0.get(k).copied().unwrap_or(0)))
            .sum()
    }
}

/// `ss -Htin`: a line per connection (its last two fields are the local
/// and peer addresses), then an indented line of details with
/// `bytes_received:N`.
fn parse(text: &str) -> Received {
    let mut r = BTreeMap::new();
    let mut key = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            let f: Vec<&str> = line.split_whitespace().collect();
            key = (f.len() >= 2).then(|| format!("{} {}", f[f.len() - 2], f[f.len() - 1]));
            continue;
        }
        let bytes = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bytes_received:"))
            .and_then(|n| n.parse::<u64>().ok());
        if let (Some(k), Some(n)) = (key.take(), bytes) {
            r.insert(k, n);
        }
    }
    Received(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_by_connection_and_since() {
        let before = parse(
            "0 0 198.18.1.11:15008 198.18.1.10:40000\n\
             \t cubic wscale:7,7 bytes_sent:10 bytes_acked:11 bytes_received:1000 segs_out:3\n",
        );
        let after = parse(
            "0 0 198.18.1.11:15008 198.18.1.10:40000\n\
             \t cubic bytes_received:5000 segs_out:9\n\
             0 0 198.18.1.11:15008 198.18.1.10:40002\n\
             \t cubic bytes_received:700\n",
        );
        assert_eq!(after.since(&before), 4000 + 700);
        assert_eq!(before.since(&after), 0);
    }
}
