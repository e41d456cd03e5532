# Derivations built by both real Nix 2.8 and cairn (tests/tests/interop/build_nix.rs).
# `/bin/sh` is a static busybox in both sandboxes (sandbox-paths); `narHash` is the base-16
# SHA-256 of the NAR of a regular file holding "hello\n", which the test computes.
{ narHash }:
let
  sh = script: attrs: derivation ({
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  } // attrs);
  c1 = sh "echo one > $out" { name = "chain-1"; };
  c2 = sh "mkdir $out; cat ${c1} > $out/from-c1; echo ${c1} > $out/ref" { name = "chain-2"; };
  c3 = sh "cat ${c2}/from-c1 ${c2}/ref > $out; echo two >> $out" { name = "chain-3"; };
  flat-sha256 = sh "echo hello > $out" {
    name = "flat-sha256"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello\n";
  };
in {
  inherit c1 c2 c3 flat-sha256;

  # dev refers to out; doc to nothing.
  multi = sh "mkdir $out $dev $doc; echo lib > $out/lib; echo $out > $dev/include; echo manual > $doc/index"
    { name = "multi"; outputs = [ "out" "dev" "doc" ]; };

  # out refers to itself and to lib.
  selfref = sh "mkdir $out $lib; echo $out > $out/self; echo $lib > $out/lib-path; echo plain > $lib/x"
    { name = "selfref"; outputs = [ "out" "lib" ]; };

  # Fixed outputs: flat with three algorithms, and recursive.
  flat-sha1 = sh "echo hello > $out" {
    name = "flat-sha1"; outputHashMode = "flat"; outputHashAlgo = "sha1";
    outputHash = builtins.hashString "sha1" "hello\n";
  };
  flat-sha512 = sh "echo hello > $out" {
    name = "flat-sha512"; outputHashMode = "flat"; outputHashAlgo = "sha512";
    outputHash = builtins.hashString "sha512" "hello\n";
  };
  recursive = sh "echo hello > $out" {
    name = "recursive"; outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = narHash;
  };
  # Depends on a fixed output: its hash, not its derivation, enters this one's output path.
  uses-fixed = sh "cat ${flat-sha256} > $out" { name = "uses-fixed"; };

  fanout = import ./fanout.nix { n = 50; };
}
