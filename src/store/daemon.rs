//! A client for the nix-daemon worker protocol: the read-only ops peerix
//! needs, over a small pool of reused Unix-socket connections.
//!
//! It announces protocol 1.35 and reads whatever version the daemon
//! negotiates down to (Nix 2.3 gives 1.21). Every length read from the socket
//! is capped, so a confused peer cannot make us allocate without bound. Any
//! I/O or protocol error retires that connection only.

use std::fmt;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::nix::hash::NarHash;
use crate::nix::store_path::{HashPart, StorePath};

const WORKER_MAGIC_1: u64 = 0x6e697863;
const WORKER_MAGIC_2: u64 = 0x6478696f;
/// 1.35: Lix refuses less; 1.38 and up would need the feature exchange.
const CLIENT_VERSION: u64 = 0x123;
const MIN_DAEMON_MINOR: u64 = 10;

const STDERR_NEXT: u64 = 0x6f6c6d67;
const STDERR_READ: u64 = 0x64617461;
const STDERR_WRITE: u64 = 0x64617416;
const STDERR_LAST: u64 = 0x616c7473;
const STDERR_ERROR: u64 = 0x63787470;
const STDERR_START_ACTIVITY: u64 = 0x53545254;
const STDERR_STOP_ACTIVITY: u64 = 0x53544f50;
const STDERR_RESULT: u64 = 0x52534c54;

const OP_IS_VALID_PATH: u64 = 1;
const OP_QUERY_ALL_VALID_PATHS: u64 = 23;
const OP_QUERY_PATH_INFO: u64 = 26;
const OP_QUERY_PATH_FROM_HASH_PART: u64 = 29;
const OP_QUERY_VALID_PATHS: u64 = 31;

/// Longest string accepted from the daemon (a log line, a path, a signature).
const MAX_STRING: u64 = 1 << 20;
/// Most list entries accepted (QueryAllValidPaths on a very large store).
const MAX_LIST: u64 = 10_000_000;
/// A daemon that stays silent this long is taken as wedged.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A valid path's metadata, as the daemon reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: String,
    pub deriver: Option<String>,
    pub nar_hash: [u8; 32],
    pub references: Vec<String>,
    pub nar_size: u64,
    pub ultimate: bool,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

#[derive(Debug)]
pub enum DaemonError {
    Connect {
        socket: PathBuf,
        source: io::Error,
    },
    Io {
        op: &'static str,
        source: io::Error,
    },
    Protocol {
        op: &'static str,
        message: String,
    },
    /// The daemon answered the op with an error of its own.
    Remote {
        op: &'static str,
        message: String,
    },
    /// Refused before sending: it would have killed the connection.
    InvalidArgument(String),
}

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DaemonError::Connect { socket, source } => {
                write!(
                    f,
                    "cannot connect to nix-daemon at {}: {source}",
                    socket.display()
                )
            }
            DaemonError::Io { op, source } => write!(f, "nix-daemon {op}: {source}"),
            DaemonError::Protocol { op, message } => {
                write!(f, "nix-daemon {op}: protocol error: {message}")
            }
            DaemonError::Remote { op, message } => write!(f, "nix-daemon {op} failed: {message}"),
            DaemonError::InvalidArgument(message) => write!(f, "not sent to nix-daemon: {message}"),
        }
    }
}

impl std::error::Error for DaemonError {}

/// One connection after the handshake.
struct Connection {
    replies: ReplyReader<BufReader<UnixStream>>,
    writer: BufWriter<UnixStream>,
}

/// Errors inside one exchange, before the op name is attached.
#[derive(Debug)]
pub enum Fault {
    /// The socket failed or the reply ended early.
    Io(io::Error),
    /// The daemon sent something the protocol does not allow.
    Protocol(String),
    /// The daemon reported an error (the connection stays usable).
    Remote(String),
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Fault::Io(e)
    }
}

pub type FaultResult<T> = Result<T, Fault>;

