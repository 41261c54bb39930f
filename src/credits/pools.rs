//! Shared credit pools: several keys of one account spending one budget. Created, read,
//! changed and deleted here; their balance moves through [`Credits::top_up`] and
//! [`Credits::set`], and is spent by the keys that join it ([`NewKey::pool`](crate::NewKey::pool)).

use redb::ReadableTable;
use serde::Serialize;

use super::Credits;
use super::refill;
use crate::audit;
use crate::error::{Error, Result};
use crate::keys::new_balance;
use crate::public_id::{IdKind, PublicId};
use crate::record::{CreditsRecord, PoolRecord, Refill, RefillInterval};
use crate::store::{self, tables::*};

/// A shared credit pool: several keys of one account spending one budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pool {
    /// Public id (`pool_…`), for [`NewKey::pool`](crate::NewKey::pool).
    pub id: PublicId,
    /// Owning account.
    pub owner: PublicId,
    /// Name.
    pub name: String,
    /// Credits available.
    pub remaining: u64,
    /// Refill that replaces the balance each period.
    pub refill: Option<Refill>,
    /// Low-balance event threshold.
    pub low_balance_threshold: Option<u64>,
}

/// A pool to create ([`Credits::create_pool`]).
#[derive(Debug, Clone)]
pub struct NewPool {
    owner: String,
    name: String,
    credits: u64,
    refill: Option<Refill>,
    low_balance_threshold: Option<u64>,
}

impl NewPool {
    /// A pool for `owner` (an account's public id) named `name` (1–50 characters), holding
    /// no credits until given some.
    pub fn new(owner: impl Into<String>, name: impl Into<String>) -> Self {
        NewPool {
            owner: owner.into(),
            name: name.into(),
            credits: 0,
            refill: None,
            low_balance_threshold: None,
        }
    }

    /// Starting credits.
    pub fn credits(mut self, credits: u64) -> Self {
        self.credits = credits;
        self
    }

    /// Replaces the balance with `amount` every `interval`, from the next period on. What a
    /// balance was ever granted is counted to `u64::MAX`: a refill gives what still fits
    /// under it, so refills of near `u64::MAX` ("unlimited") stop once that much is spent.
    pub fn refill(mut self, amount: u64, interval: RefillInterval) -> Self {
        self.refill = Some(Refill { amount, interval });
        self
    }

    /// Emits a low-balance event when the credits left fall to or below `threshold`.
    pub fn low_balance_threshold(mut self, threshold: u64) -> Self {
        self.low_balance_threshold = Some(threshold);
        self
    }
}

/// A change to a pool ([`Credits::update_pool`]): only the fields set change. Its balance
/// changes through [`Credits::top_up`] and [`Credits::set`].
#[derive(Debug, Clone, Default)]
pub struct PoolUpdate {
    name: Option<String>,
    refill: Option<Option<Refill>>,
    low_balance_threshold: Option<Option<u64>>,
}

impl PoolUpdate {
    /// An update that changes nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new name (1–50 characters).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets (`Some`) or clears (`None`) the refill. New terms start with the next period of
    /// their own interval; the balance of this one stays. Refills apply lazily, at the next
    /// spend: one that was due under the old terms and not applied yet is applied on the new
    /// ones — and, once the refill is cleared, not at all (the balance stays as it is, though
    /// `usage` counted that refill as applied before).
    pub fn refill(mut self, refill: Option<Refill>) -> Self {
        self.refill = Some(refill);
        self
    }

    /// Sets (`Some`) or clears (`None`) the low-balance threshold. It applies to the very
    /// next spend, counting from the credits left now.
    pub fn low_balance_threshold(mut self, threshold: Option<u64>) -> Self {
        self.low_balance_threshold = Some(threshold);
        self
    }
}

