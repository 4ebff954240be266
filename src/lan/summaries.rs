//! The LAN as a directory: the store summaries of the peers heard from,
//! and whether they cover the whole LAN.
//!
//! Every packet from a host marks it heard. A host that announces its
//! summary gets it fetched (on a thread of its own, with a size limit and a
//! timeout) whenever its generation changes. When every host heard from in
//! the last [`EXPIRY`] has a fresh summary, the summaries answer for the
//! whole LAN: a hash none contains is a miss at once, with no broadcast and
//! no wait; a hash some contain is asked of those peers directly. A host
//! that answers queries but announces no summary (the original peerix, an
//! older peerix-rs) keeps the broadcast alive, and so does a host whose
//! summary could not be had. So does the first [`SETTLE`] after start: the
//! host solicits announcements then, and must not take its first moments
//! for a quiet LAN.
//!
//! All summaries together take at most [`MEMORY_BUDGET`] bytes: one that
//! does not fit is dropped (and its peer stays on the broadcast path).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::summary::{Summary, SummaryError};
use crate::nix::store_path::HashPart;
use crate::peers::{Discovery, Failure, PeerId, PeerTable, Search};
use crate::stats::Stats;

/// How often a host announces its summary when nothing changes.
pub const ANNOUNCE_INTERVAL: Duration = Duration::from_secs(60);
/// A host silent this long (three announcement intervals) is forgotten,
/// with its summary.
pub const EXPIRY: Duration = Duration::from_secs(180);
/// After start, the broadcast is used for this long whatever the summaries
/// say: the answers to our solicitation are still coming in.
pub const SETTLE: Duration = Duration::from_secs(2);
/// The largest summary fetched: 1.6 million paths.
pub const MAX_SUMMARY: u64 = 2 * 1024 * 1024;
/// All peers' summaries together: 16 MiB, about 13 million paths.
pub const MEMORY_BUDGET: usize = 16 * 1024 * 1024;
/// Hosts tracked at most.
const MAX_HOSTS: usize = 1024;
/// Fetches waiting at most; more wait for the next announcement.
const FETCH_QUEUE: usize = 64;
/// A summary's claims that may turn out false before its peer is taken for
/// a liar: at least this many, and more than [`CLAIM_MISS_PERCENT`] of the
/// lookups its summary answered (an honest filter is wrong for 0.8% of what
/// it lacks). Not of the claims tried: for a host that holds none of what
/// is asked, every claim is a false positive, honest as it is.
const CLAIM_MISSES_TOLERATED: u32 = 10;
const CLAIM_MISS_PERCENT: u32 = 5;

/// What is known of one host.
struct Host {
    last_heard: Instant,
    /// The latest announcement: generation, and where the summary is.
    announced: Option<(u64, SocketAddr)>,
    summary: Option<Arc<Summary>>,
    fetching: bool,
    /// Lookups its fresh summary answered, claims among them that were
    /// checked, and those that were wrong.
    lookups: u32,
    claims_tried: u32,
    claims_missed: u32,
}

impl Host {
    fn new(now: Instant) -> Host {
        Host {
            last_heard: now,
            announced: None,
            summary: None,
            fetching: false,
            lookups: 0,
            claims_tried: 0,
            claims_missed: 0,
        }
    }

    /// The summary, if it is the one last announced.
    fn fresh_summary(&self) -> Option<&Arc<Summary>> {
        let (generation, _) = self.announced?;
        self.summary.as_ref().filter(|s| s.generation == generation)
    }
}

struct State {
    hosts: HashMap<IpAddr, Host>,
    memory: usize,
}

pub struct Summaries {
    state: Mutex<State>,
    fetches: Arc<FetchQueue>,
    peers: Arc<PeerTable>,
    started: Instant,
    /// Its counters are `stats.summaries`.
    pub stats: Arc<Stats>,
}

