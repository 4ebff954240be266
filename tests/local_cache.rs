//! Integration tests for issue 2: peerix serves this host's store as a
//! binary cache that real Nix accepts.
//!
//! Every test builds its own world: a chroot store with its own `nix-daemon`
//! on a private socket, `peerix` on a free loopback port over it, and fresh
//! nix client stores to copy into. Guards stop everything, also on panic.
//! What the tests prove:
//! - `nix copy` and `nix-store -r` fetch a realistic closure (symlinks of
//!   every kind, empty files and dirs, 40-level nesting, spaces, a 50 MiB
//!   file, references) from peerix, and `nix store verify` passes.
//! - For 300+ paths the served NAR equals `nix-store --dump` byte for byte,
//!   and the narinfo matches `nix path-info --json` and round-trips through
//!   `peerix::nix::narinfo::NarInfo`.
//! - Nix accepts peerix's signature and refuses it under the wrong key; in
//!   `signed` mode only paths signed by a trusted key are shared on /local.
//! - HEAD, Range (206/416) and stale NAR URLs (404) behave as nix needs.
//! - A non-loopback client (in a network namespace) gets 403 on the root
//!   endpoints and 200 on /local.
//! - Malformed input gets 4xx, never 5xx, and never kills the daemon.
//! - peerix starts without a nix-daemon and picks one up when it appears.

mod common;

use common::http::{self, Response};
use common::*;
use peerix::nix::narinfo::NarInfo;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Flags that make peerix serve everything and sign with `key`.
fn open_signing_flags(key: &KeyPair) -> Vec<String> {
    vec![
        "--private-key".into(),
        key.secret_file.display().to_string(),
        "--no-filter".into(),
    ]
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// GET a narinfo that must exist; returns its text.
fn narinfo_text(addr: SocketAddr, prefix: &str, store_path: &str) -> String {
    let path = format!("{prefix}/{}.narinfo", hash_part(store_path));
    let response = http::expect_status(addr, &path, 200);
    let content_type = response.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("text/x-nix-narinfo"),
        "GET {path}: expected Content-Type text/x-nix-narinfo, got {content_type:?}"
    );
    response.text()
}

/// The absolute request path of the NAR named by a narinfo served under `prefix`.
fn nar_request_path(prefix: &str, narinfo: &str) -> String {
    let url = NarInfoText::read(narinfo).field("URL").to_string();
    assert!(
        url.starts_with("nar/"),
        "expected a relative URL `nar/...` in the narinfo, got {url:?}"
    );
    format!("{prefix}/{url}")
}

/// Headers of a response without the ones that may differ between two
/// otherwise equal answers.
fn comparable_headers(response: &Response) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = response
        .headers
        .iter()
        .filter(|(k, _)| k != "date")
        .cloned()
        .collect();
    headers.sort();
    headers
}

/// A served NAR must equal `nix-store --dump`; says where it first differs.
fn assert_same_bytes(what: &str, got: &[u8], expected: &[u8]) {
    if got == expected {
        return;
    }
    let first_difference = got
        .iter()
        .zip(expected)
        .position(|(g, e)| g != e)
        .unwrap_or(got.len().min(expected.len()));
    panic!(
        "GET {what}: expected the {} bytes of `nix-store --dump`, got {} bytes, first difference at offset {first_difference}",
        expected.len(),
        got.len()
    );
}

/// HEAD must answer exactly like GET, without a body.
fn assert_head_matches_get(addr: SocketAddr, path: &str) -> Response {
    let get = http::expect_status(addr, path, 200);
    let head = http::head(addr, path)
        .unwrap_or_else(|e| panic!("HEAD {path}: expected a response, got {e}"));
    assert_eq!(
        head.status,
        get.status,
        "HEAD {path}: expected the GET status, got {}",
        head.describe()
    );
    assert_eq!(
        comparable_headers(&head),
        comparable_headers(&get),
        "HEAD {path}: expected the same headers as GET"
    );
    assert!(
        head.body.is_empty(),
        "HEAD {path}: expected no body, got {} bytes",
        head.body.len()
    );
    get
}

/// `nix copy --from` and `nix-store -r` with peerix as substituter fetch the
/// whole realistic closure into fresh stores, and `nix store verify` passes.
#[test]
fn nix_copies_and_substitutes_a_realistic_closure_from_peerix() {
    let dir = TestDir::new("copy_closure");
    let fx = realistic_fixture();
    let a = Host::with_paths(&dir, "a", &[&fx.app]);
    let key = a.nix.generate_key(&dir.path, "peerix-a-1");
    let peerix = Peerix::start(&dir, &a, &as_strs(&open_signing_flags(&key)));
    let closure = a.nix.closure(&a.store(), &fx.app);
    assert_eq!(
        closure.len(),
        6,
        "expected the fixture closure to hold 6 paths, got {closure:?}"
    );

    // nix copy --from peerix into a fresh store B.
    let b = Host::new(&dir, "b");
    let copy = b
        .nix
        .copy_from(&peerix.url(), &b.store(), &[&key.public], &[&fx.app]);
    assert_success("nix copy --from peerix", &copy);
    for path in &closure {
        assert!(
            b.is_valid(path),
            "expected {path} to be valid in store B after nix copy"
        );
    }
    assert_success(
        "nix store verify in B",
        &b.nix.verify(&b.store(), &[&key.public], &[&fx.app]),
    );
    let blob_a = std::fs::read(a.physical(&fx.big).join("blob.bin")).expect("reading blob in A");
    let blob_b = std::fs::read(b.physical(&fx.big).join("blob.bin")).expect("reading blob in B");
    assert_eq!(
        blob_a.len(),
        50 * 1024 * 1024,
        "expected the big fixture file to be 50 MiB"
    );
    assert!(
        blob_a == blob_b,
        "expected the 50 MiB file in B to equal the one in A"
    );
    let link_b =
        std::fs::read_link(b.physical(&fx.lib).join("dangling-link")).expect("dangling link in B");
    assert_eq!(
        link_b.to_str(),
        Some("../does/not/exist"),
        "expected the dangling symlink to survive"
    );

    // nix-store -r with peerix as the only substituter into a fresh store C.
    let c = Host::new(&dir, "c");
    let substitute = c
        .nix
        .substitute(&c.store(), &peerix.url(), &[&key.public], &fx.app);
    assert_success("nix-store -r with peerix as substituter", &substitute);
    for path in &closure {
        assert!(
            c.is_valid(path),
            "expected {path} to be valid in store C after nix-store -r"
        );
    }
    assert_success(
        "nix store verify in C",
        &c.nix.verify(&c.store(), &[&key.public], &[&fx.app]),
    );
}

