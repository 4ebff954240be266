//! Configuration: command-line flags, then a TOML file, then the
//! environment, then defaults.
//!
//! Every option is one entry of the table in `config/options.rs`: its flags
//! (with aliases such as `--no-lan` for `--lan-discovery`), each with its
//! help line, its `[section] key` in the config file, its environment
//! fallback, the default `--help` shows, an example value, and the one
//! setter that parses a value (a flag's text, an environment variable or a
//! TOML value) into [`Config`]. `--help` is written from the table, the
//! config file's sections and keys are the table's (an unknown one is an
//! error naming it), and the tests go through every entry.
//!
//! Flags win over the file, the file over the environment, the environment
//! over the defaults. Each source is applied in the table's order: a
//! setter overwrites what an earlier source set, except for lists, which
//! either extend the earlier ones (`--filter-pattern`, `--extra-peer`) or
//! replace them (`Input::first` tells a setter where a source starts).
//! Every value given is checked, also one a later source overrides.
//!
//! To add an option: add its field to [`Config`] (or to the domain module's
//! config type it composes) with its default in `Config::default`, then add
//! one `opt(...)` entry to a group in `config/options.rs`: the flag(s) with
//! help, `.key(section, key)` if the file may set it, `.env(VAR)` if the
//! environment may, `.default(..)` as help shows it (a test checks it is
//! the real default), `.example(..)` (a TOML value other than the default),
//! and the setter. Nothing else changes.
//!
//! Settings that depend on each other are checked after the merge
//! (`check`): an `http://` upstream cache needs `allow_insecure_http`, and
//! an `https://` one a build with the `tls` feature.

mod help;
mod options;
pub mod toml;

use std::ffi::OsString;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

pub use crate::lan::{DEFAULT_LAN_TIMEOUT, DEFAULT_PORT, LanConfig, PeerSpec};
pub use crate::store::policy::FilterMode;
pub use crate::store::upstream::{
    DEFAULT_CONCURRENCY as DEFAULT_FILTER_CONCURRENCY, DEFAULT_UPSTREAM,
};
use options::{Action, Arg, Input, Opt};

/// The public key of cache.nixos.org: paths it signed are public by construction.
pub const DEFAULT_TRUSTED_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
/// HTTP worker threads of the peer lane. A LAN lookup holds its worker
/// while replies come in, and nix asks up to 25 narinfos at once, so a
/// handful of workers would queue its misses; an idle worker costs about
/// 10 KB.
pub const DEFAULT_WORKERS: usize = 16;
pub const DEFAULT_PRIORITY: u32 = 5;
pub const DEFAULT_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/peerix";
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(3600);
/// Long enough for a transfer under way on a LAN to finish, short of
/// systemd's own 90 s stop timeout.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Connect and read timeout towards peers, also the limit on a whole
/// narinfo request and on each NAR chunk: a dead peer costs about this.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(5);
/// NARs up to this size are fetched and verified whole before nix sees a
/// byte, so a bad peer is replaced without nix noticing. Most paths are small.
pub const DEFAULT_VERIFY_BEFORE_SEND: u64 = 4 * 1024 * 1024;

