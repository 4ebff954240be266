//! The `.narinfo` format: parse strictly, render canonically.
//!
//! Every line is `Key: value\n`. StorePath, URL, NarHash and NarSize (> 0)
//! are required; References and Deriver carry base names; Sig may repeat.
//! Unknown keys are skipped, as Nix skips them; a repeated single-valued key
//! is an error, where Nix would silently keep the last one.

use std::fmt;

use super::hash::NarHash;
use super::keys;
use super::store_path::{HashPart, StorePath};

/// No narinfo Nix writes comes near this; a larger one is refused unread.
pub const MAX_NARINFO_LEN: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    pub url: String,
    pub compression: String,
    pub file_hash: Option<String>,
    pub file_size: Option<u64>,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NarInfoError(String);

impl fmt::Display for NarInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid narinfo: {}", self.0)
    }
}

impl std::error::Error for NarInfoError {}

fn bad<T>(message: impl Into<String>) -> Result<T, NarInfoError> {
    Err(NarInfoError(message.into()))
}

fn set<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), NarInfoError> {
    if slot.replace(value).is_some() {
        return bad(format!("`{key}` appears twice"));
    }
    Ok(())
}

/// Whether `value` may be a narinfo value: printable ASCII. Nothing a
/// narinfo carries needs more, and it keeps control characters (and line
/// breaks) out of logs and re-rendered text.
pub fn is_printable_value(value: &str) -> bool {
    value.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn check_value<'a>(key: &str, value: &'a str) -> Result<&'a str, NarInfoError> {
    if is_printable_value(value) {
        Ok(value)
    } else {
        bad(format!("`{key}` has a non-printable character"))
    }
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<NarInfo, NarInfoError> {
        if text.len() > MAX_NARINFO_LEN {
            return bad(format!("longer than {MAX_NARINFO_LEN} bytes"));
        }
        let Some(body) = text.strip_suffix('\n') else {
            return bad("does not end with a newline");
        };
        let (mut store_path, mut url, mut compression) = (None, None, None);
        let (mut file_hash, mut file_size, mut nar_hash, mut nar_size) = (None, None, None, None);
        let (mut references, mut deriver, mut ca) = (None, None, None);
        let mut sigs = Vec::new();
        for (n, line) in body.split('\n').enumerate() {
            let Some((key, value)) = line.split_once(": ").or_else(|| {
                // An empty References list may be written as `References:` with no space.
                line.strip_suffix(':').map(|key| (key, ""))
            }) else {
                return bad(format!("line {} is not `Key: value`", n + 1));
            };
            let value = check_value(key, value)?;
            match key {
                "StorePath" => set(&mut store_path, key, parse_path(key, value)?)?,
                "URL" => set(&mut url, key, value.to_string())?,
                "Compression" => set(&mut compression, key, value.to_string())?,
                "FileHash" => set(&mut file_hash, key, value.to_string())?,
                "FileSize" => set(&mut file_size, key, parse_number(key, value)?)?,
                "NarHash" => set(
                    &mut nar_hash,
                    key,
                    NarHash::parse(value).map_err(|e| NarInfoError(format!("NarHash: {e}")))?,
                )?,
                "NarSize" => set(&mut nar_size, key, parse_number(key, value)?)?,
                "References" => set(
                    &mut references,
                    key,
                    value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(|r| {
                            StorePath::from_base_name(r)
                                .map_err(|e| NarInfoError(format!("References: {e}")))
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                )?,
                "Deriver" => {
                    // Nix writes no Deriver line for an unknown deriver, but reads this marker.
                    let parsed = match value {
                        "unknown-deriver" => None,
                        _ => Some(
                            StorePath::from_base_name(value)
                                .map_err(|e| NarInfoError(format!("Deriver: {e}")))?,
                        ),
                    };
                    set(&mut deriver, key, parsed)?
                }
                "Sig" => sigs.push(value.to_string()),
                "CA" => set(&mut ca, key, value.to_string())?,
                _ => {}
            }
        }
        let Some(nar_size) = nar_size else {
            return bad("NarSize is missing");
        };
        if nar_size == 0 {
            return bad("NarSize is 0");
        }
        Ok(NarInfo {
            store_path: store_path.ok_or_else(|| NarInfoError("StorePath is missing".into()))?,
            url: url.ok_or_else(|| NarInfoError("URL is missing".into()))?,
            // Nix reads a missing Compression as bzip2.
            compression: compression.unwrap_or_else(|| "bzip2".to_string()),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or_else(|| NarInfoError("NarHash is missing".into()))?,
            nar_size,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            sigs,
            ca,
        })
    }

    /// Renders in the order Nix writes, always with `Compression:` and `References:`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(512);
        let _ = writeln!(out, "StorePath: {}", self.store_path);
        let _ = writeln!(out, "URL: {}", self.url);
        let _ = writeln!(out, "Compression: {}", self.compression);
        if let Some(file_hash) = &self.file_hash {
            let _ = writeln!(out, "FileHash: {file_hash}");
        }
        if let Some(file_size) = self.file_size {
            let _ = writeln!(out, "FileSize: {file_size}");
        }
        let _ = writeln!(out, "NarHash: {}", self.nar_hash);
        let _ = writeln!(out, "NarSize: {}", self.nar_size);
        let refs: Vec<&str> = self.references.iter().map(|r| r.base_name()).collect();
        let _ = writeln!(out, "References: {}", refs.join(" "));
        if let Some(deriver) = &self.deriver {
            let _ = writeln!(out, "Deriver: {}", deriver.base_name());
        }
        for sig in &self.sigs {
            let _ = writeln!(out, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(out, "CA: {ca}");
        }
        out
    }

    /// The string the `Sig:` lines sign.
    pub fn fingerprint(&self) -> String {
        keys::fingerprint(
            &self.store_path,
            &self.nar_hash,
            self.nar_size,
            &self.references,
        )
    }
}

fn parse_path(key: &str, value: &str) -> Result<StorePath, NarInfoError> {
    StorePath::parse(value).map_err(|e| NarInfoError(format!("{key}: {e}")))
}

fn parse_number(key: &str, value: &str) -> Result<u64, NarInfoError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return bad(format!("{key} `{value}` is not a number"));
    }
    value
        .parse()
        .map_err(|_| NarInfoError(format!("{key} `{value}` is out of range")))
}