/// Over 300+ paths: narinfo fields equal `nix path-info --json`, the narinfo
/// round-trips through `NarInfo`, and the NAR equals `nix-store --dump`.
#[test]
fn every_nar_equals_nix_store_dump_and_every_narinfo_round_trips() {
    let dir = TestDir::new("every_nar");
    let fx = realistic_fixture();
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.top, &fx.app]);
    let key = a.nix.generate_key(&dir.path, "peerix-a-1");
    let peerix = Peerix::start(&dir, &a, &as_strs(&open_signing_flags(&key)));
    let infos = a.path_infos(&[&many.top, &fx.app], true);
    assert!(
        infos.len() >= 300,
        "expected a store of at least 300 paths, got {}",
        infos.len()
    );
    let health = peerix.health().expect("health after the first scan");
    assert!(
        health["indexed_paths"].as_u64().unwrap_or(0) >= infos.len() as u64,
        "expected /health indexed_paths >= {}, got {health}",
        infos.len()
    );

    for info in &infos {
        let text = narinfo_text(peerix.addr, "", &info.path);
        let served = NarInfoText::read(&text);
        let hash = info.hash_part();
        let nar_hash_nix32 = info.nar_hash.trim_start_matches("sha256:");
        let what = format!("narinfo of {}", info.path);
        served.assert_describes(info, &what);
        assert_eq!(served.field("Compression"), "none", "{what}: Compression");
        assert_eq!(
            served.field("URL"),
            format!("nar/{hash}-{nar_hash_nix32}.nar"),
            "{what}: URL"
        );
        let references: Vec<String> = info
            .references
            .iter()
            .map(|r| base_name(r).to_string())
            .collect();
        assert_eq!(served.references(), references, "{what}: References");
        assert_eq!(
            served.get("Deriver"),
            info.deriver.as_deref().map(base_name),
            "{what}: Deriver"
        );
        assert_eq!(served.get("CA"), info.ca.as_deref(), "{what}: CA");
        for sig in &info.signatures {
            assert!(
                served.sigs.contains(sig),
                "{what}: expected store signature {sig} among {:?}",
                served.sigs
            );
        }
        assert!(
            served.sigs.iter().any(|s| s.starts_with("peerix-a-1:")),
            "{what}: expected a signature by peerix-a-1, got {:?}",
            served.sigs
        );

        // Round trip through the library's parser.
        let parsed = NarInfo::parse(&text)
            .unwrap_or_else(|e| panic!("{what}: NarInfo::parse failed: {e:?}\n{text}"));
        let rendered = parsed.render().to_string();
        let reparsed = NarInfo::parse(&rendered)
            .unwrap_or_else(|e| panic!("{what}: parse(render(..)) failed: {e:?}\n{rendered}"));
        assert_eq!(
            reparsed, parsed,
            "{what}: parse(render(parse(x))) != parse(x)\nserved:\n{text}\nrendered:\n{rendered}"
        );
        let mut rendered_fields = NarInfoText::read(&rendered);
        let mut served_fields = served.clone();
        rendered_fields.sigs.sort();
        served_fields.sigs.sort();
        assert_eq!(
            rendered_fields, served_fields,
            "{what}: render() lost or changed fields\nrendered:\n{rendered}"
        );

        // The NAR, byte for byte.
        let nar_path = nar_request_path("", &text);
        let nar = http::expect_status(peerix.addr, &nar_path, 200);
        assert_eq!(
            nar.header("content-length"),
            Some(info.nar_size.to_string().as_str()),
            "GET {nar_path}: Content-Length must be the NarSize"
        );
        let expected = a.dump(&info.path);
        assert_same_bytes(&nar_path, &nar.body, &expected);
    }
}

