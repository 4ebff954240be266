//! peerix's side of the tracker: it registers this node and heartbeats,
//! announces the shared hash parts (in full on first contact, and whenever
//! the tracker does not know the node; after that the scanner's deltas),
//! and asks the tracker who holds a path this host lacks, as a directory
//! source for the resolver.
//!
//! A tracker that is down never stalls nix: lookups have a short timeout
//! and a small cache, the client backs off (2 s doubling up to 5 min), and
//! while it does, lookups answer from the LAN alone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::auth::{self, NODE_HEADER, SIGNATURE_HEADER, TIME_HEADER};
use crate::identity::{Identity, NodeId};
use crate::json::Json;
use crate::nix::store_path::HashPart;
use crate::peers::{Discovery, PeerId, Search};
use crate::store::scanner::ShareDelta;

/// How often the node heartbeats at most: half the tracker's TTL (which it
/// says in each answer; 120 s by default), never more than this.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// A lookup waits this long for the tracker at most.
const LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);
/// Answers remembered, and for how long.
const CACHE_ENTRIES: usize = 4096;
const CACHE_TTL: Duration = Duration::from_secs(30);
/// Hash parts in one request at most (the tracker's own limit).
const CHUNK: usize = 100_000;
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A tracker's answer is read up to this size.
const MAX_ANSWER: u64 = 1024 * 1024;

/// The full set of shared hash parts, each once.
pub type SharedSet = Box<dyn Fn(&mut dyn FnMut(&HashPart)) + Send + Sync>;

/// Counters and state shown on `/health`.
#[derive(Default, Debug)]
pub struct TrackerStats {
    pub reachable: AtomicBool,
    pub announces: AtomicU64,
    pub hashes_sent: AtomicU64,
    pub lookups: AtomicU64,
    pub lookup_failures: AtomicU64,
    pub failures: AtomicU64,
}

struct Backoff {
    until: Option<Instant>,
    failures: u32,
}

pub struct TrackerClient {
    base: String,
    identity: Identity,
    http_port: u16,
    agent: ureq::Agent,
    lookup_agent: ureq::Agent,
    backoff: Mutex<Backoff>,
    cache: Mutex<HashMap<HashPart, (Instant, Vec<PeerId>)>>,
    pub stats: TrackerStats,
}

