//! The key format: `<prefix><32 base62 chars of OS randomness><6-char base62 CRC32>`.
//!
//! `vb_live_` + 32 base62 characters carries 190.5 bits of entropy; the checksum (CRC32 of
//! prefix and body, GitHub's scheme) lets the parser reject mistyped, truncated or made-up keys
//! before any hashing, and lets secret scanners recognise leaked keys.

use crate::config::Config;
use crate::error::{ConfigError, HeaderError, MalformedKey};
use crate::secret::Secret;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Each base62 character's value (0 for the other bytes, which the parser rejects first).
const BASE62_VALUE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < BASE62.len() {
        table[BASE62[i] as usize] = i as u8;
        i += 1;
    }
    table
};
/// Random base62 characters in a key body.
pub(crate) const BODY_LEN: usize = 32;
/// Base62 characters of the CRC32 checksum (62^6 > 2^32).
pub(crate) const CHECKSUM_LEN: usize = 6;
/// Characters shown in the clear at the start of a key, at least.
pub(crate) const VISIBLE_PREFIX_LEN: usize = 12;
/// Characters of a new key's body its visible prefix shows, at least: with a key prefix
/// longer than 8 characters, the first 12 alone would leave too few to tell keys apart.
const VISIBLE_BODY_LEN: usize = 4;
/// Most characters a visible prefix holds: a 12-character key prefix and 4 of the body.
pub(crate) const MAX_VISIBLE_PREFIX_LEN: usize = 16;
/// Characters shown in the clear at the end of a key.
pub(crate) const VISIBLE_SUFFIX_LEN: usize = 4;
/// Fewest and most characters after a legacy prefix (other systems' keys, no checksum).
const LEGACY_BODY_LEN: std::ops::RangeInclusive<usize> = 16..=100;
/// Longest header value accepted before parsing (generous: prefixes are ≤ 12 chars).
pub(crate) const MAX_PRESENTED_LEN: usize = 128;

/// What a key's prefix says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyClass {
    /// A live API key (`vb_live_…`).
    Live,
    /// A test API key (`vb_test_…`).
    Test,
    /// An internal token (`vb_tok_…`).
    Token,
    /// A key issued by another system under a configured legacy prefix, imported by hash.
    Legacy,
}

/// The configured prefixes; parses and generates keys.
#[derive(Debug, Clone)]
pub(crate) struct KeyFormat {
    prefixes: [(String, KeyClass); 3],
    legacy: Vec<String>,
    /// A fresh CRC-32 state, cloned per key: `crc32fast::Hasher::new` looks up the CPU's
    /// features every time.
    crc: crc32fast::Hasher,
}

impl KeyFormat {
    pub(crate) fn new(config: &Config) -> Self {
        KeyFormat {
            prefixes: [
                (config.live_prefix.clone(), KeyClass::Live),
                (config.test_prefix.clone(), KeyClass::Test),
                (config.token_prefix.clone(), KeyClass::Token),
            ],
            legacy: config.legacy_prefixes.clone(),
            crc: crc32fast::Hasher::new(),
        }
    }

    /// The prefix new keys of `class` get. `Legacy` has no prefix of its own and falls back to
    /// live; `roll` picks the class from the record's kind instead (tokens stay tokens).
    fn prefix(&self, class: KeyClass) -> &str {
        let class = if class == KeyClass::Legacy {
            KeyClass::Live
        } else {
            class
        };
        let (prefix, _) = &self.prefixes[self
            .prefixes
            .iter()
            .position(|(_, c)| *c == class)
            .unwrap_or(0)];
        prefix
    }

    /// A new key of `class` from OS randomness.
    pub(crate) fn generate(&self, class: KeyClass) -> Result<Secret, ConfigError> {
        let prefix = self.prefix(class);
        let mut key = String::with_capacity(prefix.len() + BODY_LEN + CHECKSUM_LEN);
        key.push_str(prefix);
        let mut pool = [0u8; 64];
        let mut filled = 0;
        while filled < BODY_LEN {
            getrandom::fill(&mut pool).map_err(|e| ConfigError::Randomness(e.to_string()))?;
            // Rejection sampling: 248 = 4 × 62, so `b % 62` is uniform for b < 248.
            for &b in pool.iter().filter(|&&b| b < 248) {
                if filled == BODY_LEN {
                    break;
                }
                key.push(BASE62[(b % 62) as usize] as char);
                filled += 1;
            }
        }
        pool.fill(0);
        push_checksum(&mut key);
        Ok(Secret::new(key))
    }

