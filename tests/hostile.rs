//! Hostile clients and peers against a real peerix.
//!
//! Each test attacks one peerix the way a host on the LAN could: from a
//! network namespace of its own (a client of `/local/`), or as a LAN peer
//! that lies, trickles or hangs. Meanwhile a loopback prober plays this
//! host's own nix: a thread that keeps asking the attacked peerix for
//! `/nix-cache-info` and a narinfo (or a NAR) of a local path, each request
//! bounded by a generous timeout. The design promise under test is that the
//! host's own nix always has capacity, so the tests assert that the prober
//! is answered WHILE the attack is in effect (checked before and after the
//! answers), that every one of its requests is answered, and that peerix is
//! alive and has not panicked at the end. Liveness only, never speed: the
//! timeouts are bounds for a stuck daemon, not measurements.
//!
//! The numbers in the test names are those of the findings:
//! 1. a huge `Content-Length` without a body;
//! 2. requests whose announced body never comes (also `Expect: 100-continue`);
//! 3. a flood of idle connections under `--nofile 1024`;
//! 4. one endless header line (memory);
//! 5. DNS rebinding: a foreign `Host` on the loopback-only endpoints;
//! 6. slow readers of a large NAR;
//! 7. a peer that ignores Range and trickles while a resume skips ahead;
//! 8. peers trickling just above the rate floor;
//! 9. a liar rotating the HTTP port of its UDP replies (ban by host);
//! 10. a hanging peer rotating its port (backoff by host);
//! 12. an `HTTP/2.0` request line.
//!
//! A letter after the number marks a test of a rule next to that finding:
//! 3b. descriptors really exhausted: the accept loop survives `EMFILE`;
//! 10b. three hanging peers share one lookup deadline.

mod common;

use common::http;
use common::lan::*;
use common::*;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// The longest one loopback request may take before it counts as not
/// answered: far beyond what a daemon with capacity for its own host needs.
const PROBE_TIMEOUT: Duration = Duration::from_secs(12);
/// Pause between two probes.
const PROBE_PAUSE: Duration = Duration::from_millis(100);
/// Upper bound on the number of probes of one prober.
const PROBE_LIMIT: u32 = 5000;
/// How long the liveness check waits for the prober's answers at most. A
/// stuck daemon shows up earlier, as a probe that timed out.
const LIVENESS_BOUND: Duration = Duration::from_secs(40);
/// Answers the prober must get while the attack is in effect.
const ANSWERS_DURING: u64 = 2;

// ---------------------------------------------------------------------------
// Threads in a namespace
// ---------------------------------------------------------------------------

/// Moves the calling thread into network namespace `ns`, for good.
fn enter_netns(ns: &str) {
    let path = format!("/run/netns/{ns}");
    let file =
        fs::File::open(&path).unwrap_or_else(|e| panic!("opening {path} to enter netns {ns}: {e}"));
    rustix::thread::move_into_link_name_space(
        file.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .unwrap_or_else(|e| panic!("entering netns {ns}: {e}"));
}

/// A named thread that first enters `ns` (if given), then runs `f`.
fn spawn_in<T: Send + 'static>(
    ns: Option<String>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            if let Some(ns) = ns {
                enter_netns(&ns);
            }
            f()
        })
        .expect("spawning a test thread")
}

/// Sleep `total` in small steps; returns false as soon as `stop` is set.
fn sleep_unless(stop: &AtomicBool, total: Duration) -> bool {
    let step = Duration::from_millis(20);
    let mut left = total;
    while !left.is_zero() {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = left.min(step);
        thread::sleep(now);
        left -= now;
    }
    !stop.load(Ordering::SeqCst)
}

// ---------------------------------------------------------------------------
// Raw connections
// ---------------------------------------------------------------------------

/// How reading an answer ended.
#[derive(Debug)]
enum Ended {
    /// The server closed the connection (EOF).
    Closed,
    /// A read failed (e.g. reset by the server).
    Failed(io::ErrorKind),
    /// The bound ran out with the connection still open.
    StillOpen,
    /// The answer's head was complete and `stop_at_head` said to stop.
    Head,
}

/// Reads from `stream` until EOF, an error, `bound`, or (if
/// `stop_at_head`) a complete response head. Returns what came and how it
/// ended.
fn read_reply(stream: &mut TcpStream, bound: Duration, stop_at_head: bool) -> (Vec<u8>, Ended) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
    let deadline = Instant::now() + bound;
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stop_at_head && data.windows(4).any(|w| w == b"\r\n\r\n") {
            return (data, Ended::Head);
        }
        if Instant::now() > deadline {
            return (data, Ended::StillOpen);
        }
        match stream.read(&mut buf) {
            Ok(0) => return (data, Ended::Closed),
            Ok(n) => {
                if data.len() < 1024 * 1024 {
                    data.extend_from_slice(&buf[..n]);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (data, Ended::Failed(e.kind())),
        }
    }
}

/// The status code of a response head at the start of `data`, if any.
fn status_of(data: &[u8]) -> Option<u16> {
    let end = data.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&data[..end]).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// The first line of `data`, for messages.
fn first_line(data: &[u8]) -> String {
    let end = data
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(data.len().min(120));
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// Connections of namespace `ns` to `target` that are ESTABLISHED there,
/// by `ss`: the attacker's view of which of its connections the server
/// still holds open (one the server closed is in CLOSE-WAIT or gone).
fn established(ns: &str, target: SocketAddr) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htn", "state", "established"])
        .arg("dst")
        .arg(target.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("running ss in a namespace (install iproute2)");
    assert!(
        out.status.success(),
        "ss in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

/// Connections of `ns` to `target` holding unread bytes (Recv-Q > 0).
fn holding_unread(ns: &str, target: SocketAddr) -> usize {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "ss", "-Htn", "state", "established"])
        .arg("dst")
        .arg(target.to_string())
        .stdin(Stdio::null())
        .output()
        .expect("running ss in a namespace");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|q| q.parse::<u64>().ok())
                .is_some_and(|q| q > 0)
        })
        .count()
}

/// GET `path` on `addr` from the calling thread's namespace, one
/// connection, `Connection: close`, with `host` as Host; the whole exchange
/// is bounded by `bound`.
fn get_once(
    addr: SocketAddr,
    host: &str,
    path: &str,
    bound: Duration,
) -> Result<http::Response, String> {
    let mut stream =
        TcpStream::connect_timeout(&addr, bound).map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = stream.set_write_timeout(Some(bound));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending GET {path}: {e}"))?;
    let (data, ended) = read_reply(&mut stream, bound, false);
    match ended {
        Ended::Closed => {}
        Ended::StillOpen => {
            return Err(format!(
                "GET {path}: no complete answer within {} s (got {} bytes: {:?})",
                bound.as_secs(),
                data.len(),
                first_line(&data)
            ));
        }
        Ended::Failed(kind) if data.is_empty() => {
            return Err(format!(
                "GET {path}: read failed ({kind:?}) before any answer"
            ));
        }
        Ended::Failed(_) | Ended::Head => {}
    }
    if data.is_empty() {
        return Err(format!("GET {path}: connection closed without an answer"));
    }
    http::parse(&data, false)
        .map_err(|e| format!("GET {path}: bad answer ({e}): {:?}", first_line(&data)))
}

// ---------------------------------------------------------------------------
// The loopback prober: this host's own nix
// ---------------------------------------------------------------------------

