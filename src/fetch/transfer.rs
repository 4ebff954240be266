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
    let mut check = NarCheck::new(plan.nar_hash, plan.nar_size);
    // Bytes of nix's window that are checked but not yet sent.
    let mut held: Vec<u8> = Vec::new();
    let mut begun = false;
    // Holders whose bytes are in `check`: all share the blame for a bad hash.
    let mut sources: Vec<SocketAddr> = Vec::new();
    let mut buf = vec![0u8; CHUNK.min(plan.nar_size as usize).max(1)];

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
