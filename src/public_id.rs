//! Opaque public ids: `kind_` + base64url(AES-SIV(kind as associated data, internal id)).
//!
//! Deterministic, so an id is stable; authenticated, so a forged, truncated or re-kinded id is
//! rejected with [`InvalidId`] and never mapped to a record. Internal ids never leave the crate.
//! The key is the master key's, salted per file (files created at format 6 or later): an id
//! of another ledger sharing the master key is rejected too. (A file migrated from an older
//! format has no salt, so that the ids it gave out stay valid; two such files with one master
//! key still share ids.)

use std::fmt;
use std::ops::Deref;

use aes::Aes256;
use aes::cipher::BlockCipherEncrypt;
use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use arrayvec::ArrayString;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cmac::{Cmac, Mac};
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

/// What follows a public id's kind and `_`: 24 sealed bytes in base64url.
const ID_BODY_LEN: usize = 32;

/// The longest public id: `acct_` or `pool_`, then 32 characters of base64url.
const MAX_ID_LEN: usize = 5 + ID_BODY_LEN;

/// An opaque, stable, authenticated id such as `key_3q2-…`. Compare and store it as a string.
/// It is held inline (`Copy`, no allocation); it compares, orders and hashes as its text.
/// One deserialized (from a stored reply, say) is only checked for length: every call that
/// takes an id authenticates it, so a forged one is [`Error::InvalidId`](crate::Error::InvalidId)
/// there.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PublicId(ArrayString<MAX_ID_LEN>);

impl PublicId {
    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The public id of `sealed` bytes (see [`IdCipher::sealed`]).
    pub(crate) fn from_sealed(kind: IdKind, sealed: &SealedId) -> PublicId {
        let mut body = [0u8; 32];
        let written = URL_SAFE_NO_PAD
            .encode_slice(sealed, &mut body)
            .expect("24 bytes are 32 characters of base64");
        let mut text = ArrayString::new();
        text.push_str(kind.prefix());
        text.push('_');
        text.push_str(std::str::from_utf8(&body[..written]).expect("base64url is ASCII"));
        PublicId(text)
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
        id.0.to_string()
    }
}

impl From<&PublicId> for String {
    fn from(id: &PublicId) -> String {
        id.0.to_string()
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
    /// One per [`IdKind`], in its declaration order: what [`encode`](Self::encode) seals with.
    sealers: [IdSealer; 4],
}

impl IdCipher {
    pub(crate) fn new(master: &MasterKey) -> Self {
        IdCipher::from_key(master.derive_wide(context::PUBLIC_ID))
    }

    /// The cipher of a file with public-id salt `salt` (see `meta::ID_SALT`); without one,
    /// [`new`](Self::new)'s.
    pub(crate) fn for_file(master: &MasterKey, salt: Option<&[u8; 16]>) -> Self {
        let salt = salt.map_or(&[][..], |s| &s[..]);
        IdCipher::from_key(master.derive_wide_salted(context::PUBLIC_ID, salt))
    }

