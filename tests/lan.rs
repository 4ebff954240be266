//! Integration tests for LAN mode: hosts find each other's store paths by UDP
//! broadcast and fetch them over HTTP, with real nix, real nix-daemons and
//! real broadcast on a bridge between network namespaces.
//!
//! Every test builds its own LAN (see `common::lan`): host `i` is
//! `10.77.0.<i+1>` in its own namespace, with its own chroot store, nix-daemon
//! and peerix on port 12304. A test "upstream" key signs the paths that may
//! travel; every peerix trusts it (`--trusted-key`) and nix trusts only it.
//! What the tests prove:
//! - B fetches A's signed closure through its own peerix, `nix store verify`
//!   passes with the upstream key alone, and B's narinfo keeps A's signatures
//!   and points at `peer/http:<A>/nar/...`.
//! - Lying peers never get their bytes into B: an unsigned or forged narinfo
//!   is skipped, a garbage NAR or a well-formed NAR with one byte changed
//!   falls through to the honest A (small NARs before nix sees a byte; large
//!   ones by aborting the stream, so at most one nix attempt fails), and the
//!   liar is banned. Alone, a liar makes the fetch fail cleanly, and after
//!   the ban nothing it offered is handed to nix.
//! - A peer that dies mid-stream is resumed from another by Range; one that
//!   answered UDP and then refuses or hangs on TCP costs a 404, not a 5xx,
//!   and does not keep B from an honest holder.
//! - A path the share policy keeps private gets no UDP reply and 404s.
//! - Garbage, truncated, oversized, unknown and unsolicited packets are
//!   dropped and counted, and fetching still works.
//! - `--no-broadcast --extra-peer` asks only that peer; `--no-broadcast`
//!   alone finds nothing; `--no-lan` opens no UDP socket.
//!
//! Every nix command of a LAN host is bounded (90 s): a stalled download
//! fails the test instead of waiting out nix's 300 s stall timeout.

mod common;

use common::http;
use common::lan::*;
use common::*;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

fn counter(c: &AtomicU64) -> u64 {
    FakeStats::get(c)
}

/// The closure of `path` is valid in `to`, equal to `from`'s, and `nix store
/// verify` passes in `to` trusting only the upstream key.
fn assert_same_closure(from: &LanHost, to: &LanHost, key: &KeyPair, path: &str) {
    let closure = from.host.nix.closure(&from.host.store(), path);
    for p in &closure {
        assert!(
            to.host.is_valid(p),
            "expected {p} to be valid in {} after the fetch",
            to.name()
        );
        assert!(
            from.host.dump(p) == to.host.dump(p),
            "expected {p} in {} to be byte-identical to the one in {}",
            to.name(),
            from.name()
        );
    }
    let verify = to.verify(&[&key.public], &[path]);
    assert_success(
        &format!(
            "nix store verify -r {path} in {} trusting only {UPSTREAM}",
            to.name()
        ),
        &verify,
    );
}

/// GET `/<hash>.narinfo` from `host`'s own peerix; must answer 200.
fn lan_narinfo(host: &LanHost, path: &str) -> NarInfoText {
    let request = format!("/{}.narinfo", hash_part(path));
    let response = host.must_get(&request);
    assert_eq!(
        response.status,
        200,
        "GET {request} on {}: expected 200 (found on the LAN), got {}",
        host.name(),
        response.describe()
    );
    NarInfoText::read(&response.text())
}

/// The narinfo `host` serves for `path` came from `peer`: the URL names
/// `peer/http:<peer>/nar/<hash>-<narhash>.nar`, and the fields and signatures are
/// those of `peer`'s store.
fn assert_narinfo_from(host: &LanHost, path: &str, peer: &LanHost) {
    let served = lan_narinfo(host, path);
    let info = peer
        .host
        .path_infos(&[path], false)
        .pop()
        .expect("path info");
    let expected_url = format!("peer/http:{}/nar/{}", peer.peer_addr(), nar_file(&info));
    let what = format!("narinfo of {path} served by {}", host.name());
    assert_eq!(
        served.field("URL"),
        expected_url,
        "{what}: expected the URL to name peer {}",
        peer.name()
    );
    served.assert_describes(&info, &what);
    let mut sigs = served.sigs.clone();
    sigs.sort();
    let mut expected = info.signatures.clone();
    expected.sort();
    assert_eq!(
        sigs,
        expected,
        "{what}: expected exactly the Sig lines of {}'s store",
        peer.name()
    );
}

/// GET `request` on `host` must not be a 5xx; returns the status.
fn status_not_5xx(host: &LanHost, request: &str) -> u16 {
    let response = host.must_get(request);
    assert!(
        response.status < 500,
        "GET {request} on {}: expected no 5xx (nix would retry and fail), got {}",
        host.name(),
        response.describe()
    );
    response.status
}

