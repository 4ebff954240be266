//! The two state files, version 1. Both are JSON objects that name their
//! `format` and `version` and carry `saved_at` (UNIX seconds).
//!
//! `stats.json`:
//! ```text
//! {"format":"peerix-stats","version":1,"saved_at":1800000000,
//!  "totals":{"nars_served":0,"narinfos_served":0,"cache_hits":0,
//!            "cache_misses":0,"peer_requests":0,"errors":0},
//!  "bytes":{"sent_local":0,"sent_peers":{"lan":0,"tracker":0,"iroh":0},
//!           "received_peers":{"lan":0,"tracker":0,"iroh":0}},
//!  "top_requested":[{"hash":"<32 nix32>","name":"hello-2.12"|null,
//!                    "count":3,"error":0}],
//!  "top_served":[...]}
//! ```
//! `peers.json`:
//! ```text
//! {"format":"peerix-peers","version":1,"saved_at":1800000000,
//!  "peers":[{"peer":"http:10.0.0.7:12304","successes":1,"failures":0,
//!            "lies":0,"bytes":1024,"latency_ms":3.5|null,
//!            "consecutive_failures":0,"backoff_until":null,
//!            "banned_until":1800086400|null}]}
//! ```
//! `*_until` are UNIX seconds, rounded up. Parsing is strict: any other
//! format or version, a missing or unknown key, a wrong type, a count out
//! of range, or more entries than peerix ever writes rejects the file.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::fmt::Write;

use serde_json::{Map, Value};

use crate::json::shown;

use crate::nix::store_path::HashPart;
use crate::peers::{MAX_PEERS, PeerId, SavedPeer};
use crate::stats::{Counters, SavedTop, Source, TOP_SAVED, Totals};

pub const VERSION: u64 = 1;
const STATS_FORMAT: &str = "peerix-stats";
const PEERS_FORMAT: &str = "peerix-peers";
/// Longer path names are not Nix store path names.
const MAX_NAME: usize = 211;

/// `time` as UNIX seconds, rounded up (0 before the epoch).
pub fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
}

/// A JSON string: `text` quoted and escaped.
fn quoted(text: &str) -> String {
    crate::json::quoted(text)
}

/// `{"lan":N,"tracker":N,"iroh":N}`
fn by_source(out: &mut String, counts: &[u64; 3]) {
    let mut sep = '{';
    for source in Source::ALL {
        let _ = write!(
            out,
            "{sep}\"{}\":{}",
            source.label(),
            counts[source as usize]
        );
        sep = ',';
    }
    out.push('}');
}

fn tops(out: &mut String, list: &[SavedTop]) {
    out.push('[');
    for (i, t) in list.iter().enumerate() {
        let name = t.name.as_deref().map_or_else(|| "null".into(), quoted);
        let _ = write!(
            out,
            "{}{{\"hash\":\"{}\",\"name\":{name},\"count\":{},\"error\":{}}}",
            if i == 0 { "" } else { "," },
            t.hash.as_str(),
            t.count,
            t.error
        );
    }
    out.push(']');
}

fn or_null(value: Option<impl std::fmt::Display>) -> String {
    value.map_or_else(|| "null".into(), |v| v.to_string())
}

/// Written by hand rather than through `json!`, whose inlined map
/// inserts cost the binary tens of KB.
#[inline(never)]
pub fn render_stats(t: &Totals, now: SystemTime) -> Vec<u8> {
    let mut out = String::with_capacity(256 + 100 * (t.top_requested.len() + t.top_served.len()));
    let _ = write!(
        out,
        "{{\"format\":\"{STATS_FORMAT}\",\"version\":{VERSION},\"saved_at\":{},\
         \"totals\":{{\"nars_served\":{},\"narinfos_served\":{},\"cache_hits\":{},\
         \"cache_misses\":{},\"peer_requests\":{},\"errors\":{}}},\
         \"bytes\":{{\"sent_local\":{},\"sent_peers\":",
        unix_secs(now),
        t.counters.nars_served,
        t.counters.narinfos_served,
        t.counters.cache_hits,
        t.counters.cache_misses,
        t.counters.peer_requests,
        t.counters.errors,
        t.counters.bytes_sent_local
    );
    by_source(&mut out, &t.counters.bytes_sent_peers);
    out.push_str(",\"received_peers\":");
    by_source(&mut out, &t.counters.bytes_received_peers);
    out.push_str("},\"top_requested\":");
    tops(&mut out, &t.top_requested);
    out.push_str(",\"top_served\":");
    tops(&mut out, &t.top_served);
    out.push_str("}\n");
    out.into_bytes()
}