    /// Checks prefix, length, alphabet and checksum. No hashing happens before this passes.
    pub(crate) fn parse(&self, key: &str) -> Result<KeyClass, MalformedKey> {
        if key.is_empty() {
            return Err(MalformedKey::Empty);
        }
        let Some((prefix, class)) = self
            .prefixes
            .iter()
            .find(|(p, _)| key.starts_with(p.as_str()))
        else {
            return self.parse_legacy(key);
        };
        let rest = &key.as_bytes()[prefix.len()..];
        if rest.len() != BODY_LEN + CHECKSUM_LEN {
            return Err(MalformedKey::WrongLength {
                expected: BODY_LEN + CHECKSUM_LEN,
                expected_max: BODY_LEN + CHECKSUM_LEN,
                found: rest.len(),
            });
        }
        // No early exit, so the compiler checks the body with vector compares; the position
        // of a bad character is looked for only once there is one.
        if !rest
            .iter()
            .fold(true, |ok, b| ok & b.is_ascii_alphanumeric())
        {
            let i = rest.iter().position(|b| !b.is_ascii_alphanumeric());
            return Err(MalformedKey::BadCharacter {
                position: prefix.len() + i.unwrap_or(0),
            });
        }
        let (signed, checksum) = key.as_bytes().split_at(key.len() - CHECKSUM_LEN);
        let mut crc = self.crc.clone();
        crc.update(signed);
        // Decoding the checksum and comparing numbers equals encoding the CRC and comparing
        // characters (base62 of a value below 62⁶ is unique), at a multiply-add per character
        // instead of a division.
        if decode_checksum(checksum) != u64::from(crc.finalize()) {
            return Err(MalformedKey::BadChecksum);
        }
        Ok(*class)
    }
}

