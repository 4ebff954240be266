//! Request handlers: cache info, narinfos, NARs, and the routing of the
//! stats pages (health, metrics, dashboard) and the control endpoints.

use std::io::{self, Cursor, Read, Write};
use std::sync::Arc;

use tiny_http::{Method, Request, Response};

use super::access::{host_is_local, is_loopback};
use super::respond::{
    SendDeadline, abort, body, header, nar_head, nar_range, respond, text, unsatisfiable,
};
use super::route::{Route, Scope};
use super::{Lane, ServerContext, dashboard, health, metrics, proxy};
use crate::fetch::resolver::Offer;
use crate::fetch::transfer::is_client_gone;
use crate::nix::store_path::{HashPart, STORE_DIR};
use crate::stats::{Client, RouteKind, Source};
use crate::store::dump::{NarDump, nar_size};
use crate::store::{LocalPath, StoreError};

/// Small NARs (large ones go by sendfile) are copied to the socket in chunks
/// of this size: few syscalls, and little memory for each of the workers.
const NAR_CHUNK: usize = 64 * 1024;

/// NAR bodies from this size up are sent with `sendfile`.
const SENDFILE_MIN: u64 = 1024 * 1024;

/// Request heads larger than this are refused, as nginx refuses them; nix
/// sends about 150 bytes.
const MAX_HEAD: usize = 8 * 1024;

/// A request answered, as the stats count it.
pub(super) struct Handled {
    pub kind: RouteKind,
    pub status: u16,
}

/// Answers `request`; `None` when it was handed to the peer lane, whose
/// worker answers (and counts) it.
// Not inlined into the worker loop: a worker that waits for its first
// request keeps only its own small stack frame resident.
#[inline(never)]
pub(super) fn handle(context: &ServerContext, request: Request, lane: &Lane) -> Option<Handled> {
    let from_loopback = request.remote_addr().is_some_and(is_loopback);
    let route = match Route::parse(request.url()) {
        // The original peerix fetches a peer's NAR from the root (`/nar/...`,
        // the narinfo's URL taken from the server root): other hosts get the
        // NARs there that `/local/` would give them, and no others. (A
        // loopback request naming a foreign host is a rebinding page, not a
        // peer: 403.)
        Route::Nar(Scope::Root, hash, nar_hash) if !from_loopback => {
            Route::Nar(Scope::Local, hash, nar_hash)
        }
        route => route,
    };
    let kind = route.kind();
    let status = answer(context, request, lane, route, from_loopback)?;
    Some(Handled { kind, status })
}

/// Who may use a route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Any host: `/local/...`, `/health`, and what a flag opens.
    Anyone,
    /// This host only: loopback, naming this host in `Host`.
    ThisHost,
}

fn access(context: &ServerContext, route: &Route) -> Access {
    match route {
        Route::CacheInfo(Scope::Root)
        | Route::NarInfo(Scope::Root, _)
        | Route::Nar(Scope::Root, ..)
        | Route::PeerNar(..)
        | Route::Control(_) => Access::ThisHost,
        Route::Metrics if !context.public.metrics => Access::ThisHost,
        Route::Dashboard | Route::DashboardJson if !context.public.dashboard => Access::ThisHost,
        _ => Access::Anyone,
    }
}