/// Nix imports and verifies paths signed by peerix's key, and refuses them
/// (imports nothing) when it trusts only another key.
#[test]
fn nix_accepts_the_peerix_signature_and_refuses_a_wrong_key() {
    let dir = TestDir::new("signatures");
    let many = many_fixture();
    // Input-addressed paths only: nix would accept content-addressed ones
    // without any signature, which would hide a refusal.
    let a = Host::with_paths(&dir, "a", &[&many.second]);
    let key = a.nix.generate_key(&dir.path, "peerix-a-1");
    let wrong = a.nix.generate_key(&dir.path, "peerix-a-1-wrong");
    let peerix = Peerix::start(&dir, &a, &as_strs(&open_signing_flags(&key)));

    let refused = Host::new(&dir, "refused");
    let copy = refused.nix.copy_from(
        &peerix.url(),
        &refused.store(),
        &[&wrong.public],
        &[&many.second],
    );
    assert_failure("nix copy trusting only a wrong key", &copy);
    let stderr = String::from_utf8_lossy(&copy.stderr);
    assert!(
        stderr.contains("signature"),
        "expected nix to complain about the signature, it said:\n{stderr}"
    );
    assert!(
        !refused.is_valid(&many.second),
        "expected nothing imported under the wrong key"
    );
    assert!(
        !refused.is_valid(&many.first),
        "expected nothing imported under the wrong key"
    );

    let accepted = Host::new(&dir, "accepted");
    let copy = accepted.nix.copy_from(
        &peerix.url(),
        &accepted.store(),
        &[&key.public],
        &[&many.second],
    );
    assert_success("nix copy trusting the peerix key", &copy);
    let verify = accepted
        .nix
        .verify(&accepted.store(), &[&key.public], &[&many.second]);
    assert_success("nix store verify trusting the peerix key", &verify);
    let verify_wrong = accepted
        .nix
        .verify(&accepted.store(), &[&wrong.public], &[&many.second]);
    assert_failure("nix store verify trusting only a wrong key", &verify_wrong);
}

/// Default `signed` mode: /local serves only paths with a signature by a
/// `--trusted-key`; unsigned or stranger-signed paths get 404 for narinfo
/// and NAR alike. /local works as a plain substituter for nix.
#[test]
fn signed_mode_shares_only_paths_signed_by_a_trusted_key() {
    let dir = TestDir::new("signed_mode");
    let many = many_fixture();
    // Items 0, 1 and 2: 0 signed by the trusted upstream key, 1 unsigned,
    // 2 signed by a key peerix does not trust.
    let a = Host::with_paths(&dir, "a", &[&many.third]);
    let upstream = a.nix.generate_key(&dir.path, "upstream-test-1");
    let stranger = a.nix.generate_key(&dir.path, "stranger-1");
    a.sign(&upstream, &[&many.first], false);
    a.sign(&stranger, &[&many.third], false);
    let peerix = Peerix::start(&dir, &a, &["--trusted-key", &upstream.public]);
    let health = peerix.health().expect("health after the first scan");
    assert_eq!(
        health["shared_paths"].as_u64(),
        Some(1),
        "expected exactly one shared path, /health says {health}"
    );

    let info = http::expect_status(peerix.addr, "/local/nix-cache-info", 200);
    assert!(
        info.text().contains("StoreDir: /nix/store"),
        "expected StoreDir in /local/nix-cache-info: {}",
        info.describe()
    );

    // The upstream-signed path is served on /local with its signature.
    let text = narinfo_text(peerix.addr, "/local", &many.first);
    let served = NarInfoText::read(&text);
    assert!(
        served
            .sigs
            .iter()
            .any(|s| s.starts_with("upstream-test-1:")),
        "expected the upstream signature on /local, got {:?}",
        served.sigs
    );
    let nar_path = nar_request_path("/local", &text);
    let nar = http::expect_status(peerix.addr, &nar_path, 200);
    assert_same_bytes(&nar_path, &nar.body, &a.dump(&many.first));

    // Unsigned and untrusted-signed paths: 404 for the narinfo and the NAR,
    // even though the NAR URL is right (learned from the loopback endpoint).
    for (what, path) in [
        ("unsigned", &many.second),
        ("signed by an untrusted key", &many.third),
    ] {
        let narinfo_path = format!("/local/{}.narinfo", hash_part(path));
        let response = http::must_get(peerix.addr, &narinfo_path);
        assert_eq!(
            response.status,
            404,
            "GET {narinfo_path} ({what}): expected 404, got {}",
            response.describe()
        );
        let head = http::head(peerix.addr, &narinfo_path).expect("HEAD answered");
        assert_eq!(
            head.status,
            404,
            "HEAD {narinfo_path} ({what}): expected 404, got {}",
            head.describe()
        );
        let root_text = narinfo_text(peerix.addr, "", path);
        let nar_path = nar_request_path("/local", &root_text);
        let response = http::must_get(peerix.addr, &nar_path);
        assert_eq!(
            response.status,
            404,
            "GET {nar_path} ({what}): expected 404, got {}",
            response.describe()
        );
    }

    // A LAN host without peerix uses /local as a plain substituter.
    let b = Host::new(&dir, "b");
    let copy = b.nix.copy_from(
        &peerix.local_url(),
        &b.store(),
        &[&upstream.public],
        &[&many.first],
    );
    assert_success(
        "nix copy --from peerix/local of the upstream-signed path",
        &copy,
    );
    assert_success(
        "nix store verify",
        &b.nix
            .verify(&b.store(), &[&upstream.public], &[&many.first]),
    );
    let c = Host::new(&dir, "c");
    let copy = c.nix.copy_from(
        &peerix.local_url(),
        &c.store(),
        &[&upstream.public],
        &[&many.second],
    );
    assert_failure("nix copy --from peerix/local of an unshared path", &copy);
}

