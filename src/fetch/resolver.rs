//! Resolving a path this host lacks: ask every discovery source who has it,
//! rank the holders in one place, and take the best-ranked one whose narinfo
//! a trusted key signed; not simply the first reply.
//!
//! Answers are cached briefly, found and missing alike, so the many queries
//! of one `nix-store -r` (and nix's HEAD-then-GET) do not each ask again;
//! concurrent lookups of one hash share one lookup. The peers that answered
//! but were not needed are kept with the answer: they are the fallback
//! holders when the chosen peer fails mid-NAR, and their narinfos are
//! fetched only then.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::client::PeerError;
use super::transfer::{self, BufferPool, Holder, Outcome, Plan, Sink, transfer_budget};
use super::transport::Transport;
use crate::nix::hash::NarHash;
use crate::nix::keys::{PublicKey, any_valid_signature};
use crate::nix::narinfo::NarInfo;
use crate::nix::store_path::HashPart;
use crate::peers::{Discovery, PeerId, PeerTable, Search};

/// How long a found path is remembered; after that the next request asks
/// again, which is cheap.
const FOUND_TTL: Duration = Duration::from_secs(60);
/// How long a miss is remembered: short, so a peer that comes online is
/// found soon (nix itself remembers a 404 for an hour).
const MISSING_TTL: Duration = Duration::from_secs(10);
/// Answers remembered at most.
const MAX_ANSWERS: usize = 4096;

/// A path a peer offers, with a narinfo that checked out.
#[derive(Debug)]
pub struct Offer {
    /// The narinfo as the peer served it, signatures and all.
    pub narinfo: NarInfo,
    /// The peer that served it, and where on it the NAR is.
    pub source: Holder,
    /// Other peers that said they have the path, best first.
    pub others: Vec<PeerId>,
}

struct Answer {
    offer: Option<Arc<Offer>>,
    expires: Instant,
}

/// A lookup under way, which later lookups of the same hash wait for.
#[derive(Default)]
struct Flight {
    result: Mutex<Option<Option<Arc<Offer>>>>,
    done: Condvar,
}

pub struct Resolver {
    sources: Vec<Arc<dyn Discovery>>,
    transport: Arc<dyn Transport>,
    peers: Arc<PeerTable>,
    trusted_keys: Vec<PublicKey>,
    timeout: Duration,
    answers: Mutex<HashMap<HashPart, Answer>>,
    in_flight: Mutex<HashMap<HashPart, Arc<Flight>>>,
    buffers: BufferPool,
}

impl Resolver {
    /// `sources`: who to ask who has a path. `transport`: how peers are
    /// reached. `peers`: the one peer table, which sources may also judge
    /// by. `trusted_keys`: a peer's narinfo must carry a signature by one of
    /// these. `timeout`: the timeout towards peers.
    pub fn new(
        sources: Vec<Arc<dyn Discovery>>,
        transport: Arc<dyn Transport>,
        peers: Arc<PeerTable>,
        trusted_keys: Vec<PublicKey>,
        timeout: Duration,
    ) -> Resolver {
        Resolver {
            sources,
            transport,
            peers,
            trusted_keys,
            timeout,
            answers: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            buffers: BufferPool::default(),
        }
    }

    pub fn peers(&self) -> &PeerTable {
        &self.peers
    }

    pub fn transport(&self) -> &dyn Transport {
        &*self.transport
    }

    /// Read buffers for NAR transfers.
    pub fn buffers(&self) -> &BufferPool {
        &self.buffers
    }

    /// A peer's offer of `hash`, from the cache or asked for now.
    pub fn offer(&self, hash: &HashPart) -> Option<Arc<Offer>> {
        self.cached(hash).unwrap_or_else(|| self.resolve(hash))
    }

    /// Looks `hash` up ahead of nix, so that nix's own request finds the
    /// answer cached: only when it is not known yet, and only when no
    /// source would broadcast and wait (see [`super::read_ahead`]).
    /// Returns the offer when it was found now.
    pub fn read_ahead(&self, hash: &HashPart) -> Option<Arc<Offer>> {
        if self.cached(hash).is_some() || lock(&self.in_flight).contains_key(hash) {
            return None;
        }
        let covered = self.sources.iter().any(|source| source.covers_all());
        if covered || self.sources.iter().all(|source| !source.may_wait()) {
            return self.resolve(hash);
        }
        None
    }

