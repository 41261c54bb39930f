//! keyledger: an embedded key-store engine for API servers — API keys and tokens stored as
//! peppered hashes, opaque public ids, accounts, route rules, leased credits that never
//! over-spend, rate limits, a credentials vault and an audit trail, all durable in
//! [redb](https://docs.rs/redb).
//!
//! ```
//! use keyledger::{Config, Ledger, NewAccount, NewKey, Presented, Request};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let ledger = Ledger::open(dir.path().join("keys.redb"), Config::ephemeral()?)?;
//! let account = ledger.accounts().create(NewAccount::new("Acme"))?;
//! let created = ledger.keys().by("alice").create(
//!     NewKey::new(&account.id, "CI deploy key").permissions(["quickhits:create"]).credits(10_000),
//! )?;
//! // Show `created.plaintext.expose()` to the customer once; only its hash is stored.
//! let header = format!("Bearer {}", created.plaintext.expose());
//! let presented = Presented::from_headers(Some(&header), None)?;
//! let grant = ledger.verify(&Request::new(&presented, "/api/v1/quickhits/create").cost(2))?;
//! assert_eq!(grant.key_id(), created.info.id);
//! let receipt = grant.commit(1); // the real cost; the other reserved unit is refunded
//! assert_eq!(receipt.token_stats.charged, 1);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod accounts;
mod audit;
#[doc(hidden)]
pub mod bench_support;
mod cache;
mod check;
mod clock;
mod codec;
mod config;
mod credits;
mod denial;
mod engine;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod hashing;
mod holders;
mod keyfmt;
mod keys;
mod ledger;
mod limits;
mod page;
mod policy;
mod public_id;
mod record;
mod routes;
mod secret;
mod store;
mod sweep;
mod vault;
mod verify;

pub use accounts::{Account, AccountUpdate, Accounts, NewAccount};
pub use audit::Audit;
pub use check::CheckReport;
pub use clock::{Clock, CoarseClock, ManualClock, SystemClock, Timestamp};
pub use config::{
    Config, ConfigBuilder, ENV_LEGACY_PREFIXES, ENV_LIVE_PREFIX, ENV_MASTER_KEY,
    ENV_MASTER_KEY_FILE, ENV_TEST_PREFIX, ENV_TOKEN_PREFIX,
};
pub use credits::events::{CreditEvent, CreditEventKind};
pub use credits::{Credits, LeaseWaits, NewPool, Pool, PoolUpdate, Usage};
pub use denial::Denial;
pub use engine::Durability;
pub use error::{CodecError, ConfigError, Error, HeaderError, InvalidId, MalformedKey, Result};
pub use hashing::HashScheme;
pub use keyfmt::{KeyClass, Presented};
pub use keys::{
    CreatedKey, ImportKey, ImportedHash, KeyInfo, KeyUpdate, Keys, MAX_ROLL_GRACE_SECS, NewKey,
};
pub use ledger::Ledger;
pub use limits::SpendTier;
pub use page::{DEFAULT_LIMIT, MAX_LIMIT, Page, PageRequest};
pub use public_id::PublicId;
pub use record::{
    AuditEvent, KeyKind, Limits, RateLimit, Refill, RefillInterval, RouteRule, SubscriptionStatus,
    TokenWindow,
};
pub use routes::{Routes, permits};
pub use secret::{MasterKey, Secret, names_a_master_key, shown_path};
pub use verify::{Grant, Pricing, RateState, Receipt, Request, TokenStats};

/// Engine counters, from [`Ledger::stats`]. More may come: read them by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Stats {
    /// Write transactions the writer thread committed: each one durable commit (redb's
    /// two-phase commit syncs the file twice for it).
    pub writer_commits: u64,
    /// Entries in the verification cache (keys and remembered misses).
    pub cached_entries: u64,
    /// Keys evicted from the cache to make room since open: each comes back as a miss (one
    /// redb read) at its next request. Its rate windows are kept meanwhile (unless 65,536
    /// other evicted keys' windows are held). Growing with traffic, it says the cache is
    /// smaller than the set of keys in use.
    pub cache_evictions: u64,
    /// Units found leased when the ledger was opened: lost to a crash before, now counted
    /// in `lost_to_crash`.
    pub lost_to_crash_at_open: u64,
    /// Credit balances (a key's or a pool's) whose stored record could not be decoded when
    /// the ledger was opened (`check` names them). Each is left as it is, and what it held
    /// leased is not in `lost_to_crash_at_open`. Only what needs that balance fails: a verify
    /// of a key spending from it is `unavailable`, a top-up, set or usage of it is
    /// `Error::Codec`; every other balance works as before.
    pub unreadable_balances_at_open: u64,
    /// Verifies that found their key's lease short and waited for the writer to lease more
    /// (one writer commit), by how long they waited.
    pub lease_waits: LeaseWaits,
    /// The most bytes the credit writer's lists of keys and meters in use have held at once
    /// since open (their capacities): a key used since the writer's last flush round stays
    /// listed, 8 bytes a key (its own meter with it) and 16 a pool, and a batch's working
    /// lists hold a chunk's worth (a few thousand) more.
    pub writer_list_bytes: u64,
    /// Usage counts (requests, spend, last use) of one key or account in one flush that
    /// could not be added to its usage record, because the stored record is unreadable
    /// (`check` names it). The record is left as it is; balances are not affected.
    pub usage_unwritable: u64,
    /// Credit events dropped since open because their channel was full: the host did not
    /// drain [`Ledger::credit_events`] fast enough. A dropped exhaustion is not sent again.
    pub events_dropped: u64,
}
pub use vault::{
    Connection, ConnectionInfo, Disconnected, DueRefresh, Health, OAuthGrant, OutboundHeader,
    OutboundRefusal, OutboundUrl, PROVIDER_NAME_MAX, Provider, ProviderError, ProviderErrorKind,
    REFRESH_DUE_WITHIN_SECS, SecretInfo, Secrets, Vault, normalize_provider_error,
};
