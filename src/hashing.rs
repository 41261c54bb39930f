//! Key hashing. A key is stored only as `HMAC-SHA256(pepper_v, key)` (or, configurably, BLAKE3
//! keyed with a pepper of its own); each record is tagged with the [`HashScheme`] that produced
//! its hash, so peppers and schemes rotate without invalidating keys.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::secret::{MasterKey, SubKey, context};

/// A 32-byte key hash.
pub(crate) type KeyHash = [u8; 32];

/// How a stored key hash was computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HashScheme {
    /// `HMAC-SHA256(pepper_v, key)`: the default.
    HmacSha256 {
        /// Pepper version.
        pepper: u32,
    },
    /// BLAKE3 keyed with HMAC-SHA256's pepper of the same version, as format 3 and earlier
    /// wrote it (one key for two algorithms). Read only: a file whose current scheme it was
    /// moves to [`Blake3Keyed`](Self::Blake3Keyed) at open, and its keys are rehashed on
    /// first use, as after any rotation.
    Blake3KeyedLegacy {
        /// Pepper version.
        pepper: u32,
    },
    /// `SHA-256(key)`, as another system stored it, for keys imported from it; rehashed on
    /// first use. The file holds it keyed with the master key (format 8), never plain.
    Sha256Imported,
    /// `BLAKE3-keyed(blake3_pepper_v, key)`: faster, opt-in. Its pepper is derived apart from
    /// HMAC-SHA256's.
    Blake3Keyed {
        /// Pepper version.
        pepper: u32,
    },
}

impl HashScheme {
    /// Stable name for output (`hmac-sha256/v1`, `blake3/v1`, `blake3-legacy/v1`,
    /// `sha256-imported`).
    pub fn label(&self) -> String {
        match self {
            HashScheme::HmacSha256 { pepper } => format!("hmac-sha256/v{pepper}"),
            HashScheme::Blake3Keyed { pepper } => format!("blake3/v{pepper}"),
            HashScheme::Blake3KeyedLegacy { pepper } => format!("blake3-legacy/v{pepper}"),
            HashScheme::Sha256Imported => "sha256-imported".into(),
        }
    }

    /// Whether new keys may be hashed with it (the others are only read, then rehashed).
    pub fn can_be_current(&self) -> bool {
        matches!(
            self,
            HashScheme::HmacSha256 { .. } | HashScheme::Blake3Keyed { .. }
        )
    }
}

/// Computes key hashes. The current scheme's keyed state is precomputed once.
pub(crate) struct KeyHasher {
    master: MasterKey,
    current: HashScheme,
    hmac_state: Hmac<Sha256>,
    blake3_key: SubKey,
    import_key: SubKey,
}

impl KeyHasher {
    pub(crate) fn new(master: &MasterKey, current: HashScheme) -> Self {
        let pepper = match current {
            HashScheme::HmacSha256 { pepper }
            | HashScheme::Blake3Keyed { pepper }
            | HashScheme::Blake3KeyedLegacy { pepper } => pepper,
            HashScheme::Sha256Imported => 1,
        };
        let hmac_key = pepper_key(master, pepper);
        let blake3_key = match current {
            HashScheme::Blake3Keyed { pepper } => blake3_pepper_key(master, pepper),
            _ => hmac_key.clone(),
        };
        KeyHasher {
            master: master.clone(),
            current,
            hmac_state: Hmac::<Sha256>::new_from_slice(&hmac_key.0)
                .expect("HMAC takes any key size"),
            blake3_key,
            import_key: import_key(master),
        }
    }

    /// The scheme new keys are hashed with.
    pub(crate) fn current(&self) -> HashScheme {
        self.current
    }

    /// Hashes `key` under the current scheme (the hot path: no key derivation).
    pub(crate) fn hash_current(&self, key: &str) -> KeyHash {
        match self.current {
            HashScheme::HmacSha256 { .. } => {
                let mut mac = self.hmac_state.clone();
                mac.update(key.as_bytes());
                mac.finalize().into_bytes().into()
            }
            HashScheme::Blake3Keyed { .. } | HashScheme::Blake3KeyedLegacy { .. } => {
                blake3::keyed_hash(&self.blake3_key.0, key.as_bytes()).into()
            }
            HashScheme::Sha256Imported => self.imported(&sha256(key)),
        }
    }

    /// What the file stores for a key imported by its SHA-256 `digest`: the digest keyed
    /// with the master key, so that no plain digest is ever written (found by a reviewer:
    /// one stayed in the file's freed pages after the key's first use rehashed it).
    pub(crate) fn imported(&self, digest: &KeyHash) -> KeyHash {
        imported_sha256(&self.import_key, digest)
    }

    /// Hashes `key` under any scheme (the slow path for rotation and imports).
    pub(crate) fn hash(&self, scheme: HashScheme, key: &str) -> KeyHash {
        if scheme == self.current {
            return self.hash_current(key);
        }
        match scheme {
            HashScheme::HmacSha256 { pepper } => {
                let mut mac = Hmac::<Sha256>::new_from_slice(&pepper_key(&self.master, pepper).0)
                    .expect("HMAC takes any key size");
                mac.update(key.as_bytes());
                mac.finalize().into_bytes().into()
            }
            HashScheme::Blake3Keyed { pepper } => {
                let pepper = blake3_pepper_key(&self.master, pepper);
                blake3::keyed_hash(&pepper.0, key.as_bytes()).into()
            }
            HashScheme::Blake3KeyedLegacy { pepper } => {
                blake3::keyed_hash(&pepper_key(&self.master, pepper).0, key.as_bytes()).into()
            }
            HashScheme::Sha256Imported => self.imported(&sha256(key)),
        }
    }
}

