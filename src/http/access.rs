//! Who may use the root endpoints: this host's own nix, and nothing that
//! only looks like it.
//!
//! Two checks, both required. The socket's peer address must be loopback:
//! headers such as `X-Forwarded-For` are never believed. And the `Host`
//! header must name this host (`localhost`, `127.0.0.1`, `[::1]` or the
//! configured bind address, with any port). The second check closes DNS
//! rebinding: a web page in the user's browser can point its own host name
//! at 127.0.0.1, and its requests then come from loopback, but they still
//! carry that name in `Host`.

use std::net::{IpAddr, SocketAddr};

/// Whether a peer address is this host. IPv4-mapped IPv6 counts as IPv4.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Whether a `Host` header value names this host. `bind` is the address
/// the server was told to bind, which a user may also use in a URL. A
/// request without `Host` (HTTP/1.0) passes: browsers always send one.
pub fn host_is_local(host: Option<&str>, bind: IpAddr) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Some(name) = host_name(host.trim()) else {
        return false;
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    // Only the exact spellings: `127.1` or `2130706433` would also reach
    // loopback, but no client of ours writes them.
    match name.parse::<IpAddr>() {
        Ok(ip) => is_canonical_loopback(name) || (ip == bind && !bind.is_unspecified()),
        Err(_) => false,
    }
}

/// `name` from `name`, `name:port`, `[v6]` or `[v6]:port`; `None` when the
/// value is malformed (a port that is not a number, stray brackets).
fn host_name(host: &str) -> Option<&str> {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        match after {
            "" => (inside, None),
            _ => (inside, Some(after.strip_prefix(':')?)),
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    if let Some(port) = port
        && port.parse::<u16>().is_err()
    {
        return None;
    }
    (!name.is_empty()).then_some(name)
}

/// `127.0.0.1` and `::1` as written, not another loopback address.
fn is_canonical_loopback(name: &str) -> bool {
    matches!(name, "127.0.0.1" | "::1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_decided_by_the_socket_address() {
        for addr in [
            "127.0.0.1:1",
            "127.8.9.10:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(&addr.parse().unwrap()), "{addr}");
        }
        for addr in [
            "10.0.0.1:1",
            "192.168.1.2:1",
            "[::ffff:10.0.0.1]:1",
            "[fe80::1]:1",
            "0.0.0.0:1",
        ] {
            assert!(!is_loopback(&addr.parse().unwrap()), "{addr}");
        }
    }

    #[test]
    fn host_names_this_host_or_is_refused() {
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        for host in [
            "localhost",
            "LOCALHOST:12304",
            "127.0.0.1",
            "127.0.0.1:12304",
            "[::1]",
            "[::1]:80",
            " localhost:1 ",
        ] {
            assert!(host_is_local(Some(host), any), "{host}");
        }
        assert!(host_is_local(None, any), "HTTP/1.0 without Host");
        for host in [
            "evil.example",
            "evil.example:12304",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "127.0.0.2",
            "127.1",
            "2130706433",
            "[::1",
            "::1",
            "[::1]x",
            "localhost:port",
            "localhost:99999",
            "",
            ":12304",
            "0.0.0.0",
            "10.0.0.5:12304",
        ] {
            assert!(!host_is_local(Some(host), any), "{host}");
        }
    }

    #[test]
    fn the_bind_address_is_accepted_as_a_host() {
        let bind: IpAddr = "10.0.0.5".parse().unwrap();
        assert!(host_is_local(Some("10.0.0.5:12304"), bind));
        assert!(host_is_local(Some("localhost"), bind));
        assert!(!host_is_local(Some("10.0.0.6:12304"), bind));
        let bind6: IpAddr = "fd00::5".parse().unwrap();
        assert!(host_is_local(Some("[fd00::5]:12304"), bind6));
    }
}
