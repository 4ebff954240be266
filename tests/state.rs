//! Persistent state in `--state-dir`: `stats.json` and `peers.json`
//! (src/state/).
//!
//! - `kill -9` in a loop while the state is being written: after each kill
//!   both files parse (the old state or the new, never a mix), a restart
//!   reports no damage and is healthy, and nothing saved is lost.
//! - A liar's ban survives a restart: the restarted peerix lists it as
//!   banned at once and never asks it over HTTP again.
//! - A hand-damaged `stats.json` (and a `peers.json` of an unknown
//!   version) is reported in the log and in `/health`, set aside as
//!   `<name>.damaged`, and replaced by a good file.
//!
//! The files are read here from their documented format
//! (src/state/format.rs) with serde_json, not with peerix's own parser.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::http;
use common::lan::*;
use common::*;

const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// A valid hash part made from `n`, for narinfo requests nobody can answer.
fn hash_of(n: u64) -> String {
    let mut v = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..32)
        .map(|_| {
            let c = NIX32[(v % 32) as usize] as char;
            v = v.rotate_right(5) ^ n;
            c
        })
        .collect()
}

/// `dir/name` as JSON in the documented format `format`, version 1; `Err`
/// says what is wrong with it.
fn read_state(dir: &Path, name: &str, format: &str) -> Result<serde_json::Value, String> {
    let path = dir.join(name);
    let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{} is not JSON ({e}); {} bytes: {:?}",
            path.display(),
            bytes.len(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )
    })?;
    if value["format"] != format || value["version"] != 1 || !value["saved_at"].is_u64() {
        return Err(format!(
            "{}: not a {format} v1 file: {value}",
            path.display()
        ));
    }
    Ok(value)
}

fn cache_misses(stats: &serde_json::Value) -> u64 {
    stats["totals"]["cache_misses"]
        .as_u64()
        .unwrap_or_else(|| panic!("stats.json without totals.cache_misses: {stats}"))
}

/// The hosts in `peers.json` banned beyond `now`.
fn banned(peers: &serde_json::Value, now: u64) -> usize {
    peers["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("peers.json without a peers list: {peers}"))
        .iter()
        .filter(|p| p["banned_until"].as_u64().is_some_and(|until| until > now))
        .count()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// `/health`'s `state` check: ok, written at least once, and no damage
/// found at start.
fn assert_state_clean(peerix: &Peerix, what: &str) {
    let health = peerix
        .health()
        .unwrap_or_else(|e| panic!("{what}: /health: {e}"));
    let state = &health["checks"]["state"];
    assert!(
        health["status"] == "healthy"
            && state["status"] == "ok"
            && state["writes"].as_u64() >= Some(1)
            && state["damaged"] == serde_json::json!([]),
        "{what}: expected a healthy peerix whose state check is ok with no damage, /health says {health}"
    );
}

/// A peer table of `n` hosts (10.200.x.y, never contacted: LAN mode is
/// off), each banned for the next hour, in the documented format: large
/// enough (about 250 bytes a host) that writing it takes a while.
fn big_peer_table(n: u32) -> String {
    let until = unix_now() + 3600;
    let peers: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            serde_json::json!({
                "peer": format!("http:10.200.{}.{}:12304", i / 250, i % 250 + 1),
                "successes": 3, "failures": 1, "lies": 1, "bytes": 123_456,
                "latency_ms": 4.25, "consecutive_failures": 0,
                "backoff_until": null, "banned_until": until,
            })
        })
        .collect();
    serde_json::json!({
        "format": "peerix-peers", "version": 1, "saved_at": unix_now(), "peers": peers,
    })
    .to_string()
}

