# The peerix package. The integration tests need root, network namespaces and
# nix-daemons of their own, so they run in CI (.ci/run), not in the build sandbox.
{ lib, rustPlatform }:

rustPlatform.buildRustPackage {
  pname = "peerix";
  version = (lib.importTOML ../Cargo.toml).package.version;
  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type:
      let base = baseNameOf path; in
      !(type == "directory" && (base == "target" || base == "tests"));
  };
  cargoLock.lockFile = ../Cargo.lock;
  # HTTPS to the upstream cache of `--filter-mode nixpkgs` (cache.nixos.org).
  buildFeatures = [ "tls" ];
  doCheck = false;
  meta = {
    description = "Peer-to-peer binary cache for Nix";
    license = lib.licenses.mit;
    mainProgram = "peerix";
    platforms = lib.platforms.linux;
  };
}
