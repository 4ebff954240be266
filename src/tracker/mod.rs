//! The tracker: a registry of which node holds which path, for lookups
//! beyond the LAN: how a request is signed by the node it speaks for, and
//! peerix's client of it.

pub mod auth;
pub mod client;
