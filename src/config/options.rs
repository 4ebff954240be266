//! The option table: every setting of peerix, once. `--help`, the config
//! file's keys, the environment fallbacks and the order in which sources
//! override each other all come from [`GROUPS`]; how to add an option is in
//! the documentation of `crate::config`.

use std::ffi::OsStr;
use std::fmt::Display;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::toml;
use super::{
    Config, DEFAULT_DAEMON_SOCKET, DEFAULT_STATE_DIR, DEFAULT_TRUSTED_KEY, FilterMode, PeerSpec,
};

/// One setting: its flags, its place in the config file, its environment
/// fallback, what `--help` says of it, and the one function that sets it.
pub(super) struct Opt {
    /// The flags that set it, each with its own help line. Several flags
    /// are aliases that imply a value (`--lan-discovery` / `--no-lan`).
    pub flags: &'static [Flag],
    /// `(section, key)` in the config file; `None` for a flag only.
    pub key: Option<(&'static str, &'static str)>,
    /// The environment variable used when neither a flag nor the file sets it.
    pub env: Option<&'static str>,
    /// The default as `--help` shows it.
    pub default: Shown,
    /// A value for the config file as TOML, other than the default. The
    /// tests set every option from it, by flag, by file and by environment,
    /// and expect the same configuration each way.
    pub example: &'static str,
    pub action: Action,
}

pub(super) struct Flag {
    /// Without the leading `--`.
    pub long: &'static str,
    pub short: Option<char>,
    pub arg: Arg,
    /// Lines break where it has `\n`, and wherever it is too long.
    pub help: &'static str,
}

