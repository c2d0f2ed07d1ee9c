//! Capture for transparent mTLS: a meshed pod's allowed outbound TCP
//! connect goes to the agent's outbound listener on loopback in the pod's
//! own network namespace, and the original destination is kept for the
//! agent (by the client's port, once `sockops` sees it) and for the
//! application (getpeername() names it, through the service reply table).

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockOpsContext},
};
use portcullis_common::{
    decide::is_local, ipv4_mapped, is_ipv4_mapped, mesh, EndpointValue, MeshClientKey,
    MeshOriginal, ENDPOINT_FLAG_MESHED, PROTO_TCP,
};

use crate::{
    maps::{MESH_ORIGINAL, MESH_PENDING},
    service,
    sock::{set_sock_addr, Family},
};

/// `BPF_SOCK_OPS_TCP_CONNECT_CB`: the SYN is about to be sent; the source
/// port is chosen.
const SOCK_OPS_TCP_CONNECT: u32 = 3;

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
    };
    // SAFETY: the context pointer is valid for the program's run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // LRU: never fails for lack of room. Were the entry lost anyway, the
    // connect still goes to the listener, which finds no original and
    // resets it: a captured connect never leaves in plaintext.
    let _ = MESH_PENDING.insert(&cookie, &original, 0);
    set_sock_addr(ctx, family, listener, mesh::OUTBOUND_PORT);
    service::remember_reply(ctx, (listener, mesh::OUTBOUND_PORT), (addr, port));
}

/// On a redirected connection's SYN: moves its original destination to
/// the key the agent can compute from the connection it accepts.
#[inline(always)]
pub fn connecting(ctx: &SockOpsContext) -> u32 {
    if ctx.op() != SOCK_OPS_TCP_CONNECT {
        return 1;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out at once.
    let Some(original) = (unsafe { MESH_PENDING.get(&cookie).copied() }) else {
        return 1;
    };
    let _ = MESH_PENDING.remove(&cookie);
    let key = MeshClientKey {
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.ops.cast()) },
        port: ctx.local_port() as u16,
        family: if is_ipv4_mapped(&original.addr) { 4 } else { 6 },
        _pad: [0; 5],
    };
    let _ = MESH_ORIGINAL.insert(&key, &original, 0);
    1
}