impl Summaries {
    /// Starts the fetching thread; `timeout` bounds each fetch as a whole.
    /// It counts in `stats.summaries`.
    pub fn start(
        peers: Arc<PeerTable>,
        timeout: Duration,
        stats: Arc<Stats>,
    ) -> std::io::Result<Arc<Summaries>> {
        let fetches = Arc::new(FetchQueue::default());
        let queue = Arc::clone(&fetches);
        let summaries = Arc::new(Summaries {
            state: Mutex::new(State {
                hosts: HashMap::new(),
                memory: 0,
            }),
            fetches,
            peers,
            started: Instant::now(),
            stats,
        });
        let weak = Arc::downgrade(&summaries);
        std::thread::Builder::new()
            .name("lan-summaries".into())
            .spawn(move || fetch_loop(&weak, &queue, timeout))?;
        Ok(summaries)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A packet came from `host`.
    pub fn heard(&self, host: IpAddr) {
        let host = host.to_canonical();
        let now = Instant::now();
        let mut state = self.lock();
        forget_silent(&mut state, now);
        if state.hosts.len() >= MAX_HOSTS && !state.hosts.contains_key(&host) {
            return;
        }
        state
            .hosts
            .entry(host)
            .or_insert_with(|| Host::new(now))
            .last_heard = now;
    }

    /// `from` announced its summary at `generation`, served on `port`.
    pub fn announced(&self, from: IpAddr, generation: u64, port: u16) {
        let host = from.to_canonical();
        self.heard(host);
        let mut state = self.lock();
        let Some(entry) = state.hosts.get_mut(&host) else {
            return;
        };
        let at = SocketAddr::new(host, port);
        entry.announced = Some((generation, at));
        let have = entry.summary.as_ref().map(|s| s.generation);
        if have == Some(generation) || entry.fetching {
            return;
        }
        match self.fetches.try_push((host, generation, at)) {
            Ok(()) => entry.fetching = true,
            Err(Refused::Full) => {
                log::debug!("summary of {host}: fetch queue full; next announcement")
            }
            Err(Refused::Gone) => {}
        }
    }

    /// Installs a fetched summary, or drops it when it does not fit.
    fn fetched(&self, host: IpAddr, result: Result<Summary, String>) {
        let mut state = self.lock();
        let State { hosts, memory } = &mut *state;
        let Some(entry) = hosts.get_mut(&host) else {
            return;
        };
        entry.fetching = false;
        let old = entry.summary.take();
        *memory -= old.as_ref().map_or(0, |s| s.size());
        match result {
            Ok(summary) if *memory + summary.size() <= MEMORY_BUDGET => {
                *memory += summary.size();
                log::debug!("summary of {host}: {summary:?}");
                self.stats.summaries.fetched.fetch_add(1, Ordering::Relaxed);
                entry.summary = Some(Arc::new(summary));
                entry.lookups = 0;
                entry.claims_tried = 0;
                entry.claims_missed = 0;
            }
            Ok(summary) => {
                self.stats.summaries.dropped.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "summary of {host} ({} bytes) does not fit the {MEMORY_BUDGET}-byte budget; asking it by broadcast",
                    summary.size()
                );
            }
            Err(why) => {
                log::info!("summary of {host} dropped: {why}; asking it by broadcast");
            }
        }
    }

    /// Whether the summaries answer for every host heard from.
    pub fn cover_all(&self) -> bool {
        let now = Instant::now();
        if now < self.started + SETTLE {
            return false;
        }
        let mut state = self.lock();
        forget_silent(&mut state, now);
        state.hosts.values().all(|h| h.fresh_summary().is_some())
    }

    /// The peers whose fresh summary may contain `hash`.
    fn holders(&self, hash: &HashPart) -> Vec<PeerId> {
        let now = Instant::now();
        let mut state = self.lock();
        forget_silent(&mut state, now);
        state
            .hosts
            .values_mut()
            .filter_map(|h| {
                let summary = h.fresh_summary()?;
                let (_, at) = h.announced?;
                let claimed = summary.may_contain(hash);
                h.lookups = h.lookups.saturating_add(1);
                claimed.then_some(PeerId::Http(at))
            })
            .collect()
    }

    /// A peer whose summary claimed a path did not have it. A few such
    /// misses are the filter's false positives; many mean its summary lies,
    /// and the peer is banned as any liar is.
    fn claim_checked(&self, peer: &PeerId, held: bool) {
        let PeerId::Http(addr) = peer;
        let mut state = self.lock();
        let Some(host) = state.hosts.get_mut(&addr.ip().to_canonical()) else {
            return;
        };
        host.claims_tried = host.claims_tried.saturating_add(1);
        if held {
            return;
        }
        host.claims_missed = host.claims_missed.saturating_add(1);
        let lying = host.claims_missed > CLAIM_MISSES_TOLERATED
            && u64::from(host.claims_missed) * 100
                > u64::from(host.lookups.max(host.claims_tried)) * u64::from(CLAIM_MISS_PERCENT);
        if lying {
            log::warn!(
                "peer {peer}: {} of {} paths its summary claimed were not there ({} lookups); banned",
                host.claims_missed,
                host.claims_tried,
                host.lookups
            );
            host.summary = None;
            drop(state);
            self.peers
                .record_failure(*peer, Failure::Lied, Instant::now());
        }
    }

