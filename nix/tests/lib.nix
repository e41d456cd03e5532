# Shared helper: a derivation whose builder is `/bin/sh -c SCRIPT` (a static busybox, bound into
# the sandbox with `sandbox-paths = /bin/sh=/bin/busybox`). No nixpkgs.
{
  sh = script: attrs: derivation ({
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // attrs);
}
