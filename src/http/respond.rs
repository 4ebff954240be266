//! Writing responses: small bodies, NAR heads and ranges, the send deadline
//! of a response, and cutting a connection whose response cannot be
//! completed. Shared by the handlers of this host's store and of peers'.

use std::io::{self, Cursor};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use tiny_http::{Header, Request, Response, StatusCode};

use super::SEND_TIMEOUT;
use super::access::is_loopback;
use super::range::{self, RangeAnswer};

/// A response to a network client must be over within this plus its body
/// at [`NETWORK_MIN_RATE`]: a client that reads slowly, or not at all,
/// holds a network worker that long at most.
const NETWORK_RESPONSE_BASE: Duration = Duration::from_secs(30);
/// 256 KiB/s: far below any LAN, Wi-Fi included.
const NETWORK_MIN_RATE: u64 = 256 * 1024;

/// The send deadline of one response: none for this host's own nix, which
/// only the send timeout bounds, and the whole body at a floor rate for a
/// network client.
pub(super) struct SendDeadline {
    at: Option<Instant>,
}

impl SendDeadline {
    pub(super) fn for_response(request: &Request, body_len: u64) -> SendDeadline {
        let network = !request.remote_addr().is_some_and(is_loopback);
        SendDeadline {
            at: network.then(|| {
                Instant::now()
                    + NETWORK_RESPONSE_BASE
                    + Duration::from_secs(body_len / NETWORK_MIN_RATE)
            }),
        }
    }

    /// Sets the socket's send timeout to what is left, before a write; an
    /// error once nothing is.
    pub(super) fn arm(&self, socket: &TcpStream) -> io::Result<()> {
        let timeout = match self.at {
            None => SEND_TIMEOUT,
            Some(at) => match at.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => left.min(SEND_TIMEOUT),
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took too long to read the response",
                    ));
                }
            },
        };
        socket.set_write_timeout(Some(timeout))
    }
}

/// Cuts a connection whose response cannot be completed: the client sees a
/// short read at once, never a short success.
pub(super) fn abort(socket: &TcpStream) {
    if let Err(e) = socket.shutdown(std::net::Shutdown::Both) {
        log::debug!("aborting a connection: {e}");
    }
}

/// The status and byte window (`start..end`) to answer a NAR request of a
/// NAR of `size` bytes with; `None` for a range outside it (416).
pub(super) fn nar_range(request: &Request, size: u64) -> Option<(u16, u64, u64)> {
    let range_header = request
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str());
    match range::answer(range_header, size) {
        RangeAnswer::Full => Some((200, 0, size)),
        RangeAnswer::Partial { start, end } => Some((206, start, end)),
        RangeAnswer::Unsatisfiable => None,
    }
}

pub(super) fn unsatisfiable(size: u64) -> Response<Cursor<Vec<u8>>> {
    text(416, "range not satisfiable\n")
        .with_header(header("Content-Range", &format!("bytes */{size}")))
}

/// The status line and headers of a NAR response, written by hand because
/// the body is written straight to the socket.
pub(super) fn nar_head(status: u16, start: u64, end: u64, size: u64) -> String {
    let reason = if status == 200 {
        "OK"
    } else {
        "Partial Content"
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/x-nix-nar\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n",
        end - start
    );
    if status == 206 {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{size}\r\n",
            end - 1
        ));
    }
    head.push_str("\r\n");
    head
}

/// Sends `response`; returns its status, for the stats.
pub(super) fn respond(request: Request, response: Response<Cursor<Vec<u8>>>) -> u16 {
    let status = response.status_code().0;
    if let Err(e) = request.respond(response) {
        log::debug!("response not delivered: {e}");
    }
    status
}

pub(super) fn header(name: &str, value: &str) -> Header {
    // Only called with ASCII constants and numbers, which tiny_http always accepts.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

pub(super) fn body(status: u16, bytes: Vec<u8>, content_type: &str) -> Response<Cursor<Vec<u8>>> {
    let len = bytes.len();
    Response::new(
        StatusCode(status),
        vec![header("Content-Type", content_type)],
        Cursor::new(bytes),
        Some(len),
        None,
    )
}

pub(super) fn text(status: u16, message: &str) -> Response<Cursor<Vec<u8>>> {
    body(status, message.as_bytes().to_vec(), "text/plain")
}
