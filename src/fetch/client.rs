//! The HTTP transport: requests to a peer's `/local` cache, with connect
//! and read timeouts, and what each kind of bad answer says about the peer.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::transport::{NarBody, Transport};
use crate::nix::narinfo::{MAX_NARINFO_LEN, NarInfo};
use crate::nix::store_path::HashPart;
use crate::peers::{Failure, PeerId, PeerTable};

/// What went wrong with a request to a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerError {
    /// It no longer has the path: no fault of its own.
    NotFound,
    /// Its answer is honest but of no use here (compressed, say).
    Unusable(String),
    /// Unreachable, too slow, or an error status: maybe a passing problem.
    Unavailable(String),
    /// It sent something false or malformed.
    Lied(String),
}

impl PeerError {
    /// How the peer table should count this, if at all.
    pub fn failure(&self) -> Option<Failure> {
        match self {
            PeerError::NotFound | PeerError::Unusable(_) => None,
            PeerError::Unavailable(_) => Some(Failure::Unavailable),
            PeerError::Lied(_) => Some(Failure::Lied),
        }
    }
}

impl PeerError {
    /// Logs what `peer` did while serving `what`, and counts it in `peers`.
    pub fn record(&self, peers: &PeerTable, peer: PeerId, what: &str) {
        match self {
            PeerError::Lied(_) => log::warn!("peer {peer} lied about {what}: {self}; banned"),
            _ => log::info!("peer {peer}, {what}: {self}"),
        }
        if let Some(failure) = self.failure() {
            peers.record_failure(peer, failure, Instant::now());
        }
    }
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::NotFound => f.write_str("not found"),
            PeerError::Unusable(why) => write!(f, "unusable: {why}"),
            PeerError::Unavailable(why) => write!(f, "unavailable: {why}"),
            PeerError::Lied(why) => write!(f, "bad answer: {why}"),
        }
    }
}

/// Bytes skipped at a time when a peer ignores Range: the same chunk, and
/// so the same floor rate, as a NAR transfer reads.
const SKIP_CHUNK: usize = 128 * 1024;

pub struct PeerClient {
    agent: ureq::Agent,
    timeout: Duration,
}

impl PeerClient {
    /// `timeout` bounds connecting, each wait for bytes, a whole narinfo
    /// request, and each chunk of a NAR (see `transfer`).
    pub fn new(timeout: Duration) -> PeerClient {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // Peers are on the LAN: an HTTP_PROXY from the environment must not apply.
            .proxy(None)
            .max_redirects(0)
            .timeout_connect(Some(timeout))
            .timeout_send_request(Some(timeout))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(timeout))
            .max_idle_connections_per_host(4)
            .user_agent(concat!("peerix/", env!("CARGO_PKG_VERSION")))
            .build();
        PeerClient {
            agent: agent_for_addresses(config),
            timeout,
        }
    }

    /// The timeout towards peers.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET http://<peer>/local/<hash>.narinfo`, parsed; a narinfo for
    /// another path is a lie. The whole exchange ends by `deadline`, and
    /// within the timeout.
    fn http_narinfo(
        &self,
        peer: SocketAddr,
        hash: &HashPart,
        deadline: Instant,
    ) -> Result<NarInfo, PeerError> {
        let url = format!("http://{peer}/local/{hash}.narinfo");
        // A narinfo is small: the whole exchange, not just each read, is
        // bounded, so a peer trickling bytes cannot hold a worker.
        let budget = self.timeout.min(time_left(&url, deadline)?);
        let response = self
            .agent
            .get(&url)
            .config()
            .timeout_global(Some(budget))
            .build()
            .call()
            .map_err(|e| PeerError::Unavailable(format!("{url}: {e}")))?;
        if response.status() != 200 {
            return Err(status_error(&url, response.status().as_u16()));
        }
        let body = response
            .into_body()
            .into_with_config()
            .limit(MAX_NARINFO_LEN as u64)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => {
                    PeerError::Lied(format!("{url}: narinfo over {MAX_NARINFO_LEN} bytes"))
                }
                e => PeerError::Unavailable(format!("{url}: {e}")),
            })?;
        let text = String::from_utf8(body)
            .map_err(|_| PeerError::Lied(format!("{url}: narinfo is not UTF-8")))?;
        let info = NarInfo::parse(&text).map_err(|e| PeerError::Lied(format!("{url}: {e}")))?;
        if info.store_path.hash_part() != *hash {
            return Err(PeerError::Lied(format!(
                "{url}: answered with {}",
                info.store_path
            )));
        }
        Ok(info)
    }

    /// The NAR at `path` on the peer (see [`nar_path_on_peer`]), from byte
    /// `offset` on. A peer may ignore the Range, and may send no
    /// Content-Length (the original peerix streams it chunked): the NAR's
    /// own structure and its NarHash tell when it is complete and right. Everything, from connecting to the body's last byte and
    /// the bytes skipped when the peer ignores the Range, ends by `deadline`.
    fn http_nar(
        &self,
        peer: SocketAddr,
        path: &str,
        offset: u64,
        deadline: Instant,
    ) -> Result<NarBody, PeerError> {
        let url = format!("http://{peer}{path}");
        let response = self.get(&url, offset, time_left(&url, deadline)?)?;
        let status = response.status().as_u16();
        let content_range = response
            .headers()
            .get("content-range")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let length = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let reader = response.into_body().into_reader();
        let mut body: NarBody = match length {
            Some(left) => Box::new(HandsBack { reader, left }),
            None => Box::new(reader),
        };
        match status {
            200 if offset > 0 => {
                // It ignored the Range: skip to the offset, at the same
                // floor rate as the bytes that count.
                self.skip(&mut body, offset).map_err(|e| {
                    PeerError::Unavailable(format!("{url}: skipping to {offset}: {e}"))
                })?;
                Ok(body)
            }
            200 => Ok(body),
            206 if content_range_start(content_range.as_deref()) == Some(offset) => Ok(body),
            206 => Err(PeerError::Unavailable(format!(
                "{url}: asked for bytes from {offset}, got {content_range:?}"
            ))),
            other => Err(status_error(&url, other)),
        }
    }

    /// Reads and drops `len` bytes, a chunk per timeout at least.
    fn skip(&self, body: &mut NarBody, mut len: u64) -> io::Result<()> {
        let mut buf = vec![0u8; SKIP_CHUNK];
        while len > 0 {
            let want = buf.len().min(usize::try_from(len).unwrap_or(buf.len()));
            let (n, error) = read_full(body, &mut buf[..want], self.timeout);
            if let Some(e) = error {
                return Err(e);
            }
            if n < want {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "ended early"));
            }
            len -= n as u64;
        }
        Ok(())
    }

    fn get(
        &self,
        url: &str,
        offset: u64,
        budget: Duration,
    ) -> Result<ureq::http::Response<ureq::Body>, PeerError> {
        let mut request = self.agent.get(url);
        if offset > 0 {
            request = request.header("Range", format!("bytes={offset}-"));
        }
        request
            .config()
            .timeout_global(Some(budget))
            .build()
            .call()
            .map_err(|e| PeerError::Unavailable(format!("{url}: {e}")))
    }
}

