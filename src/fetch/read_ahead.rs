//! Reading ahead of nix on the peers, so that a path found on a peer costs
//! nix about what the peer's own `/local/` would.
//!
//! Nix walks a closure one narinfo at a time, and later fetches its NARs one
//! after another as each path's references become valid. Through this host,
//! each of those requests would wait for a round trip to the peer on top of
//! nix's own. So when nix gets the narinfo of a path a peer holds:
//!
//! - the narinfos of its references are looked up on the peers at once (not
//!   those this host's store has), so that nix's next requests find their
//!   answers cached; but only while no lookup needs a broadcast: read-ahead
//!   never sends a LAN query and never waits out a LAN window;
//! - its NAR, when small, is fetched and verified against its NarHash, and
//!   held until nix asks for it, within a memory budget and for a minute at
//!   most. Large NARs are not held: their time is their bytes, not the round
//!   trip.
//!
//! The work is queued here and done by the peer lane's workers, two at a time
//! at most, so that it never holds up nix's own requests.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::resolver::{Offer, Resolver};
use super::transfer::{MemoryBudget, Outcome, Plan, Reservation, Sink};
use crate::nix::hash::NarHash;
use crate::nix::store_path::HashPart;
use crate::peers::PeerId;

/// NARs up to this size are read ahead: below it, a NAR's time through
/// this host is mostly the round trip to the peer.
pub const MAX_NAR: u64 = 64 * 1024;
/// The memory all NARs read ahead may take together, held ones and those
/// being fetched.
pub const BUDGET: u64 = 2 * 1024 * 1024;
/// How long a NAR read ahead is kept for nix.
const HOLD: Duration = Duration::from_secs(60);
/// Lookups and fetches waiting at most; more are dropped.
const MAX_QUEUED: usize = 512;
/// Peer lane workers reading ahead at once, at most.
const MAX_RUNNERS: usize = 2;

/// How far down the references lookups go: the references of what nix
/// asked for, and theirs. Nix walks the whole closure anyway; two levels keep
/// the lookups ahead of it without filling the resolver's cache with a
/// closure of thousands.
const MAX_DEPTH: u8 = 2;

enum Job {
    /// Look the path up on the peers, so that its answer is cached; at this
    /// depth below what nix asked for.
    NarInfo(HashPart, u8),
    /// Fetch and hold the NAR of this offer.
    Nar(HashPart, Arc<Offer>),
}

struct Held {
    nar_hash: NarHash,
    bytes: Vec<u8>,
    expires: Instant,
    _memory: Reservation,
}

#[derive(Default)]
struct State {
    lookups: VecDeque<(HashPart, u8)>,
    nars: VecDeque<(HashPart, Arc<Offer>)>,
    runners: usize,
    /// The NAR a runner is fetching: one at a time, so that a lookup, which
    /// nix will ask for sooner, always finds a runner.
    fetching: Option<HashPart>,
    /// The NARs nix is getting through this host now, which are not read
    /// ahead: two fetches of one NAR would ask a liar twice.
    passing: HashSet<HashPart>,
    held: HashMap<HashPart, Held>,
}

impl State {
    fn queue_references(&mut self, offer: &Offer, depth: u8, is_local: &dyn Fn(&HashPart) -> bool) {
        let own = offer.narinfo.store_path.hash_part();
        for reference in &offer.narinfo.references {
            let reference = reference.hash_part();
            if reference == own || is_local(&reference) || self.lookups.len() >= MAX_QUEUED {
                continue;
            }
            // What nix asked for last is what it asks about next.
            if depth == 1 {
                self.lookups.push_front((reference, depth));
            } else {
                self.lookups.push_back((reference, depth));
            }
        }
    }

    fn next_job(&mut self) -> Option<Job> {
        if let Some((hash, depth)) = self.lookups.pop_front() {
            return Some(Job::NarInfo(hash, depth));
        }
        if self.fetching.is_some() {
            return None;
        }
        while let Some((hash, offer)) = self.nars.pop_front() {
            if !self.passing.contains(&hash) && !self.held.contains_key(&hash) {
                self.fetching = Some(hash);
                return Some(Job::Nar(hash, offer));
            }
        }
        None
    }

