//! The `peerix-tracker` binary, as a process on loopback with a real SQLite
//! file, driven by requests signed with `peerix::tracker::auth` (the format
//! peerix's client uses). The database is inspected read-only with rusqlite
//! to show what a request did, or did not, change.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::http::{self, Response};
use common::{TestDir, poll_until};
use peerix::identity::Identity;
use peerix::nix::nix32;
use peerix::tracker::auth::{self, NODE_HEADER, SIGNATURE_HEADER, TIME_HEADER};
use rusqlite::{Connection, OpenFlags};
use serde_json::{Value, json};

fn tracker_binary() -> PathBuf {
    std::env::var_os("PEERIX_TRACKER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_peerix-tracker")))
}

/// A running tracker on 127.0.0.1 (a port of its own choosing), killed on
/// drop; its stderr is printed when the test fails.
struct Tracker {
    addr: SocketAddr,
    stderr_path: PathBuf,
    child: Child,
}

impl Tracker {
    fn start(dir: &TestDir, db: &Path, extra: &[&str]) -> Tracker {
        let stderr_path = dir.join(&format!("tracker-{}.log", common::unique_number()));
        let stderr = fs::File::create(&stderr_path).unwrap();
        let child = Command::new(tracker_binary())
            .args(["--bind", "127.0.0.1", "--port", "0", "--db"])
            .arg(db)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting peerix-tracker");
        let mut tracker = Tracker {
            addr: "127.0.0.1:1".parse().unwrap(),
            stderr_path,
            child,
        };
        tracker.addr = poll_until("the tracker to listen", || {
            if let Ok(Some(status)) = tracker.child.try_wait() {
                panic!("the tracker exited: {status}\n{}", tracker.stderr());
            }
            let log = tracker.stderr();
            // The tracker's line, after tiny_http's own "listening on".
            log.split("listening on ")
                .nth(2)
                .and_then(|rest| rest.split(',').next())
                .and_then(|addr| addr.parse().ok())
                .ok_or(log)
        });
        tracker
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn sighup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn assert_alive_without_panic(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the tracker exited:\n{}",
            self.stderr()
        );
        let response = self.get("/health");
        assert_eq!(response.status, 200, "{}", response.describe());
        assert!(!self.stderr().contains("panicked"), "{}", self.stderr());
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        http::raw(self.addr, &bytes, method == "HEAD")
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn get(&self, path: &str) -> Response {
        self.request("GET", path, &[], b"")
    }

    /// A request signed by `node` now.
    fn signed(&self, node: &Identity, method: &str, path: &str, body: &[u8]) -> Response {
        let headers = sign(node, method, path, body);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.request(method, path, &headers, body)
    }

    fn post(&self, node: &Identity, path: &str, body: &Value) -> Response {
        self.signed(node, "POST", path, body.to_string().as_bytes())
    }

    fn find(&self, hash: &str) -> Vec<String> {
        let response = self.get(&format!("/find/{hash}"));
        assert_eq!(response.status, 200, "{}", response.describe());
        let found = json_of(&response);
        assert_eq!(found["hash"], hash);
        found["providers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["node_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Registers `node` (reachable at `port`) and its full set of hashes.
    fn register(&self, node: &Identity, port: u16, hashes: &[String]) {
        let response = self.post(node, "/iroh/announce", &announce(node, port));
        assert_eq!(response.status, 200, "{}", response.describe());
        let response = self.post(
            node,
            "/packages/batch",
            &json!({"node_id": id(node), "hashes": hashes}),
        );
        assert_eq!(response.status, 200, "{}", response.describe());
        assert_eq!(json_of(&response)["hashes"], hashes.len());
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- tracker stderr ---\n{}", self.stderr());
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Headers that sign a request as `node` at `time`.
fn sign_at(
    node: &Identity,
    method: &str,
    path: &str,
    time: u64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let signed = auth::sign(node, method, path, time, body);
    vec![
        (NODE_HEADER, signed.node),
        (TIME_HEADER, signed.time),
        (SIGNATURE_HEADER, signed.signature),
    ]
}

/// Headers that sign a request as `node` now. Signatures are deterministic:
/// the same request signed twice within one second is one request, and the
/// second is a replay. So an identical request waits for the next second.
fn sign(node: &Identity, method: &str, path: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    static USED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    for _ in 0..30 {
        let headers = sign_at(node, method, path, unix_now(), body);
        let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
        if !used.contains(&headers[2].1) {
            used.push(headers[2].1.clone());
            return headers;
        }
        drop(used);
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the clock does not move");
}

fn identity(dir: &TestDir, name: &str) -> Identity {
    Identity::load_or_create(&dir.subdir(&format!("key-{name}"))).unwrap()
}

fn id(node: &Identity) -> String {
    node.node_id().to_string()
}

fn announce(node: &Identity, port: u16) -> Value {
    json!({"node_id": id(node), "http_addrs": [format!("127.0.0.1:{port}")], "http_port": port})
}

/// A valid hash part, different for each `n`.
fn hash(n: u32) -> String {
    let mut bytes = [0u8; 20];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    bytes[10] = 0x5a;
    nix32::encode(&bytes)
}

fn hashes(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(hash).collect()
}

fn json_of(response: &Response) -> Value {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", response.describe()))
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// Everything in the database, read-only: peers, package rows and the
/// signatures taken.
#[derive(Debug, PartialEq)]
struct Snapshot {
    peers: Vec<(Vec<u8>, String, String, i64, i64)>,
    packages: Vec<(Vec<u8>, i64)>,
    seen: Vec<Vec<u8>>,
}

fn open_read_only(db: &Path) -> Connection {
    Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap()
}

fn snapshot(db: &Path) -> Snapshot {
    let conn = open_read_only(db);
    let peers = conn
        .prepare("SELECT node, ip, record, hashes, last_seen FROM peers ORDER BY node")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let packages = conn
        .prepare("SELECT hash, peer FROM packages ORDER BY hash, peer")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let seen = conn
        .prepare("SELECT signature FROM seen ORDER BY signature")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    Snapshot {
        peers,
        packages,
        seen,
    }
}

/// The package rows the database holds for `node`, and whether it has a
/// peer row at all.
fn rows_of(db: &Path, node: &Identity) -> (bool, i64) {
    let conn = open_read_only(db);
    let key = node.node_id().as_bytes().to_vec();
    let registered: i64 = conn
        .query_row("SELECT count(*) FROM peers WHERE node = ?1", [&key], |r| {
            r.get(0)
        })
        .unwrap();
    let rows: i64 = conn
        .query_row(
            "SELECT count(*) FROM packages WHERE peer IN (SELECT id FROM peers WHERE node = ?1)",
            [&key],
            |r| r.get(0),
        )
        .unwrap();
    let all: i64 = conn
        .query_row("SELECT count(*) FROM packages", [], |r| r.get(0))
        .unwrap();
    let others: i64 = conn
        .query_row(
            "SELECT count(*) FROM packages WHERE peer IN (SELECT id FROM peers WHERE node != ?1)",
            [&key],
            |r| r.get(0),
        )
        .unwrap();
    // Rows of no peer at all would be orphans the sweep forgot.
    assert_eq!(all, rows + others, "orphan package rows");
    (registered == 1, rows)
}

fn assert_refused(response: &Response, status: u16, why: &str) {
    assert_eq!(response.status, status, "{}", response.describe());
    let error = json_of(response)["error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        error.contains(why),
        "expected {why:?} in {}",
        response.describe()
    );
}

#[test]
fn nodes_register_and_are_found_by_what_they_hold() {
    let dir = TestDir::new("register");
    let db = dir.join("tracker.db");
    let tracker = Tracker::start(&dir, &db, &[]);
    let (a, b) = (identity(&dir, "a"), identity(&dir, "b"));
    tracker.register(&a, 4001, &hashes(0..100));
    tracker.register(&b, 4002, &hashes(50..150));

    assert_eq!(tracker.find(&hash(10)), vec![id(&a)]);
    assert_eq!(
        sorted(tracker.find(&hash(60))),
        sorted(vec![id(&a), id(&b)])
    );
    assert_eq!(tracker.find(&hash(120)), vec![id(&b)]);
    assert!(tracker.find(&hash(999)).is_empty());

    let found = json_of(&tracker.get(&format!("/find/{}", hash(10))));
    let provider = &found["providers"][0];
    assert_eq!(provider["http_addrs"], json!(["127.0.0.1:4001"]));
    assert_eq!(provider["http_port"], 4001);
    assert_eq!(provider["observed_ip"], "127.0.0.1");
    assert!(provider["expires_in"].as_i64().unwrap() > 100, "{provider}");

    let peers = json_of(&tracker.get("/iroh/peers"));
    assert_eq!(peers["total"], 2);
    let listed: Vec<String> = peers["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sorted(listed), sorted(vec![id(&a), id(&b)]));
    let one = tracker.get(&format!("/iroh/peer/{}", id(&b)));
    assert_eq!(one.status, 200, "{}", one.describe());
    assert_eq!(json_of(&one)["http_addrs"], json!(["127.0.0.1:4002"]));

    // A heartbeat is not a new registration.
    let again = tracker.post(&a, "/iroh/announce", &announce(&a, 4001));
    assert_eq!(
        json_of(&again),
        json!({"node_id": id(&a), "new": false, "hashes": 100, "ttl": 120})
    );
    // Deltas change what a node is found for.
    let delta = tracker.post(
        &a,
        "/packages/delta",
        &json!({"node_id": id(&a), "added": [hash(500)], "removed": [hash(60), hash(10)]}),
    );
    assert_eq!(
        json_of(&delta),
        json!({"node_id": id(&a), "hashes": 99, "added": 1, "removed": 2})
    );
    assert_eq!(tracker.find(&hash(60)), vec![id(&b)]);
    assert!(tracker.find(&hash(10)).is_empty());
    assert_eq!(tracker.find(&hash(500)), vec![id(&a)]);
    // A full batch replaces the set (hash 7 was held already).
    let batch = tracker.post(
        &a,
        "/packages/batch",
        &json!({"node_id": id(&a), "hashes": [hash(7), hash(600)]}),
    );
    assert_eq!(
        json_of(&batch),
        json!({"node_id": id(&a), "hashes": 2, "added": 1, "removed": 98})
    );
    assert!(tracker.find(&hash(500)).is_empty());
    assert_eq!(tracker.find(&hash(600)), vec![id(&a)]);
    assert_eq!(rows_of(&db, &a), (true, 2));

    let health = json_of(&tracker.get("/health"));
    assert_eq!(health["peers"], 2);
    assert_eq!(health["hashes"], 102);
    assert_eq!(health["allow_list"], Value::Null);

    // A node deletes itself, rows and all.
    let path = format!("/iroh/peer/{}", id(&b));
    let deleted = tracker.signed(&b, "DELETE", &path, b"");
    assert_eq!(
        json_of(&deleted),
        json!({"node_id": id(&b), "deleted": true})
    );
    assert_eq!(tracker.get(&path).status, 404);
    assert!(tracker.find(&hash(120)).is_empty());
    assert_eq!(rows_of(&db, &b), (false, 0));
    assert_refused(
        &tracker.signed(&b, "DELETE", &path, b""),
        404,
        "not registered",
    );
    // And must announce before it sends hashes again.
    let late = tracker.post(
        &b,
        "/packages/delta",
        &json!({"node_id": id(&b), "added": [hash(1)]}),
    );
    assert_refused(&late, 409, "announce it");
}

#[test]
fn a_restart_keeps_registrations_and_a_deleted_database_starts_empty() {
    let dir = TestDir::new("restart");
    let db = dir.join("tracker.db");
    let a = identity(&dir, "a");
    let mut tracker = Tracker::start(&dir, &db, &[]);
    tracker.register(&a, 4001, &hashes(0..10));
    // A request as an eavesdropper would capture it.
    let body = json!({"node_id": id(&a), "removed": [hash(3)]}).to_string();
    let captured = sign(&a, "POST", "/packages/delta", body.as_bytes());
    let captured: Vec<(&str, &str)> = captured.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let first = tracker.request("POST", "/packages/delta", &captured, body.as_bytes());
    assert_eq!(first.status, 200, "{}", first.describe());
    let readd = tracker.post(
        &a,
        "/packages/delta",
        &json!({"node_id": id(&a), "added": [hash(3)]}),
    );
    assert_eq!(readd.status, 200, "{}", readd.describe());
    tracker.stop();

    let tracker = Tracker::start(&dir, &db, &[]);
    assert_eq!(tracker.find(&hash(3)), vec![id(&a)]);
    let again = tracker.post(&a, "/iroh/announce", &announce(&a, 4001));
    assert_eq!(json_of(&again)["new"], false);
    assert_eq!(json_of(&again)["hashes"], 10);
    // The captured request, replayed to the new process, is still refused.
    let before = snapshot(&db);
    let replay = tracker.request("POST", "/packages/delta", &captured, body.as_bytes());
    assert_refused(&replay, 401, "replay");
    assert_eq!(snapshot(&db), before);
    assert_eq!(tracker.find(&hash(3)), vec![id(&a)]);
    drop(tracker);

    for suffix in ["", "-wal", "-shm"] {
        let _ = fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let tracker = Tracker::start(&dir, &db, &[]);
    assert!(tracker.find(&hash(3)).is_empty());
    assert_eq!(json_of(&tracker.get("/iroh/peers"))["total"], 0);
    // The node finds out from its next delta or heartbeat, and sends all.
    let delta = tracker.post(
        &a,
        "/packages/delta",
        &json!({"node_id": id(&a), "added": [hash(11)]}),
    );
    assert_refused(&delta, 409, "not registered");
    let again = tracker.post(&a, "/iroh/announce", &announce(&a, 4001));
    assert_eq!(json_of(&again)["new"], true);
    let batch = tracker.post(
        &a,
        "/packages/batch",
        &json!({"node_id": id(&a), "hashes": hashes(0..12)}),
    );
    assert_eq!(json_of(&batch)["hashes"], 12);
    assert_eq!(tracker.find(&hash(11)), vec![id(&a)]);
}

#[test]
fn a_peer_that_stops_heartbeating_expires_with_its_rows() {
    let dir = TestDir::new("ttl");
    let db = dir.join("tracker.db");
    let tracker = Tracker::start(&dir, &db, &["--peer-ttl", "2"]);
    let (a, b) = (identity(&dir, "a"), identity(&dir, "b"));
    tracker.register(&a, 4001, &hashes(0..300));
    tracker.register(&b, 4002, &hashes(100..200));
    assert_eq!(rows_of(&db, &a), (true, 300));

    // B heartbeats, A does not.
    poll_until("A to leave /find", || {
        let heartbeat = tracker.post(&b, "/iroh/announce", &announce(&b, 4002));
        assert_eq!(heartbeat.status, 200, "{}", heartbeat.describe());
        let found = tracker.find(&hash(150));
        if found == vec![id(&b)] {
            Ok(())
        } else {
            Err(format!("{found:?}"))
        }
    });
    assert!(tracker.find(&hash(50)).is_empty());
    let peers = json_of(&tracker.get("/iroh/peers"));
    assert_eq!(peers["total"], 1, "{peers}");
    assert_eq!(peers["peers"][0]["node_id"], id(&b));
    assert_eq!(tracker.get(&format!("/iroh/peer/{}", id(&a))).status, 404);
    poll_until("the sweep to delete A and its rows", || {
        let heartbeat = tracker.post(&b, "/iroh/announce", &announce(&b, 4002));
        assert_eq!(heartbeat.status, 200, "{}", heartbeat.describe());
        match rows_of(&db, &a) {
            (false, 0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // B's rows stay while B lives.
    assert_eq!(rows_of(&db, &b), (true, 100));
    // A comes back as a new registration, with nothing.
    let back = tracker.post(&a, "/iroh/announce", &announce(&a, 4001));
    assert_eq!(json_of(&back)["new"], true);
    assert_eq!(json_of(&back)["hashes"], 0);
}

#[test]
fn forged_replayed_stale_unsigned_and_foreign_requests_change_nothing() {
    let dir = TestDir::new("refusals");
    let db = dir.join("tracker.db");
    let tracker = Tracker::start(&dir, &db, &[]);
    let (a, c) = (identity(&dir, "a"), identity(&dir, "c"));
    tracker.register(&a, 4001, &hashes(0..10));
    tracker.register(&c, 4003, &hashes(10..20));

    // A replay: A adds X, removes X, and the add is sent again.
    let add = json!({"node_id": id(&a), "added": [hash(99)]}).to_string();
    let add_headers = sign(&a, "POST", "/packages/delta", add.as_bytes());
    let add_headers: Vec<(&str, &str)> =
        add_headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(
        tracker
            .request("POST", "/packages/delta", &add_headers, add.as_bytes())
            .status,
        200
    );
    let remove = tracker.post(
        &a,
        "/packages/delta",
        &json!({"node_id": id(&a), "removed": [hash(99)]}),
    );
    assert_eq!(remove.status, 200, "{}", remove.describe());

    let before = snapshot(&db);
    let replay = tracker.request("POST", "/packages/delta", &add_headers, add.as_bytes());
    assert_refused(&replay, 401, "replay");

    // A forged signature: A's signature (never sent) on another body.
    let signed = json!({"node_id": id(&a), "hashes": [hash(1)]}).to_string();
    let forged = json!({"node_id": id(&a), "hashes": []}).to_string();
    let headers = sign(&a, "POST", "/packages/batch", signed.as_bytes());
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = tracker.request("POST", "/packages/batch", &headers, forged.as_bytes());
    assert_refused(&response, 401, "does not verify");
    // C's name on A's signature.
    let mut as_c = sign(&a, "DELETE", &format!("/iroh/peer/{}", id(&c)), b"");
    as_c[0].1 = id(&c);
    let as_c: Vec<(&str, &str)> = as_c.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = tracker.request("DELETE", &format!("/iroh/peer/{}", id(&c)), &as_c, b"");
    assert_refused(&response, 401, "does not verify");

    // A stale timestamp.
    let body = json!({"node_id": id(&a), "hashes": []}).to_string();
    let stale = sign_at(
        &a,
        "POST",
        "/packages/batch",
        unix_now() - 400,
        body.as_bytes(),
    );
    let stale: Vec<(&str, &str)> = stale.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = tracker.request("POST", "/packages/batch", &stale, body.as_bytes());
    assert_refused(&response, 401, "off this tracker's clock");

    // A touching C's data, with A's own valid signature.
    let response = tracker.signed(&a, "DELETE", &format!("/iroh/peer/{}", id(&c)), b"");
    assert_refused(&response, 403, "may not change the data of node");
    let response = tracker.post(&a, "/iroh/announce", &announce(&c, 6666));
    assert_refused(&response, 403, "may not change the data of node");
    let response = tracker.post(
        &a,
        "/packages/batch",
        &json!({"node_id": id(&c), "hashes": []}),
    );
    assert_refused(&response, 403, "may not change the data of node");
    let response = tracker.post(
        &a,
        "/packages/delta",
        &json!({"node_id": id(&c), "removed": [hash(10)]}),
    );
    assert_refused(&response, 403, "may not change the data of node");

    // The original peerix's unsigned requests.
    let original = json!({
        "node_id": id(&c), "peer_id": "c", "relay_url": "https://evil.example/", "direct_addrs": []
    })
    .to_string();
    let response = tracker.request("POST", "/iroh/announce", &[], original.as_bytes());
    assert_refused(&response, 401, "unsigned request");
    assert_refused(&response, 401, "original peerix");
    let response = tracker.request(
        "POST",
        "/packages/batch",
        &[],
        json!({"peer_id": "c", "hashes": []}).to_string().as_bytes(),
    );
    assert_refused(&response, 401, "unsigned request");
    let response = tracker.request("DELETE", &format!("/iroh/peer/{}", id(&c)), &[], b"");
    assert_refused(&response, 401, "unsigned request");

    assert_eq!(
        snapshot(&db),
        before,
        "a refused request changed the database"
    );
    assert_eq!(sorted(tracker.find(&hash(10))), vec![id(&c)]);
    assert!(tracker.find(&hash(99)).is_empty());
}

#[test]
fn the_allow_list_shuts_out_other_nodes_until_a_sighup_lets_them_in() {
    let dir = TestDir::new("allow");
    let db = dir.join("tracker.db");
    let (a, b) = (identity(&dir, "a"), identity(&dir, "b"));
    let list = dir.join("allowed");
    fs::write(
        &list,
        format!("# the private tracker's nodes\n{}  # A\n", id(&a)),
    )
    .unwrap();
    let tracker = Tracker::start(&dir, &db, &["--allow-nodes", list.to_str().unwrap()]);

    let path = format!("/find/{}", hash(1));
    let response = tracker.post(&b, "/iroh/announce", &announce(&b, 4002));
    assert_refused(&response, 403, "allow-list");
    assert_refused(&tracker.get(&path), 401, "unsigned request");
    assert_refused(&tracker.signed(&b, "GET", &path, b""), 403, "allow-list");
    assert_refused(&tracker.get("/iroh/peers"), 401, "unsigned request");
    assert_eq!(snapshot(&db).peers.len(), 0);

    let response = tracker.post(&a, "/iroh/announce", &announce(&a, 4001));
    assert_eq!(response.status, 200, "{}", response.describe());
    let response = tracker.post(
        &a,
        "/packages/batch",
        &json!({"node_id": id(&a), "hashes": [hash(1)]}),
    );
    assert_eq!(response.status, 200, "{}", response.describe());
    let response = tracker.signed(&a, "GET", &path, b"");
    assert_eq!(json_of(&response)["providers"][0]["node_id"], id(&a));
    // The same lookup again: reads are not checked for replays.
    let headers = sign(&a, "GET", &path, b"");
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(tracker.request("GET", &path, &headers, b"").status, 200);
    assert_eq!(tracker.request("GET", &path, &headers, b"").status, 200);
    assert_eq!(json_of(&tracker.get("/health"))["allow_list"], 1);

    // A broken file is not taken: the list stays as it was.
    fs::write(&list, "not a node id\n").unwrap();
    tracker.sighup();
    poll_until("the broken allow-list to be refused", || {
        let log = tracker.stderr();
        if log.contains("left as it was") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert_eq!(tracker.signed(&a, "GET", &path, b"").status, 200);

    fs::write(&list, format!("{}\n{}\n", id(&a), id(&b))).unwrap();
    tracker.sighup();
    poll_until("the new allow-list", || {
        let health = json_of(&tracker.get("/health"));
        if health["allow_list"] == 2 {
            Ok(())
        } else {
            Err(health.to_string())
        }
    });
    let response = tracker.post(&b, "/iroh/announce", &announce(&b, 4002));
    assert_eq!(response.status, 200, "{}", response.describe());
    assert_eq!(tracker.signed(&b, "GET", &path, b"").status, 200);

    // Taken off the list, A is no longer answered, even before it expires.
    fs::write(&list, format!("{}\n", id(&b))).unwrap();
    tracker.sighup();
    poll_until("A off the allow-list", || {
        let health = json_of(&tracker.get("/health"));
        if health["allow_list"] == 1 {
            Ok(())
        } else {
            Err(health.to_string())
        }
    });
    let response = tracker.signed(&b, "GET", &path, b"");
    assert_eq!(json_of(&response)["providers"], json!([]));
}

#[test]
fn bad_input_is_a_4xx_with_a_reason_and_never_a_panic() {
    let dir = TestDir::new("badinput");
    let db = dir.join("tracker.db");
    let mut tracker = Tracker::start(&dir, &db, &[]);
    let a = identity(&dir, "a");
    tracker.register(&a, 4001, &hashes(0..5));
    let before = snapshot(&db);
    let me = id(&a);

    let too_many: Vec<String> = hashes(0..100_001);
    let half: Vec<String> = hashes(0..50_001);
    let addrs: Vec<String> = (0..17).map(|i| format!("10.0.0.{i}:1")).collect();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/iroh/announce", "{\"node_id\":".into(), 400, "EOF"),
        ("/iroh/announce", "[]".into(), 400, "bad request body"),
        (
            "/iroh/announce",
            "\u{0}\u{1}garbage".into(),
            400,
            "bad request body",
        ),
        (
            "/iroh/announce",
            json!({"node_id": 5}).to_string(),
            400,
            "invalid type",
        ),
        (
            "/iroh/announce",
            json!({"node_id": me, "http_port": "80"}).to_string(),
            400,
            "invalid type",
        ),
        (
            "/iroh/announce",
            json!({"node_id": me, "http_port": 70000}).to_string(),
            400,
            "u16",
        ),
        (
            "/iroh/announce",
            json!({"node_id": me, "http_addrs": "1.2.3.4:5"}).to_string(),
            400,
            "invalid type",
        ),
        (
            "/iroh/announce",
            json!({"node_id": me, "http_addrs": addrs}).to_string(),
            400,
            "too many items",
        ),
        (
            "/iroh/announce",
            json!({"node_id": me, "http_addrs": ["host.lan:80"]}).to_string(),
            400,
            "not ip:port",
        ),
        (
            "/iroh/announce",
            json!({"node_id": me, "relay_url": "javascript:x"}).to_string(),
            400,
            "relay_url",
        ),
        (
            "/iroh/announce",
            json!({"node_id": "ABC"}).to_string(),
            400,
            "node id of 3 characters",
        ),
        (
            "/iroh/announce",
            json!({"node_id": me.to_uppercase()}).to_string(),
            400,
            "not lowercase hex",
        ),
        (
            "/iroh/announce",
            json!({"http_port": 1}).to_string(),
            400,
            "missing field `node_id`",
        ),
        (
            "/packages/batch",
            json!({"node_id": me, "hashes": "x"}).to_string(),
            400,
            "invalid type",
        ),
        (
            "/packages/batch",
            json!({"node_id": me, "hashes": [1, 2]}).to_string(),
            400,
            "invalid type",
        ),
        (
            "/packages/batch",
            json!({"node_id": me, "hashes": ["eeee"]}).to_string(),
            400,
            "bad hash part",
        ),
        (
            "/packages/batch",
            json!({"node_id": me, "hashes": [format!("{}e", &hash(1)[1..])]}).to_string(),
            400,
            "outside nix32",
        ),
        (
            "/packages/batch",
            json!({"node_id": me, "hashes": too_many}).to_string(),
            400,
            "too many items",
        ),
        (
            "/packages/delta",
            json!({"node_id": me, "added": half, "removed": hashes(60_000..110_000)}).to_string(),
            400,
            "too many hashes",
        ),
        (
            "/packages/delta",
            json!({"node_id": me, "added": [hash(1)], "removed": [hash(1)]}).to_string(),
            400,
            "both added and removed",
        ),
        (
            "/packages/delta",
            json!({"node_id": me, "added": null}).to_string(),
            400,
            "invalid type",
        ),
    ];
    for (path, body, status, why) in &cases {
        let response = tracker.signed(&a, "POST", path, body.as_bytes());
        let shown: String = body.chars().take(80).collect();
        assert_eq!(
            response.status,
            *status,
            "{path} {shown}: {}",
            response.describe()
        );
        let error = json_of(&response)["error"].as_str().unwrap().to_string();
        assert!(
            error.contains(why),
            "{path} {shown}: expected {why:?} in {error}"
        );
    }

    // A body over 8 MiB: refused by its length, and when it has none.
    let huge = vec![b' '; 8 * 1024 * 1024 + 1];
    assert_refused(
        &tracker.signed(&a, "POST", "/packages/batch", &huge),
        413,
        "over",
    );
    let chunked = format!(
        "POST /packages/batch HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        huge.len(),
        String::from_utf8(huge.clone()).unwrap()
    );
    let response = http::raw(tracker.addr, chunked.as_bytes(), false).unwrap();
    assert_refused(&response, 413, "over");

    // Bad node ids and hash parts in paths, and in the signature headers.
    assert_refused(&tracker.get("/iroh/peer/zz"), 400, "node id");
    assert_refused(
        &tracker.get(&format!("/iroh/peer/{}", me.to_uppercase())),
        400,
        "lowercase",
    );
    assert_refused(&tracker.get("/find/xyz"), 400, "bad hash part");
    assert_refused(
        &tracker.get(&format!("/find/{}e", &hash(1)[1..])),
        400,
        "outside nix32",
    );
    assert_refused(
        &tracker.get(&format!("/find/{}/x", hash(1))),
        400,
        "bad hash part",
    );
    let body = announce(&a, 1).to_string();
    let mut headers = sign(&a, "POST", "/iroh/announce", body.as_bytes());
    headers[0].1 = "nope".into();
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = tracker.request("POST", "/iroh/announce", &headers, body.as_bytes());
    assert_refused(&response, 401, "bad X-Peerix-Node");
    assert_refused(
        &tracker.signed(&a, "DELETE", "/iroh/peer/nope", b""),
        400,
        "node_id",
    );

    // Paths and methods.
    assert_refused(&tracker.get("/nope"), 404, "no endpoint");
    assert_refused(&tracker.get("/iroh/announce"), 405, "only POST");
    assert_refused(
        &tracker.request("PUT", "/find/x", &[], b""),
        405,
        "only GET",
    );

    assert_eq!(snapshot(&db).peers, before.peers);
    assert_eq!(snapshot(&db).packages, before.packages);
    tracker.assert_alive_without_panic();
}

#[test]
fn hostile_connections_meet_the_hardened_limits() {
    let dir = TestDir::new("hostile");
    let db = dir.join("tracker.db");
    let mut tracker = Tracker::start(&dir, &db, &[]);

    // A huge Content-Length and no body: refused at once, nothing allocated.
    let response = http::raw(
        tracker.addr,
        b"POST /packages/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n",
        false,
    )
    .unwrap();
    assert_eq!(response.status, 413, "{}", response.describe());
    // A body announced and never sent is cut off within the body deadline
    // (10 s): a small one by tiny_http, which reads it with the head and
    // closes; a large one by the handler's read, which answers 408.
    for (length, answer) in [(100, ""), (100_000, "HTTP/1.1 408 ")] {
        let mut stream = TcpStream::connect(tracker.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let head = format!(
            "POST /iroh/announce HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{"
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with(answer), "{length}: {got}");
        if !answer.is_empty() {
            assert!(got.contains("cannot read the request body"), "{got}");
        }
    }
    // HTTP/2.0 gets 505.
    let response = http::raw(
        tracker.addr,
        b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
        false,
    )
    .unwrap();
    assert_eq!(response.status, 505, "{}", response.describe());
    // An endless header line gets 431 and the connection closes.
    let mut long = b"GET /health HTTP/1.1\r\nX-Long: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 100_000));
    long.extend_from_slice(b"\r\n\r\n");
    let response = http::raw(tracker.addr, &long, false).unwrap();
    assert_eq!(response.status, 431, "{}", response.describe());
    // Half a request line, then silence: closed without a worker held.
    let idle = TcpStream::connect(tracker.addr).unwrap();
    (&idle).write_all(b"GET /he").unwrap();
    let _ = idle.shutdown(Shutdown::Write);
    tracker.assert_alive_without_panic();
    drop(idle);
}
