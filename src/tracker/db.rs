//! The registry in SQLite (WAL mode): one writer connection, used by the
//! writer thread only, and reader connections for lookups.
//!
//! ```text
//! peers(id, node, ip, record, hashes, last_seen)
//! packages(hash, peer) WITHOUT ROWID, primary key (hash, peer), index (peer)
//! seen(signature, expires)
//! ```
//!
//! A hash part is kept as the 20 bytes it encodes, a peer's rows by its
//! small integer id. A peer lives while `last_seen >= now - ttl`: reads
//! filter on it, so an expired peer is never answered, and the sweep
//! deletes it and its rows soon after (its rows have no expiry of their
//! own). A write for a node first drops what an expiry left of it, so the
//! outcome never depends on when the sweep ran. `seen` holds the
//! signatures of the requests written, until their timestamps go stale:
//! a request replayed after a restart is refused too.
//!
//! Hash lists are written in statements of at most [`MAX_CHUNK`] rows,
//! and never more than SQLite's limit on variables allows.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::limits::Limit;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use super::api::{Hash, MAX_HASHES_PER_PEER};
use crate::identity::NodeId;

/// Rows in one statement at most.
pub const MAX_CHUNK: usize = 500;
/// Rows of expired peers deleted in one sweep step (one transaction).
const SWEEP_ROWS: usize = 20_000;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS peers (
    id INTEGER PRIMARY KEY,
    node BLOB NOT NULL UNIQUE,
    ip TEXT NOT NULL,
    record TEXT NOT NULL,
    hashes INTEGER NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS peers_last_seen ON peers (last_seen);
CREATE INDEX IF NOT EXISTS peers_ip ON peers (ip, last_seen);
CREATE TABLE IF NOT EXISTS packages (
    hash BLOB NOT NULL,
    peer INTEGER NOT NULL,
    PRIMARY KEY (hash, peer)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS packages_peer ON packages (peer);
CREATE TABLE IF NOT EXISTS seen (
    signature BLOB NOT NULL UNIQUE,
    expires INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires);
PRAGMA user_version = 1;
";

/// Why a write was refused.
#[derive(Debug)]
pub enum WriteError {
    /// The node is not registered, or has expired.
    NotRegistered(NodeId),
    /// Too many live peers registered from this IP address.
    TooManyPeers {
        ip: String,
        max: usize,
    },
    /// The node would hold more rows than it may.
    TooManyHashes {
        node: NodeId,
        would: u64,
    },
    /// This signed request was written before.
    Replayed,
    Db(rusqlite::Error),
    /// A bug: the write panicked (and was rolled back).
    Panicked,
}

impl From<rusqlite::Error> for WriteError {
    fn from(e: rusqlite::Error) -> WriteError {
        WriteError::Db(e)
    }
}

/// A signed request's signature, kept until its timestamp goes stale.
#[derive(Clone, Copy, Debug)]
pub struct Signature {
    pub bytes: [u8; 64],
    pub expires: i64,
}

/// What a write did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `new`: the tracker held nothing for the node before.
    Announced {
        new: bool,
        hashes: u64,
    },
    Applied {
        hashes: u64,
        added: u64,
        removed: u64,
    },
    Deleted,
}

/// A change to the registry, for the writer.
#[derive(Debug)]
pub enum Change {
    Announce {
        node: NodeId,
        ip: String,
        record: String,
        max_peers_per_ip: usize,
    },
    Batch {
        node: NodeId,
        hashes: Vec<Hash>,
    },
    Delta {
        node: NodeId,
        added: Vec<Hash>,
        removed: Vec<Hash>,
    },
    Delete {
        node: NodeId,
    },
}

fn open(path: &Path, flags: OpenFlags) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// The one connection that writes.
pub struct Writer {
    conn: Connection,
    /// Rows per statement: within [`MAX_CHUNK`] and the variable limit.
    chunk: usize,
}

impl Writer {
    /// Opens (and makes) the database, in WAL mode, with its tables.
    pub fn open(path: &Path) -> Result<Writer, String> {
        let what = |e: rusqlite::Error| format!("database {}: {e}", path.display());
        let conn = open(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(what)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(what)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!(
                "database {}: cannot use WAL mode (journal mode is {mode})",
                path.display()
            ));
        }
        // NORMAL: a commit waits for no fsync; a power loss may lose the
        // last commits, which the nodes' next heartbeats restore. Measured
        // on 1.5M rows (tests/bench/tracker.sh): an 8 MiB cache wrote
        // faster than 2, 16 or 64 MiB (with 64, trimming the page cache at
        // each commit took a third of the writer's time), and checkpoints
        // every 10 000 pages rather than 1000 save about a tenth.
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL;
             PRAGMA cache_size = -8192;
             PRAGMA wal_autocheckpoint = 10000;
             PRAGMA journal_size_limit = 67108864;",
        )
        .map_err(what)?;
        conn.execute_batch(SCHEMA).map_err(what)?;
        conn.set_prepared_statement_cache_capacity(32);
        let mut writer = Writer { conn, chunk: 1 };
        writer.chunk = writer.chunk_for_limit().map_err(what)?;
        Ok(writer)
    }

    /// Rows per statement for the connection's current variable limit: a
    /// statement binds the peer and one variable per row.
    fn chunk_for_limit(&self) -> rusqlite::Result<usize> {
        let variables = self.conn.limit(Limit::SQLITE_LIMIT_VARIABLE_NUMBER)?;
        Ok(usize::try_from(variables - 1)
            .unwrap_or(1)
            .clamp(1, MAX_CHUNK))
    }

    /// Lowers SQLite's limit on variables (tests: as the original's
    /// SQLite of 999 would).
    pub fn set_variable_limit(&mut self, limit: i32) -> rusqlite::Result<()> {
        self.conn
            .set_limit(Limit::SQLITE_LIMIT_VARIABLE_NUMBER, limit)?;
        self.chunk = self.chunk_for_limit()?;
        Ok(())
    }

    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// Writes one signed change at `now`, with a peer TTL of `ttl` seconds.
    /// The signature is written with it, or alone when the change is
    /// refused, so it is taken once either way.
    pub fn apply(
        &mut self,
        change: Change,
        signature: Option<Signature>,
        now: i64,
        ttl: i64,
    ) -> Result<Outcome, WriteError> {
        let chunk = self.chunk;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(signature) = signature {
            take_signature(&tx, signature)?;
        }
        match apply_change(&tx, chunk, change, now, ttl) {
            Ok(outcome) => {
                tx.commit()?;
                Ok(outcome)
            }
            Err(e) => {
                drop(tx);
                if let (Some(signature), false) = (signature, matches!(e, WriteError::Db(_))) {
                    let tx = self.conn.transaction()?;
                    take_signature(&tx, signature)?;
                    tx.commit()?;
                }
                Err(e)
            }
        }
    }

    /// One bounded step of the sweep: up to `SWEEP_ROWS` rows of one
    /// expired peer, and the peer once it has none left; forgotten stale
    /// signatures. Returns whether there is more to do.
    pub fn sweep_step(&mut self, now: i64, ttl: i64) -> rusqlite::Result<bool> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM seen WHERE expires < ?1", [now])?;
        let expired: Option<i64> = tx
            .query_row(
                "SELECT id FROM peers WHERE last_seen < ?1 LIMIT 1",
                [now - ttl],
                |row| row.get(0),
            )
            .optional()?;
        let Some(id) = expired else {
            tx.commit()?;
            return Ok(false);
        };
        let deleted = tx.execute(
            "DELETE FROM packages WHERE peer = ?1 AND hash IN \
             (SELECT hash FROM packages WHERE peer = ?1 LIMIT ?2)",
            params![id, SWEEP_ROWS as i64],
        )?;
        if deleted < SWEEP_ROWS {
            tx.execute("DELETE FROM packages WHERE peer = ?1", [id])?;
            tx.execute("DELETE FROM peers WHERE id = ?1", [id])?;
            log::debug!("swept an expired peer and its last {deleted} rows");
        }
        tx.commit()?;
        Ok(true)
    }
}

