//! Fills a peerix-tracker through its API with signed requests, and times
//! it: the helper of `tests/bench/tracker.sh` (not a test).
//!
//! ```text
//! tracker-fill --addr 127.0.0.1:12305 --keys DIR [--peers 10000]
//!     [--hashes 1000] [--delta 500] [--rework 1000] [--threads 4]
//!     [--sample FILE]
//! ```
//!
//! Phases, each timed over all peers, `--threads` keep-alive connections:
//! announce every peer; a full batch of `--hashes` hash parts for each;
//! then, for the first `--rework` peers only (to keep the run short), a
//! delta that removes `--delta` of them and adds `--delta` others, and the
//! full batch again (what a node sends on first contact when the tracker
//! knows it already: after the delta, the tracker writes the difference). Hash parts come from a pool of a tenth of all
//! rows, so each is held by about ten peers. `--sample` gets up to 100 000
//! pool hash parts, one a line, for lookups. Node keys are made once in
//! `--keys` (one directory a peer) and reused by later runs.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use peerix::identity::{Identity, KEY_FILE};
use peerix::nix::nix32;
use peerix::tracker::auth::{self, NODE_HEADER, SIGNATURE_HEADER, TIME_HEADER};
use sha2::{Digest, Sha256};

struct Options {
    addr: SocketAddr,
    keys: PathBuf,
    peers: usize,
    hashes: usize,
    delta: usize,
    rework: usize,
    threads: usize,
    sample: Option<PathBuf>,
}

fn options() -> Result<Options, lexopt::Error> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut options = Options {
        addr: "127.0.0.1:12305".parse().unwrap(),
        keys: PathBuf::from("/tmp/tracker-fill-keys"),
        peers: 10_000,
        hashes: 1_000,
        delta: 500,
        rework: 1000,
        threads: 4,
        sample: None,
    };
    while let Some(arg) = parser.next()? {
        match arg {
            Long("addr") => options.addr = parser.value()?.parse()?,
            Long("keys") => options.keys = parser.value()?.into(),
            Long("peers") => options.peers = parser.value()?.parse()?,
            Long("hashes") => options.hashes = parser.value()?.parse()?,
            Long("delta") => options.delta = parser.value()?.parse()?,
            Long("rework") => options.rework = parser.value()?.parse()?,
            Long("threads") => options.threads = parser.value()?.parse()?,
            Long("sample") => options.sample = Some(parser.value()?.into()),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(options)
}

/// Pool entry `index` as a hash part.
fn pool_hash(index: usize) -> String {
    let digest = Sha256::digest((index as u64).to_le_bytes());
    nix32::encode(&digest[..20])
}

/// The `j`-th hash part of peer `p`: every pool entry is taken by about
/// `peers * hashes / pool` peers, and one peer's are all different.
fn peer_hash(p: usize, j: usize, hashes: usize, pool: usize) -> String {
    pool_hash(((p * hashes + j) * 7919) % pool)
}

fn identity(keys: &Path, p: usize) -> Identity {
    let dir = keys.join(p.to_string());
    if !dir.join(KEY_FILE).exists() {
        std::fs::create_dir_all(&dir).unwrap();
        let mut secret = [0u8; 32];
        secret[..8].copy_from_slice(&(p as u64 + 1).to_le_bytes());
        secret[8] = 0x42;
        std::fs::write(dir.join(KEY_FILE), secret).unwrap();
    }
    Identity::load_or_create(&dir).unwrap()
}

/// One keep-alive connection.
struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    fn send(
        &mut self,
        node: &Identity,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> io::Result<(u16, Vec<u8>)> {
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let signed = auth::sign(node, method, path, time, body);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: tracker\r\nContent-Length: {}\r\n\
             {NODE_HEADER}: {}\r\n{TIME_HEADER}: {}\r\n{SIGNATURE_HEADER}: {}\r\n\r\n",
            body.len(),
            signed.node,
            signed.time,
            signed.signature
        );
        if self.conn.is_none() {
            let stream = TcpStream::connect(self.addr)?;
            stream.set_nodelay(true)?;
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().unwrap();
        let mut request = head.into_bytes();
        request.extend_from_slice(body);
        conn.get_mut().write_all(&request)?;
        let mut line = String::new();
        conn.read_line(&mut line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {line:?}")))?;
        let mut length = 0usize;
        let mut close = false;
        loop {
            line.clear();
            conn.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse().unwrap_or(0);
            }
            close |= lower == "connection: close";
        }
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body)?;
        if close {
            self.conn = None;
        }
        Ok((status, body))
    }
}

