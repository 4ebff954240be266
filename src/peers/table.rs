//! The peer table: what this host has seen of each peer host, and whom to ask
//! first.
//!
//! Every fetch outcome is recorded against the peer's [`HostKey`] (for an
//! HTTP peer its IP address), not its `ip:port`: a peer names its own HTTP
//! port in its UDP replies, so a liar could otherwise shed a ban by naming a
//! new port. A host that fails
//! (unreachable, slow, dead mid-stream) goes into exponential backoff, capped;
//! a host that lies (a bad signature, a NAR whose hash or size is wrong,
//! garbage bytes) is banned for far longer than any backoff. Hosts in backoff
//! or banned are skipped, on the UDP path too. Time is passed in, so the rules
//! are tested without sleeping.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{HostKey, PeerId};

/// The first backoff after a failure; it doubles with each further failure.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(2);
/// The longest backoff for an honest but failing peer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a peer that served wrong data is shunned.
pub const LIAR_BAN: Duration = Duration::from_secs(24 * 3600);
/// Peer hosts remembered at most.
pub const MAX_PEERS: usize = 1024;

/// What went wrong with a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Unreachable, timed out, or died mid-transfer: maybe a passing problem.
    Unavailable,
    /// Served a bad signature, a wrong hash or size, or malformed data.
    Lied,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PeerRecord {
    /// How this host was last reached.
    pub last_seen_as: PeerId,
    pub successes: u64,
    pub failures: u64,
    pub lies: u64,
    /// NAR bytes received.
    pub bytes: u64,
    /// Smoothed time to first byte, in milliseconds.
    pub latency_ms: Option<f64>,
    consecutive_failures: u32,
    /// In backoff after failing until then; a success ends it.
    backoff_until: Option<Instant>,
    /// Banned for lying until then; nothing ends it early.
    banned_until: Option<Instant>,
    last_used: Instant,
}

impl PeerRecord {
    fn new(peer: PeerId, now: Instant) -> PeerRecord {
        PeerRecord {
            last_seen_as: peer,
            successes: 0,
            failures: 0,
            lies: 0,
            bytes: 0,
            latency_ms: None,
            consecutive_failures: 0,
            backoff_until: None,
            banned_until: None,
            last_used: now,
        }
    }

    pub fn is_available(&self, now: Instant) -> bool {
        self.backoff_until.is_none_or(|until| now >= until)
            && self.banned_until.is_none_or(|until| now >= until)
    }

    pub fn is_banned(&self, now: Instant) -> bool {
        self.banned_until.is_some_and(|until| now < until)
    }

    /// When this host last dealt with the peer (a fetch, a failure).
    pub fn last_used(&self) -> Instant {
        self.last_used
    }

    /// When this host may be asked again, if it is shunned now.
    fn shunned_until(&self, now: Instant) -> Option<Instant> {
        [self.backoff_until, self.banned_until]
            .into_iter()
            .flatten()
            .filter(|&until| until > now)
            .max()
    }

    /// Higher is better: reliability first, then speed.
    fn score(&self) -> f64 {
        let attempts = (self.successes + self.failures + self.lies) as f64;
        // An unknown peer starts at a neutral 0.5 and earns its place.
        let reliability = (self.successes as f64 + 1.0) / (attempts + 2.0);
        let speed = 1.0 / (1.0 + self.latency_ms.unwrap_or(50.0) / 100.0);
        reliability * 10.0 + speed
    }
}

#[derive(Default)]
pub struct PeerTable {
    peers: Mutex<HashMap<HostKey, PeerRecord>>,
}

