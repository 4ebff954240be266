//! A tiny HTTP/1.1 client for exact-status assertions.
//!
//! It sends the request bytes it is given, verbatim, so tests can send what a
//! polite client never would: malformed paths, `..`, percent-encoded
//! traversal, huge headers, unknown methods. Every request asks for
//! `Connection: close` (the helpers add it) and the response is read to the end
//! of the connection, so a HEAD answer that wrongly carries a body shows up in
//! [`Response::body`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

/// Upper bound on any single read or write, so a stuck server fails the test
/// instead of hanging it.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// Header names in lower case, values trimmed, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body as sent: for HEAD this is whatever came after the headers.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A short description for failure messages.
    pub fn describe(&self) -> String {
        let mut body = self.text();
        if body.len() > 300 {
            let cut = (0..=300)
                .rev()
                .find(|&i| body.is_char_boundary(i))
                .unwrap_or(0);
            body.truncate(cut);
            body.push_str("...");
        }
        format!(
            "{} {} headers={:?} body={body:?}",
            self.status, self.reason, self.headers
        )
    }
}

/// Send `request` verbatim and read the whole response. `head` says that the
/// request was HEAD: the body is then read to EOF without decoding.
pub fn raw(addr: SocketAddr, request: &[u8], head: bool) -> io::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    // A server may answer and close before it has read everything (e.g. a
    // huge header). Keep what it said: a write error is only fatal if no
    // response arrives.
    let write_result = stream.write_all(request).and_then(|()| stream.flush());
    let _ = stream.shutdown(Shutdown::Write);
    let mut data = Vec::new();
    let read_result = stream.read_to_end(&mut data);
    if data.is_empty() {
        write_result?;
        read_result?;
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed without a response",
        ));
    }
    parse(&data, head)
}

/// Parse a complete response (as read to EOF).
pub fn parse(data: &[u8], head: bool) -> io::Result<Response> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let end = data
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head_text = std::str::from_utf8(&data[..end]).map_err(|_| bad("headers are not UTF-8"))?;
    let mut lines = head_text.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(&format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status in {status_line:?}")))?;
    let reason = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(&format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let rest = &data[end + 4..];
    let mut response = Response {
        status,
        reason,
        headers,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    response.body = if head || !chunked {
        rest.to_vec()
    } else {
        dechunk(rest)?
    };
    let declared = if head || chunked {
        None
    } else {
        response.header("content-length")
    };
    if let Some(length) = declared {
        let length: usize = length.parse().map_err(|_| bad("bad content-length"))?;
        if response.body.len() < length {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body truncated: {} of {length} bytes", response.body.len()),
            ));
        }
    }
    Ok(response)
}

fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("chunk size line"))?;
        let size_text =
            std::str::from_utf8(&data[..line_end]).map_err(|_| bad("chunk size not UTF-8"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("chunk size not hex"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if data.len() < size + 2 {
            return Err(bad("chunk truncated"));
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Build a request with `Host` and `Connection: close` plus `extra` headers.
pub fn request_bytes(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in extra {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text.into_bytes()
}

pub fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    raw(addr, &request_bytes("GET", path, &[]), false)
}

pub fn head(addr: SocketAddr, path: &str) -> io::Result<Response> {
    raw(addr, &request_bytes("HEAD", path, &[]), true)
}

pub fn get_with(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> io::Result<Response> {
    raw(addr, &request_bytes("GET", path, extra), false)
}

/// GET that must get an answer; panics with the error otherwise.
pub fn must_get(addr: SocketAddr, path: &str) -> Response {
    get(addr, path)
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: expected a response, got error {e}"))
}

/// GET that must answer `status`; returns the response.
pub fn expect_status(addr: SocketAddr, path: &str, status: u16) -> Response {
    let response = must_get(addr, path);
    assert_eq!(
        response.status,
        status,
        "GET {path}: expected {status}, got {}",
        response.describe()
    );
    response
}
