//! The configuration loader: the TOML file parser and the command-line
//! parser (`config::parse_args_with_file_text`, which is `parse_args` with
//! the file's text given instead of read).
//!
//! Input: the TOML text, then for each argument a NUL byte and the
//! argument's bytes (which need not be UTF-8). Without a NUL, no arguments.
//!
//! Checks: no panic; an accepted configuration is within the documented
//! bounds; it survives two round trips unchanged: rendered as flags and
//! parsed with an empty file, and rendered as a TOML file and parsed with
//! no flags; the environment is never consulted for what was given; every
//! refusal says why.
#![no_main]

use std::ffi::{OsStr, OsString};
use std::fmt::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use peerix::config::{Command, Config, FilterMode, PeerSpec, parse_args_with_file_text};

fn no_env(_: &str) -> Option<OsString> {
    None
}

fn parse(args: Vec<OsString>, toml: &str) -> Result<Command, peerix::config::ConfigError> {
    parse_args_with_file_text(args, Path::new("fuzz.toml"), toml, &no_env)
}

fn mode_name(mode: FilterMode) -> &'static str {
    match mode {
        FilterMode::Signed => "signed",
        FilterMode::Rules => "rules",
        FilterMode::None => "none",
        FilterMode::Nixpkgs => "nixpkgs",
    }
}

fn check_bounds(c: &Config) {
    assert!((1..=256).contains(&c.workers), "workers {}", c.workers);
    let lan_ms = c.lan.timeout.as_millis();
    assert!((1..=10_000).contains(&lan_ms), "lan timeout {lan_ms} ms");
    let secs = c.peer_timeout.as_secs_f64();
    assert!((0.049..=600.0).contains(&secs), "peer timeout {secs} s");
    assert!(c.verify_before_send <= 256 * 1024 * 1024);
    assert!((1..=64).contains(&c.filter_concurrency));
    assert_ne!(c.scan_interval, Some(Duration::ZERO), "0 means never");
    for peer in &c.lan.extra_peers {
        assert!(!peer.host.is_empty());
        assert_ne!(peer.port, 0);
        let again = PeerSpec::parse(&peer.to_string())
            .unwrap_or_else(|e| panic!("peer {peer} does not parse back: {e}"));
        assert_eq!(&again, peer);
    }
}

/// Field by field; the peer timeout and the state interval went through
/// an f64 of seconds.
fn assert_same(a: &Config, b: &Config, how: &str) {
    let strip = |c: &Config| {
        let mut c = c.clone();
        c.peer_timeout = Duration::ZERO;
        c.state_interval = Duration::ZERO;
        format!("{c:?}")
    };
    assert_eq!(strip(a), strip(b), "{how} changed the configuration");
    for (what, x, y) in [
        ("timeout", a.peer_timeout, b.peer_timeout),
        ("state interval", a.state_interval, b.state_interval),
    ] {
        assert!(
            x.abs_diff(y) <= Duration::from_micros(1),
            "{how} changed the {what}: {a:?} / {b:?}"
        );
    }
}

fn as_flags(c: &Config) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut flag = |name: &str, value: &OsStr| {
        args.push(name.into());
        args.push(value.to_os_string());
    };
    flag("--bind", OsStr::new(&c.bind.to_string()));
    flag("--port", OsStr::new(&c.port.to_string()));
    flag("--workers", OsStr::new(&c.workers.to_string()));
    flag("--priority", OsStr::new(&c.priority.to_string()));
    flag("--daemon-socket", c.daemon_socket.as_os_str());
    flag("--store-root", c.store_root.as_os_str());
    flag("--state-dir", c.state_dir.as_os_str());
    flag(
        "--state-interval",
        OsStr::new(&c.state_interval.as_secs_f64().to_string()),
    );
    flag(
        "--shutdown-timeout",
        OsStr::new(&c.shutdown_timeout.as_secs().to_string()),
    );
    if let Some(url) = &c.tracker {
        flag("--tracker", OsStr::new(url));
    }
    if let Some(key) = &c.private_key_file {
        flag("--private-key", key.as_os_str());
    }
    for key in &c.trusted_keys {
        flag("--trusted-key", OsStr::new(key));
    }
    flag("--filter-mode", OsStr::new(mode_name(c.filter_mode)));
    for pattern in &c.filter_patterns {
        flag("--filter-pattern", OsStr::new(pattern));
    }
    flag("--upstream-cache", OsStr::new(&c.upstream_cache));
    flag(
        "--filter-concurrency",
        OsStr::new(&c.filter_concurrency.to_string()),
    );
    if let Some(name) = &c.peer_id {
        flag("--peer-id", OsStr::new(name));
    }
    let scan = c.scan_interval.map_or(0, |d| d.as_secs());
    flag("--scan-interval", OsStr::new(&scan.to_string()));
    flag(
        "--lan-timeout",
        OsStr::new(&c.lan.timeout.as_millis().to_string()),
    );
    for peer in &c.lan.extra_peers {
        flag("--extra-peer", OsStr::new(&peer.to_string()));
    }
    flag(
        "--timeout",
        OsStr::new(&c.peer_timeout.as_secs_f64().to_string()),
    );
    flag(
        "--verify-before-send",
        OsStr::new(&c.verify_before_send.to_string()),
    );
    if c.verbose {
        args.push("--verbose".into());
    }
    if c.metrics_public {
        args.push("--metrics-public".into());
    }
    if c.dashboard_public {
        args.push("--dashboard-public".into());
    }
    if c.no_verify {
        args.push("--no-verify".into());
    }
    if c.allow_insecure_http {
        args.push("--allow-insecure-http".into());
    }
    match c.lan_discovery {
        Some(true) => args.push("--lan-discovery".into()),
        Some(false) => args.push("--no-lan".into()),
        None => {}
    }
    if !c.lan.broadcast {
        args.push("--no-broadcast".into());
    }
    args
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: impl Iterator<Item = String>) -> String {
    format!(
        "[{}]",
        items.map(|s| quote(&s)).collect::<Vec<_>>().join(", ")
    )
}