#[derive(Clone, Copy)]
pub(super) enum Arg {
    /// Takes a value; the metavariable shown in `--help`.
    Value(&'static str),
    /// Takes no value: given, it stands for this value text.
    Switch(&'static str),
}

#[derive(Clone, Copy)]
pub(super) enum Shown {
    Nothing,
    /// A value the setter accepts; a test checks it is the real default.
    Value(&'static str),
    /// Words, for defaults a value cannot say.
    Text(&'static str),
}

#[derive(Clone, Copy)]
pub(super) enum Action {
    Set(Setter),
    /// `--config`: which file to read.
    ConfigFile,
    Help,
    Version,
}

/// Parses one value into the configuration. The error says what is wrong
/// with the value; the caller adds the flag, key or variable it came from.
pub(super) type Setter = fn(&mut Config, &Input) -> Result<(), String>;

/// Options under one heading of `--help`.
pub(super) struct Group {
    pub heading: &'static str,
    pub options: &'static [Opt],
}

pub(super) const GROUPS: &[Group] = &[
    Group {
        heading: "Options:",
        options: GENERAL,
    },
    Group {
        heading: "LAN mode (on unless --no-lan; peers are asked by UDP on the HTTP port number):",
        options: LAN,
    },
];

/// Every option, in the order of `--help`. Sources are applied in this
/// order too, so of two options that set the same field the later wins
/// (`--no-filter` over `--filter-mode`).
pub(super) fn all() -> impl Iterator<Item = &'static Opt> {
    GROUPS.iter().flat_map(|group| group.options)
}

const GENERAL: &[Opt] = &[
    opt(&[value("bind", "ADDR", "address to listen on")], |c, v| {
        c.bind = v.parse()?;
        Ok(())
    })
    .key("server", "bind")
    .default("0.0.0.0")
    .example("\"127.0.0.1\""),
    opt(&[value("port", "N", "HTTP port")], |c, v| {
        c.port = v.int()?;
        Ok(())
    })
    .key("server", "port")
    .default("12304")
    .example("2000"),
    opt(
        &[value(
            "workers",
            "N",
            "HTTP threads for work that waits on peers; a quarter as many (at least \
             2) serve this host's own requests and a quarter as many other hosts'",
        )],
        |c, v| {
            let workers = v.int()?;
            if !(1..=256).contains(&workers) {
                return Err(format!("{workers} is out of range (1 to 256)"));
            }
            c.workers = workers;
            Ok(())
        },
    )
    .key("server", "workers")
    .default("16")
    .example("4"),
    opt(
        &[value(
            "priority",
            "N",
            "priority in /nix-cache-info, lower is preferred",
        )],
        |c, v| {
            c.priority = v.int()?;
            Ok(())
        },
    )
    .key("server", "priority")
    .default("5")
    .example("40"),
    opt(
        &[value("daemon-socket", "PATH", "nix-daemon socket")],
        |c, v| {
            c.daemon_socket = v.path()?;
            Ok(())
        },
    )
    .key("store", "daemon_socket")
    .env("NIX_DAEMON_SOCKET_PATH")
    .default(DEFAULT_DAEMON_SOCKET)
    .example("\"/run/nix/daemon.sock\""),
    opt(
        &[value(
            "store-root",
            "DIR",
            "physical root that holds nix/store; a chroot store /tmp/h1 keeps \
             its files in /tmp/h1/nix/store",
        )],
        |c, v| {
            c.store_root = v.path()?;
            Ok(())
        },
    )
    .key("store", "store_root")
    .default("/")
    .example("\"/tmp/h1\""),
    opt(
        &[value(
            "state-dir",
            "DIR",
            "where state is kept: stats.json, peers.json (reputation, bans), \
             the node key",
        )],
        |c, v| {
            c.state_dir = v.path()?;
            Ok(())
        },
    )
    .key("server", "state_dir")
    .default(DEFAULT_STATE_DIR)
    .example("\"/tmp/peerix-state\""),
    opt(
        &[value(
            "state-interval",
            "SECS",
            "write stats.json and peers.json every SECS seconds (and on shutdown); \
             0.01 at least, for tests",
        )],
        |c, v| {
            let secs = v.float()?;
            if !(0.01..=86_400.0).contains(&secs) {
                return Err(format!("{secs} seconds is out of range (0.01 to 86400)"));
            }
            c.state_interval = Duration::from_secs_f64(secs);
            Ok(())
        },
    )
    .key("server", "state_interval")
    .default("60")
    .example("0.5"),
    opt(
        &[value(
            "private-key",
            "FILE",
            "Nix secret key (nix-store --generate-binary-cache-key) that signs \
             this host's own narinfos",
        )],
        |c, v| {
            c.private_key_file = Some(v.path()?);
            Ok(())
        },
    )
    .key("signing", "private_key")
    .env("NIX_SECRET_KEY_FILE")
    .default_text("none")
    .example("\"/etc/nix/cache-key.sec\""),
    opt(
        &[value(
            "trusted-key",
            "NAME:KEY",
            "public key whose signature makes a path shareable in the `signed` \
             filter mode; repeatable",
        )],
        |c, v| {
            // Flags replace the file's list, which replaces the default.
            if v.first() {
                c.trusted_keys.clear();
            }
            for item in v.items()? {
                c.trusted_keys.push(item.string()?);
            }
            Ok(())
        },
    )
    .key("store", "trusted_keys")
    .default(DEFAULT_TRUSTED_KEY)
    .example("[\"a-1:AAAA\", \"b-1:BBBB\"]"),
    opt(
        &[value(
            "filter-mode",
            "MODE",
            "signed: share paths a trusted key signed;\n\
             nixpkgs: share paths the upstream cache has, with the same NarHash;\n\
             rules: share all but names on the deny-list;\n\
             none: share everything",
        )],
        |c, v| {
            c.filter_mode = v.string()?.parse::<FilterMode>()?;
            Ok(())
        },
    )
    .key("store", "filter_mode")
    .default("signed")
    .example("\"rules\""),
    opt(
        &[value(
            "filter-pattern",
            "GLOB",
            "extra deny pattern for `rules` mode; repeatable",
        )],
        |c, v| {
            // The file's patterns, then the flags'.
            for item in v.items()? {
                c.filter_patterns.push(item.string()?);
            }
            Ok(())
        },
    )
    .key("store", "filter_patterns")
    .example("[\"*-mine-*\", \"*-other-*\"]"),
    opt(
        &[switch(
            "no-filter",
            "true",
            "share everything (same as --filter-mode none)",
        )],
        |c, v| {
            if v.bool()? {
                c.filter_mode = FilterMode::None;
            }
            Ok(())
        },
    )
    .key("store", "no_filter")
    .example("true"),
    opt(
        &[value(
            "upstream-cache",
            "URL",
            "the upstream cache of the nixpkgs mode; https:// needs a build with the \
             `tls` feature, http:// needs --allow-insecure-http",
        )],
        |c, v| {
            c.upstream_cache = upstream_url(&v.string()?)?;
            Ok(())
        },
    )
    .key("store", "upstream_cache")
    .default("https://cache.nixos.org")
    .example("\"http://10.0.0.9:8080/cache\""),
    opt(
        &[switch(
            "no-verify",
            "true",
            "nixpkgs mode: share a path upstream has even if its NarHash differs \
             from this host's",
        )],
        |c, v| {
            c.no_verify = v.bool()?;
            Ok(())
        },
    )
    .key("store", "no_verify")
    .example("true"),
    opt(
        &[value(
            "filter-concurrency",
            "N",
            "nixpkgs mode: requests to the upstream cache in flight at most",
        )],
        |c, v| {
            let n = v.int()?;
            if !(1..=64).contains(&n) {
                return Err(format!("{n} is out of range (1 to 64)"));
            }
            c.filter_concurrency = n;
            Ok(())
        },
    )
    .key("store", "filter_concurrency")
    .default("10")
    .example("4"),
    opt(
        &[switch(
            "allow-insecure-http",
            "true",
            "accept an http:// upstream cache (its answers decide what is shared)",
        )],
        |c, v| {
            c.allow_insecure_http = v.bool()?;
            Ok(())
        },
    )
    .key("security", "allow_insecure_http")
    .example("true"),
    opt(
        &[value(
            "scan-interval",
            "SECS",
            "rescan the store every SECS seconds, 0 = never; SIGHUP rescans at once",
        )],
        |c, v| {
            let secs: u64 = v.int()?;
            c.scan_interval = (secs > 0).then(|| Duration::from_secs(secs));
            Ok(())
        },
    )
    .key("store", "scan_interval")
    .default("3600")
    .example("0"),
    opt(
        &[value(
            "tracker",
            "URL",
            "the tracker (http://HOST:PORT): register this node, announce what it shares, \
             and ask it who holds a path; the LAN is then asked only with --lan-discovery",
        )],
        |c, v| {
            c.tracker = Some(tracker_url(&v.string()?)?);
            Ok(())
        },
    )
    .key("tracker", "url")
    .default_text("none")
    .example("\"http://10.0.0.2:12305\""),
    opt(
        &[value(
            "peer-id",
            "NAME",
            "a name for this host, shown in /health and on the dashboard; peers and \
             the tracker know it by its node key, not by this name",
        )],
        |c, v| {
            c.peer_id = Some(peer_id(&v.string()?)?);
            Ok(())
        },
    )
    .key("tracker", "peer_id")
    .default_text("the host name")
    .example("\"attic\""),
    opt(
        &[value(
            "shutdown-timeout",
            "SECS",
            "on SIGTERM, stop taking requests and let running ones finish for at most SECS seconds",
        )],
        |c, v| {
            c.shutdown_timeout = Duration::from_secs(v.int()?);
            Ok(())
        },
    )
    .key("server", "shutdown_timeout")
    .default("10")
    .example("30"),
    opt(
        &[switch(
            "metrics-public",
            "true",
            "answer /metrics to other hosts too (by default this host only)",
        )],
        |c, v| {
            c.metrics_public = v.bool()?;
            Ok(())
        },
    )
    .key("server", "metrics_public")
    .example("true"),
    opt(
        &[switch(
            "dashboard-public",
            "true",
            "serve /dashboard to other hosts too (by default this host only); \
             its control buttons still work for this host only",
        )],
        |c, v| {
            c.dashboard_public = v.bool()?;
            Ok(())
        },
    )
    .key("server", "dashboard_public")
    .example("true"),
    Opt {
        action: Action::ConfigFile,
        ..opt(
            &[value("config", "FILE", "TOML config file")],
            |_, _| Ok(()),
        )
        .default_text("~/.config/peerix/config.toml if it exists")
    },
    opt(
        &[switch("verbose", "true", "debug logging (RUST_LOG overrides)").short('v')],
        |c, v| {
            c.verbose = v.bool()?;
            Ok(())
        },
    )
    .key("server", "verbose")
    .example("true"),
    Opt {
        action: Action::Help,
        ..opt(
            &[switch("help", "", "print this help").short('h')],
            |_, _| Ok(()),
        )
    },
    Opt {
        action: Action::Version,
        ..opt(
            &[switch("version", "", "print the version").short('V')],
            |_, _| Ok(()),
        )
    },
];

const LAN: &[Opt] = &[
    opt(
        &[
            switch(
                "lan-discovery",
                "true",
                "ask peers on the LAN for paths this host lacks",
            ),
            switch(
                "no-lan",
                "false",
                "no LAN discovery: neither ask nor answer peers",
            ),
        ],
        |c, v| {
            c.lan_discovery = Some(v.bool()?);
            Ok(())
        },
    )
    .key("lan", "discovery")
    .default_text("on without a --tracker, off with one")
    .example("false"),
    opt(
        &[value(
            "lan-timeout",
            "MS",
            "how long a query collects replies",
        )],
        |c, v| {
            let ms = v.int()?;
            if !(1..=10_000).contains(&ms) {
                return Err(format!(
                    "a lan timeout of {ms} ms is out of range (1 to 10000)"
                ));
            }
            c.lan.timeout = Duration::from_millis(ms);
            Ok(())
        },
    )
    .key("lan", "timeout_ms")
    .default("250")
    .example("400"),
    opt(
        &[value(
            "extra-peer",
            "HOST[:PORT]",
            "also ask this peer by unicast (VPN, Tailscale); repeatable \
             [default port: 12304]",
        )],
        |c, v| {
            // The file's peers, then the flags'.
            for item in v.items()? {
                c.lan.extra_peers.push(item.string()?.parse::<PeerSpec>()?);
            }
            Ok(())
        },
    )
    .key("lan", "extra_peers")
    .example("[\"pi.lan\", \"10.0.0.7:4000\"]"),
    opt(
        &[switch(
            "no-broadcast",
            "false",
            "do not broadcast; ask only the extra peers",
        )],
        |c, v| {
            c.lan.broadcast = v.bool()?;
            Ok(())
        },
    )
    .key("lan", "broadcast")
    .example("false"),
    opt(
        &[value(
            "timeout",
            "SECS",
            "connect and read timeout towards peers, also the limit on a narinfo \
             request and on each NAR chunk, and on a request to the upstream cache",
        )],
        |c, v| {
            let secs = v.float()?;
            if !(0.05..=600.0).contains(&secs) {
                return Err(format!("{secs} seconds is out of range (0.05 to 600)"));
            }
            c.peer_timeout = Duration::from_secs_f64(secs);
            Ok(())
        },
    )
    .key("server", "timeout")
    .default("5")
    .example("2.5"),
    opt(
        &[value(
            "verify-before-send",
            "BYTES",
            "NARs from peers up to this size are verified whole before nix gets \
             a byte; larger ones stream and are cut off if they turn out wrong",
        )],
        |c, v| {
            let bytes: u64 = v.int()?;
            if bytes > 256 * 1024 * 1024 {
                return Err(format!(
                    "{bytes} bytes is more than 256 MiB, which would hold that much \
                     memory per download"
                ));
            }
            c.verify_before_send = bytes;
            Ok(())
        },
    )
    .key("server", "verify_before_send")
    .default("4194304")
    .example("1048576"),
];

/// A tracker URL: `http://host[:port]`, nothing after but a `/`. TLS would
/// cost the binary a TLS stack; a tracker is reached on a LAN or a VPN.
fn tracker_url(text: &str) -> Result<String, String> {
    let rest = text.strip_prefix("http://").ok_or_else(|| {
        format!("`{text}`: the tracker URL must start with http:// (https is not supported)")
    })?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    let valid = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !valid {
        return Err(format!(
            "`{text}`: expected http://HOST[:PORT], with no path, query or user"
        ));
    }
    Ok(format!("http://{authority}"))
}

/// An upstream cache URL: `http://` or `https://`, a host, an optional
/// path; no user, query or fragment. Kept without a trailing `/`.
fn upstream_url(text: &str) -> Result<String, String> {
    let rest = text
        .strip_prefix("https://")
        .or_else(|| text.strip_prefix("http://"))
        .ok_or_else(|| {
            format!("`{text}`: the upstream cache URL must start with https:// or http://")
        })?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let valid = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~/%+".contains(&b));
    if !valid {
        return Err(format!(
            "`{text}`: expected https://HOST[:PORT][/PATH], with no user, query or fragment"
        ));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// This host's name: 1 to 64 bytes, no control characters, no space at
/// either end.
fn peer_id(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 64 {
        return Err(format!("`{text}`: a peer id is 1 to 64 bytes"));
    }
    if text.chars().any(char::is_control) || text.trim() != text {
        return Err(format!(
            "{text:?}: a peer id has no control characters and no space at either end"
        ));
    }
    Ok(text.to_string())
}

const fn opt(flags: &'static [Flag], set: Setter) -> Opt {
    Opt {
        flags,
        key: None,
        env: None,
        default: Shown::Nothing,
        example: "",
        action: Action::Set(set),
    }
}

impl Opt {
    const fn key(mut self, section: &'static str, key: &'static str) -> Opt {
        self.key = Some((section, key));
        self
    }

    const fn env(mut self, var: &'static str) -> Opt {
        self.env = Some(var);
        self
    }

    const fn default(mut self, value: &'static str) -> Opt {
        self.default = Shown::Value(value);
        self
    }

    const fn default_text(mut self, text: &'static str) -> Opt {
        self.default = Shown::Text(text);
        self
    }

    const fn example(mut self, toml: &'static str) -> Opt {
        self.example = toml;
        self
    }
}

const fn value(long: &'static str, metavar: &'static str, help: &'static str) -> Flag {
    Flag {
        long,
        short: None,
        arg: Arg::Value(metavar),
        help,
    }
}

const fn switch(long: &'static str, implies: &'static str, help: &'static str) -> Flag {
    Flag {
        long,
        short: None,
        arg: Arg::Switch(implies),
        help,
    }
}

impl Flag {
    const fn short(mut self, short: char) -> Flag {
        self.short = Some(short);
        self
    }
}

/// One value for a setter: a flag's argument, an environment variable, or a
/// config file value. The accessors check the kind a file value has, and
/// parse a flag's text; their errors do not name the source.
#[derive(Clone, Copy)]
pub(super) struct Input<'a> {
    raw: Raw<'a>,
    first: bool,
}

#[derive(Clone, Copy)]
enum Raw<'a> {
    Text(&'a OsStr),
    Toml(&'a toml::Value),
}

impl<'a> Input<'a> {
    /// A flag's value or an environment variable.
    pub fn text(text: &'a OsStr, first: bool) -> Input<'a> {
        Input {
            raw: Raw::Text(text),
            first,
        }
    }

    pub fn toml(value: &'a toml::Value, first: bool) -> Input<'a> {
        Input {
            raw: Raw::Toml(value),
            first,
        }
    }

    /// Whether this is the first value of its source for this option: a
    /// list that a later source replaces rather than extends clears here.
    pub fn first(&self) -> bool {
        self.first
    }

    pub fn string(&self) -> Result<String, String> {
        match self.raw {
            Raw::Text(text) => text
                .to_str()
                .map(str::to_string)
                .ok_or_else(|| "value is not UTF-8".to_string()),
            Raw::Toml(toml::Value::String(s)) => Ok(s.clone()),
            Raw::Toml(other) => Err(expected("a string", other)),
        }
    }

    /// Any bytes from a flag or the environment; a string from the file.
    pub fn path(&self) -> Result<PathBuf, String> {
        match self.raw {
            Raw::Text(text) => Ok(PathBuf::from(text)),
            Raw::Toml(_) => self.string().map(PathBuf::from),
        }
    }

    /// A string, parsed as `T` (an address, say).
    pub fn parse<T: FromStr<Err: Display>>(&self) -> Result<T, String> {
        let text = self.string()?;
        text.parse()
            .map_err(|e| format!("invalid value `{text}`: {e}"))
    }

    /// An integer of type `T`; from the file, a TOML integer.
    pub fn int<T: FromStr<Err: Display>>(&self) -> Result<T, String> {
        match self.raw {
            Raw::Text(_) => self.parse(),
            Raw::Toml(toml::Value::Integer(n)) => n
                .to_string()
                .parse()
                .map_err(|e| format!("invalid value {n}: {e}")),
            Raw::Toml(other) => Err(expected("an integer", other)),
        }
    }

    /// A number; from the file, a TOML float or integer.
    pub fn float(&self) -> Result<f64, String> {
        match self.raw {
            Raw::Text(_) => self.parse(),
            Raw::Toml(toml::Value::Float(x)) => Ok(*x),
            Raw::Toml(toml::Value::Integer(n)) => Ok(*n as f64),
            Raw::Toml(other) => Err(expected("a number", other)),
        }
    }

    /// `true` or `false`; a switch stands for one of them.
    pub fn bool(&self) -> Result<bool, String> {
        match self.raw {
            Raw::Text(_) => self.parse(),
            Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Raw::Toml(other) => Err(expected("true or false", other)),
        }
    }

    /// The items of a list: a flag gives one per use, the file an array.
    pub fn items(&self) -> Result<Vec<Input<'a>>, String> {
        match self.raw {
            Raw::Text(_) => Ok(vec![*self]),
            Raw::Toml(toml::Value::Array(items)) => Ok(items
                .iter()
                .map(|item| Input::toml(item, self.first))
                .collect()),
            Raw::Toml(other) => Err(expected("an array", other)),
        }
    }
}

fn expected(what: &str, got: &toml::Value) -> String {
    let article = match got.type_str() {
        "integer" | "array" => "an",
        _ => "a",
    };
    format!("expected {what}, got {article} {}", got.type_str())
}