/// GET `request` on `host` must answer exactly `status`.
fn expect_status(host: &LanHost, request: &str, status: u16, why: &str) {
    let response = host.must_get(request);
    assert_eq!(
        response.status,
        status,
        "GET {request} on {}: expected {status} ({why}), got {}",
        host.name(),
        response.describe()
    );
}

/// The peer entry of `peer` in `host`'s /health; it must be there.
fn peer_entry(host: &LanHost, peer: &str) -> serde_json::Value {
    host.peer_entry(peer).unwrap_or_else(|| {
        panic!(
            "expected /health of {} to list peer {peer}, peers are {}",
            host.name(),
            host.health()["peers"]
        )
    })
}

fn num(entry: &serde_json::Value, key: &str) -> u64 {
    entry[key]
        .as_u64()
        .unwrap_or_else(|| panic!("expected a number `{key}` in {entry}"))
}

/// `host` has banned `peer` as a liar: lies >= 1 and not available.
fn assert_banned(host: &LanHost, peer: &str) {
    let entry = peer_entry(host, peer);
    assert!(
        num(&entry, "lies") >= 1 && entry["available"] == false,
        "expected {} to have banned {peer} (lies >= 1, available false), /health says {entry}",
        host.name()
    );
}

// ---------------------------------------------------------------------------
// The test bed itself
// ---------------------------------------------------------------------------

/// The simulated LAN carries broadcast and unicast between namespaces: a
/// broadcast request reaches a fake peer whose reply comes back byte for
/// byte, and a real peerix's /local answers across the bridge. (Checks the
/// harness, so that a LAN test failure is never a test-bed failure.)
#[test]
fn the_test_lan_carries_broadcast_and_unicast() {
    let many = many_fixture();
    let (dir, lan, up) = world("lan_testbed", 3);
    let src = source_store(&dir, &up, &[&many.first]);
    let fake = FakePeer::start(
        &lan,
        1,
        vec![FakeItem::from_store(&src, &many.first, NarMode::Honest)],
        TcpMode::Serve,
    );
    let a = signed_host(&dir, &lan, 2, "a", &up, &[&many.first], &[]);
    let hash = hash_part(&many.first);

    let probe = probe_socket(lan.ns(0));
    probe
        .send_to(&request_packet(0x0102_0304, hash), (BROADCAST, LAN_PORT))
        .expect("sending a broadcast request");
    let fake_addr = SocketAddr::from((lan_ip(1), LAN_PORT));
    let expected = response_packet(0x0102_0304, u32::from(LAN_PORT), hash);
    let got = collect_datagrams(
        &probe,
        "the fake peer's reply to a broadcast request",
        |got| got.iter().any(|(from, _)| *from == fake_addr),
        Duration::ZERO,
    );
    let reply = got.iter().find(|(from, _)| *from == fake_addr).unwrap();
    assert_eq!(
        reply.1, expected,
        "expected the fake peer's reply to be [1][id][12304][local/<hash>.narinfo]"
    );

    let narinfo = format!("/local/{hash}.narinfo");
    for (who, ip) in [("fake peer", fake.ip), ("peerix a", a.ip)] {
        let addr = SocketAddr::from((ip, LAN_PORT));
        let request = narinfo.clone();
        let response = in_netns(lan.ns(0), move || http::get(addr, &request))
            .unwrap_or_else(|e| panic!("GET {narinfo} on {who} across the bridge: {e}"));
        assert_eq!(
            response.status,
            200,
            "GET {narinfo} on {who} across the bridge: expected 200, got {}",
            response.describe()
        );
        let served = NarInfoText::read(&response.text());
        assert_eq!(served.field("StorePath"), many.first, "{who}: StorePath");
        assert!(
            served.sigs.iter().any(|s| s.starts_with(UPSTREAM)),
            "{who}: expected the upstream signature, got {:?}",
            served.sigs
        );
    }
}

// ---------------------------------------------------------------------------
// Fetching from an honest peer
// ---------------------------------------------------------------------------

