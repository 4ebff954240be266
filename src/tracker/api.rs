//! The tracker's HTTP API: request bodies, their validation, and the JSON
//! it answers with. The original peerix's paths, JSON in and out.
//!
//! # Requests that change state
//!
//! Each is signed by the node it describes ([`super::auth`]: the headers
//! `X-Peerix-Node`, `X-Peerix-Time`, `X-Peerix-Signature` over the method,
//! the request target as sent (path and query), the time and the body's
//! SHA-256), and its `node_id` must be the signer's. Unknown fields are
//! ignored.
//!
//! - `POST /iroh/announce` registers the signer, or refreshes it (the
//!   heartbeat, every 60 s; a peer lives `--peer-ttl` seconds after its
//!   last signed request):
//!
//!   ```json
//!   {"node_id": "<64 hex>",
//!    "http_addrs": ["192.0.2.7:12304", "[2001:db8::7]:12304"],
//!    "http_port": 12304,
//!    "relay_url": "https://relay.example/",
//!    "direct_addrs": ["192.0.2.7:40001"]}
//!   ```
//!
//!   Only `node_id` is required; at most 16 addresses of each kind, each an
//!   `ip:port` (no names, no port 0, no unspecified address); a relay URL is
//!   `http(s)://`, at most 512 printable ASCII characters. Answer:
//!   `{"node_id", "new": bool, "hashes": N, "ttl": SECS}`. `new` is true
//!   when the tracker held nothing for this node (first contact, expiry, a
//!   lost database): the node then sends its full set with a batch.
//! - `POST /packages/batch` `{"node_id", "hashes": ["<32 nix32>", ...]}`:
//!   the node's full set of shared hash parts, which replaces its rows.
//! - `POST /packages/delta` `{"node_id", "added": [...], "removed": [...]}`:
//!   changes to the set (either list may be left out; a hash in both is
//!   refused).
//!
//!   Both answer `{"node_id", "hashes": N, "added": A, "removed": R}`: the
//!   rows held now, and the ones this request really added and removed. At
//!   most 100 000 hashes per request (both lists together) and 1 000 000
//!   per node. A node that is not registered (or has expired) gets 409:
//!   it announces, then sends a full batch.
//! - `DELETE /iroh/peer/{node_id}`, signed by that node, with an empty
//!   body: the node and its rows go at once. `{"node_id", "deleted": true}`,
//!   or 404 when it is not registered.
//!
//! # Lookups
//!
//! Open to anyone, unless the tracker has an allow-list (`--allow-nodes`):
//! then they are signed by an allowed node too (no replay check: a replayed
//! lookup only repeats an answer).
//!
//! - `GET /find/{hash part}` → `{"hash", "providers": [peer, ...]}`: live
//!   peers only, at most 32; when more hold the path, each lookup starts at
//!   a random place among them, so the load spreads.
//! - `GET /iroh/peers` → `{"peers": [peer, ...], "total": N}`: the 1000 most
//!   recently seen live peers, and how many live peers there are.
//! - `GET /iroh/peer/{node_id}` → a peer, or 404 when it is unknown or
//!   expired.
//! - `GET /health` (always open) → `{"status": "ok", "version",
//!   "uptime_seconds", "peers", "hashes", "peer_ttl", "allow_list": N or
//!   null, "write_queue"}`: live peers and their rows.
//!
//! A peer is what its announce said, as the tracker wrote it down:
//!
//! ```json
//! {"node_id": "<64 hex>", "http_addrs": ["192.0.2.7:12304"], "http_port": 12304,
//!  "relay_url": null, "direct_addrs": [], "observed_ip": "192.0.2.7",
//!  "last_seen": 1760000000, "expires_in": 87}
//! ```
//!
//! `observed_ip` is where the announce came from (a client that does not
//! know its own address can use it with `http_port`); `last_seen` is in
//! unix seconds, `expires_in` in seconds.
//!
//! # Errors
//!
//! Every refusal is `{"error": "<why>"}`: 400 bad JSON, types, hashes, node
//! ids or addresses; 401 unsigned, stale, forged or replayed; 403 another
//! node's data, or a node not on the allow-list; 404 unknown path or peer;
//! 405 wrong method; 409 not registered; 413 a body over 8 MiB or a node
//! over its row limit; 429 too many live peers registered from one IP
//! address; 503 busy. A 5xx is the tracker's own failure, never a client's
//! mistake.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::identity::NodeId;
use crate::nix::nix32;
use crate::nix::store_path::HashPart;

