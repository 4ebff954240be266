//! The tracker: a registry of which node holds which path, for lookups
//! beyond the LAN. This module holds what the tracker and its clients share:
//! how a request is signed by the node it speaks for.

pub mod auth;
