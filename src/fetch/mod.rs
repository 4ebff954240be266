//! Fetching from peers: find who has a store path, choose a narinfo that a
//! trusted key signed, and stream its NAR through to nix, checking every
//! byte on the way.
//!
//! - [`client`]: HTTP requests to a peer's `/local` cache (ureq, with
//!   timeouts), and what a bad answer means for the peer.
//! - `check`: NAR structure, length and SHA-256, as the bytes arrive.
//! - [`resolver`]: ask the LAN, pick and cache the answer.
//! - [`read_ahead`]: look up references and fetch small NARs before nix
//!   asks for them.
//! - [`transfer`]: copy one NAR from its holders, resuming from the next
//!   holder when one fails.

pub(crate) mod check;
pub mod client;
pub mod read_ahead;
pub mod resolver;
pub mod transfer;
pub mod transport;
