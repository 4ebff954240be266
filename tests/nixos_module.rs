//! The NixOS module (nix/module.nix), evaluated offline with nixpkgs' real
//! `lib.evalModules` under the installed nix (`nix-instantiate --eval`).
//!
//! What is not here is NixOS itself: the options the module sets
//! (`systemd.services`, `networking.firewall`, `nix.settings`, `users`) are
//! declared by [`HARNESS`], loosely, and `pkgs` is a stand-in holding only
//! what the module touches: `peerix` and `coreutils` (attribute sets that
//! pass for derivations) and `writeText` (an attribute set that keeps the
//! text and turns into a store path in strings). The module renders its TOML
//! over lib for that reason. The units are then checked as systemd would be
//! given them, and their command lines and config files are parsed by
//! peerix's and peerix-tracker's own parsers.
//!
//! The lib is taken from `$PEERIX_NIXPKGS_LIB`, else from the copy in
//! `vendor/nixpkgs-lib/lib` (nixpkgs 26.11), so that the tests need no
//! network and no nixpkgs checkout; without it (or without
//! `nix-instantiate`) the tests fail and say what is missing.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::TestDir;
use peerix::config::{self as peerix_config, FilterMode};
use peerix::tracker::config as tracker_config;
use serde_json::Value;

/// Evaluates `modules` (a Nix list expression) next to the stand-ins of
/// NixOS, and returns what the module set as JSON: `systemd`,
/// `networking`, `nix`, `users`, and the text of both config files.
const HARNESS: &str = r#"
{ libPath, modules }:
let
  lib = import libPath;
  inherit (lib) types mkOption;
  storePath = name: "/nix/store/00000000000000000000000000000000-${name}";
  standIn = name: { type = "derivation"; inherit name; outPath = storePath name; };
  pkgs = {
    peerix = standIn "peerix";
    coreutils = standIn "coreutils";
    # The flake's module builds the package with the host's callPackage.
    callPackage = _: _: standIn "peerix-from-flake";
    writeText = name: text: { inherit name text; __toString = _: storePath name; };
  };
  nixos = {
    options = {
      systemd.services = mkOption { type = types.attrsOf types.anything; default = { }; };
      networking.firewall = {
        allowedTCPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
        allowedUDPPorts = mkOption { type = types.listOf types.port; default = [ ]; };
      };
      nix.settings = mkOption { type = types.attrsOf types.anything; default = { }; };
      users.users = mkOption { type = types.attrsOf types.anything; default = { }; };
      users.groups = mkOption { type = types.attrsOf types.anything; default = { }; };
    };
  };
  config = (lib.evalModules {
    modules = [ nixos ] ++ modules;
    specialArgs = { inherit pkgs; };
  }).config;
in
{
  inherit (config) systemd networking nix users;
  peerixConfigText = config.services.peerix.configFile.text;
  trackerConfigText = config.services.peerix-tracker.configFile.text;
}
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// nixpkgs' lib directory, or a failure that names what is missing.
fn nixpkgs_lib() -> PathBuf {
    let path = match std::env::var_os("PEERIX_NIXPKGS_LIB") {
        Some(path) => PathBuf::from(path),
        None => repo().join("vendor/nixpkgs-lib/lib"),
    };
    assert!(
        path.join("default.nix").is_file(),
        "nixpkgs' lib is missing: no {}/default.nix; set PEERIX_NIXPKGS_LIB to the `lib` \
         directory of a nixpkgs checkout",
        path.display()
    );
    path
}

/// The module file on its own.
fn module() -> String {
    nix_path(&repo().join("nix/module.nix"))
}

/// The flake's `nixosModules.default`, with the flake's inputs given: its
/// own outputs and a nixpkgs that is only the lib.
fn flake_module(lib: &Path) -> String {
    format!(
        "(let outputs = (import {flake}).outputs {{ self = outputs; nixpkgs = {{ lib = import {lib}; }}; }}; \
         in outputs.nixosModules.default)",
        flake = nix_path(&repo().join("flake.nix")),
        lib = nix_path(lib),
    )
}

fn nix_path(path: &Path) -> String {
    let path = path
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let text = path.to_str().expect("a UTF-8 path");
    assert!(
        text.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+".contains(&b)),
        "{text}: not writable as a Nix path literal"
    );
    text.to_string()
}

/// Runs the harness over `modules`; Ok(JSON) or Err(nix's stderr).
fn evaluate(modules: &[String]) -> Result<Value, String> {
    let lib = nixpkgs_lib();
    let expr = format!(
        "({HARNESS}) {{ libPath = {}; modules = [ {} ]; }}",
        nix_path(&lib),
        modules.join(" ")
    );
    let output = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "--expr", &expr])
        .output()
        .unwrap_or_else(|e| panic!("nix-instantiate is missing or cannot run: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        return Err(stderr);
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("nix-instantiate printed no JSON ({e}); stderr: {stderr}"))
}

