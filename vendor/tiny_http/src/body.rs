//! A request body read from a connection (peerix addition).
//!
//! The connection's reader is lent to the body while its request is out;
//! when the body is dropped the reader goes back to the connection's thread
//! together with what is left of the body. That thread, not the
//! application's, then drains the rest within `Limits::max_drain` and
//! `Limits::body_timeout`, or closes the connection. Nothing is ever
//! allocated for a size the client declared.

use std::io::{self, Read};
use std::sync::mpsc::Sender;
use std::time::Duration;

use crate::util::{read_chunked, ChunkLimits, Chunked, ConnReader, Unread, Wait};

/// How a body is framed on the wire, and how far it was read.
#[derive(Debug)]
pub(crate) enum Framing {
    /// A Content-Length body with this many bytes left.
    Length(u64),
    /// A chunked body.
    Chunked(Chunked),
    /// Everything the client sends (after `Connection: upgrade`).
    Raw,
    /// A read failed: where the next request starts is unknown.
    Broken,
}

/// What becomes of the rest of a body once its request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Nothing is left: the connection can go on.
    Keep,
    /// The rest will be drained (within the limits) before the next request.
    Drain,
    /// The connection will be closed after the response.
    Close,
}

/// What a body hands back to its connection when it is dropped.
pub(crate) struct Returned {
    pub(crate) reader: ConnReader,
    /// `None`: nothing left to read. `Some(None)`: the connection must close.
    pub(crate) unread: Option<Option<Unread>>,
}

pub(crate) struct Body {
    reader: Option<ConnReader>,
    framing: Framing,
    home: Sender<Returned>,
    chunk_limits: ChunkLimits,
    close: bool,
}

impl Body {
    /// A body read through `reader`, which goes back through `home`. Reads
    /// wait at most `timeout` each (no limit for a raw stream).
    pub(crate) fn new(
        mut reader: ConnReader,
        framing: Framing,
        home: Sender<Returned>,
        chunk_limits: ChunkLimits,
        timeout: Duration,
    ) -> Body {
        let timeout = match framing {
            Framing::Raw => None,
            _ => Some(timeout),
        };
        let framing = match reader.set_timeout(timeout) {
            Ok(()) => framing,
            Err(_) => Framing::Broken,
        };
        Body {
            reader: Some(reader),
            framing,
            home,
            chunk_limits,
            close: false,
        }
    }

    /// Decides what becomes of the unread rest once the request is answered:
    /// `continue_pending` is true when the client waits for a `100 Continue`
    /// that was never sent, so its body may never come.
    pub(crate) fn settle(&mut self, continue_pending: bool, max_drain: u64) -> Fate {
        let fate = match self.framing {
            Framing::Length(0) | Framing::Chunked(Chunked::Done) => Fate::Keep,
            _ if continue_pending => Fate::Close,
            Framing::Length(left) if left <= max_drain => Fate::Drain,
            Framing::Chunked(_) => Fate::Drain,
            Framing::Length(_) | Framing::Raw | Framing::Broken => Fate::Close,
        };
        if fate == Fate::Close {
            self.close = true;
        }
        fate
    }
}

impl Read for Body {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let reader = match self.reader.as_mut() {
            Some(r) => r,
            None => return Ok(0),
        };
        let result = match self.framing {
            Framing::Length(0) => return Ok(0),
            Framing::Length(left) => {
                let want = (out.len() as u64).min(left) as usize;
                match reader.read_some(&mut out[..want], Wait::AsSet) {
                    Ok(0) if want > 0 => Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed within the request body",
                    )),
                    Ok(n) => {
                        self.framing = Framing::Length(left - n as u64);
                        Ok(n)
                    }
                    Err(e) => Err(e),
                }
            }
            Framing::Chunked(ref mut state) => {
                read_chunked(state, reader, out, self.chunk_limits, Wait::AsSet)
            }
            Framing::Raw => return reader.read_some(out, Wait::AsSet),
            Framing::Broken => return Err(io::Error::other("the request body could not be read")),
        };
        if result.is_err() {
            self.framing = Framing::Broken;
        }
        result
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let reader = match self.reader.take() {
            Some(r) => r,
            None => return,
        };
        let framing = std::mem::replace(&mut self.framing, Framing::Broken);
        let unread = match framing {
            _ if self.close => Some(None),
            Framing::Length(0) | Framing::Chunked(Chunked::Done) => None,
            Framing::Length(left) => Some(Some(Unread::Length(left))),
            Framing::Chunked(state) => Some(Some(Unread::Chunked(state))),
            Framing::Raw | Framing::Broken => Some(None),
        };
        // The connection may be gone already; the reader is then dropped.
        let _ = self.home.send(Returned { reader, unread });
    }
}
