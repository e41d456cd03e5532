# Deterministic derivations realised by both real Nix 2.8 and cairn; every output must have the
# same path and NAR hash (figures in README.md). No nixpkgs: `/bin/sh` is a static busybox
# bound into the sandbox (`sandbox-paths = /bin/sh=/bin/busybox`).
#
#   nix-instantiate tests/nix/builds.nix            # every attribute, in name order
#   nix-instantiate tests/nix/builds.nix -A multi
let
  inherit (import ./lib.nix) sh;

  # A chain of three: each output's content depends on the previous one's.
  chain-1 = sh "echo one > $out" { name = "chain-1"; };
  chain-2 = sh "mkdir $out; cat ${chain-1} > $out/from-1; echo ${chain-1} > $out/ref-1; echo two >> $out/from-1"
    { name = "chain-2"; };
  chain-3 = sh "cat ${chain-2}/from-1 ${chain-2}/ref-1 > $out; echo three ${chain-2} >> $out" { name = "chain-3"; };

  # Fixed outputs: flat with sha256 (hash in base 16), sha1 (base 32) and sha512 (SRI), and a
  # recursive sha256 of a directory holding a file, an executable, a symlink and a subdirectory.
  fixed-flat-sha256 = sh "echo hello > $out" {
    name = "fixed-flat-sha256"; outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello\n";
  };
  fixed-flat-sha1 = sh "echo hello > $out" {
    name = "fixed-flat-sha1"; outputHashMode = "flat"; outputHashAlgo = "sha1";
    outputHash = "iwjz551fyw0cxcjgf4l6c879zabd6wpm";
  };
  fixed-flat-sha512 = sh "echo hello > $out" {
    name = "fixed-flat-sha512"; outputHashMode = "flat";
    outputHash = "sha512-58IrmUxZ2c8rSOVJseJGZmNgRZMNPafBrLKZ0cO3+TH5Sq5B7dosKyB6NuEPi8uNRSI+VIePWzFufOO2vAGWKQ==";
  };
  fixed-recursive-sha256 = sh ''
    mkdir -p $out/sub
    echo hello > $out/a
    ln -s a $out/link
    printf '#!/bin/sh\necho hi\n' > $out/sub/run
    chmod 755 $out/sub/run
  '' {
    name = "fixed-recursive-sha256"; outputHashMode = "recursive"; outputHashAlgo = "sha256";
    outputHash = "14c4flyk10yvd732z4j3m0f4y1kqnxfch0ygvixinlasx7whvadv";
  };
in {
  inherit chain-1 chain-2 chain-3;
  inherit fixed-flat-sha256 fixed-flat-sha1 fixed-flat-sha512 fixed-recursive-sha256;

  # Depends on a fixed output: its content hash, not its derivation, enters this output's path.
  uses-fixed = sh "cat ${fixed-flat-sha256} ${fixed-recursive-sha256}/a > $out" { name = "uses-fixed"; };

  # Three outputs: dev refers to out, doc to nothing; out is a single file.
  multi = sh ''
    echo lib > $out
    mkdir $dev $doc
    echo $out > $dev/lib-path
    echo manual > $doc/index.txt
  '' { name = "multi"; outputs = [ "out" "dev" "doc" ]; };

  # Uses multi's dev (so its closure has multi.out too).
  multi-user = sh "cat ${(import ./builds.nix).multi.dev}/lib-path > $out" { name = "multi-user"; };

  # out refers to itself and to dev; dev refers to neither.
  selfref = sh ''
    mkdir $out $dev
    echo $out > $out/self
    echo $dev > $out/dev-ref
    echo plain > $dev/x
  '' { name = "selfref"; outputs = [ "out" "dev" ]; };

  # 50 independent leaves and a root depending on all of them.
  fanout-50 = import ./fanout.nix { n = 50; };
}
