//! The map ABI shared by the Portcullis kernel programs and the agent.
//!
//! Every type here is `#[repr(C)]`, `Copy`, has explicit padding and a size
//! assertion, and carries no `bool` or Rust `enum` (the kernel side writes raw
//! integers; the agent converts them with `TryFrom`).
//!
//! # Generations
//! The endpoint, identity, policy, service and backend maps hold two generations of state side by
//! side; the `generation` field of every key says which. The kernel reads the
//! active generation once per decision from [`STATE_MAP`], so a decision always
//! sees one complete generation. The agent writes the inactive generation, then
//! flips it active by counting [`State::epoch`] up: no half-applied policy is
//! ever visible.
//!
//! # Addresses
//! All addresses are 16 bytes. IPv4 addresses are stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one LPM trie covers both families and a dual-stack
//! socket connecting to a mapped address is judged like an IPv4 one.
#![cfg_attr(not(test), no_std)]

pub mod decide;
pub mod packet;

/// Map names, shared so both sides agree (kernel limit: 15 characters).
pub const ENDPOINTS_MAP: &str = "PCL_ENDPOINTS";
pub const IDENTITIES_MAP: &str = "PCL_IDENTITIES";
pub const POLICY_MAP: &str = "PCL_POLICY";
pub const STATE_MAP: &str = "PCL_STATE";
pub const COUNTERS_MAP: &str = "PCL_COUNTERS";
pub const CONVERSATIONS_MAP: &str = "PCL_CONVS";
pub const EVENTS_MAP: &str = "PCL_EVENTS";
pub const EVENTS_LOST_MAP: &str = "PCL_EV_LOST";
pub const SETTINGS_MAP: &str = "PCL_SETTINGS";
pub const SERVICES_MAP: &str = "PCL_SERVICES";
pub const BACKENDS_MAP: &str = "PCL_BACKENDS";
pub const SVC_REPLIES_MAP: &str = "PCL_SVC_REPLY";
/// Redirected connects not yet connected, by socket cookie (see [`mesh`]).
pub const MESH_PENDING_MAP: &str = "PCL_MESH_PEND";
/// Redirected connections' original destinations, by the client's
/// network namespace and port, for the agent's outbound listener.
pub const MESH_ORIGINAL_MAP: &str = "PCL_MESH_ORIG";
/// The inbound proxy's hand-overs in progress, by tuple (see
/// [`MeshHandoverKey`]).
pub const MESH_HANDOVER_MAP: &str = "PCL_MESH_HAND";

/// Program names (the Rust function names in the kernel object).
pub const PROG_CONNECT4: &str = "pcl_connect4";
pub const PROG_CONNECT6: &str = "pcl_connect6";
pub const PROG_SENDMSG4: &str = "pcl_sendmsg4";
pub const PROG_SENDMSG6: &str = "pcl_sendmsg6";
pub const PROG_INGRESS: &str = "pcl_ingress";
pub const PROG_EGRESS: &str = "pcl_egress";
/// The tc program for frames of packet sockets, attached to each enforced
/// pod's interfaces rather than to the cgroup root.
pub const PROG_TC_EGRESS: &str = "pcl_tc_egress";
/// Keeps enforced pods' packet sockets from bypassing tc.
pub const PROG_SETSOCKOPT: &str = "pcl_setsockopt";
/// The BPF LSM program refusing packet sockets to pods ingress policy restricts,
/// and the LSM hook it attaches to.
pub const PROG_SOCKET_CREATE: &str = "pcl_socket_create";
pub const LSM_HOOK_SOCKET_CREATE: &str = "socket_create";
/// The BPF LSM program refusing PACKET_QDISC_BYPASS to enforced pods for
/// every process, 32-bit ones included (the kernel runs no cgroup sockopt
/// program for their setsockopt()), and its hook.
pub const PROG_SOCKET_SETSOCKOPT: &str = "pcl_socket_setsockopt";
pub const LSM_HOOK_SOCKET_SETSOCKOPT: &str = "socket_setsockopt";
/// What every BPF LSM program's name starts with (their pinned links too).
pub const LSM_PROGRAM_PREFIX: &str = "pcl_socket_";
pub const PROG_RECVMSG4: &str = "pcl_recvmsg4";
pub const PROG_RECVMSG6: &str = "pcl_recvmsg6";
pub const PROG_GETPEERNAME4: &str = "pcl_getpeername4";
pub const PROG_GETPEERNAME6: &str = "pcl_getpeername6";

