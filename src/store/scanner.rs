//! The scanner thread: keeps the index of valid paths and their share
//! decisions up to date, at start, every scan interval, and on SIGHUP.
//!
//! Scans are incremental. A path's metadata does not change once it is
//! valid, so a rescan lists the valid paths (QueryAllValidPaths, read as a
//! stream, never held whole) and asks the daemon about the new ones only;
//! the rest keep their share decision, and paths no longer listed drop out.
//! A rescan that finds nothing new and nothing gone builds nothing. Once a
//! day (`REDECIDE_AFTER`) a scan makes every decision again, for paths that
//! were signed after they became valid.
//!
//! When the shared set changes, the scanner sends the difference as a
//! [`ShareDelta`] to whoever subscribed (the LAN summary).
//!
//! A [`ScanControl`] pauses the scanner: no scan starts while it is paused
//! (one under way finishes). A scan that comes due meanwhile, by the
//! interval or a rescan request, is remembered and runs on the resume.
//!
//! In the `nixpkgs` share mode a new path's decision may wait on the
//! upstream cache: the scan indexes it as not shared, and after the scan
//! the scanner asks upstream about the waiting paths (a few at a time, see
//! `upstream`), then marks those it may share in a new index. Paths upstream
//! could not be asked about keep waiting, not shared, and are asked again
//! after a backoff (or on SIGHUP).
//!
//! While the nix-daemon cannot be reached it retries with a capped backoff, so
//! peerix can start before the daemon (or on a machine with none yet) and pick
//! it up later without a restart.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

use crate::nix::hash::NarHash;
use crate::nix::store_path::{HashPart, StorePath};

use super::index::{Bits, Index, PackedHash, pack, pack_path, unpack};
use super::{LocalPathInfo, LocalStore, StoreError};

const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How old share decisions may grow before a scan makes them all again.
pub const REDECIDE_AFTER: Duration = Duration::from_secs(24 * 3600);
/// When the upstream cache could not be asked: the first wait before it is
/// asked again, and the longest.
const UPSTREAM_FIRST_RETRY: Duration = Duration::from_secs(30);
const UPSTREAM_MAX_RETRY: Duration = Duration::from_secs(900);
/// Paths asked of upstream between two installs of the index: shares show
/// up while a large store is still being checked.
const UPSTREAM_BATCH: usize = 1000;

/// How the shared set changed in one scan.
///
/// `generation` is the index's generation after the change: a counter that
/// goes up by one exactly when the shared set changes (scans that change
/// nothing shared leave it, and send nothing). So deltas come numbered
/// 1, 2, 3, …, and a receiver that sees a gap has missed one and should
/// rebuild from `Index::for_each_shared`. The first delta (generation 1,
/// from the first scan) adds every shared path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShareDelta {
    pub generation: u64,
    pub added: Vec<HashPart>,
    pub removed: Vec<HashPart>,
}

/// Whether scans may start, shared by the scanner and the control
/// endpoints.
#[derive(Debug, Default)]
pub struct ScanControl {
    state: Mutex<PauseState>,
}

#[derive(Clone, Copy, Debug, Default)]
struct PauseState {
    paused: bool,
    /// A scan came due while paused.
    pending: bool,
}

impl ScanControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether scans are paused, and whether one waits for the resume.
    pub fn state(&self) -> (bool, bool) {
        let state = *self.lock();
        (state.paused, state.pending)
    }

    /// Stops scans from starting; returns whether they were running.
    pub fn pause(&self) -> bool {
        !std::mem::replace(&mut self.lock().paused, true)
    }

    /// Lets scans start again. Returns whether one came due while paused:
    /// then the caller wakes the scanner (it sleeps until woken) to run it.
    pub fn resume(&self) -> bool {
        let mut state = self.lock();
        state.paused = false;
        std::mem::take(&mut state.pending)
    }

    /// The scanner, with a scan due: whether to hold it until the resume
    /// (and remember it is due).
    fn hold(&self) -> bool {
        let mut state = self.lock();
        state.pending |= state.paused;
        state.paused
    }
}