/// On both the root and /local caches: HEAD equals GET without a body,
/// single ranges get 206 with the right bytes, unsatisfiable ones 416, and a
/// NAR URL with a stale NarHash 404.
#[test]
fn head_matches_get_ranges_work_and_stale_nar_urls_are_404() {
    let dir = TestDir::new("head_range");
    let fx = realistic_fixture();
    let a = Host::with_paths(&dir, "a", &[&fx.app]);
    let key = a.nix.generate_key(&dir.path, "peerix-a-1");
    let peerix = Peerix::start(&dir, &a, &as_strs(&open_signing_flags(&key)));
    let big = &a.path_infos(&[&fx.big], false)[0];
    let dump = a.dump(&fx.big);
    let size = dump.len();
    assert_eq!(
        size as u64, big.nar_size,
        "nix-store --dump size vs NarSize"
    );
    let other = &a.path_infos(&[&fx.lib], false)[0];

    for prefix in ["", "/local"] {
        assert_head_matches_get(peerix.addr, &format!("{prefix}/nix-cache-info"));
        let narinfo_path = format!("{prefix}/{}.narinfo", big.hash_part());
        let narinfo = assert_head_matches_get(peerix.addr, &narinfo_path).text();
        let nar_path = nar_request_path(prefix, &narinfo);

        let nar = assert_head_matches_get(peerix.addr, &nar_path);
        assert_eq!(
            nar.header("content-length"),
            Some(size.to_string().as_str()),
            "GET {nar_path}: Content-Length"
        );
        assert_eq!(
            nar.header("accept-ranges"),
            Some("bytes"),
            "GET {nar_path}: Accept-Ranges"
        );
        assert_same_bytes(&nar_path, &nar.body, &dump);

        // Satisfiable single ranges: 206 with exactly those bytes.
        let ranges = [
            (0, Some(0)),
            (1_000_000, Some(1_999_999)),
            (size - 100, None),
            (12_345, None),
        ];
        for (start, end) in ranges {
            let spec = match end {
                Some(end) => format!("bytes={start}-{end}"),
                None => format!("bytes={start}-"),
            };
            let last = end.unwrap_or(size - 1);
            let response = http::get_with(peerix.addr, &nar_path, &[("Range", &spec)])
                .unwrap_or_else(|e| panic!("GET {nar_path} Range {spec}: {e}"));
            assert_eq!(
                response.status,
                206,
                "GET {nar_path} Range {spec}: expected 206, got {}",
                response.describe()
            );
            assert_eq!(
                response.header("content-range"),
                Some(format!("bytes {start}-{last}/{size}").as_str()),
                "GET {nar_path} Range {spec}: Content-Range"
            );
            assert_eq!(
                response.header("content-length"),
                Some((last - start + 1).to_string().as_str()),
                "GET {nar_path} Range {spec}: Content-Length"
            );
            assert!(
                response.body[..] == dump[start..=last],
                "GET {nar_path} Range {spec}: expected bytes {start}..={last} of the NAR"
            );
        }

        // Unsatisfiable ranges: 416.
        for spec in [
            format!("bytes={size}-"),
            format!("bytes={}-{}", size + 10, size + 20),
        ] {
            let response = http::get_with(peerix.addr, &nar_path, &[("Range", &spec)])
                .unwrap_or_else(|e| panic!("GET {nar_path} Range {spec}: {e}"));
            assert_eq!(
                response.status,
                416,
                "GET {nar_path} Range {spec}: expected 416, got {}",
                response.describe()
            );
        }

        // Stale or wrong NarHash in the URL: 404, for GET and HEAD.
        let hash = big.hash_part();
        let stale = [
            format!("{prefix}/nar/{hash}-{}.nar", "0".repeat(52)),
            format!(
                "{prefix}/nar/{hash}-{}.nar",
                other.nar_hash.trim_start_matches("sha256:")
            ),
        ];
        for path in &stale {
            let response = http::must_get(peerix.addr, path);
            assert_eq!(
                response.status,
                404,
                "GET {path} (stale narhash): expected 404, got {}",
                response.describe()
            );
            let head = http::head(peerix.addr, path).expect("HEAD answered");
            assert_eq!(
                head.status,
                404,
                "HEAD {path} (stale narhash): expected 404, got {}",
                head.describe()
            );
        }
        // A valid-looking hash part that is not in the store: 404.
        let missing = format!("{prefix}/{}.narinfo", "1".repeat(32));
        let response = http::must_get(peerix.addr, &missing);
        assert_eq!(
            response.status,
            404,
            "GET {missing}: expected 404, got {}",
            response.describe()
        );
    }
}

/// A client in another network namespace (not loopback) gets 403 on the
/// endpoints that act for the local nix, and 200 on /local.
#[test]
fn non_loopback_clients_get_403_on_root_endpoints_and_200_on_local() {
    let dir = TestDir::new("netns_403");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.first]);
    let peerix = Peerix::spawn(&dir, &a, "0.0.0.0", &["--no-filter"], Readiness::Scanned);
    let narinfo = narinfo_text(peerix.addr, "", &many.first);
    let nar_path = nar_request_path("", &narinfo);
    let hash = hash_part(&many.first);
    let ns = NetNs::new();
    let remote = |path: &str| format!("http://{}:{}{path}", ns.host_ip, peerix.port);

    let expectations = [
        ("/nix-cache-info".to_string(), 403),
        (format!("/{hash}.narinfo"), 403),
        // Where the original peerix fetches a peer's NAR: served to other
        // hosts under the share policy, as on /local/ (here, --no-filter).
        (nar_path.clone(), 200),
        ("/local/nix-cache-info".to_string(), 200),
        (format!("/local/{hash}.narinfo"), 200),
        (format!("/local{nar_path}"), 200),
    ];
    for (path, expected) in &expectations {
        let url = remote(path);
        let status = ns.curl_status(&url);
        assert_eq!(
            status,
            Some(*expected),
            "GET {url} from netns {} ({}): expected {expected}",
            ns.name,
            ns.ns_ip
        );
    }
    // The same endpoints still answer loopback.
    http::expect_status(peerix.addr, "/nix-cache-info", 200);
    http::expect_status(peerix.addr, &nar_path, 200);
}