fn answer(
    context: &ServerContext,
    request: Request,
    lane: &Lane,
    route: Route,
    from_loopback: bool,
) -> Option<u16> {
    let head_size = request.url().len()
        + request
            .headers()
            .iter()
            .map(|h| h.field.as_str().as_str().len() + h.value.as_str().len() + 4)
            .sum::<usize>();
    if head_size > MAX_HEAD {
        return Some(respond(
            request,
            text(431, "request header fields too large\n"),
        ));
    }
    let post = matches!(route, Route::Control(_));
    let head = match (request.method(), post) {
        (Method::Get, false) => false,
        (Method::Head, false) => true,
        (Method::Post, true) => false,
        (_, post) => {
            let allow = if post { "POST" } else { "GET, HEAD" };
            let response = text(405, "method not allowed\n").with_header(header("Allow", allow));
            return Some(respond(request, response));
        }
    };
    // Loopback by the socket, and this host by name: a web page that
    // rebinds its own name to 127.0.0.1 passes the first test only.
    let this_host = from_loopback && host_is_local(header_value(&request, "Host"), context.bind);
    if access(context, &route) == Access::ThisHost && !this_host {
        let why = if from_loopback {
            "root endpoints answer requests for this host only (Host must be localhost, 127.0.0.1 or [::1]); use /local/\n"
        } else {
            "root endpoints answer this host only; use /local/\n"
        };
        return Some(respond(request, text(403, why)));
    }
    let stats = &context.stats;
    let status = match route {
        // Which peers this host knows, and how they behaved, is for this
        // host only.
        Route::Health => respond(request, health::health(&context.snapshot(), this_host)),
        Route::Metrics => respond(request, metrics::metrics(&context.snapshot())),
        Route::Dashboard => respond(request, dashboard::page()),
        Route::DashboardJson => respond(request, dashboard::json(&context.snapshot())),
        Route::Control(action) => dashboard::control(context, request, action),
        Route::CacheInfo(_) => respond(request, cache_info(context.priority)),
        Route::NarInfo(scope, hash) => match find(context, scope, &hash) {
            Ok(path) => {
                stats.narinfo_requested(hash, Some(path.info.path.name()));
                stats.narinfo_served();
                if scope == Scope::Root {
                    stats.lookup(true);
                }
                respond(request, narinfo(path.narinfo.clone()))
            }
            // A path this host lacks is looked for on the peers, for this
            // host only. What is known with no wait (a cached answer, a
            // miss the summaries settle) is answered here: no handoff, no
            // peer lane thread.
            Err(_) if scope == Scope::Root && context.resolver.is_some() => {
                let (request, found) = match proxy::settled_peer_narinfo(context, &hash) {
                    Some(found) => (request, found),
                    None => {
                        let request = hand_to_peer_lane(request, lane)?;
                        (request, proxy::peer_narinfo(context, &hash))
                    }
                };
                stats.peer_request();
                match found {
                    Some(found) => {
                        stats.narinfo_requested(hash, Some(&found.name));
                        stats.narinfo_served();
                        stats.lookup(true);
                        stats.event(
                            "peer",
                            format!("{hash}-{} found on {}", found.name, found.peer),
                        );
                        let status = respond(request, narinfo(found.text));
                        read_ahead(context, lane, &hash, &found.offer);
                        status
                    }
                    None => {
                        stats.narinfo_requested(hash, None);
                        stats.lookup(false);
                        respond(request, text(404, "not found here or on any peer\n"))
                    }
                }
            }
            Err(response) => {
                stats.narinfo_requested(hash, None);
                if scope == Scope::Root {
                    stats.lookup(false);
                }
                respond(request, response)
            }
        },
        Route::Nar(scope, hash, nar_hash) => match find(context, scope, &hash) {
            Ok(path) if path.info.nar_hash == nar_hash => serve_nar(context, request, &path, head),
            Ok(_) => respond(request, text(404, "no such NAR (stale NarHash)\n")),
            Err(response) => respond(request, response),
        },
        Route::PeerNar(peer, hash, nar_hash) => {
            // A NAR read ahead is served here, from memory: no handoff.
            if !head && let Some(nar) = context.read_ahead.take(&hash, &nar_hash) {
                proxy::serve_held_nar(context, request, &hash, &nar)
            } else {
                let request = hand_to_peer_lane(request, lane)?;
                proxy::serve_peer_nar(context, request, peer, &hash, &nar_hash, head)
            }
        }
        Route::Summary => serve_summary(context, request),
        Route::BadRequest(why) => respond(request, text(400, &format!("bad request: {why}\n"))),
        Route::NotFound => respond(request, text(404, "not found\n")),
    };
    Some(status)
}