impl Connection {
    fn open(socket: &Path) -> Result<Connection, DaemonError> {
        let connect_error = |source| DaemonError::Connect {
            socket: socket.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(connect_error)?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(connect_error)?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .map_err(connect_error)?;
        let reader =
            BufReader::with_capacity(16 * 1024, stream.try_clone().map_err(connect_error)?);
        let mut conn = Connection {
            replies: ReplyReader::new(reader),
            writer: BufWriter::with_capacity(4 * 1024, stream),
        };
        conn.handshake()
            .map_err(|fault| attach("handshake", fault))?;
        Ok(conn)
    }

    fn handshake(&mut self) -> FaultResult<()> {
        self.write_u64(WORKER_MAGIC_1)?;
        self.writer.flush()?;
        self.replies.read_hello()?;
        let minor = self.replies.minor();
        self.write_u64(CLIENT_VERSION)?;
        if minor >= 14 {
            self.write_u64(0)?; // no CPU affinity
        }
        if minor >= 11 {
            self.write_u64(0)?; // reserveSpace
        }
        self.writer.flush()?;
        self.replies.read_hello_end()
    }

    fn write_u64(&mut self, n: u64) -> io::Result<()> {
        self.writer.write_all(&n.to_le_bytes())
    }

    fn write_string(&mut self, s: &str) -> io::Result<()> {
        self.write_u64(s.len() as u64)?;
        self.writer.write_all(s.as_bytes())?;
        let pad = (8 - s.len() % 8) % 8;
        self.writer.write_all(&[0u8; 8][..pad])
    }
}

/// The daemon-to-client half of the protocol, over any reader: the pool
/// reads a socket with it, the fuzz target (tests/fuzz) recorded bytes.
pub struct ReplyReader<R> {
    reader: R,
    /// The negotiated protocol minor version (0 before the hello).
    minor: u64,
}

impl<R: Read> ReplyReader<R> {
    pub fn new(reader: R) -> ReplyReader<R> {
        ReplyReader { reader, minor: 0 }
    }

    /// The negotiated protocol minor version.
    pub fn minor(&self) -> u64 {
        self.minor
    }

    /// The daemon's magic and version; sets the negotiated version.
    pub fn read_hello(&mut self) -> FaultResult<()> {
        if self.read_u64()? != WORKER_MAGIC_2 {
            return Err(Fault::Protocol("wrong magic from daemon".into()));
        }
        let daemon_version = self.read_u64()?;
        if daemon_version >> 8 != 1 || daemon_version & 0xff < MIN_DAEMON_MINOR {
            return Err(Fault::Protocol(format!(
                "unsupported daemon protocol version {}.{}",
                daemon_version >> 8,
                daemon_version & 0xff
            )));
        }
        self.minor = daemon_version.min(CLIENT_VERSION) & 0xff;
        Ok(())
    }

    /// The rest of the handshake, after the client sent its version.
    pub fn read_hello_end(&mut self) -> FaultResult<()> {
        if self.minor >= 33 {
            self.read_string()?; // the daemon's Nix version
        }
        if self.minor >= 35 {
            self.read_u64()?; // whether we are trusted
        }
        self.stderr_loop()
    }

    fn read_u64(&mut self) -> io::Result<u64> {
        let mut buf = [0u8; 8];
        self.reader.read_exact(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    pub fn read_bool(&mut self) -> FaultResult<bool> {
        match self.read_u64()? {
            0 => Ok(false),
            1 => Ok(true),
            n => Err(Fault::Protocol(format!("expected a boolean, got {n}"))),
        }
    }

    fn read_bytes(&mut self) -> FaultResult<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_bytes_into(&mut buf)?;
        Ok(buf)
    }

    /// Reads one string into `buf`, replacing what it held.
    fn read_bytes_into(&mut self, buf: &mut Vec<u8>) -> FaultResult<()> {
        let len = self.read_u64()?;
        if len > MAX_STRING {
            return Err(Fault::Protocol(format!("string of {len} bytes")));
        }
        buf.clear();
        buf.resize(len as usize, 0);
        self.reader.read_exact(buf)?;
        let mut pad = [0u8; 8];
        let pad = &mut pad[..((8 - len % 8) % 8) as usize];
        self.reader.read_exact(pad)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(Fault::Protocol("non-zero string padding".into()));
        }
        Ok(())
    }

    pub fn read_string(&mut self) -> FaultResult<String> {
        String::from_utf8(self.read_bytes()?)
            .map_err(|_| Fault::Protocol("string is not UTF-8".into()))
    }

    pub fn read_string_list(&mut self) -> FaultResult<Vec<String>> {
        let count = self.read_u64()?;
        if count > MAX_LIST {
            return Err(Fault::Protocol(format!("list of {count} entries")));
        }
        // Grow as entries arrive rather than trusting the count up front.
        let mut list = Vec::with_capacity(count.min(4096) as usize);
        for _ in 0..count {
            list.push(self.read_string()?);
        }
        Ok(list)
    }

