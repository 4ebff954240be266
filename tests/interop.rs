//! Interoperability with the original Python peerix (sophronesis/peerix
//! v0.0.4.3, LAN mode), both ways, with real nix, real nix-daemons and real
//! broadcast between network namespaces.
//!
//! The original is played by [`FakeOriginal`], run by the test itself in its
//! own namespace of the test LAN and written from the facts recorded in
//! /work/shared/reference/ORIGINAL-PEERIX.md (its wire formats are encoded
//! here by hand, so a drift in peerix-rs shows up as a failure):
//! - UDP on 12304 (the HTTP port too): a request is `[0][id u32 BE][hash]`,
//!   an answer `[1][id][http port u32 BE]["local/<hash>.narinfo"]`, sent
//!   unicast to the asker; packets from its own address are ignored; as a
//!   client it takes the first answer.
//! - `GET /local/<hash>.narinfo` answers nix-serve's fields (no CA, no
//!   `References` line when there are none) with
//!   `URL: local/nar/<base64 of the store path, '/' as '_'>.nar`: relative
//!   to its server root.
//! - `GET /local/nar/<name>` streams the NAR with no Content-Length (chunked
//!   to HTTP/1.1 clients, as hypercorn does, or delimited by the end of the
//!   connection), `text/plain`, and ignores Range: always 200, whole NAR.
//! - As a client, after an answer from P for H it GETs
//!   `http://P:port/local/H.narinfo`, then the NAR at `http://P:port/<URL>`:
//!   from P's root, so for peerix-rs `/nar/<hash>-<narhash>.nar`.
//!
//! What the tests prove:
//! - original → peerix-rs: nix on a peerix-rs host realises a closure only
//!   the original holds (including a 50 MiB NAR, streamed chunked), and
//!   `nix store verify` passes trusting the upstream key alone; a NAR framed
//!   by the end of the connection works as well.
//! - A holder that dies mid-stream is resumed from the original, which
//!   ignores the Range and sends the whole NAR again.
//! - peerix-rs → original: the original's client gets every path of a shared
//!   closure from a peerix-rs host by broadcast, `/local/<hash>.narinfo` and
//!   the root `/nar/...` route, bytes matching NarHash and NarSize; a path
//!   the host keeps private gets no answer and 404s.

mod common;

use common::http::{self, Response};
use common::lan::*;
use common::*;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

// ---------------------------------------------------------------------------
// The test world (as in tests/lan.rs)
// ---------------------------------------------------------------------------

/// The closure of `path` is valid in `to`, byte for byte as in `from`, and
/// `nix store verify` passes in `to` trusting only the upstream key.
fn assert_same_closure(from: &Host, to: &LanHost, key: &KeyPair, path: &str) {
    let closure = from.nix.closure(&from.store(), path);
    for p in &closure {
        assert!(
            to.host.is_valid(p),
            "expected {p} to be valid in {} after the fetch",
            to.name()
        );
        assert!(
            from.dump(p) == to.host.dump(p),
            "expected {p} in {} to be byte-identical to the one in {}",
            to.name(),
            from.name
        );
    }
    let verify = to.verify(&[&key.public], &[path]);
    assert_success(
        &format!(
            "nix store verify -r {path} in {} trusting only {UPSTREAM}",
            to.name()
        ),
        &verify,
    );
}

fn counter(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------
// The original's formats
// ---------------------------------------------------------------------------

/// Standard base64 (RFC 4648 alphabet, `=` padding).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The original's NAR file name for a store path: its base64, `/` as `_`.
fn original_nar_name(store_path: &str) -> String {
    format!("{}.nar", base64(store_path.as_bytes()).replace('/', "_"))
}

/// The narinfo the original serves under `/local/` for `info`: nix-serve's
/// fields as its parser keeps them (no CA; no References line when empty),
/// the URL rewritten to `local/nar/<name>`. The upstream signature is kept:
/// the URL is not part of the signed fingerprint.
fn original_narinfo(info: &PathInfo) -> String {
    let mut lines = vec![
        format!("StorePath: {}", info.path),
        format!("URL: local/nar/{}", original_nar_name(&info.path)),
        "Compression: none".to_string(),
        format!("NarHash: {}", info.nar_hash),
        format!("NarSize: {}", info.nar_size),
    ];
    if !info.references.is_empty() {
        let refs: Vec<&str> = info.references.iter().map(|r| base_name(r)).collect();
        lines.push(format!("References: {}", refs.join(" ")));
    }
    if let Some(deriver) = &info.deriver {
        lines.push(format!("Deriver: {}", base_name(deriver)));
    }
    for sig in &info.signatures {
        lines.push(format!("Sig: {sig}"));
    }
    lines.push(String::new());
    lines.join("\n")
}

#[test]
fn the_original_nar_names_are_base64_with_underscores() {
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"foob"), "Zm9vYg==");
    assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    // The example the original's URL form is documented with in peerix-rs.
    assert_eq!(
        original_nar_name("/nix/store/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-hello"),
        "L25peC9zdG9yZS8wYzRrendxN3F4ZGthejJ6ZDZpYnBjcmw1ZGw4Ym0xZC1oZWxsbw==.nar"
    );
    // "???" is "Pz8/" in base64.
    assert_eq!(original_nar_name("???"), "Pz8_.nar");
}

