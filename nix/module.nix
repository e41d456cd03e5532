# NixOS module for cairnd. Import it and set `services.cairnd.enable = true;`:
#   imports = [ /path/to/cairn/nix/module.nix ];
# It writes the daemon's TOML configuration to /etc/cairn/cairn.toml (where `cairn` finds it
# too) and runs `cairnd --config /etc/cairn/cairn.toml` under systemd.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.cairnd;
  configText = import ./config-toml.nix {
    inherit (cfg) storeDir root socket allowedUsers trustedUsers logLevel extraConfig;
    # systemd runs the daemon; clients should not start their own.
    autoStartDaemon = false;
  };
  configFile = pkgs.writeText "cairn.toml" configText;
in
{
  options.services.cairnd = {
    enable = lib.mkEnableOption "cairnd, the cairn content-addressed store daemon";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The cairn package (provides `cairn` and `cairnd`).";
    };

    storeDir = lib.mkOption {
      type = lib.types.str;
      default = "/store";
      example = "/nix/store";
      description = ''
        Logical store directory, part of every store path's hash. Set it to "/nix/store" for
        paths identical to Nix's.
      '';
    };

    root = lib.mkOption {
      type = lib.types.path;
      default = "/";
      example = "/srv/cairn";
      description = "Physical root under which the store directory and cairn's state live.";
    };

    socket = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = "/run/cairn/socket";
      description = ''
        The daemon's Unix socket; null means cairnd's default,
        `<root>/var/lib/cairn/daemon-socket/socket`.
      '';
    };

    allowedUsers = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ "*" ];
      example = [ "@wheel" "alice" ];
      description = "Who may connect to the daemon: user names, `@group`, or `*`.";
    };

    trustedUsers = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ "root" ];
      example = [ "root" "@wheel" ];
      description = "Who may do what needs trust (importing unsigned paths): user names, `@group`, or `*`.";
    };

    logLevel = lib.mkOption {
      type = lib.types.str;
      default = "info";
      example = "cairnd=debug,info";
      description = "The daemon's tracing filter (`RUST_LOG` in its environment wins).";
    };

    extraConfig = lib.mkOption {
      type = lib.types.lines;
      default = "";
      description = ''
        Lines appended to the TOML configuration. cairnd rejects unknown keys and the options
        above already set every key, so this is for keys of newer cairnd versions.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    environment.etc."cairn/cairn.toml".source = configFile;

    systemd.services.cairnd = {
      description = "cairn content-addressed store daemon";
      wantedBy = [ "multi-user.target" ];
      after = [ "local-fs.target" ];
      restartTriggers = [ configFile ];
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/cairnd --config ${configFile}";
        Restart = "on-failure";
        # cairnd exits cleanly on SIGTERM after finishing in-flight requests.
        KillSignal = "SIGTERM";
        TimeoutStopSec = 60;
      };
    };
  };
}
