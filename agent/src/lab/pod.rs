//! The process inside each lab pod: it serves the pod's ports and makes the
//! probes, so both ends of every probe are sockets of the pod's cgroup and
//! network namespace. The lab talks to it with JSON lines on stdin/stdout.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::Path,
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream, UdpSocket},
    process::{Child, ChildStdin, Command},
    sync::oneshot,
    time::{timeout, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("opening {path} for the pod process")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "starting the pod process {} (the `portcullis` binary; set PORTCULLIS_BIN to \
         use another)",
        program.display()
    )]
    Spawn {
        program: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the pod process")]
    Pipe {
        #[source]
        source: std::io::Error,
    },
    #[error("the pod process exited before it was ready (see its stderr above)")]
    NotReady,
    #[error("the pod process went away")]
    Gone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// What happened to one probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeOutcome {
    /// TCP connected, or the UDP echo came back.
    Reached,
    /// connect()/sendmsg() failed with EPERM: an egress deny.
    Denied,
    /// No answer within the timeout: dropped on the way (an ingress deny).
    TimedOut,
    /// Nothing listens there (TCP RST / ICMP port unreachable).
    Refused,
    /// Some other socket error, by errno.
    Failed { errno: i32 },
    /// TCP connected, but getpeername() names another address than the one
    /// asked for (a service translation leaking the backend).
    Elsewhere { peer: SocketAddr },
    /// TCP connected, then closed or reset before the echo: how a meshed
    /// pod sees a connection its proxies refused (the local proxy accepts
    /// first, then learns the far end's answer).
    Reset,
}

impl ProbeOutcome {
    pub fn reached(self) -> bool {
        self == ProbeOutcome::Reached
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct ProbeRequest {
    addr: IpAddr,
    port: u16,
    protocol: Protocol,
    timeout_ms: u64,
}

/// Open and close TCP connections as fast as possible for a while.
#[derive(Debug, Serialize, Deserialize)]
struct LoadRequest {
    addr: IpAddr,
    port: u16,
    duration_ms: u64,
    concurrency: u32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    Probe(ProbeRequest),
    Load(LoadRequest),
    /// Open a TCP connection and keep it; the request id names it.
    Hold(ProbeRequest),
    /// Send a line on a held connection and wait for its echo.
    Ping {
        held: u64,
        timeout_ms: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    id: u64,
    request: Request,
}

/// Result of a [`LoadRequest`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadResult {
    /// Connections established (and closed) within the duration.
    pub connections: u64,
    /// Connection attempts that failed.
    pub failures: u64,
    pub elapsed_ms: u64,
    /// CPU time the pod process used meanwhile, the kernel's work for its
    /// system calls included: unlike `elapsed_ms`, unaffected by other
    /// processes taking turns on the same CPU.
    #[serde(default)]
    pub cpu_us: u64,
    /// Median and 99th percentile of how long one successful `connect()`
    /// took, in microseconds (0 when none succeeded).
    #[serde(default)]
    pub connect_p50_us: u64,
    #[serde(default)]
    pub connect_p99_us: u64,
}

/// The accept queue of every TCP port a lab pod serves, and the pod's
/// `net.core.somaxconn` (which caps it). Sized for the connection-rate
/// bench: at ~10,000 conn/s a 100 ms scheduling stall of the server queues
/// ~1,000 connections, and a full queue drops SYNs, each costing a client
/// loop a 1 s retransmission timeout.
pub const LISTEN_BACKLOG: u32 = 4096;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Answer {
    Probe(ProbeOutcome),
    Load(LoadResult),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum HelperMessage {
    Ready,
    Reply { id: u64, answer: Answer },
}

/// Entry point of `portcullis lab-pod`: serve, then answer probe requests
/// until stdin closes.
pub async fn run_helper(serve: &[(u16, Protocol)]) -> std::io::Result<()> {
    if serve.iter().any(|(_, p)| *p == Protocol::Tcp) {
        // /proc/sys/net is this process's network namespace: the pod's.
        if let Err(e) = raise_sysctl("/proc/sys/net/core/somaxconn", LISTEN_BACKLOG) {
            eprintln!("lab-pod: cannot raise net.core.somaxconn to {LISTEN_BACKLOG}: {e}");
        }
    }
    for &(port, protocol) in serve {
        let addr = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
        // [::] is dual-stack here (bindv6only=0), so IPv4 is served too.
        match protocol {
            Protocol::Tcp => {
                // As TcpListener::bind would, but with our backlog.
                let socket = TcpSocket::new_v6()?;
                socket.set_reuseaddr(true)?;
                socket.bind(addr)?;
                let l = socket.listen(LISTEN_BACKLOG)?;
                tokio::spawn(async move {
                    // Echo, so a held connection can show it still carries data.
                    while let Ok((mut conn, _)) = l.accept().await {
                        tokio::spawn(async move {
                            let (mut rd, mut wr) = conn.split();
                            let _ = tokio::io::copy(&mut rd, &mut wr).await;
                        });
                    }
                });
            }
            Protocol::Udp => {
                let s = UdpSocket::bind(addr).await?;
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    while let Ok((n, peer)) = s.recv_from(&mut buf).await {
                        let _ = s.send_to(&buf[..n], peer).await;
                    }
                });
            }
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<HelperMessage>();
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(msg) = rx.recv().await {
            let mut line = serde_json::to_vec(&msg).expect("serializable");
            line.push(b'\n');
            if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    });
    tx.send(HelperMessage::Ready).ok();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let Ok(env) = serde_json::from_str::<Envelope>(&line) else {
            eprintln!("lab-pod: ignoring malformed request: {line}");
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let answer = match env.request {
                Request::Probe(p) => Answer::Probe(probe(&p).await),
                Request::Load(l) => Answer::Load(load(&l).await),
                Request::Hold(p) => Answer::Probe(hold(env.id, &p).await),
                Request::Ping { held, timeout_ms } => {
                    Answer::Probe(ping(held, Duration::from_millis(timeout_ms)).await)
                }
            };
            tx.send(HelperMessage::Reply { id: env.id, answer }).ok();
        });
    }
    drop(tx);
    let _ = writer.await;
    Ok(())
}