    /// Runners to wake for what is queued, counted as running.
    fn wake(&mut self) -> usize {
        let work =
            self.lookups.len() + usize::from(!self.nars.is_empty() && self.fetching.is_none());
        let wake = work.min(MAX_RUNNERS).saturating_sub(self.runners);
        self.runners += wake;
        wake
    }
}

/// What a read-ahead fetch brought, for the stats: the peer and the bytes.
pub type Fetched<'a> = &'a dyn Fn(PeerId, u64);

pub struct ReadAhead {
    state: Mutex<State>,
    /// Signalled when a NAR fetch ends.
    fetched: Condvar,
    /// How long nix's request waits for a fetch of its NAR under way.
    wait_limit: Duration,
    budget: MemoryBudget,
    budget_bytes: u64,
    max_nar: u64,
    counters: Counters,
}

/// What the read-ahead did, for `/health` and `/metrics`.
#[derive(Default)]
struct Counters {
    /// Paths it found on the peers before nix asked.
    found: AtomicU64,
    /// NARs it fetched, verified and held.
    nars_held: AtomicU64,
    /// Of those, the NARs nix then got from memory.
    nars_served: AtomicU64,
}

/// A reading of the counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadAheadCounts {
    pub found: u64,
    pub nars_held: u64,
    pub nars_served: u64,
    /// Bytes held or being fetched now.
    pub bytes: u64,
}

impl ReadAhead {
    /// NARs up to `max_nar` bytes are held, `budget` bytes of them at most;
    /// nix's request for a NAR being fetched waits for it `wait_limit` at
    /// most (the fetch's own deadline is the bound that matters).
    pub fn new(max_nar: u64, budget: u64, wait_limit: Duration) -> ReadAhead {
        ReadAhead {
            state: Mutex::new(State::default()),
            fetched: Condvar::new(),
            wait_limit,
            budget: MemoryBudget::new(budget),
            budget_bytes: budget,
            max_nar,
            counters: Counters::default(),
        }
    }

    /// Nix got the narinfo of `hash`, which `offer` holds: queues its NAR
    /// (when small) and the lookups of its references that `is_local`
    /// refuses. Returns how many peer lane workers to wake, each to call
    /// [`ReadAhead::run`].
    pub fn after_narinfo(
        &self,
        hash: &HashPart,
        offer: &Arc<Offer>,
        is_local: &dyn Fn(&HashPart) -> bool,
    ) -> usize {
        let mut state = self.lock();
        let now = Instant::now();
        state.held.retain(|_, held| held.expires > now);
        state.queue_references(offer, 1, is_local);
        if offer.narinfo.nar_size <= self.max_nar
            && !state.held.contains_key(hash)
            && state.nars.len() < MAX_QUEUED
        {
            state.nars.push_back((*hash, Arc::clone(offer)));
        }
        state.wake()
    }

    /// Runs queued work until there is none; called on a peer lane worker
    /// that [`ReadAhead::after_narinfo`] asked for.
    pub fn run(
        &self,
        resolver: &Resolver,
        is_local: &dyn Fn(&HashPart) -> bool,
        fetched: Fetched<'_>,
    ) {
        // The runner's place is given back when no job is left for it,
        // under the same lock as `after_narinfo` counts runners, so no job
        // is left behind; and by the guard should a job panic.
        let mut runner = Runner(Some(self));
        loop {
            let job = {
                let mut state = self.lock();
                match state.next_job() {
                    Some(job) => job,
                    None => {
                        state.runners = state.runners.saturating_sub(1);
                        runner.0 = None;
                        return;
                    }
                }
            };
            match job {
                Job::NarInfo(hash, depth) => {
                    if let Some(offer) = resolver.read_ahead(&hash) {
                        self.counters.found.fetch_add(1, Relaxed);
                        if depth < MAX_DEPTH {
                            self.lock().queue_references(&offer, depth + 1, is_local);
                        }
                    }
                }
                Job::Nar(hash, offer) => {
                    let fetch = Fetch(self);
                    self.fetch(resolver, &hash, &offer, fetched);
                    drop(fetch);
                }
            }
        }
    }

