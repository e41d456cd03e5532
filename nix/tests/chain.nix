{ n ? 200 }:
let
  mk = i: prev: derivation {
    name = "chain-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${toString i} ${prev} > $out" ];
  };
  go = i: if i == 0 then mk 0 "" else mk i "${go (i - 1)}";
in go (n - 1)
