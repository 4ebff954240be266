//! The upstream cache of the `nixpkgs` share mode: a path is shared only if
//! the upstream cache (cache.nixos.org by default) has its narinfo, and,
//! unless verification is off, upstream's NarHash equals this host's. What
//! leaves the host is then public already, byte for byte.
//!
//! It fails closed: a path upstream could not be asked about (down, a
//! timeout, a 5xx, an answer that does not parse) is not shared, and is
//! asked again later. Its decision is pending, and pending is not shared.
//!
//! Answers are remembered with an expiry, in memory and in a small file in
//! the state directory (`upstream-answers`), so a restart does not ask
//! upstream about the whole store again. The file is replaced atomically
//! (a temporary file, fsync, rename, fsync of the directory); a damaged one
//! is reported, set aside and replaced. An answer keeps upstream's NarHash
//! (its first 16 bytes), not the outcome of a comparison: a path deleted and
//! built again locally with other contents is compared anew.
//!
//! The scanner asks: the request handlers only read the remembered answers
//! (`decide`), so a request never waits on upstream.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::nix::hash::NarHash;
use crate::nix::narinfo::NarInfo;
use crate::nix::store_path::HashPart;

use super::index::{PACKED_LEN, PackedHash, pack};

pub const DEFAULT_UPSTREAM: &str = "https://cache.nixos.org";
/// Upstream requests in flight at most, as in the original.
pub const DEFAULT_CONCURRENCY: usize = 10;
/// How long an answer holds: upstream (cache.nixos.org) practically never
/// drops a path it has, while one it lacks may be built by it later.
const HAS_TTL: u64 = 30 * 24 * 3600;
const LACKS_TTL: u64 = 24 * 3600;
/// The answers file in the state directory.
pub const ANSWERS_FILE: &str = "upstream-answers";
const MAGIC: &[u8] = b"peerix upstream answers 1\n";
/// Bytes of upstream's NarHash kept: 128 bits, far beyond a second preimage.
const KEPT_HASH: usize = 16;
/// A record: packed hash part, 1 if upstream has it, expiry (u32 LE, Unix
/// seconds), NarHash prefix (zero when upstream lacks the path).
const RECORD: usize = PACKED_LEN + 1 + 4 + KEPT_HASH;
/// A narinfo is read up to this size (NarInfo::parse's own limit is lower).
const MAX_NARINFO: u64 = 128 * 1024;

/// What upstream said of a path: `None`, it lacks it; else the first bytes
/// of its NarHash.
type Said = Option<[u8; KEPT_HASH]>;

#[derive(Clone, Copy, Debug)]
struct Answer {
    said: Said,
    /// Unix seconds.
    expires: u32,
}

/// What a check of pending paths came to.
#[derive(Debug, Default)]
pub struct Checked {
    /// Paths upstream answered for, with the share decision.
    pub answered: Vec<(PackedHash, bool)>,
    /// Paths not asked or not answered: still pending.
    pub unanswered: Vec<(HashPart, NarHash)>,
    /// Why upstream could not be asked, if it could not.
    pub error: Option<String>,
}

/// Counters for the log and `/health`.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    pub asked: AtomicU64,
    pub has: AtomicU64,
    pub lacks: AtomicU64,
    pub differs: AtomicU64,
    pub failures: AtomicU64,
    pub reachable: AtomicBool,
}