    /// The NAR of `hash` with `nar_hash`, if it was read ahead; it is held
    /// for one request only.
    pub fn take(&self, hash: &HashPart, nar_hash: &NarHash) -> Option<Vec<u8>> {
        self.take_from(&mut self.lock(), hash, nar_hash)
    }

    fn take_from(&self, state: &mut State, hash: &HashPart, nar_hash: &NarHash) -> Option<Vec<u8>> {
        let held = state.held.remove(hash)?;
        let good = held.nar_hash == *nar_hash && held.expires > Instant::now();
        if good {
            self.counters.nars_served.fetch_add(1, Relaxed);
        }
        good.then_some(held.bytes)
    }

    /// For nix's request of the NAR of `hash` on a peer lane worker: the
    /// NAR if it was read ahead, waiting for its fetch if one is under way;
    /// else the go-ahead to fetch it, with no read-ahead of it meanwhile.
    pub fn pass(&self, hash: &HashPart, nar_hash: &NarHash) -> Pass<'_> {
        let deadline = Instant::now() + self.wait_limit;
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            if state.fetching != Some(*hash) || now >= deadline {
                break;
            }
            state = self
                .fetched
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if let Some(nar) = self.take_from(&mut state, hash, nar_hash) {
            return Pass::Held(nar);
        }
        state.passing.insert(*hash);
        Pass::Fetch(Passing {
            read_ahead: self,
            hash: *hash,
        })
    }

    pub fn counts(&self) -> ReadAheadCounts {
        let c = &self.counters;
        ReadAheadCounts {
            found: c.found.load(Relaxed),
            nars_held: c.nars_held.load(Relaxed),
            nars_served: c.nars_served.load(Relaxed),
            bytes: self.budget_bytes.saturating_sub(self.budget.left()),
        }
    }

    fn fetch(&self, resolver: &Resolver, hash: &HashPart, offer: &Offer, fetched: Fetched<'_>) {
        let narinfo = &offer.narinfo;
        let size = narinfo.nar_size;
        // The copy holds the NAR whole to verify it: that memory is from the
        // budget too, until `hold` takes its own.
        let Some(checking) = self.budget.reserve(size) else {
            return;
        };
        let Some(mut source) =
            resolver.known_nar_source(hash, &narinfo.nar_hash, offer.source.peer)
        else {
            return;
        };
        let plan = Plan {
            nar_hash: narinfo.nar_hash,
            nar_size: size,
            start: 0,
            end: size,
            verify_whole: Some(checking),
            deadline: source.deadline,
        };
        let mut sink = VecSink(Vec::new());
        let (outcome, holder) = source.copy(&plan, &mut sink);
        drop(plan);
        if outcome != Outcome::Done {
            log::debug!("read-ahead of the NAR of {hash}: {outcome:?}");
            return;
        }
        // Only the bytes that went through the check are counted and held.
        if let Some(peer) = holder {
            fetched(peer, size);
        }
        self.hold(hash, narinfo.nar_hash, sink.0);
    }

    /// Keeps `nar`, which checked out against `nar_hash`, for nix; false
    /// when the budget has no room for it.
    fn hold(&self, hash: &HashPart, nar_hash: NarHash, nar: Vec<u8>) -> bool {
        let Some(memory) = self.budget.reserve(nar.len() as u64) else {
            return false;
        };
        self.counters.nars_held.fetch_add(1, Relaxed);
        self.lock().held.insert(
            *hash,
            Held {
                nar_hash,
                bytes: nar,
                expires: Instant::now() + HOLD,
                _memory: memory,
            },
        );
        true
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A worker running queued work, whose place is given back if a job
/// panics.
struct Runner<'r>(Option<&'r ReadAhead>);

