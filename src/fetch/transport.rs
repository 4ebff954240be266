//! The seam between the resolver and the ways a peer is reached: a
//! [`Transport`] fetches a peer's narinfo and its NAR from an offset.
//!
//! HTTP ([`super::client::PeerClient`]) is the transport today, for peers
//! found on the LAN or through the tracker; Iroh will be the second. The
//! resolver and the verified transfer see only this trait.

use std::io::Read;
use std::time::{Duration, Instant};

use super::client::PeerError;
use crate::nix::narinfo::NarInfo;
use crate::nix::store_path::HashPart;
use crate::peers::PeerId;

/// A NAR body as it comes from a peer.
pub type NarBody = Box<dyn Read + Send>;

pub trait Transport: Send + Sync {
    /// `peer`'s narinfo for `hash`, parsed; a narinfo for another path is a
    /// lie. The whole exchange ends by `deadline`.
    fn narinfo(
        &self,
        peer: &PeerId,
        hash: &HashPart,
        deadline: Instant,
    ) -> Result<NarInfo, PeerError>;

    /// Where on `peer` the NAR that its narinfo's `URL:` names is, if this
    /// host may fetch it; `None` refuses the URL.
    fn locate_nar(&self, peer: &PeerId, url: &str) -> Option<String>;

    /// The NAR at `location` (from [`Transport::locate_nar`]) on `peer`,
    /// from byte `offset` on. Everything ends by `deadline`.
    fn nar(
        &self,
        peer: &PeerId,
        location: &str,
        offset: u64,
        deadline: Instant,
    ) -> Result<NarBody, PeerError>;

    /// How long one chunk of a NAR may take: the floor on a holder's rate.
    fn chunk_timeout(&self) -> Duration;
}
