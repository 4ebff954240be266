//! The reading side of a client connection (peerix addition): a small
//! fixed buffer over the socket, reads bounded by deadlines, lines bounded
//! while they are read, a chunked-body decoder whose state can be handed
//! from one owner of the reader to the next, and bounded draining.

use std::io::{self, ErrorKind, Read};
use std::time::{Duration, Instant};

use super::RefinedTcpStream;

/// The size of a connection's read buffer.
pub(crate) const READ_BUFFER: usize = 4 * 1024;

/// A byte stream whose reads can be given a timeout.
pub(crate) trait TimedRead: Read {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()>;
}

impl TimedRead for RefinedTcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        RefinedTcpStream::set_read_timeout(self, timeout)
    }
}

/// How long a read may wait.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Wait {
    /// No later than this instant.
    Until(Instant),
    /// The timeout the stream has now.
    AsSet,
}

pub(crate) fn timed_out() -> io::Error {
    io::Error::new(ErrorKind::TimedOut, "timed out")
}

/// A timeout on a socket read shows up as `WouldBlock`; say what it is.
fn normalize(e: io::Error) -> io::Error {
    if e.kind() == ErrorKind::WouldBlock {
        timed_out()
    } else {
        e
    }
}

pub(crate) fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock)
}

/// A buffered reader over one connection.
pub(crate) struct ConnReader<S = RefinedTcpStream> {
    stream: S,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// The read timeout the stream has, when it is known.
    timeout: Option<Option<Duration>>,
    /// Bytes taken from the stream so far (handed out or thrown away).
    consumed: u64,
}

impl<S: TimedRead> ConnReader<S> {
    pub(crate) fn new(stream: S) -> Self {
        Self::with_capacity(READ_BUFFER, stream)
    }

    pub(crate) fn with_capacity(capacity: usize, stream: S) -> Self {
        ConnReader {
            stream,
            buf: vec![0; capacity.max(1)].into_boxed_slice(),
            pos: 0,
            end: 0,
            timeout: None,
            consumed: 0,
        }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.stream
    }

    /// Bytes taken from the stream so far.
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }

    /// Bytes read from the stream but not yet consumed.
    pub(crate) fn buffered(&self) -> &[u8] {
        &self.buf[self.pos..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        let n = n.min(self.end - self.pos);
        self.pos += n;
        self.consumed += n as u64;
    }

    /// Sets the stream's read timeout (a system call only when it changes).
    pub(crate) fn set_timeout(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        if self.timeout != Some(timeout) {
            self.timeout = None;
            self.stream.set_read_timeout(timeout)?;
            self.timeout = Some(timeout);
        }
        Ok(())
    }

    /// Prepares a read from the stream that must respect `wait`.
    fn arm(&mut self, wait: Wait) -> io::Result<()> {
        match wait {
            Wait::AsSet => Ok(()),
            Wait::Until(deadline) => {
                let left = deadline
                    .checked_duration_since(Instant::now())
                    .filter(|d| !d.is_zero())
                    .ok_or_else(timed_out)?;
                self.set_timeout(Some(left))
            }
        }
    }

    /// The buffered bytes, reading more from the stream first if there are
    /// none. Empty at the end of the stream.
    pub(crate) fn fill(&mut self, wait: Wait) -> io::Result<&[u8]> {
        if self.pos == self.end {
            self.arm(wait)?;
            self.pos = 0;
            self.end = 0;
            loop {
                match self.stream.read(&mut self.buf) {
                    Ok(n) => {
                        self.end = n;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(normalize(e)),
                }
            }
        }
        Ok(&self.buf[self.pos..self.end])
    }

    /// Reads at most `out.len()` bytes, waiting as `wait` allows.
    pub(crate) fn read_some(&mut self, out: &mut [u8], wait: Wait) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        if self.pos == self.end && out.len() >= self.buf.len() {
            // large reads bypass the buffer
            self.arm(wait)?;
            loop {
                match self.stream.read(out) {
                    Ok(n) => {
                        self.consumed += n as u64;
                        return Ok(n);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(normalize(e)),
                }
            }
        }
        let avail = self.fill(wait)?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }

    /// Throws away up to `n` bytes, waiting as `wait` allows; the count
    /// thrown away (0 at the end of the stream).
    pub(crate) fn skip_some(&mut self, n: u64, wait: Wait) -> io::Result<u64> {
        let avail = self.fill(wait)?;
        let k = (avail.len() as u64).min(n) as usize;
        self.consume(k);
        Ok(k as u64)
    }
}

impl<S: TimedRead> Read for ConnReader<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.read_some(out, Wait::AsSet)
    }
}

