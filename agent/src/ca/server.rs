//! `portcullis ca serve`: HTTPS (hyper HTTP/1.1 over tokio-rustls, as the
//! admin endpoint), one route that signs, `POST /v1/certificates`
//! ([`crate::identity::wire`]), plus `GET /healthz`, `/readyz` and
//! `/metrics` for the kubelet and Prometheus.
//!
//! A request is granted only when every step agrees, in this order, and
//! each refusal carries the reason agents count:
//! 1. the body is at most [`MAX_REQUEST_BYTES`] of JSON naming a valid
//!    identity (`bad_request`);
//! 2. the token is an agent's, bound to a pod, on a node, and a pod of the
//!    requested service account is scheduled there ([`authorize`]);
//! 3. the identity is not revoked, and the revocations are known: unknown
//!    fails closed (`revoked`, `revocation_unknown`);
//! 4. the request's key is ECDSA P-256 and its signature proves possession
//!    (`bad_request`); the active issuer signs.
//!
//! Beside the requests, one loop keeps the serving certificate and the
//! published trust bundle in step with the key material.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::{Bytes, Incoming},
    header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use kube::Client;
use rustls::ServerConfig;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{
    authorize::{bearer_token, Authorizer, ServiceAccountRef},
    keys::{self, CaFilesRx, KeySource, KeysError},
    metrics::CaMetrics,
    publish::BundlePublisher,
    serving::ServingCert,
};
use crate::{
    identity::{
        authority::{AuthorityError, DEFAULT_LEAF_LIFETIME},
        kube_watch::{self, BUNDLE_CONFIGMAP, DEFAULT_REVOCATION_STALENESS},
        revocation::{RevocationStatus, RevocationView},
        spiffe::{SpiffeId, DEFAULT_TRUST_DOMAIN},
        wire::{
            IssueRequest, IssueResponse, Refusal, RefusalReason, DEFAULT_AUDIENCE, ISSUE_PATH,
            MAX_REQUEST_BYTES,
        },
    },
    source::file::error_chain,
};

/// A client that opens a connection and never finishes a handshake, its
/// headers or its body must not hold it forever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("binding the CA endpoint to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up TLS for the CA endpoint")]
    Tls(#[source] rustls::Error),
    #[error("the CA key material")]
    Keys(#[source] KeysError),
}

/// A `namespace/name` object the CA reads or writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Everything `ca serve` is configured with. The leaf lifetime is taken
/// as given (the CLI checks it against 10 min..24 h; tests use seconds).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub keys: KeySource,
    pub trust_domain: String,
    pub leaf_lifetime: Duration,
    pub agent_service_account: ServiceAccountRef,
    pub audience: String,
    pub serving_names: Vec<String>,
    /// Where the trust bundle is published; `None` publishes nothing.
    pub bundle_configmap: Option<ObjectName>,
    pub revocation_staleness: Duration,
    /// Bound on each API call made for a request.
    pub api_timeout: Duration,
    /// How often the key material is re-read for a changed bundle or
    /// issuer when nothing signals a change (a `--dir` edited in place).
    pub refresh_interval: Duration,
}

impl ServeOptions {
    /// The defaults of `portcullis ca serve`, with keys from `keys`.
    pub fn new(keys: KeySource) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            keys,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
            leaf_lifetime: DEFAULT_LEAF_LIFETIME,
            agent_service_account: ServiceAccountRef {
                namespace: "portcullis-system".into(),
                name: "portcullis-agent".into(),
            },
            audience: DEFAULT_AUDIENCE.into(),
            serving_names: default_serving_names(),
            bundle_configmap: Some(ObjectName {
                namespace: "portcullis-system".into(),
                name: BUNDLE_CONFIGMAP.into(),
            }),
            revocation_staleness: DEFAULT_REVOCATION_STALENESS,
            api_timeout: Duration::from_secs(5),
            refresh_interval: Duration::from_secs(2),
        }
    }
}

/// The Service's names in the default namespace.
pub fn default_serving_names() -> Vec<String> {
    vec![
        "portcullis-ca.portcullis-system.svc".into(),
        "portcullis-ca.portcullis-system.svc.cluster.local".into(),
    ]
}

