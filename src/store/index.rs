//! The in-memory index of this host's valid paths, built by the scanner.
//!
//! It maps a hash part to its store path and to whether the share policy lets
//! the path leave this host. Request handlers use it to skip a daemon round
//! trip; the LAN responder and the tracker announcer (later) answer from it.

use std::collections::HashMap;

use crate::nix::store_path::{HashPart, StorePath};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub path: StorePath,
    pub shared: bool,
}

#[derive(Default, Debug)]
pub struct Index {
    entries: HashMap<HashPart, IndexEntry>,
    shared: usize,
}

impl Index {
    pub fn insert(&mut self, path: StorePath, shared: bool) {
        let entry = IndexEntry { path, shared };
        let previous = self.entries.insert(entry.path.hash_part(), entry);
        self.shared += usize::from(shared);
        self.shared -= usize::from(previous.is_some_and(|p| p.shared));
    }

    pub fn get(&self, hash: &HashPart) -> Option<&IndexEntry> {
        self.entries.get(hash)
    }

    /// The path behind `hash`, only if it may be shared.
    pub fn get_shared(&self, hash: &HashPart) -> Option<&StorePath> {
        self.get(hash).filter(|e| e.shared).map(|e| &e.path)
    }

    /// Every hash part the share policy lets leave this host.
    pub fn for_each_shared(&self, mut f: impl FnMut(&HashPart)) {
        for (hash, entry) in &self.entries {
            if entry.shared {
                f(hash);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn shared_len(&self) -> usize {
        self.shared
    }

    pub fn shrink_to_fit(&mut self) {
        self.entries.shrink_to_fit();
    }
}
