//! The skb hooks: every packet an enforced endpoint's sockets send
//! (egress) or receive (ingress), whatever made it.
//!
//! Established TCP of kernel sockets passes first, with no map lookup: its
//! SYN was judged, and its packets are most of all packets. Everything else
//! of an enforced endpoint is judged: a TCP SYN, any TCP a raw socket
//! writes, each datagram (UDP, SCTP and every protocol judged without ports,
//! with exact replies through the conversation table), and what cannot be
//! classified. Sources are checked: an endpoint sends only from its own
//! addresses.

use aya_ebpf::programs::{sk_buff::SkBuff, SkBuffContext};
use portcullis_common::{
    decide::{is_local, policy_protocol, Flow},
    generation_of,
    packet::{Class, Headers},
    EndpointValue, PolicyValue, DIRECTION_EGRESS, ENDPOINT_FLAG_MESHED, ENDPOINT_FLAG_MESH_STRICT,
    FLOW_FLAG_MESH, PROTO_OTHER, REASON_HOST, REASON_LOCAL, REASON_MALFORMED, REASON_PLAINTEXT,
    REASON_SPOOFED, REASON_UNCLASSIFIED, VERDICT_DENY,
};

use crate::{
    endpoint::{self, Owner},
    mesh, no_endpoint, not_programmed,
    packet::{self, Handover, SocketKind, TCP_LISTEN, TCP_SYN_SENT},
    refuse, report, report_flagged,
    verdict::{self, Conversation, Datagram},
    verdict_code, PASS,
};

/// Judges one packet a cgroup skb program sees in `direction`.
#[inline(always)]
pub fn packet(ctx: &SkBuffContext, direction: u8) -> i32 {
    let skb = &ctx.skb;
    let socket = packet::socket_kind(skb);
    // The fast path, before parsing: a kernel TCP socket that is neither
    // connecting (egress) nor listening (ingress) carries only segments of
    // connections whose SYN was judged.
    if let SocketKind::Tcp { state } = socket {
        let opening = if direction == DIRECTION_EGRESS {
            TCP_SYN_SENT
        } else {
            TCP_LISTEN
        };
        if state != opening {
            return PASS;
        }
    }
    let headers = packet::headers(skb, packet::ethertype(skb), 0);
    judge(skb, direction, socket, headers)
}

/// Judges a packet whose headers were parsed (`None`: not readable IP)
/// for the socket that sent or receives it.
#[inline(always)]
pub fn judge(skb: &SkBuff, direction: u8, socket: SocketKind, headers: Option<Headers>) -> i32 {
    let Some(headers) = headers else {
        return malformed(skb, direction);
    };
    let egress = direction == DIRECTION_EGRESS;
    let kernel_tcp = matches!(socket, SocketKind::Tcp { .. });
    let transport = headers.transport;
    let is_tcp = transport.is_tcp();
    if is_tcp && kernel_tcp && !transport.is_tcp_syn() {
        return PASS;
    }
    let epoch = endpoint::active_epoch();
    let generation = generation_of(epoch);
    let unclassified = transport.class == Class::Unclassified;
    // Ports are 0 where the class has none.
    let (peer_port, local_port) = if egress {
        (transport.dst_port, transport.src_port)
    } else {
        (transport.src_port, transport.dst_port)
    };
    let protocol = if unclassified {
        PROTO_OTHER
    } else {
        transport.protocol
    };
    let flow = Flow {
        generation,
        direction,
        protocol: policy_protocol(protocol),
        peer_addr: if egress {
            headers.dst_addr
        } else {
            headers.src_addr
        },
        peer_port,
        policy_port: if egress { peer_port } else { local_port },
    };
    let ep = match endpoint::of_skb(generation, skb.skb) {
        Owner::Endpoint(ep) => ep,
        Owner::NotProgrammed => return not_programmed(&flow),
        Owner::Free => return PASS,
    };
    // Each read once: the verifier refuses a context pointer the compiler
    // offsets and keeps for a second read.
    let on_loopback = !egress && packet::arrived_on_loopback(skb);
    let handover = if on_loopback && is_tcp && ep.flags & ENDPOINT_FLAG_MESHED != 0 {
        packet::mesh_handover(skb, &headers)
    } else {
        Handover::None
    };
    if spoofed(&ep, &headers, egress, on_loopback, handover) {
        return refuse(&ep, &flow, &verdict::deny(REASON_SPOOFED));
    }
    if unclassified {
        let mut v = verdict::decide(epoch, &ep, &flow);
        if v.verdict == VERDICT_DENY {
            v.reason = REASON_UNCLASSIFIED;
        }
        report(&ep, &flow, &v);
        return verdict_code(&v);
    }
    if is_tcp {
        if egress && kernel_tcp {
            return kernel_syn(skb, epoch, &ep, &flow, &headers);
        }
        if handover == Handover::Judged {
            // The inbound proxy allowed it on the client's identity, a
            // rule only the proxy can see, and counted it.
            return PASS;
        }
        let v = verdict::decide(epoch, &ep, &flow);
        if handover == Handover::ToJudge {
            // An authenticated client, from its own address: judged and
            // reported as its plaintext connection would be.
            report_flagged(&ep, &flow, &v, FLOW_FLAG_MESH);
            return verdict_code(&v);
        }
        if !egress && ep.flags & ENDPOINT_FLAG_MESH_STRICT != 0 && plaintext_refused(&v) {
            return refuse(&ep, &flow, &verdict::deny(REASON_PLAINTEXT));
        }
        report(&ep, &flow, &v);
        return verdict_code(&v);
    }
    let d = Datagram {
        protocol,
        local_port,
        epoch,
    };
    datagram(&ep, &flow, &d, egress && socket == SocketKind::Datagram)
}

