//! `/metrics`: the Prometheus text exposition format (version 0.0.4).
//!
//! The original peerix's names are kept (`peerix_up`,
//! `peerix_uptime_seconds`, `peerix_peers_connected`,
//! `peerix_available_hashes`, its `_total` counters and
//! `peerix_request_duration_seconds`, here a histogram labelled by route).
//! Every label takes values from a fixed set: route kinds, status classes,
//! peer sources and states, drop reasons. Nothing is labelled by hash or
//! by peer.

use std::fmt::Write;
use std::io::Cursor;

use tiny_http::Response;

use super::respond::{body, header};
use crate::stats::{BUCKET_LABELS, DropReason, PeerState, Snapshot, Source};

const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[inline(never)]
pub(super) fn metrics(snapshot: &Snapshot) -> Response<Cursor<Vec<u8>>> {
    body(200, render(snapshot).into_bytes(), CONTENT_TYPE)
        .with_header(header("Cache-Control", "no-store"))
}

/// Writes families: `# HELP`, `# TYPE` and the samples.
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // Writing to a String cannot fail.
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, label)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                // Label values come from fixed sets of plain words.
                let _ = write!(self.text, "{key}=\"{label}\"");
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family of samples told apart by one label: `(label value, value)`.
    fn by_label(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) {
        self.family(name, kind, help);
        for (value_label, value) in values {
            self.sample(name, &[(label, value_label)], value);
        }
    }

    /// A family of one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

