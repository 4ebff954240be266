//! The share policy: which of this host's paths may leave the host.
//!
//! It is applied wherever a path is given to anyone other than this host's own
//! nix: narinfos and NARs under `/local`, and (later) LAN replies and tracker
//! announcements. It is a function of a path's metadata (and, in the
//! `nixpkgs` mode, of upstream's remembered answers), so the scanner and the
//! request handlers always agree.

use std::sync::Arc;

use crate::nix::keys::{PublicKey, any_valid_signature};
use crate::nix::store_path::StorePath;

use super::LocalPathInfo;
use super::upstream::Upstream;

/// Which of this host's paths may be given to anyone other than its own nix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterMode {
    /// Share a path only if a trusted upstream key signed it.
    Signed,
    /// Share everything except names matching the deny-list.
    Rules,
    /// Share everything.
    None,
    /// Share a path only if the upstream cache has it (with our NarHash).
    Nixpkgs,
}

impl std::str::FromStr for FilterMode {
    type Err = String;

    fn from_str(value: &str) -> Result<FilterMode, String> {
        match value {
            "signed" => Ok(FilterMode::Signed),
            "rules" => Ok(FilterMode::Rules),
            "none" => Ok(FilterMode::None),
            "nixpkgs" => Ok(FilterMode::Nixpkgs),
            other => Err(format!(
                "unknown filter mode `{other}` (expected signed, nixpkgs, rules or none)"
            )),
        }
    }
}

/// The deny-list of the `rules` mode, matched against the path's base name
/// (`<hash>-<name>`): system closures, secrets and home-manager generations.
pub const DEFAULT_DENY_PATTERNS: &[&str] = &[
    "*-nixos-system-*",
    "*-etc-*",
    "*-nixos-*-config",
    "*-unit-*.service",
    "*-system-path",
    "*-booted-system",
    "*-toplevel",
    "*-activation-script-*",
    "*-systemd-*",
    "*-sops-nix-*",
    "*-agenix-*",
    "*-secret-*",
    "*-secrets-*",
    "*-password-*",
    "*-private-key-*",
    "*-credentials-*",
    "*.key",
    "*.pem",
    "*-home-manager-*",
    "*-home-files-*",
];

#[derive(Clone, Debug)]
pub enum SharePolicy {
    /// Share a path only if one of its store signatures verifies under one of these keys.
    Signed(Vec<PublicKey>),
    /// Share every path whose base name matches none of these globs.
    Rules(Vec<String>),
    /// Share everything.
    All,
    /// Share a path only if the upstream cache answered that it has it
    /// (with this host's NarHash, unless verification is off).
    Nixpkgs(Arc<Upstream>),
}

impl SharePolicy {
    /// The policy of `mode`; the `nixpkgs` mode needs its upstream.
    pub fn new(
        mode: FilterMode,
        trusted_keys: Vec<PublicKey>,
        extra_patterns: &[String],
        upstream: Option<Arc<Upstream>>,
    ) -> Self {
        match mode {
            FilterMode::Nixpkgs => match upstream {
                Some(upstream) => SharePolicy::Nixpkgs(upstream),
                // Nothing to ask: nothing is shared (closed, not open).
                None => SharePolicy::Signed(Vec::new()),
            },
            FilterMode::Signed => SharePolicy::Signed(trusted_keys),
            FilterMode::Rules => SharePolicy::Rules(
                DEFAULT_DENY_PATTERNS
                    .iter()
                    .map(|p| p.to_string())
                    .chain(extra_patterns.iter().cloned())
                    .collect(),
            ),
            FilterMode::None => SharePolicy::All,
        }
    }

    /// Decides by name alone; `None` when the signatures are needed.
    pub fn allows_name(&self, path: &StorePath) -> Option<bool> {
        match self {
            SharePolicy::Signed(_) | SharePolicy::Nixpkgs(_) => None,
            SharePolicy::Rules(patterns) => {
                let base = path.base_name();
                Some(
                    !patterns
                        .iter()
                        .any(|p| glob_matches(p.as_bytes(), base.as_bytes())),
                )
            }
            SharePolicy::All => Some(true),
        }
    }

    /// Whether the path may be shared now; a decision still pending is no.
    pub fn allows(&self, info: &LocalPathInfo) -> bool {
        self.decide(info) == Some(true)
    }

    /// The decision from metadata and what is known; `None` while the
    /// upstream cache has not been asked (or its answer expired).
    pub fn decide(&self, info: &LocalPathInfo) -> Option<bool> {
        match self {
            SharePolicy::Signed(keys) => {
                Some(any_valid_signature(keys, &info.fingerprint(), &info.sigs))
            }
            SharePolicy::Nixpkgs(upstream) => {
                upstream.decide(&info.path.hash_part(), &info.nar_hash)
            }
            _ => Some(self.allows_name(&info.path).unwrap_or(false)),
        }
    }

    /// The upstream cache to ask, in the `nixpkgs` mode.
    pub fn upstream(&self) -> Option<&Arc<Upstream>> {
        match self {
            SharePolicy::Nixpkgs(upstream) => Some(upstream),
            _ => None,
        }
    }
}

/// Shell-style glob with `*` (any run of bytes) and `?` (one byte).
///
/// Iterative with one backtrack point, so no pattern can make it exponential.
pub fn glob_matches(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(base: &str) -> StorePath {
        StorePath::parse(&format!("/nix/store/{base}")).unwrap()
    }

    #[test]
    fn glob() {
        assert!(glob_matches(b"*-etc-*", b"abc-etc-x"));
        assert!(glob_matches(b"*.key", b"h-my.key"));
        assert!(!glob_matches(b"*.key", b"h-my.keys"));
        assert!(glob_matches(b"a?c", b"abc"));
        assert!(!glob_matches(b"a?c", b"ac"));
        assert!(glob_matches(b"*", b""));
        assert!(glob_matches(b"**x**", b"aaxaa"));
        assert!(!glob_matches(b"", b"a"));
        assert!(glob_matches(b"*-nixos-*-config", b"h-nixos-23.11-config"));
        // Pathological pattern stays linear-ish rather than exponential.
        let text = vec![b'a'; 5000];
        assert!(!glob_matches(b"*a*a*a*a*a*a*a*b", &text));
    }

    #[test]
    fn rules_mode_denies_secrets_and_system_paths() {
        let policy = SharePolicy::new(FilterMode::Rules, vec![], &["*-mine".to_string()], None);
        let h = "0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d";
        for denied in [
            "nixos-system-host-24.05",
            "etc-hosts",
            "unit-sshd.service",
            "agenix-secrets",
            "host.key",
            "tls.pem",
            "home-manager-generation",
            "stuff-mine",
        ] {
            let p = path(&format!("{h}-{denied}"));
            assert_eq!(
                policy.allows_name(&p),
                Some(false),
                "{denied} must be denied"
            );
        }
        for allowed in ["hello-2.12", "bash-5.2-p15", "python3-3.11.7"] {
            let p = path(&format!("{h}-{allowed}"));
            assert_eq!(
                policy.allows_name(&p),
                Some(true),
                "{allowed} must be shared"
            );
        }
    }

    #[test]
    fn all_and_signed_modes() {
        let p = path("0c4kzwq7qxdkaz2zd6ibpcrl5dl8bm1d-hello");
        assert_eq!(SharePolicy::All.allows_name(&p), Some(true));
        assert_eq!(SharePolicy::Signed(vec![]).allows_name(&p), None);
    }
}
