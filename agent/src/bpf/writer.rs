//! Writes desired map contents so that no half-applied state is ever visible.
//!
//! The endpoint, identity, policy, service and backend maps hold two
//! generations. A change is
//! written completely into the inactive generation, then one write to the
//! state map flips the kernel over to it. If anything fails before the flip,
//! the active generation — what is enforced now — is untouched.
//!
//! To keep updates proportional to the change, the writer remembers what each
//! generation holds (its shadow) and writes only the difference. A generation
//! whose contents are unknown (first start over pinned maps, or a failed
//! write) is reconciled by scanning the map.

use std::{collections::BTreeMap, sync::Arc};

use crate::policy::compile::{Block, RuleTable};

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError};
use portcullis_common::{
    generation_of, BackendKey, BackendValue, EndpointKey, EndpointValue, IdentityKeyData,
    IdentityValue, PolicyKeyData, PolicySlot, PolicyValue, ServiceKey, ServiceSlot, ServiceValue,
    State, ABI_VERSION, BACKENDS_CAPACITY, BACKENDS_MAP, ENDPOINTS_CAPACITY, ENDPOINTS_MAP,
    GENERATIONS, IDENTITIES_CAPACITY, IDENTITIES_MAP, IDENTITY_KEY_FIXED_BITS, POLICY_CAPACITY,
    POLICY_KEY_FIXED_BITS, POLICY_MAP, SERVICES_CAPACITY, SERVICES_MAP, STATE_MAP,
};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(
        "map {map} would need {needed} entries but one generation holds at most {capacity}; \
         nothing was changed"
    )]
    Capacity {
        map: &'static str,
        needed: usize,
        capacity: usize,
    },
    #[error("writing map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

/// Everything the kernel should see, without generations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    /// cgroup id → endpoint.
    pub endpoints: BTreeMap<u64, EndpointValue>,
    /// (address prefix length in the 128-bit space, address) → identity.
    /// Shared with the compile's, while it is the same (see
    /// `reconcile::kept`).
    pub identities: Arc<BTreeMap<(u8, [u8; 16]), u32>>,
    /// Shared with the compile it came from (26,000 entries at 10,000
    /// rules were a copy each pass), and so are its endpoints' blocks.
    pub policy: Arc<RuleTable>,
    /// Service frontend → (service id, backend count).
    pub services: BTreeMap<ServiceSlot, ServiceValue>,
    /// (service id, index below the frontend's backend count) → backend.
    pub backends: BTreeMap<(u32, u32), BackendValue>,
}

/// Entry counts after an apply, per map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapUsage {
    pub endpoints: usize,
    pub identities: usize,
    pub policy: usize,
    pub services: usize,
    pub backends: usize,
}

/// The kernel's lookups over the state about to be written (for tests and
/// checks that decide as the kernel will).
impl portcullis_common::decide::PolicyMaps for DesiredState {
    type Error = std::convert::Infallible;

    fn identity(&self, _generation: u32, addr: &[u8; 16]) -> Result<Option<u32>, Self::Error> {
        Ok(self
            .identities
            .iter()
            .filter(|((len, prefix), _)| {
                crate::policy::compile::lookup::prefix_holds(*len, prefix, addr)
            })
            .max_by_key(|((len, _), _)| *len)
            .map(|(_, id)| *id))
    }

    fn policy(&self, key: &PolicyKeyData) -> Result<Option<PolicyValue>, Self::Error> {
        Ok(crate::policy::compile::lookup::longest_rule(
            &self.policy,
            key,
        ))
    }
}

impl DesiredState {
    pub fn usage(&self) -> MapUsage {
        MapUsage {
            endpoints: self.endpoints.len(),
            identities: self.identities.len(),
            policy: self.policy.len(),
            services: self.services.len(),
            backends: self.backends.len(),
        }
    }
}

