//! Secret material: [`Secret`] plaintexts, the [`MasterKey`] and the sub-keys derived from it.
//!
//! Every plaintext that must not leak (a key at creation, an OAuth token, an owner secret) is a
//! [`Secret`]: zeroized on drop, redacted in `Debug`/`Display`, revealed only by
//! [`Secret::expose`]. Sub-keys come from the master key through `blake3::derive_key` under
//! distinct, versioned context strings, so no two purposes ever share key material.

use std::fmt;
use std::path::Path;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::ConfigError;

/// A plaintext secret. Zeroized on drop; `Debug` and `Display` print `Secret(***)`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Secret(String);

impl Secret {
    /// Wraps a plaintext. The caller's copy, if any, is theirs to zeroize.
    pub fn new(plaintext: impl Into<String>) -> Self {
        Secret(plaintext.into())
    }

    /// Reveals the plaintext. The one door out: grep for `expose()` to audit every use.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Length of the plaintext in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the plaintext is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The 32-byte master secret every other key is derived from. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl MasterKey {
    /// Length of a master key in bytes.
    pub const LEN: usize = 32;

    /// Builds a master key from exactly 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ConfigError> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ConfigError::MasterKeyLength { found: bytes.len() })?;
        Ok(MasterKey(array))
    }

    /// Parses the textual form: 64 hex digits (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let text = text.trim();
        // Counted in characters, as the error reports them: 64 characters of which one is
        // not ASCII (a pasted look-alike) is a character that is not a hex digit, not a
        // wrong length ("must be 64 hex digits, found 64 characters").
        let found_chars = text.chars().count();
        if found_chars != 64 {
            return Err(ConfigError::MasterKeyEncoding { found_chars });
        }
        if let Some(i) = text.chars().position(|c| !c.is_ascii_hexdigit()) {
            return Err(ConfigError::MasterKeyNotHex { position: i + 1 });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).unwrap_or(0);
            let lo = (pair[1] as char).to_digit(16).unwrap_or(0);
            bytes[i] = (hi * 16 + lo) as u8;
        }
        Self::from_bytes(&bytes[..])
    }

    /// A fresh random key from the OS. For `demo`, tests and `init` only: a ledger opened with
    /// an ephemeral key cannot be read again once the key is gone.
    pub fn generate() -> Result<Self, ConfigError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| ConfigError::Randomness(e.to_string()))?;
        Ok(MasterKey(bytes))
    }

    /// The textual form written to key files (64 lowercase hex digits), as a [`Secret`].
    pub fn to_hex(&self) -> Secret {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(64);
        for b in self.0 {
            text.push(HEX[(b >> 4) as usize] as char);
            text.push(HEX[(b & 15) as usize] as char);
        }
        Secret(text)
    }

    /// Whether `text` holds this key in hex, either case, anywhere in it: such text is
    /// refused wherever it would be stored or listed in clear (a master key pasted as an
    /// actor or a permission was kept in the file and in the audit trail for good). Only
    /// runs of 64 hex digits or more can hold it (where they are says nothing of the key);
    /// every place in them is compared in constant time, so the time taken says nothing of
    /// how near a text came.
    pub(crate) fn appears_in(&self, text: &str) -> bool {
        let digits = 2 * Self::LEN;
        let ours: Zeroizing<Vec<u8>> =
            Zeroizing::new(self.0.iter().flat_map(|b| [b >> 4, b & 15]).collect());
        let found = text
            .split(|c: char| !c.is_ascii_hexdigit())
            .filter(|run| run.len() >= digits)
            .fold(subtle::Choice::from(0), |found, run| {
                let theirs: Zeroizing<Vec<u8>> = Zeroizing::new(
                    run.chars()
                        .map(|c| c.to_digit(16).map_or(0, |d| d as u8))
                        .collect(),
                );
                theirs
                    .windows(digits)
                    .fold(found, |found, place| found | ours.ct_eq(place))
            });
        found.into()
    }

    /// Reads a key file. On Unix the file must not be readable by group or others (mode 0600).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let io = |e: std::io::Error| ConfigError::KeyFile {
            path: shown_path(path),
            reason: e.to_string(),
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ConfigError::KeyFilePermissions {
                    path: shown_path(path),
                    mode,
                });
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        Self::parse(&text)
    }

    /// Writes the key to a new file with mode 0600. Refuses to overwrite an existing file,
    /// and a path that is a master key (a key file named by a key, which `init` would then
    /// print).
    pub fn write_new_file(&self, path: &Path) -> Result<(), ConfigError> {
        use std::io::Write;
        let io = |e: std::io::Error| ConfigError::KeyFile {
            path: shown_path(path),
            reason: e.to_string(),
        };
        if names_a_master_key(path) {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a master key given where its file's path goes",
            )));
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        let hex = self.to_hex();
        writeln!(file, "{}", hex.expose()).map_err(io)?;
        file.sync_all().map_err(io)
    }

    /// Derives a 32-byte sub-key for one purpose.
    pub(crate) fn derive(&self, context: &str) -> SubKey {
        SubKey(blake3::derive_key(context, &self.0))
    }

    /// Derives a 64-byte sub-key (AES-256-SIV takes two 32-byte halves).
    pub(crate) fn derive_wide(&self, context: &str) -> Zeroizing<[u8; 64]> {
        self.derive_wide_salted(context, &[])
    }

    /// [`derive_wide`](Self::derive_wide) with `salt` after the key (an empty salt derives
    /// what `derive_wide` does).
    pub(crate) fn derive_wide_salted(&self, context: &str, salt: &[u8]) -> Zeroizing<[u8; 64]> {
        let mut out = Zeroizing::new([0u8; 64]);
        blake3::Hasher::new_derive_key(context)
            .update(&self.0)
            .update(salt)
            .finalize_xof()
            .fill(&mut out[..]);
        out
    }
}

