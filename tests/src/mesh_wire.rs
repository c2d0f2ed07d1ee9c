//! What the mesh tests look at and drive: packet captures (tcpdump) read
//! with tshark and the agents' TLS key log, small Python programs inside
//! pods, and probes retried until the mesh answers as expected.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use portcullis_agent::lab::{pod::ProbeOutcome, report::ProbeSpec, Family, Lab};
use tokio::io::AsyncBufReadExt;

use crate::attack::Place;

pub fn tcp(port: u16) -> ProbeSpec {
    format!("{port}/tcp").parse().expect("probe spec")
}

pub fn pod_ip(lab: &Lab, key: &str) -> IpAddr {
    IpAddr::V4(lab.pod_ipv4(key).expect("pod"))
}

/// Where the agents' TLS keys go (rustls reads `SSLKEYLOGFILE` at the
/// process's first handshake, so every test sets it before its lab), for
/// tshark to read the handshakes' certificates. Every agent of the process
/// (both nodes of a two-node lab) writes here.
pub fn keylog_file() -> PathBuf {
    let path = std::env::temp_dir().join(format!("portcullis-mesh-keys-{}", std::process::id()));
    // SAFETY: set before any lab's agent starts; the tests here take the
    // lab lock, so no other thread reads the environment meanwhile.
    unsafe { std::env::set_var("SSLKEYLOGFILE", &path) };
    path
}

/// Probes until the outcome is `want` (identities are issued and listeners
/// opened moments after the pass), or panics with the last one.
pub async fn until_outcome(lab: &Lab, from: &str, to: &str, port: u16, want: ProbeOutcome) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = lab
            .probe(from, to, tcp(port), Family::Ipv4)
            .await
            .expect("probe");
        if got == want {
            return;
        }
        if Instant::now() >= deadline {
            let problems: Vec<_> = (1..=lab.node_count())
                .map(|n| {
                    lab.node_agent_status(n)
                        .map(|s| s.borrow().problems.clone())
                })
                .collect();
            panic!(
                "{from} → {to}:{port}: {got:?}, expected {want:?}; agents' problems: {problems:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A capture of what crosses one interface (a pod's veth, the link
/// between nodes).
pub struct Capture {
    child: tokio::process::Child,
    file: PathBuf,
}

impl Capture {
    /// What crosses pod `key`'s veth, on its node.
    pub async fn start(lab: &Lab, key: &str, file: &Path) -> Self {
        let veth = lab.pod_host_veth(key).expect("veth");
        let node = lab.pod_node(key).expect("pod");
        let netns = lab.node_netns_of(node).expect("node");
        Self::on(Place::netns(&netns), &veth, file).await
    }

    /// What crosses `interface` of `place`, from when this returns: tcpdump
    /// runs in immediate mode and has said "listening on".
    pub async fn on(place: Place, interface: &str, file: &Path) -> Self {
        let mut cmd = place.command("tcpdump");
        cmd.args(["-i", interface, "--immediate-mode", "-U", "-s", "0", "-w"])
            .arg(file)
            .arg("tcp")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .expect("tcpdump (cargo xtask setup installs it)");
        let err = child.stderr.take().expect("stderr");
        let mut lines = tokio::io::BufReader::new(err).lines();
        let mut said = Vec::new();
        let started = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let listening = line.contains("listening on");
                said.push(line);
                if listening {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(
            matches!(started, Ok(true)),
            "tcpdump did not start: {said:?}"
        );
        // Keep draining its stderr so it never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("tcpdump: {line}");
            }
        });
        Self {
            child,
            file: file.into(),
        }
    }

    /// Stops the capture (SIGINT flushes it) and returns the file's bytes.
    pub async fn stop(mut self) -> Vec<u8> {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        std::fs::read(&self.file).expect("capture file")
    }
}

/// One field of every packet of a capture that matches a display filter,
/// a line each.
pub fn tshark_fields(pcap: &Path, filter: &str, field: &str, options: &[&str]) -> String {
    let out = std::process::Command::new("tshark")
        .arg("-r")
        .arg(pcap)
        .args(options)
        .args(["-Y", filter, "-T", "fields", "-e", field])
        .output()
        .expect("tshark (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a short Python program in a pod; returns its stdout.
pub async fn python_in(lab: &Lab, key: &str, program: &str) -> String {
    let out = Place::pod(lab, key)
        .command("python3")
        .args(["-c", program])
        .output()
        .await
        .expect("python3");
    assert!(
        out.status.success(),
        "python in {key}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-connection server in a pod: prints the client's address, echoes
/// one message.
pub fn start_server(lab: &Lab, key: &str, port: u16) -> tokio::process::Child {
    start_server_on(lab, key, "AF_INET", "0.0.0.0", port)
}

/// [`start_server`] on an address family (`AF_INET`, `AF_INET6`) and a
/// local address.
pub fn start_server_on(
    lab: &Lab,
    key: &str,
    family: &str,
    address: &str,
    port: u16,
) -> tokio::process::Child {
    let program = format!(
        "import socket\n\
         s = socket.socket(socket.{family}); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('{address}', {port})); s.listen(); print('ready', flush=True)\n\
         c, a = s.accept(); print('peer', a[0], flush=True)\n\
         c.sendall(c.recv(4096)); c.close()\n"
    );
    Place::pod(lab, key)
        .command("python3")
        .args(["-c", &program])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3")
}

pub async fn read_line(child: &mut tokio::process::Child) -> String {
    let out = child.stdout.as_mut().expect("stdout");
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(out);
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .expect("a line within 10 s")
        .expect("stdout");
    line.trim().to_string()
}

/// A client in pod `from` that connects to `to:port`, prints what its
/// getpeername() says, sends `marker` and prints the echo.
pub async fn exchange(lab: &Lab, from: &str, to: IpAddr, port: u16, marker: &str) -> String {
    python_in(
        lab,
        from,
        &format!(
            "import socket\n\
             c = socket.create_connection(('{to}', {port}), timeout=10)\n\
             print('peername', c.getpeername()[0], c.getpeername()[1])\n\
             c.sendall(b'{marker}'); print('echo', c.recv(4096).decode())\n"
        ),
    )
    .await
}
