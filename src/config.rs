//! Configuration: command-line flags, then a TOML file, then defaults.
//!
//! Flags win over the file, and the file wins over the defaults. Every key the
//! file may hold is listed in [`FileConfig`]; an unknown key or a value of the
//! wrong kind is an error that names the key. Keys of the original peerix that
//! belong to features this version does not have yet are refused with a
//! message that says so, rather than accepted and silently ignored.

use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use crate::lan::{DEFAULT_LAN_TIMEOUT, DEFAULT_PORT, LanConfig, PeerSpec};
pub use crate::store::policy::FilterMode;

/// The public key of cache.nixos.org: paths it signed are public by construction.
pub const DEFAULT_TRUSTED_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
/// HTTP worker threads of the peer lane. A LAN lookup holds its worker
/// while replies come in, and nix asks up to 25 narinfos at once, so a
/// handful of workers would queue its misses; an idle worker costs about
/// 10 KB.
pub const DEFAULT_WORKERS: usize = 16;
pub const DEFAULT_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/peerix";
/// Connect and read timeout towards peers, also the limit on a whole
/// narinfo request and on each NAR chunk: a dead peer costs about this.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// NARs up to this size are fetched and verified whole before nix sees a
/// byte, so a bad peer is replaced without nix noticing. Most paths are small.
pub const DEFAULT_VERIFY_BEFORE_SEND: u64 = 4 * 1024 * 1024;

/// The daemon's settings after flags, file and defaults are merged.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind: IpAddr,
    pub port: u16,
    pub workers: usize,
    pub priority: u32,
    pub daemon_socket: PathBuf,
    pub store_root: PathBuf,
    pub state_dir: PathBuf,
    pub private_key_file: Option<PathBuf>,
    pub trusted_keys: Vec<String>,
    pub filter_mode: FilterMode,
    pub filter_patterns: Vec<String>,
    pub scan_interval: Option<Duration>,
    pub verbose: bool,
    pub lan: LanConfig,
    /// Connect and read timeout for HTTP requests to peers.
    pub peer_timeout: Duration,
    pub verify_before_send: u64,
}

/// What `peerix` was asked to do.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Help,
    Version,
}

/// A configuration error: the message names the flag or key at fault.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(message: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(message.into()))
}

pub const HELP: &str = "\
peerix: a peer-to-peer binary cache for Nix.

Serves this host's Nix store as a binary cache on http://BIND:PORT for the
local nix (root endpoints, loopback only) and under /local/ for the network
(only the paths the share policy allows).

Usage: peerix [OPTIONS]

Options:
  --bind ADDR            address to listen on [default: 0.0.0.0]
  --port N               HTTP port [default: 12304]
  --workers N            HTTP threads for work that waits on peers; half as
                         many (at least 2) serve this host's own requests and
                         half as many other hosts' [default: 16]
  --priority N           Priority in /nix-cache-info, lower is preferred [default: 5]
  --daemon-socket PATH   nix-daemon socket [default: $NIX_DAEMON_SOCKET_PATH,
                         else /nix/var/nix/daemon-socket/socket]
  --store-root DIR       physical root that holds nix/store; a chroot store
                         /tmp/h1 keeps its files in /tmp/h1/nix/store [default: /]
  --state-dir DIR        where state will be kept (node key, statistics);
                         nothing is written there yet [default: /var/lib/peerix]
  --private-key FILE     Nix secret key (nix-store --generate-binary-cache-key)
                         that signs this host's own narinfos
                         [default: $NIX_SECRET_KEY_FILE, else none]
  --trusted-key NAME:KEY public key whose signature makes a path shareable in
                         the `signed` filter mode; repeatable
                         [default: cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=]
  --filter-mode MODE     signed: share paths a trusted key signed;
                         rules: share all but names on the deny-list;
                         none: share everything [default: signed]
  --filter-pattern GLOB  extra deny pattern for `rules` mode; repeatable
  --no-filter            share everything (same as --filter-mode none)
  --scan-interval SECS   rescan the store every SECS seconds, 0 = never;
                         SIGHUP rescans at once [default: 3600]
  --config FILE          TOML config file [default: ~/.config/peerix/config.toml
                         if it exists]
  --verbose              debug logging (RUST_LOG overrides)
  -h, --help             print this help
  -V, --version          print the version

