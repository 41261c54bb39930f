//! [`Ledger`]: the open database and the handles that act on it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::accounts::Accounts;
use crate::audit::Audit;
use crate::clock::{Clock, Timestamp};
use crate::config::Config;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::hashing::{HashScheme, KeyHasher};
use crate::keyfmt::KeyFormat;
use crate::keys::Keys;
use crate::public_id::{IdCipher, IdKind};
use crate::routes::Routes;
use crate::store::{self, Store};

/// An open keyledger database. Cheap to clone; clones share one database.
#[derive(Clone)]
pub struct Ledger {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<Store>,
    pub(crate) path: PathBuf,
    pub(crate) ids: Arc<IdCipher>,
    pub(crate) format: KeyFormat,
    /// Held across a hash-scheme rotation's write and publication, so the scheme in memory
    /// is the one stored last.
    pub(crate) rotating: parking_lot::Mutex<()>,
    /// Held by a key update that changes a balance (sets, removes or creates one, or moves
    /// the key into or out of a pool) across its record's commit, the meter's retirement and
    /// the balance set that follow: of two such updates the one stored last sets the balance,
    /// and a meter of a removed balance is out of memory before another update creates the
    /// next one (else it could lease from the new balance and strand what grants reserved).
    pub(crate) setting_balances: parking_lot::Mutex<()>,
    pub(crate) config: Config,
    pub(crate) clock: Arc<dyn Clock>,
    /// Added to a rate limit's retry-after: the clock's resolution, in whole milliseconds
    /// rounded up (see [`Clock::monotonic_resolution`]).
    pub(crate) retry_slack: std::time::Duration,
    pub(crate) engine: Engine,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // A clean close: leases go back to their balances. Errors have nowhere to go here;
        // call `Ledger::close` to see them.
        let _ = self.engine.close();
    }
}

/// The actor recorded when a handle is not given one with `.by(…)`.
pub(crate) const SYSTEM_ACTOR: &str = "system";

impl Ledger {
    /// Opens the database at `path`, creating it if it does not exist (readable and writable
    /// by its owner only, on Unix; an existing file keeps its mode).
    ///
    /// Fails with [`Error::WrongMasterKey`] if `config` holds another master key than the one
    /// the file was created with, [`Error::UpgradeRequired`] for a file written by a newer
    /// keyledger, [`Error::NotALedger`] for a redb file of another application, and
    /// [`Error::EmptyFile`] for a file that exists but is empty (it is not made a new
    /// ledger: a copy or restore that failed would otherwise start over with no keys), and
    /// [`Error::InvalidInput`] for a path that holds `config`'s master key (given where the
    /// path goes), before anything is created. Errors show the path as [`shown_path`]
    /// does.
    ///
    /// [`shown_path`]: crate::shown_path
    pub fn open(path: impl AsRef<Path>, config: Config) -> Result<Ledger> {
        let path = path.as_ref();
        let opened = Store::open(path, &config.master_key, config.page_cache_bytes)?;
        Ledger::start(opened, path, config)
    }

    /// Opens a ledger on any redb [`StorageBackend`](redb::StorageBackend): an in-memory
    /// ledger (`redb::backends::InMemoryBackend`), or a backend that simulates crashes and I/O
    /// failures in tests. Same checks as [`open`](Self::open).
    pub fn open_with_backend(backend: impl redb::StorageBackend, config: Config) -> Result<Ledger> {
        let opened = Store::open_backend(backend, &config.master_key, config.page_cache_bytes)?;
        Ledger::start(opened, Path::new("<storage backend>"), config)
    }

    fn start(opened: (Store, store::OpenedMeta), path: &Path, config: Config) -> Result<Ledger> {
        let (store, meta) = opened;
        let store = Arc::new(store);
        let ids = Arc::new(IdCipher::for_file(
            &config.master_key,
            meta.id_salt.as_ref(),
        ));
        let hasher = KeyHasher::new(&config.master_key, meta.hash_scheme);
        let engine = Engine::start(store.clone(), ids.clone(), hasher, &config)?;
        let inner = Inner {
            store,
            path: path.to_owned(),
            ids,
            format: KeyFormat::new(&config),
            rotating: parking_lot::Mutex::new(()),
            setting_balances: parking_lot::Mutex::new(()),
            clock: config.clock.clone(),
            retry_slack: {
                let lag = config
                    .clock
                    .monotonic_resolution()
                    .as_nanos()
                    .div_ceil(1_000_000);
                std::time::Duration::from_millis(u64::try_from(lag).unwrap_or(u64::MAX))
            },
            config,
            engine,
        };
        Ok(Ledger {
            inner: Arc::new(inner),
        })
    }

