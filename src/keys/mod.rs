//! Key and token lifecycle: create (plaintext returned once), import by hash, list with a
//! cursor, get, update, disable/enable, roll, delete, and masked look-up by visible prefix.
//!
//! Every write validates first and touches the database only in one transaction that also
//! maintains the indexes and appends the audit event, so a rejected write changes nothing.

mod builders;
pub(crate) mod index;
pub(crate) mod lookup;

use std::collections::BTreeMap;

use redb::{ReadableTable, WriteTransaction};
use serde::Serialize;

use builders::Settings;
pub use builders::{ImportKey, ImportedHash, KeyUpdate, NewKey};

use crate::audit;
use crate::cache::Slot;
use crate::clock::Timestamp;
use crate::credits::refill;
use crate::credits::writer::{Adjust, AuditLine};
use crate::engine::KeyChange;
use crate::error::{Error, Result};
use crate::hashing::{HashScheme, KeyHash};
use crate::keyfmt::{KeyClass, MAX_VISIBLE_PREFIX_LEN, VISIBLE_PREFIX_LEN, VISIBLE_SUFFIX_LEN};
use crate::ledger::{Ledger, SYSTEM_ACTOR};
use crate::page::{Page, PageRequest};
use crate::public_id::{IdKind, PublicId};
use crate::record::{
    CreditsRecord, KeyKind, KeyRecord, Limits, RateLimit, Refill, RolledSecret, rules,
};
use crate::secret::Secret;
use crate::store::{self, tables::*};

/// Most keys `find_by_prefix` returns.
const FOUND_BY_PREFIX: usize = 100;
/// Keys an owner-scoped `find_by_prefix` reads under the prefix before it reads the owner's.
const OTHERS_READ_BY_PREFIX: usize = 1_000;

/// A key or token as callers see it: never the plaintext or hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// Public id (`key_…` or `tok_…`).
    pub id: PublicId,
    /// Owning account's public id.
    pub owner: PublicId,
    /// API key or token (with its type); serialized as `type`: `api` or the token's type.
    #[serde(rename = "type", serialize_with = "kind_label")]
    pub kind: KeyKind,
    /// Live, test or token.
    pub class: KeyClass,
    /// Display name.
    pub name: String,
    /// Masked form for display: `vb_live_AbCd…wxyz`.
    pub masked: String,
    /// First 12 characters, or the key prefix and 4 more when that is longer.
    pub prefix: String,
    /// Last 4 characters.
    pub suffix: String,
    /// Granted scopes.
    pub permissions: Vec<String>,
    /// IP allowlist as CIDR ranges (empty: any).
    pub ips: Vec<String>,
    /// Credits, refill, rate limits, token window.
    pub limits: Limits,
    /// Credits left to spend (`None`: unmetered); for a pool key, the pool's.
    pub remaining_credits: Option<u64>,
    /// The credit pool the key spends from, if any.
    pub pool: Option<PublicId>,
    /// Free-form metadata.
    pub metadata: BTreeMap<String, String>,
    /// Creation time.
    pub created_at: Timestamp,
    /// Creator.
    pub created_by: String,
    /// Last change.
    pub updated_at: Timestamp,
    /// Last changed by.
    pub updated_by: String,
    /// Expiry, if any.
    pub expires_at: Option<Timestamp>,
    /// When it was disabled, if it is.
    pub disabled_at: Option<Timestamp>,
    /// Last successful verify. Exact while the key is in this process's cache; otherwise the
    /// last one written to disk, which the writer does every
    /// [`usage_flush_interval`](crate::ConfigBuilder::usage_flush_interval) and at `flush`,
    /// `usage` and a clean close.
    pub last_used_at: Option<Timestamp>,
    /// Until when the previous secret of a rolled key still works; `None` once it has stopped
    /// (or the key was never rolled).
    pub previous_secret_valid_until: Option<Timestamp>,
    /// Scheme of the stored hash.
    pub hash_scheme: String,
    /// Record schema version.
    pub schema_version: u8,
}

/// The longest a rolled key's old secret keeps working: 30 days.
pub const MAX_ROLL_GRACE_SECS: u64 = 30 * 86_400;

/// A freshly created (or rolled) key: the only time its plaintext is available.
#[derive(Debug)]
pub struct CreatedKey {
    /// The stored record's view.
    pub info: KeyInfo,
    /// The plaintext. Show it to its owner once; it cannot be recovered.
    pub plaintext: Secret,
}

/// Key or token operations. Get one with [`Ledger::keys`] or [`Ledger::tokens`].
pub struct Keys<'a> {
    ledger: &'a Ledger,
    kind: IdKind,
    actor: String,
    owner: Option<u64>,
}

impl std::fmt::Debug for Keys<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The owner by its public id: internal ids never leave the crate.
        let owner = self
            .owner
            .map(|id| self.ledger.inner.ids.encode(IdKind::Account, id));
        f.debug_struct("Keys")
            .field("kind", &self.kind)
            .field("actor", &self.actor)
            .field("owner", &owner)
            .finish_non_exhaustive()
    }
}

pub(crate) const KIND_API: u8 = 0;
pub(crate) const KIND_TOKEN: u8 = 1;

/// How a new record's secret came to the ledger.
#[derive(Clone, Copy)]
enum Origin<'h> {
    /// Generated here; its plaintext was returned once.
    Created,
    /// Imported by its hash (as given: for a SHA-256, the plain digest), which stays
    /// reserved for the record's life. Borrowed from the [`ImportedHash`], which wipes it
    /// when the import is done: no copy of it is made.
    Imported { reserved: &'h KeyHash },
}

impl Origin<'_> {
    /// The verb of its audit action (`key.created`, `key.imported`).
    fn verb(self) -> &'static str {
        match self {
            Origin::Created => "created",
            Origin::Imported { .. } => "imported",
        }
    }
}

impl<'a> Keys<'a> {
    pub(crate) fn new(ledger: &'a Ledger, kind: IdKind) -> Self {
        Keys {
            ledger,
            kind,
            actor: SYSTEM_ACTOR.into(),
            owner: None,
        }
    }

    /// The same handle, recording `actor` as the author of its changes: 1–254 characters,
    /// no control characters and no API key (a change by an actor that breaks these is
    /// refused as [`Error::InvalidInput`](crate::Error::InvalidInput) on `actor`).
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// The same handle, restricted to keys of `owner`: any other owner's key is `NotFound`.
    pub fn owned_by(mut self, owner: &str) -> Result<Self> {
        self.owner = Some(self.ledger.inner.ids.decode(IdKind::Account, owner)?);
        Ok(self)
    }

