//! Reads the few header fields the ingress hook needs.

use aya_ebpf::programs::SkBuffContext;
use portcullis_common::{ipv4_mapped, PROTO_TCP, PROTO_UDP};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
/// IPv6 extension headers that may precede TCP/UDP on a delivered packet.
const IPV6_EXT_HOP_BY_HOP: u8 = 0;
const IPV6_EXT_ROUTING: u8 = 43;
const IPV6_EXT_DEST_OPTS: u8 = 60;
const MAX_IPV6_EXT_HEADERS: u32 = 4;

/// The start of a flow the ingress hook must judge.
pub struct NewFlow {
    pub protocol: u8,
    pub src_addr: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
}

/// Classifies a packet: `Some` for a TCP SYN (without ACK) or a UDP
/// datagram, `None` for anything that is not a new flow's first packet.
#[inline(always)]
pub fn new_flow(ctx: &SkBuffContext) -> Option<NewFlow> {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let (protocol, src_addr, l4) = match ethertype {
        ETH_P_IP => ipv4(ctx)?,
        ETH_P_IPV6 => ipv6(ctx)?,
        _ => return None,
    };
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    let src_port = u16::from_be_bytes([ports[0], ports[1]]);
    let dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    if protocol == PROTO_TCP {
        let flags: u8 = ctx.load(l4 + 13).ok()?;
        if flags & TCP_FLAG_SYN == 0 || flags & TCP_FLAG_ACK != 0 {
            return None;
        }
    }
    Some(NewFlow {
        protocol,
        src_addr,
        src_port,
        dst_port,
    })
}

#[inline(always)]
fn ipv4(ctx: &SkBuffContext) -> Option<(u8, [u8; 16], usize)> {
    let header: [u8; 20] = ctx.load(0).ok()?;
    let ihl = (header[0] & 0x0f) as usize * 4;
    let protocol = header[9];
    if protocol != PROTO_TCP && protocol != PROTO_UDP {
        return None;
    }
    let src = ipv4_mapped([header[12], header[13], header[14], header[15]]);
    Some((protocol, src, ihl))
}

#[inline(always)]
fn ipv6(ctx: &SkBuffContext) -> Option<(u8, [u8; 16], usize)> {
    let header: [u8; 40] = ctx.load(0).ok()?;
    let mut next = header[6];
    let mut offset = 40usize;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        if next != IPV6_EXT_HOP_BY_HOP && next != IPV6_EXT_ROUTING && next != IPV6_EXT_DEST_OPTS {
            break;
        }
        let ext: [u8; 2] = ctx.load(offset).ok()?;
        next = ext[0];
        offset += (ext[1] as usize + 1) * 8;
        i += 1;
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        return None;
    }
    let mut src = [0u8; 16];
    src.copy_from_slice(&header[8..24]);
    Some((next, src, offset))
}