// ---------------------------------------------------------------------------
// The fake original
// ---------------------------------------------------------------------------

/// One store path the original holds.
#[derive(Clone)]
struct OriginalItem {
    hash: String,
    narinfo: String,
    /// The NAR's name under `/local/nar/`.
    nar_name: String,
    nar: Arc<Vec<u8>>,
}

impl OriginalItem {
    /// `path` as it is in `source`'s store (path info from `nix path-info`,
    /// NAR from `nix-store --dump`).
    fn from_store(source: &Host, path: &str) -> OriginalItem {
        let info = source
            .path_infos(&[path], false)
            .pop()
            .unwrap_or_else(|| panic!("path info of {path} in {}", source.name));
        OriginalItem {
            hash: hash_part(path).to_string(),
            narinfo: original_narinfo(&info),
            nar_name: original_nar_name(path),
            nar: Arc::new(source.dump(path)),
        }
    }

    /// Every path in the closure of `path` in `source`.
    fn closure(source: &Host, path: &str) -> Vec<OriginalItem> {
        source
            .nix
            .closure(&source.store(), path)
            .iter()
            .map(|p| OriginalItem::from_store(source, p))
            .collect()
    }
}

/// How the original delimits a NAR body (never by Content-Length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// As hypercorn (h11) streams a response of unknown length: chunked to
    /// an HTTP/1.1 client, to the end of the connection for HTTP/1.0.
    Hypercorn,
    /// Always to the end of the connection.
    CloseDelimited,
}

/// What the fake original has seen and done.
#[derive(Default, Debug)]
struct OriginalStats {
    udp_requests: AtomicU64,
    udp_replies_sent: AtomicU64,
    /// Answers to this original's own queries (first or not).
    udp_answers: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
    /// Requests after the first on a kept-alive connection.
    reused: AtomicU64,
    narinfo_hits: AtomicU64,
    narinfo_misses: AtomicU64,
    nar_requests: AtomicU64,
    nars_chunked: AtomicU64,
    nars_close_delimited: AtomicU64,
    /// NAR requests that carried a Range header (answered 200, whole NAR).
    range_requests: AtomicU64,
    /// NAR responses whose last byte was written.
    nars_completed: AtomicU64,
    /// Every request line, with its Range header if any.
    log: Mutex<Vec<String>>,
    /// Request lines no route of the original answers.
    unrouted: Mutex<Vec<String>>,
}

