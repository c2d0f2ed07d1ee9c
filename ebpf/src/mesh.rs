//! Capture for transparent mTLS: a meshed pod's allowed outbound TCP
//! connect goes to the agent's outbound listener on loopback in the pod's
//! own network namespace, and the original destination is kept for the
//! agent (by the client's address and port, once the egress skb hook sees
//! the SYN) and for the application (getpeername() names it, through the
//! service reply table).
//!
//! The SYN is caught by the egress skb hook, which judges every enforced
//! SYN anyway, rather than by a `sockops` program: a sockops program runs
//! nine times per connection of every pod, meshed or not.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::{sk_buff::SkBuff, SockAddrContext},
};
use portcullis_common::{
    decide::is_local, ipv4_mapped, is_ipv4_mapped, mesh, packet::Headers, EndpointValue,
    MeshClientKey, MeshHandoverKey, MeshOriginal, MeshPending, ENDPOINT_FLAG_MESHED, PROTO_TCP,
};

use crate::{
    lru::{self, Keyed},
    maps::{MESH_HANDOVERS, MESH_ORIGINAL, MESH_PENDING},
    service,
    sock::{set_sock_addr, Family},
};

/// The outbound listener's address, as the socket's family writes it.
const OUTBOUND_ADDR: [u8; 16] = ipv4_mapped([127, 0, 0, 1]);
/// `::1`, the IPv6 outbound listener's address.
const OUTBOUND_ADDR6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Whether an allowed connect of `ep` goes to the outbound listener: TCP
/// of a meshed endpoint, except to loopback, the pod's own addresses and
/// IPv6 link-local addresses (never a pod's, and meaningless to the agent
/// without the pod's interface).
#[inline(always)]
pub fn captures(ep: &EndpointValue, protocol: u8, peer: (&[u8; 16], u16)) -> bool {
    let (addr, port) = peer;
    ep.flags & ENDPOINT_FLAG_MESHED != 0
        && protocol == PROTO_TCP
        && port != 0
        && !is_local(ep, addr)
        && !(addr[0] == 0xfe && addr[1] & 0xc0 == 0x80)
}

/// Redirects a connect that [`captures`] to the outbound listener of its
/// address family.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, family: Family, ep: &EndpointValue, peer: (&[u8; 16], u16)) {
    let (addr, port) = peer;
    let listener = if is_ipv4_mapped(addr) {
        &OUTBOUND_ADDR
    } else {
        &OUTBOUND_ADDR6
    };
    let original = MeshOriginal {
        addr: *addr,
        port,
        _pad: 0,
        endpoint_id: ep.endpoint_id,
        filed_ns: 0,
    };
    // SAFETY: the context pointer is valid for the program's run.
    let (cookie, netns_cookie) = unsafe {
        (
            bpf_get_socket_cookie(ctx.sock_addr.cast()),
            bpf_get_netns_cookie(ctx.sock_addr.cast()),
        )
    };
    let pending = MeshPending {
        original,
        netns_cookie,
        socket_cookie: cookie,
    };
    // LRU: never fails for lack of room. Were the entry lost anyway, the
    // connect still goes to the listener, which finds no original and
    // resets it: a captured connect never leaves in plaintext.
    let _ = MESH_PENDING.insert(&cookie, &pending, 0);
    set_sock_addr(ctx, family, listener, mesh::OUTBOUND_PORT);
    service::remember_reply(ctx, (listener, mesh::OUTBOUND_PORT), (addr, port));
}

impl Keyed<u64> for MeshPending {
    fn key(&self) -> &u64 {
        &self.socket_cookie
    }
}

/// The pending original destination of a SYN to the outbound listener
/// (egress, a kernel socket), taken out of the pending table: its connect
/// was redirected. A retransmitted SYN finds nothing left.
#[inline(always)]
pub fn pending_original(skb: &SkBuff, headers: &Headers) -> Option<MeshPending> {
    let to_listener = headers.transport.dst_port == mesh::OUTBOUND_PORT
        && (headers.dst_addr == OUTBOUND_ADDR || headers.dst_addr == OUTBOUND_ADDR6);
    if !to_listener {
        return None;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let cookie = unsafe { bpf_get_socket_cookie(skb.skb.cast()) };
    let pending = lru::copy(&MESH_PENDING, &cookie)?;
    let _ = MESH_PENDING.remove(&cookie);
    Some(pending)
}

/// Files a redirected connection's original destination under the key the
/// agent computes from the connection it accepts (the SYN's source address
/// and port are the first moment the client's half of the tuple is known),
/// stamped with the time, so that an entry nobody took goes stale.
#[inline(always)]
pub fn file_original(headers: &Headers, pending: &MeshPending) {
    let key = MeshClientKey {
        netns_cookie: pending.netns_cookie,
        addr: headers.src_addr,
        port: headers.transport.src_port,
        _pad: [0; 6],
    };
    let mut original = pending.original;
    // SAFETY: a helper without arguments.
    original.filed_ns = unsafe { bpf_ktime_get_ns() };
    let _ = MESH_ORIGINAL.insert(&key, &original, 0);
}

/// Whether the agent registered this packet's tuple as an inbound
/// hand-over with `mark` (the client is the source, the application the
/// destination: only packets towards the application are asked about).
#[inline(always)]
pub fn registered_handover(headers: &Headers, mark: u32) -> bool {
    let key = MeshHandoverKey {
        client_addr: headers.src_addr,
        app_addr: headers.dst_addr,
        client_port: headers.transport.src_port,
        app_port: headers.transport.dst_port,
        _pad: 0,
    };
    // SAFETY: the value is read at once.
    unsafe { MESH_HANDOVERS.get(&key) }.is_some_and(|registered| *registered == mark)
}
