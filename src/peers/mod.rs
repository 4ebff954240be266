//! Peers: who they are ([`PeerId`]) and how they have behaved
//! ([`PeerTable`]).
//!
//! Every source of peers (the LAN broadcast today; LAN summaries, the
//! tracker and Iroh later) names them by [`PeerId`], and every outcome is
//! recorded against one table, so a peer found one way keeps its reputation
//! when it is found another.

mod discovery;
mod id;
mod table;

pub use discovery::{Discovery, Search};
pub use id::{HostKey, PeerId};
pub use table::{
    FIRST_BACKOFF, Failure, LIAR_BAN, MAX_BACKOFF, MAX_PEERS, PeerRecord, PeerTable, SavedPeer,
};