/// Map capacities. The generational maps hold two generations, so each
/// generation may use half.
pub const ENDPOINTS_CAPACITY: u32 = 16_384;
pub const IDENTITIES_CAPACITY: u32 = 131_072;
pub const POLICY_CAPACITY: u32 = 1_048_576;
pub const COUNTERS_CAPACITY: u32 = 65_536;
pub const CONVERSATIONS_CAPACITY: u32 = 65_536;
/// Service frontends (cluster IP, port, protocol): 8,192 per generation.
pub const SERVICES_CAPACITY: u32 = 16_384;
/// Backends over all frontends: 65,536 per generation.
pub const BACKENDS_CAPACITY: u32 = 131_072;
/// Redirected connections whose original destination the agent has not
/// read yet (LRU: a burst cannot block new connects; an entry lost is a
/// connection the agent refuses, never one sent elsewhere).
pub const MESH_CAPACITY: u32 = 65_536;
/// Sockets' service translations remembered for rewriting UDP replies and
/// getpeername() (LRU: the oldest are forgotten first, and such a socket's
/// peer then shows as the backend).
pub const SVC_REPLIES_CAPACITY: u32 = 65_536;

/// Bytes of the flow event ring buffer (a power of two, page aligned).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;
/// Flow events each CPU may emit per second on average, and in a burst: a
/// flood of denied connections cannot starve the agent or fill the ring;
/// what is over the limit is counted in [`EVENTS_LOST_MAP`].
pub const EVENTS_PER_SECOND_PER_CPU: u64 = 2_000;
pub const EVENTS_BURST: u64 = 500;

/// How many cgroup levels below the root the kernel searches for an enforced
/// ancestor of a socket's cgroup (pod cgroups sit a few levels deep; their
/// containers one level lower).
pub const MAX_CGROUP_DEPTH: u32 = 12;

/// A conversation counts as a reply path for this long after its last
/// allowed packet.
pub const CONVERSATION_TIMEOUT_NS: u64 = 120 * 1_000_000_000;

/// Directions, as seen from the enforced endpoint.
pub const DIRECTION_INGRESS: u8 = 0;
pub const DIRECTION_EGRESS: u8 = 1;

/// IP protocol numbers the data path understands.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
/// The policy map's protocol for everything judged without ports: every IP
/// protocol other than TCP, UDP and SCTP, and packets whose transport could
/// not be classified. Only rules without `ports` give it entries. (255 is
/// reserved by IANA, so no real protocol is confused with it.)
pub const PROTO_OTHER: u8 = 255;

/// Verdicts stored in [`PolicyValue::verdict`] and counted in [`CounterKey`].
pub const VERDICT_DENY: u8 = 0;
pub const VERDICT_ALLOW: u8 = 1;
/// An audit-mode policy would drop this flow; it passes and is counted.
pub const VERDICT_AUDIT: u8 = 2;

/// Why a verdict was reached.
/// A rule of a policy matched (allow, or an explicit deny).
pub const REASON_POLICY: u8 = 1;
/// The endpoint is isolated in this direction and no rule allowed the flow.
pub const REASON_DEFAULT_DENY: u8 = 2;
/// No policy isolates the endpoint in this direction.
pub const REASON_NOT_ISOLATED: u8 = 3;
/// Loopback or the pod's own address: always allowed.
pub const REASON_LOCAL: u8 = 4;
/// Ingress from the pod's own node (kubelet probes): always allowed.
pub const REASON_HOST: u8 = 5;
/// A reply within a conversation that was allowed in the other direction.
pub const REASON_REPLY: u8 = 6;
/// The destination is a service port without ready backends: refused rather
/// than passed on to an address nothing answers.
pub const REASON_NO_BACKEND: u8 = 7;
/// The socket's pod is below a deny-until-programmed guard but not
/// registered as an endpoint yet.
pub const REASON_NOT_PROGRAMMED: u8 = 8;
/// An enforced endpoint sent from an address that is not its own, or a
/// packet from the wire claimed to come from the endpoint itself.
pub const REASON_SPOOFED: u8 = 9;
/// A packet the data path could not read as IP at all.
pub const REASON_MALFORMED: u8 = 10;
/// A packet whose transport could not be classified (too many IPv6
/// extension headers, a later fragment, ESP, a truncated header), denied
/// because no rule admits every protocol from the peer.
pub const REASON_UNCLASSIFIED: u8 = 11;
/// A process of a pod that ingress policy restricts (or of a pod not
/// programmed yet) tried to open a packet (`AF_PACKET`) socket, which reads
/// frames before ingress policy can drop them: refused with EPERM. Counted
/// as ingress, protocol [`PROTO_OTHER`], peer and ports zero.
pub const REASON_PACKET_SOCKET: u8 = 12;
/// Plaintext TCP from a peer other than the node to a pod whose mesh mode
/// is STRICT: only connections the agent's inbound proxy authenticated
/// (mutual TLS) reach its applications.
pub const REASON_PLAINTEXT: u8 = 13;
pub const REASON_MAX: u8 = 13;

