# cairn and cairnd. Build with
#   nix-build -E 'with import <nixpkgs> {}; callPackage ./nix/package.nix {}'
{ lib, rustPlatform, installShellFiles, stdenv }:

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

  # Completions and man pages come from the built CLI itself (`cairn completions SHELL`,
  # `cairn man DIR`), generated from the same definitions that parse its command line.
  nativeBuildInputs = [ installShellFiles ];
  postInstall = lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd cairn \
      --bash <($out/bin/cairn completions bash) \
      --zsh <($out/bin/cairn completions zsh) \
      --fish <($out/bin/cairn completions fish)
    $out/bin/cairn man man1
    installManPage man1/*.1
    # The plain systemd units (socket activation), with this package's cairnd.
    install -Dm644 nix/systemd/cairnd.socket -t $out/lib/systemd/system
    substitute nix/systemd/cairnd.service $out/lib/systemd/system/cairnd.service \
      --replace-fail /usr/bin/cairnd $out/bin/cairnd
  '';

  meta = {
    description = "A content-addressed store daemon compatible with Nix store paths, NARs and export streams";
    homepage = "https://example.invalid/cairn";
    # "MIT OR Apache-2.0", as in Cargo.toml: either, at the user's choice.
    license = with lib.licenses; [ mit asl20 ];
    mainProgram = "cairn";
    platforms = lib.platforms.linux;
  };
}
