//! A peer's identity: how it is reached.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A peer, as every discovery source and transport names it.
///
/// Today every peer is an HTTP server at an address (found on the LAN, or
/// through the tracker). An Iroh node, named by its node id, will be the
/// second kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerId {
    /// A peerix (or the original peerix) serving `/local/` over HTTP.
    Http(SocketAddr),
}

/// What reputation is kept against: the host behind a peer. An HTTP peer
/// names its own port (in its UDP replies, in a tracker record), so a liar
/// could shed a ban with a new port; its IP address it cannot choose as
/// freely.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostKey {
    Ip(IpAddr),
}

impl PeerId {
    pub fn host(&self) -> HostKey {
        match self {
            // IPv4-mapped IPv6 is the same host as its IPv4 address.
            PeerId::Http(addr) => HostKey::Ip(addr.ip().to_canonical()),
        }
    }

    /// The form that names this peer in a URL path segment, such as the
    /// route that passes its NARs through: `http:<ip>:<port>` (IPv6 in
    /// brackets). [`PeerId::parse`] reads it back.
    pub fn to_token(&self) -> String {
        match self {
            PeerId::Http(addr) => format!("http:{addr}"),
        }
    }

    /// Reads [`PeerId::to_token`]'s form, strictly.
    pub fn parse(token: &str) -> Option<PeerId> {
        let (kind, rest) = token.split_once(':')?;
        match kind {
            "http" => rest.parse::<SocketAddr>().ok().map(PeerId::Http),
            _ => None,
        }
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerId::Http(addr) => write!(f, "{addr}"),
        }
    }
}

impl fmt::Display for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostKey::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_parse_strictly() {
        for text in ["10.0.0.1:12304", "[fd00::1]:80", "[::ffff:10.0.0.1]:1"] {
            let peer = PeerId::Http(text.parse().unwrap());
            assert_eq!(PeerId::parse(&peer.to_token()), Some(peer), "{text}");
        }
        for bad in [
            "",
            "http:",
            "10.0.0.1:12304",
            "http:10.0.0.1",
            "http:10.0.0.1:99999",
            "iroh:abc",
            "HTTP:10.0.0.1:1",
            "http:host.example:1",
            "http: 10.0.0.1:1",
        ] {
            assert_eq!(PeerId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_host_ignores_the_port_and_ipv4_mapping() {
        let a = PeerId::Http("10.0.0.1:1".parse().unwrap());
        let b = PeerId::Http("10.0.0.1:2".parse().unwrap());
        let mapped = PeerId::Http("[::ffff:10.0.0.1]:3".parse().unwrap());
        assert_eq!(a.host(), b.host());
        assert_eq!(a.host(), mapped.host());
        assert_ne!(a.host(), PeerId::Http("10.0.0.2:1".parse().unwrap()).host());
    }
}
