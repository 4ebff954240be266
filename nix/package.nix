# The peerix package. The integration tests need root, network namespaces and
# nix-daemons of their own, so they run in CI (.ci/run), not in the build sandbox.
{ lib, rustPlatform }:

rustPlatform.buildRustPackage {
  pname = "peerix";
  version = (lib.importTOML ../Cargo.toml).package.version;
  src = lib.cleanSourceWith {
    src = ../.;
    # tests/bench holds a cargo example that Cargo.toml names; the fuzz
    # targets, the tests' copy of nixpkgs' lib and anything built are left
    # out.
    filter = path: type:
      let base = baseNameOf path; in
      !(type == "directory" && (base == "target" || base == "fuzz" || base == "nixpkgs-lib"));
  };
  cargoLock.lockFile = ../Cargo.lock;
  # HTTPS to the upstream cache of `--filter-mode nixpkgs` (cache.nixos.org).
  buildFeatures = [ "tls" ];
  # GNU ld may be the linker here, and it has no identical code folding.
  env.PEERIX_NO_ICF = "1";
  doCheck = false;
  meta = {
    description = "Peer-to-peer binary cache for Nix";
    license = lib.licenses.mit;
    mainProgram = "peerix";
    platforms = lib.platforms.linux;
  };
}