    fn kind_tag(&self) -> u8 {
        if self.kind == IdKind::Token {
            KIND_TOKEN
        } else {
            KIND_API
        }
    }

    fn what(&self) -> &'static str {
        self.kind.noun()
    }

    /// Creates a key and returns its plaintext, this once.
    pub fn create(&self, new: NewKey) -> Result<CreatedKey> {
        self.ledger.guarded(|| {
            let s = new.settings;
            let class = self.class_for(&s)?;
            let plaintext = self.ledger.inner.format.generate(class)?;
            let hasher = self.ledger.hasher();
            let (prefix, suffix) = self.ledger.inner.format.visible_parts(plaintext.expose());
            let hash = hasher.hash_current(plaintext.expose());
            let origin = Origin::Created;
            let info = self.insert(s, class, hash, hasher.current(), prefix, suffix, origin)?;
            Ok(CreatedKey { info, plaintext })
        })
    }

    /// Imports a key issued elsewhere by its hash; its holder keeps using the same plaintext.
    ///
    /// The hash stays reserved for as long as the record exists, so importing it again is
    /// [`Error::Conflict`] even after the key's first use rehashed it to the current scheme,
    /// or a roll replaced it: one plaintext has one record, and deleting it revokes the
    /// plaintext. (A file from before these reservations keeps none for keys imported and
    /// rehashed then.)
    pub fn import(&self, import: ImportKey) -> Result<KeyInfo> {
        self.ledger.guarded(|| {
            let asked = self.class_for(&import.settings)?;
            let class = self
                .ledger
                .inner
                .format
                .classify_prefix(&import.prefix)
                .ok_or_else(|| {
                    Error::invalid(
                        "prefix",
                        "an imported key's visible prefix must start with a configured key prefix \
                 or a legacy prefix (Config::builder().legacy_prefix(..))",
                    )
                })?;
            let class_fits = match self.kind {
                IdKind::Token => matches!(class, KeyClass::Token | KeyClass::Legacy),
                _ => class != KeyClass::Token,
            };
            if !class_fits {
                let reason = match self.kind {
                    IdKind::Token => "an API key prefix is imported through keys(), not tokens()",
                    _ => "a token prefix is imported through tokens(), not keys()",
                };
                return Err(Error::invalid("prefix", reason));
            }
            // The prefix the key's holder presents decides its class: `.test()` cannot make a
            // live-prefixed key a test key.
            if asked == KeyClass::Test && class != KeyClass::Test {
                return Err(Error::invalid(
                    "test",
                    "an imported key's class comes from its prefix, which is not a test prefix",
                ));
            }
            // A SHA-256 is stored keyed (never plain) and reserved as given, as files before
            // format 8 reserved it.
            let (hash, scheme, reserved) = match &import.hash {
                ImportedHash::Sha256(h) => (
                    self.ledger.hasher().imported(h),
                    HashScheme::Sha256Imported,
                    h,
                ),
                ImportedHash::Current(h) => (*h, self.ledger.hash_scheme(), h),
            };
            let visible_ok = |s: &str, max: usize| {
                s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic() && b != b'*')
            };
            let format = &self.ledger.inner.format;
            if !visible_ok(&import.prefix, format.visible_prefix_len(&import.prefix))
                || !visible_ok(&import.suffix, VISIBLE_SUFFIX_LEN)
            {
                return Err(Error::invalid(
                    "prefix",
                    "a visible prefix of at most 12 characters (or the key prefix and 4 more, \
                     when longer) and a suffix of at most 4, in printable ASCII",
                ));
            }
            self.insert(
                import.settings,
                class,
                hash,
                scheme,
                import.prefix,
                import.suffix,
                Origin::Imported { reserved },
            )
        })
    }

    fn class_for(&self, s: &Settings) -> Result<KeyClass> {
        match (self.kind, &s.token_type, s.test) {
            (IdKind::Token, Some(_), false) => Ok(KeyClass::Token),
            (IdKind::Token, Some(_), true) => {
                Err(Error::invalid("test", "tokens have no test mode"))
            }
            (IdKind::Token, None, _) => Err(Error::invalid("type", "a token needs a type")),
            (_, Some(_), _) => Err(Error::invalid("type", "use tokens() to create a token")),
            (_, None, true) => Ok(KeyClass::Test),
            (_, None, false) => Ok(KeyClass::Live),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        s: Settings,
        class: KeyClass,
        key_hash: KeyHash,
        scheme: HashScheme,
        key_prefix: String,
        key_suffix: String,
        origin: Origin<'_>,
    ) -> Result<KeyInfo> {
        let owner = self.ledger.inner.ids.decode(IdKind::Account, &s.owner)?;
        if self.owner.is_some_and(|o| o != owner) {
            return Err(Error::NotFound { what: "account" });
        }
        let now = self.ledger.now();
        self.no_key_in(
            &s.permissions,
            &s.ips,
            Some(&s.metadata),
            &s.limits.rate_limits,
        )?;
        let kind = match s.token_type {
            // `api` is what an API key's `type` reads: a token typed so (in any case, with any
            // spaces around it) would read as one.
            Some(t)
                if t.chars()
                    .filter(|&c| !rules::invisible(c))
                    .collect::<String>()
                    .trim()
                    .eq_ignore_ascii_case(KeyKind::Api.label()) =>
            {
                return Err(Error::invalid("type", "`api` is the type of API keys"));
            }
            Some(t) => KeyKind::Token {
                token_type: self.ledger.label("type", &t)?,
            },
            None => KeyKind::Api,
        };
        let record = KeyRecord {
            kind,
            class,
            owner,
            name: self.ledger.label("name", &s.name)?,
            key_prefix,
            key_suffix,
            key_hash,
            scheme,
            permissions: rules::scopes(&s.permissions)?,
            ips: rules::ips(&s.ips)?,
            limits: {
                if s.pool.is_some() && s.limits.refill.is_some() {
                    return Err(pool_refill());
                }
                let unmetered = s.pool.is_none() && s.limits.credits.is_none();
                if unmetered && s.limits.low_balance_threshold.is_some() {
                    return Err(unmetered_threshold());
                }
                rules::limits(&s.limits)?;
                s.limits
            },
            metadata: {
                rules::metadata(&s.metadata)?;
                s.metadata
            },
            created_at: now,
            created_by: self.actor.clone(),
            updated_at: now,
            updated_by: self.actor.clone(),
            expires_at: checked_expiry(s.expires_at, now)?,
            disabled_at: None,
            last_used_at: None,
            rolled: None,
            pool: None,
        };
        let mut record = record;
        if let Some(pool) = &s.pool {
            if record.limits.credits.is_some() {
                return Err(Error::invalid(
                    "pool",
                    "a key spends from a pool or its own credits, not both",
                ));
            }
            if record.limits.low_balance_threshold.is_some() {
                return Err(pool_threshold());
            }
            record.pool = Some(self.ledger.inner.ids.decode(IdKind::Pool, pool)?);
        }
        let master = &self.ledger.inner.config.master_key;
        let txn = self.ledger.inner.store.begin_write()?;
        if txn.open_table(ACCOUNTS)?.get(owner)?.is_none() {
            return Err(Error::NotFound { what: "account" });
        }
        if let Some(pool) = record.pool {
            let pool: Option<crate::record::PoolRecord> =
                store::get(&txn.open_table(POOLS)?, pool)?;
            if pool.is_none_or(|p| p.owner != owner) {
                return Err(Error::NotFound { what: "pool" });
            }
        }
        // A hash live in the verify index, or one a key still in the ledger was imported by
        // (rehashed by its first use, or rolled, since): a second record of one plaintext
        // would keep it working after the first is deleted.
        let reserved: &KeyHash = match origin {
            Origin::Imported { reserved } => reserved,
            Origin::Created => &key_hash,
        };
        if txn.open_table(KEY_VERIFY)?.get(&key_hash)?.is_some()
            || index::import_reserved(&txn, master, reserved)?
        {
            return Err(Error::Conflict(
                "a key with this hash already exists".into(),
            ));
        }
        let id = store::next_id(&txn)?;
        index::put(&txn, &mut txn.open_table(KEYS)?, id, &record)?;
        self.index(&txn, id, &record)?;
        if let Origin::Imported { reserved } = origin {
            index::reserve_import(&txn, master, reserved, id)?;
        }
        if let (Some(credits), None) = (record.limits.credits, record.pool) {
            let credits = new_balance(credits, record.limits.refill, now);
            store::put(&mut txn.open_table(CREDITS)?, id, &credits)?;
        }
        let public = self.public_id(id);
        let action = format!("{}.{}", self.what(), origin.verb());
        audit::append(&txn, self.ledger, now, &self.actor, &action, &public, &[])?;
        txn.commit_then(|_| match scheme == self.ledger.hash_scheme() {
            true => self.ledger.inner.engine.key_created(&key_hash),
            false => self.ledger.inner.engine.hashes_changed(),
        })?;
        Ok(self.view(id, record))
    }

    /// Counts the record's current hash and adds its index entries (its verify entries are
    /// written with the record, by [`index::put`]).
    fn index(&self, txn: &WriteTransaction, id: u64, r: &KeyRecord) -> Result<()> {
        store::adjust_scheme_count(txn, r.scheme, 1)?;
        txn.open_table(KEYS_BY_OWNER)?
            .insert((r.owner, self.kind_tag(), id), ())?;
        txn.open_table(KEYS_BY_PREFIX)?
            .insert((r.key_prefix.as_str(), id), ())?;
        Ok(())
    }

    /// Removes the record's hashes (current and rolled) and index entries.
    fn unindex(&self, txn: &WriteTransaction, id: u64, r: &KeyRecord) -> Result<()> {
        index::remove(txn, &r.key_hash)?;
        store::adjust_scheme_count(txn, r.scheme, -1)?;
        if let Some(old) = &r.rolled {
            index::remove(txn, &old.key_hash)?;
            store::adjust_scheme_count(txn, old.scheme, -1)?;
        }
        txn.open_table(KEYS_BY_OWNER)?
            .remove((r.owner, self.kind_tag(), id))?;
        txn.open_table(KEYS_BY_PREFIX)?
            .remove((r.key_prefix.as_str(), id))?;
        Ok(())
    }

    /// Reads a key.
    pub fn get(&self, id: &str) -> Result<KeyInfo> {
        self.ledger.guarded(|| {
            let internal = self.internal_id(id)?;
            let read = self.ledger.inner.store.begin_read()?;
            let record = self.load(&read.open_table(KEYS)?, internal)?;
            Ok(self.view(internal, record))
        })
    }

    /// Lists `owner`'s keys (or tokens) in creation order, a page at a time.
    ///
    /// A record that does not decode (damaged, or written by a newer schema) fails the page
    /// with [`Error::Codec`]`(`[`CodecError::Row`](crate::CodecError::Row)`)`, which names
    /// the key by its public id (as [`Ledger::check`](crate::Ledger::check) does): the page
    /// is not given without it, which would hide the damage. [`delete`](Self::delete)
    /// removes such a key.
    pub fn list(&self, owner: &str, page: &PageRequest) -> Result<Page<KeyInfo>> {
        self.ledger.guarded(|| {
            let owner = self.ledger.inner.ids.decode(IdKind::Account, owner)?;
            if self.owner.is_some_and(|o| o != owner) {
                return Err(Error::NotFound { what: "account" });
            }
            let limit = page.checked_limit()?;
            let owner_bytes = owner.to_be_bytes();
            let ad: [&[u8]; 3] = [b"cursor", self.kind.prefix().as_bytes(), &owner_bytes];
            let start = match &page.cursor {
                Some(c) => self.ledger.inner.ids.open(&ad, c).ok_or_else(|| {
                    Error::invalid("cursor", "not a cursor issued for this listing")
                })?,
                None => 0,
            };
            let read = self.ledger.inner.store.begin_read()?;
            if read.open_table(ACCOUNTS)?.get(owner)?.is_none() {
                return Err(Error::NotFound { what: "account" });
            }
            let index = read.open_table(KEYS_BY_OWNER)?;
            let keys = read.open_table(KEYS)?;
            let tag = self.kind_tag();
            let (mut items, mut next_cursor, mut last) = (Vec::new(), None, start);
            let from = if page.cursor.is_some() {
                start.checked_add(1)
            } else {
                Some(0)
            };
            if let Some(from) = from {
                for entry in index.range((owner, tag, from)..=(owner, tag, u64::MAX))? {
                    let (k, _) = entry?;
                    let id = k.value().2;
                    if items.len() == limit {
                        next_cursor = Some(self.ledger.inner.ids.seal(&ad, last));
                        break;
                    }
                    let record = self.load(&keys, id).map_err(|e| self.unlisted(id, e))?;
                    items.push(self.view(id, record));
                    last = id;
                }
            }
            Ok(Page { items, next_cursor })
        })
    }

    /// Support look-up by visible prefix: any start of one that begins with a configured
    /// key prefix (`vb_live_` alone lists live keys), up to the characters a key under that
    /// prefix shows (12 for the default prefixes, 16 at most; longer is refused as invalid
    /// input); the masked form `vb_live_AbCd…wxyz` works too. Returns masked keys only, at most 100, in
    /// order of visible prefix.
    ///
    /// Scoped to an owner ([`owned_by`](Self::owned_by)), the look-up reads at most 1,000
    /// keys under the prefix before it reads that owner's own keys instead: its cost is
    /// bounded by the keys the owner holds, not by how many others hold under the prefix.
    pub fn find_by_prefix(&self, prefix: &str) -> Result<Vec<KeyInfo>> {
        self.ledger.guarded(|| {
            let prefix = prefix.split('…').next().unwrap_or_default();
            let class = (prefix.len() <= MAX_VISIBLE_PREFIX_LEN && prefix.is_ascii())
                .then(|| self.ledger.inner.format.classify_prefix(prefix))
                .flatten()
                .ok_or_else(|| {
                    Error::invalid(
                        "prefix",
                        "give the start of a visible prefix: a key prefix, then up to 16 \
                         characters in all",
                    )
                })?;
            // Longer than any key under its prefix shows, it could match none (found by a
            // reviewer: 13 characters of a default key, of which 12 are stored, found nothing).
            // Keys imported by earlier versions show 12 characters, whatever their prefix.
            let format = &self.ledger.inner.format;
            let shown = format.visible_prefix_len(prefix).max(VISIBLE_PREFIX_LEN);
            if prefix.len() > shown {
                return Err(Error::invalid(
                    "prefix",
                    format!(
                        "a key under this prefix shows only its first {shown} characters: give \
                         at most that many"
                    ),
                ));
            }
            // A native prefix says what it was issued as: an API key prefix finds no token,
            // nor a token prefix an API key, without reading one of them.
            let kind_fits = match class {
                KeyClass::Legacy => true,
                KeyClass::Token => self.kind == IdKind::Token,
                KeyClass::Live | KeyClass::Test => self.kind != IdKind::Token,
            };
            if !kind_fits {
                return Ok(Vec::new());
            }
            let read = self.ledger.inner.store.begin_read()?;
            let index = read.open_table(KEYS_BY_PREFIX)?;
            let keys = read.open_table(KEYS)?;
            let mut out = Vec::new();
            for (examined, entry) in index.range((prefix, 0u64)..)?.enumerate() {
                let (k, _) = entry?;
                let (p, id) = k.value();
                if !p.starts_with(prefix) || out.len() == FOUND_BY_PREFIX {
                    break;
                }
                if let Some(owner) = self.owner
                    && examined == OTHERS_READ_BY_PREFIX
                {
                    return self.find_owned_by_prefix(&read, owner, prefix);
                }
                let record: KeyRecord =
                    store::get(&keys, id)?.ok_or(Error::NotFound { what: "key" })?;
                if self.fits(&record) {
                    out.push(self.view(id, record));
                }
            }
            Ok(out)
        })
    }

    /// [`find_by_prefix`](Self::find_by_prefix) through the owner's own keys: the first 100
    /// by visible prefix, then id, as the prefix index orders them.
    fn find_owned_by_prefix(
        &self,
        read: &redb::ReadTransaction,
        owner: u64,
        prefix: &str,
    ) -> Result<Vec<KeyInfo>> {
        let index = read.open_table(KEYS_BY_OWNER)?;
        let keys = read.open_table(KEYS)?;
        let tag = self.kind_tag();
        // The least 100 seen so far, greatest on top.
        let mut least = std::collections::BinaryHeap::new();
        for entry in index.range((owner, tag, 0)..=(owner, tag, u64::MAX))? {
            let id = entry?.0.value().2;
            let record = self.load(&keys, id)?;
            if record.key_prefix.starts_with(prefix) {
                least.push((record.key_prefix, id));
                if least.len() > FOUND_BY_PREFIX {
                    least.pop();
                }
            }
        }
        let found = least.into_sorted_vec().into_iter();
        found
            .map(|(_, id)| Ok(self.view(id, self.load(&keys, id)?)))
            .collect()
    }

    /// Refuses an API key given as a permission, an IP range, metadata or a rate limit's
    /// name.
    fn no_key_in(
        &self,
        permissions: &[String],
        ips: &[String],
        metadata: Option<&BTreeMap<String, String>>,
        rate_limits: &[RateLimit],
    ) -> Result<()> {
        let ledger = self.ledger;
        ledger.holding_no_key("permissions", permissions.iter().map(String::as_str))?;
        ledger.holding_no_key("ips", ips.iter().map(String::as_str))?;
        let names = rate_limits.iter().map(|r| r.name.as_str());
        ledger.holding_no_key("rate_limits.name", names)?;
        let entries = metadata.into_iter().flatten();
        let entries = entries.flat_map(|(k, v)| [k.as_str(), v.as_str()]);
        ledger.holding_no_key("metadata", entries)
    }

    /// Applies a partial update; only the fields set change. A new credit balance is set
    /// through the writer thread, so it is ordered with leases already handed out.
    pub fn update(&self, id: &str, update: KeyUpdate) -> Result<KeyInfo> {
        self.ledger.guarded(|| {
            // Checked first: a balance set is audited in the writer's shared transaction.
            self.ledger.actor_ok(&self.actor)?;
            let now = self.ledger.now();
            let name = update
                .name
                .as_deref()
                .map(|n| self.ledger.label("name", n))
                .transpose()?;
            self.no_key_in(
                update.permissions.as_deref().unwrap_or_default(),
                update.ips.as_deref().unwrap_or_default(),
                update.metadata.as_ref(),
                update.rate_limits.as_deref().unwrap_or_default(),
            )?;
            let permissions = update.permissions.as_ref().map(rules::scopes).transpose()?;
            let ips = update.ips.as_ref().map(rules::ips).transpose()?;
            let expires_at = update
                .expires_at
                .map(|e| checked_expiry(e, now))
                .transpose()?;
            if let Some(m) = &update.metadata {
                rules::metadata(m)?;
            }
            // New limits may start a state of their own, whose spend tier counts from the durable
            // spend: spend still in memory (a key that had no limits counted it nowhere else)
            // must be on disk first.
            let engine = &self.ledger.inner.engine;
            if (update.rate_limits.is_some() || update.token_window.is_some())
                && !engine.tiers.is_empty()
            {
                engine.flush()?;
            }
            let pool = match &update.pool {
                Some(Some(pool)) => Some(Some(self.ledger.inner.ids.decode(IdKind::Pool, pool)?)),
                Some(None) => Some(None),
                None => None,
            };
            let mut set_balance_to = None;
            let changes_balance = update.credits.is_some() || update.pool.is_some();
            let _in_order = changes_balance.then(|| self.ledger.inner.setting_balances.lock());
            let internal = self.internal_id(id)?;
            let (info, settings_written) = self.modify(id, "updated", |record, credits| {
                let mut changed = Vec::new();
                let c = &mut changed;
                if let Some(name) = name {
                    audit::set(c, "name", &mut record.name, name);
                }
                if let Some(p) = permissions {
                    audit::set(c, "permissions", &mut record.permissions, p);
                }
                if let Some(ips) = ips {
                    audit::set(c, "ips", &mut record.ips, ips);
                }
                if let Some(e) = expires_at {
                    audit::set(c, "expires_at", &mut record.expires_at, e);
                }
                let mut limits = record.limits.clone();
                if let Some(pool) = pool {
                    if pool.is_some() && matches!(update.credits, Some(Some(_))) {
                        return Err(Error::invalid(
                            "pool",
                            "a key spends from a pool or its own credits, not both",
                        ));
                    }
                    if pool.is_some() && record.limits.credits.is_some() && update.credits.is_none()
                    {
                        return Err(Error::invalid(
                            "pool",
                            "this key has a balance of its own: make it unmetered in the same \
                             update (credits(None); the CLI's --no-credits), which drops what is \
                             left on it (top the pool up with that first to keep it)",
                        ));
                    }
                    audit::set(c, "pool", &mut record.pool, pool);
                }
                if update.credits == Some(None) || matches!(pool, Some(Some(_))) {
                    // No balance of its own any more: its refill and threshold go with it,
                    // unless the update sets them again (and is refused below).
                    if update.refill.is_none() {
                        audit::set(c, "refill", &mut limits.refill, None);
                    }
                    if update.low_balance_threshold.is_none() {
                        audit::set(
                            c,
                            "low_balance_threshold",
                            &mut limits.low_balance_threshold,
                            None,
                        );
                    }
                }
                if let Some(credits) = update.credits {
                    // Named if the plan's amount changed; the balance set that follows (even at
                    // the same amount) is audited on its own, as `credits.set`.
                    audit::set(c, "credits", &mut limits.credits, credits);
                }
                if let Some(r) = update.refill {
                    audit::set(c, "refill", &mut limits.refill, r);
                }
                if let Some(rl) = update.rate_limits {
                    audit::set(c, "rate_limits", &mut limits.rate_limits, rl);
                }
                if let Some(tw) = update.token_window {
                    audit::set(c, "token_window", &mut limits.token_window, tw);
                }
                if let Some(t) = update.low_balance_threshold {
                    audit::set(
                        c,
                        "low_balance_threshold",
                        &mut limits.low_balance_threshold,
                        t,
                    );
                }
                if record.pool.is_some() && limits.credits.is_some() {
                    return Err(Error::invalid(
                        "credits",
                        "this key spends from a pool; change the pool's balance instead, or \
                         take the key out of it (pool(None); the CLI's --no-pool) in the same \
                         update",
                    ));
                }
                // Staying in a pool, a key cannot be made unmetered either: it would go on
                // spending from the pool.
                if record.pool.is_some() && update.credits == Some(None) && pool.is_none() {
                    return Err(Error::invalid(
                        "credits",
                        "this key spends from a pool; take it out (pool(None); the CLI's \
                         --no-pool) to make it unmetered",
                    ));
                }
                if record.pool.is_some() && limits.refill.is_some() {
                    return Err(pool_refill());
                }
                if record.pool.is_some() && update.low_balance_threshold.flatten().is_some() {
                    return Err(pool_threshold());
                }
                // Only when one is set: a key stored with one by an earlier version can still
                // be changed.
                if limits.credits.is_none() && update.low_balance_threshold.flatten().is_some() {
                    return Err(unmetered_threshold());
                }
                rules::limits(&limits)?;
                if update.credits == Some(None) {
                    *credits = None; // and, joining a pool, the key's own balance goes too
                }
                if record.pool.is_none() {
                    match (update.credits, credits.as_mut()) {
                        (Some(None), _) => {}
                        (Some(Some(n)), Some(c)) => {
                            // Refused before anything is written, as the writer would refuse
                            // the set (with the lease in memory taken back): else the other
                            // settings were saved and every retry failed the same way.
                            let (view, left) = engine.balance_now(internal, c);
                            if view.granted.saturating_sub(left).checked_add(n).is_none() {
                                return Err(crate::credits::too_many_granted());
                            }
                            set_balance_to = Some(n)
                        }
                        (Some(Some(n)), None) => {
                            *credits = Some(new_balance(n, limits.refill, now))
                        }
                        (None, _) => {}
                    }
                    if let Some(c) = credits.as_mut() {
                        refill::replace(c, limits.refill, now);
                    }
                }
                record.limits = limits;
                if let Some(m) = update.metadata {
                    audit::set(&mut changed, "metadata", &mut record.metadata, m);
                }
                Ok(changed)
            })?;
            match set_balance_to {
                Some(n) => {
                    // Audited where it lands, in the writer's transaction: a top-up or set
                    // racing this update is then recorded in the order it took effect (the
                    // update's own entry, if any, names the stored setting it changed).
                    let audit = AuditLine {
                        actor: self.actor.clone(),
                        action: "credits.set",
                        target: id.to_owned(),
                    };
                    let set = Adjust::Set(n);
                    let engine = &self.ledger.inner.engine;
                    let balance = match engine.adjust(internal, set, Some(audit)) {
                        Ok(balance) => balance,
                        // Deleted since: nothing of this update is left to report.
                        Err(Error::NotFound { .. }) if self.gone(internal)? => {
                            return Err(Error::NotFound { what: self.what() });
                        }
                        Err(e) if !settings_written => return Err(e),
                        Err(Error::Uncertain { reason, .. }) => {
                            return Err(Error::Uncertain {
                                what: "the key's settings were saved; its balance change",
                                reason,
                            });
                        }
                        Err(e) => {
                            return Err(Error::Conflict(format!(
                                "the key's settings were saved but setting its balance \
                                 failed ({e}); repeat the update, or set the balance directly \
                                 (`credits().set`; the CLI's `credits set`)"
                            )));
                        }
                    };
                    Ok(KeyInfo {
                        remaining_credits: Some(balance),
                        ..info
                    })
                }
                None => Ok(info),
            }
        })
    }

    /// Disables a key: the next verify refuses it. Idempotent.
    pub fn disable(&self, id: &str) -> Result<KeyInfo> {
        self.ledger.guarded(|| {
            let now = self.ledger.now();
            let (info, _) = self.modify(id, "disabled", |record, _| {
                if record.disabled_at.is_none() {
                    record.disabled_at = Some(now);
                }
                Ok(vec!["disabled_at"])
            })?;
            Ok(info)
        })
    }

    /// Re-enables a disabled key. Idempotent.
    pub fn enable(&self, id: &str) -> Result<KeyInfo> {
        self.ledger.guarded(|| {
            let (info, _) = self.modify(id, "enabled", |record, _| {
                record.disabled_at = None;
                Ok(vec!["disabled_at"])
            })?;
            Ok(info)
        })
    }

    /// Issues a new secret for the key, keeping its id and settings. The old secret keeps
    /// working for `grace_secs` seconds (0: stops at once; at most [`MAX_ROLL_GRACE_SECS`]:
    /// a key is rolled because its secret may have leaked, and a typo must not keep that
    /// secret working for good). Returns the new plaintext, once.
    ///
    /// A key keeps one previous secret: rolling again ends the grace of the secret an earlier
    /// roll replaced, at once. Both secrets share the key's state, so a disabled or expired
    /// key's previous secret is refused like its new one.
    pub fn roll(&self, id: &str, grace_secs: u64) -> Result<CreatedKey> {
        self.ledger.guarded(|| {
            if grace_secs > MAX_ROLL_GRACE_SECS {
                return Err(Error::invalid(
                    "grace_secs",
                    format!("at most {MAX_ROLL_GRACE_SECS} seconds (30 days), found {grace_secs}"),
                ));
            }
            let internal = self.internal_id(id)?;
            let hasher = self.ledger.hasher();
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            let mut record = self.load(&txn.open_table(KEYS)?, internal)?;
            let cached = secret_hashes(&record);
            prune_expired_rolled(&txn, &mut record, now)?;
            // A legacy key has no native class to keep: a token's new secret must carry the
            // token prefix (a live one would read as an API key), an API key's the live prefix.
            // Native keys keep their class, so a test key stays a test key.
            let class = match (record.class, &record.kind) {
                (KeyClass::Legacy, KeyKind::Token { .. }) => KeyClass::Token,
                (KeyClass::Legacy, KeyKind::Api) => KeyClass::Live,
                (class, _) => class,
            };
            let plaintext = self.ledger.inner.format.generate(class)?;
            record.class = self.ledger.inner.format.parse(plaintext.expose())?;
            let new_hash = hasher.hash_current(plaintext.expose());
            self.unindex(&txn, internal, &record)?;
            let (prefix, suffix) = self.ledger.inner.format.visible_parts(plaintext.expose());
            let old = RolledSecret {
                key_hash: record.key_hash,
                scheme: record.scheme,
                key_prefix: std::mem::replace(&mut record.key_prefix, prefix),
                key_suffix: std::mem::replace(&mut record.key_suffix, suffix),
                valid_until: now.plus_secs(grace_secs),
            };
            record.key_hash = new_hash;
            record.scheme = hasher.current();
            record.rolled = (grace_secs > 0).then_some(old);
            record.updated_at = now;
            record.updated_by = self.actor.clone();
            self.index(&txn, internal, &record)?;
            if let Some(old) = &record.rolled {
                store::adjust_scheme_count(&txn, old.scheme, 1)?;
            }
            index::put(&txn, &mut txn.open_table(KEYS)?, internal, &record)?;
            let action = format!("{}.rolled", self.what());
            audit::append(
                &txn,
                self.ledger,
                now,
                &self.actor,
                &action,
                id,
                &["secret"],
            )?;
            let engine = &self.ledger.inner.engine;
            txn.commit_then(|_| {
                engine.key_changed(internal, &cached, KeyChange::Settings);
                engine.key_created(&new_hash);
            })?;
            Ok(CreatedKey {
                info: self.view(internal, record),
                plaintext,
            })
        })
    }

    /// Deletes a key for good: its hashes, indexes, credits and usage go with it (its spend
    /// stays in its account's usage). The hash it was imported by, if any, may then be
    /// imported again.
    ///
    /// A record that does not decode (damaged, or written by a newer schema; `check` names
    /// it) is deleted all the same, so that a key whose record nothing can read can still be
    /// stopped: its hashes and index entries are found by scanning the indexes (every key's
    /// entries: slow on a large file, but only for such a record), and its audit event names
    /// the field `unreadable`.
    pub fn delete(&self, id: &str) -> Result<()> {
        self.ledger.guarded(|| {
            let internal = self.internal_id(id)?;
            let txn = self.ledger.inner.store.begin_write()?;
            let loaded = self.load(&txn.open_table(KEYS)?, internal);
            let (hashes, fields): (_, &[&str]) = match loaded {
                Ok(record) => {
                    self.unindex(&txn, internal, &record)?;
                    (secret_hashes(&record), &[])
                }
                // Not a reason to refuse: the verify index does not read the record, so the
                // key would keep working (found by a reviewer).
                Err(Error::Codec(_)) => {
                    match index::remove_unreadable(&txn, internal, self.kind_tag(), self.owner)? {
                        Some(hashes) => (hashes, &["unreadable"]),
                        None => return Err(Error::NotFound { what: self.what() }),
                    }
                }
                Err(e) => return Err(e),
            };
            index::release_import(&txn, internal)?;
            txn.open_table(KEYS)?.remove(internal)?;
            txn.open_table(CREDITS)?.remove(internal)?;
            txn.open_table(USAGE)?.remove(internal)?;
            let action = format!("{}.deleted", self.what());
            audit::append(
                &txn,
                self.ledger,
                self.ledger.now(),
                &self.actor,
                &action,
                id,
                fields,
            )?;
            let engine = &self.ledger.inner.engine;
            txn.commit_then(|_| engine.key_changed(internal, &hashes, KeyChange::Deleted))?;
            Ok(())
        })
    }

    /// Loads, changes and stores a record in one transaction, with its audit event, then
    /// drops the key's cached entries so the next verify sees the change. A change that
    /// touches no field writes nothing. Returns the record's view and whether it was written.
    fn modify(
        &self,
        id: &str,
        verb: &str,
        change: impl FnOnce(&mut KeyRecord, &mut Option<CreditsRecord>) -> Result<Vec<&'static str>>,
    ) -> Result<(KeyInfo, bool)> {
        let internal = self.internal_id(id)?;
        let now = self.ledger.now();
        let txn = self.ledger.inner.store.begin_write()?;
        let (record, cached, key_change, new_threshold) = {
            let mut keys = txn.open_table(KEYS)?;
            let mut credits_table = txn.open_table(CREDITS)?;
            let mut record = self.load(&keys, internal)?;
            let cached = secret_hashes(&record);
            let mut credits: Option<CreditsRecord> = store::get(&credits_table, internal)?;
            let before = (record.clone(), credits.clone());
            let changed = change(&mut record, &mut credits)?;
            if changed.is_empty() || (record.clone(), credits.clone()) == before {
                // Nothing to write or audit, but a change by an actor the rules refuse is
                // refused all the same.
                self.ledger.actor_ok(&self.actor)?;
                drop((keys, credits_table));
                txn.abort()?;
                return Ok((self.view(internal, before.0), false));
            }
            // A pool joined must be one of the owner's, checked in the transaction that joins
            // it: a pool deleted meanwhile counted this key out.
            if let Some(pool) = record.pool.filter(|_| record.pool != before.0.pool) {
                let pool: Option<crate::record::PoolRecord> =
                    store::get(&txn.open_table(POOLS)?, pool)?;
                if pool.is_none_or(|p| p.owner != record.owner) {
                    return Err(Error::NotFound { what: "pool" });
                }
            }
            record.updated_at = now;
            record.updated_by = self.actor.clone();
            prune_expired_rolled(&txn, &mut record, now)?;
            index::put(&txn, &mut keys, internal, &record)?;
            match &credits {
                Some(c) => store::put(&mut credits_table, internal, c)?,
                None => {
                    credits_table.remove(internal)?;
                }
            }
            let action = format!("{}.{verb}", self.what());
            audit::append(&txn, self.ledger, now, &self.actor, &action, id, &changed)?;
            let key_change = match (&before.1, &credits) {
                (Some(_), None) => KeyChange::CreditsRemoved,
                (old, new) if old != new => KeyChange::CreditsChanged,
                _ => KeyChange::Settings,
            };
            if !before.0.limits.same_rates(&record.limits) {
                // Before the commit: a miss reading the new limits then starts new windows.
                // (A commit that fails after it costs the key its windows, nothing more.)
                let engine = &self.ledger.inner.engine;
                engine.limits_reconfigured(internal, &record.limits);
            }
            let threshold = record.limits.low_balance_threshold;
            let new_threshold =
                (before.0.limits.low_balance_threshold != threshold).then_some(threshold);
            (record, cached, key_change, new_threshold)
        };
        let engine = &self.ledger.inner.engine;
        // In commit order: of two changes racing, the later one's effects come last (a key
        // given credits again after losing them gets a new meter, not the retiring one).
        txn.commit_then(|_| {
            engine.key_changed(internal, &cached, key_change);
            if let Some(threshold) = new_threshold {
                engine.low_balance_changed(internal, threshold);
            }
        })?;
        Ok((self.view(internal, record), true))
    }

    /// Whether key `id` no longer exists (for this handle).
    fn gone(&self, id: u64) -> Result<bool> {
        let read = self.ledger.inner.store.begin_read()?;
        match self.load(&read.open_table(KEYS)?, id) {
            Ok(_) => Ok(false),
            Err(Error::NotFound { .. }) => Ok(true),
            Err(e) => Err(e),
        }
    }

    pub(crate) fn internal_id(&self, id: &str) -> Result<u64> {
        Ok(self.ledger.inner.ids.decode(self.kind, id)?)
    }

    /// Whether a record belongs to this handle (kind and owner scope).
    fn fits(&self, r: &KeyRecord) -> bool {
        let kind_ok = matches!(r.kind, KeyKind::Token { .. }) == (self.kind == IdKind::Token);
        kind_ok && self.owner.is_none_or(|o| o == r.owner)
    }

    fn load(&self, table: &impl ReadableTable<u64, &'static [u8]>, id: u64) -> Result<KeyRecord> {
        let not_found = Error::NotFound { what: self.what() };
        let record: KeyRecord = store::get(table, id)?.ok_or(not_found)?;
        if self.fits(&record) {
            Ok(record)
        } else {
            Err(Error::NotFound { what: self.what() })
        }
    }

    /// `e`, met reading key `id` for a listing: a record that does not decode is named.
    fn unlisted(&self, id: u64, e: Error) -> Error {
        let remedy = match self.kind {
            IdKind::Token => "`tokens().delete` removes it",
            _ => "`keys().delete` removes it",
        };
        e.of_row(|| self.public_id(id).to_string(), remedy)
    }

    fn public_id(&self, id: u64) -> PublicId {
        self.ledger.inner.ids.encode(self.kind, id)
    }

    pub(crate) fn view(&self, id: u64, r: KeyRecord) -> KeyInfo {
        key_info(self.ledger, self.kind, id, r)
    }
}

