//! This node's identity: an ed25519 key pair whose public half is the node
//! id, kept as 32 raw bytes at `<state-dir>/iroh_secret.key`, mode 0600.
//!
//! That is the original peerix's file name and format, so a host that moves
//! from the original keeps its identity; Iroh will use the same key. The
//! key is made once, never logged and never served. A key file that others
//! may read gets a warning; one that cannot be read, or is not 32 bytes, is
//! a clear error (a new identity is never made over an old one).

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// The key file's name in the state directory.
pub const KEY_FILE: &str = "iroh_secret.key";

/// A node id: the 32-byte ed25519 public key, written as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

impl NodeId {
    /// Reads 64 lowercase hex digits, strictly.
    pub fn parse(text: &str) -> Result<NodeId, String> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return Err(format!("node id of {} characters, not 64", bytes.len()));
        }
        let mut id = [0u8; 32];
        for (i, pair) in bytes.chunks(2).enumerate() {
            let digit = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'a'..=b'f' => Some(c - b'a' + 10),
                _ => None,
            };
            match (digit(pair[0]), digit(pair[1])) {
                (Some(high), Some(low)) => id[i] = high << 4 | low,
                _ => return Err("node id is not lowercase hex".into()),
            }
        }
        // Only a point on the curve is an id anyone could sign for.
        VerifyingKey::from_bytes(&id).map_err(|_| "node id is not an ed25519 public key")?;
        Ok(NodeId(id))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `signature` over `message` was made by this node.
    pub fn verifies(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        VerifyingKey::from_bytes(&self.0).is_ok_and(|key| {
            key.verify(message, &Signature::from_bytes(signature))
                .is_ok()
        })
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// This node's key pair. Its `Debug` shows the node id only.
pub struct Identity {
    key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.node_id())
    }
}

impl Identity {
    /// A fixed identity for tests: the key of 32 bytes `n`, loaded through
    /// a key file as a real one is.
    #[cfg(test)]
    pub(crate) fn for_tests(n: u8) -> Identity {
        let dir = std::env::temp_dir().join(format!("peerix-identity-{n}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(KEY_FILE), [n; 32]).unwrap();
        let identity = Identity::load_or_create(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        identity
    }

    /// The identity kept in `state_dir`, made there (and the directory
    /// with it) if there is none yet.
    pub fn load_or_create(state_dir: &Path) -> Result<Identity, String> {
        let path = state_dir.join(KEY_FILE);
        match fs::symlink_metadata(&path) {
            Ok(_) => Identity::load(&path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Identity::create(state_dir, &path),
            Err(e) => Err(format!("node key {}: {e}", path.display())),
        }
    }

    fn load(path: &Path) -> Result<Identity, String> {
        let what = || format!("node key {}", path.display());
        let mut file = fs::File::open(path).map_err(|e| format!("{}: cannot read: {e}", what()))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("{}: cannot read: {e}", what()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            log::warn!(
                "{} can be read by others (mode {:o}); it should be 0600",
                what(),
                meta.permissions().mode() & 0o777
            );
        }
        let mut bytes = Vec::with_capacity(33);
        Read::by_ref(&mut file)
            .take(33)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{}: cannot read: {e}", what()))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|b: Vec<u8>| format!("{}: {} bytes, not 32", what(), b.len()))?;
        Ok(Identity {
            key: SigningKey::from_bytes(&secret),
        })
    }

    fn create(state_dir: &Path, path: &PathBuf) -> Result<Identity, String> {
        fs::create_dir_all(state_dir)
            .map_err(|e| format!("state directory {}: {e}", state_dir.display()))?;
        let mut secret = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut random| random.read_exact(&mut secret))
            .map_err(|e| format!("cannot read /dev/urandom for a node key: {e}"))?;
        // create_new: never overwrite a key another process just made.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("node key {}: cannot create: {e}", path.display()))?;
        file.write_all(&secret)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("node key {}: cannot write: {e}", path.display()))?;
        let identity = Identity {
            key: SigningKey::from_bytes(&secret),
        };
        log::info!("made a node key: node id {}", identity.node_id());
        Ok(identity)
    }

    pub fn node_id(&self) -> NodeId {
        NodeId(self.key.verifying_key().to_bytes())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("peerix-identity-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_key_is_made_once_private_and_kept() {
        let dir = temp_dir("once");
        let first = Identity::load_or_create(&dir).unwrap();
        let path = dir.join(KEY_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&path).unwrap().len(), 32);
        let again = Identity::load_or_create(&dir).unwrap();
        assert_eq!(first.node_id(), again.node_id());
        let signature = first.sign(b"hello");
        assert!(again.node_id().verifies(b"hello", &signature));
        assert!(!again.node_id().verifies(b"hellO", &signature));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_original_key_file_is_taken_as_it_is() {
        let dir = temp_dir("original");
        fs::create_dir_all(&dir).unwrap();
        // 32 raw bytes, as the original writes them.
        fs::write(dir.join(KEY_FILE), [7u8; 32]).unwrap();
        let identity = Identity::load_or_create(&dir).unwrap();
        assert_eq!(
            identity.node_id(),
            NodeId(
                SigningKey::from_bytes(&[7u8; 32])
                    .verifying_key()
                    .to_bytes()
            )
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_key_is_an_error_and_is_not_replaced() {
        let dir = temp_dir("damaged");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(KEY_FILE), [1u8; 31]).unwrap();
        let e = Identity::load_or_create(&dir).unwrap_err();
        assert!(e.contains("31 bytes, not 32"), "{e}");
        assert_eq!(
            fs::read(dir.join(KEY_FILE)).unwrap().len(),
            31,
            "left alone"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn node_ids_parse_strictly_and_round_trip() {
        let id = NodeId(
            SigningKey::from_bytes(&[3u8; 32])
                .verifying_key()
                .to_bytes(),
        );
        assert_eq!(NodeId::parse(&id.to_string()), Ok(id));
        for bad in [
            "",
            "00",
            &id.to_string().to_uppercase(),
            &format!("{}0", id),
            &"g".repeat(64),
        ] {
            assert!(NodeId::parse(bad).is_err(), "{bad}");
        }
        // Debug never shows the secret.
        let identity = Identity {
            key: SigningKey::from_bytes(&[3u8; 32]),
        };
        assert_eq!(format!("{identity:?}"), format!("Identity({id})"));
    }
}