impl KeyFormat {
    /// Legacy keys: a configured prefix, 16–100 printable ASCII characters
    /// ([`LEGACY_BODY_LEN`]), no checksum.
    fn parse_legacy(&self, key: &str) -> Result<KeyClass, MalformedKey> {
        let prefix = self
            .legacy
            .iter()
            .find(|p| key.starts_with(p.as_str()))
            .ok_or(MalformedKey::WrongPrefix)?;
        let rest = &key[prefix.len()..];
        if !LEGACY_BODY_LEN.contains(&rest.len()) {
            return Err(MalformedKey::WrongLength {
                expected: *LEGACY_BODY_LEN.start(),
                expected_max: *LEGACY_BODY_LEN.end(),
                found: rest.len(),
            });
        }
        if let Some(i) = rest.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(MalformedKey::BadCharacter {
                position: prefix.len() + i,
            });
        }
        Ok(KeyClass::Legacy)
    }

    /// Whether `text` holds a key this format accepts anywhere, or most of one: one of its
    /// own prefixes (glued to other characters or not) followed by a whole body's worth of
    /// base62 characters, or by half of one with a letter and a digit among them, whatever
    /// follows (found by a reviewer: a key cut before its checksum, which anyone can work
    /// out again, was kept as a change's actor); or a legacy prefix at the start of a word
    /// followed by at least 16 characters of `[A-Za-z0-9_-]` among which a letter and a
    /// digit, as other systems' random keys have (found by a reviewer: a legacy key given as
    /// a name was stored and listed in clear). These are likenesses: after an own prefix, 32
    /// letters and digits of any kind are refused as a key (a name glued to the prefix that
    /// long), and a shorter run without a digit is not found; after a legacy prefix, a run
    /// without a digit is not found. A place where `is_public_id` finds one of the ledger's
    /// public ids is none (with a key prefix such as `tok_`, a token's id reads like most of
    /// a key: found by a reviewer).
    ///
    /// Every place a prefix starts is tried, overlapping ones too: with a prefix such as
    /// `ab_ab_`, which ends as it begins, `ab_` glued before a key makes a false start that
    /// overlaps the key's own prefix (found by a reviewer). Each start looks at no more than
    /// a key's length after it (the letter and digit among a legacy key's 100 characters at
    /// most), so the whole check is linear in the text: it runs before any length check, on
    /// whatever a caller sends (found by a reviewer: a run of legacy prefixes with no digit
    /// made each start scan to the end: 256 KB took 7 s by its measure).
    pub(crate) fn holds_key(&self, text: &str, is_public_id: impl Fn(&str) -> bool) -> bool {
        let starts = || text.char_indices().map(|(at, _)| (at, &text[at..]));
        let own = self.prefixes.iter().any(|(prefix, _)| {
            starts()
                .filter(|(_, rest)| rest.starts_with(prefix.as_str()))
                .any(|(_, rest)| {
                    let body = key_run(&rest[prefix.len()..], BODY_LEN, |b| {
                        b.is_ascii_alphanumeric()
                    });
                    (body.len() == BODY_LEN || random_looking(body, BODY_LEN / 2))
                        && !is_public_id(rest)
                })
        });
        let word_start = |at: usize| !text[..at].ends_with(|c: char| c.is_ascii_alphanumeric());
        own || self.legacy.iter().any(|prefix| {
            starts()
                .filter(|&(at, rest)| rest.starts_with(prefix.as_str()) && word_start(at))
                .any(|(_, rest)| {
                    let body = key_run(&rest[prefix.len()..], *LEGACY_BODY_LEN.end(), |b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-')
                    });
                    random_looking(body, *LEGACY_BODY_LEN.start()) && !is_public_id(rest)
                })
        })
    }

    /// The visible prefix and suffix stored with a new key (its masked form is
    /// `vb_live_AbCd…wxyz`): its first 12 characters, or its key prefix and 4 more when that
    /// is longer, so that support can tell keys apart by it; and its last 4.
    pub(crate) fn visible_parts(&self, key: &str) -> (String, String) {
        let prefix = key
            .get(..self.visible_prefix_len(key))
            .unwrap_or(key)
            .to_owned();
        let suffix = key[key.len().saturating_sub(VISIBLE_SUFFIX_LEN)..].to_owned();
        (prefix, suffix)
    }

    /// How many characters the visible prefix of a key starting as `key` holds at most: of
    /// one of this format's own, 12, or its key prefix and 4 more when that is longer; of a
    /// legacy key, which may have as few as 16 characters after its prefix, the prefix and 4
    /// (found by a reviewer: 12 characters and the suffix showed 13 of a 16-character body).
    pub(crate) fn visible_prefix_len(&self, key: &str) -> usize {
        let starts = |p: &&String| key.starts_with(p.as_str());
        if let Some(prefix) = self.prefixes.iter().map(|(p, _)| p).find(starts) {
            VISIBLE_PREFIX_LEN.max(prefix.len() + VISIBLE_BODY_LEN)
        } else {
            let legacy = self.legacy.iter().find(starts);
            legacy.map_or(VISIBLE_PREFIX_LEN, |p| p.len() + VISIBLE_BODY_LEN)
        }
    }

    /// The class a visible prefix (of an imported key) belongs to.
    pub(crate) fn classify_prefix(&self, visible: &str) -> Option<KeyClass> {
        self.prefixes
            .iter()
            .find(|(p, _)| visible.starts_with(p.as_str()))
            .map(|(_, c)| *c)
            .or_else(|| {
                self.legacy
                    .iter()
                    .any(|p| visible.starts_with(p.as_str()))
                    .then_some(KeyClass::Legacy)
            })
    }
}

/// The run of key characters that `after` (what follows a prefix) starts with, `max` bytes at
/// most.
fn key_run(after: &str, max: usize, key_char: impl Fn(u8) -> bool) -> &[u8] {
    let run = &after.as_bytes()[..after.len().min(max)];
    &run[..run.iter().position(|&b| !key_char(b)).unwrap_or(run.len())]
}

