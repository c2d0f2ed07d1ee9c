//! The agent's admin HTTP endpoint: `/metrics` (OpenMetrics text, or the
//! Prometheus text format for clients that do not ask for OpenMetrics),
//! `/healthz` (the sync loop runs) and `/readyz` (policy reached the kernel).
//!
//! Two exposures. Plain HTTP, for standalone agents and the lab, which
//! listen on loopback. Secure, for the DaemonSet, whose port is on the pod
//! network and cannot be protected by policy (the agent's own pod is exempt
//! from enforcement): TLS, and `/metrics` only for a bearer token the API
//! server authenticates and authorizes ([`auth`]). `/healthz` and `/readyz`
//! stay open on the same TLS port for the kubelet's HTTPS probes (which do
//! not verify certificates): they reveal nothing, and one port means no
//! second listener on the pod network.
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

pub mod auth;
pub mod tls;

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{oneshot, watch},
};
use tracing::{debug, warn};

use self::{
    auth::{Decision, MetricsAuth},
    tls::{CertSource, TlsError},
};
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
    #[error("setting up TLS for the admin endpoint")]
    Tls {
        #[source]
        source: TlsError,
    },
    #[error("the secure admin endpoint authenticates callers with the Kubernetes API: it needs --kubernetes")]
    SecureNeedsKubernetes,
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

/// How the endpoint is exposed.
pub enum Exposure {
    /// Plain HTTP, everything open: for loopback (standalone, the lab).
    Plain,
    /// TLS; `/metrics` only for callers `auth` lets in.
    Secure {
        tls: tls::ServerTls,
        auth: Arc<MetricsAuth>,
    },
}

/// The secure mode as configured (the API client comes from the source).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecureOptions {
    pub cert: CertSource,
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
    certificate: Option<CertificateDer<'static>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl AdminServer {
    /// The bound address (the actual port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The certificate served in secure mode (what a client can pin).
    pub fn certificate(&self) -> Option<&CertificateDer<'static>> {
        self.certificate.as_ref()
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

/// Binds `addr` (errors are returned here, not logged later) and serves
/// plain HTTP.
pub fn serve(addr: SocketAddr, state: AdminState) -> Result<AdminServer, AdminError> {
    serve_with(addr, state, Exposure::Plain)
}

