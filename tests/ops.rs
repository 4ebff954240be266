//! Operations: `/metrics` that Prometheus's own `promtool` accepts, with
//! counters that move with a real `nix copy`; `/health` with the
//! original's checks, 503 once the nix-daemon is gone; the dashboard as a
//! real headless Chromium renders it, showing a real peer and a path served
//! through it; and which of these pages other hosts may read.
//!
//! Chromium runs inside a LAN host's network namespace, where the only
//! routes are the test's own bridge and loopback, and with its background
//! networking off: it reaches the peerix under test and nothing else.
//!
//! Needs `promtool` (Debian: prometheus) and `chromium` (tests/run.sh
//! installs both).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::http::{self, Response};
use common::lan::*;
use common::*;

/// The samples of a Prometheus text page: `name{labels}` to value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (key, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("a sample without a value: {line:?}"));
            let value = value
                .parse()
                .unwrap_or_else(|e| panic!("sample {line:?}: {e}"));
            (key.to_string(), value)
        })
        .collect()
}

/// `promtool check metrics` must accept `text`: exit 0, no lint findings.
fn promtool_accepts(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool (install Debian's prometheus package)");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("writing /metrics to promtool");
    let out = child.wait_with_output().expect("waiting for promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics refused /metrics ({}):\n{}{}\n--- /metrics ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GET /metrics on this host's peerix: 200, the exposition format's
/// content type, and promtool accepts it.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let response = http::expect_status(addr, "/metrics", 200);
    let content_type = response.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "/metrics: expected the Prometheus text content type, got {content_type:?}"
    );
    let text = response.text();
    promtool_accepts(&text);
    samples(&text)
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key} in /metrics: {samples:?}"))
}

/// Every histogram's `+Inf` bucket equals its `_count`.
fn assert_histograms_consistent(samples: &BTreeMap<String, f64>) {
    let mut routes = 0;
    for (key, &v) in samples {
        let Some(labels) = key.strip_prefix("peerix_request_duration_seconds_bucket{") else {
            continue;
        };
        let Some(route) = labels.strip_suffix(",le=\"+Inf\"}") else {
            continue;
        };
        let count = value(
            samples,
            &format!("peerix_request_duration_seconds_count{{{route}}}"),
        );
        assert_eq!(v, count, "{key}: the +Inf bucket is not the count");
        routes += 1;
    }
    assert!(routes >= 10, "a histogram for each route kind: {routes}");
}

