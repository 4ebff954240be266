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

use tiny_http::Response;

use super::respond::{body, header};
use crate::stats::{PeerState, PeerView, Snapshot};

#[inline(never)]
pub(super) fn health(snapshot: &Snapshot, with_peers: bool) -> Response<Cursor<Vec<u8>>> {
    let (mut json, healthy) = render(snapshot, with_peers);
    json.push('\n');
    let status = if healthy { 200 } else { 503 };
    body(status, json.into_bytes(), "application/json")
        .with_header(header("Cache-Control", "no-store"))
}

pub(super) use crate::json::Json;

/// The `/health` document, and whether every check passed.
#[inline(never)]
pub(crate) fn render(snapshot: &Snapshot, with_peers: bool) -> (String, bool) {
    let store = &snapshot.store;
    let mut json = Json::new();
    json.open();
    json.key("available_hashes").u64(store.shared as u64);
    json.key("checks");
    let healthy = checks(&mut json, snapshot);
    json.key("daemon").str(daemon(snapshot));
    json.key("indexed_paths").u64(store.indexed as u64);
    json.key("lan");
    lan(&mut json, snapshot);
    json.key("paused").bool(store.paused);
    if with_peers {
        json.key("peers").open_list();
        for p in &snapshot.peers {
            peer(&mut json, p);
        }
        json.close_list();
    }
    json.key("peer_id").str(&snapshot.node.peer_id);
    json.key("peers_connected").u64(snapshot.peers_connected());
    json.key("read_ahead");
    read_ahead(&mut json, snapshot);
    json.key("scan_pending").bool(store.scan_pending);
    json.key("scans").u64(store.scans);
    json.key("shared_paths").u64(store.shared as u64);
    json.key("status").str(status(healthy));
    json.key("tracker");
    tracker(&mut json, snapshot);
    json.key("uptime_seconds").u64(snapshot.uptime.as_secs());
    json.key("version").str(snapshot.node.version);
    json.close();
    (json.out, healthy)
}

/// What was fetched before nix asked: `null` when no peer is ever asked.
fn read_ahead(json: &mut Json, snapshot: &Snapshot) {
    let Some(c) = &snapshot.read_ahead else {
        json.null();
        return;
    };
    json.open();
    json.key("bytes_held").u64(c.bytes);
    json.key("found").u64(c.found);
    json.key("nars_held").u64(c.nars_held);
    json.key("nars_served").u64(c.nars_served);
    json.close();
}

pub(super) fn status(healthy: bool) -> &'static str {
    if healthy { "healthy" } else { "degraded" }
}

/// The top-level `daemon` field: what the last use of the daemon found.
pub(super) fn daemon(snapshot: &Snapshot) -> &'static str {
    if snapshot.store.daemon_reachable {
        "connected"
    } else {
        "unreachable"
    }
}

/// The named checks, as an object; returns whether all passed.
pub(super) fn checks(json: &mut Json, snapshot: &Snapshot) -> bool {
    let store = &snapshot.store;
    json.open();
    let daemon_ok = snapshot.daemon_answers.unwrap_or(store.daemon_reachable);
    json.key("daemon_socket").open();
    json.key("detail").str(if daemon_ok {
        "answers"
    } else {
        "does not answer"
    });
    check(json, daemon_ok);
    let index_ok = index_fresh(snapshot);
    json.key("index").open();
    json.key("age_seconds")
        .opt_u64(snapshot.index_age.map(|age| age.as_secs()));
    json.key("detail").str(match (store.scans, index_ok) {
        (0, _) => "no scan done yet",
        (_, true) => "fresh",
        (_, false) => "stale: the last scan is older than two scan intervals",
    });
    json.key("scans").u64(store.scans);
    check(json, index_ok);
    let mut healthy = daemon_ok && index_ok;
    if snapshot.node.lan_wanted {
        let running = snapshot.lan.is_some();
        json.key("lan").open();
        json.key("detail").str(if running {
            "listening"
        } else {
            "could not start"
        });
        check(json, running);
        healthy &= running;
    }
    if let Some(tracker) = &snapshot.tracker {
        json.key("tracker").open();
        json.key("detail").str(if tracker.reachable {
            "reachable"
        } else {
            "unreachable"
        });
        check(json, tracker.reachable);
        healthy &= tracker.reachable;
    }
    if let Some(state) = &snapshot.state {
        state_check(json, state);
        healthy &= state.last_error.is_none();
    }
    json.close();
    healthy
}

