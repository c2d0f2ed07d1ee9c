//! What the test asks `pcl-attack` to do (one JSON command on argv) and what
//! it reports back (one JSON event per line on stdout).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Every crafted packet carries a marker `PCLM<id>.` in its payload, so a
/// receiver or a capture can say exactly which variant it saw.
pub const MARKER_PREFIX: &[u8] = b"PCLM";
pub const MARKER_END: u8 = b'.';

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Sends each packet once, in order, and reports each send's result.
    Send { sends: Vec<Send> },
    /// Receives on the listed sockets (IPv4 and IPv6 each) until killed.
    Listen(ListenSpec),
    /// Watches frames arriving on an interface (from the far end of a veth)
    /// until killed.
    Capture { ifname: String },
    /// Sends a numbered datagram every `interval_ms` for `duration_ms`.
    Stream(StreamSpec),
    /// Waits for one UDP datagram on `port`, then answers it as told.
    Serve(ServeSpec),
    /// From inside a pod: opens every kind of packet socket (reporting each
    /// as [`Event::Opened`]), then reports what the first that opened reads
    /// on `ifname` until killed, as a sniffer in the pod would.
    Sniff { ifname: String },
    /// Calls `socket(family, type, protocol)` for each, reporting each as
    /// [`Event::Opened`] under its label, and closes them.
    Open { sockets: Vec<OpenSpec> },
    /// TCP Fast Open's deferred connect: `connect()`s each socket with
    /// TCP_FASTOPEN_CONNECT and TCP_FASTOPEN_NO_COOKIE, which returns at
    /// once and sends no SYN (each reported as [`Event::Opened`]), reports
    /// ready, waits `wait_ms`, then writes each socket's marker, which
    /// sends its SYN with the data (each reported as [`Event::Sent`]).
    Deferred(DeferredSpec),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeferredSpec {
    pub connects: Vec<DeferredConnect>,
    pub wait_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeferredConnect {
    /// Also the marker the SYN carries.
    pub label: String,
    pub dst: IpAddr,
    pub port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OpenSpec {
    pub label: String,
    pub family: i32,
    pub kind: i32,
    pub protocol: i32,
}

/// The packet sockets [`Command::Sniff`] opens, by label: `AF_PACKET`
/// raw and datagram, and the legacy `AF_INET`/`SOCK_PACKET`.
pub const SNIFF_SOCKETS: [&str; 3] = ["packet-raw", "packet-dgram", "inet-sock-packet"];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Send {
    /// Names the variant in the report (usually its marker).
    pub label: String,
    pub dst: IpAddr,
    pub via: Via,
    pub bytes: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Via {
    /// `SOCK_RAW`, `IPPROTO_RAW`: `bytes` is the whole IP packet, header
    /// included (IP_HDRINCL; IPv6 raw sockets of protocol 255 imply it).
    RawHdrincl,
    /// `SOCK_RAW` of `protocol`: `bytes` is the transport header and payload,
    /// the kernel writes the IP header.
    Raw { protocol: i32 },
    /// `AF_PACKET`, `SOCK_RAW` on `ifname`: `bytes` is the Ethernet frame.
    /// `mark`: the socket's `SO_MARK` (CAP_NET_RAW may set any), which
    /// the frame carries.
    Packet {
        ifname: String,
        dst_mac: [u8; 6],
        #[serde(default)]
        mark: Option<u32>,
    },
    /// A kernel datagram socket (`SOCK_DGRAM` of `protocol`: 17 UDP, 136
    /// UDP-Lite), bound to `bind_port` if given, `connect()`ed and `send()`
    /// or `sendto()`; then it keeps receiving for `linger_ms`.
    Datagram {
        protocol: i32,
        port: u16,
        bind_port: Option<u16>,
        connect: bool,
        linger_ms: u64,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ListenSpec {
    /// UDP sockets bound to these ports: the receiving application.
    pub udp: Vec<u16>,
    /// UDP-Lite sockets bound to these ports.
    pub udplite: Vec<u16>,
    /// Raw sockets of these IP protocols: everything of that protocol that
    /// the kernel delivers to the pod, whatever its port.
    pub raw: Vec<i32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamSpec {
    pub dst: IpAddr,
    pub port: u16,
    /// `connect()` once and `send()`, or `sendto()` each time.
    pub connect: bool,
    pub interval_ms: u64,
    pub duration_ms: u64,
    /// Datagram `n` carries the marker `<marker>-<n>`.
    pub marker: String,
    /// `(after_ms, for_ms)`: the socket stays open but sends nothing for
    /// `for_ms` once `after_ms` have passed, as an idle conversation would.
    #[serde(default)]
    pub pause: Option<(u64, u64)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServeSpec {
    pub ipv6: bool,
    pub port: u16,
    pub wait_ms: u64,
    /// In order; `ConnectSame` connects the serving socket itself, so it
    /// should come last.
    pub replies: Vec<Reply>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reply {
    pub how: ReplyHow,
    /// Send from this port instead of the served one (a socket of its own).
    pub from_port: Option<u16>,
    /// Send to this port of the client instead of the one it sent from.
    pub to_port: Option<u16>,
    pub marker: String,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplyHow {
    /// `sendto()` on the serving socket.
    SendTo,
    /// `connect()` the serving socket to the client, then `send()`.
    ConnectSame,
    /// A second socket on the same port (SO_REUSEPORT), `connect()`ed to
    /// the client, then `send()`.
    ConnectNew,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Listening or capturing: from now on, what arrives is reported.
    Ready,
    /// One send; `errno` is `None` when the kernel took it.
    Sent { label: String, errno: Option<i32> },
    /// One socket(); `errno` is `None` when the kernel made it.
    Opened { label: String, errno: Option<i32> },
    /// Something with markers arrived on socket `on` (e.g. `udp:5000`,
    /// `raw6:6`, `capture`).
    Received {
        on: String,
        from: Option<IpAddr>,
        from_port: Option<u16>,
        markers: Vec<String>,
    },
    /// The command finished.
    Done,
    /// The command could not run (a socket could not be opened...).
    Failed { message: String },
}

/// Every `PCLM<id>.` marker in `data`.
pub fn find_markers(data: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = data;
    while let Some(at) = find(rest, MARKER_PREFIX) {
        let tail = &rest[at + MARKER_PREFIX.len()..];
        let id_len = tail
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'-' || **b == b'_')
            .count();
        if tail.get(id_len) == Some(&MARKER_END) && id_len > 0 {
            found.push(String::from_utf8_lossy(&tail[..id_len]).into_owned());
        }
        rest = &tail[id_len..];
    }
    found
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The payload bytes that carry marker `id` (letters, digits, `-`, `_`:
/// anything else would cut the marker short where it is found).
pub fn marker(id: &str) -> Vec<u8> {
    assert!(
        !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "marker id {id:?} may hold only letters, digits, '-' and '_'"
    );
    let mut v = MARKER_PREFIX.to_vec();
    v.extend_from_slice(id.as_bytes());
    v.push(MARKER_END);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_between_other_bytes() {
        let mut data = b"\x00\x01junk".to_vec();
        data.extend(marker("e1-dst-07"));
        data.extend(b"PCLMnot terminated");
        data.extend(marker("b"));
        assert_eq!(find_markers(&data), vec!["e1-dst-07", "b"]);
        assert!(find_markers(b"PCLM.").is_empty());
    }
}
