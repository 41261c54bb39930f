//! Key hashing. A key is stored only as `HMAC-SHA256(pepper_v, key)` (or, configurably, BLAKE3
//! keyed with the same pepper); each record is tagged with the [`HashScheme`] that produced its
//! hash, so peppers and schemes rotate without invalidating keys.

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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
    /// `BLAKE3-keyed(pepper_v, key)`: faster, opt-in.
    Blake3Keyed {
        /// Pepper version.
        pepper: u32,
    },
    /// Plain `SHA-256(key)`: only for keys imported from another system, rehashed on first use.
    Sha256Imported,
}

impl HashScheme {
    /// Stable name for output (`hmac-sha256/v1`, `blake3/v1`, `sha256-imported`).
    pub fn label(&self) -> String {
        match self {
            HashScheme::HmacSha256 { pepper } => format!("hmac-sha256/v{pepper}"),
            HashScheme::Blake3Keyed { pepper } => format!("blake3/v{pepper}"),
            HashScheme::Sha256Imported => "sha256-imported".into(),
        }
    }
}

/// Computes key hashes. The current scheme's keyed state is precomputed once.
pub(crate) struct KeyHasher {
    master: MasterKey,
    current: HashScheme,
    hmac_state: Hmac<Sha256>,
    blake3_key: SubKey,
}

impl KeyHasher {
    pub(crate) fn new(master: &MasterKey, current: HashScheme) -> Self {
        let pepper = match current {
            HashScheme::HmacSha256 { pepper } | HashScheme::Blake3Keyed { pepper } => pepper,
            HashScheme::Sha256Imported => 1,
        };
        let key = pepper_key(master, pepper);
        KeyHasher {
            master: master.clone(),
            current,
            hmac_state: Hmac::<Sha256>::new_from_slice(&key.0).expect("HMAC takes any key size"),
            blake3_key: key,
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
            HashScheme::Blake3Keyed { .. } => {
                blake3::keyed_hash(&self.blake3_key.0, key.as_bytes()).into()
            }
            HashScheme::Sha256Imported => Sha256::digest(key.as_bytes()).into(),
        }
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
                blake3::keyed_hash(&pepper_key(&self.master, pepper).0, key.as_bytes()).into()
            }
            HashScheme::Sha256Imported => Sha256::digest(key.as_bytes()).into(),
        }
    }
}

fn pepper_key(master: &MasterKey, version: u32) -> SubKey {
    master.derive(&format!("{}{version}", context::PEPPER))
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
        let plain: KeyHash = Sha256::digest(key.as_bytes()).into();
        assert_eq!(h.hash(HashScheme::Sha256Imported, key), plain);
        assert!(hashes_equal(&v2, &v2) && !hashes_equal(&v2, &plain));
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
