//! `peerix-tracker`'s settings: one table of options, from which the flags,
//! the config file's keys and `--help` all come (the same scheme as
//! peerix's option table, at the size the tracker needs).
//!
//! Sources, from weakest to strongest: the defaults, the `--config` file
//! (TOML), the flags.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::str::FromStr;

use crate::config::toml;

/// The tracker's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackerConfig {
    pub bind: IpAddr,
    /// 0 picks a free port (it is logged).
    pub port: u16,
    pub db: PathBuf,
    /// Node ids allowed to announce and to look up; `None`: anyone.
    pub allow_nodes: Option<PathBuf>,
    /// Seconds a peer lives after its last signed request.
    pub peer_ttl: u64,
    /// Live peers first registered from one IP address at most; 0: no limit.
    pub max_peers_per_ip: usize,
    pub verbose: bool,
}

pub const DEFAULT_PORT: u16 = 12305;
pub const DEFAULT_DB: &str = "/var/lib/peerix-tracker/tracker.db";

impl Default for TrackerConfig {
    fn default() -> TrackerConfig {
        TrackerConfig {
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: DEFAULT_PORT,
            db: PathBuf::from(DEFAULT_DB),
            allow_nodes: None,
            peer_ttl: 120,
            max_peers_per_ip: 64,
            verbose: false,
        }
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Run(TrackerConfig),
    Help,
    Version,
}

/// One option: its flag, its config file key, its default as `--help`
/// shows it, and the one function that sets it.
struct Opt {
    /// Without the leading `--`.
    long: &'static str,
    short: Option<char>,
    /// The metavariable of a flag that takes a value; `None`: a switch.
    metavar: Option<&'static str>,
    /// `(section, key)` in the config file.
    key: Option<(&'static str, &'static str)>,
    default: Option<&'static str>,
    help: &'static str,
    action: Action,
}

#[derive(Clone, Copy)]
enum Action {
    Set(fn(&mut TrackerConfig, Value) -> Result<(), String>),
    ConfigFile,
    Help,
    Version,
}

/// A value for a setter: a flag's text (`None` for a switch), or a value
/// of the config file.
#[derive(Clone, Copy)]
enum Value<'a> {
    Flag(Option<&'a str>),
    Toml(&'a toml::Value),
}

impl Value<'_> {
    fn string(self) -> Result<String, String> {
        match self {
            Value::Flag(Some(text)) => Ok(text.to_string()),
            Value::Flag(None) => Err("a value is needed".into()),
            Value::Toml(toml::Value::String(s)) => Ok(s.clone()),
            Value::Toml(other) => Err(format!("expected a string, got {}", other.type_str())),
        }
    }

    fn parse<T: FromStr<Err: std::fmt::Display>>(self) -> Result<T, String> {
        let text = match self {
            Value::Toml(toml::Value::Integer(n)) => n.to_string(),
            Value::Toml(toml::Value::String(_)) | Value::Flag(_) => self.string()?,
            Value::Toml(other) => return Err(format!("unexpected {}", other.type_str())),
        };
        text.parse()
            .map_err(|e| format!("invalid value `{text}`: {e}"))
    }

    /// A switch given is true; the file needs a boolean.
    fn bool(self) -> Result<bool, String> {
        match self {
            Value::Flag(None) => Ok(true),
            Value::Flag(Some(text)) => text
                .parse()
                .map_err(|_| format!("invalid value `{text}`: not true or false")),
            Value::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Value::Toml(other) => Err(format!("expected true or false, got {}", other.type_str())),
        }
    }
}

const OPTIONS: &[Opt] = &[
    Opt {
        long: "bind",
        short: None,
        metavar: Some("ADDR"),
        key: Some(("server", "bind")),
        default: Some("0.0.0.0"),
        help: "address to listen on",
        action: Action::Set(|c, v| {
            c.bind = v.parse()?;
            Ok(())
        }),
    },
    Opt {
        long: "port",
        short: None,
        metavar: Some("N"),
        key: Some(("server", "port")),
        default: Some("12305"),
        help: "HTTP port (0: any free port, logged at start)",
        action: Action::Set(|c, v| {
            c.port = v.parse()?;
            Ok(())
        }),
    },
    Opt {
        long: "db",
        short: None,
        metavar: Some("PATH"),
        key: Some(("registry", "db")),
        default: Some(DEFAULT_DB),
        help: "SQLite database (made, with its directory, if missing)",
        action: Action::Set(|c, v| {
            c.db = PathBuf::from(v.string()?);
            Ok(())
        }),
    },
    Opt {
        long: "allow-nodes",
        short: None,
        metavar: Some("FILE"),
        key: Some(("registry", "allow_nodes")),
        default: None,
        help: "a private tracker: only the node ids in FILE (one a line, # comments) \
               may announce and look up; SIGHUP re-reads it",
        action: Action::Set(|c, v| {
            c.allow_nodes = Some(PathBuf::from(v.string()?));
            Ok(())
        }),
    },
    Opt {
        long: "peer-ttl",
        short: None,
        metavar: Some("SECS"),
        key: Some(("registry", "peer_ttl")),
        default: Some("120"),
        help: "a peer and its paths are dropped SECS seconds after its last heartbeat",
        action: Action::Set(|c, v| {
            let secs: u64 = v.parse()?;
            if !(1..=86_400).contains(&secs) {
                return Err(format!("{secs} is out of range (1 to 86400)"));
            }
            c.peer_ttl = secs;
            Ok(())
        }),
    },
    Opt {
        long: "max-peers-per-ip",
        short: None,
        metavar: Some("N"),
        key: Some(("registry", "max_peers_per_ip")),
        default: Some("64"),
        help: "live peers first registered from one IP address at most; 0: no limit",
        action: Action::Set(|c, v| {
            c.max_peers_per_ip = v.parse()?;
            Ok(())
        }),
    },
    Opt {
        long: "config",
        short: None,
        metavar: Some("FILE"),
        key: None,
        default: None,
        help: "TOML config file (flags win over it)",
        action: Action::ConfigFile,
    },
    Opt {
        long: "verbose",
        short: Some('v'),
        metavar: None,
        key: Some(("server", "verbose")),
        default: None,
        help: "debug logging (RUST_LOG overrides)",
        action: Action::Set(|c, v| {
            c.verbose = v.bool()?;
            Ok(())
        }),
    },
    Opt {
        long: "help",
        short: Some('h'),
        metavar: None,
        key: None,
        default: None,
        help: "print this help",
        action: Action::Help,
    },
    Opt {
        long: "version",
        short: Some('V'),
        metavar: None,
        key: None,
        default: None,
        help: "print the version",
        action: Action::Version,
    },
];

/// Parses the command line (without the program name), and the config file
/// it names.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<Command, String> {
    let mut parser = lexopt::Parser::from_args(args);
    let mut given: Vec<(&'static Opt, Option<String>)> = Vec::new();
    let mut config_file = None;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        let opt = match &arg {
            lexopt::Arg::Long(name) => OPTIONS.iter().find(|o| o.long == *name),
            lexopt::Arg::Short(c) => OPTIONS.iter().find(|o| o.short == Some(*c)),
            lexopt::Arg::Value(v) => {
                return Err(format!(
                    "unexpected argument `{}` (see --help)",
                    v.to_string_lossy()
                ));
            }
        };
        let Some(opt) = opt else {
            return Err(format!("{} (see --help)", arg.unexpected()));
        };
        let value = match opt.metavar {
            Some(_) => Some(
                parser
                    .value()
                    .map_err(|e| e.to_string())?
                    .into_string()
                    .map_err(|v| {
                        format!("--{}: `{}` is not UTF-8", opt.long, v.to_string_lossy())
                    })?,
            ),
            None => None,
        };
        match opt.action {
            Action::Help => return Ok(Command::Help),
            Action::Version => return Ok(Command::Version),
            Action::ConfigFile => config_file = value,
            Action::Set(_) => given.push((opt, value)),
        }
    }
    let mut config = TrackerConfig::default();
    if let Some(file) = config_file {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("config file {file}: cannot read: {e}"))?;
        apply_file(&mut config, &text).map_err(|e| format!("config file {file}: {e}"))?;
    }
    for (opt, value) in given {
        if let Action::Set(set) = opt.action {
            set(&mut config, Value::Flag(value.as_deref()))
                .map_err(|e| format!("--{}: {e}", opt.long))?;
        }
    }
    Ok(Command::Run(config))
}