/// Builds the public view of a record.
pub(crate) fn key_info(ledger: &Ledger, kind: IdKind, id: u64, r: KeyRecord) -> KeyInfo {
    let ids = &ledger.inner.ids;
    let now = ledger.now();
    let (remaining_credits, last_used_at) = live_usage(ledger, id, &r);
    KeyInfo {
        id: ids.encode(kind, id),
        owner: ids.encode(IdKind::Account, r.owner),
        masked: format!("{}…{}", r.key_prefix, r.key_suffix),
        kind: r.kind,
        class: r.class,
        name: r.name,
        prefix: r.key_prefix,
        suffix: r.key_suffix,
        permissions: r.permissions,
        ips: r.ips.iter().map(ToString::to_string).collect(),
        limits: r.limits,
        remaining_credits,
        pool: r.pool.map(|p| ids.encode(IdKind::Pool, p)),
        metadata: r.metadata,
        created_at: r.created_at,
        created_by: r.created_by,
        updated_at: r.updated_at,
        updated_by: r.updated_by,
        expires_at: r.expires_at,
        disabled_at: r.disabled_at,
        last_used_at: last_used_at.or(r.last_used_at),
        previous_secret_valid_until: r.rolled.map(|o| o.valid_until).filter(|&t| t > now),
        hash_scheme: r.scheme.label(),
        schema_version: <KeyRecord as crate::codec::Record>::VERSION,
    }
}

