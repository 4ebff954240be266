//! This host's Nix store: the nix-daemon client, the NAR dumper and the index.

pub mod daemon;
pub mod dump;