LAN mode (on unless --no-lan; peers are asked by UDP on the HTTP port number):
  --lan-discovery        ask peers on the LAN for paths this host lacks
                         [default: on, as no tracker is configured]
  --no-lan               no LAN discovery: neither ask nor answer peers
  --lan-timeout MS       how long a query collects replies [default: 250]
  --extra-peer HOST[:PORT]  also ask this peer by unicast (VPN, Tailscale);
                         repeatable [default port: 12304]
  --no-broadcast         do not broadcast; ask only the extra peers
  --timeout SECS         connect and read timeout towards peers, also the
                         limit on a narinfo request and on each NAR chunk
                         [default: 5]
  --verify-before-send BYTES  NARs from peers up to this size are verified
                         whole before nix gets a byte; larger ones stream
                         and are cut off if they turn out wrong [default: 4194304]

Config file keys (flags win over the file):
  [server]   bind, port, workers, priority, state_dir, verbose, timeout,
             verify_before_send
  [lan]      discovery, timeout_ms, broadcast, extra_peers
  [store]    daemon_socket, store_root, scan_interval, filter_mode,
             filter_patterns, no_filter, trusted_keys
  [signing]  private_key
";

/// Flags as given; `None` means not given.
#[derive(Default, Debug)]
struct Flags {
    bind: Option<IpAddr>,
    port: Option<u16>,
    workers: Option<usize>,
    priority: Option<u32>,
    daemon_socket: Option<PathBuf>,
    store_root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    private_key_file: Option<PathBuf>,
    trusted_keys: Vec<String>,
    filter_mode: Option<FilterMode>,
    filter_patterns: Vec<String>,
    no_filter: bool,
    scan_interval: Option<u64>,
    config: Option<PathBuf>,
    verbose: bool,
    lan: Option<bool>,
    lan_timeout_ms: Option<u64>,
    extra_peers: Vec<PeerSpec>,
    no_broadcast: bool,
    timeout_secs: Option<f64>,
    verify_before_send: Option<u64>,
}

/// The TOML file. `deny_unknown_fields` makes a typo an error naming the key.
#[derive(Default, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    store: StoreSection,
    #[serde(default)]
    signing: SigningSection,
    #[serde(default)]
    lan: LanSection,
    tracker: Option<toml::Table>,
    security: Option<toml::Table>,
}

#[derive(Default, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    bind: Option<IpAddr>,
    port: Option<u16>,
    workers: Option<usize>,
    priority: Option<u32>,
    state_dir: Option<PathBuf>,
    verbose: Option<bool>,
    timeout: Option<f64>,
    verify_before_send: Option<u64>,
}

#[derive(Default, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct LanSection {
    discovery: Option<bool>,
    timeout_ms: Option<u64>,
    broadcast: Option<bool>,
    extra_peers: Option<Vec<String>>,
}

#[derive(Default, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    daemon_socket: Option<PathBuf>,
    store_root: Option<PathBuf>,
    scan_interval: Option<u64>,
    filter_mode: Option<String>,
    filter_patterns: Option<Vec<String>>,
    no_filter: Option<bool>,
    trusted_keys: Option<Vec<String>>,
    filter_concurrency: Option<toml::Value>,
    no_verify: Option<toml::Value>,
    upstream_cache: Option<toml::Value>,
}

#[derive(Default, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct SigningSection {
    private_key: Option<PathBuf>,
}

impl FileConfig {
    fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        FileConfig::parse(&text, path)
    }

    /// `path` only names the file in errors.
    fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        let file: FileConfig = toml::from_str(text)
            .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
        file.refuse_unbuilt_features(path)?;
        Ok(file)
    }

    /// Keys of the original peerix whose features do not exist here yet.
    fn refuse_unbuilt_features(&self, path: &Path) -> Result<(), ConfigError> {
        let unbuilt = [
            ("tracker", self.tracker.is_some()),
            ("security", self.security.is_some()),
            (
                "store.filter_concurrency",
                self.store.filter_concurrency.is_some(),
            ),
            ("store.no_verify", self.store.no_verify.is_some()),
            ("store.upstream_cache", self.store.upstream_cache.is_some()),
        ];
        match unbuilt.iter().find(|(_, present)| *present) {
            Some((key, _)) => err(format!(
                "config file {}: key `{key}` belongs to a feature this version of peerix \
                 does not have yet (the tracker, the upstream filter); remove it",
                path.display()
            )),
            None => Ok(()),
        }
    }
}

