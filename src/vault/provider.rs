//! [`Provider`]: which service a connector's OAuth grant is for.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

use crate::error::{Error, Result};

/// Longest name of an [`Provider::Other`] provider.
pub const PROVIDER_NAME_MAX: usize = 32;

/// The service a connector holds credentials for.
///
/// Built-in providers are [`GoogleDrive`](Provider::GoogleDrive) (`google_drive`) and
/// [`Notion`](Provider::Notion) (`notion`); any other is [`Other`](Provider::Other) with a name
/// of 1–32 characters of `[a-z0-9_]`. Parse user input with [`str::parse`]: names that look
/// like a mistyped built-in (`Notion`, `google-drive`, `googledrive`, `google_drvie`: equal
/// after lowercasing and dropping separators, or one edit away) are refused with a suggestion
/// instead of silently creating a second, separate provider. Such names are reserved.
///
/// `Debug` prints what `Display` prints, as `Provider(notion)`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Provider {
    /// Google Drive (`google_drive`).
    GoogleDrive,
    /// Notion (`notion`).
    Notion,
    /// Any other provider, by name (`[a-z0-9_]{1,32}`, not a near-miss of a built-in).
    Other(String),
}

const BUILT_IN: [(&str, Provider); 2] = [
    ("google_drive", Provider::GoogleDrive),
    ("notion", Provider::Notion),
];

impl Provider {
    /// The provider's stored name (`google_drive`, `notion`, or the other provider's name).
    pub fn as_str(&self) -> &str {
        match self {
            Provider::GoogleDrive => "google_drive",
            Provider::Notion => "notion",
            Provider::Other(name) => name,
        }
    }

    /// A provider by name, validated as [`str::parse`] does.
    pub fn other(name: &str) -> Result<Provider> {
        name.parse()
    }

    /// The canonical, validated form of this provider: `Other("notion")` becomes `Notion`,
    /// and an invalid `Other` name is refused. Every vault call goes through this.
    pub(crate) fn validated(&self) -> Result<Provider> {
        match self {
            Provider::Other(name) => name.parse(),
            known => Ok(known.clone()),
        }
    }
}

impl FromStr for Provider {
    type Err = Error;

    fn from_str(name: &str) -> Result<Provider> {
        if let Some((_, p)) = BUILT_IN.iter().find(|(n, _)| *n == name) {
            return Ok(p.clone());
        }
        let squashed: String = name
            .chars()
            .filter(|c| !matches!(c, '_' | '-' | ' ' | '.'))
            .flat_map(char::to_lowercase)
            .collect();
        for (known, _) in BUILT_IN {
            let known_squashed = known.replace('_', "");
            if squashed == known_squashed || edit_distance_at_most_one(name, known) {
                return Err(Error::invalid(
                    "provider",
                    format!("unknown provider name; did you mean `{known}`?"),
                ));
            }
        }
        let valid = (1..=PROVIDER_NAME_MAX).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(Error::invalid(
                "provider",
                format!(
                    "expected google_drive, notion, or another provider's name of \
                     1–{PROVIDER_NAME_MAX} characters of [a-z0-9_]"
                ),
            ));
        }
        Ok(Provider::Other(name.to_owned()))
    }
}

/// Whether `a` becomes `b` by at most one insertion, deletion, substitution or swap of two
/// neighbouring characters.
fn edit_distance_at_most_one(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a == b {
        return true;
    }
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let (ra, rb) = (&a[prefix..], &b[prefix..]);
    match ra.len().cmp(&rb.len()) {
        std::cmp::Ordering::Equal => {
            ra[1..] == rb[1..]
                || (ra.len() >= 2 && ra[0] == rb[1] && ra[1] == rb[0] && ra[2..] == rb[2..])
        }
        std::cmp::Ordering::Less => ra == &rb[1..],
        std::cmp::Ordering::Greater => &ra[1..] == rb,
    }
}

impl fmt::Display for Provider {
    /// The provider's name. An unvalidated `Other` name that is not `[a-z0-9_]{1,32}` prints as
    /// `other`, so a value passed by mistake is never echoed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Provider::Other(_) if self.validated().is_err() => f.write_str("other"),
            p => f.write_str(p.as_str()),
        }
    }
}

impl fmt::Debug for Provider {
    /// `Provider(name)`, with the name as `Display` prints it: an invalid `Other` name may be
    /// a secret passed by mistake, and `Debug` reaches logs and panic messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Provider({self})")
    }
}

impl Serialize for Provider {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ins_and_others_parse() {
        assert_eq!(
            "google_drive".parse::<Provider>().unwrap(),
            Provider::GoogleDrive
        );
        assert_eq!("notion".parse::<Provider>().unwrap(), Provider::Notion);
        assert_eq!(
            "dropbox_2".parse::<Provider>().unwrap(),
            Provider::Other("dropbox_2".into())
        );
        assert_eq!(
            Provider::Other("notion".into()).validated().unwrap(),
            Provider::Notion
        );
        assert_eq!(Provider::Notion.to_string(), "notion");
    }

    #[test]
    fn typos_of_built_ins_get_a_suggestion() {
        for typo in [
            "Notion",
            "NOTION",
            "notoin",
            "notio",
            "notions",
            "google-drive",
            "googledrive",
            "Google Drive",
            "google_drvie",
            "google_driv",
            "gooogle_drive",
        ] {
            let err = typo.parse::<Provider>().unwrap_err().to_string();
            assert!(err.contains("did you mean"), "{typo}: {err}");
        }
        assert!("google".parse::<Provider>().is_ok());
    }

    #[test]
    fn invalid_names_are_refused_without_echo() {
        for bad in [
            "",
            "Dropbox",
            "drop box",
            "a-b",
            "ü",
            &"x".repeat(33),
            "tok_secret!",
        ] {
            let err = bad.parse::<Provider>().unwrap_err().to_string();
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
        assert_eq!(Provider::Other("Secret Token".into()).to_string(), "other");
    }

    #[test]
    fn debug_redacts_invalid_other_names_like_display() {
        let leaked = format!("{:?}", Provider::Other("tok_Secret-Token!".into()));
        assert!(!leaked.contains("Secret"), "{leaked}");
        assert_eq!(leaked, "Provider(other)");
        assert_eq!(
            format!("{:?}", Provider::Other("dropbox_2".into())),
            "Provider(dropbox_2)"
        );
        assert_eq!(format!("{:?}", Provider::Notion), "Provider(notion)");
    }

    #[test]
    fn edit_distance() {
        assert!(edit_distance_at_most_one("abc", "abc"));
        assert!(edit_distance_at_most_one("abc", "abd"));
        assert!(edit_distance_at_most_one("abc", "ab"));
        assert!(edit_distance_at_most_one("ab", "abc"));
        assert!(edit_distance_at_most_one("acb", "abc"));
        assert!(!edit_distance_at_most_one("abc", "xyz"));
        assert!(!edit_distance_at_most_one("", "ab"));
        assert!(edit_distance_at_most_one("", "a"));
    }
}
