//! Request routing: a strict parse of the URL path into a [`Route`].
//!
//! Nothing from a URL reaches the filesystem: a hash part must be 32 nix32
//! characters and a NAR name must be `<hash part>-<52-char nix32 NarHash>.nar`.
//! Anything else under a known prefix is a 400; an unknown path is a 404.

use crate::nix::hash::NarHash;
use crate::nix::narinfo::{nar_file_name, parse_nar_file_name};
use crate::nix::store_path::HashPart;
use crate::peers::PeerId;
use crate::stats::RouteKind;

/// Who a route serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// This host's own nix, on loopback: every valid local path.
    Root,
    /// Peers and LAN hosts under `/local`: only what the share policy allows.
    Local,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    CacheInfo(Scope),
    NarInfo(Scope, HashPart),
    Nar(Scope, HashPart, NarHash),
    /// A NAR fetched through this host from a peer (root only):
    /// `/peer/<peer id>/nar/<hash part>-<NarHash>.nar`, the peer named as
    /// [`PeerId::to_token`] writes it. (`/lan/<ip:port>/nar/...`, the form of
    /// earlier versions that nix may still have cached, is read too.)
    PeerNar(PeerId, HashPart, NarHash),
    Health,
    /// Prometheus text: `/metrics`.
    Metrics,
    /// The dashboard page, and the JSON it reads: `/dashboard`,
    /// `/dashboard.json`.
    Dashboard,
    DashboardJson,
    /// `POST /control/<action>`.
    Control(Control),
    /// This host's store summary: `/local/summary`.
    Summary,
    /// A known prefix with a malformed name: 400.
    BadRequest(&'static str),
    /// 404.
    NotFound,
}

/// What the control endpoints do to the scanner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    Rescan,
    Pause,
    Resume,
}

impl Route {
    /// Parses the request target (path plus optional query, which is ignored).
    pub fn parse(target: &str) -> Route {
        let path = target.split_once('?').map_or(target, |(path, _query)| path);
        let (scope, rest) = match path.strip_prefix("/local/") {
            Some(rest) => (Scope::Local, rest),
            None => match path.strip_prefix('/') {
                Some(rest) => (Scope::Root, rest),
                None => return Route::BadRequest("request target must start with /"),
            },
        };
        if scope == Scope::Root {
            match rest {
                "health" => return Route::Health,
                "metrics" => return Route::Metrics,
                "dashboard" => return Route::Dashboard,
                "dashboard.json" => return Route::DashboardJson,
                "control/rescan" => return Route::Control(Control::Rescan),
                "control/pause" => return Route::Control(Control::Pause),
                "control/resume" => return Route::Control(Control::Resume),
                _ => {}
            }
        }
        if rest == "nix-cache-info" {
            return Route::CacheInfo(scope);
        }
        if scope == Scope::Local && rest == "summary" {
            return Route::Summary;
        }
        if let Some(name) = rest.strip_suffix(".narinfo") {
            return match HashPart::parse(name) {
                Ok(hash) => Route::NarInfo(scope, hash),
                Err(_) => Route::BadRequest("malformed hash part in narinfo request"),
            };
        }
        if scope == Scope::Root {
            let peer_route = match (rest.strip_prefix("peer/"), rest.strip_prefix("lan/")) {
                (Some(rest), _) => Some((rest, PeerId::parse as fn(&str) -> Option<PeerId>)),
                (None, Some(rest)) => Some((rest, legacy_lan_peer as fn(&str) -> Option<PeerId>)),
                (None, None) => None,
            };
            if let Some((rest, parse_peer)) = peer_route {
                let parsed = rest
                    .split_once("/nar/")
                    .and_then(|(peer, file)| Some((parse_peer(peer)?, parse_nar_file_name(file)?)));
                return match parsed {
                    Some((peer, (hash, nar_hash))) => Route::PeerNar(peer, hash, nar_hash),
                    None => Route::BadRequest("malformed peer NAR route"),
                };
            }
        }
        if let Some(file) = rest.strip_prefix("nar/") {
            return parse_nar_file_name(file).map_or(
                Route::BadRequest("malformed NAR name"),
                |(hash, nar_hash)| Route::Nar(scope, hash, nar_hash),
            );
        }
        Route::NotFound
    }

    /// The kind of request, as stats count it.
    pub fn kind(&self) -> RouteKind {
        match self {
            Route::CacheInfo(Scope::Root) => RouteKind::CacheInfo,
            Route::CacheInfo(Scope::Local) => RouteKind::LocalCacheInfo,
            Route::NarInfo(Scope::Root, _) => RouteKind::NarInfo,
            Route::NarInfo(Scope::Local, _) => RouteKind::LocalNarInfo,
            Route::Nar(Scope::Root, ..) => RouteKind::Nar,
            Route::Nar(Scope::Local, ..) => RouteKind::LocalNar,
            Route::PeerNar(..) => RouteKind::PeerNar,
            Route::Health => RouteKind::Health,
            Route::Metrics => RouteKind::Metrics,
            Route::Dashboard => RouteKind::Dashboard,
            Route::DashboardJson => RouteKind::DashboardJson,
            Route::Control(_) => RouteKind::Control,
            Route::Summary => RouteKind::LocalSummary,
            Route::BadRequest(_) => RouteKind::BadRequest,
            Route::NotFound => RouteKind::NotFound,
        }
    }
}

/// The URL (relative to the cache root) under which this host passes a
/// peer's NAR through to nix; it names the peer and the NarHash.
pub fn peer_nar_url(peer: &PeerId, hash: &HashPart, nar_hash: &NarHash) -> String {
    format!(
        "peer/{}/nar/{}",
        peer.to_token(),
        nar_file_name(hash, nar_hash)
    )
}

