//! The verify engine: the cache, the route table, the credit registry and the writer thread,
//! started with the ledger and closed with it. Admin operations call its hooks so the next
//! verify sees their change.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use crossbeam::channel::{self, Receiver, Sender};
use crossbeam::queue::SegQueue;
use parking_lot::Mutex;
use redb::ReadableTable;

use std::collections::HashMap;

use crate::cache::{AccountState, Cache, Evicted, KeyEntry, KeyState};
use crate::clock::Timestamp;
use crate::codec;
use crate::config::Config;
use crate::credits::events::{CreditEvent, EVENT_CAPACITY};
use crate::credits::meter::Meter;
use crate::credits::refill;
use crate::credits::writer::{self, Adjust, Msg, Shared};
use crate::error::{Error, Result};
use crate::hashing::{KeyHash, hashes_equal};
use crate::keys::lookup;
use crate::ledger::Ledger;
use crate::limits::{KeyLimits, SpendTier};
use crate::policy::RouteTable;
use crate::public_id::{IdCipher, IdKind};
use crate::record::{AccountRecord, CreditsRecord, PoolRecord, RouteRule, UsageRecord};
use crate::store::{self, Store, tables::*};

/// How much credit state is guarded by leases, and so what a crash can cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Leases of about a second of each key's traffic (capped at 100,000 units): verify
    /// never waits for the disk; a crash loses at most the outstanding leases, reported as
    /// `lost_to_crash`, and never lets a key spend more than it was granted.
    #[default]
    Leased,
    /// Leases of exactly the units a request needs: every reservation is a group-committed
    /// write before `verify` returns. A crash loses at most the in-flight reservations.
    Exact,
}

/// What an admin change did to a key, for the engine's hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyChange {
    /// Settings only (name, permissions, state…).
    Settings,
    /// Its balance or refill changed.
    CreditsChanged,
    /// It became unmetered: its balance record is gone.
    CreditsRemoved,
    /// It was deleted.
    Deleted,
}

/// Rate-limit states kept for keys whose entries an admin change evicted, until their next
/// verify rebuilds the entry (bounded: beyond this many the oldest are forgotten).
const MAX_CARRIED_STATES: usize = 65_536;

/// What the miss path found.
pub(crate) enum Loaded {
    /// No key has this hash.
    Missing,
    /// The entry is now in the cache.
    Cached,
    /// The entry could not be cached (an admin change raced with the read).
    Uncached(Box<KeyEntry>),
}