fn kind_label<S: serde::Serializer>(kind: &KeyKind, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(kind.label())
}

/// Credits left (durable balance of the key or its pool, plus what memory holds leased) and
/// the last use: the later of the one flushed by the writer and, while the key is cached,
/// the one counted in memory. Read at view time. A metered key whose balance cannot be read
/// shows 0 left, as its grants do: `None` reads as "unmetered".
fn live_usage(ledger: &Ledger, id: u64, r: &KeyRecord) -> (Option<u64>, Option<Timestamp>) {
    let credit_id = r.pool.unwrap_or(id);
    let metered = r.pool.is_some() || r.limits.credits.is_some();
    let unread = metered.then_some(0);
    let Ok(read) = ledger.inner.store.begin_read() else {
        return (unread, None);
    };
    let balance = read
        .open_table(CREDITS)
        .ok()
        .and_then(|t| store::get::<CreditsRecord>(&t, credit_id).ok().flatten())
        .map(|c| ledger.inner.engine.remaining(credit_id, &c))
        .or(unread);
    let last_used = read
        .open_table(USAGE)
        .ok()
        .and_then(|t| {
            store::get::<crate::record::UsageRecord>(&t, id)
                .ok()
                .flatten()
        })
        .and_then(|u| u.last_used_at);
    let counted = secret_hashes(r)
        .iter()
        .filter_map(|hash| {
            ledger.inner.engine.cache.with(hash, |slot| match slot {
                Slot::Key(key) => key.last_used_ms(),
                Slot::Missing => 0,
            })
        })
        .max()
        .filter(|&ms| ms > 0)
        .map(Timestamp);
    (balance, last_used.max(counted))
}

