//! Copies one NAR from the peers that hold it to nix, verified.
//!
//! The bytes go through a `NarCheck` as they arrive. Nothing is sent until
//! the first chunk has parsed, so garbage never reaches nix and the next
//! holder can be tried. A NAR up to the verify-before-send bound is held
//! whole and sent only once its hash checks out, so a bad holder is replaced
//! without nix noticing. A larger one streams, hashed on a second thread,
//! with its last chunk held back: when the end shows a wrong hash or size,
//! the last bytes are never sent and the caller aborts the connection, so
//! nix sees a failed download, never a wrong success. A holder that dies
//! mid-stream is replaced by the next, which is asked for the rest with a
//! Range request.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::check::NarCheck;
use super::client::{PeerError, read_full};
use super::transport::Transport;
use crate::nix::hash::NarHash;
use crate::peers::{Failure, PeerId, PeerTable};

/// Bytes read from a peer at a time. A transfer holds four such buffers;
/// 256 KiB ones moved no more bytes per second through B but raised its
/// peak RSS by about 1 MB per transfer.
const CHUNK: usize = 128 * 1024;

/// A peer that offers the NAR, and where on it the NAR is (from
/// [`Transport::locate_nar`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub peer: PeerId,
    pub location: String,
}

/// The slowest average rate a whole transfer may take, from whichever
/// holders: 64 KiB/s, well under any LAN or Wi-Fi link that works at all.
const MIN_TRANSFER_RATE: u64 = 64 * 1024;

/// How long a transfer of a `nar_size`-byte NAR may take in all: two
/// timeouts for finding and connecting to holders, plus the NAR at the
/// slowest rate allowed. Without it, a holder that ignores Range and
/// trickles the bytes it must skip, or trickles just above the per-chunk
/// floor, would hold a worker for as long as it liked.
pub fn transfer_budget(nar_size: u64, timeout: Duration) -> Duration {
    timeout * 2 + Duration::from_secs(nar_size / MIN_TRANSFER_RATE)
}

/// What to copy.
pub struct Plan {
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// The bytes nix asked for: `start..end` of the NAR.
    pub start: u64,
    pub end: u64,
    /// Hold the whole NAR until it checks out; the memory it takes, taken
    /// from the [`MemoryBudget`].
    pub verify_whole: Option<Reservation>,
    /// When the copy must be over, from whichever holders.
    pub deadline: Instant,
}

/// The memory all NARs held whole while they are verified may take
/// together. A transfer that finds it spent streams instead (and is
/// verified all the same), so peak memory stays bounded however many peers
/// send at once.
pub struct MemoryBudget {
    left: Arc<Mutex<u64>>,
}

/// Bytes taken from a [`MemoryBudget`], given back on drop.
#[derive(Debug)]
pub struct Reservation {
    left: Arc<Mutex<u64>>,
    bytes: u64,
}

impl MemoryBudget {
    pub fn new(bytes: u64) -> MemoryBudget {
        MemoryBudget {
            left: Arc::new(Mutex::new(bytes)),
        }
    }

    /// `bytes` of the budget, if that much is left.
    pub fn reserve(&self, bytes: u64) -> Option<Reservation> {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        *left = left.checked_sub(bytes)?;
        Some(Reservation {
            left: Arc::clone(&self.left),
            bytes,
        })
    }

    /// Bytes not reserved now.
    pub fn left(&self) -> u64 {
        *self.left.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        *self.left.lock().unwrap_or_else(|e| e.into_inner()) += self.bytes;
    }
}

/// Where the bytes go.
pub trait Sink {
    /// Called once, right before the first byte is written.
    fn begin(&mut self) -> io::Result<()>;
    fn write(&mut self, bytes: &[u8]) -> io::Result<()>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte nix asked for was sent and the NAR checked out.
    Done,
    /// No holder could supply it; nothing was sent.
    NoHolder,
    /// Bytes were sent but the rest cannot be: the response must be cut off.
    Broken(String),
    /// Nix closed the connection.
    ClientGone,
}

