//! The packet parser the kernel's skb programs use, written once and tested
//! on the host: it reads an IP packet (from its network header) through
//! [`PacketBytes`] and says which addresses, transport and ports it carries.
//!
//! It never guesses. A packet whose transport header it cannot reach — too
//! many IPv6 extension headers, a non-first fragment, a truncated header,
//! ESP — is [`Class::Unclassified`], and the data path judges it like a
//! protocol without ports: only a rule that admits every protocol from the
//! peer lets it through an isolated direction.

use crate::{ipv4_mapped, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// IPv6 extension headers the parser walks.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_ESP: u8 = 50;
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

/// At most this many IPv6 extension headers are walked; a chain that goes
/// on is unclassified. Linux itself delivers longer chains, so this is a
/// deliberate limit (fail closed), not the kernel's.
pub const MAX_IPV6_EXTENSION_HEADERS: usize = 8;

/// Read access to a packet's bytes, from the start of its network header.
pub trait PacketBytes {
    /// The `N` bytes at `offset`, or `None` past the end of the packet.
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

/// How far the parser got into a packet's transport layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A protocol policy judges by port (TCP, UDP, SCTP).
    Ports,
    /// Any other IP protocol (ICMP, ICMPv6, UDP-Lite, GRE, ...): judged
    /// without ports.
    Other,
    /// The transport header could not be reached or read.
    Unclassified,
}

/// What the transport layer of a packet is, as far as policy cares. A
/// plain struct whose every field is always set (ports and flags are 0
/// where they do not apply): the BPF verifier rejects a program that could
/// read a field an enum variant left unset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transport {
    pub class: Class,
    /// The IP protocol number (0 when unclassified).
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP only.
    pub tcp_flags: u8,
}

impl Transport {
    pub const UNCLASSIFIED: Transport = Transport {
        class: Class::Unclassified,
        protocol: 0,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
    };

    #[inline(always)]
    pub const fn ports(protocol: u8, src_port: u16, dst_port: u16, tcp_flags: u8) -> Self {
        Transport {
            class: Class::Ports,
            protocol,
            src_port,
            dst_port,
            tcp_flags,
        }
    }

    #[inline(always)]
    pub const fn other(protocol: u8) -> Self {
        Transport {
            class: Class::Other,
            protocol,
            src_port: 0,
            dst_port: 0,
            tcp_flags: 0,
        }
    }

    /// A TCP segment whose ports were read.
    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.class == Class::Ports && self.protocol == PROTO_TCP
    }

    /// A TCP segment that opens a connection (SYN without ACK).
    #[inline(always)]
    pub fn is_tcp_syn(&self) -> bool {
        self.is_tcp() && self.tcp_flags & TCP_FLAG_SYN != 0 && self.tcp_flags & TCP_FLAG_ACK == 0
    }
}

/// The parts of an IP packet the data path judges. Addresses are in the
/// 16-byte form (IPv4 mapped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headers {
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub transport: Transport,
}

/// Parses a packet whose link layer says `ethertype`. `None`: not IPv4 or
/// IPv6, or the IP header itself is missing or malformed (such a packet has
/// no addresses to judge and the data path drops it).
#[inline(always)]
pub fn parse<P: PacketBytes>(packet: &P, ethertype: u16) -> Option<Headers> {
    match ethertype {
        ETH_P_IP => ipv4(packet),
        ETH_P_IPV6 => ipv6(packet),
        _ => None,
    }
}

#[inline(always)]
fn ipv4<P: PacketBytes>(packet: &P) -> Option<Headers> {
    let h: [u8; 20] = packet.bytes(0)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(h[0] & 0x0f) * 4;
    if header_len < 20 {
        return None;
    }
    let src_addr = ipv4_mapped([h[12], h[13], h[14], h[15]]);
    let dst_addr = ipv4_mapped([h[16], h[17], h[18], h[19]]);
    let fragment_offset = u16::from_be_bytes([h[6] & 0x1f, h[7]]);
    let transport = if fragment_offset != 0 {
        // A later fragment carries no transport header.
        Transport::UNCLASSIFIED
    } else {
        transport(packet, h[9], header_len)
    };
    Some(Headers {
        src_addr,
        dst_addr,
        transport,
    })
}

#[inline(always)]
fn ipv6<P: PacketBytes>(packet: &P) -> Option<Headers> {
    let h: [u8; 40] = packet.bytes(0)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut src_addr = [0u8; 16];
    let mut dst_addr = [0u8; 16];
    src_addr.copy_from_slice(&h[8..24]);
    dst_addr.copy_from_slice(&h[24..40]);
    let headers = |transport| {
        Some(Headers {
            src_addr,
            dst_addr,
            transport,
        })
    };
    let mut next = h[6];
    let mut offset = 40usize;
    let mut walked = 0;
    while walked < MAX_IPV6_EXTENSION_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let Some(ext) = packet.bytes::<2>(offset) else {
                    return headers(Transport::UNCLASSIFIED);
                };
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let Some(ext) = packet.bytes::<4>(offset) else {
                    return headers(Transport::UNCLASSIFIED);
                };
                // Fragment offset in 8-byte units, above three flag bits.
                if u16::from_be_bytes([ext[2], ext[3]]) >> 3 != 0 {
                    return headers(Transport::UNCLASSIFIED);
                }
                next = ext[0];
                offset += 8;
            }
            IPV6_AH => {
                let Some(ext) = packet.bytes::<2>(offset) else {
                    return headers(Transport::UNCLASSIFIED);
                };
                next = ext[0];
                offset += (usize::from(ext[1]) + 2) * 4;
            }
            // Encrypted: nothing behind it can be read.
            IPV6_ESP => return headers(Transport::UNCLASSIFIED),
            _ => return headers(transport(packet, next, offset)),
        }
        walked += 1;
    }
    // Still an extension header after the limit: fail closed.
    match next {
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_FRAGMENT | IPV6_AH | IPV6_ESP => {
            headers(Transport::UNCLASSIFIED)
        }
        _ => headers(transport(packet, next, offset)),
    }
}

/// Reads the transport header of `protocol` at `offset`.
#[inline(always)]
fn transport<P: PacketBytes>(packet: &P, protocol: u8, offset: usize) -> Transport {
    match protocol {
        PROTO_TCP => match packet.bytes::<14>(offset) {
            Some(t) => Transport::ports(
                protocol,
                u16::from_be_bytes([t[0], t[1]]),
                u16::from_be_bytes([t[2], t[3]]),
                t[13],
            ),
            // Ports but no flags: a tiny first fragment (RFC 1858) whose
            // SYN is in the next one. Unclassified, a deny on its port
            // would miss it; judged as the connection attempt it may be.
            None => match packet.bytes::<4>(offset) {
                Some(t) => Transport::ports(
                    protocol,
                    u16::from_be_bytes([t[0], t[1]]),
                    u16::from_be_bytes([t[2], t[3]]),
                    TCP_FLAG_SYN,
                ),
                None => Transport::UNCLASSIFIED,
            },
        },
        PROTO_UDP | PROTO_SCTP => match packet.bytes::<4>(offset) {
            Some(t) => Transport::ports(
                protocol,
                u16::from_be_bytes([t[0], t[1]]),
                u16::from_be_bytes([t[2], t[3]]),
                0,
            ),
            None => Transport::UNCLASSIFIED,
        },
        _ => Transport::other(protocol),
    }
}

#[cfg(test)]
mod tests;