/// The hashes a record's secrets are cached under: current, and rolled if any.
fn secret_hashes(record: &KeyRecord) -> Vec<KeyHash> {
    std::iter::once(record.key_hash)
        .chain(record.rolled.as_ref().map(|o| o.key_hash))
        .collect()
}

/// A fresh credit balance.
pub(crate) fn new_balance(credits: u64, refill: Option<Refill>, now: Timestamp) -> CreditsRecord {
    CreditsRecord {
        balance: credits,
        granted: credits,
        refilled_at: refill.map(|r| refill::period_start(r.interval, now)),
        refill,
        ..CreditsRecord::default()
    }
}

/// Drops a rolled secret whose grace period is over: its hash leaves the index.
fn prune_expired_rolled(
    txn: &WriteTransaction,
    record: &mut KeyRecord,
    now: Timestamp,
) -> Result<()> {
    if let Some(old) = record.rolled.take_if(|old| old.valid_until <= now) {
        index::remove(txn, &old.key_hash)?;
        store::adjust_scheme_count(txn, old.scheme, -1)?;
    }
    Ok(())
}

/// Drops every rolled secret whose grace period is over (before a hash-scheme rotation, so
/// that only live secrets keep an old scheme in use).
pub(crate) fn prune_rolled_secrets(ledger: &Ledger) -> Result<()> {
    let now = ledger.now();
    let txn = ledger.inner.store.begin_write()?;
    let mut pruned = Vec::new();
    {
        let mut keys = txn.open_table(KEYS)?;
        let mut expired = Vec::new();
        for entry in keys.iter()? {
            let (k, v) = entry?;
            // An undecodable record is `check`'s to report, not a reason to refuse the
            // rotation: its key cannot verify under any scheme as it is.
            let Ok(record) = crate::codec::decode::<KeyRecord>(v.value()) else {
                continue;
            };
            if record.rolled.as_ref().is_some_and(|o| o.valid_until <= now) {
                expired.push((k.value(), record));
            }
        }
        for (id, mut record) in expired {
            pruned.push((id, secret_hashes(&record)));
            prune_expired_rolled(&txn, &mut record, now)?;
            index::put(&txn, &mut keys, id, &record)?;
        }
    }
    if pruned.is_empty() {
        return Ok(txn.abort()?); // nothing to write: no commit, no sync
    }
    txn.commit_then(|_| {
        for (id, hashes) in pruned {
            let engine = &ledger.inner.engine;
            engine.key_changed(id, &hashes, KeyChange::Settings);
        }
    })?;
    Ok(())
}

fn checked_expiry(at: Option<Timestamp>, now: Timestamp) -> Result<Option<Timestamp>> {
    match at {
        Some(t) if t <= now => Err(Error::invalid("expires_at", "must be in the future")),
        other => Ok(other),
    }
}

/// A key spending from a pool has no refill of its own: the pool's applies.
fn pool_refill() -> Error {
    Error::invalid(
        "refill",
        "this key spends from a pool; the pool's refill applies (set it with update_pool)",
    )
}

/// A key without credits has no balance whose fall a threshold could report.
fn unmetered_threshold() -> Error {
    Error::invalid(
        "low_balance_threshold",
        "a low-balance threshold needs metered credits (a key on a pool has the pool's)",
    )
}

/// A key spending from a pool has no low-balance threshold of its own: the pool's applies.
fn pool_threshold() -> Error {
    Error::invalid(
        "low_balance_threshold",
        "this key spends from a pool; the pool's threshold applies",
    )
}