/// A request body at most.
pub const MAX_BODY: usize = 8 * 1024 * 1024;
/// Hash parts in one batch or delta (both lists) at most.
pub const MAX_HASHES: usize = 100_000;
/// Rows one node may hold at most.
pub const MAX_HASHES_PER_PEER: u64 = 1_000_000;
/// Addresses of each kind in one announce at most.
pub const MAX_ADDRS: usize = 16;
pub const MAX_RELAY_URL: usize = 512;
/// Providers in one `/find` answer at most.
pub const MAX_PROVIDERS: usize = 32;
/// Peers in one `/iroh/peers` answer at most.
pub const MAX_LISTED_PEERS: usize = 1000;

/// A hash part as the database keeps it: the 20 bytes its 32 nix32
/// characters encode.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Hash(pub [u8; 20]);

impl Hash {
    pub fn parse(text: &str) -> Result<Hash, String> {
        let part = HashPart::parse(text).map_err(|e| format!("bad hash part: {e}"))?;
        // 32 nix32 characters are exactly 160 bits: every hash part decodes.
        nix32::decode_exact::<20>(part.as_str())
            .map(Hash)
            .map_err(|e| format!("bad hash part {text:?}: {e:?}"))
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&nix32::encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Hash, D::Error> {
        struct HashVisitor;
        impl Visitor<'_> for HashVisitor {
            type Value = Hash;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a hash part (32 nix32 characters)")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Hash, E> {
                Hash::parse(s).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(HashVisitor)
    }
}

/// A list of at most `MAX` items, refused while it is read when longer, so
/// a long list costs no more memory than its limit.
#[derive(Debug)]
pub struct Bounded<T, const MAX: usize>(pub Vec<T>);

impl<T, const MAX: usize> Default for Bounded<T, MAX> {
    fn default() -> Self {
        Bounded(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T, const MAX: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for ListVisitor<T, MAX> {
            type Value = Bounded<T, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(4096));
                while let Some(item) = seq.next_element()? {
                    if items.len() == MAX {
                        return Err(de::Error::custom(format!(
                            "too many items: at most {MAX} in one list"
                        )));
                    }
                    items.push(item);
                }
                Ok(Bounded(items))
            }
        }
        deserializer.deserialize_seq(ListVisitor(PhantomData))
    }
}

#[derive(Debug, Deserialize)]
pub struct AnnounceBody {
    pub node_id: String,
    #[serde(default)]
    pub http_addrs: Bounded<String, MAX_ADDRS>,
    #[serde(default)]
    pub http_port: Option<u16>,
    #[serde(default)]
    pub relay_url: Option<String>,
    #[serde(default)]
    pub direct_addrs: Bounded<String, MAX_ADDRS>,
}

#[derive(Debug, Deserialize)]
pub struct BatchBody {
    pub node_id: String,
    pub hashes: Bounded<Hash, MAX_HASHES>,
}

#[derive(Debug, Deserialize)]
pub struct DeltaBody {
    pub node_id: String,
    #[serde(default)]
    pub added: Bounded<Hash, MAX_HASHES>,
    #[serde(default)]
    pub removed: Bounded<Hash, MAX_HASHES>,
}

/// A refusal: the status and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, message)
    }

    /// `{"error": "<why>"}`.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.message }).to_string()
    }
}

/// Parses a JSON body into `T`; serde's message (with line and column)
/// says what is wrong.
pub fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))
}

