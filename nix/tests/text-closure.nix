# A closure of `builtins.toFile` text paths around a tree added with `nix-store --add`, used by
# tests/tests/interop/interop_nix.rs: a diamond (top -> b, c -> a), a shared reference to the tree, a
# name with every special character a store path name may hold, and a leaf without references.
#
#   nix-instantiate --eval --read-write-mode --argstr tree /nix/store/…-tree text-closure.nix
{ tree }:
let
  t = builtins.storePath tree;
  a = builtins.toFile "a" "leaf\n";
  b = builtins.toFile "b" "b needs ${a}\n";
  c = builtins.toFile "c+x=y?_z-1.0.sh" ''
    #!/bin/sh
    exec ${a} "${t}/bin" "$@"
  '';
  top = builtins.toFile "top" ''
    b=${b}
    c=${c}
    tree=${t}
  '';
in
top