fn take_signature(tx: &Transaction, signature: Signature) -> Result<(), WriteError> {
    let taken = tx.execute(
        "INSERT OR IGNORE INTO seen (signature, expires) VALUES (?1, ?2)",
        params![&signature.bytes[..], signature.expires],
    )?;
    if taken == 0 {
        return Err(WriteError::Replayed);
    }
    Ok(())
}

fn apply_change(
    tx: &Transaction,
    chunk: usize,
    change: Change,
    now: i64,
    ttl: i64,
) -> Result<Outcome, WriteError> {
    match change {
        Change::Announce {
            node,
            ip,
            record,
            max_peers_per_ip,
        } => {
            if let Some((id, hashes)) = live_peer(tx, &node, now, ttl)? {
                tx.execute(
                    "UPDATE peers SET ip = ?2, record = ?3, last_seen = ?4 WHERE id = ?1",
                    params![id, ip, record, now],
                )?;
                return Ok(Outcome::Announced { new: false, hashes });
            }
            if max_peers_per_ip > 0 {
                let from_ip: i64 = tx.query_row(
                    "SELECT count(*) FROM peers WHERE ip = ?1 AND last_seen >= ?2",
                    params![ip, now - ttl],
                    |row| row.get(0),
                )?;
                if from_ip >= max_peers_per_ip as i64 {
                    return Err(WriteError::TooManyPeers {
                        ip,
                        max: max_peers_per_ip,
                    });
                }
            }
            tx.execute(
                "INSERT INTO peers (node, ip, record, hashes, last_seen) VALUES (?1, ?2, ?3, 0, ?4)",
                params![&node.as_bytes()[..], ip, record, now],
            )?;
            Ok(Outcome::Announced {
                new: true,
                hashes: 0,
            })
        }
        Change::Batch { node, hashes } => {
            let (id, _) = live_peer(tx, &node, now, ttl)?.ok_or(WriteError::NotRegistered(node))?;
            let wanted: HashSet<Hash> = hashes.into_iter().collect();
            if wanted.len() as u64 > MAX_HASHES_PER_PEER {
                return Err(WriteError::TooManyHashes {
                    node,
                    would: wanted.len() as u64,
                });
            }
            // Only the difference is written: a full set sent again costs
            // reading the node's rows, not rewriting them.
            let mut held = HashSet::new();
            {
                let mut stmt = tx.prepare_cached("SELECT hash FROM packages WHERE peer = ?1")?;
                let mut rows = stmt.query([id])?;
                while let Some(row) = rows.next()? {
                    let bytes: [u8; 20] = row.get(0)?;
                    held.insert(Hash(bytes));
                }
            }
            let removed: Vec<Hash> = held.difference(&wanted).copied().collect();
            let added: Vec<Hash> = wanted.difference(&held).copied().collect();
            let removed = delete_rows(tx, chunk, id, &removed)?;
            let added = insert_rows(tx, chunk, id, &added)?;
            let hashes = wanted.len() as u64;
            tx.execute(
                "UPDATE peers SET hashes = ?2, last_seen = ?3 WHERE id = ?1",
                params![id, hashes as i64, now],
            )?;
            Ok(Outcome::Applied {
                hashes,
                added,
                removed,
            })
        }
        Change::Delta {
            node,
            added,
            removed,
        } => {
            let (id, held) =
                live_peer(tx, &node, now, ttl)?.ok_or(WriteError::NotRegistered(node))?;
            let removed = delete_rows(tx, chunk, id, &removed)?;
            let added = insert_rows(tx, chunk, id, &added)?;
            let hashes = (held + added).saturating_sub(removed);
            if hashes > MAX_HASHES_PER_PEER {
                return Err(WriteError::TooManyHashes {
                    node,
                    would: hashes,
                });
            }
            tx.execute(
                "UPDATE peers SET hashes = ?2, last_seen = ?3 WHERE id = ?1",
                params![id, hashes as i64, now],
            )?;
            Ok(Outcome::Applied {
                hashes,
                added,
                removed,
            })
        }
        Change::Delete { node } => {
            let (id, _) = live_peer(tx, &node, now, ttl)?.ok_or(WriteError::NotRegistered(node))?;
            purge(tx, id)?;
            Ok(Outcome::Deleted)
        }
    }
}