#[inline(never)]
pub(crate) fn render(s: &Snapshot) -> String {
    let mut out = Out {
        text: String::with_capacity(16 * 1024),
    };
    let o = &mut out;
    o.single("peerix_up", "gauge", "Whether peerix is running.", 1);
    o.family(
        "peerix_build_info",
        "gauge",
        "The running version, as a label.",
    );
    o.sample("peerix_build_info", &[("version", s.node.version)], 1);
    o.single(
        "peerix_uptime_seconds",
        "gauge",
        "Seconds since peerix started.",
        s.uptime.as_secs(),
    );
    o.single(
        "peerix_peers_connected",
        "gauge",
        "Peer hosts in good standing (neither in backoff nor banned).",
        s.peers_connected(),
    );
    o.by_label(
        "peerix_peers",
        "gauge",
        "Peer hosts in the peer table, by state.",
        "state",
        &PeerState::ALL.map(|state| (state.label(), s.peer_states[state as usize])),
    );
    o.single(
        "peerix_available_hashes",
        "gauge",
        "Store paths this host shares with peers.",
        s.store.shared,
    );
    o.single(
        "peerix_indexed_paths",
        "gauge",
        "Valid store paths in the index.",
        s.store.indexed,
    );
    o.by_label(
        "peerix_share_decisions",
        "gauge",
        "Paths of the index by the share policy's decision.",
        "decision",
        &[
            ("shared", s.store.shared as u64),
            (
                "not_shared",
                s.store.indexed.saturating_sub(s.store.shared) as u64,
            ),
        ],
    );
    o.single(
        "peerix_scans_total",
        "counter",
        "Completed scans of the store.",
        s.store.scans,
    );
    if let Some(age) = s.index_age {
        o.single(
            "peerix_index_age_seconds",
            "gauge",
            "Seconds since the last completed scan.",
            age.as_secs(),
        );
    }
    if let Some(answers) = s.daemon_answers {
        o.single(
            "peerix_daemon_up",
            "gauge",
            "Whether the nix-daemon answers.",
            u8::from(answers),
        );
    }
    o.single(
        "peerix_scanner_paused",
        "gauge",
        "Whether the scanner is paused (POST /control/pause).",
        u8::from(s.store.paused),
    );

    let counters: [(&str, &str, u64); 9] = [
        (
            "peerix_nars_served_total",
            "NARs sent whole (or the range asked), to this host's nix and to peers.",
            s.counters.nars_served,
        ),
        (
            "peerix_narinfos_served_total",
            "Narinfos served, to this host's nix and to peers.",
            s.counters.narinfos_served,
        ),
        (
            "peerix_bytes_sent_total",
            "NAR bytes sent, to this host's nix and to peers.",
            s.counters.bytes_sent(),
        ),
        (
            "peerix_bytes_received_total",
            "NAR bytes received from peers.",
            s.counters.bytes_received(),
        ),
        (
            "peerix_cache_hits_total",
            "Narinfos this host's nix asked for and got, from here or a peer.",
            s.counters.cache_hits,
        ),
        (
            "peerix_cache_misses_total",
            "Narinfos this host's nix asked for that neither this host nor a peer has.",
            s.counters.cache_misses,
        ),
        (
            "peerix_peer_requests_total",
            "Lookups and NAR transfers this host sent to its peers.",
            s.counters.peer_requests,
        ),
        (
            "peerix_errors_total",
            "5xx responses, transfers broken after their headers, and failed handlers.",
            s.counters.errors,
        ),
        (
            "peerix_requests_total",
            "HTTP requests answered.",
            s.requests(),
        ),
    ];
    for (name, help, value) in counters {
        o.single(name, "counter", help, value);
    }

    o.family(
        "peerix_transfer_bytes_total",
        "counter",
        "NAR bytes by direction and by peer source (local: this host's nix).",
    );
    o.sample(
        "peerix_transfer_bytes_total",
        &[("direction", "sent"), ("source", "local")],
        s.counters.bytes_sent_local,
    );
    for source in Source::ALL {
        let i = source as usize;
        o.sample(
            "peerix_transfer_bytes_total",
            &[("direction", "sent"), ("source", source.label())],
            s.counters.bytes_sent_peers[i],
        );
        o.sample(
            "peerix_transfer_bytes_total",
            &[("direction", "received"), ("source", source.label())],
            s.counters.bytes_received_peers[i],
        );
    }

    o.by_label(
        "peerix_http_responses_total",
        "counter",
        "HTTP responses by status class.",
        "code",
        &["1xx", "2xx", "3xx", "4xx", "5xx"]
            .into_iter()
            .zip(s.responses)
            .collect::<Vec<_>>(),
    );

    o.family(
        "peerix_request_duration_seconds",
        "histogram",
        "Time a worker spent answering a request, by route.",
    );
    for (kind, histogram) in &s.routes {
        let route = kind.label();
        let mut cumulative = 0;
        for (le, count) in BUCKET_LABELS.iter().zip(&histogram.counts) {
            cumulative += count;
            o.sample(
                "peerix_request_duration_seconds_bucket",
                &[("route", route), ("le", le)],
                cumulative,
            );
        }
        let count = histogram.count();
        o.sample(
            "peerix_request_duration_seconds_bucket",
            &[("route", route), ("le", "+Inf")],
            count,
        );
        o.sample(
            "peerix_request_duration_seconds_sum",
            &[("route", route)],
            format_args!("{:.6}", histogram.sum_us as f64 / 1e6),
        );
        o.sample(
            "peerix_request_duration_seconds_count",
            &[("route", route)],
            count,
        );
    }

    o.single(
        "peerix_rescans_requested_total",
        "counter",
        "Rescans asked for on the control endpoint.",
        s.rescans_requested,
    );

    if let Some(t) = &s.tracker {
        o.single(
            "peerix_tracker_up",
            "gauge",
            "Whether the last exchange with the tracker worked.",
            u8::from(t.reachable),
        );
        o.single(
            "peerix_tracker_announces_total",
            "counter",
            "Announcements this host made to the tracker.",
            t.announces,
        );
        o.single(
            "peerix_tracker_hashes_sent_total",
            "counter",
            "Hash parts sent to the tracker.",
            t.hashes_sent,
        );
        o.by_label(
            "peerix_tracker_lookups_total",
            "counter",
            "Lookups asked of the tracker, by result.",
            "result",
            &[
                ("answered", t.lookups.saturating_sub(t.lookup_failures)),
                ("failed", t.lookup_failures),
            ],
        );
        o.single(
            "peerix_tracker_failures_total",
            "counter",
            "Exchanges with the tracker that failed.",
            t.failures,
        );
    }
    if s.lan.is_some() {
        let c = &s.lan_counters;
        o.single(
            "peerix_lan_queries_total",
            "counter",
            "LAN queries this host broadcast.",
            c.queries,
        );
        o.by_label(
            "peerix_lan_replies_total",
            "counter",
            "LAN replies by what became of them.",
            "kind",
            &[
                ("received", c.replies_received),
                ("shunned", c.replies_shunned),
                ("sent", c.replies_sent),
                ("rate_limited", c.replies_rate_limited),
            ],
        );
        o.by_label(
            "peerix_lan_packets_dropped_total",
            "counter",
            "UDP packets dropped, by reason.",
            "reason",
            &DropReason::ALL.map(|reason| (reason.label(), c.dropped[reason as usize])),
        );
        let [fetched, dropped, failed, misses] = s.summary_counters;
        o.by_label(
            "peerix_lan_summaries_total",
            "counter",
            "Peers' store summaries by outcome.",
            "result",
            &[
                ("fetched", fetched),
                ("dropped", dropped),
                ("failed", failed),
            ],
        );
        o.single(
            "peerix_lan_misses_answered_total",
            "counter",
            "Lookups the summaries answered as misses without a broadcast.",
            misses,
        );
        if let Some(summaries) = s.lan.as_ref().and_then(|l| l.summaries.as_ref()) {
            o.by_label(
                "peerix_lan_hosts",
                "gauge",
                "LAN hosts heard recently.",
                "summary",
                &[
                    ("any", summaries.hosts_heard as u64),
                    ("fresh", summaries.hosts_with_summary as u64),
                ],
            );
        }
    }
    if let Some(c) = &s.read_ahead {
        o.single(
            "peerix_read_ahead_found_total",
            "counter",
            "Paths found on peers before nix asked for them.",
            c.found,
        );
        o.by_label(
            "peerix_read_ahead_nars_total",
            "counter",
            "Small NARs fetched from peers before nix asked, and those nix then got from memory.",
            "result",
            &[("held", c.nars_held), ("served", c.nars_served)],
        );
        o.single(
            "peerix_read_ahead_bytes",
            "gauge",
            "Bytes of NARs read ahead, held or being fetched.",
            c.bytes,
        );
    }
    out.text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{LanView, NodeInfo, RouteKind, Stats, StoreView, TrackerView, View};
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;
    use std::time::Duration;

    #[test]
    fn every_sample_belongs_to_a_declared_family_once() {
        let stats = Stats::new();
        stats.request(RouteKind::NarInfo, 200, Duration::from_micros(700));
        stats.request(RouteKind::Nar, 206, Duration::from_secs(90));
        let node = NodeInfo {
            version: "0.1.0",
            mode: "lan",
            bind: IpAddr::from([0, 0, 0, 0]),
            port: 12304,
            lan_port: Some(12304),
            lan_wanted: true,
            ..NodeInfo::for_tests()
        };
        let snapshot = stats.snapshot(View {
            node: &node,
            store: StoreView::default(),
            peers: None,
            lan: Some(LanView::default()),
            tracker: Some(TrackerView::default()),
            read_ahead: Some(Default::default()),
            addresses: Vec::new(),
        });
        let text = render(&snapshot);
        let mut families = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(families.insert(name, kind).is_none(), "{name} twice");
            } else if !line.starts_with("# HELP ") {
                let (key, value) = line.rsplit_once(' ').unwrap();
                value.parse::<f64>().unwrap();
                let name = key.split('{').next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| families.get(base) == Some(&"histogram"))
                    .unwrap_or(name);
                assert!(families.contains_key(family), "{line}: undeclared");
                assert!(
                    name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{name}"
                );
                assert!(samples.insert(key, value).is_none(), "{key} twice");
            }
        }
        let counters: BTreeSet<_> = families
            .iter()
            .filter(|(_, kind)| **kind == "counter")
            .map(|(name, _)| *name)
            .collect();
        assert!(counters.iter().all(|name| name.ends_with("_total")));
        let narinfo = "peerix_request_duration_seconds_bucket{route=\"narinfo\",le=";
        assert_eq!(samples[format!("{narinfo}\"0.0005\"}}").as_str()], "0");
        assert_eq!(samples[format!("{narinfo}\"0.001\"}}").as_str()], "1");
        assert_eq!(samples[format!("{narinfo}\"+Inf\"}}").as_str()], "1");
        let nar = "peerix_request_duration_seconds_bucket{route=\"nar\",le=";
        assert_eq!(samples[format!("{nar}\"60\"}}").as_str()], "0");
        assert_eq!(samples[format!("{nar}\"+Inf\"}}").as_str()], "1");
        assert_eq!(
            samples["peerix_request_duration_seconds_sum{route=\"nar\"}"],
            "90.000000"
        );
        assert_eq!(samples["peerix_requests_total"], "2");
    }
}