/// DNS rebinding: a web page whose own name resolves to 127.0.0.1 reaches
/// peerix from loopback, but names itself in `Host`. The root endpoints
/// refuse it with 403; `/local/` (public anyway) still serves it; a client
/// that names this host, or sends no Host at all, is served.
#[test]
fn a_rebinding_host_header_gets_403_on_root_endpoints_and_local_still_serves() {
    let dir = TestDir::new("rebinding");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.first]);
    let peerix = Peerix::start(&dir, &a, &["--no-filter"]);
    let narinfo = narinfo_text(peerix.addr, "", &many.first);
    let nar_path = nar_request_path("", &narinfo);
    let hash = hash_part(&many.first);
    let port = peerix.addr.port();
    let root_paths = [
        "/nix-cache-info".to_string(),
        format!("/{hash}.narinfo"),
        nar_path.clone(),
        format!("/lan/10.0.0.1:12304{nar_path}"),
    ];
    let local_paths = [
        "/local/nix-cache-info".to_string(),
        format!("/local/{hash}.narinfo"),
        format!("/local{nar_path}"),
    ];
    let status = |path: &str, host: &str| {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        http::raw(peerix.addr, request.as_bytes(), false)
            .unwrap_or_else(|e| panic!("GET {path} with Host {host}: {e}"))
            .status
    };
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
    ] {
        for path in &root_paths {
            assert_eq!(status(path, &host), 403, "GET {path} with Host: {host}");
        }
        for path in &local_paths {
            assert_eq!(status(path, &host), 200, "GET {path} with Host: {host}");
        }
        // The peer table is this host's business.
        let health = http::raw(
            peerix.addr,
            format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
            false,
        )
        .expect("GET /health");
        assert_eq!(health.status, 200);
        assert!(!health.text().contains("\"peers\""), "{}", health.text());
    }
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_string(),
    ] {
        for path in root_paths.iter().take(3) {
            assert_eq!(status(path, &host), 200, "GET {path} with Host: {host}");
        }
    }
    let http10 = http::raw(peerix.addr, b"GET /nix-cache-info HTTP/1.0\r\n\r\n", false)
        .expect("an HTTP/1.0 request without Host");
    assert_eq!(http10.status, 200, "{}", http10.describe());
}

/// What a bad request may get back.
#[derive(Clone, Copy, Debug)]
enum Allowed {
    /// 400 or 404.
    BadOrNotFound,
    /// Exactly 404.
    NotFound,
    /// Any 4xx.
    ClientError,
    /// Any 4xx, or the connection closed without an answer.
    ClientErrorOrClose,
    /// Anything but 5xx (the request is odd but may be served).
    Not5xx,
}

