//! Typed errors. Each says what went wrong and what the caller can do; none ever carries a
//! secret (they hold names, lengths and positions, never values).

use thiserror::Error;

/// Why a [`Config`](crate::Config) could not be built or a master key could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No master key was configured.
    #[error(
        "no master key: set KEYLEDGER_MASTER_KEY to 64 hex digits, or point \
         KEYLEDGER_MASTER_KEY_FILE at a key file with mode 0600 (`keyledger init` writes one)"
    )]
    MissingMasterKey,
    /// The master key had the wrong number of bytes.
    #[error("the master key must be exactly 32 bytes, found {found}")]
    MasterKeyLength {
        /// Bytes found.
        found: usize,
    },
    /// The textual master key was not 64 hex digits.
    #[error("the master key must be 64 hex digits, found {found_chars} characters")]
    MasterKeyEncoding {
        /// Characters found (the value itself is never echoed).
        found_chars: usize,
    },
    /// The textual master key had 64 characters, not all of them hex digits.
    #[error("the master key must be 64 hex digits; character {position} is not one")]
    MasterKeyNotHex {
        /// Where the first other character is, counting from 1 (the value is never echoed).
        position: usize,
    },
    /// The key file could not be read or written.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// Path of the key file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The key file is readable by group or others.
    #[error("key file {path} has mode {mode:o}; it must be 0600 (chmod 600 {path})")]
    KeyFilePermissions {
        /// Path of the key file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The OS random number generator failed.
    #[error("the OS random number generator failed: {0}")]
    Randomness(String),
    /// A setting had an unusable value.
    #[error("invalid setting {setting}: {reason}")]
    InvalidSetting {
        /// The setting's name.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a presented key was rejected before any hashing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MalformedKey {
    /// The key is empty.
    #[error("the key is empty")]
    Empty,
    /// The key does not start with a configured prefix.
    #[error("the key does not start with a known prefix")]
    WrongPrefix,
    /// The key has the wrong length.
    #[error(
        "the key has {found} characters after its prefix, expected {}",
        length_range(*.expected, *.expected_max)
    )]
    WrongLength {
        /// Expected characters after the prefix: the fewest, for a legacy prefix.
        expected: usize,
        /// The most characters allowed after the prefix: `expected`, except for a legacy
        /// prefix, whose keys (from another system) may have a range of lengths.
        expected_max: usize,
        /// Characters found.
        found: usize,
    },
    /// The value is longer than any key can be, prefix included.
    #[error("the value has {found} characters, more than any key ({max})")]
    TooLong {
        /// The most characters a key can have.
        max: usize,
        /// Characters found.
        found: usize,
    },
    /// The key contains a character outside base62.
    #[error("the key has an invalid character at position {position}")]
    BadCharacter {
        /// Byte position of the first invalid character.
        position: usize,
    },
    /// The checksum does not match: the key was mistyped or truncated.
    #[error("the key's checksum does not match (mistyped or altered key)")]
    BadChecksum,
}

/// `38`, or `16–100` for a range.
fn length_range(min: usize, max: usize) -> String {
    if min == max {
        min.to_string()
    } else {
        format!("{min}–{max}")
    }
}

/// Why no key could be taken from request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// Neither `Authorization: Bearer …` nor `x-api-key` was present.
    #[error("no API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    /// The request carries two different keys (`Authorization` and `x-api-key`, or one of
    /// them sent twice).
    #[error("the request carries two different API keys; send only one")]
    Conflict,
    /// `Authorization` used a scheme other than Bearer.
    #[error("the Authorization header must use the Bearer scheme")]
    UnsupportedScheme,
    /// The key itself is malformed.
    #[error("malformed API key: {0}")]
    Malformed(#[from] MalformedKey),
}

impl HeaderError {
    /// A stable code for API responses: `missing_key`, `conflicting_keys`,
    /// `unsupported_scheme` or `malformed`.
    pub fn code(&self) -> &'static str {
        match self {
            HeaderError::Missing => "missing_key",
            HeaderError::Conflict => "conflicting_keys",
            HeaderError::UnsupportedScheme => "unsupported_scheme",
            HeaderError::Malformed(_) => "malformed",
        }
    }

    /// The HTTP status a server should return: 400 for two different keys (a malformed
    /// request, as RFC 6750 §3.1 answers more than one credential), otherwise 401.
    pub fn http_status(&self) -> u16 {
        match self {
            HeaderError::Conflict => 400,
            _ => 401,
        }
    }
}

/// A public id that was forged, truncated, tampered with or of another kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
#[error("invalid {expected} id{}", named_as(*given))]
pub struct InvalidId {
    /// The kind of id that was expected (`key`, `account`, …).
    pub expected: &'static str,
    /// The other kind the id's prefix names, if it names one (`tok_…` where a key id was
    /// expected: `token`): the usual slip, worth saying.
    pub given: Option<&'static str>,
}

fn named_as(given: Option<&str>) -> String {
    given.map_or_else(String::new, |kind| {
        format!(" (its prefix is for {kind} ids)")
    })
}