/// Reserved identities. Identities the agent allocates start at
/// [`IDENTITY_FIRST_ALLOCATED`].
/// An address no policy or workload mentions.
pub const IDENTITY_WORLD: u32 = 0;
/// An address of this node.
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_FIRST_ALLOCATED: u32 = 16;
/// The wildcard peer in a [`PolicyKeyData`]: the entry applies to every peer
/// identity that has no entry of its own for this endpoint and direction.
pub const IDENTITY_ANY: u32 = u32::MAX;

/// Bits of an LPM key that precede the variable part.
pub const IDENTITY_KEY_FIXED_BITS: u32 = 32;
pub const POLICY_KEY_FIXED_BITS: u32 = 32 + 32 + 32 + 8 + 8;

/// Generational maps' `generation` values.
pub const GENERATIONS: u32 = 2;
// The epoch wraps at 2^32 without skipping a generation.
const _: () = assert!((u32::MAX as u64 + 1).is_multiple_of(GENERATIONS as u64));

/// The generation an epoch ([`State::epoch`]) makes active.
#[inline(always)]
pub const fn generation_of(epoch: u32) -> u32 {
    epoch % GENERATIONS
}

/// Single-entry array: which generation the kernel reads.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Counts the agent's flips; the active generation is
    /// [`generation_of`]`(epoch)`. One aligned u32 read gives the kernel
    /// both. Conversations remember the epoch whose policy last judged
    /// them: a generation number alone comes back every second flip, so an
    /// idle conversation across a deny and one more flip would look judged.
    pub epoch: u32,
    /// [`ABI_VERSION`] of the agent that wrote the maps; 0 before the first
    /// write.
    pub abi_version: u32,
}
const _: () = assert!(core::mem::size_of::<State>() == 8);

/// Single-entry array of run-time switches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Non-zero: decisions are neither counted nor reported as events. Only
    /// for measuring what observability costs; zero (the default) in use.
    pub quiet: u32,
    pub _pad: u32,
    /// A cgroup whose sockets are never judged (0: none): the agent's own
    /// pod in Kubernetes mode, written before the agent talks to the API,
    /// so a deny-until-programmed guard left by its predecessor cannot
    /// lock a restarted agent out of the API server.
    pub exempt_cgroup: u64,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 16);

/// Key of the endpoint map: a cgroup v2 id in one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub cgroup_id: u64,
    pub generation: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 16);

/// An enforced endpoint (a pod).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    /// The agent's id for the endpoint; policy keys refer to it.
    pub endpoint_id: u32,
    /// `ENDPOINT_FLAG_*`.
    pub flags: u32,
    /// The pod's own IPv4 address (mapped) and IPv6 address; all zero when
    /// absent. Traffic to these is always allowed.
    pub ipv4_mapped: [u8; 16],
    pub ipv6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<EndpointValue>() == 40);