/// What every request reads.
struct Shared {
    trust_domain: String,
    leaf_lifetime: Duration,
    authorizer: Authorizer,
    keys: CaFilesRx,
    keys_origin: String,
    revocations: watch::Receiver<RevocationView>,
    serving: Arc<ServingCert>,
    metrics: Arc<CaMetrics>,
}

/// A running CA; its tasks stop when it is dropped.
pub struct CaServer {
    addr: SocketAddr,
    revocations: watch::Receiver<RevocationView>,
    serving: Arc<ServingCert>,
    metrics: Arc<CaMetrics>,
    tasks: Vec<JoinHandle<()>>,
}

impl CaServer {
    /// Binds, starts reading keys and revocations, and serves. Requests
    /// are refused (`unavailable`) until key material is loaded, and
    /// handshakes fail until the first serving certificate is made.
    pub async fn start(options: ServeOptions, client: Client) -> Result<Self, ServeError> {
        let bind = |source| ServeError::Bind {
            addr: options.listen,
            source,
        };
        let listener = TcpListener::bind(options.listen).await.map_err(bind)?;
        let addr = listener.local_addr().map_err(bind)?;
        let serving = Arc::new(ServingCert::default());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ServeError::Tls)?
            .with_no_client_auth()
            .with_cert_resolver(serving.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let (keys, keys_task) =
            keys::start(&options.keys, client.clone()).map_err(ServeError::Keys)?;
        let (revocations, revocations_task) =
            kube_watch::watch_revocations(client.clone(), options.revocation_staleness);
        let metrics = Arc::new(CaMetrics::new());
        let keys_origin = match &options.keys {
            KeySource::Dir(d) => d.display().to_string(),
            KeySource::Secret {
                namespace, name, ..
            } => format!("Secret {namespace}/{name}"),
        };
        let publisher = options
            .bundle_configmap
            .as_ref()
            .map(|c| BundlePublisher::new(client.clone(), &c.namespace, &c.name));
        let maintain_task = tokio::spawn(maintain(
            keys.clone(),
            serving.clone(),
            options.serving_names.clone(),
            publisher,
            metrics.clone(),
            options.refresh_interval,
        ));
        let shared = Arc::new(Shared {
            trust_domain: options.trust_domain,
            leaf_lifetime: options.leaf_lifetime,
            authorizer: Authorizer {
                client,
                agent: options.agent_service_account,
                audience: options.audience,
                timeout: options.api_timeout,
            },
            keys,
            keys_origin,
            revocations: revocations.clone(),
            serving: serving.clone(),
            metrics: metrics.clone(),
        });
        let accept_task = tokio::spawn(accept_loop(listener, acceptor, shared));
        Ok(Self {
            addr,
            revocations,
            serving,
            metrics,
            tasks: vec![accept_task, maintain_task, keys_task, revocations_task],
        })
    }

    /// The bound address (the actual port when asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The serving certificate now presented, once there is one.
    pub fn serving_certificate(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.serving.certificate()
    }

    /// Are the revocations known (listed and not stale)? Until they are,
    /// every request is refused with `revocation_unknown`.
    pub fn revocations_known(&self) -> bool {
        matches!(*self.revocations.borrow(), RevocationView::Known(_))
    }

    pub fn metrics(&self) -> &CaMetrics {
        &self.metrics
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                debug!("CA endpoint: accept: {e}");
                // Out of descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(IO_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return debug!(%peer, "CA endpoint: TLS handshake: {e}"),
                Err(_) => return debug!(%peer, "CA endpoint: TLS handshake timed out"),
            };
            let service = service_fn(move |req| respond(shared.clone(), peer, req));
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IO_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await
            {
                debug!(%peer, "CA endpoint: {e}");
            }
        });
    }
}

type Answer = Response<Full<Bytes>>;