/// `nix copy` through peerix moves the counters by what it fetched: the
/// NARs and narinfos of the closure, their bytes, cache hits, and the
/// narinfo and NAR routes' latency histograms; a miss is counted as one.
/// promtool accepts /metrics before and after.
#[test]
fn metrics_pass_promtool_and_count_a_real_nix_copy() {
    let dir = TestDir::new("ops_metrics");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.third]);
    let key = a.nix.generate_key(&dir.path, "peerix-a-1");
    let secret = key.secret_file.display().to_string();
    let peerix = Peerix::start(&dir, &a, &["--private-key", &secret, "--no-filter"]);
    let closure = a.path_infos(&[&many.third], true);
    assert_eq!(closure.len(), 3, "the fixture's closure: {closure:?}");
    let closure_bytes: u64 = closure.iter().map(|p| p.nar_size).sum();

    let before = scrape(peerix.addr);
    assert_eq!(value(&before, "peerix_up"), 1.0);
    let health = peerix.health().expect("/health");
    assert_eq!(
        value(&before, "peerix_available_hashes"),
        health["shared_paths"].as_f64().unwrap(),
        "available hashes are the shared paths"
    );
    assert_eq!(
        value(&before, "peerix_indexed_paths"),
        health["indexed_paths"].as_f64().unwrap()
    );

    let b = Host::new(&dir, "b");
    let copy = b
        .nix
        .copy_from(&peerix.url(), &b.store(), &[&key.public], &[&many.third]);
    assert_success("nix copy --from peerix", &copy);
    for info in &closure {
        assert!(b.is_valid(&info.path), "{} not copied", info.path);
    }
    http::expect_status(
        peerix.addr,
        "/00000000000000000000000000000000.narinfo",
        404,
    );

    let after = scrape(peerix.addr);
    assert_histograms_consistent(&after);
    let delta = |key: &str| value(&after, key) - value(&before, key);
    let n = closure.len() as f64;
    let moved = [
        ("peerix_nars_served_total", n),
        ("peerix_narinfos_served_total", n),
        ("peerix_cache_hits_total", n),
        ("peerix_cache_misses_total", 1.0),
        ("peerix_bytes_sent_total", closure_bytes as f64),
        (
            "peerix_transfer_bytes_total{direction=\"sent\",source=\"local\"}",
            closure_bytes as f64,
        ),
        ("peerix_requests_total", 2.0 * n + 1.0),
        (
            "peerix_request_duration_seconds_count{route=\"narinfo\"}",
            n + 1.0,
        ),
        ("peerix_request_duration_seconds_count{route=\"nar\"}", n),
        ("peerix_http_responses_total{code=\"2xx\"}", 2.0 * n),
        ("peerix_http_responses_total{code=\"4xx\"}", 1.0),
    ];
    for (key, at_least) in moved {
        assert!(
            delta(key) >= at_least,
            "{key}: expected it to grow by at least {at_least}, it grew by {}",
            delta(key)
        );
    }
    assert_eq!(
        delta("peerix_bytes_sent_total"),
        delta("peerix_transfer_bytes_total{direction=\"sent\",source=\"local\"}"),
        "every byte went to this host's nix"
    );
    for key in [
        "peerix_errors_total",
        "peerix_bytes_received_total",
        "peerix_http_responses_total{code=\"5xx\"}",
    ] {
        assert_eq!(delta(key), 0.0, "{key} moved");
    }

    // A loopback request that names another host (a rebinding web page).
    let rebound = http::raw(
        peerix.addr,
        b"GET /metrics HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        false,
    )
    .expect("GET /metrics");
    assert_eq!(rebound.status, 403, "{}", rebound.describe());
}

/// `/health` has the original's shape and checks; when the nix-daemon is
/// gone it says degraded with 503, and healthy again once it is back.
#[test]
fn health_is_503_with_a_failed_check_while_the_daemon_is_gone() {
    let dir = TestDir::new("ops_health");
    let many = many_fixture();
    let mut a = Host::with_paths(&dir, "a", &[&many.first]);
    let mut peerix = Peerix::start(&dir, &a, &["--no-filter"]);
    let response = http::expect_status(peerix.addr, "/health", 200);
    let health: serde_json::Value = serde_json::from_slice(&response.body).expect("JSON");
    assert_eq!(health["status"], "healthy", "{health}");
    assert!(health["uptime_seconds"].is_u64(), "{health}");
    assert_eq!(
        health["checks"]["daemon_socket"]["status"], "ok",
        "{health}"
    );
    assert_eq!(health["checks"]["index"]["status"], "ok", "{health}");
    assert!(
        health["checks"].get("lan").is_none(),
        "no LAN check with --no-lan: {health}"
    );
    assert!(health["indexed_paths"].as_u64() >= Some(1), "{health}");

    a.stop_daemon();
    let health = peerix.wait_health("/health to report the daemon gone", |h| {
        h["status"] == "degraded"
    });
    assert_eq!(
        health["checks"]["daemon_socket"]["status"], "fail",
        "{health}"
    );
    assert_eq!(
        health["checks"]["index"]["status"], "ok",
        "the index is still fresh: {health}"
    );
    let response = http::must_get(peerix.addr, "/health");
    assert_eq!(response.status, 503, "{}", response.describe());
    assert_eq!(value(&scrape(peerix.addr), "peerix_daemon_up"), 0.0);

    a.start_daemon();
    peerix.wait_health("/health to be healthy again", |h| h["status"] == "healthy");
    http::expect_status(peerix.addr, "/health", 200);
    assert_eq!(value(&scrape(peerix.addr), "peerix_daemon_up"), 1.0);
    peerix.assert_alive_without_panic();
}

/// What headless Chromium makes of a page.
enum Render<'a> {
    /// The DOM after the page's scripts ran.
    Dom,
    /// A 1280x900 screenshot into this file.
    Screenshot(&'a Path),
}