impl Drop for Runner<'_> {
    fn drop(&mut self) {
        if let Some(read_ahead) = self.0 {
            let mut state = read_ahead.lock();
            state.runners = state.runners.saturating_sub(1);
        }
    }
}

/// A NAR fetch under way: when it ends, however, the next may start and
/// nix's request waiting for it goes on.
struct Fetch<'r>(&'r ReadAhead);

impl Drop for Fetch<'_> {
    fn drop(&mut self) {
        self.0.lock().fetching = None;
        self.0.fetched.notify_all();
    }
}

/// What nix's request for a NAR gets from the read-ahead: the NAR, or the
/// go-ahead to fetch it, during which no read-ahead fetches it.
pub enum Pass<'r> {
    Held(Vec<u8>),
    Fetch(Passing<'r>),
}

/// Nix's fetch of a NAR through this host, under way until dropped.
pub struct Passing<'r> {
    read_ahead: &'r ReadAhead,
    hash: HashPart,
}

impl Drop for Passing<'_> {
    fn drop(&mut self) {
        self.read_ahead.lock().passing.remove(&self.hash);
    }
}

/// The verified NAR, collected.
struct VecSink(Vec<u8>);

impl Sink for VecSink {
    fn begin(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::transfer::Holder;
    use crate::nix::narinfo::NarInfo;
    use crate::nix::store_path::StorePath;
    use crate::nix::testdata::{DIR_NAR, NARINFOS};
    use std::net::SocketAddr;

    fn hash(c: char) -> HashPart {
        HashPart::parse(&c.to_string().repeat(32)).unwrap()
    }

    /// The recorded `dir` narinfo, with `references` (one of them itself).
    fn offer(references: &[char]) -> Arc<Offer> {
        let mut narinfo = NarInfo::parse(NARINFOS[2].1).unwrap();
        narinfo.references = references
            .iter()
            .map(|&c| {
                StorePath::from_base_name(&format!("{}-ref", c.to_string().repeat(32))).unwrap()
            })
            .chain([narinfo.store_path.clone()])
            .collect();
        let peer = PeerId::Http(SocketAddr::from(([10, 0, 0, 1], 12304)));
        Arc::new(Offer {
            narinfo,
            source: Holder {
                peer,
                location: String::new(),
            },
            others: Vec::new(),
        })
    }

    fn own_hash(offer: &Offer) -> HashPart {
        offer.narinfo.store_path.hash_part()
    }

    #[test]
    fn references_not_here_are_looked_up_first_and_the_small_nar_after() {
        let read_ahead = ReadAhead::new(MAX_NAR, BUDGET, Duration::ZERO);
        let offer = offer(&['a', 'b', 'c']);
        let local = hash('b');
        let runners = read_ahead.after_narinfo(&own_hash(&offer), &offer, &|h| *h == local);
        assert_eq!(runners, MAX_RUNNERS, "two lookups and a NAR: both runners");
        let mut state = read_ahead.lock();
        let lookups: Vec<_> = state.lookups.iter().copied().collect();
        assert_eq!(lookups.len(), 2, "not itself, not what this host has");
        assert!(lookups.contains(&(hash('a'), 1)) && lookups.contains(&(hash('c'), 1)));
        assert_eq!(state.nars.len(), 1);
        assert!(matches!(state.next_job(), Some(Job::NarInfo(..))));
        assert!(matches!(state.next_job(), Some(Job::NarInfo(..))));
        assert!(matches!(state.next_job(), Some(Job::Nar(..))));
        state.nars.push_back((hash('d'), Arc::clone(&offer)));
        assert!(state.next_job().is_none(), "one NAR fetch at a time");
    }

    #[test]
    fn no_more_runners_than_the_limit_and_none_for_nothing() {
        let read_ahead = ReadAhead::new(MAX_NAR, BUDGET, Duration::ZERO);
        let offer = offer(&['a', 'b', 'c']);
        assert_eq!(
            read_ahead.after_narinfo(&own_hash(&offer), &offer, &|_| false),
            MAX_RUNNERS
        );
        assert_eq!(
            read_ahead.after_narinfo(&own_hash(&offer), &offer, &|_| false),
            0
        );
        let nothing = ReadAhead::new(0, BUDGET, Duration::ZERO);
        let leaf = self::offer(&[]);
        assert_eq!(
            nothing.after_narinfo(&own_hash(&leaf), &leaf, &|_| false),
            0
        );
    }

    #[test]
    fn a_large_nar_is_not_fetched_ahead() {
        let read_ahead = ReadAhead::new(DIR_NAR.len() as u64 - 1, BUDGET, Duration::ZERO);
        let offer = offer(&[]);
        read_ahead.after_narinfo(&own_hash(&offer), &offer, &|_| false);
        assert!(read_ahead.lock().nars.is_empty());
    }

    #[test]
    fn a_held_nar_is_given_once_and_only_for_its_nar_hash() {
        let read_ahead = ReadAhead::new(MAX_NAR, BUDGET, Duration::ZERO);
        let offer = offer(&[]);
        let (path, nar_hash) = (own_hash(&offer), offer.narinfo.nar_hash);
        assert!(read_ahead.hold(&path, nar_hash, DIR_NAR.to_vec()));
        let other = NarInfo::parse(NARINFOS[0].1).unwrap().nar_hash;
        assert_eq!(
            read_ahead.take(&path, &other),
            None,
            "another build of the path"
        );
        assert!(read_ahead.hold(&path, nar_hash, DIR_NAR.to_vec()));
        assert_eq!(read_ahead.take(&path, &nar_hash).as_deref(), Some(DIR_NAR));
        assert_eq!(read_ahead.take(&path, &nar_hash), None, "given once");
        let counts = read_ahead.counts();
        assert_eq!(
            (counts.nars_held, counts.nars_served, counts.bytes),
            (2, 1, 0)
        );
    }

    #[test]
    fn held_nars_stay_within_the_budget_and_give_it_back() {
        let size = DIR_NAR.len() as u64;
        let read_ahead = ReadAhead::new(MAX_NAR, size * 2, Duration::ZERO);
        let offer = offer(&[]);
        let nar_hash = offer.narinfo.nar_hash;
        assert!(read_ahead.hold(&hash('a'), nar_hash, DIR_NAR.to_vec()));
        assert!(read_ahead.hold(&hash('b'), nar_hash, DIR_NAR.to_vec()));
        assert!(
            !read_ahead.hold(&hash('c'), nar_hash, DIR_NAR.to_vec()),
            "over the budget"
        );
        assert_eq!(read_ahead.counts().bytes, size * 2);
        assert!(read_ahead.take(&hash('a'), &nar_hash).is_some());
        assert_eq!(read_ahead.counts().bytes, size);
        assert!(read_ahead.hold(&hash('c'), nar_hash, DIR_NAR.to_vec()));
    }

    #[test]
    fn an_expired_nar_is_not_given() {
        let read_ahead = ReadAhead::new(MAX_NAR, BUDGET, Duration::ZERO);
        let offer = offer(&[]);
        let nar_hash = offer.narinfo.nar_hash;
        assert!(read_ahead.hold(&hash('a'), nar_hash, DIR_NAR.to_vec()));
        read_ahead.lock().held.get_mut(&hash('a')).unwrap().expires = Instant::now();
        assert_eq!(read_ahead.take(&hash('a'), &nar_hash), None);
        // Expired ones are dropped, and their memory given back, as new
        // work comes.
        assert!(read_ahead.hold(&hash('b'), nar_hash, DIR_NAR.to_vec()));
        read_ahead.lock().held.get_mut(&hash('b')).unwrap().expires = Instant::now();
        read_ahead.after_narinfo(&own_hash(&offer), &offer, &|_| false);
        assert_eq!(read_ahead.counts().bytes, 0);
    }
}
