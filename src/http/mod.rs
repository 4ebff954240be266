//! The HTTP server: a hardened `tiny_http` listener and three lanes of
//! worker threads, so that nothing on the network can starve this host's own
//! nix.
//!
//! - **local**: loopback requests this host answers from its own store. They
//!   are quick (an index lookup, a NAR by `sendfile`), and no network client
//!   and no peer can hold one of these workers.
//! - **peer**: loopback requests that need the peers (a narinfo this host
//!   lacks, a NAR passed through). They wait on the network, within
//!   deadlines; a local worker hands them over and goes back to nix. The
//!   read-ahead of what nix will ask next runs here too, on two workers at
//!   most (see [`crate::fetch::read_ahead`]).
//! - **network**: everything from other hosts (`/local/`, `/health`, and
//!   the stats pages when a flag opens them).
//!
//! tiny_http itself queues loopback requests apart from the others, so a
//! request reaches its worker with no thread in between.
//!
//! Connections are bounded by tiny_http's [`tiny_http::Limits`]: a cap on
//! open connections with the network's share below it, per-IP caps, head
//! and idle deadlines, line limits while reading, and bounded body drains.
//!
//! Root endpoints serve this host's own nix and answer loopback clients that
//! name this host in `Host` only (see `access`). `/local/...` serves peers
//! and LAN hosts, under the share policy. `/metrics` and `/dashboard` are
//! root endpoints unless a flag opens them; the control endpoints always
//! are.
//!
//! Each worker times the requests it answers and counts them by route kind
//! in the [`Stats`] core.

mod access;
#[cfg(test)]
mod bench;
mod dashboard;
mod health;
mod metrics;
mod proxy;
mod range;
mod respond;
pub mod route;
mod serve;

use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use socket2::{Domain, Socket, Type};

use crate::fetch::read_ahead::ReadAhead;
use crate::fetch::resolver::Resolver;
use crate::fetch::transfer::MemoryBudget;
use crate::lan::Lan;
use crate::lan::summaries::Summaries;
use crate::lan::summary::Publisher;
use crate::stats::{
    LanView, NodeInfo, PublishedView, Snapshot, Stats, StoreView, SummariesView, TrackerView, View,
};
use crate::store::LocalStore;
use crate::tracker::client::TrackerClient;

pub use access::is_loopback;

/// What the handlers need besides the store.
pub struct ServerContext {
    pub store: Arc<LocalStore>,
    pub priority: u32,
    /// The counters every page renders.
    pub stats: Arc<Stats>,
    /// This host, as the dashboard shows it; the port is set once bound.
    pub node: NodeInfo,
    /// Which stats pages other hosts may read.
    pub public: PublicPages,
    /// Asks the scanner for a rescan now; `None` when nothing can.
    pub rescan: Option<Box<dyn Fn() -> std::io::Result<()> + Send + Sync>>,
    /// The address the server was told to bind: a name the root endpoints
    /// accept in `Host`.
    pub bind: IpAddr,
    /// Finds paths this host lacks on peers; `None` when no peer mode is on.
    pub resolver: Option<Arc<Resolver>>,
    /// The LAN side, for its counters on `/health`.
    pub lan: Option<Arc<Lan>>,
    /// The peers' store summaries, for `/health`.
    pub summaries: Option<Arc<Summaries>>,
    /// This host's store summary, for `/local/summary`; `None` when this
    /// host does not answer peers.
    pub publisher: Option<Arc<Publisher>>,
    /// The tracker client, for its counters on the stats pages.
    pub tracker: Option<Arc<TrackerClient>>,
    /// Peer NARs up to this size are verified whole before nix gets a byte,
    pub verify_before_send: u64,
    /// while this budget for the memory they take lasts.
    pub held_nars: MemoryBudget,
    /// Lookups and small NARs fetched before nix asks for them.
    pub read_ahead: ReadAhead,
}

/// The stats pages other hosts may read; by default only this host may.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublicPages {
    pub metrics: bool,
    pub dashboard: bool,
}