/// Chromium, headless, in network namespace `ns`, on `url`, with 5 s of
/// virtual time for the page's scripts; bounded to two minutes.
fn chromium(dir: &TestDir, ns: &str, url: &str, render: Render<'_>) -> String {
    let profile = dir.subdir(&format!("chromium-{}", unique_number()));
    let mut cmd = netns_command(Some(ns), "chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .env("HOME", &profile)
    .env("XDG_CONFIG_HOME", profile.join("config"))
    .env("XDG_CACHE_HOME", profile.join("cache"))
    .stdin(Stdio::null());
    match render {
        Render::Dom => cmd.arg("--dump-dom"),
        Render::Screenshot(file) => cmd
            .arg("--window-size=1280,900")
            .arg(format!("--screenshot={}", file.display())),
    };
    cmd.arg(url);
    let out = run_within(cmd, Duration::from_secs(120), "chromium --headless");
    assert_success(&format!("chromium on {url}"), &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The part of `dom` from the element with `id` to the end of its table.
fn table<'d>(dom: &'d str, id: &str) -> &'d str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element {id} in the dashboard:\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest.find("</table>").unwrap_or(rest.len())]
}

/// B fetches a path from A through its peerix; B's dashboard, rendered by
/// a real Chromium in B's namespace, shows A among the peers and the path
/// among the most served. A's dashboard JSON shows it served to B. The
/// screenshot is kept as a test artifact: `target/tmp/dashboard.png`.
#[test]
fn the_dashboard_in_chromium_shows_the_peer_and_the_served_path() {
    let (dir, lan, key) = world("ops_dashboard", 2);
    let many = many_fixture();
    let a = signed_host(&dir, &lan, 0, "a", &key, &[&many.second], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &key, &[], &[]);
    substitute_ok(
        &b,
        &key,
        &many.second,
        "B substitutes A's path via its peerix",
    );
    wait_peer(&b, &a.peer_addr(), "A in B's peer table", |p| {
        p["successes"].as_u64() >= Some(1)
    });
    let served = base_name(&many.second);

    let json: serde_json::Value =
        serde_json::from_slice(&b.must_get("/dashboard.json").body).expect("dashboard.json");
    let names = |list: &serde_json::Value| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{}-{}",
                    e["hash"].as_str().unwrap_or(""),
                    e["name"].as_str().unwrap_or("")
                )
            })
            .collect()
    };
    assert!(
        names(&json["top_served"]).contains(&served.to_string()),
        "B's top served: {}",
        json["top_served"]
    );
    assert!(
        json["totals"]["bytes_received"].as_u64() > Some(0),
        "{json}"
    );
    let a_json: serde_json::Value =
        serde_json::from_slice(&a.must_get("/dashboard.json").body).expect("A's dashboard.json");
    assert!(
        names(&a_json["top_served"]).contains(&served.to_string()),
        "A's top served: {}",
        a_json["top_served"]
    );
    let b_ip = b.ip.to_string();
    assert!(
        a_json["activity"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["text"]
                .as_str()
                .is_some_and(|t| t.contains(served) && t.contains(&b_ip))),
        "A's activity log names the path served to B: {}",
        a_json["activity"]
    );

    let url = format!("http://127.0.0.1:{LAN_PORT}/dashboard");
    let dom = chromium(&dir, &b.ns, &url, Render::Dom);
    let peers = table(&dom, "peers");
    assert!(
        peers.contains(&a.peer_addr()),
        "the rendered peer table lacks A ({}):\n{peers}",
        a.peer_addr()
    );
    assert!(
        peers.contains(">ok<"),
        "A is shown in good standing:\n{peers}"
    );
    let most_served = table(&dom, "served");
    assert!(
        most_served.contains(served),
        "the rendered 'most served' lacks {served}:\n{most_served}"
    );
    assert!(
        table(&dom, "requested").contains(served),
        "the rendered 'most requested' lacks {served}"
    );
    assert!(
        dom.contains("class=\"pill healthy\""),
        "B is healthy:\n{dom}"
    );

    let shot = dir.join("dashboard-b.png");
    chromium(&dir, &b.ns, &url, Render::Screenshot(&shot));
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "expected a PNG screenshot, got {} bytes",
        png.len()
    );
    // The test dir goes with the test; the artifact stays in cargo's
    // directory for test files (target/tmp), where CI can pick it up.
    let artifact = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artifact, &png).expect("saving the screenshot artifact");
    eprintln!("dashboard screenshot: {}", artifact.display());
}