/// The key [`KeyHasher::imported`] keys digests with.
pub(crate) fn import_key(master: &MasterKey) -> SubKey {
    master.derive(context::IMPORTED_SHA256)
}

/// Plain `SHA-256(key)`, finished straight into a buffer wiped on drop: the digest of a key
/// is all a look-up by it needs, so it is kept no longer than the keyed hash takes.
fn sha256(key: &str) -> Zeroizing<KeyHash> {
    let mut digest = Zeroizing::new([0u8; 32]);
    let mut hasher = Sha256::new();
    hasher.update(key.as_bytes());
    hasher.finalize_into((&mut *digest).into());
    digest
}

/// `digest` keyed with `key` (see [`KeyHasher::imported`]).
pub(crate) fn imported_sha256(key: &SubKey, digest: &KeyHash) -> KeyHash {
    blake3::keyed_hash(&key.0, digest).into()
}

/// HMAC-SHA256's key of pepper `version`.
fn pepper_key(master: &MasterKey, version: u32) -> SubKey {
    master.derive(&format!("{}{version}", context::PEPPER))
}

/// BLAKE3's key of pepper `version`.
fn blake3_pepper_key(master: &MasterKey, version: u32) -> SubKey {
    master.derive(&format!("{}{version}", context::BLAKE3_PEPPER))
}

/// Constant-time equality of two hashes.
pub(crate) fn hashes_equal(a: &KeyHash, b: &KeyHash) -> bool {
    a.ct_eq(b).into()
}

/// Constant-time equality of two byte strings (false if lengths differ).
pub(crate) fn hashes_equal_slices(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_and_peppers_give_distinct_hashes() {
        let master = MasterKey::generate().unwrap();
        let h = KeyHasher::new(&master, HashScheme::HmacSha256 { pepper: 2 });
        let key = "vb_live_example";
        let v2 = h.hash_current(key);
        assert_eq!(v2, h.hash(HashScheme::HmacSha256 { pepper: 2 }, key));
        assert_ne!(v2, h.hash(HashScheme::HmacSha256 { pepper: 1 }, key));
        assert_ne!(v2, h.hash(HashScheme::Blake3Keyed { pepper: 2 }, key));
        assert_ne!(
            h.hash(HashScheme::Blake3Keyed { pepper: 2 }, key),
            h.hash(HashScheme::Blake3KeyedLegacy { pepper: 2 }, key)
        );
        let plain: KeyHash = Sha256::digest(key.as_bytes()).into();
        let imported = h.hash(HashScheme::Sha256Imported, key);
        assert_ne!(imported, plain, "never stored plain");
        assert_eq!(
            imported,
            h.imported(&plain),
            "the digest an import gives, keyed"
        );
        let other = KeyHasher::new(&MasterKey::generate().unwrap(), h.current());
        assert_ne!(
            other.hash(HashScheme::Sha256Imported, key),
            imported,
            "by master key"
        );
        assert!(hashes_equal(&v2, &v2) && !hashes_equal(&v2, &plain));
    }

    /// BLAKE3 and HMAC-SHA256 never share a key: the BLAKE3 scheme's key is derived apart,
    /// and the legacy scheme (which shared it) still hashes as format 3 did.
    #[test]
    fn blake3_is_keyed_apart_from_hmac_and_the_legacy_scheme_as_before() {
        let master = MasterKey::generate().unwrap();
        for current in [
            HashScheme::Blake3Keyed { pepper: 2 },
            HashScheme::HmacSha256 { pepper: 2 },
        ] {
            let h = KeyHasher::new(&master, current);
            let shared = blake3::keyed_hash(&pepper_key(&master, 2).0, b"k");
            let apart = blake3::keyed_hash(&blake3_pepper_key(&master, 2).0, b"k");
            assert_ne!(pepper_key(&master, 2).0, blake3_pepper_key(&master, 2).0);
            let legacy = HashScheme::Blake3KeyedLegacy { pepper: 2 };
            assert_eq!(h.hash(legacy, "k"), *shared.as_bytes());
            let blake3 = HashScheme::Blake3Keyed { pepper: 2 };
            assert_eq!(h.hash(blake3, "k"), *apart.as_bytes());
        }
        let h = KeyHasher::new(&master, HashScheme::Blake3Keyed { pepper: 2 });
        let apart = blake3::keyed_hash(&blake3_pepper_key(&master, 2).0, b"k");
        assert_eq!(h.hash_current("k"), *apart.as_bytes(), "the hot path too");
    }

    #[test]
    fn hmac_matches_the_standard_construction() {
        let master = MasterKey::generate().unwrap();
        let h = KeyHasher::new(&master, HashScheme::HmacSha256 { pepper: 1 });
        let mut mac = Hmac::<Sha256>::new_from_slice(&pepper_key(&master, 1).0).unwrap();
        mac.update(b"k");
        let expected: KeyHash = mac.finalize().into_bytes().into();
        assert_eq!(h.hash_current("k"), expected);
    }
}
