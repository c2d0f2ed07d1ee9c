//! The remote CA (`--ca-url`): one HTTPS connection per issuance (they are
//! minutes apart), hyper's HTTP/1.1 client over tokio-rustls.
//!
//! - The CA's serving certificate is verified against the trust bundle as
//!   it is *now* (the bundle file or ConfigMap, watched), so a root
//!   rotation reaches this client without a restart.
//! - The token file is read at every request: the kubelet rotates
//!   projected tokens in place.
//! - Everything (connect, TLS, request, answer) is bounded by one timeout.

use std::{path::PathBuf, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{
    body::Bytes,
    header::{AUTHORIZATION, CONTENT_TYPE, HOST},
    Request, StatusCode, Uri,
};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::sync::watch;

use super::{Granted, IssueError, Issuer};
use crate::identity::{
    bundle::TrustBundle,
    spiffe::SpiffeId,
    wire::{IssueRequest, IssueResponse, Refusal, ISSUE_PATH},
};

/// How long one issuance may take, connection included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers larger than this are not read (a chain and a bundle are a few KiB).
const MAX_RESPONSE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("CA URL {url:?}: {why}")]
    Url { url: String, why: String },
}

pub struct RemoteIssuer {
    url: String,
    host: String,
    port: u16,
    /// `host[:port]` as the URL names it, for the Host header.
    authority: String,
    path: String,
    server_name: ServerName<'static>,
    token_file: PathBuf,
    bundle: watch::Receiver<Option<TrustBundle>>,
    /// Where the bundle comes from, for errors while it is missing.
    bundle_from: String,
    timeout: Duration,
}

impl RemoteIssuer {
    /// `url` is `https://host[:port][/prefix]`; requests go to
    /// `<prefix>/v1/certificates`.
    pub fn new(
        url: &str,
        token_file: PathBuf,
        bundle: watch::Receiver<Option<TrustBundle>>,
        bundle_from: String,
        timeout: Duration,
    ) -> Result<Self, RemoteError> {
        let bad = |why: &str| RemoteError::Url {
            url: url.into(),
            why: why.into(),
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: hyper::http::uri::InvalidUri| bad(&format!("not a URL ({e})")))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("the CA is only spoken to over https://"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad(
                "credentials in the URL are not supported; use --ca-token-file",
            ));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not supported"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| bad(&format!("host {host:?}: {e}")))?;
        let prefix = uri.path().trim_end_matches('/');
        Ok(Self {
            url: url.into(),
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().into(),
            path: format!("{prefix}{ISSUE_PATH}"),
            host,
            server_name,
            token_file,
            bundle,
            bundle_from,
            timeout,
        })
    }

    async fn token(&self) -> Result<String, IssueError> {
        let text = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|source| IssueError::Token {
                path: self.token_file.clone(),
                source,
            })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(IssueError::EmptyToken {
                path: self.token_file.clone(),
            });
        }
        Ok(token.to_string())
    }

    async fn exchange(
        &self,
        bundle: &TrustBundle,
        token: &str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), IssueError> {
        let unreachable =
            |source: Box<dyn std::error::Error + Send + Sync>| IssueError::Unreachable {
                url: self.url.clone(),
                source,
            };
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| IssueError::Internal {
            what: "configuring TLS".into(),
            source: Box::new(e),
        })?
        .with_root_certificates(bundle.root_store())
        .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| unreachable(Box::new(e)))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| {
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| {
                        matches!(
                            r,
                            rustls::Error::InvalidCertificate(_)
                                | rustls::Error::NoCertificatesPresented
                        )
                    });
                if certificate {
                    IssueError::UntrustedCa {
                        url: self.url.clone(),
                        source: e,
                    }
                } else {
                    unreachable(Box::new(e))
                }
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(Box::new(e)))?;
        // Drives the connection; it ends with the exchange (or the timeout
        // dropping this future drops the sender, which closes it).
        tokio::spawn(connection);
        let request = Request::post(&self.path)
            .header(HOST, &self.authority)
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| IssueError::Internal {
                what: "building the request".into(),
                source: Box::new(e),
            })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(Box::new(e)))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| IssueError::InvalidResponse {
                why: format!("reading the body (at most {MAX_RESPONSE_BYTES} bytes): {e}"),
            })?
            .to_bytes();
        Ok((status, bytes))
    }
}

impl Issuer for RemoteIssuer {
    async fn issue(&self, id: &SpiffeId, csr_pem: &str) -> Result<Granted, IssueError> {
        let token = self.token().await?;
        let bundle = self
            .bundle
            .borrow()
            .clone()
            .ok_or_else(|| IssueError::NoTrustBundle {
                url: self.url.clone(),
                from: self.bundle_from.clone(),
            })?;
        let body = serde_json::to_vec(&IssueRequest {
            namespace: id.namespace().into(),
            service_account: id.service_account().into(),
            csr: csr_pem.into(),
        })
        .map_err(|e| IssueError::Internal {
            what: "encoding the request".into(),
            source: Box::new(e),
        })?;
        let (status, bytes) =
            tokio::time::timeout(self.timeout, self.exchange(&bundle, &token, body))
                .await
                .map_err(|_| IssueError::Timeout {
                    url: self.url.clone(),
                    timeout: self.timeout,
                })??;
        if status != StatusCode::OK {
            return match serde_json::from_slice::<Refusal>(&bytes) {
                Ok(refusal) => Err(IssueError::Refused {
                    reason: refusal.reason,
                    message: refusal.message,
                }),
                Err(e) => Err(IssueError::InvalidResponse {
                    why: format!("status {status} without a refusal ({e})"),
                }),
            };
        }
        let answer: IssueResponse =
            serde_json::from_slice(&bytes).map_err(|e| IssueError::InvalidResponse {
                why: format!("status 200, but not a certificate answer ({e})"),
            })?;
        // The answer's bundle must be readable; the roots trusted stay the
        // configured ones, which this connection was verified against.
        TrustBundle::from_pem(&answer.trust_bundle.concat(), "the CA's answer").map_err(|e| {
            IssueError::InvalidResponse {
                why: crate::source::file::error_chain(&e),
            }
        })?;
        Ok(Granted {
            chain_pem: answer.certificate_chain,
            bundle,
        })
    }

    fn describe(&self) -> String {
        format!("CA {}", self.url)
    }
}

#[cfg(test)]
mod tests;
