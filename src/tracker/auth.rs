//! Signed tracker requests: every request that changes state (and, on a
//! private tracker, every lookup) is signed by the node it speaks for.
//!
//! The signature covers the method, the path, a timestamp and the SHA-256
//! of the body:
//!
//! ```text
//! peerix-tracker-v1\n<METHOD>\n<path>\n<unix seconds>\n<sha256 of the body, hex>
//! ```
//!
//! and travels in three headers: [`NODE_HEADER`] (the node id, 64 hex
//! digits), [`TIME_HEADER`] (the unix seconds signed) and
//! [`SIGNATURE_HEADER`] (the ed25519 signature, base64). A timestamp more
//! than [`MAX_SKEW`] off, a signature seen before (within that window) or
//! one that does not verify is refused.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use crate::identity::{Identity, NodeId};
use crate::nix::base64;

pub const NODE_HEADER: &str = "X-Peerix-Node";
pub const TIME_HEADER: &str = "X-Peerix-Time";
pub const SIGNATURE_HEADER: &str = "X-Peerix-Signature";
/// How far a request's timestamp may be from the tracker's clock.
pub const MAX_SKEW: u64 = 300;
/// Signatures remembered at most, for the replay check.
const MAX_REMEMBERED: usize = 100_000;

/// The bytes a request's signature covers.
pub fn signed_message(method: &str, path: &str, timestamp: u64, body: &[u8]) -> Vec<u8> {
    let digest = Sha256::digest(body);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    format!("peerix-tracker-v1\n{method}\n{path}\n{timestamp}\n{hex}").into_bytes()
}

/// The three header values of a signed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    pub node: String,
    pub time: String,
    pub signature: String,
}

/// Signs a request as `identity`.
pub fn sign(identity: &Identity, method: &str, path: &str, timestamp: u64, body: &[u8]) -> Signed {
    let signature = identity.sign(&signed_message(method, path, timestamp, body));
    Signed {
        node: identity.node_id().to_string(),
        time: timestamp.to_string(),
        signature: base64::encode(&signature),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthError {
    /// A header is missing: the original's unsigned client, or a broken one.
    Unsigned(&'static str),
    BadNode(String),
    BadTime,
    Stale {
        skew: u64,
    },
    BadSignature,
    Replayed,
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthError::Unsigned(header) => write!(
                f,
                "unsigned request (no {header} header): this tracker takes only requests signed by \
                 the node they speak for; the original peerix's client does not sign, use peerix-rs"
            ),
            AuthError::BadNode(why) => write!(f, "bad {NODE_HEADER}: {why}"),
            AuthError::BadTime => write!(f, "bad {TIME_HEADER}: not unix seconds"),
            AuthError::Stale { skew } => write!(
                f,
                "timestamp {skew} s off this tracker's clock (at most {MAX_SKEW} s allowed)"
            ),
            AuthError::BadSignature => write!(f, "the signature does not verify"),
            AuthError::Replayed => f.write_str("this signed request was already taken (a replay)"),
        }
    }
}

impl std::error::Error for AuthError {}

/// Checks a request's signature at `now` (unix seconds) and returns the
/// node that signed it. `replays` remembers the signatures taken.
pub fn verify(
    signed: (Option<&str>, Option<&str>, Option<&str>),
    method: &str,
    path: &str,
    body: &[u8],
    now: u64,
    replays: &ReplayGuard,
) -> Result<NodeId, AuthError> {
    let node = signed.0.ok_or(AuthError::Unsigned(NODE_HEADER))?;
    let time = signed.1.ok_or(AuthError::Unsigned(TIME_HEADER))?;
    let signature = signed.2.ok_or(AuthError::Unsigned(SIGNATURE_HEADER))?;
    let node = NodeId::parse(node.trim()).map_err(AuthError::BadNode)?;
    let timestamp: u64 = time.trim().parse().map_err(|_| AuthError::BadTime)?;
    let skew = now.abs_diff(timestamp);
    if skew > MAX_SKEW {
        return Err(AuthError::Stale { skew });
    }
    let signature: [u8; 64] = base64::decode(signature.trim())
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or(AuthError::BadSignature)?;
    if !node.verifies(&signed_message(method, path, timestamp, body), &signature) {
        return Err(AuthError::BadSignature);
    }
    replays.take(signature, timestamp + MAX_SKEW, now)?;
    Ok(node)
}

/// The signatures taken within the skew window: a request is taken once.
#[derive(Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<[u8; 64], u64>>,
}

