//! LAN discovery's own settings. The daemon's configuration fills them in
//! from flags and the config file; this module knows nothing of either.

use std::fmt;
use std::time::Duration;

/// peerix's port: HTTP, and the UDP port LAN queries are sent to.
pub const DEFAULT_PORT: u16 = 12304;
/// How long a LAN query collects replies. Long enough for a peer on Wi-Fi
/// to hear a broadcast held back to the next DTIM beacon (102 ms apart, and
/// often every second or third beacon), short enough that the miss nix waits
/// for once per path (it then caches the 404 for an hour) is not felt.
pub const DEFAULT_LAN_TIMEOUT: Duration = Duration::from_millis(250);

/// LAN discovery settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanConfig {
    pub enabled: bool,
    /// How long a query collects replies.
    pub timeout: Duration,
    pub broadcast: bool,
    /// Peers asked by unicast, for networks broadcast does not cross.
    pub extra_peers: Vec<PeerSpec>,
}

impl Default for LanConfig {
    /// On, broadcasting, no extra peers: there is no tracker yet.
    fn default() -> Self {
        LanConfig {
            enabled: true,
            timeout: DEFAULT_LAN_TIMEOUT,
            broadcast: true,
            extra_peers: Vec::new(),
        }
    }
}

/// `HOST[:PORT]` of a peer; resolved when used, so a name that does not
/// resolve at boot is tried again later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    pub host: String,
    pub port: u16,
}

impl PeerSpec {
    pub fn parse(text: &str) -> Result<PeerSpec, String> {
        if text.starts_with('[') || text.matches(':').count() > 1 {
            // The LAN socket is IPv4, as broadcast is.
            return Err(format!(
                "`{text}`: IPv6 peers are not supported; give an IPv4 address or a name"
            ));
        }
        let (host, port) = if text.matches(':').count() == 1 {
            let (host, port) = text.split_once(':').unwrap_or((text, ""));
            (host, Some(port))
        } else {
            (text, None)
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(format!("`{text}`: expected HOST[:PORT]"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(port) => port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("`{text}`: port must be 1 to 65535"))?,
        };
        Ok(PeerSpec {
            host: host.to_string(),
            port,
        })
    }
}

impl std::str::FromStr for PeerSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<PeerSpec, String> {
        PeerSpec::parse(text)
    }
}

impl fmt::Display for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}
