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
      # The module alone takes pkgs.peerix (the overlay's); through the flake
      # it defaults to this flake's package, built with the host's nixpkgs.
      nixosModules.peerix = { lib, pkgs, ... }:
        let peerix = pkgs.callPackage ./nix/package.nix { }; in
        {
          imports = [ ./nix/module.nix ];
          services.peerix.package = lib.mkDefault peerix;
          services.peerix-tracker.package = lib.mkDefault peerix;
        };
      nixosModules.default = self.nixosModules.peerix;
    };
}
