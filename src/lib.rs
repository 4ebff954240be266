//! peerix: a peer-to-peer binary cache for Nix.
//!
//! The daemon serves this host's Nix store as a binary cache over HTTP and, in
//! later stages, finds missing paths on peers. The crate is a library so that
//! integration tests and benchmarks can reach the pure format code; the
//! `peerix` binary in `main.rs` only parses the command line and starts threads.
#![forbid(unsafe_code)]

pub mod config;
pub mod fetch;
pub mod http;
pub mod identity;
pub mod json;
pub mod lan;
pub mod nix;
pub mod notify;
pub mod order;
pub mod peers;
pub mod state;
pub mod stats;
pub mod store;
pub mod tracker;