/// The daemon's settings after flags, file, environment and defaults are merged.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub bind: IpAddr,
    pub port: u16,
    pub workers: usize,
    pub priority: u32,
    pub daemon_socket: PathBuf,
    pub store_root: PathBuf,
    pub state_dir: PathBuf,
    /// How often `stats.json` and the peer table are written there.
    pub state_interval: Duration,
    pub private_key_file: Option<PathBuf>,
    pub trusted_keys: Vec<String>,
    pub filter_mode: FilterMode,
    pub filter_patterns: Vec<String>,
    /// The `nixpkgs` mode's upstream cache, without a trailing `/`.
    pub upstream_cache: String,
    /// Whether upstream's NarHash need not equal ours (`nixpkgs` mode).
    pub no_verify: bool,
    /// Upstream requests in flight at most.
    pub filter_concurrency: usize,
    /// Whether an `http://` upstream cache is accepted.
    pub allow_insecure_http: bool,
    pub scan_interval: Option<Duration>,
    /// The tracker's base URL (`http://host:port`), if one is used.
    pub tracker: Option<String>,
    /// A name for this host, shown in `/health` and the dashboard; `None`:
    /// the host name.
    pub peer_id: Option<String>,
    /// `--lan-discovery` or `--no-lan`, if given: without either, the LAN is
    /// asked when no tracker is set ([`Config::lan`]`.enabled` says the
    /// outcome).
    pub lan_discovery: Option<bool>,
    /// How long SIGTERM waits for running requests before exiting.
    pub shutdown_timeout: Duration,
    /// Whether other hosts may read `/metrics`.
    pub metrics_public: bool,
    /// Whether other hosts may read `/dashboard` and its JSON.
    pub dashboard_public: bool,
    pub verbose: bool,
    pub lan: LanConfig,
    /// Connect and read timeout for HTTP requests to peers.
    pub peer_timeout: Duration,
    pub verify_before_send: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: IpAddr::from([0, 0, 0, 0]),
            port: DEFAULT_PORT,
            workers: DEFAULT_WORKERS,
            priority: DEFAULT_PRIORITY,
            daemon_socket: PathBuf::from(DEFAULT_DAEMON_SOCKET),
            store_root: PathBuf::from("/"),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            state_interval: crate::state::DEFAULT_INTERVAL,
            private_key_file: None,
            trusted_keys: vec![DEFAULT_TRUSTED_KEY.to_string()],
            filter_mode: FilterMode::Signed,
            filter_patterns: Vec::new(),
            upstream_cache: DEFAULT_UPSTREAM.to_string(),
            no_verify: false,
            filter_concurrency: DEFAULT_FILTER_CONCURRENCY,
            allow_insecure_http: false,
            scan_interval: Some(DEFAULT_SCAN_INTERVAL),
            tracker: None,
            peer_id: None,
            lan_discovery: None,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            metrics_public: false,
            dashboard_public: false,
            verbose: false,
            lan: LanConfig::default(),
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            verify_before_send: DEFAULT_VERIFY_BEFORE_SEND,
        }
    }
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

/// The text of `--help`, written from the option table.
pub static HELP: LazyLock<String> = LazyLock::new(help::render);

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
    let file = match &flags.config_file {
        Some(path) => Some(File::load(path)?),
        None => {
            match env("HOME").map(|home| PathBuf::from(home).join(".config/peerix/config.toml")) {
                Some(path) if path.is_file() => Some(File::load(&path)?),
                _ => None,
            }
        }
    };
    merge(&flags, file.as_ref(), env).map(|config| Command::Run(Box::new(config)))
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
    let file = File::parse(text, name)?;
    merge(&flags, Some(&file), env).map(|config| Command::Run(Box::new(config)))
}

/// The command line, checked but not yet applied.
struct Flags {
    /// Each option's values (index in [`options::all`]), with the flag as
    /// given, in the order given.
    given: Vec<(usize, String, OsString)>,
    config_file: Option<PathBuf>,
}

enum Parsed {
    Flags(Flags),
    Help,
    Version,
}

fn parse_flags<I>(args: I) -> Result<Parsed, ConfigError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    use lexopt::prelude::*;

    let table: Vec<&Opt> = options::all().collect();
    let mut flags = Flags {
        given: Vec::new(),
        config_file: None,
    };
    // Each value is checked as it comes, so the first bad flag is the one
    // reported; it is applied later, in the table's order.
    let mut scratch = Config::default();
    let mut parser = lexopt::Parser::from_args(args);
    let wrap = |e: lexopt::Error| ConfigError(e.to_string());
    while let Some(arg) = parser.next().map_err(wrap)? {
        let (name, found) = match &arg {
            Long(long) => (
                format!("--{long}"),
                find_flag(&table, |flag| flag.long == *long),
            ),
            Short(short) => (
                format!("-{short}"),
                find_flag(&table, |flag| flag.short == Some(*short)),
            ),
            Value(v) => return err(format!("unexpected argument {v:?}; see --help")),
        };
        let Some((index, arg)) = found else {
            return err(format!("unknown option {name}; see --help"));
        };
        let value = match arg {
            Arg::Value(_) => parser.value().map_err(wrap)?,
            Arg::Switch(implied) => OsString::from(implied),
        };
        match table[index].action {
            Action::Help => return Ok(Parsed::Help),
            Action::Version => return Ok(Parsed::Version),
            Action::ConfigFile => flags.config_file = Some(PathBuf::from(value)),
            Action::Set(set) => {
                set(&mut scratch, &Input::text(&value, true))
                    .map_err(|e| ConfigError(format!("{name}: {e}")))?;
                flags.given.push((index, name, value));
            }
        }
    }
    Ok(Parsed::Flags(flags))
}

