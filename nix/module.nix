# NixOS module: services.peerix (the cache, one per host) and
# services.peerix-tracker (the optional registry of who holds what).
#
# Option names follow the original peerix module (peerix.nixosModules.peerix);
# the defaults are this peerix's: no public tracker exists, so trackerUrl
# defaults to null (LAN mode), and filterMode to "signed".
#
# The module needs nothing of pkgs but the packages and `writeText`: the
# TOML config file is rendered here, over lib only, so that the module can be
# evaluated (tests/nixos_module.rs) with nixpkgs' lib and no nixpkgs.
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf mkMerge types literalExpression;

  cfg = config.services.peerix;
  trackerCfg = config.services.peerix-tracker;

  # --- TOML, as much of it as the config files of peerix use: tables of
  # keys whose values are booleans, numbers, strings or arrays of them.
  tomlScalar = types.oneOf [ types.bool types.int types.float types.str types.path ];
  tomlValue = types.either tomlScalar (types.listOf tomlScalar);
  settingsType = types.attrsOf (types.attrsOf tomlValue);

  tomlKey = key:
    if builtins.match "[A-Za-z0-9_-]+" key != null then key else builtins.toJSON key;

  # Numbers and strings as JSON writes them are valid TOML, but a float
  # written without a fraction (toJSON 10.0 is "10") would read as an integer.
  tomlFloat = x:
    let text = builtins.toJSON x; in
    if builtins.match ".*[.eE].*" text != null then text else "${text}.0";

  tomlRender = value:
    if builtins.isBool value then lib.boolToString value
    else if builtins.isInt value then toString value
    else if builtins.isFloat value then tomlFloat value
    else if builtins.isList value then "[${lib.concatMapStringsSep ", " tomlRender value}]"
    # Strings, and paths as the text of the path (not copied to the store).
    else builtins.toJSON (toString value);

  toTOML = tables: lib.concatStringsSep "\n" (lib.mapAttrsToList
    (table: keys: "[${tomlKey table}]\n" + lib.concatStrings
      (lib.mapAttrsToList (key: value: "${tomlKey key} = ${tomlRender value}\n") keys))
    tables);

  configFileOption = { name, settings }: mkOption {
    type = types.path;
    default = pkgs.writeText "${name}.toml" (toTOML settings);
    defaultText = literalExpression "a file written from settings";
    description = ''
      The TOML config file given to `--config`. By default it is written
      from `settings`; a file of your own replaces them.
    '';
  };

  settingsOption = { example, keys }: mkOption {
    type = settingsType;
    default = { };
    inherit example;
    description = ''
      The TOML config file (`--config`), as tables of keys; for settings
      that have no option of their own here. The keys are those listed at
      the end of `${keys} --help`. The options of this module are passed as
      flags, and flags win over the file.
    '';
  };

  # --- peerix

  port = cfg.settings.server.port or 12304;
  shutdownTimeout = cfg.settings.server.shutdown_timeout or 10;
  daemonSocket = cfg.settings.store.daemon_socket or "/nix/var/nix/daemon-socket/socket";

  args = [
    "--config" "${cfg.configFile}"
    "--state-dir" "/var/lib/peerix"
    "--priority" (toString cfg.priority)
    "--timeout" (tomlFloat cfg.timeout)
    "--scan-interval" (toString cfg.scanInterval)
    "--filter-mode" cfg.filterMode
    "--filter-concurrency" (toString cfg.filterConcurrency)
    "--upstream-cache" cfg.upstreamCache
  ]
  ++ lib.optionals (cfg.trackerUrl != null) [ "--tracker" cfg.trackerUrl ]
  # systemd hands the key over in the credentials directory (%d), so it may
  # stay readable by root only.
  ++ lib.optionals (cfg.privateKeyFile != null) [ "--private-key" "%d/peerix-private-key" ]
  ++ lib.optional cfg.noFilter "--no-filter"
  ++ lib.optional cfg.noVerify "--no-verify"
  ++ lib.optional cfg.allowInsecureHttp "--allow-insecure-http"
  ++ lib.optional (cfg.lanDiscovery == true) "--lan-discovery"
  ++ lib.optional (cfg.lanDiscovery == false) "--no-lan";

  publicKeys = lib.optional (cfg.publicKey != null) cfg.publicKey
    ++ lib.optional (cfg.publicKeyFile != null)
      (lib.removeSuffix "\n" (builtins.readFile cfg.publicKeyFile));

  hardening = {
    NoNewPrivileges = true;
    ProtectSystem = "strict";
    ProtectHome = true;
    PrivateTmp = true;
    PrivateDevices = true;
    ProtectKernelTunables = true;
    ProtectKernelModules = true;
    ProtectKernelLogs = true;
    ProtectControlGroups = true;
    ProtectClock = true;
    ProtectHostname = true;
    ProtectProc = "invisible";
    RestrictNamespaces = true;
    RestrictRealtime = true;
    RestrictSUIDSGID = true;
    LockPersonality = true;
    MemoryDenyWriteExecute = true;
    RemoveIPC = true;
    CapabilityBoundingSet = "";
    AmbientCapabilities = "";
    SystemCallArchitectures = "native";
    SystemCallFilter = [ "@system-service" "~@privileged" ];
    UMask = "0077";
    # AF_NETLINK: the LAN side lists the interfaces' broadcast addresses.
    RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
  };

  # --- peerix-tracker

  trackerArgs = [
    "--config" "${trackerCfg.configFile}"
    "--port" (toString trackerCfg.port)
    "--db" "/var/lib/peerix-tracker/registry.sqlite"
  ];