    fn from_key(key: Zeroizing<[u8; 64]>) -> Self {
        let kinds = [IdKind::Account, IdKind::Key, IdKind::Token, IdKind::Pool];
        let sealers = kinds.map(|kind| IdSealer::new(&key, kind.prefix().as_bytes()));
        IdCipher { key, sealers }
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

    /// The sealed bytes of a public id: what [`seal_bytes`](Self::seal_bytes) gives with the
    /// kind as the associated data, computed by the kind's [`IdSealer`].
    pub(crate) fn sealed(&self, kind: IdKind, id: u64) -> SealedId {
        self.sealers[kind as usize].seal(id)
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
        let invalid = || InvalidId {
            expected: kind.noun(),
            given: [IdKind::Account, IdKind::Key, IdKind::Token, IdKind::Pool]
                .into_iter()
                .find(|k| *k != kind && kind_of(text) == Some(k.prefix()))
                .map(IdKind::noun),
        };
        let body = text
            .strip_prefix(kind.prefix())
            .and_then(|rest| rest.strip_prefix('_'))
            .ok_or_else(invalid)?;
        self.open(&[kind.prefix().as_bytes()], body)
            .ok_or_else(invalid)
    }

    /// Whether `text` starts with one of this ledger's public ids, of any kind (an
    /// authenticated decode: no key's text passes it).
    pub(crate) fn starts_with_id(&self, text: &str) -> bool {
        [IdKind::Account, IdKind::Key, IdKind::Token, IdKind::Pool]
            .into_iter()
            // The kind's prefix and `_` at the start, not `kind_of`: it looks for a `_` as far
            // as the text goes, and this runs at every place a text may hold a key.
            .filter(|kind| {
                text.strip_prefix(kind.prefix())
                    .is_some_and(|rest| rest.starts_with('_'))
            })
            .any(|kind| {
                let id = text.get(..kind.prefix().len() + 1 + ID_BODY_LEN);
                id.is_some_and(|id| self.decode(kind, id).is_ok())
            })
    }
}

/// The prefix `text` starts with, before its first `_`.
fn kind_of(text: &str) -> Option<&str> {
    text.split_once('_').map(|(prefix, _)| prefix)
}

/// AES-SIV (RFC 5297, AES-256-CMAC-SIV as [`Aes256Siv`]) for one fixed associated-data string
/// and an 8-byte plaintext, with everything that does not depend on the plaintext computed
/// once: a public id costs two AES block encryptions, ≈ 80 ns, instead of the crate's key
/// expansions, four CMACs and an allocation (≈ 300–600 ns). That makes an id cheap enough to
/// seal on every call, so a cached key keeps none (docs/PERFORMANCE.md, fourteenth round).
/// Only sealing is specialised; opening goes through [`Aes256Siv`], and a test checks both
/// agree on every kind and on random keys and ids.
struct IdSealer {
    /// The S2V (CMAC) key, expanded.
    mac: Aes256,
    /// The CTR key, expanded.
    ctr: Aes256,
    /// CMAC's first subkey: a one-block message `M` has the tag `AES(mac, M ⊕ subkey)`.
    subkey: Zeroizing<[u8; 16]>,
    /// S2V's state before the plaintext: `dbl(dbl(CMAC(0¹²⁸)) ⊕ CMAC(ad))`, the last `dbl` being
    /// the one S2V applies to a plaintext shorter than a block.
    state: Zeroizing<[u8; 16]>,
}

impl IdSealer {
    fn new(key: &[u8; 64], ad: &[u8]) -> IdSealer {
        let (mac_key, ctr_key) = key.split_at(32);
        let mac = Aes256::new_from_slice(mac_key).expect("a 32-byte AES-256 key");
        let ctr = Aes256::new_from_slice(ctr_key).expect("a 32-byte AES-256 key");
        let cmac = |message: &[u8]| -> Zeroizing<[u8; 16]> {
            let mut m =
                <Cmac<Aes256> as KeyInit>::new_from_slice(mac_key).expect("a 32-byte CMAC key");
            m.update(message);
            Zeroizing::new(m.finalize().into_bytes().into())
        };
        let mut l = Zeroizing::new([0u8; 16]);
        mac.encrypt_block((&mut *l).into());
        let mut state = dbl(&cmac(&[0; 16]));
        xor(&mut state, &cmac(ad)[..]);
        IdSealer {
            mac,
            ctr,
            subkey: dbl(&l),
            state: dbl(&state),
        }
    }