impl PeerTable {
    pub fn new() -> PeerTable {
        PeerTable::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<HostKey, PeerRecord>> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record of `peer`'s host, made if new. The table is bounded: when
    /// it is full, the least useful host in good standing is forgotten; a
    /// shunned host is forgotten only when every host is shunned, and then
    /// the one whose shunning ends first, so flooding the table with new
    /// addresses never clears a ban.
    fn entry(
        peers: &mut HashMap<HostKey, PeerRecord>,
        peer: PeerId,
        now: Instant,
    ) -> &mut PeerRecord {
        let key = peer.host();
        if peers.len() >= MAX_PEERS && !peers.contains_key(&key) {
            let in_good_standing = peers
                .iter()
                .filter(|(_, r)| r.is_available(now))
                .min_by(|a, b| {
                    a.1.score()
                        .total_cmp(&b.1.score())
                        .then(a.1.last_used.cmp(&b.1.last_used))
                })
                .map(|(k, _)| *k);
            let victim = in_good_standing.or_else(|| {
                peers
                    .iter()
                    .min_by_key(|(_, r)| r.shunned_until(now))
                    .map(|(k, _)| *k)
            });
            if let Some(victim) = victim {
                peers.remove(&victim);
            }
        }
        let record = peers
            .entry(key)
            .or_insert_with(|| PeerRecord::new(peer, now));
        record.last_seen_as = peer;
        record.last_used = now;
        record
    }

    pub fn record_success(&self, peer: PeerId, bytes: u64, latency: Duration) {
        let mut peers = self.lock();
        let record = Self::entry(&mut peers, peer, Instant::now());
        record.successes += 1;
        record.bytes += bytes;
        record.consecutive_failures = 0;
        record.backoff_until = None;
        let ms = latency.as_secs_f64() * 1000.0;
        record.latency_ms = Some(match record.latency_ms {
            Some(old) => old * 0.8 + ms * 0.2,
            None => ms,
        });
    }

    pub fn record_failure(&self, peer: PeerId, failure: Failure, now: Instant) {
        let mut peers = self.lock();
        let record = Self::entry(&mut peers, peer, now);
        let (slot, shun) = match failure {
            Failure::Unavailable => {
                record.failures += 1;
                record.consecutive_failures = record.consecutive_failures.saturating_add(1);
                let doublings = record.consecutive_failures.saturating_sub(1).min(16);
                let backoff = (FIRST_BACKOFF * 2u32.pow(doublings)).min(MAX_BACKOFF);
                (&mut record.backoff_until, backoff)
            }
            Failure::Lied => {
                record.lies += 1;
                (&mut record.banned_until, LIAR_BAN)
            }
        };
        let until = now + shun;
        *slot = Some(slot.map_or(until, |old| old.max(until)));
    }

    /// Whether a peer's host has served us and has not failed since.
    pub fn is_proven(&self, peer: &PeerId, now: Instant) -> bool {
        self.lock().get(&peer.host()).is_some_and(|r| {
            r.successes > 0 && r.consecutive_failures == 0 && r.lies == 0 && r.is_available(now)
        })
    }

    /// Whether a peer's host is neither in backoff nor banned.
    pub fn is_available(&self, peer: &PeerId, now: Instant) -> bool {
        self.lock()
            .get(&peer.host())
            .is_none_or(|r| r.is_available(now))
    }

    /// The available peers among `candidates`, best first and one per host.
    /// Stable for ties, so equal peers keep the order in which they answered.
    pub fn rank(&self, candidates: &[PeerId], now: Instant) -> Vec<PeerId> {
        let peers = self.lock();
        let mut seen = std::collections::HashSet::new();
        let unknown = PeerRecord::new(PeerId::Http(([0, 0, 0, 0], 0).into()), now).score();
        let mut ranked: Vec<(PeerId, f64)> = candidates
            .iter()
            .filter(|p| seen.insert(p.host()))
            .filter_map(|p| match peers.get(&p.host()) {
                None => Some((*p, unknown)),
                Some(r) if r.is_available(now) => Some((*p, r.score())),
                Some(_) => None,
            })
            .collect();
        crate::order::sort_by(&mut ranked, |a, b| b.1.total_cmp(&a.1));
        ranked.into_iter().map(|(p, _)| p).collect()
    }

    pub fn record(&self, peer: &PeerId) -> Option<PeerRecord> {
        self.lock().get(&peer.host()).cloned()
    }

    /// Every peer host seen, in address order.
    pub fn snapshot(&self) -> Vec<(HostKey, PeerRecord)> {
        let mut all: Vec<_> = self.lock().iter().map(|(a, r)| (*a, r.clone())).collect();
        crate::order::sort_by(&mut all, |a, b| a.0.cmp(&b.0));
        all
    }
}

/// A peer host's record as it is kept across restarts (`crate::state`):
/// the shunning ends as wall-clock times, since an [`Instant`] means
/// nothing to the next process.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedPeer {
    pub peer: PeerId,
    pub successes: u64,
    pub failures: u64,
    pub lies: u64,
    pub bytes: u64,
    pub latency_ms: Option<f64>,
    pub consecutive_failures: u32,
    pub backoff_until: Option<SystemTime>,
    pub banned_until: Option<SystemTime>,
}

/// `until` (an instant) as a wall-clock time, if it is still ahead.
fn to_wall(until: Option<Instant>, now: Instant, wall: SystemTime) -> Option<SystemTime> {
    until
        .filter(|&until| until > now)
        .and_then(|until| wall.checked_add(until - now))
}

/// `until` (a wall-clock time) as an instant, if it is still ahead; never
/// further ahead than `longest`, however the clock moved meanwhile.
fn to_instant(
    until: Option<SystemTime>,
    wall: SystemTime,
    now: Instant,
    longest: Duration,
) -> Option<Instant> {
    let left = until?.duration_since(wall).ok()?;
    (!left.is_zero()).then(|| now + left.min(longest))
}

