# A build that takes a while and says so in its log: `tag` makes distinct derivations,
# `seconds` how long it sleeps. No nixpkgs.
{ tag ? "x", seconds ? 3 }:
derivation {
  name = "slow-${tag}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo start ${tag}; sleep ${toString seconds}; echo done ${tag} > $out" ];
}
