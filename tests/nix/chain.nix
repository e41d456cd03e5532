# A chain of n derivations, each depending on the previous (the benchmark uses n = 200):
#   nix-instantiate tests/nix/chain.nix --arg n 200
{ n ? 200 }:
let
  inherit (import ./lib.nix) sh;
  mk = i: prev: sh "echo ${toString i} ${prev} > $out" { name = "chain-${toString i}"; };
  go = i: if i == 0 then mk 0 "" else mk i "${go (i - 1)}";
in go (n - 1)
