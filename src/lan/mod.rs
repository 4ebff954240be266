//! LAN discovery: ask the local network who has a store path, and answer
//! the same question for peers.
//!
//! One thread owns the UDP socket's receiving side. It answers queries for
//! paths this host shares (rate-limited, under the share policy), and routes
//! replies to the request threads waiting for them by request id, over
//! crossbeam channels. Request threads send their queries through another
//! handle on the same socket: a datagram send needs no coordination.
//!
//! The packets are those of the original peerix ([`packet`]), so existing
//! nodes interoperate. Queries go to the broadcast address of every up,
//! private IPv4 interface, and by unicast to the configured extra peers.

mod config;
mod interfaces;
mod limit;
pub mod packet;
pub mod summaries;
pub mod summary;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};
use socket2::{Domain, Protocol, Socket, Type};

use crate::nix::store_path::HashPart;
use crate::peers::{Discovery, PeerId, Search};
use crate::stats::{DropReason, Stats};
pub use config::{DEFAULT_LAN_TIMEOUT, DEFAULT_PORT, LanConfig, PeerSpec};
use limit::ReplyLimiter;
use packet::{MAX_PACKET, Packet};
use summaries::Summaries;
use summary::Publisher;

/// At most this many peers are taken from one query's replies.
const MAX_CANDIDATES: usize = 8;
/// Replies per second this host sends in all, and to any one source. A
/// `nix-store -r` of a large closure asks a few hundred paths a second, all
/// of which must be answered; a reply is barely larger than its query, so
/// these caps are about flooding a spoofed source, not amplification.
const REPLY_RATE_TOTAL: f64 = 2000.0;
const REPLY_RATE_PER_SOURCE: f64 = 1000.0;
/// How often the list of this host's own addresses is refreshed.
const OWN_ADDRESSES_TTL: Duration = Duration::from_secs(5);
/// How often `--extra-peer` names are resolved again.
const EXTRA_PEERS_TTL: Duration = Duration::from_secs(60);

/// Whether this host shares the path with this hash part (the share policy,
/// as the index has it).
pub type Shares = Box<dyn Fn(&HashPart) -> bool + Send>;

struct Waiter {
    hash: HashPart,
    replies: Sender<SocketAddr>,
}

/// The LAN side of this host: query peers with [`Lan::query`].
pub struct Lan {
    socket: UdpSocket,
    /// The UDP port peers listen on: the same number as ours.
    port: u16,
    config: LanConfig,
    waiting: Mutex<HashMap<u32, Waiter>>,
    next_id: AtomicU32,
    /// The addresses of each `--extra-peer`, in order; names are resolved
    /// on a thread of their own, so a slow DNS never delays a query.
    extra_peers: Mutex<Vec<Vec<SocketAddr>>>,
    /// Its counters are `stats.lan`.
    pub stats: Arc<Stats>,
}

impl Lan {
    /// Binds UDP `0.0.0.0:port` and starts the thread that answers peers on
    /// behalf of the HTTP server on `http_port`.
    ///
    /// With a `publisher` (this host answers peers), it announces this
    /// host's store summary after each change and every
    /// [`summaries::ANNOUNCE_INTERVAL`], and to any host that solicits it.
    /// With `summaries`, it tells them every host it hears from and every
    /// summary announced, and solicits announcements at once. It counts in
    /// `stats.lan`.
    pub fn start(
        config: &LanConfig,
        port: u16,
        http_port: u16,
        shares: Shares,
        publisher: Option<Arc<Publisher>>,
        summaries: Option<Arc<Summaries>>,
        stats: Arc<Stats>,
    ) -> io::Result<Arc<Lan>> {
        let socket = bind(port)?;
        let receiver = socket.try_clone()?;
        let port = socket.local_addr()?.port();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            ^ std::process::id().rotate_left(16);
        let lan = Arc::new(Lan {
            socket,
            port,
            config: config.clone(),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(seed),
            extra_peers: Mutex::new(
                config
                    .extra_peers
                    .iter()
                    .map(|peer| match peer.host.parse::<Ipv4Addr>() {
                        Ok(ip) => vec![SocketAddr::from((ip, peer.port))],
                        Err(_) => Vec::new(),
                    })
                    .collect(),
            ),
            stats,
        });
        let responder = Responder {
            lan: Arc::clone(&lan),
            socket: receiver,
            http_port,
            shares,
            limiter: ReplyLimiter::new(REPLY_RATE_TOTAL, REPLY_RATE_PER_SOURCE, Instant::now()),
            own: HashSet::new(),
            own_refreshed: None,
            publisher,
            summaries,
            announced: None,
        };
        std::thread::Builder::new()
            .name("lan".into())
            .spawn(move || responder.run())?;
        if config
            .extra_peers
            .iter()
            .any(|peer| peer.host.parse::<Ipv4Addr>().is_err())
        {
            let weak = Arc::downgrade(&lan);
            std::thread::Builder::new()
                .name("lan-names".into())
                .spawn(move || resolve_names(&weak))?;
        }
        Ok(lan)
    }