/// Why a line could not be read.
#[derive(Debug)]
pub(crate) enum LineError {
    /// No line end within the limit.
    TooLong,
    /// The stream failed, timed out or ended.
    Io(io::Error),
}

/// Reads one line ended by LF (a CR before it is dropped too), of at most
/// `max` bytes with its end. The limit holds while reading: at most `max`
/// bytes are kept, and no more than one buffer beyond them is read. Returns
/// the line without its end and the number of bytes it took.
pub(crate) fn read_line<S: TimedRead>(
    r: &mut ConnReader<S>,
    max: usize,
    wait: Wait,
) -> Result<(Vec<u8>, usize), LineError> {
    let mut line = Vec::new();
    loop {
        let avail = r.fill(wait).map_err(LineError::Io)?;
        if avail.is_empty() {
            return Err(LineError::Io(io::Error::new(
                ErrorKind::UnexpectedEof,
                "connection closed within a line",
            )));
        }
        let room = max - line.len();
        let window = &avail[..avail.len().min(room)];
        if let Some(i) = window.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&window[..i]);
            r.consume(i + 1);
            let taken = line.len() + 1;
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok((line, taken));
        }
        if window.len() == room {
            return Err(LineError::TooLong);
        }
        let n = window.len();
        line.extend_from_slice(window);
        r.consume(n);
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, what.to_owned())
}

fn line_error(e: LineError) -> io::Error {
    match e {
        LineError::TooLong => invalid("chunked body: line too long"),
        LineError::Io(e) => e,
    }
}

/// Where a chunked body stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Within a chunk, with this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// In the trailer section, which may take this many bytes more.
    Trailers(usize),
    /// The body has ended.
    Done,
}

/// Bounds for a chunked body's lines.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkLimits {
    pub(crate) max_line: usize,
    pub(crate) max_trailers: usize,
}

/// Decodes a chunked body: reads body bytes into `out`; 0 once it ended.
pub(crate) fn read_chunked<S: TimedRead>(
    state: &mut Chunked,
    r: &mut ConnReader<S>,
    out: &mut [u8],
    limits: ChunkLimits,
    wait: Wait,
) -> io::Result<usize> {
    loop {
        match *state {
            Chunked::Size => {
                let (line, _) = read_line(r, limits.max_line, wait).map_err(line_error)?;
                let digits = line.split(|&b| b == b';').next().unwrap_or(&[]);
                let digits = std::str::from_utf8(digits)
                    .map_err(|_| invalid("chunked body: bad chunk size"))?
                    .trim();
                if digits.is_empty() || digits.len() > 16 {
                    return Err(invalid("chunked body: bad chunk size"));
                }
                let size = u64::from_str_radix(digits, 16)
                    .map_err(|_| invalid("chunked body: bad chunk size"))?;
                *state = if size == 0 {
                    Chunked::Trailers(limits.max_trailers)
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(0) => *state = Chunked::DataEnd,
            Chunked::Data(left) => {
                if out.is_empty() {
                    return Ok(0);
                }
                let want = (out.len() as u64).min(left) as usize;
                let n = r.read_some(&mut out[..want], wait)?;
                if n == 0 {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "connection closed within a chunk",
                    ));
                }
                *state = Chunked::Data(left - n as u64);
                return Ok(n);
            }
            Chunked::DataEnd => {
                let (line, _) = read_line(r, 2, wait).map_err(line_error)?;
                if !line.is_empty() {
                    return Err(invalid("chunked body: no line end after a chunk"));
                }
                *state = Chunked::Size;
            }
            Chunked::Trailers(budget) => {
                let (line, taken) =
                    read_line(r, limits.max_line.min(budget), wait).map_err(line_error)?;
                *state = if line.is_empty() {
                    Chunked::Done
                } else {
                    Chunked::Trailers(budget - taken)
                };
            }
            Chunked::Done => return Ok(0),
        }
    }
}