/// B has nothing, A has a signed realistic closure (with a 50 MiB file, so
/// one NAR streams and the others are verified whole): nix in B fetches it
/// all through B's peerix, and it verifies with the upstream key alone. B's
/// narinfo keeps A's Sig lines and names A in a `peer/` URL.
#[test]
fn a_closure_on_one_host_is_fetched_by_another_over_the_lan() {
    let fx = realistic_fixture();
    let (dir, lan, up) = world("lan_basic", 2);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[&fx.app], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);

    // Before the fetch: afterwards B would answer from its own store.
    assert_narinfo_from(&b, &fx.big, &a);
    assert_narinfo_from(&b, &fx.app, &a);

    substitute_ok(&b, &up, &fx.app, "nix-store -r of A's closure in B");
    assert_same_closure(&a, &b, &up, &fx.app);

    let health = b.health();
    assert_eq!(
        health["lan"]["enabled"], true,
        "expected LAN mode on by default in B: {health}"
    );
    assert!(
        b.lan_counter("queries") >= 1,
        "expected B to count its LAN queries: {health}"
    );
    assert!(
        a.lan_counter("replies_sent") >= 1,
        "expected A to count its replies: {}",
        a.health()
    );
    let entry = peer_entry(&b, &a.peer_addr());
    assert!(
        num(&entry, "successes") >= 1 && num(&entry, "lies") == 0 && entry["available"] == true,
        "expected A in B's peers with successes >= 1, no lies, available: {entry}"
    );
}

// ---------------------------------------------------------------------------
// Lying peers
// ---------------------------------------------------------------------------

/// Make B rank `liar` above A: B fetches a path only the liar has (honestly),
/// so the liar has a success on record and A has none.
fn earn_reputation(b: &LanHost, up: &KeyPair, path: &str, liar: &str) {
    substitute_ok(
        b,
        up,
        path,
        &format!("the honest fetch from {liar} that earns it a reputation"),
    );
    let entry = peer_entry(b, liar);
    assert!(
        num(&entry, "successes") >= 1,
        "expected B to record a success for {liar}: {entry}"
    );
}

/// (a) C is a real peerix with `--no-filter` that shares the same paths as A,
/// one unsigned and one signed by an impostor key that has the upstream
/// key's name. Although C has the better reputation, B serves A's signed
/// narinfos, and nix gets the paths from A.
#[test]
fn unsigned_or_forged_narinfos_are_skipped_for_a_signed_one() {
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("lan_liar_sig", 3);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[&many.second], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let mut c = LanHost::new(&dir, &lan, 2, "c", &[&many.second, &fx.busybox]);
    c.host.sign(&up, &[&fx.busybox], false);
    let impostor = c.host.nix.generate_key(&dir.subdir("impostor"), UPSTREAM);
    assert_ne!(impostor.public, up.public, "the impostor key must differ");
    // many.first stays unsigned; many.second gets a forged upstream Sig.
    c.host.sign(&impostor, &[&many.second], false);
    c.start_peerix(&dir, &up, &["--no-filter"]);

    earn_reputation(&b, &up, &fx.busybox, &c.peer_addr());
    assert_narinfo_from(&b, &many.first, &a);
    assert_narinfo_from(&b, &many.second, &a);
    // C was asked (found by its summary or by broadcast): its forged
    // narinfo was refused as a lie.
    let entry = peer_entry(&b, &c.peer_addr());
    assert!(
        num(&entry, "lies") >= 1,
        "expected B to have asked C and refused its forged narinfo: {entry}"
    );
    substitute_ok(&b, &up, &many.second, "nix-store -r in B");
    assert_same_closure(&a, &b, &up, &many.second);
}

/// A late honest peer is not lost. C, a real peerix, answers every query at
/// once, but no trusted key signed its narinfos: many.first's closure is
/// unsigned (its own builds), and many.second carries a forged upstream
/// signature. A, the only honest holder, answers 40 ms later (its UDP
/// replies are held back: a Wi-Fi peer), well after the short wait that
/// follows a first answer. B must keep listening for the rest of the window
/// once C has failed, and get the whole closure from A.
#[test]
fn an_honest_peer_that_answers_40_ms_after_a_liar_is_still_used() {
    let many = many_fixture();
    let (dir, lan, up) = world("lan_late_honest", 3);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let mut c = LanHost::new(&dir, &lan, 2, "c", &[&many.second]);
    let impostor = c.host.nix.generate_key(&dir.subdir("impostor"), UPSTREAM);
    c.host.sign(&impostor, &[&many.second], false);
    c.start_peerix(&dir, &up, &["--no-filter"]);
    let src = source_store(&dir, &up, &[&many.second]);
    let closure = src.nix.closure(&src.store(), &many.second);
    let items = closure
        .iter()
        .map(|p| FakeItem::from_store(&src, p, NarMode::Honest))
        .collect();
    let a = FakePeer::start_late(&lan, 0, items, TcpMode::Serve, Duration::from_millis(40));

    substitute_ok(
        &b,
        &up,
        &many.second,
        "nix-store -r in B, with C answering first and failing, and A answering 40 ms later",
    );
    for p in &closure {
        assert!(b.host.is_valid(p), "expected {p} to be valid in B");
    }
    assert_success(
        "nix store verify in B trusting only upstream",
        &b.verify(&[&up.public], &[&many.second]),
    );
    assert!(
        c.lan_counter("replies_sent") as usize >= closure.len(),
        "expected C to have answered B's queries first: {}",
        c.health()
    );
    assert!(
        counter(&a.stats.nar_requests) as usize >= closure.len(),
        "expected every NAR from A: {:?}",
        a.stats
    );
}