#[inline(never)]
pub fn render_peers(peers: &[SavedPeer], now: SystemTime) -> Vec<u8> {
    let mut out = String::with_capacity(128 + 250 * peers.len());
    let _ = write!(
        out,
        "{{\"format\":\"{PEERS_FORMAT}\",\"version\":{VERSION},\"saved_at\":{},\"peers\":[",
        unix_secs(now)
    );
    for (i, p) in peers.iter().enumerate() {
        // `{:?}` writes an f64 so that it reads back exactly.
        let _ = write!(
            out,
            "{}{{\"peer\":{},\"successes\":{},\"failures\":{},\"lies\":{},\"bytes\":{},\
             \"latency_ms\":{},\"consecutive_failures\":{},\"backoff_until\":{},\
             \"banned_until\":{}}}",
            if i == 0 { "" } else { "," },
            quoted(&p.peer.to_token()),
            p.successes,
            p.failures,
            p.lies,
            p.bytes,
            or_null(
                p.latency_ms
                    .filter(|ms| ms.is_finite())
                    .map(|ms| format!("{ms:?}"))
            ),
            p.consecutive_failures,
            or_null(p.backoff_until.map(unix_secs)),
            or_null(p.banned_until.map(unix_secs)),
        );
    }
    out.push_str("]}\n");
    out.into_bytes()
}

/// A JSON object whose keys are exactly the expected ones.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    what: &'a str,
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, what: &'a str, keys: &[&str]) -> Result<Obj<'a>, String> {
        let map = value
            .as_object()
            .ok_or_else(|| format!("{what} is not an object"))?;
        if let Some(unknown) = map.keys().find(|k| !keys.contains(&k.as_str())) {
            return Err(format!("{what}: unknown key `{unknown}`"));
        }
        if let Some(missing) = keys.iter().find(|k| !map.contains_key(**k)) {
            return Err(format!("{what}: missing key `{missing}`"));
        }
        Ok(Obj { map, what })
    }

    fn get(&self, key: &str) -> &'a Value {
        &self.map[key]
    }

    fn u64(&self, key: &str) -> Result<u64, String> {
        self.get(key)
            .as_u64()
            .ok_or_else(|| format!("{}: `{key}` is not a whole number", self.what))
    }

    fn time(&self, key: &str) -> Result<Option<SystemTime>, String> {
        match self.get(key) {
            Value::Null => Ok(None),
            _ => UNIX_EPOCH
                .checked_add(Duration::from_secs(self.u64(key)?))
                .map(Some)
                .ok_or_else(|| format!("{}: `{key}` is out of range", self.what)),
        }
    }

    fn array(&self, key: &str, max: usize) -> Result<&'a Vec<Value>, String> {
        let list = self
            .get(key)
            .as_array()
            .ok_or_else(|| format!("{}: `{key}` is not an array", self.what))?;
        if list.len() > max {
            return Err(format!(
                "{}: `{key}` has {} entries, more than {max}",
                self.what,
                list.len()
            ));
        }
        Ok(list)
    }
}

/// The document's top-level object, once its format and version are ours.
fn document<'a>(value: &'a Value, format: &str, keys: &[&str]) -> Result<Obj<'a>, String> {
    let obj = Obj::new(value, "the file", keys)?;
    if obj.get("format").as_str() != Some(format) {
        return Err(format!(
            "not a {format} file: format {}",
            shown(obj.get("format"))
        ));
    }
    let version = obj.u64("version")?;
    if version != VERSION {
        return Err(format!(
            "unknown version {version} (this peerix reads {VERSION})"
        ));
    }
    obj.u64("saved_at")?;
    Ok(obj)
}