impl ServerContext {
    /// One snapshot of the stats, and of what the store, the peer table and
    /// the LAN side show now.
    #[inline(never)]
    pub(crate) fn snapshot(&self) -> Snapshot {
        let index = self.store.index();
        let (paused, scan_pending) = self.store.scan_control().state();
        let store = StoreView {
            daemon_reachable: self.store.daemon_reachable(),
            scans: self.store.completed_scans(),
            indexed: index.len(),
            shared: index.shared_len(),
            paused,
            scan_pending,
        };
        drop(index);
        self.stats.probe_daemon(|| {
            let socket = self.store.daemon().socket_path();
            let answer = daemon_answers(socket);
            if let Err(e) = &answer {
                log::debug!("nix-daemon at {}: {e}", socket.display());
            }
            answer.is_ok()
        });
        let lan = self.lan.as_ref().map(|lan| LanView {
            port: lan.port(),
            summaries: self.summaries.as_ref().map(|summaries| {
                let (hosts_heard, hosts_with_summary, bytes) = summaries.coverage();
                SummariesView {
                    hosts_heard,
                    hosts_with_summary,
                    covers_lan: summaries.cover_all(),
                    bytes,
                }
            }),
            published: self.publisher.as_ref().map(|p| {
                let published = p.current();
                PublishedView {
                    generation: published.generation,
                    paths: published.paths,
                    bytes: published.bytes.len(),
                }
            }),
        });
        let tracker = self.tracker.as_ref().map(|tracker| {
            let c = &tracker.stats;
            let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
            TrackerView {
                node_id: tracker.node_id().to_string(),
                reachable: c.reachable.load(Ordering::Relaxed),
                announces: load(&c.announces),
                hashes_sent: load(&c.hashes_sent),
                lookups: load(&c.lookups),
                lookup_failures: load(&c.lookup_failures),
                failures: load(&c.failures),
            }
        });
        self.stats.snapshot(View {
            node: &self.node,
            store,
            peers: self.resolver.as_ref().map(|r| r.peers()),
            lan,
            tracker,
            read_ahead: self.resolver.as_ref().map(|_| self.read_ahead.counts()),
            addresses: addresses(self.node.bind),
        })
    }
}

/// How long the health probe waits for the nix-daemon's greeting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether a nix-daemon listens on `socket` and shakes hands, on a
/// connection of its own: a pooled connection would say nothing, as its
/// worker process outlives a daemon that is gone. The connection is closed
/// right after the handshake, where the daemon's worker takes the end of
/// the connection for a normal one.
fn daemon_answers(socket: &std::path::Path) -> io::Result<()> {
    use crate::store::daemon::{Fault, ReplyReader};
    use std::io::Write;
    const WORKER_MAGIC_1: u64 = 0x6e69_7863;
    /// 1.35, as the daemon client asks.
    const CLIENT_VERSION: u64 = 0x123;
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let fault = |fault: Fault| match fault {
        Fault::Io(e) => e,
        Fault::Protocol(why) | Fault::Remote(why) => io::Error::other(why),
    };
    let mut writer = &stream;
    let mut replies = ReplyReader::new(io::BufReader::new(&stream));
    writer.write_all(&WORKER_MAGIC_1.to_le_bytes())?;
    replies.read_hello().map_err(fault)?;
    let mut hello = CLIENT_VERSION.to_le_bytes().to_vec();
    if replies.minor() >= 14 {
        hello.extend_from_slice(&0u64.to_le_bytes()); // no CPU affinity
    }
    if replies.minor() >= 11 {
        hello.extend_from_slice(&0u64.to_le_bytes()); // reserveSpace
    }
    writer.write_all(&hello)?;
    replies.read_hello_end().map_err(fault)
}

/// The addresses this host is reached at: the bound one, or every
/// interface's but loopback when bound to all.
fn addresses(bind: IpAddr) -> Vec<IpAddr> {
    if !bind.is_unspecified() {
        return vec![bind];
    }
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .into_iter()
            .filter(|i| !i.is_loopback())
            .map(|i| i.ip())
            .filter(|ip| ip.is_ipv4() == bind.is_ipv4() || bind.is_ipv6())
            .collect(),
        Err(e) => {
            log::debug!("cannot list network interfaces: {e}");
            Vec::new()
        }
    }
}