/// Applies a config file's settings; an unknown section or key is an error,
/// so a typo does not pass for a setting.
fn apply_file(config: &mut TrackerConfig, text: &str) -> Result<(), String> {
    let table = toml::parse(text)?;
    for (section, keys) in &table {
        let keys = match keys {
            toml::Value::Table(keys)
                if OPTIONS.iter().any(|o| o.key.map(|k| k.0) == Some(section)) =>
            {
                keys
            }
            toml::Value::Table(_) => return Err(format!("unknown section [{section}]")),
            _ => return Err(format!("`{section}` is not a section")),
        };
        for (key, value) in keys {
            let opt = OPTIONS
                .iter()
                .find(|o| o.key == Some((section.as_str(), key.as_str())))
                .ok_or_else(|| format!("unknown key `{key}` in [{section}]"))?;
            if let Action::Set(set) = opt.action {
                set(config, Value::Toml(value)).map_err(|e| format!("[{section}] {key}: {e}"))?;
            }
        }
    }
    Ok(())
}

const INTRO: &str = "\
peerix-tracker: a registry of which peerix node holds which store path.

Nodes announce themselves and their paths in requests signed with their node
key; anyone (or, with --allow-nodes, the allowed nodes) asks who holds a path.

Usage: peerix-tracker [OPTIONS]

Options:
";

