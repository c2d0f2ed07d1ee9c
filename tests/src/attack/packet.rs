//! Crafted packets, built with etherparse: transport segments with correct
//! checksums, IPv4 and IPv6 headers, chains of IPv6 extension headers, real
//! fragments, SCTP common headers and Ethernet frames.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type,
    IpAuthHeader, IpFragOffset, IpNumber, Ipv4Header, Ipv6FragmentHeader, Ipv6Header,
    Ipv6RawExtHeader, TcpHeader, UdpHeader,
};

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;
/// RFC 3692 experimental protocol number: no kernel handles it.
pub const PROTO_EXPERIMENTAL: u8 = 253;

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTH: u8 = 51;
const DEST_OPTS: u8 = 60;

/// An IPv6 extension header kind, as the kernel parser would meet it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext {
    HopByHop,
    DestOpts,
    /// Routing header of an unassigned type with segments-left 0: the
    /// receiving stack skips it.
    Routing,
    /// Fragment header with offset 0 and M=0, which the kernel keeps in
    /// place and walks past.
    AtomicFragment,
    Auth,
}

impl Ext {
    pub fn name(self) -> &'static str {
        match self {
            Ext::HopByHop => "hbh",
            Ext::DestOpts => "dst",
            Ext::Routing => "rt",
            Ext::AtomicFragment => "afrag",
            Ext::Auth => "ah",
        }
    }

    fn number(self) -> u8 {
        match self {
            Ext::HopByHop => HOP_BY_HOP,
            Ext::DestOpts => DEST_OPTS,
            Ext::Routing => ROUTING,
            Ext::AtomicFragment => FRAGMENT,
            Ext::Auth => AUTH,
        }
    }

    fn bytes(self, next: u8, id: u32) -> Vec<u8> {
        // One PadN option filling the 6 bytes after next-header and length.
        const PAD_N: [u8; 6] = [1, 4, 0, 0, 0, 0];
        // Unassigned routing type 253, segments left 0, 4 reserved bytes.
        const ROUTING_253: [u8; 6] = [253, 0, 0, 0, 0, 0];
        let next = IpNumber(next);
        match self {
            Ext::HopByHop | Ext::DestOpts => Ipv6RawExtHeader::new_raw(next, &PAD_N)
                .expect("6 bytes is a valid extension header payload")
                .to_bytes()
                .to_vec(),
            Ext::Routing => Ipv6RawExtHeader::new_raw(next, &ROUTING_253)
                .expect("6 bytes is a valid extension header payload")
                .to_bytes()
                .to_vec(),
            Ext::AtomicFragment => Ipv6FragmentHeader::new(next, IpFragOffset::ZERO, false, id)
                .to_bytes()
                .to_vec(),
            Ext::Auth => IpAuthHeader::new(next, 0x100, 1, &[0u8; 12])
                .expect("a 12-byte ICV is valid")
                .to_bytes()
                .to_vec(),
        }
    }
}

/// UDP header and payload, checksummed for the IPv4 pseudo-header.
pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = UdpHeader::without_ipv4_checksum(sport, dport, payload.len()).expect("udp size");
    h.checksum = h
        .calc_checksum_ipv4_raw(src.octets(), dst.octets(), payload)
        .expect("udp size");
    [h.to_bytes().as_slice(), payload].concat()
}

/// UDP header and payload, checksummed for the IPv6 pseudo-header.
pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = UdpHeader::without_ipv4_checksum(sport, dport, payload.len()).expect("udp size");
    h.checksum = h
        .calc_checksum_ipv6_raw(src.octets(), dst.octets(), payload)
        .expect("udp size");
    [h.to_bytes().as_slice(), payload].concat()
}

fn syn(sport: u16, dport: u16) -> TcpHeader {
    let mut h = TcpHeader::new(sport, dport, 0x5eed_0001, 64240);
    h.syn = true;
    h
}

/// A TCP SYN carrying `payload` (the marker), checksummed for IPv4.
pub fn tcp_syn4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = syn(sport, dport);
    h.checksum = h
        .calc_checksum_ipv4_raw(src.octets(), dst.octets(), payload)
        .expect("tcp size");
    [h.to_bytes().as_slice(), payload].concat()
}