    /// The answer for `hash` when it is known with no wait: a cached one,
    /// or a miss the directories settle from memory, as when the summaries
    /// cover every peer and none may hold it. `None` when the peers must be
    /// asked (see [`Resolver::offer`]). It sends nothing, waits for nothing
    /// and starts no lookup, so a worker that must not wait may call it.
    pub fn settled(&self, hash: &HashPart) -> Option<Option<Arc<Offer>>> {
        if let Some(answer) = self.cached(hash) {
            return Some(answer);
        }
        if self.sources.is_empty() {
            return Some(None);
        }
        // As in `next_holders`: a directory that covers every peer leaves
        // the waited sources out, but every directory is still asked; here
        // each must answer from memory.
        let mut directories: Vec<Box<dyn Search + '_>> = Vec::new();
        let mut covered = false;
        for source in &self.sources {
            let search = source.search(hash);
            if search.is_directory() {
                if !search.answers_from_memory() {
                    return None;
                }
                covered |= search.covers_all();
                directories.push(search);
            }
        }
        if !covered {
            return None;
        }
        let usable = |peer: &PeerId| self.peers.is_available(peer, Instant::now());
        let nobody = directories
            .iter_mut()
            .all(|search| search.next_holders(&usable, &|_| false).is_empty());
        nobody.then_some(None)
    }

    /// The cached answer for `hash`, if there is one still good: not
    /// expired, and not from a peer that has failed or lied since.
    fn cached(&self, hash: &HashPart) -> Option<Option<Arc<Offer>>> {
        let now = Instant::now();
        let answers = lock(&self.answers);
        let answer = answers.get(hash).filter(|answer| answer.expires > now)?;
        match &answer.offer {
            Some(offer) if !self.peers.is_available(&offer.source.peer, now) => None,
            offer => Some(offer.clone()),
        }
    }

    /// Asks the peers now, bypassing (and then refreshing) the cache. A
    /// lookup of the same hash already under way is waited for instead:
    /// nix asks for a narinfo with HEAD and GET, often at once.
    fn resolve(&self, hash: &HashPart) -> Option<Arc<Offer>> {
        let (flight, leader) = {
            let mut in_flight = lock(&self.in_flight);
            match in_flight.get(hash) {
                Some(flight) => (Arc::clone(flight), false),
                None => {
                    let flight = Arc::new(Flight::default());
                    in_flight.insert(*hash, Arc::clone(&flight));
                    (flight, true)
                }
            }
        };
        if !leader {
            return wait_for(&flight);
        }
        // Lands the result (nothing, should `find` panic) and lets the
        // waiters go, whatever happens.
        let mut landing = Landing {
            resolver: self,
            hash: *hash,
            flight,
            offer: None,
        };
        let offer = self.find(hash).map(Arc::new);
        self.remember(hash, offer.clone());
        landing.offer = offer.clone();
        offer
    }

    fn remember(&self, hash: &HashPart, offer: Option<Arc<Offer>>) {
        let ttl = if offer.is_some() {
            FOUND_TTL
        } else {
            MISSING_TTL
        };
        let mut answers = lock(&self.answers);
        if answers.len() >= MAX_ANSWERS {
            let now = Instant::now();
            answers.retain(|_, a| a.expires > now);
            if answers.len() >= MAX_ANSWERS {
                answers.clear();
            }
        }
        answers.insert(
            *hash,
            Answer {
                offer,
                expires: Instant::now() + ttl,
            },
        );
    }