/// The node's id and row count if it is registered and alive. What an
/// expiry left of it (the sweep may not have come yet) is deleted first.
fn live_peer(
    tx: &Transaction,
    node: &NodeId,
    now: i64,
    ttl: i64,
) -> rusqlite::Result<Option<(i64, u64)>> {
    let row: Option<(i64, i64, i64)> = tx
        .query_row(
            "SELECT id, hashes, last_seen FROM peers WHERE node = ?1",
            [&node.as_bytes()[..]],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()?;
    match row {
        Some((id, hashes, last_seen)) if last_seen >= now - ttl => {
            Ok(Some((id, u64::try_from(hashes).unwrap_or(0))))
        }
        Some((id, _, _)) => {
            purge(tx, id)?;
            Ok(None)
        }
        None => Ok(None),
    }
}

fn purge(tx: &Transaction, id: i64) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM packages WHERE peer = ?1", [id])?;
    tx.execute("DELETE FROM peers WHERE id = ?1", [id])?;
    Ok(())
}

/// `INSERT OR IGNORE` of `hashes` for peer `id`, `chunk` rows a statement;
/// returns the rows really added.
fn insert_rows(tx: &Transaction, chunk: usize, id: i64, hashes: &[Hash]) -> rusqlite::Result<u64> {
    chunked(tx, chunk, id, hashes, |n| {
        let rows: Vec<String> = (0..n).map(|i| format!("(?{}, ?1)", i + 2)).collect();
        format!(
            "INSERT OR IGNORE INTO packages (hash, peer) VALUES {}",
            rows.join(", ")
        )
    })
}

