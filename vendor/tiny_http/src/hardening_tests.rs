//! Tests of the peerix hardening against hostile clients. Every test runs
//! its own server on an ephemeral loopback port and sends traffic to
//! loopback only; every loop is bounded.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::connection::Connection;
use crate::{Acceptor, Limits, ListenAddr, Request, Response, Server};

/// Generous bound for anything that should happen "soon".
const PATIENCE: Duration = Duration::from_secs(15);

/// Limits with short timeouts, so the tests that wait for them are quick.
fn quick_limits() -> Limits {
    Limits {
        head_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        body_timeout: Duration::from_secs(1),
        max_drain: 1000,
        ..Limits::default()
    }
}

/// A server with worker threads answering by path; stopped when dropped.
struct TestServer {
    addr: SocketAddr,
    server: Option<Arc<Server>>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl TestServer {
    fn start(limits: Limits) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Server::from_listener_with_limits(listener, None, limits).unwrap();
        Self::with_server(server, addr)
    }

    fn with_acceptor<A: Acceptor>(acceptor: A, addr: SocketAddr, limits: Limits) -> TestServer {
        let server = Server::start(acceptor, ListenAddr::IP(addr), None, limits).unwrap();
        Self::with_server(server, addr)
    }

    fn with_server(server: Server, addr: SocketAddr) -> TestServer {
        let server = Arc::new(server);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..6)
            .map(|_| {
                let server = Arc::clone(&server);
                let stop = Arc::clone(&stop);
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(Some(rq)) = server.recv_timeout(Duration::from_millis(50)) {
                            handle(rq);
                        }
                    }
                })
            })
            .collect();
        TestServer {
            addr,
            server: Some(server),
            stop,
            workers,
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        s
    }

    /// One GET on a new connection answers 200.
    fn assert_serves(&self) {
        let mut s = self.connect();
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]));
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        drop(self.server.take());
    }
}

fn text(s: String) -> Response<io::Cursor<Vec<u8>>> {
    Response::from_string(s)
}

fn handle(mut rq: Request) {
    let url = rq.url().to_owned();
    match url.as_str() {
        "/ignore" => {
            let _ = rq.respond(text("ignored".into()));
        }
        "/read" => {
            let mut body = Vec::new();
            match rq.as_reader().read_to_end(&mut body) {
                Ok(n) => {
                    let _ = rq.respond(text(format!("read {}", n)));
                }
                Err(e) => {
                    let _ = rq.respond(text(format!("body error: {}", e)).with_status_code(400));
                }
            }
        }
        "/range" => {
            let range = rq
                .headers()
                .iter()
                .find(|h| h.field.equiv("Range"))
                .map(|h| h.value.to_string())
                .unwrap_or_default();
            let _ = rq.respond(text(range));
        }
        "/socket" => {
            // the head through the writer, the body straight to the socket
            let socket = rq.socket().expect("a TCP request has a socket");
            let mut writer = rq.into_writer();
            writer
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
                .unwrap();
            writer.flush().unwrap();
            (&*socket).write_all(b"direct").unwrap();
        }
        "/abort" => {
            let socket = rq.socket().expect("a TCP request has a socket");
            let mut writer = rq.into_writer();
            writer
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                .unwrap();
            writer.flush().unwrap();
            socket.shutdown(Shutdown::Both).unwrap();
        }
        _ if url.starts_with("/delay/") => {
            let ms: u64 = url["/delay/".len()..].parse().unwrap_or(0);
            thread::sleep(Duration::from_millis(ms));
            let _ = rq.respond(text(url.clone()));
        }
        _ => {
            let _ = rq.respond(text("ok".into()));
        }
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn closes(&self) -> bool {
        self.header("Connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Reads one response (a 1xx one has no body).
fn read_response(s: &mut TcpStream) -> io::Result<Resp> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(ErrorKind::UnexpectedEof, "no response"));
        }
        head.push(byte[0]);
        assert!(head.len() < 64 * 1024, "response head too long");
    }
    let head = String::from_utf8(head).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    let mut r = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(len) = r.header("Content-Length") {
        let mut body = vec![0; len.parse().unwrap()];
        s.read_exact(&mut body)?;
        r.body = body;
    } else if r.header("Transfer-Encoding").is_some() {
        loop {
            let mut line = Vec::new();
            while !line.ends_with(b"\r\n") {
                s.read_exact(&mut byte)?;
                line.push(byte[0]);
            }
            let size =
                usize::from_str_radix(std::str::from_utf8(&line).unwrap().trim(), 16).unwrap();
            let mut chunk = vec![0; size + 2];
            s.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            r.body.extend_from_slice(&chunk[..size]);
        }
    }
    Ok(r)
}