/// Malformed hashes, traversal, huge headers and unknown methods get 4xx
/// (or a closed connection where allowed), never 5xx; peerix keeps serving
/// and never panics.
#[test]
fn bad_requests_get_4xx_and_never_break_the_daemon() {
    let dir = TestDir::new("bad_input");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.first]);
    let mut peerix = Peerix::start(&dir, &a, &["--no-filter"]);
    let hash = hash_part(&many.first).to_string();
    let nar_path = nar_request_path("", &narinfo_text(peerix.addr, "", &many.first));

    let get = |path: &str| http::request_bytes("GET", path, &[]);
    let mut cases: Vec<(String, Vec<u8>, Allowed)> = Vec::new();
    let mut add = |what: &str, bytes: Vec<u8>, allowed: Allowed| {
        cases.push((what.to_string(), bytes, allowed))
    };
    for prefix in ["", "/local"] {
        let e_hash = format!("e{}", &hash[1..]);
        let u_hash = format!("{}u", &hash[..31]);
        let upper = hash.to_ascii_uppercase();
        for (what, bad) in [
            ("short hash", "abc".to_string()),
            ("33-char hash", format!("{hash}0")),
            ("31-char hash", hash[..31].to_string()),
            ("hash with 'e'", e_hash),
            ("hash with 'u'", u_hash),
            ("upper-case hash", upper),
            ("empty hash", String::new()),
        ] {
            add(
                &format!("{prefix} narinfo: {what}"),
                get(&format!("{prefix}/{bad}.narinfo")),
                Allowed::BadOrNotFound,
            );
        }
        add(
            "nar: encoded traversal",
            get(&format!("{prefix}/nar/..%2f..%2fetc%2fpasswd")),
            Allowed::BadOrNotFound,
        );
        add(
            "nar: plain traversal",
            get(&format!("{prefix}/nar/../../../etc/passwd")),
            Allowed::BadOrNotFound,
        );
        add(
            "nar: no narhash",
            get(&format!("{prefix}/nar/{hash}.nar")),
            Allowed::BadOrNotFound,
        );
        add(
            "nar: narhash with 'e'",
            get(&format!("{prefix}/nar/{hash}-{}.nar", "e".repeat(52))),
            Allowed::BadOrNotFound,
        );
        add(
            "nar: short name",
            get(&format!("{prefix}/nar/x.nar")),
            Allowed::BadOrNotFound,
        );
        add(
            "nar: wrong extension",
            get(&format!("{prefix}{}", nar_path.replace(".nar", ".nar.xz"))),
            Allowed::BadOrNotFound,
        );
        add(
            "narinfo: NUL",
            get(&format!("{prefix}/{hash}.narinfo%00")),
            Allowed::BadOrNotFound,
        );
        add(
            "narinfo: trailing traversal",
            get(&format!("{prefix}/{hash}.narinfo/../x")),
            Allowed::BadOrNotFound,
        );
        add(
            "unknown route",
            get(&format!("{prefix}/no-such-thing")),
            Allowed::NotFound,
        );
    }
    add(
        "/local/.. to a root endpoint",
        get("/local/../nix-cache-info"),
        Allowed::BadOrNotFound,
    );
    add(
        "encoded dots",
        get("/%2e%2e/%2e%2e/etc/passwd"),
        Allowed::BadOrNotFound,
    );
    add(
        "encoded slash in narinfo",
        get(&format!("/local%2f{hash}.narinfo")),
        Allowed::BadOrNotFound,
    );
    add(
        "unknown method BREW",
        http::request_bytes("BREW", "/nix-cache-info", &[]),
        Allowed::ClientError,
    );
    add(
        "DELETE",
        http::request_bytes("DELETE", &format!("/{hash}.narinfo"), &[]),
        Allowed::ClientError,
    );
    add(
        "PUT with a body",
        b"PUT /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
        Allowed::ClientError,
    );
    let huge_value = "a".repeat(64 * 1024);
    add(
        "64 KiB header line",
        http::request_bytes("GET", "/nix-cache-info", &[("X-Huge", &huge_value)]),
        Allowed::ClientErrorOrClose,
    );
    add(
        "64 KiB URL",
        get(&format!("/{}", "a".repeat(64 * 1024))),
        Allowed::ClientErrorOrClose,
    );
    add(
        "garbage request line",
        b"\x00\x01\x02 garbage \xff\r\n\r\n".to_vec(),
        Allowed::ClientErrorOrClose,
    );
    add(
        "no HTTP version",
        b"GET /nix-cache-info\r\n\r\n".to_vec(),
        Allowed::Not5xx,
    );
    add(
        "malformed Range",
        http::request_bytes("GET", &nar_path, &[("Range", "bytes=abc")]),
        Allowed::Not5xx,
    );
    add(
        "multiple ranges",
        http::request_bytes("GET", &nar_path, &[("Range", "bytes=0-1,5-6")]),
        Allowed::Not5xx,
    );
    add(
        "inverted Range",
        http::request_bytes("GET", &nar_path, &[("Range", "bytes=9-2")]),
        Allowed::Not5xx,
    );

    for (what, bytes, allowed) in &cases {
        let result = http::raw(peerix.addr, bytes, false);
        if let Ok(response) = &result {
            assert!(
                !response.text().contains("root:x:0:0"),
                "{what}: the answer leaks /etc/passwd: {}",
                response.describe()
            );
        }
        let ok = match (&result, allowed) {
            (Ok(r), Allowed::BadOrNotFound) => r.status == 400 || r.status == 404,
            (Ok(r), Allowed::NotFound) => r.status == 404,
            (Ok(r), Allowed::ClientError | Allowed::ClientErrorOrClose) => {
                (400..500).contains(&r.status)
            }
            (Ok(r), Allowed::Not5xx) => r.status < 500,
            (Err(_), Allowed::ClientErrorOrClose | Allowed::Not5xx) => true,
            (Err(_), _) => false,
        };
        let got = match &result {
            Ok(r) => r.describe(),
            Err(e) => format!("no response ({e})"),
        };
        assert!(ok, "{what}: expected {allowed:?}, got {got}");
        peerix.assert_alive_without_panic();
    }

    let health = http::expect_status(peerix.addr, "/health", 200);
    assert!(
        health.text().contains("status"),
        "expected /health JSON after bad input, got {}",
        health.describe()
    );
    http::expect_status(peerix.addr, &format!("/{hash}.narinfo"), 200);
    peerix.assert_alive_without_panic();
}

