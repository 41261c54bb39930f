//! The credential cipher: AES-256-SIV under a key derived from the master key, with a random
//! 16-byte nonce and the row's identity as associated data.
//!
//! Stored form: `nonce (16 bytes) ‖ SIV tag (16 bytes) ‖ ciphertext`. The associated data is
//! a list of separate SIV headers — a domain label, the row kind, the owner's public id, the
//! provider or secret name, the record's schema version and any record fields the value is
//! bound to (an owner secret's allowed hosts and version) — followed by the nonce. SIV
//! authenticates each header on its own, so no two header lists collide: a ciphertext copied
//! to another owner's or provider's row fails to open, and so does one whose bound fields
//! were changed beside it.

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::secret::{MasterKey, context};

/// Length of the random nonce stored in front of each ciphertext.
pub(crate) const NONCE_LEN: usize = 16;
/// Length of the SIV tag.
const TAG_LEN: usize = 16;
/// First header of every credential: separates vault ciphertexts from any other SIV use.
const DOMAIN: &[u8] = b"keyledger vault";

/// What a sealed value belongs to; every field is bound as associated data.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Binding<'a> {
    /// Row kind: [`CONNECTOR`] or [`SECRET`].
    pub(crate) kind: &'static str,
    /// The owner's public id (`acct_…`).
    pub(crate) owner: &'a str,
    /// Provider name or secret name.
    pub(crate) name: &'a str,
    /// Schema version of the record the ciphertext is stored in.
    pub(crate) version: u8,
    /// Further fields of the record, each bound as a header of its own (none for connectors).
    pub(crate) fields: &'a [&'a [u8]],
}

/// Row kind of connector credentials.
pub(crate) const CONNECTOR: &str = "connector";
/// Row kind of owner secrets.
pub(crate) const SECRET: &str = "secret";

impl Binding<'_> {
    fn what(&self) -> &'static str {
        if self.kind == CONNECTOR {
            "connector credential"
        } else {
            "owner secret"
        }
    }
}

/// Seals and opens vault values.
pub(crate) struct VaultCipher {
    key: Zeroizing<[u8; 64]>,
}

impl VaultCipher {
    pub(crate) fn new(master: &MasterKey) -> Self {
        VaultCipher {
            key: master.derive_wide(context::CREDENTIAL),
        }
    }

    fn cipher(&self) -> Result<Aes256Siv> {
        // A 64-byte slice is always a valid AES-256-SIV key; map the impossible error anyway.
        Aes256Siv::new_from_slice(&self.key[..]).map_err(|_| Error::DecryptionFailed {
            what: "credential cipher key",
        })
    }

    /// Encrypts `plaintext` bound to `binding` under a fresh random nonce.
    pub(crate) fn seal(&self, binding: Binding<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|e| Error::Config(crate::error::ConfigError::Randomness(e.to_string())))?;
        // Sized up front so encrypting in place never reallocates (and so never leaves an
        // unzeroized copy of the plaintext behind); zeroized in case encryption fails.
        let mut body = Zeroizing::new(Vec::with_capacity(TAG_LEN + plaintext.len()));
        body.extend_from_slice(plaintext);
        self.cipher()?
            .encrypt_in_place(headers(&binding, &nonce), &mut *body)
            .map_err(|_| Error::invalid("value", "too large to encrypt"))?;
        let mut out = Vec::with_capacity(NONCE_LEN + body.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decrypts a value sealed by [`seal`](Self::seal) with the same binding; any other
    /// binding, key or a modified byte gives [`Error::DecryptionFailed`].
    pub(crate) fn open(&self, binding: Binding<'_>, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let failed = Error::DecryptionFailed {
            what: binding.what(),
        };
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(failed);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let mut buffer = Zeroizing::new(body.to_vec());
        match self
            .cipher()?
            .decrypt_in_place(headers(&binding, nonce), &mut *buffer)
        {
            Ok(()) => Ok(buffer),
            Err(_) => Err(failed),
        }
    }
}

fn headers<'a>(binding: &'a Binding<'a>, nonce: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let identity = [
        DOMAIN,
        binding.kind.as_bytes(),
        binding.owner.as_bytes(),
        binding.name.as_bytes(),
        std::slice::from_ref(&binding.version),
    ];
    identity
        .into_iter()
        .chain(binding.fields.iter().copied())
        .chain([nonce])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding<'a>(owner: &'a str, name: &'a str) -> Binding<'a> {
        Binding {
            kind: CONNECTOR,
            owner,
            name,
            version: 1,
            fields: &[],
        }
    }

    #[test]
    fn round_trip_with_random_nonce() {
        let c = VaultCipher::new(&MasterKey::generate().unwrap());
        let a = c.seal(binding("acct_a", "notion"), b"token").unwrap();
        let b = c.seal(binding("acct_a", "notion"), b"token").unwrap();
        assert_ne!(a, b, "a fresh nonce each time");
        assert_eq!(a.len(), NONCE_LEN + TAG_LEN + 5);
        assert!(!a.windows(5).any(|w| w == b"token"));
        assert_eq!(
            &c.open(binding("acct_a", "notion"), &a).unwrap()[..],
            b"token"
        );
    }

    #[test]
    fn any_other_binding_key_or_byte_fails() {
        let c = VaultCipher::new(&MasterKey::generate().unwrap());
        let sealed = c.seal(binding("acct_a", "notion"), b"token").unwrap();
        let fails = |r: Result<Zeroizing<Vec<u8>>>| {
            assert!(matches!(r, Err(Error::DecryptionFailed { .. })))
        };
        fails(c.open(binding("acct_b", "notion"), &sealed));
        fails(c.open(binding("acct_a", "google_drive"), &sealed));
        fails(c.open(
            Binding {
                version: 2,
                ..binding("acct_a", "notion")
            },
            &sealed,
        ));
        fails(c.open(
            Binding {
                kind: SECRET,
                ..binding("acct_a", "notion")
            },
            &sealed,
        ));
        // Header boundaries matter: moving bytes between owner and name does not collide.
        fails(c.open(binding("acct_an", "otion"), &sealed));
        // Bound fields are headers too: one more, even empty, fails.
        let with = |fields| Binding {
            fields,
            ..binding("acct_a", "notion")
        };
        fails(c.open(with(&[b""]), &sealed));
        let bound = c.seal(with(&[b"api.example.com", b"2"]), b"token").unwrap();
        assert_eq!(
            &c.open(with(&[b"api.example.com", b"2"]), &bound).unwrap()[..],
            b"token"
        );
        fails(c.open(with(&[b"evil.example.com", b"2"]), &bound));
        fails(c.open(with(&[b"api.example.com", b"1"]), &bound));
        fails(c.open(with(&[b"api.example.com2"]), &bound));
        fails(c.open(with(&[b"api.example.com"]), &bound));
        fails(c.open(binding("acct_a", "notion"), &bound));
        fails(
            VaultCipher::new(&MasterKey::generate().unwrap())
                .open(binding("acct_a", "notion"), &sealed),
        );
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            fails(c.open(binding("acct_a", "notion"), &bad));
        }
        fails(c.open(binding("acct_a", "notion"), &sealed[..31]));
        fails(c.open(binding("acct_a", "notion"), &[]));
    }
}