impl Credits<'_> {
    /// Creates a pool; keys join it with [`NewKey::pool`](crate::NewKey::pool).
    pub fn create_pool(&self, new: NewPool) -> Result<Pool> {
        self.ledger.guarded(|| {
            let ids = &self.ledger.inner.ids;
            let owner_id = ids.decode(IdKind::Account, &new.owner)?;
            let name = self.ledger.label("name", &new.name)?;
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            if !self.sees(owner_id) || txn.open_table(ACCOUNTS)?.get(owner_id)?.is_none() {
                return Err(Error::NotFound { what: "account" });
            }
            let id = store::next_id(&txn)?;
            let record = PoolRecord {
                owner: owner_id,
                name,
                refill: new.refill,
                low_balance_threshold: new.low_balance_threshold,
                created_at: now,
                created_by: self.actor.clone(),
            };
            store::put(&mut txn.open_table(POOLS)?, id, &record)?;
            txn.open_table(POOLS_BY_OWNER)?.insert((owner_id, id), ())?;
            let balance = new_balance(new.credits, new.refill, now);
            store::put(&mut txn.open_table(CREDITS)?, id, &balance)?;
            let public = ids.encode(IdKind::Pool, id);
            audit::append(
                &txn,
                self.ledger,
                now,
                &self.actor,
                "pool.created",
                &public,
                &[],
            )?;
            txn.commit_change()?;
            Ok(self.pool_view(id, record, Some(balance)))
        })
    }

    /// Changes a pool's name, refill or low-balance threshold. Each applies to the very next
    /// spend of any of its keys; the audit trail names the fields that changed.
    pub fn update_pool(&self, id: &str, update: PoolUpdate) -> Result<Pool> {
        self.ledger.guarded(|| {
            let internal = self.ledger.inner.ids.decode(IdKind::Pool, id)?;
            let name = update
                .name
                .map(|n| self.ledger.label("name", &n))
                .transpose()?;
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            let (record, balance, changed) = {
                let mut pools = txn.open_table(POOLS)?;
                let mut balances = txn.open_table(CREDITS)?;
                let mut record: PoolRecord = self.seen(store::get(&pools, internal)?)?;
                let mut balance: Option<CreditsRecord> = store::get(&balances, internal)?;
                let mut changed = Vec::new();
                if let Some(name) = name {
                    audit::set(&mut changed, "name", &mut record.name, name);
                }
                if let Some(r) = update.refill {
                    audit::set(&mut changed, "refill", &mut record.refill, r);
                }
                if let Some(t) = update.low_balance_threshold {
                    let field = &mut record.low_balance_threshold;
                    audit::set(&mut changed, "low_balance_threshold", field, t);
                }
                if !changed.is_empty() {
                    store::put(&mut pools, internal, &record)?;
                    if let Some(b) = balance.as_mut().filter(|b| b.refill != record.refill) {
                        refill::replace(b, record.refill, now);
                        store::put(&mut balances, internal, b)?;
                    }
                    audit::append(
                        &txn,
                        self.ledger,
                        now,
                        &self.actor,
                        "pool.updated",
                        id,
                        &changed,
                    )?;
                }
                (record, balance, changed)
            };
            if changed.is_empty() {
                self.ledger.actor_ok(&self.actor)?; // refused all the same
                txn.abort()?;
                return Ok(self.pool_view(internal, record, balance));
            }
            let engine = &self.ledger.inner.engine;
            txn.commit_then(|_| {
                if changed.contains(&"refill") {
                    engine.pool_refill_changed(internal);
                }
                if changed.contains(&"low_balance_threshold") {
                    engine.low_balance_changed(internal, record.low_balance_threshold);
                }
            })?;
            Ok(self.pool_view(internal, record, balance))
        })
    }

    /// Deletes a pool and its balance. Refused with a conflict while a key or token still
    /// spends from it (move them out with [`KeyUpdate::pool`](crate::KeyUpdate::pool), or
    /// delete them, first). Returns the credits that were left, which go with it; the audit
    /// trail records the deletion.
    ///
    /// A pool record that does not decode (`check` names it) is deleted all the same, its
    /// owner read from the owners' index (without one, every key is read to find its
    /// users); so is a balance that does not decode, reported as 0 credits left. The audit
    /// event of either names the field `unreadable`.
    pub fn delete_pool(&self, id: &str) -> Result<u64> {
        self.ledger.guarded(|| {
            let internal = self.ledger.inner.ids.decode(IdKind::Pool, id)?;
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            let (left, unreadable) = {
                let mut pools = txn.open_table(POOLS)?;
                let (owner, unreadable) = match store::get::<PoolRecord>(&pools, internal) {
                    Ok(record) => (Some(self.seen(record)?.owner), false),
                    // Not a reason to refuse: nothing else could remove it (found by a
                    // reviewer).
                    Err(Error::Codec(_)) => {
                        let owner = indexed_owner(&txn, internal)?;
                        let visible = match owner {
                            Some(o) => self.sees(o),
                            None => self.sees_all(),
                        };
                        if !visible {
                            return Err(Error::NotFound { what: "pool" });
                        }
                        (owner, true)
                    }
                    Err(e) => return Err(e),
                };
                let users = users(&txn, owner, internal)?;
                if users > 0 {
                    return Err(Error::Conflict(format!(
                        "pool in use: {users} key(s) or token(s) spend from it; move them to another \
                         pool or delete them first"
                    )));
                }
                pools.remove(internal)?;
                if let Some(owner) = owner {
                    txn.open_table(POOLS_BY_OWNER)?.remove((owner, internal))?;
                }
                let mut balances = txn.open_table(CREDITS)?;
                // A balance that does not decode goes the same way; what was left on it is
                // unknown, and reported as 0.
                let (credits, unreadable) = match store::get::<CreditsRecord>(&balances, internal) {
                    Ok(credits) => (credits, unreadable),
                    Err(Error::Codec(_)) => (None, true),
                    Err(e) => return Err(e),
                };
                balances.remove(internal)?;
                txn.open_table(USAGE)?.remove(internal)?;
                let left = credits.map_or(0, |c| self.ledger.inner.engine.remaining(internal, &c));
                (left, unreadable)
            };
            let fields: &[&str] = if unreadable { &["unreadable"] } else { &[] };
            audit::append(&txn, self.ledger, now, &self.actor, "pool.deleted", id, fields)?;
            txn.commit_then(|_| self.ledger.inner.engine.pool_deleted(internal))?;
            Ok(left)
        })
    }

    /// Reads a pool.
    pub fn pool(&self, id: &str) -> Result<Pool> {
        self.ledger.guarded(|| {
            let internal = self.ledger.inner.ids.decode(IdKind::Pool, id)?;
            let read = self.ledger.inner.store.begin_read()?;
            let record: PoolRecord = self.seen(store::get(&read.open_table(POOLS)?, internal)?)?;
            let balance = store::get(&read.open_table(CREDITS)?, internal)?;
            Ok(self.pool_view(internal, record, balance))
        })
    }

    /// The pools of `owner`, oldest first; `NotFound` for an account that does not exist
    /// (as key listings answer). Reads that account's pools only. A pool whose record or
    /// balance does not decode fails the list with
    /// [`CodecError::Row`](crate::CodecError::Row) naming it; [`delete_pool`](Self::delete_pool)
    /// removes it.
    pub fn pools(&self, owner: &str) -> Result<Vec<Pool>> {
        self.ledger.guarded(|| {
            let owner = self.ledger.inner.ids.decode(IdKind::Account, owner)?;
            let read = self.ledger.inner.store.begin_read()?;
            if !self.sees(owner) || read.open_table(ACCOUNTS)?.get(owner)?.is_none() {
                return Err(Error::NotFound { what: "account" });
            }
            let (pools, credits) = (read.open_table(POOLS)?, read.open_table(CREDITS)?);
            let mut found = Vec::new();
            for entry in read
                .open_table(POOLS_BY_OWNER)?
                .range((owner, 0)..=(owner, u64::MAX))?
            {
                let (_, id) = entry?.0.value();
                // A pool that does not decode fails the list naming it, as a damaged key
                // fails its owner's key list: left out, its damage would go unseen.
                let named = |e: Error| {
                    let row = || self.ledger.inner.ids.encode(IdKind::Pool, id).to_string();
                    e.of_row(row, "`credits().delete_pool` removes it")
                };
                let record: PoolRecord = store::get(&pools, id)
                    .map_err(named)?
                    .ok_or(Error::NotFound { what: "pool" })?;
                let balance = store::get(&credits, id).map_err(named)?;
                found.push(self.pool_view(id, record, balance));
            }
            Ok(found)
        })
    }

    /// The pool record read, if this handle sees its owner; else (or if absent) `NotFound`.
    fn seen(&self, record: Option<PoolRecord>) -> Result<PoolRecord> {
        record
            .filter(|r| self.sees(r.owner))
            .ok_or(Error::NotFound { what: "pool" })
    }

    /// A pool as the API shows it, `durable` being its stored balance (read with `r`).
    fn pool_view(&self, id: u64, r: PoolRecord, durable: Option<CreditsRecord>) -> Pool {
        let ids = &self.ledger.inner.ids;
        Pool {
            id: ids.encode(IdKind::Pool, id),
            owner: ids.encode(IdKind::Account, r.owner),
            name: r.name,
            remaining: durable.map_or(0, |c| self.ledger.inner.engine.remaining(id, &c)),
            refill: r.refill,
            low_balance_threshold: r.low_balance_threshold,
        }
    }
}

