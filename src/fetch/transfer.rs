//! Copies one NAR from the peers that hold it to nix, verified.
//!
//! The bytes go through a [`NarCheck`] as they arrive. Nothing is sent until
//! the first chunk has parsed, so garbage never reaches nix and the next
//! holder can be tried. A NAR up to the verify-before-send bound is held
//! whole and sent only once its hash checks out, so a bad holder is replaced
//! without nix noticing. A larger one streams, with its newest chunk held
//! back: when the end shows a wrong hash or size, the last bytes are never
//! sent and the caller aborts the connection, so nix sees a failed download,
//! never a wrong success. A holder that dies mid-stream is replaced by the
//! next, which is asked for the rest with a Range request.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use super::check::NarCheck;
use super::client::{PeerClient, PeerError};
use crate::nix::hash::NarHash;
use crate::peers::{Failure, PeerTable};

/// Bytes read from a peer at a time.
const CHUNK: usize = 256 * 1024;

/// A peer that offers the NAR, and where under its `/local/` it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub peer: SocketAddr,
    pub url: String,
}

/// What to copy.
pub struct Plan {
    pub nar_hash: NarHash,
    pub nar_size: u64,
    /// The bytes nix asked for: `start..end` of the NAR.
    pub start: u64,
    pub end: u64,
    /// Hold the whole NAR until it checks out.
    pub verify_whole: bool,
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
    /// Nix went away.
    ClientGone,
}

/// Copies `plan` from the holders `next_holder` yields (best first; it is
/// called again whenever one fails), recording each outcome in `peers`.
pub fn copy(
    plan: &Plan,
    next_holder: &mut dyn FnMut() -> Option<Holder>,
    client: &PeerClient,
    peers: &PeerTable,
    sink: &mut dyn Sink,
) -> Outcome {
    copy_in_chunks(plan, CHUNK, next_holder, client, peers, sink)
}

fn copy_in_chunks(
    plan: &Plan,
    chunk: usize,
    next_holder: &mut dyn FnMut() -> Option<Holder>,
    client: &PeerClient,
    peers: &PeerTable,
    sink: &mut dyn Sink,
) -> Outcome {
    let mut check = NarCheck::new(plan.nar_hash, plan.nar_size);
    // Bytes of nix's window that are checked but not yet sent.
    let mut held: Vec<u8> = Vec::new();
    if plan.verify_whole {
        // One allocation of the final size, not a doubling series.
        held.reserve_exact((plan.end - plan.start) as usize);
    }
    let mut begun = false;
    // Holders whose bytes are in `check`: all share the blame for a bad hash.
    let mut sources: Vec<SocketAddr> = Vec::new();
    let mut buf = vec![0u8; chunk.min(plan.nar_size as usize).max(1)];

    while let Some(holder) = next_holder() {
        let asked = Instant::now();
        let mut body = match client.nar(holder.peer, &holder.url, check.received()) {
            Ok(body) => body,
            Err(e) => {
                note(peers, holder.peer, &e);
                continue;
            }
        };
        let mut first_byte = None;
        // Read until the NAR is complete, or this holder fails.
        let failure = loop {
            if check.is_complete() {
                break None;
            }
            let want = buf.len().min((plan.nar_size - check.received()) as usize);
            let n = match body.read(&mut buf[..want]) {
                Ok(0) => {
                    break Some(PeerError::Unavailable(format!(
                        "NAR from {} ended at byte {}",
                        holder.peer,
                        check.received()
                    )));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    break Some(PeerError::Unavailable(format!(
                        "NAR from {} failed at byte {}: {e}",
                        holder.peer,
                        check.received()
                    )));
                }
            };
            first_byte.get_or_insert_with(|| asked.elapsed());
            let chunk_start = check.received();
            if sources.last() != Some(&holder.peer) {
                sources.push(holder.peer);
            }
            if let Err(e) = check.feed(&buf[..n]) {
                break Some(PeerError::Lied(format!("{}: {e}", holder.peer)));
            }
            if !plan.verify_whole && !check.is_complete() && !held.is_empty() {
                // The previous chunk is now safe to send: this one is held back.
                if let Err(outcome) = send(sink, &mut begun, &held) {
                    return outcome;
                }
                held.clear();
            }
            held.extend_from_slice(window(plan, chunk_start, &buf[..n]));
        };

        let failure = match failure {
            None => std::mem::replace(&mut check, NarCheck::new(plan.nar_hash, plan.nar_size))
                .finish()
                .err()
                .map(|e| PeerError::Lied(format!("{}: {e}", holder.peer))),
            Some(failure) => Some(failure),
        };
        match failure {
            None => {
                if let Err(outcome) = send(sink, &mut begun, &held) {
                    return outcome;
                }
                let latency = first_byte.unwrap_or_default();
                peers.record_success(holder.peer, plan.nar_size, latency);
                return Outcome::Done;
            }
            Some(e @ PeerError::Lied(_)) => {
                log::warn!("banned peer(s) {sources:?} for NAR {}: {e}", plan.nar_hash);
                for peer in sources.drain(..) {
                    peers.record_failure(peer, Failure::Lied, Instant::now());
                }
                if begun {
                    return Outcome::Broken(e.to_string());
                }
                // Nothing went out: start over from the next holder.
                check = NarCheck::new(plan.nar_hash, plan.nar_size);
                held.clear();
            }
            Some(e) => {
                // Resume from the next holder where this one stopped.
                note(peers, holder.peer, &e);
            }
        }
    }
    if begun {
        Outcome::Broken(format!(
            "no holder could supply the rest of NAR {}",
            plan.nar_hash
        ))
    } else {
        Outcome::NoHolder
    }
}