/// The module with `config` (a Nix attribute set) added.
fn eval_ok(config: &str) -> Value {
    evaluate(&[module(), config.to_string()])
        .unwrap_or_else(|stderr| panic!("evaluation of {config} failed:\n{stderr}"))
}

fn eval_err(config: &str) -> String {
    match evaluate(&[module(), config.to_string()]) {
        Ok(json) => panic!("{config} evaluated, to {json:#}"),
        Err(stderr) => stderr,
    }
}

fn str_of<'a>(json: &'a Value, pointer: &str) -> &'a str {
    json.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {json:#}"))
}

/// Splits a command line as systemd does for the quoting `lib.escapeShellArgs`
/// uses: whitespace between words, `'…'` literal, `\x` for x.
fn split_command(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => words.extend(word.take()),
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    w.push(q);
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word.take());
    words
}

/// The arguments (program dropped) of a unit's ExecStart, after checking
/// that the program is `bin/NAME` of `package`.
fn exec_args(json: &Value, unit: &str, program: &str) -> Vec<String> {
    let line = str_of(
        json,
        &format!("/systemd/services/{unit}/serviceConfig/ExecStart"),
    );
    let mut words = split_command(line);
    assert_eq!(words.first().map(String::as_str), Some(program), "{line}");
    words.remove(0);
    words
}

/// The value after `flag` in `args`.
fn flag_value<'a>(args: &'a [String], flag: &str) -> &'a str {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
    args.get(at + 1)
        .unwrap_or_else(|| panic!("{flag} has no value in {args:?}"))
}

const PEERIX: &str = "/nix/store/00000000000000000000000000000000-peerix/bin/peerix";
const PEERIX_TOML: &str = "/nix/store/00000000000000000000000000000000-peerix.toml";

/// Parses ExecStart and the rendered config file as `peerix` itself would.
fn peerix_config_of(json: &Value) -> peerix_config::Config {
    let args = exec_args(json, "peerix", PEERIX);
    assert_eq!(flag_value(&args, "--config"), PEERIX_TOML);
    let text = str_of(json, "/peerixConfigText");
    let no_env = |_: &str| -> Option<OsString> { None };
    match peerix_config::parse_args_with_file_text(&args, Path::new("peerix.toml"), text, &no_env) {
        Ok(peerix_config::Command::Run(config)) => *config,
        other => panic!("peerix does not take {args:?} with\n{text}\nas a run: {other:?}"),
    }
}

