//! Store summaries: a compact, versioned answer to "might this host share
//! hash part H?", published at `GET /local/summary` and fetched by peers, so
//! a LAN host can tell a miss at once instead of broadcasting and waiting.
//!
//! A summary is a Bloom filter over the binary hash parts (20 bytes, the
//! nix32 decoding) of the paths a host shares. Hash parts are already
//! uniformly random, so their own bits index the filter: no hashing. With
//! [`BITS_PER_PATH`] bits a path and [`PROBES`] probes, about 0.8% of the
//! hashes a host lacks look present, at 1.25 bytes a path.
//!
//! Wire format, version 1 (all integers little-endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | magic `PXSM` |
//! | 1 | version, 1 |
//! | 1 | probes, [`PROBES`] |
//! | 2 | reserved, 0 |
//! | 8 | generation: grows whenever the shared set changes |
//! | 4 | count: paths in the filter |
//! | 4 | bits: the filter's length in bits, [`filter_bits`]`(count)` |
//! | bits / 8 | the filter |
//!
//! Bit `i` is bit `i % 8` of byte `i / 8`. A path's probes are
//! `(h1 + j * h2) mod bits` for `j` in `0..probes`, where `h1` and `h2` are
//! the first and second 8 bytes of its binary hash part, little-endian, and
//! `h2` has its lowest bit set. Parsing is strict: any other magic, version,
//! probe count, length or bit count is refused, and so is a filter with far
//! more bits set than `count` paths set (a summary that claims everything).

use std::fmt;

use crate::nix::nix32;
use crate::nix::store_path::HashPart;

const MAGIC: &[u8; 4] = b"PXSM";
pub const VERSION: u8 = 1;
/// Probes per path: the best count for [`BITS_PER_PATH`].
pub const PROBES: u8 = 7;
/// Filter bits per shared path: 0.8% false positives.
pub const BITS_PER_PATH: u64 = 10;
const HEADER: usize = 24;

/// The filter length, in bits, for `count` paths: a whole number of bytes.
pub fn filter_bits(count: u32) -> u64 {
    (u64::from(count) * BITS_PER_PATH).div_ceil(8) * 8
}

/// A parsed or built summary.
#[derive(Clone, PartialEq, Eq)]
pub struct Summary {
    pub generation: u64,
    pub count: u32,
    bits: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SummaryError {
    TooShort,
    BadMagic,
    UnknownVersion(u8),
    BadProbes(u8),
    BadLength {
        expected: u64,
        got: u64,
    },
    BadBits {
        expected: u64,
        got: u64,
    },
    TooLarge {
        bytes: u64,
        limit: u64,
    },
    /// Far more bits set than `count` paths would set.
    Overfull {
        set: u64,
        expected_at_most: u64,
    },
}

impl fmt::Display for SummaryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SummaryError::TooShort => write!(f, "summary shorter than its {HEADER}-byte header"),
            SummaryError::BadMagic => f.write_str("not a summary (bad magic)"),
            SummaryError::UnknownVersion(v) => write!(f, "summary version {v} is not known"),
            SummaryError::BadProbes(p) => write!(f, "summary with {p} probes, not {PROBES}"),
            SummaryError::BadLength { expected, got } => {
                write!(f, "summary of {got} bytes, its header says {expected}")
            }
            SummaryError::BadBits { expected, got } => {
                write!(
                    f,
                    "summary filter of {got} bits, {expected} expected for its count"
                )
            }
            SummaryError::TooLarge { bytes, limit } => {
                write!(f, "summary of {bytes} bytes, over the {limit}-byte limit")
            }
            SummaryError::Overfull {
                set,
                expected_at_most,
            } => write!(
                f,
                "summary with {set} bits set, at most {expected_at_most} expected: it claims more than it holds"
            ),
        }
    }
}

impl std::error::Error for SummaryError {}

/// The two probe seeds of a hash part.
fn seeds(hash: &HashPart) -> (u64, u64) {
    // A HashPart is always 32 nix32 characters: 20 bytes.
    let bytes: [u8; 20] = nix32::decode_exact(hash.as_str()).unwrap_or([0; 20]);
    let word = |at: usize| {
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(word)
    };
    (word(0), word(8) | 1)
}

fn probes(hash: &HashPart, bits: u64) -> impl Iterator<Item = u64> {
    let (h1, h2) = seeds(hash);
    (0..u64::from(PROBES)).map(move |j| h1.wrapping_add(j.wrapping_mul(h2)) % bits)
}