#[derive(Default)]
struct ProbeStats {
    answered: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// A thread that keeps GETting `paths` (in turn) from peerix on
/// `127.0.0.1:port` in namespace `ns` (this machine's own if `None`), as
/// the host's nix would, until stopped. Every request must be answered 200
/// within [`PROBE_TIMEOUT`].
struct Prober {
    stats: Arc<ProbeStats>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    what: String,
}

impl Prober {
    fn start(ns: Option<&str>, port: u16, paths: &[String]) -> Prober {
        let stats = Arc::new(ProbeStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let paths = paths.to_vec();
        let what = format!("loopback GETs of {paths:?} on 127.0.0.1:{port}");
        let handle = {
            let (stats, stop) = (stats.clone(), stop.clone());
            spawn_in(ns.map(str::to_string), "prober", move || {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                let host = format!("127.0.0.1:{port}");
                for i in 0..PROBE_LIMIT {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let path = &paths[i as usize % paths.len()];
                    match get_once(addr, &host, path, PROBE_TIMEOUT) {
                        Ok(r) if r.status == 200 => {
                            stats.answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => {
                            stats
                                .failures
                                .lock()
                                .unwrap()
                                .push(format!("GET {path}: {}", r.describe()));
                            stats.failed.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            stats.failures.lock().unwrap().push(e);
                            stats.failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    sleep_unless(&stop, PROBE_PAUSE);
                }
            })
        };
        Prober {
            stats,
            stop,
            handle: Some(handle),
            what,
        }
    }

    fn answered(&self) -> u64 {
        self.stats.answered.load(Ordering::SeqCst)
    }

    fn failed(&self) -> u64 {
        self.stats.failed.load(Ordering::SeqCst)
    }

    fn failures(&self) -> Vec<String> {
        self.stats.failures.lock().unwrap().clone()
    }

    /// Panics if any probe so far was not answered.
    fn assert_no_failure(&self, context: &str) {
        assert!(
            self.failed() == 0,
            "{context}: expected every one of the {} to be answered 200 within {} s; \
             {} answered, {} not: {:?}",
            self.what,
            PROBE_TIMEOUT.as_secs(),
            self.answered(),
            self.failed(),
            self.failures()
        );
    }

    /// Waits (bounded) until the prober has `n` more answers than `mark`;
    /// panics as soon as a probe is not answered.
    fn wait_answers(&self, mark: u64, n: u64, context: &str) {
        let deadline = Instant::now() + LIVENESS_BOUND;
        loop {
            self.assert_no_failure(context);
            if self.answered() >= mark + n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{context}: expected {n} answers to the {} within {} s, got {}",
                self.what,
                LIVENESS_BOUND.as_secs(),
                self.answered() - mark
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the prober and checks that it was answered every time, and at
    /// least once.
    fn finish(mut self, context: &str) {
        // A short attack can end before the prober's first answer comes
        // (on a loaded machine): wait for one, within the bound.
        self.wait_answers(0, 1, context);
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        self.assert_no_failure(context);
        assert!(
            self.answered() >= 1,
            "{context}: expected the {} to be answered at least once",
            self.what
        );
        eprintln!(
            "{context}: loopback prober answered {} times, never failed",
            self.answered()
        );
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// How a liveness check came out.
#[derive(Debug)]
enum During {
    /// The prober was answered while the attack was in effect, before and after.
    Answered,
    /// The attack was no longer in effect (the server shed it) by the time
    /// the prober was answered; the string says what was seen.
    AttackEnded(String),
}

/// The liveness rule: with the attack in effect (`in_effect` gives `Ok`
/// with a description), the prober gets [`ANSWERS_DURING`] answers, and the
/// attack is still in effect afterwards. Panics when a probe is not
/// answered.
fn answered_during(
    prober: &Prober,
    attack: &str,
    in_effect: impl Fn() -> Result<String, String>,
) -> During {
    let before = match in_effect() {
        Ok(state) => state,
        Err(state) => return During::AttackEnded(format!("not in effect before probing: {state}")),
    };
    let mark = prober.answered();
    prober.wait_answers(
        mark,
        ANSWERS_DURING,
        &format!("while {attack} (attack in effect: {before})"),
    );
    match in_effect() {
        Ok(after) => {
            eprintln!(
                "{attack}: loopback answered {ANSWERS_DURING} times with the attack in effect \
                 (before: {before}; after: {after})"
            );
            During::Answered
        }
        Err(after) => {
            During::AttackEnded(format!("in effect before ({before}), not after ({after})"))
        }
    }
}

/// [`answered_during`], where the attack must still be in effect after the
/// answers (the server cannot shed it).
fn assert_answered_during(
    prober: &Prober,
    attack: &str,
    in_effect: impl Fn() -> Result<String, String>,
) {
    if let During::AttackEnded(why) = answered_during(prober, attack, in_effect) {
        panic!("{attack}: could not check loopback liveness during the attack, it ended: {why}");
    }
}

/// [`answered_during`], where the server may legitimately have shed the
/// attack (answered or closed the attacking connections) before the
/// prober's answers: that is logged, and the prober must still answer.
fn answered_during_or_shed(
    prober: &Prober,
    attack: &str,
    in_effect: impl Fn() -> Result<String, String>,
) {
    if let During::AttackEnded(why) = answered_during(prober, attack, in_effect) {
        eprintln!("{attack}: the server shed the attack ({why}); loopback must still answer");
        let mark = prober.answered();
        prober.wait_answers(mark, ANSWERS_DURING, &format!("after {attack} was shed"));
    }
}

// ---------------------------------------------------------------------------
// A peerix in this machine's namespace, attacked from another one
// ---------------------------------------------------------------------------

/// Peerix on `0.0.0.0:<free port>` with `--no-lan --no-filter` over a host
/// holding the closures of `paths`, and an attacker namespace joined to
/// this machine by a veth pair. Bindings drop in reverse order: the
/// namespace, then peerix, then the host, then the directory.
fn local_target(name: &str, paths: &[&str], extra: &[&str]) -> (TestDir, Host, Peerix, NetNs) {
    let dir = TestDir::new(name);
    let host = Host::with_paths(&dir, "a", paths);
    let mut args = vec!["--no-filter"];
    args.extend_from_slice(extra);
    let peerix = Peerix::spawn(&dir, &host, "0.0.0.0", &args, Readiness::Scanned);
    let ns = NetNs::new();
    (dir, host, peerix, ns)
}

/// Where the attacker in `ns` reaches `peerix`.
fn target(ns: &NetNs, peerix: &Peerix) -> SocketAddr {
    SocketAddr::from((ns.host_ip, peerix.port))
}

/// The narinfo text of `path` on loopback (root endpoint); must be 200.
fn loopback_narinfo(peerix: &Peerix, path: &str) -> NarInfoText {
    let request = format!("/{}.narinfo", hash_part(path));
    let response = get_once(
        peerix.addr,
        &format!("127.0.0.1:{}", peerix.port),
        &request,
        PROBE_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("GET {request} on loopback before the attack: {e}"));
    assert_eq!(
        response.status,
        200,
        "GET {request} on loopback before the attack: {}",
        response.describe()
    );
    NarInfoText::read(&response.text())
}

/// Opens `n` connections from `ns` to `to` and sends each `request(i)`;
/// the connections stay open. Panics if one cannot be opened.
fn open_and_send(
    ns: &str,
    to: SocketAddr,
    n: usize,
    request: impl Fn(usize) -> Vec<u8> + Send + Sync,
) -> Vec<TcpStream> {
    in_netns(ns, || {
        (0..n)
            .map(|i| {
                let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("attack connection {i} to {to}: {e}"));
                stream
                    .set_write_timeout(Some(Duration::from_secs(10)))
                    .expect("write timeout");
                stream
                    .write_all(&request(i))
                    .unwrap_or_else(|e| panic!("sending on attack connection {i}: {e}"));
                stream
            })
            .collect()
    })
}

/// The peak resident set (VmHWM) and current one (VmRSS) of `pid`, in kB.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

// ---------------------------------------------------------------------------
// 1. Content-Length: 1000000000000 and no body
// ---------------------------------------------------------------------------

/// A client in another namespace announces a 1 TB body on the root route
/// and on `/local/`, and sends none. Peerix must not abort; its own host
/// keeps being served; the attacker gets a 4xx or a closed connection,
/// never a 5xx (and never a success that then waits for the terabyte).
#[test]
fn attack_01_a_huge_content_length_without_a_body_gets_4xx_or_close() {
    let many = many_fixture();
    let (_dir, _host, mut peerix, ns) = local_target("huge_cl", &[&many.first], &[]);
    let to = target(&ns, &peerix);
    let hash = hash_part(&many.first).to_string();
    let prober = Prober::start(
        None,
        peerix.port,
        &["/nix-cache-info".into(), format!("/{hash}.narinfo")],
    );

    let targets = [
        "/nix-cache-info".to_string(),
        format!("/{hash}.narinfo"),
        "/local/nix-cache-info".to_string(),
        format!("/local/{hash}.narinfo"),
    ];
    let requests: Vec<Vec<u8>> = targets
        .iter()
        .map(|path| {
            format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nContent-Length: 1000000000000\r\n\r\n")
                .into_bytes()
        })
        .collect();
    let mut streams = open_and_send(&ns.name, to, requests.len(), |i| requests[i].clone());
    // A daemon that dies of the announced size does so at once; give it
    // a moment to show, so the failure says so rather than "refused".
    thread::sleep(Duration::from_millis(500));
    peerix.assert_alive_without_panic();

    answered_during_or_shed(
        &prober,
        "4 connections announce a 1 TB body and send none",
        || {
            let open = established(&ns.name, to);
            if open >= 1 {
                Ok(format!("{open} attack connections open"))
            } else {
                Err("all attack connections closed".into())
            }
        },
    );
    peerix.assert_alive_without_panic();

    let mut wrong = Vec::new();
    for (path, stream) in targets.iter().zip(&mut streams) {
        let (data, ended) = read_reply(stream, Duration::from_secs(20), true);
        let mut outcome = format!("{:?} then {ended:?}", first_line(&data));
        let ok = match (status_of(&data), &ended) {
            (Some(s), _) if s >= 500 => false,
            (Some(s), _) if (400..500).contains(&s) => true,
            // A success is acceptable only if the server then closes
            // instead of waiting for the terabyte.
            (Some(_), Ended::Head) => {
                let (_, after) = read_reply(stream, Duration::from_secs(20), false);
                outcome.push_str(&format!(", then {after:?}"));
                matches!(after, Ended::Closed | Ended::Failed(_))
            }
            (Some(_), Ended::Closed | Ended::Failed(_)) => true,
            (Some(_), _) => false,
            (None, Ended::Closed | Ended::Failed(_)) => true,
            (None, _) => false,
        };
        eprintln!("1 TB Content-Length on {path}: {outcome}");
        if !ok {
            wrong.push(format!("{path}: {outcome}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "expected a 4xx or a close (never a 5xx, never an answer that waits for a 1 TB body) \
         for every request announcing Content-Length: 1000000000000; got: {wrong:#?}"
    );
    drop(streams);
    peerix.assert_alive_without_panic();
    let status = ns.curl_status(&format!("http://{to}/local/nix-cache-info"));
    assert_eq!(status, Some(200), "a network client after the attack");
    prober.finish("huge Content-Length");
    peerix.assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 2. Bodies that never come
// ---------------------------------------------------------------------------

/// 40 connections from another namespace each send a request announcing a
/// 100 kB body (half of them with `Expect: 100-continue`) and never send
/// it. Loopback must be answered while they are held. The plain ones
/// announce more than the server drains of an unread body (64 KiB) and
/// never send it: each must be answered and then closed by the server
/// within a generous bound, never held open waiting for the body.
#[test]
fn attack_02_requests_whose_body_never_comes_do_not_starve_loopback() {
    const CONNECTIONS: usize = 40;
    /// How long the plain ones may stay open after their request, at most.
    const CLOSE_BOUND: Duration = Duration::from_secs(40);
    let many = many_fixture();
    let (_dir, _host, mut peerix, ns) = local_target("no_body", &[&many.first], &[]);
    let to = target(&ns, &peerix);
    let hash = hash_part(&many.first).to_string();
    let prober = Prober::start(
        None,
        peerix.port,
        &["/nix-cache-info".into(), format!("/{hash}.narinfo")],
    );
    // Loopback works before the attack.
    prober.wait_answers(0, 1, "before the attack");

    let local_narinfo = format!("/local/{hash}.narinfo");
    let mut streams = open_and_send(&ns.name, to, CONNECTIONS, |i| {
        let path = if i % 4 < 2 {
            "/local/nix-cache-info"
        } else {
            local_narinfo.as_str()
        };
        let expect = if i % 2 == 1 {
            "Expect: 100-continue\r\n"
        } else {
            ""
        };
        format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nContent-Length: 100000\r\n{expect}\r\n")
            .into_bytes()
    });
    // Let the server take them all in.
    thread::sleep(Duration::from_millis(500));

    answered_during_or_shed(
        &prober,
        "40 connections announce 100 kB bodies and send none",
        || {
            let open = established(&ns.name, to);
            if open >= 16 {
                Ok(format!("{open} of {CONNECTIONS} attack connections open"))
            } else {
                Err(format!("{open} of {CONNECTIONS} attack connections open"))
            }
        },
    );
    peerix.assert_alive_without_panic();

    // The plain ones (no Expect) are answered, then closed: the server
    // does not wait for a body larger than it drains. The bound is far
    // beyond the server's body timeout (10 s), and shared by all of them.
    let deadline = Instant::now() + CLOSE_BOUND;
    let mut plain: BTreeMap<String, usize> = BTreeMap::new();
    let mut not_closed = Vec::new();
    for (i, stream) in streams.iter_mut().enumerate().filter(|(i, _)| i % 2 == 0) {
        // What came already is read even once the bound is spent.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(300));
        let (data, ended) = read_reply(stream, left, false);
        let outcome = format!("{:?} then {ended:?}", first_line(&data));
        let answered = status_of(&data).is_some_and(|s| s < 500);
        let closed = matches!(ended, Ended::Closed | Ended::Failed(_));
        if !(answered && closed) {
            not_closed.push(format!("connection {i}: {outcome}"));
        }
        *plain.entry(outcome).or_default() += 1;
    }
    // The ones with `Expect: 100-continue`: whatever they got, it is no 5xx.
    let mut expecting: BTreeMap<String, usize> = BTreeMap::new();
    for stream in streams.iter_mut().skip(1).step_by(2) {
        let (data, _) = read_reply(stream, Duration::from_millis(200), true);
        *expecting.entry(first_line(&data)).or_default() += 1;
    }
    eprintln!(
        "the 20 plain attack connections: {plain:?}; the 20 with Expect got so far: {expecting:?}"
    );
    assert!(
        not_closed.is_empty(),
        "expected each of the 20 requests announcing a 100 kB body (more than the 64 KiB the \
         server drains) without Expect, body never sent, to be answered (no 5xx) and then closed \
         by the server within {} s; {} were not: {not_closed:#?}",
        CLOSE_BOUND.as_secs(),
        not_closed.len()
    );
    assert!(
        !expecting
            .keys()
            .any(|line| status_of(line.as_bytes()).is_some_and(|s| s >= 500)),
        "expected no 5xx for a request whose body does not come, got {expecting:?}"
    );
    drop(streams);
    prober.finish("bodies that never come");
    peerix.assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 3. A connection flood under --nofile 1024
// ---------------------------------------------------------------------------

/// Sets this process's open-files soft limit to its hard limit if it is
/// below `want`, so that the test itself never runs out of descriptors.
fn raise_own_nofile(want: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some_and(|c| c < want) {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        setrlimit(Resource::Nofile, raised).expect("raising the test's own RLIMIT_NOFILE");
    }
    let now = getrlimit(Resource::Nofile);
    assert!(
        now.current.is_none_or(|c| c >= want),
        "the test needs {want} open files, its limit is {:?}",
        now.current
    );
}

/// Peerix runs with `prlimit --nofile=1024:1024`; another namespace opens
/// 2,000 TCP connections to it and keeps them open, idle. Loopback must be
/// answered throughout (every probe) and afterwards; after the attacker
/// closes them, a network client is served again (the accept loop
/// survived running out of descriptors). This is also the statement "the
/// daemon serves loopback throughout and afterwards under
/// `prlimit --nofile=1024:1024` with 2,000 connections".
#[test]
fn attack_03_a_connection_flood_under_nofile_1024_keeps_loopback_and_accept_alive() {
    const CONNECTIONS: usize = 2000;
    const THREADS: usize = 20;
    raise_own_nofile(CONNECTIONS as u64 + 2048);
    let many = many_fixture();
    let (_dir, _host, mut peerix, ns) = local_target("flood", &[&many.first], &[]);
    let to = target(&ns, &peerix);
    let pid = peerix.pid();
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg("--nofile=1024:1024")
        .output()
        .expect("running prlimit (util-linux)");
    assert_success("prlimit --nofile=1024:1024 on peerix", &out);
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("reading limits");
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("")
        .to_string();
    assert!(
        nofile.split_whitespace().filter(|w| *w == "1024").count() == 2,
        "expected peerix's open-files limit to be 1024:1024, /proc says {nofile:?}"
    );

    let hash = hash_part(&many.first).to_string();
    let prober = Prober::start(
        None,
        peerix.port,
        &["/nix-cache-info".into(), format!("/{hash}.narinfo")],
    );
    prober.wait_answers(0, 1, "before the flood");

    // Open the flood from several threads in the namespace. A thread stops
    // after 3 connects in a row fail: the server's queue is full then.
    let per_thread = CONNECTIONS / THREADS;
    let openers: Vec<JoinHandle<(Vec<TcpStream>, Vec<String>)>> = (0..THREADS)
        .map(|t| {
            spawn_in(Some(ns.name.clone()), &format!("flood-{t}"), move || {
                let mut streams = Vec::with_capacity(per_thread);
                let mut errors = Vec::new();
                let mut failed_in_a_row = 0;
                for _ in 0..per_thread {
                    match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                        Ok(s) => {
                            failed_in_a_row = 0;
                            streams.push(s);
                        }
                        Err(e) => {
                            errors.push(e.to_string());
                            failed_in_a_row += 1;
                            if failed_in_a_row >= 3 {
                                break;
                            }
                        }
                    }
                }
                (streams, errors)
            })
        })
        .collect();
    let mut flood = Vec::with_capacity(CONNECTIONS);
    let mut errors = Vec::new();
    for opener in openers {
        let (streams, errs) = opener.join().expect("a flood thread panicked");
        flood.extend(streams);
        errors.extend(errs);
    }
    eprintln!(
        "flood: {} of {CONNECTIONS} connections opened, {} connects failed (first: {:?})",
        flood.len(),
        errors.len(),
        errors.first()
    );
    assert!(
        flood.len() >= CONNECTIONS / 2,
        "expected the flood to open at least {} connections, it opened {}: {:?}",
        CONNECTIONS / 2,
        flood.len(),
        errors.first()
    );

    answered_during_or_shed(&prober, "2,000 idle connections are held open", || {
        let open = established(&ns.name, to);
        if open >= CONNECTIONS / 2 {
            Ok(format!("{open} flood connections established"))
        } else {
            Err(format!("{open} flood connections established"))
        }
    });
    // Hold the flood a little longer: loopback keeps being answered.
    let mark = prober.answered();
    prober.wait_answers(mark, 3, "while the flood is held");
    peerix.assert_alive_without_panic();
    eprintln!(
        "flood: {} connections still established before the attacker lets go",
        established(&ns.name, to)
    );

    drop(flood);
    let mark = prober.answered();
    prober.wait_answers(mark, 2, "after the flood is closed");
    // A client from the network is served again: the accept loop is alive.
    let client_ns = ns.name.clone();
    let served = poll_until("a network client to be served after the flood", || {
        let host = to.to_string();
        let got = in_netns(&client_ns, move || {
            get_once(to, &host, "/local/nix-cache-info", Duration::from_secs(5))
        });
        match got {
            Ok(r) if r.status == 200 => Ok(r),
            Ok(r) => Err(r.describe()),
            Err(e) => Err(e),
        }
    });
    assert_eq!(served.status, 200);
    prober.finish("connection flood under nofile 1024");
    peerix.assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 3b. Descriptors really exhausted: the accept loop survives EMFILE
// ---------------------------------------------------------------------------

/// The descriptors `pid` has open now.
fn open_descriptors(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing /proc/{pid}/fd: {e}"))
        .count()
}

/// Peerix's open-files limit is cut, after it started, to what it has open
/// plus [`SPARE`] (its connection caps were computed from the far higher
/// limit at start, so they do not hold the flood back); another namespace
/// then opens connections until they queue. Accepting really fails
/// (`EMFILE`, which peerix logs), and after the attacker lets go a network
/// client and loopback are both served again: the accept loop sleeps and
/// retries after an error instead of ending.
#[test]
fn attack_03b_running_out_of_descriptors_does_not_end_the_accept_loop() {
    /// Descriptors left to peerix above what it holds: room for a handful
    /// of connections (each costs two), far fewer than the flood.
    const SPARE: usize = 40;
    const CONNECTIONS: usize = 300;
    raise_own_nofile(CONNECTIONS as u64 + 1024);
    let many = many_fixture();
    let (_dir, _host, mut peerix, ns) = local_target("emfile", &[&many.first], &[]);
    let to = target(&ns, &peerix);
    let pid = peerix.pid();
    let hash = hash_part(&many.first).to_string();
    let loopback_paths = ["/nix-cache-info".to_string(), format!("/{hash}.narinfo")];
    let loopback_host = format!("127.0.0.1:{}", peerix.port);
    let loopback = peerix.addr;
    let loopback_served = || -> Result<(), String> {
        for path in &loopback_paths {
            match get_once(loopback, &loopback_host, path, Duration::from_secs(5)) {
                Ok(r) if r.status == 200 => {}
                Ok(r) => return Err(format!("loopback GET {path}: {}", r.describe())),
                Err(e) => return Err(format!("loopback {e}")),
            }
        }
        Ok(())
    };
    let network_served = || -> Result<(), String> {
        let host = to.to_string();
        let got = in_netns(&ns.name, move || {
            get_once(to, &host, "/local/nix-cache-info", Duration::from_secs(5))
        });
        match got {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("network GET: {}", r.describe())),
            Err(e) => Err(format!("network {e}")),
        }
    };
    loopback_served().unwrap_or_else(|e| panic!("before the flood: {e}"));
    network_served().unwrap_or_else(|e| panic!("before the flood: {e}"));

    let in_use = open_descriptors(pid);
    let limit = in_use + SPARE;
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={limit}:{limit}"))
        .output()
        .expect("running prlimit (util-linux)");
    assert_success(&format!("prlimit --nofile={limit}:{limit} on peerix"), &out);
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("reading limits");
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("")
        .to_string();
    assert!(
        nofile
            .split_whitespace()
            .filter(|w| *w == limit.to_string())
            .count()
            == 2,
        "expected peerix's open-files limit to be {limit}:{limit}, /proc says {nofile:?}"
    );

    // Open the flood one connection after the other, until connects fail
    // (the listen queue is full) or all are open.
    let (flood, errors) = in_netns(&ns.name, || {
        let mut streams = Vec::with_capacity(CONNECTIONS);
        let mut errors = Vec::new();
        let mut failed_in_a_row = 0;
        for _ in 0..CONNECTIONS {
            match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                Ok(s) => {
                    failed_in_a_row = 0;
                    streams.push(s);
                }
                Err(e) => {
                    errors.push(e.to_string());
                    failed_in_a_row += 1;
                    if failed_in_a_row >= 3 {
                        break;
                    }
                }
            }
        }
        (streams, errors)
    });
    eprintln!(
        "emfile: peerix held {in_use} descriptors, limit set to {limit}; {} of {CONNECTIONS} \
         flood connections opened, {} connects failed (first: {:?}); peerix now holds {}",
        flood.len(),
        errors.len(),
        errors.first(),
        open_descriptors(pid)
    );
    assert!(
        flood.len() > SPARE,
        "expected the flood to open more connections ({}) than peerix has descriptors to spare \
         ({SPARE}): {:?}",
        flood.len(),
        errors.first()
    );

    // Accepting fails for want of descriptors, and peerix says so.
    let logged = poll_until("peerix to log an accept failing with EMFILE", || {
        let stderr = peerix.stderr();
        stderr
            .lines()
            .find(|l| l.contains("Error accepting new client") && l.contains("Too many open files"))
            .map(str::to_string)
            .ok_or_else(|| {
                format!(
                    "no such line yet; peerix holds {} descriptors",
                    open_descriptors(pid)
                )
            })
    });
    eprintln!("emfile: peerix logged {logged:?}");
    peerix.assert_alive_without_panic();

    // The attacker lets go; the network and loopback are served again.
    drop(flood);
    poll_until(
        "a network client to be served after the descriptors ran out",
        &network_served,
    );
    poll_until(
        "loopback to be served after the descriptors ran out",
        &loopback_served,
    );
    eprintln!(
        "emfile: served again from the network and on loopback; peerix holds {} descriptors",
        open_descriptors(pid)
    );
    peerix.assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 4. One endless header line
// ---------------------------------------------------------------------------

/// How one endless-header connection ended.
enum HeaderOutcome {
    /// The server answered (status) before the cap.
    Refused(u16, u64),
    /// The server closed or reset the connection after this many bytes.
    Closed(u64, String),
    /// The cap went out without a refusal.
    Swallowed(u64, String),
    /// A write blocked for the whole write timeout, the connection open.
    Stalled(u64),
}

impl std::fmt::Debug for HeaderOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderOutcome::Refused(status, sent) => {
                write!(f, "answered {status} after {} KiB", sent >> 10)
            }
            HeaderOutcome::Closed(sent, why) => {
                write!(f, "closed after {} KiB ({why})", sent >> 10)
            }
            HeaderOutcome::Swallowed(sent, how) => {
                write!(f, "{} MiB taken without a refusal, then {how}", sent >> 20)
            }
            HeaderOutcome::Stalled(sent) => write!(
                f,
                "server stopped reading after {} KiB and kept the connection open",
                sent >> 10
            ),
        }
    }
}

/// A client in another namespace sends one header line that never ends
/// (up to 64 MiB per connection, connection after connection while the
/// check runs). The server must refuse it (431) or close, and peerix's
/// peak resident memory must stay under 64 MB; loopback is answered
/// meanwhile.
#[test]
fn attack_04_an_endless_header_line_is_refused_and_memory_stays_bounded() {
    const CAP: u64 = 64 * 1024 * 1024;
    const MEMORY_LIMIT_KB: u64 = 64 * 1000;
    const MAX_ROUNDS: usize = 200;
    let many = many_fixture();
    let (_dir, _host, mut peerix, ns) = local_target("endless", &[&many.first], &[]);
    let to = target(&ns, &peerix);
    let pid = peerix.pid();
    let hash = hash_part(&many.first).to_string();
    let prober = Prober::start(
        None,
        peerix.port,
        &["/nix-cache-info".into(), format!("/{hash}.narinfo")],
    );
    prober.wait_answers(0, 1, "before the attack");
    let (hwm_before, _) = memory_kb(pid);

    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(true));
    let sent_total = Arc::new(AtomicU64::new(0));
    let attacker = {
        let (stop, running, sent_total) = (stop.clone(), running.clone(), sent_total.clone());
        spawn_in(Some(ns.name.clone()), "endless-header", move || {
            let mut outcomes = Vec::new();
            let chunk = vec![b'a'; 256 * 1024];
            for _ in 0..MAX_ROUNDS {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
                    Ok(s) => s,
                    Err(e) => {
                        outcomes.push(HeaderOutcome::Closed(0, format!("connect: {e}")));
                        continue;
                    }
                };
                let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
                let head =
                    format!("GET /local/nix-cache-info HTTP/1.1\r\nHost: {to}\r\nX-Endless: ");
                let mut sent = 0u64;
                let mut error = None;
                if let Err(e) = stream.write_all(head.as_bytes()) {
                    error = Some(e);
                }
                while error.is_none() && sent < CAP {
                    match stream.write_all(&chunk) {
                        Ok(()) => {
                            sent += chunk.len() as u64;
                            sent_total.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                        }
                        Err(e) => error = Some(e),
                    }
                }
                let (data, ended) = read_reply(&mut stream, Duration::from_secs(2), true);
                let outcome = match (status_of(&data), error) {
                    (Some(status), _) => HeaderOutcome::Refused(status, sent),
                    (None, Some(e))
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                    {
                        HeaderOutcome::Stalled(sent)
                    }
                    (None, Some(e)) => HeaderOutcome::Closed(sent, e.to_string()),
                    (None, None) => HeaderOutcome::Swallowed(sent, format!("{ended:?}")),
                };
                outcomes.push(outcome);
            }
            running.store(false, Ordering::SeqCst);
            outcomes
        })
    };

    // Sample peerix's memory while the attack runs.
    let sampler = {
        let running = running.clone();
        thread::spawn(move || {
            let mut peak = 0;
            for _ in 0..20_000 {
                if !running.load(Ordering::SeqCst) {
                    break;
                }
                let (_, rss) = memory_kb(pid);
                peak = peak.max(rss);
                thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };

    answered_during_or_shed(&prober, "an endless header line is being sent", || {
        if running.load(Ordering::SeqCst) {
            Ok(format!(
                "attacker still sending, {} MiB so far",
                sent_total.load(Ordering::SeqCst) >> 20
            ))
        } else {
            Err("the attacker has finished all its rounds".into())
        }
    });
    stop.store(true, Ordering::SeqCst);
    let outcomes = attacker.join().expect("the attacker thread panicked");
    let peak_sampled = sampler.join().expect("the sampler panicked");
    peerix.assert_alive_without_panic();
    let (hwm, rss) = memory_kb(pid);
    eprintln!(
        "endless header: {} rounds, {} MiB sent; peerix VmHWM {hwm_before} kB before, {hwm} kB after, \
         VmRSS now {rss} kB, sampled peak {peak_sampled} kB; outcomes (first 5): {:?}",
        outcomes.len(),
        sent_total.load(Ordering::SeqCst) >> 20,
        &outcomes[..outcomes.len().min(5)]
    );
    let bad: Vec<&HeaderOutcome> = outcomes
        .iter()
        .filter(|o| match o {
            HeaderOutcome::Refused(status, _) => !(400..500).contains(status),
            HeaderOutcome::Closed(..) => false,
            HeaderOutcome::Swallowed(..) | HeaderOutcome::Stalled(_) => true,
        })
        .collect();
    let mut problems = Vec::new();
    if !bad.is_empty() {
        problems.push(format!(
            "expected every endless header line to be refused (431) or closed before 64 MiB; \
             {} of {} were not: {:?}",
            bad.len(),
            outcomes.len(),
            &bad[..bad.len().min(5)]
        ));
    }
    if hwm >= MEMORY_LIMIT_KB || peak_sampled >= MEMORY_LIMIT_KB {
        problems.push(format!(
            "expected peerix's resident memory to stay under 64 MB during the endless header, \
             its peak VmHWM was {hwm} kB (sampled VmRSS peak {peak_sampled} kB, VmHWM {hwm_before} kB \
             before the attack)"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    prober.finish("endless header line");
    peerix.assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 5. DNS rebinding
// ---------------------------------------------------------------------------

/// A web page whose name rebinds to 127.0.0.1 reaches the root endpoints
/// with its own name in `Host`. The root endpoints (which make this host
/// fetch from peers and serve every local path) must answer such a
/// request 403; a `Host` naming loopback (or none, HTTP/1.0) is served;
/// `/local/` (meant for the network) serves any `Host`.
#[test]
fn attack_05_dns_rebinding_host_headers_get_403_on_root_endpoints() {
    let many = many_fixture();
    let (_dir, _host, mut peerix, _ns) = local_target("rebinding", &[&many.first], &[]);
    let port = peerix.port;
    let hash = hash_part(&many.first).to_string();
    let prober = Prober::start(
        None,
        port,
        &["/nix-cache-info".into(), format!("/{hash}.narinfo")],
    );
    let narinfo = loopback_narinfo(&peerix, &many.first);
    let nar = format!("/{}", narinfo.field("URL"));
    let root = [
        "/nix-cache-info".to_string(),
        format!("/{hash}.narinfo"),
        nar.clone(),
    ];
    let local = [
        "/local/nix-cache-info".to_string(),
        format!("/local/{hash}.narinfo"),
        format!("/local{nar}"),
    ];
    let foreign = [
        "evil.example".to_string(),
        "evil.example:12304".to_string(),
        format!("evil.example:{port}"),
        "127.0.0.1.evil.example".to_string(),
        format!("127.0.0.1.evil.example:{port}"),
    ];
    let loopback_names = [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ];

    let ask = |request: String| -> Result<u16, String> {
        http::raw(peerix.addr, request.as_bytes(), false)
            .map(|r| r.status)
            .map_err(|e| e.to_string())
    };
    let with_host = |path: &str, host: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let mut wrong = Vec::new();
    let mut check = |what: String, got: Result<u16, String>, want: u16| {
        eprintln!("{what}: {got:?} (want {want})");
        if got != Ok(want) {
            wrong.push(format!("{what}: expected {want}, got {got:?}"));
        }
    };
    for path in &root {
        for host in &foreign {
            check(
                format!("GET {path} with Host: {host}"),
                ask(with_host(path, host)),
                403,
            );
        }
        for host in &loopback_names {
            check(
                format!("GET {path} with Host: {host}"),
                ask(with_host(path, host)),
                200,
            );
        }
        check(
            format!("GET {path} HTTP/1.0 without Host"),
            ask(format!("GET {path} HTTP/1.0\r\n\r\n")),
            200,
        );
    }
    for path in &local {
        for host in foreign.iter().chain(&loopback_names) {
            check(
                format!("GET {path} with Host: {host}"),
                ask(with_host(path, host)),
                200,
            );
        }
    }
    assert!(
        wrong.is_empty(),
        "DNS rebinding: the root endpoints must refuse a Host that does not name loopback, \
         and serve one that does; /local/ serves any. {} of the checks failed:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    prober.finish("DNS rebinding");
    peerix.assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 6. Slow readers of a large NAR
// ---------------------------------------------------------------------------

/// 20 connections from another namespace, each with a tiny receive buffer,
/// ask for the 50 MiB NAR on `/local/` and never read. Loopback (a narinfo
/// and a local NAR) must be answered while they are held.
#[test]
fn attack_06_slow_readers_of_a_large_nar_do_not_starve_loopback() {
    const READERS: usize = 20;
    let fx = realistic_fixture();
    let many = many_fixture();
    let (_dir, _host, mut peerix, ns) = local_target("slow_readers", &[&fx.big, &many.first], &[]);
    let to = target(&ns, &peerix);
    let small = loopback_narinfo(&peerix, &many.first);
    let big = loopback_narinfo(&peerix, &fx.big);
    let big_nar = format!("/local/{}", big.field("URL"));
    let prober = Prober::start(
        None,
        peerix.port,
        &[
            format!("/{}.narinfo", hash_part(&many.first)),
            format!("/{}", small.field("URL")),
            "/nix-cache-info".into(),
        ],
    );
    prober.wait_answers(0, 1, "before the attack");

    let readers: Vec<Socket> = in_netns(&ns.name, || {
        (0..READERS)
            .map(|i| {
                let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
                    .expect("a TCP socket");
                socket
                    .set_recv_buffer_size(1024)
                    .expect("a tiny receive buffer");
                socket
                    .connect_timeout(&to.into(), Duration::from_secs(10))
                    .unwrap_or_else(|e| panic!("slow reader {i} connecting to {to}: {e}"));
                socket
                    .set_write_timeout(Some(Duration::from_secs(10)))
                    .expect("write timeout");
                let request = format!("GET {big_nar} HTTP/1.1\r\nHost: {to}\r\n\r\n");
                let mut stream: TcpStream = socket.try_clone().expect("clone").into();
                stream
                    .write_all(request.as_bytes())
                    .unwrap_or_else(|e| panic!("slow reader {i} sending its request: {e}"));
                socket
            })
            .collect()
    });
    // The server has started sending to them.
    poll_until(
        "the server to start sending the NAR to the slow readers",
        || {
            let n = holding_unread(&ns.name, to);
            if n >= 1 {
                Ok(n)
            } else {
                Err(format!("{n} readers have bytes waiting"))
            }
        },
    );

    // A server that resets slow readers sheds the attack; one that waits
    // on them must still answer loopback.
    answered_during_or_shed(
        &prober,
        "20 readers with tiny receive buffers hold the 50 MiB NAR",
        || {
            let open = established(&ns.name, to);
            let waiting = holding_unread(&ns.name, to);
            let state =
                format!("{open} of {READERS} readers connected, {waiting} with unread bytes");
            if open >= 16 { Ok(state) } else { Err(state) }
        },
    );
    peerix.assert_alive_without_panic();
    drop(readers);
    prober.finish("slow readers");
    peerix.assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 12. HTTP/2.0 request line
// ---------------------------------------------------------------------------

/// `GET ... HTTP/2.0` (no Connection header, so a keep-alive server would
/// wait for more) gets `505` and the connection is closed; on loopback and
/// from another namespace.
#[test]
fn attack_12_an_http_2_request_line_gets_505_and_a_close() {
    let many = many_fixture();
    let (_dir, _host, mut peerix, ns) = local_target("http2", &[&many.first], &[]);
    let to = target(&ns, &peerix);
    let port = peerix.port;
    let prober = Prober::start(None, port, &["/nix-cache-info".into()]);

    let exchange = |stream: &mut TcpStream, request: &str| -> (Vec<u8>, Ended) {
        stream
            .write_all(request.as_bytes())
            .expect("sending the HTTP/2.0 request line");
        read_reply(stream, Duration::from_secs(15), false)
    };
    let loopback_request =
        format!("GET /nix-cache-info HTTP/2.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let mut stream = TcpStream::connect(peerix.addr).expect("connecting on loopback");
    let loopback = exchange(&mut stream, &loopback_request);
    let remote_request = format!("GET /local/nix-cache-info HTTP/2.0\r\nHost: {to}\r\n\r\n");
    let remote = in_netns(&ns.name, move || {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .expect("connecting from the namespace");
        exchange(&mut stream, &remote_request)
    });

    let mut wrong = Vec::new();
    for (who, (data, ended)) in [("loopback", loopback), ("namespace", remote)] {
        let line = first_line(&data);
        eprintln!("HTTP/2.0 request line from {who}: {line:?}, then {ended:?}");
        if status_of(&data) != Some(505) {
            wrong.push(format!("{who}: expected 505, got {line:?}"));
        }
        if !matches!(ended, Ended::Closed | Ended::Failed(_)) {
            wrong.push(format!(
                "{who}: expected the connection closed after the answer, it was {ended:?} after 15 s"
            ));
        }
    }
    assert!(wrong.is_empty(), "HTTP/2.0 request line: {wrong:#?}");
    prober.finish("HTTP/2.0 request line");
    peerix.assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// LAN: hostile peers
// ---------------------------------------------------------------------------

/// How a hostile peer serves NARs.
#[derive(Clone, Copy, Debug)]
enum NarServe {
    /// 200 with the right Content-Length and garbage bytes.
    Garbage,
    /// 200 with the whole NAR whatever Range asked, one byte per `every`.
    IgnoreRangeTrickle { every: Duration },
    /// Range honoured; the real bytes, `chunk` of them per `every`.
    Trickle { chunk: usize, every: Duration },
}

struct HostileConfig {
    items: Vec<FakeItem>,
    /// Answer every LAN query, whatever the hash.
    answer_every_query: bool,
    /// Accept narinfo requests and never answer them.
    hang_on_narinfo: bool,
    nar: NarServe,
    /// 0: TCP on the LAN port; n > 0: n listeners on ephemeral ports, and
    /// each UDP reply names the next of them.
    rotate_ports: usize,
}

#[derive(Default, Debug)]
struct HostileStats {
    udp_requests: AtomicU64,
    udp_replies: AtomicU64,
    narinfo_requests: AtomicU64,
    /// Distinct hash parts asked for by narinfo.
    narinfo_hashes: Mutex<BTreeSet<String>>,
    nar_requests: AtomicU64,
    range_requests: AtomicU64,
    /// NAR responses being sent right now.
    streaming: AtomicU64,
    /// Ports NAR requests came in on, and how many.
    nar_ports: Mutex<BTreeMap<u16, u64>>,
}

impl HostileStats {
    fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// Longest a hostile peer holds a connection (hang or trickle), so every
/// loop is bounded even if a test forgets to stop it.
const HOSTILE_HOLD: Duration = Duration::from_secs(180);
/// At most this many connection handlers at once.
const HOSTILE_MAX_HANDLERS: usize = 512;

/// A LAN peer run by the test in host `i`'s namespace, misbehaving as its
/// config says. Stopped (threads joined) on drop.
struct HostilePeer {
    ip: Ipv4Addr,
    ports: Vec<u16>,
    stats: Arc<HostileStats>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl HostilePeer {
    fn start(lan: &Lan, i: usize, config: HostileConfig) -> HostilePeer {
        let ns = lan.ns(i).to_string();
        let (udp, listeners) = in_netns(&ns, || {
            let udp = lan_udp_socket()?;
            let ports: Vec<u16> = if config.rotate_ports == 0 {
                vec![LAN_PORT]
            } else {
                vec![0; config.rotate_ports]
            };
            let listeners = ports
                .iter()
                .map(|&port| tcp_listener(port, 128))
                .collect::<io::Result<Vec<_>>>()?;
            io::Result::Ok((udp, listeners))
        })
        .unwrap_or_else(|e| panic!("binding the hostile peer's sockets in {ns}: {e}"));
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().expect("listener address").port())
            .collect();
        let stats = Arc::new(HostileStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let items: Arc<HashMap<String, FakeItem>> = Arc::new(
            config
                .items
                .iter()
                .map(|i| (i.hash.clone(), i.clone()))
                .collect(),
        );
        let config = Arc::new(config);
        let mut threads = Vec::new();
        {
            let (stats, stop, items, config, ports) = (
                stats.clone(),
                stop.clone(),
                items.clone(),
                config.clone(),
                ports.clone(),
            );
            udp.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("UDP read timeout");
            threads.push(thread::spawn(move || {
                hostile_udp(&udp, &ports, &config, &items, &stats, &stop)
            }));
        }
        for listener in listeners {
            listener
                .set_nonblocking(true)
                .expect("nonblocking listener");
            let (stats, stop, items, config) =
                (stats.clone(), stop.clone(), items.clone(), config.clone());
            threads.push(thread::spawn(move || {
                hostile_accept(&listener, &config, &items, &stats, &stop)
            }));
        }
        HostilePeer {
            ip: lan_ip(i),
            ports,
            stats,
            stop,
            threads,
        }
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.ports[0])
    }
}

impl Drop for HostilePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// `[0][id u32 BE][32-char hash]` → (id, hash).
fn parse_query(packet: &[u8]) -> Option<(u32, String)> {
    if packet.len() != 37 || packet[0] != 0 {
        return None;
    }
    let id = u32::from_be_bytes(packet[1..5].try_into().ok()?);
    let hash = std::str::from_utf8(&packet[5..]).ok()?;
    Some((id, hash.to_string()))
}

fn hostile_udp(
    socket: &UdpSocket,
    ports: &[u16],
    config: &HostileConfig,
    items: &HashMap<String, FakeItem>,
    stats: &HostileStats,
    stop: &AtomicBool,
) {
    let mut buf = [0u8; 2048];
    let mut next = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Some((id, hash)) = parse_query(&buf[..n]) else {
            continue;
        };
        stats.udp_requests.fetch_add(1, Ordering::SeqCst);
        if config.answer_every_query || items.contains_key(&hash) {
            let port = ports[next % ports.len()];
            next += 1;
            if socket
                .send_to(&response_packet(id, u32::from(port), &hash), from)
                .is_ok()
            {
                stats.udp_replies.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

fn hostile_accept(
    listener: &TcpListener,
    config: &Arc<HostileConfig>,
    items: &Arc<HashMap<String, FakeItem>>,
    stats: &Arc<HostileStats>,
    stop: &Arc<AtomicBool>,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut handlers: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(_) => continue,
        };
        handlers.retain(|h| !h.is_finished());
        if handlers.len() >= HOSTILE_MAX_HANDLERS {
            continue; // dropped: closed
        }
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_nodelay(true);
        let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let (config, items, stats, stop) =
            (config.clone(), items.clone(), stats.clone(), stop.clone());
        handlers.push(thread::spawn(move || {
            let _ = hostile_connection(stream, port, &config, &items, &stats, &stop);
        }));
    }
    for handler in handlers {
        let _ = handler.join();
    }
}

/// Reads one request head; `None` if the client left, or on stop.
fn hostile_head(stream: &mut TcpStream, stop: &AtomicBool) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..600 {
        if stop.load(Ordering::SeqCst) {
            return None;
        }
        match stream.read(&mut buf) {
            Ok(0) => return None,
            Ok(n) => {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    return Some(String::from_utf8_lossy(&head[..end]).into_owned());
                }
                if head.len() > 64 * 1024 {
                    return None;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Decrements a counter when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(counter: &'a AtomicU64) -> Gauge<'a> {
        counter.fetch_add(1, Ordering::SeqCst);
        Gauge(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn hostile_connection(
    mut stream: TcpStream,
    port: u16,
    config: &HostileConfig,
    items: &HashMap<String, FakeItem>,
    stats: &HostileStats,
    stop: &AtomicBool,
) -> io::Result<()> {
    let Some(head) = hostile_head(&mut stream, stop) else {
        return Ok(());
    };
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or("");
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let range_start: Option<u64> = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .and_then(|(_, v)| {
            v.trim()
                .strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        });
    let path = target.split('?').next().unwrap_or("");
    let respond = |stream: &mut TcpStream, status: &str, headers: &str, body: &[u8]| {
        let text = format!(
            "HTTP/1.1 {status}\r\nConnection: close\r\n{headers}Content-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(text.as_bytes())?;
        stream.write_all(body)?;
        stream.flush()
    };

    if path == "/local/nix-cache-info" {
        return respond(
            &mut stream,
            "200 OK",
            "",
            b"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 5\n",
        );
    }
    if let Some(hash) = path
        .strip_prefix("/local/")
        .and_then(|p| p.strip_suffix(".narinfo"))
    {
        stats.narinfo_requests.fetch_add(1, Ordering::SeqCst);
        stats
            .narinfo_hashes
            .lock()
            .unwrap()
            .insert(hash.to_string());
        if config.hang_on_narinfo {
            sleep_unless(stop, HOSTILE_HOLD);
            return Ok(());
        }
        return match items.get(hash) {
            Some(item) => respond(
                &mut stream,
                "200 OK",
                "Content-Type: text/x-nix-narinfo\r\n",
                item.narinfo.as_bytes(),
            ),
            None => respond(&mut stream, "404 Not Found", "", b"not found\n"),
        };
    }
    let item = path
        .strip_prefix("/local/nar/")
        .and_then(|file| items.values().find(|i| i.nar_file == file));
    let Some(item) = item else {
        return respond(&mut stream, "404 Not Found", "", b"not found\n");
    };
    stats.nar_requests.fetch_add(1, Ordering::SeqCst);
    *stats.nar_ports.lock().unwrap().entry(port).or_default() += 1;
    if range_start.is_some() {
        stats.range_requests.fetch_add(1, Ordering::SeqCst);
    }
    let nar = &item.nar;
    let size = nar.len() as u64;
    let _streaming = Gauge::up(&stats.streaming);
    match config.nar {
        NarServe::Garbage => respond(
            &mut stream,
            "200 OK",
            "Content-Type: application/x-nix-nar\r\nAccept-Ranges: bytes\r\n",
            &garbage(nar.len(), 7),
        ),
        NarServe::IgnoreRangeTrickle { every } => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/x-nix-nar\r\nContent-Length: {size}\r\n\r\n"
            );
            stream.write_all(head.as_bytes())?;
            let bytes = (HOSTILE_HOLD.as_millis() / every.as_millis().max(1)) as usize;
            for byte in nar.iter().take(bytes) {
                stream.write_all(std::slice::from_ref(byte))?;
                if !sleep_unless(stop, every) {
                    break;
                }
            }
            let _ = stream.shutdown(Shutdown::Both);
            Ok(())
        }
        NarServe::Trickle { chunk, every } => {
            let start = range_start.filter(|s| *s < size).unwrap_or(0);
            let head = if start > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nConnection: close\r\nContent-Type: application/x-nix-nar\r\nAccept-Ranges: bytes\r\nContent-Range: bytes {start}-{}/{size}\r\nContent-Length: {}\r\n\r\n",
                    size - 1,
                    size - start
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/x-nix-nar\r\nAccept-Ranges: bytes\r\nContent-Length: {size}\r\n\r\n"
                )
            };
            stream.write_all(head.as_bytes())?;
            let rounds = HOSTILE_HOLD.as_millis() / every.as_millis().max(1);
            for piece in nar[start as usize..].chunks(chunk).take(rounds as usize) {
                stream.write_all(piece)?;
                if !sleep_unless(stop, every) {
                    break;
                }
            }
            let _ = stream.shutdown(Shutdown::Both);
            Ok(())
        }
    }
}

/// A child process killed on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path` from `host`'s peerix on its loopback, bounded; `Err` if no
/// complete answer.
fn lan_get(host: &LanHost, path: &str, bound: Duration) -> Result<http::Response, String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, LAN_PORT));
    let path = path.to_string();
    in_netns(&host.ns, move || {
        get_once(addr, &format!("127.0.0.1:{LAN_PORT}"), &path, bound)
    })
}

/// The loopback prober of a LAN host: `/nix-cache-info` and the narinfo of
/// `local`, a path in its own store.
fn lan_prober(host: &LanHost, local: &str) -> Prober {
    Prober::start(
        Some(&host.ns),
        LAN_PORT,
        &[
            "/nix-cache-info".into(),
            format!("/{}.narinfo", hash_part(local)),
        ],
    )
}

// ---------------------------------------------------------------------------
// 7. A peer that ignores Range and trickles while a resume skips ahead
// ---------------------------------------------------------------------------

/// D (with the better reputation) sends 8 MiB of the 50 MiB NAR and dies;
/// the only other holder, T, answers the resume's Range request with a 200
/// and the whole NAR from byte 0, one byte every half second: skipping to
/// the offset would take weeks. B's `nix-store -r` must end (from another
/// source or as a failure) within a generous bound with `--timeout 1`, and
/// B's loopback is answered meanwhile.
#[test]
fn attack_07_a_peer_that_ignores_range_and_trickles_cannot_stall_a_resume() {
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("range_trickle", 3);
    let mut b = signed_host(
        &dir,
        &lan,
        0,
        "b",
        &up,
        &[&many.first],
        &["--timeout", "1", "--lan-timeout", "300"],
    );
    let src = source_store(&dir, &up, &[&fx.big, &fx.busybox]);
    let d = FakePeer::start(
        &lan,
        1,
        vec![
            FakeItem::from_store(&src, &fx.busybox, NarMode::Honest),
            FakeItem::from_store(&src, &fx.big, NarMode::CloseAfter(8 * 1024 * 1024)),
        ],
        TcpMode::Serve,
    );
    let t = HostilePeer::start(
        &lan,
        2,
        HostileConfig {
            items: vec![FakeItem::from_store(&src, &fx.big, NarMode::Honest)],
            answer_every_query: false,
            hang_on_narinfo: false,
            nar: NarServe::IgnoreRangeTrickle {
                every: Duration::from_millis(500),
            },
            rotate_ports: 0,
        },
    );
    // D earns the better reputation with an honest fetch.
    let out = b.substitute(&[&up.public], &fx.busybox);
    assert_success(
        "nix-store -r busybox in B (from D, for its reputation)",
        &out,
    );

    let prober = lan_prober(&b, &many.first);
    prober.wait_answers(0, 1, "before the fetch");
    let env = b.nix();
    let log = dir.join("b-nix-store.log");
    let log_file = fs::File::create(&log).expect("creating the nix-store log");
    let mut child = ChildGuard(
        env.command("nix-store")
            .args(["--store", &b.host.store(), "-r", &fx.big])
            .args(["--option", "substituters", &b.url()])
            .args(["--option", "trusted-public-keys", &up.public])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file)
            .spawn()
            .expect("spawning nix-store -r in B"),
    );
    let started = Instant::now();
    const BOUND: Duration = Duration::from_secs(60);

    // Wait until T trickles to B, or nix has ended.
    let mut status = None;
    while Instant::now() - started < BOUND {
        status = child.0.try_wait().expect("waiting for nix-store");
        if status.is_some() || HostileStats::get(&t.stats.streaming) >= 1 {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "range trickle: D cut {} NAR(s); T ({}) got {} NAR request(s), {} with Range, {} trickling now",
        FakeStats::get(&d.stats.nars_cut),
        t.addr(),
        HostileStats::get(&t.stats.nar_requests),
        HostileStats::get(&t.stats.range_requests),
        HostileStats::get(&t.stats.streaming)
    );
    if status.is_none() && HostileStats::get(&t.stats.streaming) >= 1 {
        answered_during_or_shed(&prober, "T trickles a NAR that ignores Range to B", || {
            let n = HostileStats::get(&t.stats.streaming);
            if n >= 1 {
                Ok(format!("T is trickling {n} response(s)"))
            } else {
                Err("T is no longer trickling".into())
            }
        });
    }
    // nix's request must end within the bound.
    while status.is_none() && Instant::now() - started < BOUND {
        status = child.0.try_wait().expect("waiting for nix-store");
        thread::sleep(Duration::from_millis(100));
    }
    let log_text = fs::read_to_string(&log).unwrap_or_default();
    let Some(status) = status else {
        panic!(
            "expected B's nix-store -r to end (from another source or as a failure) within {} s \
             with --timeout 1; it was still running, with T trickling {} response(s) \
             ({} NAR requests to T, {} with Range). nix-store output:\n{log_text}",
            BOUND.as_secs(),
            HostileStats::get(&t.stats.streaming),
            HostileStats::get(&t.stats.nar_requests),
            HostileStats::get(&t.stats.range_requests)
        );
    };
    eprintln!("range trickle: B's nix-store -r ended with {status}:\n{log_text}");
    assert!(
        HostileStats::get(&t.stats.nar_requests) >= 1,
        "expected B to have tried T after D died (the scenario under test); T saw no NAR request"
    );
    drop(child);
    prober.finish("a resume from a peer that ignores Range");
    b.peerix_mut().assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 8. Peers trickling just above the floor
// ---------------------------------------------------------------------------

/// T serves the 50 MiB NAR at one 128 KiB chunk every 1.2 s, above the
/// floor of one chunk per `--timeout 2`, so B keeps each transfer. 16
/// downloads run through B's peerix at once; B's loopback narinfo of a
/// local path and `/nix-cache-info` must be answered while all 16 are in
/// progress.
#[test]
fn attack_08_downloads_trickling_just_above_the_floor_do_not_starve_loopback() {
    const DOWNLOADS: usize = 16;
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("floor_trickle", 2);
    let mut b = signed_host(
        &dir,
        &lan,
        0,
        "b",
        &up,
        &[&many.first],
        &["--timeout", "2", "--lan-timeout", "300"],
    );
    let src = source_store(&dir, &up, &[&fx.big]);
    let t = HostilePeer::start(
        &lan,
        1,
        HostileConfig {
            items: vec![FakeItem::from_store(&src, &fx.big, NarMode::Honest)],
            answer_every_query: false,
            hang_on_narinfo: false,
            nar: NarServe::Trickle {
                chunk: 128 * 1024,
                every: Duration::from_millis(1200),
            },
            rotate_ports: 0,
        },
    );
    let narinfo = lan_get(
        &b,
        &format!("/{}.narinfo", hash_part(&fx.big)),
        PROBE_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("B's narinfo of the big path: {e}"));
    assert_eq!(
        narinfo.status,
        200,
        "B's narinfo of the big path (found on T): {}",
        narinfo.describe()
    );
    let url = format!("/{}", NarInfoText::read(&narinfo.text()).field("URL"));
    let prober = lan_prober(&b, &many.first);
    prober.wait_answers(0, 1, "before the downloads");

    // 16 downloads in B's namespace, each reading what comes.
    let stop = Arc::new(AtomicBool::new(false));
    let ended = Arc::new(AtomicU64::new(0));
    let downloads: Vec<JoinHandle<(u64, String)>> = (0..DOWNLOADS)
        .map(|i| {
            let (stop, ended, url) = (stop.clone(), ended.clone(), url.clone());
            spawn_in(Some(b.ns.clone()), &format!("download-{i}"), move || {
                let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, LAN_PORT));
                let outcome = (|| {
                    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                        .map_err(|e| format!("connect: {e}"))?;
                    stream
                        .write_all(
                            format!(
                                "GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{LAN_PORT}\r\nConnection: close\r\n\r\n"
                            )
                            .as_bytes(),
                        )
                        .map_err(|e| format!("send: {e}"))?;
                    let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut got = 0u64;
                    let mut first = Vec::new();
                    for _ in 0..3000 {
                        if stop.load(Ordering::SeqCst) {
                            return Ok((got, format!("still running at stop; {:?}", first_line(&first))));
                        }
                        match stream.read(&mut buf) {
                            Ok(0) => return Err(format!("ended after {got} bytes: {:?}", first_line(&first))),
                            Ok(n) => {
                                if first.len() < 200 {
                                    first.extend_from_slice(&buf[..n.min(200)]);
                                }
                                got += n as u64;
                            }
                            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                            Err(e) => return Err(format!("failed after {got} bytes: {e}")),
                        }
                    }
                    Ok((got, "read bound reached".into()))
                })();
                match outcome {
                    Ok(v) => v,
                    Err(e) => {
                        ended.fetch_add(1, Ordering::SeqCst);
                        (0, e)
                    }
                }
            })
        })
        .collect();

    let streaming = || HostileStats::get(&t.stats.streaming);
    // Wait (bounded) for T to be sending all 16; fewer is tolerated only if
    // B holds the rest back itself, which the check below sees.
    let deadline = Instant::now() + Duration::from_secs(30);
    while streaming() < DOWNLOADS as u64 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "floor trickle: T is sending {} of {DOWNLOADS} downloads; {} downloads ended",
        streaming(),
        ended.load(Ordering::SeqCst)
    );
    assert_answered_during(
        &prober,
        "16 downloads from a peer trickling just above the floor run through B",
        || {
            let (n, gone) = (streaming(), ended.load(Ordering::SeqCst));
            let state = format!("T sending {n}, {gone} of {DOWNLOADS} downloads ended");
            if n >= 1 && gone == 0 {
                Ok(state)
            } else {
                Err(state)
            }
        },
    );
    stop.store(true, Ordering::SeqCst);
    let results: Vec<(u64, String)> = downloads
        .into_iter()
        .map(|d| d.join().expect("a download thread panicked"))
        .collect();
    eprintln!("floor trickle downloads: {results:?}");
    drop(t);
    prober.finish("downloads trickling above the floor");
    b.peerix_mut().assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 9. A liar rotating its port
// ---------------------------------------------------------------------------

/// L answers every query for its path with a different HTTP port; every
/// port serves the same honest, signed narinfo and a garbage NAR. Across 6
/// attempts by B (narinfo, then the NAR through B), L's NAR is fetched at
/// most once: after that L's host is banned, whatever port it names.
#[test]
fn attack_09_a_liar_rotating_its_port_is_banned_by_host() {
    const ATTEMPTS: usize = 6;
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("rotating_liar", 2);
    let mut b = signed_host(
        &dir,
        &lan,
        0,
        "b",
        &up,
        &[&fx.busybox],
        &["--timeout", "1", "--lan-timeout", "300"],
    );
    let src = source_store(&dir, &up, &[&many.first]);
    let l = HostilePeer::start(
        &lan,
        1,
        HostileConfig {
            items: vec![FakeItem::from_store(&src, &many.first, NarMode::Honest)],
            answer_every_query: false,
            hang_on_narinfo: false,
            nar: NarServe::Garbage,
            rotate_ports: 2 * ATTEMPTS + 4,
        },
    );
    let prober = lan_prober(&b, &fx.busybox);
    let narinfo_path = format!("/{}.narinfo", hash_part(&many.first));
    let mut attempts = Vec::new();
    for attempt in 1..=ATTEMPTS {
        let narinfo = lan_get(&b, &narinfo_path, Duration::from_secs(30));
        let outcome = match narinfo {
            Ok(r) if r.status == 200 => {
                let url = format!("/{}", NarInfoText::read(&r.text()).field("URL"));
                match lan_get(&b, &url, Duration::from_secs(30)) {
                    Ok(nar) => format!("narinfo 200 ({url}), NAR {}", nar.status),
                    Err(e) => format!("narinfo 200 ({url}), NAR cut off: {e}"),
                }
            }
            Ok(r) => format!("narinfo {}", r.status),
            Err(e) => format!("narinfo: {e}"),
        };
        attempts.push(format!(
            "attempt {attempt}: {outcome}; L's NAR served {} times so far",
            HostileStats::get(&l.stats.nar_requests)
        ));
    }
    let served = HostileStats::get(&l.stats.nar_requests);
    let ports = l.stats.nar_ports.lock().unwrap().clone();
    eprintln!(
        "rotating liar: L's NAR was served {served} times, on ports {ports:?} (of {:?}); L replied to {} queries\n{}",
        l.ports,
        HostileStats::get(&l.stats.udp_replies),
        attempts.join("\n")
    );
    assert!(
        served <= 1,
        "expected B to fetch the rotating liar's NAR at most once (then ban its host, whatever \
         port it names); it was fetched {served} times, on ports {ports:?}:\n{}",
        attempts.join("\n")
    );
    prober.finish("a liar rotating its port");
    b.peerix_mut().assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 10. A hanging peer rotating its port
// ---------------------------------------------------------------------------

/// Valid hash parts nobody has: `n` distinct 32-character nix32 strings.
fn random_hashes(n: usize) -> Vec<String> {
    const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut x =
        (u64::from(std::process::id()) << 20) ^ u64::from(unique_number()) ^ 0x9e37_79b9_7f4a_7c15;
    let mut set = BTreeSet::new();
    while set.len() < n {
        let hash: String = (0..32)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                NIX32[(x % 32) as usize] as char
            })
            .collect();
        set.insert(hash);
    }
    set.into_iter().collect()
}

/// L answers every LAN query, whatever the hash, naming a different HTTP
/// port each time, and never answers the narinfo requests that follow. B
/// misses 32 distinct paths; L must see narinfo requests for far fewer of
/// them than 32 (B backs off L's host, also for L's UDP replies, which it
/// ignores and counts in `/health` as `lan.replies_shunned`), and B's
/// loopback is answered meanwhile. Counts, never times.
#[test]
fn attack_10_a_hanging_peer_rotating_its_port_is_backed_off_by_host() {
    const MISSES: usize = 32;
    const AT_MOST: usize = 8;
    let fx = realistic_fixture();
    let (dir, lan, up) = world("rotating_hang", 2);
    let mut b = signed_host(
        &dir,
        &lan,
        0,
        "b",
        &up,
        &[&fx.busybox],
        &["--timeout", "1", "--lan-timeout", "200"],
    );
    let l = HostilePeer::start(
        &lan,
        1,
        HostileConfig {
            items: Vec::new(),
            answer_every_query: true,
            hang_on_narinfo: true,
            nar: NarServe::Garbage,
            rotate_ports: MISSES,
        },
    );
    let prober = lan_prober(&b, &fx.busybox);
    prober.wait_answers(0, 1, "before the misses");
    let mark = prober.answered();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for hash in random_hashes(MISSES) {
        let got = match lan_get(&b, &format!("/{hash}.narinfo"), Duration::from_secs(30)) {
            Ok(r) => r.status.to_string(),
            Err(e) => format!("no answer: {e}"),
        };
        *statuses.entry(got).or_default() += 1;
        prober.assert_no_failure("while B misses paths a hanging peer claims");
    }
    let asked = l.stats.narinfo_hashes.lock().unwrap().len();
    let shunned = b.lan_counter("replies_shunned");
    eprintln!(
        "rotating hang: B's answers to {MISSES} misses: {statuses:?}; L replied to {} of {} queries \
         and got narinfo requests for {asked} distinct hashes ({} requests); B shunned {shunned} \
         replies; loopback answered {} times meanwhile",
        HostileStats::get(&l.stats.udp_replies),
        HostileStats::get(&l.stats.udp_requests),
        HostileStats::get(&l.stats.narinfo_requests),
        prober.answered() - mark
    );
    assert!(
        prober.answered() > mark,
        "expected B's loopback to be answered while it missed {MISSES} paths"
    );
    assert!(
        HostileStats::get(&l.stats.udp_replies) >= (MISSES / 2) as u64,
        "expected L to have answered most of B's queries (the attack under test)"
    );
    assert!(
        statuses.keys().all(|s| s == "404"),
        "expected every miss to be a 404 (never a 5xx, never no answer): {statuses:?}"
    );
    assert!(
        asked <= AT_MOST,
        "expected B to back off the hanging peer's host whatever port it names: L got narinfo \
         requests for {asked} of {MISSES} missed paths, expected at most {AT_MOST}"
    );
    // The replies of a peer in backoff are ignored on the UDP path (they
    // neither count as answers nor shorten the wait), and counted.
    assert!(
        shunned >= 1,
        "expected B to ignore (and count in /health lan.replies_shunned) the UDP replies of the \
         hanging peer while it is in backoff; replies_shunned is {shunned} after {MISSES} misses \
         ({} replies from L)",
        HostileStats::get(&l.stats.udp_replies)
    );
    prober.finish("a hanging peer rotating its port");
    b.peerix_mut().assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// 10b. Several hanging peers share one lookup deadline
// ---------------------------------------------------------------------------

/// Three hostile peers, each in a namespace of its own, answer B's LAN
/// query for one hash and then never answer the narinfo request that
/// follows. One lookup on B (a root narinfo request) must be a 404, and
/// only ONE of the three may get a narinfo request: the requests of one
/// lookup share one deadline (one `--timeout` from the first answers), and
/// the first hang spends it. A lookup that gave each peer a fresh timeout
/// would ask all three. Counts, never times.
#[test]
fn attack_10b_hanging_peers_share_one_lookup_deadline() {
    const HANGING: usize = 3;
    let fx = realistic_fixture();
    let (dir, lan, up) = world("shared_deadline", HANGING + 1);
    // A LAN window long enough that all three replies arrive in it, and a
    // narinfo timeout far shorter than the bound on the lookup below.
    let mut b = signed_host(
        &dir,
        &lan,
        0,
        "b",
        &up,
        &[&fx.busybox],
        &["--timeout", "1", "--lan-timeout", "1000"],
    );
    let peers: Vec<HostilePeer> = (1..=HANGING)
        .map(|i| {
            HostilePeer::start(
                &lan,
                i,
                HostileConfig {
                    items: Vec::new(),
                    answer_every_query: true,
                    hang_on_narinfo: true,
                    nar: NarServe::Garbage,
                    rotate_ports: 0,
                },
            )
        })
        .collect();
    let prober = lan_prober(&b, &fx.busybox);
    prober.wait_answers(0, 1, "before the lookup");

    let hash = random_hashes(1).remove(0);
    let got = lan_get(&b, &format!("/{hash}.narinfo"), Duration::from_secs(30));
    let counts =
        |f: fn(&HostileStats) -> u64| -> Vec<u64> { peers.iter().map(|p| f(&p.stats)).collect() };
    let replies = counts(|s| HostileStats::get(&s.udp_replies));
    let asked = counts(|s| HostileStats::get(&s.narinfo_requests));
    eprintln!(
        "shared deadline: B's lookup: {:?}; UDP replies of the {HANGING} hanging peers {replies:?}, \
         narinfo requests they got {asked:?}",
        got.as_ref().map(|r| r.status)
    );
    let response = got.unwrap_or_else(|e| panic!("B's lookup of a path only liars claim: {e}"));
    assert_eq!(
        response.status,
        404,
        "B's lookup of a path whose holders all hang: {}",
        response.describe()
    );
    assert!(
        replies.iter().all(|&n| n >= 1),
        "expected each of the {HANGING} hanging peers to answer B's query (the scenario under \
         test); their replies: {replies:?}"
    );
    let total: u64 = asked.iter().sum();
    assert!(
        total == 1,
        "expected exactly one narinfo request among the {HANGING} hanging peers: the narinfo \
         requests of one lookup share one deadline of one --timeout, which the first hang spends; \
         they got {asked:?}"
    );
    drop(peers);
    prober.finish("hanging peers sharing one lookup deadline");
    b.peerix_mut().assert_alive_without_panic();
}