/// A record of a newer schema is no damage: said as such, with what to do.
fn stored_record_message(e: &CodecError) -> String {
    if e.is_newer() {
        format!("written by a newer keyledger: {e}; upgrade keyledger to read it")
    } else {
        format!("corrupt database: {e}")
    }
}

/// Why bytes could not be decoded as a record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// No bytes at all (not even the schema-version byte).
    #[error("empty record")]
    Empty,
    /// A schema version this build does not know.
    #[error("{record} record has schema version {found}; this build reads up to {supported}")]
    UnknownVersion {
        /// Record type.
        record: &'static str,
        /// Version byte found.
        found: u8,
        /// Newest version this build reads.
        supported: u8,
    },
    /// The record's bytes are not those its checksum was taken of: damaged since written.
    #[error("{record} record fails its checksum: damaged since it was written")]
    Checksum {
        /// Record type.
        record: &'static str,
    },
    /// The payload did not decode.
    #[error("{record} record is corrupt: {reason}")]
    Corrupt {
        /// Record type.
        record: &'static str,
        /// Decoder message (never contains field values).
        reason: String,
    },
    /// A stored row that does not decode, named: met by a listing (an owner's keys, pools,
    /// connectors or secrets, the accounts, a page of the audit trail), which fails rather
    /// than leave it out and hide the damage; by a call on a vault row that needs what it
    /// held; or by [`Ledger::open`](crate::Ledger::open) among the route rules.
    /// [`Ledger::check`](crate::Ledger::check) names every such row of the file.
    #[error("{}", row_message(row, error, remedy))]
    Row {
        /// The row: a key's, pool's or account's public id, `acct_…/connectors/PROVIDER`,
        /// `acct_…/secrets/NAME` (the form `check` and the audit trail name it by),
        /// `audit event SEQ` or `route rule "PREFIX"`. Never the row's bytes.
        row: String,
        /// What is wrong with the row's bytes.
        #[source]
        error: Box<CodecError>,
        /// What to do about the row, as text: the call that removes or replaces it
        /// (``"`secrets().delete` removes it, `secrets().put` replaces it"``), how to read
        /// past it (an audit event), or, where no call removes it (an account, a route rule
        /// the ledger cannot open without), restoring a backup.
        remedy: &'static str,
    },
}

impl CodecError {
    /// This error, said of the stored row `row` (a public id, `acct_…/secrets/NAME`; never
    /// the row's bytes) with what the caller can do about it (see [`CodecError::Row`]).
    pub(crate) fn of_row(self, row: String, remedy: &'static str) -> CodecError {
        CodecError::Row {
            row,
            error: Box::new(self),
            remedy,
        }
    }

    /// Whether the record is of a schema version newer than this build's: written by a
    /// newer keyledger (or damaged into one), not damage to restore from a backup.
    fn is_newer(&self) -> bool {
        match self {
            CodecError::UnknownVersion {
                found, supported, ..
            } => found > supported,
            CodecError::Row { error, .. } => error.is_newer(),
            _ => false,
        }
    }
}

/// [`CodecError::Row`]'s message: the row, what is wrong, and what to do — for a newer
/// schema, only if no newer release wrote it (the caller's message says to upgrade).
fn row_message(row: &str, error: &CodecError, remedy: &str) -> String {
    if error.is_newer() {
        format!("{row}: {error}; if no newer keyledger wrote it, {remedy}")
    } else {
        format!("{row}: {error}; {remedy}")
    }
}

