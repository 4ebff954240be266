//! `peerix-tracker`'s server: a hardened tiny_http listener whose requests
//! a dispatch thread sorts into two lanes of workers, lookups and changes;
//! one writer thread that owns the database's write connection (fed by a
//! bounded channel, and sweeping expired peers between writes); and a
//! small pool of reader connections for lookups.
//!
//! A request is checked in this order, and nothing is written unless it
//! passes all of it: route and method (404, 405), body size (413),
//! signature and allow-list (401, 403), body (400), owner (403), then the
//! writer (409, 413, 429; 401 for a request replayed after a restart).

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::io::{self, Cursor, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use tiny_http::{Header, Request, Response, StatusCode};

use super::allow;
use super::api::{
    self, AnnounceBody, ApiError, BatchBody, DeltaBody, Hash, MAX_BODY, MAX_LISTED_PEERS,
    MAX_PROVIDERS,
};
use super::auth::{self, MAX_SKEW, NODE_HEADER, ReplayGuard, SIGNATURE_HEADER, TIME_HEADER};
use super::config::TrackerConfig;
use super::db::{Change, Outcome, PeerRow, Reader, Signature, WriteError, Writer};
use crate::identity::NodeId;
use crate::nix::base64;

/// Workers for lookups (GET); each holds a reader only while it queries. As many as readers: more only contend
/// for the 2 cores a small tracker has (8 gave a p99 at 16 connections
/// half again as long).
const LOOKUP_WORKERS: usize = 4;
/// Workers for changes: they read, check and parse a body, then wait for
/// the writer; in a lane of their own, so writes waiting on the database
/// never hold up lookups.
const CHANGE_WORKERS: usize = 4;
/// Requests waiting in a lane at most; past that, 503 at once.
const LANE_QUEUE: usize = 256;
/// Reader connections.
const READERS: usize = 4;
/// Writes waiting for the writer at most; past that, 503 at once.
const WRITE_QUEUE: usize = 64;
/// How long a request waits for its write, or for a reader connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const READER_TIMEOUT: Duration = Duration::from_secs(5);
/// Open connections at most, whatever the file limit.
const MAX_CONNECTIONS: usize = 1024;
/// Descriptors kept for the database and everything but connections.
const RESERVED_FILES: u64 = 64;
/// A client that stops reading for this long loses its connection.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the workers share.
struct Context {
    replays: ReplayGuard,
    /// The allowed node ids' bytes; `None`: an open tracker.
    allowed: RwLock<Option<Arc<HashSet<[u8; 32]>>>>,
    allow_file: Option<std::path::PathBuf>,
    readers: (Sender<Reader>, Receiver<Reader>),
    writes: Sender<Write>,
    ttl: i64,
    max_peers_per_ip: usize,
    started: Instant,
}

/// A change for the writer thread, and where its outcome goes.
struct Write {
    change: Change,
    signature: Option<Signature>,
    reply: Sender<Result<Outcome, WriteError>>,
}

/// Opens the database, binds, and serves until the process ends.
pub fn run(config: &TrackerConfig) -> Result<(), String> {
    let allowed = match &config.allow_nodes {
        Some(file) => {
            let nodes = allow::read(file)?;
            log::info!("private tracker: {} nodes on the allow-list", nodes.len());
            Some(Arc::new(node_bytes(nodes)))
        }
        None => None,
    };
    if let Some(dir) = config.db.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("database directory {}: {e}", dir.display()))?;
    }
    let writer = Writer::open(&config.db)?;
    let (to_pool, pool) = bounded(READERS);
    for _ in 0..READERS {
        let reader = Reader::open(&config.db)?;
        // The channel has room for every reader.
        let _ = to_pool.send(reader);
    }
    let ttl = i64::try_from(config.peer_ttl).unwrap_or(i64::MAX / 4);
    let (writes, write_queue) = bounded(WRITE_QUEUE);
    let context = Arc::new(Context {
        replays: ReplayGuard::default(),
        allowed: RwLock::new(allowed),
        allow_file: config.allow_nodes.clone(),
        readers: (to_pool, pool),
        writes,
        ttl,
        max_peers_per_ip: config.max_peers_per_ip,
        started: Instant::now(),
    });

    let open_files = crate::http::raise_open_files_limit();
    let addr = SocketAddr::new(config.bind, config.port);
    let listener = crate::http::bind(addr, SEND_TIMEOUT).map_err(|e| e.to_string())?;
    let local_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let limits = connection_limits(open_files);
    log::debug!("connection limits: {limits:?}");
    let server = tiny_http::Server::from_listener_with_limits(listener, None, limits)
        .map_err(|e| format!("cannot start HTTP server on {addr}: {e}"))?;

    let mut threads = Vec::new();
    let spawn_error = |e: io::Error| format!("cannot start a thread: {e}");
    threads.push(
        std::thread::Builder::new()
            .name("tracker-writer".into())
            .spawn(move || write_loop(writer, &write_queue, ttl))
            .map_err(spawn_error)?,
    );
    watch_sighup(Arc::clone(&context)).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    let (to_lookups, lookups) = bounded(LANE_QUEUE);
    let (to_changes, changes) = bounded(LANE_QUEUE);
    for (lane, count, queue) in [
        ("lookup", LOOKUP_WORKERS, lookups),
        ("change", CHANGE_WORKERS, changes),
    ] {
        for n in 0..count {
            let context = Arc::clone(&context);
            let queue = queue.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("tracker-{lane}-{n}"))
                    .spawn(move || worker(&context, &queue))
                    .map_err(spawn_error)?,
            );
        }
    }
    threads.push(
        std::thread::Builder::new()
            .name("tracker-dispatch".into())
            .spawn(move || dispatch(&server, &to_lookups, &to_changes))
            .map_err(spawn_error)?,
    );
    log::info!(
        "peerix-tracker {} listening on {local_addr}, database {}, peer TTL {} s",
        env!("CARGO_PKG_VERSION"),
        config.db.display(),
        config.peer_ttl
    );
    for thread in threads {
        let _ = thread.join();
    }
    Ok(())
}

