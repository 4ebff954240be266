//! The seam between the resolver and the ways peers are found: a
//! [`Discovery`] source answers "who may have hash H?".
//!
//! Two kinds of source answer it. A directory (the LAN store summaries, the
//! tracker) knows at once. The LAN broadcast asks and waits for replies. A
//! [`Search`] says which it is, and the resolver takes a directory's answers
//! first, merges the holders from every source and ranks them in one place.

use super::PeerId;
use crate::nix::store_path::HashPart;

pub trait Discovery: Send + Sync {
    /// A short name for logs and `/health`: `lan`, `tracker`.
    fn name(&self) -> &'static str;

    /// Starts looking for the holders of `hash`.
    fn search(&self, hash: &HashPart) -> Box<dyn Search + '_>;

    /// Whether its searches may send queries and wait for answers (a LAN
    /// broadcast and its window).
    fn may_wait(&self) -> bool {
        false
    }

    /// Whether this directory answers for every peer there is to ask now,
    /// so that no source that waits needs to be asked.
    fn covers_all(&self) -> bool {
        false
    }
}

/// One search for the holders of one hash.
pub trait Search {
    /// Whether this source answers at once, from what it already knows.
    fn is_directory(&self) -> bool;

    /// Whether this directory answers for every peer there is to ask, so
    /// that what it does not name, no waited source needs to be asked for.
    fn covers_all(&self) -> bool {
        false
    }

    /// Whether this directory answers from what it holds in memory, with no
    /// request and no wait: what it settles may be answered in place, with
    /// no thread to wait on the network.
    fn answers_from_memory(&self) -> bool {
        false
    }

    /// The next holders to try, none given before. A directory gives all it
    /// knows at the first call; a broadcast waits for answers, as long as
    /// its rules say, and stops early once `enough` says the holders so far
    /// will do. Holders `usable` refuses (in backoff, banned) are left out.
    /// Empty once the source has nothing more to say.
    fn next_holders(
        &mut self,
        usable: &dyn Fn(&PeerId) -> bool,
        enough: &dyn Fn(&[PeerId]) -> bool,
    ) -> Vec<PeerId>;

    /// What asking `peer` showed: whether it held the path. A source that
    /// named it can tell an honest mistake from a lie.
    fn checked(&mut self, _peer: &PeerId, _held: bool) {}
}
