//! Portcullis kernel programs: L4 policy on pod sockets.
//!
//! Attached once at a cgroup v2 root. Each hook finds the enforced endpoint
//! owning the socket (cgroup ancestry → endpoint map), then decides from the
//! identity and policy maps. Egress hooks fail `connect()`/`sendmsg()` with
//! EPERM; the ingress hook drops the first packet of a flow. Before judging,
//! egress hooks translate service (ClusterIP) destinations to a backend, and
//! the recvmsg and getpeername hooks show the application the service
//! address it asked for, not the backend.
#![no_std]
#![no_main]

mod endpoint;
mod events;
mod maps;
mod packet;
mod service;
mod verdict;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext},
};
use endpoint::Owner;
use portcullis_common::{
    ipv4_mapped, EndpointValue, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_ID_NONE, PROTO_TCP,
    PROTO_UDP, REASON_NO_BACKEND, VERDICT_DENY,
};
use service::Translation;
use verdict::Flow;

/// Return values of cgroup socket and skb programs.
const PASS: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn pcl_connect4(ctx: SockAddrContext) -> i32 {
    let (protocol, addr, port) = sock_addr_v4(&ctx);
    // connect() runs before the socket has a local port.
    egress(&ctx, Family::V4, protocol, addr, port, None)
}

#[cgroup_sock_addr(connect6)]
pub fn pcl_connect6(ctx: SockAddrContext) -> i32 {
    let (protocol, addr, port) = sock_addr_v6(&ctx);
    egress(&ctx, Family::V6, protocol, addr, port, None)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn pcl_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (protocol, addr, port) = sock_addr_v4(&ctx);
    egress(
        &ctx,
        Family::V4,
        protocol,
        addr,
        port,
        Some(local_port(&ctx)),
    )
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pcl_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (protocol, addr, port) = sock_addr_v6(&ctx);
    egress(
        &ctx,
        Family::V6,
        protocol,
        addr,
        port,
        Some(local_port(&ctx)),
    )
}

