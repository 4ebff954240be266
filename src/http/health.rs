//! `/health`: the original peerix's shape (`status` healthy or degraded,
//! `uptime_seconds`, named `checks`), 200 or 503 when degraded; plus the
//! index, the LAN counters and, for this host only, the peer table.
//!
//! The checks:
//! - `daemon_socket`: a nix-daemon listens on the socket and shakes hands
//!   (asked at most every 5 s). The top-level `daemon` field stays what
//!   the last use of the daemon found, as before.
//! - `index`: a first scan is done, and, with a scan interval, the last
//!   one is no older than two intervals and a minute.
//! - `lan`, when LAN discovery is asked for: its UDP side runs.
//! - `tracker`, when a tracker is configured: its last exchange worked.
//! - `state`: the last write of `stats.json` and `peers.json` to the state
//!   directory worked. Files found damaged at start are listed under
//!   `damaged` (set aside and replaced: reported, not a failure).

use std::io::Cursor;
use std::time::Duration;

use serde_json::{Value, json};
use tiny_http::Response;

use super::respond::{body, header};
use crate::stats::{PeerView, Snapshot};

#[inline(never)]
pub(super) fn health(snapshot: &Snapshot, with_peers: bool) -> Response<Cursor<Vec<u8>>> {
    let (json, healthy) = render(snapshot, with_peers);
    let status = if healthy { 200 } else { 503 };
    body(status, format!("{json}\n").into_bytes(), "application/json")
        .with_header(header("Cache-Control", "no-store"))
}

/// The `/health` document, and whether every check passed.
#[inline(never)]
pub(crate) fn render(snapshot: &Snapshot, with_peers: bool) -> (Value, bool) {
    let store = &snapshot.store;
    let mut checks = serde_json::Map::new();
    let daemon_ok = snapshot.daemon_answers.unwrap_or(store.daemon_reachable);
    checks.insert(
        "daemon_socket".into(),
        check(
            daemon_ok,
            json!({
                "detail": if daemon_ok { "answers" } else { "does not answer" },
            }),
        ),
    );
    let index_ok = index_fresh(snapshot);
    checks.insert(
        "index".into(),
        check(
            index_ok,
            json!({
                "scans": store.scans,
                "age_seconds": snapshot.index_age.map(|age| age.as_secs()),
                "detail": match (store.scans, index_ok) {
                    (0, _) => "no scan done yet",
                    (_, true) => "fresh",
                    (_, false) => "stale: the last scan is older than two scan intervals",
                },
            }),
        ),
    );
    if snapshot.node.lan_wanted {
        let running = snapshot.lan.is_some();
        checks.insert(
            "lan".into(),
            check(
                running,
                json!({
                    "detail": if running { "listening" } else { "could not start" },
                }),
            ),
        );
    }
    if let Some(tracker) = &snapshot.tracker {
        checks.insert(
            "tracker".into(),
            check(
                tracker.reachable,
                json!({
                    "detail": if tracker.reachable { "reachable" } else { "unreachable" },
                }),
            ),
        );
    }
    if let Some(state) = &snapshot.state {
        checks.insert("state".into(), state_check(state));
    }
    let healthy = checks.values().all(|c| c["status"] == "ok");
    let mut json = json!({
        "status": if healthy { "healthy" } else { "degraded" },
        "uptime_seconds": snapshot.uptime.as_secs(),
        "version": snapshot.node.version,
        "checks": checks,
        "daemon": if store.daemon_reachable { "connected" } else { "unreachable" },
        "scans": store.scans,
        "indexed_paths": store.indexed,
        "shared_paths": store.shared,
        "available_hashes": store.shared,
        "peers_connected": snapshot.peers_connected(),
        "lan": lan(snapshot),
        "tracker": tracker(snapshot),
    });
    if with_peers {
        json["peers"] = snapshot.peers.iter().map(peer).collect();
    }
    (json, healthy)
}

fn check(ok: bool, mut details: Value) -> Value {
    details["status"] = Value::from(if ok { "ok" } else { "fail" });
    details
}

/// The state directory's writer: failing while a write fails.
fn state_check(state: &crate::state::StateReport) -> Value {
    let damaged: Vec<Value> = state
        .damaged
        .iter()
        .map(|d| {
            json!({
                "file": d.file,
                "error": d.error,
                "set_aside_as": d.set_aside_as,
            })
        })
        .collect();
    let detail = match (&state.last_error, damaged.is_empty()) {
        (Some(e), _) => e.clone(),
        (None, true) => "written".into(),
        (None, false) => "written; damaged files were set aside and replaced".into(),
    };
    check(
        state.last_error.is_none(),
        json!({
            "dir": state.dir.display().to_string(),
            "writes": state.writes,
            "last_write": state.last_write,
            "damaged": damaged,
            "detail": detail,
        }),
    )
}

