//! Nix's base-32 encoding ("nix32"), used for store path hash parts and hashes.
//!
//! The alphabet omits e, o, u and t. Encoding starts from the last byte:
//! character `i` (counting from the end of the string) takes bits `5i..5i+5`
//! of the input read as a little-endian number.

use std::fmt;

pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nix32Error {
    /// The character at this index is not in the alphabet.
    InvalidChar(usize),
    /// No byte length encodes to this many characters.
    InvalidLength(usize),
    /// The leading character carries bits beyond the byte length.
    NonCanonical,
}

impl fmt::Display for Nix32Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Nix32Error::InvalidChar(i) => write!(f, "invalid nix32 character at index {i}"),
            Nix32Error::InvalidLength(n) => write!(f, "{n} is not a valid nix32 length"),
            Nix32Error::NonCanonical => f.write_str("nix32 string has bits set beyond its length"),
        }
    }
}

impl std::error::Error for Nix32Error {}

/// The number of characters that encode `byte_len` bytes.
pub const fn encoded_len(byte_len: usize) -> usize {
    (byte_len * 8).div_ceil(5)
}

pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let low = u16::from(bytes[i]) >> j;
        let high = bytes.get(i + 1).map_or(0, |&b| u16::from(b) << (8 - j));
        out.push(char::from(ALPHABET[usize::from((low | high) & 0x1f)]));
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes a nix32 string into exactly the byte length it encodes.
pub fn decode(s: &str) -> Result<Vec<u8>, Nix32Error> {
    let chars = s.as_bytes();
    // The byte length is the largest whose encoding has this many characters.
    let byte_len = chars.len() * 5 / 8;
    if encoded_len(byte_len) != chars.len() {
        return Err(Nix32Error::InvalidLength(chars.len()));
    }
    let mut out = vec![0u8; byte_len];
    for (n, &c) in chars.iter().rev().enumerate() {
        let d = digit(c).ok_or(Nix32Error::InvalidChar(chars.len() - 1 - n))?;
        let bit = n * 5;
        let (i, j) = (bit / 8, bit % 8);
        let value = u16::from(d) << j;
        match out.get_mut(i) {
            Some(b) => *b |= value as u8,
            None if value != 0 => return Err(Nix32Error::NonCanonical),
            None => {}
        }
        let carry = (value >> 8) as u8;
        match out.get_mut(i + 1) {
            Some(b) => *b |= carry,
            None if carry != 0 => return Err(Nix32Error::NonCanonical),
            None => {}
        }
    }
    Ok(out)
}

/// Decodes into a fixed-size array; the string must encode exactly `N` bytes.
pub fn decode_exact<const N: usize>(s: &str) -> Result<[u8; N], Nix32Error> {
    if s.len() != encoded_len(N) {
        return Err(Nix32Error::InvalidLength(s.len()));
    }
    let bytes = decode(s)?;
    bytes
        .try_into()
        .map_err(|_| Nix32Error::InvalidLength(s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Produced by real Nix 2.8: `nix-hash --type sha256 --flat [--base32] FILE`
    // over an empty file and over the three bytes "abc".
    const VECTORS: &[(&str, &str)] = &[
        (
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73",
        ),
        (
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        ),
    ];

    #[test]
    fn known_answers_from_nix() {
        for (hex, nix32) in VECTORS {
            let bytes: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            assert_eq!(encode(&bytes), *nix32);
            assert_eq!(decode(nix32).unwrap(), bytes);
        }
    }

    #[test]
    fn round_trips_every_length() {
        for len in 0..64 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let s = encode(&bytes);
            assert_eq!(s.len(), encoded_len(len));
            assert_eq!(decode(&s).unwrap(), bytes, "length {len}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode("e").unwrap_err(), Nix32Error::InvalidLength(1));
        let mut s = encode(&[0u8; 20]);
        s.replace_range(3..4, "e");
        assert_eq!(decode(&s).unwrap_err(), Nix32Error::InvalidChar(3));
        // 32 characters encode 20 bytes exactly; 52 encode 32 bytes with 4 spare bits.
        assert!(decode(&format!("z{}", "0".repeat(51))).is_err());
        assert!(decode_exact::<32>(&"0".repeat(32)).is_err());
        assert!(decode_exact::<20>(&"0".repeat(32)).is_ok());
    }
}
