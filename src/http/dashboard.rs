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

use sha2::{Digest, Sha256};
use tiny_http::{Request, Response};

use super::ServerContext;
use super::access::host_is_local;
use super::health::{self, Json};
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
    body(200, render(snapshot).into_bytes(), "application/json")
        .with_header(header("Cache-Control", "no-store"))
        .with_header(header("X-Content-Type-Options", "nosniff"))
}

/// `dashboard.json`, its keys sorted.
#[inline(never)]
pub(crate) fn render(s: &Snapshot) -> String {
    let node = &s.node;
    let mut json = Json::new();
    json.open();
    json.key("activity").open_list();
    for e in s.activity.iter().rev() {
        json.open();
        json.key("at").u64(e.at);
        json.key("kind").str(e.kind);
        json.key("text").str(&e.text);
        json.close();
    }
    json.close_list();
    json.key("checks");
    let healthy = health::checks(&mut json, s);
    json.key("lan");
    health::lan(&mut json, s);

    json.key("node").open();
    json.key("addresses").open_list();
    for address in &s.addresses {
        json.str(&address.to_string());
    }
    json.close_list();
    json.key("bind").str(&node.bind.to_string());
    json.key("id");
    match &node.id {
        Some(id) => json.str(id),
        None => json.null(),
    };
    json.key("lan_port").opt_u64(node.lan_port.map(u64::from));
    json.key("mode").str(node.mode);
    json.key("peer_id").str(&node.peer_id);
    json.key("port").u64(node.port.into());
    json.key("uptime_seconds").u64(s.uptime.as_secs());
    json.key("version").str(node.version);
    json.close();

    let mut peers: Vec<_> = s.peers.iter().collect();
    crate::order::sort_by(&mut peers, |a, b| a.last_seen.cmp(&b.last_seen));
    peers.truncate(PEERS_SHOWN);
    json.key("peers").open();
    json.key("by_state").open();
    for state in [PeerState::Backoff, PeerState::Banned, PeerState::Ok] {
        json.key(state.label()).u64(s.peer_states[state as usize]);
    }
    json.close();
    json.key("shown").open_list();
    for p in peers {
        health::peer(&mut json, p);
    }
    json.close_list();
    json.key("total").u64(s.peers.len() as u64);
    json.close();

    json.key("routes").open_list();
    for (kind, h) in s.routes.iter().filter(|(_, h)| h.count() > 0) {
        json.open();
        json.key("mean_ms")
            .f64(h.sum_us as f64 / 1000.0 / h.count() as f64);
        json.key("requests").u64(h.count());
        json.key("route").str(kind.label());
        json.close();
    }
    json.close_list();
    json.key("status").str(health::status(healthy));

    let store = &s.store;
    json.key("store").open();
    json.key("can_pause").bool(true);
    json.key("daemon").str(health::daemon(s));
    json.key("daemon_socket")
        .str(&node.daemon_socket.display().to_string());
    json.key("index_age_seconds")
        .opt_u64(s.index_age.map(|age| age.as_secs()));
    json.key("indexed_paths").u64(store.indexed as u64);
    json.key("paused").bool(store.paused);
    json.key("rescans_requested").u64(s.rescans_requested);
    json.key("scan_interval_seconds")
        .opt_u64(node.scan_interval.map(|i| i.as_secs()));
    json.key("scan_pending").bool(store.scan_pending);
    json.key("scans").u64(store.scans);
    json.key("shared_paths").u64(store.shared as u64);
    json.close();

    json.key("top_requested");
    top(&mut json, &s.top_requested);
    json.key("top_served");
    top(&mut json, &s.top_served);

    json.key("totals").open();
    json.key("bytes_received").u64(s.counters.bytes_received());
    json.key("bytes_sent").u64(s.counters.bytes_sent());
    json.key("bytes_sent_local")
        .u64(s.counters.bytes_sent_local);
    json.key("cache_hits").u64(s.counters.cache_hits);
    json.key("cache_misses").u64(s.counters.cache_misses);
    json.key("errors").u64(s.counters.errors);
    json.key("narinfos_served").u64(s.counters.narinfos_served);
    json.key("nars_served").u64(s.counters.nars_served);
    json.key("peer_requests").u64(s.counters.peer_requests);
    json.key("requests").u64(s.requests());
    json.close();

    json.key("tracker");
    health::tracker(&mut json, s);
    json.close();
    json.out
}

fn top(json: &mut Json, list: &[TopEntry]) {
    json.open_list();
    for e in list {
        json.open();
        json.key("count").u64(e.count);
        json.key("hash").str(e.hash.as_str());
        json.key("name");
        match &e.name {
            Some(name) => json.str(name),
            None => json.null(),
        };
        json.close();
    }
    json.close_list();
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
    let Some(wake) = &context.rescan else {
        return respond(request, text(501, "this peerix runs no scanner\n"));
    };
    let control = context.store.scan_control();
    let (status, answer, event): (u16, &[u8], &str) = match action {
        // While paused the request is remembered: the scanner holds the
        // scan it wakes for until the resume.
        Control::Rescan => {
            if let Err(e) = wake() {
                log::error!("cannot request a rescan: {e}");
                return respond(request, text(500, "cannot request a rescan\n"));
            }
            context.stats.rescan_requested();
            if control.state().0 {
                (
                    202,
                    b"{\"paused\":true,\"rescan\":\"deferred: it runs on POST /control/resume\"}\n",
                    "rescan requested while paused: it waits for the resume",
                )
            } else {
                (
                    202,
                    b"{\"paused\":false,\"rescan\":\"requested\"}\n",
                    "rescan requested",
                )
            }
        }
        Control::Pause => {
            if control.pause() {
                (
                    200,
                    b"{\"paused\":true,\"scan\":\"no scan starts until POST /control/resume; one under way finishes\"}\n",
                    "scanner paused",
                )
            } else {
                (200, b"{\"paused\":true,\"scan\":\"already paused\"}\n", "")
            }
        }
        Control::Resume => {
            let (paused, _) = control.state();
            if control.resume() {
                if let Err(e) = wake() {
                    log::error!("cannot wake the scanner: {e}");
                    return respond(request, text(500, "cannot wake the scanner\n"));
                }
                (
                    200,
                    b"{\"paused\":false,\"scan\":\"the scan that waited runs now\"}\n",
                    "scanner resumed: the scan that waited runs now",
                )
            } else if paused {
                (
                    200,
                    b"{\"paused\":false,\"scan\":\"none waited\"}\n",
                    "scanner resumed",
                )
            } else {
                (200, b"{\"paused\":false,\"scan\":\"was not paused\"}\n", "")
            }
        }
    };
    if !event.is_empty() {
        log::info!("{event} (control endpoint)");
        context.stats.event("control", event.to_string());
    }
    respond(request, body(status, answer.to_vec(), "application/json"))
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
