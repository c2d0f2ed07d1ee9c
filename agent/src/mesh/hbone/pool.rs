//! The HBONE client: connections pooled per (source identity, peer
//! address), so a new TCP connection to a peer already connected becomes a
//! new HTTP/2 stream, not a new handshake.
//!
//! A pooled connection is used again only while it is open, the source
//! still has the certificate it presented (after a renewal new handshakes
//! present the new one), the peer's certificate is valid and not revoked,
//! and it has not been idle longer than the idle timeout. A connection
//! leaving the pool is not closed: its streams run to their end, renewal
//! never breaks a connection.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use futures::future::BoxFuture;
use http_body_util::Empty;
use hyper::{
    body::Bytes, client::conn::http2::SendRequest, header::FORWARDED, Method, Request, StatusCode,
    Version,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{
    forwarded,
    registry::{CloseSignal, Kind, Registration},
    stream::{HboneStream, Usage},
    tls::{self, Alerts, Presenter},
    HboneError, LocalIdentity, PeerError, PeerInfo, TrustInputs, TunnelRegistry,
};
use crate::identity::{manager::credential::Credential, spiffe::SpiffeId};

/// A pooled connection without streams for this long is closed.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The client side of HBONE.
pub struct HbonePool {
    trust: TrustInputs,
    registry: TunnelRegistry,
    idle_timeout: Duration,
    slots: Mutex<HashMap<PoolKey, Slot>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    source: SpiffeId,
    peer: SocketAddr,
}

/// One key's connection; its lock is held through a handshake so
/// concurrent opens to a new peer make one connection.
type Slot = Arc<tokio::sync::Mutex<Option<Pooled>>>;

#[derive(Clone)]
struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    peer: PeerInfo,
    /// The serial of the certificate the source presented.
    presented: Option<String>,
    usage: Arc<Usage>,
    closed: CloseSignal,
    ended: Arc<AtomicBool>,
    alerts: Alerts,
}

