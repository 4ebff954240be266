//! Pure Nix formats: no I/O lives here.
//!
//! Everything is checked against output of real Nix (see `testdata`).

pub mod base64;
pub mod hash;
pub mod keys;
pub mod nar;
pub mod narinfo;
pub mod nix32;
pub mod store_path;

#[cfg(test)]
pub(crate) mod testdata;