/// The file holding every setting, or `None` where TOML cannot say it.
fn as_toml(c: &Config) -> Option<String> {
    let path = |p: &Path| p.to_str().map(quote);
    let scan = c.scan_interval.map_or(0, |d| d.as_secs());
    if i64::try_from(scan).is_err() {
        return None;
    }
    let mut t = String::new();
    let _ = writeln!(t, "[server]");
    let _ = writeln!(t, "bind = {}", quote(&c.bind.to_string()));
    let _ = writeln!(t, "port = {}", c.port);
    let _ = writeln!(t, "workers = {}", c.workers);
    let _ = writeln!(t, "priority = {}", c.priority);
    let _ = writeln!(t, "state_dir = {}", path(&c.state_dir)?);
    let _ = writeln!(t, "verbose = {}", c.verbose);
    let _ = writeln!(t, "timeout = {:?}", c.peer_timeout.as_secs_f64());
    let _ = writeln!(t, "verify_before_send = {}", c.verify_before_send);
    let _ = writeln!(t, "state_interval = {:?}", c.state_interval.as_secs_f64());
    let _ = writeln!(t, "shutdown_timeout = {}", c.shutdown_timeout.as_secs());
    let _ = writeln!(t, "metrics_public = {}", c.metrics_public);
    let _ = writeln!(t, "dashboard_public = {}", c.dashboard_public);
    let _ = writeln!(t, "[lan]");
    if let Some(discovery) = c.lan_discovery {
        let _ = writeln!(t, "discovery = {discovery}");
    }
    let _ = writeln!(t, "timeout_ms = {}", c.lan.timeout.as_millis());
    let _ = writeln!(t, "broadcast = {}", c.lan.broadcast);
    let _ = writeln!(
        t,
        "extra_peers = {}",
        list(c.lan.extra_peers.iter().map(|p| p.to_string()))
    );
    let _ = writeln!(t, "[store]");
    let _ = writeln!(t, "daemon_socket = {}", path(&c.daemon_socket)?);
    let _ = writeln!(t, "store_root = {}", path(&c.store_root)?);
    let _ = writeln!(t, "scan_interval = {scan}");
    let _ = writeln!(t, "filter_mode = {}", quote(mode_name(c.filter_mode)));
    let _ = writeln!(
        t,
        "filter_patterns = {}",
        list(c.filter_patterns.iter().cloned())
    );
    let _ = writeln!(t, "trusted_keys = {}", list(c.trusted_keys.iter().cloned()));
    let _ = writeln!(t, "upstream_cache = {}", quote(&c.upstream_cache));
    let _ = writeln!(t, "no_verify = {}", c.no_verify);
    let _ = writeln!(t, "filter_concurrency = {}", c.filter_concurrency);
    let _ = writeln!(t, "[security]");
    let _ = writeln!(t, "allow_insecure_http = {}", c.allow_insecure_http);
    let _ = writeln!(t, "[tracker]");
    if let Some(name) = &c.peer_id {
        let _ = writeln!(t, "peer_id = {}", quote(name));
    }
    if let Some(url) = &c.tracker {
        let _ = writeln!(t, "url = {}", quote(url));
    }
    if let Some(key) = &c.private_key_file {
        let _ = writeln!(t, "[signing]");
        let _ = writeln!(t, "private_key = {}", path(key)?);
    }
    Some(t)
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0);
    let Ok(toml) = std::str::from_utf8(parts.next().unwrap_or_default()) else {
        return;
    };
    let args: Vec<OsString> = parts.map(|a| OsStr::from_bytes(a).to_os_string()).collect();

    let config = match parse(args.clone(), toml) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help | Command::Version) => return,
        Err(e) => {
            assert!(!e.0.trim().is_empty(), "an error without a reason");
            return;
        }
    };
    check_bounds(&config);

    // Through flags alone: the trusted keys default when none are given, so
    // an empty list (which only a file can say) cannot go this way.
    if !config.trusted_keys.is_empty() {
        match parse(as_flags(&config), "") {
            Ok(Command::Run(again)) => assert_same(&config, &again, "flags"),
            other => panic!("{config:?} as flags gives {other:?}"),
        }
    }
    // Through the file alone.
    if let Some(text) = as_toml(&config) {
        match parse(Vec::new(), &text) {
            Ok(Command::Run(again)) => assert_same(&config, &again, "the TOML file"),
            other => panic!("{config:?} as a file:\n{text}\ngives {other:?}"),
        }
    }
});