/// The option (its index) and the kind of argument of the flag that
/// `matches`.
fn find_flag(table: &[&Opt], matches: impl Fn(&options::Flag) -> bool) -> Option<(usize, Arg)> {
    table.iter().enumerate().find_map(|(index, opt)| {
        opt.flags
            .iter()
            .find(|flag| matches(flag))
            .map(|flag| (index, flag.arg))
    })
}

/// A config file whose sections and keys are known; its values are checked
/// when applied.
struct File {
    name: PathBuf,
    table: toml::Table,
}

impl File {
    fn load(path: &Path) -> Result<File, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        File::parse(&text, path)
    }

    /// `name` only names the file in errors.
    fn parse(text: &str, name: &Path) -> Result<File, ConfigError> {
        let fail = |message: String| err(format!("config file {}: {message}", name.display()));
        let table = match toml::parse(text) {
            Ok(table) => table,
            Err(e) => return fail(e),
        };
        let sections = help::sections();
        let known = || {
            let names: Vec<String> = sections.iter().map(|s| format!("[{s}]")).collect();
            names.join(", ")
        };
        for (section, value) in &table {
            if !sections.contains(&section.as_str()) {
                return fail(match value {
                    toml::Value::Table(_) => {
                        format!("unknown section `[{section}]` (known: {})", known())
                    }
                    _ => format!(
                        "unknown key `{section}`: keys belong in a section ({})",
                        known()
                    ),
                });
            }
            let toml::Value::Table(keys) = value else {
                return fail(format!(
                    "`{section}` must be a section ([{section}]), not {}",
                    value.type_str()
                ));
            };
            let allowed: Vec<&str> = options::all()
                .filter_map(|opt| opt.key)
                .filter(|(s, _)| s == section)
                .map(|(_, key)| key)
                .collect();
            for (key, _) in keys {
                let dotted = format!("{section}.{key}");
                if !allowed.contains(&key.as_str()) {
                    return fail(format!(
                        "unknown key `{dotted}` (known in [{section}]: {})",
                        allowed.join(", ")
                    ));
                }
            }
        }
        Ok(File {
            name: name.to_path_buf(),
            table,
        })
    }

    fn get(&self, section: &str, key: &str) -> Option<&toml::Value> {
        toml::get(toml::get(&self.table, section)?.as_table()?, key)
    }
}

/// Defaults, then the environment, then the file, then the flags.
fn merge(
    flags: &Flags,
    file: Option<&File>,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    for opt in options::all() {
        let (Some(var), Action::Set(set)) = (opt.env, opt.action) else {
            continue;
        };
        if let Some(value) = env(var).filter(|v| !v.is_empty()) {
            set(&mut config, &Input::text(&value, true))
                .map_err(|e| ConfigError(format!("${var}: {e}")))?;
        }
    }
    if let Some(file) = file {
        for opt in options::all() {
            let (Some((section, key)), Action::Set(set)) = (opt.key, opt.action) else {
                continue;
            };
            if let Some(value) = file.get(section, key) {
                set(&mut config, &Input::toml(value, true)).map_err(|e| {
                    ConfigError(format!(
                        "config file {}: {section}.{key}: {e}",
                        file.name.display()
                    ))
                })?;
            }
        }
    }
    for (index, opt) in options::all().enumerate() {
        let Action::Set(set) = opt.action else {
            continue;
        };
        let values = flags.given.iter().filter(|(i, _, _)| *i == index);
        for (n, (_, name, value)) in values.enumerate() {
            set(&mut config, &Input::text(value, n == 0))
                .map_err(|e| ConfigError(format!("{name}: {e}")))?;
        }
    }
    // As the original chooses: a tracker means tracker discovery, none
    // means the LAN; --lan-discovery adds the LAN to a tracker.
    config.lan.enabled = config.lan_discovery.unwrap_or(config.tracker.is_none());
    check(&config)?;
    Ok(config)
}