in
{
  options.services.peerix = {
    enable = mkEnableOption "peerix, a peer-to-peer binary cache for Nix";

    package = mkOption {
      type = types.package;
      default = pkgs.peerix;
      defaultText = literalExpression "pkgs.peerix";
      description = "The peerix package (its `bin/peerix` is run).";
    };

    trackerUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "http://tracker.lan:12305";
      description = ''
        The tracker (`http://HOST:PORT`, see services.peerix-tracker). null:
        LAN mode, peers are found by UDP broadcast. With a tracker, the LAN
        is asked too only with `lanDiscovery = true`.
      '';
    };

    openFirewall = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Open the peerix port (`settings.server.port`, 12304) for TCP (peers
        fetch over HTTP) and UDP (LAN queries).
      '';
    };

    user = mkOption {
      type = types.str;
      default = "peerix";
      description = "User to run peerix as; made if it is the default.";
    };

    group = mkOption {
      type = types.str;
      default = "peerix";
      description = "Group to run peerix as; made if it is the default.";
    };

    privateKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/nix/cache-priv-key.pem";
      description = ''
        Nix secret key (`nix-store --generate-binary-cache-key`) that signs
        this host's own narinfos. Read by systemd (LoadCredential), so it can
        stay readable by root only. Give it as a string, so that it is not
        copied into the store.
      '';
    };

    publicKey = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "myhost-1:AAAA...";
      description = ''
        A public key (NAME:KEY) added to nix's trusted public keys, for
        narinfos signed by the peers' privateKeyFile.
      '';
    };

    publicKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      description = "As publicKey, read from a file at evaluation time.";
    };

    upstreamCache = mkOption {
      type = types.str;
      default = "https://cache.nixos.org";
      description = "The upstream cache of `filterMode = \"nixpkgs\"`.";
    };

    priority = mkOption {
      type = types.int;
      default = 5;
      description = "Cache priority in /nix-cache-info; lower is preferred.";
    };

    timeout = mkOption {
      type = types.number;
      default = 5.0;
      description = ''
        Seconds: connect and read timeout towards peers, and the limit of a
        request to the upstream cache.
      '';
    };

    scanInterval = mkOption {
      type = types.ints.unsigned;
      default = 3600;
      description = "Seconds between store scans; 0: never (reload rescans).";
    };

    filterMode = mkOption {
      type = types.enum [ "signed" "nixpkgs" "rules" "none" ];
      default = "signed";
      description = ''
        What this host shares. signed: paths a trusted key signed
        (`settings.store.trusted_keys`, by default cache.nixos.org's);
        nixpkgs: paths the upstream cache has with the same NarHash; rules:
        all but names on the deny-list; none: everything.
      '';
    };

    filterConcurrency = mkOption {
      type = types.ints.between 1 64;
      default = 10;
      description = "nixpkgs mode: requests to the upstream cache in flight at most.";
    };

    noFilter = mkOption {
      type = types.bool;
      default = false;
      description = "Share everything (as filterMode = \"none\").";
    };

    noVerify = mkOption {
      type = types.bool;
      default = false;
      description = "nixpkgs mode: share a path upstream has even if its NarHash differs.";
    };

    allowInsecureHttp = mkOption {
      type = types.bool;
      default = false;
      description = "Accept an http:// upstreamCache.";
    };

    lanDiscovery = mkOption {
      type = types.nullOr types.bool;
      default = null;
      description = ''
        Ask (and answer) peers on the LAN by UDP broadcast. null: on without
        a trackerUrl, off with one.
      '';
    };

    settings = settingsOption {
      keys = "peerix";
      example = literalExpression ''
        {
          server.workers = 8;
          lan.extra_peers = [ "10.0.0.7" ];
          store.trusted_keys = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
        }
      '';
    };

    configFile = configFileOption { name = "peerix"; inherit (cfg) settings; };
  };

  options.services.peerix-tracker = {
    enable = mkEnableOption "peerix-tracker, the registry of which peerix node holds which path";

    package = mkOption {
      type = types.package;
      default = pkgs.peerix;
      defaultText = literalExpression "pkgs.peerix";
      description = "The peerix package (its `bin/peerix-tracker` is run).";
    };

    port = mkOption {
      type = types.port;
      default = 12305;
      description = "Tracker HTTP port.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = true;
      description = "Open the tracker port for TCP.";
    };

    settings = settingsOption {
      keys = "peerix-tracker";
      example = literalExpression "{ registry.peer_ttl = 300; }";
    };

    configFile = configFileOption { name = "peerix-tracker"; inherit (trackerCfg) settings; };
  };

  config = mkMerge [
    (mkIf cfg.enable {
      systemd.services.peerix = {
        description = "peerix, a peer-to-peer binary cache for Nix";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" "nix-daemon.socket" ];
        after = [ "network-online.target" "nix-daemon.socket" ];
        serviceConfig = hardening // {
          # READY=1 after the first scan of the store, STOPPING=1 on SIGTERM.
          Type = "notify";
          ExecStart = "${cfg.package}/bin/peerix ${lib.escapeShellArgs args}";
          # SIGHUP rescans the store.
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          Restart = "on-failure";
          RestartSec = 5;
          # The first scan of a large store may take a while.
          TimeoutStartSec = "10min";
          # peerix lets running requests finish for the shutdown timeout.
          TimeoutStopSec = shutdownTimeout + 15;
          User = cfg.user;
          Group = cfg.group;
          StateDirectory = "peerix";
          StateDirectoryMode = "0700";
          # The nix-daemon socket: connecting needs it writable.
          ReadWritePaths = [ (dirOf daemonSocket) ];
          LoadCredential = lib.optional (cfg.privateKeyFile != null)
            "peerix-private-key:${toString cfg.privateKeyFile}";
        };
      };

      users.users = mkIf (cfg.user == "peerix") {
        peerix = {
          isSystemUser = true;
          group = cfg.group;
          description = "peerix binary cache";
        };
      };
      users.groups = mkIf (cfg.group == "peerix") { peerix = { }; };

      nix.settings = {
        extra-substituters = [ "http://127.0.0.1:${toString port}" ];
      } // lib.optionalAttrs (publicKeys != [ ]) {
        extra-trusted-public-keys = publicKeys;
      };

      networking.firewall = mkIf cfg.openFirewall {
        allowedTCPPorts = [ port ];
        # LAN queries go to the same port number, over UDP.
        allowedUDPPorts = [ port ];
      };
    })

    (mkIf trackerCfg.enable {
      systemd.services.peerix-tracker = {
        description = "peerix-tracker, the registry of peerix nodes";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        serviceConfig = hardening // {
          ExecStart = "${trackerCfg.package}/bin/peerix-tracker ${lib.escapeShellArgs trackerArgs}";
          # SIGHUP re-reads the allow-list (settings.registry.allow_nodes).
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          Restart = "on-failure";
          RestartSec = 5;
          DynamicUser = true;
          StateDirectory = "peerix-tracker";
          StateDirectoryMode = "0700";
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
        };
      };

      networking.firewall.allowedTCPPorts = mkIf trackerCfg.openFirewall [ trackerCfg.port ];
    })
  ];
}