/// Parses the command line (without the program name) and the config file it
/// names. `env` looks up environment variables, so tests need not touch the
/// process environment.
pub fn parse_args<I>(
    args: I,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Command, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let flags = match parse_flags(args)? {
        Parsed::Flags(flags) => flags,
        Parsed::Help => return Ok(Command::Help),
        Parsed::Version => return Ok(Command::Version),
    };
    let file = match &flags.config {
        Some(path) => FileConfig::load(path)?,
        None => {
            match env("HOME").map(|home| PathBuf::from(home).join(".config/peerix/config.toml")) {
                Some(path) if path.is_file() => FileConfig::load(&path)?,
                _ => FileConfig::default(),
            }
        }
    };
    merge(flags, file, env).map(|config| Command::Run(Box::new(config)))
}

/// [`parse_args`] with the config file's text given, as if the file `name`
/// held it: no file is opened, and `--config` and `$HOME` are not looked at.
/// The fuzz target for the configuration (tests/fuzz) goes through this.
pub fn parse_args_with_file_text<I>(
    args: I,
    name: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Command, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let flags = match parse_flags(args)? {
        Parsed::Flags(flags) => flags,
        Parsed::Help => return Ok(Command::Help),
        Parsed::Version => return Ok(Command::Version),
    };
    let file = FileConfig::parse(text, name)?;
    merge(flags, file, env).map(|config| Command::Run(Box::new(config)))
}

enum Parsed {
    Flags(Box<Flags>),
    Help,
    Version,
}

fn parse_flags<I>(args: I) -> Result<Parsed, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let mut flags = Flags::default();
    let mut parser = lexopt::Parser::from_args(args);
    let wrap = |e: lexopt::Error| ConfigError(e.to_string());
    while let Some(arg) = parser.next().map_err(wrap)? {
        let flag = match &arg {
            Long(name) => format!("--{name}"),
            Short(c) => format!("-{c}"),
            Value(v) => return err(format!("unexpected argument {v:?}; see --help")),
        };
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Short('V') | Long("version") => return Ok(Parsed::Version),
            Long("bind") => flags.bind = Some(parse_value(&flag, parser.value())?),
            Long("port") => flags.port = Some(parse_value(&flag, parser.value())?),
            Long("workers") => flags.workers = Some(parse_value(&flag, parser.value())?),
            Long("priority") => flags.priority = Some(parse_value(&flag, parser.value())?),
            Long("daemon-socket") => flags.daemon_socket = Some(path_value(parser.value())?),
            Long("store-root") => flags.store_root = Some(path_value(parser.value())?),
            Long("state-dir") => flags.state_dir = Some(path_value(parser.value())?),
            Long("private-key") => flags.private_key_file = Some(path_value(parser.value())?),
            Long("trusted-key") => flags.trusted_keys.push(parse_value(&flag, parser.value())?),
            Long("filter-mode") => {
                let mode: String = parse_value(&flag, parser.value())?;
                flags.filter_mode = Some(
                    mode.parse::<FilterMode>()
                        .map_err(|e| ConfigError(format!("{flag}: {e}")))?,
                );
            }
            Long("filter-pattern") => flags
                .filter_patterns
                .push(parse_value(&flag, parser.value())?),
            Long("no-filter") => flags.no_filter = true,
            Long("scan-interval") => {
                flags.scan_interval = Some(parse_value(&flag, parser.value())?)
            }
            Long("config") => flags.config = Some(path_value(parser.value())?),
            Long("verbose") | Short('v') => flags.verbose = true,
            Long("lan-discovery") => flags.lan = Some(true),
            Long("no-lan") => flags.lan = Some(false),
            Long("lan-timeout") => flags.lan_timeout_ms = Some(parse_value(&flag, parser.value())?),
            Long("extra-peer") => {
                let text: String = parse_value(&flag, parser.value())?;
                flags
                    .extra_peers
                    .push(PeerSpec::parse(&text).map_err(|e| ConfigError(format!("{flag}: {e}")))?);
            }
            Long("no-broadcast") => flags.no_broadcast = true,
            Long("timeout") => flags.timeout_secs = Some(parse_value(&flag, parser.value())?),
            Long("verify-before-send") => {
                flags.verify_before_send = Some(parse_value(&flag, parser.value())?)
            }
            _ => return err(format!("unknown option {flag}; see --help")),
        }
    }
    Ok(Parsed::Flags(Box::new(flags)))
}

