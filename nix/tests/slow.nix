# A build that takes a while and says so in its log: `tag` makes distinct derivations,
# `seconds` how long it sleeps, `fail` makes the builder exit 3 after it, `src` is a file it
# copies into its output (an input source), `preferLocal` sets `preferLocalBuild`. No nixpkgs.
{ tag ? "x", seconds ? 3, fail ? false, src ? null, preferLocal ? false }:
derivation ({
  name = "slow-${tag}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ("echo start ${tag}; sleep ${toString seconds}; "
    + (if fail then "echo 'no luck' ${tag}; exit 3"
       else "echo done ${tag} > $out" + (if src == null then "" else "; cat ${src} >> $out"))) ];
} // (if preferLocal then { preferLocalBuild = true; } else { }))
