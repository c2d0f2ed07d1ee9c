//! The HBONE server: one accepted connection, authenticated, then each
//! CONNECT stream handed to the [`InboundHandler`], which decides and opens
//! the connection to the app before the client hears 200.
//!
//! Answers: 200 and the stream carries the bytes; 405 for another method;
//! 400 for an authority that is not `ip:port` or a malformed `Forwarded`;
//! the handler's status for its refusals.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use futures::future::BoxFuture;
use http_body_util::Empty;
use hyper::{
    body::{Bytes, Incoming},
    header::FORWARDED,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::{debug, info};

use super::{
    forwarded,
    registry::Kind,
    relay::relay,
    tls::{self, Presenter},
    HboneError, LocalIdentity, PeerInfo, TrustInputs, TunnelRegistry,
};

/// One CONNECT, as the handler sees it.
#[derive(Clone, Debug)]
pub struct InboundRequest {
    pub peer: PeerInfo,
    /// The TCP source of the HBONE connection.
    pub from: SocketAddr,
    /// Where the client wants to go (`:authority`).
    pub authority: SocketAddr,
    /// The client pod's IP, from `Forwarded`.
    pub forwarded_for: Option<IpAddr>,
}

/// Why the handler refuses a tunnel.
#[derive(Clone, Debug)]
pub struct Refusal {
    pub status: StatusCode,
    /// A bounded label, e.g. "policy_denied".
    pub reason: &'static str,
    pub message: String,
}

/// Decides each tunnel and opens its connection to the app.
pub trait InboundHandler: Send + Sync + 'static {
    fn open(&self, req: InboundRequest) -> BoxFuture<'static, Result<Opened, Refusal>>;
}

/// The application's connection for a tunnel, and whatever the handler
/// keeps alive while the tunnel is relayed (dropped when it ends).
pub struct Opened {
    pub app: TcpStream,
    pub keep: Option<Box<dyn Send + Sync>>,
}

/// Serves one accepted TCP connection: TLS 1.3 handshake requiring a client
/// certificate that verifies against the bundle, is of the trust domain, and
/// is not revoked (unknown revocations refuse); then HTTP/2; each CONNECT
/// goes to the handler, and on Ok the stream is relayed to the returned
/// TcpStream. Returns when the client closes the connection, or with
/// [`HboneError::ClosedByRevocation`] when its identity is revoked.
pub async fn serve(
    tcp: TcpStream,
    local: LocalIdentity,
    trust: TrustInputs,
    handler: Arc<dyn InboundHandler>,
    registry: TunnelRegistry,
) -> Result<(), HboneError> {
    let from = tcp
        .peer_addr()
        .map_err(|source| HboneError::Socket { source })?;
    if trust.bundle.borrow().is_none() {
        return Err(HboneError::NoTrustBundle);
    }
    let presenter = Presenter::new(&local);
    presenter.current()?;
    let _ = tcp.set_nodelay(true);
    let (tls, peer) = tls::accept(tcp, from, presenter, &trust).await?;
    info!(%from, client = %peer.id, serial = %peer.serial, "HBONE connection accepted");
    let registration = registry.register(peer.clone(), Kind::Connection);
    let connection = Arc::new(Connection {
        peer: peer.clone(),
        from,
        handler,
        registry,
    });
    let service = service_fn(move |req| {
        let connection = connection.clone();
        async move { Ok::<_, Infallible>(connection.answer(req).await) }
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .max_frame_size(super::H2_MAX_FRAME)
        .initial_stream_window_size(super::H2_STREAM_WINDOW)
        .initial_connection_window_size(super::H2_CONNECTION_WINDOW)
        .serve_connection(TokioIo::new(tls), service);
    tokio::select! {
        done = served => done.map_err(|source| HboneError::Http2 { peer: from, source }),
        // Dropping the connection ends its streams; their relays see it too.
        () = registration.signal().closed() => Err(HboneError::ClosedByRevocation {
            peer: from,
            id: peer.id,
        }),
    }
}

/// What the streams of one connection share.
struct Connection {
    peer: PeerInfo,
    from: SocketAddr,
    handler: Arc<dyn InboundHandler>,
    registry: TunnelRegistry,
}

impl Connection {
    async fn answer(&self, mut req: Request<Incoming>) -> Response<Empty<Bytes>> {
        if req.method() != Method::CONNECT {
            return self.refuse(StatusCode::METHOD_NOT_ALLOWED, "not a CONNECT");
        }
        let Some(authority) = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            return self.refuse(StatusCode::BAD_REQUEST, "the authority is not ip:port");
        };
        let forwarded_for = match req
            .headers()
            .get(FORWARDED)
            .map(|v| forwarded::parse(v.as_bytes()))
        {
            None => None,
            Some(Ok(ip)) => ip,
            Some(Err(e)) => {
                debug!(from = %self.from, "{e}");
                return self.refuse(StatusCode::BAD_REQUEST, "malformed Forwarded header");
            }
        };
        let inbound = InboundRequest {
            peer: self.peer.clone(),
            from: self.from,
            authority,
            forwarded_for,
        };
        let Opened { mut app, keep } = match self.handler.open(inbound).await {
            Ok(opened) => opened,
            Err(refusal) => {
                info!(
                    client = %self.peer.id,
                    %authority,
                    status = %refusal.status,
                    reason = refusal.reason,
                    "tunnel refused: {}",
                    refusal.message
                );
                return status(refusal.status);
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let registration = self.registry.register(self.peer.clone(), Kind::Tunnel);
        let client = self.peer.id.clone();
        tokio::spawn(async move {
            let upgraded = match upgrade.await {
                Ok(upgraded) => upgraded,
                Err(e) => {
                    debug!(%client, %authority, "the tunnel did not open: {e}");
                    return;
                }
            };
            let mut stream = TokioIo::new(upgraded);
            match relay(&mut stream, &mut app, registration.signal()).await {
                Ok((up, down)) => debug!(%client, %authority, up, down, "tunnel done"),
                Err(e) => debug!(%client, %authority, "tunnel ended: {e}"),
            }
            drop(keep);
        });
        status(StatusCode::OK)
    }

    fn refuse(&self, code: StatusCode, why: &str) -> Response<Empty<Bytes>> {
        info!(from = %self.from, client = %self.peer.id, status = %code, "request refused: {why}");
        status(code)
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}
