{
  description = "peerix: a peer-to-peer binary cache for Nix";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        peerix = pkgs.callPackage ./nix/package.nix { };
        default = peerix;
      });
      overlays.default = final: prev: {
        peerix = final.callPackage ./nix/package.nix { };
      };
    };
}
