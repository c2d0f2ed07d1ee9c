//! Portcullis kernel programs: L4 policy on pod sockets.
//!
//! Attached once at a cgroup v2 root. Each hook finds the enforced endpoint
//! owning the socket (cgroup ancestry → endpoint map), then decides from the
//! identity and policy maps. Egress hooks fail `connect()`/`sendmsg()` with
//! EPERM; the ingress hook drops the first packet of a flow.
#![no_std]
#![no_main]

mod endpoint;
mod events;
mod maps;
mod packet;
mod verdict;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr},
    programs::{SkBuffContext, SockAddrContext},
};
use portcullis_common::{
    ipv4_mapped, DIRECTION_EGRESS, DIRECTION_INGRESS, PROTO_TCP, PROTO_UDP, VERDICT_DENY,
};
use verdict::Flow;

/// Return values of cgroup socket and skb programs.
const PASS: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn pcl_connect4(ctx: SockAddrContext) -> i32 {
    let (protocol, addr, port) = sock_addr_v4(&ctx);
    // connect() runs before the socket has a local port.
    egress(protocol, addr, port, None)
}

#[cgroup_sock_addr(connect6)]
pub fn pcl_connect6(ctx: SockAddrContext) -> i32 {
    let (protocol, addr, port) = sock_addr_v6(&ctx);
    egress(protocol, addr, port, None)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn pcl_sendmsg4(ctx: SockAddrContext) -> i32 {
    let (protocol, addr, port) = sock_addr_v4(&ctx);
    egress(protocol, addr, port, Some(local_port(&ctx)))
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pcl_sendmsg6(ctx: SockAddrContext) -> i32 {
    let (protocol, addr, port) = sock_addr_v6(&ctx);
    egress(protocol, addr, port, Some(local_port(&ctx)))
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

/// connect() (TCP, connected UDP) and sendmsg() (unconnected UDP, with the
/// socket's local port).
#[inline(always)]
fn egress(protocol: u8, peer_addr: [u8; 16], port: u16, sendmsg_port: Option<u16>) -> i32 {
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return PASS;
    }
    let generation = endpoint::active_generation();
    let Some(ep) = endpoint::of_current_task(generation) else {
        return PASS;
    };
    let flow = Flow {
        generation,
        direction: DIRECTION_EGRESS,
        protocol,
        peer_addr,
        peer_port: port,
        policy_port: port,
    };
    if let Some(local) = sendmsg_port {
        if protocol == PROTO_UDP && verdict::udp_reply(&ep, &flow, local) {
            return PASS;
        }
    }
    judge(&ep, &flow, sendmsg_port.unwrap_or(0))
}

#[inline(always)]
fn ingress(ctx: &SkBuffContext) -> i32 {
    let Some(new) = packet::new_flow(ctx) else {
        return PASS;
    };
    let generation = endpoint::active_generation();
    let Some(ep) = endpoint::of_skb(generation, ctx.skb.skb) else {
        return PASS;
    };
    let flow = Flow {
        generation,
        direction: DIRECTION_INGRESS,
        protocol: new.protocol,
        peer_addr: new.src_addr,
        peer_port: new.src_port,
        policy_port: new.dst_port,
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