fn parse_json(bytes: &[u8]) -> Result<Value, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

fn parse_by_source(value: &Value, what: &str) -> Result<[u64; 3], String> {
    let labels = Source::ALL.map(Source::label);
    let obj = Obj::new(value, what, &labels)?;
    let mut counts = [0; 3];
    for source in Source::ALL {
        counts[source as usize] = obj.u64(source.label())?;
    }
    Ok(counts)
}

fn parse_tops(list: &[Value]) -> Result<Vec<SavedTop>, String> {
    let mut seen = HashSet::new();
    list.iter()
        .map(|entry| {
            let e = Obj::new(entry, "a top-N entry", &["hash", "name", "count", "error"])?;
            let hash = e
                .get("hash")
                .as_str()
                .and_then(|h| HashPart::parse(h).ok())
                .ok_or_else(|| format!("a top-N entry: bad hash {}", shown(e.get("hash"))))?;
            if !seen.insert(hash) {
                return Err(format!("a top-N entry: {} twice", hash.as_str()));
            }
            let name = match e.get("name") {
                Value::Null => None,
                Value::String(name) if !name.is_empty() && name.len() <= MAX_NAME => {
                    Some(name.as_str().into())
                }
                other => return Err(format!("a top-N entry: bad name {}", shown(other))),
            };
            let (count, error) = (e.u64("count")?, e.u64("error")?);
            if error > count {
                return Err(format!("a top-N entry: error {error} over count {count}"));
            }
            Ok(SavedTop {
                hash,
                name,
                count,
                error,
            })
        })
        .collect()
}

#[inline(never)]
pub fn parse_stats(bytes: &[u8]) -> Result<Totals, String> {
    let value = parse_json(bytes)?;
    let doc = document(
        &value,
        STATS_FORMAT,
        &[
            "format",
            "version",
            "saved_at",
            "totals",
            "bytes",
            "top_requested",
            "top_served",
        ],
    )?;
    let totals = Obj::new(
        doc.get("totals"),
        "totals",
        &[
            "nars_served",
            "narinfos_served",
            "cache_hits",
            "cache_misses",
            "peer_requests",
            "errors",
        ],
    )?;
    let bytes = Obj::new(
        doc.get("bytes"),
        "bytes",
        &["sent_local", "sent_peers", "received_peers"],
    )?;
    Ok(Totals {
        counters: Counters {
            nars_served: totals.u64("nars_served")?,
            narinfos_served: totals.u64("narinfos_served")?,
            cache_hits: totals.u64("cache_hits")?,
            cache_misses: totals.u64("cache_misses")?,
            peer_requests: totals.u64("peer_requests")?,
            errors: totals.u64("errors")?,
            bytes_sent_local: bytes.u64("sent_local")?,
            bytes_sent_peers: parse_by_source(bytes.get("sent_peers"), "bytes.sent_peers")?,
            bytes_received_peers: parse_by_source(
                bytes.get("received_peers"),
                "bytes.received_peers",
            )?,
        },
        top_requested: parse_tops(doc.array("top_requested", TOP_SAVED)?)?,
        top_served: parse_tops(doc.array("top_served", TOP_SAVED)?)?,
    })
}