/// The error of every ledger operation other than parsing and `verify`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Configuration or master key problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The storage engine failed (I/O, corruption detected by redb).
    #[error("storage: {0}")]
    Storage(#[source] Box<redb::Error>),
    /// The database file is open already: redb lets one [`Ledger`](crate::Ledger) at a time
    /// hold it, in this process or another. Its holder releases it when it exits or drops its
    /// last clone (`close` alone does not release the file).
    #[error(
        "the database is already open (by another process — a running server? — or by another \
         Ledger in this one); one may hold it at a time"
    )]
    InUse,
    /// The ledger was closed ([`Ledger::close`](crate::Ledger::close)): it changes nothing
    /// more. To go on, drop every clone and open the file again (until then the open fails
    /// with [`Error::InUse`]).
    #[error("the ledger is closed")]
    Closed,
    /// A stored record did not decode: the file is corrupt or was written by a newer build.
    #[error("{}", stored_record_message(.0))]
    Codec(#[from] CodecError),
    /// The database was written by a newer keyledger; upgrade this build to open it.
    #[error(
        "database format version {found} is newer than this build supports ({supported}); upgrade keyledger"
    )]
    UpgradeRequired {
        /// Format version in the file.
        found: u32,
        /// Newest format version this build supports.
        supported: u32,
    },
    /// `check` was given a file of an older format, which only opening it migrates.
    #[error(
        "database format version {found} is older than this build's ({current}): check it with the release that wrote it, or open it once (which migrates it) and check it then"
    )]
    OlderFormat {
        /// Format version in the file.
        found: u32,
        /// The format version this build writes.
        current: u32,
    },
    /// The file exists but holds nothing: a ledger that lost its bytes (a failed copy or
    /// restore), not a place to start a new one — its keys would all be `not_found`.
    #[error("{path} exists but is empty: restore it, or remove it to start a new ledger")]
    EmptyFile {
        /// The file's path.
        path: String,
    },
    /// The file is a redb database but not a keyledger one.
    #[error("{path} is not a keyledger database")]
    NotALedger {
        /// The file's path.
        path: String,
    },
    /// The master key does not match the one the database was created with.
    #[error("the master key does not match this database (wrong KEYLEDGER_MASTER_KEY or key file)")]
    WrongMasterKey,
    /// A public id was forged, tampered with or of the wrong kind.
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    /// A presented key is malformed.
    #[error("malformed key: {0}")]
    MalformedKey(#[from] MalformedKey),
    /// An argument failed validation; nothing was written.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The field at fault.
        field: &'static str,
        /// What is wrong, without echoing secret values.
        reason: String,
    },
    /// No such record (or it belongs to another owner).
    #[error("{what} not found")]
    NotFound {
        /// What was looked for (`key`, `account`, `route rule`…).
        what: &'static str,
    },
    /// The operation conflicts with existing state, or could not finish; nothing was
    /// written unless the message says what was (a key update whose settings were saved
    /// but whose balance was not set; a close that returned every lease but found grants
    /// still held).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A change's commit failed where it may already have reached the disk (the disk
    /// failed at the commit's last sync): whether it is durable is known only once the
    /// ledger is reopened. After such an error this process reads and writes nothing more:
    /// cached keys the change touched are dropped, and a cache miss answers
    /// [`Denial::Unavailable`](crate::Denial::Unavailable) rather than read state the
    /// change may have replaced. Do not repeat the change blindly: a top-up repeated would
    /// count twice.
    #[error(
        "{what} may have been made: its commit failed ({reason}); reopen the ledger to see whether it is durable"
    )]
    Uncertain {
        /// What may have been made (`balance change`, `the change`).
        what: &'static str,
        /// The storage error.
        reason: String,
    },
    /// A stored credential did not decrypt: its ciphertext was moved to another owner's or
    /// provider's row, tampered with, or written under another master key. Reconnect the
    /// connector or put the secret again.
    #[error(
        "stored {what} does not decrypt for this owner and name \
         (moved, tampered with, or written under another master key)"
    )]
    DecryptionFailed {
        /// What failed to decrypt (`connector credential`, `owner secret`).
        what: &'static str,
    },
    /// A stored secret was not attached to an outbound request; nothing was sent.
    #[error(transparent)]
    Refused(#[from] OutboundRefusal),
}

/// Why a stored owner secret was not attached to an outbound request. Names the secret and the
/// host, never the secret's value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OutboundRefusal {
    /// The url did not parse, or is ambiguous between url parsers (whitespace, control
    /// characters, backslashes). Pass an absolute `https://host/path` url.
    #[error("refused to attach secret `{secret}`: the url is not usable ({reason})")]
    InvalidUrl {
        /// The secret's name.
        secret: String,
        /// What is wrong with the url (never the url itself, which may carry credentials).
        reason: String,
    },
    /// The url is not https (http is allowed only for loopback hosts).
    #[error(
        "refused to attach secret `{secret}` to {host}: scheme `{scheme}` is not allowed \
         (https only; http only for localhost and loopback addresses)"
    )]
    InsecureScheme {
        /// The secret's name.
        secret: String,
        /// The url's host.
        host: String,
        /// The url's scheme.
        scheme: String,
    },
    /// The url's host and port are not in the secret's allowed hosts.
    #[error(
        "refused to attach secret `{secret}` to {host}: not in its allowed hosts \
         (add the host, or a `*.domain` pattern, with `secrets().put`)"
    )]
    HostNotAllowed {
        /// The secret's name.
        secret: String,
        /// The url's host, with its port when it is not the scheme's default.
        host: String,
    },
    /// The url carries user info (`user:pass@host`), a common way to disguise the real host.
    #[error("refused to attach secret `{secret}` to {host}: the url carries user info; remove it")]
    UserInfo {
        /// The secret's name.
        secret: String,
        /// The url's host.
        host: String,
    },
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidInput {
            field,
            reason: reason.into(),
        }
    }

    /// A record that did not decode, named as `row` (a public id; never
    /// the row's bytes) with `remedy`, the call that removes or replaces it. Any other error
    /// is returned as it is.
    pub(crate) fn of_row(self, row: impl FnOnce() -> String, remedy: &'static str) -> Error {
        match self {
            Error::Codec(e) => e.of_row(row(), remedy).into(),
            e => e,
        }
    }
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                match redb::Error::from(e) {
                    redb::Error::DatabaseAlreadyOpen => Error::InUse,
                    // A read past the file's end: a page number or length in the file points
                    // beyond it. Damage (or a file cut short), not a failing disk.
                    redb::Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        Error::Storage(Box::new(redb::Error::Corrupted(format!(
                            "a read went past the end of the file ({e}): the file is damaged \
                             or was cut short; restore it from a backup"
                        ))))
                    }
                    e => Error::Storage(Box::new(e)),
                }
            }
        }
    )*};
}
storage_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Shorthand for `Result<T, keyledger::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