/// Per-generation capacities (each map holds two generations).
pub fn generation_capacity() -> MapUsage {
    let per = |c: u32| (c / GENERATIONS) as usize;
    MapUsage {
        endpoints: per(ENDPOINTS_CAPACITY),
        identities: per(IDENTITIES_CAPACITY),
        policy: per(POLICY_CAPACITY),
        services: per(SERVICES_CAPACITY),
        backends: per(BACKENDS_CAPACITY),
    }
}

pub struct MapWriter {
    state: Array<MapData, State>,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    identities: LpmTrie<MapData, IdentityKeyData, IdentityValue>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    /// What each generation holds, when known.
    shadows: [Option<DesiredState>; GENERATIONS as usize],
    /// What one generation may hold.
    capacity: MapUsage,
}

fn map_err(map: &'static str) -> impl Fn(MapError) -> WriteError {
    move |source| WriteError::Map { map, source }
}

impl MapWriter {
    pub fn new(
        state: Array<MapData, State>,
        endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
        identities: LpmTrie<MapData, IdentityKeyData, IdentityValue>,
        policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
        services: HashMap<MapData, ServiceKey, ServiceValue>,
        backends: HashMap<MapData, BackendKey, BackendValue>,
        capacity: MapUsage,
    ) -> Self {
        Self {
            state,
            endpoints,
            identities,
            policy,
            services,
            backends,
            shadows: [None, None],
            capacity,
        }
    }

    /// What one generation may hold.
    pub fn capacity(&self) -> MapUsage {
        self.capacity
    }

    /// Whether the active generation is known to hold exactly `desired`
    /// (as this writer wrote it), so writing it again would change nothing.
    pub fn holds(&self, desired: &DesiredState) -> bool {
        self.active_generation()
            .ok()
            .and_then(|active| self.shadows[active as usize].as_ref())
            .is_some_and(|written| written == desired)
    }

    pub fn active_generation(&self) -> Result<u32, WriteError> {
        Ok(generation_of(self.epoch()?))
    }

    /// The pinned flip count, continued across agent restarts so that an
    /// epoch a live conversation remembers never comes back early.
    fn epoch(&self) -> Result<u32, WriteError> {
        let s = self.state.get(&0, 0).map_err(map_err(STATE_MAP))?;
        Ok(s.epoch)
    }

    /// Makes `desired` the enforced state. On error the enforced state is
    /// unchanged.
    pub fn apply(&mut self, desired: DesiredState) -> Result<MapUsage, WriteError> {
        check_capacity(&desired, self.capacity)?;
        let epoch = self.epoch()?.wrapping_add(1);
        let next = generation_of(epoch);
        let shadow = self.shadows[next as usize].take();
        // The shadow is only restored once every map of `next` matches.
        self.sync_generation(next, shadow.as_ref(), &desired)?;
        self.state
            .set(
                0,
                State {
                    epoch,
                    abi_version: ABI_VERSION,
                },
                0,
            )
            .map_err(map_err(STATE_MAP))?;
        let usage = desired.usage();
        // Kept, not copied: the caller has no more use for it.
        self.shadows[next as usize] = Some(desired);
        Ok(usage)
    }

