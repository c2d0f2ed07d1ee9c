//! Portcullis kernel programs: L4 policy on pod sockets.
//!
//! Attached once at a cgroup v2 root. Each hook finds the enforced endpoint
//! owning the socket (cgroup ancestry → endpoint map), then decides from the
//! identity and policy maps. Socket hooks fail `connect()`/`sendmsg()` with
//! EPERM, the good error; the skb hooks see every packet an endpoint's
//! sockets send or receive — raw sockets, every IP protocol, headers the
//! parser cannot read — and carry the guarantee. Before judging, the socket
//! hooks translate service (ClusterIP) destinations to a backend, and the
//! recvmsg and getpeername hooks show the application the service address
//! it asked for, not the backend. A BPF LSM program keeps packet sockets,
//! which read frames before any of these hooks, from pods ingress policy restricts.
#![no_std]
#![no_main]

mod decisions;
mod endpoint;
mod events;
mod lru;
mod maps;
mod mesh;
mod packet;
mod packet_socket;
mod service;
mod skb;
mod sock;
mod tc;
mod verdict;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock_addr, cgroup_sockopt, classifier, lsm},
    programs::{LsmContext, SkBuffContext, SockAddrContext, SockoptContext, TcContext},
};
use portcullis_common::{
    decide::Flow, EndpointValue, PolicyValue, DIRECTION_EGRESS, DIRECTION_INGRESS,
    ENDPOINT_ID_NONE, VERDICT_DENY,
};
use sock::Family;

/// Return values of cgroup socket and skb programs.
const PASS: i32 = 1;
const REJECT: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn pcl_connect4(ctx: SockAddrContext) -> i32 {
    sock::egress(&ctx, Family::V4)
}

#[cgroup_sock_addr(connect6)]
pub fn pcl_connect6(ctx: SockAddrContext) -> i32 {
    sock::egress(&ctx, Family::V6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn pcl_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::egress(&ctx, Family::V4)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn pcl_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::egress(&ctx, Family::V6)
}

/// Shows a UDP reply from a backend as coming from the service address the
/// application sent to (only the source address handed to userspace changes).
#[cgroup_sock_addr(recvmsg4)]
pub fn pcl_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::show_service(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn pcl_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::show_service(&ctx, Family::V6)
}

/// getpeername() on a socket connected through a service names the service
/// address, as it would behind kube-proxy's DNAT: applications that log or
/// check their peer see what they connected to.
#[cgroup_sock_addr(getpeername4)]
pub fn pcl_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::show_service(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn pcl_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::show_service(&ctx, Family::V6)
}

#[cgroup_skb(ingress)]
pub fn pcl_ingress(ctx: SkBuffContext) -> i32 {
    skb::packet(&ctx, DIRECTION_INGRESS)
}

#[cgroup_skb(egress)]
pub fn pcl_egress(ctx: SkBuffContext) -> i32 {
    skb::packet(&ctx, DIRECTION_EGRESS)
}

/// Frames a pod's packet sockets write (tc egress of the pod's interfaces).
#[classifier]
pub fn pcl_tc_egress(ctx: TcContext) -> i32 {
    tc::frame(&ctx)
}

/// A packet socket with PACKET_QDISC_BYPASS hands its frames to the driver
/// past tc, and so past `pcl_tc_egress`: an enforced pod may not set it.
#[cgroup_sockopt(setsockopt)]
pub fn pcl_setsockopt(ctx: SockoptContext) -> i32 {
    tc::setsockopt(&ctx)
}

/// Packet sockets read frames before any program here can drop them: pods
/// that ingress policy restricts may not open one (BPF LSM, attached node-wide).
#[lsm(hook = "socket_create")]
pub fn pcl_socket_create(ctx: LsmContext) -> i32 {
    packet_socket::socket_create(&ctx)
}

/// The kernel runs no cgroup sockopt program for a 32-bit process's
/// setsockopt(), so `pcl_setsockopt` alone would let one set
/// PACKET_QDISC_BYPASS; the LSM hook runs for every call.
#[lsm(hook = "socket_setsockopt")]
pub fn pcl_socket_setsockopt(ctx: LsmContext) -> i32 {
    packet_socket::socket_setsockopt(&ctx)
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
    let v = verdict::decide_unprogrammed(flow);
    report(&no_endpoint(), flow, &v);
    verdict_code(&v)
}

/// Counts and reports a decision (unless quiet).
#[inline(always)]
fn report(ep: &EndpointValue, flow: &Flow, v: &PolicyValue) {
    report_flagged(ep, flow, v, 0);
}

/// [`report`], with `FLOW_FLAG_*` for the flow event.
#[inline(always)]
fn report_flagged(ep: &EndpointValue, flow: &Flow, v: &PolicyValue, flags: u8) {
    if !quiet() {
        verdict::count(ep, flow, v);
        events::emit(ep, flow, v, flags, events::Clock::Coarse);
    }
}

/// [`report`] from a BPF LSM program (see [`events::Clock::Precise`]).
#[inline(always)]
fn report_from_lsm(ep: &EndpointValue, flow: &Flow, v: &PolicyValue) {
    if !quiet() {
        verdict::count(ep, flow, v);
        events::emit(ep, flow, v, 0, events::Clock::Precise);
    }
}

/// Reports a denial and rejects.
#[inline(always)]
fn refuse(ep: &EndpointValue, flow: &Flow, v: &PolicyValue) -> i32 {
    report(ep, flow, v);
    REJECT
}

/// Audit verdicts pass: the would-be drop is only counted.
#[inline(always)]
fn verdict_code(v: &PolicyValue) -> i32 {
    if v.verdict == VERDICT_DENY {
        REJECT
    } else {
        PASS
    }
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