impl Summary {
    /// The summary of `hashes` (each counted once by the caller).
    pub fn build<'h>(
        generation: u64,
        count: u32,
        hashes: impl IntoIterator<Item = &'h HashPart>,
    ) -> Summary {
        let bits = filter_bits(count);
        let mut filter = vec![0u8; (bits / 8) as usize];
        if bits > 0 {
            for hash in hashes {
                for bit in probes(hash, bits) {
                    filter[(bit / 8) as usize] |= 1 << (bit % 8);
                }
            }
        }
        Summary {
            generation,
            count,
            bits: filter,
        }
    }

    /// Whether the host might share `hash`: false means it does not.
    pub fn may_contain(&self, hash: &HashPart) -> bool {
        let bits = self.bits.len() as u64 * 8;
        bits > 0
            && probes(hash, bits).all(|bit| self.bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.bits.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(PROBES);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&(self.bits.len() as u32 * 8).to_le_bytes());
        out.extend_from_slice(&self.bits);
        out
    }

    /// Memory the summary holds.
    pub fn size(&self) -> usize {
        self.bits.len() + std::mem::size_of::<Summary>()
    }

    /// Reads the wire form, strictly; `limit` bounds its length.
    pub fn parse(bytes: &[u8], limit: u64) -> Result<Summary, SummaryError> {
        if bytes.len() as u64 > limit {
            return Err(SummaryError::TooLarge {
                bytes: bytes.len() as u64,
                limit,
            });
        }
        if bytes.len() < HEADER {
            return Err(SummaryError::TooShort);
        }
        if &bytes[..4] != MAGIC {
            return Err(SummaryError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(SummaryError::UnknownVersion(bytes[4]));
        }
        if bytes[5] != PROBES || bytes[6..8] != [0, 0] {
            return Err(SummaryError::BadProbes(bytes[5]));
        }
        let mut word = [0u8; 8];
        word.copy_from_slice(&bytes[8..16]);
        let generation = u64::from_le_bytes(word);
        let mut word = [0u8; 4];
        word.copy_from_slice(&bytes[16..20]);
        let count = u32::from_le_bytes(word);
        word.copy_from_slice(&bytes[20..24]);
        let bits = u64::from(u32::from_le_bytes(word));
        let expected_bits = filter_bits(count);
        if bits != expected_bits {
            return Err(SummaryError::BadBits {
                expected: expected_bits,
                got: bits,
            });
        }
        let expected_len = HEADER as u64 + bits / 8;
        if bytes.len() as u64 != expected_len {
            return Err(SummaryError::BadLength {
                expected: expected_len,
                got: bytes.len() as u64,
            });
        }
        let filter = &bytes[HEADER..];
        let set: u64 = filter.iter().map(|b| u64::from(b.count_ones())).sum();
        let most = most_bits_set(count, bits);
        if set > most {
            return Err(SummaryError::Overfull {
                set,
                expected_at_most: most,
            });
        }
        Ok(Summary {
            generation,
            count,
            bits: filter.to_vec(),
        })
    }
}

/// The most bits `count` paths may set in a filter of `bits` bits: every
/// probe of every path on its own bit. An honest filter sets about 50%; one
/// that claims everything, 100%. (`count * PROBES` bounds it exactly: no
/// honest filter can exceed it, however unlucky.)
fn most_bits_set(count: u32, bits: u64) -> u64 {
    (u64::from(count) * u64::from(PROBES)).min(bits)
}

impl fmt::Debug for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Summary {{ generation: {}, count: {}, {} bytes }}",
            self.generation,
            self.count,
            self.bits.len()
        )
    }
}

/// This host's own summary as published: built from the shared set, and
/// given a new generation whenever that set changes.
#[derive(Debug)]
pub struct Published {
    pub generation: u64,
    pub paths: u32,
    pub bytes: Vec<u8>,
}

/// The shared hash parts, each once, for [`Publisher`].
pub type SharedSet = Box<dyn Fn(&mut dyn FnMut(&HashPart)) + Send + Sync>;

/// Keeps this host's summary current. `version` changes whenever the set
/// `shared` yields may have (a scan); the filter is rebuilt only then, and
/// the generation moves only when the filter did.
pub struct Publisher {
    version: Box<dyn Fn() -> u64 + Send + Sync>,
    shared: SharedSet,
    current: std::sync::Mutex<Option<(u64, std::sync::Arc<Published>)>>,
}

impl Publisher {
    pub fn new(version: Box<dyn Fn() -> u64 + Send + Sync>, shared: SharedSet) -> Publisher {
        Publisher {
            version,
            shared,
            current: std::sync::Mutex::new(None),
        }
    }

    /// Whether the shared set is known: not before the first scan, when it
    /// would pass for an empty store and send every peer to a miss.
    pub fn ready(&self) -> bool {
        (self.version)() > 0
    }