/// Writes `value` to a sysctl file unless it already holds at least that.
fn raise_sysctl(path: &str, value: u32) -> std::io::Result<()> {
    let current: u32 = std::fs::read_to_string(path)?.trim().parse().unwrap_or(0);
    if current < value {
        std::fs::write(path, value.to_string())?;
    }
    Ok(())
}

fn classify(e: &std::io::Error) -> ProbeOutcome {
    match e.raw_os_error() {
        Some(libc::EPERM) => ProbeOutcome::Denied,
        Some(libc::ECONNREFUSED) => ProbeOutcome::Refused,
        Some(errno) => ProbeOutcome::Failed { errno },
        None => ProbeOutcome::Failed { errno: 0 },
    }
}

async fn probe(req: &ProbeRequest) -> ProbeOutcome {
    let dst = SocketAddr::new(req.addr, req.port);
    let limit = Duration::from_millis(req.timeout_ms);
    match req.protocol {
        Protocol::Tcp => match tcp_connect(dst, limit).await {
            Ok(mut s) => echo(&mut s, limit).await,
            Err(outcome) => outcome,
        },
        Protocol::Udp => udp_probe(dst, limit).await,
    }
}

/// Connects, and insists the socket's peer is the address asked for, as
/// the UDP probe insists on the echo's source.
async fn tcp_connect(dst: SocketAddr, limit: Duration) -> Result<TcpStream, ProbeOutcome> {
    match timeout(limit, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => match s.peer_addr() {
            Ok(peer) if peer == dst => Ok(s),
            Ok(peer) => Err(ProbeOutcome::Elsewhere { peer }),
            Err(e) => Err(classify(&e)),
        },
        Ok(Err(e)) => Err(classify(&e)),
        Err(_) => Err(ProbeOutcome::TimedOut),
    }
}

/// Connections kept open by [`Request::Hold`], by request id.
static HELD: std::sync::LazyLock<tokio::sync::Mutex<HashMap<u64, TcpStream>>> =
    std::sync::LazyLock::new(Default::default);

async fn hold(id: u64, req: &ProbeRequest) -> ProbeOutcome {
    let dst = SocketAddr::new(req.addr, req.port);
    let limit = Duration::from_millis(req.timeout_ms);
    match tcp_connect(dst, limit).await {
        Ok(mut s) => {
            let outcome = echo(&mut s, limit).await;
            if outcome.reached() {
                HELD.lock().await.insert(id, s);
            }
            outcome
        }
        Err(outcome) => outcome,
    }
}

async fn ping(held: u64, limit: Duration) -> ProbeOutcome {
    let mut table = HELD.lock().await;
    let Some(s) = table.get_mut(&held) else {
        return ProbeOutcome::Failed { errno: libc::EBADF };
    };
    echo(s, limit).await
}

