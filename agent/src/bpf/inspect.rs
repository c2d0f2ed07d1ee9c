//! Reads a decision out of the pinned kernel maps, the way the kernel
//! programs make it, so `portcullis explain` can compare what is enforced
//! with what the policies say.

use std::path::Path;

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError};
use portcullis_common::{
    decide::{self, Flow, PolicyMaps},
    generation_of, EndpointKey, EndpointValue, IdentityKeyData, IdentityValue, PolicyKeyData,
    PolicyValue, State, ENDPOINTS_MAP, IDENTITIES_MAP, IDENTITY_KEY_FIXED_BITS,
    POLICY_KEY_FIXED_BITS, POLICY_MAP, PROTO_OTHER, STATE_MAP,
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
        Ok(generation_of(s.epoch))
    }

    /// The identity the active generation gives an address, if any.
    pub fn active_identity(&self, addr: &[u8; 16]) -> Result<Option<u32>, LoadError> {
        self.identity(self.generation()?, addr)
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

    /// Decides like the kernel for endpoint `ep`, with the same code
    /// (`portcullis_common::decide`) on the pinned maps. `protocol` is the
    /// IP protocol; protocols without ports are judged as such.
    pub fn decide(
        &self,
        ep: &EndpointValue,
        direction: u8,
        protocol: u8,
        peer_addr: [u8; 16],
        port: u16,
    ) -> Result<KernelDecision, LoadError> {
        let judged_as = decide::policy_protocol(protocol);
        let flow = Flow {
            generation: self.generation()?,
            direction,
            protocol: judged_as,
            peer_addr,
            peer_port: 0,
            policy_port: if judged_as == PROTO_OTHER { 0 } else { port },
        };
        let d = decide::decide(self, ep, &flow)?;
        Ok(KernelDecision {
            verdict: d.value.verdict,
            reason: d.value.reason,
            rule_cookie: d.value.rule_cookie,
            peer_identity: d.peer_identity,
        })
    }
}

impl PolicyMaps for KernelView {
    type Error = LoadError;

    fn identity(&self, generation: u32, addr: &[u8; 16]) -> Result<Option<u32>, LoadError> {
        let key = Key::new(
            IDENTITY_KEY_FIXED_BITS + 128,
            IdentityKeyData {
                generation_be: generation.to_be(),
                addr: *addr,
            },
        );
        Ok(found(self.identities.get(&key, 0), IDENTITIES_MAP)?.map(|v| v.identity))
    }

    fn policy(&self, key: &PolicyKeyData) -> Result<Option<PolicyValue>, LoadError> {
        found(
            self.policy
                .get(&Key::new(POLICY_KEY_FIXED_BITS + 16, *key), 0),
            POLICY_MAP,
        )
    }
}