impl Transport for PeerClient {
    fn narinfo(
        &self,
        peer: &PeerId,
        hash: &HashPart,
        deadline: Instant,
    ) -> Result<NarInfo, PeerError> {
        match peer {
            PeerId::Http(addr) => self.http_narinfo(*addr, hash, deadline),
        }
    }

    fn locate_nar(&self, peer: &PeerId, url: &str) -> Option<String> {
        match peer {
            PeerId::Http(_) => nar_path_on_peer(url),
        }
    }

    fn nar(
        &self,
        peer: &PeerId,
        location: &str,
        offset: u64,
        deadline: Instant,
    ) -> Result<NarBody, PeerError> {
        match peer {
            PeerId::Http(addr) => self.http_nar(*addr, location, offset, deadline),
        }
    }

    fn chunk_timeout(&self) -> Duration {
        self.timeout
    }
}

/// An agent for URLs that name an IP address and port, as peers' do.
/// ureq's own resolver runs every lookup, an IP address's too, on a thread
/// of its own when the request has a timeout: a thread started and ended
/// for each narinfo and each NAR asked of a peer. Here an address is taken
/// as it is; a name is still looked up as ureq does.
pub fn agent_for_addresses(config: ureq::config::Config) -> ureq::Agent {
    ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        Addresses,
    )
}

#[derive(Debug)]
struct Addresses;

impl ureq::unversioned::resolver::Resolver for Addresses {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let literal = uri
            .authority()
            .and_then(|authority| authority.as_str().parse::<SocketAddr>().ok());
        match literal {
            Some(addr) if uri.scheme_str() == Some("http") => {
                let mut addrs = self.empty();
                addrs.push(addr);
                Ok(addrs)
            }
            _ => ureq::unversioned::resolver::DefaultResolver::default()
                .resolve(uri, config, timeout),
        }
    }
}

/// A body of known length that, once its last byte is read, reads its end:
/// the agent only keeps a connection for the next request when it has seen
/// that, and a NAR transfer stops reading at the NAR's last byte. Without
/// it, every NAR passed through cost a new connection to the peer. (That
/// read does no I/O; a body of unknown length is not read further, as its
/// end could be slow to come.)
struct HandsBack<R> {
    reader: R,
    left: u64,
}

impl<R: io::Read> io::Read for HandsBack<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        if n > 0 && self.left > 0 {
            self.left = self.left.saturating_sub(n as u64);
            if self.left == 0 {
                // Only the end can come now: the reader counts the length too.
                let _ = self.reader.read(&mut [0u8; 1]);
            }
        }
        Ok(n)
    }
}

