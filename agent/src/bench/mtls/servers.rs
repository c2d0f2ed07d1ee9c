//! The applications of the server pod: nginx serving a small static body
//! with keep-alive (our own configuration and process, not the system
//! service) and an iperf3 server, both on every address of the pod.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::Child;

use super::inpod::{InPod, InPodError};

pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
/// What nginx answers every request with.
pub const BODY: &str = "Portcullis mTLS bench: a small static body.\n";
const START_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Place(#[from] InPodError),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {tool} in {pod} (cargo xtask setup installs it)")]
    Spawn {
        tool: &'static str,
        pod: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} in {pod} is not listening on port {port} after {START_WITHIN:?}{log}")]
    NotListening {
        tool: &'static str,
        pod: String,
        port: u16,
        log: String,
    },
}

/// A tool running in a pod until dropped.
pub struct Running {
    child: Child,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Spawns `tool args` in `pod` and waits until it listens on each of
    /// `ports` (of the pod's namespace). `log`: a file whose text explains
    /// a failure to start.
    pub async fn start(
        pod: &InPod,
        tool: &'static str,
        args: &[&str],
        ports: &[u16],
        log: Option<&Path>,
    ) -> Result<Self, ServerError> {
        let child = pod
            .command(tool)?
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| ServerError::Spawn {
                tool,
                pod: pod.pod.clone(),
                source,
            })?;
        let running = Self { child };
        let deadline = Instant::now() + START_WITHIN;
        for &port in ports {
            while !listening(running.pid(), port) {
                if Instant::now() > deadline {
                    let log = log
                        .and_then(|p| std::fs::read_to_string(p).ok())
                        .map(|t| format!("; its log: {t}"))
                        .unwrap_or_default();
                    return Err(ServerError::NotListening {
                        tool,
                        pod: pod.pod.clone(),
                        port,
                        log,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(running)
    }
}

/// Whether a TCP socket listens on `port` in the network namespace of
/// process `pid` (its /proc/<pid>/net/tcp{,6}: state 0A is LISTEN).
pub fn listening(pid: u32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|file| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
            })
    })
}

/// nginx's configuration: one worker, no access log, keep-alive for as many
/// requests as a run makes, everything it writes under `dir`.
pub fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n\
           keepalive_requests 10000000;\n  keepalive_timeout 120s;\n\
           server {{\n    listen {HTTP_PORT} backlog=4096;\n    default_type text/plain;\n\
               location / {{ return 200 \"{}\"; }}\n  }}\n}}\n",
        BODY.trim_end().to_string() + "\\n"
    )
}

/// nginx and the iperf3 server in `pod`, configured under `dir`.
pub async fn start(pod: &InPod, dir: &Path) -> Result<Vec<Running>, ServerError> {
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(dir)).map_err(|source| ServerError::Write {
        path: conf.clone(),
        source,
    })?;
    let error_log = dir.join("nginx-error.log");
    let (prefix, conf_s, err_s) = (
        dir.display().to_string(),
        conf.display().to_string(),
        error_log.display().to_string(),
    );
    let nginx = Running::start(
        pod,
        "nginx",
        &["-p", &prefix, "-c", &conf_s, "-e", &err_s],
        &[HTTP_PORT],
        Some(&error_log),
    )
    .await?;
    let port = IPERF_PORT.to_string();
    let iperf = Running::start(pod, "iperf3", &["-s", "-p", &port], &[IPERF_PORT], None).await?;
    Ok(vec![nginx, iperf])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_serves_the_body_from_its_own_directory() {
        let c = nginx_conf(Path::new("/tmp/b"));
        assert!(c.contains("pid /tmp/b/nginx.pid;"), "{c}");
        assert!(c.contains("listen 8080 backlog=4096;"), "{c}");
        assert!(
            c.contains("return 200 \"Portcullis mTLS bench: a small static body.\\n\";"),
            "{c}"
        );
        assert!(c.contains("access_log off;"), "{c}");
    }
}