pub struct Upstream {
    /// Without a trailing `/`.
    url: String,
    verify: bool,
    concurrency: usize,
    agent: ureq::Agent,
    answers: Mutex<HashMap<PackedHash, Answer>>,
    file: PathBuf,
    pub stats: UpstreamStats,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("url", &self.url)
            .field("verify", &self.verify)
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Upstream {
    /// `url`: the cache's base URL (checked by the configuration); `timeout`
    /// bounds each request. Reads the remembered answers from `state_dir`.
    pub fn open(
        url: &str,
        verify: bool,
        concurrency: usize,
        timeout: Duration,
        state_dir: &Path,
    ) -> Upstream {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(3)
            .timeout_global(Some(timeout))
            .timeout_connect(Some(timeout))
            .user_agent(concat!("peerix/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let url = url.trim_end_matches('/').to_string();
        let file = state_dir.join(ANSWERS_FILE);
        let answers = load(&file, &url);
        Upstream {
            url,
            verify,
            concurrency: concurrency.max(1),
            agent,
            answers: Mutex::new(answers),
            file,
            stats: UpstreamStats::default(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The remembered decision for a path with NarHash `ours`: `None` when
    /// upstream has not been asked, or its answer expired (not shared yet).
    pub fn decide(&self, hash: &HashPart, ours: &NarHash) -> Option<bool> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        let answer = answers.get(&pack(hash))?;
        if u64::from(answer.expires) <= now() {
            return None;
        }
        Some(self.share(answer.said, ours))
    }

    fn share(&self, said: Said, ours: &NarHash) -> bool {
        match said {
            None => false,
            Some(theirs) => !self.verify || theirs == ours.0[..KEPT_HASH],
        }
    }

    /// Asks upstream about `items`, `concurrency` at a time. After the first
    /// failure nothing more is asked: the rest stays pending. Answers are
    /// remembered, and written to the answers file.
    pub fn check(&self, items: Vec<(HashPart, NarHash)>) -> Checked {
        let mut checked = Checked::default();
        if items.is_empty() {
            return checked;
        }
        let workers = self.concurrency.min(items.len());
        // A plain queue and a result list under locks: the requests are
        // slow, the locks are not, and this avoids two more instantiations
        // of the channels' code.
        let queue = Mutex::new(items.into_iter());
        let results = Mutex::new(Vec::new());
        let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
        let down = AtomicBool::new(false);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                let (next, results, down) = (&next, &results, &down);
                let spawned = std::thread::Builder::new()
                    .name("upstream".into())
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        while let Some((hash, ours)) = next() {
                            let said = if down.load(Ordering::Relaxed) {
                                Err(None)
                            } else {
                                self.ask(&hash).map_err(|e| {
                                    down.store(true, Ordering::Relaxed);
                                    Some(e)
                                })
                            };
                            results
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((hash, ours, said));
                        }
                    });
                if let Err(e) = spawned {
                    log::warn!("cannot start an upstream check thread: {e}");
                }
            }
            // With no thread started, the paths stay in the queue: pending.
        });
        let expiry = |hash: &PackedHash, ttl: u64| {
            // Spread over a quarter more, so answers made together do not
            // expire together.
            let spread = ttl / 4 * u64::from(hash[PACKED_LEN - 1]) / 255;
            (now() + ttl + spread).min(u64::from(u32::MAX)) as u32
        };
        let mut learned = Vec::new();
        let results = results.into_inner().unwrap_or_else(|e| e.into_inner());
        for (hash, ours, said) in results {
            match said {
                Ok(said) => {
                    let packed = pack(&hash);
                    let ttl = if said.is_some() { HAS_TTL } else { LACKS_TTL };
                    let said = said.map(|theirs| {
                        let mut kept = [0; KEPT_HASH];
                        kept.copy_from_slice(&theirs.0[..KEPT_HASH]);
                        kept
                    });
                    let counter = match said {
                        None => &self.stats.lacks,
                        Some(_) if self.share(said, &ours) => &self.stats.has,
                        Some(_) => {
                            log::warn!(
                                "upstream's NarHash of {} differs from this host's: {}",
                                hash.as_str(),
                                if self.verify {
                                    "not sharing it"
                                } else {
                                    "sharing it all the same (--no-verify)"
                                }
                            );
                            &self.stats.differs
                        }
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    checked.answered.push((packed, self.share(said, &ours)));
                    learned.push((
                        packed,
                        Answer {
                            said,
                            expires: expiry(&packed, ttl),
                        },
                    ));
                }
                Err(error) => {
                    if let Some(error) = error {
                        checked.error.get_or_insert(error);
                    }
                    checked.unanswered.push((hash, ours));
                }
            }
        }
        checked
            .unanswered
            .extend(queue.into_inner().unwrap_or_else(|e| e.into_inner()));
        self.stats
            .asked
            .fetch_add(learned.len() as u64, Ordering::Relaxed);
        if checked.error.is_some() {
            self.stats.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.stats
            .reachable
            .store(checked.error.is_none(), Ordering::Relaxed);
        if !learned.is_empty() {
            let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
            answers.extend(learned);
            let bytes = encode(&self.url, &answers);
            drop(answers);
            if let Err(e) = write_atomically(&self.file, &bytes) {
                log::warn!(
                    "cannot write {}: {e}; upstream answers are kept in memory only",
                    self.file.display()
                );
            }
        }
        checked
    }

    /// `GET <url>/<hash>.narinfo`: `Some(NarHash)` if upstream has the path,
    /// `None` if it answers 404 or 410; anything else is an error.
    fn ask(&self, hash: &HashPart) -> Result<Option<NarHash>, String> {
        let url = format!("{}/{}.narinfo", self.url, hash.as_str());
        let mut response = self
            .agent
            .get(&url)
            .call()
            .map_err(|e| format!("{url}: {e}"))?;
        match response.status().as_u16() {
            200 => {}
            404 | 410 => return Ok(None),
            status => return Err(format!("{url}: HTTP {status}")),
        }
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_NARINFO)
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))?;
        let info = NarInfo::parse(&text).map_err(|e| format!("{url}: {e}"))?;
        if info.store_path.hash_part() != *hash {
            return Err(format!(
                "{url}: answered with the narinfo of {}",
                info.store_path
            ));
        }
        Ok(Some(info.nar_hash))
    }
}

