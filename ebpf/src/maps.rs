//! The kernel side of the map ABI in `portcullis-common`.

use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use portcullis_common::{
    BackendKey, BackendValue, ConversationKey, ConversationValue, CounterKey, EndpointKey,
    EndpointValue, EventBudget, IdentityKeyData, IdentityValue, MeshClientKey, MeshHandoverKey,
    MeshOriginal, MeshPending, PolicyKeyData, PolicyValue, ServiceKey, ServiceValue, Settings,
    State, SvcReplyKey, SvcReplyValue, BACKENDS_CAPACITY, CONVERSATIONS_CAPACITY,
    COUNTERS_CAPACITY, ENDPOINTS_CAPACITY, EVENTS_RING_BYTES, IDENTITIES_CAPACITY, MESH_CAPACITY,
    POLICY_CAPACITY, SERVICES_CAPACITY, SVC_REPLIES_CAPACITY,
};

// Map names below must equal the `*_MAP` constants in portcullis-common.

#[map(name = "PCL_SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::pinned(1, 0);

#[map(name = "PCL_STATE")]
pub static STATE: Array<State> = Array::pinned(1, 0);

#[map(name = "PCL_ENDPOINTS")]
pub static ENDPOINTS: HashMap<EndpointKey, EndpointValue> = HashMap::pinned(ENDPOINTS_CAPACITY, 0);

#[map(name = "PCL_IDENTITIES")]
pub static IDENTITIES: LpmTrie<IdentityKeyData, IdentityValue> =
    LpmTrie::pinned(IDENTITIES_CAPACITY, 0);

#[map(name = "PCL_POLICY")]
pub static POLICY: LpmTrie<PolicyKeyData, PolicyValue> = LpmTrie::pinned(POLICY_CAPACITY, 0);

#[map(name = "PCL_COUNTERS")]
pub static COUNTERS: PerCpuHashMap<CounterKey, u64> = PerCpuHashMap::pinned(COUNTERS_CAPACITY, 0);

/// Decisions that could not be counted because [`COUNTERS`] was full, so a
/// full map shows up as a number rather than as silence.
#[map(name = "PCL_CNT_LOST")]
pub static COUNTERS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Datagram conversations, for exact replies (LRU: a full table forgets
/// the oldest, whose replies are then judged as new flows).
#[map(name = "PCL_CONVS")]
pub static CONVERSATIONS: LruHashMap<ConversationKey, ConversationValue> =
    LruHashMap::pinned(CONVERSATIONS_CAPACITY, 0);

/// Flow events for the agent (drops, audits, new allowed flows).
#[map(name = "PCL_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_RING_BYTES, 0);

/// Per-CPU token buckets limiting the event rate.
#[map(name = "PCL_EV_BUDGET")]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

/// Events not emitted: over the rate limit, or the ring was full.
#[map(name = "PCL_EV_LOST")]
pub static EVENTS_LOST: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Service frontends (cluster IP, port, protocol) → backends to translate to.
#[map(name = "PCL_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICES_CAPACITY, 0);

#[map(name = "PCL_BACKENDS")]
pub static BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::pinned(BACKENDS_CAPACITY, 0);

/// Translated connects and sends, by socket and backend, so UDP replies and
/// getpeername() can name the service address the application used.
#[map(name = "PCL_SVC_REPLY")]
pub static SVC_REPLIES: LruHashMap<SvcReplyKey, SvcReplyValue> =
    LruHashMap::pinned(SVC_REPLIES_CAPACITY, 0);

/// Redirected connects, by socket cookie, until their SYN (see `mesh`).
#[map(name = "PCL_MESH_PEND")]
pub static MESH_PENDING: LruHashMap<u64, MeshPending> = LruHashMap::pinned(MESH_CAPACITY, 0);

/// Redirected connections' original destinations, by the client's network
/// namespace and port: what the agent's outbound listener reads.
#[map(name = "PCL_MESH_ORIG")]
pub static MESH_ORIGINAL: LruHashMap<MeshClientKey, MeshOriginal> =
    LruHashMap::pinned(MESH_CAPACITY, 0);

/// The inbound proxy's hand-overs, by tuple, with the mark each was given:
/// written by the agent only. A plain hash map, not an LRU: a live
/// registration is never evicted, and a full map fails the agent's insert
/// (the hand-over is refused) rather than a stranger's entry.
#[map(name = "PCL_MESH_HAND")]
pub static MESH_HANDOVERS: HashMap<MeshHandoverKey, u32> = HashMap::pinned(MESH_CAPACITY, 0);