/// (b) C (a fake peer) serves an honest narinfo and then garbage for the
/// NAR. The NAR is small, so B checks it before nix sees a byte, falls
/// through to A, and the first nix attempt succeeds; C is banned.
#[test]
fn a_garbage_nar_is_refused_and_fetched_from_an_honest_peer() {
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("lan_liar_garbage", 3);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[&many.first], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let src = source_store(&dir, &up, &[&many.first, &fx.busybox]);
    let c = FakePeer::start(
        &lan,
        2,
        vec![
            FakeItem::from_store(&src, &fx.busybox, NarMode::Honest),
            FakeItem::from_store(&src, &many.first, NarMode::Garbage),
        ],
        TcpMode::Serve,
    );

    earn_reputation(&b, &up, &fx.busybox, &c.addr());
    substitute_ok(
        &b,
        &up,
        &many.first,
        "nix-store -r in B while C serves garbage (first attempt)",
    );
    assert!(
        counter(&c.stats.nars_garbage) >= 1,
        "expected B to have tried C's NAR first (C has the better reputation); C served no garbage: {:?}",
        c.stats
    );
    assert_same_closure(&a, &b, &up, &many.first);
    assert_banned(&b, &c.addr());
}

/// Which byte to flip: in store path `path`, in file `file` under it ("" for
/// a store path that is itself a file), at `offset`.
struct Corruption<'a> {
    path: &'a str,
    file: &'a str,
    offset: u64,
}

/// C: a real peerix holding the closures of `paths`, signed by `up`, where
/// one byte is flipped as `bad` says (same size, so the NAR is well-formed
/// and the narinfo honest, but the NarHash no longer matches).
fn corrupt_host(
    dir: &TestDir,
    lan: &Lan,
    i: usize,
    name: &str,
    up: &KeyPair,
    paths: &[&str],
    bad: Corruption,
) -> LanHost {
    let mut c = LanHost::new(dir, lan, i, name, paths);
    c.host.sign(up, paths, true);
    let mut physical = c.host.physical(bad.path);
    if !bad.file.is_empty() {
        physical = physical.join(bad.file);
    }
    flip_byte(&physical, bad.offset);
    c.start_peerix(dir, up, &[]);
    c
}

/// (c) small: C's NAR of a small path differs from the NarHash in one byte.
/// B verifies small NARs before sending, so it falls through to A and the
/// first nix attempt succeeds; C is banned.
#[test]
fn a_small_nar_with_one_wrong_byte_is_caught_before_nix_sees_it() {
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("lan_liar_small", 3);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[&many.first], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let bad = Corruption {
        path: &many.first,
        file: "",
        offset: 0,
    };
    let c = corrupt_host(&dir, &lan, 2, "c", &up, &[&fx.busybox, &many.first], bad);
    assert_ne!(
        c.host.dump(&many.first),
        a.host.dump(&many.first),
        "C's copy must differ from A's"
    );

    earn_reputation(&b, &up, &fx.busybox, &c.peer_addr());
    substitute_ok(
        &b,
        &up,
        &many.first,
        "nix-store -r in B while C's small NAR is corrupt (first attempt)",
    );
    assert_same_closure(&a, &b, &up, &many.first);
    assert_banned(&b, &c.peer_addr());
}

/// (c) large: C's copy of the 50 MiB path has one byte flipped in the middle.
/// It is above --verify-before-send, so B streams it, holds back the end and
/// aborts; at most the first nix attempt fails, the next gets A's bytes, and
/// C is banned. No wrong bytes ever become valid in B.
#[test]
fn a_large_nar_with_one_wrong_byte_is_aborted_and_the_retry_gets_it_from_a() {
    let fx = realistic_fixture();
    let (dir, lan, up) = world("lan_liar_large", 3);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[&fx.big], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let bad = Corruption {
        path: &fx.big,
        file: "blob.bin",
        offset: 25 * 1024 * 1024,
    };
    let c = corrupt_host(&dir, &lan, 2, "c", &up, &[&fx.busybox, &fx.big], bad);

    earn_reputation(&b, &up, &fx.busybox, &c.peer_addr());
    let first = b.substitute(&[&up.public], &fx.big);
    eprintln!(
        "first nix attempt while C lies: {}\n{}",
        first.status,
        String::from_utf8_lossy(&first.stderr)
    );
    if !first.status.success() {
        assert!(
            !b.host.is_valid(&fx.big),
            "after a failed attempt, expected {} not to be valid in B; stderr:\n{}",
            fx.big,
            String::from_utf8_lossy(&first.stderr)
        );
        substitute_ok(&b, &up, &fx.big, "the second nix-store -r in B");
    }
    assert_same_closure(&a, &b, &up, &fx.big);
    assert_banned(&b, &c.peer_addr());
}