pub const ENDPOINT_FLAG_HAS_IPV4: u32 = 1;
pub const ENDPOINT_FLAG_HAS_IPV6: u32 = 2;
/// A guard, not a pod: sockets below this cgroup are denied with
/// [`REASON_NOT_PROGRAMMED`] unless a deeper cgroup is a registered endpoint
/// or unenforced. The ancestry search goes on past it.
pub const ENDPOINT_FLAG_PENDING: u32 = 4;
/// A pod policy does not apply to (host network): its sockets are allowed
/// without judging, even below a pending guard.
pub const ENDPOINT_FLAG_UNENFORCED: u32 = 8;
/// Some ingress entry of the endpoint's policy denies: ingress policy may
/// drop frames a packet socket would read first, so the endpoint's
/// processes may not open one (see [`REASON_PACKET_SOCKET`]). Audit
/// verdicts do not set it: they drop nothing.
pub const ENDPOINT_FLAG_INGRESS_RESTRICTED: u32 = 16;
/// The endpoint is in the mesh: its outbound TCP connects (once allowed)
/// go to the agent's outbound listener in its network namespace, and the
/// agent's inbound proxy may hand it connections ([`mesh::MARK`]).
pub const ENDPOINT_FLAG_MESHED: u32 = 32;
/// Meshed and STRICT: plaintext TCP from peers other than the node is
/// refused ([`REASON_PLAINTEXT`]).
pub const ENDPOINT_FLAG_MESH_STRICT: u32 = 64;
/// The endpoint id counters and events use for sockets no endpoint owns
/// (denied by a pending guard, or refused for lack of service backends).
pub const ENDPOINT_ID_NONE: u32 = 0;

/// Data of an identity LPM key. `prefix_len` counts
/// [`IDENTITY_KEY_FIXED_BITS`] plus the address prefix (IPv4 prefixes add 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityKeyData {
    /// Big-endian generation (LPM keys compare bytes in order).
    pub generation_be: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<IdentityKeyData>() == 20);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdentityValue {
    pub identity: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<IdentityValue>() == 8);

/// Data of a policy LPM key. `prefix_len` is [`POLICY_KEY_FIXED_BITS`] plus
/// the number of leading port bits that must match (0 = any port, 16 = one
/// port). Multi-byte fields are big-endian so the trie compares them as bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyKeyData {
    pub generation_be: u32,
    pub endpoint_id_be: u32,
    /// Peer identity, or [`IDENTITY_ANY`].
    pub peer_identity_be: u32,
    pub direction: u8,
    pub protocol: u8,
    pub port_be: u16,
}
const _: () = assert!(core::mem::size_of::<PolicyKeyData>() == 16);

/// A policy map entry's key without its generation, as the compiler
/// produces it and the agent writes it: `port_prefix_len` leading bits of
/// `port` must match (0 = any port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicySlot {
    pub endpoint_id: u32,
    /// A peer identity, or [`IDENTITY_ANY`].
    pub peer_identity: u32,
    /// `DIRECTION_*`.
    pub direction: u8,
    /// `PROTO_*`.
    pub protocol: u8,
    pub port: u16,
    pub port_prefix_len: u8,
}

impl PolicySlot {
    /// Does the slot's port block hold `port` (its first `port_prefix_len`
    /// bits match)?
    pub fn holds_port(&self, port: u16) -> bool {
        let len = u32::from(self.port_prefix_len.min(16));
        len == 0 || (self.port ^ port) >> (16 - len) == 0
    }
}

/// A compiled decision for (endpoint, peer, direction, protocol, port block).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `REASON_*`.
    pub reason: u8,
    pub _pad: u16,
    /// Identifies the (policy, rule) that decided, for attribution.
    pub rule_cookie: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 8);

/// Per-CPU counter key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub endpoint_id: u32,
    pub rule_cookie: u32,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub protocol: u8,
}
const _: () = assert!(core::mem::size_of::<CounterKey>() == 12);

/// Key of the conversation table: a datagram conversation (UDP, and
/// protocols judged without ports, whose ports are 0) between an endpoint
/// and a peer, remembered when its first packet was allowed. Only a packet
/// in the opposite direction with the same protocol, addresses and ports —
/// from the responder back to the initiator — counts as a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConversationKey {
    pub endpoint_id: u32,
    pub peer_addr: [u8; 16],
    pub peer_port: u16,
    /// The endpoint's own port.
    pub local_port: u16,
    /// `DIRECTION_EGRESS` if the endpoint initiated, `DIRECTION_INGRESS` if
    /// the peer did.
    pub initiated: u8,
    /// The IP protocol.
    pub protocol: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ConversationKey>() == 28);