/// Reads both state files in `dir` over and over until `stop`, as a
/// monitoring tool or a backup would: returns how many reads were made and
/// what was wrong with the first few that did not parse. A file may be
/// missing only until peerix first writes it.
fn read_while_written(dir: PathBuf, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let (mut reads, mut broken) = (0u64, Vec::new());
    let mut seen = [false; 2];
    // Bounded: peerix runs for a few seconds; this stops when told, or
    // after at most 10 minutes' worth of 1 ms pauses and reads.
    for _ in 0..300_000 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let files = [
            ("stats.json", "peerix-stats"),
            ("peers.json", "peerix-peers"),
        ];
        for (seen, (name, format)) in seen.iter_mut().zip(files) {
            if !*seen && !dir.join(name).exists() {
                continue;
            }
            *seen = true;
            reads += 1;
            if let Err(e) = read_state(&dir, name, format) {
                if broken.len() < 5 {
                    broken.push(e);
                }
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
    (reads, broken)
}

/// (a) Peerix writes its state every 10 ms (a 1,000-host peer table, a
/// growing top-N list) and is killed with SIGKILL at varied moments, 20
/// times. After each kill both files parse as the old or the new state:
/// the 1,000 bans are all there, and the count of misses never goes back
/// below what an earlier file held. Each restart is healthy and finds no
/// damaged file. Meanwhile a reader reads both files throughout: it never
/// sees one half written either.
#[test]
fn kill_9_while_the_state_is_written_leaves_the_old_or_the_new_state() {
    const HOSTS: u32 = 1000;
    const ROUNDS: u64 = 20;
    let dir = TestDir::new("state_kill9");
    let mut host = Host::new(&dir, "h");
    host.start_daemon();
    let state = dir.subdir("state");
    fs::write(state.join("peers.json"), big_peer_table(HOSTS)).expect("seeding peers.json");
    let state_arg = state.display().to_string();
    let flags = ["--state-dir", &state_arg, "--state-interval", "0.01"];

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (dir, stop) = (state.clone(), Arc::clone(&stop));
        thread::spawn(move || read_while_written(dir, stop))
    };
    let mut misses_before = 0;
    let mut torn_writes_caught = 0;
    for round in 0..ROUNDS {
        let peerix = Peerix::start(&dir, &host, &flags);
        assert_state_clean(&peerix, &format!("round {round}, after the restart"));
        // Misses move the counters and the top-N list between writes.
        for k in 0..5 {
            let response =
                http::must_get(peerix.addr, &format!("/{}.narinfo", hash_of(round * 5 + k)));
            assert_eq!(
                response.status,
                404,
                "round {round}: {}",
                response.describe()
            );
        }
        thread::sleep(Duration::from_millis((round * 37) % 250));
        drop(peerix); // SIGKILL, then wait.

        if state.join("peers.json.tmp").exists() || state.join("stats.json.tmp").exists() {
            torn_writes_caught += 1;
        }
        let stats = read_state(&state, "stats.json", "peerix-stats")
            .unwrap_or_else(|e| panic!("round {round}, after kill -9: {e}"));
        let peers = read_state(&state, "peers.json", "peerix-peers")
            .unwrap_or_else(|e| panic!("round {round}, after kill -9: {e}"));
        assert_eq!(
            banned(&peers, unix_now()),
            HOSTS as usize,
            "round {round}: every ban of the seeded table must be in peers.json"
        );
        let misses = cache_misses(&stats);
        assert!(
            misses >= misses_before,
            "round {round}: stats.json went back from {misses_before} misses to {misses}"
        );
        misses_before = misses;
    }
    stop.store(true, Ordering::SeqCst);
    let (reads, broken) = reader.join().expect("the reader thread");
    eprintln!(
        "{torn_writes_caught} of {ROUNDS} kills left a temporary file (killed mid-write); \
         {misses_before} misses saved; {reads} reads meanwhile"
    );
    assert!(
        broken.is_empty(),
        "a reader saw a state file that does not parse: {broken:#?}"
    );
    assert!(reads > 0, "the reader never read");
    assert!(misses_before > 0, "no miss was ever saved");
    let last = Peerix::start(&dir, &host, &flags);
    assert_state_clean(&last, "after the last kill");
}

/// (b) B bans C, a peer that serves garbage for a NAR, then stops
/// (SIGTERM writes the state) and starts again with the same state
/// directory. The restarted B lists C as banned before any traffic,
/// answers 404 for the path only C offers, and never asks C over HTTP.
#[test]
fn a_ban_survives_a_restart() {
    let many = many_fixture();
    let (dir, lan, up) = world("state_ban", 2);
    let state = dir.subdir("b-state");
    let state_arg = state.display().to_string();
    let flags = ["--state-dir", state_arg.as_str()];
    let mut b = LanHost::new(&dir, &lan, 0, "b", &[]);
    b.start_peerix(&dir, &up, &flags);
    let src = source_store(&dir, &up, &[&many.first]);
    let c = FakePeer::start(
        &lan,
        1,
        vec![FakeItem::from_store(&src, &many.first, NarMode::Garbage)],
        TcpMode::Serve,
    );

    let out = b.substitute(&[&up.public], &many.first);
    assert_failure("nix-store -r in B when only C (a liar) has it", &out);
    let entry = wait_peer(&b, &c.addr(), "B to ban C", |p| p["banned"] == true);
    assert!(entry["lies"].as_u64() >= Some(1), "{entry}");

    b.peerix().send_signal("TERM");
    let status = poll_until("B's peerix to exit after SIGTERM", || {
        b.peerix_mut()
            .try_wait()
            .ok_or_else(|| "still running".to_string())
    });
    assert!(status.success(), "SIGTERM: expected exit 0, got {status}");
    b.peerix = None;
    let peers = read_state(&state, "peers.json", "peerix-peers").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        banned(&peers, unix_now()),
        1,
        "peers.json after SIGTERM: {peers}"
    );
    let asked = (
        FakeStats::get(&c.stats.narinfo_requests),
        FakeStats::get(&c.stats.nar_requests),
    );

    b.start_peerix(&dir, &up, &flags);
    let entry = b.peer_entry(&c.addr()).unwrap_or_else(|| {
        panic!(
            "the restarted B must list C from its saved table; peers: {}",
            b.health()["peers"]
        )
    });
    assert!(
        entry["banned"] == true && entry["available"] == false && entry["lies"].as_u64() >= Some(1),
        "the restarted B must still ban C: {entry}"
    );
    assert_state_clean(b.peerix(), "B after the restart");
    let narinfo = format!("/{}.narinfo", hash_part(&many.first));
    let response = b.must_get(&narinfo);
    assert_eq!(
        response.status,
        404,
        "GET {narinfo}: its only holder is banned: {}",
        response.describe()
    );
    assert_failure(
        "nix-store -r in B after the restart",
        &b.substitute(&[&up.public], &many.first),
    );
    assert_eq!(
        (
            FakeStats::get(&c.stats.narinfo_requests),
            FakeStats::get(&c.stats.nar_requests),
        ),
        asked,
        "the restarted B asked banned C over HTTP: {:?}",
        c.stats
    );
    assert!(
        !b.host.is_valid(&many.first),
        "nothing may become valid in B"
    );
}

