//! `pcl-attack`: the attacker (and the observer) inside a lab pod. The test
//! starts it in a pod's network namespace and cgroup, so the kernel sees
//! the pod; it runs one JSON command (argv[1]) and reports JSON events on
//! stdout, one per line (see `portcullis_tests::attack::wire`).

use std::{
    io::{self, Write as _},
    mem::MaybeUninit,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use portcullis_tests::attack::wire::{
    find_markers, marker, Command, DeferredSpec, Event, ListenSpec, ReplyHow, Send, ServeSpec,
    StreamSpec, Via, SNIFF_SOCKETS,
};

static OUT: Mutex<()> = Mutex::new(());

fn emit(e: &Event) {
    let _held = OUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut out = io::stdout().lock();
    let _ = serde_json::to_writer(&mut out, e);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let result = match serde_json::from_str::<Command>(&arg) {
        Ok(cmd) => run(cmd),
        Err(e) => Err(io::Error::other(format!("bad command {arg:?}: {e}"))),
    };
    match result {
        Ok(()) => emit(&Event::Done),
        Err(e) => {
            emit(&Event::Failed {
                message: e.to_string(),
            });
            std::process::exit(1);
        }
    }
}

fn run(cmd: Command) -> io::Result<()> {
    match cmd {
        Command::Send { sends } => {
            for s in &sends {
                let errno = send(s).err().map(|e| e.raw_os_error().unwrap_or(-1));
                emit(&Event::Sent {
                    label: s.label.clone(),
                    errno,
                });
            }
            Ok(())
        }
        Command::Listen(spec) => listen(&spec),
        Command::Capture { ifname } => capture(&ifname),
        Command::Stream(spec) => stream(&spec),
        Command::Serve(spec) => serve(&spec),
        Command::Sniff { ifname } => sniff(&ifname),
        Command::Deferred(spec) => deferred(&spec),
        Command::Open { sockets } => {
            for o in &sockets {
                // SAFETY: plain syscall; the descriptor is closed at once.
                let fd = unsafe { libc::socket(o.family, o.kind, o.protocol) };
                let errno =
                    (fd < 0).then(|| io::Error::last_os_error().raw_os_error().unwrap_or(-1));
                if fd >= 0 {
                    // SAFETY: our own descriptor.
                    unsafe { libc::close(fd) };
                }
                emit(&Event::Opened {
                    label: o.label.clone(),
                    errno,
                });
            }
            Ok(())
        }
    }
}

fn domain(addr: IpAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

fn unspecified(ipv6: bool, port: u16) -> SocketAddr {
    if ipv6 {
        (Ipv6Addr::UNSPECIFIED, port).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, port).into()
    }
}

fn send(s: &Send) -> io::Result<()> {
    match &s.via {
        Via::RawHdrincl => {
            let sock = Socket::new(domain(s.dst), Type::RAW, Some(Protocol::from(255)))?;
            if s.dst.is_ipv4() {
                sock.set_header_included_v4(true)?;
            }
            sock.send_to(&s.bytes, &SockAddr::from(SocketAddr::new(s.dst, 0)))?;
        }
        Via::Raw { protocol } => {
            let sock = Socket::new(domain(s.dst), Type::RAW, Some(Protocol::from(*protocol)))?;
            sock.send_to(&s.bytes, &SockAddr::from(SocketAddr::new(s.dst, 0)))?;
        }
        Via::Packet {
            ifname,
            dst_mac,
            mark,
        } => packet_send(ifname, *dst_mac, *mark, &s.bytes)?,
        Via::Datagram {
            protocol,
            port,
            bind_port,
            connect,
            linger_ms,
        } => {
            let sock = Socket::new(domain(s.dst), Type::DGRAM, Some(Protocol::from(*protocol)))?;
            if let Some(p) = bind_port {
                // Beside a listener on the same port, as a server's reply
                // socket would be.
                sock.set_reuse_address(true)?;
                sock.bind(&SockAddr::from(unspecified(s.dst.is_ipv6(), *p)))?;
            }
            let to = SockAddr::from(SocketAddr::new(s.dst, *port));
            if *connect {
                sock.connect(&to)?;
                sock.send(&s.bytes)?;
            } else {
                sock.send_to(&s.bytes, &to)?;
            }
            if *linger_ms > 0 {
                let on = format!("dgram:{}", bind_port.unwrap_or(0));
                receive_until(
                    &sock,
                    &on,
                    Instant::now() + Duration::from_millis(*linger_ms),
                );
            }
        }
    }
    Ok(())
}

/// Reports every datagram with markers that `sock` receives until `deadline`.
fn receive_until(sock: &Socket, on: &str, deadline: Instant) {
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => report(on, &buf[..n], from.as_socket()),
            Err(e) if is_timeout(&e) => return,
            Err(_) => {} // e.g. ECONNREFUSED from an ICMP error: keep going
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn report(on: &str, data: &[MaybeUninit<u8>], from: Option<SocketAddr>) {
    // SAFETY: recv_from initialised the first `data.len()` bytes.
    let data: &[u8] = unsafe { &*(data as *const [MaybeUninit<u8>] as *const [u8]) };
    let markers = find_markers(data);
    if !markers.is_empty() {
        emit(&Event::Received {
            on: on.to_string(),
            from: from.map(|a| a.ip()),
            from_port: from.map(|a| a.port()),
            markers,
        });
    }
}

/// Receives forever on `sock` (the process is killed when the test is done).
fn receive_forever(sock: Socket, on: String) {
    thread::spawn(move || {
        let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => report(&on, &buf[..n], from.as_socket()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
    });
}

fn listen(spec: &ListenSpec) -> io::Result<()> {
    for ipv6 in [false, true] {
        let d = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
        let v = if ipv6 { "6" } else { "4" };
        for (ports, protocol, name) in [(&spec.udp, 17, "udp"), (&spec.udplite, 136, "udplite")] {
            for &port in ports {
                let sock = Socket::new(d, Type::DGRAM, Some(Protocol::from(protocol)))?;
                if ipv6 {
                    sock.set_only_v6(true)?;
                }
                sock.set_reuse_address(true)?;
                sock.bind(&SockAddr::from(unspecified(ipv6, port)))?;
                receive_forever(sock, format!("{name}{v}:{port}"));
            }
        }
        for &protocol in &spec.raw {
            let sock = Socket::new(d, Type::RAW, Some(Protocol::from(protocol)))?;
            receive_forever(sock, format!("raw{v}:{protocol}"));
        }
    }
    emit(&Event::Ready);
    loop {
        thread::park();
    }
}

fn ifindex(ifname: &str) -> io::Result<i32> {
    let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i as i32),
    }
}

fn link_addr(ifname: &str, protocol: u16, mac: [u8; 6]) -> io::Result<SockAddr> {
    let index = ifindex(ifname)?;
    // SAFETY: sockaddr_ll fits in sockaddr_storage; every field set below.
    let (_, addr) = unsafe {
        SockAddr::try_init(|storage, len| {
            let ll = &mut *(storage as *mut libc::sockaddr_ll);
            ll.sll_family = libc::AF_PACKET as u16;
            ll.sll_protocol = protocol.to_be();
            ll.sll_ifindex = index;
            ll.sll_halen = 6;
            ll.sll_addr[..6].copy_from_slice(&mac);
            *len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            Ok(())
        })
    }?;
    Ok(addr)
}

fn packet_send(ifname: &str, dst_mac: [u8; 6], mark: Option<u32>, frame: &[u8]) -> io::Result<()> {
    // Protocol 0: a send-only packet socket that receives nothing.
    let sock = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(0)))?;
    if let Some(mark) = mark {
        sock.set_mark(mark)?;
    }
    // As an attacker would: ask for PACKET_QDISC_BYPASS, which hands frames
    // to the driver past tc. Portcullis refuses it to enforced pods; where
    // it is refused, send the ordinary way.
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, and an int option of the right size.
    let _ = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    sock.send_to(frame, &link_addr(ifname, 0, dst_mac)?)?;
    Ok(())
}

