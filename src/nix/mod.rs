//! Pure Nix formats: no I/O lives here.