impl PeerTable {
    /// Every record, to be saved: expiries as wall-clock times.
    pub fn export(&self, now: Instant, wall: SystemTime) -> Vec<SavedPeer> {
        let mut saved: Vec<SavedPeer> = self
            .lock()
            .values()
            .map(|r| SavedPeer {
                peer: r.last_seen_as,
                successes: r.successes,
                failures: r.failures,
                lies: r.lies,
                bytes: r.bytes,
                latency_ms: r.latency_ms,
                consecutive_failures: r.consecutive_failures,
                backoff_until: to_wall(r.backoff_until, now, wall),
                banned_until: to_wall(r.banned_until, now, wall),
            })
            .collect();
        crate::order::sort_by(&mut saved, |a, b| a.peer.cmp(&b.peer));
        saved
    }

    /// Takes back saved records (at start, before any peer is asked): an
    /// expiry already past is dropped, one further ahead than the longest
    /// backoff or ban is cut to it. A host already known keeps its record.
    /// At most [`MAX_PEERS`] are taken.
    pub fn import(&self, saved: Vec<SavedPeer>, now: Instant, wall: SystemTime) {
        let mut peers = self.lock();
        for s in saved {
            if peers.len() >= MAX_PEERS {
                break;
            }
            let mut record = PeerRecord::new(s.peer, now);
            record.successes = s.successes;
            record.failures = s.failures;
            record.lies = s.lies;
            record.bytes = s.bytes;
            record.latency_ms = s.latency_ms;
            record.consecutive_failures = s.consecutive_failures;
            record.backoff_until = to_instant(s.backoff_until, wall, now, MAX_BACKOFF);
            record.banned_until = to_instant(s.banned_until, wall, now, LIAR_BAN);
            peers.entry(s.peer.host()).or_insert(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::SocketAddr;

    fn addr(n: u8) -> PeerId {
        PeerId::Http(SocketAddr::from(([10, 77, 0, n], 12304)))
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        table.record_failure(addr(1), Failure::Unavailable, t0);
        assert!(!table.is_available(&addr(1), t0));
        assert!(!table.is_available(&addr(1), t0 + FIRST_BACKOFF - Duration::from_millis(1)));
        assert!(table.is_available(&addr(1), t0 + FIRST_BACKOFF));
        table.record_failure(addr(1), Failure::Unavailable, t0);
        assert!(!table.is_available(&addr(1), t0 + FIRST_BACKOFF));
        assert!(table.is_available(&addr(1), t0 + FIRST_BACKOFF * 2));
        for _ in 0..40 {
            table.record_failure(addr(1), Failure::Unavailable, t0);
        }
        assert!(table.is_available(&addr(1), t0 + MAX_BACKOFF));
    }

    #[test]
    fn proven_means_served_and_not_failed_since() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        assert!(!table.is_proven(&addr(1), t0));
        table.record_success(addr(1), 10, Duration::from_millis(5));
        assert!(table.is_proven(&addr(1), t0));
        table.record_failure(addr(1), Failure::Unavailable, t0);
        assert!(!table.is_proven(&addr(1), t0 + MAX_BACKOFF));
        table.record_success(addr(1), 10, Duration::from_millis(5));
        assert!(table.is_proven(&addr(1), t0 + MAX_BACKOFF));
        table.record_failure(addr(1), Failure::Lied, t0);
        table.record_success(addr(1), 10, Duration::from_millis(5));
        assert!(
            !table.is_proven(&addr(1), t0),
            "a liar is never proven again"
        );
    }

    #[test]
    fn success_clears_backoff() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        table.record_failure(addr(1), Failure::Unavailable, t0);
        table.record_success(addr(1), 10, Duration::from_millis(5));
        assert!(table.is_available(&addr(1), t0));
        assert_eq!(table.record(&addr(1)).unwrap().bytes, 10);
    }

    #[test]
    fn liars_are_banned_far_beyond_backoff() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        table.record_failure(addr(2), Failure::Lied, t0);
        assert!(!table.is_available(&addr(2), t0 + MAX_BACKOFF * 10));
        // A later mild failure does not shorten the ban.
        table.record_failure(addr(2), Failure::Unavailable, t0 + Duration::from_secs(1));
        assert!(!table.is_available(&addr(2), t0 + MAX_BACKOFF * 10));
        assert!(table.is_available(&addr(2), t0 + LIAR_BAN));
        // Nor by a success (a transfer that was already under way).
        table.record_success(addr(2), 1, Duration::from_millis(1));
        assert!(!table.is_available(&addr(2), t0 + MAX_BACKOFF * 10));
    }

