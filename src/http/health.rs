//! `/health`: whether this host's store is reachable, its index, the LAN
//! counters and, for this host only, the peer table.

use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tiny_http::Response;

use super::ServerContext;
use super::respond::body;

pub(super) fn health(context: &ServerContext, with_peers: bool) -> Response<Cursor<Vec<u8>>> {
    let store = &context.store;
    let index = store.index();
    let daemon = store.daemon_reachable();
    let mut json = serde_json::json!({
        "status": if daemon { "healthy" } else { "degraded" },
        "uptime_seconds": context.started.elapsed().as_secs(),
        "daemon": if daemon { "connected" } else { "unreachable" },
        "scans": store.completed_scans(),
        "indexed_paths": index.len(),
        "shared_paths": index.shared_len(),
        "lan": lan_health(context),
        "tracker": tracker_health(context),
    });
    if with_peers {
        json["peers"] = peers_health(context);
    }
    body(200, format!("{json}\n").into_bytes(), "application/json")
}

/// The tracker client's state for `/health`.
fn tracker_health(context: &ServerContext) -> serde_json::Value {
    let Some(tracker) = context.tracker.as_ref() else {
        return serde_json::json!({ "enabled": false });
    };
    let stats = &tracker.stats;
    let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    serde_json::json!({
        "enabled": true,
        "node_id": tracker.node_id().to_string(),
        "reachable": stats.reachable.load(Ordering::Relaxed),
        "announces": get(&stats.announces),
        "hashes_sent": get(&stats.hashes_sent),
        "lookups": get(&stats.lookups),
        "lookup_failures": get(&stats.lookup_failures),
        "failures": get(&stats.failures),
    })
}

/// The LAN counters for `/health`.
fn lan_health(context: &ServerContext) -> serde_json::Value {
    let Some(lan) = context.lan.as_ref() else {
        return serde_json::json!({ "enabled": false });
    };
    let summaries = context.summaries.as_ref().map(|summaries| {
        let (hosts, fresh, bytes) = summaries.coverage();
        let stats = &summaries.stats;
        let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        serde_json::json!({
            "hosts_heard": hosts,
            "hosts_with_summary": fresh,
            "covers_lan": summaries.cover_all(),
            "bytes": bytes,
            "fetched": get(&stats.fetched),
            "dropped": get(&stats.dropped),
            "fetch_failures": get(&stats.fetch_failures),
            "misses_answered": get(&stats.misses_answered),
        })
    });
    let published = context.publisher.as_ref().map(|p| {
        let published = p.current();
        serde_json::json!({
            "generation": published.generation,
            "paths": published.paths,
            "bytes": published.bytes.len(),
        })
    });
    let stats = &lan.stats;
    let get = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    serde_json::json!({
        "enabled": true,
        "port": lan.port(),
        "queries": get(&stats.queries),
        "replies_received": get(&stats.replies_received),
        "replies_shunned": get(&stats.replies_shunned),
        "replies_sent": get(&stats.replies_sent),
        "replies_rate_limited": get(&stats.replies_rate_limited),
        "packets_dropped": get(&stats.packets_dropped),
        "summaries": summaries,
        "summary": published,
    })
}

/// The peer table for `/health`.
fn peers_health(context: &ServerContext) -> serde_json::Value {
    let Some(resolver) = context.resolver.as_ref() else {
        return serde_json::json!([]);
    };
    let now = Instant::now();
    resolver
        .peers()
        .snapshot()
        .into_iter()
        .map(|(host, record)| {
            serde_json::json!({
                "host": host.to_string(),
                "addr": record.last_seen_as.to_string(),
                "successes": record.successes,
                "failures": record.failures,
                "lies": record.lies,
                "bytes": record.bytes,
                "latency_ms": record.latency_ms,
                "available": record.is_available(now),
                "banned": record.is_banned(now),
            })
        })
        .collect()
}
