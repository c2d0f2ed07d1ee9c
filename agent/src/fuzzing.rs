//! What the fuzz targets (agent/fuzz) check, as library functions, so the
//! ordinary test suite replays their committed corpora through exactly the
//! same checks without an instrumented build (`agent/tests/fuzz_corpus.rs`).
//! Each panics when the property fails.

use std::path::Path;

use portcullis_common::packet::{self, Class, PacketBytes, ETH_P_IP, ETH_P_IPV6};

use crate::{
    policy::{
        model::names,
        parse::{parse_inventory, parse_policies},
    },
    source::file::error_chain,
};

/// Longest message a bad file may produce (values are abbreviated).
pub const MAX_MESSAGE: usize = 4096;

fn bounded(message: String) {
    assert!(
        message.len() <= MAX_MESSAGE,
        "a {} byte message: {}",
        message.len(),
        message.chars().take(300).collect::<String>()
    );
}

/// A policy file, as the file source reads it: never a panic, accepted
/// names are valid, and an error never carries an unbounded piece of the
/// input.
pub fn policy_file(data: &[u8]) {
    // The file source reads text; other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_policies(Path::new("fuzz.yaml"), text) {
        Ok(policies) => {
            for p in &policies {
                let name = &p.reference.name;
                assert!(names::dns1123_subdomain(name).is_ok(), "accepted {name:?}");
                let namespace = &p.reference.namespace;
                assert!(
                    namespace.is_empty() || names::dns1123_label(namespace).is_ok(),
                    "accepted namespace {namespace:?}"
                );
            }
        }
        Err(e) => bounded(error_chain(&e)),
    }
}

/// The workloads file: never a panic, an accepted inventory is consistent,
/// and an error never carries an unbounded piece of the input.
pub fn workloads_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_inventory(Path::new("workloads.yaml"), text) {
        Ok(inventory) => assert_eq!(inventory.check(), Ok(())),
        Err(e) => bounded(error_chain(&e)),
    }
}

struct Bytes<'a>(&'a [u8]);

impl PacketBytes for Bytes<'_> {
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }
}

/// The shared packet parser on any bytes, as IPv4 and as IPv6: never a
/// panic, and what it reports is consistent (ports only where it says it
/// read them, and only within the packet).
pub fn packet(data: &[u8]) {
    for ethertype in [ETH_P_IP, ETH_P_IPV6] {
        let Some(h) = packet::parse(&Bytes(data), ethertype) else {
            continue;
        };
        let t = h.transport;
        if t.class != Class::Ports {
            assert_eq!((t.src_port, t.dst_port, t.tcp_flags), (0, 0, 0), "{t:?}");
        }
        if t.class == Class::Unclassified {
            assert_eq!(t.protocol, 0, "{t:?}");
        }
        assert!(data.len() >= 20, "addresses from {} bytes", data.len());
    }
}