/// The NAR file name this daemon hands out: `<hash part>-<NarHash nix32>.nar`.
pub fn nar_file_name(hash: &HashPart, nar_hash: &NarHash) -> String {
    format!("{}-{}.nar", hash.as_str(), nar_hash.to_nix32())
}

/// Reads [`nar_file_name`]'s form back, strictly.
pub fn parse_nar_file_name(file: &str) -> Option<(HashPart, NarHash)> {
    let stem = file.strip_suffix(".nar")?;
    let (hash, nar_hash) = stem.split_once('-')?;
    // Only the nix32 form is ever handed out; `parse` would also take hex.
    if nar_hash.len() != 52 {
        return None;
    }
    let hash = HashPart::parse(hash).ok()?;
    let nar_hash = NarHash::parse(&format!("sha256:{nar_hash}")).ok()?;
    Some((hash, nar_hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::keys::PublicKey;
    use crate::nix::testdata;

    #[test]
    fn nix_written_narinfos_round_trip_byte_for_byte() {
        for (name, text) in testdata::NARINFOS {
            let info = NarInfo::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(info.render(), *text, "{name}");
            assert_eq!(info.compression, "none");
        }
    }

    #[test]
    fn signatures_in_nix_written_narinfos_verify() {
        let key = PublicKey::parse(testdata::PUBLIC_KEY).unwrap();
        for (name, text) in testdata::NARINFOS {
            let info = NarInfo::parse(text).unwrap();
            assert!(
                keys::any_valid_signature(
                    std::slice::from_ref(&key),
                    &info.fingerprint(),
                    &info.sigs
                ),
                "{name}"
            );
        }
        let with_refs = NarInfo::parse(testdata::NARINFOS[0].1).unwrap();
        assert_eq!(with_refs.references.len(), 1);
    }

    fn minimal() -> String {
        "StorePath: /nix/store/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-x\nURL: nar/a.nar\n\
         NarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 5\n"
            .to_string()
    }

    #[test]
    fn defaults_and_empty_references() {
        let info = NarInfo::parse(&minimal()).unwrap();
        assert_eq!(info.compression, "bzip2");
        assert!(info.references.is_empty());
        let with_marker =
            minimal() + "Deriver: unknown-deriver\nReferences:\nX-Unknown: kept out\n";
        let info = NarInfo::parse(&with_marker).unwrap();
        assert_eq!(info.deriver, None);
        assert!(!info.render().contains("X-Unknown"));
    }

    #[test]
    fn malformed_narinfos_are_refused() {
        let m = minimal();
        let cases = [
            m.replace("NarSize: 5\n", ""),
            m.replace("NarSize: 5", "NarSize: 0"),
            m.replace("NarSize: 5", "NarSize: -5"),
            m.replace("NarSize: 5", "NarSize: 99999999999999999999999"),
            m.replace("URL: nar/a.nar\n", ""),
            m.replace("StorePath: /nix/store/", "StorePath: /tmp/"),
            m.replace("sha256:1b8m", "sha256:eb8m"),
            m.trim_end().to_string(),
            m.clone() + "NarSize: 5\n",
            m.clone() + "References: ../../etc\n",
            m.clone() + "Deriver: /nix/store/0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-x.drv\n",
            m.clone() + "garbage line\n",
            m.clone() + "Sig: a\u{7}b\n",
            m.clone() + "\n",
            "x".repeat(MAX_NARINFO_LEN + 1),
        ];
        for (n, case) in cases.iter().enumerate() {
            assert!(
                NarInfo::parse(case).is_err(),
                "case {n} must be refused:\n{case}"
            );
        }
    }
}