/// The body's `node_id`, which must be the signer's: no node touches
/// another's data.
pub fn owned_node(node_id: &str, signer: NodeId) -> Result<NodeId, ApiError> {
    let node =
        NodeId::parse(node_id).map_err(|e| ApiError::bad_request(format!("node_id: {e}")))?;
    if node != signer {
        return Err(ApiError::new(
            403,
            format!("node {signer} may not change the data of node {node}"),
        ));
    }
    Ok(node)
}

/// What the tracker writes down of an announce, before the times.
#[derive(Serialize)]
struct Record<'a> {
    node_id: String,
    http_addrs: Vec<String>,
    http_port: Option<u16>,
    relay_url: Option<&'a str>,
    direct_addrs: Vec<String>,
    observed_ip: String,
}

/// Checks an announce from `signer`, seen from `observed`, and returns
/// the node and its record as JSON.
pub fn announce_record(
    body: &AnnounceBody,
    signer: NodeId,
    observed: IpAddr,
) -> Result<(NodeId, String), ApiError> {
    let node = owned_node(&body.node_id, signer)?;
    let http_addrs = addresses("http_addrs", &body.http_addrs.0)?;
    let direct_addrs = addresses("direct_addrs", &body.direct_addrs.0)?;
    if body.http_port == Some(0) {
        return Err(ApiError::bad_request("http_port: 0 is not a port"));
    }
    if let Some(url) = &body.relay_url {
        check_relay_url(url)?;
    }
    let record = Record {
        node_id: node.to_string(),
        http_addrs,
        http_port: body.http_port,
        relay_url: body.relay_url.as_deref(),
        direct_addrs,
        observed_ip: observed.to_canonical().to_string(),
    };
    let json = serde_json::to_string(&record)
        .map_err(|e| ApiError::new(500, format!("cannot write a peer record: {e}")))?;
    Ok((node, json))
}

/// `ip:port` addresses, strictly, written back in one canonical form and
/// without repeats.
fn addresses(field: &str, list: &[String]) -> Result<Vec<String>, ApiError> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    for text in list {
        let shown: String = text.chars().take(80).collect();
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{field}: {shown:?} is not ip:port")))?;
        if addr.port() == 0 || addr.ip().is_unspecified() || addr.ip().is_multicast() {
            return Err(ApiError::bad_request(format!(
                "{field}: {addr} is not an address a peer can be reached at"
            )));
        }
        if seen.insert(addr) {
            out.push(addr.to_string());
        }
    }
    Ok(out)
}

fn check_relay_url(url: &str) -> Result<(), ApiError> {
    if url.len() > MAX_RELAY_URL {
        return Err(ApiError::bad_request(format!(
            "relay_url: longer than {MAX_RELAY_URL} characters"
        )));
    }
    let printable = url.bytes().all(|b| b.is_ascii_graphic());
    let scheme = url.starts_with("https://") || url.starts_with("http://");
    let host = url.split_once("://").map(|(_, rest)| rest).unwrap_or("");
    if !printable || !scheme || host.is_empty() || host.starts_with('/') {
        return Err(ApiError::bad_request(
            "relay_url: not an http(s) URL of printable ASCII",
        ));
    }
    Ok(())
}

/// A delta's lists, checked: at most [`MAX_HASHES`] together, and no hash
/// both added and removed.
pub fn check_delta(added: &[Hash], removed: &[Hash]) -> Result<(), ApiError> {
    if added.len() + removed.len() > MAX_HASHES {
        return Err(ApiError::bad_request(format!(
            "too many hashes: at most {MAX_HASHES} in one request, added and removed together"
        )));
    }
    let removed: HashSet<&Hash> = removed.iter().collect();
    if let Some(both) = added.iter().find(|h| removed.contains(h)) {
        return Err(ApiError::bad_request(format!(
            "hash {both} is both added and removed"
        )));
    }
    Ok(())
}

