//! Checks a NAR as it streams in: its structure (the NAR validator), its
//! length, and its SHA-256 against the NarHash a trusted narinfo promised.
//! Pure: no I/O.

use sha2::{Digest, Sha256};

use crate::nix::hash::NarHash;
use crate::nix::nar::NarValidator;

pub struct NarCheck {
    validator: NarValidator,
    hasher: Sha256,
    received: u64,
    expected_hash: NarHash,
    expected_size: u64,
}

impl NarCheck {
    pub fn new(expected_hash: NarHash, expected_size: u64) -> NarCheck {
        NarCheck {
            validator: NarValidator::new(),
            hasher: Sha256::new(),
            received: 0,
            expected_hash,
            expected_size,
        }
    }

    /// Bytes checked so far: where the next byte goes.
    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn is_complete(&self) -> bool {
        self.received == self.expected_size
    }

    /// Checks the next bytes of the stream.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        let len = bytes.len() as u64;
        if self.received + len > self.expected_size {
            return Err(format!(
                "NAR is longer than its NarSize {}",
                self.expected_size
            ));
        }
        self.validator
            .feed(bytes)
            .map_err(|e| format!("malformed NAR: {e}"))?;
        self.hasher.update(bytes);
        self.received += len;
        Ok(())
    }

    /// After the last byte: the NAR must be complete and hash to NarHash.
    pub fn finish(self) -> Result<(), String> {
        if self.received != self.expected_size {
            return Err(format!(
                "NAR has {} bytes, NarSize says {}",
                self.received, self.expected_size
            ));
        }
        self.validator
            .finish()
            .map_err(|e| format!("malformed NAR: {e}"))?;
        let got = NarHash(self.hasher.finalize().into());
        if got != self.expected_hash {
            return Err(format!(
                "NAR hashes to {got}, the narinfo says {}",
                self.expected_hash
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::testdata;

    fn vector() -> (&'static [u8], NarHash) {
        let dir = &testdata::SIGNED_PATHS[2];
        assert!(dir.path.ends_with("-dir"));
        (testdata::DIR_NAR, NarHash::parse(dir.nar_hash).unwrap())
    }

    #[test]
    fn a_true_nar_passes_in_any_chunking() {
        let (nar, hash) = vector();
        for chunk in [1, 7, 64, nar.len()] {
            let mut check = NarCheck::new(hash, nar.len() as u64);
            for piece in nar.chunks(chunk) {
                check.feed(piece).unwrap();
            }
            assert!(check.is_complete());
            check.finish().unwrap();
        }
    }

    #[test]
    fn wrong_bytes_length_or_structure_fail() {
        let (nar, hash) = vector();
        let size = nar.len() as u64;
        // One byte changed inside the file contents: well-formed, wrong hash.
        let mut flipped = nar.to_vec();
        flipped[testdata::first_file_byte(nar)] ^= 1;
        let mut check = NarCheck::new(hash, size);
        check.feed(&flipped).unwrap();
        assert!(check.finish().unwrap_err().contains("hashes to"));
        // Garbage fails at once.
        let mut check = NarCheck::new(hash, size);
        assert!(check.feed(b"GET / HTTP/1.1\r\n").is_err());
        // Too long fails before the bytes are taken.
        let mut check = NarCheck::new(hash, size - 1);
        assert!(check.feed(nar).unwrap_err().contains("longer"));
        // Short fails at the end.
        let mut check = NarCheck::new(hash, size);
        check.feed(&nar[..nar.len() - 8]).unwrap();
        assert!(!check.is_complete());
        assert!(check.finish().is_err());
    }
}
