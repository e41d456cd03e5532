# cairn and cairnd. Build with
#   nix-build -E 'with import <nixpkgs> {}; callPackage ./nix/package.nix {}'
{ lib, rustPlatform }:

let
  workspace = (builtins.fromTOML (builtins.readFile ../Cargo.toml)).workspace.package;
in
rustPlatform.buildRustPackage {
  pname = "cairn";
  inherit (workspace) version;

  # The repository without build outputs and editor/VCS litter.
  src = lib.cleanSourceWith {
    src = ../.;
    filter =
      path: type:
      lib.cleanSourceFilter path type
      && !(builtins.elem (baseNameOf path) [ "target" "result" ]);
  };
  cargoLock.lockFile = ../Cargo.lock;

  # The CLI (`cairn`) and the daemon (`cairnd`).
  cargoBuildFlags = [ "--package" "cairn" "--package" "cairn-daemon" ];
  # Unit tests only: the end-to-end tests start daemons and drive real Nix, which the build
  # sandbox does not offer.
  cargoTestFlags = [ "--workspace" "--lib" "--bins" ];

  meta = {
    description = "A content-addressed store daemon compatible with Nix store paths, NARs and export streams";
    homepage = "https://example.invalid/cairn";
    # "MIT OR Apache-2.0", as in Cargo.toml: either, at the user's choice.
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "cairn";
    platforms = lib.platforms.linux;
  };
}
