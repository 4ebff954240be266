//! Integration tests for LAN store summaries: each peerix that answers peers
//! publishes a Bloom filter of the hash parts it shares at `/local/summary`
//! and announces it over UDP; when every host heard from has a fresh
//! summary, a lookup asks no broadcast: a hash no summary names is a 404 at
//! once, one some name is asked of those hosts directly.
//!
//! Real nix, real nix-daemons, real UDP broadcast between network namespaces
//! (see `common::lan`); the fake hosts are run by the test, and the summary
//! format is written and read here from its documentation, not with
//! peerix's own code. What the tests prove:
//! - With A, B and C all peerix, B realises a 320-path closure from its
//!   peerix and an upstream cache (busybox httpd, `Priority: 40`) without a
//!   single broadcast: A's half comes from A (asked directly, and read ahead
//!   of nix), the rest from upstream, and `nix store verify` passes with the
//!   upstream key alone.
//! - A host that publishes no summary (the original peerix) keeps the
//!   broadcast alive, and its paths are found by it; no read-ahead
//!   broadcasts then.
//! - Truncated, oversized, unknown-version and overfull summaries are
//!   dropped and counted; the overfull one's peer is banned and never asked
//!   for a narinfo; paths on other peers are still found by broadcast.
//! - A summary that cannot be had (an older generation served, or a 404)
//!   keeps the broadcast alive, and its host is still asked by it.
//! - A path added after A's last scan is not in A's summary (B 404s it at
//!   once), and is found after SIGHUP makes A rescan; a path A keeps private
//!   is never in its summary.
//!
//! Every nix command of a LAN host is bounded (90 s), every wait too.

mod common;

use common::http;
use common::lan::*;
use common::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

/// The port of the upstream cache, inside the namespace it runs in.
const UPSTREAM_PORT: u16 = 8080;

// ---------------------------------------------------------------------------
// Helpers (the world and hosts as in tests/lan.rs)
// ---------------------------------------------------------------------------

fn counter(c: &AtomicU64) -> u64 {
    FakeStats::get(c)
}

/// Item `k` of the many-paths fixture (its closure is items 0 to `k`).
fn many_item(k: usize) -> &'static str {
    static ITEMS: OnceLock<Vec<String>> = OnceLock::new();
    let items = ITEMS.get_or_init(|| {
        let many = many_fixture();
        let env = NixEnv::new(&TestDir::new("manyitems").path);
        let closure = env.closure("auto", &many.top);
        let mut items = vec![String::new(); many.count];
        for path in closure {
            if let Some(n) = path
                .rsplit_once("-peerix-many-")
                .and_then(|(_, n)| n.parse::<usize>().ok())
            {
                items[n] = path;
            }
        }
        assert!(
            items.iter().all(|p| !p.is_empty()),
            "expected every item of many.nix in the closure of its top"
        );
        items
    });
    &items[k]
}

/// `host`'s `/health` `lan.summaries` object.
fn summaries(host: &LanHost) -> serde_json::Value {
    host.health()["lan"]["summaries"].clone()
}

fn num(value: &serde_json::Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("expected a number `{key}` in {value}"))
}

/// Waits until `host`'s `lan.summaries` satisfies `ready`; returns it.
fn wait_summaries(
    host: &LanHost,
    what: &str,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    poll_until(what, || {
        let health = host.peerix().health()?;
        let summaries = &health["lan"]["summaries"];
        if ready(summaries) {
            Ok(summaries.clone())
        } else {
            Err(format!("lan of {}: {}", host.name(), health["lan"]))
        }
    })
}

/// Waits until `host` has heard `heard` hosts, `with_summary` of them with
/// a fresh summary, and has been up for more than its 2 s settling time.
fn wait_coverage(host: &LanHost, heard: u64, with_summary: u64) -> serde_json::Value {
    poll_until(
        &format!(
            "{} to have heard {heard} host(s), {with_summary} with a summary",
            host.name()
        ),
        || {
            let health = host.peerix().health()?;
            let s = &health["lan"]["summaries"];
            if s["hosts_heard"] == heard
                && s["hosts_with_summary"] == with_summary
                && health["uptime_seconds"].as_u64() >= Some(3)
            {
                Ok(s.clone())
            } else {
                Err(format!("{}: {}", host.name(), health))
            }
        },
    )
}

