//! The remote issuer against a stand-in CA: a hyper server over rustls with
//! a serving certificate from a real CA directory, answering as the wire
//! format says.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, service::service_fn, Response};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::*;
use crate::identity::{
    authority::{chain_from_pem, CaDir},
    issuer::FailureReason,
    wire::RefusalReason,
};

#[derive(Clone, Copy)]
enum Mode {
    Grant,
    Refuse(RefusalReason),
    Garbage,
}

struct StandIn {
    mode: Mode,
    /// The bearer tokens seen, in order.
    tokens: Vec<String>,
}

use crate::identity::test_support::{csr, web};

/// Serves on 127.0.0.1 with a certificate of `ca`'s active issuer.
async fn serve(ca: &CaDir, state: Arc<Mutex<StandIn>>) -> SocketAddr {
    let authority = Arc::new(ca.authority().unwrap());
    let (issued, key) = authority
        .serving_certificate(&["127.0.0.1".into()], Duration::from_secs(3600))
        .unwrap();
    let chain: Vec<CertificateDer<'static>> = chain_from_pem(&issued.chain_pem.concat()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let (state, authority) = (state.clone(), authority.clone());
            let service = service_fn(move |req: hyper::Request<Incoming>| {
                let (state, authority) = (state.clone(), authority.clone());
                async move {
                    let token = req
                        .headers()
                        .get(AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "))
                        .unwrap_or_default()
                        .to_string();
                    assert_eq!(req.uri().path(), "/prefix/v1/certificates");
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mode = {
                        let mut s = state.lock().unwrap();
                        s.tokens.push(token);
                        s.mode
                    };
                    let (status, json) = match mode {
                        Mode::Grant => {
                            let r: IssueRequest = serde_json::from_slice(&body).unwrap();
                            let id =
                                SpiffeId::new("cluster.local", &r.namespace, &r.service_account)
                                    .unwrap();
                            let issued = authority
                                .issue(&id, &r.csr, Duration::from_secs(60), SystemTime::now())
                                .unwrap();
                            let answer = IssueResponse {
                                certificate_chain: issued.chain_pem,
                                trust_bundle: authority.bundle().pem_blocks(),
                            };
                            (200, serde_json::to_vec(&answer).unwrap())
                        }
                        Mode::Refuse(reason) => (
                            reason.http_status(),
                            serde_json::to_vec(&Refusal {
                                reason,
                                message: "no pod of shop/web on node n1".into(),
                            })
                            .unwrap(),
                        ),
                        Mode::Garbage => (200, b"{\"certificateChain\": 1}".to_vec()),
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(json)))
                            .unwrap(),
                    )
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

struct Setup {
    _dir: tempfile::TempDir,
    token_file: PathBuf,
    bundle: watch::Sender<Option<TrustBundle>>,
    state: Arc<Mutex<StandIn>>,
    issuer: RemoteIssuer,
    ca: CaDir,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = CaDir::init(dir.path().join("ca"), "r1").unwrap();
    let state = Arc::new(Mutex::new(StandIn {
        mode: Mode::Grant,
        tokens: Vec::new(),
    }));
    let addr = serve(&ca, state.clone()).await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "token-1\n").unwrap();
    let (bundle, rx) = watch::channel(Some(ca.bundle().unwrap()));
    let issuer = RemoteIssuer::new(
        &format!("https://{addr}/prefix/"),
        token_file.clone(),
        rx,
        "test bundle".into(),
        Duration::from_secs(5),
    )
    .unwrap();
    Setup {
        _dir: dir,
        token_file,
        bundle,
        state,
        issuer,
        ca,
    }
}

#[tokio::test]
async fn a_grant_carries_the_chain_and_the_token_is_read_at_every_request() {
    let s = setup().await;
    let granted = s.issuer.issue(&web(), &csr()).await.unwrap();
    let chain = chain_from_pem(&granted.chain_pem.concat()).unwrap();
    let info = granted
        .bundle
        .verify(&chain, "cluster.local", SystemTime::now())
        .unwrap();
    assert_eq!(info.spiffe_id, Some(web()));
    assert_eq!(granted.bundle, s.ca.bundle().unwrap());
    std::fs::write(&s.token_file, "token-2").unwrap();
    s.issuer.issue(&web(), &csr()).await.unwrap();
    assert_eq!(s.state.lock().unwrap().tokens, ["token-1", "token-2"]);
}

#[tokio::test]
async fn a_refusal_maps_to_its_reason_and_garbage_is_an_invalid_response() {
    let s = setup().await;
    s.state.lock().unwrap().mode = Mode::Refuse(RefusalReason::NoPodOnNode);
    let e = s.issuer.issue(&web(), &csr()).await.unwrap_err();
    assert_eq!(
        e.reason(),
        FailureReason::Refused(RefusalReason::NoPodOnNode),
        "{e}"
    );
    assert!(
        e.to_string().contains("no pod of shop/web on node n1"),
        "{e}"
    );
    s.state.lock().unwrap().mode = Mode::Garbage;
    let e = s.issuer.issue(&web(), &csr()).await.unwrap_err();
    assert_eq!(e.reason(), FailureReason::InvalidResponse, "{e}");
}

#[tokio::test]
async fn a_ca_outside_the_bundle_is_not_trusted_and_no_bundle_refuses_to_ask() {
    let s = setup().await;
    let other = tempfile::tempdir().unwrap();
    let other = CaDir::init(other.path(), "other").unwrap();
    s.bundle.send_replace(Some(other.bundle().unwrap()));
    let e = s.issuer.issue(&web(), &csr()).await.unwrap_err();
    assert_eq!(e.reason(), FailureReason::UntrustedCa, "{e}");
    assert!(
        s.state.lock().unwrap().tokens.is_empty(),
        "no token was sent"
    );
    s.bundle.send_replace(None);
    let e = s.issuer.issue(&web(), &csr()).await.unwrap_err();
    assert_eq!(e.reason(), FailureReason::NoTrustBundle, "{e}");
    assert!(e.to_string().contains("test bundle"), "{e}");
    // A bundle holding both roots (a rotation's first step) trusts it again.
    let both = format!(
        "{}{}",
        s.ca.bundle().unwrap().to_pem(),
        other.bundle().unwrap().to_pem()
    );
    s.bundle
        .send_replace(Some(TrustBundle::from_pem(&both, "both").unwrap()));
    s.issuer.issue(&web(), &csr()).await.unwrap();
}

#[tokio::test]
async fn an_empty_token_a_closed_port_and_a_silent_ca_fail_with_their_reason() {
    let s = setup().await;
    std::fs::write(&s.token_file, "  \n").unwrap();
    let e = s.issuer.issue(&web(), &csr()).await.unwrap_err();
    assert_eq!(e.reason(), FailureReason::TokenUnreadable, "{e}");
    std::fs::write(&s.token_file, "t").unwrap();

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let (_tx, rx) = watch::channel(Some(s.ca.bundle().unwrap()));
    let issuer = |url: String, rx, timeout| {
        RemoteIssuer::new(&url, s.token_file.clone(), rx, "b".into(), timeout).unwrap()
    };
    let e = issuer(
        format!("https://127.0.0.1:{port}"),
        rx.clone(),
        Duration::from_secs(5),
    )
    .issue(&web(), &csr())
    .await
    .unwrap_err();
    assert_eq!(e.reason(), FailureReason::Unreachable, "{e}");

    // Accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            held.push(silent.accept().await.unwrap());
        }
    });
    let e = issuer(format!("https://{addr}"), rx, Duration::from_millis(300))
        .issue(&web(), &csr())
        .await
        .unwrap_err();
    assert_eq!(e.reason(), FailureReason::Timeout, "{e}");
    held.abort();
}

#[test]
fn only_https_urls_without_credentials_are_accepted() {
    let (_tx, rx) = watch::channel(None);
    for (url, needle) in [
        ("http://ca:8443", "https"),
        ("https://user:pw@ca", "credentials"),
        ("not a url", "not a URL"),
        ("https://ca/?x=1", "query"),
    ] {
        let e = RemoteIssuer::new(url, "t".into(), rx.clone(), "b".into(), DEFAULT_TIMEOUT)
            .err()
            .unwrap_or_else(|| panic!("{url} accepted"))
            .to_string();
        assert!(e.contains(needle), "{url}: {e}");
    }
    let ok = RemoteIssuer::new(
        "https://portcullis-ca.portcullis-system.svc",
        "t".into(),
        rx,
        "b".into(),
        DEFAULT_TIMEOUT,
    )
    .unwrap();
    assert_eq!(ok.port, 443);
    assert_eq!(ok.path, "/v1/certificates");
}
