//! The frames no cgroup hook sees: what a pod writes with a packet
//! (AF_PACKET) socket goes straight to the network device. A tc program on
//! the egress of the pod's own interfaces, `lo` included (attached from
//! inside the pod's network namespace), judges those frames like any other
//! packet; frames of the IP stack were judged by the cgroup hooks already
//! and pass.

use aya_ebpf::programs::{SockoptContext, TcContext};
use portcullis_common::{
    packet::{ETH_P_IP, ETH_P_IPV6},
    DIRECTION_EGRESS,
};

use crate::{
    endpoint::{self, Owner},
    packet::{self, SocketKind},
    skb, PASS, REJECT,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const ETH_HLEN: usize = 14;
const ETH_P_ARP: u16 = 0x0806;

#[inline(always)]
pub fn frame(ctx: &TcContext) -> i32 {
    let skb = &ctx.skb;
    if packet::socket_kind(skb) != SocketKind::Packet {
        return TC_ACT_OK;
    }
    // The frame's own ethertype: a packet socket chooses the skb's protocol
    // field freely, so only the bytes on the wire count.
    let ethertype = match skb.load::<[u8; 2]>(12) {
        Ok(t) => u16::from_be_bytes(t),
        Err(_) => 0,
    };
    // Address resolution is the link's business, not policy's.
    if ethertype == ETH_P_ARP {
        return TC_ACT_OK;
    }
    // Anything but IP (VLAN tags, other link protocols) has no addresses
    // to judge: `judge` treats it as malformed.
    let headers = if ethertype == ETH_P_IP || ethertype == ETH_P_IPV6 {
        packet::headers(skb, ethertype, ETH_HLEN)
    } else {
        None
    };
    if skb::judge(skb, DIRECTION_EGRESS, SocketKind::Packet, headers) == REJECT {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}

const SOL_PACKET: i32 = 263;
const PACKET_QDISC_BYPASS: i32 = 20;

/// Whether a socket option hands a packet socket's frames to the driver
/// past tc, and so past the frame guard.
#[inline(always)]
pub fn bypasses_tc(level: i32, optname: i32) -> bool {
    level == SOL_PACKET && optname == PACKET_QDISC_BYPASS
}

/// Refuses PACKET_QDISC_BYPASS to sockets of enforced pods (and of pods
/// not programmed yet): every other setsockopt() passes untouched.
#[inline(always)]
pub fn setsockopt(ctx: &SockoptContext) -> i32 {
    // SAFETY: the context pointer is valid for the program's run.
    let (level, optname) = unsafe { ((*ctx.sockopt).level, (*ctx.sockopt).optname) };
    if !bypasses_tc(level, optname) || !enforced_task() {
        PASS
    } else {
        REJECT
    }
}

/// Whether the current task is an enforced pod's, or a pod's not
/// programmed yet.
#[inline(always)]
pub fn enforced_task() -> bool {
    !matches!(
        endpoint::of_current_task(endpoint::active_generation()),
        Owner::Free
    )
}