impl TrackerClient {
    /// Starts the client of the tracker at `url` (`http://host:port`) for
    /// this node, which serves `/local/` on `http_port`. With `announce`
    /// (this host answers peers), a thread registers it and sends `shared`
    /// in full and then `deltas`; without, it only looks paths up.
    pub fn start(
        url: &str,
        identity: Identity,
        http_port: u16,
        timeout: Duration,
        announce: Option<(SharedSet, Receiver<ShareDelta>)>,
    ) -> std::io::Result<Arc<TrackerClient>> {
        let agent = |timeout: Duration| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .proxy(None)
                .max_redirects(0)
                .timeout_global(Some(timeout))
                .user_agent(concat!("peerix/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        let client = Arc::new(TrackerClient {
            base: url.trim_end_matches('/').to_string(),
            identity,
            http_port,
            agent: agent(timeout),
            lookup_agent: agent(LOOKUP_TIMEOUT.min(timeout)),
            backoff: Mutex::new(Backoff {
                until: None,
                failures: 0,
            }),
            cache: Mutex::new(HashMap::new()),
            stats: TrackerStats::default(),
        });
        if let Some((shared, deltas)) = announce {
            let announcer = Arc::clone(&client);
            std::thread::Builder::new()
                .name("tracker".into())
                .spawn(move || announcer.run(&shared, &deltas))?;
        }
        Ok(client)
    }

    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    /// Registers, announces and heartbeats for as long as the process runs.
    fn run(&self, shared: &SharedSet, deltas: &Receiver<ShareDelta>) {
        let mut registered = false;
        let mut next_heartbeat = Instant::now();
        let mut pending: Vec<ShareDelta> = Vec::new();
        loop {
            if let Some(wait) = self.backing_off() {
                // Deltas that pile up meanwhile are covered by the full
                // set sent on the next registration.
                while deltas.try_recv().is_ok() {}
                pending.clear();
                std::thread::sleep(wait.min(Duration::from_secs(1)));
                continue;
            }
            let result = if !registered || Instant::now() >= next_heartbeat {
                self.announce().and_then(|(new, ttl)| {
                    next_heartbeat =
                        Instant::now() + (ttl / 2).clamp(Duration::from_secs(1), HEARTBEAT);
                    if new || !registered {
                        // Deltas so far are in the full set.
                        while deltas.try_recv().is_ok() {}
                        pending.clear();
                        self.send_full_set(shared)?;
                    }
                    registered = true;
                    Ok(())
                })
            } else if let Some(delta) = pending.pop() {
                self.send_delta(&delta).or_else(|e| match e {
                    Refused::NotRegistered => {
                        registered = false;
                        Ok(())
                    }
                    e => Err(e),
                })
            } else {
                match deltas.recv_timeout(next_heartbeat.saturating_duration_since(Instant::now()))
                {
                    Ok(delta) => pending.push(delta),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(
                            next_heartbeat.saturating_duration_since(Instant::now()),
                        );
                    }
                }
                Ok(())
            };
            match result {
                Ok(()) => self.succeeded(),
                Err(e) => {
                    log::warn!("tracker {}: {e}", self.base);
                    registered = false;
                    self.failed();
                }
            }
        }
    }

    /// Announces (registers or heartbeats) this node: whether the tracker
    /// held nothing for it (so the full set is due), and how long it keeps
    /// a node that stops heartbeating.
    fn announce(&self) -> Result<(bool, Duration), Refused> {
        // Keys in sorted order, as serde_json's maps wrote them.
        let mut body = Json::new();
        body.open();
        body.key("http_port").u64(self.http_port.into());
        body.key("node_id").str(&self.node_id().to_string());
        body.close();
        let answer = self.post("/iroh/announce", body.out)?;
        self.stats.announces.fetch_add(1, Ordering::Relaxed);
        let ttl = answer["ttl"]
            .as_u64()
            .map_or(HEARTBEAT * 2, Duration::from_secs);
        Ok((answer["new"].as_bool().unwrap_or(true), ttl))
    }

    fn send_full_set(&self, shared: &SharedSet) -> Result<(), Refused> {
        let mut hashes: Vec<String> = Vec::new();
        shared(&mut |hash| hashes.push(hash.to_string()));
        log::info!(
            "tracker {}: announcing {} shared paths",
            self.base,
            hashes.len()
        );
        let mut chunks = hashes.chunks(CHUNK);
        // The batch replaces the node's rows; more than one chunk adds the
        // rest as deltas.
        let first = chunks.next().unwrap_or(&[]);
        self.post("/packages/batch", self.hashes_body("hashes", first))?;
        self.count_sent(first.len());
        for chunk in chunks {
            self.post("/packages/delta", self.hashes_body("added", chunk))?;
            self.count_sent(chunk.len());
        }
        Ok(())
    }

    fn send_delta(&self, delta: &ShareDelta) -> Result<(), Refused> {
        let strings =
            |hashes: &[HashPart]| -> Vec<String> { hashes.iter().map(|h| h.to_string()).collect() };
        for added in delta.added.chunks(CHUNK) {
            self.post(
                "/packages/delta",
                self.hashes_body("added", &strings(added)),
            )?;
            self.count_sent(added.len());
        }
        for removed in delta.removed.chunks(CHUNK) {
            self.post(
                "/packages/delta",
                self.hashes_body("removed", &strings(removed)),
            )?;
            self.count_sent(removed.len());
        }
        Ok(())
    }

    fn count_sent(&self, n: usize) {
        self.stats
            .hashes_sent
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `{"<list>":[hashes…],"node_id":…}` (or `node_id` first when `list`
    /// sorts after it: keys in sorted order, as serde_json's maps wrote them).
    fn hashes_body(&self, list: &str, hashes: &[String]) -> String {
        let node = self.node_id().to_string();
        let mut body = Json::new();
        body.open();
        if list > "node_id" {
            body.key("node_id").str(&node);
        }
        body.key(list).open_list();
        for hash in hashes {
            body.str(hash);
        }
        body.close_list();
        if list < "node_id" {
            body.key("node_id").str(&node);
        }
        body.close();
        body.out
    }

    /// A signed POST of `body` (JSON) to `path`; the answer's JSON.
    fn post(&self, path: &str, body: String) -> Result<serde_json::Value, Refused> {
        let body = body.into_bytes();
        let signed = auth::sign(&self.identity, "POST", path, unix_now(), &body);
        let url = format!("{}{path}", self.base);
        let response = self
            .agent
            .post(&url)
            .header(NODE_HEADER, &signed.node)
            .header(TIME_HEADER, &signed.time)
            .header(SIGNATURE_HEADER, &signed.signature)
            .header("Content-Type", "application/json")
            .send(&body[..])
            .map_err(|e| Refused::Unreachable(format!("{url}: {e}")))?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .into_with_config()
            .limit(MAX_ANSWER)
            .read_to_string()
            .map_err(|e| Refused::Unreachable(format!("{url}: {e}")))?;
        match status {
            200 => serde_json::from_str(&text)
                .map_err(|e| Refused::Other(format!("{url}: answer is not JSON: {e}"))),
            409 => Err(Refused::NotRegistered),
            other => Err(Refused::Other(format!(
                "{url}: HTTP {other}: {}",
                text.trim()
            ))),
        }
    }

    /// The holders the tracker names for `hash`, from the cache or asked
    /// now; none while the tracker backs off or fails.
    fn find(&self, hash: &HashPart) -> Vec<PeerId> {
        if let Some((at, holders)) = lock(&self.cache).get(hash)
            && at.elapsed() < CACHE_TTL
        {
            return holders.clone();
        }
        if self.backing_off().is_some() {
            return Vec::new();
        }
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/find/{hash}", self.base);
        let answer = self
            .lookup_agent
            .get(&url)
            .call()
            .map_err(|e| e.to_string())
            .and_then(|response| {
                if response.status() != 200 {
                    return Err(format!("HTTP {}", response.status()));
                }
                response
                    .into_body()
                    .into_with_config()
                    .limit(MAX_ANSWER)
                    .read_to_string()
                    .map_err(|e| e.to_string())
            })
            .and_then(|text| {
                serde_json::from_str::<serde_json::Value>(&text).map_err(|e| e.to_string())
            });
        let answer = match answer {
            Ok(answer) => answer,
            Err(e) => {
                log::info!("tracker lookup {url}: {e}");
                self.stats.lookup_failures.fetch_add(1, Ordering::Relaxed);
                self.failed();
                return Vec::new();
            }
        };
        let me = self.node_id().to_string();
        let holders: Vec<PeerId> = answer["providers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["node_id"].as_str() != Some(me.as_str()))
            .filter_map(provider_address)
            .map(PeerId::Http)
            .collect();
        let mut cache = lock(&self.cache);
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(*hash, (Instant::now(), holders.clone()));
        holders
    }

    /// How long to wait yet, while backing off.
    fn backing_off(&self) -> Option<Duration> {
        let backoff = lock(&self.backoff);
        backoff
            .until
            .and_then(|until| until.checked_duration_since(Instant::now()))
    }

    fn failed(&self) {
        self.stats.reachable.store(false, Ordering::Relaxed);
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let mut backoff = lock(&self.backoff);
        backoff.failures = backoff.failures.saturating_add(1);
        let wait =
            (FIRST_BACKOFF * 2u32.pow(backoff.failures.saturating_sub(1).min(16))).min(MAX_BACKOFF);
        backoff.until = Some(Instant::now() + wait);
    }

    fn succeeded(&self) {
        self.stats.reachable.store(true, Ordering::Relaxed);
        let mut backoff = lock(&self.backoff);
        backoff.failures = 0;
        backoff.until = None;
    }
}

/// Where a provider serves `/local/`: its announced HTTP address, else the
/// address its announce came from with its HTTP port.
fn provider_address(provider: &serde_json::Value) -> Option<SocketAddr> {
    let port = provider["http_port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok());
    let announced = provider["http_addrs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.parse::<SocketAddr>().ok())
        .next();
    let observed = provider["observed_ip"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .zip(port)
        .map(|(ip, port)| SocketAddr::new(ip, port));
    announced.or(observed).filter(|a| a.port() != 0)
}

/// Why a request to the tracker failed.
enum Refused {
    Unreachable(String),
    /// 409: the tracker does not know this node (expired, or a new
    /// database): announce again, in full.
    NotRegistered,
    Other(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Unreachable(why) => write!(f, "unreachable: {why}"),
            Refused::NotRegistered => f.write_str("this node is not registered"),
            Refused::Other(why) => f.write_str(why),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Discovery for TrackerClient {
    fn name(&self) -> &'static str {
        "tracker"
    }

    fn search(&self, hash: &HashPart) -> Box<dyn Search + '_> {
        Box::new(TrackerSearch {
            client: self,
            hash: *hash,
            asked: false,
        })
    }
}

struct TrackerSearch<'c> {
    client: &'c TrackerClient,
    hash: HashPart,
    asked: bool,
}

impl Search for TrackerSearch<'_> {
    fn is_directory(&self) -> bool {
        true
    }

    fn next_holders(
        &mut self,
        usable: &dyn Fn(&PeerId) -> bool,
        _enough: &dyn Fn(&[PeerId]) -> bool,
    ) -> Vec<PeerId> {
        if std::mem::replace(&mut self.asked, true) {
            return Vec::new();
        }
        self.client
            .find(&self.hash)
            .into_iter()
            .filter(|p| usable(p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_provider_is_reached_where_it_said_or_where_it_was_seen() {
        let announced = serde_json::json!({
            "http_addrs": ["10.0.0.5:12304"], "http_port": 12304, "observed_ip": "10.9.9.9"
        });
        assert_eq!(provider_address(&announced), "10.0.0.5:12304".parse().ok());
        let observed = serde_json::json!({
            "http_addrs": [], "http_port": 12305, "observed_ip": "10.9.9.9"
        });
        assert_eq!(provider_address(&observed), "10.9.9.9:12305".parse().ok());
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"http_addrs": ["name:1"], "observed_ip": "x"}),
            serde_json::json!({"http_port": 0, "observed_ip": "10.0.0.1"}),
        ] {
            assert_eq!(provider_address(&bad), None, "{bad}");
        }
    }
}
