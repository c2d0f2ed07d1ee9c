//! The adversarial suite's harness: runs `pcl-attack` inside a lab pod (its
//! network namespace AND its cgroup, which is how the kernel programs know
//! the pod) or on the lab's node, and collects what it reports.

pub mod packet;
pub mod wire;

use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command as Process},
};

use portcullis_agent::lab::{plumbing::netns_path, Lab};
use wire::{Command, Event};

/// Where a tool runs: a network namespace, and a cgroup unless it is the
/// node (the test itself is in no pod's cgroup, so no policy applies to it).
#[derive(Clone, Debug)]
pub struct Place {
    pub name: String,
    netns: PathBuf,
    cgroup: Option<PathBuf>,
}

impl Place {
    /// Inside pod `key` (`namespace/name`), as the pod's own processes are.
    pub fn pod(lab: &Lab, key: &str) -> Place {
        let netns = lab
            .pod_netns(key)
            .unwrap_or_else(|e| panic!("no pod {key}: {e}"));
        Place {
            name: key.to_string(),
            netns: netns_path(&netns),
            cgroup: Some(lab.pod_cgroup(key).expect("pod cgroup")),
        }
    }

    /// A command that runs here: in the place's cgroup (joined before any
    /// socket exists) and network namespace, killed if the test dies.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Process {
        let open = |path: &Path, write: bool| -> File {
            OpenOptions::new()
                .read(!write)
                .write(write)
                .open(path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        };
        let netns = open(&self.netns, false);
        let procs = self
            .cgroup
            .as_ref()
            .map(|cg| open(&cg.join("cgroup.procs"), true));
        let mut p = Process::new(program);
        // SAFETY: only async-signal-safe syscalls on fds the closure owns.
        unsafe {
            p.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(f) = &procs {
                    // Join the pod's cgroup before any socket exists.
                    if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        p
    }

    /// On the node, outside every pod.
    pub fn node(lab: &Lab) -> Place {
        Place {
            name: "node".into(),
            netns: netns_path(&lab.node_netns()),
            cgroup: None,
        }
    }

    /// In the lab's network namespace `name` (a node's), outside every pod.
    pub fn netns(name: &str) -> Place {
        Place {
            name: name.into(),
            netns: netns_path(name),
            cgroup: None,
        }
    }
}

/// The tool binary, as the integration test names it
/// (`env!("CARGO_BIN_EXE_pcl-attack")`).
#[derive(Clone, Debug)]
pub struct Attacker {
    pub exe: PathBuf,
}

/// A running tool (listener, capture, stream, server) and what it reported.
pub struct Running {
    what: String,
    child: Child,
    events: Arc<Mutex<Vec<Event>>>,
}

const START_LIMIT: Duration = Duration::from_secs(10);

/// How long after the last expected packet a stray one still counts.
pub const GRACE: Duration = Duration::from_millis(300);

impl Attacker {
    pub fn new(exe: &str) -> Self {
        Self { exe: exe.into() }
    }

    fn spawn(&self, place: &Place, cmd: &Command) -> (Child, Arc<Mutex<Vec<Event>>>) {
        let mut p = place.command(&self.exe);
        p.arg(serde_json::to_string(cmd).expect("command serializes"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = p
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} in {}: {e}", self.exe.display(), place.name));
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let stdout = child.stdout.take().expect("piped stdout");
        let where_ = place.name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Event>(&line) {
                    Ok(e) => sink.lock().expect("events").push(e),
                    Err(e) => eprintln!("pcl-attack in {where_}: unreadable line {line:?}: {e}"),
                }
            }
        });
        (child, events)
    }

    /// Runs a command to completion (at most `limit`) and returns its events.
    pub async fn run(&self, place: &Place, cmd: &Command, limit: Duration) -> Vec<Event> {
        let (mut child, events) = self.spawn(place, cmd);
        match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("waiting for pcl-attack in {}: {e}", place.name),
            Err(_) => {
                let _ = child.kill().await;
                panic!("pcl-attack in {} ran over {limit:?}: {cmd:?}", place.name);
            }
        }
        // The reader task drains stdout after the exit: give it a moment.
        for _ in 0..100 {
            if events.lock().expect("events").iter().any(is_final) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let events = events.lock().expect("events").clone();
        if let Some(Event::Failed { message }) = events.iter().find(|e| is_failed(e)) {
            panic!("pcl-attack in {} failed: {message}", place.name);
        }
        events
    }