    fn find(&self, hash: &HashPart) -> Option<Offer> {
        if self.sources.is_empty() {
            return None;
        }
        // Directories first: they answer at once.
        let (mut searches, others): (Vec<Box<dyn Search + '_>>, Vec<_>) = self
            .sources
            .iter()
            .map(|source| source.search(hash))
            .partition(|search| search.is_directory());
        searches.extend(others);
        let mut exhausted = vec![false; searches.len()];
        // Peers in backoff or banned are not heard at all.
        let usable = |peer: &PeerId| self.peers.is_available(peer, Instant::now());
        // A peer that has served us well is answer enough: no need to wait
        // for the others.
        let proven = |so_far: &[PeerId]| {
            so_far
                .iter()
                .any(|peer| self.peers.is_proven(peer, Instant::now()))
        };
        // The narinfo requests of one lookup, to all the peers asked, share
        // one timeout from the first answer: a miss costs the LAN window
        // plus that at most, whatever the peers do. A proven peer, asked
        // first, buys the others one timeout more, in case it has since
        // gone bad and hangs.
        let mut deadline: Option<Instant> = None;
        loop {
            let answered = next_holders(&mut searches, &mut exhausted, &usable, &proven);
            if answered.is_empty() {
                // Every source is done, and every peer heard has failed.
                return None;
            }
            let deadline = *deadline.get_or_insert_with(|| {
                let timeouts = if proven(&answered) { 2 } else { 1 };
                Instant::now() + self.timeout * timeouts
            });
            if Instant::now() >= deadline {
                return None;
            }
            let mut checked = |peer: &PeerId, held: bool| {
                for search in searches.iter_mut() {
                    search.checked(peer, held);
                }
            };
            if let Some(offer) = self.best_verified(hash, &answered, deadline, &mut checked) {
                return Some(offer);
            }
            // Every holder so far failed: keep listening, for a later,
            // honest one.
        }
    }

    /// The offer of the best-ranked peer among `answered` whose narinfo
    /// checks out by `deadline`; the rest are kept as fallbacks.
    fn best_verified(
        &self,
        hash: &HashPart,
        answered: &[PeerId],
        deadline: Instant,
        checked: &mut dyn FnMut(&PeerId, bool),
    ) -> Option<Offer> {
        let ranked = self.peers.rank(answered, Instant::now());
        log::debug!(
            "{hash}: {} peer(s) answered, {} usable",
            answered.len(),
            ranked.len()
        );
        for (i, &peer) in ranked.iter().enumerate() {
            if Instant::now() >= deadline {
                log::warn!("{hash}: peers too slow to answer; giving up");
                break;
            }
            let result = self.verified_narinfo(peer, hash, deadline);
            match &result {
                Ok(_) => checked(&peer, true),
                Err(PeerError::NotFound) => checked(&peer, false),
                Err(_) => {}
            }
            match result {
                Ok((narinfo, location)) => {
                    let source = Holder { peer, location };
                    return Some(Offer {
                        narinfo,
                        source,
                        others: ranked[i + 1..].to_vec(),
                    });
                }
                Err(e) => self.note(peer, hash, &e),
            }
        }
        None
    }

    /// A peer's narinfo for `hash`, if a trusted key signed it and its NAR
    /// can be fetched and checked here, with where on the peer the NAR is.
    fn verified_narinfo(
        &self,
        peer: PeerId,
        hash: &HashPart,
        deadline: Instant,
    ) -> Result<(NarInfo, String), PeerError> {
        let asked = Instant::now();
        let narinfo = self.transport.narinfo(&peer, hash, deadline)?;
        if !any_valid_signature(&self.trusted_keys, &narinfo.fingerprint(), &narinfo.sigs) {
            // A signature that claims a trusted key and fails is forged; a
            // path that no trusted key signed is honest, just of no use here
            // (the peer shares its own builds, or trusts other keys).
            let claims_trusted_key = narinfo.sigs.iter().any(|sig| {
                self.trusted_keys.iter().any(|key| {
                    sig.split_once(':')
                        .is_some_and(|(name, _)| name == key.name())
                })
            });
            let why = format!(
                "narinfo of {} is not signed by a trusted key",
                narinfo.store_path
            );
            return Err(if claims_trusted_key {
                PeerError::Lied(format!("{why}: its signature does not verify"))
            } else {
                PeerError::Unusable(why)
            });
        }
        if narinfo.compression != "none" {
            return Err(PeerError::Unusable(format!(
                "NAR compressed with {}",
                narinfo.compression
            )));
        }
        let Some(location) = self.transport.locate_nar(&peer, &narinfo.url) else {
            return Err(PeerError::Unusable(format!(
                "NAR URL {:?} is not one this host fetches",
                narinfo.url
            )));
        };
        // A good narinfo proves the peer, so the next query need not wait
        // for other replies (see `find`).
        // (Its bytes are not counted: the table counts NAR bytes.)
        self.peers.record_success(peer, 0, asked.elapsed());
        Ok((narinfo, location))
    }

    fn note(&self, peer: PeerId, hash: &HashPart, error: &PeerError) {
        error.record(&self.peers, peer, &format!("narinfo of {hash}"));
    }

    /// The holders of NAR `nar_hash` of path `hash`, `named` first (the peer
    /// nix's narinfo URL names), then the rest. `None` when no peer offers
    /// that NAR.
    pub fn nar_source(
        &self,
        hash: &HashPart,
        nar_hash: &NarHash,
        named: PeerId,
    ) -> Option<NarSource<'_>> {
        self.nar_source_asking(hash, nar_hash, named, true)
    }