/// When the only holder is a liar (one byte wrong in a small NAR), the
/// failure is clean: the narinfo never gets a 5xx, nix fails, nothing becomes
/// valid in B, and the liar is banned. After the ban, B must answer 404 for
/// what only the liar offers, including an intact path whose narinfo B
/// looked up before the ban: a narinfo whose only holder is banned would make
/// nix fail on the NAR instead of moving on to its next substituter. (B
/// reads the small NAR ahead once its narinfo is served, so the lie may be
/// caught before nix asks for the NAR: the intact path is looked up first.)
#[test]
fn when_the_only_holder_of_a_small_nar_lies_the_fetch_fails_cleanly() {
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("lan_alone_small", 2);
    let b = signed_host(&dir, &lan, 0, "b", &up, &[], &[]);
    let bad = Corruption {
        path: &many.first,
        file: "",
        offset: 0,
    };
    let c = corrupt_host(&dir, &lan, 1, "c", &up, &[&many.first, &fx.busybox], bad);

    let other = format!("/{}.narinfo", hash_part(&fx.busybox));
    expect_status(&b, &other, 200, "C offers an intact path, not yet caught");
    let narinfo = format!("/{}.narinfo", hash_part(&many.first));
    let first = b.must_get(&narinfo);
    assert!(
        first.status < 500,
        "GET {narinfo} on B: expected no 5xx, got {}",
        first.describe()
    );
    // The NAR itself: whether B reads it ahead or fetches it now, C's wrong
    // bytes must never make a 200.
    if first.status == 200 {
        let url = format!("/{}", NarInfoText::read(&first.text()).field("URL"));
        if let Ok(response) = b.get(&url) {
            assert!(
                response.status != 200,
                "GET {url} on B: expected no 200 for the liar's NAR, got {}",
                response.describe()
            );
        }
    }
    let out = b.substitute(&[&up.public], &many.first);
    assert_failure("nix-store -r in B when only C (a liar) has it", &out);
    assert!(!b.host.is_valid(&many.first), "expected nothing valid in B");
    assert_banned(&b, &c.peer_addr());
    expect_status(&b, &narinfo, 404, "its only holder is banned");
    expect_status(
        &b,
        &other,
        404,
        "its only holder was banned after B looked it up",
    );
}

/// The same with a large NAR (streamed): B's NAR response is never a
/// complete 200 of wrong bytes, nix fails, nothing becomes valid in B, the
/// liar is banned, and then the narinfo gets 404.
#[test]
fn when_the_only_holder_of_a_large_nar_lies_the_fetch_fails_cleanly() {
    let fx = realistic_fixture();
    let (dir, lan, up) = world("lan_alone_large", 2);
    let b = signed_host(&dir, &lan, 0, "b", &up, &[], &[]);
    let bad = Corruption {
        path: &fx.big,
        file: "blob.bin",
        offset: 25 * 1024 * 1024,
    };
    let c = corrupt_host(&dir, &lan, 1, "c", &up, &[&fx.big], bad);

    let narinfo = format!("/{}.narinfo", hash_part(&fx.big));
    let status = status_not_5xx(&b, &narinfo);
    assert_eq!(
        status, 200,
        "expected B to offer C's honest narinfo before C is caught"
    );
    // Ask B for the NAR directly: the stream must be cut off, not completed.
    let served = NarInfoText::read(&b.must_get(&narinfo).text());
    let url = format!("/{}", served.field("URL"));
    match b.get(&url) {
        Ok(response) => assert!(
            response.status != 200,
            "GET {url} on B: expected the stream of C's wrong bytes to be aborted, got a complete {}",
            response.describe()
        ),
        Err(e) => eprintln!("GET {url} on B was cut off, as it must be: {e}"),
    }
    assert_banned(&b, &c.peer_addr());
    let out = b.substitute(&[&up.public], &fx.big);
    assert_failure("nix-store -r in B when only C (a liar) has it", &out);
    assert!(!b.host.is_valid(&fx.big), "expected nothing valid in B");
    expect_status(&b, &narinfo, 404, "its only holder is banned");
}

// ---------------------------------------------------------------------------
// Dead and vanished peers
// ---------------------------------------------------------------------------