    /// The summary of the shared set as it is now.
    pub fn current(&self) -> std::sync::Arc<Published> {
        let version = (self.version)();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((built_at, published)) = current.as_ref()
            && *built_at == version
        {
            return std::sync::Arc::clone(published);
        }
        let mut hashes = Vec::new();
        (self.shared)(&mut |hash| hashes.push(*hash));
        let paths = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
        let previous = current.as_ref().map(|(_, p)| p);
        // Generations only grow, across restarts too: a peer that kept an
        // old summary of ours must see the new one as new.
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut summary = Summary::build(0, paths, &hashes);
        let generation = match previous {
            Some(p)
                if Summary::parse(&p.bytes, u64::MAX).is_ok_and(|old| old.bits == summary.bits) =>
            {
                p.generation
            }
            Some(p) => now_ms.max(p.generation + 1),
            None => now_ms,
        };
        summary.generation = generation;
        let published = std::sync::Arc::new(Published {
            generation,
            paths,
            bytes: summary.encode(),
        });
        *current = Some((version, std::sync::Arc::clone(&published)));
        published
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic, uniformly spread hash parts.
    fn hashes(n: usize, seed: u64) -> Vec<HashPart> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                let mut bytes = [0u8; 20];
                for b in &mut bytes {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *b = state as u8;
                }
                HashPart::parse(&nix32::encode(&bytes)).unwrap()
            })
            .collect()
    }

    #[test]
    fn members_are_found_and_strangers_rarely() {
        let members = hashes(20_000, 1);
        let summary = Summary::build(3, members.len() as u32, &members);
        assert!(members.iter().all(|h| summary.may_contain(h)));
        let strangers = hashes(20_000, 2);
        let false_positives = strangers.iter().filter(|h| summary.may_contain(h)).count();
        // 0.8% expected; 1% is the target.
        assert!(
            false_positives * 100 <= strangers.len(),
            "{false_positives} false positives in {}",
            strangers.len()
        );
        // At most 2 bytes a path.
        assert!(summary.encode().len() <= HEADER + 2 * members.len());
    }

    #[test]
    fn the_wire_form_round_trips() {
        for n in [0, 1, 7, 1000] {
            let members = hashes(n, 9);
            let summary = Summary::build(42, n as u32, &members);
            let parsed = Summary::parse(&summary.encode(), 1 << 20).unwrap();
            assert_eq!(parsed, summary, "{n}");
            assert!(members.iter().all(|h| parsed.may_contain(h)));
        }
        let empty = Summary::build(0, 0, &[]);
        assert!(!empty.may_contain(&hashes(1, 5)[0]));
    }

    #[test]
    fn malformed_summaries_are_refused_with_a_reason() {
        let members = hashes(100, 4);
        let good = Summary::build(1, 100, &members).encode();
        let with = |at: usize, byte: u8| {
            let mut bad = good.clone();
            bad[at] = byte;
            bad
        };
        assert_eq!(
            Summary::parse(&good[..10], 1 << 20),
            Err(SummaryError::TooShort)
        );
        assert_eq!(
            Summary::parse(&with(0, b'X'), 1 << 20),
            Err(SummaryError::BadMagic)
        );
        assert_eq!(
            Summary::parse(&with(4, 2), 1 << 20),
            Err(SummaryError::UnknownVersion(2))
        );
        assert_eq!(
            Summary::parse(&with(5, 3), 1 << 20),
            Err(SummaryError::BadProbes(3))
        );
        assert!(matches!(
            Summary::parse(&good[..good.len() - 1], 1 << 20),
            Err(SummaryError::BadLength { .. })
        ));
        // A count the filter's length does not fit.
        assert!(matches!(
            Summary::parse(&with(16, 200), 1 << 20),
            Err(SummaryError::BadBits { .. })
        ));
        assert!(matches!(
            Summary::parse(&good, 50),
            Err(SummaryError::TooLarge { .. })
        ));
        // Every bit set: a summary that claims everything.
        let mut everything = good.clone();
        for b in &mut everything[HEADER..] {
            *b = 0xff;
        }
        assert!(matches!(
            Summary::parse(&everything, 1 << 20),
            Err(SummaryError::Overfull { .. })
        ));
    }

    #[test]
    fn the_published_generation_moves_only_when_the_shared_set_does() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let set = Arc::new(Mutex::new(hashes(50, 7)));
        let version = Arc::new(AtomicU64::new(1));
        let publisher = {
            let (set, version) = (Arc::clone(&set), Arc::clone(&version));
            Publisher::new(
                Box::new(move || version.load(Ordering::SeqCst)),
                Box::new(move |each| set.lock().unwrap().iter().for_each(each)),
            )
        };
        let first = publisher.current();
        assert_eq!(first.paths, 50);
        // A rescan with the same set: same generation.
        version.store(2, Ordering::SeqCst);
        assert_eq!(publisher.current().generation, first.generation);
        // A new path: a newer generation, with the path in it.
        let added = hashes(1, 8)[0];
        set.lock().unwrap().push(added);
        version.store(3, Ordering::SeqCst);
        let second = publisher.current();
        assert!(second.generation > first.generation);
        let parsed = Summary::parse(&second.bytes, u64::MAX).unwrap();
        assert!(parsed.may_contain(&added));
        assert_eq!(parsed.generation, second.generation);
    }

    #[test]
    fn an_honest_filter_never_looks_overfull() {
        for (n, seed) in [(1, 1), (2, 2), (10, 3), (5000, 4)] {
            let summary = Summary::build(1, n as u32, &hashes(n, seed));
            assert!(Summary::parse(&summary.encode(), 1 << 24).is_ok(), "{n}");
        }
    }
}
