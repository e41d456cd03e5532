# Probes of the sandbox (not deterministic across machines/configurations: they record what the
# builder sees). `input` gives them an input path so the chroot store is non-empty.
#   nix-instantiate probe.nix -A sandboxed   (normal derivation: private network)
#   nix-instantiate probe.nix -A fixed       (fixed-output: fails on purpose, its log is the probe)
{ salt ? "" }:
let
  inherit (import ./lib.nix) sh;
  input = sh "echo input > $out" { name = "probe-input"; };
  script = ''
    exec 2>&1
    echo "== argv0: $0"
    echo "== env (sorted)"; env | sort
    echo "== id"; id
    echo "== hostname"; hostname; cat /proc/sys/kernel/domainname
    echo "== /etc"; ls -la /etc
    for f in /etc/passwd /etc/group /etc/hosts /etc/nsswitch.conf /etc/resolv.conf; do echo "== $f"; cat $f | od -c | head -20; done
    echo "== uid_map"; cat /proc/self/uid_map; echo "== gid_map"; cat /proc/self/gid_map; echo "== setgroups"; cat /proc/self/setgroups
    echo "== pid"; echo $$
    echo "== ls -la /"; ls -la /
    echo "== ls -la /dev"; ls -la /dev
    echo "== ls -la /dev/pts"; ls -la /dev/pts
    echo "== ls -la /nix /nix/store"; ls -la /nix /nix/store
    echo "== ls -la /build"; ls -la /build
    echo "== ls -la /tmp"; ls -la /tmp
    echo "== pwd"; pwd
    echo "== mounts"; cat /proc/self/mounts
    echo "== net"; cat /proc/net/dev; ip addr 2>&1 || ifconfig -a 2>&1
    echo "== ulimit -c"; ulimit -c
    echo "== personality/randomize"; cat /proc/self/personality 2>&1; cat /proc/sys/kernel/randomize_va_space
    echo "== status"; grep -E 'NoNewPrivs|Seccomp|Cap' /proc/self/status
    echo "== chmod 4755"; touch /build/x; chmod 4755 /build/x; echo "rc=$?"; stat -c '%a' /build/x
    echo "== stdin"; ls -la /proc/self/fd/
    echo "== tty"; tty; echo "stdin-isatty: $([ -t 0 ] && echo y || echo n) stdout-isatty: $([ -t 1 ] && echo y || echo n)"
    echo "== passAsFile"; cat "$bigPath"; echo
    echo "== input"; cat ${input}
  '';
  structuredTail = ''
    echo == attrs.sh; cat /build/.attrs.sh; echo == attrs.json; cat /build/.attrs.json; echo
    mkdir "$(sed -n 's/.*"outputs":{"out":"\([^"]*\)"}.*/\1/p' /build/.attrs.json)"
  '';
in {
  sandboxed = sh (script + "mkdir $out; echo ok > $out/ok") {
    name = "probe-sandboxed"; inherit salt;
    big = "passed as file"; passAsFile = [ "big" ];
    impureEnvVars = [ "PROBE_IMPURE" ];
  };
  fixed = sh (script + "exit 1") {
    name = "probe-fixed"; inherit salt;
    big = "passed as file"; passAsFile = [ "big" ];
    impureEnvVars = [ "PROBE_IMPURE" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "0000000000000000000000000000000000000000000000000000";
  };
  # Nix 2.8 sets NIX_ATTRS_{SH,JSON}_FILE to the *host* build dir (/tmp/nix-build-...), not /build.
  structured = sh (script + structuredTail) {
    name = "probe-structured"; inherit salt;
    __structuredAttrs = true;
    foo = [ 1 2 "x" ];
  };
  # Which of Nix's variables a derivation attribute can override (PATH, HOME, NIX_STORE,
  # NIX_BUILD_CORES can; the others are set after the derivation's env), and placeholder rewriting.
  overrides = sh "env | sort > $out" {
    name = "probe-overrides"; inherit salt;
    PATH = "/drv-path"; HOME = "/drv-home"; NIX_STORE = "/drv-store"; NIX_BUILD_CORES = "77";
    NIX_BUILD_TOP = "/drv-top"; TMPDIR = "/drv-tmp"; PWD = "/drv-pwd"; TERM = "drv-term";
    NIX_LOG_FD = "9"; NIX_OUTPUT_CHECKED = "drv"; ph = builtins.placeholder "out";
  };
}
