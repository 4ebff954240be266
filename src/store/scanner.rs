//! The scanner thread: rebuilds the index of valid paths and their share
//! decisions at start, every scan interval, and on SIGHUP.
//!
//! While the nix-daemon cannot be reached it retries with a capped backoff, so
//! peerix can start before the daemon (or on a machine with none yet) and pick
//! it up later without a restart.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::nix::store_path::StorePath;

use super::index::Index;
use super::{LocalPathInfo, LocalStore, StoreError};

const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Wakes the scanner early: SIGHUP writes a byte into this socket pair.
pub struct Wakeup {
    reader: UnixStream,
}

impl Wakeup {
    /// Registers SIGHUP to wake the scanner.
    pub fn on_sighup() -> std::io::Result<Wakeup> {
        let (reader, writer) = UnixStream::pair()?;
        writer.set_nonblocking(true)?;
        signal_hook::low_level::pipe::register(signal_hook::consts::SIGHUP, writer)?;
        Ok(Wakeup { reader })
    }

    /// Sleeps until `timeout` passes (`None`: for ever) or a wake-up arrives.
    /// Returns true when woken.
    fn wait(&mut self, timeout: Option<Duration>) -> bool {
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        if self.reader.set_read_timeout(timeout).is_err() {
            std::thread::sleep(timeout.unwrap_or(MAX_RETRY));
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(self.reader.read(&mut buf), Ok(n) if n > 0)
    }
}

/// Runs the scanner loop for ever.
pub fn run(store: Arc<LocalStore>, interval: Option<Duration>, mut wakeup: Wakeup) {
    let mut retry = FIRST_RETRY;
    loop {
        let started = Instant::now();
        match scan(&store) {
            Ok(index) => {
                log::info!(
                    "scan: {} valid paths, {} shared, in {} ms",
                    index.len(),
                    index.shared_len(),
                    started.elapsed().as_millis()
                );
                if !store.daemon_reachable() {
                    log::info!(
                        "nix-daemon at {} is reachable",
                        store.daemon().socket_path().display()
                    );
                }
                store.set_daemon_reachable(true);
                store.replace_index(index);
                retry = FIRST_RETRY;
                if wakeup.wait(interval) {
                    log::info!("SIGHUP: rescanning the store");
                }
            }
            Err(e) => {
                if store.daemon_reachable() || store.completed_scans() == 0 && retry == FIRST_RETRY
                {
                    log::warn!(
                        "cannot scan the store: {e}; serving no new local paths until it can, retrying in the background"
                    );
                }
                store.set_daemon_reachable(false);
                wakeup.wait(Some(retry));
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// Builds a new index from the daemon's list of valid paths.
pub fn scan(store: &LocalStore) -> Result<Index, StoreError> {
    let daemon = store.daemon();
    let policy = store.policy();
    let mut index = Index::default();
    for raw in daemon.query_all_valid_paths()? {
        let Ok(path) = StorePath::parse(&raw) else {
            log::warn!("scan: skipping unparsable store path {raw:?}");
            continue;
        };
        let shared = match policy.allows_name(&path) {
            Some(decided) => decided,
            None => match daemon.query_path_info(&raw)? {
                Some(info) => match LocalPathInfo::from_daemon(info) {
                    Ok(info) => policy.allows(&info),
                    Err(e) => {
                        log::warn!("scan: not sharing {raw}: {e}");
                        false
                    }
                },
                None => continue, // gone since the listing
            },
        };
        index.insert(path, shared);
    }
    index.shrink_to_fit();
    Ok(index)
}
