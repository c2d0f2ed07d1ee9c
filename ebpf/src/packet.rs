//! The skb programs' view of a packet, through the shared parser
//! (`portcullis_common::packet`), and of the socket it belongs to.

use aya_ebpf::{bindings::bpf_sock, helpers::bpf_sk_fullsock, programs::SkBuffContext};
use portcullis_common::{
    packet::{self, Headers, PacketBytes},
    PROTO_TCP, PROTO_UDP,
};

/// Reads through `bpf_skb_load_bytes`, from the network header (where a
/// cgroup skb program's data starts).
struct Skb<'a>(&'a SkBuffContext);

impl PacketBytes for Skb<'_> {
    #[inline(always)]
    fn bytes<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }
}

/// Parses the packet; `None` when it is not IP the parser can read.
#[inline(always)]
pub fn headers(ctx: &SkBuffContext) -> Option<Headers> {
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    packet::parse(&Skb(ctx), ethertype)
}

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const PROTO_UDPLITE: u32 = 136;

/// TCP states (include/net/tcp_states.h) in which a kernel socket's
/// packets can open a connection: it sends its SYN in SYN_SENT, and
/// receives SYNs while listening.
pub const TCP_SYN_SENT: u32 = 2;
pub const TCP_LISTEN: u32 = 10;

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
    /// Anything else — raw and packet sockets, which can write any header,
    /// ping sockets — or no socket.
    Other,
}

/// The kind of socket the packet belongs to (the sender on egress, the
/// receiver on ingress).
#[inline(always)]
pub fn socket_kind(ctx: &SkBuffContext) -> SocketKind {
    // SAFETY: the context pointer is valid for the program's run.
    let sk: *mut bpf_sock = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
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
    let (kind, protocol) = unsafe { ((*full).type_, (*full).protocol) };
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
pub fn arrived_on_loopback(ctx: &SkBuffContext) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    unsafe { (*ctx.skb.skb).ingress_ifindex == 1 }
}