/// GET `/<hash>.narinfo` from `host`'s own peerix (root, as its nix asks).
fn root_narinfo(host: &LanHost, hash: &str) -> http::Response {
    host.must_get(&format!("/{hash}.narinfo"))
}

/// `nix-store -r PATH` in `host` with `substituters` (space-separated) and
/// `keys` the only trusted keys.
fn substitute_from(host: &LanHost, substituters: &str, keys: &[&str], path: &str) -> Output {
    let store = host.host.store();
    let keys = keys.join(" ");
    host.nix().try_run(
        "nix-store",
        &[
            "--store",
            store.as_str(),
            "-r",
            path,
            "--option",
            "substituters",
            substituters,
            "--option",
            "trusted-public-keys",
            keys.as_str(),
        ],
    )
}

/// The closure of `path` is valid in `host` and `nix store verify` passes
/// there trusting only `key`.
fn assert_verified(host: &LanHost, key: &KeyPair, path: &str) {
    let verify = host.verify(&[&key.public], &[path]);
    assert_success(
        &format!(
            "nix store verify -r {path} in {} trusting only {UPSTREAM}",
            host.name()
        ),
        &verify,
    );
}

/// Deterministic, valid hash parts that no store holds.
fn random_hashes(n: usize, seed: u64) -> Vec<String> {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            (0..32)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ALPHABET[(x >> 40) as usize % 32] as char
                })
                .collect()
        })
        .collect()
}

/// An upstream binary cache: `busybox httpd` serving a directory on
/// 127.0.0.1 inside a host's namespace, logging every request. Killed on
/// drop.
struct Upstream {
    dir: PathBuf,
    log: PathBuf,
    child: Child,
}

impl Upstream {
    /// `nix copy --to file://<dir>?compression=none` of the closure of
    /// `path` in `source` (its signatures go along), with `Priority: 40` in
    /// its nix-cache-info, served in namespace `ns`.
    fn start(dir: &TestDir, source: &Host, path: &str, ns: &str) -> Upstream {
        let busybox = Command::new("busybox")
            .arg("--list")
            .output()
            .expect("running busybox (install busybox-static)");
        assert!(
            String::from_utf8_lossy(&busybox.stdout)
                .lines()
                .any(|l| l == "httpd"),
            "this busybox has no httpd applet"
        );
        let cache = dir.subdir("upstream");
        let to = format!("file://{}?compression=none", cache.display());
        let from = source.store();
        source.nix.run(
            "nix",
            &[
                "copy",
                "--no-check-sigs",
                "--from",
                from.as_str(),
                "--to",
                to.as_str(),
                path,
            ],
        );
        let info_file = cache.join("nix-cache-info");
        let info = std::fs::read_to_string(&info_file).expect("reading nix-cache-info");
        let mut info: String = info
            .lines()
            .filter(|l| !l.starts_with("Priority:"))
            .map(|l| format!("{l}\n"))
            .collect();
        info.push_str("Priority: 40\n");
        write_file(&info_file, &info);
        let log = dir.join("upstream-httpd.log");
        let log_file = std::fs::File::create(&log).expect("creating the httpd log");
        let child = netns_command(Some(ns), "busybox")
            .args(["httpd", "-f", "-vv", "-p"])
            .arg(format!("127.0.0.1:{UPSTREAM_PORT}"))
            .arg("-h")
            .arg(&cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawning busybox httpd");
        let upstream = Upstream {
            dir: cache,
            log,
            child,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], UPSTREAM_PORT));
        poll_until("the upstream cache to answer", || {
            match in_netns(ns, move || http::get(addr, "/nix-cache-info")) {
                Ok(r) if r.status == 200 && r.text().contains("Priority: 40") => Ok(()),
                Ok(r) => Err(r.describe()),
                Err(e) => Err(e.to_string()),
            }
        });
        upstream
    }

    /// The URL, valid inside its namespace.
    fn url(&self) -> String {
        format!("http://127.0.0.1:{UPSTREAM_PORT}")
    }

    /// The `URL` of `path`'s narinfo in the cache (`nar/<filehash>.nar`).
    fn nar_url(&self, path: &str) -> String {
        let file = self.dir.join(format!("{}.narinfo", hash_part(path)));
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        NarInfoText::read(&text).field("URL").to_string()
    }

    /// The NAR URLs (without the leading slash) it was asked for.
    fn nars_served(&self) -> BTreeSet<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(" url:/").map(|(_, url)| url.to_string()))
            .filter(|url| url.starts_with("nar/"))
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Adds a file to `host`'s store with `nix-store --add` (through its
/// daemon) and signs it with `key`: a new shared path, unknown to peerix
/// until its next scan.
fn add_signed_file(dir: &TestDir, host: &LanHost, key: &KeyPair, name: &str) -> String {
    let file = dir.join(name);
    write_file(
        &file,
        &format!("added after the first scan ({})\n", unique_number()),
    );
    let path = host.host.add_file(&file);
    host.host.sign(key, &[&path], false);
    path
}