/// D (a fake peer, with the better reputation) sends 8 MiB of the 50 MiB NAR
/// and closes. B resumes from A with a Range request, and the first nix
/// attempt succeeds. Dying is a failure, not a lie.
#[test]
fn a_peer_that_dies_mid_stream_is_resumed_from_another() {
    let fx = realistic_fixture();
    let (dir, lan, up) = world("lan_dead_mid", 3);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[&fx.big], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let src = source_store(&dir, &up, &[&fx.big, &fx.busybox]);
    let d = FakePeer::start(
        &lan,
        2,
        vec![
            FakeItem::from_store(&src, &fx.busybox, NarMode::Honest),
            FakeItem::from_store(&src, &fx.big, NarMode::CloseAfter(8 * 1024 * 1024)),
        ],
        TcpMode::Serve,
    );

    earn_reputation(&b, &up, &fx.busybox, &d.addr());
    substitute_ok(
        &b,
        &up,
        &fx.big,
        "nix-store -r in B while D dies mid-stream (first attempt)",
    );
    assert!(
        counter(&d.stats.nars_cut) >= 1,
        "expected B to have started on D's NAR (D has the better reputation); D cut none: {:?}",
        d.stats
    );
    assert_same_closure(&a, &b, &up, &fx.big);
    let entry = peer_entry(&b, &d.addr());
    assert!(
        num(&entry, "failures") >= 1 && num(&entry, "lies") == 0,
        "expected D recorded as failed (not as a liar): {entry}"
    );
    let entry = peer_entry(&b, &a.peer_addr());
    assert!(
        num(&entry, "successes") >= 1,
        "expected A recorded with a success (it served the rest): {entry}"
    );
}

/// E1 answers UDP but refuses TCP. E2 serves well (earning the better
/// reputation), then hangs: it still answers UDP and accepts connections but
/// never answers them. With `--timeout 1.5` (decimals are allowed), a path
/// E2 claims and A really has is still served from A; paths only they claim
/// get 404, never a 5xx.
#[test]
fn peers_that_answer_udp_then_vanish_cost_a_404_not_an_error() {
    let fx = realistic_fixture();
    let many = many_fixture();
    let (dir, lan, up) = world("lan_vanished", 4);
    // A: lib and busybox. E1 claims only script; E2 has many.first (honest,
    // for its reputation), and claims lib and big.
    let a = signed_host(&dir, &lan, 0, "a", &up, &[&fx.lib], &[]);
    let mut b = signed_host(&dir, &lan, 1, "b", &up, &[], &["--timeout", "1.5"]);
    let src = source_store(&dir, &up, &[&many.first, &fx.big, &fx.script]);
    let e1 = FakePeer::start(
        &lan,
        2,
        vec![FakeItem::from_store(&src, &fx.script, NarMode::Honest)],
        TcpMode::Refuse,
    );
    let e2 = FakePeer::start(
        &lan,
        3,
        vec![
            FakeItem::from_store(&src, &many.first, NarMode::Honest),
            FakeItem::from_store(&src, &fx.lib, NarMode::Honest),
            FakeItem::from_store(&src, &fx.big, NarMode::Honest),
        ],
        TcpMode::Serve,
    );

    earn_reputation(&b, &up, &many.first, &e2.addr());
    e2.hang_from_now();
    let connections = counter(&e2.stats.tcp_connections);
    // B asks E2 first (better reputation), waits out --timeout, then asks A.
    assert_narinfo_from(&b, &fx.lib, &a);
    assert!(
        counter(&e2.stats.tcp_connections) > connections,
        "expected B to have tried the hanging E2 (better reputation) before A: {:?}",
        e2.stats
    );

    for (peer, path) in [(&e1, &fx.script), (&e2, &fx.big)] {
        let narinfo = format!("/{}.narinfo", hash_part(path));
        expect_status(
            &b,
            &narinfo,
            404,
            &format!("only {} claims it, and it vanished", peer.addr()),
        );
        assert!(
            counter(&peer.stats.udp_replies) >= 1,
            "expected {} to have answered B's query: {:?}",
            peer.addr(),
            peer.stats
        );
    }
    for peer in [&e1, &e2] {
        let entry = peer_entry(&b, &peer.addr());
        assert!(
            num(&entry, "failures") >= 1 && num(&entry, "lies") == 0,
            "expected {} recorded as failed (not as a liar): {entry}",
            peer.addr()
        );
    }
    b.peerix_mut().assert_alive_without_panic();
}

// ---------------------------------------------------------------------------
// Privacy
// ---------------------------------------------------------------------------