impl OriginalStats {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn unrouted(&self) -> Vec<String> {
        self.unrouted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// An answer to one of the original's queries.
#[derive(Clone, Debug)]
struct Answer {
    from: SocketAddr,
    port: u32,
    url: String,
}

/// A NAR the original's client fetched, with what it fetched it by.
struct Fetched {
    answer: Answer,
    narinfo: NarInfoText,
    /// The request path the NAR came from.
    nar_request: String,
    nar: Response,
}

/// The original peerix in LAN mode, in host `i`'s namespace: UDP and HTTP on
/// 12304, holding `items`, and a client that asks the LAN as it does.
/// Stopped (threads joined, connections shut) on drop.
struct FakeOriginal {
    stats: Arc<OriginalStats>,
    ip: Ipv4Addr,
    ns: String,
    /// The UDP socket (a clone), for the client's queries: they leave from
    /// port 12304, as the original's do.
    udp: UdpSocket,
    next_id: AtomicU32,
    /// Queries in flight: the first answer to each, once there is one.
    answers: Arc<Mutex<HashMap<u32, Option<Answer>>>>,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    threads: Vec<JoinHandle<()>>,
}

/// How fast the fake's loops notice a stop.
const TICK: Duration = Duration::from_millis(50);
/// Upper bound on any wait of the fake's connections.
const IO_LIMIT: Duration = Duration::from_secs(30);
/// Hypercorn's keep-alive timeout: an idle connection is closed after it.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Requests served on one connection at most (a bound on the loop).
const MAX_REQUESTS_PER_CONNECTION: u32 = 1000;
/// How long the original's client waits for an answer here. The original
/// waits 500 ms; peers on a loaded test machine get more (it still takes the
/// first answer, as soon as it comes).
const QUERY_WAIT: Duration = Duration::from_secs(10);
/// Sizes of the chunks a NAR is written in, in turn: a stream from
/// `nix dump-path` comes in pieces of any size.
const CHUNK_SIZES: [usize; 6] = [1, 65536, 7, 4096, 65536 - 13, 131072];

impl FakeOriginal {
    fn start(lan: &Lan, i: usize, items: Vec<OriginalItem>, framing: Framing) -> FakeOriginal {
        let ns = lan.ns(i).to_string();
        let ip = lan_ip(i);
        let items: Arc<HashMap<String, OriginalItem>> =
            Arc::new(items.into_iter().map(|i| (i.hash.clone(), i)).collect());
        let (udp, listener) = in_netns(&ns, || {
            io::Result::Ok((lan_udp_socket()?, tcp_listener(LAN_PORT, 64)?))
        })
        .unwrap_or_else(|e| panic!("binding the fake original's sockets in {ns}: {e}"));
        udp.set_read_timeout(Some(TICK))
            .expect("read timeout on the original's UDP socket");
        listener
            .set_nonblocking(true)
            .expect("nonblocking original listener");
        let mut original = FakeOriginal {
            stats: Arc::new(OriginalStats::default()),
            ip,
            ns,
            udp: udp.try_clone().expect("cloning the original's UDP socket"),
            next_id: AtomicU32::new(1),
            answers: Arc::new(Mutex::new(HashMap::new())),
            stop: Arc::new(AtomicBool::new(false)),
            connections: Arc::new(Mutex::new(Vec::new())),
            threads: Vec::new(),
        };
        {
            let (stop, stats, items, answers) = (
                original.stop.clone(),
                original.stats.clone(),
                items.clone(),
                original.answers.clone(),
            );
            original.threads.push(thread::spawn(move || {
                original_udp(&udp, ip, &stop, &stats, &items, &answers)
            }));
        }
        {
            let (stop, stats, conns) = (
                original.stop.clone(),
                original.stats.clone(),
                original.connections.clone(),
            );
            original.threads.push(thread::spawn(move || {
                original_accept(&listener, &stop, &stats, &conns, &items, framing)
            }));
        }
        original
    }

    fn addr(&self) -> String {
        format!("{}:{LAN_PORT}", self.ip)
    }

    /// Broadcast a query for `hash`, as the original does (from port
    /// 12304 to the LAN's broadcast address); returns its id.
    fn send_query(&self, hash: &str) -> u32 {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, None);
        self.udp
            .send_to(&request_packet(id, hash), (BROADCAST, LAN_PORT))
            .unwrap_or_else(|e| panic!("the original broadcasting a query for {hash}: {e}"));
        id
    }

    /// The first answer to query `id` so far, if any.
    fn answer(&self, id: u32) -> Option<Answer> {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .flatten()
    }

    /// The first answer to query `id`, waiting up to `wait` for it.
    fn wait_answer(&self, id: u32, wait: Duration) -> Option<Answer> {
        let step = Duration::from_millis(20);
        for _ in 0..=(wait.as_millis() / step.as_millis()) {
            if let Some(answer) = self.answer(id) {
                return Some(answer);
            }
            thread::sleep(step);
        }
        None
    }