/// Deletes `hashes` of peer `id`; returns the rows really removed.
fn delete_rows(tx: &Transaction, chunk: usize, id: i64, hashes: &[Hash]) -> rusqlite::Result<u64> {
    chunked(tx, chunk, id, hashes, |n| {
        let vars: Vec<String> = (0..n).map(|i| format!("?{}", i + 2)).collect();
        format!(
            "DELETE FROM packages WHERE peer = ?1 AND hash IN ({})",
            vars.join(", ")
        )
    })
}

fn chunked(
    tx: &Transaction,
    chunk: usize,
    id: i64,
    hashes: &[Hash],
    sql: impl Fn(usize) -> String,
) -> rusqlite::Result<u64> {
    let mut changed = 0u64;
    for part in hashes.chunks(chunk.max(1)) {
        let mut stmt = tx.prepare_cached(&sql(part.len()))?;
        stmt.raw_bind_parameter(1, id)?;
        for (i, hash) in part.iter().enumerate() {
            stmt.raw_bind_parameter(i + 2, &hash.0[..])?;
        }
        changed += stmt.raw_execute()? as u64;
    }
    Ok(changed)
}

/// A peer as read back: its id, its record, when it was last seen.
#[derive(Debug)]
pub struct PeerRow {
    pub node: [u8; 32],
    pub record: String,
    pub last_seen: i64,
}

/// A connection for lookups.
pub struct Reader {
    conn: Connection,
}

impl Reader {
    pub fn open(path: &Path) -> Result<Reader, String> {
        let what = |e: rusqlite::Error| format!("database {}: {e}", path.display());
        let conn = open(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(what)?;
        conn.execute_batch("PRAGMA query_only = 1; PRAGMA cache_size = -8192;")
            .map_err(what)?;
        Ok(Reader { conn })
    }

    /// Live peers that hold `hash`, at most `limit`, in peer id order from
    /// `start` on, wrapping around.
    pub fn find(
        &self,
        hash: &Hash,
        now: i64,
        ttl: i64,
        limit: usize,
        start: i64,
    ) -> rusqlite::Result<Vec<PeerRow>> {
        // CROSS JOIN keeps packages outside: one range of its primary key,
        // then each provider by id.
        const FROM: &str = "SELECT p.node, p.record, p.last_seen \
             FROM packages AS k CROSS JOIN peers AS p ON p.id = k.peer \
             WHERE k.hash = ?1 AND p.last_seen >= ?2 AND ";
        let mut found = Vec::new();
        for range in ["k.peer >= ?3", "k.peer < ?3"] {
            let left = limit.saturating_sub(found.len());
            if left == 0 {
                break;
            }
            let mut stmt = self
                .conn
                .prepare_cached(&format!("{FROM}{range} LIMIT ?4"))?;
            let rows = stmt.query_map(
                params![&hash.0[..], now - ttl, start, left as i64],
                peer_row,
            )?;
            for row in rows {
                found.push(row?);
            }
        }
        Ok(found)
    }

    /// A live peer.
    pub fn peer(&self, node: &NodeId, now: i64, ttl: i64) -> rusqlite::Result<Option<PeerRow>> {
        self.conn
            .prepare_cached(
                "SELECT node, record, last_seen FROM peers WHERE node = ?1 AND last_seen >= ?2",
            )?
            .query_row(params![&node.as_bytes()[..], now - ttl], peer_row)
            .optional()
    }

    /// The `limit` most recently seen live peers.
    pub fn peers(&self, now: i64, ttl: i64, limit: usize) -> rusqlite::Result<Vec<PeerRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT node, record, last_seen FROM peers WHERE last_seen >= ?1 \
             ORDER BY last_seen DESC LIMIT ?2",
        )?;
        stmt.query_map(params![now - ttl, limit as i64], peer_row)?
            .collect()
    }

    /// Live peers, and the rows they hold.
    pub fn counts(&self, now: i64, ttl: i64) -> rusqlite::Result<(u64, u64)> {
        self.conn
            .prepare_cached(
                "SELECT count(*), coalesce(sum(hashes), 0) FROM peers WHERE last_seen >= ?1",
            )?
            .query_row([now - ttl], |row| Ok((row.get(0)?, row.get(1)?)))
    }

    /// The largest peer id, for picking where a lookup starts.
    pub fn max_peer_id(&self) -> rusqlite::Result<i64> {
        self.conn
            .prepare_cached("SELECT coalesce(max(id), 0) FROM peers")?
            .query_row([], |row| row.get(0))
    }
}