/// Work that waits on peers goes to the peer lane, so the local lane is
/// always free for what this host answers itself. Returns the request when
/// this worker is to do the work.
fn hand_to_peer_lane(request: Request, lane: &Lane) -> Option<Request> {
    match lane {
        // Back only when the peer lane is gone: then it is done here.
        Lane::Local(handoff) => handoff.send(request),
        Lane::Peer(_) | Lane::Network => Some(request),
    }
}

/// Nix got a narinfo from a peer: look up its references and fetch its NAR
/// ahead of nix's next requests.
fn read_ahead(context: &ServerContext, lane: &Lane, hash: &HashPart, offer: &Arc<Offer>) {
    // Only this host's nix is read ahead for (root requests come from
    // loopback, on the local lane or the peer lane it hands over to).
    if matches!(lane, Lane::Network) {
        return;
    }
    let index = context.store.index();
    let runners = context
        .read_ahead
        .after_narinfo(hash, offer, &|reference| index.contains(reference));
    lane.wake_read_ahead(runners);
}

pub(super) fn header_value<'r>(request: &'r Request, name: &'static str) -> Option<&'r str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Looks a path up for `scope`; a path the policy keeps private is simply not
/// there for `/local`, so a peer cannot tell it apart from a missing one.
fn find(
    context: &ServerContext,
    scope: Scope,
    hash: &HashPart,
) -> Result<Arc<LocalPath>, Response<Cursor<Vec<u8>>>> {
    match context.store.lookup(hash) {
        Ok(Some(path)) if scope == Scope::Root || path.shared => Ok(path),
        Ok(_) => Err(text(404, "not found\n")),
        // Nix takes a 404 as "not here" and moves on to its next substituter;
        // a 5xx would make it retry and then fail the build.
        Err(StoreError::Daemon(e)) => {
            log::warn!("lookup of {}: {e}", hash.as_str());
            Err(text(404, "not found (local store unavailable)\n"))
        }
        Err(e) => {
            log::error!("lookup of {}: {e}", hash.as_str());
            Err(text(404, "not found\n"))
        }
    }
}

/// Sends a NAR of this host's store; returns the status.
fn serve_nar(context: &ServerContext, request: Request, path: &LocalPath, head: bool) -> u16 {
    let size = path.info.nar_size;
    let physical = context.store.physical_path(&path.info.path);
    // The NAR length is known from metadata alone: a path whose files no
    // longer add up to NarSize is refused before any header goes out.
    match nar_size(&physical) {
        Ok(on_disk) if on_disk == size => {}
        Ok(on_disk) => {
            log::error!(
                "{}: files on disk make a {on_disk}-byte NAR, the store says {size}; not serving it",
                path.info.path
            );
            return respond(request, text(404, "NAR does not match the store\n"));
        }
        Err(e) => {
            log::warn!("{}: {e}", path.info.path);
            return respond(request, text(404, "NAR is gone\n"));
        }
    }
    let Some((status, start, end)) = nar_range(&request, size) else {
        return respond(request, unsatisfiable(size));
    };
    let head_lines = nar_head(status, start, end, size);

    let dump = if head {
        None
    } else {
        match open_at(&physical, start) {
            Ok(dump) => Some(dump),
            Err(e) => {
                log::warn!("{}: {e}", path.info.path);
                return respond(request, text(404, "NAR is gone\n"));
            }
        }
    };
    let Some(socket) = request.socket() else {
        // Every connection of this server is TCP.
        return respond(request, text(404, "not served on this connection\n"));
    };
    let deadline = SendDeadline::for_response(&request, end - start);
    let client = match request.remote_addr() {
        Some(addr) if is_loopback(addr) => None,
        addr => Some(addr.map(|a| a.ip())),
    };
    let mut arm = || deadline.arm(&socket);
    let mut writer = request.into_writer();
    let sent = arm()
        .and_then(|()| writer.write_all(head_lines.as_bytes()))
        .and_then(|()| match dump {
            // Large bodies go by sendfile on the connection's socket; the
            // rest is copied here rather than through tiny_http's 8 KiB loop.
            Some(mut dump) if end - start >= SENDFILE_MIN => {
                // The headers must be on the wire before the body overtakes them.
                writer.flush()?;
                dump.send_to(&socket, end - start, &mut arm)
            }
            Some(dump) => copy_exact(dump, &mut writer, end - start, &mut arm),
            None => Ok(()),
        });
    let result = sent.and_then(|()| arm()).and_then(|()| writer.flush());
    match result {
        Ok(()) if head => {}
        Ok(()) => {
            log::debug!("served {} bytes of {}", end - start, path.info.path);
            let hash = path.info.path.hash_part();
            let name = path.info.path.name();
            let to = match client {
                None => Client::Local,
                // Every network client is a LAN host until the tracker and
                // Iroh name theirs.
                Some(_) => Client::Network(Source::Lan),
            };
            context.stats.nar_served(to, hash, Some(name), end - start);
            let whom = match client {
                None => "this host".to_string(),
                Some(Some(ip)) => ip.to_string(),
                Some(None) => "a peer".to_string(),
            };
            context.stats.event(
                "serve",
                format!("served {hash}-{name} ({} bytes) to {whom}", end - start),
            );
        }
        Err(e) if is_client_gone(&e) => log::debug!("client left during {}: {e}", path.info.path),
        Err(e) => {
            // The client was promised more bytes: close early so it sees a
            // failed download at once instead of waiting for them.
            log::warn!(
                "serving {} failed after the headers were sent: {e}; aborting the connection",
                path.info.path
            );
            abort(&socket);
            drop(writer);
            context.stats.error();
        }
    }
    status
}