/// True if the server closes the connection within `within` (what it still
/// sends is read and thrown away, boundedly).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        let left = match deadline.checked_duration_since(Instant::now()) {
            Some(d) if !d.is_zero() => d,
            _ => return false,
        };
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true, // reset
        }
    }
    false
}

// 1. A huge Content-Length without a body.

#[test]
fn huge_content_length_without_body_is_not_allocated() {
    let server = TestServer::start(quick_limits());
    for path in ["/ignore", "/read", "/"] {
        let mut s = server.connect();
        let rq = format!(
            "POST {} HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000000\r\n\r\n",
            path
        );
        s.write_all(rq.as_bytes()).unwrap();
        let r = read_response(&mut s).unwrap();
        if path == "/read" {
            // the application's read timed out
            assert_eq!(r.status, 400, "{:?}", r);
        } else {
            assert_eq!(r.status, 200);
        }
        assert!(r.closes(), "{} left the connection open: {:?}", path, r);
        assert!(closed_within(&mut s, PATIENCE));
    }
    // also when the client goes away at once
    for _ in 0..20 {
        let mut s = server.connect();
        s.write_all(b"POST /ignore HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n")
            .unwrap();
    }
    // a Content-Length past u64 is a bad request
    let mut s = server.connect();
    s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 400);
    server.assert_serves();
}

// 2. Bodies that never come, and Expect: 100-continue.

#[test]
fn announced_body_that_never_comes() {
    let server = TestServer::start(Limits {
        max_drain: 4000,
        ..quick_limits()
    });
    // small enough to be read with the head: the connection is dropped
    let mut s = server.connect();
    s.write_all(b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        .unwrap();
    assert!(closed_within(&mut s, PATIENCE));

    // within max_drain but not sent: answered, then closed when the drain
    // times out
    let mut s = server.connect();
    s.write_all(b"POST /ignore HTTP/1.1\r\nContent-Length: 2000\r\n\r\nabc")
        .unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.closes());
    assert!(closed_within(&mut s, PATIENCE));

    // the application reads it: its read times out
    let mut s = server.connect();
    s.write_all(b"POST /read HTTP/1.1\r\nContent-Length: 5000\r\n\r\nabc")
        .unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.closes());
    assert!(closed_within(&mut s, PATIENCE));
    server.assert_serves();
}

#[test]
fn expect_continue() {
    let server = TestServer::start(quick_limits());
    // not read: no 100 Continue, the answer closes the connection
    let mut s = server.connect();
    s.write_all(b"POST /ignore HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 500\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.closes());
    assert!(closed_within(&mut s, PATIENCE));

    // read: 100 Continue, then the answer, and the connection goes on
    let mut s = server.connect();
    s.write_all(b"POST /read HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 100);
    s.write_all(b"hello").unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"read 5"[..]));
    assert!(!r.closes());
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
}

// 4. Lines and heads bounded while read.

#[test]
fn endless_header_line_is_cut() {
    let server = TestServer::start(Limits::default());
    let mut s = server.connect();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nX-Endless: ").unwrap();
    let chunk = [b'a'; 64 * 1024];
    let bound: usize = 256 * 1024 * 1024;
    let mut written = 0;
    while written < bound {
        match s.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break, // reset, or the server stopped reading
        }
    }
    // The server stopped taking bytes long before the bound (socket buffers
    // hold a few MiB at most).
    assert!(written < 64 * 1024 * 1024, "{} bytes taken", written);
    // The 431 may be lost to the reset the close causes; the connection is
    // closed either way.
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    if let Ok(r) = read_response(&mut s) {
        assert_eq!(r.status, 431);
    }
    server.assert_serves();
}