/// A TCP SYN carrying `payload` (the marker), checksummed for IPv6.
pub fn tcp_syn6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = syn(sport, dport);
    h.checksum = h
        .calc_checksum_ipv6_raw(src.octets(), dst.octets(), payload)
        .expect("tcp size");
    [h.to_bytes().as_slice(), payload].concat()
}

/// An ICMP echo request carrying `payload`.
pub fn icmp4_echo(id: u16, payload: &[u8]) -> Vec<u8> {
    let h = Icmpv4Header::with_checksum(
        Icmpv4Type::EchoRequest(IcmpEchoHeader { id, seq: 1 }),
        payload,
    );
    [h.to_bytes().as_slice(), payload].concat()
}

/// An ICMPv6 echo request carrying `payload`.
pub fn icmp6_echo(src: Ipv6Addr, dst: Ipv6Addr, id: u16, payload: &[u8]) -> Vec<u8> {
    let h = Icmpv6Header::with_checksum(
        Icmpv6Type::EchoRequest(IcmpEchoHeader { id, seq: 1 }),
        src.octets(),
        dst.octets(),
        payload,
    )
    .expect("icmpv6 size");
    [h.to_bytes().as_slice(), payload].concat()
}

/// An SCTP packet: the common header (ports, verification tag, CRC32c) and
/// one DATA chunk carrying `payload`. Nothing here speaks SCTP; the point is
/// a well-formed packet of protocol 132 to a port.
pub fn sctp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut chunk = vec![0u8, 0x03]; // DATA, unordered-less B|E flags
    let chunk_len = 16 + payload.len();
    chunk.extend((chunk_len as u16).to_be_bytes());
    chunk.extend(1u32.to_be_bytes()); // TSN
    chunk.extend(0u16.to_be_bytes()); // stream id
    chunk.extend(0u16.to_be_bytes()); // stream sequence
    chunk.extend(0u32.to_be_bytes()); // payload protocol id
    chunk.extend_from_slice(payload);
    while !chunk.len().is_multiple_of(4) {
        chunk.push(0);
    }
    let mut p = Vec::with_capacity(12 + chunk.len());
    p.extend(sport.to_be_bytes());
    p.extend(dport.to_be_bytes());
    p.extend(0x0bad_cafe_u32.to_be_bytes()); // verification tag
    p.extend([0u8; 4]);
    p.extend(chunk);
    // RFC 9260 appendix A: the CRC32c goes in little-endian byte order.
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// CRC32c (Castagnoli), bitwise: packets here are a few dozen bytes.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82f6_3b78 & mask);
        }
    }
    !crc
}

/// A whole IPv4 packet of `protocol` around `l4`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    ipv4_fragment(src, dst, protocol, 0, 0, false, l4)
}

/// One IPv4 fragment: `offset8` in 8-byte units, `more` the MF flag.
pub fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    id: u16,
    offset8: u16,
    more: bool,
    data: &[u8],
) -> Vec<u8> {
    let mut h = Ipv4Header::new(
        data.len() as u16,
        64,
        IpNumber(protocol),
        src.octets(),
        dst.octets(),
    )
    .expect("ipv4 size");
    h.identification = id;
    h.dont_fragment = offset8 == 0 && !more;
    h.more_fragments = more;
    h.fragment_offset = IpFragOffset::try_new(offset8).expect("fragment offset");
    h.header_checksum = h.calc_header_checksum();
    [h.to_bytes().as_slice(), data].concat()
}

fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload_len: usize) -> Vec<u8> {
    let h = Ipv6Header {
        payload_length: payload_len as u16,
        next_header: IpNumber(next),
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
        ..Default::default()
    };
    h.to_bytes().to_vec()
}

/// The chain `exts` (in order) followed by `protocol`, as bytes, and the
/// number of the first header.
fn chain(exts: &[Ext], protocol: u8, id: u32) -> (u8, Vec<u8>) {
    let mut bytes = Vec::new();
    for (i, e) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map_or(protocol, |n| n.number());
        bytes.extend(e.bytes(next, id.wrapping_add(i as u32)));
    }
    (exts.first().map_or(protocol, |e| e.number()), bytes)
}