fn note(peers: &PeerTable, peer: SocketAddr, error: &PeerError) {
    log::info!("peer {peer}: {error}");
    if let Some(failure) = error.failure() {
        peers.record_failure(peer, failure, Instant::now());
    }
}

fn send(sink: &mut dyn Sink, begun: &mut bool, bytes: &[u8]) -> Result<(), Outcome> {
    let result = if *begun {
        Ok(())
    } else {
        *begun = true;
        sink.begin()
    };
    result.and_then(|()| sink.write(bytes)).map_err(|e| {
        log::debug!("client left during a peer NAR: {e}");
        Outcome::ClientGone
    })
}

/// The part of a chunk at NAR offset `chunk_start` that lies in nix's window.
fn window<'a>(plan: &Plan, chunk_start: u64, chunk: &'a [u8]) -> &'a [u8] {
    let chunk_end = chunk_start + chunk.len() as u64;
    let from = plan.start.clamp(chunk_start, chunk_end) - chunk_start;
    let to = plan.end.clamp(chunk_start, chunk_end) - chunk_start;
    &chunk[from as usize..to as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::testdata;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
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

        fn holder(&self) -> Holder {
            Holder {
                peer: self.addr,
                url: "nar/x.nar".into(),
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
            Serves::Flipped => {
                let at = testdata::first_file_byte(&nar);
                nar[at] ^= 0x20;
            }
            Serves::Garbage => {
                for (i, b) in nar.iter_mut().enumerate() {
                    *b = (i as u8).wrapping_mul(31).wrapping_add(7);
                }
            }
            Serves::Honest | Serves::DiesAfter(_) => {}
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
            if let Some(range) = line.strip_prefix("Range: bytes=") {
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
            Serves::DiesAfter(n) => stream.write_all(&body[..n.min(body.len())]),
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
        let (nar, nar_hash) = true_nar();
        let plan = Plan {
            nar_hash,
            nar_size: nar.len() as u64,
            start: window.0,
            end: window.1,
            verify_whole,
        };
        let mut queue: std::collections::VecDeque<Holder> =
            holders.iter().map(|p| p.holder()).collect();
        let client = PeerClient::new(Duration::from_secs(10));
        let peers = PeerTable::new();
        let mut sink = VecSink::default();
        let outcome = copy_in_chunks(
            &plan,
            chunk,
            &mut || queue.pop_front(),
            &client,
            &peers,
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
            assert_eq!(peers.record(&honest.addr).unwrap().successes, 1);
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
                let record = peers.record(&liar.addr).unwrap();
                assert_eq!(record.lies, 1);
                assert!(!peers.is_available(&liar.addr, std::time::Instant::now()));
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
        assert_eq!(peers.record(&liar.addr).unwrap().lies, 1);
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
            let record = peers.record(&dying.addr).unwrap();
            assert_eq!((record.failures, record.lies), (1, 0));
        }
        // Alone, it breaks the response once bytes went out.
        let (outcome, _, _) = run(&[&dying], false, 64, whole());
        assert!(matches!(outcome, Outcome::Broken(_)), "{outcome:?}");
    }

    #[test]
    fn window_cuts_chunks_to_the_requested_range() {
        let plan = Plan {
            nar_hash: NarHash([0; 32]),
            nar_size: 100,
            start: 10,
            end: 20,
            verify_whole: false,
        };
        let chunk: Vec<u8> = (0..8).collect();
        assert_eq!(window(&plan, 0, &chunk), b"");
        assert_eq!(window(&plan, 8, &chunk), &[2, 3, 4, 5, 6, 7]);
        assert_eq!(window(&plan, 16, &chunk), &[0, 1, 2, 3]);
        assert_eq!(window(&plan, 24, &chunk), b"");
        let all = Plan {
            start: 0,
            end: 100,
            ..plan
        };
        assert_eq!(window(&all, 40, &chunk), &chunk[..]);
    }
}