/// Copies `plan` from the holders `next_holder` yields (best first; it is
/// called again whenever one fails), recording each outcome in `peers`.
pub fn copy(
    plan: &Plan,
    next_holder: &mut dyn FnMut() -> Option<Holder>,
    transport: &dyn Transport,
    peers: &PeerTable,
    buffers: &BufferPool,
    sink: &mut dyn Sink,
) -> Outcome {
    if plan.verify_whole.is_some() {
        return Copier::new(plan, buffers, None).run(next_holder, transport, peers, sink);
    }
    // A streamed NAR is hashed on a second thread while this one moves the
    // bytes: on a small board hashing alone would otherwise halve the rate.
    std::thread::scope(|scope| {
        let handoff = Arc::new(Handoff::default());
        let theirs = Arc::clone(&handoff);
        let hasher = std::thread::Builder::new()
            .name("nar-hash".into())
            .spawn_scoped(scope, move || hash_jobs(&theirs));
        let parallel = match hasher {
            Ok(_) => Some(ParallelHasher(handoff)),
            Err(e) => {
                log::warn!("cannot start a hashing thread ({e}); hashing inline");
                None
            }
        };
        Copier::new(plan, buffers, parallel).run(next_holder, transport, peers, sink)
    })
}

/// Read buffers for transfers, kept for the next transfer. Allocated and
/// freed per transfer, they would be kept anyway by the C allocator, once
/// in every worker thread's arena: 10.6 MB peak RSS after nine 200 MB
/// transfers instead of 5.1 MB with one arena.
pub struct BufferPool {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Buffers of `size` bytes; at most `keep` are kept when not in use.
    pub fn new(size: usize, keep: usize) -> BufferPool {
        BufferPool {
            size: size.max(1),
            keep,
            free: Mutex::new(Vec::new()),
        }
    }

    /// The buffers a transfer takes: one it reads into, one the hashing
    /// thread works on, and those queued for it.
    pub fn per_transfer() -> usize {
        HASH_QUEUE + 2
    }

    fn take(&self) -> Vec<u8> {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| vec![0u8; self.size])
    }

    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep {
            free.push(buf);
        }
    }
}

impl Default for BufferPool {
    fn default() -> BufferPool {
        BufferPool::new(CHUNK, BufferPool::per_transfer() * 2)
    }
}

impl Drop for Copier<'_> {
    fn drop(&mut self) {
        // The hashing thread may still hold a buffer until it sees the
        // queue close; that one goes back to the allocator.
        self.parallel = None;
        for buf in self.buffers.drain(..) {
            if let Ok(buf) = Arc::try_unwrap(buf) {
                self.pool.give_back(buf);
            }
        }
    }
}

/// Chunks queued for the hashing thread at most; buffers in use are this
/// plus the one being hashed and the one being read.
const HASH_QUEUE: usize = 2;

enum HashJob {
    Bytes(Arc<Vec<u8>>, usize),
    /// Start over: the bytes so far were a liar's.
    Reset,
    /// Send the digest of everything since the last reset.
    Finish,
}

/// The copy's end of the hashing thread's queue. A Mutex and Condvar
/// rather than two channels: a channel per element type is another copy
/// of the channel code, for one queue of at most [`HASH_QUEUE`] jobs.
struct ParallelHasher(Arc<Handoff>);

#[derive(Default)]
struct Handoff {
    state: Mutex<HandoffState>,
    /// Signalled on every change; only one side waits at a time (the copy
    /// when the queue is full or for the digest, the hasher when it is
    /// empty), so one condition variable serves both.
    changed: Condvar,
}

#[derive(Default)]
struct HandoffState {
    jobs: VecDeque<HashJob>,
    digest: Option<[u8; 32]>,
    /// The copy is done: the hasher ends once the queue is empty.
    closed: bool,
    /// The hasher has ended: nothing more is hashed.
    gone: bool,
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, HandoffState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, HandoffState>) -> MutexGuard<'a, HandoffState> {
        self.changed.wait(state).unwrap_or_else(|e| e.into_inner())
    }
}

impl ParallelHasher {
    /// Queues `job`, waiting while [`HASH_QUEUE`] jobs are queued; dropped
    /// if the hasher has ended.
    fn send(&self, job: HashJob) {
        let mut state = self.0.lock();
        while state.jobs.len() >= HASH_QUEUE && !state.gone {
            state = self.0.wait(state);
        }
        if !state.gone {
            state.jobs.push_back(job);
            self.0.changed.notify_one();
        }
    }

