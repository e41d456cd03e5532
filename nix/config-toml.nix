# Renders cairnd's TOML configuration from the `services.cairnd` options (see module.nix).
# cairnd rejects unknown keys. The options cover store-dir, root, socket, allowed-users,
# trusted-users, auto-start-daemon and log-level; the garbage-collection keys (keep-derivations,
# keep-outputs, runtime-roots, min-free, max-free, min-free-check-interval) and the binary-cache
# keys (trusted-public-keys, require-sigs) go in `extraConfig`.
# Strings and lists of strings are written as JSON, which is valid TOML for them. `extraConfig`
# is appended verbatim and must not repeat a key.
{
  storeDir ? "/store",
  root ? "/",
  socket ? null,
  allowedUsers ? [ "*" ],
  trustedUsers ? [ "root" ],
  autoStartDaemon ? false,
  logLevel ? "info",
  extraConfig ? "",
  ...
}:
let
  value = v: if builtins.isBool v then (if v then "true" else "false") else builtins.toJSON v;
  line = key: v: "${key} = ${value v}\n";
in
line "store-dir" storeDir
+ line "root" (toString root)
+ (if socket == null then "" else line "socket" (toString socket))
+ line "allowed-users" allowedUsers
+ line "trusted-users" trustedUsers
+ line "auto-start-daemon" autoStartDaemon
+ line "log-level" logLevel
+ extraConfig