    /// [`Resolver::nar_source`] from the cached answer alone: no peer is
    /// asked, now or when the holders fail (for the read-ahead, which never
    /// broadcasts).
    pub fn known_nar_source(
        &self,
        hash: &HashPart,
        nar_hash: &NarHash,
        named: PeerId,
    ) -> Option<NarSource<'_>> {
        self.nar_source_asking(hash, nar_hash, named, false)
    }

    fn nar_source_asking(
        &self,
        hash: &HashPart,
        nar_hash: &NarHash,
        named: PeerId,
        ask: bool,
    ) -> Option<NarSource<'_>> {
        let offer = match self.cached(hash) {
            Some(Some(offer)) if offer.narinfo.nar_hash == *nar_hash => offer,
            // Not cached, cached as missing, or another build of the path:
            // ask the peers (once).
            _ if ask => self.resolve(hash)?,
            _ => return None,
        };
        // Without a narinfo for this very NAR, its size is unknown here.
        if offer.narinfo.nar_hash != *nar_hash {
            return None;
        }
        let nar_size = offer.narinfo.nar_size;
        let deadline = Instant::now() + transfer_budget(nar_size, self.timeout);
        // The peer nix's URL names goes first if it is still among those
        // that offered the path; the URL is not trusted to name any other.
        let mut queue = VecDeque::new();
        if named != offer.source.peer && offer.others.contains(&named) {
            queue.push_back(Pending::Candidate(named));
        }
        queue.extend(Pending::all(&offer, nar_hash));
        Some(NarSource {
            resolver: self,
            hash: *hash,
            nar_hash: *nar_hash,
            nar_size,
            deadline,
            queue,
            tried: Vec::new(),
            refreshed: !ask,
        })
    }
}

/// The next holders from the sources, merged (the caller ranks them in one
/// place): every directory's at once, and the waited sources' too, unless
/// a directory answers for every peer there is: then what it does not
/// name, nobody has, and nothing is broadcast or waited for.
fn next_holders(
    searches: &mut [Box<dyn Search + '_>],
    exhausted: &mut [bool],
    usable: &dyn Fn(&PeerId) -> bool,
    enough: &dyn Fn(&[PeerId]) -> bool,
) -> Vec<PeerId> {
    let covered = searches
        .iter()
        .any(|search| search.is_directory() && search.covers_all());
    let mut holders: Vec<PeerId> = Vec::new();
    for (search, exhausted) in searches.iter_mut().zip(exhausted.iter_mut()) {
        if *exhausted || (covered && !search.is_directory()) {
            continue;
        }
        let found = search.next_holders(usable, enough);
        if found.is_empty() {
            *exhausted = true;
        }
        for peer in found {
            if !holders.contains(&peer) {
                holders.push(peer);
            }
        }
    }
    holders
}

/// Ends a lookup others may wait for: on drop, takes it off the flights
/// and hands its result to the waiters.
struct Landing<'r> {
    resolver: &'r Resolver,
    hash: HashPart,
    flight: Arc<Flight>,
    offer: Option<Arc<Offer>>,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        lock(&self.resolver.in_flight).remove(&self.hash);
        *lock(&self.flight.result) = Some(self.offer.take());
        self.flight.done.notify_all();
    }
}

