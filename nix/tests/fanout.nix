{ n ? 200 }:
let
  leaf = i: derivation {
    name = "leaf-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" "echo ${toString i} > $out" ];
  };
in derivation {
  name = "fanout-root";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "cat ${toString (builtins.genList leaf n)} > $out" ];
}