/// When the conversation last carried an allowed packet, and under which
/// policy epoch ([`State::epoch`]) its start was last judged: after any
/// policy change the next packet judges the start again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConversationValue {
    /// `bpf_ktime_get_coarse_ns`.
    pub last_seen_ns: u64,
    pub epoch: u32,
    pub _pad: u32,
    /// The key it is kept under: an LRU map may hand the element to
    /// another key while a program reads it (see `ebpf/src/lru.rs`).
    pub key: ConversationKey,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<ConversationValue>() == 48);

/// A decision on a new flow, as the kernel reports it to the agent: drops,
/// audit verdicts and the first packet of allowed flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (monotonic, since boot).
    pub timestamp_ns: u64,
    pub endpoint_id: u32,
    pub rule_cookie: u32,
    /// The other side of the flow.
    pub peer_addr: [u8; 16],
    pub peer_port: u16,
    /// The port policy was evaluated on: the destination port.
    pub port: u16,
    pub direction: u8,
    pub verdict: u8,
    pub reason: u8,
    pub protocol: u8,
    /// `FLOW_FLAG_*`.
    pub flags: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 48);

/// The flow went through the mesh: egress, the connect was handed to the
/// pod's outbound proxy; ingress, the inbound proxy handed it over after
/// authenticating the client's certificate.
pub const FLOW_FLAG_MESH: u8 = 1;

/// Per-CPU token bucket of the event rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    pub tokens: u64,
    pub refilled_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventBudget>() == 16);

/// Key of the service map: a service frontend (cluster IP, port, protocol)
/// in one generation. Host byte order; the map is a plain hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    pub generation: u32,
    pub addr: [u8; 16],
    pub port: u16,
    /// `PROTO_*`.
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);

/// A frontend's backends are `BackendKey { service_id, index: 0..backend_count }`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    pub service_id: u32,
    /// Zero: connections are refused with [`REASON_NO_BACKEND`].
    pub backend_count: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);

/// A service frontend without its generation, as the agent writes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceSlot {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
}

/// Key of the backend map: one backend of a frontend in one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub generation: u32,
    pub service_id: u32,
    pub index: u32,
}
const _: () = assert!(core::mem::size_of::<BackendKey>() == 12);

/// Where a translated connection goes. Same family as its frontend (an IPv4
/// frontend's backends are IPv4, stored mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 20);

/// Key of the reply translation table: a socket (by cookie) that connected
/// or sent to a service, and the backend it went to. Replies from that
/// backend, and the socket's peer name, show the service instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcReplyKey {
    pub socket_cookie: u64,
    pub backend_addr: [u8; 16],
    pub backend_port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<SvcReplyKey>() == 32);

/// The service address and port the application sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcReplyValue {
    pub service_addr: [u8; 16],
    pub service_port: u16,
    pub _pad: [u8; 6],
    /// The key it is kept under (see [`ConversationValue::key`]).
    pub key: SvcReplyKey,
}
const _: () = assert!(core::mem::size_of::<SvcReplyValue>() == 56);

/// Transparent mTLS between meshed pods: what the kernel and the agent's
/// proxies agree on.
pub mod mesh {
    /// The agent's outbound listener, on loopback inside each meshed pod's
    /// network namespace: the pod's outbound TCP connects are redirected
    /// to it.
    pub const OUTBOUND_PORT: u16 = 15001;
    /// The agent's HBONE (mutual TLS) listener in each meshed pod.
    pub const INBOUND_PORT: u16 = 15008;
    /// The socket mark of the inbound proxy's connections to applications
    /// when the proxy itself allowed the flow on the client's identity (a
    /// rule the kernel cannot see): passed on loopback without judgement.
    /// A mark does not survive a veth, so no peer can forge it.
    pub const MARK: u32 = 0x5043;
    /// The socket mark of the inbound proxy's connections to applications
    /// that the kernel judges as it would the client's own connection
    /// (counted, reported, dropped if denied), except that a STRICT pod's
    /// plaintext refusal does not apply: the client was authenticated.
    pub const MARK_JUDGE: u32 = 0x5042;
    /// Both marks under this mask route the applications' replies back to
    /// the proxy.
    pub const MARK_MASK: u32 = 0xffff_fffe;
    const _: () = assert!(MARK & MARK_MASK == MARK_JUDGE & MARK_MASK);
    /// How old a filed original destination may be when the outbound
    /// listener takes it. On loopback the handshake ends within the
    /// client's connect() and the listener accepts within milliseconds, so
    /// an older entry is one whose connection was never accepted (the
    /// agent was down, the client gave up): claiming it later from the
    /// same address and port would carry a decision of the past. Seconds
    /// grant nothing a client could not get by connecting earlier and
    /// holding the connection, which a deny leaves open.
    pub const ORIGINAL_MAX_AGE_NS: u64 = 3_000_000_000;
}

