# The configuration module.nix writes for some non-default options, used by
# tests/tests/interop/interop_nix.rs to check that cairnd accepts it:
#   nix-instantiate --eval --strict --json --argstr root DIR --argstr socket PATH module-config.nix
{ root, socket }:
import ../config-toml.nix {
  storeDir = "/nix/store";
  inherit root socket;
  allowedUsers = [ "root" "@wheel" "*" ];
  trustedUsers = [ "root" "@wheel" ];
  logLevel = "cairnd=debug,info";
  extraConfig = ''
    # extra lines are appended verbatim
  '';
}