/// Under systemd: `READY=1` reaches the `NOTIFY_SOCKET` once the first scan
/// is done. On SIGTERM during a 200 MiB NAR download, the download
/// completes (every byte, the length the headers promised), new requests
/// get 503, and peerix exits 0 on its own.
#[test]
fn sigterm_lets_a_running_download_finish_and_exits_0() {
    let dir = TestDir::new("sigterm");
    let mut a = Host::new(&dir, "a");
    let big = add_big_file(&dir, &a, 200 << 20);
    a.start_daemon();
    let notify_path = dir.join("notify.sock");
    let notify =
        std::os::unix::net::UnixDatagram::bind(&notify_path).expect("binding NOTIFY_SOCKET");
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut peerix = Peerix::spawn_with_env(
        &dir,
        &a,
        &["--no-filter", "--shutdown-timeout", "60"],
        &[("NOTIFY_SOCKET", notify_path.as_os_str())],
        Readiness::Listening,
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("a notification from peerix");
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("READY=1\nSTATUS="), "{text:?}");
    let health = peerix.health().expect("/health");
    assert!(
        health["scans"].as_u64().unwrap_or(0) >= 1,
        "ready before the first scan: {health}"
    );

    let narinfo = narinfo_text(peerix.addr, "", &big);
    let nar_path = nar_request_path("", &narinfo);
    let mut stream = TcpStream::connect(peerix.addr).expect("connecting to peerix");
    stream
        .write_all(format!("GET {nar_path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Read the head and a first part, then stop reading for a while: the
    // transfer is under way when SIGTERM comes.
    let mut got = vec![0u8; 1 << 20];
    stream.read_exact(&mut got).expect("the first MiB");
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .trim()
        .parse()
        .unwrap();
    peerix.send_signal("TERM");
    let n = notify.recv(&mut buf).expect("STOPPING from peerix");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("STOPPING=1"));
    // New requests are refused while the download finishes.
    let late = http::get(peerix.addr, "/nix-cache-info");
    assert!(
        late.as_ref().map_or(true, |r| r.status == 503),
        "expected 503 or a refused connection after SIGTERM, got {:?}",
        late.map(|r| r.describe())
    );
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("the rest of the NAR");
    let body = got.len() - head_end + rest.len();
    assert_eq!(body, length, "every byte promised arrived");
    assert!(
        length > 200 << 20,
        "a NAR of the 200 MiB file: {length} bytes"
    );
    let status = poll_until("peerix to exit after SIGTERM", || {
        peerix.try_wait().ok_or_else(|| "still running".to_string())
    });
    assert!(status.success(), "peerix exited with {status}");
}

/// Once the first scan has listed every valid path, a narinfo miss is
/// answered from the index, without a nix-daemon round trip: with the
/// daemon stopped, a miss is still a plain 404 ("not found", not "local
/// store unavailable"), and `/health` still finds the daemon reachable,
/// since nothing asked it.
#[test]
fn misses_after_a_scan_are_answered_without_the_daemon() {
    let dir = TestDir::new("miss_no_daemon");
    let many = many_fixture();
    let mut a = Host::with_paths(&dir, "a", &[&many.first]);
    let peerix = Peerix::start(&dir, &a, &["--no-filter"]);
    let missing = "00000000000000000000000000000000";
    http::expect_status(peerix.addr, &format!("/{missing}.narinfo"), 404);
    a.stop_daemon();
    // The daemon's workers outlive it, peerix's pooled connections with
    // them: end those too, so that asking the daemon would fail.
    let killed = std::process::Command::new("pkill")
        // A worker names itself `nix-daemon <client pid> <store>`.
        .args([
            "-KILL",
            "-f",
            &format!("^nix-daemon [0-9]+ +{}$", a.root.display()),
        ])
        .status()
        .expect("running pkill");
    assert!(
        killed.success(),
        "expected a nix-daemon worker of A to kill"
    );
    for path in [
        format!("/{missing}.narinfo"),
        format!("/local/{missing}.narinfo"),
    ] {
        let response = http::must_get(peerix.addr, &path);
        assert_eq!(response.status, 404, "GET {path}: {}", response.describe());
        assert_eq!(
            response.text(),
            "not found\n",
            "GET {path} with the daemon stopped: expected a miss from the index"
        );
    }
    let health = peerix.health().expect("/health");
    assert_eq!(health["daemon"], "connected", "{health}");
}

/// peerix must not need the nix-daemon at start: with the default hourly scan
/// interval, it is the scanner's own background retry that finds the daemon.
#[test]
fn starts_without_a_nix_daemon_and_picks_it_up_later() {
    let dir = TestDir::new("no_daemon");
    let many = many_fixture();
    let mut a = Host::new(&dir, "a");
    a.add_closure(&[&many.first]);
    assert!(!a.socket.exists(), "the daemon socket must not exist yet");
    let mut peerix = Peerix::spawn(
        &dir,
        &a,
        "127.0.0.1",
        &["--no-filter"],
        Readiness::Listening,
    );
    let health = peerix.wait_health("/health to report the daemon unreachable", |h| {
        h["daemon"] == "unreachable"
    });
    assert_eq!(
        health["indexed_paths"].as_u64(),
        Some(0),
        "expected nothing indexed without a daemon: {health}"
    );
    let hash = hash_part(&many.first);
    for path in [format!("/{hash}.narinfo"), format!("/local/{hash}.narinfo")] {
        let response = http::must_get(peerix.addr, &path);
        assert_eq!(
            response.status,
            404,
            "GET {path} without a daemon: expected 404, got {}",
            response.describe()
        );
    }
    let info = http::must_get(peerix.addr, "/nix-cache-info");
    assert!(
        info.status < 500,
        "GET /nix-cache-info without a daemon: expected no 5xx, got {}",
        info.describe()
    );
    peerix.assert_alive_without_panic();

    a.start_daemon();
    let health = peerix.wait_health(
        "peerix to connect to the new nix-daemon and index its paths",
        |h| {
            h["daemon"] == "connected"
                && h["scans"].as_u64().unwrap_or(0) >= 1
                && h["indexed_paths"].as_u64().unwrap_or(0) > 0
        },
    );
    assert!(health["indexed_paths"].as_u64() >= Some(1), "{health}");
    let path = format!("/{hash}.narinfo");
    poll_until(
        &format!("GET {path} to answer 200 once the daemon is up"),
        || {
            let response = http::get(peerix.addr, &path).map_err(|e| e.to_string())?;
            if response.status == 200 {
                Ok(())
            } else {
                Err(response.describe())
            }
        },
    );
    peerix.assert_alive_without_panic();
}

/// SIGHUP rescans at once: paths added after the first scan join the index
/// without waiting for the (hourly) scan interval.
#[test]
fn sighup_rescans_the_store() {
    let dir = TestDir::new("sighup");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.first]);
    let mut peerix = Peerix::start(&dir, &a, &["--no-filter"]);
    let before = peerix.wait_health("the first scan", |h| h["scans"].as_u64() >= Some(1));
    assert_eq!(before["indexed_paths"].as_u64(), Some(1), "{before}");

    // The closure of `third` adds `second` and `third`.
    a.add_closure(&[&many.third]);
    peerix.send_sighup();
    let after = peerix.wait_health("a rescan that finds the two new paths", |h| {
        h["indexed_paths"].as_u64() == Some(3)
    });
    assert!(after["scans"].as_u64() >= Some(2), "{after}");
    peerix.assert_alive_without_panic();
}