/// Runs `request` for each of `identities` on `threads` connections;
/// returns the seconds it took.
fn phase(
    name: &str,
    options: &Options,
    identities: &[Identity],
    request: impl Fn(usize, &Identity) -> (&'static str, Vec<u8>) + Sync,
) -> f64 {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..options.threads {
            scope.spawn(|| {
                let mut client = Client {
                    addr: options.addr,
                    conn: None,
                };
                loop {
                    let p = next.fetch_add(1, Ordering::Relaxed);
                    let Some(node) = identities.get(p) else {
                        return;
                    };
                    let (path, body) = request(p, node);
                    match client.send(node, "POST", path, &body) {
                        Ok((200, _)) => {}
                        Ok((status, body)) => panic!(
                            "{name} of peer {p}: {status} {}",
                            String::from_utf8_lossy(&body)
                        ),
                        Err(e) => panic!("{name} of peer {p}: {e}"),
                    }
                }
            });
        }
    });
    started.elapsed().as_secs_f64()
}

fn hash_list(hashes: impl Iterator<Item = String>) -> String {
    let quoted: Vec<String> = hashes.map(|h| format!("\"{h}\"")).collect();
    quoted.join(",")
}

fn main() {
    let options = options().unwrap_or_else(|e| {
        eprintln!("tracker-fill: {e}");
        std::process::exit(2);
    });
    let (peers, hashes, delta) = (options.peers, options.hashes, options.delta);
    let pool = (peers * hashes / 10).max(hashes);
    let started = Instant::now();
    let identities: Vec<Identity> = (0..peers).map(|p| identity(&options.keys, p)).collect();
    let rework = &identities[..options.rework.min(peers)];
    eprintln!(
        "# {peers} node keys in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Some(sample) = &options.sample {
        let lines: Vec<String> = (0..pool.min(100_000))
            .map(|i| pool_hash(i * (pool / pool.min(100_000))))
            .collect();
        std::fs::write(sample, lines.join("\n") + "\n").unwrap();
    }

    let announce = |p: usize, node: &Identity| {
        let port = 20_000 + p % 40_000;
        let body = format!(
            "{{\"node_id\":\"{}\",\"http_addrs\":[\"10.{}.{}.{}:{port}\"],\"http_port\":{port}}}",
            node.node_id(),
            p / 62_500 % 250,
            p / 250 % 250,
            p % 250 + 1,
        );
        ("/iroh/announce", body.into_bytes())
    };
    let batch = |p: usize, node: &Identity| {
        let list = hash_list((0..hashes).map(|j| peer_hash(p, j, hashes, pool)));
        let body = format!("{{\"node_id\":\"{}\",\"hashes\":[{list}]}}", node.node_id());
        ("/packages/batch", body.into_bytes())
    };
    let delta_request = |p: usize, node: &Identity| {
        let removed = hash_list((0..delta).map(|j| peer_hash(p, j, hashes, pool)));
        // The next peer's first ones: new to this peer.
        let added = hash_list((0..delta).map(|j| peer_hash(p, hashes + j, hashes, pool)));
        let body = format!(
            "{{\"node_id\":\"{}\",\"added\":[{added}],\"removed\":[{removed}]}}",
            node.node_id()
        );
        ("/packages/delta", body.into_bytes())
    };

    let secs = phase("announce", &options, &identities, announce);
    println!(
        "announce\t{peers} peers\t{secs:.1} s\t{:.0} announces/s",
        peers as f64 / secs
    );
    let secs = phase("batch", &options, &identities, batch);
    let rows = peers * hashes;
    println!(
        "full batch (new)\t{rows} hashes\t{secs:.1} s\t{:.0} hashes/s",
        rows as f64 / secs
    );
    let reworked = rework.len();
    if delta > 0 {
        let secs = phase("delta", &options, rework, delta_request);
        let changed = reworked * delta * 2;
        println!(
            "delta (+{delta} -{delta}, {reworked} peers)\t{changed} hashes\t{secs:.1} s\t{:.0} hashes/s",
            changed as f64 / secs
        );
    }
    let secs = phase("batch again", &options, rework, batch);
    let sent = reworked * hashes;
    println!(
        "full batch (known, {reworked} peers)\t{sent} hashes\t{secs:.1} s\t{:.0} hashes/s",
        sent as f64 / secs
    );
}