/// Binds `addr` and serves with the given exposure.
pub fn serve_with(
    addr: SocketAddr,
    state: AdminState,
    exposure: Exposure,
) -> Result<AdminServer, AdminError> {
    let bind = |source| AdminError::Bind { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| AdminError::Runtime { source })?;
    let (tx, rx) = oneshot::channel();
    let (certificate, guard) = match exposure {
        Exposure::Plain => (None, None),
        Exposure::Secure { tls, auth } => (
            Some(tls.certificate),
            Some(Guard {
                acceptor: tokio_rustls::TlsAcceptor::from(tls.config),
                auth,
            }),
        ),
    };
    let thread = thread::Builder::new()
        .name("portcullis-admin".into())
        .spawn(move || runtime.block_on(accept_loop(listener, state, guard, rx)))
        .map_err(|source| AdminError::Runtime { source })?;
    Ok(AdminServer {
        addr: bound,
        certificate,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

/// What secure mode adds to every connection and request.
#[derive(Clone)]
struct Guard {
    acceptor: tokio_rustls::TlsAcceptor,
    auth: Arc<MetricsAuth>,
}

/// A client that opens a connection and never finishes the handshake must
/// not hold it forever.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn accept_loop(
    listener: std::net::TcpListener,
    state: AdminState,
    guard: Option<Guard>,
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
                let guard = guard.clone();
                tokio::spawn(async move {
                    let Some(guard) = guard else {
                        return serve_connection(stream, state, None, peer).await;
                    };
                    let handshake = guard.acceptor.accept(stream);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(tls)) => serve_connection(tls, state, Some(guard.auth), peer).await,
                        Ok(Err(e)) => debug!(%peer, "admin endpoint: TLS handshake: {e}"),
                        Err(_) => debug!(%peer, "admin endpoint: TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

async fn serve_connection<I>(
    io: I,
    state: AdminState,
    auth: Option<Arc<MetricsAuth>>,
    peer: SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| respond(state.clone(), auth.clone(), req));
    if let Err(e) = http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await
    {
        debug!(%peer, "admin endpoint: {e}");
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
    auth: Option<Arc<MetricsAuth>>,
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
        auth::METRICS_PATH => {
            if let Some(auth) = auth {
                if let Some(refused) =
                    refusal(auth.authorize(req.headers().get(AUTHORIZATION)).await)
                {
                    return Ok(refused);
                }
            }
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

/// The answer to a caller secure mode does not let in; `None` to serve.
fn refusal(decision: Decision) -> Option<Response<Full<Bytes>>> {
    match decision {
        Decision::Allowed { user } => {
            debug!(%user, "admin endpoint: /metrics allowed");
            None
        }
        Decision::Unauthenticated { why } => {
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                TEXT,
                format!("unauthorized: {why}\n"),
            );
            r.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"portcullis\""),
            );
            Some(r)
        }
        Decision::Forbidden { user, why } => Some(reply(
            StatusCode::FORBIDDEN,
            TEXT,
            format!("forbidden: user {user:?} is {why}\n"),
        )),
        Decision::Unavailable(e) => {
            // Fail closed: no decision, no metrics.
            warn!(
                "admin endpoint: cannot authorize a /metrics request: {}",
                error_chain(&e)
            );
            Some(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                "cannot authorize the request now: the API server did not decide\n".into(),
            ))
        }
    }
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

    fn state() -> (AdminState, watch::Sender<Status>) {
        let (tx, rx) = watch::channel(Status::default());
        let state = AdminState {
            metrics: Arc::new(Metrics::new()),
            status: rx,
            running: Arc::new(AtomicBool::new(true)),
            pin_dir: PathBuf::from("/nonexistent/portcullis-admin-test"),
        };
        (state, tx)
    }

    /// A secure admin server whose API server follows `script`.
    fn secure_server(script: &auth::tests::Script) -> AdminServer {
        let tls = tls::server_tls(&CertSource::SelfSigned {
            names: vec!["localhost".into()],
        })
        .unwrap();
        let auth = MetricsAuth::new(script.client(), auth::AuthOptions::default());
        serve_with(
            "127.0.0.1:0".parse().unwrap(),
            state().0,
            Exposure::Secure {
                tls,
                auth: Arc::new(auth),
            },
        )
        .unwrap()
    }

    /// A TLS client that trusts exactly `pinned`.
    fn pinned_client(pinned: &CertificateDer<'static>) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pinned.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// An HTTPS GET over a verified connection: (status, head, body).
    async fn https_get(
        connector: &tokio_rustls::TlsConnector,
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
    ) -> std::io::Result<(u16, String, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut raw = Vec::new();
        tls.read_to_end(&mut raw).await?;
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        Ok((
            head[9..12].parse().unwrap(),
            head.to_string(),
            body.to_string(),
        ))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn secure_mode_serves_metrics_over_tls_only_to_authorized_callers() {
        let script = auth::tests::Script::new();
        let server = secure_server(&script);
        let addr = server.addr();
        let client = pinned_client(server.certificate().expect("secure mode has a certificate"));

        let (code, _, body) = https_get(&client, addr, "/metrics", Some("prom-token"))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("portcullis_build_info{"), "{body}");

        let (code, head, body) = https_get(&client, addr, "/metrics", None).await.unwrap();
        assert_eq!(code, 401, "{body}");
        assert!(
            head.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{head}"
        );
        assert!(!body.contains("portcullis_"), "{body}");

        let (code, _, body) = https_get(&client, addr, "/metrics", Some("not-a-token"))
            .await
            .unwrap();
        assert_eq!(code, 401, "{body}");

        let (code, _, body) = https_get(&client, addr, "/metrics", Some("other-token"))
            .await
            .unwrap();
        assert_eq!(code, 403, "{body}");
        assert!(body.contains("system:serviceaccount:shop:web"), "{body}");
        assert!(!body.contains("portcullis_"), "{body}");

        // The kubelet's probes need no token.
        let (code, _, body) = https_get(&client, addr, "/healthz", None).await.unwrap();
        assert_eq!((code, body.as_str()), (200, "ok\n"));
        assert_eq!(
            https_get(&client, addr, "/readyz", None).await.unwrap().0,
            503
        );

        // Repeated scrapes reuse the answer: 4 reviews for 3 tokens so far
        // (the rejected token needs no access review), none more now.
        let calls = script.calls();
        for _ in 0..5 {
            let (code, _, _) = https_get(&client, addr, "/metrics", Some("prom-token"))
                .await
                .unwrap();
            assert_eq!(code, 200);
        }
        assert_eq!(script.calls(), calls);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn secure_mode_speaks_no_plain_http_and_presents_only_its_own_certificate() {
        let script = auth::tests::Script::new();
        let server = secure_server(&script);
        let addr = server.addr();
        // Plain HTTP gets no metrics (and no answer a client could read).
        let plain = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
                .unwrap();
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut raw = Vec::new();
            let _ = s.read_to_end(&mut raw);
            String::from_utf8_lossy(&raw).into_owned()
        })
        .await
        .unwrap();
        assert!(
            !plain.contains("portcullis_") && !plain.contains("HTTP/1.1 200"),
            "{plain}"
        );
        // A client pinning another certificate refuses the server.
        let other = tls::server_tls(&CertSource::SelfSigned {
            names: vec!["localhost".into()],
        })
        .unwrap();
        let e = https_get(&pinned_client(&other.certificate), addr, "/healthz", None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("certificate"), "{e}");
        assert_eq!(script.calls(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn secure_mode_fails_closed_when_the_api_server_cannot_decide() {
        let mut script = auth::tests::Script::new();
        script.fail_with = Some(http::StatusCode::SERVICE_UNAVAILABLE);
        let server = secure_server(&script);
        let client = pinned_client(server.certificate().unwrap());
        let (code, _, body) = https_get(&client, server.addr(), "/metrics", Some("prom-token"))
            .await
            .unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(!body.contains("portcullis_"), "{body}");
        // Health stays readable through the outage.
        assert_eq!(
            https_get(&client, server.addr(), "/healthz", None)
                .await
                .unwrap()
                .0,
            200
        );
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