    /// The digest of everything since the last reset.
    fn finish(&self) -> Option<[u8; 32]> {
        self.send(HashJob::Finish);
        let mut state = self.0.lock();
        loop {
            if let Some(digest) = state.digest.take() {
                return Some(digest);
            }
            if state.gone {
                return None;
            }
            state = self.0.wait(state);
        }
    }
}

impl Drop for ParallelHasher {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.changed.notify_one();
    }
}

/// Marks the hasher ended however it ends, so the copy never waits on it.
struct Gone<'a>(&'a Handoff);

impl Drop for Gone<'_> {
    fn drop(&mut self) {
        self.0.lock().gone = true;
        self.0.changed.notify_one();
    }
}

fn hash_jobs(handoff: &Handoff) {
    let _gone = Gone(handoff);
    let mut hasher = Sha256::new();
    loop {
        let job = {
            let mut state = handoff.lock();
            loop {
                if let Some(job) = state.jobs.pop_front() {
                    handoff.changed.notify_one();
                    break job;
                }
                if state.closed {
                    return;
                }
                state = handoff.wait(state);
            }
        };
        match job {
            HashJob::Bytes(buf, len) => hasher.update(&buf[..len]),
            HashJob::Reset => hasher = Sha256::new(),
            HashJob::Finish => {
                let digest = hasher.finalize_reset().into();
                handoff.lock().digest = Some(digest);
                handoff.changed.notify_one();
            }
        }
    }
}

/// The state of one copy.
struct Copier<'p> {
    plan: &'p Plan,
    check: NarCheck,
    parallel: Option<ParallelHasher>,
    pool: &'p BufferPool,
    /// Read buffers, shared with the hashing thread while it hashes them.
    buffers: Vec<Arc<Vec<u8>>>,
    /// Bytes of nix's window that are checked but not yet sent, when the
    /// whole NAR is verified before sending.
    held: Vec<u8>,
    /// When streaming: the part of the last chunk that is held back until
    /// the hash is known, as a buffer and a range of it.
    held_last: Option<(usize, std::ops::Range<usize>)>,
    begun: bool,
    /// Holders whose bytes are in `check`: all share the blame for a bad hash.
    sources: Vec<PeerId>,
}

