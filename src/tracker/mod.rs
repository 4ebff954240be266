//! The tracker: a registry of which node holds which path, for lookups
//! beyond the LAN. [`auth`] is what the tracker and its clients share: how
//! a request is signed by the node it speaks for. [`client`] is peerix's
//! side. The rest is the `peerix-tracker` server (see [`api`] for its HTTP
//! API); the `peerix` binary does not use it, so none of it (nor SQLite) is
//! linked into it.

pub mod allow;
pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod db;
pub mod server;