/// Where the help of a flag starts.
const HELP_COLUMN: usize = 26;
const WIDTH: usize = 80;

/// `--help`, from the option table.
pub fn help() -> String {
    let mut out = String::from(INTRO);
    for opt in OPTIONS {
        let mut left = String::from("  ");
        if let Some(short) = opt.short {
            left.push_str(&format!("-{short}, "));
        }
        left.push_str("--");
        left.push_str(opt.long);
        if let Some(metavar) = opt.metavar {
            left.push(' ');
            left.push_str(metavar);
        }
        let mut words: Vec<String> = opt.help.split_whitespace().map(String::from).collect();
        if let Some(default) = opt.default {
            words.push(format!("[default: {default}]"));
        }
        let mut line = left;
        let mut empty = true;
        for word in words {
            if line.len() < HELP_COLUMN {
                line.extend(std::iter::repeat_n(' ', HELP_COLUMN - line.len()));
            } else if empty {
                line.push_str("  ");
            }
            if !empty && line.len() + 1 + word.len() > WIDTH {
                out.push_str(&line);
                out.push('\n');
                line = " ".repeat(HELP_COLUMN);
                empty = true;
            }
            if !empty {
                line.push(' ');
            }
            line.push_str(&word);
            empty = false;
        }
        out.push_str(&line);
        out.push('\n');
    }
    out.push_str("\nConfig file keys:\n");
    let mut sections: Vec<&str> = Vec::new();
    for (section, _) in OPTIONS.iter().filter_map(|o| o.key) {
        if !sections.contains(&section) {
            sections.push(section);
        }
    }
    for section in sections {
        let keys: Vec<&str> = OPTIONS
            .iter()
            .filter_map(|o| o.key)
            .filter(|&(s, _)| s == section)
            .map(|(_, k)| k)
            .collect();
        out.push_str(&format!("  [{section}]  {}\n", keys.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(OsString::from))
    }

    fn run(args: &[&str]) -> TrackerConfig {
        match parse(args) {
            Ok(Command::Run(config)) => config,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn the_shown_defaults_are_the_real_ones() {
        for opt in OPTIONS {
            if let (Some(default), Action::Set(set)) = (opt.default, opt.action) {
                let mut config = TrackerConfig::default();
                set(&mut config, Value::Flag(Some(default))).unwrap();
                assert_eq!(config, TrackerConfig::default(), "--{}", opt.long);
            }
        }
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let dir =
            std::env::temp_dir().join(format!("peerix-tracker-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tracker.toml");
        std::fs::write(
            &file,
            "[server]\nbind = \"127.0.0.1\"\nport = 7000\nverbose = true\n\
             [registry]\ndb = \"/tmp/t.db\"\npeer_ttl = 30\nallow_nodes = \"/etc/nodes\"\n\
             max_peers_per_ip = 0\n",
        )
        .unwrap();
        let file_arg = file.to_str().unwrap();
        let config = run(&["--config", file_arg, "--port", "7001"]);
        assert_eq!(
            config,
            TrackerConfig {
                bind: "127.0.0.1".parse().unwrap(),
                port: 7001,
                db: "/tmp/t.db".into(),
                allow_nodes: Some("/etc/nodes".into()),
                peer_ttl: 30,
                max_peers_per_ip: 0,
                verbose: true,
            }
        );
        // The order of flags does not matter: --config is read first.
        assert_eq!(run(&["--port", "7001", "--config", file_arg]), config);
        std::fs::write(&file, "[server]\nprot = 1\n").unwrap();
        let e = parse(&["--config", file_arg]).unwrap_err();
        assert!(e.contains("unknown key `prot` in [server]"), "{e}");
        std::fs::write(&file, "[registry]\npeer_ttl = \"soon\"\n").unwrap();
        let e = parse(&["--config", file_arg]).unwrap_err();
        assert!(e.contains("peer_ttl"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_flags_are_errors_that_name_them() {
        for (args, needle) in [
            (&["--port", "x"][..], "--port"),
            (&["--peer-ttl", "0"], "out of range"),
            (&["--bind", "localhost"], "--bind"),
            (&["--frobnicate"], "frobnicate"),
            (&["stray"], "stray"),
            (
                &["--config", "/nonexistent/peerix-tracker.toml"],
                "cannot read",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
        assert_eq!(parse(&["--help"]), Ok(Command::Help));
        assert_eq!(parse(&["-V"]), Ok(Command::Version));
        assert!(run(&["-v"]).verbose);
    }

    #[test]
    fn help_lists_every_option_within_the_width() {
        let help = help();
        for opt in OPTIONS {
            assert!(help.contains(&format!("--{}", opt.long)), "{}", opt.long);
        }
        for line in help.lines() {
            assert!(line.len() <= WIDTH || !line.trim().contains(' '), "{line}");
        }
        assert!(help.contains("[registry]  db, allow_nodes, peer_ttl, max_peers_per_ip"));
    }
}