fn open_at(physical: &std::path::Path, start: u64) -> io::Result<NarDump> {
    let mut dump = NarDump::open(physical)?;
    if start > 0 {
        dump.skip(start)?;
    }
    Ok(dump)
}

/// Copies exactly `len` bytes; fewer is an error, so a body is never short
/// without the caller knowing.
fn copy_exact(
    mut source: impl Read,
    sink: &mut impl Write,
    len: u64,
    before_write: &mut dyn FnMut() -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![
        0u8;
        NAR_CHUNK
            .min(usize::try_from(len).unwrap_or(NAR_CHUNK))
            .max(1)
    ];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(buf.len()));
        let n = match source.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("NAR ended {left} bytes early"),
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        before_write()?;
        sink.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// `/local/summary`: this host's store summary, with its generation as the
/// `ETag`, so a peer that has it gets a 304.
fn serve_summary(context: &ServerContext, request: Request) -> u16 {
    let Some(publisher) = &context.publisher else {
        return respond(request, text(404, "this host publishes no summary\n"));
    };
    if !publisher.ready() {
        return respond(request, text(404, "no summary before the first scan\n"));
    }
    let published = publisher.current();
    let etag = format!("\"{}\"", published.generation);
    let matches = request
        .headers()
        .iter()
        .filter(|h| h.field.equiv("If-None-Match"))
        .flat_map(|h| h.value.as_str().split(','))
        .any(|tag| tag.trim() == etag || tag.trim() == "*");
    let response = if matches {
        body(304, Vec::new(), "application/octet-stream")
    } else {
        body(200, published.bytes.clone(), "application/octet-stream")
    };
    respond(request, response.with_header(header("ETag", &etag)))
}

fn narinfo(text: String) -> Response<Cursor<Vec<u8>>> {
    body(200, text.into_bytes(), "text/x-nix-narinfo")
}

fn cache_info(priority: u32) -> Response<Cursor<Vec<u8>>> {
    let text = format!("StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: {priority}\n");
    body(200, text.into_bytes(), "text/x-nix-cache-info")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_exact_refuses_a_short_source() {
        let mut sink = Vec::new();
        assert!(copy_exact(&b"abc"[..], &mut sink, 3, &mut || Ok(())).is_ok());
        assert_eq!(sink, b"abc");
        let e = copy_exact(&b"ab"[..], &mut Vec::new(), 3, &mut || Ok(())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