    /// Sends packets from `place`; returns each send's errno by label.
    pub async fn send(&self, place: &Place, sends: Vec<wire::Send>) -> Vec<(String, Option<i32>)> {
        let limit = Duration::from_secs(10)
            + sends
                .iter()
                .map(|s| match s.via {
                    wire::Via::Datagram { linger_ms, .. } => Duration::from_millis(linger_ms),
                    _ => Duration::ZERO,
                })
                .sum::<Duration>();
        let events = self.run(place, &Command::Send { sends }, limit).await;
        events
            .into_iter()
            .filter_map(|e| match e {
                Event::Sent { label, errno } => Some((label, errno)),
                _ => None,
            })
            .collect()
    }

    /// Starts a long-running command and waits until it reports it is ready.
    pub async fn start(&self, place: &Place, cmd: &Command) -> Running {
        let (child, events) = self.spawn(place, cmd);
        let running = Running {
            what: format!("{} in {}", op_name(cmd), place.name),
            child,
            events,
        };
        let deadline = tokio::time::Instant::now() + START_LIMIT;
        loop {
            {
                let ev = running.events.lock().expect("events");
                if ev.contains(&Event::Ready) {
                    break;
                }
                if let Some(Event::Failed { message }) = ev.iter().find(|e| is_failed(e)) {
                    panic!("{} failed: {message}", running.what);
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} not ready within {START_LIMIT:?}",
                running.what
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        running
    }

    /// Starts a stream of numbered datagrams (see [`wire::StreamSpec`]).
    pub async fn start_stream(&self, place: &Place, spec: wire::StreamSpec) -> Running {
        self.start(place, &Command::Stream(spec)).await
    }

    pub async fn listen(&self, place: &Place, spec: wire::ListenSpec) -> Running {
        self.start(place, &Command::Listen(spec)).await
    }

    /// Captures what leaves pod `key` (frames arriving on its veth's node
    /// end), from the node.
    pub async fn capture_from(&self, lab: &Lab, key: &str) -> Running {
        let ifname = lab.pod_host_veth(key).expect("pod veth");
        self.start(&Place::node(lab), &Command::Capture { ifname })
            .await
    }
}

fn is_final(e: &Event) -> bool {
    matches!(e, Event::Done | Event::Failed { .. })
}

fn is_failed(e: &Event) -> bool {
    matches!(e, Event::Failed { .. })
}

fn op_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::Send { .. } => "send",
        Command::Listen(_) => "listener",
        Command::Capture { .. } => "capture",
        Command::Stream(_) => "stream",
        Command::Serve(_) => "server",
        Command::Sniff { .. } => "sniffer",
        Command::Open { .. } => "opener",
        Command::Deferred(_) => "deferred connects",
    }
}

/// One reception, flattened: which marker, on which socket, from whom.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seen {
    pub marker: String,
    pub on: String,
    pub from: Option<IpAddr>,
    pub from_port: Option<u16>,
}

impl Running {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("events").clone()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.events()
            .into_iter()
            .flat_map(|e| match e {
                Event::Received {
                    on,
                    from,
                    from_port,
                    markers,
                } => markers
                    .into_iter()
                    .map(|marker| Seen {
                        marker,
                        on: on.clone(),
                        from,
                        from_port,
                    })
                    .collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    /// The result of each socket() a sniffer tried, by label.
    pub fn opened(&self) -> Vec<(String, Option<i32>)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Opened { label, errno } => Some((label, errno)),
                _ => None,
            })
            .collect()
    }

    pub fn markers(&self) -> BTreeSet<String> {
        self.seen().into_iter().map(|s| s.marker).collect()
    }

    /// Waits until every marker of `expected` was seen or `limit` passed,
    /// then [`GRACE`] longer for any that should not arrive (sent in the same
    /// batch, they would be right behind); returns every marker seen.
    pub async fn settle(&self, expected: &[String], limit: Duration) -> BTreeSet<String> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            let m = self.markers();
            if expected.iter().all(|e| m.contains(e)) {
                tokio::time::sleep(GRACE.min(deadline - tokio::time::Instant::now())).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.markers()
    }

    /// Whether the process is still running (a capture or listener that
    /// died would see nothing and make every drop look enforced).
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early ({status}): {:?}", self.what, self.events());
        }
    }

    /// Stops a tool that should still be running (a listener, a capture).
    pub async fn stop(mut self) -> Vec<Event> {
        self.assert_alive();
        self.kill().await
    }

    /// Stops the tool whether or not it already finished (a server).
    pub async fn kill(mut self) -> Vec<Event> {
        let _ = self.child.kill().await;
        self.events()
    }
}
