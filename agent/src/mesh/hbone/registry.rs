//! Live HBONE connections and tunnels by peer (identity and serial), both
//! directions, so a revocation closes exactly the revoked peer's.
//!
//! A revocation is applied when the view changes, and to everything
//! registered later (a handshake judged just before the change cannot slip
//! through). Only a definite revocation closes what is established: an
//! unknown view refuses new handshakes (see `verify`) but does not tear
//! down every mesh connection of the node because a list went stale.

use std::{
    collections::HashMap,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll},
};

use futures::task::AtomicWaker;
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};
use tracing::info;

use super::PeerInfo;
use crate::identity::revocation::{RevocationStatus, RevocationView};

/// Live tunnels by peer; clones share the registry.
#[derive(Clone, Default)]
pub struct TunnelRegistry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    live: HashMap<u64, Live>,
    /// The latest view applied, for what registers after it.
    view: Option<RevocationView>,
}

struct Live {
    peer: PeerInfo,
    kind: Kind,
    signal: CloseSignal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// A TLS + HTTP/2 connection, closed with all its streams.
    Connection,
    /// One CONNECT stream.
    Tunnel,
}

impl TunnelRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies every revocation view `revocations` publishes, until its
    /// sender is gone.
    pub fn watch(&self, mut revocations: watch::Receiver<RevocationView>) -> JoinHandle<()> {
        let registry = self.clone();
        tokio::spawn(async move {
            loop {
                let view = revocations.borrow_and_update().clone();
                registry.apply(view);
                if revocations.changed().await.is_err() {
                    break;
                }
            }
        })
    }

    /// Live tunnels (CONNECT streams), both directions.
    pub fn active(&self) -> usize {
        self.count(Kind::Tunnel)
    }

    /// Live HBONE connections, both directions.
    pub fn connections(&self) -> usize {
        self.count(Kind::Connection)
    }

    fn count(&self, kind: Kind) -> usize {
        self.lock().live.values().filter(|l| l.kind == kind).count()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn apply(&self, view: RevocationView) {
        let mut inner = self.lock();
        inner.live.retain(|_, live| {
            let revoked = revoked(&view, &live.peer);
            if revoked {
                info!(
                    spiffe_id = %live.peer.id,
                    serial = %live.peer.serial,
                    kind = ?live.kind,
                    "the peer is revoked: closing"
                );
                live.signal.close();
            }
            !revoked
        });
        inner.view = Some(view);
    }

    /// Registers a connection or tunnel with `peer`; it stays registered
    /// until the registration is dropped or the peer is revoked.
    pub(super) fn register(&self, peer: PeerInfo, kind: Kind) -> Registration {
        let signal = CloseSignal::default();
        let mut inner = self.lock();
        let key = inner.next;
        inner.next += 1;
        if inner.view.as_ref().is_some_and(|v| revoked(v, &peer)) {
            signal.close();
        } else {
            inner.live.insert(
                key,
                Live {
                    peer,
                    kind,
                    signal: signal.clone(),
                },
            );
        }
        Registration {
            registry: self.clone(),
            key,
            signal,
        }
    }
}

fn revoked(view: &RevocationView, peer: &PeerInfo) -> bool {
    matches!(
        view.check(&peer.id, Some(&peer.serial)),
        RevocationStatus::Revoked { .. }
    )
}

/// A registered connection or tunnel; dropping it deregisters.
pub(super) struct Registration {
    registry: TunnelRegistry,
    key: u64,
    signal: CloseSignal,
}

impl Registration {
    pub(super) fn signal(&self) -> &CloseSignal {
        &self.signal
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().live.remove(&self.key);
    }
}

/// Fires once, when the registry closes a connection or tunnel.
#[derive(Clone, Default)]
pub struct CloseSignal(Arc<Signal>);

#[derive(Default)]
struct Signal {
    closed: AtomicBool,
    notify: Notify,
    // For streams polled by hand: one waker per direction.
    read: AtomicWaker,
    write: AtomicWaker,
}

impl CloseSignal {
    pub fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// Resolves once closed.
    pub async fn closed(&self) {
        loop {
            // Registered before the check, so a close in between is seen.
            let notified = self.0.notify.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    fn close(&self) {
        if !self.0.closed.swap(true, Ordering::AcqRel) {
            self.0.notify.notify_waiters();
            self.0.read.wake();
            self.0.write.wake();
        }
    }

    /// For `poll_read`: an error once closed, else pending on the inner
    /// stream with this task woken on close.
    pub(super) fn poll_read(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.read.register(cx.waker());
        self.poll_closed()
    }

    pub(super) fn poll_write(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.write.register(cx.waker());
        self.poll_closed()
    }

    fn poll_closed(&self) -> Poll<io::Result<()>> {
        if self.is_closed() {
            Poll::Ready(Err(closed_error()))
        } else {
            Poll::Pending
        }
    }
}

pub(super) fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the HBONE tunnel was closed: its peer is revoked",
    )
}