    /// GET `path` from `peer` as the original's HTTP client (httpx) would,
    /// from this namespace. (It sends `Connection: close`, where httpx keeps
    /// the connection; one request per connection changes nothing here.)
    fn get(&self, peer: SocketAddr, path: &str) -> io::Result<Response> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {peer}\r\nAccept: */*\r\n\
             Accept-Encoding: gzip, deflate\r\nConnection: close\r\n\
             User-Agent: python-httpx/0.27.0\r\n\r\n"
        );
        in_netns(&self.ns, move || http::raw(peer, request.as_bytes(), false))
    }

    /// Fetch `hash` as the original's client does: broadcast, take the first
    /// answer, GET the narinfo it names, then the NAR at `/<URL>` on the same
    /// peer (its root). `Err` says where it stopped.
    fn fetch(&self, hash: &str) -> Result<Fetched, String> {
        let id = self.send_query(hash);
        let answer = self
            .wait_answer(id, QUERY_WAIT)
            .ok_or_else(|| format!("no answer to the query for {hash} within {QUERY_WAIT:?}"))?;
        let port = u16::try_from(answer.port)
            .map_err(|_| format!("answer {answer:?}: port out of range"))?;
        let peer = SocketAddr::from((answer.from.ip(), port));
        let narinfo_request = format!("/{}", answer.url);
        let response = self
            .get(peer, &narinfo_request)
            .map_err(|e| format!("GET {narinfo_request} on {peer}: {e}"))?;
        if response.status != 200 {
            return Err(format!(
                "GET {narinfo_request} on {peer}: {}",
                response.describe()
            ));
        }
        let narinfo = NarInfoText::read(&response.text());
        let nar_request = format!("/{}", narinfo.field("URL"));
        let nar = self
            .get(peer, &nar_request)
            .map_err(|e| format!("GET {nar_request} on {peer}: {e}"))?;
        if nar.status != 200 {
            return Err(format!("GET {nar_request} on {peer}: {}", nar.describe()));
        }
        Ok(Fetched {
            answer,
            narinfo,
            nar_request,
            nar,
        })
    }
}

impl Drop for FakeOriginal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for stream in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
        if thread::panicking() {
            eprintln!(
                "--- fake original {}: {:?}\nrequests: {:#?}",
                self.addr(),
                self.stats,
                self.stats.log()
            );
        }
    }
}

/// The original's UDP side: answers requests for its items, files answers
/// to its own queries (the first one per query), ignores its own packets.
fn original_udp(
    socket: &UdpSocket,
    own: Ipv4Addr,
    stop: &AtomicBool,
    stats: &OriginalStats,
    items: &HashMap<String, OriginalItem>,
    answers: &Mutex<HashMap<u32, Option<Answer>>>,
) {
    let mut buf = [0u8; 65535];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue; // timeout: check the stop flag
        };
        if from.ip() == own || n < 5 {
            continue;
        }
        let packet = &buf[..n];
        let id = u32::from_be_bytes([packet[1], packet[2], packet[3], packet[4]]);
        match packet[0] {
            0 => {
                stats.udp_requests.fetch_add(1, Ordering::SeqCst);
                let Ok(hash) = std::str::from_utf8(&packet[5..]) else {
                    continue;
                };
                if items.contains_key(hash) {
                    let reply = response_packet(id, u32::from(LAN_PORT), hash);
                    if socket.send_to(&reply, from).is_ok() {
                        stats.udp_replies_sent.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            1 if n >= 9 => {
                stats.udp_answers.fetch_add(1, Ordering::SeqCst);
                let port = u32::from_be_bytes([packet[5], packet[6], packet[7], packet[8]]);
                let url = String::from_utf8_lossy(&packet[9..]).into_owned();
                let mut answers = answers.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot @ None) = answers.get_mut(&id) {
                    *slot = Some(Answer { from, port, url });
                }
            }
            _ => {}
        }
    }
}

fn original_accept(
    listener: &TcpListener,
    stop: &Arc<AtomicBool>,
    stats: &Arc<OriginalStats>,
    connections: &Arc<Mutex<Vec<TcpStream>>>,
    items: &Arc<HashMap<String, OriginalItem>>,
    framing: Framing,
) {
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(TICK / 5);
                continue;
            }
            Err(_) => continue,
        };
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(TICK));
        let _ = stream.set_write_timeout(Some(IO_LIMIT));
        if let Ok(clone) = stream.try_clone() {
            connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(clone);
        }
        let (stop, stats, items) = (stop.clone(), stats.clone(), items.clone());
        handlers.push(thread::spawn(move || {
            let closer = stream.try_clone();
            let _ = original_connection(stream, &stop, &stats, &items, framing);
            // The registry holds a clone: dropping ours would not close it.
            if let Ok(closer) = closer {
                let _ = closer.shutdown(Shutdown::Both);
            }
        }));
    }
    for handler in handlers {
        let _ = handler.join();
    }
}

/// The next request head on a connection (bytes after it stay in `pending`),
/// or `None` when the client left, went idle for `idle`, or we stop.
fn next_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    stop: &AtomicBool,
    idle: Duration,
) -> Option<String> {
    let mut buf = [0u8; 4096];
    for _ in 0..=(idle.as_millis() / TICK.as_millis()) {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            return Some(head);
        }
        if stop.load(Ordering::SeqCst) || pending.len() > 64 * 1024 {
            return None;
        }
        match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
            }
            Err(_) => return None,
        }
    }
    None
}

/// Serve requests on one connection, kept alive as hypercorn keeps it.
fn original_connection(
    mut stream: TcpStream,
    stop: &AtomicBool,
    stats: &OriginalStats,
    items: &HashMap<String, OriginalItem>,
    framing: Framing,
) -> io::Result<()> {
    let mut pending = Vec::new();
    for n in 0..MAX_REQUESTS_PER_CONNECTION {
        let idle = if n == 0 { IO_LIMIT } else { KEEP_ALIVE };
        let Some(head) = next_head(&mut stream, &mut pending, stop, idle) else {
            return Ok(());
        };
        stats.requests.fetch_add(1, Ordering::SeqCst);
        if n > 0 {
            stats.reused.fetch_add(1, Ordering::SeqCst);
        }
        let keep = original_request(&mut stream, &head, stats, items, framing)?;
        if !keep {
            return stream.shutdown(Shutdown::Both);
        }
    }
    Ok(())
}

/// Answer one request as the original's routes do; returns whether the
/// connection may serve another.
fn original_request(
    stream: &mut TcpStream,
    head: &str,
    stats: &OriginalStats,
    items: &HashMap<String, OriginalItem>,
    framing: Framing,
) -> io::Result<bool> {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let target = parts.next().unwrap_or("");
    let version = parts.next().unwrap_or("");
    let http11 = version == "HTTP/1.1";
    let client_keeps = match header("connection").map(str::to_ascii_lowercase) {
        Some(c) if c.contains("close") => false,
        Some(c) if c.contains("keep-alive") => true,
        _ => http11,
    };
    let range = header("range").map(str::to_string);
    stats
        .log
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(match &range {
            Some(r) => format!("{request_line} [Range: {r}]"),
            None => request_line.clone(),
        });
    let path = target.split('?').next().unwrap_or("");
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        fixed(
            stream,
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            b"Method Not Allowed",
            false,
        )?;
        return Ok(client_keeps);
    }

    if path == "/nix-cache-info" {
        let body = b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 5\n";
        fixed(
            stream,
            "200 OK",
            "text/plain; charset=utf-8",
            body,
            head_only,
        )?;
        return Ok(client_keeps);
    }
    if let Some(hash) = path
        .strip_prefix("/local/")
        .and_then(|p| p.strip_suffix(".narinfo"))
        .filter(|h| !h.contains('/'))
    {
        return match items.get(hash) {
            Some(item) => {
                stats.narinfo_hits.fetch_add(1, Ordering::SeqCst);
                fixed(
                    stream,
                    "200 OK",
                    "text/x-nix-narinfo",
                    item.narinfo.as_bytes(),
                    head_only,
                )?;
                Ok(client_keeps)
            }
            None => {
                stats.narinfo_misses.fetch_add(1, Ordering::SeqCst);
                fixed(
                    stream,
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    b"Not found",
                    head_only,
                )?;
                Ok(client_keeps)
            }
        };
    }
    if let Some(name) = path
        .strip_prefix("/local/nar/")
        .filter(|n| !n.contains('/'))
    {
        let Some(item) = items.values().find(|i| i.nar_name == name) else {
            fixed(
                stream,
                "404 Not Found",
                "text/plain; charset=utf-8",
                b"Gone",
                head_only,
            )?;
            return Ok(client_keeps);
        };
        stats.nar_requests.fetch_add(1, Ordering::SeqCst);
        if range.is_some() {
            // The original never looks at Range: 200 and the whole NAR.
            stats.range_requests.fetch_add(1, Ordering::SeqCst);
        }
        let chunked = framing == Framing::Hypercorn && http11;
        let framing_header = if chunked {
            stats.nars_chunked.fetch_add(1, Ordering::SeqCst);
            "transfer-encoding: chunked\r\n"
        } else {
            stats.nars_close_delimited.fetch_add(1, Ordering::SeqCst);
            "connection: close\r\n"
        };
        let text = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain; charset=utf-8\r\nserver: hypercorn-h11\r\n{framing_header}\r\n"
        );
        stream.write_all(text.as_bytes())?;
        if head_only {
            if chunked {
                stream.write_all(b"0\r\n\r\n")?;
            }
            stream.flush()?;
            return Ok(chunked && client_keeps);
        }
        let mut rest = &item.nar[..];
        for size in CHUNK_SIZES.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (chunk, tail) = rest.split_at((*size).min(rest.len()));
            if chunked {
                stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
                stream.write_all(chunk)?;
                stream.write_all(b"\r\n")?;
            } else {
                stream.write_all(chunk)?;
            }
            rest = tail;
        }
        stats.nars_completed.fetch_add(1, Ordering::SeqCst);
        if chunked {
            stream.write_all(b"0\r\n\r\n")?;
        }
        stream.flush()?;
        return Ok(chunked && client_keeps);
    }
    stats
        .unrouted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(request_line.clone());
    fixed(
        stream,
        "404 Not Found",
        "text/plain; charset=utf-8",
        b"Not Found",
        head_only,
    )?;
    Ok(client_keeps)
}

/// A response with a body of known length (as Starlette's `Response`).
fn fixed(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &[u8],
    head_only: bool,
) -> io::Result<()> {
    let text = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: {content_type}\r\nserver: hypercorn-h11\r\n\r\n",
        body.len()
    );
    stream.write_all(text.as_bytes())?;
    if !head_only {
        stream.write_all(body)?;
    }
    stream.flush()
}

// ---------------------------------------------------------------------------
// Checks of what the original's client got
// ---------------------------------------------------------------------------

/// `sha256:<nix32>` of `bytes`, converted by nix itself from hex.
fn nar_hash_of(nix: &NixEnv, bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let nix32 = nix.stdout("nix", &["hash", "to-base32", "--type", "sha256", &hex]);
    format!("sha256:{nix32}")
}

/// What `peer`'s peerix answered the original's client for `info` is right:
/// the UDP answer in the original's format, a narinfo describing the path
/// with the upstream signature, and a NAR of NarSize bytes hashing to
/// NarHash, equal to the peer's own `nix-store --dump`.
fn assert_fetched(nix: &NixEnv, fetched: &Fetched, info: &PathInfo, peer: &LanHost) {
    let what = format!("the original's fetch of {} from {}", info.path, peer.name());
    let hash = info.hash_part();
    assert_eq!(
        (
            fetched.answer.from,
            fetched.answer.port,
            fetched.answer.url.as_str()
        ),
        (
            SocketAddr::from((peer.ip, LAN_PORT)),
            u32::from(LAN_PORT),
            format!("local/{hash}.narinfo").as_str()
        ),
        "{what}: expected the UDP answer from {}:12304 naming port 12304 and local/<hash>.narinfo",
        peer.ip
    );
    fetched.narinfo.assert_describes(info, &what);
    assert!(
        fetched.narinfo.sigs.iter().any(|s| s.starts_with(UPSTREAM)),
        "{what}: expected the upstream signature in the narinfo, got {:?}",
        fetched.narinfo.sigs
    );
    let body = &fetched.nar.body;
    assert_eq!(
        fetched.nar.header("content-encoding").unwrap_or("identity"),
        "identity",
        "{what}: the NAR came encoded: {:?}",
        fetched.nar.headers
    );
    assert_eq!(
        body.len() as u64,
        info.nar_size,
        "{what}: GET {} gave {} bytes, NarSize says {}",
        fetched.nar_request,
        body.len(),
        info.nar_size
    );
    let got = nar_hash_of(nix, body);
    assert_eq!(
        got,
        fetched.narinfo.field("NarHash"),
        "{what}: the bytes from GET {} hash to {got}, the narinfo says otherwise",
        fetched.nar_request
    );
    assert!(
        *body == peer.host.dump(&info.path),
        "{what}: the NAR differs from the peer's own nix-store --dump"
    );
}

// ---------------------------------------------------------------------------
// original → peerix-rs
// ---------------------------------------------------------------------------

/// Only the original (O) holds the realistic closure (six paths, one with a
/// 50 MiB file, one content-addressed, one a single file, one a symlink).
/// Nix on B realises it through B's peerix: every narinfo is O's (URL in the
/// base64 form, relative to O's root), every NAR streamed chunked without a
/// Content-Length. The closure is byte-identical to the source's and
/// `nix store verify` passes trusting the upstream key alone.
#[test]
fn a_closure_only_the_original_holds_is_realised_through_peerix_rs() {
    let fx = realistic_fixture();
    let (dir, lan, up) = world("interop_from_orig", 2);
    let src = source_store(&dir, &up, &[&fx.app]);
    let items = OriginalItem::closure(&src, &fx.app);
    let n = items.len() as u64;
    assert!(
        n >= 6,
        "expected the realistic closure to hold 6 paths, got {n}"
    );
    let o = FakeOriginal::start(&lan, 0, items, Framing::Hypercorn);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);

    substitute_ok(
        &b,
        &up,
        &fx.app,
        "nix-store -r in B of a closure only the original holds",
    );
    assert_same_closure(&src, &b, &up, &fx.app);

    let s = &o.stats;
    assert!(
        counter(&s.udp_replies_sent) >= n && counter(&s.narinfo_hits) >= n,
        "expected B to have found each of the {n} paths by UDP and O's /local narinfo: {s:?}"
    );
    assert!(
        counter(&s.nars_completed) >= n,
        "expected O to have sent all {n} NARs to the end: {s:?}\nrequests: {:#?}",
        s.log()
    );
    assert_eq!(
        counter(&s.nars_chunked),
        counter(&s.nar_requests),
        "expected every NAR request (peerix-rs speaks HTTP/1.1) to get a chunked body, \
         no Content-Length: {s:?}"
    );
    // Nothing to resume here, so no Range is expected; any that came was
    // answered 200 with the whole NAR, and the closure still verified.
    eprintln!(
        "O served {} NAR requests ({} with a Range, ignored), {} requests on reused connections",
        counter(&s.nar_requests),
        counter(&s.range_requests),
        counter(&s.reused)
    );
    assert!(
        s.unrouted().is_empty(),
        "expected peerix-rs to ask O only what the original serves, it also asked {:?}",
        s.unrouted()
    );
    let entry = b
        .peer_entry(&o.addr())
        .unwrap_or_else(|| panic!("expected O in B's /health peers: {}", b.health()["peers"]));
    assert!(
        entry["successes"].as_u64().unwrap_or(0) >= 1
            && entry["lies"].as_u64() == Some(0)
            && entry["available"] == true,
        "expected O recorded with successes, no lies, available: {entry}"
    );
}

/// The same with a NAR delimited by the end of the connection (no
/// Content-Length, no chunking): a small closure with references, derivers
/// and no References line for its first path.
#[test]
fn nars_delimited_by_the_end_of_the_connection_are_taken() {
    let many = many_fixture();
    let (dir, lan, up) = world("interop_close_delim", 2);
    let src = source_store(&dir, &up, &[&many.third]);
    let items = OriginalItem::closure(&src, &many.third);
    assert!(
        items.iter().any(|i| !i.narinfo.contains("\nReferences: ")),
        "expected a path without references (no References line) in the closure"
    );
    let n = items.len() as u64;
    let o = FakeOriginal::start(&lan, 0, items, Framing::CloseDelimited);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);

    substitute_ok(
        &b,
        &up,
        &many.third,
        "nix-store -r in B from an original that closes to end NARs",
    );
    assert_same_closure(&src, &b, &up, &many.third);
    let s = &o.stats;
    assert!(
        counter(&s.nars_close_delimited) >= n && counter(&s.nars_chunked) == 0,
        "expected all {n} NARs sent delimited by the close: {s:?}"
    );
}

/// D (a fake peerix with the better reputation) sends 8 MiB of the 50 MiB
/// NAR and closes. B's peerix resumes from the original with a Range
/// request; the original ignores it (200, the whole NAR, chunked), B skips
/// what it has, and nix's first attempt succeeds.
#[test]
fn a_nar_cut_short_elsewhere_is_resumed_from_the_original_which_ignores_range() {
    let fx = realistic_fixture();
    let (dir, lan, up) = world("interop_range", 3);
    let src = source_store(&dir, &up, &[&fx.big, &fx.busybox]);
    let o = FakeOriginal::start(
        &lan,
        0,
        vec![OriginalItem::from_store(&src, &fx.big)],
        Framing::Hypercorn,
    );
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let d = FakePeer::start(
        &lan,
        2,
        vec![
            FakeItem::from_store(&src, &fx.busybox, NarMode::Honest),
            FakeItem::from_store(&src, &fx.big, NarMode::CloseAfter(8 * 1024 * 1024)),
        ],
        TcpMode::Serve,
    );

    // D earns a reputation with a path only it has.
    substitute_ok(
        &b,
        &up,
        &fx.busybox,
        "the honest fetch from D that earns it a reputation",
    );
    substitute_ok(
        &b,
        &up,
        &fx.big,
        "nix-store -r in B while D dies mid-stream (first attempt)",
    );
    assert!(
        FakeStats::get(&d.stats.nars_cut) >= 1,
        "expected B to have started on D's NAR (D has the better reputation); D cut none: {:?}",
        d.stats
    );
    let s = &o.stats;
    assert!(
        counter(&s.range_requests) >= 1 && counter(&s.nars_chunked) >= 1,
        "expected B to have asked O for the rest with a Range (answered 200, whole, chunked): \
         {s:?}\nrequests: {:#?}",
        s.log()
    );
    assert_same_closure(&src, &b, &up, &fx.big);
}

/// The original's URLs grow with the store path's name: base64 of a path
/// with a 180-character name (nix allows 211) makes a 314-byte URL; a limit
/// of 256 bytes refused every name over 136 characters.
#[test]
fn a_path_with_a_long_name_comes_from_the_original() {
    let (dir, lan, up) = world("interop_long_name", 2);
    let src = Host::new(&dir, "src");
    let name = format!("peerix-interop-{}", "long-name-".repeat(18));
    let name = &name[..180];
    let file = dir.subdir("long").join(name);
    write_file(&file, "a store path with a long name\n");
    let store = src.store();
    let file_arg = file.display().to_string();
    let path = src.nix.stdout(
        "nix-store",
        &["--store", store.as_str(), "--add", file_arg.as_str()],
    );
    src.sign(&up, &[&path], false);
    let item = OriginalItem::from_store(&src, &path);
    let url_len = item
        .narinfo
        .lines()
        .find(|l| l.starts_with("URL: "))
        .map(|l| l.len() - 5);
    assert!(
        url_len > Some(256),
        "expected a URL over 256 bytes, got {url_len:?}"
    );
    let o = FakeOriginal::start(&lan, 0, vec![item], Framing::Hypercorn);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);

    substitute_ok(
        &b,
        &up,
        &path,
        "nix-store -r in B of a long-named path only the original holds",
    );
    assert_same_closure(&src, &b, &up, &path);
    assert!(counter(&o.stats.nars_completed) >= 1, "{:?}", o.stats);
}

// ---------------------------------------------------------------------------
// peerix-rs → original
// ---------------------------------------------------------------------------

/// A (a peerix-rs host, default `signed` share policy) holds the realistic
/// closure, signed, and many.second's closure where only many.first is
/// signed. The original's client gets every path of the realistic closure
/// from A: broadcast, first answer, `/local/<hash>.narinfo`, then the NAR
/// from A's root at `/<URL>`; each NAR has NarSize bytes and hashes to
/// NarHash. The unsigned many.second gets no UDP answer (while a query for
/// many.first sent after it does), and 404 on both A's narinfo and its root
/// NAR route.
#[test]
fn the_original_fetches_a_shared_closure_from_peerix_rs_and_not_a_private_path() {
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("interop_to_orig", 2);
    let mut a = LanHost::new(&dir, &lan, 0, "a", &[&fx.app, &many.second]);
    a.host.sign(&up, &[&fx.app], true);
    a.host.sign(&up, &[&many.first], false);
    a.start_peerix(&dir, &up, &[]);
    let o = FakeOriginal::start(&lan, 1, Vec::new(), Framing::Hypercorn);
    let nix = NixEnv::new(&dir.subdir("original-nix"));

    let infos = a.host.path_infos(&[&fx.app], true);
    assert!(infos.len() >= 6, "the realistic closure: {infos:?}");
    for info in &infos {
        let fetched = o
            .fetch(info.hash_part())
            .unwrap_or_else(|e| panic!("the original's fetch of {} from A: {e}", info.path));
        assert_eq!(
            fetched.nar_request,
            format!(
                "/nar/{}-{}.nar",
                info.hash_part(),
                info.nar_hash.trim_start_matches("sha256:")
            ),
            "expected A's narinfo URL nar/<hash>-<narhash>.nar, fetched from A's root"
        );
        assert_fetched(&nix, &fetched, info, &a);
    }

    // The private path: asked first, so its answer would come before the
    // shared path's.
    let private = a
        .host
        .path_infos(&[&many.second], false)
        .pop()
        .expect("path info of many.second");
    let private_id = o.send_query(private.hash_part());
    let shared_id = o.send_query(hash_part(&many.first));
    let shared = o.wait_answer(shared_id, QUERY_WAIT);
    assert!(
        shared.is_some(),
        "expected A to answer the query for its signed path {}: {:?}",
        many.first,
        o.stats
    );
    thread::sleep(Duration::from_millis(500));
    assert!(
        o.answer(private_id).is_none(),
        "expected no answer to the query for A's unsigned path {}, got {:?}",
        many.second,
        o.answer(private_id)
    );
    let a_addr = SocketAddr::from((a.ip, LAN_PORT));
    for request in [
        format!("/local/{}.narinfo", private.hash_part()),
        format!(
            "/nar/{}-{}.nar",
            private.hash_part(),
            private.nar_hash.trim_start_matches("sha256:")
        ),
    ] {
        let response = o
            .get(a_addr, &request)
            .unwrap_or_else(|e| panic!("GET {request} on A from the original: {e}"));
        assert_eq!(
            response.status,
            404,
            "GET {request} (A's unsigned path) from the original: expected 404, got {}",
            response.describe()
        );
    }
    // Replies for the closure, and for many.first.
    assert!(
        a.lan_counter("replies_sent") > infos.len() as u64,
        "expected A to count its replies: {}",
        a.health()
    );
}
