//! The TLS side of HBONE: TLS 1.3 only, ALPN `h2` only, mutual
//! authentication, no session resumption (every connection is a full
//! handshake, so the current bundle and revocations judge it), and
//! `SSLKEYLOGFILE` honoured so captures can be decrypted.
//!
//! Configurations are made per connection: each carries the verifier that
//! records that handshake's verdict ([`PeerCheck`]) and the presenter that
//! picks the local certificate from the watch when the handshake asks.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
};

use rustls::{
    client::{ResolvesClientCert, Resumption},
    server::{ClientHello, NoServerSessionStorage, ResolvesServerCert},
    sign::CertifiedKey,
    AlertDescription, ClientConfig, KeyLog, KeyLogFile, ServerConfig, SignatureScheme,
};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::watch,
};
use tokio_rustls::{client, server, TlsAcceptor, TlsConnector};
use tracing::warn;

use super::{
    verify::{provider, ClientVerifier, PeerCheck, PeerError, ServerVerifier},
    HboneError, LocalIdentity, PeerInfo, TrustInputs, ALPN_H2, HANDSHAKE_TIMEOUT,
};
use crate::identity::{
    manager::{credential::Credential, Certificates},
    spiffe::SpiffeId,
};

/// Picks the local identity's current certificate at each handshake and
/// remembers which one it presented.
pub(super) struct Presenter {
    id: SpiffeId,
    certificates: watch::Receiver<Certificates>,
    presented: Mutex<Option<Arc<Credential>>>,
}

impl std::fmt::Debug for Presenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presenter")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Presenter {
    pub(super) fn new(local: &LocalIdentity) -> Arc<Self> {
        Arc::new(Self {
            id: local.id.clone(),
            certificates: local.certificates.clone(),
            presented: Mutex::new(None),
        })
    }

    /// The certificate the identity has now, or why there is none.
    pub(super) fn current(&self) -> Result<Arc<Credential>, HboneError> {
        current(&self.id, &self.certificates)
    }

    /// What the last handshake presented.
    pub(super) fn presented(&self) -> Option<Arc<Credential>> {
        self.presented
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn resolve(&self) -> Option<Arc<CertifiedKey>> {
        let credential = self.current().ok()?;
        match credential.certified_key() {
            Ok(key) => {
                *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(credential);
                Some(key)
            }
            Err(e) => {
                warn!(spiffe_id = %self.id, serial = %credential.info.serial, "the certificate cannot be presented: {e}");
                None
            }
        }
    }
}

impl ResolvesClientCert for Presenter {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Presenter::resolve(self)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for Presenter {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Presenter::resolve(self)
    }
}

/// The current certificate of `id` in the watch.
pub(super) fn current(
    id: &SpiffeId,
    certificates: &watch::Receiver<Certificates>,
) -> Result<Arc<Credential>, HboneError> {
    certificates
        .borrow()
        .get(id)
        .cloned()
        .ok_or_else(|| HboneError::NoCertificate { id: id.clone() })
}

/// One key log for the process, opened on first use: rustls' `KeyLogFile`
/// writes nothing unless `SSLKEYLOGFILE` names a file.
fn key_log() -> Arc<dyn KeyLog> {
    static LOG: OnceLock<Arc<KeyLogFile>> = OnceLock::new();
    LOG.get_or_init(|| Arc::new(KeyLogFile::new())).clone()
}

/// A client configuration presenting `presenter`'s identity and judging the
/// server with `check`.
pub(super) fn client_config(
    presenter: Arc<Presenter>,
    check: Arc<PeerCheck>,
) -> Result<ClientConfig, HboneError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| HboneError::TlsConfig { source })?
        .dangerous()
        .with_custom_certificate_verifier(ServerVerifier::new(check))
        .with_client_cert_resolver(presenter);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    config.key_log = key_log();
    Ok(config)
}

/// A server configuration presenting `presenter`'s identity and requiring a
/// client certificate judged by `check`.
pub(super) fn server_config(
    presenter: Arc<Presenter>,
    check: Arc<PeerCheck>,
) -> Result<ServerConfig, HboneError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| HboneError::TlsConfig { source })?
        .with_client_cert_verifier(ClientVerifier::new(check))
        .with_cert_resolver(presenter);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.key_log = key_log();
    Ok(config)
}