    /// API keys: create, list, get, update, disable, roll, delete, import.
    pub fn keys(&self) -> Keys<'_> {
        Keys::new(self, IdKind::Key)
    }

    /// Internal tokens: the same lifecycle as keys, with a required `type`.
    pub fn tokens(&self) -> Keys<'_> {
        Keys::new(self, IdKind::Token)
    }

    /// Accounts: the owners of keys, with subscription status and entitlements.
    pub fn accounts(&self) -> Accounts<'_> {
        Accounts {
            ledger: self,
            actor: SYSTEM_ACTOR.into(),
        }
    }

    /// Route rules: route prefix → required permission, entitlement and cost.
    pub fn routes(&self) -> Routes<'_> {
        Routes {
            ledger: self,
            actor: SYSTEM_ACTOR.into(),
        }
    }

    /// The audit trail.
    pub fn audit(&self) -> Audit<'_> {
        Audit { ledger: self }
    }

    /// The file this ledger was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The scheme new and rehashed keys are stored under, as this process knows it: after a
    /// rotation answered [`Error::Uncertain`], the file may hold the new one (reopen to see).
    pub fn hash_scheme(&self) -> HashScheme {
        self.inner.engine.policy.load().hasher.current()
    }

    /// Switches new keys to `scheme` (a new pepper version, or BLAKE3). Existing keys keep
    /// working: a verify that misses under the new scheme tries the schemes that still have
    /// records and rehashes the key it finds, so old schemes drain as keys are used.
    /// Audited as made by `system`; [`rotate_hash_scheme_by`](Self::rotate_hash_scheme_by)
    /// names who made it. Rotating to the scheme already current changes and records nothing.
    pub fn rotate_hash_scheme(&self, scheme: HashScheme) -> Result<()> {
        self.rotate_hash_scheme_by(scheme, SYSTEM_ACTOR)
    }

    /// [`rotate_hash_scheme`](Self::rotate_hash_scheme), recording `actor` as its author in
    /// the audit trail (the rules of the handles' `by`).
    pub fn rotate_hash_scheme_by(&self, scheme: HashScheme, actor: &str) -> Result<()> {
        if !scheme.can_be_current() {
            let why = match scheme {
                HashScheme::Sha256Imported => "plain SHA-256 is only for imported keys",
                _ => "the legacy BLAKE3 scheme is only read (rotate to blake3 instead)",
            };
            return Err(Error::invalid("scheme", why));
        }
        let _one_at_a_time = self.inner.rotating.lock();
        self.guarded(|| {
            self.actor_ok(actor)?;
            // Already current (in memory as stored, under the lock): nothing to record, and
            // no cached key to drop — though a closed ledger answers as to any change.
            if self.hash_scheme() == scheme {
                return match self.inner.store.refuses_writes() {
                    true => Err(Error::Closed),
                    false => Ok(()),
                };
            }
            // Its own commit: one that failed may have pruned, but the rotation was never
            // attempted, and the host must not hear that it may have been made.
            crate::keys::prune_rolled_secrets(self).map_err(|e| match e {
                Error::Uncertain { reason, .. } => Error::Uncertain {
                    what: "the pruning of rolled secrets before the rotation (the rotation \
                           itself was not made)",
                    reason,
                },
                e => e,
            })?;
            let txn = self.inner.store.begin_write()?;
            store::set_hash_scheme(&txn, scheme)?;
            let label = scheme.label();
            crate::audit::append(
                &txn,
                self,
                self.now(),
                actor,
                "hash_scheme.rotated",
                &label,
                &[],
            )?;
            let engine = &self.inner.engine;
            txn.commit_then(|committed| {
                // Not committed for sure: keep the hasher, but drop every cached key (the
                // store is fenced off now, so no miss serves one).
                if committed {
                    engine.set_hasher(KeyHasher::new(&self.inner.config.master_key, scheme));
                }
                engine.scheme_changed();
            })
        })
    }

    /// Number of stored key hashes per scheme: what a rotation still has to drain.
    ///
    /// A rolled secret is counted until it is pruned, and one whose grace ended after the
    /// rotation would hold the drain open (and keep every cache miss probing its scheme): so
    /// while a scheme other than the current one is counted, this first prunes every rolled
    /// secret past its grace, a pass over every key (not once the ledger is closed).
    pub fn hash_scheme_counts(&self) -> Result<Vec<(HashScheme, u64)>> {
        let counts = self.stored_scheme_counts()?;
        if !self.inner.store.refuses_writes() && self.prune_while_draining(&counts) {
            return self.stored_scheme_counts();
        }
        Ok(counts)
    }

    fn stored_scheme_counts(&self) -> Result<Vec<(HashScheme, u64)>> {
        self.guarded(|| {
            let read = self.inner.store.begin_read()?;
            let table = read.open_table(store::tables::META)?;
            Ok(store::scheme_counts(&table)?.into_iter().collect())
        })
    }

    /// While `counts` hold hashes under a scheme other than the current one, prunes every
    /// rolled secret past its grace, best effort (a store that cannot be written answers
    /// the next call). Returns whether it did.
    fn prune_while_draining(&self, counts: &[(HashScheme, u64)]) -> bool {
        let current = self.hash_scheme();
        let draining = counts.iter().any(|&(scheme, n)| scheme != current && n > 0);
        if draining {
            let _ = self.guarded(|| crate::keys::prune_rolled_secrets(self));
        }
        draining
    }

    /// A name (of a key, account or pool) or token type: [`rules::name`](crate::record::rules::name),
    /// holding no key — a client that sends a key's value where its name goes would have it
    /// shown in every listing.
    pub(crate) fn label(&self, field: &'static str, text: &str) -> Result<String> {
        let label = crate::record::rules::name(field, text)?;
        self.holding_no_key(field, [label.as_str()])?;
        Ok(label)
    }

    /// Refuses `texts` if one holds an API key (of this ledger's prefixes) or the ledger's
    /// master key, without echoing it: permissions, IP ranges, metadata and entitlements are
    /// shown in listings, and an error naming a rejected value would repeat the key in logs.
    pub(crate) fn holding_no_key<'t>(
        &self,
        field: &'static str,
        texts: impl IntoIterator<Item = &'t str>,
    ) -> Result<()> {
        for text in texts {
            if self
                .inner
                .format
                .holds_key(text, |at| self.inner.ids.starts_with_id(at))
            {
                return Err(Error::invalid(
                    field,
                    "it holds an API key, which would be shown in every listing",
                ));
            }
            if self.inner.config.master_key.appears_in(text) {
                return Err(Error::invalid(
                    field,
                    "it holds the ledger's master key, which would be kept in clear",
                ));
            }
        }
        Ok(())
    }

    /// Checks who makes a change (`by(…)`): the text rules of `rules::actor`, and no API
    /// key in it, since the actor is kept in the audit trail and on the record.
    pub(crate) fn actor_ok(&self, actor: &str) -> Result<()> {
        crate::record::rules::actor(actor)?;
        self.holding_no_key("actor", [actor])
    }

    /// Runs work that touches the file (see [`Store::guard`]).
    pub(crate) fn guarded<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        self.inner.store.guard(work)
    }

    pub(crate) fn now(&self) -> Timestamp {
        // `u64::MAX` is "never" as a deadline: a clock that reads it must not pass it (found
        // by a reviewer: every key, even one that never expires, read as expired).
        Timestamp(self.inner.clock.now().0.min(u64::MAX - 1))
    }

    /// The clock rate limits run on (never goes back).
    pub(crate) fn monotonic_ns(&self) -> u64 {
        self.inner.clock.monotonic_ns()
    }

    pub(crate) fn hasher(&self) -> Arc<KeyHasher> {
        self.inner.engine.hasher()
    }

    /// Closes the ledger cleanly: every lease goes back to its balance and all spend and
    /// usage is flushed. Dropping the last clone does the same but cannot report errors.
    /// From the start of `close`, `verify` refuses new requests with `unavailable` (a cache
    /// hit may still spend from a lease in memory until the close takes the leases back,
    /// within milliseconds).
    ///
    /// Grants still held (requests still running, in a graceful shutdown) are waited for, up
    /// to [`ConfigBuilder::close_grace`](crate::ConfigBuilder::close_grace) — those that
    /// reserved no credits too (an unmetered key's, a `cost(0)` peek's): their commits and
    /// refunds land before `close` returns. Units a grant still holds after that stay
    /// leased — the next open counts them as `lost_to_crash`, never re-granted — and `close`
    /// returns [`Error::Conflict`] saying how many (or, with no units held, how many grants
    /// that reserved nothing were still held: what they commit is not recorded); everything
    /// else was returned and flushed. A later `close` (or one racing it) reports how the
    /// first ended, as an `Error::Conflict` quoting its error. Such a grant
    /// committed later still returns its receipt (the units did leave the balance), but
    /// nothing is written any more: its units stay in `lost_to_crash`, not in `spent`, and
    /// its key's and account's `lifetime_spent` never count them.
    ///
    /// While the file holds hashes under a scheme other than the current one (keys imported
    /// by their plain SHA-256, or not used since a rotation), `close` first prunes every
    /// rolled secret past its grace: one rolled away before its first use would otherwise
    /// keep its digest until the key next changes, and one whose grace ended after a
    /// rotation would hold the drain open. Dropping the last handle without `close` does not.
    ///
    /// After `close` the ledger changes nothing more: every call that would write (an admin
    /// change, a top-up, a flush) fails with [`Error::Closed`]. Reads still answer. The file
    /// itself stays locked until the last clone is dropped (redb holds it while its handle
    /// lives); opening it again before that fails with [`Error::InUse`].
    pub fn close(&self) -> Result<()> {
        // A key imported by its plain SHA-256 and rolled before its first use keeps that
        // digest in its rolled slot past the grace, until the key next changes (found by a
        // reviewer); so does a secret whose grace ended after a rotation. While other schemes
        // are counted, a close prunes every rolled secret past its grace. Best effort: a
        // store that cannot be written is the close's to report.
        if let Ok(counts) = self.stored_scheme_counts() {
            self.prune_while_draining(&counts);
        }
        self.inner.engine.close()
    }

    /// Flushes pending spend and usage counters to disk now (they are otherwise flushed in
    /// the background every `usage_flush_interval`, 30 s by default). With many keys in use
    /// it writes them a few thousand per transaction, and returns once all are durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.engine.flush()
    }

    /// Low-balance and exhausted events. Every call returns a receiver of one bounded channel
    /// of 4,096 events: receivers compete for its events (each event reaches one of them), so
    /// a host that fans events out reads with one and forwards. When the channel is full the
    /// ledger drops new events rather than wait, and counts them in
    /// [`Stats::events_dropped`](crate::Stats::events_dropped).
    pub fn credit_events(&self) -> crossbeam::channel::Receiver<crate::CreditEvent> {
        self.inner.engine.events.clone()
    }

    /// Engine counters (see [`Stats`](crate::Stats) for each): writer commits, the cache's
    /// entries and evictions, what the open found (units lost to a crash, unreadable
    /// balances), requests that waited for a lease, the writer's lists, dropped events.
    pub fn stats(&self) -> crate::Stats {
        crate::Stats {
            writer_commits: self
                .inner
                .engine
                .shared
                .commits
                .load(std::sync::atomic::Ordering::Relaxed),
            cached_entries: self.inner.engine.cache.len() as u64,
            cache_evictions: self.inner.engine.cache.evictions(),
            lost_to_crash_at_open: self.inner.engine.lost_at_open,
            unreadable_balances_at_open: self.inner.engine.unreadable_at_open,
            lease_waits: self.inner.engine.shared.lease_waits.snapshot(),
            writer_list_bytes: self
                .inner
                .engine
                .shared
                .list_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            usage_unwritable: self
                .inner
                .engine
                .shared
                .usage_unwritable
                .load(std::sync::atomic::Ordering::Relaxed),
            events_dropped: self
                .inner
                .engine
                .shared
                .events_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Stops the writer without returning leases or flushing, leaving the file as a crash
    /// would. For crash tests only.
    #[doc(hidden)]
    pub fn simulate_crash(self) {
        self.inner.engine.abandon();
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &crate::secret::shown_path(&self.inner.path))
            .finish_non_exhaustive()
    }
}