    /// The UDP port this host listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Asks the LAN who has `hash`: sends the query now, and returns the
    /// [`Query`] that hears the answers until the LAN timeout has passed.
    pub fn query(&self, hash: &HashPart) -> Query<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, replies) = bounded(MAX_CANDIDATES * 2);
        self.lock_waiting().insert(
            id,
            Waiter {
                hash: *hash,
                replies: sender,
            },
        );
        let packet = Packet::Request { id, hash: *hash }.encode();
        let mut sent = 0;
        for target in self.targets() {
            match self.socket.send_to(&packet, target) {
                Ok(_) => sent += 1,
                Err(e) => log::debug!("LAN query for {hash} to {target}: {e}"),
            }
        }
        self.stats.lan.queries.fetch_add(1, Ordering::Relaxed);
        // Nothing sent, nothing to wait for.
        let window = if sent == 0 {
            Duration::ZERO
        } else {
            self.config.timeout
        };
        Query {
            lan: self,
            id,
            replies,
            deadline: Instant::now() + window,
            grace: self.config.timeout / 10,
            heard: Vec::new(),
        }
    }

    /// Where a query goes: every broadcast address (unless broadcast is
    /// off) and every extra peer.
    fn targets(&self) -> Vec<SocketAddr> {
        let mut targets = Vec::new();
        if self.config.broadcast {
            match interfaces::ipv4_interfaces() {
                Ok(ifaces) => targets.extend(
                    interfaces::broadcast_addresses(&ifaces)
                        .into_iter()
                        .map(|b| SocketAddr::from((b, self.port))),
                ),
                Err(e) => log::warn!("cannot list network interfaces: {e}"),
            }
        }
        targets.extend(self.extra_peer_addrs());
        targets
    }

    fn extra_peer_addrs(&self) -> Vec<SocketAddr> {
        let resolved = self.extra_peers.lock().unwrap_or_else(|e| e.into_inner());
        resolved.iter().flatten().copied().collect()
    }

    fn lock_waiting(&self) -> MutexGuard<'_, HashMap<u32, Waiter>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resolves the `--extra-peer` names now and every [`EXTRA_PEERS_TTL`],
/// for as long as the LAN side lives. A name that does not resolve keeps
/// its last addresses.
fn resolve_names(lan: &std::sync::Weak<Lan>) {
    loop {
        let Some(lan) = lan.upgrade() else {
            return;
        };
        for (i, peer) in lan.config.extra_peers.iter().enumerate() {
            if peer.host.parse::<Ipv4Addr>().is_ok() {
                continue;
            }
            let found = resolve_peer(peer);
            if !found.is_empty() {
                let mut resolved = lan.extra_peers.lock().unwrap_or_else(|e| e.into_inner());
                resolved[i] = found;
            }
        }
        drop(lan);
        std::thread::sleep(EXTRA_PEERS_TTL);
    }
}

/// The IPv4 addresses of an extra peer; a name that does not resolve now is
/// logged and tried again later.
fn resolve_peer(peer: &PeerSpec) -> Vec<SocketAddr> {
    match (peer.host.as_str(), peer.port).to_socket_addrs() {
        Ok(addrs) => addrs.filter(SocketAddr::is_ipv4).collect(),
        Err(e) => {
            log::warn!("extra peer {peer}: {e}");
            Vec::new()
        }
    }
}

/// One query on the LAN: the peers that answer it, heard until the LAN
/// timeout has passed or the query is dropped.
pub struct Query<'l> {
    lan: &'l Lan,
    id: u32,
    replies: Receiver<SocketAddr>,
    /// The end of the whole window.
    deadline: Instant,
    /// How long to wait for more once a first new answer is in.
    grace: Duration,
    /// One address per host heard so far.
    heard: Vec<PeerId>,
}

