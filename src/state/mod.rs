//! What peerix keeps in `--state-dir` across restarts: `stats.json` (the
//! totals, bytes and top-N lists of the stats core) and `peers.json` (the
//! peer table: reputation, backoff and bans, their ends as UNIX times).
//!
//! Both are written every `--state-interval` seconds and on shutdown, and
//! read back at start, before any peer is asked. Every write goes through
//! [`write_atomic`]: a temporary file in the same directory, fsync, rename
//! over the old file, fsync of the directory. A `kill -9` or a power cut
//! leaves the old file or the new one, never a mix.
//!
//! A file that cannot be read or parsed is reported in the log and in
//! `/health` (the `state` check), renamed to `<name>.damaged` (replacing an
//! older one), and replaced by a good one at once. It is never fatal: the
//! counters or the peer table then start empty. The parsers
//! (the `format` module) reject rather than guess: an unknown format or version, a
//! missing or unknown field, or a value out of range rejects the file.

pub mod format;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::peers::PeerTable;
use crate::stats::Stats;

pub const STATS_FILE: &str = "stats.json";
pub const PEERS_FILE: &str = "peers.json";
/// How often the state is written by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// A state file larger than this is damaged: 1,024 peers take about
/// 250 KB, the top-N lists about 60 KB.
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// A file found damaged or unreadable at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damaged {
    pub file: &'static str,
    pub error: String,
    /// Where it was set aside, if the rename worked.
    pub set_aside_as: Option<String>,
}

/// What the state writer has done, for `/health`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateReport {
    pub dir: PathBuf,
    /// Successful writes of both files since start.
    pub writes: u64,
    /// UNIX seconds of the last successful write.
    pub last_write: Option<u64>,
    /// Why the last write failed, if it did.
    pub last_error: Option<String>,
    /// Files found damaged at start (each has been replaced since, unless
    /// `last_error` says otherwise).
    pub damaged: Vec<Damaged>,
}

/// Writes `bytes` to `dir/name` atomically: into `dir/name.tmp` (mode
/// 0600), fsync, rename over `dir/name`, fsync `dir`. On error the old file
/// is untouched.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written.and_then(|()| fs::rename(&tmp, dir.join(name))) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)?.sync_all()
}

/// The state directory, its files and the report of what happened to them.
pub struct State {
    dir: PathBuf,
    stats: Arc<Stats>,
    peers: Arc<PeerTable>,
    /// Held through each write, so that the periodic write and the one at
    /// shutdown never interleave.
    report: Mutex<StateReport>,
}