/// (c) `stats.json` damaged by hand and `peers.json` of an unknown
/// version: peerix starts healthy, says so in the log and in `/health`,
/// sets both aside as `<name>.damaged` (the bytes as they were), and writes
/// good files in their place.
#[test]
fn a_damaged_state_file_is_reported_set_aside_and_replaced() {
    let dir = TestDir::new("state_damaged");
    let mut host = Host::new(&dir, "h");
    host.start_daemon();
    let state = dir.subdir("state");
    let broken_stats = b"{\"format\":\"peerix-stats\",\"version\":1,\"saved_at\":17000\x00\xff";
    let future_peers = r#"{"format":"peerix-peers","version":2,"saved_at":1,"peers":[]}"#;
    fs::write(state.join("stats.json"), broken_stats).expect("writing stats.json");
    fs::write(state.join("peers.json"), future_peers).expect("writing peers.json");
    let state_arg = state.display().to_string();
    let flags = ["--state-dir", &state_arg, "--state-interval", "3600"];

    let mut peerix = Peerix::start(&dir, &host, &flags);
    let health = peerix.health().expect("/health");
    let check = &health["checks"]["state"];
    assert_eq!(health["status"], "healthy", "damage is not fatal: {health}");
    assert_eq!(check["status"], "ok", "{health}");
    let damaged = check["damaged"].as_array().cloned().unwrap_or_default();
    let reported = |file: &str| {
        damaged
            .iter()
            .find(|d| d["file"] == file)
            .unwrap_or_else(|| panic!("/health must report {file} as damaged: {check}"))
    };
    let why = reported("stats.json")["error"].as_str().unwrap_or("");
    assert!(why.contains("UTF-8") || why.contains("JSON"), "{why}");
    assert!(
        reported("peers.json")["error"]
            .as_str()
            .unwrap_or("")
            .contains("version 2")
    );
    let log = peerix.stderr();
    for file in ["stats.json", "peers.json"] {
        assert!(
            log.lines()
                .any(|l| l.contains(file) && l.contains("damaged")),
            "the log must say {file} is damaged:\n{log}"
        );
    }
    assert_eq!(
        fs::read(state.join("stats.json.damaged")).unwrap(),
        broken_stats
    );
    assert_eq!(
        fs::read_to_string(state.join("peers.json.damaged")).unwrap(),
        future_peers
    );
    // Replaced at once by good files, which the next start reads cleanly.
    read_state(&state, "stats.json", "peerix-stats").unwrap_or_else(|e| panic!("{e}"));
    read_state(&state, "peers.json", "peerix-peers").unwrap_or_else(|e| panic!("{e}"));
    http::expect_status(peerix.addr, &format!("/{}.narinfo", hash_of(7)), 404);
    peerix.send_signal("TERM");
    let status = poll_until("peerix to exit after SIGTERM", || {
        peerix.try_wait().ok_or_else(|| "still running".to_string())
    });
    assert!(status.success(), "SIGTERM: expected exit 0, got {status}");
    let stats = read_state(&state, "stats.json", "peerix-stats").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cache_misses(&stats),
        1,
        "the miss is saved on shutdown: {stats}"
    );

    let again = Peerix::start(&dir, &host, &flags);
    assert_state_clean(&again, "the start after the replacement");
    let top = again.health().expect("/health");
    assert!(
        top["checks"]["state"]["damaged"] == serde_json::json!([]),
        "{top}"
    );
}