/// A redirected connect in flight: where it was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshOriginal {
    /// The original destination (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    /// The connecting pod's endpoint id.
    pub endpoint_id: u32,
    /// When the SYN left (`bpf_ktime_get_ns`, CLOCK_MONOTONIC); 0 until
    /// it is filed. The listener refuses an entry older than
    /// [`mesh::ORIGINAL_MAX_AGE_NS`]: one whose connection it never
    /// accepted must not be claimed by a later connect from the same port.
    pub filed_ns: u64,
}
const _: () = assert!(core::mem::size_of::<MeshOriginal>() == 32);

/// A redirected connect whose SYN has not left yet: where it was going, and
/// the client's network namespace, which the connect hook can read and the
/// skb hook that files the entry on the SYN cannot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshPending {
    pub original: MeshOriginal,
    pub netns_cookie: u64,
    /// The connecting socket's cookie, the key it is kept under (see
    /// [`ConversationValue::key`]).
    pub socket_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<MeshPending>() == 48);

/// The client side of a redirected connection as the outbound listener
/// sees it: the pod's network namespace and the client's address and port
/// (the other half of the tuple is the listener's own).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshClientKey {
    pub netns_cookie: u64,
    /// The client's address (IPv4-mapped for IPv4, whichever listener
    /// family it reached).
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<MeshClientKey>() == 32);

/// A connection the inbound proxy hands to an application on loopback, by
/// its tuple. The agent registers it, with the mark it gives the socket,
/// between bind and connect, and removes it when the connection ends. The
/// kernel honours a hand-over mark only on TCP of a registered tuple with
/// that mark: the mark alone is forgeable by any process in the pod with
/// CAP_NET_RAW (SO_MARK on a raw or packet socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MeshHandoverKey {
    /// The client's address, which the proxy's socket is bound to
    /// (IPv4-mapped for IPv4).
    pub client_addr: [u8; 16],
    /// The application's address (the pod's own).
    pub app_addr: [u8; 16],
    pub client_port: u16,
    pub app_port: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MeshHandoverKey>() == 40);

/// Whether a 16-byte address is the IPv4-mapped form of an IPv4 address.
#[inline(always)]
pub fn is_ipv4_mapped(addr: &[u8; 16]) -> bool {
    addr[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// Builds the 16-byte form of an IPv4 address given in network byte order.
#[inline(always)]
pub const fn ipv4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are repr(C), Copy, made only of integers, and have
    // no implicit padding (checked by the size assertions above).
    unsafe impl aya::Pod for State {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for IdentityKeyData {}
    unsafe impl aya::Pod for IdentityValue {}
    unsafe impl aya::Pod for PolicyKeyData {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for CounterKey {}
    unsafe impl aya::Pod for ConversationKey {}
    unsafe impl aya::Pod for ConversationValue {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for EventBudget {}
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for SvcReplyKey {}
    unsafe impl aya::Pod for SvcReplyValue {}
    unsafe impl aya::Pod for MeshOriginal {}
    unsafe impl aya::Pod for MeshClientKey {}
    unsafe impl aya::Pod for MeshPending {}
    unsafe impl aya::Pod for MeshHandoverKey {}
}

/// Bumped whenever a map's key or value layout changes, so an agent never
/// reuses pinned maps written by an incompatible one.
pub const ABI_VERSION: u32 = 11;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_flip_activates_the_other_generation_even_across_the_epoch_wrap() {
        for epoch in [0, 1, 2, u32::MAX - 1, u32::MAX] {
            let next = epoch.wrapping_add(1);
            assert_ne!(generation_of(epoch), generation_of(next), "epoch {epoch}");
            assert!(generation_of(next) < GENERATIONS);
        }
    }
}
