//! A bounded cache of looked-up paths, keyed by hash part.
//!
//! Two generations: lookups hit either; inserts go to the young one, and when
//! it is full the old generation is dropped and the young one takes its place.
//! That bounds memory at twice a generation's size with O(1) work and no
//! per-entry bookkeeping, and keeps whatever is being asked for again and
//! again. A generation is full at `capacity` entries or `byte_budget` bytes
//! (estimated), whichever comes first: most narinfos are about 1 KiB, but a
//! path with thousands of references has one of 100 KiB and more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::nix::store_path::HashPart;

use super::LocalPath;

/// Entries per generation; a rendered narinfo with its metadata is about 1 KiB.
pub const DEFAULT_CAPACITY: usize = 2048;
/// Bytes per generation, estimated by [`entry_bytes`].
pub const DEFAULT_BYTE_BUDGET: usize = 2 << 20;

pub struct PathCache {
    capacity: usize,
    byte_budget: usize,
    generations: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    young: HashMap<HashPart, Arc<LocalPath>>,
    young_bytes: usize,
    old: HashMap<HashPart, Arc<LocalPath>>,
}

/// About how much memory an entry holds: the rendered narinfo, and the
/// metadata it was rendered from (much the same text, in many allocations).
pub fn entry_bytes(path: &LocalPath) -> usize {
    const PER_ALLOCATION: usize = 40;
    let info = &path.info;
    let strings = info
        .references
        .iter()
        .chain(&info.deriver)
        .map(|r| r.base_name().len())
        .chain(info.sigs.iter().chain(&info.ca).map(|s| s.len()))
        .map(|len| len + PER_ALLOCATION)
        .sum::<usize>();
    std::mem::size_of::<LocalPath>() + path.narinfo.len() + info.path.base_name().len() + strings
}

impl PathCache {
    pub fn new(capacity: usize, byte_budget: usize) -> PathCache {
        PathCache {
            capacity: capacity.max(1),
            byte_budget,
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
        self.insert_young(&mut g, *hash, Arc::clone(&found));
        Some(found)
    }

    pub fn insert(&self, hash: HashPart, path: Arc<LocalPath>) {
        let mut g = self.lock();
        self.insert_young(&mut g, hash, path);
    }

    fn insert_young(&self, g: &mut Generations, hash: HashPart, path: Arc<LocalPath>) {
        let bytes = entry_bytes(&path);
        if let Some(previous) = g.young.remove(&hash) {
            g.young_bytes -= entry_bytes(&previous);
        }
        let full = g.young.len() >= self.capacity || g.young_bytes + bytes > self.byte_budget;
        if full && !g.young.is_empty() {
            g.old = std::mem::take(&mut g.young);
            g.young_bytes = 0;
        }
        g.young_bytes += bytes;
        g.young.insert(hash, path);
    }

    pub fn remove(&self, hash: &HashPart) {
        let mut g = self.lock();
        if let Some(removed) = g.young.remove(hash) {
            g.young_bytes -= entry_bytes(&removed);
        }
        g.old.remove(hash);
    }

    pub fn clear(&self) {
        *self.lock() = Generations::default();
    }

    #[cfg(test)]
    fn sizes(&self) -> (usize, usize, usize) {
        let g = self.lock();
        (g.young.len(), g.old.len(), g.young_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::store_path::StorePath;
    use crate::store::LocalPathInfo;

    fn entry(n: usize, references: usize) -> (HashPart, Arc<LocalPath>) {
        let base = |i: usize| {
            let digits = format!("{i:0>32}");
            format!("{}-p{i}", &digits[digits.len() - 32..])
        };
        let path = StorePath::from_base_name(&base(n)).unwrap();
        let info = LocalPathInfo {
            path: path.clone(),
            nar_hash: crate::nix::hash::NarHash([0; 32]),
            nar_size: 1,
            references: (0..references)
                .map(|i| StorePath::from_base_name(&base(1_000_000 + i)).unwrap())
                .collect(),
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        let narinfo = info.to_narinfo(None).render();
        let hash = path.hash_part();
        (
            hash,
            Arc::new(LocalPath {
                info,
                shared: true,
                narinfo,
            }),
        )
    }

    #[test]
    fn bounded_by_count() {
        let cache = PathCache::new(4, usize::MAX);
        for n in 0..20 {
            let (h, p) = entry(n, 0);
            cache.insert(h, p);
            let (young, old, _) = cache.sizes();
            assert!(young <= 4 && old <= 4);
        }
        assert!(cache.get(&entry(19, 0).0).is_some());
        assert!(cache.get(&entry(0, 0).0).is_none());
    }

    #[test]
    fn bounded_by_bytes() {
        let big = entry_bytes(&entry(0, 1000).1);
        assert!(big > 50_000, "{big}");
        let cache = PathCache::new(DEFAULT_CAPACITY, 3 * big);
        for n in 0..20 {
            let (h, p) = entry(n, 1000);
            cache.insert(h, p);
            let (young, old, bytes) = cache.sizes();
            assert!(
                young <= 3 && old <= 3 && bytes <= 3 * big,
                "{young} {old} {bytes}"
            );
        }
        // One entry above the whole budget is still kept, alone.
        let cache = PathCache::new(DEFAULT_CAPACITY, 10);
        let (h, p) = entry(1, 10);
        cache.insert(h, p);
        assert!(cache.get(&h).is_some());
        // Replacing and removing keep the count of bytes right.
        let cache = PathCache::new(DEFAULT_CAPACITY, usize::MAX);
        let (h, p) = entry(2, 5);
        cache.insert(h, Arc::clone(&p));
        cache.insert(h, Arc::clone(&p));
        assert_eq!(cache.sizes(), (1, 0, entry_bytes(&p)));
        cache.remove(&h);
        assert_eq!(cache.sizes(), (0, 0, 0));
    }
}