/// `ip:port` in the `lan/` route of earlier versions: an HTTP peer.
fn legacy_lan_peer(text: &str) -> Option<PeerId> {
    text.parse().ok().map(PeerId::Http)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d";
    const NAR: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

    #[test]
    fn known_routes() {
        let hash = HashPart::parse(HASH).unwrap();
        assert_eq!(
            Route::parse("/nix-cache-info"),
            Route::CacheInfo(Scope::Root)
        );
        assert_eq!(
            Route::parse("/local/nix-cache-info"),
            Route::CacheInfo(Scope::Local)
        );
        assert_eq!(Route::parse("/local/summary"), Route::Summary);
        assert_eq!(Route::parse("/local/summary?x"), Route::Summary);
        assert_eq!(Route::parse("/health"), Route::Health);
        assert_eq!(Route::parse("/metrics"), Route::Metrics);
        assert_eq!(Route::parse("/dashboard?x"), Route::Dashboard);
        assert_eq!(Route::parse("/dashboard.json"), Route::DashboardJson);
        assert_eq!(
            Route::parse("/control/rescan"),
            Route::Control(Control::Rescan)
        );
        assert_eq!(
            Route::parse("/control/pause"),
            Route::Control(Control::Pause)
        );
        assert_eq!(
            Route::parse("/control/resume"),
            Route::Control(Control::Resume)
        );
        assert_eq!(
            Route::parse(&format!("/{HASH}.narinfo")),
            Route::NarInfo(Scope::Root, hash)
        );
        assert_eq!(
            Route::parse(&format!("/local/{HASH}.narinfo?x=1")),
            Route::NarInfo(Scope::Local, hash)
        );
        let nar_hash = NarHash::parse(&format!("sha256:{NAR}")).unwrap();
        assert_eq!(
            Route::parse(&format!("/local/nar/{HASH}-{NAR}.nar")),
            Route::Nar(Scope::Local, hash, nar_hash)
        );
        assert_eq!(nar_file_name(&hash, &nar_hash), format!("{HASH}-{NAR}.nar"));
        let peer = PeerId::Http("10.77.0.2:12304".parse().unwrap());
        let url = peer_nar_url(&peer, &hash, &nar_hash);
        assert_eq!(
            url,
            format!("peer/http:10.77.0.2:12304/nar/{HASH}-{NAR}.nar")
        );
        assert_eq!(
            Route::parse(&format!("/{url}")),
            Route::PeerNar(peer, hash, nar_hash)
        );
        let v6 = PeerId::Http("[fd00::2]:80".parse().unwrap());
        assert_eq!(
            Route::parse(&format!("/{}", peer_nar_url(&v6, &hash, &nar_hash))),
            Route::PeerNar(v6, hash, nar_hash)
        );
        // The route of earlier versions, which nix may have cached.
        assert_eq!(
            Route::parse(&format!("/lan/10.77.0.2:12304/nar/{HASH}-{NAR}.nar")),
            Route::PeerNar(peer, hash, nar_hash)
        );
    }

    #[test]
    fn malformed_names_are_bad_requests() {
        for target in [
            "/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1.narinfo",
            "/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1e.narinfo",
            "/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1dd.narinfo",
            "/../0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d.narinfo",
            "/local/..%2f0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm.narinfo",
            "/nar/..%2f..%2fetc%2fpasswd",
            "/nar/../../etc/passwd.nar",
            &format!("/nar/{HASH}.nar"),
            &format!("/nar/{HASH}-{NAR}"),
            &format!("/nar/{HASH}-{}.nar", &NAR[1..]),
            &format!("/nar/{HASH}-{NAR}.nar.xz"),
            &format!("/lan/10.77.0.2/nar/{HASH}-{NAR}.nar"),
            &format!("/lan/10.77.0.2:99999/nar/{HASH}-{NAR}.nar"),
            &format!("/lan/evil.example:80/nar/{HASH}-{NAR}.nar"),
            &format!("/lan/10.77.0.2:80/nar/{HASH}.nar"),
            &format!("/lan/10.77.0.2:80/x/{HASH}-{NAR}.nar"),
            &format!("/peer/10.77.0.2:80/nar/{HASH}-{NAR}.nar"),
            &format!("/peer/http:10.77.0.2/nar/{HASH}-{NAR}.nar"),
            &format!("/peer/iroh:abc/nar/{HASH}-{NAR}.nar"),
            &format!("/peer/http:10.77.0.2:80/nar/{HASH}.nar"),
            &format!("/peer/lan/10.77.0.2:80/nar/{HASH}-{NAR}.nar"),
            "no-slash",
        ] {
            assert!(
                matches!(Route::parse(target), Route::BadRequest(_) | Route::NotFound),
                "{target} parsed as {:?}",
                Route::parse(target)
            );
        }
        assert!(matches!(Route::parse("/nar/x.nar"), Route::BadRequest(_)));
    }

    #[test]
    fn unknown_paths_are_not_found() {
        for target in [
            "/",
            "/local",
            "/local/",
            "/local/health",
            "/local/metrics",
            "/local/dashboard",
            "/local/dashboard.json",
            "/local/control/rescan",
            "/control/",
            "/control/rescan/",
            "/metrics/",
            "/dashboard/",
            "/summary",
            "/local/summary/",
            "/etc/passwd",
            "/local/../nix-cache-info",
            &format!("/local/lan/10.77.0.2:80/nar/{HASH}-{NAR}.nar"),
            &format!("/local/peer/http:10.77.0.2:80/nar/{HASH}-{NAR}.nar"),
        ] {
            assert_eq!(Route::parse(target), Route::NotFound, "{target}");
        }
    }
}