    fn sync_generation(
        &mut self,
        generation: u32,
        shadow: Option<&DesiredState>,
        desired: &DesiredState,
    ) -> Result<(), WriteError> {
        let g = generation;
        let endpoints = &mut self.endpoints;
        let present = match shadow {
            Some(_) => Vec::new(),
            None => scan(endpoints.keys(), |k: &EndpointKey| {
                (k.generation == g).then_some(k.cgroup_id)
            })
            .map_err(map_err(ENDPOINTS_MAP))?,
        };
        sync(
            present,
            shadow.map(|s| &s.endpoints),
            &desired.endpoints,
            endpoints,
            |m, id| m.remove(&endpoint_key(g, *id)),
            |m, id, v| m.insert(endpoint_key(g, *id), v, 0),
        )
        .map_err(map_err(ENDPOINTS_MAP))?;

        let identities = &mut self.identities;
        let present = match shadow {
            Some(_) => Vec::new(),
            None => scan(identities.keys(), |k: &Key<IdentityKeyData>| {
                let d = k.data();
                (u32::from_be(d.generation_be) == g)
                    .then(|| ((k.prefix_len() - IDENTITY_KEY_FIXED_BITS) as u8, d.addr))
            })
            .map_err(map_err(IDENTITIES_MAP))?,
        };
        sync(
            present,
            shadow.map(|s| &*s.identities),
            &*desired.identities,
            identities,
            |m, k| m.remove(&identity_key(g, *k)),
            |m, k, v| m.insert(&identity_key(g, *k), identity_value(v), 0),
        )
        .map_err(map_err(IDENTITIES_MAP))?;

        let policy = &mut self.policy;
        let present = match shadow {
            Some(_) => Vec::new(),
            None => scan(policy.keys(), |k: &Key<PolicyKeyData>| {
                let d = k.data();
                (u32::from_be(d.generation_be) == g).then(|| policy_slot(k))
            })
            .map_err(map_err(POLICY_MAP))?,
        };
        sync_blocks(
            present,
            shadow.map(|s| &*s.policy),
            &desired.policy,
            policy,
            |m, k| m.remove(&policy_key(g, k)),
            |m, k, v| m.insert(&policy_key(g, k), v, 0),
        )
        .map_err(map_err(POLICY_MAP))?;

        let services = &mut self.services;
        let present = match shadow {
            Some(_) => Vec::new(),
            None => scan(services.keys(), |k: &ServiceKey| {
                (k.generation == g).then_some(ServiceSlot {
                    addr: k.addr,
                    port: k.port,
                    protocol: k.protocol,
                })
            })
            .map_err(map_err(SERVICES_MAP))?,
        };
        sync(
            present,
            shadow.map(|s| &s.services),
            &desired.services,
            services,
            |m, k| m.remove(&service_key(g, k)),
            |m, k, v| m.insert(service_key(g, k), v, 0),
        )
        .map_err(map_err(SERVICES_MAP))?;

        let backends = &mut self.backends;
        let present = match shadow {
            Some(_) => Vec::new(),
            None => scan(backends.keys(), |k: &BackendKey| {
                (k.generation == g).then_some((k.service_id, k.index))
            })
            .map_err(map_err(BACKENDS_MAP))?,
        };
        sync(
            present,
            shadow.map(|s| &s.backends),
            &desired.backends,
            backends,
            |m, k| m.remove(&backend_key(g, *k)),
            |m, k, v| m.insert(backend_key(g, *k), v, 0),
        )
        .map_err(map_err(BACKENDS_MAP))
    }
}

fn check_capacity(desired: &DesiredState, cap: MapUsage) -> Result<(), WriteError> {
    let used = desired.usage();
    for (map, needed, capacity) in [
        (ENDPOINTS_MAP, used.endpoints, cap.endpoints),
        (IDENTITIES_MAP, used.identities, cap.identities),
        (POLICY_MAP, used.policy, cap.policy),
        (SERVICES_MAP, used.services, cap.services),
        (BACKENDS_MAP, used.backends, cap.backends),
    ] {
        if needed > capacity {
            return Err(WriteError::Capacity {
                map,
                needed,
                capacity,
            });
        }
    }
    Ok(())
}