/// How many threads each lane has.
#[derive(Clone, Copy, Debug)]
pub struct Lanes {
    pub local: usize,
    pub peer: usize,
    pub network: usize,
}

impl Lanes {
    /// `peer_workers` for the lookups and transfers that wait on peers (the
    /// `--workers` option); a quarter as many, at least two, for each of
    /// the others, whose requests are short (an index lookup, a NAR by
    /// sendfile) or bounded by deadlines. Each idle thread costs RSS.
    pub fn for_workers(peer_workers: usize) -> Lanes {
        let others = (peer_workers / 4).max(2);
        Lanes {
            local: others,
            peer: peer_workers.max(1),
            network: others,
        }
    }
}

/// A running server: its address, and what its threads are doing. The
/// threads run until the process ends.
pub struct Server {
    pub local_addr: SocketAddr,
    activity: Arc<Activity>,
}

/// Requests taken and not yet answered, and whether new ones are refused.
#[derive(Default)]
struct Activity {
    running: AtomicUsize,
    draining: AtomicBool,
}

impl Server {
    /// Binds `addr` and starts the lanes' workers answering requests.
    pub fn start(addr: SocketAddr, lanes: Lanes, mut context: ServerContext) -> io::Result<Server> {
        let listener = bind(addr, SEND_TIMEOUT)?;
        let local_addr = listener.local_addr()?;
        context.node.port = local_addr.port();
        let limits = connection_limits(open_files_limit());
        log::debug!("connection limits: {limits:?}");
        let server = tiny_http::Server::from_listener_with_limits(listener, None, limits)
            .map_err(|e| io::Error::other(format!("cannot start HTTP server on {addr}: {e}")))?;
        let server = Arc::new(server);
        let context = Arc::new(context);
        let activity = Arc::new(Activity::default());
        let (to_peer, peer_queue) = unbounded::<PeerWork>();
        let handoff = Handoff {
            to_peer,
            pool: Arc::new(PeerPool {
                queue: peer_queue,
                context: Arc::clone(&context),
                activity: Arc::clone(&activity),
                idle: AtomicUsize::new(0),
                spawned: AtomicUsize::new(0),
                max: lanes.peer.max(1),
            }),
        };
        let lane_specs = [
            (
                "local",
                lanes.local,
                Intake::Loopback(Arc::clone(&server)),
                Lane::Local(handoff),
            ),
            (
                "net",
                lanes.network,
                Intake::Network(Arc::clone(&server)),
                Lane::Network,
            ),
        ];
        for (name, count, intake, lane) in lane_specs {
            for n in 0..count.max(1) {
                let (intake, lane) = (intake.clone(), lane.clone());
                let (context, activity) = (Arc::clone(&context), Arc::clone(&activity));
                std::thread::Builder::new()
                    .name(format!("http-{name}-{n}"))
                    .spawn(move || worker(&intake, &context, &lane, &activity))?;
            }
        }
        Ok(Server {
            local_addr,
            activity,
        })
    }

    /// Stops taking requests: new ones get 503 from now on.
    pub fn refuse_new_requests(&self) {
        self.activity.draining.store(true, Ordering::SeqCst);
    }

