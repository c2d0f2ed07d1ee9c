//! Host tests of the shared packet parser: every header layout an attacker
//! can send, built byte by byte.

use super::*;
use crate::{PROTO_SCTP, PROTO_TCP, PROTO_UDP};

extern crate std;
use std::vec::Vec;

struct Bytes<'a>(&'a [u8]);

impl PacketBytes for Bytes<'_> {
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }
}

const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn tcp(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::from([0u8; 20]);
    t[0..2].copy_from_slice(&src_port.to_be_bytes());
    t[2..4].copy_from_slice(&dst_port.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

fn udp(src_port: u16, dst_port: u16) -> Vec<u8> {
    let mut u = Vec::from([0u8; 8]);
    u[0..2].copy_from_slice(&src_port.to_be_bytes());
    u[2..4].copy_from_slice(&dst_port.to_be_bytes());
    u
}

fn ipv4(protocol: u8, flags_offset: u16, options: usize, payload: &[u8]) -> Vec<u8> {
    let header_len = 20 + options;
    let mut p = Vec::from([0u8; 20]);
    p[0] = 0x40 | (header_len / 4) as u8;
    p[6..8].copy_from_slice(&flags_offset.to_be_bytes());
    p[9] = protocol;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p.extend(core::iter::repeat_n(1u8, options));
    p.extend_from_slice(payload);
    p
}

/// An extension header of `kind` (8 bytes, or a Fragment header with
/// `fragment_offset`) followed by `next`.
fn ext(kind: u8, next: u8, fragment_offset: u16) -> Vec<u8> {
    let mut e = Vec::from([0u8; 8]);
    e[0] = next;
    match kind {
        IPV6_FRAGMENT => e[2..4].copy_from_slice(&(fragment_offset << 3).to_be_bytes()),
        // AH: length in 4-byte units minus 2 (8 bytes = 0).
        IPV6_AH => e[1] = 0,
        _ => e[1] = 0,
    }
    e
}

/// An IPv6 packet with the given chain of extension header kinds, then
/// `protocol` carrying `payload`.
fn ipv6(chain: &[u8], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::from([0u8; 40]);
    p[0] = 0x60;
    p[6] = chain.first().copied().unwrap_or(protocol);
    p[8..24].copy_from_slice(&SRC6);
    p[24..40].copy_from_slice(&DST6);
    for (i, kind) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(protocol);
        p.extend(ext(*kind, next, 0));
    }
    p.extend_from_slice(payload);
    p
}

fn parse_v4(p: &[u8]) -> Option<Headers> {
    parse(&Bytes(p), ETH_P_IP)
}

fn parse_v6(p: &[u8]) -> Option<Headers> {
    parse(&Bytes(p), ETH_P_IPV6)
}

fn ports(protocol: u8, src_port: u16, dst_port: u16, tcp_flags: u8) -> Transport {
    Transport::ports(protocol, src_port, dst_port, tcp_flags)
}

#[test]
fn ipv4_tcp_udp_and_sctp_carry_ports() {
    let syn = parse_v4(&ipv4(PROTO_TCP, 0, 0, &tcp(40000, 80, TCP_FLAG_SYN))).unwrap();
    assert_eq!(syn.transport, ports(PROTO_TCP, 40000, 80, TCP_FLAG_SYN));
    assert!(syn.transport.is_tcp_syn());
    assert_eq!(syn.src_addr, ipv4_mapped([10, 0, 0, 1]));
    assert_eq!(syn.dst_addr, ipv4_mapped([10, 0, 0, 2]));

    let synack = parse_v4(&ipv4(
        PROTO_TCP,
        0,
        0,
        &tcp(80, 4, TCP_FLAG_SYN | TCP_FLAG_ACK),
    ));
    assert!(!synack.unwrap().transport.is_tcp_syn());

    let dgram = parse_v4(&ipv4(PROTO_UDP, 0, 0, &udp(53, 5353))).unwrap();
    assert_eq!(dgram.transport, ports(PROTO_UDP, 53, 5353, 0));
    let sctp = parse_v4(&ipv4(PROTO_SCTP, 0, 0, &udp(7, 80))).unwrap();
    assert_eq!(sctp.transport, ports(PROTO_SCTP, 7, 80, 0));
}

#[test]
fn ipv4_options_move_the_transport_header() {
    let p = ipv4(PROTO_UDP, 0, 40, &udp(1, 2));
    assert_eq!(parse_v4(&p).unwrap().transport, ports(PROTO_UDP, 1, 2, 0));
}

#[test]
fn other_protocols_have_no_ports() {
    for protocol in [1u8, 2, 47, 136, 253, 254, 255] {
        let h = parse_v4(&ipv4(protocol, 0, 0, &[0; 16])).unwrap();
        assert_eq!(h.transport, Transport::other(protocol), "{protocol}");
        let h = parse_v6(&ipv6(&[], protocol, &[0; 16])).unwrap();
        assert_eq!(h.transport, Transport::other(protocol), "{protocol}");
    }
}

#[test]
fn later_ipv4_fragments_are_unclassified_first_ones_are_read() {
    // Offset 1 (8 bytes) with and without more-fragments.
    for flags_offset in [1u16, 0x2001, 0x1fff] {
        let h = parse_v4(&ipv4(PROTO_TCP, flags_offset, 0, &tcp(1, 80, TCP_FLAG_SYN))).unwrap();
        assert_eq!(h.transport, Transport::UNCLASSIFIED, "{flags_offset:#x}");
    }
    // More-fragments at offset 0 (and don't-fragment) is a first fragment.
    for flags_offset in [0x2000u16, 0x4000] {
        let h = parse_v4(&ipv4(PROTO_TCP, flags_offset, 0, &tcp(1, 80, TCP_FLAG_SYN))).unwrap();
        assert_eq!(h.transport, ports(PROTO_TCP, 1, 80, TCP_FLAG_SYN));
    }
}

#[test]
fn truncated_transport_headers_are_unclassified() {
    for cut in 0..4 {
        let full = ipv4(PROTO_TCP, 0, 0, &tcp(1, 80, TCP_FLAG_SYN));
        let h = parse_v4(&full[..20 + cut]).unwrap();
        assert_eq!(h.transport, Transport::UNCLASSIFIED, "cut {cut}");
    }
    let full = ipv4(PROTO_UDP, 0, 0, &udp(1, 2));
    assert_eq!(
        parse_v4(&full[..23]).unwrap().transport,
        Transport::UNCLASSIFIED
    );
}

/// RFC 1858's tiny fragment: a first fragment with the TCP ports but not
/// the flags is judged by its ports as a SYN, whatever the flags it hides,
/// so a deny on its port applies (unclassified, only port-less rules would).
#[test]
fn tcp_ports_without_flags_are_judged_as_a_syn() {
    for cut in 4..14 {
        let full = ipv4(PROTO_TCP, 0x2000, 0, &tcp(1, 80, TCP_FLAG_ACK));
        let h = parse_v4(&full[..20 + cut]).unwrap();
        assert_eq!(
            h.transport,
            ports(PROTO_TCP, 1, 80, TCP_FLAG_SYN),
            "cut {cut}"
        );
        assert!(h.transport.is_tcp_syn());
        let full = ipv6(&[IPV6_FRAGMENT], PROTO_TCP, &tcp(1, 80, 0));
        let h = parse_v6(&full[..48 + cut]).unwrap();
        assert_eq!(
            h.transport,
            ports(PROTO_TCP, 1, 80, TCP_FLAG_SYN),
            "v6 cut {cut}"
        );
    }
}

#[test]
fn malformed_ip_headers_have_no_addresses() {
    assert_eq!(parse_v4(&[0x45; 19]), None);
    let mut wrong_version = ipv4(PROTO_TCP, 0, 0, &tcp(1, 2, 0));
    wrong_version[0] = 0x65;
    assert_eq!(parse_v4(&wrong_version), None);
    let mut short_ihl = ipv4(PROTO_TCP, 0, 0, &tcp(1, 2, 0));
    short_ihl[0] = 0x44;
    assert_eq!(parse_v4(&short_ihl), None);
    assert_eq!(parse_v6(&[0x60; 39]), None);
    assert_eq!(parse(&Bytes(&[0u8; 64]), 0x0806), None);
}

#[test]
fn every_extension_header_kind_is_walked_up_to_the_limit() {
    let kinds = [
        IPV6_HOP_BY_HOP,
        IPV6_DEST_OPTS,
        IPV6_ROUTING,
        IPV6_FRAGMENT,
        IPV6_AH,
    ];
    for count in 0..=16usize {
        for kind in kinds {
            let chain: Vec<u8> = (0..count)
                .map(|i| {
                    if kind == IPV6_HOP_BY_HOP && i > 0 {
                        IPV6_DEST_OPTS
                    } else {
                        kind
                    }
                })
                .collect();
            for (protocol, payload) in [
                (PROTO_TCP, tcp(1, 80, TCP_FLAG_SYN)),
                (PROTO_UDP, udp(1, 80)),
            ] {
                let h = parse_v6(&ipv6(&chain, protocol, &payload)).unwrap();
                let want = if count <= MAX_IPV6_EXTENSION_HEADERS {
                    let flags = if protocol == PROTO_TCP {
                        TCP_FLAG_SYN
                    } else {
                        0
                    };
                    ports(protocol, 1, 80, flags)
                } else {
                    Transport::UNCLASSIFIED
                };
                assert_eq!(h.transport, want, "{count} x {kind}, protocol {protocol}");
                assert_eq!((h.src_addr, h.dst_addr), (SRC6, DST6));
            }
        }
    }
}

#[test]
fn longer_extension_headers_are_skipped_by_their_length() {
    // A Destination Options header of 24 bytes (length field 2), then UDP.
    let mut p = ipv6(&[], IPV6_DEST_OPTS, &[]);
    let mut opts = Vec::from([0u8; 24]);
    opts[0] = PROTO_UDP;
    opts[1] = 2;
    p.extend(opts);
    p.extend(udp(9, 53));
    assert_eq!(parse_v6(&p).unwrap().transport, ports(PROTO_UDP, 9, 53, 0));
    // An AH of 16 bytes (length field 2), then TCP.
    let mut p = ipv6(&[], IPV6_AH, &[]);
    let mut ah = Vec::from([0u8; 16]);
    ah[0] = PROTO_TCP;
    ah[1] = 2;
    p.extend(ah);
    p.extend(tcp(9, 443, TCP_FLAG_SYN));
    assert_eq!(
        parse_v6(&p).unwrap().transport,
        ports(PROTO_TCP, 9, 443, TCP_FLAG_SYN)
    );
}

#[test]
fn ipv6_fragments_past_the_first_and_esp_are_unclassified() {
    let mut p = Vec::from(&ipv6(&[], IPV6_FRAGMENT, &[])[..]);
    p.extend(ext(IPV6_FRAGMENT, PROTO_TCP, 1));
    p.extend(tcp(1, 80, TCP_FLAG_SYN));
    assert_eq!(parse_v6(&p).unwrap().transport, Transport::UNCLASSIFIED);
    // Atomic fragment (offset 0, no more fragments): read through.
    let atomic = ipv6(&[IPV6_FRAGMENT], PROTO_TCP, &tcp(1, 80, TCP_FLAG_SYN));
    assert_eq!(
        parse_v6(&atomic).unwrap().transport,
        ports(PROTO_TCP, 1, 80, TCP_FLAG_SYN)
    );
    let esp = ipv6(&[], IPV6_ESP, &[0; 32]);
    assert_eq!(parse_v6(&esp).unwrap().transport, Transport::UNCLASSIFIED);
    let esp_after_opts = ipv6(&[IPV6_DEST_OPTS], IPV6_ESP, &[0; 32]);
    assert_eq!(
        parse_v6(&esp_after_opts).unwrap().transport,
        Transport::UNCLASSIFIED
    );
}

#[test]
fn a_chain_cut_short_is_unclassified() {
    let full = ipv6(&[IPV6_DEST_OPTS, IPV6_DEST_OPTS], PROTO_UDP, &udp(1, 2));
    for len in 40..full.len() - 4 {
        let h = parse_v6(&full[..len]).unwrap();
        assert_eq!(h.transport, Transport::UNCLASSIFIED, "len {len}");
    }
}

#[test]
fn the_parser_never_panics_on_arbitrary_bytes() {
    // A cheap deterministic sweep; the fuzz target goes further.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..20_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 120) as usize;
        let mut bytes = Vec::with_capacity(len);
        let mut s = state;
        for _ in 0..len {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
            bytes.push((s >> 33) as u8);
        }
        if let Some(first) = bytes.first_mut() {
            *first = if state & 1 == 0 { 0x45 } else { 0x60 };
        }
        let _ = parse_v4(&bytes);
        let _ = parse_v6(&bytes);
    }
}