/// A whole IPv6 packet: header, extension headers `exts` in order, then
/// `l4` of `protocol`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, exts: &[Ext], protocol: u8, l4: &[u8]) -> Vec<u8> {
    let (first, ext_bytes) = chain(exts, protocol, 0x7063_0000);
    let mut p = ipv6_header(src, dst, first, ext_bytes.len() + l4.len());
    p.extend(ext_bytes);
    p.extend_from_slice(l4);
    p
}

/// `l4` split into two real IPv6 fragments at `split` (a multiple of 8),
/// each with `unfragmentable` extension headers before its Fragment header.
pub fn ipv6_fragments(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    unfragmentable: &[Ext],
    protocol: u8,
    l4: &[u8],
    split: usize,
    id: u32,
) -> [Vec<u8>; 2] {
    assert!(
        split.is_multiple_of(8) && split < l4.len(),
        "fragment split {split}"
    );
    let piece = |offset: usize, data: &[u8], more: bool| {
        let (first, mut ext_bytes) = chain(unfragmentable, FRAGMENT, id ^ 0x55);
        let frag = Ipv6FragmentHeader::new(
            IpNumber(protocol),
            IpFragOffset::try_new((offset / 8) as u16).expect("fragment offset"),
            more,
            id,
        );
        ext_bytes.extend(frag.to_bytes());
        let mut p = ipv6_header(src, dst, first, ext_bytes.len() + data.len());
        p.extend(ext_bytes);
        p.extend_from_slice(data);
        p
    };
    [
        piece(0, &l4[..split], true),
        piece(split, &l4[split..], false),
    ]
}

/// An Ethernet frame around an IP packet (IPv4 or IPv6 by its version).
pub fn ethernet(src_mac: [u8; 6], dst_mac: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let ether_type = if ip.first().map(|b| b >> 4) == Some(6) {
        EtherType::IPV6
    } else {
        EtherType::IPV4
    };
    let h = Ethernet2Header {
        source: src_mac,
        destination: dst_mac,
        ether_type,
    };
    [h.to_bytes().as_slice(), ip].concat()
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    const A6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

    #[test]
    fn crc32c_matches_the_rfc_3720_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn extension_chains_parse_back_to_udp_with_the_payload() {
        let l4 = udp6(A6, B6, 1000, 2000, b"hello");
        let exts = [
            Ext::HopByHop,
            Ext::DestOpts,
            Ext::Routing,
            Ext::AtomicFragment,
            Ext::Auth,
            Ext::DestOpts,
        ];
        let p = ipv6(A6, B6, &exts, PROTO_UDP, &l4);
        let s = SlicedPacket::from_ip(&p).expect("parses");
        let Some(NetSlice::Ipv6(ip)) = &s.net else {
            panic!("not ipv6")
        };
        assert_eq!(ip.extensions().slice().len(), 8 * 5 + 24);
        let Some(TransportSlice::Udp(u)) = s.transport else {
            panic!("no udp after the chain")
        };
        assert_eq!((u.source_port(), u.destination_port()), (1000, 2000));
        assert_eq!(u.payload(), b"hello");
    }

    #[test]
    fn fragments_carry_the_whole_segment_between_them() {
        let l4 = udp6(A6, B6, 1, 2, &[7u8; 40]);
        let [a, b] = ipv6_fragments(A6, B6, &[Ext::DestOpts], PROTO_UDP, &l4, 16, 9);
        assert_eq!(a.len() + b.len(), 2 * (40 + 8 + 8) + l4.len());
        assert_eq!(a[6], DEST_OPTS);
        assert_eq!(a[40], FRAGMENT);
        assert_eq!(a[48], PROTO_UDP);
        // M=1 on the first, offset 16/8 = 2 and M=0 on the second.
        assert_eq!(&a[50..52], &[0, 1]);
        assert_eq!(&b[50..52], &[0, 16]);
    }
}
