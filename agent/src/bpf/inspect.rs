//! Reads a decision out of the pinned kernel maps, the way the kernel
//! programs make it, so `portcullis explain` can compare what is enforced
//! with what the policies say.

use std::path::Path;

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError};
use portcullis_common::{
    EndpointKey, EndpointValue, IdentityKeyData, IdentityValue, PolicyKeyData, PolicyValue, State,
    DIRECTION_INGRESS, ENDPOINTS_MAP, GENERATIONS, IDENTITIES_MAP, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_KEY_FIXED_BITS, IDENTITY_WORLD, POLICY_KEY_FIXED_BITS, POLICY_MAP, REASON_HOST,
    REASON_LOCAL, REASON_NOT_ISOLATED, STATE_MAP, VERDICT_ALLOW,
};

use super::loader::{map, open_pinned, LoadError};

/// The kernel's answer for one direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelDecision {
    pub verdict: u8,
    pub reason: u8,
    pub rule_cookie: u32,
    /// The identity the kernel resolved the peer address to.
    pub peer_identity: u32,
}

/// The pinned maps, opened read-only in spirit.
pub struct KernelView {
    state: Array<MapData, State>,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    identities: LpmTrie<MapData, IdentityKeyData, IdentityValue>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
}

fn open(pin_dir: &Path, name: &'static str) -> Result<Map, LoadError> {
    let data = open_pinned(pin_dir, name)?;
    Ok(match name {
        STATE_MAP => Map::Array(data),
        ENDPOINTS_MAP => Map::HashMap(data),
        _ => Map::LpmTrie(data),
    })
}

/// A missing key is an answer, not an error.
fn found<V>(r: Result<V, MapError>, map: &'static str) -> Result<Option<V>, LoadError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(source) => Err(LoadError::Map { map, source }),
    }
}

impl KernelView {
    pub fn open(pin_dir: &Path) -> Result<Self, LoadError> {
        Ok(Self {
            state: Array::try_from(open(pin_dir, STATE_MAP)?).map_err(map(STATE_MAP))?,
            endpoints: HashMap::try_from(open(pin_dir, ENDPOINTS_MAP)?)
                .map_err(map(ENDPOINTS_MAP))?,
            identities: LpmTrie::try_from(open(pin_dir, IDENTITIES_MAP)?)
                .map_err(map(IDENTITIES_MAP))?,
            policy: LpmTrie::try_from(open(pin_dir, POLICY_MAP)?).map_err(map(POLICY_MAP))?,
        })
    }

    fn generation(&self) -> Result<u32, LoadError> {
        let s = self.state.get(&0, 0).map_err(map(STATE_MAP))?;
        Ok(s.active_generation % GENERATIONS)
    }

    /// The enforced endpoint registered for a cgroup id, if any.
    pub fn endpoint(&self, cgroup_id: u64) -> Result<Option<EndpointValue>, LoadError> {
        let key = EndpointKey {
            cgroup_id,
            generation: self.generation()?,
            _pad: 0,
        };
        found(self.endpoints.get(&key, 0), ENDPOINTS_MAP)
    }

    /// Decides like the kernel's `verdict::decide` for endpoint `ep`.
    pub fn decide(
        &self,
        ep: &EndpointValue,
        direction: u8,
        protocol: u8,
        peer_addr: [u8; 16],
        port: u16,
    ) -> Result<KernelDecision, LoadError> {
        let generation = self.generation()?;
        let local = KernelDecision {
            verdict: VERDICT_ALLOW,
            reason: REASON_LOCAL,
            rule_cookie: 0,
            peer_identity: IDENTITY_WORLD,
        };
        let loopback4 =
            peer_addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] && peer_addr[12] == 127;
        if loopback4
            || peer_addr == std::net::Ipv6Addr::LOCALHOST.octets()
            || peer_addr == ep.ipv4_mapped
            || peer_addr == ep.ipv6
        {
            return Ok(local);
        }
        let identity_key = Key::new(
            IDENTITY_KEY_FIXED_BITS + 128,
            IdentityKeyData {
                generation_be: generation.to_be(),
                addr: peer_addr,
            },
        );
        let identity = found(self.identities.get(&identity_key, 0), IDENTITIES_MAP)?
            .map_or(IDENTITY_WORLD, |v| v.identity);
        if direction == DIRECTION_INGRESS && identity == IDENTITY_HOST {
            return Ok(KernelDecision {
                reason: REASON_HOST,
                peer_identity: identity,
                ..local
            });
        }
        for peer in [identity, IDENTITY_ANY] {
            let key = Key::new(
                POLICY_KEY_FIXED_BITS + 16,
                PolicyKeyData {
                    generation_be: generation.to_be(),
                    endpoint_id_be: ep.endpoint_id.to_be(),
                    peer_identity_be: peer.to_be(),
                    direction,
                    protocol,
                    port_be: port.to_be(),
                },
            );
            if let Some(v) = found(self.policy.get(&key, 0), POLICY_MAP)? {
                return Ok(KernelDecision {
                    verdict: v.verdict,
                    reason: v.reason,
                    rule_cookie: v.rule_cookie,
                    peer_identity: identity,
                });
            }
        }
        Ok(KernelDecision {
            reason: REASON_NOT_ISOLATED,
            peer_identity: identity,
            ..local
        })
    }
}