impl HbonePool {
    pub fn new(trust: TrustInputs, registry: TunnelRegistry) -> Self {
        Self {
            trust,
            registry,
            idle_timeout: POOL_IDLE_TIMEOUT,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Another idle timeout than [`POOL_IDLE_TIMEOUT`].
    pub fn with_idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.idle_timeout = idle_timeout;
        self
    }

    /// A tunnel from `source` to `target` through the agent at `peer`.
    /// `dial` makes the TCP connection to `peer` when a new one is needed.
    /// `expected`: if Some, the server's SPIFFE ID must equal it.
    pub async fn open(
        &self,
        source: &LocalIdentity,
        peer: SocketAddr,
        target: SocketAddr,
        forwarded_for: IpAddr,
        expected: Option<&SpiffeId>,
        dial: impl FnOnce() -> BoxFuture<'static, io::Result<TcpStream>>,
    ) -> Result<HboneStream, HboneError> {
        if self.trust.bundle.borrow().is_none() {
            return Err(HboneError::NoTrustBundle);
        }
        let presenter = Presenter::new(source);
        let current = presenter.current()?;
        let slot = self.slot(PoolKey {
            source: source.id.clone(),
            peer,
        });
        let mut held = slot.lock().await;
        if held.as_ref().is_some_and(|p| !self.usable(p, &current)) {
            debug!(%peer, source = %source.id, "pooled connection retired");
            *held = None;
        }
        if let Some(pooled) = held.clone() {
            drop(held);
            if let Some(expected) = expected.filter(|e| **e != pooled.peer.id) {
                return Err(HboneError::Peer {
                    peer,
                    source: PeerError::WrongPeer {
                        expected: Box::new(expected.clone()),
                        actual: Box::new(pooled.peer.id.clone()),
                    },
                });
            }
            return self.request(&pooled, target, forwarded_for, true).await;
        }
        let pooled = self.connect(presenter, peer, expected, dial).await?;
        let stream = self.request(&pooled, target, forwarded_for, false).await;
        // A refusal is an answer: the connection works.
        if matches!(&stream, Ok(_) | Err(HboneError::Refused { .. })) {
            *held = Some(pooled);
        }
        stream
    }

    /// Pooled connections (some may be closing).
    pub fn connections(&self) -> usize {
        self.lock()
            .values()
            .filter(|s| s.try_lock().map_or(true, |p| p.is_some()))
            .count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, key: PoolKey) -> Slot {
        let mut slots = self.lock();
        // Forget ended connections (a slot in use is kept).
        slots.retain(|_, s| {
            s.try_lock()
                .map_or(true, |p| p.as_ref().is_some_and(|p| !p.ended()))
        });
        slots.entry(key).or_default().clone()
    }

    fn usable(&self, pooled: &Pooled, current: &Credential) -> bool {
        let idle = pooled
            .usage
            .idle_since()
            .is_some_and(|since| since.elapsed() >= self.idle_timeout);
        !pooled.ended()
            && !idle
            && pooled.presented.as_deref() == Some(current.info.serial.as_str())
            && pooled.peer.not_after > SystemTime::now()
            && self
                .trust
                .revocations
                .borrow()
                .check(&pooled.peer.id, Some(&pooled.peer.serial))
                .is_good()
    }

    async fn connect(
        &self,
        presenter: Arc<Presenter>,
        peer: SocketAddr,
        expected: Option<&SpiffeId>,
        dial: impl FnOnce() -> BoxFuture<'static, io::Result<TcpStream>>,
    ) -> Result<Pooled, HboneError> {
        let tcp = dial()
            .await
            .map_err(|source| HboneError::Connect { peer, source })?;
        // Small writes (handshakes, interactive protocols) must not wait.
        let _ = tcp.set_nodelay(true);
        let (tls, info) =
            tls::connect(tcp, peer, presenter.clone(), &self.trust, expected.cloned()).await?;
        let alerts = tls.alerts();
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_frame_size(super::H2_MAX_FRAME)
            .initial_stream_window_size(super::H2_STREAM_WINDOW)
            .initial_connection_window_size(super::H2_CONNECTION_WINDOW)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tls))
            .await
            .map_err(|e| h2_error(peer, e, &alerts))?;
        let presented = presenter.presented().map(|c| c.info.serial.clone());
        info!(%peer, server = %info.id, serial = %info.serial, "HBONE connection established");
        let registration = self.registry.register(info.clone(), Kind::Connection);
        let pooled = Pooled {
            sender,
            addr: peer,
            peer: info,
            presented,
            usage: Usage::new(),
            closed: registration.signal().clone(),
            ended: Arc::new(AtomicBool::new(false)),
            alerts,
        };
        tokio::spawn(drive(
            connection,
            registration,
            pooled.usage.clone(),
            pooled.ended.clone(),
            self.idle_timeout,
            peer,
        ));
        Ok(pooled)
    }

    async fn request(
        &self,
        pooled: &Pooled,
        target: SocketAddr,
        forwarded_for: IpAddr,
        reused: bool,
    ) -> Result<HboneStream, HboneError> {
        let peer = pooled.addr;
        let stream_use = pooled.usage.begin();
        let mut sender = pooled.sender.clone();
        sender
            .ready()
            .await
            .map_err(|e| h2_error(peer, e, &pooled.alerts))?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .version(Version::HTTP_2)
            .uri(target.to_string())
            .header(FORWARDED, forwarded::for_client(forwarded_for))
            .body(Empty::new())
            .map_err(|source| HboneError::Request { target, source })?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| h2_error(peer, e, &pooled.alerts))?;
        let status = response.status();
        if status != StatusCode::OK {
            return Err(HboneError::Refused {
                peer,
                target,
                status,
            });
        }
        let upgraded =
            hyper::upgrade::on(response)
                .await
                .map_err(|source| HboneError::Upgrade {
                    peer,
                    target,
                    source,
                })?;
        let registration = self.registry.register(pooled.peer.clone(), Kind::Tunnel);
        Ok(HboneStream::new(
            pooled.peer.clone(),
            reused,
            upgraded,
            registration,
            stream_use,
        ))
    }
}

impl Pooled {
    fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire) || self.sender.is_closed() || self.closed.is_closed()
    }
}

/// An HTTP/2 failure; the server's refusal of our certificate surfaces
/// here (TLS 1.3 clients finish their handshake before the server judges).
fn h2_error(peer: SocketAddr, source: hyper::Error, alerts: &Alerts) -> HboneError {
    match alerts.get() {
        Some(alert) => HboneError::RefusedByPeer { peer, alert },
        None => HboneError::Http2 { peer, source },
    }
}

/// Runs a pooled connection until it ends, its peer is revoked, or it has
/// had no stream for `idle_timeout`.
async fn drive<C>(
    connection: C,
    registration: Registration,
    usage: Arc<Usage>,
    ended: Arc<AtomicBool>,
    idle_timeout: Duration,
    peer: SocketAddr,
) where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(connection);
    loop {
        let check_at = usage
            .idle_since()
            .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)
            + idle_timeout;
        tokio::select! {
            done = &mut connection => {
                if let Err(e) = done {
                    debug!(%peer, "HBONE connection ended: {e}");
                }
                break;
            }
            () = registration.signal().closed() => break,
            () = tokio::time::sleep_until(check_at) => {
                if usage.idle_since().is_some_and(|since| since.elapsed() >= idle_timeout) {
                    debug!(%peer, "HBONE connection idle: closed");
                    break;
                }
            }
        }
    }
    ended.store(true, Ordering::Release);
}
