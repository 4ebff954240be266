//! Paths from peers, for this host's nix: the narinfo of a path this host
//! lacks, and its NAR passed through from the peers that hold it.
//!
//! The narinfo is the peer's own, with its signatures: this host never signs
//! what came from a peer. Only its `URL:` is rewritten to the route that
//! passes the NAR through this host, naming the peer and the NarHash.

use std::io::{self, Write};
use std::sync::Arc;
use std::time::Instant;

use tiny_http::Request;

use super::ServerContext;
use super::respond::{abort, nar_head, nar_range, respond, text, unsatisfiable};
use super::route::peer_nar_url;
use crate::fetch::read_ahead::Pass;
use crate::fetch::resolver::Offer;
use crate::fetch::transfer::{Outcome, Plan, Sink, is_client_gone};
use crate::nix::hash::NarHash;
use crate::nix::store_path::HashPart;
use crate::peers::PeerId;
use crate::stats::{Client, Source};

/// A path found on a peer.
pub struct PeerNarInfo {
    /// The narinfo to give nix.
    pub text: String,
    /// The store path's name, after its hash part.
    pub name: String,
    pub peer: PeerId,
    /// The peer's offer, for the read-ahead.
    pub offer: Arc<Offer>,
}

/// The narinfo to give nix for a path found on a peer, or `None`.
pub fn peer_narinfo(context: &ServerContext, hash: &HashPart) -> Option<PeerNarInfo> {
    let offer = context.resolver.as_ref()?.offer(hash)?;
    Some(for_nix(offer, hash))
}

/// [`peer_narinfo`] when its answer is known with no wait (cached, or a
/// miss the summaries settle); `None` when the peers must be asked.
pub fn settled_peer_narinfo(
    context: &ServerContext,
    hash: &HashPart,
) -> Option<Option<PeerNarInfo>> {
    let answer = context.resolver.as_ref()?.settled(hash)?;
    Some(answer.map(|offer| for_nix(offer, hash)))
}

/// The narinfo of `offer` as nix gets it: the NAR passed through this host.
fn for_nix(offer: Arc<Offer>, hash: &HashPart) -> PeerNarInfo {
    let mut narinfo = offer.narinfo.clone();
    narinfo.url = peer_nar_url(&offer.source.peer, hash, &narinfo.nar_hash);
    PeerNarInfo {
        text: narinfo.render(),
        name: narinfo.store_path.name().to_string(),
        peer: offer.source.peer,
        offer,
    }
}

/// Serves a NAR the read-ahead fetched and verified (see
/// [`crate::fetch::read_ahead`]); returns the status.
pub fn serve_held_nar(
    context: &ServerContext,
    request: Request,
    hash: &HashPart,
    nar: &[u8],
) -> u16 {
    context.stats.peer_request();
    let size = nar.len() as u64;
    let Some((status, start, end)) = nar_range(&request, size) else {
        return respond(request, unsatisfiable(size));
    };
    let head_lines = nar_head(status, start, end, size);
    let mut writer = request.into_writer();
    // Both bounds are within the NAR: `nar_range` checked them.
    let bytes = &nar[start as usize..end as usize];
    if let Err(e) = writer
        .write_all(head_lines.as_bytes())
        .and_then(|()| writer.write_all(bytes))
        .and_then(|()| writer.flush())
    {
        log::debug!("read-ahead NAR of {hash} not delivered: {e}");
        return status;
    }
    let stats = &context.stats;
    let name = stats.name_of(hash);
    stats.nar_served(Client::Local, *hash, name.as_deref(), end - start);
    status
}