#[test]
fn long_lines_and_heads_are_answered() {
    let server = TestServer::start(Limits::default());
    let cases: [(String, u16); 3] = [
        (format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000)), 414),
        (
            format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000)),
            431,
        ),
        (
            format!(
                "GET / HTTP/1.1\r\n{}\r\n",
                (0..10)
                    .map(|i| format!("X-{}: {}\r\n", i, "b".repeat(2000)))
                    .collect::<String>()
            ),
            431,
        ),
    ];
    for (rq, status) in cases.iter() {
        let mut s = server.connect();
        s.write_all(rq.as_bytes()).unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, *status);
        assert!(r.closes());
        assert!(closed_within(&mut s, PATIENCE));
    }
    // just within the limits is fine
    let mut s = server.connect();
    let rq = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(8000));
    s.write_all(rq.as_bytes()).unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
}

// 12. Other HTTP versions.

#[test]
fn http2_gets_505_and_close() {
    let server = TestServer::start(Limits::default());
    for rq in [
        &b"GET / HTTP/2.0\r\nHost: t\r\n\r\n"[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/0.9\r\n\r\n",
    ] {
        let mut s = server.connect();
        s.write_all(rq).unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, 505);
        assert!(r.closes());
        assert!(closed_within(&mut s, PATIENCE));
    }
    let mut s = server.connect();
    s.write_all(b"GET / HTTPX\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 400);
}

// 3. Connection caps.

/// Accepts on several loopback listeners; connections on listener `i > 0`
/// are reported as coming from a made-up documentation address
/// 192.0.2.(i) (a label only: all traffic stays on loopback).
struct LabelledAcceptor {
    listeners: Vec<TcpListener>,
}

impl LabelledAcceptor {
    fn new(n: usize) -> (LabelledAcceptor, Vec<SocketAddr>) {
        let listeners: Vec<TcpListener> = (0..n)
            .map(|_| {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        let addrs = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        (LabelledAcceptor { listeners }, addrs)
    }
}

impl Acceptor for LabelledAcceptor {
    fn accept(&self) -> io::Result<(Connection, Option<SocketAddr>)> {
        loop {
            for (i, l) in self.listeners.iter().enumerate() {
                match l.accept() {
                    Ok((s, peer)) => {
                        s.set_nonblocking(false)?;
                        let peer = if i == 0 {
                            peer
                        } else {
                            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, i as u8)), 4000)
                        };
                        return Ok((Connection::from(s), Some(peer)));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Opens a connection to `addr` and makes one request on it; the connection
/// if it was served, `None` if it was refused.
fn try_open(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(PATIENCE)).unwrap();
    if s.write_all(b"GET / HTTP/1.1\r\n\r\n").is_err() {
        return None;
    }
    match read_response(&mut s) {
        Ok(r) if r.status == 200 => Some(s),
        Ok(r) => {
            assert_eq!(r.status, 503);
            None
        }
        Err(_) => None,
    }
}

/// Like `try_open`, retrying for a while: a closed connection gives its
/// place back once its thread has noticed.
fn open_eventually(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(s) = try_open(addr) {
            return s;
        }
        assert!(Instant::now() < deadline, "no place freed up");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn caps_refuse_extra_connections_but_keep_loopback_served() {
    let limits = Limits {
        max_connections: 6,
        max_remote_connections: 3,
        max_connections_per_ip: 2,
        ..Limits::default()
    };
    let (acceptor, addrs) = LabelledAcceptor::new(4);
    let (local, a, b, c) = (addrs[0], addrs[1], addrs[2], addrs[3]);
    let _server = TestServer::with_acceptor(acceptor, local, limits);

    let a1 = try_open(a).expect("first from A");
    let _a2 = try_open(a).expect("second from A");
    assert!(try_open(a).is_none(), "third from A is over the per-IP cap");
    let _b1 = try_open(b).expect("first from B");
    assert!(try_open(c).is_none(), "C is over the remote cap");

    // loopback keeps the rest of the places
    let l1 = try_open(local).expect("loopback 1");
    let _l2 = try_open(local).expect("loopback 2");
    let _l3 = try_open(local).expect("loopback 3");
    assert!(try_open(local).is_none(), "over the total cap");

    // the served connections still work
    let mut l1 = l1;
    l1.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut l1).unwrap().status, 200);

    // closing one gives its place back
    drop(a1);
    drop(l1);
    let _c1 = open_eventually(c);
    let _l4 = open_eventually(local);
}

#[test]
fn connections_over_the_cap_do_not_stall_loopback() {
    // many idle "remote" connections; loopback is still served promptly
    let limits = Limits {
        max_connections: 20,
        max_remote_connections: 10,
        max_connections_per_ip: 64,
        ..Limits::default()
    };
    let (acceptor, addrs) = LabelledAcceptor::new(2);
    let server = TestServer::with_acceptor(acceptor, addrs[0], limits);
    let idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(addrs[1]).unwrap())
        .collect();
    for _ in 0..5 {
        server.assert_serves();
    }
    drop(idle);
}

// 3. Accept errors.

/// A listener whose first `fail` accepts fail with EMFILE.
struct FailingAcceptor {
    inner: TcpListener,
    fail: AtomicUsize,
    failures: Arc<AtomicUsize>,
    script: Mutex<VecDeque<io::Error>>,
}

impl Acceptor for FailingAcceptor {
    fn accept(&self) -> io::Result<(Connection, Option<SocketAddr>)> {
        if let Some(e) = self.script.lock().unwrap().pop_front() {
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        if self.fail.load(Ordering::SeqCst) > 0 {
            self.fail.fetch_sub(1, Ordering::SeqCst);
            self.failures.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::from_raw_os_error(24)); // EMFILE
        }
        self.inner
            .accept()
            .map(|(s, peer)| (Connection::from(s), Some(peer)))
    }
}

#[test]
fn accept_errors_do_not_stop_the_server() {
    let inner = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inner.local_addr().unwrap();
    let failures = Arc::new(AtomicUsize::new(0));
    let script = [
        io::Error::from(ErrorKind::ConnectionAborted),
        io::Error::from_raw_os_error(23),  // ENFILE
        io::Error::from_raw_os_error(105), // ENOBUFS
    ];
    let acceptor = FailingAcceptor {
        inner,
        fail: AtomicUsize::new(10),
        failures: Arc::clone(&failures),
        script: Mutex::new(VecDeque::from(Vec::from(script))),
    };
    let server = TestServer::with_acceptor(acceptor, addr, Limits::default());
    server.assert_serves();
    assert_eq!(failures.load(Ordering::SeqCst), 13);
    server.assert_serves();
}

// 2. Deadlines.

#[test]
fn slowloris_head_is_cut_by_the_deadline() {
    let server = TestServer::start(quick_limits());
    let mut s = server.connect();
    s.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    // one byte every 100 ms: each read is quick, the head never ends; the
    // client would need 20 s for the 200 bytes.
    let mut closed = false;
    for _ in 0..200 {
        if s.write_all(b"x").is_err() {
            closed = true;
            break;
        }
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        match s.read(&mut [0u8; 64]) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => panic!("no answer expected to a slowloris head"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the slow head was not cut");
    server.assert_serves();
}

#[test]
fn silent_connection_and_idle_keep_alive_are_closed() {
    let server = TestServer::start(quick_limits());
    // connected, nothing sent
    let mut silent = server.connect();
    // kept alive: requests within the idle time are served, then it closes
    let mut s = server.connect();
    for _ in 0..3 {
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, 200);
        assert!(!r.closes());
        thread::sleep(Duration::from_millis(100));
    }
    assert!(closed_within(&mut s, PATIENCE));
    assert!(closed_within(&mut silent, PATIENCE));
    server.assert_serves();
}

#[test]
fn long_response_is_not_idle() {
    // a response that takes longer than the idle timeout keeps its
    // connection, and the next request on it is served
    let server = TestServer::start(quick_limits());
    let mut s = server.connect();
    s.write_all(b"GET /delay/2500 HTTP/1.1\r\n\r\n").unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.body, b"/delay/2500");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
}

// Draining unread bodies.

#[test]
fn unread_bodies_are_drained_within_the_limit() {
    let server = TestServer::start(quick_limits()); // max_drain 1000
    let mut s = server.connect();

    // within the limit: drained, the connection goes on
    let body = "x".repeat(900);
    let rq = format!(
        "POST /ignore HTTP/1.1\r\nContent-Length: 900\r\n\r\n{}",
        body
    );
    s.write_all(rq.as_bytes()).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.closes());

    // a small chunked body, unread: drained too
    s.write_all(
        b"POST /ignore HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);

    // and read: decoded
    s.write_all(b"POST /read HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: v\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().body, b"read 5");

    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);

    // past the limit: answered with Connection: close, then closed
    let body = "x".repeat(5000);
    let rq = format!(
        "POST /ignore HTTP/1.1\r\nContent-Length: 5000\r\n\r\n{}",
        body
    );
    s.write_all(rq.as_bytes()).unwrap();
    let r = read_response(&mut s).unwrap();
    assert!(r.closes());
    assert!(closed_within(&mut s, PATIENCE));

    // an endless chunked body, unread: closed
    let mut s = server.connect();
    s.write_all(b"POST /ignore HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nffffff\r\n")
        .unwrap();
    let _ = s.write_all(&[b'y'; 4000]);
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    let filler = [b'y'; 1000];
    for _ in 0..100 {
        if s.write_all(&filler).is_err() {
            break;
        }
    }
    assert!(closed_within(&mut s, PATIENCE));
    server.assert_serves();
}

// 13. The socket.

#[test]
fn socket_for_direct_writes_and_abort() {
    let server = TestServer::start(Limits::default());
    let mut s = server.connect();
    s.write_all(b"GET /socket HTTP/1.1\r\n\r\n").unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.body, b"direct");
    // the connection goes on
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);

    let mut s = server.connect();
    s.write_all(b"GET /abort HTTP/1.1\r\n\r\n").unwrap();
    // the response stops short: the client sees the end at once
    assert!(read_response(&mut s).is_err());
    server.assert_serves();
}

// What must keep working.

#[test]
fn pipelined_responses_keep_their_order() {
    let server = TestServer::start(Limits::default());
    let mut s = server.connect();
    s.write_all(
        b"GET /delay/300 HTTP/1.1\r\n\r\nGET /delay/0 HTTP/1.1\r\n\r\nPOST /read HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /range HTTP/1.1\r\nRange: bytes=5-9\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut s).unwrap().body, b"/delay/300");
    assert_eq!(read_response(&mut s).unwrap().body, b"/delay/0");
    assert_eq!(read_response(&mut s).unwrap().body, b"read 3");
    assert_eq!(read_response(&mut s).unwrap().body, b"bytes=5-9");
}

#[test]
fn http10_and_connection_close() {
    let server = TestServer::start(Limits::default());
    let mut s = server.connect();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    assert!(closed_within(&mut s, PATIENCE));

    let mut s = server.connect();
    s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut s).unwrap().status, 200);
    assert!(closed_within(&mut s, PATIENCE));
}

