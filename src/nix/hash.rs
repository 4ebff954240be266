//! The SHA-256 NAR hash, in the forms Nix writes it.

use std::fmt;

use super::nix32;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct NarHash(pub [u8; 32]);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashError(String);

impl fmt::Display for HashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HashError {}

impl NarHash {
    /// Parses `sha256:<52 nix32 chars>` or `sha256:<64 lowercase hex chars>`.
    pub fn parse(s: &str) -> Result<NarHash, HashError> {
        let digest = s
            .strip_prefix("sha256:")
            .ok_or_else(|| HashError(format!("hash `{}` is not sha256:...", truncate(s))))?;
        match digest.len() {
            52 => nix32::decode_exact::<32>(digest)
                .map(NarHash)
                .map_err(|e| HashError(format!("hash `{}`: {e}", truncate(s)))),
            64 => NarHash::from_hex(digest),
            n => Err(HashError(format!("sha256 digest of {n} characters"))),
        }
    }

    /// Parses 64 lowercase hex characters, as the nix-daemon sends them.
    pub fn from_hex(s: &str) -> Result<NarHash, HashError> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(HashError(format!(
                "hex sha256 of {} characters",
                bytes.len()
            )));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let nibble = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            match (nibble(pair[0]), nibble(pair[1])) {
                (Some(h), Some(l)) => out[i] = h << 4 | l,
                _ => {
                    return Err(HashError(format!(
                        "invalid hex in sha256 `{}`",
                        truncate(s)
                    )));
                }
            }
        }
        Ok(NarHash(out))
    }

    pub fn to_nix32(&self) -> String {
        nix32::encode(&self.0)
    }
}

impl fmt::Display for NarHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_nix32())
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // `nix-hash --type sha256 --flat [--base32]` of the bytes "abc" (Nix 2.8).
    const HEX: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const NIX32: &str = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";

    #[test]
    fn both_forms_parse_to_the_same_hash() {
        let a = NarHash::parse(&format!("sha256:{NIX32}")).unwrap();
        let b = NarHash::parse(&format!("sha256:{HEX}")).unwrap();
        assert_eq!(a, b);
        assert_eq!(NarHash::from_hex(HEX).unwrap(), a);
        assert_eq!(a.to_string(), format!("sha256:{NIX32}"));
    }

    #[test]
    fn rejects_other_forms() {
        for bad in [
            NIX32.to_string(),
            format!("sha1:{NIX32}"),
            format!("sha256:{}", &NIX32[1..]),
            format!("sha256:{}", HEX.to_uppercase()),
            "sha256:".to_string(),
            format!("sha256:{NIX32}x"),
        ] {
            assert!(NarHash::parse(&bad).is_err(), "{bad}");
        }
    }
}
