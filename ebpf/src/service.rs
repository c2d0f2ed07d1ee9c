//! Socket-level service translation. Socket hooks run before kube-proxy's
//! DNAT, so a connection to a ClusterIP would be judged against the virtual
//! address; instead the destination is rewritten to a backend right here, and
//! everything after (policy, counters, events) sees the backend.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use portcullis_common::{BackendKey, ServiceKey, SvcReplyKey, SvcReplyValue};

use crate::{
    lru::{self, Keyed},
    maps::{BACKENDS, SERVICES, SVC_REPLIES},
};

pub enum Translation {
    /// Not a service frontend: the destination stays as it is.
    Untouched,
    /// Send to this backend instead.
    Backend { addr: [u8; 16], port: u16 },
    /// A service port with no backend: refuse, never pass the virtual
    /// address on untranslated.
    NoBackend,
}

/// Picks a backend for a destination, if it is a service frontend.
#[inline(always)]
pub fn translate(generation: u32, protocol: u8, addr: &[u8; 16], port: u16) -> Translation {
    let key = ServiceKey {
        generation,
        addr: *addr,
        port,
        protocol,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(&key).copied() }) else {
        return Translation::Untouched;
    };
    if svc.backend_count == 0 {
        return Translation::NoBackend;
    }
    // SAFETY: helper without arguments.
    let index = unsafe { bpf_get_prandom_u32() } % svc.backend_count;
    let key = BackendKey {
        generation,
        service_id: svc.service_id,
        index,
    };
    // SAFETY: the value is copied out at once.
    match unsafe { BACKENDS.get(&key).copied() } {
        Some(b) => Translation::Backend {
            addr: b.addr,
            port: b.port,
        },
        // Only a torn map could get here; fail closed.
        None => Translation::NoBackend,
    }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

impl Keyed<SvcReplyKey> for SvcReplyValue {
    fn key(&self) -> &SvcReplyKey {
        &self.key
    }
}

/// Remembers that this socket's traffic to `service` goes to `backend`, so
/// UDP replies and getpeername() can name the service ([`reply_source`]).
#[inline(always)]
pub fn remember_reply(ctx: &SockAddrContext, backend: (&[u8; 16], u16), service: (&[u8; 16], u16)) {
    let key = SvcReplyKey {
        socket_cookie: cookie(ctx),
        backend_addr: *backend.0,
        backend_port: backend.1,
        _pad: [0; 6],
    };
    let value = SvcReplyValue {
        service_addr: *service.0,
        service_port: service.1,
        _pad: [0; 6],
        key,
    };
    // LRU: a full table forgets the oldest conversation instead of failing.
    let _ = SVC_REPLIES.insert(&key, &value, 0);
}

/// The service address and port that `addr:port` (a datagram's source, or
/// the connected peer) stands for, if this socket reached that backend
/// through a service.
#[inline(always)]
pub fn reply_source(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) -> Option<([u8; 16], u16)> {
    let key = SvcReplyKey {
        socket_cookie: cookie(ctx),
        backend_addr: *addr,
        backend_port: port,
        _pad: [0; 6],
    };
    lru::copy(&SVC_REPLIES, &key).map(|v| (v.service_addr, v.service_port))
}