impl ReplayGuard {
    /// Takes `signature` (valid until `expires`), or refuses it as a replay.
    /// When the memory is full, requests are refused rather than replays
    /// let through.
    fn take(&self, signature: [u8; 64], expires: u64, now: u64) -> Result<(), AuthError> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= MAX_REMEMBERED {
            seen.retain(|_, &mut until| until >= now);
            if seen.len() >= MAX_REMEMBERED {
                return Err(AuthError::Replayed);
            }
        }
        match seen.insert(signature, expires) {
            Some(_) => Err(AuthError::Replayed),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        signed: &Signed,
        method: &str,
        path: &str,
        body: &[u8],
        now: u64,
        guard: &ReplayGuard,
    ) -> Result<NodeId, AuthError> {
        verify(
            (
                Some(&signed.node),
                Some(&signed.time),
                Some(&signed.signature),
            ),
            method,
            path,
            body,
            now,
            guard,
        )
    }

    #[test]
    fn a_signed_request_verifies_once_and_only_as_signed() {
        let me = Identity::for_tests(1);
        let guard = ReplayGuard::default();
        let signed = sign(&me, "POST", "/iroh/announce", 1000, b"{}");
        assert_eq!(
            check(&signed, "POST", "/iroh/announce", b"{}", 1000, &guard),
            Ok(me.node_id())
        );
        assert_eq!(
            check(&signed, "POST", "/iroh/announce", b"{}", 1001, &guard),
            Err(AuthError::Replayed)
        );
        let guard = ReplayGuard::default();
        for (method, path, body) in [
            ("DELETE", "/iroh/announce", &b"{}"[..]),
            ("POST", "/iroh/peer/x", b"{}"),
            ("POST", "/iroh/announce", b"{ }"),
        ] {
            assert_eq!(
                check(&signed, method, path, body, 1000, &guard),
                Err(AuthError::BadSignature),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn stale_forged_and_unsigned_requests_are_refused() {
        let me = Identity::for_tests(2);
        let other = Identity::for_tests(3);
        let guard = ReplayGuard::default();
        let signed = sign(&me, "GET", "/find/x", 1000, b"");
        assert_eq!(
            check(&signed, "GET", "/find/x", b"", 1000 + MAX_SKEW + 1, &guard),
            Err(AuthError::Stale { skew: MAX_SKEW + 1 })
        );
        assert!(check(&signed, "GET", "/find/x", b"", 1000 - MAX_SKEW, &guard).is_ok());
        // Another node's id on my signature.
        let forged = Signed {
            node: other.node_id().to_string(),
            ..sign(&me, "GET", "/find/y", 1000, b"")
        };
        assert_eq!(
            check(&forged, "GET", "/find/y", b"", 1000, &guard),
            Err(AuthError::BadSignature)
        );
        assert_eq!(
            verify((None, None, None), "GET", "/", b"", 0, &guard),
            Err(AuthError::Unsigned(NODE_HEADER))
        );
        let garbage = Signed {
            signature: "!!".into(),
            ..sign(&me, "GET", "/find/z", 1000, b"")
        };
        assert_eq!(
            check(&garbage, "GET", "/find/z", b"", 1000, &guard),
            Err(AuthError::BadSignature)
        );
        let bad_time = Signed {
            time: "soon".into(),
            ..sign(&me, "GET", "/find/z", 1000, b"")
        };
        assert_eq!(
            check(&bad_time, "GET", "/find/z", b"", 1000, &guard),
            Err(AuthError::BadTime)
        );
    }
}