    /// Hosts heard from, and how many have a fresh summary, for `/health`.
    pub fn coverage(&self) -> (usize, usize, usize) {
        let mut state = self.lock();
        forget_silent(&mut state, Instant::now());
        let fresh = state
            .hosts
            .values()
            .filter(|h| h.fresh_summary().is_some())
            .count();
        (state.hosts.len(), fresh, state.memory)
    }
}

/// Forgets hosts silent for longer than [`EXPIRY`], with their summaries.
fn forget_silent(state: &mut State, now: Instant) {
    let State { hosts, memory } = state;
    hosts.retain(|_, h| {
        let keep = now.duration_since(h.last_heard) < EXPIRY;
        if !keep {
            *memory -= h.summary.as_ref().map_or(0, |s| s.size());
        }
        keep
    });
}

/// A fetch: the host, the generation it announced, where it serves it.
type Fetch = (IpAddr, u64, SocketAddr);

/// The fetches waiting for the fetching thread, at most [`FETCH_QUEUE`].
/// A Mutex and Condvar rather than a channel: a channel of its own element
/// type would be another copy of the channel code, for a queue that sees a
/// push per changed summary.
#[derive(Default)]
struct FetchQueue {
    state: Mutex<QueueState>,
    pushed: Condvar,
}

#[derive(Default)]
struct QueueState {
    fetches: VecDeque<Fetch>,
    /// `Summaries` is gone: the thread ends.
    closed: bool,
    /// The thread has ended: nothing more is fetched.
    gone: bool,
}

enum Refused {
    Full,
    Gone,
}

impl FetchQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_push(&self, fetch: Fetch) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.gone {
            return Err(Refused::Gone);
        }
        if state.fetches.len() >= FETCH_QUEUE {
            return Err(Refused::Full);
        }
        state.fetches.push_back(fetch);
        self.pushed.notify_one();
        Ok(())
    }

    /// The next fetch, waiting for one; `None` once closed.
    fn pop(&self) -> Option<Fetch> {
        let mut state = self.lock();
        loop {
            if let Some(fetch) = state.fetches.pop_front() {
                return Some(fetch);
            }
            if state.closed {
                return None;
            }
            state = self.pushed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.pushed.notify_one();
    }
}

impl Drop for Summaries {
    fn drop(&mut self) {
        self.fetches.close();
    }
}

/// Marks the fetching thread ended however it ends.
struct Ended<'a>(&'a FetchQueue);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.lock().gone = true;
    }
}

fn fetch_loop(summaries: &std::sync::Weak<Summaries>, queue: &FetchQueue, timeout: Duration) {
    let _ended = Ended(queue);
    let agent = crate::fetch::client::agent_for_addresses(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .timeout_global(Some(timeout))
            // Summaries are fetched when they change: a connection kept
            // for the next fetch would keep its buffers, which a whole
            // summary has passed through (128 KiB or more for each peer).
            .max_idle_connections(0)
            .user_agent(concat!("peerix/", env!("CARGO_PKG_VERSION")))
            .build(),
    );
    while let Some((host, generation, at)) = queue.pop() {
        let Some(summaries) = summaries.upgrade() else {
            return;
        };
        let result = fetch(&agent, at).and_then(|summary| {
            if summary.generation == generation {
                Ok(summary)
            } else {
                // A newer one is on its way, or the peer is confused.
                Err(Unfetched::Unavailable(format!(
                    "announced generation {generation}, served {}",
                    summary.generation
                )))
            }
        });
        let counter = match &result {
            Ok(_) => None,
            Err(Unfetched::Bad(_) | Unfetched::Lie(_)) => Some(&summaries.stats.summaries.dropped),
            Err(Unfetched::Unavailable(_)) => Some(&summaries.stats.summaries.fetch_failures),
        };
        if let Err(Unfetched::Lie(why)) = &result {
            log::warn!("peer {at}: {why}; banned");
            summaries
                .peers
                .record_failure(PeerId::Http(at), Failure::Lied, Instant::now());
        }
        if let Some(counter) = counter {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        summaries.fetched(host, result.map_err(|e| e.to_string()));
    }
}

/// Why a summary was not had.
enum Unfetched {
    /// Unreachable, slow, an error status: maybe a passing problem.
    Unavailable(String),
    /// Malformed, oversized, an unknown version: dropped.
    Bad(String),
    /// A summary that claims far more than its paths could: dropped, and
    /// its peer banned as a liar.
    Lie(String),
}

impl std::fmt::Display for Unfetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfetched::Unavailable(why) => write!(f, "unavailable: {why}"),
            Unfetched::Bad(why) => write!(f, "bad summary: {why}"),
            Unfetched::Lie(why) => write!(f, "lying summary: {why}"),
        }
    }
}

