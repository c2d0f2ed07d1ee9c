//! The agent's admin HTTP endpoint: `/metrics` (OpenMetrics text, or the
//! Prometheus text format for clients that do not ask for OpenMetrics),
//! `/healthz` (the sync loop runs) and `/readyz` (policy reached the kernel).
//!
//! hyper directly rather than axum: three fixed GET routes need no router,
//! extractors or middleware, and hyper + hyper-util is all axum would pull in
//! underneath anyway (ztunnel's admin server is built the same way). The
//! server runs on its own thread with a current-thread runtime, so it works
//! the same whether the agent is started from a tokio program (the CLI, the
//! lab, tests) or not, and it stops with the agent.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::sync::{oneshot, watch};
use tracing::{debug, warn};

use crate::{
    app::Status,
    metrics::{self, Metrics},
    source::file::error_chain,
};

/// Where `portcullis agent` serves by default.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9964";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding the admin endpoint to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the admin endpoint's runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("{value:?} is not an address to listen on (e.g. 127.0.0.1:9964, [::]:9964) or `none`")]
    Address {
        value: String,
        #[source]
        source: std::net::AddrParseError,
    },
}

/// `--admin-addr`: an address, or `none` for no admin endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenAddr(pub Option<SocketAddr>);

impl FromStr for ListenAddr {
    type Err = AdminError;
    fn from_str(s: &str) -> Result<Self, AdminError> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(Self(None));
        }
        s.parse()
            .map(|a| Self(Some(a)))
            .map_err(|source| AdminError::Address {
                value: s.to_string(),
                source,
            })
    }
}

/// What the endpoints report on.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub status: watch::Receiver<Status>,
    /// True while the sync loop runs.
    pub running: Arc<AtomicBool>,
    /// Where the kernel counters are pinned.
    pub pin_dir: PathBuf,
}

/// A running admin endpoint; stops when dropped.
pub struct AdminServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl AdminServer {
    /// The bound address (the actual port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Binds `addr` (errors are returned here, not logged later) and serves.
pub fn serve(addr: SocketAddr, state: AdminState) -> Result<AdminServer, AdminError> {
    let bind = |source| AdminError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| AdminError::Runtime { source })?;
    let (tx, rx) = oneshot::channel();
    let thread = thread::Builder::new()
        .name("portcullis-admin".into())
        .spawn(move || runtime.block_on(accept_loop(listener, state, rx)))
        .map_err(|source| AdminError::Runtime { source })?;
    Ok(AdminServer {
        addr: bound,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

async fn accept_loop(
    listener: std::net::TcpListener,
    state: AdminState,
    mut shutdown: oneshot::Receiver<()>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("admin endpoint: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        debug!("admin endpoint: accept: {e}");
                        continue;
                    }
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| respond(state.clone(), req));
                    if let Err(e) = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        debug!(%peer, "admin endpoint: {e}");
                    }
                });
            }
        }
    }
}

fn reply(code: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn respond(
    state: AdminState,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET\n".into(),
        ));
    }
    let r = match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            metrics_page(state, metrics::text::wants_openmetrics(accept)).await
        }
        "/healthz" => {
            let (code, body) = health(&state);
            reply(code, TEXT, body)
        }
        "/readyz" => {
            let (code, body) = readiness(&state.status.borrow());
            reply(code, TEXT, body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    };
    Ok(r)
}

/// OpenMetrics text when the client asks for it (Prometheus does), the
/// classic Prometheus text otherwise.
async fn metrics_page(state: AdminState, openmetrics: bool) -> Response<Full<Bytes>> {
    // Reading the kernel map is a series of blocking syscalls.
    let encoded = tokio::task::spawn_blocking(move || {
        if let Err(e) = state.metrics.refresh(&state.pin_dir) {
            // Serve what is known; the decision series are as of the last
            // successful read.
            warn!("metrics: {}", error_chain(&e));
        }
        state.metrics.encode()
    })
    .await;
    match encoded {
        Ok(Ok(text)) if openmetrics => reply(StatusCode::OK, metrics::CONTENT_TYPE, text),
        Ok(Ok(text)) => reply(
            StatusCode::OK,
            metrics::text::CONTENT_TYPE,
            metrics::text::to_prometheus_text(&text),
        ),
        Ok(Err(e)) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            format!("{}\n", error_chain(&e)),
        ),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            TEXT,
            format!("encoding metrics: {e}\n"),
        ),
    }
}