/// A request from inside `ns`.
fn request_from(ns: &str, addr: SocketAddr, request: Vec<u8>) -> Response {
    in_netns(ns, move || http::raw(addr, &request, false))
        .unwrap_or_else(|e| panic!("request to {addr} from {ns}: {e}"))
}

fn get_from(ns: &str, addr: SocketAddr, path: &str) -> Response {
    request_from(ns, addr, http::request_bytes("GET", path, &[]))
}

fn post_from(ns: &str, addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Response {
    request_from(ns, addr, http::request_bytes("POST", path, extra))
}

/// `/metrics`, `/dashboard` and its JSON answer this host only (403 from
/// another namespace) unless `--dashboard-public` opens the dashboard; the
/// control endpoints answer this host only whatever the flags, POST only,
/// and not to a page of another origin. A rescan on the control endpoint
/// really rescans.
#[test]
fn stats_pages_answer_this_host_unless_a_flag_opens_them() {
    let (dir, lan, key) = world("ops_access", 2);
    let mut a = signed_host(&dir, &lan, 0, "a", &key, &[], &[]);
    let b = signed_host(&dir, &lan, 1, "b", &key, &[], &["--dashboard-public"]);
    let a_addr = SocketAddr::from((lan_ip(0), LAN_PORT));
    let b_addr = SocketAddr::from((lan_ip(1), LAN_PORT));

    for path in ["/metrics", "/dashboard", "/dashboard.json"] {
        let response = get_from(&b.ns, a_addr, path);
        assert_eq!(
            response.status,
            403,
            "B -> A {path}: {}",
            response.describe()
        );
    }
    let health = get_from(&b.ns, a_addr, "/health");
    let health: serde_json::Value = serde_json::from_slice(&health.body).expect("JSON");
    assert!(health["status"].is_string(), "{health}");
    assert!(
        health.get("peers").is_none(),
        "another host sees no peer table: {health}"
    );
    let response = post_from(&b.ns, a_addr, "/control/rescan", &[]);
    assert_eq!(response.status, 403, "{}", response.describe());

    // B opened its dashboard, not its metrics nor its controls.
    for path in ["/dashboard", "/dashboard.json"] {
        let response = get_from(&a.ns, b_addr, path);
        assert_eq!(
            response.status,
            200,
            "A -> B {path}: {}",
            response.describe()
        );
    }
    let response = get_from(&a.ns, b_addr, "/metrics");
    assert_eq!(response.status, 403, "{}", response.describe());
    let response = post_from(&a.ns, b_addr, "/control/rescan", &[]);
    assert_eq!(response.status, 403, "{}", response.describe());

    // On A itself.
    let local = SocketAddr::from(([127, 0, 0, 1], LAN_PORT));
    let page = get_from(&a.ns, local, "/dashboard");
    assert_eq!(page.status, 200, "{}", page.describe());
    let policy = page.header("content-security-policy").unwrap_or("");
    assert!(
        policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"),
        "{policy:?}"
    );
    let lan_check =
        &serde_json::from_slice::<serde_json::Value>(&get_from(&a.ns, local, "/health").body)
            .expect("JSON")["checks"]["lan"];
    assert_eq!(lan_check["status"], "ok", "{lan_check}");
    let response = get_from(&a.ns, local, "/control/rescan");
    assert_eq!(response.status, 405, "{}", response.describe());
    assert_eq!(response.header("allow"), Some("POST"));
    let response = post_from(&a.ns, local, "/metrics", &[]);
    assert_eq!(response.status, 405, "{}", response.describe());
    let response = post_from(
        &a.ns,
        local,
        "/control/rescan",
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(response.status, 403, "{}", response.describe());
    let response = post_from(&b.ns, a_addr, "/control/pause", &[]);
    assert_eq!(response.status, 403, "{}", response.describe());

    let scans = a.health()["scans"].as_u64().unwrap_or(0);
    let response = post_from(
        &a.ns,
        local,
        "/control/rescan",
        &[("Origin", &format!("http://127.0.0.1:{LAN_PORT}"))],
    );
    assert_eq!(response.status, 202, "{}", response.describe());
    a.peerix_mut().wait_health("the requested rescan", |h| {
        h["scans"].as_u64() > Some(scans)
    });
    let metrics = get_from(&a.ns, local, "/metrics");
    assert!(
        metrics
            .text()
            .contains("peerix_rescans_requested_total 1\n"),
        "{}",
        metrics.text()
    );
    a.peerix_mut().assert_alive_without_panic();
}

fn post(addr: SocketAddr, path: &str) -> Response {
    http::raw(addr, &http::request_bytes("POST", path, &[]), false)
        .unwrap_or_else(|e| panic!("POST {path} on {addr}: {e}"))
}

/// `POST /control/pause` holds every scan, a rescan request included: a path
/// added meanwhile stays out of the index (the dashboard and `/health` say
/// so, and that the rescan waits). `POST /control/resume` runs the scan
/// that waited, and the path is served.
#[test]
fn a_paused_scanner_scans_again_on_resume() {
    let dir = TestDir::new("ops_pause");
    let many = many_fixture();
    let a = Host::with_paths(&dir, "a", &[&many.first]);
    let mut peerix = Peerix::start(&dir, &a, &["--no-filter"]);
    let before = peerix.wait_health("the first scan", |h| h["scans"].as_u64() >= Some(1));
    assert_eq!(before["paused"], false, "{before}");
    let dashboard: serde_json::Value =
        serde_json::from_slice(&http::expect_status(peerix.addr, "/dashboard.json", 200).body)
            .expect("JSON");
    assert_eq!(dashboard["store"]["can_pause"], true, "{dashboard}");
    assert_eq!(dashboard["store"]["paused"], false, "{dashboard}");

    let response = post(peerix.addr, "/control/pause");
    assert_eq!(response.status, 200, "{}", response.describe());
    let health = peerix.health().expect("/health");
    assert_eq!(health["paused"], true, "{health}");
    let scans = health["scans"].as_u64().expect("scans");

    // `second` is new; `first` was there.
    a.add_closure(&[&many.second]);
    let narinfo = format!("/local/{}.narinfo", hash_part(&many.second));
    let response = post(peerix.addr, "/control/rescan");
    assert_eq!(response.status, 202, "{}", response.describe());
    assert!(
        response.text().contains("deferred"),
        "{}",
        response.describe()
    );
    // The scanner got the request and holds it.
    let held = peerix.wait_health("the rescan to wait for the resume", |h| {
        h["scan_pending"] == true
    });
    assert_eq!(held["paused"], true, "{held}");
    assert_eq!(held["scans"].as_u64(), Some(scans), "no scan ran: {held}");
    assert_eq!(held["indexed_paths"].as_u64(), Some(1), "{held}");
    let response = http::must_get(peerix.addr, &narinfo);
    assert_eq!(response.status, 404, "{}", response.describe());
    let dashboard: serde_json::Value =
        serde_json::from_slice(&http::expect_status(peerix.addr, "/dashboard.json", 200).body)
            .expect("JSON");
    assert_eq!(dashboard["store"]["paused"], true, "{dashboard}");
    assert_eq!(dashboard["store"]["scan_pending"], true, "{dashboard}");
    let metrics = http::expect_status(peerix.addr, "/metrics", 200).text();
    assert!(
        metrics.lines().any(|l| l == "peerix_scanner_paused 1"),
        "{metrics}"
    );

    let response = post(peerix.addr, "/control/resume");
    assert_eq!(response.status, 200, "{}", response.describe());
    let after = peerix.wait_health("the scan that waited", |h| {
        h["scans"].as_u64() > Some(scans)
    });
    assert_eq!(after["paused"], false, "{after}");
    assert_eq!(after["indexed_paths"].as_u64(), Some(2), "{after}");
    http::expect_status(peerix.addr, &narinfo, 200);

    // Resuming again, with nothing held, runs no scan.
    let response = post(peerix.addr, "/control/resume");
    assert_eq!(response.status, 200, "{}", response.describe());
    assert!(
        response.text().contains("was not paused"),
        "{}",
        response.describe()
    );
    peerix.assert_alive_without_panic();
}