/// Passes a peer's NAR through to this host's nix; returns the status.
pub fn serve_peer_nar(
    context: &ServerContext,
    request: Request,
    named: PeerId,
    hash: &HashPart,
    nar_hash: &NarHash,
    head: bool,
) -> u16 {
    let Some(resolver) = context.resolver.as_ref() else {
        return respond(request, text(404, "not found\n"));
    };
    // A read-ahead of this NAR is waited for, not raced: a liar would be
    // asked twice. While this request fetches it, no read-ahead does.
    let _passing = if head {
        None
    } else {
        match context.read_ahead.pass(hash, nar_hash) {
            Pass::Held(nar) => return serve_held_nar(context, request, hash, &nar),
            Pass::Fetch(passing) => Some(passing),
        }
    };
    context.stats.peer_request();
    let Some(mut source) = resolver.nar_source(hash, nar_hash, named) else {
        return respond(request, text(404, "no peer offers this NAR\n"));
    };
    let size = source.nar_size;
    let Some((status, start, end)) = nar_range(&request, size) else {
        return respond(request, unsatisfiable(size));
    };
    let head_lines = nar_head(status, start, end, size);
    if head {
        let mut writer = request.into_writer();
        if let Err(e) = writer
            .write_all(head_lines.as_bytes())
            .and_then(|()| writer.flush())
        {
            log::debug!("response not delivered: {e}");
        }
        return status;
    }
    // Small NARs are held whole until they check out, while the memory
    // budget for that lasts; past it they stream, verified all the same.
    let verify_whole = (size <= context.verify_before_send)
        .then(|| context.held_nars.reserve(size))
        .flatten();
    let plan = Plan {
        nar_hash: *nar_hash,
        nar_size: size,
        start,
        end,
        verify_whole,
        deadline: source.deadline,
    };
    let Some(socket) = request.socket() else {
        // Every connection of this server is TCP.
        return respond(request, text(404, "not served on this connection\n"));
    };
    let mut sink = ResponseSink {
        request: Some(request),
        writer: None,
        head_lines,
    };
    let began = Instant::now();
    let (outcome, holder) = source.copy(&plan, &mut sink);
    let stats = &context.stats;
    match outcome {
        Outcome::Done => {
            if let Some(mut writer) = sink.writer.take()
                && let Err(e) = writer.flush()
            {
                if !is_client_gone(&e) {
                    log::error!("flushing NAR {nar_hash}: {e}; aborting the response");
                    abort(&socket);
                    stats.error();
                }
                return status;
            }
            log::info!(
                "passed {hash} ({} bytes) through from peers in {:.2?}",
                end - start,
                began.elapsed()
            );
            let name = stats.name_of(hash);
            stats.nar_served(Client::Local, *hash, name.as_deref(), end - start);
            // The bytes up to `end` went through the hash check.
            if let Some(peer) = holder {
                stats.received(Source::of(&peer), end);
                stats.event(
                    "peer",
                    format!(
                        "fetched {} ({} bytes) from {peer}",
                        label(hash, name.as_deref()),
                        end - start
                    ),
                );
            }
            status
        }
        Outcome::NoHolder => {
            log::warn!("no peer could supply NAR {nar_hash} of {hash}");
            match sink.request.take() {
                Some(request) => respond(request, text(404, "no peer could supply this NAR\n")),
                None => status,
            }
        }
        Outcome::Broken(why) => {
            // Nix was promised bytes that cannot be delivered: cut it off so
            // it sees a failed download, never a wrong or short success.
            log::error!("NAR {nar_hash} of {hash}: {why}; aborting the response");
            abort(&socket);
            stats.error();
            status
        }
        Outcome::ClientGone => {
            log::debug!("client left during NAR {nar_hash}");
            status
        }
    }
}

/// A path as the activity log names it: `<hash>-<name>`, or the hash part.
pub(super) fn label(hash: &HashPart, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{hash}-{name}"),
        None => hash.to_string(),
    }
}

/// Writes the head on the first byte, so nothing is promised before the
/// first chunk from a peer has checked out.
struct ResponseSink {
    request: Option<Request>,
    writer: Option<Box<dyn Write + Send>>,
    head_lines: String,
}

impl Sink for ResponseSink {
    fn begin(&mut self) -> io::Result<()> {
        let request = self
            .request
            .take()
            .ok_or_else(|| io::Error::other("response already begun"))?;
        let mut writer = request.into_writer();
        writer.write_all(self.head_lines.as_bytes())?;
        self.writer = Some(writer);
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &mut self.writer {
            Some(writer) => writer.write_all(bytes),
            None => Err(io::Error::other("response not begun")),
        }
    }
}