/// Shows a UDP reply from a backend as coming from the service address the
/// application sent to (only the source address handed to userspace changes).
#[cgroup_sock_addr(recvmsg4)]
pub fn pcl_recvmsg4(ctx: SockAddrContext) -> i32 {
    show_service(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn pcl_recvmsg6(ctx: SockAddrContext) -> i32 {
    show_service(&ctx, Family::V6)
}

/// getpeername() on a socket connected through a service names the service
/// address, as it would behind kube-proxy's DNAT: applications that log or
/// check their peer see what they connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn pcl_getpeername4(ctx: SockAddrContext) -> i32 {
    show_service(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn pcl_getpeername6(ctx: SockAddrContext) -> i32 {
    show_service(&ctx, Family::V6)
}

/// Replaces a backend address the application is about to see with the
/// service address this socket used to reach it, if it did.
#[inline(always)]
fn show_service(ctx: &SockAddrContext, family: Family) -> i32 {
    let (_, addr, port) = match family {
        Family::V4 => sock_addr_v4(ctx),
        Family::V6 => sock_addr_v6(ctx),
    };
    if let Some((addr, port)) = service::reply_source(ctx, &addr, port) {
        set_sock_addr(ctx, family, &addr, port);
    }
    PASS
}

/// The sending socket's port (sendmsg binds a port before the hook runs).
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

#[cgroup_skb(ingress)]
pub fn pcl_ingress(ctx: SkBuffContext) -> i32 {
    ingress(&ctx)
}

/// Which sockaddr fields a hook reads and writes.
#[derive(Clone, Copy)]
enum Family {
    V4,
    V6,
}

#[inline(always)]
fn sock_addr_v4(ctx: &SockAddrContext) -> (u8, [u8; 16], u16) {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let addr = ipv4_mapped(sa.user_ip4.to_ne_bytes());
    (sa.protocol as u8, addr, u16::from_be(sa.user_port as u16))
}

#[inline(always)]
fn sock_addr_v6(ctx: &SockAddrContext) -> (u8, [u8; 16], u16) {
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let word = sa.user_ip6[i].to_ne_bytes();
        addr[i * 4..i * 4 + 4].copy_from_slice(&word);
        i += 1;
    }
    (sa.protocol as u8, addr, u16::from_be(sa.user_port as u16))
}

/// Rewrites the address the socket call uses. An IPv4 socket takes the last
/// four bytes of the (mapped) address; the kernel only accepts 4-byte stores.
#[inline(always)]
fn set_sock_addr(ctx: &SockAddrContext, family: Family, addr: &[u8; 16], port: u16) {
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

/// connect() (TCP, connected UDP) and sendmsg() (unconnected UDP, with the
/// socket's local port). A service destination is translated first, for
/// every socket in the attach subtree; then an endpoint's socket is judged
/// on the backend.
#[inline(always)]
fn egress(
    ctx: &SockAddrContext,
    family: Family,
    protocol: u8,
    addr: [u8; 16],
    port: u16,
    sendmsg_port: Option<u16>,
) -> i32 {
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return PASS;
    }
    let generation = endpoint::active_generation();
    let (peer_addr, peer_port) = match service::translate(generation, protocol, &addr, port) {
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
    };
    let flow = Flow {
        generation,
        direction: DIRECTION_EGRESS,
        protocol,
        peer_addr,
        peer_port,
        policy_port: peer_port,
    };
    let ep = match endpoint::of_current_task(generation) {
        Owner::Endpoint(ep) => ep,
        Owner::NotProgrammed => return not_programmed(&flow),
        Owner::Free => return PASS,
    };
    if let Some(local) = sendmsg_port {
        if protocol == PROTO_UDP && verdict::udp_reply(&ep, &flow, local) {
            return PASS;
        }
    }
    judge(&ep, &flow, sendmsg_port.unwrap_or(0))
}

/// A service port without backends: EPERM, counted and reported against the
/// socket's endpoint (or [`ENDPOINT_ID_NONE`] for other sockets).
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
    let v = verdict::deny(REASON_NO_BACKEND);
    if !quiet() {
        verdict::count(&ep, &flow, &v);
        events::emit(&ep, &flow, &v);
    }
    REJECT
}

/// Counters and events name sockets no endpoint owns with this.
#[inline(always)]
fn no_endpoint() -> EndpointValue {
    EndpointValue {
        endpoint_id: ENDPOINT_ID_NONE,
        ..EndpointValue::default()
    }
}

/// A pod below a pending guard that is not registered yet: only what is
/// always allowed passes (loopback; from the node on ingress), the rest is
/// denied until the agent has programmed the pod.
#[inline(always)]
fn not_programmed(flow: &Flow) -> i32 {
    let ep = no_endpoint();
    let v = verdict::decide_unprogrammed(flow);
    if !quiet() {
        verdict::count(&ep, flow, &v);
        events::emit(&ep, flow, &v);
    }
    if v.verdict == VERDICT_DENY {
        REJECT
    } else {
        PASS
    }
}

#[inline(always)]
fn ingress(ctx: &SkBuffContext) -> i32 {
    let Some(new) = packet::new_flow(ctx) else {
        return PASS;
    };
    let generation = endpoint::active_generation();
    let flow = Flow {
        generation,
        direction: DIRECTION_INGRESS,
        protocol: new.protocol,
        peer_addr: new.src_addr,
        peer_port: new.src_port,
        policy_port: new.dst_port,
    };
    let ep = match endpoint::of_skb(generation, ctx.skb.skb) {
        Owner::Endpoint(ep) => ep,
        Owner::NotProgrammed => return not_programmed(&flow),
        Owner::Free => return PASS,
    };
    if new.protocol == PROTO_UDP && verdict::udp_reply(&ep, &flow, new.dst_port) {
        return PASS;
    }
    judge(&ep, &flow, new.dst_port)
}

/// Decides, counts, and remembers allowed UDP conversations for replies.
#[inline(always)]
fn judge(ep: &portcullis_common::EndpointValue, flow: &Flow, local_port: u16) -> i32 {
    let v = verdict::decide(ep, flow);
    if !quiet() {
        verdict::count(ep, flow, &v);
        events::emit(ep, flow, &v);
    }
    // Audit verdicts pass: the would-be drop is only counted.
    if v.verdict == VERDICT_DENY {
        return REJECT;
    }
    if flow.protocol == PROTO_UDP {
        verdict::remember_udp(ep, flow, local_port);
    }
    PASS
}

/// Counters and events off (benchmarks only).
#[inline(always)]
fn quiet() -> bool {
    maps::SETTINGS.get(0).is_some_and(|s| s.quiet != 0)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