/// The owner the pools' index files pool `pool` under, for a pool whose record does not
/// decode.
fn indexed_owner(txn: &redb::WriteTransaction, pool: u64) -> Result<Option<u64>> {
    for entry in txn.open_table(POOLS_BY_OWNER)?.iter()? {
        let (owner, p) = entry?.0.value();
        if p == pool {
            return Ok(Some(owner));
        }
    }
    Ok(None)
}

/// How many keys and tokens spend from `pool`: among `owner`'s (only the owner's keys can
/// spend from its pools), or among all keys when the owner is unknown.
fn users(txn: &redb::WriteTransaction, owner: Option<u64>, pool: u64) -> Result<usize> {
    let keys = txn.open_table(KEYS)?;
    let spends = |key: Option<crate::record::KeyRecord>| key.is_some_and(|k| k.pool == Some(pool));
    let mut users = 0;
    match owner {
        Some(owner) => {
            for entry in txn
                .open_table(KEYS_BY_OWNER)?
                .range((owner, 0, 0)..=(owner, u8::MAX, u64::MAX))?
            {
                let (_, _, key) = entry?.0.value();
                users += usize::from(spends(store::get(&keys, key)?));
            }
        }
        None => {
            for entry in keys.iter()? {
                let (_, bytes) = entry?;
                // A key record that does not decode is named by `check`, not counted.
                let key = crate::codec::decode(bytes.value()).ok();
                users += usize::from(spends(key));
            }
        }
    }
    Ok(users)
}
