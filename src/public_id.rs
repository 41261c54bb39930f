//! Opaque public ids: `kind_` + base64url(AES-SIV(kind as associated data, internal id)).
//!
//! Deterministic, so an id is stable; authenticated, so a forged, truncated or re-kinded id is
//! rejected with [`InvalidId`] and never mapped to a record. Internal ids never leave the crate.

use std::fmt;
use std::ops::Deref;

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::InvalidId;
use crate::secret::{MasterKey, context};

/// What a public id names. The kind is both the visible prefix and the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdKind {
    Account,
    Key,
    Token,
    Pool,
}

impl IdKind {
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            IdKind::Account => "acct",
            IdKind::Key => "key",
            IdKind::Token => "tok",
            IdKind::Pool => "pool",
        }
    }

    pub(crate) fn noun(self) -> &'static str {
        match self {
            IdKind::Account => "account",
            IdKind::Key => "key",
            IdKind::Token => "token",
            IdKind::Pool => "pool",
        }
    }
}

/// An opaque, stable, authenticated id such as `key_3q2-…`. Compare and store it as a string.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PublicId(String);

impl PublicId {
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The public id of `sealed` bytes (see [`IdCipher::sealed`]).
    pub(crate) fn from_sealed(kind: IdKind, sealed: &SealedId) -> PublicId {
        let mut text = String::with_capacity(kind.prefix().len() + 1 + 32);
        text.push_str(kind.prefix());
        text.push('_');
        URL_SAFE_NO_PAD.encode_string(sealed, &mut text);
        PublicId(text)
    }

    /// Wraps a string already checked to be a valid public id.
    pub(crate) fn from_checked(id: &str) -> PublicId {
        PublicId(id.to_owned())
    }
}

impl Deref for PublicId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for PublicId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<PublicId> for String {
    fn from(id: PublicId) -> String {
        id.0
    }
}

impl From<&PublicId> for String {
    fn from(id: &PublicId) -> String {
        id.0.clone()
    }
}

impl fmt::Display for PublicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PublicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicId({})", self.0)
    }
}

/// A sealed internal id: what a public id's text encodes.
pub(crate) type SealedId = [u8; 24];

/// Seals internal ids into public ids and opens them again.
pub(crate) struct IdCipher {
    key: Zeroizing<[u8; 64]>,
}

impl IdCipher {
    pub(crate) fn new(master: &MasterKey) -> Self {
        IdCipher {
            key: master.derive_wide(context::PUBLIC_ID),
        }
    }

    fn cipher(&self) -> Aes256Siv {
        Aes256Siv::new_from_slice(&self.key[..]).expect("64-byte AES-256-SIV key")
    }

    /// Seals `id` bound to the associated data `ad`, as unpadded base64url.
    pub(crate) fn seal(&self, ad: &[&[u8]], id: u64) -> String {
        URL_SAFE_NO_PAD.encode(self.seal_bytes(ad, id))
    }

    /// Seals `id` bound to `ad`: the 16-byte synthetic IV, then the 8 encrypted bytes.
    fn seal_bytes(&self, ad: &[&[u8]], id: u64) -> SealedId {
        let sealed = self
            .cipher()
            .encrypt(ad, &id.to_be_bytes())
            .expect("8-byte plaintext");
        sealed.try_into().expect("a 16-byte tag and 8 bytes")
    }

    /// The sealed bytes of a public id, for a cache to keep in 24 bytes instead of a string.
    pub(crate) fn sealed(&self, kind: IdKind, id: u64) -> SealedId {
        self.seal_bytes(&[kind.prefix().as_bytes()], id)
    }

    /// Opens a sealed id; `None` if it was not sealed by this key with this `ad`.
    pub(crate) fn open(&self, ad: &[&[u8]], text: &str) -> Option<u64> {
        if text.len() != 32 {
            return None;
        }
        let sealed = URL_SAFE_NO_PAD.decode(text).ok()?;
        let plain = self.cipher().decrypt(ad, &sealed).ok()?;
        Some(u64::from_be_bytes(plain.as_slice().try_into().ok()?))
    }

    pub(crate) fn encode(&self, kind: IdKind, id: u64) -> PublicId {
        PublicId::from_sealed(kind, &self.sealed(kind, id))
    }

    pub(crate) fn decode(&self, kind: IdKind, text: &str) -> Result<u64, InvalidId> {
        let invalid = InvalidId {
            expected: kind.noun(),
        };
        let body = text
            .strip_prefix(kind.prefix())
            .and_then(|rest| rest.strip_prefix('_'))
            .ok_or(invalid)?;
        self.open(&[kind.prefix().as_bytes()], body).ok_or(invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cipher() -> IdCipher {
        IdCipher::new(&MasterKey::generate().unwrap())
    }

    #[test]
    fn ids_are_stable_opaque_and_kind_bound() {
        let c = cipher();
        let id = c.encode(IdKind::Key, 42);
        assert!(id.starts_with("key_") && !id.contains("42"));
        assert_eq!(id, c.encode(IdKind::Key, 42));
        assert_eq!(c.decode(IdKind::Key, &id), Ok(42));
        // Re-kinded: same body under another prefix.
        let rekinded = id.replacen("key_", "tok_", 1);
        assert_eq!(
            c.decode(IdKind::Token, &rekinded),
            Err(InvalidId { expected: "token" })
        );
        assert!(c.decode(IdKind::Account, &id).is_err());
        // Another master key cannot open it.
        assert!(cipher().decode(IdKind::Key, &id).is_err());
        // Truncated, extended, empty.
        assert!(c.decode(IdKind::Key, &id[..id.len() - 1]).is_err());
        assert!(c.decode(IdKind::Key, &format!("{id}A")).is_err());
        assert!(c.decode(IdKind::Key, "").is_err());
        assert!(c.decode(IdKind::Key, "key_").is_err());
    }

    proptest! {
        #[test]
        fn round_trip(id in any::<u64>()) {
            let c = cipher();
            prop_assert_eq!(c.decode(IdKind::Token, &c.encode(IdKind::Token, id)), Ok(id));
        }

        #[test]
        fn any_bit_flip_is_rejected(id in any::<u64>(), pos in 4usize..36, bit in 0u8..6) {
            let c = cipher();
            let good = c.encode(IdKind::Key, id).to_string();
            let mut bytes = good.into_bytes();
            const ALPHABET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let idx = ALPHABET.iter().position(|&b| b == bytes[pos]).unwrap();
            bytes[pos] = ALPHABET[idx ^ (1 << bit)];
            let forged = String::from_utf8(bytes).unwrap();
            prop_assert!(c.decode(IdKind::Key, &forged).is_err());
        }

        #[test]
        fn garbage_never_panics(s in "\\PC{0,60}") {
            let _ = cipher().decode(IdKind::Account, &s);
        }
    }
}