fn health(state: &AdminState) -> (StatusCode, String) {
    if state.running.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n".into())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the sync loop has stopped\n".into(),
        )
    }
}

/// Ready once a pass has reached the kernel, the latest pass did too, and
/// the source is current (in Kubernetes mode: the API server answers and
/// every watch is up).
pub fn readiness(status: &Status) -> (StatusCode, String) {
    if let Some(why) = &status.degraded {
        let state = if status.applied == 0 {
            "no policy applied yet"
        } else {
            "enforcing the last applied state"
        };
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{why} ({state})\n"),
        );
    }
    match (&status.pass_error, status.applied) {
        (Some(e), 0) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no policy applied yet: {e}\n"),
        ),
        (None, 0) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "no policy applied yet\n".into(),
        ),
        (Some(e), _) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the latest pass did not reach the kernel (the previous policy stays enforced): {e}\n"),
        ),
        (None, _) => (StatusCode::OK, "ready\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addr_parses_addresses_and_none() {
        assert_eq!(
            "127.0.0.1:9964".parse::<ListenAddr>().unwrap(),
            ListenAddr(Some("127.0.0.1:9964".parse().unwrap()))
        );
        assert_eq!("none".parse::<ListenAddr>().unwrap(), ListenAddr(None));
        let e = "localhost".parse::<ListenAddr>().unwrap_err();
        assert!(e.to_string().contains("\"localhost\""), "{e}");
    }

    /// A blocking HTTP/1.1 GET: (status, body).
    fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (head[9..12].parse().unwrap(), body.to_string())
    }

    #[test]
    fn endpoints_answer_on_the_bound_port_and_stop_with_the_server() {
        let (tx, rx) = watch::channel(Status::default());
        let running = Arc::new(AtomicBool::new(true));
        let server = serve(
            "127.0.0.1:0".parse().unwrap(),
            AdminState {
                metrics: Arc::new(Metrics::new()),
                status: rx,
                running: running.clone(),
                // No kernel here: /metrics still serves what it knows.
                pin_dir: PathBuf::from("/nonexistent/portcullis-admin-test"),
            },
        )
        .unwrap();
        let addr = server.addr();
        assert_ne!(addr.port(), 0);
        let (code, body) = get(addr, "/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("portcullis_build_info{"), "{body}");
        assert_eq!(get(addr, "/healthz"), (200, "ok\n".into()));
        assert_eq!(get(addr, "/readyz").0, 503);
        tx.send_modify(|s| s.applied = 1);
        assert_eq!(get(addr, "/readyz"), (200, "ready\n".into()));
        running.store(false, Ordering::Relaxed);
        assert_eq!(get(addr, "/healthz").0, 503);
        assert_eq!(get(addr, "/other").0, 404);
        server.stop();
        // Refused once the listener is closed. A process another test forks
        // at that moment holds a copy of the socket until it execs, so allow
        // a moment, but never a listener that stays.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "something still listens on {addr} 5 s after stop"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn readiness_needs_an_applied_pass_and_a_clean_latest_pass() {
        let mut s = Status::default();
        assert_eq!(readiness(&s).0, StatusCode::SERVICE_UNAVAILABLE);
        s.applied = 1;
        assert_eq!(readiness(&s), (StatusCode::OK, "ready\n".into()));
        s.pass_error = Some("writing the kernel maps: map full".into());
        let (code, body) = readiness(&s);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("map full"), "{body}");
    }

    #[test]
    fn a_degraded_source_is_not_ready_and_says_enforcement_continues() {
        let s = Status {
            applied: 3,
            degraded: Some("API server unreachable: connection refused".into()),
            ..Default::default()
        };
        let (code, body) = readiness(&s);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("connection refused") && body.contains("last applied state"),
            "{body}"
        );
    }
}
