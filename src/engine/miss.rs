//! The cache-miss path: one read of the key's record (and, once per account or pool, of
//! theirs), then the entry built and installed in the cache, unless an admin change raced
//! with the read.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Engine;
use crate::cache::{AccountState, CachedKey, MeterRef, Metering, Scope, Snapshot};
use crate::clock::Timestamp;
use crate::credits::meter::Meter;
use crate::credits::refill;
use crate::error::{Error, Result};
use crate::hashing::KeyHash;
use crate::keys::lookup;
use crate::ledger::Ledger;
use crate::limits::KeyLimits;
use crate::public_id::IdKind;
use crate::record::{AccountRecord, CreditsRecord, PoolRecord, UsageRecord, VerifyRecord};
use crate::store::{self, tables::*};

/// What the reading half of a cache miss found (see `Engine::install`).
pub(super) struct MissRead {
    hash: KeyHash,
    /// The cache's invalidation epoch, the meter-reset count and the last limits generation
    /// before the read began.
    epoch: u64,
    pub(super) generation: u64,
    resets: u64,
    record: VerifyRecord,
    account: Arc<AccountState>,
    lifetime_spent: u64,
    metering: Metering,
    pool: Option<Arc<Meter>>,
    /// Whether `hash` is where the store holds the key's secret (see `lookup::find_in`).
    cacheable: bool,
}

/// What the miss path found.
pub(crate) enum Loaded {
    /// No key has this hash.
    Missing,
    /// The entry is now in the cache (it may be evicted again before the caller looks, so
    /// the caller checks this one rather than probing again).
    Cached(Arc<CachedKey>),
    /// The entry could not be cached (an admin change raced with the read).
    Uncached(Arc<CachedKey>),
}

impl Engine {
    /// The cache-miss path: one look-up in redb, then the entry is cached (unless an admin
    /// change raced with the read, in which case it serves this one request uncached).
    pub(crate) fn load(
        &self,
        ledger: &Ledger,
        hash: &KeyHash,
        key: &str,
        now: Timestamp,
    ) -> Result<Loaded> {
        self.shared.store.guard(|| {
            // A retry needs a meter reset committed while this miss was reading (any key or pool
            // deleted, a key made unmetered, any low-balance threshold changed: one counter for
            // all) or this key's limits reconfigured. Each is a durable commit, far longer than
            // a miss's read, so eight in a row do not happen; each retry reads a newer commit.
            const ATTEMPTS: usize = 8;
            for _ in 0..ATTEMPTS {
                let read = match self.read_miss(ledger, hash, key, now)? {
                    Ok(read) => read,
                    Err(loaded) => return Ok(loaded),
                };
                if let Some(loaded) = self.install(read) {
                    return Ok(loaded);
                }
            }
            Err(Error::Conflict(
                "the key kept changing while it was being loaded; retry".into(),
            ))
        })
    }

    /// The reading half of a miss: everything the cache entry is built from, in one read
    /// transaction. The account is read once per account (its state stays in memory) and
    /// the usage only when spend tiers need the lifetime spend. `Err`: nothing to cache.
    pub(super) fn read_miss(
        &self,
        ledger: &Ledger,
        hash: &KeyHash,
        key: &str,
        now: Timestamp,
    ) -> Result<std::result::Result<MissRead, Loaded>> {
        // Both read before the snapshot is taken: a change committed after it was taken
        // bumps them after its commit (see `install`), and one committed before is in it
        // (see `Store::snapshot`).
        let epoch = self.cache.epoch();
        let resets = self.shared.meter_resets.load(Ordering::Acquire);
        let generation = self.shared.limits_generation.load(Ordering::Acquire);
        let snapshot = self.shared.store.snapshot()?;
        let read = &snapshot.txn;
        let Some((found, cacheable)) = lookup::find_in(ledger, &snapshot, hash, key, now)? else {
            self.cache.insert_missing(*hash, epoch);
            return Ok(Err(Loaded::Missing));
        };
        let known_account = self.accounts.lock().get(&found.owner).cloned();
        let account = match known_account {
            Some(state) => state,
            None => {
                let stored: Option<AccountRecord> = store::get(snapshot.accounts()?, found.owner)?;
                let Some(stored) = stored else {
                    return Ok(Err(Loaded::Missing));
                };
                let state = Arc::new(AccountState::new(
                    found.owner,
                    stored.status,
                    stored.entitlements,
                ));
                #[cfg(test)]
                if let Some(pause) = self.shared.after_account_read.lock().take() {
                    pause();
                }
                let mut accounts = self.accounts.lock();
                match accounts.get(&found.owner) {
                    Some(known) => known.clone(),
                    // Shared from now on only if no change came since the read began (an
                    // account change bumps the epoch under this lock); otherwise it serves
                    // this request only, and the key is not cached either.
                    None if self.cache.epoch() == epoch => {
                        accounts.insert(found.owner, state.clone());
                        state
                    }
                    None => state,
                }
            }
        };
        // Only a key with rate limits has a spend tier (it scales them).
        let limited = found.limits.rate_limited();
        let lifetime_spent = match self.tiers.is_empty() || !limited {
            true => 0,
            false => {
                let usage: Option<UsageRecord> = store::get(snapshot.usage()?, found.id)?;
                usage.map_or(0, |u| u.spent)
            }
        };
        let metering = match (found.pool, found.limits.credits) {
            (Some(_), _) => Metering::Pool,
            (None, Some(_)) => Metering::Own,
            (None, None) => Metering::Unmetered,
        };
        // A key's own balance is not read here: its first lease reads it (and a request that
        // spends waits for that lease anyway), and a grant asked for the credits left before
        // then reads it itself. A pool's meter is shared, so it is made knowing its balance.
        let registered = |id| match self.shared.meters.lock().get(id) {
            Some(MeterRef::Pool(meter)) => Some(meter),
            _ => None,
        };
        let pool = match found.pool {
            Some(pool) => Some(match registered(pool) {
                // A pool in use already has its meter: nothing to read.
                Some(meter) => meter,
                None => {
                    let p: Option<PoolRecord> = store::get(&read.open_table(POOLS)?, pool)?;
                    let threshold = p.and_then(|p| p.low_balance_threshold);
                    let balance = store::get(&snapshot.credits, pool)?;
                    self.pool_meter(pool, threshold, balance, now, resets)?
                }
            }),
            None => None,
        };
        Ok(Ok(MissRead {
            hash: *hash,
            epoch,
            generation,
            resets,
            record: found,
            account,
            lifetime_spent,
            metering,
            pool,
            cacheable,
        }))
    }

