//! A bounded cache of looked-up paths, keyed by hash part.
//!
//! Two generations: lookups hit either; inserts go to the young one, and when
//! it is full the old generation is dropped and the young one takes its place.
//! That bounds memory at twice the capacity with O(1) work and no per-entry
//! bookkeeping, and keeps whatever is being asked for again and again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::nix::store_path::HashPart;

use super::LocalPath;

/// Entries per generation; a rendered narinfo with its metadata is about 1 KiB.
pub const DEFAULT_CAPACITY: usize = 2048;

pub struct PathCache {
    capacity: usize,
    generations: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    young: HashMap<HashPart, Arc<LocalPath>>,
    old: HashMap<HashPart, Arc<LocalPath>>,
}

impl PathCache {
    pub fn new(capacity: usize) -> PathCache {
        PathCache {
            capacity: capacity.max(1),
            generations: Mutex::new(Generations::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // A panic elsewhere cannot leave the maps inconsistent: every update is one insert.
        self.generations.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn get(&self, hash: &HashPart) -> Option<Arc<LocalPath>> {
        let mut g = self.lock();
        if let Some(found) = g.young.get(hash) {
            return Some(Arc::clone(found));
        }
        let found = g.old.remove(hash)?;
        Self::insert_young(&mut g, self.capacity, *hash, Arc::clone(&found));
        Some(found)
    }

    pub fn insert(&self, hash: HashPart, path: Arc<LocalPath>) {
        let mut g = self.lock();
        Self::insert_young(&mut g, self.capacity, hash, path);
    }

    fn insert_young(g: &mut Generations, capacity: usize, hash: HashPart, path: Arc<LocalPath>) {
        if g.young.len() >= capacity && !g.young.contains_key(&hash) {
            g.old = std::mem::take(&mut g.young);
        }
        g.young.insert(hash, path);
    }

    pub fn remove(&self, hash: &HashPart) {
        let mut g = self.lock();
        g.young.remove(hash);
        g.old.remove(hash);
    }

    pub fn clear(&self) {
        *self.lock() = Generations::default();
    }
}