/// Every protocol, in the byte order packet sockets take it.
fn eth_p_all() -> i32 {
    i32::from((libc::ETH_P_ALL as u16).to_be())
}

/// Frames coming in on `ifname` (so, on a host-side veth, what left the pod).
fn capture(ifname: &str) -> io::Result<()> {
    let sock = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(eth_p_all())))?;
    read_frames(sock, ifname)
}

/// Opens each of [`SNIFF_SOCKETS`], reporting each, then reads frames on
/// `ifname` with the first that opened (none: just report ready and wait).
fn sniff(ifname: &str) -> io::Result<()> {
    // The legacy type the kernel still accepts (libc deprecates the name).
    const SOCK_PACKET: i32 = 10;
    let kinds = [
        (Domain::PACKET, Type::RAW),
        (Domain::PACKET, Type::DGRAM),
        (Domain::IPV4, Type::from(SOCK_PACKET)),
    ];
    let mut first = None;
    for (label, (domain, kind)) in SNIFF_SOCKETS.iter().zip(kinds) {
        let opened = Socket::new(domain, kind, Some(Protocol::from(eth_p_all())));
        emit(&Event::Opened {
            label: label.to_string(),
            errno: opened
                .as_ref()
                .err()
                .map(|e| e.raw_os_error().unwrap_or(-1)),
        });
        if first.is_none() {
            first = opened.ok();
        }
    }
    match first {
        Some(sock) => read_frames(sock, ifname),
        None => {
            emit(&Event::Ready);
            loop {
                thread::park();
            }
        }
    }
}