    /// The caching half of a miss: builds the entry from what was read and caches it.
    /// `None`: a key's balance was removed since the read began, maybe this one's; read again.
    pub(super) fn install(&self, read: MissRead) -> Option<Loaded> {
        let MissRead {
            hash,
            epoch,
            generation,
            resets,
            record,
            account,
            lifetime_spent,
            metering,
            pool,
            cacheable,
        } = read;
        let table = self.policy.load().routes.clone();
        let kind = record.id_kind();
        // Taken out only once the entry is cached: a miss that raced a change serves one
        // request and must leave the evicted snapshot (its rate-limit state) for the rebuild.
        let carried = self.carried.lock().get(&record.id).cloned();
        let carried_limits = carried.as_ref().and_then(|c| c.limits.as_ref());
        let chosen = match record.limits.rate_limited() {
            false => None,
            true => {
                let build = |counted: u64| {
                    KeyLimits::new(&record.limits, lifetime_spent.max(counted), &self.tiers)
                };
                let mut live = self.shared.limits.lock();
                let chosen =
                    live.of(record.id, &record.limits, carried_limits, generation, build)?;
                // A state reused may have missed spend flushed while it was not the key's
                // live one (a miss that could not cache pointed the key elsewhere).
                if !self.tiers.is_empty() {
                    chosen.limits.count_at_least(lifetime_spent, &self.tiers);
                }
                Some(chosen)
            }
        };
        let limits = chosen.as_ref().map(|c| c.limits.clone());
        let snapshot = Snapshot {
            kind,
            disabled: record.disabled,
            expires_at: record.expires_at.map_or(u64::MAX, |t| t.0),
            scope: self.intern(Scope {
                permissions: record.permissions,
                // Stored before ranges were kept in IPv4 form: matched as they are now.
                ips: record
                    .ips
                    .into_iter()
                    .map(crate::record::ipv4_if_mapped)
                    .collect(),
                secret_valid_until: record.valid_until.map_or(u64::MAX, |t| t.0),
            }),
            account,
            limits,
            metering,
            pool,
        };
        let threshold = record.limits.low_balance_threshold;
        let build = |home: Option<Arc<CachedKey>>| {
            let meter = Meter::new(record.id, threshold, kind, self.shared.exact);
            let key = CachedKey::new(snapshot, &table, home, meter);
            Arc::new(key)
        };
        let key = if metering == Metering::Own {
            // The live meter of this balance, if any, is the one to keep spending from; the
            // registry lock makes sure two concurrent misses do not both create one. Without
            // one, the key starts a new home: a carried home's own meter is unused or retired.
            let mut meters = self.shared.meters.lock();
            if carried.is_some() {
                // An admin change carried the old entry: if the key spent from a pool or not
                // at all before it, that home is not asked for again. (Without a carried
                // entry, an old home is the writer's or an eviction's to let go of.)
                meters.drop_home(record.id);
            }
            match meters.get(record.id) {
                Some(MeterRef::Own(home)) => build(Some(home)),
                // A reset counted since the read began may be this key's, which found no meter
                // to retire or tell: registering one now would leave it in memory for good, or
                // with the threshold the change replaced.
                _ if self.shared.meter_resets.load(Ordering::Acquire) != resets => {
                    return None;
                }
                _ => {
                    let key = build(None);
                    meters.insert(MeterRef::Own(key.clone()));
                    key
                }
            }
        } else {
            // No meter, but the live home if the key has one: one home per key while its
            // usage waits for the writer, however often the key is cached again.
            let mut meters = self.shared.meters.lock();
            let key = build(meters.home_of(record.id).or_else(|| carried.clone()));
            meters.keep_home(&key.home_arc());
            key
        };
        // Released before the entry is cached, not after: an eviction of the new entry in
        // between holds the state again, which a later release would undo.
        if let Some(chosen) = &chosen {
            self.shared.limits.lock().release(record.id, &chosen.limits);
        }
        // A hash made before a rotation published a new hasher (by a verify that loaded the
        // policy first) is no longer the key's: an entry under it is one no admin change
        // evicts, serving the key as it is now to verifies that hashed under the old scheme
        // after a disable or delete (found by a reviewer). Served uncached.
        let inserted = match cacheable {
            true => self.cache.insert(hash, key.clone(), epoch),
            false => Err(key.clone()),
        };
        Some(match inserted {
            Ok(evicted) => {
                if let Some(carried) = carried {
                    let mut all = self.carried.lock();
                    if all
                        .get(&record.id)
                        .is_some_and(|c| Arc::ptr_eq(c, &carried))
                    {
                        all.remove(&record.id);
                    }
                }
                self.retire(evicted);
                Loaded::Cached(key)
            }
            Err(key) => {
                if let Some(chosen) = &chosen {
                    let now_ns = self.shared.clock.monotonic_ns();
                    self.shared
                        .limits
                        .lock()
                        .uncached(record.id, chosen, now_ns);
                }
                Loaded::Uncached(key)
            }
        })
    }

