//! The stats core: every counter of peerix in one place, and one
//! [`Snapshot`] of them that `/health`, `/metrics` and the dashboard all
//! render.
//!
//! The hot paths (each request, each UDP packet, each NAR) only bump relaxed
//! atomics: a request's latency goes into a fixed-bucket histogram, an array
//! of atomics per route kind. Only the bounded top-N lists of requested and
//! served paths and the activity log take a short lock, once per request
//! or event. Nothing is labelled by hash, and nothing by peer: the top-N
//! lists and the peer table are bounded, and only the dashboard and
//! `/health` list them.
//!
//! What other parts own is read through here when a snapshot is taken: the
//! index sizes and scans of the store, the peer table, the LAN summaries.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::fetch::read_ahead::ReadAheadCounts;
use crate::lan::packet::PacketError;
use crate::nix::store_path::HashPart;
use crate::peers::{PeerId, PeerTable};
use crate::state::StateReport;

/// What kind of request a route is: requests are counted and timed by
/// kind, never by hash or peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    CacheInfo,
    NarInfo,
    Nar,
    PeerNar,
    LocalCacheInfo,
    LocalNarInfo,
    LocalNar,
    LocalSummary,
    Health,
    Metrics,
    Dashboard,
    DashboardJson,
    Control,
    BadRequest,
    NotFound,
}

impl RouteKind {
    pub const ALL: [RouteKind; 15] = [
        RouteKind::CacheInfo,
        RouteKind::NarInfo,
        RouteKind::Nar,
        RouteKind::PeerNar,
        RouteKind::LocalCacheInfo,
        RouteKind::LocalNarInfo,
        RouteKind::LocalNar,
        RouteKind::LocalSummary,
        RouteKind::Health,
        RouteKind::Metrics,
        RouteKind::Dashboard,
        RouteKind::DashboardJson,
        RouteKind::Control,
        RouteKind::BadRequest,
        RouteKind::NotFound,
    ];

    /// The `route` label value.
    pub fn label(self) -> &'static str {
        match self {
            RouteKind::CacheInfo => "nix-cache-info",
            RouteKind::NarInfo => "narinfo",
            RouteKind::Nar => "nar",
            RouteKind::PeerNar => "peer-nar",
            RouteKind::LocalCacheInfo => "local-nix-cache-info",
            RouteKind::LocalNarInfo => "local-narinfo",
            RouteKind::LocalNar => "local-nar",
            RouteKind::LocalSummary => "local-summary",
            RouteKind::Health => "health",
            RouteKind::Metrics => "metrics",
            RouteKind::Dashboard => "dashboard",
            RouteKind::DashboardJson => "dashboard-json",
            RouteKind::Control => "control",
            RouteKind::BadRequest => "bad-request",
            RouteKind::NotFound => "not-found",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the latency buckets, in microseconds; a last bucket
/// (`+Inf`) takes the rest. From a cached narinfo (tens of µs) to a large
/// NAR passed through from a peer (a minute).
pub const BUCKETS_US: [u64; 16] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];
/// The same bounds in seconds, as Prometheus writes `le`.
pub const BUCKET_LABELS: [&str; 16] = [
    "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5", "5", "10", "30", "60",
];
const SLOTS: usize = BUCKETS_US.len() + 1;

/// A latency histogram: one atomic per bucket (not cumulative), and the sum.
#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; SLOTS],
    sum_us: AtomicU64,
}

impl Histogram {
    fn observe(&self, us: u64) {
        let slot = BUCKETS_US.partition_point(|&bound| bound < us);
        self.counts[slot].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    fn read(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].load(Relaxed)),
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

/// Where peers were found. Today every peer is a LAN peer; the tracker and
/// Iroh are counted (at zero) so that dashboards need not change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Lan,
    Tracker,
    Iroh,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Lan, Source::Tracker, Source::Iroh];

    pub fn label(self) -> &'static str {
        match self {
            Source::Lan => "lan",
            Source::Tracker => "tracker",
            Source::Iroh => "iroh",
        }
    }

    /// The source of a peer. Every HTTP peer is a LAN one until the
    /// tracker names its own.
    pub fn of(peer: &PeerId) -> Source {
        match peer {
            PeerId::Http(_) => Source::Lan,
        }
    }
}