    /// Stops taking requests (new ones get 503) and waits for the running
    /// ones, transfers included, to end, for at most `timeout`. Returns how
    /// many were still running.
    pub fn drain(&self, timeout: Duration) -> usize {
        self.refuse_new_requests();
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.activity.running.load(Ordering::SeqCst);
            if running == 0 || Instant::now() >= deadline {
                return running;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Which lane a worker serves, and where a local worker hands requests
/// that need the peers.
#[derive(Clone)]
pub(crate) enum Lane {
    Local(Handoff),
    Peer(Handoff),
    Network,
}

impl Lane {
    /// Has `runners` peer lane workers run the read-ahead work just queued.
    pub(crate) fn wake_read_ahead(&self, runners: usize) {
        match self {
            // The peer lane's channel is never closed: the work is taken.
            Lane::Local(handoff) | Lane::Peer(handoff) => {
                for _ in 0..runners {
                    handoff.start(PeerWork::ReadAhead);
                }
            }
            // Other hosts' requests queue no read-ahead (see `serve`).
            Lane::Network => {}
        }
    }
}

/// What the peer lane's workers do: a request a local worker handed over,
/// or the queued read-ahead work.
// The request was sent unboxed before; a box would cost an allocation per
// request handed over.
#[allow(clippy::large_enum_variant)]
pub(crate) enum PeerWork {
    Request(tiny_http::Request),
    ReadAhead,
}

/// The way from the local lane to the peer lane.
#[derive(Clone)]
pub(crate) struct Handoff {
    to_peer: Sender<PeerWork>,
    pool: Arc<PeerPool>,
}

/// The peer lane's threads, started as work comes (up to `max`) and kept:
/// a host whose peers are never asked pays for none of them.
struct PeerPool {
    queue: Receiver<PeerWork>,
    context: Arc<ServerContext>,
    activity: Arc<Activity>,
    idle: AtomicUsize,
    spawned: AtomicUsize,
    max: usize,
}

impl Handoff {
    /// Queues `request` for the peer lane, where it counts as running until
    /// answered, and starts a worker there if none is free; gives the
    /// request back when the lane cannot take it.
    pub(crate) fn send(&self, request: tiny_http::Request) -> Option<tiny_http::Request> {
        let pool = &self.pool;
        pool.activity.running.fetch_add(1, Ordering::SeqCst);
        match self.start(PeerWork::Request(request)) {
            Some(PeerWork::Request(refused)) => {
                pool.activity.running.fetch_sub(1, Ordering::SeqCst);
                Some(refused)
            }
            _ => None,
        }
    }

    /// Queues `work` for the peer lane and starts a worker there if none is
    /// free; gives the work back when the lane cannot take it.
    fn start(&self, work: PeerWork) -> Option<PeerWork> {
        let pool = &self.pool;
        if let Err(refused) = self.to_peer.send(work) {
            return Some(refused.into_inner());
        }
        if pool.idle.load(Ordering::SeqCst) == 0 {
            let grown = pool
                .spawned
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n < pool.max).then_some(n + 1)
                });
            if let Ok(n) = grown {
                let handoff = self.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("http-peer-{n}"))
                    .spawn(move || peer_worker(&handoff));
                if let Err(e) = spawned {
                    pool.spawned.fetch_sub(1, Ordering::SeqCst);
                    log::error!("cannot start a peer lane worker: {e}");
                }
            }
        }
        None
    }
}

fn peer_worker(handoff: &Handoff) {
    let pool = &handoff.pool;
    let lane = Lane::Peer(handoff.clone());
    loop {
        pool.idle.fetch_add(1, Ordering::SeqCst);
        let next = pool.queue.recv();
        pool.idle.fetch_sub(1, Ordering::SeqCst);
        match next {
            Ok(PeerWork::Request(request)) => {
                // Counted as running by the handoff; counted down here.
                answer_counted(&pool.context, request, &lane);
                pool.activity.running.fetch_sub(1, Ordering::SeqCst);
            }
            Ok(PeerWork::ReadAhead) => read_ahead(&pool.context),
            Err(_) => return,
        }
    }
}

/// Runs the queued read-ahead work, counting what it fetched as received.
fn read_ahead(context: &ServerContext) {
    let Some(resolver) = &context.resolver else {
        return;
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let index = context.store.index();
        context
            .read_ahead
            .run(resolver, &|hash| index.contains(hash), &|peer, bytes| {
                context
                    .stats
                    .received(crate::stats::Source::of(&peer), bytes)
            });
    }));
    if outcome.is_err() {
        log::error!("read-ahead panicked; the worker carries on");
        context.stats.error();
    }
}

/// Where a worker takes its requests from: tiny_http's queue of loopback
/// requests or of the others (kept apart by tiny_http itself, with no
/// thread in between).
#[derive(Clone)]
enum Intake {
    Loopback(Arc<tiny_http::Server>),
    Network(Arc<tiny_http::Server>),
}

