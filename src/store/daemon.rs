//! nix-daemon worker protocol client.