/// Who a response went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Client {
    /// This host's own nix, on loopback.
    Local,
    /// Another host, reached as a peer of this `source`.
    Network(Source),
}

/// Why a UDP packet was dropped: the decoder's reasons, and a reply that
/// nobody waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    Empty,
    TooLong,
    UnknownType,
    Truncated,
    BadHashPart,
    BadPort,
    BadUrlPath,
    TrailingBytes,
    Unexpected,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::Empty,
        DropReason::TooLong,
        DropReason::UnknownType,
        DropReason::Truncated,
        DropReason::BadHashPart,
        DropReason::BadPort,
        DropReason::BadUrlPath,
        DropReason::TrailingBytes,
        DropReason::Unexpected,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::TooLong => "too_long",
            DropReason::UnknownType => "unknown_type",
            DropReason::Truncated => "truncated",
            DropReason::BadHashPart => "bad_hash_part",
            DropReason::BadPort => "bad_port",
            DropReason::BadUrlPath => "bad_url_path",
            DropReason::TrailingBytes => "trailing_bytes",
            DropReason::Unexpected => "unexpected_reply",
        }
    }
}

impl From<PacketError> for DropReason {
    fn from(e: PacketError) -> DropReason {
        match e {
            PacketError::Empty => DropReason::Empty,
            PacketError::TooLong => DropReason::TooLong,
            PacketError::UnknownType(_) => DropReason::UnknownType,
            PacketError::Truncated => DropReason::Truncated,
            PacketError::BadHashPart => DropReason::BadHashPart,
            PacketError::BadPort => DropReason::BadPort,
            PacketError::BadUrlPath => DropReason::BadUrlPath,
            PacketError::TrailingBytes => DropReason::TrailingBytes,
        }
    }
}

/// The UDP side's counters (they were `lan::LanStats`).
#[derive(Default, Debug)]
pub struct LanCounters {
    pub queries: AtomicU64,
    pub replies_received: AtomicU64,
    /// Replies ignored because their peer is in backoff or banned.
    pub replies_shunned: AtomicU64,
    pub replies_sent: AtomicU64,
    pub replies_rate_limited: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl LanCounters {
    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Relaxed);
    }

    /// Packets dropped, for every reason.
    pub fn packets_dropped(&self) -> u64 {
        self.dropped.iter().map(|c| c.load(Relaxed)).sum()
    }
}

/// The LAN summaries' counters (they were `lan::summaries::SummaryStats`).
#[derive(Default, Debug)]
pub struct SummaryCounters {
    pub fetched: AtomicU64,
    pub dropped: AtomicU64,
    pub fetch_failures: AtomicU64,
    pub misses_answered: AtomicU64,
}

/// Paths tracked by each top-N list; the dashboard shows the first
/// [`TOP_SHOWN`].
const TOP_TRACKED: usize = 256;
pub const TOP_SHOWN: usize = 20;
/// Events the activity log keeps.
pub const ACTIVITY_KEPT: usize = 50;

/// A bounded "most frequent" list (the space-saving algorithm): a path
/// that is not tracked takes the place of the least counted one, and
/// inherits its count as a possible error. Any path that makes more than
/// 1/[`TOP_TRACKED`] of all hits is always in the list, whatever the number
/// of distinct paths, and the count shown (hits minus the inherited error)
/// never overstates.
struct TopN {
    entries: Mutex<Vec<Tracked>>,
}