/// Whether `run` looks like a random key's characters: `min` or more, a letter and a digit
/// among them.
fn random_looking(run: &[u8], min: usize) -> bool {
    run.len() >= min
        && run.iter().any(u8::is_ascii_digit)
        && run.iter().any(u8::is_ascii_alphabetic)
}

fn encode_checksum(mut crc: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    out
}

/// The value of base62 `chars` (alphanumeric: checked by the caller).
fn decode_checksum(chars: &[u8]) -> u64 {
    chars.iter().fold(0, |value, &c| {
        value * 62 + u64::from(BASE62_VALUE[usize::from(c)])
    })
}

fn push_checksum(key: &mut String) {
    let checksum = encode_checksum(crc32fast::hash(key.as_bytes()));
    key.extend(checksum.iter().map(|&b| b as char));
}

/// A key as presented by a client, taken from request headers. Holds the plaintext as a
/// [`Secret`]; the full format check (prefix, length, checksum) happens in `verify`.
#[derive(Debug, Clone)]
pub struct Presented(Secret);

impl Presented {
    /// Wraps a key given directly (e.g. from a CLI argument), trimming surrounding ASCII
    /// whitespace (other whitespace is no part of a key, so it is refused).
    pub fn new(key: &str) -> Result<Presented, HeaderError> {
        Presented::checked(key.trim_ascii())
    }

    /// `key` as it is, if it can be a key: not empty, not too long, printable ASCII.
    fn checked(key: &str) -> Result<Presented, HeaderError> {
        if key.is_empty() {
            return Err(HeaderError::Missing);
        }
        if key.len() > MAX_PRESENTED_LEN {
            return Err(HeaderError::Malformed(MalformedKey::TooLong {
                max: MAX_PRESENTED_LEN,
                found: key.len(),
            }));
        }
        if let Some(position) = key.bytes().position(|b| !b.is_ascii_graphic()) {
            return Err(HeaderError::Malformed(MalformedKey::BadCharacter {
                position,
            }));
        }
        Ok(Presented(Secret::new(key)))
    }

    /// Takes the key from an `Authorization` header value (`Bearer <key>`, scheme
    /// case-insensitive, surrounding whitespace ignored) or an `x-api-key` header value.
    ///
    /// Both present with the same key is accepted; both with different keys is
    /// [`HeaderError::Conflict`]; neither is [`HeaderError::Missing`]. An `Authorization`
    /// header that carries no Bearer key (another scheme such as `Basic …`, or `Bearer`
    /// alone) is ignored when `x-api-key` holds a key; without one it is
    /// [`HeaderError::UnsupportedScheme`] or [`HeaderError::Missing`].
    pub fn from_headers(
        authorization: Option<&str>,
        x_api_key: Option<&str>,
    ) -> Result<Presented, HeaderError> {
        // `Err`: the header is there but carries no Bearer key.
        // HTTP's whitespace is spaces and tabs: anything else (a no-break space, a form
        // feed, a carriage return) is part of the value, which a proxy in front would read
        // the same way, so it is refused as a character no key has.
        fn trim(value: &str) -> &str {
            value.trim_matches([' ', '\t'])
        }
        let bearer = authorization
            .map(trim)
            .filter(|v| !v.is_empty())
            .map(|value| {
                let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
                match trim(rest) {
                    _ if !scheme.eq_ignore_ascii_case("bearer") => {
                        Err(HeaderError::UnsupportedScheme)
                    }
                    "" => Err(HeaderError::Missing),
                    key => Ok(key),
                }
            });
        let api_key = x_api_key.map(trim).filter(|v| !v.is_empty());
        match (bearer, api_key) {
            (None, None) => Err(HeaderError::Missing),
            (Some(bearer), None) => Presented::checked(bearer?),
            // An Authorization header meant for something else (a proxy's Basic
            // credentials, say) does not hide the key sent in x-api-key.
            (None | Some(Err(_)), Some(key)) => Presented::checked(key),
            (Some(Ok(a)), Some(b)) => {
                let (a, b) = (Presented::checked(a)?, Presented::checked(b)?);
                if a.0.expose().as_bytes() == b.0.expose().as_bytes() {
                    Ok(a)
                } else {
                    Err(HeaderError::Conflict)
                }
            }
        }
    }