/// Collects the generation-free keys of one generation from a map's keys.
fn scan<MK, K: Ord>(
    keys: impl Iterator<Item = Result<MK, MapError>>,
    select: impl Fn(&MK) -> Option<K>,
) -> Result<Vec<K>, MapError> {
    let mut out = Vec::new();
    for k in keys {
        if let Some(k) = select(&k?) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Deletes what is present but not desired, then writes what differs.
/// Deleting first frees room before new entries need it.
/// `present` is read only when what the generation holds is not `known`.
fn sync<M, K: Ord, V: PartialEq + Copy>(
    present: Vec<K>,
    known: Option<&BTreeMap<K, V>>,
    desired: &BTreeMap<K, V>,
    map: &mut M,
    remove: impl Fn(&mut M, &K) -> Result<(), MapError>,
    insert: impl Fn(&mut M, &K, V) -> Result<(), MapError>,
) -> Result<(), MapError> {
    let removed = tolerant(remove);
    let Some(known) = known else {
        for k in present.iter().filter(|k| !desired.contains_key(k)) {
            removed(map, k)?;
        }
        for (k, v) in desired {
            insert(map, k, *v)?;
        }
        return Ok(());
    };
    if std::ptr::eq(known, desired) {
        // One map, shared by passes that did not change it.
        return Ok(());
    }
    // Both maps walked side by side in key order: tens of thousands of
    // entries compared without a lookup each.
    let mut wanted = desired.keys().peekable();
    for k in known.keys() {
        while wanted.next_if(|w| *w < k).is_some() {}
        if wanted.peek() != Some(&k) {
            removed(map, k)?;
        }
    }
    let mut had = known.iter().peekable();
    for (k, v) in desired {
        while had.next_if(|(h, _)| *h < k).is_some() {}
        if had.peek() != Some(&(k, v)) {
            insert(map, k, *v)?;
        }
    }
    Ok(())
}

/// `remove`, for which a key already gone is not an error.
fn tolerant<M, K>(
    remove: impl Fn(&mut M, &K) -> Result<(), MapError>,
) -> impl Fn(&mut M, &K) -> Result<(), MapError> {
    move |map, k| match remove(map, k) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(e),
    }
}

/// [`sync`] for the policy map, a block per endpoint: a block the
/// generation holds already (the very one, shared since it was written) is
/// skipped without comparing its entries, so a pass costs what it changed
/// rather than a walk over every entry twice.
fn sync_blocks<M>(
    present: Vec<PolicySlot>,
    known: Option<&RuleTable>,
    desired: &RuleTable,
    map: &mut M,
    remove: impl Fn(&mut M, &PolicySlot) -> Result<(), MapError>,
    insert: impl Fn(&mut M, &PolicySlot, PolicyValue) -> Result<(), MapError>,
) -> Result<(), MapError> {
    let Some(known) = known else {
        // Unknown contents: what is present goes unless desired, and every
        // desired entry is written.
        let removed = tolerant(&remove);
        for k in present.iter().filter(|k| desired.get(k).is_none()) {
            removed(map, k)?;
        }
        for (k, v) in desired.iter() {
            insert(map, k, *v)?;
        }
        return Ok(());
    };
    let empty = Block::new();
    let (had, wanted) = (known.blocks(), desired.blocks());
    // As in `sync`, every deletion before any write, so the generation
    // never holds more than the larger of what it had and what is desired.
    let written = |_: &mut M, _: &PolicySlot, _: PolicyValue| Ok(());
    let kept = |_: &mut M, _: &PolicySlot| Ok(());
    for (id, block) in had {
        let now = block_of(wanted, id, &empty);
        if !std::ptr::eq(&**block, now) {
            sync(Vec::new(), Some(&**block), now, map, &remove, written)?;
        }
    }
    for (id, block) in wanted {
        let before = block_of(had, id, &empty);
        if !std::ptr::eq(before, &**block) {
            sync(Vec::new(), Some(before), block, map, kept, &insert)?;
        }
    }
    Ok(())
}

/// An endpoint's block, or `empty` when it has none.
fn block_of<'a>(blocks: &'a BTreeMap<u32, Arc<Block>>, id: &u32, empty: &'a Block) -> &'a Block {
    blocks.get(id).map_or(empty, |b| b)
}

fn endpoint_key(generation: u32, cgroup_id: u64) -> EndpointKey {
    EndpointKey {
        cgroup_id,
        generation,
        _pad: 0,
    }
}

fn service_key(generation: u32, s: &ServiceSlot) -> ServiceKey {
    ServiceKey {
        generation,
        addr: s.addr,
        port: s.port,
        protocol: s.protocol,
        _pad: 0,
    }
}

fn backend_key(generation: u32, (service_id, index): (u32, u32)) -> BackendKey {
    BackendKey {
        generation,
        service_id,
        index,
    }
}

fn identity_key(generation: u32, (len, addr): (u8, [u8; 16])) -> Key<IdentityKeyData> {
    Key::new(
        IDENTITY_KEY_FIXED_BITS + u32::from(len),
        IdentityKeyData {
            generation_be: generation.to_be(),
            addr: mask_addr(addr, len),
        },
    )
}

fn identity_value(identity: u32) -> IdentityValue {
    IdentityValue { identity, _pad: 0 }
}

fn policy_key(generation: u32, s: &PolicySlot) -> Key<PolicyKeyData> {
    Key::new(
        POLICY_KEY_FIXED_BITS + u32::from(s.port_prefix_len),
        PolicyKeyData {
            generation_be: generation.to_be(),
            endpoint_id_be: s.endpoint_id.to_be(),
            peer_identity_be: s.peer_identity.to_be(),
            direction: s.direction,
            protocol: s.protocol,
            // Bits past the prefix are ignored by the trie but stored; keep
            // them zero so keys read back compare equal to desired ones.
            port_be: mask_port(s.port, s.port_prefix_len).to_be(),
        },
    )
}

fn mask_port(port: u16, prefix_len: u8) -> u16 {
    match prefix_len {
        0 => 0,
        l if l >= 16 => port,
        l => port & !(u16::MAX >> l),
    }
}

fn mask_addr(mut addr: [u8; 16], prefix_len: u8) -> [u8; 16] {
    for (i, byte) in addr.iter_mut().enumerate() {
        let bits_before = (i * 8) as u32;
        let keep = u32::from(prefix_len).saturating_sub(bits_before).min(8);
        *byte &= !(0xffu16 >> keep) as u8;
    }
    addr
}

fn policy_slot(k: &Key<PolicyKeyData>) -> PolicySlot {
    let d = k.data();
    PolicySlot {
        endpoint_id: u32::from_be(d.endpoint_id_be),
        peer_identity: u32::from_be(d.peer_identity_be),
        direction: d.direction,
        protocol: d.protocol,
        port: u16::from_be(d.port_be),
        port_prefix_len: (k.prefix_len() - POLICY_KEY_FIXED_BITS) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::{collection::btree_map, prelude::*};

    /// A map that records what `sync` does to it.
    fn synced(
        start: &BTreeMap<u8, u8>,
        known: Option<&BTreeMap<u8, u8>>,
        desired: &BTreeMap<u8, u8>,
    ) -> (BTreeMap<u8, u8>, usize) {
        let mut map = (start.clone(), 0usize);
        sync(
            start.keys().copied().collect(),
            known,
            desired,
            &mut map,
            |(m, _), k| m.remove(k).map(|_| ()).ok_or(MapError::KeyNotFound),
            |(m, writes), k, v| {
                *writes += 1;
                m.insert(*k, v);
                Ok(())
            },
        )
        .expect("in-memory map");
        map
    }

    proptest! {
        /// Whatever the generation held, it ends up holding exactly what is
        /// desired; when what it held is known, only entries that differ
        /// are written.
        #[test]
        fn sync_makes_the_generation_equal_what_is_desired(
            held in btree_map(any::<u8>(), 0u8..4, 0..64),
            desired in btree_map(any::<u8>(), 0u8..4, 0..64),
        ) {
            let (after, _) = synced(&held, None, &desired);
            prop_assert_eq!(&after, &desired);
            let (after, writes) = synced(&held, Some(&held), &desired);
            prop_assert_eq!(&after, &desired);
            let differing = desired.iter().filter(|(k, v)| held.get(k) != Some(v)).count();
            prop_assert_eq!(writes, differing);
        }
    }

    /// A table from small numbers: endpoint, peer and a cookie each.
    fn table(entries: &[(u8, u8, u8)]) -> RuleTable {
        entries
            .iter()
            .map(|(endpoint, peer, cookie)| {
                let slot = PolicySlot {
                    endpoint_id: u32::from(*endpoint % 8),
                    peer_identity: u32::from(*peer),
                    ..PolicySlot::default()
                };
                let value = PolicyValue {
                    rule_cookie: u32::from(*cookie % 4),
                    ..PolicyValue::default()
                };
                (slot, value)
            })
            .collect()
    }

    /// A map that records what `sync_blocks` does to it: its contents,
    /// the writes, and the most entries it held at once.
    fn synced_blocks(
        start: &RuleTable,
        known: Option<&RuleTable>,
        desired: &RuleTable,
    ) -> (BTreeMap<PolicySlot, PolicyValue>, usize, usize) {
        let held: BTreeMap<_, _> = start.iter().map(|(k, v)| (*k, *v)).collect();
        let most = held.len();
        let mut map = (held, 0usize, most);
        sync_blocks(
            start.keys().copied().collect(),
            known,
            desired,
            &mut map,
            |(m, _, _), k| m.remove(k).map(|_| ()).ok_or(MapError::KeyNotFound),
            |(m, writes, most), k, v| {
                *writes += 1;
                m.insert(*k, v);
                *most = (*most).max(m.len());
                Ok(())
            },
        )
        .expect("in-memory map");
        map
    }

    proptest! {
        /// The same for the policy map's blocks: exactly what is desired,
        /// only differing entries written, blocks shared with what was
        /// written before skipped, and never more entries at once than
        /// the larger of before and after (deletions first).
        #[test]
        fn block_sync_makes_the_generation_equal_what_is_desired(
            held in proptest::collection::vec(any::<(u8, u8, u8)>(), 0..48),
            changes in proptest::collection::vec(any::<(u8, u8, u8)>(), 0..16),
            withdrawn in proptest::collection::vec(0u8..8, 0..3),
        ) {
            let held = table(&held);
            // What a compile does: starts from the table it wrote before,
            // so untouched blocks stay shared.
            let mut desired = held.clone();
            for endpoint in withdrawn {
                desired.withdraw(u32::from(endpoint), 0);
            }
            for (slot, value) in table(&changes).iter() {
                desired.insert(*slot, *value);
            }
            let wanted: BTreeMap<_, _> = desired.iter().map(|(k, v)| (*k, *v)).collect();
            let (after, _, _) = synced_blocks(&held, None, &desired);
            prop_assert_eq!(&after, &wanted);
            let (after, writes, most) = synced_blocks(&held, Some(&held), &desired);
            prop_assert_eq!(&after, &wanted);
            let differing = desired.iter().filter(|(k, v)| held.get(k) != Some(v)).count();
            prop_assert_eq!(writes, differing);
            prop_assert!(most <= held.len().max(desired.len()));
            // A desired table equal but not shared is compared entry by
            // entry, and still writes nothing.
            let copy: RuleTable = held.iter().map(|(k, v)| (*k, *v)).collect();
            let (after, writes, _) = synced_blocks(&held, Some(&held), &copy);
            let was: BTreeMap<_, _> = held.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(&after, &was);
            prop_assert_eq!(writes, 0);
        }
    }

    #[test]
    fn masks_keep_only_prefix_bits() {
        assert_eq!(mask_port(0x1234, 0), 0);
        assert_eq!(mask_port(0x1234, 8), 0x1200);
        assert_eq!(mask_port(0x1234, 16), 0x1234);
        let a = [0xff; 16];
        let m = mask_addr(a, 100);
        assert_eq!(m[11], 0xff);
        assert_eq!(m[12], 0xf0);
        assert_eq!(m[13], 0);
        assert_eq!(mask_addr(a, 128), a);
    }

    #[test]
    fn capacity_error_names_the_map() {
        let mut d = DesiredState::default();
        for i in 0..=generation_capacity().endpoints as u64 {
            d.endpoints.insert(i, EndpointValue::default());
        }
        let e = check_capacity(&d, generation_capacity())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(ENDPOINTS_MAP) && e.contains("nothing was changed"),
            "{e}"
        );
    }
}