    /// One shared allocation per distinct scope (bounded; beyond the bound each key gets
    /// its own). A previous secret's scope carries its own deadline: never shared, so not kept.
    fn intern(&self, scope: Scope) -> Arc<Scope> {
        const MAX_SCOPES: usize = 100_000;
        if scope.secret_valid_until != u64::MAX {
            return Arc::new(scope);
        }
        let mut scopes = self.scopes.lock();
        if let Some(known) = scopes.get(&scope) {
            return known.clone();
        }
        let scope = Arc::new(scope);
        scopes.insert(scope.clone(), MAX_SCOPES);
        scope
    }

    /// The meter of pool `id`, shared by every key that spends from it. A new meter starts
    /// with no lease and knows the durable balance (for remaining-credit figures).
    pub(super) fn pool_meter(
        &self,
        id: u64,
        threshold: Option<u64>,
        record: Option<CreditsRecord>,
        now: Timestamp,
        resets: u64,
    ) -> Result<Arc<Meter>> {
        let mut meters = self.shared.meters.lock();
        if let Some(MeterRef::Pool(meter)) = meters.get(id) {
            return Ok(meter.clone());
        }
        // A threshold change or a deletion since the read began may be missing from it: read
        // the pool again, under the lock the change counts its reset under (then it is
        // committed). A pool deleted since gets a meter for this request only, never
        // registered (the miss serves it uncached, then reads again).
        let (threshold, exists) = if self.shared.meter_resets.load(Ordering::Acquire) == resets {
            (threshold, true)
        } else {
            let read = self.shared.store.begin_read()?;
            let pool: Option<PoolRecord> = store::get(&read.open_table(POOLS)?, id)?;
            (
                pool.as_ref().and_then(|p| p.low_balance_threshold),
                pool.is_some(),
            )
        };
        let meter = Meter::new(id, threshold, IdKind::Pool, self.shared.exact);
        if let Some(r) = &record {
            init_meter(&meter, r, now);
        }
        let meter = Arc::new(meter);
        if exists {
            meters.insert(MeterRef::Pool(meter.clone()));
        }
        Ok(meter)
    }
}

/// A new pool meter's view of its durable balance. Its low-balance figure stays unread, as a
/// key's does: the writer's first read of the balance sets it (`Meter::sighted`), so a
/// change between this read and that one is measured once, by the writer (found by a
/// reviewer: a `set` the writer reported with no meter in memory was reported again from
/// this older figure).
pub(crate) fn init_meter(meter: &Meter, record: &CreditsRecord, now: Timestamp) {
    meter
        .durable_balance
        .store(record.balance, Ordering::Release);
    meter.set_refill_at(refill::due_at(record, now));
}
