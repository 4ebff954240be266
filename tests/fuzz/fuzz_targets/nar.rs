//! The streaming NAR validator (`NarValidator`), as peerix runs it on NAR
//! bytes from a peer.
//!
//! Checks: no panic; the verdict and the error (offset and message) do not
//! depend on how the bytes are chunked; an error's offset is where the
//! stream went wrong (everything before it is accepted) and within the
//! input; and the verdict agrees with a small independent parser of the
//! same grammar and limits, written here from the NAR format.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peerix::nix::nar::{MAGIC, MAX_DEPTH, MAX_NAME, MAX_TARGET, NarError, NarValidator};

fn validate_chunked(data: &[u8], sizes: impl Iterator<Item = usize>) -> Result<(), NarError> {
    let mut v = NarValidator::new();
    let mut rest = data;
    for size in sizes {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        v.feed(chunk)?;
        assert_eq!(v.offset(), (data.len() - tail.len()) as u64);
        rest = tail;
    }
    v.finish()
}

fuzz_target!(|data: &[u8]| {
    let whole = validate_chunked(data, std::iter::once(data.len()));
    // Uneven chunks, chosen from the input so each input gets its own split.
    let salt = data.len().wrapping_mul(31) ^ data.first().copied().unwrap_or(0) as usize;
    let sizes = (0..).map(|i: usize| 1 + (salt.wrapping_add(i.wrapping_mul(7)) % 61));
    let chunked = validate_chunked(data, sizes);
    assert_eq!(whole, chunked, "the verdict depends on the chunking");
    let bytewise = validate_chunked(data, std::iter::repeat(1));
    assert_eq!(whole, bytewise, "the verdict differs when fed byte by byte");

    if let Err(e) = &whole {
        assert!(e.offset <= data.len() as u64, "{e} is past the input");
        assert!(!e.message.is_empty());
        // Every byte before the error's offset is accepted.
        let mut v = NarValidator::new();
        if let Err(early) = v.feed(&data[..e.offset as usize]) {
            panic!("{e}, but the prefix before it is already refused: {early}");
        }
    }

    let reference = Reference { data, pos: 0 }.archive();
    assert_eq!(
        whole.is_ok(),
        reference.is_some(),
        "the validator says {whole:?}, the reference parser {}",
        if reference.is_some() {
            "accepts"
        } else {
            "refuses"
        }
    );
});

/// A recursive-descent reading of the NAR grammar, with the validator's
/// documented limits, over the whole input at once.
struct Reference<'a> {
    data: &'a [u8],
    pos: usize,
}

const MAX_KEYWORD: u64 = 16;

impl<'a> Reference<'a> {
    fn archive(mut self) -> Option<()> {
        self.keyword(MAGIC)?;
        self.node(0)?;
        (self.pos == self.data.len()).then_some(())
    }

    fn u64(&mut self) -> Option<u64> {
        let bytes = self.data.get(self.pos..self.pos.checked_add(8)?)?;
        self.pos += 8;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    /// A length, that many bytes, then zero padding to a multiple of 8.
    fn bytes(&mut self, max: u64) -> Option<&'a [u8]> {
        let len = self.u64()?;
        if len > max {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        let end = self.pos.checked_add(len)?;
        let s = self.data.get(self.pos..end)?;
        let padded = end.checked_add((8 - len % 8) % 8)?;
        let padding = self.data.get(end..padded)?;
        if padding.iter().any(|&b| b != 0) {
            return None;
        }
        self.pos = padded;
        Some(s)
    }

    fn string(&mut self) -> Option<&'a [u8]> {
        self.bytes(MAX_KEYWORD)
    }

    fn keyword(&mut self, want: &[u8]) -> Option<()> {
        (self.string()? == want).then_some(())
    }

    /// A node inside `open_dirs` directories.
    fn node(&mut self, open_dirs: usize) -> Option<()> {
        self.keyword(b"(")?;
        self.keyword(b"type")?;
        match self.string()? {
            b"regular" => {
                let mut field = self.string()?;
                if field == b"executable" {
                    self.keyword(b"")?;
                    field = self.string()?;
                }
                if field != b"contents" {
                    return None;
                }
                self.bytes(u64::MAX)?;
            }
            b"symlink" => {
                self.keyword(b"target")?;
                let target = self.bytes(MAX_TARGET as u64)?;
                if target.is_empty() || target.contains(&0) {
                    return None;
                }
            }
            b"directory" => {
                if open_dirs >= MAX_DEPTH {
                    return None;
                }
                let mut previous: Option<&[u8]> = None;
                loop {
                    match self.string()? {
                        b")" => return Some(()),
                        b"entry" => {}
                        _ => return None,
                    }
                    self.keyword(b"(")?;
                    self.keyword(b"name")?;
                    let name = self.bytes(MAX_NAME as u64)?;
                    if name.is_empty()
                        || name == b"."
                        || name == b".."
                        || name.contains(&b'/')
                        || name.contains(&0)
                        || previous.is_some_and(|p| p >= name)
                    {
                        return None;
                    }
                    previous = Some(name);
                    self.keyword(b"node")?;
                    self.node(open_dirs + 1)?;
                    self.keyword(b")")?;
                }
            }
            _ => return None,
        }
        self.keyword(b")")
    }
}