#[test]
fn bad_framing_is_a_bad_request() {
    let server = TestServer::start(Limits::default());
    for rq in [
        &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n",
    ] {
        let mut s = server.connect();
        s.write_all(rq).unwrap();
        let r = read_response(&mut s).unwrap();
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(rq));
        assert!(closed_within(&mut s, PATIENCE));
    }
    server.assert_serves();
}

#[test]
fn num_connections_counts_open_connections() {
    let server = TestServer::start(quick_limits());
    let count = || server.server.as_ref().unwrap().num_connections();
    let deadline = Instant::now() + PATIENCE;
    let mut s = server.connect();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    read_response(&mut s).unwrap();
    assert!(count() >= 1);
    drop(s);
    while count() != 0 {
        assert!(
            Instant::now() < deadline,
            "the connection's place was not given back"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn unbounded_timeouts_do_not_overflow() {
    let server = TestServer::start(Limits {
        head_timeout: Duration::MAX,
        idle_timeout: Duration::MAX,
        body_timeout: Duration::MAX,
        ..Limits::default()
    });
    let mut s = server.connect();
    for _ in 0..2 {
        s.write_all(b"POST /read HTTP/1.1\r\nContent-Length: 2000\r\n\r\n")
            .unwrap();
        s.write_all(&[b'z'; 2000]).unwrap();
        assert_eq!(read_response(&mut s).unwrap().body, b"read 2000");
    }
}
