# A text path and its one reference, used by tests/tests/interop/interop_nix.rs to export the referrer
# without its reference: `nix-instantiate --eval --read-write-mode --strict --json missing-ref.nix`
# gives { dep, referrer }.
let
  dep = builtins.toFile "dep" "the dependency\n";
in
{
  inherit dep;
  referrer = builtins.toFile "referrer" "uses ${dep}\n";
}
