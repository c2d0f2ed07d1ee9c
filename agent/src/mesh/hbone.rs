//! HBONE, the tunnel of Istio ambient: a TCP connection travels as one
//! HTTP/2 CONNECT stream (`:authority` = the original destination `ip:port`,
//! `Forwarded: for=<client ip>`) inside mutual TLS 1.3 (ALPN `h2` only)
//! between the agents of the two pods, on the destination pod's port 15008.
//!
//! Both sides present the SPIFFE certificate of their workload and verify
//! the other's against the trust bundle, the trust domain and the
//! revocations, all read at each handshake so rotation needs no restart.
//! Our leaves carry only a URI SAN, so there is no hostname check: the
//! client checks the server's SPIFFE ID itself.
//!
//! The pieces, each with one job:
//! - `tls`: the TLS configurations and handshakes of both sides;
//! - `verify`: what makes a peer trusted ([`PeerError`]);
//! - [`forwarded`]: the `Forwarded` header (RFC 7239);
//! - `pool`: the client ([`HbonePool`]), connections pooled per (source
//!   identity, peer);
//! - `stream`: one tunnel as the client's caller sees it ([`HboneStream`]);
//! - `server`: one accepted connection ([`serve`]), its CONNECTs handed to
//!   an [`InboundHandler`];
//! - `registry`: live tunnels by peer, closed when the peer is revoked
//!   ([`TunnelRegistry`]);
//! - `relay`: the bytes, both ways ([`relay()`]).

pub mod forwarded;
mod pool;
mod registry;
mod relay;
mod server;
mod stream;
mod tls;
mod verify;

use std::{io, net::SocketAddr, time::Duration, time::SystemTime};

use hyper::StatusCode;
use tokio::sync::watch;

pub use self::{
    pool::{HbonePool, POOL_IDLE_TIMEOUT},
    registry::{CloseSignal, TunnelRegistry},
    relay::relay,
    server::{serve, InboundHandler, InboundRequest, Opened, Refusal},
    stream::HboneStream,
    verify::PeerError,
};
use crate::identity::{
    bundle::TrustBundle, manager::Certificates, revocation::RevocationView, spiffe::SpiffeId,
};

/// Where the agent listens for HBONE in each meshed pod's network namespace.
pub const HBONE_PORT: u16 = portcullis_common::mesh::INBOUND_PORT;

/// The only application protocol either side accepts.
pub const ALPN_H2: &[u8] = b"h2";

/// What each direction of a relay reads and writes at once. hyper hands
/// every write to the CONNECT stream to its connection task as one copy
/// and one message, and TLS and the sockets cost per call: tokio's 8 KiB
/// default made a single stream pay for that eight times per 64 KiB.
pub const RELAY_BUFFER: usize = 64 * 1024;

/// HTTP/2 settings both sides advertise. Frames as large as a relay write
/// (one DATA frame per write, not four). Windows are what a receiver may
/// have to hold for an application that reads slower than the peer sends,
/// so they bound the agent's memory: 1 MiB per stream is plenty for one
/// stream at full speed between pods, and 2 MiB per connection lets two
/// streams run at once (4 and 16 MiB cost 10 MiB of peak RSS under
/// iperf3 with 4 streams, for no throughput).
pub const H2_MAX_FRAME: u32 = RELAY_BUFFER as u32;
pub const H2_STREAM_WINDOW: u32 = 1024 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 2 * 1024 * 1024;

/// A TLS handshake that takes longer is abandoned (a peer that connects and
/// says nothing must not hold a task forever).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity a side presents, looked up at each handshake (so a renewed
/// certificate is used by new handshakes and live connections are
/// untouched).
#[derive(Clone, Debug)]
pub struct LocalIdentity {
    pub id: SpiffeId,
    pub certificates: watch::Receiver<Certificates>,
}

/// What a side needs to trust a peer.
#[derive(Clone, Debug)]
pub struct TrustInputs {
    pub trust_domain: String,
    pub bundle: watch::Receiver<Option<TrustBundle>>,
    pub revocations: watch::Receiver<RevocationView>,
}

/// The authenticated peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub id: SpiffeId,
    /// Canonical serial (lowercase hex), the form revocations use.
    pub serial: String,
    pub not_after: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no trust bundle yet: no peer can be verified")]
    NoTrustBundle,
    #[error("{id} has no certificate on this node")]
    NoCertificate { id: SpiffeId },
    #[error("building the TLS configuration")]
    TlsConfig {
        #[source]
        source: rustls::Error,
    },
    #[error("the connection's addresses")]
    Socket {
        #[source]
        source: io::Error,
    },
    #[error("connecting to {peer}")]
    Connect {
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {peer}")]
    TlsHandshake {
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {peer}: no answer within {after:?}")]
    HandshakeTimeout { peer: SocketAddr, after: Duration },
    /// In TLS 1.3 a server judges the client's certificate after the
    /// client has finished: its refusal arrives as an alert on first use.
    #[error("{peer} refused the TLS session ({alert:?})")]
    RefusedByPeer {
        peer: SocketAddr,
        alert: rustls::AlertDescription,
    },
    #[error("{peer}: the peer is not trusted")]
    Peer {
        peer: SocketAddr,
        #[source]
        source: PeerError,
    },
    #[error("{peer} negotiated {negotiated:?} instead of h2")]
    Alpn {
        peer: SocketAddr,
        negotiated: Option<String>,
    },
    #[error("HTTP/2 with {peer}")]
    Http2 {
        peer: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the CONNECT request for {target}")]
    Request {
        target: SocketAddr,
        #[source]
        source: hyper::http::Error,
    },
    #[error("{peer} refused the tunnel to {target}: {status}")]
    Refused {
        peer: SocketAddr,
        target: SocketAddr,
        status: StatusCode,
    },
    #[error("{peer} accepted the tunnel to {target} but the stream did not open")]
    Upgrade {
        peer: SocketAddr,
        target: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("{peer} ({id}) was revoked: its connection is closed")]
    ClosedByRevocation { peer: SocketAddr, id: SpiffeId },
}

impl HboneError {
    /// A bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoTrustBundle => "no_trust_bundle",
            Self::NoCertificate { .. } => "no_certificate",
            Self::TlsConfig { .. } => "tls_config",
            Self::Socket { .. } | Self::Connect { .. } => "connect",
            Self::TlsHandshake { .. } | Self::HandshakeTimeout { .. } => "tls_handshake",
            Self::RefusedByPeer { .. } => "refused_by_peer",
            Self::Peer { source, .. } => source.reason(),
            Self::Alpn { .. } => "alpn",
            Self::Http2 { .. } | Self::Request { .. } | Self::Upgrade { .. } => "protocol",
            Self::Refused { .. } => "refused",
            Self::ClosedByRevocation { .. } => "peer_revoked",
        }
    }

    /// The status of a refused tunnel.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Every label [`HboneError::reason`] can return, to pre-register metrics.
pub const REASONS: &[&str] = &[
    "no_trust_bundle",
    "no_certificate",
    "tls_config",
    "connect",
    "tls_handshake",
    "refused_by_peer",
    "peer_untrusted",
    "peer_revoked",
    "revocations_unknown",
    "wrong_peer",
    "alpn",
    "protocol",
    "refused",
];

#[cfg(test)]
mod tests;