    fn seal(&self, id: u64) -> SealedId {
        let plain = id.to_be_bytes();
        // S2V's last step: the plaintext, padded with 10*, into the state; its CMAC is V.
        let mut v = *self.state;
        xor(&mut v, &plain);
        v[plain.len()] ^= 0x80;
        xor(&mut v, &self.subkey[..]);
        self.mac.encrypt_block((&mut v).into());
        // CTR from V with bits 63 and 31 cleared.
        let mut keystream = v;
        keystream[8] &= 0x7f;
        keystream[12] &= 0x7f;
        self.ctr.encrypt_block((&mut keystream).into());
        let mut sealed = [0u8; 24];
        sealed[..16].copy_from_slice(&v);
        for ((out, p), k) in sealed[16..].iter_mut().zip(plain).zip(keystream) {
            *out = p ^ k;
        }
        sealed
    }
}

/// Doubling in GF(2¹²⁸), as CMAC and S2V define it.
fn dbl(block: &[u8; 16]) -> Zeroizing<[u8; 16]> {
    let x = u128::from_be_bytes(*block);
    let reduce = if x >> 127 == 1 { 0x87 } else { 0 };
    Zeroizing::new(((x << 1) ^ reduce).to_be_bytes())
}

fn xor(into: &mut [u8; 16], other: &[u8]) {
    for (a, b) in into.iter_mut().zip(other) {
        *a ^= b;
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
        // A fixed key: under a random one, about 0.8 % of ids contain "42" by chance (31 places,
        // 1 in 64² each).
        let c = IdCipher::from_key(Zeroizing::new([7; 64]));
        let id = c.encode(IdKind::Key, 42);
        assert!(id.starts_with("key_") && !id.contains("42"), "{id}");
        assert_eq!(id, c.encode(IdKind::Key, 42));
        assert_eq!(c.decode(IdKind::Key, &id), Ok(42));
        // Re-kinded: same body under another prefix.
        let rekinded = id.replacen("key_", "tok_", 1);
        assert_eq!(
            c.decode(IdKind::Token, &rekinded),
            Err(InvalidId {
                expected: "token",
                given: None
            })
        );
        // Another kind's id names its kind: the usual slip.
        let e = c.decode(IdKind::Account, &id).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid account id (its prefix is for key ids)"
        );
        let pool = c.encode(IdKind::Pool, 42);
        let e = c.decode(IdKind::Account, &pool).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid account id (its prefix is for pool ids)"
        );
        let account = c.encode(IdKind::Account, 42);
        let e = c.decode(IdKind::Key, &account).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid key id (its prefix is for account ids)"
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

    /// Ids already handed out must keep decoding: pinned for one key, sealed both ways.
    #[test]
    fn an_id_is_what_it_was_for_the_same_key() {
        let c = IdCipher::from_key(Zeroizing::new(std::array::from_fn(|i| i as u8)));
        let pinned = "key_WiQxO-SjNcEZC18BxJ5A-VPwOQU3cmP8";
        assert_eq!(c.encode(IdKind::Key, 42).as_str(), pinned);
        assert_eq!(format!("key_{}", c.seal(&[b"key"], 42)), pinned);
        assert_eq!(c.decode(IdKind::Key, pinned), Ok(42));
    }

    /// Every way of reading an id as text gives its text: a caller passes it on through
    /// `AsRef<str>`, stores it as a `String` or logs it.
    #[test]
    fn every_view_of_an_id_is_its_text() {
        let c = cipher();
        for kind in [IdKind::Account, IdKind::Key, IdKind::Token, IdKind::Pool] {
            let id = c.encode(kind, 7);
            let text = id.as_str();
            assert_eq!(c.decode(kind, text), Ok(7));
            assert_eq!(&*id, text);
            assert_eq!(<PublicId as AsRef<str>>::as_ref(&id), text);
            assert_eq!(String::from(&id), text);
            assert_eq!(String::from(id), text);
            assert_eq!(id.to_string(), text);
            assert!(format!("{id:?}").contains(text), "{id:?}");
        }
    }

    /// A deserialized id is checked for length: an id reads back as itself, and so does
    /// text as long as the longest kind's id (`acct_` and 32 characters), but one character
    /// more is refused.
    #[test]
    fn a_deserialized_id_is_checked_for_length() {
        let c = cipher();
        for kind in [IdKind::Account, IdKind::Key, IdKind::Token, IdKind::Pool] {
            let id = c.encode(kind, 7);
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(serde_json::from_str::<PublicId>(&json).unwrap(), id);
        }
        let body = |len: usize| "A".repeat(len);
        let longest = format!("\"acct_{}\"", body(ID_BODY_LEN));
        assert!(serde_json::from_str::<PublicId>(&longest).is_ok());
        for longer in [
            format!("\"acct_{}\"", body(ID_BODY_LEN + 1)),
            format!("\"key_{}\"", body(ID_BODY_LEN + 2)),
            format!("\"pool_{}\"", body(4 * ID_BODY_LEN)),
        ] {
            assert!(
                serde_json::from_str::<PublicId>(&longer).is_err(),
                "{longer}"
            );
        }
    }

    proptest! {
        #[test]
        fn the_fast_sealer_seals_what_aes_siv_does(key in any::<[u8; 64]>(), id in any::<u64>()) {
            let c = IdCipher::from_key(Zeroizing::new(key));
            for kind in [IdKind::Account, IdKind::Key, IdKind::Token, IdKind::Pool] {
                let ad = kind.prefix().as_bytes();
                prop_assert_eq!(c.sealed(kind, id), c.seal_bytes(&[ad], id));
            }
        }

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
