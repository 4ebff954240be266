//! `/dashboard`: one self-contained page (its style and script inline,
//! nothing fetched from anywhere but `dashboard.json` on this server), the
//! JSON it reads every 2 s, and the control endpoints.
//!
//! A Content-Security-Policy holds the page to that: only its own script
//! and style (by hash) run, and it may connect to this origin only, so no
//! path name or peer address from another host can inject anything. The
//! JSON is the same [`Snapshot`] `/health` and `/metrics` render.
//!
//! The control endpoints (`POST /control/rescan`, `/pause`, `/resume`)
//! answer this host only, and a browser only when the page posting is this
//! host's own: a page elsewhere that posts to 127.0.0.1 gives itself away
//! by its `Origin`.

use std::io::Cursor;
use std::sync::LazyLock;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tiny_http::{Request, Response};

use super::ServerContext;
use super::access::host_is_local;
use super::health;
use super::respond::{body, header, respond, text};
use super::route::Control;
use super::serve::header_value;
use crate::nix::base64;
use crate::stats::{PeerState, Snapshot, TopEntry};

const STYLE: &str = include_str!("dashboard.css");
const SCRIPT: &str = include_str!("dashboard.js");
const BODY: &str = include_str!("dashboard.html");

/// Peers listed at most, the most recently seen first; the counts cover
/// them all.
pub(crate) const PEERS_SHOWN: usize = 100;

/// The page, and its Content-Security-Policy.
static PAGE: LazyLock<(Vec<u8>, String)> = LazyLock::new(|| {
    let page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <link rel=\"icon\" href=\"data:,\">\
         <title>peerix</title><style>{STYLE}</style></head><body>\n{BODY}<script>{SCRIPT}</script>\n</body></html>\n"
    );
    let hash = |text: &str| base64::encode(&Sha256::digest(text.as_bytes()));
    let policy = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
         connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'",
        hash(SCRIPT),
        hash(STYLE)
    );
    (page.into_bytes(), policy)
});

#[inline(never)]
pub(super) fn page() -> Response<Cursor<Vec<u8>>> {
    let (page, policy) = &*PAGE;
    body(200, page.clone(), "text/html; charset=utf-8")
        .with_header(header("Content-Security-Policy", policy))
        .with_header(header("X-Content-Type-Options", "nosniff"))
        .with_header(header("Referrer-Policy", "no-referrer"))
        .with_header(header("Cache-Control", "no-cache"))
}

/// The page's size in bytes.
#[cfg(test)]
pub(crate) fn page_weight() -> usize {
    PAGE.0.len()
}

#[inline(never)]
pub(super) fn json(snapshot: &Snapshot) -> Response<Cursor<Vec<u8>>> {
    body(
        200,
        render(snapshot).to_string().into_bytes(),
        "application/json",
    )
    .with_header(header("Cache-Control", "no-store"))
    .with_header(header("X-Content-Type-Options", "nosniff"))
}

