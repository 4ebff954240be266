//! Standard base64 with padding, as Nix writes keys and signatures.
//!
//! The decoder is strict: it rejects characters outside the alphabet, missing
//! or misplaced padding, and non-zero bits in the final character, so every
//! byte string has exactly one accepted encoding.

use std::fmt;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base64Error {
    InvalidLength(usize),
    InvalidChar(usize),
    NonCanonical,
}

impl fmt::Display for Base64Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Base64Error::InvalidLength(n) => write!(f, "base64 length {n} is not a multiple of 4"),
            Base64Error::InvalidChar(i) => write!(f, "invalid base64 character at index {i}"),
            Base64Error::NonCanonical => f.write_str("base64 has non-zero padding bits"),
        }
    }
}

impl std::error::Error for Base64Error {}

pub fn encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn decode(s: &str) -> Result<Vec<u8>, Base64Error> {
    let chars = s.as_bytes();
    if chars.len() % 4 != 0 {
        return Err(Base64Error::InvalidLength(chars.len()));
    }
    let mut out = Vec::with_capacity(chars.len() / 4 * 3);
    let quads = chars.len() / 4;
    for (q, quad) in chars.chunks(4).enumerate() {
        let last = q + 1 == quads;
        let padding = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if padding > 2 || (padding > 0 && !last) {
            return Err(Base64Error::InvalidChar(q * 4 + 4 - padding));
        }
        let mut n = 0u32;
        for (k, &c) in quad[..4 - padding].iter().enumerate() {
            let v = ALPHABET
                .iter()
                .position(|&a| a == c)
                .ok_or(Base64Error::InvalidChar(q * 4 + k))?;
            n |= (v as u32) << (18 - 6 * k);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - padding;
        if bytes[keep..].iter().any(|&b| b != 0) {
            return Err(Base64Error::NonCanonical);
        }
        out.extend_from_slice(&bytes[..keep]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), coded);
            assert_eq!(decode(coded).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn rejects_non_canonical_input() {
        for bad in [
            "Zg=", "Zg", "Zh==", "Z===", "Zg==Zg==", "Zm9v!", "Zm 9", "=Zm9",
        ] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }
}