/// Reads until `buf` is full, the body ends, an error, or `timeout` has
/// passed; returns the bytes read and the error, if any. The time limit
/// sets a floor on a holder's rate (a chunk per timeout: 26 KB/s with the
/// defaults), so a peer that trickles bytes is replaced by the next holder.
pub fn read_full(
    body: &mut NarBody,
    buf: &mut [u8],
    timeout: Duration,
) -> (usize, Option<io::Error>) {
    let deadline = Instant::now() + timeout;
    let mut filled = 0;
    while filled < buf.len() {
        if Instant::now() > deadline {
            let slow = io::Error::new(
                io::ErrorKind::TimedOut,
                "a chunk took longer than the timeout",
            );
            return (filled, Some(slow));
        }
        match body.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (filled, Some(e)),
        }
    }
    (filled, None)
}

/// The time until `deadline`; none left is the request's failure, and no
/// fault of the peer's, so it is `Unusable` (not counted against it).
fn time_left(url: &str, deadline: Instant) -> Result<Duration, PeerError> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(left) if !left.is_zero() => Ok(left),
        _ => Err(PeerError::Unusable(format!("{url}: out of time"))),
    }
}

fn status_error(url: &str, status: u16) -> PeerError {
    match status {
        404 | 410 => PeerError::NotFound,
        other => PeerError::Unavailable(format!("{url}: HTTP {other}")),
    }
}

/// `bytes START-END/SIZE` → START.
fn content_range_start(value: Option<&str>) -> Option<u64> {
    let range = value?.trim().strip_prefix("bytes ")?;
    range.split_once('-')?.0.parse().ok()
}

/// The longest NAR URL taken from a peer's narinfo.
const MAX_NAR_URL: usize = 512;

/// Where on a peer the NAR its narinfo's `URL:` names is, as an absolute
/// path, if this host may fetch it. Two forms are taken, both meaning
/// `/local/nar/<name>` on the peer:
/// - `nar/<name>`, relative to its `/local/` (peerix-rs, and any plain
///   binary cache);
/// - `local/nar/<name>`, relative to its root (the original peerix, whose
///   `<name>` is the store path in base64 with `/` written as `_`).
///
/// Anything else (another host, `..`, a query, odd bytes) could point this
/// host's HTTP client elsewhere, and is refused.
pub fn nar_path_on_peer(url: &str) -> Option<String> {
    let name = url
        .strip_prefix("nar/")
        .or_else(|| url.strip_prefix("local/nar/"))?;
    // The original's name is the base64 of the store path: 354 bytes of
    // URL for the longest name nix allows (211 characters).
    let safe = !name.is_empty()
        && url.len() <= MAX_NAR_URL
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._+=/".contains(&b))
        && name
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    safe.then(|| format!("/local/nar/{name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_nar_paths_are_fetched() {
        for (good, path) in [
            (
                "nar/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar",
                "/local/nar/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s.nar",
            ),
            ("nar/abc.nar", "/local/nar/abc.nar"),
            // The original peerix: base64 of the store path, `/` as `_`.
            (
                "local/nar/L25peC9zdG9yZS8wYzRrendxN3F4ZGthejJ6ZDZpYnBjcmw1ZGw4Ym0xZC1oZWxsbw==.nar",
                "/local/nar/L25peC9zdG9yZS8wYzRrendxN3F4ZGthejJ6ZDZpYnBjcmw1ZGw4Ym0xZC1oZWxsbw==.nar",
            ),
            ("local/nar/a_b+c=.nar", "/local/nar/a_b+c=.nar"),
        ] {
            assert_eq!(nar_path_on_peer(good).as_deref(), Some(path), "{good}");
        }
        // The longest store path name nix allows, as the original names it.
        let longest = format!("/nix/store/{}-{}", "0".repeat(32), "x".repeat(211));
        let name = base64_like(longest.len());
        let url = format!("local/nar/{name}.nar");
        assert!(url.len() >= 354, "{}", url.len());
        assert!(nar_path_on_peer(&url).is_some());
        assert!(nar_path_on_peer(&format!("local/nar/{}.nar", "A".repeat(600))).is_none());
        assert_eq!(
            nar_path_on_peer("nar/a.nar").as_deref(),
            Some("/local/nar/a.nar")
        );
        for bad in [
            "",
            "/nar/x.nar",
            "nar/../../etc/passwd",
            "nar//x",
            "http://evil/nar/x",
            "nar/x.nar?y=1",
            "nar/x y",
            "local/x.narinfo",
            "nar/./x",
            "nar/",
            "local/nar/",
            "local/x.nar",
            "local/nar/../../x",
            "/local/nar/x.nar",
            "local//nar/x.nar",
            "v2/remote/x.nar",
            "nar/x%2e%2e.nar",
        ] {
            assert_eq!(nar_path_on_peer(bad), None, "{bad}");
        }
    }

    /// A base64-length name (`4 * ceil(len / 3)` characters) of `A`s.
    fn base64_like(len: usize) -> String {
        "A".repeat(len.div_ceil(3) * 4)
    }

    #[test]
    fn content_range_start_is_read_strictly() {
        assert_eq!(content_range_start(Some("bytes 10-19/20")), Some(10));
        assert_eq!(content_range_start(Some("bytes */20")), None);
        assert_eq!(content_range_start(Some("10-19/20")), None);
        assert_eq!(content_range_start(None), None);
    }
}