/// A path as keyledger's errors and messages show it: component by component (so `a/./b`
/// shows as `a/b`), but for a component that reads as a secret, which an error would
/// otherwise repeat into every log and terminal. Such a component is replaced by a note:
/// one holding 64 hex digits in a row (a master key: `KEYLEDGER_DB` or
/// `KEYLEDGER_MASTER_KEY_FILE` swapped with `KEYLEDGER_MASTER_KEY`), and one holding a key's
/// shape — `_`, `-` or `.`, then a random-looking run of 24 or more ASCII letters and digits
/// with at least one of each (an API key or a token pasted as a path). For display only: a
/// directory named by 64 hex digits (a Docker volume) is withheld too, and the rest of its
/// path shown.
///
/// ```
/// use std::path::Path;
///
/// assert_eq!(keyledger::shown_path(Path::new("/var/lib/keys.redb")), "/var/lib/keys.redb");
/// let pasted = Path::new("/srv/vb_live_4eC39HqLyjWDarjtT1zdp7dc2wRb0N");
/// assert_eq!(keyledger::shown_path(pasted), "/srv/(a key: not shown)");
/// ```
pub fn shown_path(path: &Path) -> String {
    let shown: std::path::PathBuf = path
        .components()
        .map(|component| {
            let text = Zeroizing::new(component.as_os_str().to_string_lossy().into_owned());
            if holds_a_master_keys_length_of_hex(&text) {
                "(64 hex digits, a master key: not shown)".into()
            } else if holds_a_key_shape(&text) {
                "(a key: not shown)".into()
            } else {
                component.as_os_str().to_owned()
            }
        })
        .collect();
    shown.display().to_string()
}

/// Whether `path`'s file name holds a master key: 64 hex digits in a row (`<key>`,
/// `<key>.key`, `prod-<key>.redb`), which a file must not be named by (every listing of its
/// directory would show the key). A directory's name is not looked at: it may be 64 hex
/// digits for other reasons (a Docker volume's).
pub fn names_a_master_key(path: &Path) -> bool {
    path.file_name().is_some_and(|name| {
        holds_a_master_keys_length_of_hex(&Zeroizing::new(name.to_string_lossy().into_owned()))
    })
}

/// Whether `text` holds 64 hex digits in a row: a master key's length.
fn holds_a_master_keys_length_of_hex(text: &str) -> bool {
    text.split(|c: char| !c.is_ascii_hexdigit())
        .any(|run| run.len() >= 2 * MasterKey::LEN)
}

