//! The agent of the mTLS bench as a process of its own (`portcullis agent`
//! on the lab's files, pins and CA), so its CPU time and peak memory are
//! the agent's alone, not the bench's. Its log goes to a file, which tells
//! when a pass has applied; its /metrics tells which connections the
//! proxies carried.

use std::{
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    process::{Child, Command},
};

use crate::lab::Lab;

/// How long a pass may take to apply a changed workloads file.
const APPLY_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting portcullis agent")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("the agent applied no pass within {APPLY_WITHIN:?}; its log: {log}")]
    NotApplied { log: String },
    #[error("the agent exited; its log: {log}")]
    Exited { log: String },
    #[error("scraping the agent's /metrics at {addr}")]
    Scrape {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The mesh's counters, outbound side (the client pod's proxy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshCounters {
    /// Connections carried over HBONE.
    pub mtls: u64,
    /// Connections passed through in plaintext or refused.
    pub other: u64,
}

pub struct AgentProcess {
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
}

impl AgentProcess {
    /// Starts `exe agent` on the lab (whose in-process agent must be
    /// stopped), logging to `dir/agent.log`.
    pub fn start(lab: &Lab, exe: &Path, dir: &Path) -> Result<Self, AgentError> {
        let log = dir.join("agent.log");
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| AgentError::Io {
                action,
                path,
                source,
            }
        };
        let file = File::create(&log).map_err(io("creating", &log))?;
        let admin = free_port().map_err(io("finding a free port on", Path::new("127.0.0.1")))?;
        let child = Command::new(exe)
            .args(lab.agent_args())
            .arg("--admin-addr")
            .arg(admin.to_string())
            .arg("--state-dir")
            .arg(lab.agent_state_dir())
            .arg("--ca-dir")
            .arg(lab.ca_dir())
            .arg("--identities-file")
            .arg(dir.join("identities.json"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| AgentError::Spawn { source })?;
        Ok(Self { child, log, admin })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Passes that reached the kernel so far.
    pub fn passes(&self) -> usize {
        self.log_text().matches("policy applied").count()
    }

    /// Waits for a pass after the first `after`.
    pub async fn wait_applied(&mut self, after: usize) -> Result<(), AgentError> {
        let deadline = Instant::now() + APPLY_WITHIN;
        while self.passes() <= after {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return Err(AgentError::Exited {
                    log: self.log_tail(),
                });
            }
            if Instant::now() > deadline {
                return Err(AgentError::NotApplied {
                    log: self.log_tail(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The mesh counters of /metrics now.
    pub async fn mesh(&self) -> Result<MeshCounters, AgentError> {
        let scrape = async {
            let mut tcp = tokio::net::TcpStream::connect(self.admin).await?;
            tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                .await?;
            let mut text = String::new();
            tcp.read_to_string(&mut text).await?;
            Ok::<_, std::io::Error>(text)
        };
        let text = tokio::time::timeout(Duration::from_secs(10), scrape)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            .map_err(|source| AgentError::Scrape {
                addr: self.admin,
                source,
            })?;
        Ok(parse_mesh(&text))
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn free_port() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn parse_mesh(text: &str) -> MeshCounters {
    let mut c = MeshCounters::default();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let value = value as u64;
        let outbound = series.contains("direction=\"outbound\"");
        if series.starts_with("portcullis_mesh_connections_total{") && outbound {
            if series.contains("result=\"mtls\"") {
                c.mtls += value;
            } else {
                c.other += value;
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_counters_are_read_from_the_exposition() {
        let text = "# TYPE portcullis_mesh_connections counter\n\
            portcullis_mesh_connections_total{direction=\"outbound\",mode=\"strict\",result=\"mtls\"} 12\n\
            portcullis_mesh_connections_total{direction=\"inbound\",mode=\"strict\",result=\"mtls\"} 12\n\
            portcullis_mesh_connections_total{direction=\"outbound\",mode=\"strict\",result=\"refused\"} 1\n\
            portcullis_mesh_active_connections{direction=\"outbound\"} 4\n";
        assert_eq!(parse_mesh(text), MeshCounters { mtls: 12, other: 1 });
    }
}
