//! Binary-cache signing keys in Nix's format, and narinfo signatures.
//!
//! - secret key: `name:base64(32-byte seed ‖ 32-byte public key)`
//! - public key: `name:base64(32-byte ed25519 public key)`
//! - signature:  `name:base64(64-byte ed25519 signature)` over the fingerprint
//!   `1;<path>;sha256:<nix32 NarHash>;<NarSize>;<sorted full reference paths, comma-joined>`

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use super::base64;
use super::hash::NarHash;
use super::store_path::StorePath;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError(String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

/// Splits `name:base64` and decodes the base64 into exactly `N` bytes.
fn split_named<const N: usize>(text: &str, what: &str) -> Result<(String, [u8; N]), KeyError> {
    let text = text.trim();
    let (name, data) = text
        .split_once(':')
        .ok_or_else(|| KeyError(format!("{what} is not of the form name:base64")))?;
    if name.is_empty() {
        return Err(KeyError(format!("{what} has an empty name")));
    }
    let bytes = base64::decode(data).map_err(|e| KeyError(format!("{what} `{name}`: {e}")))?;
    let bytes: [u8; N] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| KeyError(format!("{what} `{name}` is {} bytes, not {N}", b.len())))?;
    Ok((name.to_string(), bytes))
}

pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    /// Parses the contents of a file made by `nix-store --generate-binary-cache-key`.
    pub fn parse(text: &str) -> Result<SecretKey, KeyError> {
        let (name, bytes) = split_named::<64>(text, "secret key")?;
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[..32]);
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes()[..] != bytes[32..] {
            return Err(KeyError(format!(
                "secret key `{name}`: its public half does not match its seed"
            )));
        }
        Ok(SecretKey { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value of a `Sig:` line: `name:base64(signature)`.
    pub fn sign(&self, fingerprint: &str) -> String {
        let signature = self.key.sign(fingerprint.as_bytes());
        format!("{}:{}", self.name, base64::encode(&signature.to_bytes()))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:<redacted>)", self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn parse(text: &str) -> Result<PublicKey, KeyError> {
        let (name, bytes) = split_named::<32>(text, "public key")?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError(format!("public key `{name}` is not an ed25519 point")))?;
        Ok(PublicKey { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether `sig` (`name:base64`) is this key's signature of `fingerprint`.
    pub fn verify(&self, fingerprint: &str, sig: &str) -> bool {
        let Some((name, data)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(bytes) = base64::decode(data) else {
            return false;
        };
        let Ok(signature) = Signature::from_slice(&bytes) else {
            return false;
        };
        self.key
            .verify_strict(fingerprint.as_bytes(), &signature)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, base64::encode(self.key.as_bytes()))
    }
}

/// The string Nix signs for a path.
pub fn fingerprint(
    path: &StorePath,
    nar_hash: &NarHash,
    nar_size: u64,
    references: &[StorePath],
) -> String {
    let mut refs: Vec<String> = references.iter().map(|r| r.to_string()).collect();
    crate::order::sort_by(&mut refs, |a, b| a.cmp(b));
    format!("1;{path};{nar_hash};{nar_size};{}", refs.join(","))
}

/// Whether any of `sigs` verifies under any of `keys`.
pub fn any_valid_signature(keys: &[PublicKey], fingerprint: &str, sigs: &[String]) -> bool {
    sigs.iter()
        .any(|sig| keys.iter().any(|key| key.verify(fingerprint, sig)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::testdata;

    #[test]
    fn nix_generated_keys_load_and_match() {
        let secret = SecretKey::parse(testdata::SECRET_KEY).unwrap();
        let public = PublicKey::parse(testdata::PUBLIC_KEY).unwrap();
        assert_eq!(secret.public_key(), public);
        assert_eq!(public.to_string(), testdata::PUBLIC_KEY.trim());
        assert_eq!(secret.name(), "peerix-test-1");
        // cache.nixos.org's key, as peerix trusts it by default.
        PublicKey::parse("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=").unwrap();
    }

    #[test]
    fn signatures_match_nix_store_sign() {
        let secret = SecretKey::parse(testdata::SECRET_KEY).unwrap();
        let public = secret.public_key();
        for signed in testdata::SIGNED_PATHS {
            let path = StorePath::parse(signed.path).unwrap();
            let refs: Vec<StorePath> = signed
                .references
                .iter()
                .map(|r| StorePath::parse(r).unwrap())
                .collect();
            let hash = NarHash::parse(signed.nar_hash).unwrap();
            let fp = fingerprint(&path, &hash, signed.nar_size, &refs);
            // ed25519 is deterministic: ours must equal the one Nix made.
            assert_eq!(secret.sign(&fp), signed.sig, "{}", signed.path);
            assert!(public.verify(&fp, signed.sig));
            assert!(any_valid_signature(
                std::slice::from_ref(&public),
                &fp,
                &[signed.sig.to_string()]
            ));
            // A changed size, or another key's name, does not verify.
            let other = fingerprint(&path, &hash, signed.nar_size + 1, &refs);
            assert!(!public.verify(&other, signed.sig));
            let renamed = signed.sig.replacen("peerix-test-1", "other", 1);
            assert!(!public.verify(&fp, &renamed));
        }
        assert!(
            testdata::SIGNED_PATHS
                .iter()
                .any(|p| !p.references.is_empty())
        );
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            "",
            "nocolon",
            ":AAAA",
            "name:not base64",
            "name:AAAA",
            "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY",
        ] {
            assert!(PublicKey::parse(bad).is_err(), "{bad}");
            assert!(SecretKey::parse(bad).is_err(), "{bad}");
        }
        // A secret key whose public half was tampered with.
        let (name, data) = testdata::SECRET_KEY.trim().split_once(':').unwrap();
        let mut bytes = base64::decode(data).unwrap();
        bytes[63] ^= 1;
        let tampered = format!("{name}:{}", base64::encode(&bytes));
        assert!(SecretKey::parse(&tampered).is_err());
    }

    #[test]
    fn malformed_signatures_do_not_verify() {
        let public = PublicKey::parse(testdata::PUBLIC_KEY).unwrap();
        for bad in [
            "",
            "peerix-test-1",
            "peerix-test-1:",
            "peerix-test-1:AAAA",
            "peerix-test-1:!!",
        ] {
            assert!(!public.verify("1;x", bad), "{bad}");
        }
    }
}