/// Sends a few bytes and waits for the pod's echo: a connection counts as
/// reached when data went both ways, not when the handshake completed.
async fn echo(s: &mut TcpStream, limit: Duration) -> ProbeOutcome {
    use tokio::io::AsyncReadExt as _;
    let exchange = async {
        s.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.map(|_| ())
    };
    match timeout(limit, exchange).await {
        Ok(Ok(())) => ProbeOutcome::Reached,
        Ok(Err(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof
                || e.raw_os_error() == Some(libc::ECONNRESET)
                || e.raw_os_error() == Some(libc::EPIPE) =>
        {
            ProbeOutcome::Reset
        }
        Ok(Err(e)) => classify(&e),
        Err(_) => ProbeOutcome::TimedOut,
    }
}

/// Connect-and-close loops; linger 0 closes with RST so no TIME_WAIT
/// state piles up and exhausts the ephemeral ports.
async fn load(req: &LoadRequest) -> LoadResult {
    let dst = SocketAddr::new(req.addr, req.port);
    let started = Instant::now();
    let cpu_started = process_cpu_us();
    let deadline = started + Duration::from_millis(req.duration_ms);
    let workers = (0..req.concurrency.max(1)).map(|_| async move {
        let (mut latencies, mut failed) = (Vec::<u32>::new(), 0u64);
        while Instant::now() < deadline {
            let attempt = Instant::now();
            match TcpStream::connect(dst).await {
                Ok(s) => {
                    let took = attempt.elapsed().as_micros();
                    latencies.push(u32::try_from(took).unwrap_or(u32::MAX));
                    let _ = socket2_linger_zero(&s);
                }
                Err(_) => failed += 1,
            }
        }
        (latencies, failed)
    });
    let results = futures::future::join_all(workers).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let cpu_us = process_cpu_us().saturating_sub(cpu_started);
    let failures = results.iter().map(|r| r.1).sum();
    let mut latencies: Vec<u32> = results.into_iter().flat_map(|r| r.0).collect();
    latencies.sort_unstable();
    LoadResult {
        connections: latencies.len() as u64,
        failures,
        elapsed_ms,
        cpu_us,
        connect_p50_us: percentile(&latencies, 0.50),
        connect_p99_us: percentile(&latencies, 0.99),
    }
}

/// The `q`-quantile of sorted values (nearest rank); 0 for none.
fn percentile(sorted: &[u32], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    u64::from(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// CPU time used by all threads of this process so far, in microseconds.
fn process_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// SO_LINGER 0: close() sends RST and leaves no TIME_WAIT behind. The
/// socket is closed right after, on this task, so blocking is not a concern.
fn socket2_linger_zero(s: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and a correctly sized option value.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sends a datagram (unconnected, so the sendmsg hook decides) and waits for
/// the echo, resending now and then in case one was lost.
async fn udp_probe(dst: SocketAddr, limit: Duration) -> ProbeOutcome {
    let local: SocketAddr = match dst {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = match UdpSocket::bind(local).await {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let deadline = Instant::now() + limit;
    let resend = Duration::from_millis(200);
    let mut buf = [0u8; 64];
    loop {
        if let Err(e) = sock.send_to(b"portcullis-probe", dst).await {
            return classify(&e);
        }
        let wait = resend.min(deadline.saturating_duration_since(Instant::now()));
        match timeout(wait, sock.recv_from(&mut buf)).await {
            Ok(Ok((_, from))) if from == dst => return ProbeOutcome::Reached,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return classify(&e),
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return ProbeOutcome::TimedOut;
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// The lab's handle on one pod process.
pub struct PodClient {
    stdin: tokio::sync::Mutex<ChildStdin>,
    pending: Pending,
    next_id: AtomicU64,
    child: Child,
}

/// Where a pod process runs: a network namespace and optionally a cgroup.
pub struct Placement<'a> {
    pub netns: &'a Path,
    pub cgroup: Option<&'a Path>,
}

impl PodClient {
    pub async fn spawn(
        exe: &Path,
        placement: Placement<'_>,
        serve: &[(u16, Protocol)],
    ) -> Result<Self, PodError> {
        let open = |path: &Path, write: bool| {
            OpenOptions::new()
                .read(!write)
                .write(write)
                .open(path)
                .map_err(|source| PodError::Open {
                    path: path.to_path_buf(),
                    source,
                })
        };
        let netns: File = open(placement.netns, false)?;
        let procs: Option<File> = match placement.cgroup {
            Some(cg) => Some(open(&cg.join("cgroup.procs"), true)?),
            None => None,
        };
        let netns_fd = netns.as_raw_fd();
        let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());

        let mut cmd = Command::new(exe);
        cmd.arg("lab-pod");
        for (port, proto) in serve {
            cmd.arg("--serve")
                .arg(format!("{port}/{}", proto.as_str().to_lowercase()));
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: only async-signal-safe syscalls on fds opened above.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = procs_fd {
                    // "0" moves the writing process: the pod process joins the
                    // pod's cgroup before it opens any socket.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| PodError::Spawn {
            program: exe.to_path_buf(),
            source,
        })?;
        drop((netns, procs));
        let stdin = child.stdin.take().ok_or(PodError::Gone)?;
        let stdout = child.stdout.take().ok_or(PodError::Gone)?;
        let mut lines = BufReader::new(stdout).lines();
        match lines.next_line().await {
            Ok(Some(l)) if matches!(serde_json::from_str(&l), Ok(HelperMessage::Ready)) => {}
            _ => return Err(PodError::NotReady),
        }
        let pending: Pending = Arc::default();
        let dispatch = pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(HelperMessage::Reply { id, answer }) = serde_json::from_str(&line) {
                    if let Some(tx) = dispatch.lock().expect("pending lock").remove(&id) {
                        let _ = tx.send(answer);
                    }
                }
            }
            // The process is gone: fail whatever still waits.
            dispatch.lock().expect("pending lock").clear();
        });
        Ok(Self {
            stdin: tokio::sync::Mutex::new(stdin),
            pending,
            next_id: AtomicU64::new(1),
            child,
        })
    }

    pub async fn probe(
        &self,
        addr: IpAddr,
        port: u16,
        protocol: Protocol,
        limit: Duration,
    ) -> Result<ProbeOutcome, PodError> {
        let request = Request::Probe(ProbeRequest {
            addr,
            port,
            protocol,
            timeout_ms: limit.as_millis() as u64,
        });
        match self.ask(request).await? {
            Answer::Probe(o) => Ok(o),
            Answer::Load(_) => Err(PodError::Gone),
        }
    }

    /// Opens TCP connections to `addr:port` for `duration` with
    /// `concurrency` loops and counts them.
    pub async fn load(
        &self,
        addr: IpAddr,
        port: u16,
        duration: Duration,
        concurrency: u32,
    ) -> Result<LoadResult, PodError> {
        let request = Request::Load(LoadRequest {
            addr,
            port,
            duration_ms: duration.as_millis() as u64,
            concurrency,
        });
        match self.ask(request).await? {
            Answer::Load(r) => Ok(r),
            Answer::Probe(_) => Err(PodError::Gone),
        }
    }

    /// Opens a TCP connection and keeps it open; returns its handle.
    pub async fn hold(
        &self,
        addr: IpAddr,
        port: u16,
        limit: Duration,
    ) -> Result<(u64, ProbeOutcome), PodError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = Request::Hold(ProbeRequest {
            addr,
            port,
            protocol: Protocol::Tcp,
            timeout_ms: limit.as_millis() as u64,
        });
        match self.ask_as(id, request).await? {
            Answer::Probe(o) => Ok((id, o)),
            Answer::Load(_) => Err(PodError::Gone),
        }
    }

    /// Exchanges data on a held connection.
    pub async fn ping(&self, held: u64, limit: Duration) -> Result<ProbeOutcome, PodError> {
        let request = Request::Ping {
            held,
            timeout_ms: limit.as_millis() as u64,
        };
        match self.ask(request).await? {
            Answer::Probe(o) => Ok(o),
            Answer::Load(_) => Err(PodError::Gone),
        }
    }

    async fn ask(&self, request: Request) -> Result<Answer, PodError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.ask_as(id, request).await
    }

    async fn ask_as(&self, id: u64, request: Request) -> Result<Answer, PodError> {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let mut line = serde_json::to_vec(&Envelope { id, request }).expect("serializable");
        line.push(b'\n');
        {
            let mut stdin = self.stdin.lock().await;
            stdin
                .write_all(&line)
                .await
                .map_err(|source| PodError::Pipe { source })?;
            stdin
                .flush()
                .await
                .map_err(|source| PodError::Pipe { source })?;
        }
        rx.await.map_err(|_| PodError::Gone)
    }

    /// The pod process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bench run from a copy of the binary under another name finds no
    /// `portcullis` beside it: the error says which program it tried.
    #[tokio::test]
    async fn a_missing_pod_program_is_named_in_the_error() {
        let missing = Path::new("/nonexistent/portcullis");
        let placement = Placement {
            netns: Path::new("/proc/self/ns/net"),
            cgroup: None,
        };
        let err = PodClient::spawn(missing, placement, &[])
            .await
            .err()
            .expect("no such program");
        let message = err.to_string();
        assert!(message.contains("/nonexistent/portcullis"), "{message}");
        assert!(message.contains("PORTCULLIS_BIN"), "{message}");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.50), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
        // One slow connect in a hundred shows at p99, not at p50.
        let mut v = vec![100; 99];
        v.push(1_000_000);
        assert_eq!((percentile(&v, 0.5), percentile(&v, 0.99)), (100, 100));
        v.extend([1_000_000; 2]);
        v.sort_unstable();
        assert_eq!(percentile(&v, 0.99), 1_000_000);
    }
}
