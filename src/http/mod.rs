//! The HTTP server: a `tiny_http` listener drained by a fixed pool of worker
//! threads. Each worker owns one request from start to end.
//!
//! Root endpoints serve this host's own nix and answer loopback clients only;
//! the check uses the socket's peer address, never a header. `/local/...`
//! serves peers and LAN hosts, under the share policy.

mod proxy;
pub mod range;
pub mod route;
mod serve;
mod socket;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use socket2::{Domain, Socket, Type};

use crate::fetch::resolver::Resolver;
use crate::fetch::transfer::MemoryBudget;
use crate::store::LocalStore;

pub use serve::is_loopback;

/// What the handlers need besides the store.
pub struct ServerContext {
    pub store: Arc<LocalStore>,
    pub priority: u32,
    pub started: Instant,
    /// Finds paths this host lacks on peers; `None` when no peer mode is on.
    pub resolver: Option<Arc<Resolver>>,
    /// Peer NARs up to this size are verified whole before nix gets a byte,
    pub verify_before_send: u64,
    /// while this budget for the memory they take lasts.
    pub held_nars: MemoryBudget,
}

/// A running server: its address and its worker threads.
pub struct Server {
    pub local_addr: SocketAddr,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds `addr` and starts `workers` threads answering requests.
    pub fn start(addr: SocketAddr, workers: usize, context: ServerContext) -> io::Result<Server> {
        let listener = bind(addr)?;
        let local_addr = listener.local_addr()?;
        let server = tiny_http::Server::from_listener(listener, None)
            .map_err(|e| io::Error::other(format!("cannot start HTTP server on {addr}: {e}")))?;
        let server = Arc::new(server);
        let context = Arc::new(Worker {
            context,
            local_port: local_addr.port(),
        });
        let workers = (0..workers)
            .map(|n| {
                let server = Arc::clone(&server);
                let context = Arc::clone(&context);
                std::thread::Builder::new()
                    .name(format!("http-{n}"))
                    .spawn(move || worker(&server, &context))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Server {
            local_addr,
            workers,
        })
    }

    /// Blocks while the workers run (they run until the process ends).
    pub fn join(self) {
        for worker in self.workers {
            let _ = worker.join();
        }
    }
}

/// A client that stops reading for this long loses its connection, so a few
/// stalled clients cannot hold every worker.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// A listening socket whose options accepted sockets inherit on Linux:
/// `TCP_NODELAY`, since a keep-alive response split over two writes would
/// otherwise wait 40 ms for a delayed ACK, and the send timeout. (A receive
/// timeout would also apply to `accept`, which tiny_http treats as fatal.)
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket.set_write_timeout(Some(SEND_TIMEOUT))?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// What each worker thread holds.
struct Worker {
    context: ServerContext,
    /// Identifies this server's connections when one must be aborted.
    local_port: u16,
}

fn worker(server: &tiny_http::Server, worker: &Worker) {
    loop {
        let request = match server.recv() {
            Ok(request) => request,
            Err(e) => {
                log::error!("HTTP server stopped accepting requests: {e}");
                return;
            }
        };
        // A bug in one request must not take the worker (and so the cache) down.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            serve::handle(&worker.context, worker.local_port, request)
        }));
        if outcome.is_err() {
            log::error!("a request handler panicked; the worker carries on");
        }
    }
}