/// `GET http://<at>/local/summary`, parsed.
fn fetch(agent: &ureq::Agent, at: SocketAddr) -> Result<Summary, Unfetched> {
    let url = format!("http://{at}/local/summary");
    let response = agent
        .get(&url)
        .call()
        .map_err(|e| Unfetched::Unavailable(format!("{url}: {e}")))?;
    if response.status() != 200 {
        return Err(Unfetched::Unavailable(format!(
            "{url}: HTTP {}",
            response.status()
        )));
    }
    let body = response
        .into_body()
        .into_with_config()
        .limit(MAX_SUMMARY)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => {
                Unfetched::Bad(format!("{url}: over {MAX_SUMMARY} bytes"))
            }
            e => Unfetched::Unavailable(format!("{url}: {e}")),
        })?;
    Summary::parse(&body, MAX_SUMMARY).map_err(|e| match e {
        SummaryError::Overfull { .. } => Unfetched::Lie(format!("{url}: {e}")),
        e => Unfetched::Bad(format!("{url}: {e}")),
    })
}

impl Discovery for Summaries {
    fn name(&self) -> &'static str {
        "summaries"
    }

    fn covers_all(&self) -> bool {
        self.cover_all()
    }

    fn search(&self, hash: &HashPart) -> Box<dyn Search + '_> {
        Box::new(SummarySearch {
            summaries: self,
            holders: Some(self.holders(hash)),
            given: Vec::new(),
            covers_all: self.cover_all(),
        })
    }
}

struct SummarySearch<'s> {
    summaries: &'s Summaries,
    holders: Option<Vec<PeerId>>,
    /// The holders given out: only their checks are this source's business.
    given: Vec<PeerId>,
    covers_all: bool,
}