/// The answers file's bytes: magic, the upstream URL on a line, records.
/// Expired answers are left out.
fn encode(url: &str, answers: &HashMap<PackedHash, Answer>) -> Vec<u8> {
    let now = now();
    let mut bytes = Vec::with_capacity(MAGIC.len() + url.len() + 1 + answers.len() * RECORD);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(url.as_bytes());
    bytes.push(b'\n');
    for (hash, answer) in answers {
        if u64::from(answer.expires) <= now {
            continue;
        }
        bytes.extend_from_slice(hash);
        bytes.push(u8::from(answer.said.is_some()));
        bytes.extend_from_slice(&answer.expires.to_le_bytes());
        bytes.extend_from_slice(&answer.said.unwrap_or_default());
    }
    bytes
}

/// The answers in `bytes` for upstream `url`; `Ok(None)` when they are for
/// another upstream.
fn decode(bytes: &[u8], url: &str) -> Result<Option<HashMap<PackedHash, Answer>>, String> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or("it does not start as an answers file")?;
    let line_end = rest
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("its upstream URL has no end")?;
    if &rest[..line_end] != url.as_bytes() {
        return Ok(None);
    }
    let records = &rest[line_end + 1..];
    if records.len() % RECORD != 0 {
        return Err(format!(
            "{} bytes of records is no whole number",
            records.len()
        ));
    }
    let now = now();
    let mut answers = HashMap::with_capacity(records.len() / RECORD);
    for record in records.chunks_exact(RECORD) {
        let (hash, rest) = record.split_at(PACKED_LEN);
        let (has, rest) = rest.split_at(1);
        let (expires, kept) = rest.split_at(4);
        let said = match has[0] {
            0 => None,
            1 => Some(kept.try_into().unwrap_or_default()),
            other => return Err(format!("a record says {other}, not 0 or 1")),
        };
        let expires = u32::from_le_bytes(expires.try_into().unwrap_or_default());
        if u64::from(expires) > now {
            answers.insert(
                hash.try_into().unwrap_or_default(),
                Answer { said, expires },
            );
        }
    }
    Ok(Some(answers))
}

/// Reads the answers file; a missing one is empty, a damaged one is
/// reported, set aside (`.damaged`) and replaced at the next write.
fn load(file: &Path, url: &str) -> HashMap<PackedHash, Answer> {
    let mut bytes = Vec::new();
    let read = fs::File::open(file).and_then(|mut f| f.read_to_end(&mut bytes));
    match read {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            log::warn!("cannot read {}: {e}; asking upstream again", file.display());
            return HashMap::new();
        }
    }
    match decode(&bytes, url) {
        Ok(Some(answers)) => {
            log::info!(
                "{} upstream answers remembered from {}",
                answers.len(),
                file.display()
            );
            answers
        }
        Ok(None) => {
            log::info!(
                "{} holds answers of another upstream; asking {url} anew",
                file.display()
            );
            HashMap::new()
        }
        Err(why) => {
            let aside = file.with_extension("damaged");
            log::warn!(
                "{} is damaged ({why}); set aside as {} and replaced",
                file.display(),
                aside.display()
            );
            if let Err(e) = fs::rename(file, &aside) {
                log::warn!("cannot set {} aside: {e}", file.display());
            }
            HashMap::new()
        }
    }
}

