//! One tunnel as the client's caller sees it: the CONNECT stream's bytes,
//! the authenticated server, and whether its connection was reused. It
//! fails with `ConnectionAborted` once the registry closes it, however the
//! caller drives it.

use std::{
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Instant,
};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    registry::{CloseSignal, Registration},
    PeerInfo,
};

/// AsyncRead + AsyncWrite over the CONNECT stream.
pub struct HboneStream {
    pub peer: PeerInfo,
    /// The stream went over a pooled connection (no new handshake).
    pub reused: bool,
    io: TokioIo<Upgraded>,
    registration: Registration,
    _use: StreamUse,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("peer", &self.peer)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl HboneStream {
    pub(super) fn new(
        peer: PeerInfo,
        reused: bool,
        upgraded: Upgraded,
        registration: Registration,
        stream_use: StreamUse,
    ) -> Self {
        Self {
            peer,
            reused,
            io: TokioIo::new(upgraded),
            registration,
            _use: stream_use,
        }
    }

    /// Fires when the registry closes this tunnel (for [`super::relay`]).
    pub fn close_signal(&self) -> CloseSignal {
        self.registration.signal().clone()
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Poll::Ready(closed) = this.registration.signal().poll_read(cx) {
            return Poll::Ready(closed);
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Poll::Ready(Err(e)) = this.registration.signal().poll_write(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// How busy a pooled connection is: its open streams and when it was last
/// used, for the idle timeout.
#[derive(Debug)]
pub(super) struct Usage {
    streams: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl Usage {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            streams: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        })
    }

    /// Counts a stream until the returned guard is dropped.
    pub(super) fn begin(self: &Arc<Self>) -> StreamUse {
        self.streams.fetch_add(1, Ordering::AcqRel);
        self.touch();
        StreamUse(self.clone())
    }

    /// When it became idle, if it is.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        (self.streams.load(Ordering::Acquire) == 0).then(|| self.last_used())
    }

    fn last_used(&self) -> Instant {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        *self.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

/// One open stream of a pooled connection.
#[derive(Debug)]
pub(super) struct StreamUse(Arc<Usage>);

impl Drop for StreamUse {
    fn drop(&mut self) {
        self.0.touch();
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}