// ---------------------------------------------------------------------------
// 1. A LAN whose hosts all publish summaries: no broadcast, no wait
// ---------------------------------------------------------------------------

/// A, B and C all run peerix. A holds the closure of item 159 of many.nix
/// (160 of the 320 paths), C holds nothing, and an upstream cache (busybox
/// httpd, `Priority: 40`) holds all 320. Once B has A's and C's summaries,
/// `nix-store -r` of the whole closure in B, with B's peerix then upstream
/// as substituters, sends no LAN query at all: A's half is asked of A
/// directly and its NARs come from A; the rest is a 404 at once from B's
/// peerix (counted in `misses_answered`) and comes from upstream.
#[test]
fn a_lan_of_summaries_answers_misses_without_a_broadcast() {
    let many = many_fixture();
    let (dir, lan, up) = world("sum_zero_wait", 3);
    let middle = many_item(159);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[middle], &[]);
    let _c = signed_host(&dir, &lan, 2, "c", &up, &[], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let src = source_store(&dir, &up, &[&many.top]);
    let upstream = Upstream::start(&dir, &src, &many.top, &b.ns);

    let closure = src.nix.closure(&src.store(), &many.top);
    let half: BTreeSet<String> = a
        .host
        .nix
        .closure(&a.host.store(), middle)
        .into_iter()
        .collect();
    let rest: Vec<&String> = closure.iter().filter(|p| !half.contains(*p)).collect();
    assert!(
        closure.len() >= 300 && half.len() * 3 > closure.len() && rest.len() * 3 > closure.len(),
        "expected A to hold about half of a 300-path closure: {} of {}",
        half.len(),
        closure.len()
    );

    let before = wait_coverage(&b, 2, 2);
    let covered = before["covers_lan"] == true;
    let queries = b.lan_counter("queries");

    let substituters = format!("{} {}", b.url(), upstream.url());
    let out = substitute_from(&b, &substituters, &[&up.public], &many.top);
    assert_success(
        "nix-store -r of the 320-path closure in B from its peerix and upstream",
        &out,
    );
    for p in &closure {
        assert!(b.host.is_valid(p), "expected {p} to be valid in B");
    }
    assert_verified(&b, &up, &many.top);

    let after = b.health();
    assert_eq!(
        b.lan_counter("queries"),
        queries,
        "expected no LAN query from B once every host's summary is known; /health: {after}"
    );
    // A's half was read ahead: narinfos looked up and small NARs fetched
    // before nix asked, and nix got some of those NARs from B's memory (the
    // rest raced nix's own requests). Every one of them checked out above.
    let read_ahead = &after["read_ahead"];
    let (found, held, served) = (
        num(read_ahead, "found"),
        num(read_ahead, "nars_held"),
        num(read_ahead, "nars_served"),
    );
    assert!(
        found > 0 && served > 0 && served <= held && held as usize <= half.len(),
        "expected B to read A's half ahead and serve NARs from it: {read_ahead}"
    );
    assert!(
        covered,
        "expected B to take the LAN as covered with A's and C's summaries: {before}"
    );
    let answered =
        num(&after["lan"]["summaries"], "misses_answered") - num(&before, "misses_answered");
    assert!(
        answered as usize >= rest.len() / 2,
        "expected most of the {} paths nobody on the LAN has to be answered by the summaries \
         (misses_answered grew by {answered}): {after}",
        rest.len()
    );

    // A's half came from A: narinfos asked of A directly, NARs from A, and
    // not one of them from upstream; upstream served exactly the rest.
    let entry = b
        .peer_entry(&a.peer_addr())
        .unwrap_or_else(|| panic!("expected A in B's peers: {}", after["peers"]));
    let half_list: Vec<&str> = half.iter().map(String::as_str).collect();
    let half_bytes: u64 = a
        .host
        .path_infos(&half_list, false)
        .iter()
        .map(|i| i.nar_size)
        .sum();
    assert!(
        num(&entry, "successes") as usize >= half.len() && num(&entry, "bytes") >= half_bytes,
        "expected B to record at least {} successes and {half_bytes} NAR bytes from A: {entry}",
        half.len()
    );
    let served = upstream.nars_served();
    let expected: BTreeSet<String> = rest.iter().map(|p| upstream.nar_url(p)).collect();
    let from_a_half: Vec<&String> = half
        .iter()
        .filter(|p| served.contains(&upstream.nar_url(p)))
        .collect();
    assert!(
        from_a_half.is_empty(),
        "expected no NAR of A's half from upstream, got {} of them: {from_a_half:?}",
        from_a_half.len()
    );
    assert_eq!(
        served,
        expected,
        "expected upstream to serve exactly the NARs of the {} paths A lacks",
        rest.len()
    );
}

