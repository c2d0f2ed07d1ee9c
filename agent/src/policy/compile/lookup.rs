//! The kernel's lookups over map contents held in memory, so the shared
//! decision (`portcullis_common::decide`) runs on a compile's output as it
//! runs in the kernel: the identity of the longest address prefix, and the
//! entry with the longest port prefix.

use std::convert::Infallible;

use portcullis_common::{decide::PolicyMaps, PolicyKeyData, PolicySlot, PolicyValue};

use super::{AddrPrefix, Compiled, RuleTable};

/// The entry of `rules` for `key` (exact endpoint, peer, direction and
/// protocol) whose port block holds the key's port most specifically.
pub fn longest_rule(rules: &RuleTable, key: &PolicyKeyData) -> Option<PolicyValue> {
    let slot = |port, port_prefix_len| PolicySlot {
        endpoint_id: u32::from_be(key.endpoint_id_be),
        peer_identity: u32::from_be(key.peer_identity_be),
        direction: key.direction,
        protocol: key.protocol,
        port,
        port_prefix_len,
    };
    let port = u16::from_be(key.port_be);
    let block = rules.blocks().get(&u32::from_be(key.endpoint_id_be))?;
    block
        .range(slot(0, 0)..=slot(u16::MAX, u8::MAX))
        .filter(|(s, _)| s.holds_port(port))
        .max_by_key(|(s, _)| s.port_prefix_len)
        .map(|(_, v)| *v)
}

/// Does the prefix of `len` bits of `prefix` hold `addr`?
pub fn prefix_holds(len: u8, prefix: &[u8; 16], addr: &[u8; 16]) -> bool {
    AddrPrefix { addr: *prefix, len }.contains(addr)
}

impl PolicyMaps for Compiled {
    type Error = Infallible;

    fn identity(&self, _generation: u32, addr: &[u8; 16]) -> Result<Option<u32>, Infallible> {
        Ok(self
            .identities
            .iter()
            .filter(|(prefix, _)| prefix.contains(addr))
            .max_by_key(|(prefix, _)| prefix.len)
            .map(|(_, id)| *id))
    }

    fn policy(&self, key: &PolicyKeyData) -> Result<Option<PolicyValue>, Infallible> {
        Ok(longest_rule(&self.rules, key))
    }
}