#[test]
fn the_service_runs_peerix_with_the_options_and_the_settings() {
    let json = eval_ok(
        r#"{
          services.peerix = {
            enable = true;
            trackerUrl = "http://10.0.0.2:12305";
            privateKeyFile = "/etc/nix/cache-priv-key.pem";
            publicKey = "attic-1:AAAA";
            timeout = 2.5;
            priority = 40;
            filterMode = "rules";
            settings = {
              server = { workers = 4; shutdown_timeout = 30; state_interval = 0.5; };
              store.filter_patterns = [ "*-secret-*" "*-mine-*" ];
              lan.extra_peers = [ "10.0.0.7" "pi.lan:4000" ];
              tracker.peer_id = "attic \"the\" host";
            };
          };
        }"#,
    );
    let unit = &json["systemd"]["services"]["peerix"]["serviceConfig"];
    assert_eq!(unit["Type"], "notify", "{unit:#}");
    assert_eq!(unit["StateDirectory"], "peerix");
    assert_eq!(unit["Restart"], "on-failure");
    assert_eq!(
        unit["ExecReload"],
        "/nix/store/00000000000000000000000000000000-coreutils/bin/kill -HUP $MAINPID"
    );
    assert!(
        unit["TimeoutStopSec"].as_f64().unwrap() > 30.0,
        "systemd waits longer than peerix drains: {unit:#}"
    );
    assert_eq!(
        unit["ReadWritePaths"],
        serde_json::json!(["/nix/var/nix/daemon-socket"])
    );
    for family in ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"] {
        assert!(
            unit["RestrictAddressFamilies"]
                .as_array()
                .unwrap()
                .contains(&Value::from(family)),
            "{family}: {unit:#}"
        );
    }
    for hardening in ["NoNewPrivileges", "ProtectHome", "PrivateTmp"] {
        assert_eq!(unit[hardening], true, "{hardening}: {unit:#}");
    }
    assert_eq!(unit["ProtectSystem"], "strict");
    assert_eq!(
        unit["LoadCredential"],
        serde_json::json!(["peerix-private-key:/etc/nix/cache-priv-key.pem"])
    );

    let args = exec_args(&json, "peerix", PEERIX);
    assert_eq!(flag_value(&args, "--state-dir"), "/var/lib/peerix");
    assert_eq!(flag_value(&args, "--tracker"), "http://10.0.0.2:12305");
    assert_eq!(flag_value(&args, "--private-key"), "%d/peerix-private-key");

    let text = str_of(&json, "/peerixConfigText");
    for line in [
        "[server]",
        "workers = 4",
        "state_interval = 0.5",
        "filter_patterns = [\"*-secret-*\", \"*-mine-*\"]",
        "extra_peers = [\"10.0.0.7\", \"pi.lan:4000\"]",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }

    // All of it, as peerix reads it.
    let config = peerix_config_of(&json);
    assert_eq!(config.tracker.as_deref(), Some("http://10.0.0.2:12305"));
    assert!(!config.lan.enabled, "a tracker and no lanDiscovery: no LAN");
    assert_eq!(config.state_dir, Path::new("/var/lib/peerix"));
    assert_eq!(
        config.private_key_file.as_deref(),
        Some(Path::new("%d/peerix-private-key"))
    );
    assert_eq!(config.filter_mode, FilterMode::Rules);
    assert_eq!(config.priority, 40);
    assert_eq!(config.peer_timeout.as_secs_f64(), 2.5);
    assert_eq!(config.workers, 4);
    assert_eq!(config.shutdown_timeout.as_secs(), 30);
    assert_eq!(config.state_interval.as_secs_f64(), 0.5);
    assert_eq!(config.filter_patterns, ["*-secret-*", "*-mine-*"]);
    let peers: Vec<String> = config
        .lan
        .extra_peers
        .iter()
        .map(|p| p.to_string())
        .collect();
    assert_eq!(peers, ["10.0.0.7:12304", "pi.lan:4000"]);
    assert_eq!(config.peer_id.as_deref(), Some("attic \"the\" host"));

    assert_eq!(
        json["nix"]["settings"]["extra-trusted-public-keys"],
        serde_json::json!(["attic-1:AAAA"])
    );
}

#[test]
fn the_defaults_are_lan_mode_the_signed_filter_and_an_open_port() {
    let json = eval_ok("{ services.peerix.enable = true; }");
    let config = peerix_config_of(&json);
    assert_eq!(config.tracker, None);
    assert!(config.lan.enabled, "no tracker: LAN mode");
    assert_eq!(config.filter_mode, FilterMode::Signed);
    assert_eq!(config.port, 12304);
    assert_eq!(str_of(&json, "/peerixConfigText"), "");
    let args = exec_args(&json, "peerix", PEERIX);
    assert!(!args.iter().any(|a| a == "--tracker"), "{args:?}");

    assert_eq!(
        json["networking"]["firewall"],
        serde_json::json!({ "allowedTCPPorts": [12304], "allowedUDPPorts": [12304] })
    );
    assert_eq!(
        json["nix"]["settings"],
        serde_json::json!({ "extra-substituters": ["http://127.0.0.1:12304"] })
    );
    assert_eq!(json["users"]["users"]["peerix"]["isSystemUser"], true);
    assert_eq!(
        json["systemd"]["services"]["peerix"]["serviceConfig"]["User"],
        "peerix"
    );
    // Nothing of the tracker unless it is enabled.
    assert!(json["systemd"]["services"].get("peerix-tracker").is_none());
}

#[test]
fn the_port_in_the_settings_is_the_one_opened_and_used_as_substituter() {
    let json = eval_ok("{ services.peerix = { enable = true; settings.server.port = 2000; }; }");
    assert_eq!(
        json["networking"]["firewall"],
        serde_json::json!({ "allowedTCPPorts": [2000], "allowedUDPPorts": [2000] })
    );
    assert_eq!(
        json["nix"]["settings"]["extra-substituters"],
        serde_json::json!(["http://127.0.0.1:2000"])
    );
    assert_eq!(peerix_config_of(&json).port, 2000);

    let closed = eval_ok("{ services.peerix = { enable = true; openFirewall = false; }; }");
    assert_eq!(
        closed["networking"]["firewall"],
        serde_json::json!({ "allowedTCPPorts": [], "allowedUDPPorts": [] })
    );
}