fn peer_row(row: &rusqlite::Row) -> rusqlite::Result<PeerRow> {
    Ok(PeerRow {
        node: row.get(0)?,
        record: row.get(1)?,
        last_seen: row.get(2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;

    struct Db {
        dir: std::path::PathBuf,
        writer: Writer,
        reader: Reader,
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn db(name: &str) -> Db {
        let dir = std::env::temp_dir().join(format!("peerix-db-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let writer = Writer::open(&dir.join("t.db")).unwrap();
        let reader = Reader::open(&dir.join("t.db")).unwrap();
        Db {
            dir,
            writer,
            reader,
        }
    }

    fn node(n: u8) -> NodeId {
        let dir = std::env::temp_dir().join(format!("peerix-db-key-{n}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(crate::identity::KEY_FILE), [n; 32]).unwrap();
        let id = Identity::load_or_create(&dir).unwrap().node_id();
        let _ = std::fs::remove_dir_all(&dir);
        id
    }

    fn hash(n: u32) -> Hash {
        let mut bytes = [0u8; 20];
        bytes[..4].copy_from_slice(&n.to_be_bytes());
        bytes[19] = 7;
        Hash(bytes)
    }

    fn announce(node: NodeId) -> Change {
        announce_limited(node, 2)
    }

    fn announce_limited(node: NodeId, max_peers_per_ip: usize) -> Change {
        Change::Announce {
            node,
            ip: "127.0.0.1".into(),
            record: format!("{{\"node_id\":\"{node}\"}}"),
            max_peers_per_ip,
        }
    }

    const TTL: i64 = 120;

    #[test]
    fn chunks_respect_a_low_variable_limit() {
        let mut db = db("chunks");
        // The original's SQLite allowed 999 variables; lower still here.
        db.writer.set_variable_limit(10).unwrap();
        assert_eq!(db.writer.chunk(), 9);
        let a = node(1);
        db.writer.apply(announce(a), None, 1000, TTL).unwrap();
        let hashes: Vec<Hash> = (0..1000).map(hash).collect();
        let outcome = db
            .writer
            .apply(
                Change::Batch {
                    node: a,
                    hashes: hashes.clone(),
                },
                None,
                1000,
                TTL,
            )
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Applied {
                hashes: 1000,
                added: 1000,
                removed: 0
            }
        );
        let outcome = db
            .writer
            .apply(
                Change::Delta {
                    node: a,
                    added: (1000..1500).map(hash).collect(),
                    removed: (0..700).map(hash).collect(),
                },
                None,
                1001,
                TTL,
            )
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Applied {
                hashes: 800,
                added: 500,
                removed: 700
            }
        );
        assert!(
            db.reader
                .find(&hash(699), 1001, TTL, 10, 0)
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            db.reader.find(&hash(700), 1001, TTL, 10, 0).unwrap().len(),
            1
        );
        assert_eq!(db.reader.counts(1001, TTL).unwrap(), (1, 800));
        // A full set again writes only the difference.
        let outcome = db
            .writer
            .apply(
                Change::Batch {
                    node: a,
                    hashes: (700..1501).map(hash).collect(),
                },
                None,
                1002,
                TTL,
            )
            .unwrap();
        assert_eq!(
            outcome,
            Outcome::Applied {
                hashes: 801,
                added: 1,
                removed: 0
            }
        );
    }

    #[test]
    fn rows_live_exactly_as_long_as_their_peer() {
        let mut db = db("ttl");
        let (a, b) = (node(1), node(2));
        for n in [a, b] {
            db.writer.apply(announce(n), None, 1000, TTL).unwrap();
            db.writer
                .apply(
                    Change::Batch {
                        node: n,
                        hashes: vec![hash(1), hash(2)],
                    },
                    None,
                    1000,
                    TTL,
                )
                .unwrap();
        }
        // B heartbeats; A does not.
        db.writer.apply(announce(b), None, 1100, TTL).unwrap();
        assert_eq!(db.reader.find(&hash(1), 1120, TTL, 10, 0).unwrap().len(), 2);
        let found = db.reader.find(&hash(1), 1121, TTL, 10, 0).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(&found[0].node, b.as_bytes());
        assert!(db.reader.peer(&a, 1121, TTL).unwrap().is_none());
        // An expired peer's delta is refused, whether or not the sweep ran.
        let e = db
            .writer
            .apply(
                Change::Delta {
                    node: a,
                    added: vec![hash(3)],
                    removed: vec![],
                },
                None,
                1121,
                TTL,
            )
            .unwrap_err();
        assert!(matches!(e, WriteError::NotRegistered(_)), "{e:?}");
        // Its announce is a new registration, with no rows.
        let outcome = db.writer.apply(announce(a), None, 1122, TTL).unwrap();
        assert_eq!(
            outcome,
            Outcome::Announced {
                new: true,
                hashes: 0
            }
        );
        // The sweep deletes B's rows once B expires too.
        while db.writer.sweep_step(1300, TTL).unwrap() {}
        let rows: i64 = db
            .reader
            .conn
            .query_row("SELECT count(*) FROM packages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
        assert_eq!(db.reader.counts(1300, TTL).unwrap(), (0, 0));
    }

    #[test]
    fn a_signature_is_taken_once_even_when_refused() {
        let mut db = db("seen");
        let a = node(1);
        let signature = Signature {
            bytes: [9; 64],
            expires: 1300,
        };
        let e = db
            .writer
            .apply(Change::Delete { node: a }, Some(signature), 1000, TTL)
            .unwrap_err();
        assert!(matches!(e, WriteError::NotRegistered(_)), "{e:?}");
        let e = db
            .writer
            .apply(announce(a), Some(signature), 1000, TTL)
            .unwrap_err();
        assert!(matches!(e, WriteError::Replayed), "{e:?}");
        assert!(db.reader.peer(&a, 1000, TTL).unwrap().is_none());
        // Forgotten once stale.
        while db.writer.sweep_step(1301, TTL).unwrap() {}
        db.writer
            .apply(announce(a), Some(signature), 1301, TTL)
            .unwrap();
    }

    #[test]
    fn registrations_from_one_ip_are_bounded() {
        let mut db = db("perip");
        for n in [1, 2] {
            db.writer.apply(announce(node(n)), None, 1000, TTL).unwrap();
        }
        let e = db
            .writer
            .apply(announce(node(3)), None, 1000, TTL)
            .unwrap_err();
        assert!(
            matches!(e, WriteError::TooManyPeers { max: 2, .. }),
            "{e:?}"
        );
        // Heartbeats of registered peers still pass.
        db.writer.apply(announce(node(1)), None, 1001, TTL).unwrap();
    }

    #[test]
    fn lookups_rotate_among_many_providers() {
        let mut db = db("rotate");
        for n in 1..=5 {
            db.writer
                .apply(announce_limited(node(n), 0), None, 1000, TTL)
                .unwrap();
            db.writer
                .apply(
                    Change::Batch {
                        node: node(n),
                        hashes: vec![hash(1)],
                    },
                    None,
                    1000,
                    TTL,
                )
                .unwrap();
        }
        let first = |start| db.reader.find(&hash(1), 1000, TTL, 2, start).unwrap();
        assert_eq!(&first(1)[0].node, node(1).as_bytes());
        assert_eq!(&first(4)[0].node, node(4).as_bytes());
        // Wraps around.
        let from_five = first(5);
        assert_eq!(from_five.len(), 2);
        assert_eq!(&from_five[1].node, node(1).as_bytes());
        assert_eq!(db.reader.find(&hash(1), 1000, TTL, 32, 3).unwrap().len(), 5);
    }
}