/// The result of another thread's lookup. It is bounded by that lookup's
/// own deadlines; should the thread die, the waiter finds nothing.
fn wait_for(flight: &Flight) -> Option<Arc<Offer>> {
    let mut result = lock(&flight.result);
    loop {
        if let Some(offer) = result.as_ref() {
            return offer.clone();
        }
        let (next, timeout) = flight
            .done
            .wait_timeout(result, Duration::from_secs(60))
            .unwrap_or_else(|e| e.into_inner());
        result = next;
        if timeout.timed_out() && result.is_none() {
            return None;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

enum Pending {
    Known(Holder),
    /// Said it has the path; its narinfo is checked when it is needed.
    Candidate(PeerId),
}

impl Pending {
    /// The holders an offer names: its source, if it serves `nar_hash`, and
    /// every other peer that answered (they may hold that NAR either way).
    fn all(offer: &Offer, nar_hash: &NarHash) -> Vec<Pending> {
        let source =
            (offer.narinfo.nar_hash == *nar_hash).then(|| Pending::Known(offer.source.clone()));
        source
            .into_iter()
            .chain(offer.others.iter().copied().map(Pending::Candidate))
            .collect()
    }
}

/// The holders of one NAR, yielded best first and each at most once;
/// peers in backoff or banned are skipped, even if that happened during
/// this very transfer.
pub struct NarSource<'r> {
    resolver: &'r Resolver,
    hash: HashPart,
    nar_hash: NarHash,
    pub nar_size: u64,
    /// When the whole transfer must be over, whichever holders serve it.
    pub deadline: Instant,
    queue: VecDeque<Pending>,
    tried: Vec<PeerId>,
    /// Whether the LAN was asked again during this transfer.
    refreshed: bool,
}

impl NarSource<'_> {
    /// Copies `plan` to `sink` from these holders, best first, recording
    /// each outcome in the peer table; returns the outcome and the last
    /// holder tried: the one that completed the copy, when it is done.
    pub fn copy(&mut self, plan: &Plan, sink: &mut dyn Sink) -> (Outcome, Option<PeerId>) {
        let resolver = self.resolver;
        let mut holder = None;
        let outcome = transfer::copy(
            plan,
            &mut || {
                let next = self.next_holder();
                holder = next.as_ref().map(|h| h.peer);
                next
            },
            resolver.transport(),
            resolver.peers(),
            resolver.buffers(),
            sink,
        );
        (outcome, holder)
    }

    pub fn next_holder(&mut self) -> Option<Holder> {
        if let Some(holder) = self.next_queued() {
            return Some(holder);
        }
        // Every known holder failed: the answer may be stale, so ask the
        // LAN once more before giving up (a failed NAR fails nix's build).
        if !self.refreshed {
            self.refreshed = true;
            if let Some(offer) = self.resolver.resolve(&self.hash) {
                self.queue.extend(Pending::all(&offer, &self.nar_hash));
            }
        }
        self.next_queued()
    }

    fn next_queued(&mut self) -> Option<Holder> {
        while let Some(pending) = self.queue.pop_front() {
            let peer = match &pending {
                Pending::Known(holder) => holder.peer,
                Pending::Candidate(peer) => *peer,
            };
            if self.tried.contains(&peer)
                || !self.resolver.peers.is_available(&peer, Instant::now())
            {
                continue;
            }
            self.tried.push(peer);
            match pending {
                Pending::Known(holder) => return Some(holder),
                Pending::Candidate(peer) => {
                    match self
                        .resolver
                        .verified_narinfo(peer, &self.hash, self.deadline)
                    {
                        Ok((narinfo, location))
                            if narinfo.nar_hash == self.nar_hash
                                && narinfo.nar_size == self.nar_size =>
                        {
                            return Some(Holder { peer, location });
                        }
                        Ok(_) => log::info!("peer {peer} has another build of {}", self.hash),
                        Err(e) => self.resolver.note(peer, &self.hash, &e),
                    }
                }
            }
        }
        None
    }
}