/// A peer as the API shows it: its record, with the times added.
pub fn peer_json(record: &str, last_seen: i64, now: i64, ttl: i64) -> String {
    let expires_in = (last_seen + ttl - now).max(0);
    // The record is a JSON object written by `announce_record`: its
    // fields, then the times.
    let fields = record.strip_suffix('}').unwrap_or(record).trim_end();
    format!("{fields},\"last_seen\":{last_seen},\"expires_in\":{expires_in}}}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    const HASH: &str = "0c5dl4k5d8gqabyw4fjcxc9k8y5h4v0a";

    #[test]
    fn hashes_round_trip_and_parse_strictly() {
        let hash = Hash::parse(HASH).unwrap();
        assert_eq!(hash.to_string(), HASH);
        for bad in [
            "",
            "0c5dl4k5d8gqabyw4fjcxc9k8y5h4v0",
            "0c5dl4k5d8gqabyw4fjcxc9k8y5h4v0e",
        ] {
            assert!(Hash::parse(bad).is_err(), "{bad}");
        }
        let e = parse_body::<BatchBody>(br#"{"node_id":"x","hashes":["nope"]}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("bad hash part"), "{}", e.message);
    }

    #[test]
    fn lists_are_refused_while_read_when_too_long() {
        let list: Vec<String> = (0..=MAX_ADDRS)
            .map(|i| format!("\"10.0.0.{i}:1\""))
            .collect();
        let body = format!(r#"{{"node_id":"x","http_addrs":[{}]}}"#, list.join(","));
        let e = parse_body::<AnnounceBody>(body.as_bytes()).err().unwrap();
        assert!(e.message.contains("too many items"), "{}", e.message);
        let e = check_delta(&vec![Hash([0; 20]); MAX_HASHES], &[Hash([1; 20])]).unwrap_err();
        assert!(e.message.contains("too many hashes"), "{}", e.message);
        let e = check_delta(&[Hash([1; 20])], &[Hash([1; 20])]).unwrap_err();
        assert!(
            e.message.contains("both added and removed"),
            "{}",
            e.message
        );
    }

    #[test]
    fn an_announce_is_checked_and_written_canonically() {
        let me = Identity::for_tests(1);
        let other = Identity::for_tests(2);
        let ip: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        let body = |extra: &str| format!(r#"{{"node_id":"{}"{extra}}}"#, me.node_id());
        let parsed = parse_body::<AnnounceBody>(
            body(r#","http_addrs":["192.0.2.9:12304","192.0.2.9:12304","[2001:db8::1]:80"],"http_port":12304,"relay_url":"https://r.example/","peer_id":"ignored""#)
                .as_bytes(),
        )
        .unwrap();
        let (node, record) = announce_record(&parsed, me.node_id(), ip).unwrap();
        assert_eq!(node, me.node_id());
        let shown: serde_json::Value =
            serde_json::from_str(&peer_json(&record, 100, 150, 120)).unwrap();
        assert_eq!(
            shown,
            serde_json::json!({
                "node_id": me.node_id().to_string(),
                "http_addrs": ["192.0.2.9:12304", "[2001:db8::1]:80"],
                "http_port": 12304,
                "relay_url": "https://r.example/",
                "direct_addrs": [],
                "observed_ip": "192.0.2.9",
                "last_seen": 100,
                "expires_in": 70,
            })
        );
        let e = announce_record(&parsed, other.node_id(), ip).unwrap_err();
        assert_eq!(e.status, 403);
        for (extra, needle) in [
            (r#","http_addrs":["pi.lan:1"]"#, "not ip:port"),
            (r#","http_addrs":["0.0.0.0:1"]"#, "not an address"),
            (r#","direct_addrs":["10.0.0.1:0"]"#, "not an address"),
            (r#","http_port":0"#, "http_port"),
            (r#","relay_url":"ftp://x""#, "relay_url"),
            (r#","relay_url":"https://a b""#, "relay_url"),
        ] {
            let parsed = parse_body::<AnnounceBody>(body(extra).as_bytes()).unwrap();
            let e = announce_record(&parsed, me.node_id(), ip).unwrap_err();
            assert_eq!(e.status, 400, "{extra}");
            assert!(e.message.contains(needle), "{extra}: {}", e.message);
        }
        let e = parse_body::<AnnounceBody>(body(r#","http_port":70000"#).as_bytes())
            .err()
            .unwrap();
        assert_eq!(e.status, 400);
    }
}