fn reply(code: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = code;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const JSON: &str = "application/json";
const TEXT: &str = "text/plain; charset=utf-8";

async fn respond(
    shared: Arc<Shared>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Answer, Infallible> {
    let method = req.method().clone();
    Ok(match (req.uri().path(), method) {
        (ISSUE_PATH, Method::POST) => issue(&shared, peer, req).await,
        (ISSUE_PATH, _) => reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "only POST\n"),
        ("/healthz", Method::GET) => reply(StatusCode::OK, TEXT, "ok\n"),
        ("/readyz", Method::GET) => match readiness(&shared) {
            Ok(()) => reply(StatusCode::OK, TEXT, "ok\n"),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
        },
        ("/metrics", Method::GET) => match shared.metrics.encode() {
            Ok(text) => reply(StatusCode::OK, crate::metrics::CONTENT_TYPE, text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                TEXT,
                format!("{}\n", error_chain(&e)),
            ),
        },
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            format!("not found; certificates are requested with POST {ISSUE_PATH}\n"),
        ),
    })
}

/// Ready when it can sign: key material loaded and a serving certificate
/// made from it.
fn readiness(shared: &Shared) -> Result<(), String> {
    if shared.keys.borrow().is_none() {
        return Err(format!(
            "the CA key material ({}) is not loaded yet",
            shared.keys_origin
        ));
    }
    if shared.serving.certificate().is_none() {
        return Err("no serving certificate yet".into());
    }
    Ok(())
}

/// A refusal on its way to the caller, the log and the metrics.
struct Refused {
    reason: RefusalReason,
    message: String,
}

impl Refused {
    fn new(reason: RefusalReason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

async fn issue(shared: &Shared, peer: SocketAddr, req: Request<Incoming>) -> Answer {
    let mut requested: Option<String> = None;
    let mut node: Option<String> = None;
    let outcome = decide(shared, req, &mut requested, &mut node).await;
    let identity = requested.as_deref().unwrap_or("-");
    let node = node.as_deref().unwrap_or("-");
    match outcome {
        Ok((response, serial)) => {
            shared.metrics.issued();
            info!(%peer, identity, node, serial, "certificate granted");
            reply(
                StatusCode::OK,
                JSON,
                serde_json::to_vec(&response).unwrap_or_default(),
            )
        }
        Err(refused) => {
            shared.metrics.refused(refused.reason);
            warn!(
                %peer, identity, node, reason = refused.reason.as_str(),
                "certificate refused: {}", refused.message
            );
            let status =
                StatusCode::from_u16(refused.reason.http_status()).unwrap_or(StatusCode::FORBIDDEN);
            let body = Refusal {
                reason: refused.reason,
                message: refused.message,
            };
            let mut r = reply(status, JSON, serde_json::to_vec(&body).unwrap_or_default());
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"portcullis-ca\""),
                );
            }
            r
        }
    }
}

