//! The cost of the stats pages with a full peer table: 1,000 peers, and
//! 100,000 distinct paths requested and served through the top-N lists.
//! Ignored by default; `tests/bench/ops.sh` runs it in release mode:
//!
//! ```text
//! cargo test --release --lib http::bench -- --ignored --nocapture
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{dashboard, health, metrics};
use crate::nix::store_path::HashPart;
use crate::peers::{Failure, PeerId, PeerTable};
use crate::stats::{
    Client, LanView, NodeInfo, PublishedView, RouteKind, Snapshot, Source, Stats, StoreView,
    SummariesView, View,
};

const PEERS: u32 = 1_000;
const PATHS: u32 = 100_000;

fn hash(n: u32) -> HashPart {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut v = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let text: String = (0..32)
        .map(|_| {
            let c = ALPHABET[(v % 32) as usize] as char;
            v = (v / 32) ^ v.rotate_left(17);
            c
        })
        .collect();
    HashPart::parse(&text).unwrap()
}

/// Stats and a peer table as a busy host with many peers would have them.
fn busy() -> (Stats, PeerTable, NodeInfo) {
    let stats = Stats::new();
    let table = PeerTable::new();
    let now = Instant::now();
    for n in 0..PEERS {
        let peer = PeerId::Http(SocketAddr::from((Ipv4Addr::from(0x0a00_0000 + n), 12304)));
        table.record_success(
            peer,
            u64::from(n) * 1000,
            Duration::from_millis(u64::from(n % 50)),
        );
        match n % 10 {
            0 => table.record_failure(peer, Failure::Unavailable, now),
            1 => table.record_failure(peer, Failure::Lied, now),
            _ => {}
        }
    }
    let kinds = RouteKind::ALL;
    for n in 0..PATHS {
        let name = format!("package-{n}-1.0");
        stats.narinfo_requested(hash(n % 5_000 * 20 + n / 5_000), Some(&name));
        stats.nar_served(Client::Local, hash(n), Some(&name), 4096);
        stats.request(
            kinds[n as usize % kinds.len()],
            200,
            Duration::from_micros(u64::from(n % 20_000)),
        );
        if n % 1000 == 0 {
            stats.event("serve", format!("served {} to 10.0.0.1", hash(n)));
        }
    }
    stats.received(Source::Lan, 1 << 30);
    let node = NodeInfo {
        version: env!("CARGO_PKG_VERSION"),
        mode: "lan",
        bind: IpAddr::from([0, 0, 0, 0]),
        port: 12304,
        lan_port: Some(12304),
        daemon_socket: PathBuf::from("/nix/var/nix/daemon-socket/socket"),
        scan_interval: Some(Duration::from_secs(3600)),
        lan_wanted: true,
        ..NodeInfo::for_tests()
    };
    (stats, table, node)
}

fn snapshot(stats: &Stats, table: &PeerTable, node: &NodeInfo) -> Snapshot {
    stats.snapshot(View {
        node,
        store: StoreView {
            daemon_reachable: true,
            scans: 3,
            indexed: PATHS as usize,
            shared: PATHS as usize * 6 / 10,
            ..StoreView::default()
        },
        peers: Some(table),
        lan: Some(LanView {
            port: 12304,
            summaries: Some(SummariesView {
                hosts_heard: PEERS as usize,
                hosts_with_summary: PEERS as usize,
                covers_lan: true,
                bytes: 8 << 20,
            }),
            published: Some(PublishedView {
                generation: 3,
                paths: PATHS * 6 / 10,
                bytes: 75_000,
            }),
        }),
        tracker: None,
        read_ahead: Some(Default::default()),
        addresses: vec![IpAddr::from([10, 0, 0, 1])],
    })
}

/// The median of `runs` timings of `f`, and its last result.
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let began = Instant::now();
        last = Some(f());
        times.push(began.elapsed());
    }
    times.sort();
    (times[runs / 2], last.expect("at least one run"))
}

#[test]
#[ignore = "a benchmark: run by tests/bench/ops.sh"]
fn stats_pages_with_1000_peers_and_100k_paths() {
    let began = Instant::now();
    let (stats, table, node) = busy();
    println!(
        "filled: {PEERS} peers, {PATHS} paths requested and served, in {:.2?}",
        began.elapsed()
    );
    let (took, snap) = time(50, || snapshot(&stats, &table, &node));
    println!("snapshot: {took:.2?} (median of 50)");
    assert_eq!(snap.peers.len(), PEERS as usize);
    let (took, text) = time(50, || metrics::render(&snapshot(&stats, &table, &node)));
    println!(
        "/metrics: {took:.2?} snapshot + render, {} bytes, {} lines",
        text.len(),
        text.lines().count()
    );
    let (took, text) = time(50, || metrics::render(&snap));
    println!("/metrics render alone: {took:.2?}, {} bytes", text.len());
    let (took, json) = time(50, || dashboard::render(&snapshot(&stats, &table, &node)));
    println!(
        "/dashboard.json: {took:.2?} snapshot + render, {} bytes",
        json.len()
    );
    let (took, json) = time(50, || dashboard::render(&snap));
    println!(
        "/dashboard.json render alone: {took:.2?}, {} bytes",
        json.len()
    );
    let (took, json) = time(50, || health::render(&snap, true).0);
    println!(
        "/health (with the {PEERS} peers): {took:.2?} render, {} bytes",
        json.len()
    );
    println!("/dashboard page: {} bytes", dashboard::page_weight());

    // The hot path: one request counted and timed, and one NAR served.
    let n = 1_000_000;
    let began = Instant::now();
    for i in 0..n {
        stats.request(RouteKind::NarInfo, 200, Duration::from_micros(i % 3000));
    }
    println!(
        "counting a request: {:.1} ns",
        began.elapsed().as_nanos() as f64 / n as f64
    );
    let began = Instant::now();
    for i in 0..n {
        stats.nar_served(Client::Local, hash((i % 100) as u32), None, 4096);
    }
    println!(
        "counting a NAR served (top-N included): {:.1} ns",
        began.elapsed().as_nanos() as f64 / n as f64
    );

    // A state write: stats.json and peers.json, each to a temporary file,
    // fsync, rename and an fsync of the directory, on the disk under /tmp.
    let dir = std::env::temp_dir().join(format!("peerix-bench-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a state dir for the benchmark");
    let state =
        crate::state::State::open(&dir, std::sync::Arc::new(stats), std::sync::Arc::new(table));
    let (took, saved) = time(20, || state.save());
    assert!(saved, "the state write failed");
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    println!(
        "state write ({PEERS} peers): {took:.2?} (median of 20), stats.json {} bytes, peers.json {} bytes",
        size("stats.json"),
        size("peers.json")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
