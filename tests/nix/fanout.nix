# n independent leaves and one root depending on all of them (the benchmark uses n = 200):
#   nix-instantiate tests/nix/fanout.nix --arg n 200
{ n ? 200 }:
let
  inherit (import ./lib.nix) sh;
  leaf = i: sh "echo ${toString i} > $out" { name = "leaf-${toString i}"; };
in sh "cat ${toString (builtins.genList leaf n)} > $out" { name = "fanout-root-${toString n}"; }