    #[test]
    fn a_ban_holds_for_every_port_of_the_host() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        let liar = |port| PeerId::Http(SocketAddr::from(([10, 77, 0, 9], port)));
        table.record_failure(liar(1000), Failure::Lied, t0);
        for port in [1001, 2000, 65535] {
            assert!(!table.is_available(&liar(port), t0), "port {port}");
        }
        assert!(table.rank(&[liar(1002), addr(1)], t0) == vec![addr(1)]);
        // Backoff is per host too.
        table.record_failure(addr(2), Failure::Unavailable, t0);
        assert!(!table.is_available(&PeerId::Http(SocketAddr::from(([10, 77, 0, 2], 1))), t0));
        // IPv4-mapped IPv6 is the same host.
        let mapped = PeerId::Http("[::ffff:10.77.0.9]:7".parse().unwrap());
        assert!(!table.is_available(&mapped, t0));
    }

    #[test]
    fn ranking_takes_one_address_per_host() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        let same_host = PeerId::Http(SocketAddr::from(([10, 77, 0, 1], 999)));
        assert_eq!(
            table.rank(&[addr(1), same_host, addr(2)], t0),
            vec![addr(1), addr(2)]
        );
    }

    #[test]
    fn a_full_table_forgets_the_least_useful_and_keeps_bans() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        let host_n = |n: u32| {
            PeerId::Http(SocketAddr::from((
                std::net::Ipv4Addr::from(0x0a00_0000 + n),
                1,
            )))
        };
        table.record_failure(host_n(0), Failure::Lied, t0);
        table.record_success(host_n(1), 5, Duration::from_millis(1));
        // Far more unreachable hosts than the table holds.
        for n in 2..(MAX_PEERS as u32 * 3) {
            table.record_failure(host_n(n), Failure::Unavailable, t0);
        }
        assert!(table.snapshot().len() <= MAX_PEERS);
        assert!(
            table.record(&host_n(0)).is_some_and(|r| r.is_banned(t0)),
            "the ban survives the flood"
        );
        // Once every entry is shunned, one whose backoff ends first goes,
        // never the day-long ban.
        for n in (MAX_PEERS as u32 * 3)..(MAX_PEERS as u32 * 4) {
            table.record_failure(host_n(n), Failure::Unavailable, t0);
        }
        assert!(table.record(&host_n(0)).is_some_and(|r| r.is_banned(t0)));
    }

    #[test]
    fn ranking_prefers_reliable_fast_peers_and_skips_shunned_ones() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        for _ in 0..5 {
            table.record_success(addr(1), 1, Duration::from_millis(200));
            table.record_success(addr(2), 1, Duration::from_millis(2));
        }
        table.record_failure(addr(3), Failure::Lied, t0);
        let ranked = table.rank(&[addr(3), addr(1), addr(4), addr(2), addr(2)], t0);
        assert_eq!(ranked, vec![addr(2), addr(1), addr(4)]);
        let unknown = table.rank(&[addr(5), addr(6), addr(5)], t0);
        assert_eq!(
            unknown,
            vec![addr(5), addr(6)],
            "ties keep answer order, once each"
        );
    }

    #[test]
    fn bans_and_backoffs_survive_an_export_and_import_by_wall_clock() {
        let table = PeerTable::new();
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        table.record_failure(addr(1), Failure::Lied, t0);
        table.record_failure(addr(2), Failure::Unavailable, t0);
        table.record_success(addr(3), 7, Duration::from_millis(3));
        let saved = table.export(t0, wall);
        assert_eq!(saved.len(), 3);
        assert_eq!(saved[0].banned_until, Some(wall + LIAR_BAN));
        assert_eq!(saved[1].backoff_until, Some(wall + FIRST_BACKOFF));

        // A new process, an hour later by the wall clock.
        let later = PeerTable::new();
        let t1 = Instant::now();
        later.import(saved.clone(), t1, wall + Duration::from_secs(3600));
        assert!(later.record(&addr(1)).unwrap().is_banned(t1));
        assert!(!later.is_available(&addr(1), t1 + LIAR_BAN - Duration::from_secs(3601)));
        assert!(later.is_available(&addr(1), t1 + LIAR_BAN - Duration::from_secs(3600)));
        assert!(later.is_available(&addr(2), t1), "the backoff is over");
        assert_eq!(later.record(&addr(3)).unwrap().bytes, 7);

        // A clock set far back cannot stretch a ban past its length.
        let early = PeerTable::new();
        early.import(saved, t1, wall - Duration::from_secs(10 * 24 * 3600));
        assert!(early.is_available(&addr(1), t1 + LIAR_BAN));
        assert!(!early.is_available(&addr(1), t1 + LIAR_BAN - Duration::from_secs(1)));
    }
}