fn path_value(value: Result<OsString, lexopt::Error>) -> Result<PathBuf, ConfigError> {
    value
        .map(PathBuf::from)
        .map_err(|e| ConfigError(e.to_string()))
}

fn parse_value<T>(flag: &str, value: Result<OsString, lexopt::Error>) -> Result<T, ConfigError>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    let value = value.map_err(|e| ConfigError(e.to_string()))?;
    let text = value
        .to_str()
        .ok_or_else(|| ConfigError(format!("{flag}: value is not UTF-8")))?;
    text.parse()
        .map_err(|e| ConfigError(format!("{flag}: invalid value `{text}`: {e}")))
}

fn merge(
    flags: Box<Flags>,
    file: FileConfig,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Config, ConfigError> {
    let file_filter_mode = match &file.store.filter_mode {
        Some(mode) => Some(
            mode.parse::<FilterMode>()
                .map_err(|e| ConfigError(format!("store.filter_mode: {e}")))?,
        ),
        None => None,
    };
    let filter_mode = if flags.no_filter {
        FilterMode::None
    } else if let Some(mode) = flags.filter_mode {
        mode
    } else if file.store.no_filter == Some(true) {
        FilterMode::None
    } else {
        file_filter_mode.unwrap_or(FilterMode::Signed)
    };

    let workers = flags
        .workers
        .or(file.server.workers)
        .unwrap_or(DEFAULT_WORKERS);
    if !(1..=256).contains(&workers) {
        return err(format!("workers: {workers} is out of range (1 to 256)"));
    }
    let port = flags.port.or(file.server.port).unwrap_or(DEFAULT_PORT);
    let trusted_keys = if !flags.trusted_keys.is_empty() {
        flags.trusted_keys
    } else {
        file.store
            .trusted_keys
            .unwrap_or_else(|| vec![DEFAULT_TRUSTED_KEY.to_string()])
    };
    let mut filter_patterns = file.store.filter_patterns.unwrap_or_default();
    filter_patterns.extend(flags.filter_patterns);
    let scan_secs = flags
        .scan_interval
        .or(file.store.scan_interval)
        .unwrap_or(3600);
    let env_path = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);

    let lan_timeout_ms = flags
        .lan_timeout_ms
        .or(file.lan.timeout_ms)
        .unwrap_or(DEFAULT_LAN_TIMEOUT.as_millis() as u64);
    if !(1..=10_000).contains(&lan_timeout_ms) {
        return err(format!(
            "lan timeout: {lan_timeout_ms} ms is out of range (1 to 10000)"
        ));
    }
    let mut extra_peers = file
        .lan
        .extra_peers
        .unwrap_or_default()
        .iter()
        .map(|text| PeerSpec::parse(text).map_err(|e| ConfigError(format!("lan.extra_peers: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    extra_peers.extend(flags.extra_peers);
    let lan = LanConfig {
        enabled: flags.lan.or(file.lan.discovery).unwrap_or(true),
        timeout: Duration::from_millis(lan_timeout_ms),
        broadcast: !flags.no_broadcast && file.lan.broadcast.unwrap_or(true),
        extra_peers,
    };
    let timeout_secs = flags
        .timeout_secs
        .or(file.server.timeout)
        .unwrap_or(DEFAULT_PEER_TIMEOUT.as_secs_f64());
    if !(0.05..=600.0).contains(&timeout_secs) {
        return err(format!(
            "timeout: {timeout_secs} seconds is out of range (0.05 to 600)"
        ));
    }
    let verify_before_send = flags
        .verify_before_send
        .or(file.server.verify_before_send)
        .unwrap_or(DEFAULT_VERIFY_BEFORE_SEND);
    if verify_before_send > 256 * 1024 * 1024 {
        return err(format!(
            "verify_before_send: {verify_before_send} bytes is more than 256 MiB, \
             which would hold that much memory per download"
        ));
    }

    Ok(Config {
        bind: flags
            .bind
            .or(file.server.bind)
            .unwrap_or(IpAddr::from([0, 0, 0, 0])),
        port,
        workers,
        priority: flags.priority.or(file.server.priority).unwrap_or(5),
        daemon_socket: flags
            .daemon_socket
            .or(file.store.daemon_socket)
            .or_else(|| env_path("NIX_DAEMON_SOCKET_PATH"))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DAEMON_SOCKET)),
        store_root: flags
            .store_root
            .or(file.store.store_root)
            .unwrap_or_else(|| PathBuf::from("/")),
        state_dir: flags
            .state_dir
            .or(file.server.state_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        private_key_file: flags
            .private_key_file
            .or(file.signing.private_key)
            .or_else(|| env_path("NIX_SECRET_KEY_FILE")),
        trusted_keys,
        filter_mode,
        filter_patterns,
        scan_interval: (scan_secs > 0).then(|| Duration::from_secs(scan_secs)),
        verbose: flags.verbose || file.server.verbose.unwrap_or(false),
        lan,
        peer_timeout: Duration::from_secs_f64(timeout_secs),
        verify_before_send,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    fn run(args: &[&str]) -> Result<Config, ConfigError> {
        match parse_args(args.iter().copied(), &no_env)? {
            Command::Run(config) => Ok(*config),
            other => panic!("expected a config, got {other:?}"),
        }
    }

    fn write_config(text: &str) -> (PathBuf, impl Drop) {
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "peerix-config-test-{}-{}.toml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).unwrap();
        (path.clone(), Remove(path))
    }

    #[test]
    fn defaults() {
        let config = run(&[]).unwrap();
        assert_eq!(config.port, 12304);
        assert_eq!(config.bind, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(config.priority, 5);
        assert_eq!(config.filter_mode, FilterMode::Signed);
        assert_eq!(config.trusted_keys, vec![DEFAULT_TRUSTED_KEY.to_string()]);
        assert_eq!(config.daemon_socket, PathBuf::from(DEFAULT_DAEMON_SOCKET));
        assert_eq!(config.store_root, PathBuf::from("/"));
        assert_eq!(config.scan_interval, Some(Duration::from_secs(3600)));
        assert_eq!(config.private_key_file, None);
        assert!(config.lan.enabled, "LAN mode is on without a tracker");
        assert!(config.lan.broadcast);
        assert_eq!(config.lan.timeout, DEFAULT_LAN_TIMEOUT);
        assert_eq!(config.peer_timeout, DEFAULT_PEER_TIMEOUT);
        assert_eq!(config.verify_before_send, DEFAULT_VERIFY_BEFORE_SEND);
    }

    #[test]
    fn lan_settings_from_flags_and_file() {
        let (path, _guard) = write_config(
            "[server]\ntimeout = 2.5\n[lan]\ntimeout_ms = 400\nbroadcast = false\nextra_peers = [\"pi.lan\"]\n",
        );
        let config = run(&[
            "--config",
            path.to_str().unwrap(),
            "--extra-peer",
            "10.0.0.7:4000",
            "--lan-timeout",
            "100",
        ])
        .unwrap();
        assert_eq!(config.lan.timeout, Duration::from_millis(100), "flag wins");
        assert!(!config.lan.broadcast);
        assert_eq!(config.peer_timeout, Duration::from_millis(2500));
        let peers: Vec<String> = config
            .lan
            .extra_peers
            .iter()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(peers, ["pi.lan:12304", "10.0.0.7:4000"]);
        let (path, _guard) = write_config("[server]\ntimeout = 10\n[lan]\ndiscovery = false\n");
        let config = run(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            config.peer_timeout,
            Duration::from_secs(10),
            "an integer is taken"
        );
        assert!(!config.lan.enabled);
        assert!(!run(&["--no-lan"]).unwrap().lan.enabled);
        assert!(!run(&["--no-broadcast"]).unwrap().lan.broadcast);
        for bad in [
            "", ":80", "host:0", "host:x", "a b", "[::1", "[::1]x", "h/p",
        ] {
            let e = run(&["--extra-peer", bad]).unwrap_err();
            assert!(e.0.contains("--extra-peer"), "{bad:?}: {e}");
        }
        assert!(
            run(&["--lan-timeout", "0"])
                .unwrap_err()
                .0
                .contains("lan timeout")
        );
        assert!(run(&["--timeout", "-1"]).unwrap_err().0.contains("timeout"));
        assert!(
            run(&["--timeout", "NaN"])
                .unwrap_err()
                .0
                .contains("timeout")
        );
    }

    #[test]
    fn environment_supplies_socket_and_key() {
        let env = |name: &str| match name {
            "NIX_DAEMON_SOCKET_PATH" => Some(OsString::from("/tmp/d.sock")),
            "NIX_SECRET_KEY_FILE" => Some(OsString::from("/tmp/sk")),
            _ => None,
        };
        let Command::Run(config) = parse_args(Vec::<String>::new(), &env).unwrap() else {
            panic!("expected a config");
        };
        assert_eq!(config.daemon_socket, PathBuf::from("/tmp/d.sock"));
        assert_eq!(config.private_key_file, Some(PathBuf::from("/tmp/sk")));
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let (path, _guard) = write_config(
            "[server]\nport = 2000\npriority = 40\n[store]\nscan_interval = 0\nfilter_mode = \"rules\"\nfilter_patterns = [\"*-mine-*\"]\n",
        );
        let config = run(&[
            "--config",
            path.to_str().unwrap(),
            "--port",
            "3000",
            "--filter-pattern",
            "*-other-*",
        ])
        .unwrap();
        assert_eq!(config.port, 3000, "flag wins");
        assert_eq!(config.priority, 40, "file wins over default");
        assert_eq!(config.scan_interval, None, "0 means never");
        assert_eq!(config.filter_mode, FilterMode::Rules);
        assert_eq!(config.filter_patterns, vec!["*-mine-*", "*-other-*"]);
    }

    #[test]
    fn no_filter_beats_filter_mode() {
        assert_eq!(
            run(&["--filter-mode", "rules", "--no-filter"])
                .unwrap()
                .filter_mode,
            FilterMode::None
        );
    }

    #[test]
    fn unknown_flag_and_bad_values_name_the_flag() {
        assert!(
            run(&["--frobnicate"])
                .unwrap_err()
                .0
                .contains("--frobnicate")
        );
        assert!(run(&["--port", "70000"]).unwrap_err().0.contains("--port"));
        assert!(run(&["--port"]).unwrap_err().0.contains("port"));
        assert!(
            run(&["--bind", "nowhere"])
                .unwrap_err()
                .0
                .contains("--bind")
        );
        assert!(
            run(&["--filter-mode", "maybe"])
                .unwrap_err()
                .0
                .contains("maybe")
        );
        assert!(run(&["--workers", "0"]).unwrap_err().0.contains("workers"));
        assert!(run(&["stray"]).unwrap_err().0.contains("stray"));
    }

    #[test]
    fn unknown_keys_and_bad_values_in_the_file_name_the_key() {
        let (path, _g1) = write_config("[server]\nprot = 1\n");
        let e = run(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.0.contains("prot"), "{e}");

        let (path, _g2) = write_config("[server]\nport = \"many\"\n");
        let e = run(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.0.contains("port"), "{e}");

        let (path, _g3) = write_config("[store]\nfilter_mode = \"strict\"\n");
        let e = run(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(
            e.0.contains("store.filter_mode") && e.0.contains("strict"),
            "{e}"
        );

        let (path, _g4) = write_config("[tracker]\nurl = \"http://t:12305\"\n");
        let e = run(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.0.contains("tracker"), "{e}");

        let (path, _g5) = write_config("[bogus]\n");
        let e = run(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.0.contains("bogus"), "{e}");

        let e = run(&["--config", "/nonexistent/peerix.toml"]).unwrap_err();
        assert!(e.0.contains("/nonexistent/peerix.toml"), "{e}");
    }

    #[test]
    fn help_lists_every_flag() {
        assert!(matches!(parse_args(["--help"], &no_env), Ok(Command::Help)));
        for flag in [
            "--bind",
            "--port",
            "--workers",
            "--priority",
            "--daemon-socket",
            "--store-root",
            "--state-dir",
            "--private-key",
            "--trusted-key",
            "--filter-mode",
            "--filter-pattern",
            "--no-filter",
            "--scan-interval",
            "--lan-discovery",
            "--no-lan",
            "--lan-timeout",
            "--extra-peer",
            "--no-broadcast",
            "--timeout",
            "--verify-before-send",
            "--config",
            "--verbose",
        ] {
            assert!(HELP.contains(flag), "--help lacks {flag}");
        }
    }
}