/// tiny_http's limits, with the connection caps fitted to the file limit
/// (two descriptors a connection).
fn connection_limits(open_files: u64) -> tiny_http::Limits {
    let fit = open_files.saturating_sub(RESERVED_FILES) / 2;
    let max_connections = usize::try_from(fit)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_CONNECTIONS);
    let max_remote_connections = max_connections * 3 / 4;
    tiny_http::Limits {
        max_connections,
        max_remote_connections,
        max_connections_per_ip: (max_remote_connections / 8).max(4),
        ..tiny_http::Limits::default()
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 4))
        .unwrap_or(0)
}

/// The writer thread: writes in the order they come, and between them,
/// steps of the sweep of expired peers (at least one step per write when
/// the sweep is due, so a stream of writes cannot starve it).
fn write_loop(mut db: Writer, queue: &Receiver<Write>, ttl: i64) {
    let interval = Duration::from_secs_f64(ttl as f64 / 4.0)
        .clamp(Duration::from_millis(250), Duration::from_secs(30));
    let mut next_sweep = Instant::now();
    loop {
        if Instant::now() >= next_sweep {
            let step = catch_unwind(AssertUnwindSafe(|| db.sweep_step(unix_now(), ttl)));
            next_sweep = match step {
                Ok(Ok(true)) => Instant::now(),
                Ok(Ok(false)) => Instant::now() + interval,
                Ok(Err(e)) => {
                    log::error!("sweeping expired peers: {e}");
                    Instant::now() + interval
                }
                Err(_) => {
                    log::error!("the sweep panicked; the writer carries on");
                    Instant::now() + interval
                }
            };
        }
        let wait = next_sweep.saturating_duration_since(Instant::now());
        match queue.recv_timeout(wait) {
            Ok(write) => {
                let Write {
                    change,
                    signature,
                    reply,
                } = write;
                let outcome = catch_unwind(AssertUnwindSafe(|| {
                    db.apply(change, signature, unix_now(), ttl)
                }))
                .unwrap_or_else(|_| {
                    log::error!("a write panicked; the writer carries on");
                    Err(WriteError::Panicked)
                });
                // The request may have given up waiting.
                let _ = reply.send(outcome);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Re-reads the allow-list on SIGHUP. Without one, SIGHUP is logged and
/// ignored (rather than ending the process, its default).
fn node_bytes(nodes: HashSet<NodeId>) -> HashSet<[u8; 32]> {
    nodes.iter().map(|node| *node.as_bytes()).collect()
}

fn watch_sighup(context: Arc<Context>) -> io::Result<()> {
    let (mut reader, writer) = UnixStream::pair()?;
    writer.set_nonblocking(true)?;
    signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, writer)?;
    std::thread::Builder::new()
        .name("tracker-sighup".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(_) => context.reload_allow_list(),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::error!("SIGHUP watch: {e}");
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

impl Context {
    fn reload_allow_list(&self) {
        let Some(file) = &self.allow_file else {
            log::info!("SIGHUP: no allow-list to re-read");
            return;
        };
        match allow::read(file) {
            Ok(nodes) => {
                log::info!("SIGHUP: {} nodes on the allow-list", nodes.len());
                *self.allowed.write().unwrap_or_else(|e| e.into_inner()) =
                    Some(Arc::new(node_bytes(nodes)));
            }
            Err(e) => log::error!("SIGHUP: {e}; the allow-list is left as it was"),
        }
    }

    fn allowed(&self) -> Option<Arc<HashSet<[u8; 32]>>> {
        self.allowed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Takes requests from tiny_http (one thread waits on its queue: several
/// made the tail at 16 connections longer) and hands each to its lane:
/// lookups (GET) or changes, so that writes waiting on the database never
/// hold up lookups. A full lane is a 503 at once.
fn dispatch(
    server: &tiny_http::Server,
    to_lookups: &Sender<Request>,
    to_changes: &Sender<Request>,
) {
    loop {
        let request = match server.recv() {
            Ok(request) => request,
            Err(e) => {
                // One connection's error; a pause keeps a run of them from
                // spinning.
                log::debug!("HTTP: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let lane = if *request.method() == tiny_http::Method::Get {
            to_lookups
        } else {
            to_changes
        };
        match lane.try_send(request) {
            Ok(()) => {}
            Err(TrySendError::Full(request)) => {
                // Small, into an empty send buffer: it does not wait.
                respond(request, Err(ApiError::new(503, "busy, try again later")));
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

fn worker(context: &Context, queue: &Receiver<Request>) {
    for request in queue {
        serve(context, request);
    }
}

fn serve(context: &Context, mut request: Request) {
    // A bug in one request must not take the worker down.
    let response =
        catch_unwind(AssertUnwindSafe(|| handle(context, &mut request))).unwrap_or_else(|_| {
            log::error!("a request handler panicked; the worker carries on");
            Err(ApiError::new(500, "internal error"))
        });
    respond(request, response);
}

fn respond(request: Request, response: Result<String, ApiError>) {
    let (status, body) = match response {
        Ok(body) => (200, body),
        Err(e) => {
            if e.status >= 500 {
                log::warn!("{} {}: {}", request.method(), request.url(), e.message);
            } else {
                log::debug!(
                    "{} {}: {} {}",
                    request.method(),
                    request.url(),
                    e.status,
                    e.message
                );
            }
            (e.status, e.body())
        }
    };
    let length = body.len();
    let response = Response::new(
        StatusCode(status),
        vec![json_header()],
        Cursor::new(body.into_bytes()),
        Some(length),
        None,
    );
    if let Err(e) = request.respond(response) {
        log::debug!("response not delivered: {e}");
    }
}

fn json_header() -> Header {
    Header {
        field: "Content-Type".parse().expect("ASCII header name"),
        value: "application/json".parse().expect("ASCII header value"),
    }
}

enum Route<'a> {
    Announce,
    Peers,
    Peer(&'a str),
    Batch,
    Delta,
    Find(&'a str),
    Health,
}

impl Route<'_> {
    fn methods(&self) -> &'static str {
        match self {
            Route::Announce | Route::Batch | Route::Delta => "POST",
            Route::Peer(_) => "GET, DELETE",
            Route::Peers | Route::Find(_) | Route::Health => "GET",
        }
    }
}

fn route(path: &str) -> Option<Route<'_>> {
    Some(match path {
        "/iroh/announce" => Route::Announce,
        "/iroh/peers" => Route::Peers,
        "/packages/batch" => Route::Batch,
        "/packages/delta" => Route::Delta,
        "/health" => Route::Health,
        _ => {
            if let Some(node) = path.strip_prefix("/iroh/peer/") {
                Route::Peer(node)
            } else if let Some(hash) = path.strip_prefix("/find/") {
                Route::Find(hash)
            } else {
                return None;
            }
        }
    })
}

/// Answers one request: the JSON of a 200, or a refusal.
fn handle(context: &Context, request: &mut Request) -> Result<String, ApiError> {
    let url = request.url().to_string();
    let path = url.split_once('?').map_or(url.as_str(), |(path, _)| path);
    let route = route(path).ok_or_else(|| ApiError::new(404, format!("no endpoint {path}")))?;
    let method = request.method().as_str().to_string();
    if !route.methods().split(", ").any(|m| m == method) {
        return Err(ApiError::new(
            405,
            format!(
                "{method} is not allowed on {path} (only {})",
                route.methods()
            ),
        ));
    }
    let observed = request
        .remote_addr()
        .map(|a| a.ip().to_canonical())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    match (route, method.as_str()) {
        (Route::Health, _) => health(context),
        (Route::Find(hash), _) => {
            lookup_allowed(context, request, &url)?;
            find(context, hash)
        }
        (Route::Peers, _) => {
            lookup_allowed(context, request, &url)?;
            peers(context)
        }
        (Route::Peer(node), "GET") => {
            lookup_allowed(context, request, &url)?;
            peer(context, node)
        }
        (Route::Peer(node), _) => {
            let body = read_body(request)?;
            let (signer, signature) = authenticate(context, request, &url, &body, true)?;
            let node = api::owned_node(node, signer)?;
            write(context, Change::Delete { node }, signature, node)
        }
        (Route::Announce, _) => {
            let body = read_body(request)?;
            let (signer, signature) = authenticate(context, request, &url, &body, true)?;
            let announce: AnnounceBody = api::parse_body(&body)?;
            let (node, record) = api::announce_record(&announce, signer, observed)?;
            let change = Change::Announce {
                node,
                ip: observed.to_string(),
                record,
                max_peers_per_ip: context.max_peers_per_ip,
            };
            write(context, change, signature, node)
        }
        (Route::Batch, _) => {
            let body = read_body(request)?;
            let (signer, signature) = authenticate(context, request, &url, &body, true)?;
            let batch: BatchBody = api::parse_body(&body)?;
            let node = api::owned_node(&batch.node_id, signer)?;
            let change = Change::Batch {
                node,
                hashes: batch.hashes.0,
            };
            write(context, change, signature, node)
        }
        (Route::Delta, _) => {
            let body = read_body(request)?;
            let (signer, signature) = authenticate(context, request, &url, &body, true)?;
            let delta: DeltaBody = api::parse_body(&body)?;
            let node = api::owned_node(&delta.node_id, signer)?;
            api::check_delta(&delta.added.0, &delta.removed.0)?;
            let change = Change::Delta {
                node,
                added: delta.added.0,
                removed: delta.removed.0,
            };
            write(context, change, signature, node)
        }
    }
}

/// The body, at most [`MAX_BODY`] bytes: a larger one is refused before
/// it is read (by its Content-Length) or as soon as it goes past.
fn read_body(request: &mut Request) -> Result<Vec<u8>, ApiError> {
    let too_large = || ApiError::new(413, format!("request body over {MAX_BODY} bytes"));
    if request.body_length().is_some_and(|len| len > MAX_BODY) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| {
            let status = match e.kind() {
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => 408,
                _ => 400,
            };
            ApiError::new(status, format!("cannot read the request body: {e}"))
        })?;
    if body.len() > MAX_BODY {
        return Err(too_large());
    }
    Ok(body)
}

/// The node that signed the request, checked against the allow-list, and
/// its signature for the writer's replay check (`replay_check`: state
/// changes; a lookup is not checked for replays).
fn authenticate(
    context: &Context,
    request: &Request,
    url: &str,
    body: &[u8],
    replay_check: bool,
) -> Result<(NodeId, Option<Signature>), ApiError> {
    let header = |name: &'static str| {
        request
            .headers()
            .iter()
            .find(|h| h.field.equiv(name))
            .map(|h| h.value.as_str())
    };
    let signed = (
        header(NODE_HEADER),
        header(TIME_HEADER),
        header(SIGNATURE_HEADER),
    );
    let lookup_guard;
    let replays = if replay_check {
        &context.replays
    } else {
        lookup_guard = ReplayGuard::default();
        &lookup_guard
    };
    let now = u64::try_from(unix_now()).unwrap_or(0);
    let node = auth::verify(signed, request.method().as_str(), url, body, now, replays)
        .map_err(|e| ApiError::new(401, e.to_string()))?;
    if let Some(allowed) = context.allowed()
        && !allowed.contains(node.as_bytes())
    {
        return Err(ApiError::new(
            403,
            format!("node {node} is not on this tracker's allow-list"),
        ));
    }
    // Both verified above: they parse.
    let bytes: Option<[u8; 64]> = signed
        .2
        .and_then(|s| base64::decode(s.trim()).ok())
        .and_then(|b| b.try_into().ok());
    let timestamp: Option<i64> = signed.1.and_then(|t| t.trim().parse().ok());
    let signature = match (replay_check, bytes, timestamp) {
        (true, Some(bytes), Some(timestamp)) => Some(Signature {
            bytes,
            expires: timestamp.saturating_add(MAX_SKEW as i64),
        }),
        _ => None,
    };
    Ok((node, signature))
}

/// On a private tracker, a lookup must be signed by an allowed node.
fn lookup_allowed(context: &Context, request: &mut Request, url: &str) -> Result<(), ApiError> {
    if context.allowed().is_none() {
        return Ok(());
    }
    let body = read_body(request)?;
    authenticate(context, request, url, &body, false).map(|_| ())
}

/// Hands a change to the writer and waits for its outcome.
fn write(
    context: &Context,
    change: Change,
    signature: Option<Signature>,
    node: NodeId,
) -> Result<String, ApiError> {
    let deleting = matches!(change, Change::Delete { .. });
    let (reply, outcome) = bounded(1);
    let write = Write {
        change,
        signature,
        reply,
    };
    context.writes.try_send(write).map_err(|e| match e {
        TrySendError::Full(_) => {
            ApiError::new(503, "busy: too many writes waiting, try again later")
        }
        TrySendError::Disconnected(_) => ApiError::new(500, "the database writer is gone"),
    })?;
    let outcome = outcome
        .recv_timeout(WRITE_TIMEOUT)
        .map_err(|_| ApiError::new(503, "the database did not answer in time"))?;
    let json = match outcome {
        Ok(Outcome::Announced { new, hashes }) => serde_json::json!({
            "node_id": node.to_string(),
            "new": new,
            "hashes": hashes,
            "ttl": context.ttl,
        }),
        Ok(Outcome::Applied {
            hashes,
            added,
            removed,
        }) => serde_json::json!({
            "node_id": node.to_string(),
            "hashes": hashes,
            "added": added,
            "removed": removed,
        }),
        Ok(Outcome::Deleted) => serde_json::json!({ "node_id": node.to_string(), "deleted": true }),
        Err(WriteError::NotRegistered(node)) if deleting => {
            return Err(ApiError::new(404, format!("node {node} is not registered")));
        }
        Err(WriteError::NotRegistered(node)) => {
            return Err(ApiError::new(
                409,
                format!(
                    "node {node} is not registered (or has expired): announce it, then send \
                     its full set with /packages/batch"
                ),
            ));
        }
        Err(WriteError::TooManyPeers { ip, max }) => {
            return Err(ApiError::new(
                429,
                format!("{max} live peers are registered from {ip} already"),
            ));
        }
        Err(WriteError::TooManyHashes { node, would }) => {
            return Err(ApiError::new(
                413,
                format!(
                    "node {node} would hold {would} hashes, more than {}",
                    api::MAX_HASHES_PER_PEER
                ),
            ));
        }
        Err(WriteError::Replayed) => {
            return Err(ApiError::new(401, auth::AuthError::Replayed.to_string()));
        }
        Err(WriteError::Db(e)) => {
            log::error!("database write: {e}");
            return Err(ApiError::new(500, "database error"));
        }
        Err(WriteError::Panicked) => return Err(ApiError::new(500, "internal error")),
    };
    Ok(json.to_string())
}

/// A reader connection from the pool, given back when dropped.
struct Pooled<'a> {
    reader: Option<Reader>,
    pool: &'a Sender<Reader>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Reader;
    fn deref(&self) -> &Reader {
        // Set until drop.
        self.reader.as_ref().expect("a pooled reader")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            let _ = self.pool.send(reader);
        }
    }
}

fn reader(context: &Context) -> Result<Pooled<'_>, ApiError> {
    let reader = context
        .readers
        .1
        .recv_timeout(READER_TIMEOUT)
        .map_err(|_| ApiError::new(503, "busy: no database reader free, try again later"))?;
    Ok(Pooled {
        reader: Some(reader),
        pool: &context.readers.0,
    })
}

fn read_error(e: rusqlite::Error) -> ApiError {
    log::error!("database read: {e}");
    ApiError::new(500, "database error")
}

/// Peers as JSON, without those a changed allow-list no longer names.
fn peers_json(context: &Context, rows: Vec<PeerRow>, now: i64) -> Vec<String> {
    let allowed = context.allowed();
    rows.into_iter()
        .filter(|row| {
            allowed
                .as_ref()
                .is_none_or(|allowed| allowed.contains(&row.node))
        })
        .map(|row| api::peer_json(&row.record, row.last_seen, now, context.ttl))
        .collect()
}

fn find(context: &Context, hash: &str) -> Result<String, ApiError> {
    let hash = Hash::parse(hash).map_err(ApiError::bad_request)?;
    let now = unix_now();
    let reader = reader(context)?;
    // A random place among the peers, so that a path many hold does not
    // send everyone to the same few.
    static LOOKUPS: AtomicU64 = AtomicU64::new(0);
    let max_id = reader.max_peer_id().map_err(read_error)?;
    let random = std::collections::hash_map::RandomState::new()
        .hash_one(LOOKUPS.fetch_add(1, Ordering::Relaxed));
    let start = i64::try_from(random % (max_id.max(0) as u64 + 1)).unwrap_or(0);
    let rows = reader
        .find(&hash, now, context.ttl, MAX_PROVIDERS, start)
        .map_err(read_error)?;
    drop(reader);
    let providers = peers_json(context, rows, now);
    Ok(format!(
        "{{\"hash\":\"{hash}\",\"providers\":[{}]}}",
        providers.join(",")
    ))
}

fn peers(context: &Context) -> Result<String, ApiError> {
    let now = unix_now();
    let reader = reader(context)?;
    let rows = reader
        .peers(now, context.ttl, MAX_LISTED_PEERS)
        .map_err(read_error)?;
    let (total, _) = reader.counts(now, context.ttl).map_err(read_error)?;
    drop(reader);
    let peers = peers_json(context, rows, now);
    Ok(format!(
        "{{\"peers\":[{}],\"total\":{total}}}",
        peers.join(",")
    ))
}

fn peer(context: &Context, node: &str) -> Result<String, ApiError> {
    let node = NodeId::parse(node).map_err(|e| ApiError::bad_request(format!("node id: {e}")))?;
    let now = unix_now();
    let row = reader(context)?
        .peer(&node, now, context.ttl)
        .map_err(read_error)?;
    let not_found = || ApiError::new(404, format!("node {node} is not registered"));
    let row = row.ok_or_else(not_found)?;
    peers_json(context, vec![row], now)
        .pop()
        .ok_or_else(not_found)
}

fn health(context: &Context) -> Result<String, ApiError> {
    let now = unix_now();
    let (peers, hashes) = reader(context)?
        .counts(now, context.ttl)
        .map_err(read_error)?;
    Ok(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": context.started.elapsed().as_secs(),
        "peers": peers,
        "hashes": hashes,
        "peer_ttl": context.ttl,
        "allow_list": context.allowed().map(|nodes| nodes.len()),
        "write_queue": context.writes.len(),
    })
    .to_string())
}
