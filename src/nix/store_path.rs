//! Store paths and their hash parts, with Nix's grammar.
//!
//! A store path is `/nix/store/<hash part>-<name>`: the hash part is 32 nix32
//! characters, the name 1 to 211 characters of `[A-Za-z0-9+-._?=]`. Names
//! `.` and `..`, and names starting with `.-` or `..-`, are refused as Nix
//! refuses them. Whatever parses here is a single safe path component.

use std::fmt;

use super::nix32;

pub const STORE_DIR: &str = "/nix/store";
pub const HASH_PART_LEN: usize = 32;
pub const MAX_NAME_LEN: usize = 211;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorePathError(String);

impl fmt::Display for StorePathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StorePathError {}

fn error<T>(what: &str, input: &str) -> Result<T, StorePathError> {
    let shown: String = input.chars().take(300).collect();
    Err(StorePathError(format!("{what}: {shown:?}")))
}

/// The 32 nix32 characters that identify a store path.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HashPart([u8; HASH_PART_LEN]);

impl HashPart {
    pub fn parse(s: &str) -> Result<HashPart, StorePathError> {
        let bytes: [u8; HASH_PART_LEN] = match s.as_bytes().try_into() {
            Ok(bytes) => bytes,
            Err(_) => return error("hash part is not 32 characters", s),
        };
        if !bytes.iter().all(|c| nix32::ALPHABET.contains(c)) {
            return error("hash part has a character outside nix32", s);
        }
        Ok(HashPart(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Only nix32 (ASCII) characters are ever stored.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for HashPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HashPart({})", self.as_str())
    }
}

impl fmt::Display for HashPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A valid store path, kept as its base name `<hash part>-<name>`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base_name: Box<str>,
}

impl StorePath {
    /// Parses a full path `/nix/store/<hash>-<name>`.
    pub fn parse(full: &str) -> Result<StorePath, StorePathError> {
        match full
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
        {
            Some(base) => StorePath::from_base_name(base),
            None => error("not a path in /nix/store", full),
        }
    }

    /// Parses a base name `<hash>-<name>`, as narinfo References carry them.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let Some((hash, name)) = base.split_at_checked(HASH_PART_LEN) else {
            return error("store path base name too short", base);
        };
        HashPart::parse(hash)?;
        let Some(name) = name.strip_prefix('-') else {
            return error("store path lacks the `-` after its hash part", base);
        };
        check_name(name).map_err(|what| StorePathError(format!("{what}: {base:?}")))?;
        Ok(StorePath {
            base_name: base.into(),
        })
    }

    pub fn hash_part(&self) -> HashPart {
        // The constructor checked these 32 bytes.
        let mut bytes = [0u8; HASH_PART_LEN];
        bytes.copy_from_slice(&self.base_name.as_bytes()[..HASH_PART_LEN]);
        HashPart(bytes)
    }

    pub fn name(&self) -> &str {
        &self.base_name[HASH_PART_LEN + 1..]
    }

    pub fn base_name(&self) -> &str {
        &self.base_name
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("store path name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("store path name is longer than 211 characters");
    }
    if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
        return Err("store path name is `.`, `..` or starts with `.-`");
    }
    let allowed = |c: u8| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c);
    if !name.bytes().all(allowed) {
        return Err("store path name has a character Nix does not allow");
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base_name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d";

    #[test]
    fn valid_paths() {
        let p = StorePath::parse(&format!("/nix/store/{HASH}-hello-2.12.1")).unwrap();
        assert_eq!(p.hash_part().as_str(), HASH);
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.base_name(), format!("{HASH}-hello-2.12.1"));
        assert_eq!(p.to_string(), format!("/nix/store/{HASH}-hello-2.12.1"));
        for name in ["a", "x+y-1.0_beta?=", ".dotfile", &"n".repeat(211)] {
            assert!(
                StorePath::from_base_name(&format!("{HASH}-{name}")).is_ok(),
                "{name}"
            );
        }
    }

    #[test]
    fn invalid_paths() {
        for bad in [
            format!("/nix/store/{HASH}"),
            format!("/nix/store/{HASH}-"),
            format!("/nix/store/{HASH}hello"),
            format!("/nix/store/{HASH}-a/b"),
            format!("/nix/store/{HASH}-a b"),
            format!("/nix/store/{HASH}-.."),
            format!("/nix/store/{HASH}-."),
            format!("/nix/store/{HASH}-.-x"),
            format!("/nix/store/{HASH}-{}", "n".repeat(212)),
            format!("/nix/store/{}-e", &HASH[..31]),
            format!("/nix/store/e{}-x", &HASH[1..]),
            format!("/nix/storex/{HASH}-x"),
            format!("/nix/store//{HASH}-x"),
            format!("nix/store/{HASH}-x"),
            format!("/nix/store/{HASH}-caf\u{e9}"),
            format!("/nix/store/{HASH}-a\0"),
            "/nix/store/ü".to_string(),
        ] {
            assert!(StorePath::parse(&bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn hash_parts() {
        assert!(HashPart::parse(HASH).is_ok());
        for bad in [
            "",
            &HASH[1..],
            &format!("{HASH}0"),
            "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1e",
            "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1D",
        ] {
            assert!(HashPart::parse(bad).is_err(), "{bad}");
        }
    }
}