#[inline(never)]
pub fn parse_peers(bytes: &[u8]) -> Result<Vec<SavedPeer>, String> {
    let value = parse_json(bytes)?;
    let doc = document(
        &value,
        PEERS_FORMAT,
        &["format", "version", "saved_at", "peers"],
    )?;
    let mut hosts = HashSet::new();
    doc.array("peers", MAX_PEERS)?
        .iter()
        .map(|entry| {
            let p = Obj::new(
                entry,
                "a peer",
                &[
                    "peer",
                    "successes",
                    "failures",
                    "lies",
                    "bytes",
                    "latency_ms",
                    "consecutive_failures",
                    "backoff_until",
                    "banned_until",
                ],
            )?;
            let peer = p
                .get("peer")
                .as_str()
                .and_then(PeerId::parse)
                .ok_or_else(|| format!("a peer: bad peer {}", shown(p.get("peer"))))?;
            if !hosts.insert(peer.host()) {
                return Err(format!("a peer: host {} twice", peer.host()));
            }
            let latency_ms = match p.get("latency_ms") {
                Value::Null => None,
                v => match v.as_f64() {
                    Some(ms) if ms.is_finite() && ms >= 0.0 => Some(ms),
                    _ => return Err(format!("a peer: bad latency_ms {}", shown(v))),
                },
            };
            let consecutive_failures = u32::try_from(p.u64("consecutive_failures")?)
                .map_err(|_| "a peer: consecutive_failures out of range".to_string())?;
            Ok(SavedPeer {
                peer,
                successes: p.u64("successes")?,
                failures: p.u64("failures")?,
                lies: p.u64("lies")?,
                bytes: p.u64("bytes")?,
                latency_ms,
                consecutive_failures,
                backoff_until: p.time("backoff_until")?,
                banned_until: p.time("banned_until")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(c: char) -> HashPart {
        HashPart::parse(&c.to_string().repeat(32)).unwrap()
    }

    fn sample_totals() -> Totals {
        Totals {
            counters: Counters {
                nars_served: 1,
                narinfos_served: 2,
                cache_hits: 3,
                cache_misses: 4,
                peer_requests: 5,
                errors: 6,
                bytes_sent_local: 7,
                bytes_sent_peers: [8, 9, 10],
                bytes_received_peers: [11, 12, 13],
            },
            top_requested: vec![SavedTop {
                hash: hash('a'),
                name: Some("hello-2.12".into()),
                count: 5,
                error: 1,
            }],
            top_served: vec![SavedTop {
                hash: hash('b'),
                name: None,
                count: 2,
                error: 0,
            }],
        }
    }

    #[test]
    fn both_files_round_trip() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let totals = sample_totals();
        assert_eq!(parse_stats(&render_stats(&totals, now)).unwrap(), totals);
        let peers = vec![SavedPeer {
            peer: PeerId::parse("http:10.0.0.7:12304").unwrap(),
            successes: 1,
            failures: 2,
            lies: 1,
            bytes: 1024,
            latency_ms: Some(3.5),
            consecutive_failures: 2,
            backoff_until: None,
            banned_until: Some(now + Duration::from_secs(86_400)),
        }];
        assert_eq!(parse_peers(&render_peers(&peers, now)).unwrap(), peers);
    }

    #[test]
    fn the_parsers_reject_rather_than_guess() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let good = String::from_utf8(render_stats(&sample_totals(), now)).unwrap();
        let peers = String::from_utf8(render_peers(&[], now)).unwrap();
        let bad_stats = [
            String::new(),
            good[..good.len() / 2].to_string(),
            good.replace("\"version\":1", "\"version\":2"),
            good.replace("\"version\":1", "\"version\":\"1\""),
            good.replace("peerix-stats", "peerix-peers"),
            good.replace("\"errors\":6", "\"errors\":-6"),
            good.replace("\"errors\":6", "\"errors\":6,\"extra\":0"),
            good.replace(",\"errors\":6", ""),
            good.replace("\"count\":5", "\"count\":0"),
            good.replace(&"a".repeat(32), &"e".repeat(32)),
            good.replace("\"iroh\":10", "\"iroh\":1.5"),
            "[]".into(),
        ];
        for bad in &bad_stats {
            assert_ne!(bad, &good, "a mutation that changed nothing");
            assert!(parse_stats(bad.as_bytes()).is_err(), "accepted: {bad}");
        }
        let bad_peers = [
            peers.replace("\"version\":1", "\"version\":0"),
            peers.replace("[]", "[{}]"),
            peers.replace("[]", "{}"),
            peers.replace("\"format\":\"peerix-peers\",", ""),
        ];
        for bad in &bad_peers {
            assert!(parse_peers(bad.as_bytes()).is_err(), "accepted: {bad}");
        }
        assert!(parse_stats(good.as_bytes()).is_ok());
        assert!(parse_peers(peers.as_bytes()).is_ok());
    }
}