impl Search for SummarySearch<'_> {
    fn is_directory(&self) -> bool {
        true
    }

    fn covers_all(&self) -> bool {
        self.covers_all
    }

    fn answers_from_memory(&self) -> bool {
        true
    }

    fn next_holders(
        &mut self,
        usable: &dyn Fn(&PeerId) -> bool,
        _enough: &dyn Fn(&[PeerId]) -> bool,
    ) -> Vec<PeerId> {
        // A directory answers once: later calls (after the holders it
        // named were asked) are not misses it answered.
        let Some(named) = self.holders.take() else {
            return Vec::new();
        };
        let holders: Vec<PeerId> = named.into_iter().filter(|p| usable(p)).collect();
        self.given.extend_from_slice(&holders);
        if holders.is_empty() && self.covers_all {
            self.summaries
                .stats
                .summaries
                .misses_answered
                .fetch_add(1, Ordering::Relaxed);
        }
        holders
    }

    fn checked(&mut self, peer: &PeerId, held: bool) {
        if self.given.contains(peer) {
            self.summaries.claim_checked(peer, held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Summaries` without its fetching thread, started long enough ago
    /// to have settled; fetches queue up unread.
    fn settled() -> (Summaries, Arc<FetchQueue>) {
        let fetches = Arc::new(FetchQueue::default());
        let queue = Arc::clone(&fetches);
        let summaries = Summaries {
            state: Mutex::new(State {
                hosts: HashMap::new(),
                memory: 0,
            }),
            fetches,
            peers: Arc::new(PeerTable::new()),
            started: Instant::now() - SETTLE,
            stats: Arc::new(Stats::new()),
        };
        (summaries, queue)
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 77, 0, n])
    }

    fn hash(n: u8) -> HashPart {
        HashPart::parse(&nix32::encode(&[n; 20])).unwrap()
    }

    use crate::nix::nix32;

    #[test]
    fn the_summaries_cover_the_lan_only_when_every_host_heard_has_a_fresh_one() {
        let (summaries, queue) = settled();
        assert!(summaries.cover_all(), "a quiet LAN is covered");
        summaries.heard(ip(1));
        assert!(!summaries.cover_all(), "a host without a summary");
        summaries.announced(ip(1), 5, 80);
        assert_eq!(
            queue.lock().fetches.pop_front().unwrap().1,
            5,
            "its summary is fetched"
        );
        assert!(!summaries.cover_all(), "not fetched yet");
        summaries.fetched(ip(1), Ok(Summary::build(5, 1, &[hash(1)])));
        assert!(summaries.cover_all());
        let at = PeerId::Http(SocketAddr::new(ip(1), 80));
        assert_eq!(summaries.holders(&hash(1)), vec![at]);
        assert!(summaries.holders(&hash(2)).is_empty());
        // A newer generation announced: the summary is stale until fetched.
        summaries.announced(ip(1), 6, 80);
        assert!(!summaries.cover_all());
        assert!(summaries.holders(&hash(1)).is_empty());
        // A bad summary leaves the host on the broadcast path.
        summaries.fetched(ip(1), Err("bad".into()));
        assert!(!summaries.cover_all());
    }

    #[test]
    fn a_silent_host_is_forgotten_with_its_summary() {
        let (summaries, _queue) = settled();
        summaries.heard(ip(1));
        summaries.announced(ip(1), 1, 80);
        summaries.fetched(ip(1), Ok(Summary::build(1, 1, &[hash(1)])));
        summaries.heard(ip(2));
        assert!(summaries.lock().memory > 0);
        let long_ago = Instant::now() - EXPIRY - Duration::from_secs(1);
        for host in summaries.lock().hosts.values_mut() {
            host.last_heard = long_ago;
        }
        assert!(summaries.cover_all(), "both forgotten: a quiet LAN again");
        assert_eq!(summaries.coverage(), (0, 0, 0));
    }

    #[test]
    fn all_summaries_together_stay_within_the_budget() {
        let (summaries, _queue) = settled();
        // Two summaries of a bit over half the budget each.
        let paths = (MEMORY_BUDGET as u32 / 2) * 8 / BITS + 1;
        for n in 1..=2 {
            summaries.heard(ip(n));
            summaries.announced(ip(n), 1, 80);
            summaries.fetched(ip(n), Ok(Summary::build(1, paths, &[hash(n)])));
        }
        assert!(summaries.lock().memory <= MEMORY_BUDGET);
        assert_eq!(summaries.stats.summaries.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(summaries.coverage().1, 1, "one kept, one dropped");
    }

    const BITS: u32 = super::super::summary::BITS_PER_PATH as u32;

    #[test]
    fn a_summary_whose_claims_keep_failing_gets_its_peer_banned() {
        let (summaries, _queue) = settled();
        summaries.heard(ip(1));
        summaries.announced(ip(1), 1, 80);
        summaries.fetched(ip(1), Ok(Summary::build(1, 1, &[hash(1)])));
        let peer = PeerId::Http(SocketAddr::new(ip(1), 80));
        // An honest filter's false positives: a few misses among many hits.
        for _ in 0..200 {
            summaries.claim_checked(&peer, true);
        }
        for _ in 0..CLAIM_MISSES_TOLERATED {
            summaries.claim_checked(&peer, false);
        }
        assert!(summaries.peers.is_available(&peer, Instant::now()));
        // And with no hit at all: a host that holds none of what is asked,
        // whose every claim is a false positive, about 0.8% of the lookups.
        let (summaries, _queue) = settled();
        summaries.heard(ip(3));
        summaries.announced(ip(3), 1, 80);
        summaries.fetched(ip(3), Ok(Summary::build(1, 1, &[hash(1)])));
        let honest = PeerId::Http(SocketAddr::new(ip(3), 80));
        for round in 0..30 {
            for _ in 0..125 {
                summaries.holders(&hash(2));
            }
            summaries.claim_checked(&honest, false);
            assert!(
                summaries.peers.is_available(&honest, Instant::now()),
                "banned after {} false positives in {} lookups",
                round + 1,
                (round + 1) * 125
            );
        }
        // A lie: nothing it claims is there.
        let (liar_summaries, _queue) = settled();
        liar_summaries.heard(ip(2));
        let liar = PeerId::Http(SocketAddr::new(ip(2), 80));
        for _ in 0..=CLAIM_MISSES_TOLERATED {
            liar_summaries.claim_checked(&liar, false);
        }
        assert!(!liar_summaries.peers.is_available(&liar, Instant::now()));
    }
}
