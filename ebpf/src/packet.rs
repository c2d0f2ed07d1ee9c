//! The skb and tc programs' view of a packet, through the shared parser
//! (`portcullis_common::packet`), and of the socket it belongs to.

use aya_ebpf::{bindings::bpf_sock, helpers::bpf_sk_fullsock, programs::sk_buff::SkBuff};
use portcullis_common::{
    packet::{self, Headers, PacketBytes},
    PROTO_TCP, PROTO_UDP,
};

/// Reads through `bpf_skb_load_bytes`, from `base` (where the network
/// header starts: 0 in a cgroup skb program, past the Ethernet header in a
/// tc program).
struct Bytes<'a> {
    skb: &'a SkBuff,
    base: usize,
}

impl PacketBytes for Bytes<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.skb.load::<[u8; N]>(self.base + offset).ok()
    }
}

/// Parses the IP packet of `ethertype` at `base`; `None` when it is not IP
/// the parser can read.
#[inline(always)]
pub fn headers(skb: &SkBuff, ethertype: u16, base: usize) -> Option<Headers> {
    packet::parse(&Bytes { skb, base }, ethertype)
}

/// The ethertype the socket layer gave a cgroup skb program's packet.
#[inline(always)]
pub fn ethertype(skb: &SkBuff) -> u16 {
    u16::from_be(skb.protocol() as u16)
}

/// TCP states (include/net/tcp_states.h) in which a kernel socket's
/// packets can open a connection: it sends its SYN in SYN_SENT, and
/// receives SYNs while listening.
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_LISTEN: u32 = 10;

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const PROTO_UDPLITE: u32 = 136;
const AF_PACKET: u32 = 17;

/// What kind of socket a packet belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A kernel TCP socket (a full one, or a request or time-wait mini
    /// socket, which only TCP has), in TCP state `state`: it sends and
    /// receives only within connections whose SYN was judged.
    Tcp { state: u32 },
    /// A kernel UDP or UDP-Lite socket: its connect() and sendmsg() were
    /// judged by the socket hooks.
    Datagram,
    /// A packet (AF_PACKET) socket: it writes whole frames to the device,
    /// past every cgroup hook.
    Packet,
    /// Anything else — raw sockets, which can write any IP header, ping
    /// sockets — or no socket.
    Other,
}

/// The kind of socket the packet belongs to (the sender on egress, the
/// receiver on ingress).
#[inline(always)]
pub fn socket_kind(skb: &SkBuff) -> SocketKind {
    // SAFETY: the context pointer is valid for the program's run.
    let sk: *mut bpf_sock = unsafe { (*skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return SocketKind::Other;
    }
    // SAFETY: `state` is readable on every socket the context points at.
    let state = unsafe { (*sk).state };
    // SAFETY: helper on the context's socket pointer, checked above.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return SocketKind::Tcp { state };
    }
    // SAFETY: a full socket's fields are readable.
    let (family, kind, protocol) = unsafe { ((*full).family, (*full).type_, (*full).protocol) };
    if family == AF_PACKET {
        return SocketKind::Packet;
    }
    match (kind, protocol) {
        (SOCK_STREAM, p) if p == u32::from(PROTO_TCP) => SocketKind::Tcp { state },
        (SOCK_DGRAM, p) if p == u32::from(PROTO_UDP) || p == PROTO_UDPLITE => SocketKind::Datagram,
        _ => SocketKind::Other,
    }
}

/// The interface the packet arrived on is loopback (index 1 in every
/// network namespace): only such a packet can really come from the
/// endpoint itself.
#[inline(always)]
pub fn arrived_on_loopback(skb: &SkBuff) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*skb.skb).ingress_ifindex == 1 }
}

/// Handed over by the agent's inbound proxy, for a packet that arrived on
/// loopback (a mark set anywhere else is scrubbed when the packet crosses
/// a veth): its mark, on a tuple the agent registered with that very mark.
/// A process in the pod can set the mark on a packet it forges; it cannot
/// register a tuple.
#[inline(always)]
pub fn mesh_handover(skb: &SkBuff, headers: &Headers) -> Handover {
    // SAFETY: the context pointer is valid for the program's run.
    let mark = unsafe { (*skb.skb).mark };
    let kind = match mark {
        portcullis_common::mesh::MARK => Handover::Judged,
        portcullis_common::mesh::MARK_JUDGE => Handover::ToJudge,
        _ => return Handover::None,
    };
    if crate::mesh::registered_handover(headers, mark) {
        kind
    } else {
        Handover::None
    }
}

/// What the inbound proxy's socket mark says about a packet on loopback.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Not from the inbound proxy.
    None,
    /// The proxy allowed it on a rule the kernel cannot see.
    Judged,
    /// The proxy authenticated the client; the kernel judges the flow.
    ToJudge,
}
