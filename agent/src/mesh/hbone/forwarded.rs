//! The `Forwarded` header (RFC 7239) that carries the client pod's IP to
//! the destination's agent, which connects to the app from that address.
//!
//! We write `for=10.0.0.7` and `for="[2001:db8::7]"` (an IPv6 node must be
//! quoted and bracketed). We read what ztunnel writes too: a quoted
//! `ip:port` (`for="10.0.0.7:41234"`), and the first element of a list.

use std::net::{IpAddr, Ipv6Addr};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardedError {
    #[error("the Forwarded header is not visible ASCII")]
    NotText,
    #[error("Forwarded: {value:?}: {why}")]
    Malformed { value: String, why: &'static str },
}

/// The header value naming `client`.
pub fn for_client(client: IpAddr) -> String {
    match client {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The client the header names: `None` when it names none, or an unknown or
/// obfuscated one (`for=unknown`, `for=_hidden`).
pub fn parse(value: &[u8]) -> Result<Option<IpAddr>, ForwardedError> {
    let text = std::str::from_utf8(value).map_err(|_| ForwardedError::NotText)?;
    let malformed = |why| ForwardedError::Malformed {
        value: text.chars().take(120).collect(),
        why,
    };
    // The first element is the original client; node names hold no ',' or ';'.
    let first = text.split(',').next().unwrap_or_default();
    let mut node = None;
    for pair in first.split(';') {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| malformed("a parameter without '='"))?;
        if name.trim().eq_ignore_ascii_case("for") {
            if node.is_some() {
                return Err(malformed("two 'for' parameters"));
            }
            node = Some(value.trim());
        }
    }
    let Some(node) = node else {
        return Ok(None);
    };
    let node = match node.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .ok_or_else(|| malformed("an unterminated quoted string"))?,
        None => node,
    };
    if node.eq_ignore_ascii_case("unknown") || node.starts_with('_') {
        return Ok(None);
    }
    if let Some(rest) = node.strip_prefix('[') {
        let (v6, port) = rest
            .split_once(']')
            .ok_or_else(|| malformed("an unterminated IPv6 address"))?;
        check_port(port).ok_or_else(|| malformed("not a port after the IPv6 address"))?;
        return v6
            .parse::<Ipv6Addr>()
            .map(|ip| Some(IpAddr::V6(ip)))
            .map_err(|_| malformed("not an IPv6 address"));
    }
    let (ip, port) = match node.split_once(':') {
        Some((ip, port)) => (ip, format!(":{port}")),
        None => (node, String::new()),
    };
    check_port(&port).ok_or_else(|| malformed("not a port after the address"))?;
    ip.parse::<IpAddr>()
        .map(Some)
        .map_err(|_| malformed("not an IP address"))
}

/// Empty, or `:` and a port (a number or an obfuscated `_name`).
fn check_port(port: &str) -> Option<()> {
    if port.is_empty() {
        return Some(());
    }
    let port = port.strip_prefix(':')?;
    (port.parse::<u16>().is_ok() || port.starts_with('_')).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_we_write_reads_back_and_ipv6_is_quoted() {
        for ip in ["10.0.0.7", "2001:db8::7", "::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            let value = for_client(ip);
            assert_eq!(parse(value.as_bytes()), Ok(Some(ip)), "{value}");
        }
        assert_eq!(for_client("10.0.0.7".parse().unwrap()), "for=10.0.0.7");
        assert_eq!(
            for_client("2001:db8::7".parse().unwrap()),
            "for=\"[2001:db8::7]\""
        );
    }

    #[test]
    fn other_writers_forms_are_read_and_nonsense_is_refused() {
        let v4: IpAddr = "10.0.0.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        for (value, want) in [
            ("for=\"10.0.0.7:41234\"", Some(v4)),
            ("For=10.0.0.7;proto=https", Some(v4)),
            ("for=\"[2001:db8::7]:41234\";host=db.shop", Some(v6)),
            ("for=10.0.0.7, for=192.0.2.1", Some(v4)),
            ("proto=https", None),
            ("for=unknown", None),
            ("for=_hidden", None),
        ] {
            assert_eq!(parse(value.as_bytes()), Ok(want), "{value}");
        }
        for bad in [
            "for=db.shop",
            "for=\"10.0.0.7",
            "for=\"[2001:db8::7\"",
            "for=10.0.0.7:http",
            "for",
            "for=1.2.3.4;for=1.2.3.5",
        ] {
            assert!(parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(parse(b"for=\xff"), Err(ForwardedError::NotText));
    }
}
