//! The HTTP route parser (`Route::parse`), as every request's target goes
//! through it.
//!
//! Checks: no panic; a route that names something (cache info, a narinfo,
//! a NAR, a peer's NAR) comes from exactly its one canonical path, so no
//! other spelling (dot segments, escapes, case, extra bytes) reaches a
//! handler; a peer NAR route renders back to a path that parses to the same
//! route; the query never matters; refusals have a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix::http::route::{Route, Scope, peer_nar_url};
use peerix::nix::narinfo::nar_file_name;

fn prefix(scope: Scope) -> &'static str {
    match scope {
        Scope::Root => "/",
        Scope::Local => "/local/",
    }
}

fuzz_target!(|data: &[u8]| {
    // tiny_http hands the handler the request target as a &str.
    let Ok(target) = std::str::from_utf8(data) else {
        return;
    };
    let route = Route::parse(target);
    let path = target.split_once('?').map_or(target, |(path, _)| path);

    match &route {
        Route::CacheInfo(scope) => assert_eq!(path, format!("{}nix-cache-info", prefix(*scope))),
        Route::NarInfo(scope, hash) => {
            assert_eq!(path, format!("{}{}.narinfo", prefix(*scope), hash.as_str()))
        }
        Route::Nar(scope, hash, nar_hash) => assert_eq!(
            path,
            format!("{}nar/{}", prefix(*scope), nar_file_name(hash, nar_hash))
        ),
        Route::PeerNar(peer, hash, nar_hash) => {
            let canonical = format!("/{}", peer_nar_url(peer, hash, nar_hash));
            assert_eq!(
                Route::parse(&canonical),
                route,
                "{canonical} parses differently"
            );
            // Only the peer's address may be spelled in more than one way.
            assert!(path.starts_with("/peer/") || path.starts_with("/lan/"));
            assert!(path.ends_with(&format!("/nar/{}", nar_file_name(hash, nar_hash))));
        }
        Route::Health => assert_eq!(path, "/health"),
        Route::Metrics => assert_eq!(path, "/metrics"),
        Route::Dashboard => assert_eq!(path, "/dashboard"),
        Route::DashboardJson => assert_eq!(path, "/dashboard.json"),
        Route::Control(_) => assert!(path.starts_with("/control/")),
        Route::Summary => assert_eq!(path, "/local/summary"),
        Route::BadRequest(why) => assert!(!why.is_empty()),
        Route::NotFound => {}
    }

    // The query is ignored.
    if !target.contains('?') {
        assert_eq!(Route::parse(&format!("{target}?x=1")), route);
    } else {
        assert_eq!(Route::parse(path), route);
    }
});