#[test]
fn lan_discovery_and_the_filter_switches_become_flags() {
    let on = eval_ok(
        r#"{ services.peerix = { enable = true; trackerUrl = "http://t:1"; lanDiscovery = true;
             noFilter = true; noVerify = true; allowInsecureHttp = true;
             upstreamCache = "http://10.0.0.9:8080/cache"; }; }"#,
    );
    let config = peerix_config_of(&on);
    assert!(config.lan.enabled, "a tracker and the LAN");
    assert_eq!(config.filter_mode, FilterMode::None);
    assert!(config.no_verify && config.allow_insecure_http);
    assert_eq!(config.upstream_cache, "http://10.0.0.9:8080/cache");

    let off = eval_ok("{ services.peerix = { enable = true; lanDiscovery = false; }; }");
    assert!(exec_args(&off, "peerix", PEERIX).contains(&"--no-lan".to_string()));
    assert!(!peerix_config_of(&off).lan.enabled);
}

#[test]
fn the_tracker_unit_has_its_port_database_and_state_directory() {
    let json = eval_ok(
        "{ services.peerix-tracker = { enable = true; port = 4000; \
           settings.registry.peer_ttl = 300; }; }",
    );
    let unit = &json["systemd"]["services"]["peerix-tracker"]["serviceConfig"];
    assert_eq!(unit["StateDirectory"], "peerix-tracker", "{unit:#}");
    assert_eq!(unit["Restart"], "on-failure");
    assert_eq!(
        json["networking"]["firewall"]["allowedTCPPorts"],
        serde_json::json!([4000])
    );
    assert!(json["systemd"]["services"].get("peerix").is_none());

    let mut args = exec_args(
        &json,
        "peerix-tracker",
        "/nix/store/00000000000000000000000000000000-peerix/bin/peerix-tracker",
    );
    assert_eq!(flag_value(&args, "--port"), "4000");
    assert_eq!(
        flag_value(&args, "--db"),
        "/var/lib/peerix-tracker/registry.sqlite"
    );
    // peerix-tracker reads its file itself: the rendered text, at a path
    // of this test's.
    let dir = TestDir::new("nixos-tracker");
    let file = dir.join("peerix-tracker.toml");
    std::fs::write(&file, str_of(&json, "/trackerConfigText")).unwrap();
    let at = args.iter().position(|a| a == "--config").unwrap();
    args[at + 1] = file.to_str().unwrap().to_string();
    match tracker_config::parse_args(args.iter().map(OsString::from)) {
        Ok(tracker_config::Command::Run(config)) => {
            assert_eq!(config.port, 4000);
            assert_eq!(
                config.db,
                Path::new("/var/lib/peerix-tracker/registry.sqlite")
            );
            assert_eq!(config.peer_ttl, 300);
        }
        other => panic!("peerix-tracker does not take {args:?}: {other:?}"),
    }
}

#[test]
fn options_of_the_wrong_type_fail_the_evaluation() {
    for (config, option) in [
        (
            r#"{ services.peerix = { enable = true; priority = "high"; }; }"#,
            "services.peerix.priority",
        ),
        (
            r#"{ services.peerix = { enable = true; filterMode = "everything"; }; }"#,
            "services.peerix.filterMode",
        ),
        (
            "{ services.peerix = { enable = true; filterConcurrency = 0; }; }",
            "services.peerix.filterConcurrency",
        ),
        (
            // Not a value TOML (as peerix reads it) can hold.
            "{ services.peerix = { enable = true; settings.server.workers = { a = 1; }; }; }",
            "services.peerix.settings",
        ),
        (
            "{ services.peerix-tracker = { enable = true; port = 70000; }; }",
            "services.peerix-tracker.port",
        ),
    ] {
        let stderr = eval_err(config);
        assert!(
            stderr.contains(option),
            "the error for {config} does not name {option}:\n{stderr}"
        );
    }
}

#[test]
fn the_flakes_module_defaults_to_the_flakes_own_package() {
    let lib = nixpkgs_lib();
    let json = evaluate(&[
        flake_module(&lib),
        "{ services.peerix.enable = true; services.peerix-tracker.enable = true; }".into(),
    ])
    .unwrap_or_else(|stderr| panic!("evaluation of the flake's module failed:\n{stderr}"));
    let built = "/nix/store/00000000000000000000000000000000-peerix-from-flake/bin/";
    exec_args(&json, "peerix", &format!("{built}peerix"));
    exec_args(&json, "peerix-tracker", &format!("{built}peerix-tracker"));
}

#[test]
fn a_command_line_splits_as_systemd_reads_it() {
    assert_eq!(
        split_command(r"/bin/p --a 'b c' 'it'\''s' %d/k"),
        ["/bin/p", "--a", "b c", "it's", "%d/k"]
    );
}