// ---------------------------------------------------------------------------
// 2. A host without a summary keeps the broadcast
// ---------------------------------------------------------------------------

/// A and B run peerix; then a fake peer that publishes no summary (the
/// original peerix) makes itself heard. It is the only holder of item 2 of
/// many.nix (A has items 0 and 1). B no longer takes the LAN as covered, and
/// `nix-store -r` of item 2 in B gets it from the fake peer by broadcast.
#[test]
fn a_host_without_a_summary_is_found_by_broadcast() {
    let many = many_fixture();
    let (dir, lan, up) = world("sum_nosummary", 3);
    let _a = signed_host(&dir, &lan, 0, "a", &up, &[&many.second], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let covered = wait_coverage(&b, 1, 1);
    assert_eq!(
        covered["covers_lan"], true,
        "expected B to take the LAN as covered by A's summary: {covered}"
    );

    let src = source_store(&dir, &up, &[&many.third]);
    let fake = FakePeer::start(
        &lan,
        2,
        vec![FakeItem::from_store(&src, &many.third, NarMode::Honest)],
        TcpMode::Serve,
    );
    let heard = wait_summaries(&b, "B to hear the fake peer", |s| s["hosts_heard"] == 2);
    assert!(
        heard["hosts_with_summary"] == 1 && heard["covers_lan"] == false,
        "expected a host heard without a summary to keep the broadcast alive: {heard}"
    );
    let queries = b.lan_counter("queries");

    // A narinfo found by broadcast starts no read-ahead of its references:
    // with the LAN uncovered, that would be a broadcast for each of them.
    let narinfo = root_narinfo(&b, hash_part(&many.third));
    assert_eq!(narinfo.status, 200, "expected B to find {}", many.third);
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        b.lan_counter("queries"),
        queries + 1,
        "expected one broadcast, for the path asked, and none for its references: {}",
        b.health()
    );

    let out = b.substitute(&[&up.public], &many.third);
    assert_success(
        "nix-store -r in B of a path only the summary-less peer has",
        &out,
    );
    assert_verified(&b, &up, &many.third);
    assert!(
        b.lan_counter("queries") > queries,
        "expected B to have asked the LAN by broadcast: {}",
        b.health()["lan"]
    );
    assert!(
        counter(&fake.stats.udp_replies) >= 1 && counter(&fake.stats.nar_requests) >= 1,
        "expected the fake peer to have answered by UDP and served the NAR: {:?}",
        fake.stats
    );
}

// ---------------------------------------------------------------------------
// 3. Bad summaries
// ---------------------------------------------------------------------------