/// Replaces `file` with `bytes` so that a crash leaves the old file or the
/// new one, never a mix: a temporary file, fsync, rename, fsync of the
/// directory.
pub fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let mut tmp_name = file.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut out = fs::File::create(&tmp)?;
    out.write_all(bytes)?;
    out.sync_all()?;
    drop(out);
    fs::rename(&tmp, file)?;
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("peerix-upstream-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn hash(n: u8) -> HashPart {
        let c = crate::nix::nix32::ALPHABET[usize::from(n) % 32] as char;
        HashPart::parse(&c.to_string().repeat(32)).unwrap()
    }

    #[test]
    fn answers_survive_a_restart_and_a_damaged_file_is_set_aside() {
        let dir = temp_dir("restart");
        // Port 9 on loopback (discard): refused, never anyone's upstream.
        let url = "http://127.0.0.1:9";
        let upstream = Upstream::open(url, true, 2, Duration::from_secs(1), &dir);
        let (h, ours) = (hash(1), NarHash([7; 32]));
        assert_eq!(upstream.decide(&h, &ours), None, "never asked: pending");
        let mut answers = upstream.answers.lock().unwrap();
        answers.insert(
            pack(&h),
            Answer {
                said: Some([7; KEPT_HASH]),
                expires: (now() + 60) as u32,
            },
        );
        answers.insert(
            pack(&hash(2)),
            Answer {
                said: None,
                expires: (now() + 60) as u32,
            },
        );
        answers.insert(
            pack(&hash(3)),
            Answer {
                said: Some([7; KEPT_HASH]),
                expires: (now() - 1) as u32,
            },
        );
        write_atomically(&upstream.file, &encode(url, &answers)).unwrap();
        drop(answers);
        let again = Upstream::open(url, true, 2, Duration::from_secs(1), &dir);
        assert_eq!(again.decide(&h, &ours), Some(true));
        assert_eq!(again.decide(&h, &NarHash([8; 32])), Some(false), "differs");
        assert_eq!(again.decide(&hash(2), &ours), Some(false), "lacks");
        assert_eq!(again.decide(&hash(3), &ours), None, "expired");
        let unverified = Upstream::open(url, false, 2, Duration::from_secs(1), &dir);
        assert_eq!(unverified.decide(&h, &NarHash([8; 32])), Some(true));
        let other = Upstream::open("http://127.0.0.1:10", true, 2, Duration::from_secs(1), &dir);
        assert_eq!(other.decide(&h, &ours), None, "another upstream's answers");

        let file = dir.join(ANSWERS_FILE);
        let mut bytes = fs::read(&file).unwrap();
        bytes.push(0);
        fs::write(&file, &bytes).unwrap();
        let damaged = Upstream::open(url, true, 2, Duration::from_secs(1), &dir);
        assert_eq!(damaged.decide(&h, &ours), None);
        assert!(dir.join("upstream-answers.damaged").exists());
        assert!(!file.exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_upstream_that_cannot_be_asked_leaves_paths_pending() {
        let dir = temp_dir("down");
        let upstream = Upstream::open("http://127.0.0.1:9", true, 3, Duration::from_secs(1), &dir);
        let items: Vec<_> = (0..20).map(|n| (hash(n), NarHash([n; 32]))).collect();
        let checked = upstream.check(items);
        assert!(checked.answered.is_empty());
        assert_eq!(checked.unanswered.len(), 20);
        assert!(checked.error.is_some());
        assert!(
            !dir.join(ANSWERS_FILE).exists(),
            "nothing learned, nothing written"
        );
        assert_eq!(upstream.decide(&hash(1), &NarHash([1; 32])), None);
        let _ = fs::remove_dir_all(&dir);
    }
}