/// The state directory's writer: failing while a write fails. Files found
/// damaged at start are listed, set aside and replaced: not a failure.
fn state_check(json: &mut Json, state: &crate::state::StateReport) {
    json.key("state").open();
    json.key("damaged").open_list();
    for damaged in &state.damaged {
        json.open();
        json.key("error").str(&damaged.error);
        json.key("file").str(damaged.file);
        json.key("set_aside_as");
        match &damaged.set_aside_as {
            Some(path) => json.str(path),
            None => json.null(),
        };
        json.close();
    }
    json.close_list();
    json.key("detail")
        .str(match (&state.last_error, state.damaged.is_empty()) {
            (Some(e), _) => e,
            (None, true) => "written",
            (None, false) => "written; damaged files were set aside and replaced",
        });
    json.key("dir").str(&state.dir.display().to_string());
    json.key("last_write").opt_u64(state.last_write);
    json.key("writes").u64(state.writes);
    check(json, state.last_error.is_none());
}

/// Ends a check's object with its status.
fn check(json: &mut Json, ok: bool) {
    json.key("status").str(if ok { "ok" } else { "fail" });
    json.close();
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
pub(super) fn lan(json: &mut Json, snapshot: &Snapshot) {
    json.open();
    let Some(lan) = &snapshot.lan else {
        json.key("enabled").bool(false).close();
        return;
    };
    let c = &snapshot.lan_counters;
    let [fetched, dropped, fetch_failures, misses_answered] = snapshot.summary_counters;
    json.key("enabled").bool(true);
    json.key("packets_dropped").u64(c.packets_dropped());
    json.key("port").u64(lan.port.into());
    json.key("queries").u64(c.queries);
    json.key("replies_rate_limited").u64(c.replies_rate_limited);
    json.key("replies_received").u64(c.replies_received);
    json.key("replies_sent").u64(c.replies_sent);
    json.key("replies_shunned").u64(c.replies_shunned);
    json.key("summaries");
    match &lan.summaries {
        Some(s) => {
            json.open();
            json.key("bytes").u64(s.bytes as u64);
            json.key("covers_lan").bool(s.covers_lan);
            json.key("dropped").u64(dropped);
            json.key("fetch_failures").u64(fetch_failures);
            json.key("fetched").u64(fetched);
            json.key("hosts_heard").u64(s.hosts_heard as u64);
            json.key("hosts_with_summary")
                .u64(s.hosts_with_summary as u64);
            json.key("misses_answered").u64(misses_answered);
            json.close();
        }
        None => {
            json.null();
        }
    }
    json.key("summary");
    match &lan.published {
        Some(p) => {
            json.open();
            json.key("bytes").u64(p.bytes as u64);
            json.key("generation").u64(p.generation);
            json.key("paths").u64(p.paths.into());
            json.close();
        }
        None => {
            json.null();
        }
    }
    json.close();
}

/// The tracker client's state.
pub(super) fn tracker(json: &mut Json, snapshot: &Snapshot) {
    json.open();
    let Some(t) = &snapshot.tracker else {
        json.key("enabled").bool(false).close();
        return;
    };
    json.key("announces").u64(t.announces);
    json.key("enabled").bool(true);
    json.key("failures").u64(t.failures);
    json.key("hashes_sent").u64(t.hashes_sent);
    json.key("lookup_failures").u64(t.lookup_failures);
    json.key("lookups").u64(t.lookups);
    json.key("node_id").str(&t.node_id);
    json.key("reachable").bool(t.reachable);
    json.close();
}

/// A peer table entry.
pub(super) fn peer(json: &mut Json, peer: &PeerView) {
    json.open();
    json.key("addr").str(&peer.addr);
    json.key("available").bool(peer.state == PeerState::Ok);
    json.key("banned").bool(peer.state == PeerState::Banned);
    json.key("bytes").u64(peer.bytes);
    json.key("failures").u64(peer.failures);
    json.key("host").str(&peer.host);
    json.key("last_seen_seconds").u64(peer.last_seen.as_secs());
    json.key("latency_ms");
    match peer.latency_ms {
        Some(ms) => json.f64(ms),
        None => json.null(),
    };
    json.key("lies").u64(peer.lies);
    json.key("reputation").f64(peer.reputation());
    json.key("source").str(peer.source.label());
    json.key("state").str(peer.state.label());
    json.key("successes").u64(peer.successes);
    json.close();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{NodeInfo, Stats, StoreView, View};

    fn snapshot(scans: u64, interval: Option<Duration>, lan_wanted: bool) -> Snapshot {
        let stats = Stats::new();
        let node = NodeInfo {
            scan_interval: interval,
            lan_wanted,
            ..NodeInfo::for_tests()
        };
        let store = StoreView {
            daemon_reachable: true,
            scans,
            indexed: 3,
            shared: 2,
            ..StoreView::default()
        };
        stats.snapshot(View {
            node: &node,
            store,
            peers: None,
            lan: None,
            tracker: None,
            read_ahead: None,
            addresses: Vec::new(),
        })
    }

    fn render(snapshot: &Snapshot, with_peers: bool) -> (serde_json::Value, bool) {
        let (text, healthy) = super::render(snapshot, with_peers);
        (serde_json::from_str(&text).expect("JSON"), healthy)
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