/// Whether `text` holds a key's shape: `_`, `-` or `.`, then 24 or more ASCII letters and
/// digits with a letter and a digit among them (a key's random body after its prefix).
fn holds_a_key_shape(text: &str) -> bool {
    text.split(['_', '-', '.']).skip(1).any(|after| {
        let run = &after[..after
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(after.len())];
        run.len() >= 24
            && run.bytes().any(|b| b.is_ascii_digit())
            && run.bytes().any(|b| b.is_ascii_alphabetic())
    })
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

/// A derived 32-byte key, zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub(crate) struct SubKey(pub(crate) [u8; 32]);

/// Context strings for `blake3::derive_key`. Changing one changes every derived value.
pub(crate) mod context {
    /// Key-hash pepper (HMAC-SHA256's key); the version number is appended.
    pub(crate) const PEPPER: &str = "keyledger 2026-11 key-hash pepper v";
    /// BLAKE3's key-hash pepper, apart from HMAC-SHA256's (one key, one algorithm); the
    /// version number is appended.
    pub(crate) const BLAKE3_PEPPER: &str = "keyledger 2026-12 blake3 key-hash pepper v";
    /// AES-SIV key for opaque public ids and cursors.
    pub(crate) const PUBLIC_ID: &str = "keyledger 2026-11 public-id cipher";
    /// Keyed hash stored in the database to recognise the right master key at open.
    pub(crate) const VERIFIER: &str = "keyledger 2026-11 master-key verifier";
    /// AES-SIV key for connector credentials and owner secrets (the vault).
    pub(crate) const CREDENTIAL: &str = "keyledger 2026-11 credential cipher";
    /// Key of the import reservations' hashes (format 7): an imported key's plain SHA-256
    /// is not kept once its first use has rehashed it.
    pub(crate) const IMPORT_RESERVATION: &str = "keyledger 2026-12 import reservation";
    /// Key of an imported key's stored SHA-256 (format 8): the plain digest, which an old
    /// system's key can be guessed from offline, is never written to the file.
    pub(crate) const IMPORTED_SHA256: &str = "keyledger 2026-12 imported sha-256";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted_everywhere_but_expose() {
        let s = Secret::new("vb_live_supersecret");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(format!("{s}"), "Secret(***)");
        assert_eq!(s.expose(), "vb_live_supersecret");
    }

    #[test]
    fn a_master_key_is_found_in_text_in_either_case_and_nowhere_it_is_not_whole() {
        let key = MasterKey::generate().unwrap();
        let hex = key.to_hex().expose().to_owned();
        for text in [
            hex.clone(),
            hex.to_uppercase(),
            format!("by {hex}, on call"),
            format!("0{hex}f"),
            format!("\u{e9}{}{}", &hex[..32], hex[32..].to_uppercase()),
        ] {
            assert!(key.appears_in(&text), "{text}");
        }
        let other = MasterKey::generate().unwrap().to_hex().expose().to_owned();
        for text in [
            hex[..63].to_owned(),
            format!("{} {}", &hex[..32], &hex[32..]),
            other,
            String::new(),
        ] {
            assert!(!key.appears_in(&text), "{text}");
        }
    }

    #[test]
    fn a_path_is_shown_unless_a_component_reads_as_a_secret() {
        let hex = MasterKey::generate().unwrap().to_hex().expose().to_owned();
        for withheld in [
            hex.clone(),
            format!(" {hex}\n"),
            format!("/srv/{hex}/keys.redb"),
            format!("{hex}.key"),
            format!("./{}", "7".repeat(64)),
            "vb_live_4eC39HqLyjWDarjtT1zdp7dc2wRb0N".into(),
            "/run/ya29.Qk7pZ2mW9xR4tL8vN3bH6jF1cD5sG0yE".into(),
        ] {
            let shown = shown_path(Path::new(&withheld));
            assert!(shown.contains("not shown"), "{withheld}: {shown}");
            assert!(!shown.contains(&withheld.trim()[..8]), "{shown}");
        }
        assert_eq!(
            shown_path(Path::new(&format!(
                "/var/lib/docker/volumes/{hex}/_data/k.redb"
            ))),
            "/var/lib/docker/volumes/(64 hex digits, a master key: not shown)/_data/k.redb",
            "only the component is withheld"
        );
        for plain in [
            "/data/550e8400e29b41d4a716446655440000/keyledger.redb",
            "./keyledger.redb",
            "/var/lib/keyledger/keys.redb.key",
            "/tmp/.tmpAb12Cd/test.redb",
            "/data/550e8400-e29b-41d4-a716-446655440000/keys.redb",
            "/srv/keyledger_production_database_primary.redb",
            "target/debug/deps/keyledger-3f2a9c1b0d4e5f67",
        ] {
            assert_eq!(shown_path(Path::new(plain)), plain);
        }
    }

    #[test]
    fn master_key_hex_round_trip_and_errors() {
        let key = MasterKey::generate().unwrap();
        let again = MasterKey::parse(key.to_hex().expose()).unwrap();
        assert_eq!(key.0, again.0);
        assert!(matches!(
            MasterKey::parse("abcd"),
            Err(ConfigError::MasterKeyEncoding { found_chars: 4 })
        ));
        let mut not_hex = key.to_hex().expose().to_owned();
        not_hex.replace_range(9..10, "z");
        let err = MasterKey::parse(&not_hex).unwrap_err();
        assert!(matches!(err, ConfigError::MasterKeyNotHex { position: 10 }));
        assert!(!err.to_string().contains(&not_hex[..9]), "{err}");
        assert!(matches!(
            MasterKey::from_bytes(&[0u8; 31]),
            Err(ConfigError::MasterKeyLength { found: 31 })
        ));
        assert!(!format!("{key:?}").contains(key.to_hex().expose()));
    }

    #[test]
    fn derived_keys_differ_per_context() {
        let key = MasterKey::generate().unwrap();
        assert_ne!(
            key.derive(context::PUBLIC_ID).0,
            key.derive(context::VERIFIER).0
        );
    }

    #[cfg(unix)]
    #[test]
    fn key_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let key = MasterKey::generate().unwrap();
        key.write_new_file(&path).unwrap();
        assert_eq!(MasterKey::from_file(&path).unwrap().0, key.0);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            MasterKey::from_file(&path),
            Err(ConfigError::KeyFilePermissions { mode: 0o644, .. })
        ));
        assert!(
            key.write_new_file(&path).is_err(),
            "never overwrites a key file"
        );
    }
}