/// The steps of the module documentation; `requested` and `node` are
/// filled in as they become known, for the log line.
async fn decide(
    shared: &Shared,
    req: Request<Incoming>,
    requested: &mut Option<String>,
    node: &mut Option<String>,
) -> Result<(IssueResponse, String), Refused> {
    let bad = |m: String| Refused::new(RefusalReason::BadRequest, m);
    let authorization = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = Limited::new(req.into_body(), MAX_REQUEST_BYTES).collect();
    let body = match tokio::time::timeout(IO_TIMEOUT, body).await {
        Ok(Ok(body)) => body.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(bad(format!(
                "the request body is larger than {MAX_REQUEST_BYTES} bytes"
            )))
        }
        Ok(Err(e)) => return Err(bad(format!("reading the request body: {e}"))),
        Err(_) => return Err(bad(format!("the request body took over {IO_TIMEOUT:?}"))),
    };
    let request: IssueRequest = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("the body is not an IssueRequest: {e}")))?;
    *requested = Some(format!("{}/{}", request.namespace, request.service_account));
    let id = SpiffeId::new(
        &shared.trust_domain,
        &request.namespace,
        &request.service_account,
    )
    .map_err(|e| bad(e.to_string()))?;
    *requested = Some(id.to_string());

    let refuse = |e: super::authorize::AuthorizeError| Refused::new(e.reason(), error_chain(&e));
    let caller = shared
        .authorizer
        .authenticate(bearer_token(authorization.as_deref()))
        .await
        .map_err(refuse)?;
    *node = Some(caller.node.clone());
    shared
        .authorizer
        .pod_on_node(id.namespace(), id.service_account(), &caller.node)
        .await
        .map_err(refuse)?;

    let status = shared.revocations.borrow().check(&id, None);
    match status {
        RevocationStatus::Good => {}
        RevocationStatus::Revoked { what, reason } => {
            let why = if reason.is_empty() {
                String::new()
            } else {
                format!(" ({reason})")
            };
            return Err(Refused::new(
                RefusalReason::Revoked,
                format!("{what} is revoked{why}"),
            ));
        }
        RevocationStatus::Unknown { why } => {
            return Err(Refused::new(
                RefusalReason::RevocationUnknown,
                format!("the CA does not know the current revocations ({why}); it issues nothing until it does"),
            ))
        }
    }

    let files = shared.keys.borrow().clone().ok_or_else(|| {
        Refused::new(
            RefusalReason::Unavailable,
            format!(
                "the CA key material ({}) is not loaded yet",
                shared.keys_origin
            ),
        )
    })?;
    let unavailable = |e: AuthorityError| Refused::new(RefusalReason::Unavailable, error_chain(&e));
    let authority = files.dir.authority().map_err(unavailable)?;
    let issued = authority
        .issue(&id, &request.csr, shared.leaf_lifetime, SystemTime::now())
        .map_err(|e| match e {
            AuthorityError::Request(_) | AuthorityError::KeyAlgorithm => bad(error_chain(&e)),
            other => unavailable(other),
        })?;
    Ok((
        IssueResponse {
            certificate_chain: issued.chain_pem,
            trust_bundle: authority.bundle().pem_blocks(),
        },
        issued.info.serial,
    ))
}

/// Every this many rounds the ConfigMap is read again (not only trusted
/// from memory).
const RECHECK_ROUNDS: u32 = 30;

/// Keeps the serving certificate and the published bundle in step with
/// the key material: on every change of it, and every `interval` (a
/// directory edited in place signals nothing).
async fn maintain(
    mut keys: CaFilesRx,
    serving: Arc<ServingCert>,
    names: Vec<String>,
    mut publisher: Option<BundlePublisher>,
    metrics: Arc<CaMetrics>,
    interval: Duration,
) {
    // Each problem is logged when it first appears, not every interval.
    let mut last_problem: Option<String> = None;
    let mut report = |problem: Option<String>| {
        if let Some(p) = &problem {
            if last_problem.as_ref() != Some(p) {
                warn!("{p}");
            }
        }
        last_problem = problem;
    };
    let mut rounds: u32 = 0;
    loop {
        rounds = rounds.wrapping_add(1);
        if rounds.is_multiple_of(RECHECK_ROUNDS) {
            if let Some(p) = publisher.as_mut() {
                p.forget();
            }
        }
        let files = keys.borrow_and_update().clone();
        if let Some(files) = files {
            let mut problem = None;
            match files.dir.authority() {
                Ok(authority) => {
                    if serving.due(&authority, SystemTime::now()) {
                        match serving.renew(&authority, &names) {
                            Ok(()) => info!(
                                issuer = authority.issuer_name(),
                                names = ?names,
                                "serving certificate renewed"
                            ),
                            Err(e) => problem = Some(error_chain(&e)),
                        }
                    }
                    if let Some(p) = publisher.as_mut() {
                        let roots = authority.bundle().roots().len();
                        match p.publish(authority.bundle()).await {
                            Ok(written) => {
                                metrics.set_bundle_roots(roots);
                                if written {
                                    info!(roots, "trust bundle published");
                                }
                            }
                            Err(e) => problem = Some(error_chain(&e)),
                        }
                    }
                }
                Err(e) => problem = Some(format!("{}: {}", files.origin, error_chain(&e))),
            }
            report(problem);
        }
        tokio::select! {
            changed = keys.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(interval).await;
                }
            }
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