struct Tracked {
    hash: HashPart,
    name: Option<Box<str>>,
    count: u64,
    /// How much of `count` may be other paths' hits.
    error: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopEntry {
    pub hash: HashPart,
    /// The name after the hash part, when known.
    pub name: Option<Box<str>>,
    /// Hits at least.
    pub count: u64,
}

impl TopN {
    fn new() -> TopN {
        TopN {
            entries: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Tracked>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hit(&self, hash: HashPart, name: Option<&str>) {
        let mut entries = self.lock();
        if let Some(entry) = entries.iter_mut().find(|e| e.hash == hash) {
            entry.count += 1;
            if entry.name.is_none() {
                entry.name = name.map(Into::into);
            }
            return;
        }
        let name = name.map(Into::into);
        if entries.len() < TOP_TRACKED {
            entries.push(Tracked {
                hash,
                name,
                count: 1,
                error: 0,
            });
        } else if let Some(least) = entries.iter_mut().min_by_key(|e| e.count) {
            let error = least.count;
            *least = Tracked {
                hash,
                name,
                count: error + 1,
                error,
            };
        }
    }

    fn export(&self) -> Vec<SavedTop> {
        self.lock()
            .iter()
            .map(|e| SavedTop {
                hash: e.hash,
                name: e.name.clone(),
                count: e.count,
                error: e.error,
            })
            .collect()
    }

    /// Takes back saved entries, before any hit: at most [`TOP_TRACKED`].
    fn import(&self, saved: &[SavedTop]) {
        let mut entries = self.lock();
        for s in saved.iter().take(TOP_TRACKED.saturating_sub(entries.len())) {
            entries.push(Tracked {
                hash: s.hash,
                name: s.name.clone(),
                count: s.count,
                error: s.error.min(s.count),
            });
        }
    }

    fn name_of(&self, hash: &HashPart) -> Option<Box<str>> {
        self.lock()
            .iter()
            .find(|e| e.hash == *hash)
            .and_then(|e| e.name.clone())
    }

    fn top(&self, n: usize) -> Vec<TopEntry> {
        let mut top: Vec<TopEntry> = self
            .lock()
            .iter()
            .map(|e| TopEntry {
                hash: e.hash,
                name: e.name.clone(),
                count: e.count - e.error,
            })
            .collect();
        crate::order::sort_by(&mut top, |a, b| {
            b.count.cmp(&a.count).then(a.hash.cmp(&b.hash))
        });
        top.truncate(n);
        top
    }
}

/// A top-N entry as it is kept across restarts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedTop {
    pub hash: HashPart,
    pub name: Option<Box<str>>,
    pub count: u64,
    /// How much of `count` may be other paths' hits.
    pub error: u64,
}

/// The counters kept across restarts (`crate::state` writes them to
/// `stats.json`): the totals and bytes, and the top-N lists. Latencies,
/// the LAN socket's counters and the activity log describe one run and
/// start afresh.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub counters: Counters,
    pub top_requested: Vec<SavedTop>,
    pub top_served: Vec<SavedTop>,
}

/// The totals as numbers, read from the counters at one moment: in a
/// [`Snapshot`], and in the saved [`Totals`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub nars_served: u64,
    pub narinfos_served: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub peer_requests: u64,
    pub errors: u64,
    /// NAR bytes sent to this host's nix.
    pub bytes_sent_local: u64,
    /// NAR bytes sent to and received from peers, by [`Source::ALL`].
    pub bytes_sent_peers: [u64; 3],
    pub bytes_received_peers: [u64; 3],
}

impl Counters {
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent_local + self.bytes_sent_peers.iter().sum::<u64>()
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes_received_peers.iter().sum()
    }
}

/// Entries a saved top-N list may hold.
pub const TOP_SAVED: usize = TOP_TRACKED;

/// One line of the activity log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `serve`, `peer`, `scan`, `daemon`, `control`.
    pub kind: &'static str,
    pub text: String,
}

/// The store as a snapshot sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreView {
    /// Whether the last use of the nix-daemon (a scan, a lookup) worked.
    pub daemon_reachable: bool,
    pub scans: u64,
    pub indexed: usize,
    pub shared: usize,
    /// Whether scans are paused, and whether one waits for the resume.
    pub paused: bool,
    pub scan_pending: bool,
}

/// What the scan watcher saw last: the scan count, when it last moved,
/// and the daemon's state.
struct StoreWatch {
    scans: u64,
    last_scan: Option<Instant>,
    daemon_reachable: Option<bool>,
}

/// This host, for the dashboard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub version: &'static str,
    /// `lan`, `tracker`, `lan+tracker`, or `local` when no peer mode is on.
    pub mode: &'static str,
    /// The node id, once this host has one (tracker, Iroh).
    pub id: Option<String>,
    /// This host's name (`--peer-id`, else the host name): a label only.
    pub peer_id: String,
    pub bind: IpAddr,
    pub port: u16,
    pub lan_port: Option<u16>,
    pub daemon_socket: PathBuf,
    pub scan_interval: Option<Duration>,
    /// Whether LAN discovery was asked for (it may have failed to start).
    pub lan_wanted: bool,
}