/// `dashboard.json`.
#[inline(never)]
pub(crate) fn render(s: &Snapshot) -> Value {
    let (health, _) = health::render(s, false);
    let node = &s.node;
    let mut peers: Vec<_> = s.peers.iter().collect();
    peers.sort_by_key(|p| p.last_seen);
    peers.truncate(PEERS_SHOWN);
    let top = |list: &[TopEntry]| -> Value {
        list.iter()
            .map(|e| json!({ "hash": e.hash.to_string(), "name": e.name, "count": e.count }))
            .collect()
    };
    json!({
        "status": health["status"],
        "checks": health["checks"],
        "node": {
            "version": node.version,
            "mode": node.mode,
            "id": node.id,
            "peer_id": node.peer_id,
            "bind": node.bind.to_string(),
            "port": node.port,
            "lan_port": node.lan_port,
            "addresses": s.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "uptime_seconds": s.uptime.as_secs(),
        },
        "totals": {
            "requests": s.requests(),
            "nars_served": s.nars_served,
            "narinfos_served": s.narinfos_served,
            "cache_hits": s.cache_hits,
            "cache_misses": s.cache_misses,
            "peer_requests": s.peer_requests,
            "errors": s.errors,
            "bytes_sent": s.bytes_sent(),
            "bytes_sent_local": s.bytes_sent_local,
            "bytes_received": s.bytes_received(),
        },
        "store": {
            "daemon": health["daemon"],
            "daemon_socket": node.daemon_socket.display().to_string(),
            "scans": s.store.scans,
            "indexed_paths": s.store.indexed,
            "shared_paths": s.store.shared,
            "index_age_seconds": s.index_age.map(|age| age.as_secs()),
            "scan_interval_seconds": node.scan_interval.map(|i| i.as_secs()),
            "rescans_requested": s.rescans_requested,
            "can_pause": false,
        },
        "lan": health["lan"],
        "tracker": health["tracker"],
        "peers": {
            "total": s.peers.len(),
            "by_state": PeerState::ALL
                .iter()
                .map(|state| (state.label().to_string(), Value::from(s.peer_states[*state as usize])))
                .collect::<serde_json::Map<_, _>>(),
            "shown": peers.into_iter().map(health::peer).collect::<Vec<_>>(),
        },
        "routes": s.routes
            .iter()
            .filter(|(_, h)| h.count() > 0)
            .map(|(kind, h)| json!({
                "route": kind.label(),
                "requests": h.count(),
                "mean_ms": h.sum_us as f64 / 1000.0 / h.count() as f64,
            }))
            .collect::<Vec<_>>(),
        "top_requested": top(&s.top_requested),
        "top_served": top(&s.top_served),
        "activity": s.activity
            .iter()
            .rev()
            .map(|e| json!({ "at": e.at, "kind": e.kind, "text": e.text }))
            .collect::<Vec<_>>(),
    })
}

/// `POST /control/<action>`; returns the status.
#[inline(never)]
pub(super) fn control(context: &ServerContext, request: Request, action: Control) -> u16 {
    if let Some(origin) = header_value(&request, "Origin")
        && !origin_is_local(origin, context.bind)
    {
        return respond(
            request,
            text(403, "control endpoints answer pages of this host only\n"),
        );
    }
    match action {
        Control::Rescan => {
            let Some(rescan) = &context.rescan else {
                return respond(request, text(501, "this peerix runs no scanner\n"));
            };
            match rescan() {
                Ok(()) => {
                    context.stats.rescan_requested();
                    context
                        .stats
                        .event("control", "rescan requested".to_string());
                    log::info!("rescan requested on the control endpoint");
                    respond(
                        request,
                        body(
                            202,
                            b"{\"rescan\":\"requested\"}\n".to_vec(),
                            "application/json",
                        ),
                    )
                }
                Err(e) => {
                    log::error!("cannot request a rescan: {e}");
                    respond(request, text(500, "cannot request a rescan\n"))
                }
            }
        }
        // The scanner has no pause yet: it would have to check a flag
        // between scans (src/store/scanner.rs).
        Control::Pause | Control::Resume => respond(
            request,
            text(
                501,
                "the scanner cannot be paused yet; POST /control/rescan works\n",
            ),
        ),
    }
}

/// Whether an `Origin` is a page of this host: `http://` or `https://` and
/// a host [`host_is_local`] accepts. `null` (a sandboxed or local file
/// page) is not.
fn origin_is_local(origin: &str, bind: std::net::IpAddr) -> bool {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    !rest.contains('/') && host_is_local(Some(rest), bind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        let page = String::from_utf8(PAGE.0.clone()).unwrap();
        for forbidden in [
            "http://",
            "https://",
            "//cdn",
            "@import",
            "url(",
            "stylesheet",
            " src=",
            "@font-face",
        ] {
            assert!(!page.contains(forbidden), "the page contains {forbidden}");
        }
        assert!(PAGE.1.contains("default-src 'none'"));
        assert!(page_weight() < 32 * 1024, "{} bytes", page_weight());
    }

    #[test]
    fn only_pages_of_this_host_may_post() {
        let any = std::net::IpAddr::from([0, 0, 0, 0]);
        for origin in [
            "http://127.0.0.1:12304",
            "http://localhost",
            "https://[::1]:1",
        ] {
            assert!(origin_is_local(origin, any), "{origin}");
        }
        for origin in [
            "null",
            "http://evil.example",
            "http://127.0.0.1.evil.example:12304",
            "file://",
            "http://127.0.0.1:12304/x",
            "",
        ] {
            assert!(!origin_is_local(origin, any), "{origin}");
        }
    }
}