    /// Reads a list of strings, handing each to `each` as it arrives, from
    /// one reused buffer: a list of any length costs no more memory than its
    /// longest string. Returns how many there were.
    pub fn read_string_list_with(&mut self, mut each: impl FnMut(&str)) -> FaultResult<u64> {
        let count = self.read_u64()?;
        if count > MAX_LIST {
            return Err(Fault::Protocol(format!("list of {count} entries")));
        }
        let mut buf = Vec::new();
        for _ in 0..count {
            self.read_bytes_into(&mut buf)?;
            let s = std::str::from_utf8(&buf)
                .map_err(|_| Fault::Protocol("string is not UTF-8".into()))?;
            each(s);
        }
        Ok(count)
    }

    fn skip_fields(&mut self) -> FaultResult<()> {
        let count = self.read_u64()?;
        if count > 1024 {
            return Err(Fault::Protocol(format!("{count} log fields")));
        }
        for _ in 0..count {
            match self.read_u64()? {
                0 => {
                    self.read_u64()?;
                }
                1 => {
                    self.read_bytes()?;
                }
                t => return Err(Fault::Protocol(format!("unknown log field type {t}"))),
            }
        }
        Ok(())
    }

    /// Reads log messages until STDERR_LAST; an error frame becomes `Fault::Remote`.
    pub fn stderr_loop(&mut self) -> FaultResult<()> {
        loop {
            match self.read_u64()? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT => log::debug!("nix-daemon: {}", self.read_string()?.trim_end()),
                STDERR_WRITE => {
                    self.read_bytes()?;
                }
                STDERR_START_ACTIVITY => {
                    self.read_u64()?; // id
                    self.read_u64()?; // level
                    self.read_u64()?; // type
                    self.read_bytes()?; // text
                    self.skip_fields()?;
                    self.read_u64()?; // parent
                }
                STDERR_STOP_ACTIVITY => {
                    self.read_u64()?;
                }
                STDERR_RESULT => {
                    self.read_u64()?; // id
                    self.read_u64()?; // type
                    self.skip_fields()?;
                }
                STDERR_ERROR => return Err(Fault::Remote(self.read_error()?)),
                STDERR_READ => return Err(Fault::Protocol("daemon asked us for data".into())),
                code => return Err(Fault::Protocol(format!("unknown stderr code {code:#x}"))),
            }
        }
    }

    fn read_error(&mut self) -> FaultResult<String> {
        if self.minor < 26 {
            let message = self.read_string()?;
            self.read_u64()?; // exit status
            return Ok(message);
        }
        self.read_bytes()?; // "Error"
        self.read_u64()?; // level
        self.read_bytes()?; // name
        let message = self.read_string()?;
        self.read_u64()?; // havePos, always 0 from the daemon
        let traces = self.read_u64()?;
        if traces > 1024 {
            return Err(Fault::Protocol(format!("{traces} error traces")));
        }
        for _ in 0..traces {
            self.read_u64()?;
            self.read_bytes()?;
        }
        Ok(message)
    }

    pub fn read_path_info(&mut self, path: &str) -> FaultResult<Option<PathInfo>> {
        if self.minor >= 17 && !self.read_bool()? {
            return Ok(None);
        }
        let deriver = self.read_string()?;
        let hex = self.read_string()?;
        let nar_hash = NarHash::from_hex(&hex)
            .map_err(|e| Fault::Protocol(format!("narHash: {e}")))?
            .0;
        let references = self.read_string_list()?;
        let _registration_time = self.read_u64()?;
        let nar_size = self.read_u64()?;
        let (ultimate, sigs, ca) = if self.minor >= 16 {
            (
                self.read_bool()?,
                self.read_string_list()?,
                self.read_string()?,
            )
        } else {
            (false, Vec::new(), String::new())
        };
        Ok(Some(PathInfo {
            path: path.to_string(),
            deriver: (!deriver.is_empty()).then_some(deriver),
            nar_hash,
            references,
            nar_size,
            ultimate,
            sigs,
            ca: (!ca.is_empty()).then_some(ca),
        }))
    }
}

fn attach(op: &'static str, fault: Fault) -> DaemonError {
    match fault {
        Fault::Io(source) => DaemonError::Io { op, source },
        Fault::Protocol(message) => DaemonError::Protocol { op, message },
        Fault::Remote(message) => DaemonError::Remote { op, message },
    }
}