/// A's unsigned path (default `signed` mode) gets no UDP reply, by unicast or
/// broadcast, and 404 on A's /local narinfo and NAR; its signed path gets a
/// reply in the exact wire format and 200s.
#[test]
fn a_path_the_policy_keeps_private_gets_no_lan_reply_and_no_local_answer() {
    let many = many_fixture();
    let (dir, lan, up) = world("lan_privacy", 2);
    // many.second's closure: first (signed, shared) and second (unsigned).
    let mut a = LanHost::new(&dir, &lan, 0, "a", &[&many.second]);
    a.host.sign(&up, &[&many.first], false);
    a.start_peerix(&dir, &up, &[]);
    let shared = hash_part(&many.first);
    let private = hash_part(&many.second);
    let a_addr = SocketAddr::from((a.ip, LAN_PORT));
    let probe = probe_socket(lan.ns(1));

    for (how, to) in [("unicast", a.ip), ("broadcast", BROADCAST)] {
        let (private_id, shared_id) = match how {
            "unicast" => (0x5ec2_e701, 0x5ec2_e702),
            _ => (0x5ec2_e703, 0x5ec2_e704),
        };
        // The private query goes first: by the time the shared one is
        // answered, an answer to the private one would have come too.
        for (id, hash) in [(private_id, private), (shared_id, shared)] {
            probe
                .send_to(&request_packet(id, hash), (to, LAN_PORT))
                .expect("sending a probe request");
        }
        let expected = response_packet(shared_id, u32::from(LAN_PORT), shared);
        let got = collect_datagrams(
            &probe,
            &format!("A's reply to a {how} request for its shared path"),
            |got| got.iter().any(|(_, p)| *p == expected),
            Duration::from_millis(500),
        );
        let from_a: Vec<_> = got.iter().filter(|(from, _)| *from == a_addr).collect();
        assert!(
            from_a.iter().any(|(_, p)| *p == expected),
            "{how}: expected A's reply from {a_addr} in the exact wire format {expected:?}, got {got:?}"
        );
        let private_id_bytes = private_id.to_be_bytes();
        assert!(
            !got.iter()
                .any(|(_, p)| p.len() >= 5 && p[1..5] == private_id_bytes),
            "{how}: expected no reply to the request for the private path, got {got:?}"
        );
    }

    let nar_url = |path: &str| {
        let served = lan_narinfo(&a, path); // loopback on A: every valid path
        format!("/local/{}", served.field("URL"))
    };
    let probe_ns = lan.ns(1).to_string();
    let remote = |request: String| {
        in_netns(&probe_ns, move || http::get(a_addr, &request))
            .unwrap_or_else(|e| panic!("GET on A from the probe namespace: {e}"))
    };
    for (what, path, status) in [("private", &many.second, 404), ("shared", &many.first, 200)] {
        // The root NAR route, where the original peerix fetches, keeps the
        // same policy for other hosts.
        let root_nar = nar_url(path).replacen("/local", "", 1);
        for request in [
            format!("/local/{}.narinfo", hash_part(path)),
            nar_url(path),
            root_nar,
        ] {
            let response = remote(request.clone());
            assert_eq!(
                response.status,
                status,
                "GET {request} ({what} path) on A from another host: expected {status}, got {}",
                response.describe()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Bad packets
// ---------------------------------------------------------------------------

/// Garbage, truncated, oversized, unknown-type and unsolicited packets sent to
/// A and B are each dropped and counted; neither crashes, and B still fetches
/// from A afterwards.
#[test]
fn malformed_and_unsolicited_packets_are_dropped_and_counted() {
    let many = many_fixture();
    let (dir, lan, up) = world("lan_bad_packets", 3);
    let mut a = signed_host(&dir, &lan, 0, "a", &up, &[&many.first], &[]);
    let mut b = signed_host(&dir, &lan, 1, "b", &up, &[], &[]);
    let hash = hash_part(&many.first);
    let probe = probe_socket(lan.ns(2));

    let valid_request = request_packet(7, hash);
    let mut oversized_600 = valid_request.clone();
    oversized_600.resize(600, b'a');
    let mut oversized_60k = valid_request.clone();
    oversized_60k.resize(60_000, b'a');
    let mut unknown_type = valid_request.clone();
    unknown_type[0] = 7;
    let bad_hash = request_packet(8, &"e".repeat(32));
    let mut bad_url = vec![1u8, 0, 0, 0, 9, 0, 0, 0x30, 0x10];
    bad_url.extend_from_slice(b"local/../../etc/passwd");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random garbage", garbage(45, 99)),
        ("an HTTP request", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
        ("an empty datagram", Vec::new()),
        ("a 3-byte packet", vec![0, 1, 2]),
        ("a truncated request", valid_request[..15].to_vec()),
        ("a 600-byte packet", oversized_600),
        ("a 60000-byte packet", oversized_60k),
        ("an unknown packet type", unknown_type),
        ("a request with a bad hash part", bad_hash),
        ("a reply with a bad url path", bad_url),
        (
            "a reply with an id nobody asked for",
            response_packet(0xdead_beef, u32::from(LAN_PORT), hash),
        ),
    ];
    for host in [&a, &b] {
        let to = SocketAddr::from((host.ip, LAN_PORT));
        for (what, packet) in &cases {
            let before = host.lan_counter("packets_dropped");
            probe
                .send_to(packet, to)
                .unwrap_or_else(|e| panic!("sending {what} to {to}: {e}"));
            poll_until(
                &format!(
                    "{}'s packets_dropped to grow from {before} after {what}",
                    host.name()
                ),
                || {
                    let health = host.peerix().health()?;
                    match health["lan"]["packets_dropped"].as_u64() {
                        Some(now) if now > before => Ok(()),
                        _ => Err(health["lan"].to_string()),
                    }
                },
            );
        }
    }
    a.peerix_mut().assert_alive_without_panic();
    b.peerix_mut().assert_alive_without_panic();

    substitute_ok(
        &b,
        &up,
        &many.first,
        "nix-store -r in B after the bad packets",
    );
    assert_same_closure(&a, &b, &up, &many.first);
}

// ---------------------------------------------------------------------------
// Unicast and switches
// ---------------------------------------------------------------------------

/// B1 with `--no-broadcast --extra-peer <A>` fetches from A, and C (which has
/// the same path) hears nothing; B2 with `--no-broadcast` alone gets 404 and
/// nobody hears from it.
#[test]
fn extra_peers_are_asked_by_unicast_and_no_broadcast_means_no_broadcast() {
    let many = many_fixture();
    let (dir, lan, up) = world("lan_unicast", 4);
    let a = signed_host(&dir, &lan, 0, "a", &up, &[&many.first], &[]);
    let c = signed_host(&dir, &lan, 1, "c", &up, &[&many.first], &[]);
    let extra = a.peer_addr();
    let b1 = signed_host(
        &dir,
        &lan,
        2,
        "b1",
        &up,
        &[],
        &["--no-broadcast", "--extra-peer", &extra],
    );
    let b2 = signed_host(&dir, &lan, 3, "b2", &up, &[], &["--no-broadcast"]);

    assert_narinfo_from(&b1, &many.first, &a);
    substitute_ok(&b1, &up, &many.first, "nix-store -r in B1 (extra peer A)");
    assert_same_closure(&a, &b1, &up, &many.first);
    let a_replies = a.lan_counter("replies_sent");
    assert!(
        a_replies >= 1,
        "expected A to have answered B1's unicast query: {}",
        a.health()
    );
    assert_eq!(
        c.lan_counter("replies_sent"),
        0,
        "expected C to hear no query from B1 (no broadcast): {}",
        c.health()
    );

    let narinfo = format!("/{}.narinfo", hash_part(&many.first));
    expect_status(&b2, &narinfo, 404, "no broadcast and no extra peer");
    let out = b2.substitute(&[&up.public], &many.first);
    assert_failure("nix-store -r in B2 (no broadcast, no peers)", &out);
    assert_eq!(
        (a.lan_counter("replies_sent"), c.lan_counter("replies_sent")),
        (a_replies, 0),
        "expected neither A nor C to hear from B2"
    );
}

/// `--no-lan` opens no UDP socket (port 12304 stays free in its namespace)
/// and says so in /health; with LAN mode on, the port is taken.
#[test]
fn no_lan_opens_no_udp_socket() {
    let many = many_fixture();
    let (dir, lan, up) = world("lan_off", 2);
    let off = signed_host(&dir, &lan, 0, "off", &up, &[&many.first], &["--no-lan"]);
    let on = signed_host(&dir, &lan, 1, "on", &up, &[], &[]);
    assert_eq!(
        off.health()["lan"]["enabled"],
        false,
        "expected /health lan.enabled false with --no-lan: {}",
        off.health()
    );
    let bind = |host: &LanHost| {
        in_netns(&host.ns, || {
            UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, LAN_PORT)))
        })
    };
    if let Err(e) = bind(&off) {
        panic!("expected UDP port {LAN_PORT} free with --no-lan, binding it failed: {e}");
    }
    match bind(&on) {
        Ok(_) => panic!("expected UDP port {LAN_PORT} taken by peerix in LAN mode, it was free"),
        Err(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::AddrInUse,
            "expected AddrInUse binding UDP {LAN_PORT} next to a LAN-mode peerix"
        ),
    }
    expect_status(
        &on,
        &format!("/{}.narinfo", hash_part(&many.first)),
        404,
        "the only holder has LAN mode off",
    );
}