impl Query<'_> {
    /// The next peers to try: waits for a first new answer, then a tenth of
    /// the LAN timeout more (all peers hear a broadcast at the same moment,
    /// so their replies mostly arrive close together), and not at all once
    /// `enough` says the peers so far will do. Empty once the window is over
    /// with nothing new. Call it again after the peers it gave have all
    /// failed: a late peer (a Wi-Fi one, say) is still heard, as long as the
    /// window lasts.
    ///
    /// Replies from peers that `usable` refuses (in backoff, banned) are
    /// ignored altogether: they neither count as answers nor shorten the
    /// wait, so a peer that answers every query and then never delivers
    /// costs nothing while it is shunned. A host counts once, whatever ports
    /// it claims, so one host cannot crowd out the others.
    pub fn next_answers(
        &mut self,
        usable: &dyn Fn(&PeerId) -> bool,
        enough: &dyn Fn(&[PeerId]) -> bool,
    ) -> Vec<PeerId> {
        let mut new = Vec::new();
        let mut until = self.deadline;
        while self.heard.len() < MAX_CANDIDATES {
            match self.replies.recv_deadline(until).map(PeerId::Http) {
                Ok(peer) if !usable(&peer) => {
                    self.lan
                        .stats
                        .lan
                        .replies_shunned
                        .fetch_add(1, Ordering::Relaxed);
                }
                Ok(peer) => {
                    if self.heard.iter().any(|p| p.host() == peer.host()) {
                        continue;
                    }
                    self.heard.push(peer);
                    new.push(peer);
                    if new.len() == 1 {
                        until = self.deadline.min(Instant::now() + self.grace);
                    }
                    if enough(&new) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        new
    }
}

impl Discovery for Lan {
    fn name(&self) -> &'static str {
        "lan"
    }

    fn may_wait(&self) -> bool {
        true
    }

    /// Nothing is sent yet: the query goes out when its answers are first
    /// wanted, so a lookup the summaries settle sends no packet at all.
    fn search(&self, hash: &HashPart) -> Box<dyn Search + '_> {
        Box::new(LanSearch {
            lan: self,
            hash: *hash,
            query: None,
        })
    }
}

/// A LAN search: the broadcast query, sent on first use.
struct LanSearch<'l> {
    lan: &'l Lan,
    hash: HashPart,
    query: Option<Query<'l>>,
}

impl Search for LanSearch<'_> {
    fn is_directory(&self) -> bool {
        false
    }

    fn next_holders(
        &mut self,
        usable: &dyn Fn(&PeerId) -> bool,
        enough: &dyn Fn(&[PeerId]) -> bool,
    ) -> Vec<PeerId> {
        let (lan, hash) = (self.lan, self.hash);
        self.query
            .get_or_insert_with(|| lan.query(&hash))
            .next_answers(usable, enough)
    }
}

impl Drop for Query<'_> {
    fn drop(&mut self) {
        self.lan.lock_waiting().remove(&self.id);
    }
}

fn bind(port: u16) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind UDP {addr}: {e}")))?;
    Ok(socket.into())
}

/// The receiving thread's state.
struct Responder {
    lan: Arc<Lan>,
    socket: UdpSocket,
    http_port: u16,
    shares: Shares,
    limiter: ReplyLimiter,
    own: HashSet<IpAddr>,
    own_refreshed: Option<Instant>,
    publisher: Option<Arc<Publisher>>,
    summaries: Option<Arc<Summaries>>,
    /// The generation last announced, and when.
    announced: Option<(u64, Instant)>,
}

/// The UDP thread wakes at least this often, to announce on time.
const TICK: Duration = Duration::from_secs(1);