/// Checks settings that depend on each other.
fn check(config: &Config) -> Result<(), ConfigError> {
    if config.filter_mode != FilterMode::Nixpkgs {
        return Ok(());
    }
    let url = &config.upstream_cache;
    if url.starts_with("http://") && !config.allow_insecure_http {
        return err(format!(
            "the upstream cache {url} is plain HTTP: anyone on the way could make \
             peerix share what upstream does not have. Use https://, or accept it with \
             --allow-insecure-http ([security] allow_insecure_http = true)"
        ));
    }
    if url.starts_with("https://") && !cfg!(feature = "tls") {
        return err(format!(
            "the upstream cache {url} needs HTTPS, and this peerix was built without \
             TLS: build it with `cargo build --release --features tls`, or use an \
             http:// upstream with --allow-insecure-http"
        ));
    }
    Ok(())
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

        let (path, _g4) = write_config("[security]\nallow_insecure = true\n");
        let e = run(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(e.0.contains("security.allow_insecure"), "{e}");

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
            "--metrics-public",
            "--dashboard-public",
            "--upstream-cache",
            "--no-verify",
            "--filter-concurrency",
            "--allow-insecure-http",
            "--peer-id",
            "--config",
            "--verbose",
        ] {
            assert!(HELP.contains(flag), "--help lacks {flag}");
        }
    }

    // The tests below go through the option table, so a new option is
    // tested by its entry alone.

    use super::options::{Opt, Shown};

    fn run_with(
        args: &[&str],
        file: &str,
        env: &dyn Fn(&str) -> Option<OsString>,
    ) -> Result<Config, ConfigError> {
        match parse_args_with_file_text(args.iter().copied(), Path::new("test.toml"), file, env)? {
            Command::Run(config) => Ok(*config),
            other => panic!("expected a config, got {other:?}"),
        }
    }

    fn run_file(args: &[&str], file: &str) -> Result<Config, ConfigError> {
        run_with(args, file, &no_env)
    }

    fn keyed() -> impl Iterator<Item = (&'static Opt, &'static str, &'static str)> {
        options::all().filter_map(|opt| opt.key.map(|(section, key)| (opt, section, key)))
    }

    fn example(opt: &Opt) -> toml::Value {
        let table = toml::parse(&format!("v = {}", opt.example))
            .unwrap_or_else(|e| panic!("example of {:?}: {e}", opt.key));
        toml::get(&table, "v").unwrap().clone()
    }

    /// The flags that say `value`: the value flag once per item, or the
    /// switch that stands for it.
    fn as_flags(opt: &Opt, value: &toml::Value) -> Vec<String> {
        let text = |v: &toml::Value| match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => panic!("no flag text for {other:?}"),
        };
        let items: Vec<String> = match value {
            toml::Value::Array(items) => items.iter().map(text).collect(),
            scalar => vec![text(scalar)],
        };
        let mut args = Vec::new();
        for item in items {
            let takes_value = opt.flags.iter().find(|f| matches!(f.arg, Arg::Value(_)));
            let switch = opt
                .flags
                .iter()
                .find(|f| matches!(f.arg, Arg::Switch(t) if t == item));
            match (takes_value, switch) {
                (Some(flag), _) => args.extend([format!("--{}", flag.long), item]),
                (None, Some(flag)) => args.push(format!("--{}", flag.long)),
                (None, None) => panic!("no flag of {:?} says {item}", opt.key),
            }
        }
        args
    }

    fn strs(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }

    #[test]
    fn every_option_is_in_the_help() {
        let help: &str = &HELP;
        let (options_part, keys_part) = help
            .split_once("Config file keys")
            .expect("a section on the file's keys");
        let mut file_keys = Vec::new();
        let mut section = "";
        for line in keys_part.lines().skip(1) {
            let mut words = line.split_whitespace();
            if line.starts_with("  [") {
                section = words.next().unwrap();
            }
            file_keys.extend(words.map(|w| format!("{section} {}", w.trim_end_matches(','))));
        }
        for opt in options::all() {
            for flag in opt.flags {
                let long = format!("--{}", flag.long);
                assert!(
                    options_part
                        .lines()
                        .any(|l| l.split_whitespace().any(|w| w == long)),
                    "--help lacks {long}"
                );
                if let Some(short) = flag.short {
                    assert!(options_part.contains(&format!("-{short}, {long}")));
                }
                if let Arg::Value(metavar) = flag.arg {
                    assert!(options_part.contains(&format!("{long} {metavar}")));
                }
                let first_words: String = flag.help.split_whitespace().take(3).collect();
                let flat: String = options_part.split_whitespace().collect();
                assert!(flat.contains(&first_words), "help of {long}");
            }
            if let Some((s, key)) = opt.key {
                assert!(
                    file_keys.contains(&format!("[{s}] {key}")),
                    "--help lacks [{s}] {key}: {file_keys:?}"
                );
            }
            if let Some(var) = opt.env {
                assert!(
                    options_part.contains(&format!("${var}")),
                    "--help lacks ${var}"
                );
            }
            if let Shown::Value(text) | Shown::Text(text) = opt.default {
                let flat: String = options_part.split_whitespace().collect();
                let text: String = text.split_whitespace().collect();
                assert!(flat.contains(&text), "--help lacks the default {text}");
            }
        }
        assert!(
            options_part.contains(&format!("[default port: {DEFAULT_PORT}]")),
            "--extra-peer's default port"
        );
    }

    #[test]
    fn help_fits_80_columns() {
        for line in HELP.lines() {
            let alone = line.trim_start();
            // A default that is one long word (a key) cannot be broken.
            let unbreakable = alone.starts_with("[default: ") && alone.matches(' ').count() == 1;
            assert!(
                line.len() <= help::WIDTH || unbreakable,
                "too wide: {line:?}"
            );
            assert_eq!(line, line.trim_end(), "trailing space");
        }
        assert!(HELP.starts_with("peerix: a peer-to-peer binary cache for Nix."));
        let lan_heading = HELP.find("\nLAN mode").unwrap();
        assert!(HELP.find("--bind").unwrap() < lan_heading);
        assert!(HELP.find("--lan-timeout").unwrap() > lan_heading);
    }

    #[test]
    fn flags_and_keys_are_unique() {
        let mut flags = Vec::new();
        let mut keys = Vec::new();
        for opt in options::all() {
            for flag in opt.flags {
                assert!(!flags.contains(&flag.long), "--{} twice", flag.long);
                flags.push(flag.long);
                if let Some(short) = flag.short {
                    let short = format!("-{short}");
                    assert!(!flags.iter().any(|f| *f == short), "{short} twice");
                }
            }
            if let Some(key) = opt.key {
                assert!(!keys.contains(&key), "{key:?} twice");
                keys.push(key);
            }
            assert!(
                !opt.flags.is_empty() || opt.key.is_some(),
                "an unreachable option"
            );
        }
    }

    #[test]
    fn every_key_from_the_file_equals_its_flags_and_environment() {
        let defaults = Config::default();
        assert_eq!(run_file(&[], "").unwrap(), defaults);
        for (opt, section, key) in keyed() {
            assert!(
                matches!(opt.action, Action::Set(_)),
                "{section}.{key} sets nothing"
            );
            let value = example(opt);
            let from_file = run_file(&[], &format!("[{section}]\n{key} = {}\n", opt.example))
                .unwrap_or_else(|e| panic!("{section}.{key} = {}: {e}", opt.example));
            assert_ne!(
                from_file, defaults,
                "the example of {section}.{key} is the default, which proves nothing"
            );
            let args = as_flags(opt, &value);
            let from_flags = run_file(&strs(&args), "").unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert_eq!(from_file, from_flags, "{section}.{key} vs {args:?}");
            if let (Some(var), toml::Value::String(text)) = (opt.env, &value) {
                let env = |name: &str| (name == var).then(|| OsString::from(text));
                assert_eq!(run_with(&[], "", &env).unwrap(), from_file, "${var}");
            }
        }
    }

    #[test]
    fn flags_win_over_the_file_over_the_environment_for_every_variable() {
        for (opt, section, key) in keyed() {
            let (Some(var), Some(flag)) = (opt.env, opt.flags.first()) else {
                continue;
            };
            let env = |name: &str| (name == var).then(|| OsString::from("/from/env"));
            let file = format!("[{section}]\n{key} = \"/from/file\"\n");
            let flag = format!("--{}", flag.long);
            let only_env = run_with(&[], "", &env).unwrap();
            let env_and_file = run_with(&[], &file, &env).unwrap();
            let all_three = run_with(&[&flag, "/from/flag"], &file, &env).unwrap();
            let by_flag = run_file(&[&flag, "/from/flag"], "").unwrap();
            let by_file = run_file(&[], &file).unwrap();
            assert_ne!(only_env, env_and_file, "{var}");
            assert_eq!(env_and_file, by_file, "the file wins over ${var}");
            assert_eq!(all_three, by_flag, "{flag} wins over the file and ${var}");
            let empty = |name: &str| (name == var).then(OsString::new);
            assert_eq!(
                run_with(&[], "", &empty).unwrap(),
                Config::default(),
                "an empty ${var} is unset"
            );
        }
    }

    #[test]
    fn shown_defaults_are_the_defaults() {
        for opt in options::all() {
            let Shown::Value(text) = opt.default else {
                continue;
            };
            let flag = opt.flags.first().expect("a flag");
            assert!(matches!(flag.arg, Arg::Value(_)), "--{}", flag.long);
            let long = format!("--{}", flag.long);
            assert_eq!(
                run_file(&[&long, text], "").unwrap(),
                Config::default(),
                "--help says {long} defaults to {text}"
            );
        }
    }

    #[test]
    fn wrong_types_unknown_keys_and_bad_values_in_the_file_name_the_key() {
        for (opt, section, key) in keyed() {
            let wrong = match example(opt) {
                toml::Value::String(_) | toml::Value::Array(_) => "1",
                _ => "\"x\"",
            };
            let e = run_file(&[], &format!("[{section}]\n{key} = {wrong}\n")).unwrap_err();
            let dotted = format!("{section}.{key}");
            assert!(e.0.contains(&dotted) && e.0.contains("test.toml"), "{e}");
            if let toml::Value::Array(_) = example(opt) {
                let e = run_file(&[], &format!("[{section}]\n{key} = [1]\n")).unwrap_err();
                assert!(e.0.contains(&dotted), "{e}");
            }
            let e = run_file(&[], &format!("[{section}]\n{key}s = 1\n")).unwrap_err();
            assert!(e.0.contains(&format!("{dotted}s")), "{e}");
        }
        for (file, named) in [
            ("[nosuch]\n", "[nosuch]"),
            ("port = 1\n", "`port`"),
            ("server = 1\n", "server"),
            ("[server]\nworkers = 0\n", "server.workers"),
            ("[server]\nworkers = 1.5\n", "server.workers"),
            ("[server]\nport = 70000\n", "server.port"),
            ("[server]\ntimeout = nan\n", "server.timeout"),
            (
                "[server]\nverify_before_send = 1000000000\n",
                "server.verify_before_send",
            ),
            ("[store]\nscan_interval = -1\n", "store.scan_interval"),
            ("[lan]\ntimeout_ms = 0\n", "lan.timeout_ms"),
            ("[lan]\nextra_peers = [\"h:0\"]\n", "lan.extra_peers"),
            ("[store]\nno_verify = 1\n", "store.no_verify"),
            (
                "[store]\nfilter_concurrency = 0\n",
                "store.filter_concurrency",
            ),
            (
                "[store]\nfilter_concurrency = 65\n",
                "store.filter_concurrency",
            ),
            (
                "[store]\nupstream_cache = \"ftp://x\"\n",
                "store.upstream_cache",
            ),
            (
                "[security]\nallow_insecure_http = \"yes\"\n",
                "security.allow_insecure_http",
            ),
            ("[tracker]\npeer_id = \"\"\n", "tracker.peer_id"),
            ("[server\n", "test.toml"),
        ] {
            let e = run_file(&[], file).unwrap_err();
            assert!(e.0.contains(named), "{file:?}: {e}");
        }
        // A bad value in the file is refused even where a flag overrides it.
        let e = run_file(&["--workers", "4"], "[server]\nworkers = 0\n").unwrap_err();
        assert!(e.0.contains("server.workers"), "{e}");
    }

    #[test]
    fn aliases_and_repeated_flags() {
        let lan = |args: &[&str]| run_file(args, "").unwrap().lan.enabled;
        assert!(!lan(&["--lan-discovery", "--no-lan"]), "the last one wins");
        assert!(lan(&["--no-lan", "--lan-discovery"]));
        assert!(lan(&[]));
        assert!(lan(&["--lan-discovery"]));
        assert!(
            run_file(&["--lan-discovery"], "[lan]\ndiscovery = false\n")
                .unwrap()
                .lan
                .enabled
        );
        assert!(run_file(&["-v"], "").unwrap().verbose);
        assert!(run_file(&[], "[server]\nverbose = true\n").unwrap().verbose);
        assert_eq!(run_file(&["--port=3000"], "").unwrap().port, 3000);
        assert!(run_file(&["--no-lan=yes"], "").is_err());
        assert!(matches!(parse_args(["-V"], &no_env), Ok(Command::Version)));
        assert!(matches!(parse_args(["-h"], &no_env), Ok(Command::Help)));

        let mode = |args: &[&str], file: &str| run_file(args, file).unwrap().filter_mode;
        assert_eq!(
            mode(&["--no-filter", "--filter-mode", "rules"], ""),
            FilterMode::None
        );
        assert_eq!(
            mode(&["--filter-mode", "rules"], "[store]\nno_filter = true\n"),
            FilterMode::Rules
        );
        assert_eq!(
            mode(&["--no-filter"], "[store]\nfilter_mode = \"rules\"\n"),
            FilterMode::None
        );
        assert_eq!(
            mode(&[], "[store]\nfilter_mode = \"rules\"\nno_filter = true\n"),
            FilterMode::None
        );
        assert_eq!(
            mode(&[], "[store]\nfilter_mode = \"rules\"\nno_filter = false\n"),
            FilterMode::Rules
        );

        let keys = |args: &[&str], file: &str| run_file(args, file).unwrap().trusted_keys;
        let file = "[store]\ntrusted_keys = [\"f-1:F\"]\n";
        assert_eq!(keys(&[], file), ["f-1:F"]);
        assert_eq!(
            keys(&["--trusted-key", "a-1:A", "--trusted-key", "b-1:B"], file),
            ["a-1:A", "b-1:B"]
        );
        assert!(keys(&[], "[store]\ntrusted_keys = []\n").is_empty());

        let peers = |args: &[&str], file: &str| {
            let config = run_file(args, file).unwrap();
            config
                .lan
                .extra_peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            peers(
                &["--extra-peer", "b", "--extra-peer", "c:1"],
                "[lan]\nextra_peers = [\"a\"]\n"
            ),
            ["a:12304", "b:12304", "c:1"]
        );
        assert!(
            !run_file(&[], "[lan]\nbroadcast = false\n")
                .unwrap()
                .lan
                .broadcast
        );
        assert!(
            !run_file(&["--no-broadcast"], "[lan]\nbroadcast = true\n")
                .unwrap()
                .lan
                .broadcast
        );
    }

    #[test]
    fn the_default_trusted_key_is_a_key() {
        crate::nix::keys::PublicKey::parse(DEFAULT_TRUSTED_KEY).unwrap();
    }

    #[test]
    fn a_tracker_turns_the_lan_off_unless_it_is_asked_for() {
        let config = run(&["--tracker", "http://10.0.0.2:12305/"]).unwrap();
        assert_eq!(config.tracker.as_deref(), Some("http://10.0.0.2:12305"));
        assert!(!config.lan.enabled, "tracker mode");
        let both = run(&["--tracker", "http://t:1", "--lan-discovery"]).unwrap();
        assert!(both.lan.enabled, "--lan-discovery adds the LAN");
        assert!(run(&[]).unwrap().lan.enabled, "no tracker: the LAN");
        for bad in [
            "https://t:1",
            "t:1",
            "http://",
            "http://t:1/path",
            "http://user@t",
            "http://t:1?x",
        ] {
            let e = run(&["--tracker", bad]).unwrap_err();
            assert!(e.0.contains("--tracker"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_nixpkgs_mode_and_its_upstream() {
        let config = run(&[]).unwrap();
        assert_eq!(config.upstream_cache, DEFAULT_UPSTREAM);
        assert_eq!(config.filter_concurrency, DEFAULT_FILTER_CONCURRENCY);
        assert!(!config.no_verify && !config.allow_insecure_http);
        assert_eq!(config.peer_id, None);

        let local = [
            "--filter-mode",
            "nixpkgs",
            "--upstream-cache",
            "http://127.0.0.1:8080/cache/",
        ];
        let e = run(&local).unwrap_err();
        assert!(
            e.0.contains("plain HTTP") && e.0.contains("--allow-insecure-http"),
            "{e}"
        );
        let config =
            run(&[&local[..], &["--allow-insecure-http", "--no-verify"]].concat()).unwrap();
        assert_eq!(config.filter_mode, FilterMode::Nixpkgs);
        assert_eq!(config.upstream_cache, "http://127.0.0.1:8080/cache");
        assert!(config.no_verify);
        let (path, _guard) = write_config(
            "[store]\nfilter_mode = \"nixpkgs\"\nupstream_cache = \"http://u:1\"\n\
             filter_concurrency = 3\n[security]\nallow_insecure_http = true\n\
             [tracker]\npeer_id = \"attic\"\n",
        );
        let config = run(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            (config.filter_concurrency, config.peer_id.as_deref()),
            (3, Some("attic"))
        );
        // HTTPS needs the `tls` feature; without it the error says so.
        let https = run(&["--filter-mode", "nixpkgs"]);
        if cfg!(feature = "tls") {
            assert_eq!(https.unwrap().upstream_cache, "https://cache.nixos.org");
        } else {
            let e = https.unwrap_err();
            assert!(e.0.contains("--features tls"), "{e}");
        }
        // Other modes never ask upstream: its URL is not held against them.
        run(&["--upstream-cache", "http://u:1"]).unwrap();
        for bad in [
            "cache.nixos.org",
            "ftp://x",
            "https://",
            "https://user@x",
            "https://x/?q",
            "https://x/#f",
            "https://x y",
        ] {
            let e = run(&["--upstream-cache", bad]).unwrap_err();
            assert!(e.0.contains("--upstream-cache"), "{bad}: {e}");
        }
        for bad in ["0", "65", "-1", "x"] {
            let e = run(&["--filter-concurrency", bad]).unwrap_err();
            assert!(e.0.contains("--filter-concurrency"), "{bad}: {e}");
        }
        for bad in ["", " x", "a\nb", &"x".repeat(65)] {
            let e = run(&["--peer-id", bad]).unwrap_err();
            assert!(e.0.contains("--peer-id"), "{bad:?}: {e}");
        }
        assert!(run(&["--no-verify=no"]).is_err());
    }
}