#[cfg(test)]
impl NodeInfo {
    /// A node on loopback in the `local` mode, for the tests of the pages.
    pub(crate) fn for_tests() -> NodeInfo {
        NodeInfo {
            version: "0",
            mode: "local",
            id: None,
            peer_id: "test".to_string(),
            bind: std::net::Ipv4Addr::LOCALHOST.into(),
            port: 1,
            lan_port: None,
            daemon_socket: PathBuf::from("/x"),
            scan_interval: None,
            lan_wanted: false,
        }
    }
}

/// The LAN side, as a snapshot sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LanView {
    pub port: u16,
    pub summaries: Option<SummariesView>,
    pub published: Option<PublishedView>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SummariesView {
    pub hosts_heard: usize,
    pub hosts_with_summary: usize,
    pub covers_lan: bool,
    pub bytes: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishedView {
    pub generation: u64,
    pub paths: u32,
    pub bytes: usize,
}

/// The tracker client, as a snapshot sees it (its counters live in
/// `tracker::client`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrackerView {
    pub node_id: String,
    /// Whether the last exchange with the tracker worked.
    pub reachable: bool,
    pub announces: u64,
    pub hashes_sent: u64,
    pub lookups: u64,
    pub lookup_failures: u64,
    pub failures: u64,
}

/// What a snapshot is taken of, besides the counters.
pub struct View<'a> {
    pub node: &'a NodeInfo,
    pub store: StoreView,
    pub peers: Option<&'a PeerTable>,
    pub lan: Option<LanView>,
    pub tracker: Option<TrackerView>,
    /// What the read-ahead did; `None` when no peer is ever asked.
    pub read_ahead: Option<ReadAheadCounts>,
    /// The interface addresses of this host, for the dashboard.
    pub addresses: Vec<IpAddr>,
}

/// A peer's standing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    Ok,
    Backoff,
    Banned,
}

impl PeerState {
    pub const ALL: [PeerState; 3] = [PeerState::Ok, PeerState::Backoff, PeerState::Banned];