/// Wakes the scanner early: SIGHUP writes a byte into this socket pair.
pub struct Wakeup {
    reader: UnixStream,
}

impl Wakeup {
    /// Registers SIGHUP to wake the scanner.
    pub fn on_sighup() -> std::io::Result<Wakeup> {
        let (reader, writer) = UnixStream::pair()?;
        writer.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, writer)?;
        Ok(Wakeup { reader })
    }

    /// Sleeps until `timeout` passes (`None`: for ever) or a wake-up arrives.
    /// Returns true when woken.
    fn wait(&mut self, timeout: Option<Duration>) -> bool {
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        if self.reader.set_read_timeout(timeout).is_err() {
            std::thread::sleep(timeout.unwrap_or(MAX_RETRY));
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(self.reader.read(&mut buf), Ok(n) if n > 0)
    }
}

/// Runs the scanner loop for ever.
///
/// `deltas`: where to send each change of the shared set. The scanner never
/// waits on it: it uses `try_send`, so the channel should be unbounded (a
/// delta per scan that changed something, sent after the index is
/// installed); on a full bounded channel the delta is dropped and the
/// receiver sees a gap in the generations. A receiver that is gone is
/// dropped.
pub fn run(
    store: Arc<LocalStore>,
    interval: Option<Duration>,
    mut wakeup: Wakeup,
    mut deltas: Option<Sender<ShareDelta>>,
) {
    let mut retry = FIRST_RETRY;
    let mut decided_at: Option<Instant> = None;
    // Whether a scan is due now, else when the next one is (`None`: only
    // when woken).
    let mut due = true;
    let mut next: Option<Instant> = None;
    let mut held = false;
    // Paths whose decision waits on the upstream cache, with their NarHash.
    let mut waiting: BTreeMap<PackedHash, (HashPart, NarHash)> = BTreeMap::new();
    let mut upstream_retry = UPSTREAM_FIRST_RETRY;
    loop {
        if !due {
            let woken = wakeup.wait(next.map(|at| at.saturating_duration_since(Instant::now())));
            if woken {
                log::info!("SIGHUP: rescanning the store");
            }
            due = woken || next.is_some_and(|at| Instant::now() >= at);
            continue;
        }
        if store.scan_control().hold() {
            if !held {
                log::info!("scanner paused: the scan that is due waits for the resume");
                held = true;
            }
            // The resume wakes it.
            wakeup.wait(None);
            continue;
        }
        held = false;
        due = false;
        let started = Instant::now();
        let redecide = decided_at.is_none_or(|at| at.elapsed() >= REDECIDE_AFTER);
        let old = store.index();
        match scan(&store, &old, redecide, deltas.is_some()) {
            Ok(outcome) => {
                let index = outcome.index.as_ref().unwrap_or(&old);
                log::info!(
                    "scan: {} valid paths (+{} new, -{} gone{}), {} shared, {} asked of the daemon, in {} ms",
                    index.len(),
                    outcome.new,
                    outcome.gone,
                    if redecide && !old.is_empty() {
                        ", all decided again"
                    } else {
                        ""
                    },
                    index.shared_len(),
                    outcome.asked,
                    started.elapsed().as_millis()
                );
                drop(old);
                if redecide {
                    decided_at = Some(started);
                }
                if !store.daemon_reachable() {
                    log::info!(
                        "nix-daemon at {} is reachable",
                        store.daemon().socket_path().display()
                    );
                }
                store.set_daemon_reachable(true);
                store.complete_scan(outcome.index);
                if let Some(delta) = outcome.delta {
                    send_delta(&mut deltas, delta);
                }
                retry = FIRST_RETRY;
                let mut wait = interval;
                if store.policy().upstream().is_some() {
                    let index = store.index();
                    waiting.retain(|packed, _| index.position_of(packed).is_some());
                    drop(index);
                    for (hash, nar_hash) in outcome.pending {
                        waiting.insert(pack(&hash), (hash, nar_hash));
                    }
                    if check_upstream(&store, &mut waiting, &mut deltas) {
                        upstream_retry = UPSTREAM_FIRST_RETRY;
                    } else {
                        log::info!(
                            "{} path(s) wait on the upstream cache, not shared; asking again in {} s",
                            waiting.len(),
                            upstream_retry.as_secs()
                        );
                        wait = Some(interval.map_or(upstream_retry, |i| i.min(upstream_retry)));
                        upstream_retry = (upstream_retry * 2).min(UPSTREAM_MAX_RETRY);
                    }
                }
                next = wait.and_then(|wait| Instant::now().checked_add(wait));
            }
            Err(e) => {
                drop(old);
                if store.daemon_reachable() || store.completed_scans() == 0 && retry == FIRST_RETRY
                {
                    log::warn!(
                        "cannot scan the store: {e}; serving no new local paths until it can, retrying in the background"
                    );
                }
                store.set_daemon_reachable(false);
                next = Some(Instant::now() + retry);
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// Sends a change of the shared set to the subscriber, if there is one.
fn send_delta(deltas: &mut Option<Sender<ShareDelta>>, delta: ShareDelta) {
    let Some(tx) = deltas else {
        return;
    };
    match tx.try_send(delta) {
        Ok(()) => {}
        Err(TrySendError::Full(delta)) => log::warn!(
            "share delta {} dropped: its receiver is behind",
            delta.generation
        ),
        Err(TrySendError::Disconnected(_)) => {
            log::debug!("the share delta receiver is gone");
            *deltas = None;
        }
    }
}

/// Asks the upstream cache about the waiting paths, a batch at a time, and
/// installs an index that shares those it may. Returns false when upstream
/// could not be asked: the paths not answered keep waiting, not shared.
fn check_upstream(
    store: &LocalStore,
    waiting: &mut BTreeMap<PackedHash, (HashPart, NarHash)>,
    deltas: &mut Option<Sender<ShareDelta>>,
) -> bool {
    let Some(upstream) = store.policy().upstream() else {
        return true;
    };
    let started = Instant::now();
    let (mut shared, mut answered) = (0, 0);
    while !waiting.is_empty() {
        let batch: Vec<(HashPart, NarHash)> =
            waiting.values().take(UPSTREAM_BATCH).copied().collect();
        let checked = upstream.check(batch);
        answered += checked.answered.len();
        let mut yes = Vec::new();
        for (packed, share) in &checked.answered {
            waiting.remove(packed);
            if *share {
                yes.push(*packed);
            }
        }
        if let Some((index, added)) = store.index().share_more(&yes) {
            shared += added.len();
            let delta = ShareDelta {
                generation: index.generation(),
                added,
                removed: Vec::new(),
            };
            store.update_index(index);
            if deltas.is_some() {
                send_delta(deltas, delta);
            }
        }
        if let Some(error) = checked.error {
            log::warn!(
                "upstream cache {} cannot be asked: {error}; its answers: {answered}, {shared} shared",
                upstream.url()
            );
            return false;
        }
    }
    if answered > 0 {
        log::info!(
            "upstream cache {}: {answered} path(s) answered, {shared} shared, in {} ms",
            upstream.url(),
            started.elapsed().as_millis()
        );
    }
    true
}

/// Lists the valid paths and decides the new ones against `old`.
pub fn scan(
    store: &LocalStore,
    old: &Index,
    redecide: bool,
    want_delta: bool,
) -> Result<ScanOutcome, StoreError> {
    let daemon = store.daemon();
    let policy = store.policy();
    let mut rescan = Rescan::new(old, redecide);
    let started = Instant::now();
    let listed =
        daemon.for_each_valid_path(|raw| rescan.visit(raw, |path| policy.allows_name(path)))?;
    log::debug!(
        "scan: {listed} paths listed in {} ms",
        started.elapsed().as_millis()
    );
    let started = Instant::now();
    let mut pending = Vec::new();
    rescan.resolve(|path| {
        let raw = path.to_string();
        // `None`: gone since the listing.
        let info = daemon.query_path_info(&raw)?;
        Ok::<_, StoreError>(info.map(|info| match LocalPathInfo::from_daemon(info) {
            Ok(info) => policy.decide(&info).unwrap_or_else(|| {
                // Waits on the upstream cache: not shared yet.
                pending.push((info.path.hash_part(), info.nar_hash));
                false
            }),
            Err(e) => {
                log::warn!("scan: not sharing {raw}: {e}");
                false
            }
        }))
    })?;
    log::debug!(
        "scan: {} decisions asked of the daemon in {} ms",
        rescan.asked,
        started.elapsed().as_millis()
    );
    let mut outcome = rescan.finish(want_delta);
    outcome.pending = pending;
    Ok(outcome)
}

/// What a scan found.
#[derive(Debug)]
pub struct ScanOutcome {
    /// The new index; `None` when nothing changed.
    pub index: Option<Index>,
    /// How the shared set changed; `None` when it did not, or no delta was wanted.
    pub delta: Option<ShareDelta>,
    /// Paths listed that the old index did not have.
    pub new: usize,
    /// Paths of the old index no longer listed.
    pub gone: usize,
    /// Paths whose share decision needed the daemon.
    pub asked: usize,
    /// Paths whose share decision waits on the upstream cache (indexed as
    /// not shared), with their NarHash.
    pub pending: Vec<(HashPart, NarHash)>,
}

/// One scan's listing, held against the previous index: the part of the
/// scan that needs no daemon. `visit` each listed path, `resolve` the ones
/// the name alone could not decide, then `finish`.
pub struct Rescan<'a> {
    old: &'a Index,
    redecide: bool,
    /// Old entries listed again.
    seen: Bits,
    new_shared: Vec<PackedHash>,
    new_unshared: Vec<PackedHash>,
    /// Base names of listed paths that wait for a decision, one a line.
    pending: String,
    asked: usize,
}

impl<'a> Rescan<'a> {
    /// `redecide`: decide every listed path again, not only the new ones.
    pub fn new(old: &'a Index, redecide: bool) -> Rescan<'a> {
        Rescan {
            old,
            redecide,
            seen: Bits::new(old.len()),
            new_shared: Vec::new(),
            new_unshared: Vec::new(),
            pending: String::new(),
            asked: 0,
        }
    }

    /// One listed path. A path the old index has keeps its decision (unless
    /// deciding again); for another, `by_name` decides from the name when it
    /// can, else it waits for `resolve`.
    pub fn visit(&mut self, raw: &str, by_name: impl FnOnce(&StorePath) -> Option<bool>) {
        let Some(packed) = pack_path(raw) else {
            log::warn!("scan: skipping unparsable store path {raw:?}");
            return;
        };
        if let Some(i) = self.old.position_of(&packed) {
            self.seen.set(i);
            if !self.redecide {
                return;
            }
        }
        let Ok(path) = StorePath::parse(raw) else {
            log::warn!("scan: skipping unparsable store path {raw:?}");
            return;
        };
        match by_name(&path) {
            Some(shared) => self.add(packed, shared),
            None => {
                self.pending.push_str(path.base_name());
                self.pending.push('\n');
            }
        }
    }

    fn add(&mut self, packed: PackedHash, shared: bool) {
        if shared {
            self.new_shared.push(packed);
        } else {
            self.new_unshared.push(packed);
        }
    }

    /// Decides the paths that wait for it; `decide` answers `None` for a path
    /// that is no longer valid, which is then left out.
    pub fn resolve<E>(
        &mut self,
        mut decide: impl FnMut(&StorePath) -> Result<Option<bool>, E>,
    ) -> Result<(), E> {
        let pending = std::mem::take(&mut self.pending);
        for base in pending.lines() {
            // Parsed once already, in `visit`.
            let Ok(path) = StorePath::from_base_name(base) else {
                continue;
            };
            self.asked += 1;
            if let Some(shared) = decide(&path)? {
                self.add(pack(&path.hash_part()), shared);
            }
        }
        Ok(())
    }

    /// The new index (if anything changed) and the change of the shared set.
    pub fn finish(mut self, want_delta: bool) -> ScanOutcome {
        let old = self.old;
        for list in [&mut self.new_shared, &mut self.new_unshared] {
            list.sort_unstable();
            list.dedup();
        }
        let new = if self.redecide {
            let listed_new = |h: &&PackedHash| old.position_of(h).is_none();
            self.new_shared.iter().filter(listed_new).count()
                + self.new_unshared.iter().filter(listed_new).count()
        } else {
            self.new_shared.len() + self.new_unshared.len()
        };
        let mut outcome = ScanOutcome {
            index: None,
            delta: None,
            new,
            gone: old.len() - self.seen.count_ones(),
            asked: self.asked,
            pending: Vec::new(),
        };
        if !self.redecide && outcome.new == 0 && outcome.gone == 0 {
            return outcome;
        }
        let mut index = self.build();
        if self.redecide && index.same_entries(old) {
            return outcome;
        }
        let mut delta = ShareDelta::default();
        let (added, removed) = diff_shared(old, &index, want_delta.then_some(&mut delta));
        let changed = added > 0 || removed > 0;
        let generation = old.generation() + u64::from(changed);
        index.set_generation(generation);
        if changed && want_delta {
            delta.generation = generation;
            outcome.delta = Some(delta);
        }
        outcome.index = Some(index);
        outcome
    }

    /// Merges the old entries still listed (unless all were decided again)
    /// with the new decisions.
    fn build(&mut self) -> Index {
        let shared = std::mem::take(&mut self.new_shared);
        let unshared = std::mem::take(&mut self.new_unshared);
        let kept_old = if self.redecide {
            0
        } else {
            self.seen.count_ones()
        };
        // The first scan of a store where every path is decided alike
        // takes its list as it is.
        if kept_old == 0 && unshared.is_empty() {
            let mut bits = Bits::new(shared.len());
            for i in 0..shared.len() {
                bits.set(i);
            }
            return Index::from_parts(shared, bits, 0);
        }
        if kept_old == 0 && shared.is_empty() {
            let bits = Bits::new(unshared.len());
            return Index::from_parts(unshared, bits, 0);
        }
        let old = self
            .old
            .entries()
            .enumerate()
            .filter(|(i, _)| !self.redecide && self.seen.get(*i))
            .map(|(_, (h, s))| (*h, s));
        let capacity = kept_old + shared.len() + unshared.len();
        let new = merge(
            shared.iter().map(|h| (*h, true)),
            unshared.iter().map(|h| (*h, false)),
        );
        Index::from_sorted(merge(old, new), capacity, 0)
    }
}

/// Two sorted sequences as one; of equal hashes, `a`'s comes first.
fn merge(
    a: impl Iterator<Item = (PackedHash, bool)>,
    b: impl Iterator<Item = (PackedHash, bool)>,
) -> impl Iterator<Item = (PackedHash, bool)> {
    let (mut a, mut b) = (a.peekable(), b.peekable());
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if y.0 < x.0 => b.next(),
        (Some(_), _) => a.next(),
        (None, _) => b.next(),
    })
}

/// How many hashes `new` shares that `old` did not, and how many the other
/// way; with `delta`, which ones, listed in it.
fn diff_shared(old: &Index, new: &Index, delta: Option<&mut ShareDelta>) -> (usize, usize) {
    let (mut added, mut removed) = (0, 0);
    let mut delta = delta;
    let mut a = old.entries().filter(|e| e.1).map(|e| e.0).peekable();
    let mut b = new.entries().filter(|e| e.1).map(|e| e.0).peekable();
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x == y => {
                a.next();
                b.next();
                continue;
            }
            (Some(x), Some(y)) => x < y,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        if take_a {
            let h = a.next().unwrap_or_else(|| unreachable!());
            removed += 1;
            if let Some(d) = delta.as_deref_mut() {
                d.removed.push(unpack(h));
            }
        } else {
            let h = b.next().unwrap_or_else(|| unreachable!());
            added += 1;
            if let Some(d) = delta.as_deref_mut() {
                d.added.push(unpack(h));
            }
        }
    }
    (added, removed)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::store::index::tests::Rng;

    fn path(hash: &HashPart, n: u64) -> String {
        format!("/nix/store/{hash}-p{n}")
    }

    /// One scan of `listing` against `old` with daemon decisions from
    /// `decide_fn` (`None`: gone since the listing); no decisions by name.
    /// Returns the outcome and how many decisions were asked.
    fn scan_with(
        old: &Index,
        listing: &[String],
        redecide: bool,
        decide_fn: impl Fn(&HashPart) -> Option<bool>,
    ) -> (ScanOutcome, usize) {
        let mut calls = 0;
        let mut rescan = Rescan::new(old, redecide);
        for raw in listing {
            rescan.visit(raw, |_| None);
        }
        rescan
            .resolve(|p| {
                calls += 1;
                Ok::<_, ()>(decide_fn(&p.hash_part()))
            })
            .unwrap();
        (rescan.finish(true), calls)
    }

    fn shared_set(index: &Index) -> BTreeSet<HashPart> {
        index.shared_hashes().collect()
    }

    #[test]
    fn a_rescan_with_nothing_new_asks_nothing_and_builds_nothing() {
        let mut rng = Rng(11);
        let hashes: Vec<HashPart> = (0..500).map(|_| rng.hash()).collect();
        let listing: Vec<String> = hashes.iter().zip(0..).map(|(h, n)| path(h, n)).collect();
        let (first, calls) = scan_with(&Index::default(), &listing, false, |h| {
            Some(h.as_str() < "h")
        });
        assert_eq!(calls, 500, "the first scan decides every path");
        assert_eq!((first.new, first.gone, first.asked), (500, 0, 500));
        let index = first.index.expect("a first index");
        assert_eq!(index.generation(), 1);
        let delta = first.delta.expect("a first delta");
        assert_eq!(delta.generation, 1);
        assert!(delta.removed.is_empty());
        assert_eq!(
            delta.added.iter().copied().collect::<BTreeSet<_>>(),
            shared_set(&index)
        );

        let mut reversed = listing.clone();
        reversed.reverse();
        let (again, calls) = scan_with(&index, &reversed, false, |_| panic!("asked"));
        assert_eq!(calls, 0);
        assert_eq!((again.new, again.gone, again.asked), (0, 0, 0));
        assert!(again.index.is_none() && again.delta.is_none());
    }

    #[test]
    fn rescans_agree_with_a_model_on_random_inputs() {
        for seed in 1..60u64 {
            let mut rng = Rng(seed);
            // The model: hash -> (path number, shared); the index's truth.
            let mut model: BTreeMap<HashPart, bool> = BTreeMap::new();
            let mut index = Index::default();
            let mut names: BTreeMap<HashPart, u64> = BTreeMap::new();
            let mut generation = 0;
            for round in 0..6 {
                // Keep some of the old paths, add some new ones.
                let mut listing: Vec<HashPart> = model
                    .keys()
                    .copied()
                    .filter(|_| rng.below(5) != 0)
                    .collect();
                let fresh: Vec<HashPart> = (0..rng.below(60)).map(|_| rng.hash()).collect();
                listing.extend(&fresh);
                if rng.below(4) == 0 && !listing.is_empty() {
                    // A path listed twice.
                    let again = listing[rng.below(listing.len() as u64) as usize];
                    listing.push(again);
                }
                for (i, h) in fresh.iter().enumerate() {
                    names
                        .entry(*h)
                        .or_insert(seed * 1000 + round * 100 + i as u64);
                }
                let raw: Vec<String> = listing.iter().map(|h| path(h, names[h])).collect();
                // Decisions that differ from round to round: kept ones must not change.
                let salt = rng.next();
                let decide = |h: &HashPart| {
                    let x = h
                        .as_str()
                        .bytes()
                        .fold(salt, |a, b| a.rotate_left(5) ^ u64::from(b));
                    // One in seven is gone by the time it is asked about.
                    (x % 7 != 0).then_some(x % 3 != 0)
                };
                let (outcome, calls) = scan_with(&index, &raw, false, decide);

                let listed: BTreeSet<HashPart> = listing.iter().copied().collect();
                let new: BTreeSet<HashPart> = listed
                    .iter()
                    .copied()
                    .filter(|h| !model.contains_key(h))
                    .collect();
                let mut next: BTreeMap<HashPart, bool> = model
                    .iter()
                    .filter(|(h, _)| listed.contains(h))
                    .map(|(h, s)| (*h, *s))
                    .collect();
                for h in &new {
                    if let Some(s) = decide(h) {
                        next.insert(*h, s);
                    }
                }
                let gone = model.keys().filter(|h| !listed.contains(h)).count();
                assert!(calls >= new.len(), "every new path is asked about");
                assert!(calls <= new.len() + 1, "and nothing else (but a repeat)");
                assert_eq!(outcome.asked, calls);
                assert_eq!(outcome.gone, gone, "seed {seed} round {round}");
                let shared_before: BTreeSet<HashPart> =
                    model.iter().filter(|e| *e.1).map(|e| *e.0).collect();
                let shared_after: BTreeSet<HashPart> =
                    next.iter().filter(|e| *e.1).map(|e| *e.0).collect();
                let changed = shared_before != shared_after;
                if changed {
                    generation += 1;
                }
                match &outcome.index {
                    Some(new_index) => {
                        let got: BTreeMap<HashPart, bool> =
                            new_index.entries().map(|(p, s)| (unpack(p), s)).collect();
                        assert_eq!(got, next, "seed {seed} round {round}");
                        assert_eq!(new_index.shared_len(), shared_after.len());
                        assert_eq!(new_index.generation(), generation);
                    }
                    None => {
                        assert_eq!(next, model, "no index: nothing changed");
                        assert_eq!(outcome.new + outcome.gone, 0);
                    }
                }
                match &outcome.delta {
                    Some(delta) => {
                        assert!(changed);
                        assert_eq!(delta.generation, generation);
                        let added: BTreeSet<_> = delta.added.iter().copied().collect();
                        let removed: BTreeSet<_> = delta.removed.iter().copied().collect();
                        assert_eq!(added.len(), delta.added.len(), "no repeats");
                        assert_eq!(
                            added,
                            shared_after.difference(&shared_before).copied().collect()
                        );
                        assert_eq!(
                            removed,
                            shared_before.difference(&shared_after).copied().collect()
                        );
                    }
                    None => assert!(!changed, "seed {seed} round {round}: a change unsent"),
                }
                if let Some(new_index) = outcome.index {
                    index = new_index;
                }
                model = next;
            }
        }
    }

    #[test]
    fn decisions_by_name_need_no_daemon() {
        let mut rng = Rng(5);
        let listing: Vec<String> = (0..100).map(|n| path(&rng.hash(), n)).collect();
        let empty = Index::default();
        let mut rescan = Rescan::new(&empty, false);
        let mut by_name = 0;
        for raw in &listing {
            rescan.visit(raw, |p| {
                by_name += 1;
                Some(!p.name().ends_with('7'))
            });
        }
        rescan.resolve(|_| Err("asked the daemon")).unwrap();
        let outcome = rescan.finish(false);
        assert_eq!((by_name, outcome.asked, outcome.new), (100, 0, 100));
        assert!(outcome.delta.is_none(), "no delta unless wanted");
        let index = outcome.index.unwrap();
        assert_eq!(index.len(), 100);
        assert_eq!(index.shared_len(), 90);
        assert_eq!(index.generation(), 1);
    }

    #[test]
    fn deciding_again_keeps_what_did_not_change() {
        let mut rng = Rng(9);
        let hashes: Vec<HashPart> = (0..200).map(|_| rng.hash()).collect();
        let listing: Vec<String> = hashes.iter().zip(0..).map(|(h, n)| path(h, n)).collect();
        let (first, _) = scan_with(&Index::default(), &listing, false, |_| Some(false));
        let index = first.index.unwrap();
        assert_eq!((index.shared_len(), index.generation()), (0, 0));
        assert!(
            first.delta.is_none(),
            "nothing shared: no change of the shared set"
        );

        // The same decisions again: every path asked, nothing built.
        let (same, calls) = scan_with(&index, &listing, true, |_| Some(false));
        assert_eq!((calls, same.new, same.gone), (200, 0, 0));
        assert!(same.index.is_none() && same.delta.is_none());

        // Two paths were signed since: only a full decision finds them.
        let signed = [hashes[3], hashes[150]];
        let decide = |h: &HashPart| Some(signed.contains(h));
        let (incremental, calls) = scan_with(&index, &listing, false, decide);
        assert_eq!(calls, 0);
        assert!(incremental.index.is_none());
        let (full, calls) = scan_with(&index, &listing, true, decide);
        assert_eq!(calls, 200);
        let new_index = full.index.unwrap();
        assert_eq!(new_index.shared_len(), 2);
        assert_eq!(new_index.generation(), 1);
        let delta = full.delta.unwrap();
        let mut want = signed.to_vec();
        want.sort();
        assert_eq!((delta.added, delta.removed), (want, vec![]));
    }

    #[test]
    fn unparsable_paths_are_skipped() {
        let h = "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d";
        let listing = [
            format!("/nix/store/{h}-ok"),
            format!("/nix/store/{h}"),
            format!("/nix/store/{h}-a/b"),
            format!("/tmp/{h}-x"),
            "".to_string(),
        ];
        let (outcome, calls) = scan_with(&Index::default(), &listing, false, |_| Some(true));
        assert_eq!(calls, 1);
        let index = outcome.index.unwrap();
        assert_eq!(index.len(), 1);
        assert!(index.is_shared(&HashPart::parse(h).unwrap()));
    }

    #[test]
    fn merge_keeps_order_and_the_first_of_equals() {
        let e = |b: u8, s| ([b; 20], s);
        let merged: Vec<_> = merge(
            [e(1, true), e(3, true), e(5, true)].into_iter(),
            [e(2, false), e(3, false), e(6, false)].into_iter(),
        )
        .collect();
        let firsts: Vec<(u8, bool)> = merged.iter().map(|(h, s)| (h[0], *s)).collect();
        assert_eq!(
            firsts,
            [
                (1, true),
                (2, false),
                (3, true),
                (3, false),
                (5, true),
                (6, false)
            ]
        );
        let index = Index::from_sorted(merged.into_iter(), 6, 0);
        assert_eq!(index.len(), 5, "the second 3 is dropped");
        assert_eq!(
            index.get_packed(&[3; 20]),
            Some(super::super::index::IndexEntry { shared: true })
        );
    }
}