fn check_hash_part(hash: &str) -> Result<(), DaemonError> {
    HashPart::parse(hash)
        .map(drop)
        .map_err(|e| DaemonError::InvalidArgument(e.to_string()))
}

/// An unparsable path kills the daemon connection, so it is never sent.
fn check_path(path: &str) -> Result<(), DaemonError> {
    StorePath::parse(path)
        .map(drop)
        .map_err(|e| DaemonError::InvalidArgument(e.to_string()))
}

/// A pool of daemon connections, shared by all threads, with at most `max`
/// open. Each connection is a forked nix-daemon process, so a burst of
/// lookups waits a moment for a free connection rather than forking more.
pub struct DaemonPool {
    socket: PathBuf,
    max: usize,
    state: Mutex<PoolState>,
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Connection>,
    /// Connections in use or idle.
    open: usize,
}

/// What a thread gets from the pool: a connection, or the right to open one.
enum Slot {
    Idle(Connection),
    New,
}

/// How long a lookup waits for a free connection before it opens one over
/// the limit: a daemon that stalls (each read is bounded by `IO_TIMEOUT`)
/// must not stall every lookup behind it.
const POOL_WAIT: Duration = Duration::from_secs(2);

impl DaemonPool {
    /// Does not connect; the first op does.
    pub fn new(socket: PathBuf, max: usize) -> DaemonPool {
        DaemonPool {
            socket,
            max: max.max(1),
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            returned: Condvar::new(),
        }
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acquire(&self) -> Slot {
        let mut state = self.lock();
        let deadline = std::time::Instant::now() + POOL_WAIT;
        loop {
            if let Some(conn) = state.idle.pop() {
                return Slot::Idle(conn);
            }
            let now = std::time::Instant::now();
            if state.open < self.max || now >= deadline {
                state.open += 1;
                return Slot::New;
            }
            state = self
                .returned
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Gives a slot back: with its connection if that is still good.
    fn release(&self, conn: Option<Connection>) {
        let mut state = self.lock();
        match conn {
            Some(conn) if state.open <= self.max => state.idle.push(conn),
            _ => state.open -= 1,
        }
        drop(state);
        self.returned.notify_one();
    }

    /// Opens a connection for a slot already counted in `open`.
    fn open_in_slot(&self) -> Result<Connection, DaemonError> {
        Connection::open(&self.socket).inspect_err(|_| self.release(None))
    }

    /// Runs one exchange. A connection that had sat idle may have been closed
    /// by a daemon restart, so an I/O failure on it is retried once on a new one.
    fn run<T>(
        &self,
        op: &'static str,
        exchange: impl FnMut(&mut Connection) -> FaultResult<T>,
    ) -> Result<T, DaemonError> {
        self.run_retrying_if(op, || true, exchange)
    }

    /// `run`, where the retry on a new connection is made only while
    /// `may_retry` says so (an exchange that has handed out part of its
    /// reply cannot be repeated).
    fn run_retrying_if<T>(
        &self,
        op: &'static str,
        may_retry: impl Fn() -> bool,
        mut exchange: impl FnMut(&mut Connection) -> FaultResult<T>,
    ) -> Result<T, DaemonError> {
        if let Slot::Idle(mut conn) = self.acquire() {
            match exchange(&mut conn) {
                Ok(value) => {
                    self.release(Some(conn));
                    return Ok(value);
                }
                Err(Fault::Io(e)) if !may_retry() => {
                    self.release(None);
                    return Err(attach(op, Fault::Io(e)));
                }
                Err(Fault::Io(e)) => {
                    // Keep the slot for the new connection below.
                    log::debug!("idle nix-daemon connection failed ({e}); reconnecting");
                }
                Err(Fault::Remote(message)) => {
                    // The op failed but the connection is in a clean state.
                    self.release(Some(conn));
                    return Err(DaemonError::Remote { op, message });
                }
                Err(fault) => {
                    self.release(None);
                    return Err(attach(op, fault));
                }
            }
        }
        let mut conn = self.open_in_slot()?;
        match exchange(&mut conn) {
            Ok(value) => {
                self.release(Some(conn));
                Ok(value)
            }
            Err(Fault::Remote(message)) => {
                self.release(Some(conn));
                Err(DaemonError::Remote { op, message })
            }
            Err(fault) => {
                self.release(None);
                Err(attach(op, fault))
            }
        }
    }

    /// Connects (or reuses a connection) to see whether the daemon answers.
    pub fn check(&self) -> Result<(), DaemonError> {
        let conn = match self.acquire() {
            Slot::Idle(conn) => conn,
            Slot::New => self.open_in_slot()?,
        };
        self.release(Some(conn));
        Ok(())
    }

    pub fn is_valid_path(&self, path: &str) -> Result<bool, DaemonError> {
        check_path(path)?;
        self.run("IsValidPath", |c| {
            c.write_u64(OP_IS_VALID_PATH)?;
            c.write_string(path)?;
            c.writer.flush()?;
            c.replies.stderr_loop()?;
            c.replies.read_bool()
        })
    }

    pub fn query_all_valid_paths(&self) -> Result<Vec<String>, DaemonError> {
        self.run("QueryAllValidPaths", |c| {
            c.write_u64(OP_QUERY_ALL_VALID_PATHS)?;
            c.writer.flush()?;
            c.replies.stderr_loop()?;
            c.replies.read_string_list()
        })
    }

    /// QueryAllValidPaths as a stream: `each` gets every valid path as it is
    /// read, and the list is never held whole. Returns how many there were.
    /// A failure part-way is an error (the paths seen so far are not the
    /// listing), never a second listing.
    pub fn for_each_valid_path(&self, mut each: impl FnMut(&str)) -> Result<u64, DaemonError> {
        let delivered = std::cell::Cell::new(false);
        self.run_retrying_if(
            "QueryAllValidPaths",
            || !delivered.get(),
            |c| {
                c.write_u64(OP_QUERY_ALL_VALID_PATHS)?;
                c.writer.flush()?;
                c.replies.stderr_loop()?;
                c.replies.read_string_list_with(|path| {
                    delivered.set(true);
                    each(path);
                })
            },
        )
    }

    /// `None` when the path is not valid.
    pub fn query_path_info(&self, path: &str) -> Result<Option<PathInfo>, DaemonError> {
        check_path(path)?;
        let result = self.run("QueryPathInfo", |c| {
            c.write_u64(OP_QUERY_PATH_INFO)?;
            c.write_string(path)?;
            c.writer.flush()?;
            c.replies.stderr_loop()?;
            c.replies.read_path_info(path)
        });
        match result {
            // Before 1.17 a missing path comes back as an error frame.
            Err(DaemonError::Remote { message, .. }) if message.contains("is not valid") => {
                Ok(None)
            }
            other => other,
        }
    }

    pub fn query_path_from_hash_part(&self, hash: &str) -> Result<Option<String>, DaemonError> {
        check_hash_part(hash)?;
        let path = self.run("QueryPathFromHashPart", |c| {
            c.write_u64(OP_QUERY_PATH_FROM_HASH_PART)?;
            c.write_string(hash)?;
            c.writer.flush()?;
            c.replies.stderr_loop()?;
            c.replies.read_string()
        })?;
        Ok((!path.is_empty()).then_some(path))
    }

    pub fn query_valid_paths(&self, paths: &[String]) -> Result<Vec<String>, DaemonError> {
        for path in paths {
            check_path(path)?;
        }
        self.run("QueryValidPaths", |c| {
            c.write_u64(OP_QUERY_VALID_PATHS)?;
            c.write_u64(paths.len() as u64)?;
            for path in paths {
                c.write_string(path)?;
            }
            if c.replies.minor() >= 27 {
                c.write_u64(0)?; // never substitute: we only ask what is here
            }
            c.writer.flush()?;
            c.replies.stderr_loop()?;
            c.replies.read_string_list()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_and_hash_checks() {
        let hash = "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d";
        assert!(check_hash_part(hash).is_ok());
        assert!(check_hash_part("0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1e").is_err());
        assert!(check_hash_part("short").is_err());
        assert!(check_path(&format!("/nix/store/{hash}-hello")).is_ok());
        for bad in [
            format!("/nix/store/{hash}"),
            format!("/nix/store/{hash}-"),
            format!("/nix/store/{hash}-a/b"),
            format!("/nix/store/{hash}-{}", "x".repeat(212)),
            format!("/tmp/{hash}-x"),
            format!("/nix/store/{hash}-\u{e9}"),
        ] {
            assert!(check_path(&bad).is_err(), "{bad}");
        }
    }
}