/// The SYN of a kernel TCP socket, on egress. connect() judged it already
/// and gave the application its error, but the SYN is judged again as it
/// leaves: it may leave long after connect() (TCP Fast Open's deferred
/// connect sends it at the first write, and SYN retransmits go on for as
/// long as TCP_SYNCNT says), across a policy change; to another address
/// than the one connect() named (an IPv6 routing header); or from a socket
/// whose connect the hook did not see as the pod's (an MPTCP subflow a
/// kernel worker opens). Allowed SYNs were counted at connect(); only a
/// denial is news here.
#[inline(always)]
fn kernel_syn(skb: &SkBuff, epoch: u32, ep: &EndpointValue, flow: &Flow, headers: &Headers) -> i32 {
    // A connect the mesh redirected goes to the outbound listener on
    // loopback: the destination to judge is the one the application
    // named. It is filed for the agent only if it is still allowed, and
    // whatever the endpoint's mesh flag says now (a pass that unmeshed the
    // pod since the connect must not strand the connection).
    let pending = mesh::pending_original(skb, headers);
    let judged = match &pending {
        Some(p) => Flow {
            peer_addr: p.original.addr,
            peer_port: p.original.port,
            policy_port: p.original.port,
            ..*flow
        },
        None => *flow,
    };
    let v = verdict::decide(epoch, ep, &judged);
    if v.verdict == VERDICT_DENY {
        return refuse(ep, &judged, &v);
    }
    if let Some(p) = &pending {
        mesh::file_original(headers, p);
    }
    PASS
}

/// A datagram: a reply or a further packet of a live conversation passes;
/// anything else is judged, and an allowed one starts a conversation.
/// `judged_at_socket`: a kernel datagram socket's sends were judged and
/// counted by the socket hooks already; only a denial here is news.
#[inline(always)]
fn datagram(ep: &EndpointValue, flow: &Flow, d: &Datagram, judged_at_socket: bool) -> i32 {
    match verdict::reply(ep, flow, d) {
        Conversation::Live => return PASS,
        Conversation::Revoked(v) => return refuse(ep, flow, &v),
        Conversation::New => {}
    }
    if verdict::onward(ep, flow, d) {
        return PASS;
    }
    let v = verdict::decide(d.epoch, ep, flow);
    if v.verdict == VERDICT_DENY {
        return refuse(ep, flow, &v);
    }
    if !judged_at_socket {
        report(ep, flow, &v);
    }
    verdict::remember(ep, flow, d);
    PASS
}

/// STRICT refuses plaintext a policy would let in; the node (kubelet
/// probes) and the pod itself still reach it.
#[inline(always)]
fn plaintext_refused(v: &PolicyValue) -> bool {
    v.verdict != VERDICT_DENY && v.reason != REASON_HOST && v.reason != REASON_LOCAL
}

/// An enforced endpoint may send only from its own addresses; a packet from
/// the wire that claims to come from the endpoint itself (or loopback) is
/// forged: real local traffic arrives on loopback. And loopback carries only
/// that, plus the inbound proxy's hand-over (`handover`: marked TCP from the
/// client's address on a tuple the agent registered): a frame a packet
/// socket writes on `lo` with another source is forged too, and would open
/// a reply window to that source if let in.
#[inline(always)]
fn spoofed(
    ep: &EndpointValue,
    headers: &Headers,
    egress: bool,
    on_loopback: bool,
    handover: Handover,
) -> bool {
    let local = is_local(ep, &headers.src_addr);
    if egress {
        !local
    } else if on_loopback {
        !local && handover == Handover::None
    } else {
        local
    }
}

/// A packet that is not IP the parser can read: an enforced endpoint's is
/// dropped, whatever its policy (it has no addresses to judge).
#[inline(always)]
fn malformed(skb: &SkBuff, direction: u8) -> i32 {
    let generation = endpoint::active_generation();
    let ep = match endpoint::of_skb(generation, skb.skb) {
        Owner::Free => return PASS,
        Owner::Endpoint(ep) => ep,
        Owner::NotProgrammed => no_endpoint(),
    };
    let flow = Flow {
        generation,
        direction,
        protocol: PROTO_OTHER,
        peer_addr: [0; 16],
        peer_port: 0,
        policy_port: 0,
    };
    refuse(&ep, &flow, &verdict::deny(REASON_MALFORMED))
}
