//! This host's Nix store: the nix-daemon client, the NAR dumper, the share
//! policy, the index of hash parts, and [`LocalStore`], which ties them together
//! for the request handlers.

mod cache;
pub mod daemon;
pub(crate) mod dump;
pub(crate) mod index;
pub mod policy;
pub mod scanner;
pub mod upstream;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::nix::hash::NarHash;
use crate::nix::keys::{SecretKey, fingerprint};
use crate::nix::narinfo::nar_file_name;
use crate::nix::narinfo::{NarInfo, is_printable_value};
use crate::nix::store_path::{HashPart, StorePath};

use cache::PathCache;
use daemon::{DaemonError, DaemonPool, PathInfo};
use index::Index;
use policy::SharePolicy;
use scanner::ScanControl;

/// A valid path's metadata, checked and typed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPathInfo {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

impl LocalPathInfo {
    /// Checks what the daemon sent; a path it cannot parse is an error, not a guess.
    pub fn from_daemon(info: PathInfo) -> Result<LocalPathInfo, StoreError> {
        let bad = |what: &str, value: &str| {
            StoreError::Invalid(format!(
                "nix-daemon sent {what} `{value}` for {}",
                info.path
            ))
        };
        let path = StorePath::parse(&info.path).map_err(|_| bad("an invalid path", &info.path))?;
        let references = info
            .references
            .iter()
            .map(|r| StorePath::parse(r).map_err(|_| bad("an invalid reference", r)))
            .collect::<Result<Vec<_>, _>>()?;
        // Nix refuses a narinfo without a size; only an old database that
        // never recorded it would give 0.
        if info.nar_size == 0 {
            return Err(bad("NarSize", "0"));
        }
        // Signatures and the CA field go into the narinfo as they are: a line
        // break or other control character would corrupt it.
        if let Some(value) = info
            .sigs
            .iter()
            .chain(&info.ca)
            .find(|v| !is_printable_value(v))
        {
            return Err(bad(
                "a signature or CA field a narinfo cannot carry",
                &format!("{value:?}"),
            ));
        }
        // A deriver Nix cannot parse is dropped: it is informative only and not signed.
        let deriver = info
            .deriver
            .as_deref()
            .and_then(|d| StorePath::parse(d).ok());
        Ok(LocalPathInfo {
            path,
            nar_hash: NarHash(info.nar_hash),
            nar_size: info.nar_size,
            references,
            deriver,
            sigs: info.sigs,
            ca: info.ca,
        })
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.path, &self.nar_hash, self.nar_size, &self.references)
    }

    /// The narinfo served for this path, with its store signatures plus ours.
    pub fn to_narinfo(&self, signing_key: Option<&SecretKey>) -> NarInfo {
        let mut sigs = self.sigs.clone();
        if let Some(key) = signing_key {
            let ours = key.sign(&self.fingerprint());
            if !sigs.contains(&ours) {
                sigs.push(ours);
            }
        }
        NarInfo {
            store_path: self.path.clone(),
            url: format!(
                "nar/{}",
                nar_file_name(&self.path.hash_part(), &self.nar_hash)
            ),
            compression: "none".to_string(),
            file_hash: None,
            file_size: None,
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references: self.references.clone(),
            deriver: self.deriver.clone(),
            sigs,
            ca: self.ca.clone(),
        }
    }
}

/// A looked-up path as the handlers need it: metadata, share decision, and the
/// rendered narinfo (rendering signs, so it is done once per cache entry).
#[derive(Debug)]
pub struct LocalPath {
    pub info: LocalPathInfo,
    pub shared: bool,
    pub narinfo: String,
}