impl<'p> Copier<'p> {
    fn new(plan: &'p Plan, pool: &'p BufferPool, parallel: Option<ParallelHasher>) -> Copier<'p> {
        let mut held = Vec::new();
        if plan.verify_whole.is_some() {
            // One allocation of the final size, not a doubling series.
            held.reserve_exact((plan.end - plan.start) as usize);
        }
        Copier {
            plan,
            check: Copier::fresh_check(plan, parallel.is_some()),
            parallel,
            pool,
            buffers: Vec::new(),
            held,
            held_last: None,
            begun: false,
            sources: Vec::new(),
        }
    }

    fn fresh_check(plan: &Plan, hashed_elsewhere: bool) -> NarCheck {
        if hashed_elsewhere {
            NarCheck::hashed_elsewhere(plan.nar_hash, plan.nar_size)
        } else {
            NarCheck::new(plan.nar_hash, plan.nar_size)
        }
    }

    /// A buffer the hashing thread is done with and that holds nothing held
    /// back, or a new one.
    fn free_buffer(&mut self) -> usize {
        let held = self.held_last.as_ref().map(|(i, _)| *i);
        match self
            .buffers
            .iter_mut()
            .enumerate()
            .position(|(i, b)| Some(i) != held && Arc::get_mut(b).is_some())
        {
            Some(i) => i,
            None => {
                self.buffers.push(Arc::new(self.pool.take()));
                self.buffers.len() - 1
            }
        }
    }

    fn run(
        mut self,
        next_holder: &mut dyn FnMut() -> Option<Holder>,
        transport: &dyn Transport,
        peers: &PeerTable,
        sink: &mut dyn Sink,
    ) -> Outcome {
        let plan = self.plan;
        let what = format!("NAR {}", plan.nar_hash);
        while let Some(holder) = next_holder() {
            if Instant::now() >= plan.deadline {
                return self.give_up(format!("{what}: out of time"));
            }
            let asked = Instant::now();
            let offset = self.check.received();
            let mut body =
                match transport.nar(&holder.peer, &holder.location, offset, plan.deadline) {
                    Ok(body) => body,
                    Err(e) => {
                        e.record(peers, holder.peer, &what);
                        continue;
                    }
                };
            let mut first_byte = None;
            // Read until the NAR is complete, or this holder fails.
            let failure = loop {
                if self.check.is_complete() {
                    break None;
                }
                let chunk_start = self.check.received();
                let i = self.free_buffer();
                let want = self.pool.size.min((plan.nar_size - chunk_start) as usize);
                let buf = Arc::get_mut(&mut self.buffers[i]).expect("a free buffer");
                // Whole chunks: the first one decides whether nix gets a
                // response at all, so it must be more than a stray byte.
                let chunk_time = transport
                    .chunk_timeout()
                    .min(plan.deadline.saturating_duration_since(Instant::now()));
                let (n, read_error) = read_full(&mut body, &mut buf[..want], chunk_time);
                if n > 0 {
                    first_byte.get_or_insert_with(|| asked.elapsed());
                    if self.sources.last() != Some(&holder.peer) {
                        self.sources.push(holder.peer);
                    }
                    let buf = &self.buffers[i];
                    if let Err(e) = self.check.feed(&buf[..n]) {
                        break Some(PeerError::Lied(format!("{}: {e}", holder.peer)));
                    }
                    if let Some(parallel) = &self.parallel {
                        // The thread only ends with this copy: a send cannot fail.
                        parallel.send(HashJob::Bytes(Arc::clone(buf), n));
                    }
                    let part = window_range(plan, chunk_start, n);
                    if plan.verify_whole.is_some() {
                        self.held.extend_from_slice(&buf[part]);
                    } else if self.held_last.is_none() && self.check.received() >= plan.end {
                        // The chunk with the last byte nix asked for waits,
                        // in place, until the hash is known.
                        self.held_last = Some((i, part));
                    } else if !part.is_empty()
                        && let Err(outcome) = send(sink, &mut self.begun, &buf[part])
                    {
                        return outcome;
                    }
                }
                match read_error {
                    None if n == want => {}
                    None => {
                        break Some(PeerError::Unavailable(format!(
                            "NAR from {} ended at byte {}",
                            holder.peer,
                            self.check.received()
                        )));
                    }
                    Some(e) => {
                        break Some(PeerError::Unavailable(format!(
                            "NAR from {} failed at byte {}: {e}",
                            holder.peer,
                            self.check.received()
                        )));
                    }
                }
            };

            let failure = match failure {
                Some(failure) => Some(failure),
                None => match self.verify() {
                    Ok(()) => None,
                    Err(Verdict::Wrong(e)) => {
                        Some(PeerError::Lied(format!("{}: {e}", holder.peer)))
                    }
                    Err(Verdict::Internal(e)) => {
                        log::error!("{what}: {e}");
                        return self.give_up(e);
                    }
                },
            };
            match failure {
                None => {
                    let rest = match &self.held_last {
                        Some((i, part)) => &self.buffers[*i][part.clone()],
                        None => &self.held[..],
                    };
                    if let Err(outcome) = send(sink, &mut self.begun, rest) {
                        return outcome;
                    }
                    let latency = first_byte.unwrap_or_default();
                    peers.record_success(holder.peer, plan.nar_size, latency);
                    return Outcome::Done;
                }
                Some(e @ PeerError::Lied(_)) => {
                    if let [liar] = self.sources[..] {
                        e.record(peers, liar, &what);
                    } else {
                        // A bad prefix can make honest bytes after it look
                        // wrong: when several peers fed this NAR, none is
                        // banned, all back off.
                        log::warn!("{what} from {:?} together is wrong: {e}", self.sources);
                        for &peer in &self.sources {
                            peers.record_failure(peer, Failure::Unavailable, Instant::now());
                        }
                    }
                    if self.begun {
                        return Outcome::Broken(e.to_string());
                    }
                    // Nothing went out: start over from the next holder.
                    self.restart();
                }
                Some(e) => {
                    // Resume from the next holder where this one stopped.
                    e.record(peers, holder.peer, &what);
                }
            }
        }
        self.give_up(format!("no holder could supply {what}"))
    }

    /// The end when no holder can finish the copy.
    fn give_up(&self, why: String) -> Outcome {
        if self.begun {
            Outcome::Broken(why)
        } else {
            Outcome::NoHolder
        }
    }

    /// After the last byte: structure, size and hash.
    fn verify(&mut self) -> Result<(), Verdict> {
        let check = std::mem::replace(
            &mut self.check,
            Copier::fresh_check(self.plan, self.parallel.is_some()),
        );
        match &self.parallel {
            None => check.finish().map_err(Verdict::Wrong),
            Some(parallel) => {
                let digest = parallel
                    .finish()
                    .ok_or_else(|| Verdict::Internal("the hashing thread stopped".into()))?;
                check.finish_with_digest(digest).map_err(Verdict::Wrong)
            }
        }
    }

    fn restart(&mut self) {
        self.check = Copier::fresh_check(self.plan, self.parallel.is_some());
        if let Some(parallel) = &self.parallel {
            parallel.send(HashJob::Reset);
        }
        self.sources.clear();
        self.held.clear();
        self.held_last = None;
    }
}