/// The client handshake over `tcp` to `peer`; `expected` is the identity the
/// server must have, if the caller knows it.
pub(super) async fn connect(
    tcp: TcpStream,
    peer: SocketAddr,
    presenter: Arc<Presenter>,
    trust: &TrustInputs,
    expected: Option<SpiffeId>,
) -> Result<(AlertWitness<client::TlsStream<TcpStream>>, PeerInfo), HboneError> {
    let check = PeerCheck::new(trust.clone(), expected);
    let config = client_config(presenter, check.clone())?;
    let connector = TlsConnector::from(Arc::new(config));
    // The name is not checked (see verify); an IP name also sends no SNI.
    let name = ServerName::IpAddress(peer.ip().into());
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await;
    let tls = finish(peer, handshake, &check)?;
    let info = verdict(peer, &check)?;
    check_alpn(peer, tls.get_ref().1.alpn_protocol())?;
    let tls = AlertWitness {
        inner: tls,
        seen: Alerts::default(),
    };
    Ok((tls, info))
}

/// The server handshake of a connection from `from`.
pub(super) async fn accept(
    tcp: TcpStream,
    from: SocketAddr,
    presenter: Arc<Presenter>,
    trust: &TrustInputs,
) -> Result<(server::TlsStream<TcpStream>, PeerInfo), HboneError> {
    let check = PeerCheck::new(trust.clone(), None);
    let config = server_config(presenter, check.clone())?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
    let tls = finish(from, handshake, &check)?;
    let info = verdict(from, &check)?;
    check_alpn(from, tls.get_ref().1.alpn_protocol())?;
    Ok((tls, info))
}

/// A failed handshake, explained by the verifier's verdict when it has one.
fn finish<S>(
    peer: SocketAddr,
    handshake: Result<io::Result<S>, tokio::time::error::Elapsed>,
    check: &PeerCheck,
) -> Result<S, HboneError> {
    let source = match handshake {
        Ok(Ok(tls)) => return Ok(tls),
        Ok(Err(source)) => source,
        Err(_) => {
            return Err(HboneError::HandshakeTimeout {
                peer,
                after: HANDSHAKE_TIMEOUT,
            })
        }
    };
    if let Some(Err(source)) = check.verdict() {
        return Err(HboneError::Peer { peer, source });
    }
    match rustls_error(&source) {
        Some(rustls::Error::NoApplicationProtocol) => Err(HboneError::Alpn {
            peer,
            negotiated: None,
        }),
        Some(rustls::Error::NoCertificatesPresented) => Err(HboneError::Peer {
            peer,
            source: PeerError::NoCertificate,
        }),
        Some(rustls::Error::AlertReceived(alert)) => Err(HboneError::RefusedByPeer {
            peer,
            alert: *alert,
        }),
        _ => Err(HboneError::TlsHandshake { peer, source }),
    }
}

fn verdict(peer: SocketAddr, check: &PeerCheck) -> Result<PeerInfo, HboneError> {
    match check.verdict() {
        Some(Ok(info)) => Ok(info),
        Some(Err(source)) => Err(HboneError::Peer { peer, source }),
        // A completed mutual handshake always ran the verifier.
        None => Err(HboneError::Peer {
            peer,
            source: PeerError::NoCertificate,
        }),
    }
}

fn check_alpn(peer: SocketAddr, negotiated: Option<&[u8]>) -> Result<(), HboneError> {
    match negotiated {
        Some(ALPN_H2) => Ok(()),
        other => Err(HboneError::Alpn {
            peer,
            negotiated: other.map(|p| String::from_utf8_lossy(p).into_owned()),
        }),
    }
}

/// The rustls error inside an I/O error, if it is one.
pub(super) fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// The client's TLS stream, remembering a fatal alert from the server:
/// HTTP/2 keeps only the text of I/O errors, and in TLS 1.3 the server's
/// refusal of our certificate arrives as an alert after the handshake.
pub(super) struct AlertWitness<S> {
    inner: S,
    seen: Alerts,
}

/// The alert an [`AlertWitness`] saw, if any.
#[derive(Clone, Default)]
pub(super) struct Alerts(Arc<Mutex<Option<AlertDescription>>>);

impl Alerts {
    pub(super) fn get(&self) -> Option<AlertDescription> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn witness<T>(&self, polled: &Poll<io::Result<T>>) {
        if let Poll::Ready(Err(e)) = polled {
            if let Some(rustls::Error::AlertReceived(alert)) = rustls_error(e) {
                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(*alert);
            }
        }
    }
}

impl<S> AlertWitness<S> {
    pub(super) fn alerts(&self) -> Alerts {
        self.seen.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AlertWitness<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.seen.witness(&polled);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AlertWitness<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.seen.witness(&polled);
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