impl Intake {
    /// The next request; `None` once there will be none.
    fn next(&self) -> Option<tiny_http::Request> {
        let (server, loopback) = match self {
            Intake::Loopback(server) => (server, true),
            Intake::Network(server) => (server, false),
        };
        loop {
            let received = if loopback {
                server.recv_loopback()
            } else {
                server.recv()
            };
            match received {
                Ok(request) => return Some(request),
                // Only an unblocked queue errs: the server is going away.
                Err(e) => {
                    log::debug!("HTTP: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
}

/// A client that stops reading for this long loses its connection. Network
/// clients also have a deadline for each whole response (see `serve`).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// A listening socket whose options accepted sockets inherit on Linux:
/// `TCP_NODELAY`, since a keep-alive response split over two writes would
/// otherwise wait 40 ms for a delayed ACK, and the send timeout. The
/// tracker listens the same way.
pub(crate) fn bind(addr: SocketAddr, send_timeout: Duration) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(send_timeout))?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Open connections at most, whatever the file limit.
const MAX_CONNECTIONS: usize = 512;
/// Descriptors kept for everything but client connections: peer
/// transfers, nix-daemon connections, NAR files, the UDP socket, logs.
const RESERVED_FILES: u64 = 128;

/// Raises the soft limit on open files to the hard one (systemd's default
/// soft limit is 1024) and returns it.
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum
        && limit.current != Some(hard)
    {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            log::warn!("cannot raise the open files limit to {hard}: {e}");
        }
    }
    open_files_limit()
}

fn open_files_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Connection limits that fit `open_files`: each connection costs two
/// descriptors (tiny_http's and the handle that lets a response reach its
/// socket). Loopback always keeps a quarter of them.
fn connection_limits(open_files: u64) -> tiny_http::Limits {
    let fit = open_files.saturating_sub(RESERVED_FILES) / 2;
    let max_connections = usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_CONNECTIONS);
    let max_remote_connections = max_connections * 3 / 4;
    tiny_http::Limits {
        max_connections,
        max_remote_connections,
        max_connections_per_ip: (max_remote_connections / 4).max(4),
        // The lanes: loopback requests have workers of their own.
        separate_loopback: true,
        ..tiny_http::Limits::default()
    }
}

fn worker(intake: &Intake, context: &ServerContext, lane: &Lane, activity: &Activity) {
    while let Some(request) = intake.next() {
        if activity.draining.load(Ordering::SeqCst) {
            let response = respond::text(503, "shutting down\n")
                .with_header(respond::header("Connection", "close"));
            respond::respond(request, response);
            continue;
        }
        activity.running.fetch_add(1, Ordering::SeqCst);
        answer_counted(context, request, lane);
        // A request handed to the peer lane was counted once more there.
        activity.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Answers one request, timed and counted by route kind. A bug in one
/// request must not take the worker (and so the cache) down.
fn answer_counted(context: &ServerContext, request: tiny_http::Request, lane: &Lane) {
    let began = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve::handle(context, request, lane)
    }));
    match outcome {
        Ok(Some(handled)) => context
            .stats
            .request(handled.kind, handled.status, began.elapsed()),
        // Handed to the peer lane, whose worker counts it.
        Ok(None) => {}
        Err(_) => {
            log::error!("a request handler panicked; the worker carries on");
            context.stats.error();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_fit_the_file_limit_and_keep_room_for_loopback() {
        for files in [64, 1024, 4096, 524_288, u64::MAX] {
            let limits = connection_limits(files);
            assert!(limits.max_remote_connections < limits.max_connections);
            assert!(limits.max_connections_per_ip <= limits.max_remote_connections);
            assert!(limits.max_connections <= MAX_CONNECTIONS);
            if files >= 1024 {
                assert!(
                    (limits.max_connections as u64) * 2 + RESERVED_FILES <= files,
                    "{files}: {limits:?}"
                );
            }
        }
        assert_eq!(connection_limits(1024).max_connections, 448);
    }
}