/// Binds a packet socket to `ifname` and reports the markers of every frame
/// coming in (not those going out) until killed.
fn read_frames(sock: Socket, ifname: &str) -> io::Result<()> {
    sock.bind(&link_addr(ifname, libc::ETH_P_ALL as u16, [0; 6])?)?;
    emit(&Event::Ready);
    let mut buf = [MaybeUninit::<u8>::uninit(); 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: the kernel wrote a sockaddr_ll for a packet socket.
        let pkttype = unsafe { (*(from.as_ptr() as *const libc::sockaddr_ll)).sll_pkttype };
        if pkttype == libc::PACKET_OUTGOING {
            continue; // sent from this interface, not received on it
        }
        report("capture", &buf[..n], None);
    }
}

fn deferred(spec: &DeferredSpec) -> io::Result<()> {
    // linux/tcp.h; libc has no names for them.
    const TCP_FASTOPEN_CONNECT: libc::c_int = 30;
    const TCP_FASTOPEN_NO_COOKIE: libc::c_int = 34;
    let mut sockets = Vec::new();
    for c in &spec.connects {
        let sock = Socket::new(domain(c.dst), Type::STREAM, Some(Protocol::TCP))?;
        for option in [TCP_FASTOPEN_CONNECT, TCP_FASTOPEN_NO_COOKIE] {
            let on: libc::c_int = 1;
            // SAFETY: a valid socket, and an int option of the right size.
            let r = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::IPPROTO_TCP,
                    option,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let r = sock.connect(&SockAddr::from(SocketAddr::new(c.dst, c.port)));
        emit(&Event::Opened {
            label: c.label.clone(),
            errno: r.err().map(|e| e.raw_os_error().unwrap_or(-1)),
        });
        sockets.push((c, sock));
    }
    emit(&Event::Ready);
    thread::sleep(Duration::from_millis(spec.wait_ms));
    for (c, sock) in &sockets {
        // A blocking write would wait for the handshake its SYN starts.
        sock.set_nonblocking(true)?;
        let r = sock.send(&marker(&c.label));
        emit(&Event::Sent {
            label: c.label.clone(),
            errno: r.err().map(|e| e.raw_os_error().unwrap_or(-1)),
        });
    }
    // Keep the sockets while their SYNs go out.
    thread::sleep(Duration::from_millis(500));
    emit(&Event::Done);
    Ok(())
}

fn stream(spec: &StreamSpec) -> io::Result<()> {
    let sock = Socket::new(domain(spec.dst), Type::DGRAM, Some(Protocol::UDP))?;
    let to = SockAddr::from(SocketAddr::new(spec.dst, spec.port));
    if spec.connect {
        sock.connect(&to)?;
    }
    emit(&Event::Ready);
    let start = Instant::now();
    let end = start + Duration::from_millis(spec.duration_ms);
    let pause = spec.pause.map(|(after, len)| {
        let from = start + Duration::from_millis(after);
        from..from + Duration::from_millis(len)
    });
    let mut n = 0u64;
    while Instant::now() < end {
        if let Some(p) = pause.as_ref().filter(|p| p.contains(&Instant::now())) {
            thread::sleep(p.end.saturating_duration_since(Instant::now()));
            continue;
        }
        let id = format!("{}-{n}", spec.marker);
        let payload = marker(&id);
        let r = if spec.connect {
            sock.send(&payload)
        } else {
            sock.send_to(&payload, &to)
        };
        emit(&Event::Sent {
            label: id,
            errno: r.err().map(|e| e.raw_os_error().unwrap_or(-1)),
        });
        n += 1;
        thread::sleep(Duration::from_millis(spec.interval_ms));
    }
    Ok(())
}

fn serve(spec: &ServeSpec) -> io::Result<()> {
    let d = if spec.ipv6 {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let bound = |port: u16| -> io::Result<Socket> {
        let s = Socket::new(d, Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.bind(&SockAddr::from(unspecified(spec.ipv6, port)))?;
        Ok(s)
    };
    let sock = bound(spec.port)?;
    emit(&Event::Ready);
    sock.set_read_timeout(Some(Duration::from_millis(spec.wait_ms)))?;
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    let (n, from) = sock.recv_from(&mut buf)?;
    let client = from
        .as_socket()
        .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
    report(&format!("udp:{}", spec.port), &buf[..n], Some(client));
    for r in &spec.replies {
        let to = SocketAddr::new(client.ip(), r.to_port.unwrap_or(client.port()));
        let payload = marker(&r.marker);
        let result = (|| -> io::Result<()> {
            match (r.how, r.from_port) {
                (ReplyHow::SendTo, None) => sock.send_to(&payload, &to.into()).map(drop),
                (ReplyHow::SendTo, Some(p)) => bound(p)?.send_to(&payload, &to.into()).map(drop),
                (ReplyHow::ConnectSame, _) => {
                    sock.connect(&to.into())?;
                    sock.send(&payload).map(drop)
                }
                (ReplyHow::ConnectNew, p) => {
                    let s = bound(p.unwrap_or(spec.port))?;
                    s.connect(&to.into())?;
                    s.send(&payload).map(drop)
                }
            }
        })();
        emit(&Event::Sent {
            label: r.marker.clone(),
            errno: result.err().map(|e| e.raw_os_error().unwrap_or(-1)),
        });
    }
    Ok(())
}
