//! Packet (AF_PACKET) sockets see frames before any tc or cgroup program
//! can drop them, so a pod that opens one reads what ingress policy drops.
//! The BPF LSM `socket_create` hook refuses them (EPERM) to processes of
//! pods that ingress policy restricts, and of pods not programmed yet;
//! every other socket, and every other process, is left alone. Frames a
//! pod writes are judged one by one by the tc guard (`tc.rs`), so egress
//! policy alone is no reason to refuse.
//!
//! XDP (AF_XDP) sockets are refused to every enforced pod: in copy mode
//! their frames go to the driver past tc, and no program here would judge
//! them. Only CAP_NET_RAW is needed to open one, which pods have.
//!
//! The `socket_setsockopt` hook refuses PACKET_QDISC_BYPASS (frames past
//! tc) to enforced pods, as `pcl_setsockopt` does, for 32-bit processes
//! too, whose setsockopt() runs no cgroup sockopt program.

use aya_ebpf::programs::LsmContext;
use portcullis_common::{
    decide::Flow, DIRECTION_EGRESS, DIRECTION_INGRESS, ENDPOINT_FLAG_INGRESS_RESTRICTED,
    PROTO_OTHER, REASON_PACKET_SOCKET,
};

use crate::{
    endpoint::{self, Owner},
    no_endpoint, report_from_lsm, tc,
    verdict::deny,
};

const AF_INET: i32 = 2;
const AF_PACKET: i32 = 17;
const AF_XDP: i32 = 44;
/// The legacy packet socket type, `socket(AF_INET, SOCK_PACKET, ...)`. The
/// kernel turns it into AF_PACKET before the hook; checked anyway, so a
/// kernel that did not would not open a way round.
const SOCK_PACKET: i32 = 10;
/// `type` may carry SOCK_NONBLOCK/SOCK_CLOEXEC above these bits.
const SOCK_TYPE_MASK: i32 = 0xf;
const EPERM: i32 = 1;

/// `LSM_HOOK(int, 0, socket_create, int family, int type, int protocol,
/// int kern)`, plus the verdict of the LSM programs before this one.
#[inline(always)]
pub fn socket_create(ctx: &LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let kind: i32 = ctx.arg(1);
    let kern: i32 = ctx.arg(3);
    let earlier: i32 = ctx.arg(4);
    if earlier != 0 {
        return earlier;
    }
    // Sockets the kernel makes for itself belong to no pod.
    let xdp = family == AF_XDP;
    if kern != 0 || !(xdp || is_packet(family, kind)) {
        return 0;
    }
    let generation = endpoint::active_generation();
    let ep = match endpoint::of_current_task(generation) {
        Owner::Free => return 0,
        // Its policy is not known yet: refused, like its traffic.
        Owner::NotProgrammed => no_endpoint(),
        Owner::Endpoint(ep) if xdp || ep.flags & ENDPOINT_FLAG_INGRESS_RESTRICTED != 0 => ep,
        Owner::Endpoint(_) => return 0,
    };
    let flow = Flow {
        generation,
        // An XDP socket's danger is what it sends.
        direction: if xdp {
            DIRECTION_EGRESS
        } else {
            DIRECTION_INGRESS
        },
        protocol: PROTO_OTHER,
        peer_addr: [0; 16],
        peer_port: 0,
        policy_port: 0,
    };
    report_from_lsm(&ep, &flow, &deny(REASON_PACKET_SOCKET));
    -EPERM
}

#[inline(always)]
fn is_packet(family: i32, kind: i32) -> bool {
    family == AF_PACKET || (family == AF_INET && kind & SOCK_TYPE_MASK == SOCK_PACKET)
}

/// `LSM_HOOK(int, 0, socket_setsockopt, struct socket *sock, int level,
/// int optname)`, plus the verdict of the LSM programs before this one.
#[inline(always)]
pub fn socket_setsockopt(ctx: &LsmContext) -> i32 {
    let level: i32 = ctx.arg(1);
    let optname: i32 = ctx.arg(2);
    let earlier: i32 = ctx.arg(3);
    if earlier != 0 {
        return earlier;
    }
    if tc::bypasses_tc(level, optname) && tc::enforced_task() {
        -EPERM
    } else {
        0
    }
}
