//! The in-memory index of this host's valid paths, built by the scanner.
//!
//! It holds, for every valid path, its hash part and whether the share policy
//! lets the path leave this host, and nothing else: 20 bytes and one bit a
//! path. Request handlers use it to answer misses without a daemon round trip;
//! the LAN responder and the LAN summary answer from it. A path's name is not
//! kept: whoever needs it asks the daemon (QueryPathFromHashPart).
//!
//! Hash parts are packed in binary: the 32 nix32 characters are 5 bits each,
//! first character in the high bits, so the 160 bits fill 20 bytes exactly
//! and byte order is the hash parts' own (string) order. The packed hashes
//! are one sorted array, searched by bisection; the share bits are a bitset
//! beside it.

use std::fmt;

use crate::nix::nix32;
use crate::nix::store_path::{HASH_PART_LEN, HashPart, STORE_DIR};

/// A hash part in binary.
pub type PackedHash = [u8; PACKED_LEN];
pub const PACKED_LEN: usize = HASH_PART_LEN * 5 / 8;

const NOT_NIX32: u8 = 0xff;

/// nix32 character to digit, `NOT_NIX32` for anything else.
const DIGITS: [u8; 256] = {
    let mut table = [NOT_NIX32; 256];
    let mut i = 0;
    while i < nix32::ALPHABET.len() {
        table[nix32::ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Packs 32 nix32 characters; `None` if any is not one.
pub fn pack_chars(chars: &[u8]) -> Option<PackedHash> {
    if chars.len() != HASH_PART_LEN {
        return None;
    }
    let mut out = [0u8; PACKED_LEN];
    let (mut acc, mut bits, mut at) = (0u32, 0u32, 0);
    for &c in chars {
        let digit = DIGITS[usize::from(c)];
        if digit == NOT_NIX32 {
            return None;
        }
        acc = (acc << 5) | u32::from(digit);
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            out[at] = (acc >> bits) as u8;
            at += 1;
        }
    }
    Some(out)
}

pub fn pack(hash: &HashPart) -> PackedHash {
    // A HashPart holds 32 nix32 characters, so this always packs.
    pack_chars(hash.as_str().as_bytes()).unwrap_or_default()
}

/// The hash part of a full store path (`/nix/store/<hash>-…`), packed, read
/// without parsing the rest of the path.
pub fn pack_path(path: &str) -> Option<PackedHash> {
    let rest = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    pack_chars(rest.as_bytes().get(..HASH_PART_LEN)?)
}

pub fn unpack(packed: &PackedHash) -> HashPart {
    let mut chars = [0u8; HASH_PART_LEN];
    let (mut acc, mut bits, mut bytes) = (0u32, 0u32, packed.iter());
    for c in chars.iter_mut() {
        if bits < 5 {
            acc = (acc << 8) | u32::from(*bytes.next().unwrap_or(&0));
            bits += 8;
        }
        bits -= 5;
        *c = nix32::ALPHABET[((acc >> bits) & 0x1f) as usize];
    }
    let text = std::str::from_utf8(&chars).unwrap_or_default();
    // Every character came from the alphabet: this parses.
    HashPart::parse(text).unwrap_or_else(|_| unreachable!("unpacked {text:?}"))
}

/// A fixed-size set of bits.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Bits {
    words: Vec<u64>,
    len: usize,
}

impl Bits {
    pub fn new(len: usize) -> Bits {
        Bits {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; one past the end is ignored.
    pub fn set(&mut self, i: usize) {
        if i < self.len {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Keeps the first `len` bits, and frees the memory of the rest.
    fn truncate(&mut self, len: usize) {
        if len < self.len {
            for i in len..self.len.min(len.next_multiple_of(64)) {
                self.words[i / 64] &= !(1 << (i % 64));
            }
            self.words.truncate(len.div_ceil(64));
            self.words.shrink_to_fit();
            self.len = len;
        }
    }

    fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

/// What the index says of one hash part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub shared: bool,
}

#[derive(Default, PartialEq, Eq)]
pub struct Index {
    /// Sorted, no duplicates.
    hashes: Vec<PackedHash>,
    /// Bit `i`: `hashes[i]` may be shared.
    shared: Bits,
    shared_len: usize,
    /// Goes up by one each time the shared set changes.
    generation: u64,
}

impl fmt::Debug for Index {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Index")
            .field("len", &self.len())
            .field("shared_len", &self.shared_len)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Index {
    /// From hashes in any order; of a hash given twice, the first one counts.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (HashPart, bool)>,
        generation: u64,
    ) -> Index {
        let mut entries: Vec<(PackedHash, bool)> =
            entries.into_iter().map(|(h, s)| (pack(&h), s)).collect();
        // Stable: the first of equal hashes stays first, and from_sorted keeps it.
        entries.sort_by_key(|e| e.0);
        let capacity = entries.len();
        Index::from_sorted(entries.into_iter(), capacity, generation)
    }

    /// From entries in increasing hash order; of equal hashes, the first
    /// counts. `capacity`: how many there are at most.
    pub(crate) fn from_sorted(
        entries: impl Iterator<Item = (PackedHash, bool)>,
        capacity: usize,
        generation: u64,
    ) -> Index {
        let mut hashes: Vec<PackedHash> = Vec::with_capacity(capacity);
        let mut shared = Bits::new(capacity);
        for (hash, is_shared) in entries {
            if hashes.last().is_some_and(|last| *last >= hash) {
                debug_assert!(hashes.last() == Some(&hash), "entries out of order");
                continue;
            }
            if is_shared {
                shared.set(hashes.len());
            }
            hashes.push(hash);
        }
        if hashes.len() < capacity {
            hashes.shrink_to_fit();
            shared.truncate(hashes.len());
        }
        Index::from_parts(hashes, shared, generation)
    }

    /// From sorted, distinct hashes and their share bits.
    pub(crate) fn from_parts(mut hashes: Vec<PackedHash>, shared: Bits, generation: u64) -> Index {
        debug_assert!(hashes.windows(2).all(|w| w[0] < w[1]));
        hashes.shrink_to_fit();
        let shared_len = shared.count_ones();
        Index {
            hashes,
            shared,
            shared_len,
            generation,
        }
    }

    /// This index with the paths of `hashes` that it has marked shared too,
    /// and those it newly shares; `None` when that changes nothing. The
    /// generation goes up by one.
    pub fn share_more(&self, hashes: &[PackedHash]) -> Option<(Index, Vec<HashPart>)> {
        let mut shared = self.shared.clone();
        let mut added = Vec::new();
        for hash in hashes {
            if let Some(i) = self.position(hash) {
                if !shared.get(i) {
                    shared.set(i);
                    added.push(unpack(hash));
                }
            }
        }
        if added.is_empty() {
            return None;
        }
        let index = Index::from_parts(self.hashes.clone(), shared, self.generation + 1);
        Some((index, added))
    }

    /// The same hashes with the same share bits (the generation aside).
    pub fn same_entries(&self, other: &Index) -> bool {
        self.hashes == other.hashes
            && self.shared_len == other.shared_len
            && self.entries().eq(other.entries())
    }

    pub(crate) fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// Where `packed` is in hash order, if it is indexed.
    pub(crate) fn position_of(&self, packed: &PackedHash) -> Option<usize> {
        self.position(packed)
    }

    fn position(&self, packed: &PackedHash) -> Option<usize> {
        self.hashes.binary_search(packed).ok()
    }

    pub fn get(&self, hash: &HashPart) -> Option<IndexEntry> {
        self.get_packed(&pack(hash))
    }

    pub fn get_packed(&self, packed: &PackedHash) -> Option<IndexEntry> {
        self.position(packed).map(|i| IndexEntry {
            shared: self.shared.get(i),
        })
    }

    pub fn contains(&self, hash: &HashPart) -> bool {
        self.get(hash).is_some()
    }

    pub fn is_shared(&self, hash: &HashPart) -> bool {
        self.get(hash).is_some_and(|e| e.shared)
    }

    /// `hash` again, only if it is indexed and may be shared.
    pub fn get_shared(&self, hash: &HashPart) -> Option<HashPart> {
        self.is_shared(hash).then_some(*hash)
    }

    /// Calls `f` with every hash part that may be shared, in hash order.
    pub fn for_each_shared(&self, mut f: impl FnMut(&HashPart)) {
        for hash in self.shared_hashes() {
            f(&hash);
        }
    }

    /// Every hash part that may be shared, in hash order.
    pub fn shared_hashes(&self) -> impl Iterator<Item = HashPart> + '_ {
        self.entries()
            .filter(|(_, shared)| *shared)
            .map(|(packed, _)| unpack(packed))
    }

    /// Every indexed hash, packed, with its share bit, in hash order.
    pub fn entries(&self) -> impl ExactSizeIterator<Item = (&PackedHash, bool)> + '_ {
        self.hashes
            .iter()
            .enumerate()
            .map(|(i, h)| (h, self.shared.get(i)))
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn shared_len(&self) -> usize {
        self.shared_len
    }

    /// Goes up by one each time a scan changes the shared set.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Heap memory held, in bytes.
    pub fn heap_bytes(&self) -> usize {
        self.hashes.capacity() * PACKED_LEN + self.shared.heap_bytes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    /// xorshift64*: reproducible inputs without a dependency.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        pub fn hash(&mut self) -> HashPart {
            let chars: String = (0..HASH_PART_LEN)
                .map(|_| char::from(nix32::ALPHABET[self.below(32) as usize]))
                .collect();
            HashPart::parse(&chars).unwrap()
        }

        /// A hash from a small pool, so that repeats happen.
        pub fn hash_from(&mut self, pool: &[HashPart]) -> HashPart {
            pool[self.below(pool.len() as u64) as usize]
        }
    }

    #[test]
    fn packing_is_20_bytes_in_hash_order_and_round_trips() {
        let mut rng = Rng(7);
        let hashes: Vec<HashPart> = (0..2000).map(|_| rng.hash()).collect();
        for pair in hashes.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            assert_eq!(unpack(&pack(&a)), a);
            assert_eq!(pack(&a).cmp(&pack(&b)), a.cmp(&b), "{a} {b}");
        }
        assert_eq!(PACKED_LEN, 20);
        let zeros = HashPart::parse(&"0".repeat(32)).unwrap();
        let last = HashPart::parse(&"z".repeat(32)).unwrap();
        assert_eq!(pack(&zeros), [0; 20]);
        assert_eq!(pack(&last), [0xff; 20]);
        // As dense as nix32 itself: the same bits, in the other byte order.
        let h = HashPart::parse("0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d").unwrap();
        let mut le = nix32::decode(h.as_str()).unwrap();
        le.reverse();
        assert_eq!(pack(&h).to_vec(), le);
    }

    #[test]
    fn paths_pack_by_their_hash_part() {
        let h = "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d";
        let expected = pack(&HashPart::parse(h).unwrap());
        assert_eq!(pack_path(&format!("/nix/store/{h}-hello")), Some(expected));
        for bad in [
            format!("/nix/store/{}", &h[..31]),
            format!("/nix/store/e{}-x", &h[1..]),
            format!("/nix/stor/{h}-x"),
            format!("/nix/store{h}-x"),
            "/nix/store/ü".to_string(),
            String::new(),
        ] {
            assert_eq!(pack_path(&bad), None, "{bad}");
        }
        assert_eq!(pack_chars(b"0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1"), None);
        assert_eq!(pack_chars(&[0xc3; 32]), None);
    }

    #[test]
    fn bits() {
        let mut bits = Bits::new(130);
        for i in [0, 63, 64, 129] {
            bits.set(i);
        }
        bits.set(130); // out of range: ignored
        assert_eq!(bits.count_ones(), 4);
        assert!(bits.get(63) && bits.get(64) && !bits.get(65) && !bits.get(500));
        bits.truncate(64);
        assert_eq!(bits.count_ones(), 2);
        assert!(bits.get(63) && !bits.get(64));
        bits.set(100);
        assert_eq!(bits.count_ones(), 2);
    }

    #[test]
    fn lookups_agree_with_a_map_on_random_inputs() {
        for seed in 1..40u64 {
            let mut rng = Rng(seed);
            let pool: Vec<HashPart> = (0..1 + rng.below(300)).map(|_| rng.hash()).collect();
            let count = rng.below(400) as usize;
            let entries: Vec<(HashPart, bool)> = (0..count)
                .map(|_| (rng.hash_from(&pool), rng.below(3) != 0))
                .collect();
            let mut model: HashMap<HashPart, bool> = HashMap::new();
            for (h, s) in &entries {
                model.entry(*h).or_insert(*s);
            }
            let index = Index::from_entries(entries, seed);
            assert_eq!(index.len(), model.len());
            assert_eq!(index.is_empty(), model.is_empty());
            assert_eq!(index.shared_len(), model.values().filter(|s| **s).count());
            assert_eq!(index.generation(), seed);
            for h in pool.iter().copied().chain((0..50).map(|_| rng.hash())) {
                let want = model.get(&h).copied();
                assert_eq!(index.get(&h).map(|e| e.shared), want, "{h}");
                assert_eq!(index.contains(&h), want.is_some());
                assert_eq!(index.is_shared(&h), want == Some(true));
                assert_eq!(index.get_shared(&h), (want == Some(true)).then_some(h));
            }
            let mut shared = Vec::new();
            index.for_each_shared(|h| shared.push(*h));
            let mut want: Vec<HashPart> = model.iter().filter(|e| *e.1).map(|e| *e.0).collect();
            want.sort();
            assert_eq!(shared, want, "for_each_shared: every shared hash, in order");
            assert_eq!(index.shared_hashes().collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn twenty_bytes_and_a_bit_a_path() {
        let mut rng = Rng(3);
        let index = Index::from_entries((0..10_000).map(|_| (rng.hash(), true)), 1);
        assert_eq!(index.len(), 10_000);
        assert!(
            index.heap_bytes() <= 10_000 * 20 + 10_000 / 8 + 8,
            "{}",
            index.heap_bytes()
        );
    }
}