/// Fake hosts announce summaries that are (a) truncated, (b) over 2 MiB but
/// otherwise well-formed, (c) of version 9, (d) overfull: every bit set for
/// the count claimed. Each is fetched once by B and dropped (and counted);
/// the LAN stays uncovered, so B still finds A's paths by broadcast. The
/// overfull one's host is banned: it answers every LAN query, yet B never
/// asks it for a narinfo.
#[test]
fn bad_summaries_are_dropped_and_an_overfull_one_bans_its_peer() {
    let (dir, lan, up) = world("sum_bad", 6);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[many_item(8)], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    wait_coverage(&b, 1, 1);

    let honest = build_summary(
        1,
        &random_hashes(100, 1)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let truncated = honest[..honest.len() / 2].to_vec();
    // 1.7 million paths: 2_125_024 bytes, over the 2 MiB limit; no bit set,
    // so it is well-formed apart from its size.
    let oversized_count = 1_700_000;
    let oversized = summary_wire(
        1,
        2,
        oversized_count,
        &vec![0u8; (summary_filter_bits(oversized_count) / 8) as usize],
    );
    assert!(oversized.len() > 2 * 1024 * 1024);
    let mut version9 = build_summary(
        3,
        &random_hashes(100, 3)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    version9[4] = 9;
    let overfull = summary_wire(
        1,
        4,
        100,
        &vec![0xff; (summary_filter_bits(100) / 8) as usize],
    );
    let cases = [
        ("truncated", 1, truncated),
        ("over 2 MiB", 2, oversized),
        ("version 9", 3, version9),
        ("overfull", 4, overfull),
    ];

    let mut fakes = Vec::new();
    for (k, (what, generation, bytes)) in cases.into_iter().enumerate() {
        let before = summaries(&b);
        let judged = |s: &serde_json::Value| {
            num(s, "fetched") + num(s, "dropped") + num(s, "fetch_failures")
        };
        let fake = FakeSummaryHost::start(
            &lan,
            2 + k,
            SummaryHostSpec {
                generation,
                paths: 100,
                summary: SummaryServe::Bytes(bytes),
                items: Vec::new(),
                answer_every_query: what == "overfull",
            },
        );
        let after = wait_summaries(&b, &format!("B to fetch the {what} summary"), |s| {
            judged(s) > judged(&before) && s["hosts_heard"] == 2 + k as u64
        });
        assert_eq!(
            (
                num(&after, "dropped"),
                num(&after, "fetched"),
                num(&after, "fetch_failures")
            ),
            (
                num(&before, "dropped") + 1,
                num(&before, "fetched"),
                num(&before, "fetch_failures")
            ),
            "expected B to drop the {what} summary (dropped + 1, nothing else): before {before}, after {after}"
        );
        assert_eq!(
            fake.summary_requests_from(b.ip),
            1,
            "expected B to fetch the {what} summary once"
        );
        assert!(
            after["hosts_with_summary"] == 1 && after["covers_lan"] == false,
            "expected a host with a {what} summary to keep the LAN uncovered: {after}"
        );

        // A path A holds is still found, by broadcast.
        let queries = b.lan_counter("queries");
        let path = many_item(k);
        let response = root_narinfo(&b, hash_part(path));
        assert_eq!(
            response.status,
            200,
            "expected B to find {path} on A with a {what} summary about: {}",
            response.describe()
        );
        assert!(
            NarInfoText::read(&response.text())
                .field("URL")
                .starts_with(&format!("peer/http:{}/", a.peer_addr())),
            "expected the narinfo to name A: {}",
            response.text()
        );
        assert!(
            b.lan_counter("queries") > queries,
            "expected B to find {path} by broadcast with a {what} summary about: {}",
            b.health()["lan"]
        );
        fakes.push(fake);
    }

    // The overfull summary's host is banned, and never asked for a narinfo
    // although it answers every query.
    let liar = fakes.last().expect("the overfull host");
    let entry = b
        .peer_entry(&liar.addr())
        .unwrap_or_else(|| panic!("expected the overfull host in B's peers: {}", b.health()));
    assert_eq!(
        entry["banned"], true,
        "expected B to ban the host of the overfull summary: {entry}"
    );
    // Its answers to the three misses are read (and ignored) for the whole
    // LAN window; one that comes after A's answer to the held path may not be.
    let shunned = b.lan_counter("replies_shunned");
    let held = many_item(6);
    let response = root_narinfo(&b, hash_part(held));
    assert_eq!(response.status, 200, "{}", response.describe());
    for hash in random_hashes(3, 99) {
        let response = root_narinfo(&b, &hash);
        assert_eq!(
            response.status,
            404,
            "expected a 404 for {hash}, which nobody holds although the banned host claims it: {}",
            response.describe()
        );
    }
    assert!(
        counter(&liar.stats.udp_replies) >= 4 && b.lan_counter("replies_shunned") >= shunned + 3,
        "expected the banned host to answer B's queries and B to ignore the answers: {:?}, lan {}",
        liar.stats,
        b.health()["lan"]
    );
    assert_eq!(
        counter(&liar.stats.narinfo_requests),
        0,
        "expected B never to ask the banned host for a narinfo: {:?}",
        liar.stats
    );

    // And nix in B gets A's paths with all four bad hosts about.
    let out = b.substitute(&[&up.public], many_item(8));
    assert_success("nix-store -r in B with four bad summaries on the LAN", &out);
    assert_verified(&b, &up, many_item(8));
    assert_eq!(counter(&liar.stats.narinfo_requests), 0, "{:?}", liar.stats);
}

// ---------------------------------------------------------------------------
// 4. Summaries that cannot be had
// ---------------------------------------------------------------------------

/// A and B run peerix; a fake host announces a summary that `serve` does
/// not deliver, and is the only holder of item 2 of many.nix (A has items
/// 0 and 1). B's fetch fails (counted); the host keeps the LAN uncovered,
/// and B gets item 2 from it by broadcast.
fn an_unavailable_summary_keeps_the_broadcast(name: &str, generation: u64, serve: SummaryServe) {
    let many = many_fixture();
    let (dir, lan, up) = world(name, 3);
    let _a = signed_host(&dir, &lan, 0, "a", &up, &[&many.second], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let before = wait_coverage(&b, 1, 1);

    let src = source_store(&dir, &up, &[&many.third]);
    let fake = FakeSummaryHost::start(
        &lan,
        2,
        SummaryHostSpec {
            generation,
            paths: 1,
            summary: serve,
            items: vec![FakeItem::from_store(&src, &many.third, NarMode::Honest)],
            answer_every_query: false,
        },
    );
    let after = wait_summaries(&b, "B to try the fake host's summary", |s| {
        num(s, "fetch_failures") > num(&before, "fetch_failures") && s["hosts_heard"] == 2
    });
    assert!(
        after["hosts_with_summary"] == 1
            && after["covers_lan"] == false
            && after["fetched"] == before["fetched"],
        "expected a summary that cannot be had to keep the LAN uncovered: {after}"
    );
    assert!(fake.summary_requests_from(b.ip) >= 1);

    let queries = b.lan_counter("queries");
    let out = b.substitute(&[&up.public], &many.third);
    assert_success("nix-store -r in B of a path only the fake host has", &out);
    assert_verified(&b, &up, &many.third);
    assert!(
        b.lan_counter("queries") > queries,
        "expected B to ask the LAN by broadcast: {}",
        b.health()["lan"]
    );
    assert!(
        counter(&fake.stats.udp_replies) >= 1
            && counter(&fake.stats.narinfo_requests) >= 1
            && counter(&fake.stats.nar_requests) >= 1,
        "expected the fake host to be asked by broadcast and to serve the path: {:?}",
        fake.stats
    );
}

/// The host announces generation 5000 and serves 4999 (without the path):
/// a stale summary is no summary.
#[test]
fn a_stale_summary_keeps_the_broadcast() {
    let stale = build_summary(
        4999,
        &random_hashes(20, 7)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    an_unavailable_summary_keeps_the_broadcast("sum_stale", 5000, SummaryServe::Bytes(stale));
}

/// The host announces a summary and answers 404 for it.
#[test]
fn a_missing_summary_keeps_the_broadcast() {
    an_unavailable_summary_keeps_the_broadcast("sum_missing", 7, SummaryServe::Status(404));
}

// ---------------------------------------------------------------------------
// 5. What a summary holds, and when
// ---------------------------------------------------------------------------

/// GET `/local/summary` of `peer` from `from`'s namespace, as a peer does.
fn fetch_summary(from: &LanHost, peer: &LanHost) -> (http::Response, SummaryView) {
    let addr = SocketAddr::from((peer.ip, LAN_PORT));
    let response = in_netns(&from.ns, move || http::get(addr, "/local/summary"))
        .unwrap_or_else(|e| panic!("GET /local/summary of {}: {e}", peer.name()));
    assert_eq!(
        response.status,
        200,
        "GET /local/summary of {}: {}",
        peer.name(),
        response.describe()
    );
    let view = SummaryView::parse(&response.body, &format!("summary of {}", peer.name()));
    (response, view)
}

/// A shares the closure of item 11 of many.nix (signed) and keeps item 12
/// private (unsigned, default `--filter-mode signed`): its summary names
/// every shared path and not the private one. A path added to A's store
/// after its scan is not in the summary, so B (covered) answers 404 for it
/// at once, without a broadcast; after SIGHUP, A's summary has a new
/// generation with the path, B fetches it, and B then gets the path from A.
#[test]
fn a_summary_holds_what_is_shared_as_of_the_last_scan() {
    let (dir, lan, up) = world("sum_rescan", 2);
    let mut a = LanHost::new(&dir, &lan, 0, "a", &[many_item(12)]);
    a.host.sign(&up, &[many_item(11)], true);
    a.start_peerix(&dir, &up, &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    wait_coverage(&b, 1, 1);

    // What A publishes: read here from the documented format.
    let shared = a.host.nix.closure(&a.host.store(), many_item(11));
    let private = hash_part(many_item(12));
    let health = a.health();
    let (response, view) = fetch_summary(&b, &a);
    // The test's nix32 reading agrees with nix's.
    let hex: String = nix32_decode_hash_part(private)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        a.host
            .nix
            .stdout("nix", &["hash", "to-base16", "--type", "sha1", private]),
        hex,
        "the test's nix32 decoding"
    );
    for path in &shared {
        assert!(
            view.may_contain(hash_part(path)),
            "expected A's summary to name the shared {path}"
        );
    }
    assert!(
        !view.may_contain(private),
        "expected A's summary not to name {}, which A keeps private",
        many_item(12)
    );

    let generation = num(&health["lan"]["summary"], "generation");
    assert_eq!(
        (view.generation, u64::from(view.count)),
        (generation, num(&health, "shared_paths")),
        "expected A's summary at its /health generation, with its shared paths: {health}"
    );
    assert_eq!(view.count as usize, shared.len(), "{health}");
    assert_eq!(
        response.header("etag"),
        Some(format!("\"{generation}\"").as_str()),
        "expected the generation as ETag"
    );
    let etag = format!("\"{generation}\"");
    let addr = SocketAddr::from((a.ip, LAN_PORT));
    let cached = in_netns(&b.ns, move || {
        http::get_with(addr, "/local/summary", &[("If-None-Match", &etag)])
    })
    .expect("GET /local/summary with If-None-Match");
    assert_eq!(cached.status, 304, "{}", cached.describe());

    // A path added after the scan: not in the summary, a 404 at once.
    let added = add_signed_file(&dir, &a, &up, "added.txt");
    let added_hash = hash_part(&added).to_string();
    let queries = b.lan_counter("queries");
    let before = summaries(&b);
    assert_eq!(before["covers_lan"], true, "{before}");
    let response = root_narinfo(&b, &added_hash);
    assert_eq!(
        response.status,
        404,
        "expected B to answer 404 for {added}, which A added after its scan: {}",
        response.describe()
    );
    let after = summaries(&b);
    assert_eq!(
        b.lan_counter("queries"),
        queries,
        "expected no broadcast for a miss while the LAN is covered: {after}"
    );
    assert_eq!(
        num(&after, "misses_answered"),
        num(&before, "misses_answered") + 1,
        "{after}"
    );
    assert!(!fetch_summary(&b, &a).1.may_contain(&added_hash));

    // SIGHUP: A rescans, its summary moves on, B fetches it, finds the path.
    a.peerix().send_sighup();
    let rescanned = a.peerix_mut().wait_health("A's rescan", |h| {
        h["lan"]["summary"]["generation"].as_u64() > Some(generation)
    });
    let new_generation = num(&rescanned["lan"]["summary"], "generation");
    let (_, view) = fetch_summary(&b, &a);
    assert_eq!(view.generation, new_generation);
    assert!(
        view.may_contain(&added_hash) && !view.may_contain(private),
        "expected A's new summary to name {added} and still not {}",
        many_item(12)
    );
    wait_summaries(&b, "B to fetch A's new summary", |s| {
        num(s, "fetched") > num(&after, "fetched") && s["covers_lan"] == true
    });
    let queries = b.lan_counter("queries");
    // B remembers its 404 for up to 10 s.
    let response = poll_until(&format!("B to find {added} on A"), || {
        let response = root_narinfo(&b, &added_hash);
        if response.status == 200 {
            Ok(response)
        } else {
            Err(response.describe())
        }
    });
    assert!(
        NarInfoText::read(&response.text())
            .field("URL")
            .starts_with(&format!("peer/http:{}/", a.peer_addr())),
        "expected the narinfo to name A: {}",
        response.text()
    );
    assert_eq!(
        b.lan_counter("queries"),
        queries,
        "expected B to find the path through A's summary, not by broadcast: {}",
        b.health()["lan"]
    );
    let out = b.substitute(&[&up.public], &added);
    assert_success("nix-store -r in B of the path A added", &out);
    assert_verified(&b, &up, &added);
}