#[derive(Debug)]
pub enum StoreError {
    Daemon(DaemonError),
    Invalid(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Daemon(e) => write!(f, "{e}"),
            StoreError::Invalid(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<DaemonError> for StoreError {
    fn from(e: DaemonError) -> Self {
        StoreError::Daemon(e)
    }
}

/// This host's store as the HTTP handlers and the scanner see it.
pub struct LocalStore {
    daemon: DaemonPool,
    store_root: PathBuf,
    policy: SharePolicy,
    signing_key: Option<SecretKey>,
    index: RwLock<Arc<Index>>,
    cache: PathCache,
    scans: AtomicU64,
    /// Goes up with every index installed: scans, and upstream answers.
    index_version: AtomicU64,
    daemon_reachable: AtomicBool,
    scan_control: ScanControl,
}

impl LocalStore {
    pub fn new(
        daemon: DaemonPool,
        store_root: PathBuf,
        policy: SharePolicy,
        signing_key: Option<SecretKey>,
    ) -> LocalStore {
        LocalStore {
            daemon,
            store_root,
            policy,
            signing_key,
            index: RwLock::new(Arc::new(Index::default())),
            cache: PathCache::new(cache::DEFAULT_CAPACITY, cache::DEFAULT_BYTE_BUDGET),
            scans: AtomicU64::new(0),
            index_version: AtomicU64::new(0),
            daemon_reachable: AtomicBool::new(false),
            scan_control: ScanControl::default(),
        }
    }

    pub fn daemon(&self) -> &DaemonPool {
        &self.daemon
    }

    pub fn policy(&self) -> &SharePolicy {
        &self.policy
    }

    /// Pauses and resumes the scanner.
    pub fn scan_control(&self) -> &ScanControl {
        &self.scan_control
    }

    /// Where the files of `path` are on this machine.
    pub fn physical_path(&self, path: &StorePath) -> PathBuf {
        physical_path(&self.store_root, path)
    }

    pub fn index(&self) -> Arc<Index> {
        Arc::clone(&self.index.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Installs a freshly scanned index.
    pub fn replace_index(&self, index: Index) {
        self.complete_scan(Some(index));
    }

    /// Counts a completed scan, and installs its index if it built one
    /// (`None`: the index did not change).
    pub fn complete_scan(&self, index: Option<Index>) {
        if let Some(index) = index {
            self.install(index);
        }
        self.scans.fetch_add(1, Ordering::Relaxed);
        self.index_version.fetch_add(1, Ordering::Relaxed);
        // A path deleted and built again between two scans may have new
        // metadata; cached lookups are made again.
        self.cache.clear();
    }

    /// Installs an index whose share decisions changed between scans (the
    /// upstream cache answered); cached lookups decide again.
    pub fn update_index(&self, index: Index) {
        self.install(index);
        self.index_version.fetch_add(1, Ordering::Relaxed);
        self.cache.clear();
    }

    fn install(&self, index: Index) {
        let old = std::mem::replace(
            &mut *self.index.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(index),
        );
        // Freed here, not under the lock (unless a reader still holds it).
        drop(old);
    }

    pub fn completed_scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Changes whenever another index is installed; 0 before the first scan.
    pub fn index_version(&self) -> u64 {
        self.index_version.load(Ordering::Relaxed)
    }

    pub fn daemon_reachable(&self) -> bool {
        self.daemon_reachable.load(Ordering::Relaxed)
    }

    pub fn set_daemon_reachable(&self, reachable: bool) {
        self.daemon_reachable.store(reachable, Ordering::Relaxed);
    }

    /// Finds a valid local path by hash part, whether or not it may be shared.
    ///
    /// Answers from the cache when it can; the files must still be on disk, so
    /// a path that was garbage-collected since is asked of the daemon again.
    pub fn lookup(&self, hash: &HashPart) -> Result<Option<Arc<LocalPath>>, StoreError> {
        if let Some(found) = self.cache.get(hash) {
            if self
                .physical_path(&found.info.path)
                .symlink_metadata()
                .is_ok()
            {
                return Ok(Some(found));
            }
            self.cache.remove(hash);
        }
        let result = self.lookup_uncached(hash);
        self.set_daemon_reachable(!matches!(result, Err(StoreError::Daemon(_))));
        let found = match result? {
            Some(found) => Arc::new(found),
            None => return Ok(None),
        };
        self.cache.insert(*hash, Arc::clone(&found));
        Ok(Some(found))
    }

    fn lookup_uncached(&self, hash: &HashPart) -> Result<Option<LocalPath>, StoreError> {
        // Once a scan has listed every valid path, a hash it did not list is
        // a miss without asking the daemon: most narinfo requests are misses
        // (nix asks every substituter), and each round trip cost a worker a
        // daemon connection. A path that became valid since is found after
        // the next scan. The index holds no names: a hit asks the daemon.
        if self.completed_scans() > 0 && !self.index().contains(hash) {
            return Ok(None);
        }
        let Some(path) = self.daemon.query_path_from_hash_part(hash.as_str())? else {
            return Ok(None);
        };
        let Some(info) = self.daemon.query_path_info(&path)? else {
            return Ok(None);
        };
        let info = LocalPathInfo::from_daemon(info)?;
        if info.path.hash_part() != *hash {
            return Err(StoreError::Invalid(format!(
                "nix-daemon answered hash part {} with {}",
                hash.as_str(),
                info.path
            )));
        }
        let shared = self.policy.allows(&info);
        let narinfo = info.to_narinfo(self.signing_key.as_ref()).render();
        Ok(Some(LocalPath {
            info,
            shared,
            narinfo,
        }))
    }
}

pub fn physical_path(store_root: &Path, path: &StorePath) -> PathBuf {
    store_root.join("nix/store").join(path.base_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon_info() -> PathInfo {
        PathInfo {
            path: "/nix/store/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-x".into(),
            deriver: None,
            nar_hash: [7; 32],
            references: vec!["/nix/store/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-x".into()],
            nar_size: 144,
            ultimate: false,
            sigs: vec!["peerix-test-1:Emk8t3nc8FKm0pvRLd3G415X==".into()],
            ca: Some("fixed:r:sha256:09fc5jwx6phgryil45cpp14x780x6jdcbxbddjaxgwh1bzw9557i".into()),
        }
    }

    #[test]
    fn daemon_metadata_becomes_a_narinfo_that_parses_back() {
        let info = LocalPathInfo::from_daemon(daemon_info()).unwrap();
        let narinfo = info.to_narinfo(None);
        assert_eq!(NarInfo::parse(&narinfo.render()), Ok(narinfo));
    }

    #[test]
    fn a_nar_size_of_0_is_refused() {
        // Found by the `daemon` fuzz target: NarSize 0 was accepted and
        // rendered into a narinfo that nix and peerix refuse.
        let mut info = daemon_info();
        info.nar_size = 0;
        let e = LocalPathInfo::from_daemon(info).unwrap_err().to_string();
        assert!(e.contains("NarSize `0`"), "{e}");
    }

    #[test]
    fn values_a_narinfo_cannot_carry_are_refused() {
        // Found by the `daemon` fuzz target: a CA field with NUL bytes was
        // accepted and rendered into a narinfo that no one could parse.
        let mut nul_ca = daemon_info();
        nul_ca.ca =
            Some("fixed:LGVKZtOeGb26vceQtCUBhf6dZEt1jZvZN7bmAAivo24qqFBNumzbqCg==\0\0C\0".into());
        let mut injected_sig = daemon_info();
        injected_sig.sigs =
            vec!["k:sig\nStorePath: /nix/store/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-y".into()];
        for info in [nul_ca, injected_sig] {
            let e = LocalPathInfo::from_daemon(info).unwrap_err().to_string();
            assert!(e.contains("cannot carry") && e.contains("\\"), "{e}");
        }
    }
}