    pub fn label(self) -> &'static str {
        match self {
            PeerState::Ok => "ok",
            PeerState::Backoff => "backoff",
            PeerState::Banned => "banned",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PeerView {
    pub host: String,
    pub addr: String,
    pub source: Source,
    pub state: PeerState,
    pub successes: u64,
    pub failures: u64,
    pub lies: u64,
    /// NAR bytes received from it.
    pub bytes: u64,
    pub latency_ms: Option<f64>,
    /// Since this host last dealt with it.
    pub last_seen: Duration,
}

impl PeerView {
    /// Reliability in 0..=1, as the ranking sees it: unknown peers start
    /// at one half.
    pub fn reputation(&self) -> f64 {
        (self.successes as f64 + 1.0) / ((self.successes + self.failures + self.lies) as f64 + 2.0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Per bucket, not cumulative; the last is `+Inf`.
    pub counts: [u64; SLOTS],
    pub sum_us: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Everything at one moment: what every stats page renders.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub node: NodeInfo,
    pub addresses: Vec<IpAddr>,
    pub uptime: Duration,
    /// Per [`RouteKind::ALL`].
    pub routes: Vec<(RouteKind, HistogramSnapshot)>,
    /// Responses by status class, 1xx to 5xx.
    pub responses: [u64; 5],
    pub counters: Counters,
    pub store: StoreView,
    /// Since the scan count last moved; `None` before the first scan.
    pub index_age: Option<Duration>,
    /// Whether the nix-daemon answered just now; `None` if not asked.
    pub daemon_answers: Option<bool>,
    pub rescans_requested: u64,
    pub lan: Option<LanView>,
    pub tracker: Option<TrackerView>,
    pub read_ahead: Option<ReadAheadCounts>,
    pub lan_counters: LanCountersSnapshot,
    pub summary_counters: [u64; 4],
    pub peers: Vec<PeerView>,
    /// By [`PeerState::ALL`].
    pub peer_states: [u64; 3],
    pub top_requested: Vec<TopEntry>,
    pub top_served: Vec<TopEntry>,
    pub activity: Vec<Event>,
    /// The state directory's writer, once it runs.
    pub state: Option<StateReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LanCountersSnapshot {
    pub queries: u64,
    pub replies_received: u64,
    pub replies_shunned: u64,
    pub replies_sent: u64,
    pub replies_rate_limited: u64,
    /// By [`DropReason::ALL`].
    pub dropped: [u64; DropReason::ALL.len()],
}

impl LanCountersSnapshot {
    pub fn packets_dropped(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

impl Snapshot {
    pub fn requests(&self) -> u64 {
        self.routes.iter().map(|(_, h)| h.count()).sum()
    }

    /// Peers in good standing.
    pub fn peers_connected(&self) -> u64 {
        self.peer_states[0]
    }
}

/// How often the nix-daemon is asked at most on behalf of `/health`,
/// `/metrics` and the dashboard; in between, the last answer stands. Each
/// probe is a connection the daemon logs.
const DAEMON_PROBE_EVERY: Duration = Duration::from_secs(5);

/// The counters. One per process, shared by every thread through an `Arc`.
pub struct Stats {
    started: Instant,
    routes: [Histogram; RouteKind::ALL.len()],
    responses: [AtomicU64; 5],
    nars_served: AtomicU64,
    narinfos_served: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    peer_requests: AtomicU64,
    errors: AtomicU64,
    bytes_sent_local: AtomicU64,
    bytes_sent_peers: [AtomicU64; 3],
    bytes_received_peers: [AtomicU64; 3],
    rescans_requested: AtomicU64,
    pub lan: LanCounters,
    pub summaries: SummaryCounters,
    requested: TopN,
    served: TopN,
    activity: Mutex<VecDeque<Event>>,
    watch: Mutex<StoreWatch>,
    probe: Mutex<Option<(Instant, bool)>>,
    probing: AtomicBool,
    state: Mutex<Option<StateReport>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            started: Instant::now(),
            routes: Default::default(),
            responses: Default::default(),
            nars_served: AtomicU64::new(0),
            narinfos_served: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            peer_requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            bytes_sent_local: AtomicU64::new(0),
            bytes_sent_peers: Default::default(),
            bytes_received_peers: Default::default(),
            rescans_requested: AtomicU64::new(0),
            lan: LanCounters::default(),
            summaries: SummaryCounters::default(),
            requested: TopN::new(),
            served: TopN::new(),
            activity: Mutex::new(VecDeque::with_capacity(ACTIVITY_KEPT)),
            watch: Mutex::new(StoreWatch {
                scans: 0,
                last_scan: None,
                daemon_reachable: None,
            }),
            probe: Mutex::new(None),
            probing: AtomicBool::new(false),
            state: Mutex::new(None),
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// One request answered: its route kind, status and time in the worker.
    pub fn request(&self, kind: RouteKind, status: u16, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.routes[kind.index()].observe(us);
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Relaxed);
        if status >= 500 {
            self.error();
        }
    }

    /// Something went wrong on this side: a 5xx, a broken transfer, a
    /// handler that panicked.
    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }

    /// A narinfo was asked for (by this host's nix or by a peer).
    pub fn narinfo_requested(&self, hash: HashPart, name: Option<&str>) {
        self.requested.hit(hash, name);
    }

    /// A narinfo was served.
    pub fn narinfo_served(&self) {
        self.narinfos_served.fetch_add(1, Relaxed);
    }

    /// This host's nix asked for a path: found (here or on a peer) or not.
    pub fn lookup(&self, found: bool) {
        let counter = if found {
            &self.cache_hits
        } else {
            &self.cache_misses
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A request went to the peers: a narinfo lookup or a NAR transfer.
    pub fn peer_request(&self) {
        self.peer_requests.fetch_add(1, Relaxed);
    }

    /// A whole NAR (or the range asked) was sent to `client`: `bytes` of
    /// it, from this host's store or, with `from_peer`, passed through from
    /// a peer that sent `received` bytes.
    pub fn nar_served(&self, client: Client, hash: HashPart, name: Option<&str>, bytes: u64) {
        self.nars_served.fetch_add(1, Relaxed);
        match client {
            Client::Local => &self.bytes_sent_local,
            Client::Network(source) => &self.bytes_sent_peers[source as usize],
        }
        .fetch_add(bytes, Relaxed);
        let known = match name {
            Some(name) => Some(Box::from(name)),
            None => self.requested.name_of(&hash),
        };
        self.served.hit(hash, known.as_deref());
    }

    /// NAR bytes received from a peer of `source`.
    pub fn received(&self, source: Source, bytes: u64) {
        self.bytes_received_peers[source as usize].fetch_add(bytes, Relaxed);
    }

    /// The name of a path this host has seen requested, if any.
    pub fn name_of(&self, hash: &HashPart) -> Option<Box<str>> {
        self.requested.name_of(hash)
    }

    pub fn rescan_requested(&self) {
        self.rescans_requested.fetch_add(1, Relaxed);
    }

    /// Adds a line to the activity log, dropping the oldest past
    /// [`ACTIVITY_KEPT`].
    pub fn event(&self, kind: &'static str, text: String) {
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut log = self.activity.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= ACTIVITY_KEPT {
            log.pop_front();
        }
        log.push_back(Event { at, kind, text });
    }

    /// Notes what the store looks like now: a new scan (and when), the
    /// daemon coming and going, each once in the activity log. Called
    /// every second or so, and with each snapshot. Returns the index age.
    pub fn watch_store(&self, store: &StoreView) -> Option<Duration> {
        let now = Instant::now();
        let mut watch = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        if store.scans != watch.scans {
            watch.scans = store.scans;
            watch.last_scan = Some(now);
            self.event(
                "scan",
                format!(
                    "scan {} done: {} paths, {} shared",
                    store.scans, store.indexed, store.shared
                ),
            );
        }
        if watch.daemon_reachable != Some(store.daemon_reachable) {
            // The first observation is only news when it is bad.
            if watch.daemon_reachable.is_some() || !store.daemon_reachable {
                let text = if store.daemon_reachable {
                    "nix-daemon is reachable"
                } else {
                    "nix-daemon is unreachable"
                };
                self.event("daemon", text.into());
            }
            watch.daemon_reachable = Some(store.daemon_reachable);
        }
        watch.last_scan.map(|at| now - at)
    }

    /// Whether the nix-daemon answers, asking it with `ask` at most once a
    /// `DAEMON_PROBE_EVERY`; concurrent callers take the last answer.
    pub fn probe_daemon(&self, ask: impl FnOnce() -> bool) -> Option<bool> {
        let last = *self.probe.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, answer)) = last
            && at.elapsed() < DAEMON_PROBE_EVERY
        {
            return Some(answer);
        }
        if self.probing.swap(true, Relaxed) {
            return last.map(|(_, answer)| answer);
        }
        let answer = ask();
        *self.probe.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), answer));
        self.probing.store(false, Relaxed);
        Some(answer)
    }

    /// The counters kept across restarts, as they are now.
    pub fn totals(&self) -> Totals {
        Totals {
            counters: self.counters(),
            top_requested: self.requested.export(),
            top_served: self.served.export(),
        }
    }

    /// The counters as they are now.
    fn counters(&self) -> Counters {
        let load = |c: &AtomicU64| c.load(Relaxed);
        Counters {
            nars_served: load(&self.nars_served),
            narinfos_served: load(&self.narinfos_served),
            cache_hits: load(&self.cache_hits),
            cache_misses: load(&self.cache_misses),
            peer_requests: load(&self.peer_requests),
            errors: load(&self.errors),
            bytes_sent_local: load(&self.bytes_sent_local),
            bytes_sent_peers: std::array::from_fn(|i| load(&self.bytes_sent_peers[i])),
            bytes_received_peers: std::array::from_fn(|i| load(&self.bytes_received_peers[i])),
        }
    }

    /// Adds saved totals to the counters: at start, before any request.
    pub fn restore(&self, saved: &Totals) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Relaxed);
        };
        let saved_counters = &saved.counters;
        add(&self.nars_served, saved_counters.nars_served);
        add(&self.narinfos_served, saved_counters.narinfos_served);
        add(&self.cache_hits, saved_counters.cache_hits);
        add(&self.cache_misses, saved_counters.cache_misses);
        add(&self.peer_requests, saved_counters.peer_requests);
        add(&self.errors, saved_counters.errors);
        add(&self.bytes_sent_local, saved_counters.bytes_sent_local);
        for i in 0..Source::ALL.len() {
            add(
                &self.bytes_sent_peers[i],
                saved_counters.bytes_sent_peers[i],
            );
            add(
                &self.bytes_received_peers[i],
                saved_counters.bytes_received_peers[i],
            );
        }
        self.requested.import(&saved.top_requested);
        self.served.import(&saved.top_served);
    }

    /// What the state directory's writer last did, for `/health`.
    pub fn set_state(&self, report: StateReport) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
    }

    /// Reads every counter, and what `view` names, into one snapshot.
    #[inline(never)]
    pub fn snapshot(&self, view: View<'_>) -> Snapshot {
        let index_age = self.watch_store(&view.store);
        let now = Instant::now();
        let mut peer_states = [0u64; 3];
        let peers: Vec<PeerView> = view.peers.map_or_else(Vec::new, |table| {
            table
                .snapshot()
                .into_iter()
                .map(|(host, record)| {
                    let state = if record.is_banned(now) {
                        PeerState::Banned
                    } else if !record.is_available(now) {
                        PeerState::Backoff
                    } else {
                        PeerState::Ok
                    };
                    peer_states[state as usize] += 1;
                    PeerView {
                        host: host.to_string(),
                        addr: record.last_seen_as.to_string(),
                        source: Source::of(&record.last_seen_as),
                        state,
                        successes: record.successes,
                        failures: record.failures,
                        lies: record.lies,
                        bytes: record.bytes,
                        latency_ms: record.latency_ms,
                        last_seen: now.saturating_duration_since(record.last_used()),
                    }
                })
                .collect()
        });
        let load = |c: &AtomicU64| c.load(Relaxed);
        let lan = &self.lan;
        let summaries = &self.summaries;
        let daemon_answers = *self.probe.lock().unwrap_or_else(|e| e.into_inner());
        Snapshot {
            node: view.node.clone(),
            addresses: view.addresses,
            uptime: self.uptime(),
            routes: RouteKind::ALL
                .iter()
                .map(|&kind| (kind, self.routes[kind.index()].read()))
                .collect(),
            responses: std::array::from_fn(|i| load(&self.responses[i])),
            counters: self.counters(),
            store: view.store,
            index_age,
            daemon_answers: daemon_answers.map(|(_, answer)| answer),
            rescans_requested: load(&self.rescans_requested),
            lan: view.lan,
            tracker: view.tracker,
            read_ahead: view.read_ahead,
            lan_counters: LanCountersSnapshot {
                queries: load(&lan.queries),
                replies_received: load(&lan.replies_received),
                replies_shunned: load(&lan.replies_shunned),
                replies_sent: load(&lan.replies_sent),
                replies_rate_limited: load(&lan.replies_rate_limited),
                dropped: std::array::from_fn(|i| load(&lan.dropped[i])),
            },
            summary_counters: [
                load(&summaries.fetched),
                load(&summaries.dropped),
                load(&summaries.fetch_failures),
                load(&summaries.misses_answered),
            ],
            peers,
            peer_states,
            top_requested: self.requested.top(TOP_SHOWN),
            top_served: self.served.top(TOP_SHOWN),
            activity: self
                .activity
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u32) -> HashPart {
        // 32 nix32 characters from the number.
        const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let mut text = String::new();
        let mut v = u64::from(n);
        for _ in 0..32 {
            text.push(ALPHABET[(v % 32) as usize] as char);
            v /= 32;
        }
        HashPart::parse(&text).unwrap()
    }

    #[test]
    fn latencies_land_in_their_buckets() {
        let h = Histogram::default();
        for us in [0, 500, 501, 1_000, 59_000_000, 60_000_001, u64::MAX / 2] {
            h.observe(us);
        }
        let read = h.read();
        assert_eq!(read.counts[0], 2, "0 and 500 µs are ≤ 0.5 ms");
        assert_eq!(read.counts[1], 2, "501 and 1000 µs are ≤ 1 ms");
        assert_eq!(read.counts[BUCKETS_US.len() - 1], 1);
        assert_eq!(read.counts[BUCKETS_US.len()], 2, "+Inf");
        assert_eq!(read.count(), 7);
        for (bound, label) in BUCKETS_US.iter().zip(BUCKET_LABELS) {
            assert_eq!(label.parse::<f64>().unwrap() * 1e6, *bound as f64);
        }
    }

    #[test]
    fn the_top_list_keeps_the_frequent_paths_among_many() {
        let top = TopN::new();
        // 10 paths asked 1,000 times each, among 100,000 asked once: each
        // is 1/110 of the hits.
        for round in 0..100_000u32 {
            top.hit(hash(1_000_000 + round), None);
            if round % 100 == 0 {
                for n in 0..10 {
                    top.hit(hash(n), Some("frequent"));
                }
            }
        }
        let shown = top.top(TOP_SHOWN);
        assert_eq!(shown.len(), TOP_SHOWN);
        for n in 0..10 {
            let entry = shown[..10].iter().find(|e| e.hash == hash(n));
            assert!(
                entry.is_some_and(|e| e.count <= 1000 && e.count > 100),
                "path {n}: {shown:?}"
            );
        }
        assert!(shown[10..].iter().all(|e| e.count <= 1), "{shown:?}");
        assert_eq!(top.lock().len(), TOP_TRACKED);
        assert_eq!(top.name_of(&hash(3)).as_deref(), Some("frequent"));
    }

    #[test]
    fn the_activity_log_is_bounded() {
        let stats = Stats::new();
        for n in 0..(ACTIVITY_KEPT * 3) {
            stats.event("serve", format!("event {n}"));
        }
        let log = stats.activity.lock().unwrap();
        assert_eq!(log.len(), ACTIVITY_KEPT);
        assert_eq!(
            log.back().unwrap().text,
            format!("event {}", ACTIVITY_KEPT * 3 - 1)
        );
    }

    #[test]
    fn the_store_watch_notes_scans_and_the_daemon_once() {
        let stats = Stats::new();
        let mut store = StoreView::default();
        assert_eq!(stats.watch_store(&store), None);
        store.scans = 1;
        store.daemon_reachable = true;
        assert!(stats.watch_store(&store).is_some());
        assert!(stats.watch_store(&store).is_some());
        store.daemon_reachable = false;
        stats.watch_store(&store);
        let kinds: Vec<_> = stats
            .activity
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.kind, e.text.clone()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("daemon", "nix-daemon is unreachable".to_string()),
                ("scan", "scan 1 done: 0 paths, 0 shared".to_string()),
                ("daemon", "nix-daemon is reachable".to_string()),
                ("daemon", "nix-daemon is unreachable".to_string()),
            ]
        );
    }

    #[test]
    fn the_daemon_is_asked_at_most_once_a_probe_interval() {
        let stats = Stats::new();
        let mut asked = 0;
        for _ in 0..10 {
            assert_eq!(
                stats.probe_daemon(|| {
                    asked += 1;
                    true
                }),
                Some(true)
            );
        }
        assert_eq!(asked, 1);
    }

    #[test]
    fn responses_are_counted_by_class_and_route() {
        let stats = Stats::new();
        stats.request(RouteKind::NarInfo, 200, Duration::from_micros(80));
        stats.request(RouteKind::NarInfo, 404, Duration::from_millis(3));
        stats.request(RouteKind::Nar, 503, Duration::from_secs(2));
        stats.lan.dropped(DropReason::from(PacketError::Truncated));
        stats.lan.dropped(DropReason::Unexpected);
        let node = NodeInfo::for_tests();
        let snap = stats.snapshot(View {
            node: &node,
            store: StoreView::default(),
            peers: None,
            lan: None,
            tracker: None,
            read_ahead: None,
            addresses: Vec::new(),
        });
        assert_eq!(snap.requests(), 3);
        assert_eq!(snap.responses, [0, 1, 0, 1, 1]);
        assert_eq!(snap.counters.errors, 1);
        let narinfo = &snap.routes[RouteKind::NarInfo.index()];
        assert_eq!(narinfo.0, RouteKind::NarInfo);
        assert_eq!(narinfo.1.count(), 2);
        assert_eq!(narinfo.1.sum_us, 3_080);
        assert_eq!(snap.lan_counters.packets_dropped(), 2);
    }
}