/// A file that shrinks while its NAR is being sent: the client was promised
/// NarSize bytes, so peerix must close the connection early (the client sees
/// a short read and fails at once) rather than leave it hanging, and later
/// requests for that NAR must get 404.
#[test]
fn a_nar_whose_files_change_mid_transfer_aborts_the_connection() {
    use std::io::{Read, Write};

    let dir = TestDir::new("abort");
    let fixture = realistic_fixture();
    let a = Host::with_paths(&dir, "a", &[&fixture.big]);
    let peerix = Peerix::start(&dir, &a, &["--no-filter"]);
    let narinfo = narinfo_text(peerix.addr, "", &fixture.big);
    let nar_path = nar_request_path("", &narinfo);
    let nar_size: u64 = NarInfoText::read(&narinfo)
        .field("NarSize")
        .parse()
        .unwrap();

    let mut client = std::net::TcpStream::connect(peerix.addr).unwrap();
    // Keep-alive, as nix asks: the connection stays open unless peerix closes it.
    let request = format!("GET {nar_path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    client.write_all(request.as_bytes()).unwrap();
    // A bound on how long any read may block, so a hanging server fails the
    // test instead of stalling it; it is not a measurement.
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut first = [0u8; 4096];
    let n = client.read(&mut first).unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "expected a 200 for the NAR, got {:?}",
        String::from_utf8_lossy(&first[..n.min(200)])
    );

    // Socket buffers hold a few MiB at most, so the server is still far from
    // the end of the 50 MiB file: shrink the file under it.
    let blob = a.physical(&fixture.big).join("blob.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&blob)
        .and_then(|f| f.set_len(1000))
        .expect("truncating the big file in store a");

    let mut received = n as u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) => panic!(
                "expected the connection to be closed early, but reading failed after {received} bytes: {e}\n{}",
                peerix.stderr()
            ),
        }
    }
    assert!(
        received < nar_size,
        "expected fewer than NarSize = {nar_size} bytes before the close, got {received}"
    );
    assert!(
        peerix.stderr().contains("aborting the connection"),
        "expected peerix to log the abort:\n{}",
        peerix.stderr()
    );
    http::expect_status(peerix.addr, &nar_path, 404);
}

/// Nix opens many keep-alive connections at once and keeps them open. Every
/// one of them must be answered while the others stay open: a connection
/// queued behind another one's thread would wait until that one closes.
#[test]
fn a_burst_of_keep_alive_connections_is_answered_in_full() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    let dir = TestDir::new("burst");
    let a = Host::new(&dir, "a");
    let peerix = Peerix::spawn(&dir, &a, "127.0.0.1", &[], Readiness::Listening);
    const ROUNDS: usize = 20;
    const CONNECTIONS: usize = 16;
    for round in 0..ROUNDS {
        let mut streams: Vec<TcpStream> = (0..CONNECTIONS)
            .map(|_| TcpStream::connect(peerix.addr).expect("connecting to peerix"))
            .collect();
        for stream in &mut streams {
            stream
                .write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .expect("sending a request");
        }
        for (n, stream) in streams.iter_mut().enumerate() {
            // Generous: an answered request takes well under a millisecond.
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let mut head = [0u8; 12];
            let answered = stream.read_exact(&mut head);
            assert!(
                answered.is_ok() && &head == b"HTTP/1.1 200",
                "round {round}: connection {n} of {CONNECTIONS}, all kept open, got no 200 \
                 ({answered:?}, {:?})",
                String::from_utf8_lossy(&head)
            );
        }
    }
}

/// Adds a file of `size` bytes of pseudo-random data (so that nothing on
/// the way could shorten it) to `host`'s store, before its daemon starts;
/// returns the store path.
fn add_big_file(dir: &TestDir, host: &Host, size: usize) -> String {
    let file = dir.join("big.bin");
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ u64::from(unique_number());
    let mut block = vec![0u8; 1 << 20];
    for chunk in block.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    let mut out = std::fs::File::create(&file).expect("creating the big file");
    for i in 0..size / block.len() {
        block[0..8].copy_from_slice(&(i as u64).to_le_bytes());
        out.write_all(&block).expect("writing the big file");
    }
    drop(out);
    host.add_file(&file)
}