pub(crate) struct Engine {
    pub cache: Cache,
    pub shared: Arc<Shared>,
    pub tx: Sender<Msg>,
    pub routes: ArcSwap<RouteTable>,
    pub events: Receiver<CreditEvent>,
    pub tiers: Vec<SpendTier>,
    /// Key states (rate limits, usage counters) carried across an admin-change eviction.
    carried_states: Mutex<HashMap<u64, Arc<KeyState>>>,
    /// Interned permission sets: keys with the same scopes share one allocation.
    permission_sets: Mutex<HashMap<Vec<String>, Arc<[String]>>>,
    /// Shared state of every account with a cached key.
    accounts: Mutex<HashMap<u64, Arc<AccountState>>>,
    /// Units found leased at open (a crash before): now counted in `lost_to_crash`.
    pub lost_at_open: u64,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    pub(crate) fn start(store: Arc<Store>, ids: Arc<IdCipher>, config: &Config) -> Result<Engine> {
        let lost_at_open = recover_leases(&store)?;
        let routes = load_routes(&store)?;
        let (events_tx, events) = channel::bounded(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            store,
            clock: config.clock.clone(),
            ids,
            exact: config.durability == Durability::Exact,
            meters: Mutex::new(Default::default()),
            dirty_meters: SegQueue::new(),
            dirty_usage: SegQueue::new(),
            events: events_tx,
            commits: Default::default(),
        });
        let (tx, rx) = channel::unbounded();
        let writer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("keyledger-writer".into())
            .spawn(move || writer::run(writer_shared, rx))
            .map_err(|e| Error::Conflict(format!("cannot start the writer thread: {e}")))?;
        Ok(Engine {
            cache: Cache::new(config.cache_capacity),
            shared,
            tx,
            routes: ArcSwap::from_pointee(RouteTable::new(1, routes)),
            events,
            tiers: config.spend_tiers.clone(),
            accounts: Mutex::new(HashMap::new()),
            carried_states: Mutex::new(HashMap::new()),
            permission_sets: Mutex::new(HashMap::new()),
            lost_at_open,
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Returns every lease, flushes, and stops the writer. Idempotent.
    pub(crate) fn close(&self) -> Result<()> {
        let Some(handle) = self.writer.lock().take() else {
            return Ok(());
        };
        let (reply, done) = channel::bounded(1);
        let result = match self.tx.send(Msg::Close { reply }) {
            Ok(()) => done.recv().unwrap_or(Ok(())),
            Err(_) => Ok(()),
        };
        let _ = handle.join();
        result
    }

    /// Stops the writer without writing anything, as a crash would (tests only).
    pub(crate) fn abandon(&self) {
        if let Some(handle) = self.writer.lock().take() {
            let _ = self.tx.send(Msg::Abandon);
            let _ = handle.join();
        }
    }

    /// Flushes pending spend and usage now.
    pub(crate) fn flush(&self) -> Result<()> {
        let (reply, done) = channel::bounded(1);
        self.tx.send(Msg::Flush { reply }).map_err(|_| closed())?;
        done.recv().map_err(|_| closed())?
    }

    /// Sets or tops up a balance through the writer, ordered with leases.
    pub(crate) fn adjust(&self, id: u64, change: Adjust) -> Result<u64> {
        let (reply, done) = channel::bounded(1);
        self.tx
            .send(Msg::Adjust { id, change, reply })
            .map_err(|_| closed())?;
        done.recv().map_err(|_| closed())?
    }

    /// Credits left on balance `id`: the durable balance plus what memory holds leased and
    /// not yet reserved (at most what the record says is leased).
    pub(crate) fn remaining(&self, id: u64, record: &CreditsRecord) -> u64 {
        let meters = self.shared.meters.lock();
        let in_memory = meters
            .get(&id)
            .map_or(0, |m| m.lease.load(Ordering::Acquire));
        record.balance + in_memory.min(record.leased)
    }

    /// Waits until the writer has leased into `meter` (or refused).
    pub(crate) fn lease_now(&self, meter: &Arc<Meter>, need: u64) -> bool {
        let (reply, done) = channel::bounded(1);
        meter.pending.store(true, Ordering::Release);
        let msg = Msg::Lease {
            meter: meter.clone(),
            need,
            reply: Some(reply),
        };
        self.tx.send(msg).is_ok() && done.recv().is_ok()
    }

    /// Starts a background lease top-up.
    pub(crate) fn prefetch(&self, meter: &Arc<Meter>) {
        let _ = self.tx.send(Msg::Lease {
            meter: meter.clone(),
            need: 0,
            reply: None,
        });
    }

    /// Drops refunded units reserved before a `set` of the balance (see `Grant`).
    pub(crate) fn discard(&self, meter: &Arc<Meter>, units: u64) {
        let _ = self.tx.send(Msg::Discard {
            meter: meter.clone(),
            units,
        });
    }

    /// Charges units beyond a reservation from the durable balance; returns units charged.
    pub(crate) fn shortfall(&self, meter: &Arc<Meter>, units: u64) -> u64 {
        let (reply, done) = channel::bounded(1);
        let msg = Msg::Shortfall {
            meter: meter.clone(),
            units,
            reply,
        };
        if self.tx.send(msg).is_err() {
            return 0;
        }
        done.recv().unwrap_or(0)
    }

    /// An admin change to a key: drop the cached entries of its secrets' `hashes` so the
    /// next verify re-reads the record. A deleted key's meter retires.
    pub(crate) fn key_changed(&self, id: u64, hashes: &[KeyHash], change: KeyChange) {
        let evicted = self.cache.evict(hashes);
        if change != KeyChange::Deleted {
            // Rate-limit state survives the rebuild of the entry.
            let mut carry = self.carried_states.lock();
            if carry.len() > MAX_CARRIED_STATES {
                carry.clear();
            }
            for (_, entry) in evicted {
                carry.insert(id, entry.state);
            }
        }
        let meter = self
            .shared
            .meters
            .lock()
            .get(&id)
            .filter(|m| !m.is_pool())
            .cloned();
        if let Some(meter) = meter {
            match change {
                KeyChange::Deleted | KeyChange::CreditsRemoved => {
                    // Out of the registry now, not once the writer gets to it: a key metered
                    // again must get a new meter, not this one the writer is about to retire.
                    let mut meters = self.shared.meters.lock();
                    if meters.get(&id).is_some_and(|m| Arc::ptr_eq(m, &meter)) {
                        meters.remove(&id);
                    }
                    drop(meters);
                    let _ = self.tx.send(Msg::Retire { meter, gone: true });
                }
                KeyChange::CreditsChanged => {
                    // A new refill or balance may make an empty meter spendable again.
                    meter.empty_until_ms.store(0, Ordering::Release);
                    meter.refill_at_ms.store(0, Ordering::Release);
                }
                KeyChange::Settings => {}
            }
        }
    }

    /// An admin change to an account: every cached key of it sees the new state at once.
    pub(crate) fn account_changed(&self, owner: u64, record: &AccountRecord) {
        if let Some(state) = self.accounts.lock().get(&owner) {
            state.update(
                record.status,
                record.entitlements.clone(),
                &self.routes.load(),
            );
        }
    }

    /// A key with this hash was created: forget a remembered miss.
    pub(crate) fn key_created(&self, hash: &KeyHash) {
        self.cache.forget_missing(hash);
    }

    /// Keys may now match hashes that missed before (an import).
    pub(crate) fn hashes_changed(&self) {
        self.cache.forget_all_missing();
    }

    /// The hash scheme changed: every cache key changes, so start from an empty cache.
    pub(crate) fn scheme_changed(&self) {
        let evicted = self.cache.clear();
        self.retire(evicted);
    }

    /// Publishes new route rules and recompiles every cached key's bits against them.
    pub(crate) fn routes_changed(&self, store: &Store) -> Result<()> {
        let rules = load_routes(store)?;
        let generation = self.routes.load().generation + 1;
        let table = Arc::new(RouteTable::new(generation, rules));
        self.routes.store(table.clone());
        self.cache.for_each_mut(|e| {
            e.permission_bits = table.permission_bits(&e.permissions);
            e.route_generation = table.generation;
        });
        for account in self.accounts.lock().values() {
            account.recompile(&table);
        }
        Ok(())
    }

    /// Entries left the cache for good (capacity): their own meters may leave memory.
    fn retire(&self, evicted: Evicted) {
        for (_, entry) in evicted {
            if let Some(meter) = entry.meter.filter(|m| !m.is_pool()) {
                let _ = self.tx.send(Msg::Retire { meter, gone: false });
            }
        }
    }

    /// The cache-miss path: one look-up in redb, then the entry is cached (unless an admin
    /// change raced with the read, in which case it serves this one request uncached).
    pub(crate) fn load(
        &self,
        ledger: &Ledger,
        hash: &KeyHash,
        key: &str,
        now: Timestamp,
    ) -> Result<Loaded> {
        let epoch = self.cache.epoch();
        let Some(found) = lookup::find(ledger, key, now)? else {
            self.cache.insert_missing(*hash, epoch);
            return Ok(Loaded::Missing);
        };
        let record = found.record;
        let read = self.shared.store.begin_read()?;
        let account: Option<AccountRecord> = store::get(&read.open_table(ACCOUNTS)?, record.owner)?;
        let Some(account) = account else {
            return Ok(Loaded::Missing);
        };
        let usage: UsageRecord =
            store::get(&read.open_table(USAGE)?, found.id)?.unwrap_or_default();
        let credits = read.open_table(CREDITS)?;
        let balance = |id| -> Result<Option<CreditsRecord>> { store::get(&credits, id) };
        let meter = match record.pool {
            Some(pool) => {
                let p: Option<PoolRecord> = store::get(&read.open_table(POOLS)?, pool)?;
                let threshold = p.and_then(|p| p.low_balance_threshold);
                Some(self.meter(pool, threshold, IdKind::Pool, balance(pool)?, now))
            }
            None if record.limits.credits.is_some() => {
                let threshold = record.limits.low_balance_threshold;
                let kind = record.kind.id_kind();
                Some(self.meter(found.id, threshold, kind, balance(found.id)?, now))
            }
            None => None,
        };
        drop(credits);
        drop(read);
        let carried = self.carried_states.lock().remove(&found.id);
        let state = match carried.filter(|s| s.limits.configured_as(&record.limits)) {
            Some(state) => state,
            None => {
                let limits = KeyLimits::new(&record.limits);
                let state = Arc::new(KeyState::new(found.id, record.owner, limits, usage.spent));
                state.retier(&self.tiers, usage.spent);
                state
            }
        };
        let current = hashes_equal(&record.key_hash, hash);
        let secret_valid_until = match (&record.rolled, current) {
            (Some(old), false) => old.valid_until.0,
            _ => u64::MAX,
        };
        let table = self.routes.load();
        let account = self
            .accounts
            .lock()
            .entry(record.owner)
            .or_insert_with(|| {
                Arc::new(AccountState::new(
                    account.status,
                    account.entitlements.clone(),
                    &table,
                ))
            })
            .clone();
        let entry = KeyEntry {
            id: found.id,
            kind: record.kind.id_kind(),
            disabled: record.disabled_at.is_some(),
            expires_at: record.expires_at.map_or(u64::MAX, |t| t.0),
            secret_valid_until,
            route_generation: table.generation,
            permission_bits: table.permission_bits(&record.permissions),
            permissions: self.intern(record.permissions),
            ips: record.ips.into(),
            account,
            state,
            meter,
        };
        match self.cache.insert(*hash, entry, epoch) {
            Ok(evicted) => {
                self.retire(evicted);
                Ok(Loaded::Cached)
            }
            Err(entry) => Ok(Loaded::Uncached(Box::new(entry))),
        }
    }

    /// One shared allocation per distinct permission set (bounded; beyond the bound each key
    /// gets its own).
    fn intern(&self, permissions: Vec<String>) -> Arc<[String]> {
        const MAX_SETS: usize = 100_000;
        let mut sets = self.permission_sets.lock();
        if let Some(set) = sets.get(&permissions) {
            return set.clone();
        }
        let set: Arc<[String]> = permissions.clone().into();
        if sets.len() < MAX_SETS {
            sets.insert(permissions, set.clone());
        }
        set
    }

    /// The meter for a credit id, shared by every entry that spends from it. A new meter
    /// starts with no lease and knows the durable `balance` (for remaining-credit figures).
    fn meter(
        &self,
        id: u64,
        threshold: Option<u64>,
        subject: IdKind,
        record: Option<CreditsRecord>,
        now: Timestamp,
    ) -> Arc<Meter> {
        let mut meters = self.shared.meters.lock();
        let meter = meters.entry(id).or_insert_with(|| {
            let meter = Meter::new(id, threshold, subject, self.shared.exact);
            if let Some(r) = &record {
                meter.durable_balance.store(r.balance, Ordering::Release);
                meter.last_remaining.store(r.balance, Ordering::Release);
                meter
                    .refill_at_ms
                    .store(refill::due_at(r, now), Ordering::Release);
            }
            Arc::new(meter)
        });
        meter.clone()
    }
}

fn closed() -> Error {
    Error::Conflict("the ledger is closed".into())
}

/// At open: units still `leased` were in memory when the process died. Count them as lost
/// (spent, never re-granted) so no crash can let them be spent twice.
fn recover_leases(store: &Store) -> Result<u64> {
    let txn = store.begin_write()?;
    let mut lost = 0;
    {
        let mut table = txn.open_table(CREDITS)?;
        let mut changed = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let mut record: CreditsRecord = codec::decode(v.value())?;
            if record.leased > 0 {
                lost += record.leased;
                record.lost_to_crash += record.leased;
                record.leased = 0;
                changed.push((k.value(), record));
            }
        }
        for (id, record) in changed {
            store::put(&mut table, id, &record)?;
        }
    }
    txn.commit()?;
    Ok(lost)
}

fn load_routes(store: &Store) -> Result<Vec<RouteRule>> {
    let read = store.begin_read()?;
    let table = read.open_table(ROUTES)?;
    let mut rules = Vec::new();
    for entry in table.iter()? {
        rules.push(codec::decode(entry?.1.value())?);
    }
    Ok(rules)
}