/// Why a complete NAR was not accepted.
enum Verdict {
    /// The bytes are wrong: someone lied.
    Wrong(String),
    /// This host failed; no peer is to blame.
    Internal(String),
}

fn send(sink: &mut dyn Sink, begun: &mut bool, bytes: &[u8]) -> Result<(), Outcome> {
    let result = if *begun {
        Ok(())
    } else {
        *begun = true;
        sink.begin()
    };
    result.and_then(|()| sink.write(bytes)).map_err(|e| {
        if is_client_gone(&e) {
            log::debug!("client left during a peer NAR: {e}");
            Outcome::ClientGone
        } else {
            // A stalled client (send timeout) or a local failure: the
            // response cannot be completed.
            Outcome::Broken(format!("writing to the client: {e}"))
        }
    })
}

/// Errors that mean the client closed its end.
pub fn is_client_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

/// The part of a chunk at NAR offset `chunk_start` that lies in nix's
/// window, as a range of the chunk.
fn window_range(plan: &Plan, chunk_start: u64, len: usize) -> std::ops::Range<usize> {
    let chunk_end = chunk_start + len as u64;
    let from = plan.start.clamp(chunk_start, chunk_end) - chunk_start;
    let to = plan.end.clamp(chunk_start, chunk_end) - chunk_start;
    from as usize..to as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::client::PeerClient;
    use crate::nix::testdata;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// How a test peer serves the NAR.
    #[derive(Clone, Copy)]
    enum Serves {
        Honest,
        /// One byte changed inside a file: well-formed, wrong hash.
        Flipped,
        /// Random bytes of the right length.
        Garbage,
        /// Promises the whole NAR, sends this many bytes, hangs up.
        DiesAfter(usize),
        /// `Flipped`, but hangs up after this many bytes.
        FlippedDiesAfter(usize),
        /// Sends this many bytes at once, then one byte every 50 ms.
        Trickles(usize),
        /// Ignores Range: the whole NAR with a 200, one byte every 10 ms,
        /// fast enough for every per-read and per-chunk floor.
        IgnoresRangeAndTrickles,
    }

    /// A peer on loopback that serves `/local/nar/x.nar` with Range support,
    /// one request per connection; stopped on drop.
    struct TestPeer {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl TestPeer {
        fn start(serves: Serves) -> TestPeer {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let stopping = Arc::clone(&stop);
            let nar = served_bytes(serves);
            let thread = std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Ok(stream) = stream {
                        let _ = answer(stream, &nar, serves);
                    }
                }
            });
            TestPeer {
                addr,
                stop,
                thread: Some(thread),
            }
        }

        fn id(&self) -> PeerId {
            PeerId::Http(self.addr)
        }

        fn holder(&self) -> Holder {
            Holder {
                peer: self.id(),
                location: "/local/nar/x.nar".into(),
            }
        }
    }

    impl Drop for TestPeer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            let _ = TcpStream::connect(self.addr);
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    fn true_nar() -> (&'static [u8], NarHash) {
        let dir = &testdata::SIGNED_PATHS[2];
        (testdata::DIR_NAR, NarHash::parse(dir.nar_hash).unwrap())
    }

    fn served_bytes(serves: Serves) -> Vec<u8> {
        let mut nar = true_nar().0.to_vec();
        match serves {
            Serves::Flipped | Serves::FlippedDiesAfter(_) => {
                let at = testdata::first_file_byte(&nar);
                nar[at] ^= 0x20;
            }
            Serves::Garbage => {
                for (i, b) in nar.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(31).wrapping_add(7);
                }
            }
            Serves::Honest
            | Serves::DiesAfter(_)
            | Serves::Trickles(_)
            | Serves::IgnoresRangeAndTrickles => {}
        }
        nar
    }

    fn answer(stream: TcpStream, nar: &[u8], serves: Serves) -> io::Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut start = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some(range) = line.strip_prefix("Range: bytes=")
                && !matches!(serves, Serves::IgnoresRangeAndTrickles)
            {
                start = range.trim().trim_end_matches('-').parse().unwrap();
            }
        }
        let mut stream = stream;
        let body = &nar[start..];
        let status = if start > 0 {
            format!(
                "206 Partial Content\r\nContent-Range: bytes {start}-{}/{}",
                nar.len() - 1,
                nar.len()
            )
        } else {
            "200 OK".to_string()
        };
        write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        match serves {
            Serves::DiesAfter(n) | Serves::FlippedDiesAfter(n) => {
                stream.write_all(&body[..n.min(body.len())])
            }
            Serves::Trickles(_) | Serves::IgnoresRangeAndTrickles => {
                let (n, pause) = match serves {
                    Serves::Trickles(n) => (n, Duration::from_millis(50)),
                    _ => (0, Duration::from_millis(10)),
                };
                stream.write_all(&body[..n.min(body.len())])?;
                for byte in body.iter().skip(n) {
                    std::thread::sleep(pause);
                    stream.write_all(&[*byte])?;
                }
                Ok(())
            }
            _ => stream.write_all(body),
        }
    }

    #[derive(Default)]
    struct VecSink {
        begun: bool,
        bytes: Vec<u8>,
    }

    impl Sink for VecSink {
        fn begin(&mut self) -> io::Result<()> {
            assert!(!self.begun, "begun twice");
            self.begun = true;
            Ok(())
        }
        fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
            assert!(self.begun, "written before begin");
            self.bytes.extend_from_slice(bytes);
            Ok(())
        }
    }

    /// Copies the vector NAR from `holders` in that order.
    fn run(
        holders: &[&TestPeer],
        verify_whole: bool,
        chunk: usize,
        window: (u64, u64),
    ) -> (Outcome, VecSink, PeerTable) {
        run_with_timeout(
            holders,
            verify_whole,
            chunk,
            window,
            Duration::from_secs(10),
        )
    }

    fn run_with_timeout(
        holders: &[&TestPeer],
        verify_whole: bool,
        chunk: usize,
        window: (u64, u64),
        timeout: Duration,
    ) -> (Outcome, VecSink, PeerTable) {
        let budget = transfer_budget(true_nar().0.len() as u64, timeout);
        run_within(holders, verify_whole, chunk, window, timeout, budget)
    }

    fn run_within(
        holders: &[&TestPeer],
        verify_whole: bool,
        chunk: usize,
        window: (u64, u64),
        timeout: Duration,
        budget: Duration,
    ) -> (Outcome, VecSink, PeerTable) {
        let (nar, nar_hash) = true_nar();
        let memory = MemoryBudget::new(nar.len() as u64);
        let plan = Plan {
            nar_hash,
            nar_size: nar.len() as u64,
            start: window.0,
            end: window.1,
            verify_whole: verify_whole.then(|| memory.reserve(nar.len() as u64).unwrap()),
            deadline: Instant::now() + budget,
        };
        let mut queue: std::collections::VecDeque<Holder> =
            holders.iter().map(|p| p.holder()).collect();
        let client = PeerClient::new(timeout);
        let peers = PeerTable::new();
        let mut sink = VecSink::default();
        let buffers = BufferPool::new(chunk, 4);
        let outcome = copy(
            &plan,
            &mut || queue.pop_front(),
            &client,
            &peers,
            &buffers,
            &mut sink,
        );
        (outcome, sink, peers)
    }

    fn whole() -> (u64, u64) {
        (0, true_nar().0.len() as u64)
    }

    #[test]
    fn the_flipped_byte_is_inside_a_file() {
        // So `Flipped` is a well-formed NAR that only the hash can catch.
        let (nar, hash) = true_nar();
        let mut check = super::super::check::NarCheck::new(hash, nar.len() as u64);
        check.feed(&served_bytes(Serves::Flipped)).unwrap();
        assert!(check.finish().unwrap_err().contains("hashes to"));
    }

    #[test]
    fn an_honest_peer_is_copied_whole_or_streamed() {
        let honest = TestPeer::start(Serves::Honest);
        for (verify_whole, chunk) in [(true, CHUNK), (false, CHUNK), (false, 64)] {
            let (outcome, sink, peers) = run(&[&honest], verify_whole, chunk, whole());
            assert_eq!(outcome, Outcome::Done);
            assert!(sink.bytes == true_nar().0, "bytes differ");
            assert_eq!(peers.record(&honest.id()).unwrap().successes, 1);
        }
    }

    #[test]
    fn a_range_gets_the_right_bytes() {
        let honest = TestPeer::start(Serves::Honest);
        let (nar, _) = true_nar();
        let (outcome, sink, _) = run(&[&honest], false, 64, (100, 900));
        assert_eq!(outcome, Outcome::Done);
        assert!(sink.bytes == nar[100..900]);
    }

    #[test]
    fn liars_are_banned_and_replaced_before_a_byte_is_sent() {
        let honest = TestPeer::start(Serves::Honest);
        for serves in [Serves::Flipped, Serves::Garbage] {
            let liar = TestPeer::start(serves);
            // Verified whole, and streamed in one chunk (held back at the end).
            for (verify_whole, chunk) in [(true, 64), (false, CHUNK)] {
                let (outcome, sink, peers) = run(&[&liar, &honest], verify_whole, chunk, whole());
                assert_eq!(outcome, Outcome::Done);
                assert!(sink.bytes == true_nar().0, "bytes differ");
                let record = peers.record(&liar.id()).unwrap();
                assert_eq!(record.lies, 1);
                assert!(!peers.is_available(&liar.id(), std::time::Instant::now()));
            }
        }
    }

    #[test]
    fn a_lie_found_after_bytes_went_out_breaks_the_response() {
        let liar = TestPeer::start(Serves::Flipped);
        let honest = TestPeer::start(Serves::Honest);
        let (outcome, sink, peers) = run(&[&liar, &honest], false, 64, whole());
        assert!(matches!(outcome, Outcome::Broken(_)), "{outcome:?}");
        // What went out is the liar's, but never the whole NAR: the last
        // chunk is held back, so the client cannot take it for complete.
        let nar = true_nar().0;
        assert!(sink.bytes.len() < nar.len(), "the last chunk went out");
        assert!(sink.bytes == served_bytes(Serves::Flipped)[..sink.bytes.len()]);
        assert_eq!(peers.record(&liar.id()).unwrap().lies, 1);
    }

    #[test]
    fn a_wrong_nar_from_several_holders_bans_none_of_them() {
        // The first holder's prefix has the changed byte; the second
        // finishes it honestly: the NAR is wrong, but who lied is unknown.
        let after_the_flip = testdata::first_file_byte(true_nar().0) + 8;
        let flipped = TestPeer::start(Serves::FlippedDiesAfter(after_the_flip));
        let resumer = TestPeer::start(Serves::Honest);
        let honest = TestPeer::start(Serves::Honest);
        let (outcome, sink, peers) = run(&[&flipped, &resumer, &honest], true, 64, whole());
        assert_eq!(outcome, Outcome::Done, "started over with the third");
        assert!(sink.bytes == true_nar().0, "bytes differ");
        for peer in [&flipped, &resumer] {
            let record = peers.record(&peer.id()).unwrap();
            assert_eq!(record.lies, 0, "nobody is banned on shared blame");
            assert!(record.failures >= 1);
        }
    }

    #[test]
    fn a_range_that_ends_early_is_held_until_the_hash_checks_out() {
        let liar = TestPeer::start(Serves::Flipped);
        let (outcome, sink, peers) = run(&[&liar], false, 64, (0, 100));
        assert!(matches!(outcome, Outcome::Broken(_)), "{outcome:?}");
        assert!(
            sink.bytes.len() < 100,
            "the chunk with the range's end went out"
        );
        assert_eq!(peers.record(&liar.id()).unwrap().lies, 1);
    }

    #[test]
    fn a_holder_that_trickles_is_replaced() {
        let slow = TestPeer::start(Serves::Trickles(100));
        let honest = TestPeer::start(Serves::Honest);
        let (outcome, sink, peers) = run_with_timeout(
            &[&slow, &honest],
            false,
            64,
            whole(),
            Duration::from_millis(300),
        );
        assert_eq!(outcome, Outcome::Done);
        assert!(sink.bytes == true_nar().0, "bytes differ");
        let record = peers.record(&slow.id()).unwrap();
        assert_eq!((record.failures, record.lies), (1, 0));
    }

    #[test]
    fn garbage_is_refused_before_anything_is_sent() {
        let liar = TestPeer::start(Serves::Garbage);
        let (outcome, sink, _) = run(&[&liar], false, 64, whole());
        assert_eq!(outcome, Outcome::NoHolder);
        assert!(!sink.begun);
    }

    #[test]
    fn a_holder_that_dies_is_replaced_from_where_it_stopped() {
        let dying = TestPeer::start(Serves::DiesAfter(500));
        let honest = TestPeer::start(Serves::Honest);
        for (verify_whole, chunk) in [(false, 64), (true, 64)] {
            let (outcome, sink, peers) = run(&[&dying, &honest], verify_whole, chunk, whole());
            assert_eq!(outcome, Outcome::Done);
            assert!(sink.bytes == true_nar().0, "bytes differ");
            let record = peers.record(&dying.id()).unwrap();
            assert_eq!((record.failures, record.lies), (1, 0));
        }
        // Alone, it breaks the response once bytes went out.
        let (outcome, _, _) = run(&[&dying], false, 64, whole());
        assert!(matches!(outcome, Outcome::Broken(_)), "{outcome:?}");
    }

    #[test]
    fn a_resume_from_a_holder_that_ignores_range_and_trickles_ends_in_time() {
        // The first holder dies mid-NAR; the second must skip to that byte
        // and trickles while it does, and after. Only the transfer's
        // deadline ends it: each byte comes well within the per-read and
        // per-chunk timeouts, and the whole NAR would arrive in about 11 s.
        let dying = TestPeer::start(Serves::DiesAfter(200));
        let trickler = TestPeer::start(Serves::IgnoresRangeAndTrickles);
        let (outcome, _, peers) = run_within(
            &[&dying, &trickler],
            false,
            64,
            whole(),
            Duration::from_secs(10),
            Duration::from_millis(800),
        );
        assert!(matches!(outcome, Outcome::Broken(_)), "{outcome:?}");
        // Both holders are 127.0.0.1, one host to the table: both failed.
        let record = peers.record(&trickler.id()).unwrap();
        assert_eq!((record.failures, record.lies), (2, 0));
    }

    #[test]
    fn no_holder_is_asked_after_the_deadline() {
        let honest = TestPeer::start(Serves::Honest);
        let (outcome, sink, peers) = run_within(
            &[&honest],
            false,
            64,
            whole(),
            Duration::from_secs(10),
            Duration::ZERO,
        );
        assert_eq!(outcome, Outcome::NoHolder);
        assert!(!sink.begun);
        assert!(peers.record(&honest.id()).is_none(), "not blamed");
    }

    #[test]
    fn the_memory_budget_is_shared_and_given_back() {
        let budget = MemoryBudget::new(10);
        let a = budget.reserve(6).unwrap();
        assert!(budget.reserve(5).is_none(), "spent");
        let b = budget.reserve(4).unwrap();
        assert_eq!(budget.left(), 0);
        drop(a);
        assert_eq!(budget.left(), 6);
        drop(b);
        assert_eq!(budget.left(), 10);
        assert!(budget.reserve(11).is_none());
    }

    #[test]
    fn window_cuts_chunks_to_the_requested_range() {
        let plan = Plan {
            nar_hash: NarHash([0; 32]),
            nar_size: 100,
            start: 10,
            end: 20,
            verify_whole: None,
            deadline: Instant::now(),
        };
        let chunk: Vec<u8> = (0..8).collect();
        assert_eq!(&chunk[window_range(&plan, 0, chunk.len())], b"");
        assert_eq!(
            &chunk[window_range(&plan, 8, chunk.len())],
            &[2, 3, 4, 5, 6, 7]
        );
        assert_eq!(&chunk[window_range(&plan, 16, chunk.len())], &[0, 1, 2, 3]);
        assert_eq!(&chunk[window_range(&plan, 24, chunk.len())], b"");
        let all = Plan {
            start: 0,
            end: 100,
            ..plan
        };
        assert_eq!(&chunk[window_range(&all, 40, chunk.len())], &chunk[..]);
    }
}