impl Responder {
    fn run(mut self) {
        if self.summaries.is_some() {
            // Our first moments must not pass for a quiet LAN: ask every
            // host to announce itself now. Twice, as UDP may drop one.
            for _ in 0..2 {
                self.broadcast(&Packet::Solicit);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Err(e) = self.socket.set_read_timeout(Some(TICK)) {
            log::warn!("LAN socket: no read timeout ({e}); announcing only when packets come");
        }
        // One byte more than any valid packet, so an oversized one shows.
        let mut buf = [0u8; MAX_PACKET + 1];
        loop {
            self.announce_if_due();
            let (len, from) = match self.socket.recv_from(&mut buf) {
                Ok(received) => received,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    log::error!("LAN socket: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            self.handle(&buf[..len], from);
        }
    }

    fn handle(&mut self, bytes: &[u8], from: SocketAddr) {
        if self.is_own_socket(from) {
            // Our own broadcast, looped back.
            return;
        }
        let stats = &self.lan.stats.lan;
        let packet = match Packet::decode(bytes) {
            Ok(packet) => packet,
            Err(e) => {
                stats.dropped(DropReason::from(e));
                log::debug!("dropped a LAN packet from {from}: {e}");
                return;
            }
        };
        if let Some(summaries) = &self.summaries {
            match packet {
                Packet::Announce {
                    generation, port, ..
                } => summaries.announced(from.ip(), generation, port),
                _ => summaries.heard(from.ip()),
            }
        }
        match packet {
            Packet::Announce { .. } => {}
            Packet::Solicit => {
                let ready = self.publisher.as_ref().is_some_and(|p| p.ready());
                if ready && self.limiter.allow(from.ip(), Instant::now()) {
                    self.send_announcement(from);
                }
            }
            Packet::Request { id, hash } => {
                if !(self.shares)(&hash) {
                    return;
                }
                if !self.limiter.allow(from.ip(), Instant::now()) {
                    stats.replies_rate_limited.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let reply = Packet::Response {
                    id,
                    port: self.http_port,
                    hash,
                };
                match self.socket.send_to(&reply.encode(), from) {
                    Ok(_) => {
                        stats.replies_sent.fetch_add(1, Ordering::Relaxed);
                        log::debug!("told {from} we have {hash}");
                    }
                    Err(e) => log::debug!("LAN reply to {from}: {e}"),
                }
            }
            Packet::Response { id, port, hash } => {
                let peer = SocketAddr::new(from.ip(), port);
                let delivered = self
                    .lan
                    .lock_waiting()
                    .get(&id)
                    .filter(|waiter| waiter.hash == hash)
                    .is_some_and(|waiter| waiter.replies.try_send(peer).is_ok());
                if delivered {
                    stats.replies_received.fetch_add(1, Ordering::Relaxed);
                } else {
                    // Late, unasked for, or for another hash.
                    stats.dropped(DropReason::Unexpected);
                    log::debug!("dropped a LAN reply from {from} that nobody waits for");
                }
            }
        }
    }

    /// Announces this host's summary to the LAN when it has changed (at
    /// most once a [`TICK`]) or every announcement interval.
    fn announce_if_due(&mut self) {
        let Some(publisher) = self.publisher.as_ref().filter(|p| p.ready()) else {
            return;
        };
        let generation = publisher.current().generation;
        let due = match self.announced {
            None => true,
            Some((last, at)) => {
                let since = at.elapsed();
                since >= summaries::ANNOUNCE_INTERVAL || (last != generation && since >= TICK)
            }
        };
        if due {
            let packet = self.announcement();
            self.broadcast(&packet);
            self.announced = Some((generation, Instant::now()));
        }
    }

    fn announcement(&self) -> Packet {
        let published = self.publisher.as_ref().map(|p| p.current());
        Packet::Announce {
            generation: published.as_ref().map_or(0, |p| p.generation),
            paths: published.as_ref().map_or(0, |p| p.paths),
            port: self.http_port,
        }
    }

    fn send_announcement(&self, to: SocketAddr) {
        if let Err(e) = self.socket.send_to(&self.announcement().encode(), to) {
            log::debug!("LAN announcement to {to}: {e}");
        }
    }

    /// Sends `packet` to every target a query goes to.
    fn broadcast(&self, packet: &Packet) {
        let bytes = packet.encode();
        for target in self.lan.targets() {
            if let Err(e) = self.socket.send_to(&bytes, target) {
                log::debug!("LAN packet to {target}: {e}");
            }
        }
    }

    /// Whether a packet came from this host's own socket: one of its
    /// addresses, and our port. (Another program on this host, on another
    /// port, is a peer like any other.)
    fn is_own_socket(&mut self, from: SocketAddr) -> bool {
        if from.port() != self.lan.port {
            return false;
        }
        if self
            .own_refreshed
            .is_none_or(|at| at.elapsed() >= OWN_ADDRESSES_TTL)
        {
            match interfaces::own_addresses() {
                Ok(own) => self.own = own,
                Err(e) => log::warn!("cannot list this host's addresses: {e}"),
            }
            self.own_refreshed = Some(Instant::now());
        }
        self.own.contains(&from.ip())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HAVE: &str = "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d";
    const LACK: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5";

    fn unicast_config(peers: &[u16]) -> LanConfig {
        LanConfig {
            enabled: true,
            timeout: Duration::from_millis(2000),
            broadcast: false,
            extra_peers: peers
                .iter()
                .map(|&port| PeerSpec {
                    host: "127.0.0.1".into(),
                    port,
                })
                .collect(),
        }
    }

    fn start(peers: &[u16], http_port: u16) -> Arc<Lan> {
        let have = HashPart::parse(HAVE).unwrap();
        Lan::start(
            &unicast_config(peers),
            0,
            http_port,
            Box::new(move |hash| *hash == have),
            None,
            None,
            Arc::new(Stats::new()),
        )
        .unwrap()
    }

    #[test]
    fn a_peer_answers_for_what_it_shares_and_only_that() {
        let holder = start(&[], 4321);
        let asker = start(&[holder.port()], 1);
        let found = asker
            .query(&HashPart::parse(HAVE).unwrap())
            .next_answers(&|_| true, &|_| false);
        assert_eq!(
            found,
            [PeerId::Http(SocketAddr::from(([127, 0, 0, 1], 4321)))]
        );
        assert_eq!(holder.stats.lan.replies_sent.load(Ordering::Relaxed), 1);
        assert_eq!(asker.stats.lan.replies_received.load(Ordering::Relaxed), 1);

        let mut quick = unicast_config(&[holder.port()]);
        quick.timeout = Duration::from_millis(50);
        let asker = Lan::start(
            &quick,
            0,
            1,
            Box::new(|_| false),
            None,
            None,
            Arc::new(Stats::new()),
        )
        .unwrap();
        assert!(
            asker
                .query(&HashPart::parse(LACK).unwrap())
                .next_answers(&|_| true, &|_| true)
                .is_empty()
        );
        assert_eq!(holder.stats.lan.replies_sent.load(Ordering::Relaxed), 1);
        assert!(asker.lock_waiting().is_empty(), "the waiter is removed");
    }

    #[test]
    fn extra_peers_by_name_are_resolved_in_the_background() {
        let holder = start(&[], 4321);
        let mut config = unicast_config(&[]);
        config.extra_peers = vec![PeerSpec {
            host: "localhost".into(),
            port: holder.port(),
        }];
        let asker = Lan::start(
            &config,
            0,
            1,
            Box::new(|_| false),
            None,
            None,
            Arc::new(Stats::new()),
        )
        .unwrap();
        // Bounded: /etc/hosts answers at once.
        let deadline = Instant::now() + Duration::from_secs(10);
        while asker.extra_peer_addrs().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            asker.extra_peer_addrs(),
            [SocketAddr::from(([127, 0, 0, 1], holder.port()))]
        );
        let found = asker
            .query(&HashPart::parse(HAVE).unwrap())
            .next_answers(&|_| true, &|_| false);
        assert_eq!(
            found,
            [PeerId::Http(SocketAddr::from(([127, 0, 0, 1], 4321)))]
        );
    }

    #[test]
    fn bad_and_unasked_packets_are_dropped_and_counted() {
        let lan = start(&[], 4321);
        let probe = UdpSocket::bind("127.0.0.1:0").unwrap();
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let target = SocketAddr::from(([127, 0, 0, 1], lan.port()));
        let unasked = Packet::Response {
            id: 99,
            port: 80,
            hash: HashPart::parse(HAVE).unwrap(),
        }
        .encode();
        let bad: [&[u8]; 5] = [b"", b"\x00\x01", &[7; 40], &[0; 600], &unasked];
        for packet in bad {
            probe.send_to(packet, target).unwrap();
        }
        // A valid request after the garbage is still answered.
        let request = Packet::Request {
            id: 5,
            hash: HashPart::parse(HAVE).unwrap(),
        };
        probe.send_to(&request.encode(), target).unwrap();
        let mut buf = [0u8; 600];
        let (len, _) = probe
            .recv_from(&mut buf)
            .expect("a reply to the valid request");
        assert_eq!(
            Packet::decode(&buf[..len]),
            Ok(Packet::Response {
                id: 5,
                port: 4321,
                hash: HashPart::parse(HAVE).unwrap(),
            })
        );
        assert!(buf[..len].ends_with(format!("local/{HAVE}.narinfo").as_bytes()));
        assert_eq!(lan.stats.lan.packets_dropped(), 5);
    }
}
