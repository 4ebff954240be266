use std::io::BufWriter;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::str::FromStr;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::body::{Body, Framing, Returned};
use crate::common::{HTTPVersion, Header, Method};
use crate::request::RequestBody;
use crate::util::{
    discard, drain, is_timeout, read_line, ChunkLimits, Chunked, ConnReader, LineError,
    RefinedTcpStream, SequentialWriter, SequentialWriterBuilder, Wait,
};
use crate::{Limits, Request, Response, StatusCode};

/// How many requests of one connection may be in the application's hands
/// at once (pipelining). The connection reads no further until one is done,
/// so a client cannot queue requests without bound.
const MAX_PIPELINED: usize = 4;

/// How long a connection we close keeps reading what the client still
/// sends, so that the close does not reset the connection before the client
/// has read our last response (at most `Limits::body_timeout`, and at most
/// `Limits::max_drain` bytes).
const LINGER: Duration = Duration::from_secs(2);

/// Bodies up to this size are read with the head, so that the next request
/// can be read at once (as upstream does).
const PREREAD_BODY: u64 = 1024;

type Sink = SequentialWriterBuilder<BufWriter<RefinedTcpStream>>;

/// `from + by`, saturating far in the future instead of overflowing (a
/// timeout may be configured as `Duration::MAX`).
fn later(from: Instant, by: Duration) -> Instant {
    from.checked_add(by)
        .unwrap_or_else(|| from + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
///
/// peerix: rewritten to bound what a client can make it hold and wait for
/// (see `Limits`): lines and heads are limited while they are read, reads
/// have deadlines, an unread body is drained within limits by this thread
/// (never by the application's) or the connection is closed, and errors are
/// answered (and flushed) before the connection closes.
pub struct ClientConnection {
    // address of the client
    remote_addr: Option<SocketAddr>,

    // the reading side, while this thread has it
    reader: Option<ConnReader>,

    // where the reading side comes back from while a request's body has it
    lent: Option<Receiver<Returned>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: Sink,

    // the TCP socket, for `Request::socket`
    socket: Option<Arc<TcpStream>>,

    limits: Arc<Limits>,

    // requests of this connection in the application's hands
    pipeline: Arc<Pipeline>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // set once the connection is closing
    done: bool,

    // true if the connection goes through SSL
    secure: bool,

    // the first request's head is due by then
    first_deadline: Option<Instant>,
}

/// Why no request could be read.
#[derive(Debug)]
enum ReadError {
    /// The client went away, timed out or failed: close without a word.
    Quiet,
    /// Answer with this status, then close.
    Reply(u16),
}

/// A request head, read whole.
struct Head {
    method: Method,
    path: String,
    version: HTTPVersion,
    headers: Vec<Header>,
}

/// Counts the requests of a connection in the application's hands.
pub(crate) struct Pipeline {
    out: Mutex<usize>,
    done: Condvar,
}

/// One request in the application's hands; dropping it frees its place.
pub(crate) struct PipelineSlot(Arc<Pipeline>);

impl Pipeline {
    fn new() -> Arc<Pipeline> {
        Arc::new(Pipeline {
            out: Mutex::new(0),
            done: Condvar::new(),
        })
    }

    fn out(&self) -> usize {
        *self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until fewer than `max` requests are out.
    fn wait_below(&self, max: usize) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        while *out >= max {
            out = self.done.wait(out).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Takes a place for one more request.
    fn slot(self: &Arc<Self>) -> PipelineSlot {
        *self.out.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        PipelineSlot(Arc::clone(self))
    }
}

impl Drop for PipelineSlot {
    fn drop(&mut self) {
        let mut out = self.0.out.lock().unwrap_or_else(|e| e.into_inner());
        *out = out.saturating_sub(1);
        drop(out);
        self.0.done.notify_all();
    }
}

impl ClientConnection {
    /// A connection from `peer` over the two halves of its stream, accepted
    /// at `accepted_at`.
    pub(crate) fn new(
        write_socket: RefinedTcpStream,
        read_socket: RefinedTcpStream,
        peer: Option<SocketAddr>,
        limits: Arc<Limits>,
        accepted_at: Instant,
    ) -> ClientConnection {
        let secure = read_socket.secure();
        let socket = read_socket.tcp_socket();
        let first_deadline = Some(later(accepted_at, limits.head_timeout));

        ClientConnection {
            remote_addr: peer,
            reader: Some(ConnReader::new(read_socket)),
            lent: None,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            socket,
            limits,
            pipeline: Pipeline::new(),
            no_more_requests: false,
            done: false,
            secure,
            first_deadline,
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    fn chunk_limits(&self) -> ChunkLimits {
        ChunkLimits {
            max_line: self.limits.max_line,
            max_trailers: self.limits.max_head,
        }
    }

    /// Gets the reading side back from the previous request, draining what
    /// it left of its body. `Err(linger)` if the connection must close.
    fn reclaim_reader(&mut self) -> Result<ConnReader, bool> {
        if let Some(reader) = self.reader.take() {
            return Ok(reader);
        }
        let lent = self.lent.take().ok_or(false)?;
        let Returned { mut reader, unread } = lent.recv().map_err(|_| false)?;
        match unread {
            None => Ok(reader),
            Some(Some(unread)) => {
                let deadline = later(Instant::now(), self.limits.body_timeout);
                let limits = self.chunk_limits();
                if drain(&mut reader, unread, self.limits.max_drain, deadline, limits) {
                    Ok(reader)
                } else {
                    self.reader = Some(reader);
                    Err(true)
                }
            }
            Some(None) => {
                self.reader = Some(reader);
                Err(true)
            }
        }
    }

    /// Ends the connection: waits until every response promised on it is
    /// written, then closes. With `linger`, the writing side is shut first
    /// and what the client still sends is read and thrown away for a little
    /// while (bounded), so the close does not reset the connection under
    /// the response.
    fn finish(&mut self, linger: bool) {
        self.done = true;
        let mut last = self.sink.next_writer();
        let _ = std::io::Write::flush(&mut last);
        drop(last);
        if let Some(mut reader) = self.reader.take() {
            if linger {
                let _ = reader.get_ref().shutdown_socket(Shutdown::Write);
                let wait = LINGER.min(self.limits.body_timeout);
                discard(
                    &mut reader,
                    self.limits.max_drain,
                    later(Instant::now(), wait),
                );
            }
        }
    }

    /// Answers with an error status and closes the connection.
    fn reply_and_close(&mut self, code: u16) {
        let mut writer = self.sink.next_writer();
        let result = if code == 505 {
            Response::from_string("This server only supports HTTP versions 1.0 and 1.1\n")
                .with_status_code(StatusCode(505))
                .with_connection_close()
                .raw_print(&mut writer, HTTPVersion(1, 1), &[], false, None)
        } else {
            Response::empty(StatusCode(code))
                .with_connection_close()
                .raw_print(&mut writer, HTTPVersion(1, 1), &[], false, None)
        };
        if result.is_ok() {
            let _ = std::io::Write::flush(&mut writer);
        }
        drop(writer);
        self.finish(true);
    }

    /// Reads the next request. Blocks until its head has been read.
    fn next_request(&mut self) -> Option<Request> {
        if self.done {
            return None;
        }
        if self.no_more_requests {
            // Once the last request is done with the reader, what it left
            // unread decides whether the close must linger.
            let linger = match self.reclaim_reader() {
                Ok(reader) => {
                    self.reader = Some(reader);
                    false
                }
                Err(linger) => linger,
            };
            self.finish(linger);
            return None;
        }
        let mut reader = match self.reclaim_reader() {
            Ok(reader) => reader,
            Err(linger) => {
                self.finish(linger);
                return None;
            }
        };
        self.pipeline.wait_below(MAX_PIPELINED);

        let head_by = match self.first_deadline.take() {
            Some(deadline) => self
                .wait_first_byte(&mut reader, deadline, false)
                .map(|()| deadline),
            None => {
                let idle = later(Instant::now(), self.limits.idle_timeout);
                self.wait_first_byte(&mut reader, idle, true)
                    .map(|()| later(Instant::now(), self.limits.head_timeout))
            }
        };
        let head = match head_by.and_then(|by| read_head(&mut reader, &self.limits, by)) {
            Ok(head) => head,
            Err(error) => {
                self.reader = Some(reader);
                self.fail(error);
                return None;
            }
        };
        let slot = self.pipeline.slot();
        match self.build_request(head, reader, slot) {
            Ok(rq) => Some(rq),
            Err((error, reader)) => {
                if reader.is_some() {
                    self.reader = reader;
                }
                self.fail(error);
                None
            }
        }
    }

    /// Waits for the first byte of a request, until `deadline`; with
    /// `idle`, the wait only counts once the responses to earlier requests
    /// are written (a long download is not an idle connection).
    fn wait_first_byte(
        &mut self,
        reader: &mut ConnReader,
        mut deadline: Instant,
        idle: bool,
    ) -> Result<(), ReadError> {
        loop {
            match reader.fill(Wait::Until(deadline)) {
                Ok(bytes) if !bytes.is_empty() => return Ok(()),
                Err(ref e) if idle && is_timeout(e) && !self.responses_done() => {
                    deadline = later(Instant::now(), self.limits.idle_timeout);
                }
                _ => return Err(ReadError::Quiet),
            }
        }
    }

    /// True if no request of this connection is in the application's hands
    /// and every response is written.
    fn responses_done(&mut self) -> bool {
        self.pipeline.out() == 0 && self.sink.all_done()
    }

    fn fail(&mut self, error: ReadError) {
        match error {
            ReadError::Quiet => self.finish(false),
            ReadError::Reply(code) => self.reply_and_close(code),
        }
    }

    /// Makes a `Request` of a head; the reader goes with its body, if any.
    fn build_request(
        &mut self,
        head: Head,
        mut reader: ConnReader,
        slot: PipelineSlot,
    ) -> Result<Request, (ReadError, Option<ConnReader>)> {
        let headers = &head.headers;
        let values = |name: &'static str| header_values(headers, name);

        // Transfer-Encoding: chunked must be the final coding, and then it
        // overrides any Content-Length (RFC 7230 3.3.3).
        let codings: Vec<&str> = values("Transfer-Encoding")
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        let chunked = match codings.last() {
            None => false,
            Some(last) if last.eq_ignore_ascii_case("chunked") => true,
            Some(_) => return Err((ReadError::Reply(400), Some(reader))),
        };

        let content_length = if chunked {
            None
        } else {
            let mut length = None;
            for value in values("Content-Length").flat_map(|v| v.split(',')) {
                let value = value.trim();
                let n = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                    value.parse::<u64>().ok()
                } else {
                    None
                };
                match (n, length) {
                    (Some(n), None) => length = Some(n),
                    (Some(n), Some(m)) if n == m => {}
                    _ => return Err((ReadError::Reply(400), Some(reader))),
                }
            }
            length
        };

        let expects_continue = match values("Expect").next() {
            None => false,
            Some(v) if v.eq_ignore_ascii_case("100-continue") => true,
            Some(_) => return Err((ReadError::Reply(417), Some(reader))),
        };

        let connection = values("Connection").next().map(|v| v.to_ascii_lowercase());
        let upgrade = connection.as_deref().is_some_and(|v| v.contains("upgrade"));

        let framing = if upgrade {
            Some(Framing::Raw)
        } else if chunked {
            Some(Framing::Chunked(Chunked::Size))
        } else {
            match content_length {
                None | Some(0) => None,
                Some(n) => Some(Framing::Length(n)),
            }
        };

        let body = match framing {
            None => {
                self.reader = Some(reader);
                RequestBody::Empty
            }
            Some(Framing::Length(n)) if n <= PREREAD_BODY && !expects_continue => {
                let deadline = later(Instant::now(), self.limits.body_timeout);
                let mut buffer = vec![0; n as usize];
                let mut offset = 0;
                while offset < buffer.len() {
                    match reader.read_some(&mut buffer[offset..], Wait::Until(deadline)) {
                        Ok(0) | Err(_) => return Err((ReadError::Quiet, Some(reader))),
                        Ok(k) => offset += k,
                    }
                }
                self.reader = Some(reader);
                RequestBody::Buffered(std::io::Cursor::new(buffer))
            }
            Some(framing) => {
                let (home, lent) = channel();
                self.lent = Some(lent);
                let body = Body::new(
                    reader,
                    framing,
                    home,
                    self.chunk_limits(),
                    self.limits.body_timeout,
                );
                RequestBody::Stream(body)
            }
        };

        // updating the status of the connection
        match connection {
            Some(ref val) if val.contains("close") => self.no_more_requests = true,
            Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
            Some(ref val) if !val.contains("keep-alive") && head.version == HTTPVersion(1, 0) => {
                self.no_more_requests = true
            }
            None if head.version == HTTPVersion(1, 0) => self.no_more_requests = true,
            _ => (),
        };

        let writer = self.sink.next_writer();
        Ok(crate::request::from_connection(
            crate::request::ConnectionRequest {
                secure: self.secure,
                method: head.method,
                path: head.path,
                version: head.version,
                headers: head.headers,
                remote_addr: self.remote_addr,
                content_length,
                body,
                expects_continue,
                socket: self.socket.clone(),
                max_drain: self.limits.max_drain,
                slot,
            },
            writer,
        ))
    }
}

/// The values of the headers named `name`.
fn header_values<'a>(headers: &'a [Header], name: &'static str) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Reads a request head whose first byte has come, whole by `head_by`, its
/// lines and itself bounded while they are read.
fn read_head(
    reader: &mut ConnReader,
    limits: &Limits,
    head_by: Instant,
) -> Result<Head, ReadError> {
    let wait = Wait::Until(head_by);
    let mut budget = limits.max_head;

    // the request line (empty lines before it are skipped, RFC 7230 3.5)
    let line = loop {
        let max = limits.max_line.min(budget);
        match read_line(reader, max, wait) {
            Ok((line, taken)) => {
                budget -= taken;
                if !line.is_empty() {
                    break line;
                }
            }
            Err(LineError::TooLong) if max == limits.max_line => return Err(ReadError::Reply(414)),
            Err(LineError::TooLong) => return Err(ReadError::Reply(431)),
            Err(LineError::Io(_)) => return Err(ReadError::Quiet),
        }
    };
    let (method, path, version) = parse_request_line(&line)?;

    let mut headers = Vec::new();
    loop {
        let max = limits.max_line.min(budget);
        let (line, taken) = match read_line(reader, max, wait) {
            Ok(read) => read,
            Err(LineError::TooLong) => return Err(ReadError::Reply(431)),
            Err(LineError::Io(_)) => return Err(ReadError::Quiet),
        };
        budget -= taken;
        if line.is_empty() {
            break;
        }
        let header = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| Header::from_str(l.trim()).ok())
            .ok_or(ReadError::Reply(400))?;
        headers.push(header);
    }

    Ok(Head {
        method,
        path,
        version,
        headers,
    })
}

/// Parses a "HTTP/1.1" string: 400 if it is none, 505 for a version other
/// than 1.0 and 1.1.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let number = |s: &str| -> Option<u8> {
        if !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let rest = version.strip_prefix("HTTP/").ok_or(ReadError::Reply(400))?;
    let (major, minor) = match rest.split_once('.') {
        Some((major, minor)) => (number(major), number(minor)),
        None => (number(rest), Some(0)),
    };
    match (major, minor) {
        (Some(1), Some(minor)) if minor <= 1 => Ok(HTTPVersion(1, minor)),
        (Some(_), Some(_)) => Err(ReadError::Reply(505)),
        _ => Err(ReadError::Reply(400)),
    }
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &[u8]) -> Result<(Method, String, HTTPVersion), ReadError> {
    let line = std::str::from_utf8(line).map_err(|_| ReadError::Reply(400))?;
    let mut parts = line.trim().split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .map(ToOwned::to_owned);
    let version = parts.next().ok_or(ReadError::Reply(400))?;
    match (method, path) {
        (Some(method), Some(path)) => Ok((method, path, parse_http_version(version)?)),
        _ => Err(ReadError::Reply(400)),
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        self.next_request()
    }
}

#[cfg(test)]
mod test {
    use super::ReadError;

    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line(b"GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line(b"GET /hello").is_err());
        assert!(super::parse_request_line(b"qsd qsd qsd").is_err());
    }

    #[test]
    fn versions() {
        let status = |line: &[u8]| match super::parse_request_line(line) {
            Ok(_) => 200,
            Err(ReadError::Reply(code)) => code,
            Err(ReadError::Quiet) => 0,
        };
        assert_eq!(status(b"GET / HTTP/1.0"), 200);
        assert_eq!(status(b"GET / HTTP/1.1"), 200);
        assert_eq!(status(b"GET / HTTP/2.0"), 505);
        assert_eq!(status(b"PRI * HTTP/2.0"), 505);
        assert_eq!(status(b"GET / HTTP/3"), 505);
        assert_eq!(status(b"GET / HTTP/0.9"), 505);
        assert_eq!(status(b"GET / HTTP/1.2"), 505);
        assert_eq!(status(b"GET / HTTP/x.y"), 400);
        assert_eq!(status(b"GET / FTP/1.1"), 400);
        assert_eq!(status(b"GET / HTTP/1.1000"), 400);
        assert_eq!(status(b"\xff / HTTP/1.1"), 400);
    }
}