impl State {
    /// Reads the state in `dir` into `stats` and `peers` (call before they
    /// are used), then writes it back at once, which replaces any damaged
    /// file. Never fails: what goes wrong is logged and reported.
    pub fn open(dir: &Path, stats: Arc<Stats>, peers: Arc<PeerTable>) -> State {
        if let Err(e) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            log::error!("state directory {}: {e}", dir.display());
        }
        let state = State {
            dir: dir.to_path_buf(),
            stats,
            peers,
            report: Mutex::new(StateReport {
                dir: dir.to_path_buf(),
                ..StateReport::default()
            }),
        };
        let mut damaged = Vec::new();
        if let Some(totals) = state.load(STATS_FILE, format::parse_stats, &mut damaged) {
            state.stats.restore(&totals);
            log::info!("statistics read back from {}", state.path(STATS_FILE));
        }
        let wall = SystemTime::now();
        if let Some(saved) = state.load(PEERS_FILE, format::parse_peers, &mut damaged) {
            let banned = saved
                .iter()
                .filter(|p| p.banned_until.is_some_and(|until| until > wall))
                .count();
            log::info!(
                "peer table read back from {}: {} host(s), {banned} banned",
                state.path(PEERS_FILE),
                saved.len()
            );
            state.peers.import(saved, Instant::now(), wall);
        }
        state.lock().damaged = damaged;
        state.save();
        state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateReport> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `name`'s content as `parse` reads it; `None` if there is none, or
    /// if it is damaged, then set aside and noted in `damaged`. A
    /// temporary file a killed write left behind is removed.
    fn load<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&[u8]) -> Result<T, String>,
        damaged: &mut Vec<Damaged>,
    ) -> Option<T> {
        let _ = fs::remove_file(self.dir.join(format!("{name}.tmp")));
        let path = self.dir.join(name);
        let error = match read_bounded(&path) {
            Ok(None) => return None,
            Ok(Some(bytes)) => match parse(&bytes) {
                Ok(value) => return Some(value),
                Err(e) => e,
            },
            Err(e) => format!("unreadable: {e}"),
        };
        let aside = self.dir.join(format!("{name}.damaged"));
        let set_aside_as = match fs::rename(&path, &aside) {
            Ok(()) => Some(aside.display().to_string()),
            Err(e) => {
                log::error!("cannot set {} aside: {e}", path.display());
                None
            }
        };
        log::warn!(
            "{} is damaged ({error}); set aside as {}, starting without it",
            path.display(),
            set_aside_as.as_deref().unwrap_or("(nowhere)")
        );
        damaged.push(Damaged {
            file: name,
            error,
            set_aside_as,
        });
        None
    }

    /// Writes both files now. Returns whether both were written; a failure
    /// is logged (once while it lasts) and shown in `/health`.
    pub fn save(&self) -> bool {
        let mut report = self.lock();
        let wall = SystemTime::now();
        let stats = format::render_stats(&self.stats.totals(), wall);
        let peers = format::render_peers(&self.peers.export(Instant::now(), wall), wall);
        let result = write_atomic(&self.dir, STATS_FILE, &stats)
            .map_err(|e| format!("writing {}: {e}", self.path(STATS_FILE)))
            .and_then(|()| {
                write_atomic(&self.dir, PEERS_FILE, &peers)
                    .map_err(|e| format!("writing {}: {e}", self.path(PEERS_FILE)))
            });
        match result {
            Ok(()) => {
                if report.last_error.take().is_some() {
                    log::info!("state written to {} again", self.dir.display());
                }
                report.writes += 1;
                report.last_write = Some(format::unix_secs(wall));
            }
            Err(e) => {
                if report.last_error.as_ref() != Some(&e) {
                    log::error!("{e}; the state is not saved");
                }
                report.last_error = Some(e);
            }
        }
        self.stats.set_state(report.clone());
        report.last_error.is_none()
    }
}

/// The file's bytes, `None` if it does not exist; larger than
/// [`MAX_FILE`] is an error.
fn read_bounded(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(io::Error::other(format!("larger than {MAX_FILE} bytes")));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::{Failure, PeerId};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("peerix-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temporary() {
        let dir = scratch("atomic");
        fs::create_dir_all(&dir).unwrap();
        write_atomic(&dir, "f", b"one").unwrap();
        write_atomic(&dir, "f", b"two").unwrap();
        assert_eq!(fs::read(dir.join("f")).unwrap(), b"two");
        assert!(!dir.join("f.tmp").exists());
        // Into a directory that is not there: an error, nothing written.
        assert!(write_atomic(&dir.join("missing"), "f", b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_round_trips_and_a_damaged_file_is_set_aside_and_replaced() {
        let dir = scratch("roundtrip");
        let liar = PeerId::Http("10.77.0.9:12304".parse().unwrap());
        {
            let stats = Arc::new(Stats::new());
            let peers = Arc::new(PeerTable::new());
            let state = State::open(&dir, Arc::clone(&stats), Arc::clone(&peers));
            peers.record_failure(liar, Failure::Lied, Instant::now());
            stats.lookup(true);
            assert!(state.save());
        }
        let stats = Arc::new(Stats::new());
        let peers = Arc::new(PeerTable::new());
        let _state = State::open(&dir, Arc::clone(&stats), Arc::clone(&peers));
        assert!(
            !peers.is_available(&liar, Instant::now()),
            "the ban is back"
        );
        assert_eq!(stats.totals().counters.cache_hits, 1);

        fs::write(dir.join(STATS_FILE), b"{\"format\":\"peerix-stats\",\"vers").unwrap();
        let stats = Arc::new(Stats::new());
        let state = State::open(&dir, Arc::clone(&stats), Arc::new(PeerTable::new()));
        let report = state.lock().clone();
        assert_eq!(report.damaged.len(), 1, "{report:?}");
        assert_eq!(report.damaged[0].file, STATS_FILE);
        assert!(dir.join("stats.json.damaged").exists());
        let replaced = fs::read(dir.join(STATS_FILE)).unwrap();
        assert!(format::parse_stats(&replaced).is_ok());
        assert_eq!(report.writes, 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