/// The part of a request body that its request left unread.
#[derive(Debug)]
pub(crate) enum Unread {
    /// This many bytes of a body with a Content-Length.
    Length(u64),
    /// The rest of a chunked body.
    Chunked(Chunked),
}

/// Reads and throws away `unread`, through the reader's fixed buffer, taking
/// at most `max` bytes from the stream and waiting no later than
/// `deadline`. True if the body ended within those bounds.
pub(crate) fn drain<S: TimedRead>(
    r: &mut ConnReader<S>,
    unread: Unread,
    max: u64,
    deadline: Instant,
    limits: ChunkLimits,
) -> bool {
    let wait = Wait::Until(deadline);
    match unread {
        Unread::Length(mut left) => {
            if left > max {
                return false;
            }
            while left > 0 {
                match r.skip_some(left, wait) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => left -= n,
                }
            }
            true
        }
        Unread::Chunked(mut state) => {
            let start = r.consumed();
            let mut scratch = [0u8; 512];
            loop {
                if r.consumed() - start > max {
                    return false;
                }
                match read_chunked(&mut state, r, &mut scratch, limits, wait) {
                    Ok(0) => return state == Chunked::Done,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        }
    }
}

/// Reads and throws away whatever the peer still sends, up to `max` bytes
/// or until `deadline`, so that closing the socket does not reset the
/// connection before the peer has read our last response.
pub(crate) fn discard<S: TimedRead>(r: &mut ConnReader<S>, max: u64, deadline: Instant) {
    let mut left = max;
    while left > 0 {
        match r.skip_some(left, Wait::Until(deadline)) {
            Ok(0) | Err(_) => return,
            Ok(n) => left -= n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A stream that counts what was read from it.
    struct Counted<R> {
        inner: R,
        read: u64,
    }

    impl<R: Read> Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    impl<R: Read> TimedRead for Counted<R> {
        fn set_read_timeout(&mut self, _: Option<Duration>) -> io::Result<()> {
            Ok(())
        }
    }

    fn reader<R: Read>(inner: R) -> ConnReader<Counted<R>> {
        ConnReader::new(Counted { inner, read: 0 })
    }

    fn later() -> Wait {
        Wait::Until(Instant::now() + Duration::from_secs(60))
    }

    #[test]
    fn endless_line_is_cut_while_reading() {
        let mut r = reader(io::repeat(b'a'));
        match read_line(&mut r, 8192, later()) {
            Err(LineError::TooLong) => {}
            other => panic!(
                "expected TooLong, got {:?}",
                other.map(|(l, n)| (l.len(), n))
            ),
        }
        // the limit plus at most one buffer was read, not the endless stream
        assert!(r.get_ref().read <= 8192 + READ_BUFFER as u64);
    }

    #[test]
    fn lines_crlf_and_lf() {
        let mut r = reader(Cursor::new(
            b"GET / HTTP/1.1\r\nA: b\nexactly8\r\nnine9999\r\n".to_vec(),
        ));
        assert_eq!(
            read_line(&mut r, 100, later()).unwrap(),
            (b"GET / HTTP/1.1".to_vec(), 16)
        );
        assert_eq!(
            read_line(&mut r, 100, later()).unwrap(),
            (b"A: b".to_vec(), 5)
        );
        // 8 bytes + CRLF = 10 bytes: fits a limit of 10, not of 9
        assert_eq!(
            read_line(&mut r, 10, later()).unwrap().0,
            b"exactly8".to_vec()
        );
        assert!(matches!(
            read_line(&mut r, 9, later()),
            Err(LineError::TooLong)
        ));
    }

    #[test]
    fn line_at_end_of_stream() {
        let mut r = reader(Cursor::new(b"partial".to_vec()));
        match read_line(&mut r, 100, later()) {
            Err(LineError::Io(e)) => assert_eq!(e.kind(), ErrorKind::UnexpectedEof),
            _ => panic!("expected EOF"),
        }
    }

    #[test]
    fn passed_deadline_times_out() {
        let mut r = reader(Cursor::new(b"GET / HTTP/1.1\r\n".to_vec()));
        let past = Instant::now() - Duration::from_millis(1);
        match read_line(&mut r, 100, Wait::Until(past)) {
            Err(LineError::Io(e)) => assert!(is_timeout(&e)),
            _ => panic!("expected a timeout"),
        }
    }

    const LIMITS: ChunkLimits = ChunkLimits {
        max_line: 100,
        max_trailers: 200,
    };

    #[test]
    fn chunked_decoding_with_trailers() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-T: 1\r\n\r\nNEXT".to_vec();
        let mut r = reader(Cursor::new(wire));
        let mut state = Chunked::Size;
        let mut body = Vec::new();
        let mut buf = [0u8; 3];
        loop {
            let n = read_chunked(&mut state, &mut r, &mut buf, LIMITS, later()).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&buf[..n]);
        }
        assert_eq!(body, b"hello, world");
        assert_eq!(state, Chunked::Done);
        assert_eq!(r.buffered(), b"NEXT");
    }

    #[test]
    fn chunked_rejects_bad_input() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX\r\n",
            b"fffffffffffffffff\r\n",
            b"\r\n",
        ] {
            let mut r = reader(Cursor::new(wire.to_vec()));
            let mut state = Chunked::Size;
            let mut buf = [0u8; 64];
            let mut result = Ok(1);
            for _ in 0..10 {
                result = read_chunked(&mut state, &mut r, &mut buf, LIMITS, later());
                if !matches!(result, Ok(n) if n > 0) {
                    break;
                }
            }
            assert!(
                result.is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(wire)
            );
        }
        // an endless chunk-size line is cut at the line limit
        let mut r = reader(io::repeat(b'1'));
        let mut state = Chunked::Size;
        assert!(read_chunked(&mut state, &mut r, &mut [0u8; 8], LIMITS, later()).is_err());
        assert!(r.get_ref().read <= 100 + READ_BUFFER as u64);
    }

    #[test]
    fn drain_within_and_past_the_limit() {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut r = reader(Cursor::new(b"0123456789NEXT".to_vec()));
        assert!(drain(&mut r, Unread::Length(10), 10, deadline, LIMITS));
        assert_eq!(r.buffered(), b"NEXT");

        // a declared size past the limit is not read at all
        let mut r = reader(io::repeat(0));
        assert!(!drain(
            &mut r,
            Unread::Length(1 << 40),
            1000,
            deadline,
            LIMITS
        ));
        assert_eq!(r.get_ref().read, 0);

        // a body that ends early is not drained
        let mut r = reader(Cursor::new(b"abc".to_vec()));
        assert!(!drain(&mut r, Unread::Length(10), 10, deadline, LIMITS));

        let mut r = reader(Cursor::new(b"3\r\nabc\r\n0\r\n\r\nNEXT".to_vec()));
        assert!(drain(
            &mut r,
            Unread::Chunked(Chunked::Size),
            100,
            deadline,
            LIMITS
        ));
        assert_eq!(r.buffered(), b"NEXT");

        // an endless chunked body stops near the limit
        let endless = io::repeat(b'x');
        let mut r = reader(Cursor::new(b"ffffffff\r\n".to_vec()).chain(endless));
        assert!(!drain(
            &mut r,
            Unread::Chunked(Chunked::Size),
            10_000,
            deadline,
            LIMITS
        ));
        assert!(r.get_ref().read <= 10_000 + 2 * READ_BUFFER as u64);
    }
}