    /// The plaintext key. Handle with care.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn format() -> KeyFormat {
        KeyFormat::new(&Config::ephemeral().unwrap())
    }

    #[test]
    fn generated_keys_parse_and_have_the_documented_shape() {
        let f = format();
        for class in [KeyClass::Live, KeyClass::Test, KeyClass::Token] {
            let key = f.generate(class).unwrap();
            assert_eq!(f.parse(key.expose()), Ok(class));
            let prefix = f.prefix(class);
            assert_eq!(key.len(), prefix.len() + 38);
            assert!(
                key.expose()[prefix.len()..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric())
            );
        }
        assert_ne!(
            f.generate(KeyClass::Live).unwrap(),
            f.generate(KeyClass::Live).unwrap()
        );
    }

    #[test]
    fn parser_rejects_each_kind_of_malformed_key() {
        let f = format();
        let key = f.generate(KeyClass::Live).unwrap();
        let key = key.expose();
        assert_eq!(f.parse(""), Err(MalformedKey::Empty));
        assert_eq!(
            f.parse(&key.replacen("vb_live_", "sk_live_", 1)),
            Err(MalformedKey::WrongPrefix)
        );
        assert!(matches!(
            f.parse(&key[..key.len() - 1]),
            Err(MalformedKey::WrongLength { .. })
        ));
        let mut bad_char = key.to_owned();
        bad_char.replace_range(10..11, "-");
        assert_eq!(
            f.parse(&bad_char),
            Err(MalformedKey::BadCharacter { position: 10 })
        );
        // Change one body character: the checksum catches it.
        let mut typo = key.as_bytes().to_vec();
        typo[12] = if typo[12] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            f.parse(std::str::from_utf8(&typo).unwrap()),
            Err(MalformedKey::BadChecksum)
        );
        // A live body under the test prefix fails the checksum: prefixes are signed too.
        assert_eq!(
            f.parse(&key.replacen("vb_live_", "vb_test_", 1)),
            Err(MalformedKey::BadChecksum)
        );
    }

    #[test]
    fn headers_bearer_or_x_api_key() {
        let k = "vb_live_abc";
        assert_eq!(
            Presented::from_headers(Some("Bearer vb_live_abc"), None)
                .unwrap()
                .expose(),
            k
        );
        assert_eq!(
            Presented::from_headers(Some("  bEaReR   vb_live_abc \t"), None)
                .unwrap()
                .expose(),
            k
        );
        assert_eq!(
            Presented::from_headers(None, Some(" vb_live_abc "))
                .unwrap()
                .expose(),
            k
        );
        assert_eq!(
            Presented::from_headers(Some("Bearer vb_live_abc"), Some(k))
                .unwrap()
                .expose(),
            k
        );
        assert_eq!(
            Presented::from_headers(Some("Bearer vb_live_abc"), Some("vb_live_xyz")).unwrap_err(),
            HeaderError::Conflict
        );
        assert_eq!(
            Presented::from_headers(None, None).unwrap_err(),
            HeaderError::Missing
        );
        assert_eq!(
            Presented::from_headers(Some("  "), Some("")).unwrap_err(),
            HeaderError::Missing
        );
        assert_eq!(
            Presented::from_headers(Some("Basic dXNlcjpwYXNz"), None).unwrap_err(),
            HeaderError::UnsupportedScheme
        );
        assert_eq!(
            Presented::from_headers(Some("Bearer"), None).unwrap_err(),
            HeaderError::Missing
        );
        assert!(matches!(
            Presented::from_headers(Some("Bearer vb_live_a b"), None),
            Err(HeaderError::Malformed(MalformedKey::BadCharacter { .. }))
        ));
        assert_eq!(HeaderError::Conflict.code(), "conflicting_keys");
        assert_eq!(HeaderError::Missing.http_status(), 401);
        assert_eq!(HeaderError::Conflict.http_status(), 400);
        let err = Presented::from_headers(None, Some("vb_live_SECRETVALUE\u{7}")).unwrap_err();
        assert!(!err.to_string().contains("SECRETVALUE"));
    }

    /// HTTP's whitespace is spaces and tabs only: a header that another reader would split
    /// or trim differently (no-break, ideographic or line-separator spaces) is refused.
    #[test]
    fn only_spaces_and_tabs_separate_or_surround_a_key() {
        for authorization in [
            "Bearer\u{a0}vb_live_abc",
            "\u{3000}Bearer vb_live_abc",
            "Bearer vb_live_abc\u{2028}",
            // ASCII, but not HTTP's whitespace either (found by a reviewer).
            "Bearer vb_live_abc\u{c}",
            "\u{c}Bearer vb_live_abc",
            "Bearer \u{c}vb_live_abc",
            "Bearer vb_live_abc\r",
        ] {
            assert!(
                Presented::from_headers(Some(authorization), None).is_err(),
                "{authorization:?}"
            );
        }
        for x_api_key in ["vb_live_abc\u{85}", "\u{c}vb_live_abc", "vb_live_abc\r"] {
            let presented = Presented::from_headers(None, Some(x_api_key));
            assert!(presented.is_err(), "{x_api_key:?}");
        }
        assert!(Presented::from_headers(Some("Bearer\tvb_live_abc"), None).is_ok());
        assert!(
            Presented::new("vb_live_abc\n").is_ok(),
            "a line read from stdin"
        );
    }

    #[test]
    fn authorization_without_a_bearer_key_yields_to_x_api_key() {
        let k = "vb_live_abc";
        // A Basic header, or `Bearer` alone, yields to a key in x-api-key...
        for auth in ["Basic dXNlcjpwYXNz", "Bearer", "bearer   ", "Digest x=1"] {
            let got = Presented::from_headers(Some(auth), Some(" vb_live_abc "));
            assert_eq!(got.unwrap().expose(), k, "{auth}");
        }
        // ...but not to a malformed x-api-key, and a Bearer key still conflicts.
        assert!(matches!(
            Presented::from_headers(Some("Basic dXNlcjpwYXNz"), Some("vb_live_a\u{7}")),
            Err(HeaderError::Malformed(MalformedKey::BadCharacter { .. }))
        ));
        assert_eq!(
            Presented::from_headers(Some("Bearer vb_live_xyz"), Some(" vb_live_abc ")).unwrap_err(),
            HeaderError::Conflict
        );
        assert_eq!(
            Presented::from_headers(Some("Bearer  "), Some(" ")).unwrap_err(),
            HeaderError::Missing
        );
        assert_eq!(
            Presented::from_headers(Some("Basic dXNlcjpwYXNz"), Some("")).unwrap_err(),
            HeaderError::UnsupportedScheme
        );
    }

    /// The format with `sk_live_` accepted as a legacy prefix.
    fn with_legacy_prefix() -> KeyFormat {
        let config = Config::builder()
            .master_key(crate::MasterKey::generate().unwrap())
            .legacy_prefix("sk_live_")
            .build()
            .unwrap();
        KeyFormat::new(&config)
    }

    #[test]
    fn legacy_prefixes_parse_without_checksum_only_when_configured() {
        let key = "sk_live_0123456789abcdefXYZ";
        assert_eq!(format().parse(key), Err(MalformedKey::WrongPrefix));
        let f = with_legacy_prefix();
        assert_eq!(f.parse(key), Ok(KeyClass::Legacy));
        assert_eq!(f.classify_prefix("sk_live_0123"), Some(KeyClass::Legacy));
        assert_eq!(f.classify_prefix("vb_test_0123"), Some(KeyClass::Test));
        assert!(
            f.generate(KeyClass::Legacy)
                .unwrap()
                .expose()
                .starts_with("vb_live_")
        );
    }

    /// A megabyte of legacy prefixes with no digit holds no key, and finding that out looks
    /// a key's length past each start at most (scanned to the end from each, it took
    /// minutes: this test would not finish). A key after it, or glued to it, is found.
    #[test]
    fn a_long_run_of_legacy_prefixes_is_checked_in_linear_time() {
        let f = with_legacy_prefix();
        let text = "sk_live_".repeat(128 * 1024);
        assert!(!f.holds_key(&text, |_| false));
        let key = "sk_live_0123456789abcdefXYZ";
        assert!(f.holds_key(&format!("{text} {key}"), |_| false));
        assert!(f.holds_key(&format!("{key}{text}"), |_| false));
        // A run of key characters longer than a key: its letter and digit must be among
        // the first 100 after the prefix, as in any legacy key.
        assert!(f.holds_key(&format!("sk_live_a1{}", "x".repeat(200)), |_| false));
        assert!(!f.holds_key(&format!("sk_live_{}1", "x".repeat(200)), |_| false));
    }

    /// Most of a key of this format's own is a key: its checksum is a public function of
    /// what comes before it. Half a body with a letter and a digit is refused too; words
    /// after a prefix are not.
    #[test]
    fn most_of_an_own_key_is_found_and_words_after_a_prefix_are_not() {
        let f = format();
        for class in [KeyClass::Live, KeyClass::Test, KeyClass::Token] {
            let key = f.generate(class).unwrap();
            let key = key.expose();
            let unsigned = &key[..key.len() - CHECKSUM_LEN];
            for text in [
                unsigned.to_owned(),
                key[..key.len() - 1].to_owned(),
                format!("{unsigned}XXXXXX"),
                format!("admin via {unsigned}, see ticket"),
            ] {
                assert!(f.holds_key(&text, |_| false), "{text}");
            }
        }
        for text in [
            "vb_live_",
            "vb_live_migration_key",
            "vb_live_ProductionKeyForBillingTeam",
            "vb_test_0123456789abcd",
            "vb_tok_ab12",
        ] {
            assert!(!f.holds_key(text, |_| false), "{text}");
        }
        // Half a body (a fixed one: half of a random body lacks a digit one time in 17).
        assert!(f.holds_key("x vb_test_0123456789abcdeF", |_| false));
    }

    /// A public id is found where it starts, followed by anything, and only whole: the look
    /// reads no further than an id's length (it searched the rest of the text for a `_`).
    #[test]
    fn a_public_id_is_found_where_it_starts_and_only_whole() {
        let master = crate::MasterKey::generate().unwrap();
        let ids = crate::public_id::IdCipher::new(&master);
        let id = ids.encode(crate::public_id::IdKind::Token, 7);
        assert!(ids.starts_with_id(&format!("{id} and more")));
        assert!(!ids.starts_with_id(&id[..id.len() - 1]));
        assert!(!ids.starts_with_id(&format!("x{id}")));
        assert!(!ids.starts_with_id(&format!("tok{}", "-".repeat(1 << 20))));
        let f = KeyFormat::new(
            &Config::builder()
                .master_key(master)
                .token_prefix("tok_")
                .build()
                .unwrap(),
        );
        assert!(!f.holds_key(&format!("by {id}"), |at| ids.starts_with_id(at)));
    }

    #[test]
    fn legacy_length_errors_name_the_legacy_range() {
        let f = with_legacy_prefix();
        let short = f.parse("sk_live_short").unwrap_err();
        assert_eq!(
            short,
            MalformedKey::WrongLength {
                expected: 16,
                expected_max: 100,
                found: 5
            }
        );
        assert!(short.to_string().contains("expected 16–100"), "{short}");
        let native = f.parse("vb_live_short").unwrap_err().to_string();
        assert!(native.ends_with("expected 38"), "{native}");
        assert_eq!(
            f.parse(&format!("sk_live_{}", "x".repeat(101))),
            Err(MalformedKey::WrongLength {
                expected: 16,
                expected_max: 100,
                found: 101
            })
        );
    }

    #[test]
    fn visible_parts_are_twelve_and_four() {
        let (p, s) = format().visible_parts("vb_live_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789");
        assert_eq!((p.as_str(), s.as_str()), ("vb_live_ABCD", "6789"));
    }

    #[test]
    fn a_long_key_prefix_still_shows_four_characters_of_the_body() {
        let config = Config::builder()
            .master_key(crate::MasterKey::generate().unwrap())
            .live_prefix("acme_prod_1_")
            .test_prefix("ab_")
            .build()
            .unwrap();
        let f = KeyFormat::new(&config);
        let live = f.generate(KeyClass::Live).unwrap();
        let (p, _) = f.visible_parts(live.expose());
        assert_eq!(p, live.expose()[..16]);
        // A short prefix keeps the first 12 characters.
        let test = f.generate(KeyClass::Test).unwrap();
        assert_eq!(f.visible_parts(test.expose()).0, test.expose()[..12]);
    }

    /// Rejection sampling keeps every base62 character equally likely (DESIGN §3: 32 chars
    /// of OS randomness, ≥ 190 bits). Over 20,000 bodies (640,000 characters, about 10,323
    /// of each, standard deviation about 100) every character is within 8% of its share: a
    /// byte of 248 let through (`b <= 248`) makes `0` about 25% likelier; a wrong reduction
    /// leaves characters out altogether.
    #[test]
    fn generated_bodies_are_uniform_over_base62() {
        let f = format();
        let mut counts = [0u64; 256];
        const KEYS: usize = 20_000;
        for _ in 0..KEYS {
            let key = f.generate(KeyClass::Live).unwrap();
            let body = &key.expose().as_bytes()["vb_live_".len()..][..BODY_LEN];
            for &b in body {
                counts[usize::from(b)] += 1;
            }
        }
        let expected = (KEYS * BODY_LEN) as f64 / 62.0;
        for &c in BASE62 {
            let n = counts[usize::from(c)] as f64;
            assert!(
                (n - expected).abs() < expected * 0.08,
                "{} drawn {n} times, expected about {expected}",
                c as char
            );
        }
    }

    /// Every character of a key is checked, not a parity of them: a key with two bad
    /// characters is malformed at the first, before any hashing (DESIGN §4, step 1).
    #[test]
    fn a_key_with_two_bad_characters_is_malformed_at_the_first() {
        let f = format();
        let key = f.generate(KeyClass::Live).unwrap();
        let mut two_bad = key.expose().to_owned();
        two_bad.replace_range(10..12, "--");
        assert_eq!(
            f.parse(&two_bad),
            Err(MalformedKey::BadCharacter { position: 10 })
        );
    }

    /// A presented key of exactly the longest length is taken; one more is too long.
    #[test]
    fn a_presented_key_of_the_maximum_length_is_taken_and_one_more_is_too_long() {
        let at_max = format!("vb_live_{}", "a".repeat(MAX_PRESENTED_LEN - 8));
        assert_eq!(Presented::new(&at_max).unwrap().expose(), at_max);
        let header = format!("Bearer {at_max}");
        let from_header = Presented::from_headers(Some(&header), None).unwrap();
        assert_eq!(from_header.expose(), at_max);
        let over = format!("{at_max}a");
        assert_eq!(
            Presented::new(&over).unwrap_err(),
            HeaderError::Malformed(MalformedKey::TooLong {
                max: MAX_PRESENTED_LEN,
                found: MAX_PRESENTED_LEN + 1
            })
        );
    }

    /// A legacy key's bad character is named at its place in the key (prefix included).
    #[test]
    fn a_legacy_keys_bad_character_is_named_where_it_is() {
        let f = with_legacy_prefix();
        assert_eq!(
            f.parse("sk_live_0123456789abcdef\u{7}XYZ"),
            Err(MalformedKey::BadCharacter { position: 24 })
        );
    }

    proptest! {
        #[test]
        fn parser_never_panics(s in "\\PC{0,80}") {
            let _ = format().parse(&s);
            let _ = Presented::from_headers(Some(&s), Some(&s));
        }

        #[test]
        fn a_checksum_decodes_to_the_crc_it_encodes(crc in any::<u32>()) {
            prop_assert_eq!(decode_checksum(&encode_checksum(crc)), u64::from(crc));
        }

        #[test]
        fn any_single_character_change_is_rejected(pos in 8usize..46, c in "[0-9A-Za-z]") {
            let f = format();
            let key = f.generate(KeyClass::Test).unwrap();
            let mut bytes = key.expose().as_bytes().to_vec();
            let c = c.as_bytes()[0];
            prop_assume!(bytes[pos] != c);
            bytes[pos] = c;
            let mutated = String::from_utf8(bytes).unwrap();
            prop_assert!(f.parse(&mutated).is_err());
        }
    }
}