/// Whether the index is there and recent enough for its scan interval.
fn index_fresh(snapshot: &Snapshot) -> bool {
    match (snapshot.index_age, snapshot.node.scan_interval) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(age), Some(interval)) => {
            age <= interval
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(60))
        }
    }
}

/// The LAN counters.
fn lan(snapshot: &Snapshot) -> Value {
    let Some(lan) = &snapshot.lan else {
        return json!({ "enabled": false });
    };
    let c = &snapshot.lan_counters;
    let [fetched, dropped, fetch_failures, misses_answered] = snapshot.summary_counters;
    json!({
        "enabled": true,
        "port": lan.port,
        "queries": c.queries,
        "replies_received": c.replies_received,
        "replies_shunned": c.replies_shunned,
        "replies_sent": c.replies_sent,
        "replies_rate_limited": c.replies_rate_limited,
        "packets_dropped": c.packets_dropped(),
        "summaries": lan.summaries.as_ref().map(|s| json!({
            "hosts_heard": s.hosts_heard,
            "hosts_with_summary": s.hosts_with_summary,
            "covers_lan": s.covers_lan,
            "bytes": s.bytes,
            "fetched": fetched,
            "dropped": dropped,
            "fetch_failures": fetch_failures,
            "misses_answered": misses_answered,
        })),
        "summary": lan.published.as_ref().map(|p| json!({
            "generation": p.generation,
            "paths": p.paths,
            "bytes": p.bytes,
        })),
    })
}

/// The tracker client's state.
fn tracker(snapshot: &Snapshot) -> Value {
    let Some(t) = &snapshot.tracker else {
        return json!({ "enabled": false });
    };
    json!({
        "enabled": true,
        "node_id": t.node_id,
        "reachable": t.reachable,
        "announces": t.announces,
        "hashes_sent": t.hashes_sent,
        "lookups": t.lookups,
        "lookup_failures": t.lookup_failures,
        "failures": t.failures,
    })
}

/// A peer table entry.
pub(crate) fn peer(peer: &PeerView) -> Value {
    json!({
        "host": peer.host,
        "addr": peer.addr,
        "source": peer.source.label(),
        "state": peer.state.label(),
        "successes": peer.successes,
        "failures": peer.failures,
        "lies": peer.lies,
        "bytes": peer.bytes,
        "latency_ms": peer.latency_ms,
        "reputation": peer.reputation(),
        "last_seen_seconds": peer.last_seen.as_secs(),
        "available": peer.state == crate::stats::PeerState::Ok,
        "banned": peer.state == crate::stats::PeerState::Banned,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{NodeInfo, Stats, StoreView, View};
    use std::net::IpAddr;
    use std::path::PathBuf;

    fn snapshot(scans: u64, interval: Option<Duration>, lan_wanted: bool) -> Snapshot {
        let stats = Stats::new();
        let node = NodeInfo {
            version: "0",
            mode: "local",
            id: None,
            bind: IpAddr::from([127, 0, 0, 1]),
            port: 1,
            lan_port: None,
            daemon_socket: PathBuf::from("/x"),
            scan_interval: interval,
            lan_wanted,
        };
        let store = StoreView {
            daemon_reachable: true,
            scans,
            indexed: 3,
            shared: 2,
        };
        stats.snapshot(View {
            node: &node,
            store,
            peers: None,
            lan: None,
            tracker: None,
            addresses: Vec::new(),
        })
    }

    #[test]
    fn every_check_must_pass_to_be_healthy() {
        let (json, healthy) = render(&snapshot(1, Some(Duration::from_secs(3600)), false), false);
        assert!(healthy, "{json}");
        assert_eq!(json["status"], "healthy");
        assert_eq!(json["checks"]["index"]["status"], "ok");
        assert!(json.get("peers").is_none());

        let (json, healthy) = render(&snapshot(0, None, false), true);
        assert!(!healthy, "no scan yet: {json}");
        assert_eq!(json["checks"]["index"]["status"], "fail");
        assert_eq!(json["peers"], serde_json::json!([]));

        let (json, healthy) = render(&snapshot(1, None, true), false);
        assert!(!healthy, "LAN asked for, not running: {json}");
        assert_eq!(json["checks"]["lan"]["status"], "fail");
    }

    #[test]
    fn a_huge_scan_interval_does_not_overflow() {
        let (_, healthy) = render(
            &snapshot(1, Some(Duration::from_secs(u64::MAX)), false),
            false,
        );
        assert!(healthy);
    }
}
