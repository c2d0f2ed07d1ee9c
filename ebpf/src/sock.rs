//! The socket hooks: connect() and sendmsg() judged where a denial can be
//! an EPERM the application sees, with service translation first; and the
//! service address shown back on recvmsg() and getpeername().

use aya_ebpf::programs::SockAddrContext;
use portcullis_common::{
    decide::{policy_protocol, Flow},
    generation_of, ipv4_mapped, DIRECTION_EGRESS, FLOW_FLAG_MESH, PROTO_OTHER, PROTO_TCP,
    PROTO_UDP, REASON_NO_BACKEND,
};

use crate::{
    endpoint::{self, Owner},
    mesh, no_endpoint, not_programmed, refuse, report_flagged, service,
    service::Translation,
    verdict::{self, Conversation, Datagram},
    verdict_code, PASS,
};

/// Which sockaddr fields a hook reads and writes.
#[derive(Clone, Copy)]
pub enum Family {
    V4,
    V6,
}

/// The protocol, address and port of the socket call.
#[inline(always)]
fn sock_addr(ctx: &SockAddrContext, family: Family) -> (u8, [u8; 16], u16) {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = match family {
        Family::V4 => ipv4_mapped(sa.user_ip4.to_ne_bytes()),
        Family::V6 => {
            let mut addr = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let word = sa.user_ip6[i].to_ne_bytes();
                addr[i * 4..i * 4 + 4].copy_from_slice(&word);
                i += 1;
            }
            addr
        }
    };
    (sa.protocol as u8, addr, u16::from_be(sa.user_port as u16))
}

/// Rewrites the address the socket call uses. An IPv4 socket takes the last
/// four bytes of the (mapped) address; the kernel only accepts 4-byte stores.
#[inline(always)]
pub fn set_sock_addr(ctx: &SockAddrContext, family: Family, addr: &[u8; 16], port: u16) {
    // SAFETY: the context pointer is valid and these fields are writable in
    // connect, sendmsg, recvmsg and getpeername programs.
    let sa = unsafe { &mut *ctx.sock_addr };
    match family {
        Family::V4 => sa.user_ip4 = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
        Family::V6 => {
            let mut i = 0;
            while i < 4 {
                sa.user_ip6[i] = u32::from_ne_bytes([
                    addr[i * 4],
                    addr[i * 4 + 1],
                    addr[i * 4 + 2],
                    addr[i * 4 + 3],
                ]);
                i += 1;
            }
        }
    }
    sa.user_port = u32::from(port.to_be());
}

/// The socket's own port: sendmsg binds one before the hook runs, and a
/// socket bound before connect() (a UDP server answering) has one; 0
/// otherwise.
#[inline(always)]
fn local_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the context and its socket are valid for the program's run.
    unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return 0;
        }
        (*sk).src_port as u16
    }
}

/// Replaces a backend address the application is about to see with the
/// service address this socket used to reach it, if it did.
#[inline(always)]
pub fn show_service(ctx: &SockAddrContext, family: Family) -> i32 {
    let (_, addr, port) = sock_addr(ctx, family);
    if let Some((addr, port)) = service::reply_source(ctx, &addr, port) {
        set_sock_addr(ctx, family, &addr, port);
    }
    PASS
}

/// connect() (TCP, connected UDP, ping) and sendmsg() (unconnected UDP and
/// UDP-Lite). A service destination is translated first, for every socket
/// in the attach subtree; then an endpoint's socket is judged on the
/// backend, so a denied flow fails with EPERM at the call. (The egress skb
/// hook judges the packets again; this is where the error is good.)
#[inline(always)]
pub fn egress(ctx: &SockAddrContext, family: Family) -> i32 {
    let (protocol, addr, port) = sock_addr(ctx, family);
    let epoch = endpoint::active_epoch();
    let generation = generation_of(epoch);
    let (peer_addr, peer_port) = if protocol == PROTO_TCP || protocol == PROTO_UDP {
        match service::translate(generation, protocol, &addr, port) {
            Translation::Untouched => (addr, port),
            Translation::Backend {
                addr: backend,
                port: backend_port,
            } => {
                set_sock_addr(ctx, family, &backend, backend_port);
                service::remember_reply(ctx, (&backend, backend_port), (&addr, port));
                (backend, backend_port)
            }
            Translation::NoBackend => {
                return refuse_no_backend(generation, protocol, addr, port);
            }
        }
    } else {
        (addr, port)
    };
    let judged_as = policy_protocol(protocol);
    let ported = judged_as != PROTO_OTHER;
    let peer_port = if ported { peer_port } else { 0 };
    let flow = Flow {
        generation,
        direction: DIRECTION_EGRESS,
        protocol: judged_as,
        peer_addr,
        peer_port,
        policy_port: peer_port,
    };
    let ep = match endpoint::of_current_task(generation) {
        Owner::Endpoint(ep) => ep,
        Owner::NotProgrammed => return not_programmed(&flow),
        Owner::Free => return PASS,
    };
    if protocol != PROTO_TCP {
        // A reply within a conversation the peer started: a UDP server's
        // sendto(), or its connect() to the client it heard from.
        let datagram = Datagram {
            protocol,
            local_port: if ported { local_port(ctx) } else { 0 },
            epoch,
        };
        match verdict::reply(&ep, &flow, &datagram) {
            Conversation::Live => return PASS,
            Conversation::Revoked(v) => return refuse(&ep, &flow, &v),
            Conversation::New => {}
        }
    }
    let v = verdict::decide(epoch, &ep, &flow);
    let code = verdict_code(&v);
    let captured = code == PASS && mesh::captures(&ep, protocol, (&peer_addr, peer_port));
    report_flagged(&ep, &flow, &v, if captured { FLOW_FLAG_MESH } else { 0 });
    if captured {
        mesh::redirect(ctx, family, &ep, (&peer_addr, peer_port));
    }
    code
}

/// A service port without backends: EPERM, counted and reported against the
/// socket's endpoint (or the no-endpoint id for other sockets).
#[inline(always)]
fn refuse_no_backend(generation: u32, protocol: u8, addr: [u8; 16], port: u16) -> i32 {
    let ep = match endpoint::of_current_task(generation) {
        Owner::Endpoint(ep) => ep,
        _ => no_endpoint(),
    };
    let flow = Flow {
        generation,
        direction: DIRECTION_EGRESS,
        protocol,
        peer_addr: addr,
        peer_port: port,
        policy_port: port,
    };
    refuse(&ep, &flow, &verdict::deny(REASON_NO_BACKEND))
}
