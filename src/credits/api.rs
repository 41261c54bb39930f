//! [`Credits`]: balances, top-ups, pools and usage, by public id.

use redb::ReadableTable;
use serde::Serialize;

use super::writer::{Adjust, AuditLine};
use crate::audit;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::keys::new_balance;
use crate::ledger::{Ledger, SYSTEM_ACTOR};
use crate::public_id::{IdKind, PublicId};
use crate::record::{CreditsRecord, KeyKind, KeyRecord, PoolRecord, Refill, UsageRecord, rules};
use crate::store::{self, tables::*};

/// Credit operations. Get one with [`Ledger::credits`].
pub struct Credits<'a> {
    pub(crate) ledger: &'a Ledger,
    pub(crate) actor: String,
}

/// The credit and usage state of a key, pool or account ([`Credits::usage`]).
///
/// `granted`, `spent`, `lost_to_crash` and `leased` are those of the id's own balance: a key
/// that spends from a pool has none (they are 0; the pool's usage has them), though
/// `remaining` is what it can spend; an account has none either (its keys' requests and
/// spend are summed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// The key, pool or account.
    pub id: PublicId,
    /// Credits that can still be spent: durable balance plus what memory holds leased
    /// (`None`: unmetered). For a key that spends from a pool, the pool's, shared with the
    /// pool's other keys.
    pub remaining: Option<u64>,
    /// The pool the key spends from, if it does (`None` for a pool or an account).
    pub pool: Option<PublicId>,
    /// Units ever granted (initial, top-ups, refills), less units removed by a set. A
    /// refill that has come due counts here, in `remaining` and in `leased` as the next
    /// request will apply it, though only a request writes it.
    pub granted: u64,
    /// Units spent and flushed to disk.
    pub spent: u64,
    /// Units that were leased into memory when the process crashed (or held by grants still
    /// running when a close's grace ended): counted as spent.
    pub lost_to_crash: u64,
    /// Units leased into memory right now: what `remaining` counts beyond the durable
    /// balance, plus what grants hold reserved and what they charged since the last flush.
    pub leased: u64,
    /// Successful verifies (keys only; pools report 0).
    pub requests: u64,
    /// Units charged over the key's life, metered or not (keys only).
    pub lifetime_spent: u64,
    /// Last successful verify (keys only).
    pub last_used_at: Option<Timestamp>,
}

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

impl Credits<'_> {
    /// The same handle, recording `actor` as the author of its changes.
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// Creates a pool of `credits` for `owner`; keys join it with
    /// [`NewKey::pool`](crate::NewKey::pool).
    pub fn create_pool(
        &self,
        owner: &str,
        name: &str,
        credits: u64,
        refill: Option<Refill>,
        low_balance_threshold: Option<u64>,
    ) -> Result<Pool> {
        let ids = &self.ledger.inner.ids;
        let owner_id = ids.decode(IdKind::Account, owner)?;
        let name = rules::name("name", name)?;
        let now = self.ledger.now();
        let txn = self.ledger.inner.store.begin_write()?;
        if txn.open_table(ACCOUNTS)?.get(owner_id)?.is_none() {
            return Err(Error::NotFound { what: "account" });
        }
        let id = store::next_id(&txn)?;
        let record = PoolRecord {
            owner: owner_id,
            name: name.clone(),
            refill,
            low_balance_threshold,
            created_at: now,
            created_by: self.actor.clone(),
        };
        store::put(&mut txn.open_table(POOLS)?, id, &record)?;
        store::put(
            &mut txn.open_table(CREDITS)?,
            id,
            &new_balance(credits, refill, now),
        )?;
        let public = ids.encode(IdKind::Pool, id);
        audit::append(&txn, now, &self.actor, "pool.created", &public, &[])?;
        txn.commit()?;
        Ok(Pool {
            id: public,
            owner: ids.encode(IdKind::Account, owner_id),
            name,
            remaining: credits,
            refill,
            low_balance_threshold,
        })
    }

    /// Deletes a pool and its balance. Refused with a conflict while a key or token still
    /// spends from it (delete those first: a key's pool cannot change). Returns the credits
    /// that were left, which go with it; the audit trail records the deletion.
    pub fn delete_pool(&self, id: &str) -> Result<u64> {
        let internal = self.ledger.inner.ids.decode(IdKind::Pool, id)?;
        let now = self.ledger.now();
        let txn = self.ledger.inner.store.begin_write()?;
        let left = {
            let mut pools = txn.open_table(POOLS)?;
            let record: PoolRecord =
                store::get(&pools, internal)?.ok_or(Error::NotFound { what: "pool" })?;
            // Only the owner's keys and tokens can spend from its pools.
            let keys = txn.open_table(KEYS)?;
            let mut users = 0;
            for entry in txn
                .open_table(KEYS_BY_OWNER)?
                .range((record.owner, 0, 0)..=(record.owner, u8::MAX, u64::MAX))?
            {
                let (_, _, key) = entry?.0.value();
                let key: Option<crate::record::KeyRecord> = store::get(&keys, key)?;
                users += usize::from(key.is_some_and(|k| k.pool == Some(internal)));
            }
            if users > 0 {
                return Err(Error::Conflict(format!(
                    "pool in use: {users} key(s) or token(s) spend from it; delete them first"
                )));
            }
            pools.remove(internal)?;
            let mut balances = txn.open_table(CREDITS)?;
            let credits: Option<CreditsRecord> = store::get(&balances, internal)?;
            balances.remove(internal)?;
            txn.open_table(USAGE)?.remove(internal)?;
            credits.map_or(0, |c| self.ledger.inner.engine.remaining(internal, &c))
        };
        audit::append(&txn, now, &self.actor, "pool.deleted", id, &[])?;
        txn.commit()?;
        self.ledger.inner.engine.pool_deleted(internal);
        Ok(left)
    }

    /// Sets (`Some`) or clears (`None`) a pool's low-balance threshold; like a key's, it
    /// applies to the very next spend, counting from the credits left now.
    pub fn set_pool_low_balance_threshold(&self, id: &str, threshold: Option<u64>) -> Result<Pool> {
        let internal = self.ledger.inner.ids.decode(IdKind::Pool, id)?;
        let txn = self.ledger.inner.store.begin_write()?;
        let record = {
            let mut pools = txn.open_table(POOLS)?;
            let mut record: PoolRecord =
                store::get(&pools, internal)?.ok_or(Error::NotFound { what: "pool" })?;
            record.low_balance_threshold = threshold;
            store::put(&mut pools, internal, &record)?;
            record
        };
        let (now, engine) = (self.ledger.now(), &self.ledger.inner.engine);
        audit::append(
            &txn,
            now,
            &self.actor,
            "pool.updated",
            id,
            &["low_balance_threshold"],
        )?;
        let balance = store::get(&txn.open_table(CREDITS)?, internal)?;
        txn.commit()?;
        engine.low_balance_changed(internal, threshold);
        Ok(self.pool_view(internal, record, balance))
    }

    /// Reads a pool.
    pub fn pool(&self, id: &str) -> Result<Pool> {
        let internal = self.ledger.inner.ids.decode(IdKind::Pool, id)?;
        let read = self.ledger.inner.store.begin_read()?;
        let record: PoolRecord = store::get(&read.open_table(POOLS)?, internal)?
            .ok_or(Error::NotFound { what: "pool" })?;
        let balance = store::get(&read.open_table(CREDITS)?, internal)?;
        Ok(self.pool_view(internal, record, balance))
    }

    /// The pools of `owner`, oldest first.
    pub fn pools(&self, owner: &str) -> Result<Vec<Pool>> {
        let owner = self.ledger.inner.ids.decode(IdKind::Account, owner)?;
        let read = self.ledger.inner.store.begin_read()?;
        let credits = read.open_table(CREDITS)?;
        let mut found = Vec::new();
        for entry in read.open_table(POOLS)?.iter()? {
            let (k, v) = entry?;
            let record: PoolRecord = crate::codec::decode(v.value())?;
            if record.owner == owner {
                let balance = store::get(&credits, k.value())?;
                found.push(self.pool_view(k.value(), record, balance));
            }
        }
        Ok(found)
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

    /// Adds `units` to a key's or pool's balance. Returns the durable balance after.
    pub fn top_up(&self, id: &str, units: u64) -> Result<u64> {
        self.adjust(id, Adjust::TopUp(units), "credits.topped_up")
    }

    /// Sets a key's or pool's balance to exactly `units` (leases in memory are taken back
    /// first). Returns the balance.
    pub fn set(&self, id: &str, units: u64) -> Result<u64> {
        self.adjust(id, Adjust::Set(units), "credits.set")
    }

    fn adjust(&self, id: &str, change: Adjust, action: &'static str) -> Result<u64> {
        // Checked here: the writer's transaction, which appends the entry, is shared.
        crate::record::rules::actor(&self.actor)?;
        let (kind, internal) = self.credit_id(id)?;
        if kind == IdKind::Account {
            return Err(Error::invalid(
                "id",
                "an account holds no balance: top up or set its keys or pools",
            ));
        }
        let audit = AuditLine {
            actor: self.actor.clone(),
            action,
            target: id.to_owned(),
        };
        match self
            .ledger
            .inner
            .engine
            .adjust(internal, change, Some(audit))
        {
            Err(Error::NotFound { .. }) => Err(self.no_balance(kind, internal)?),
            other => other,
        }
    }

    /// Credit and usage state of a key (`key_…`, `tok_…`), pool (`pool_…`) or account
    /// (`acct_…`: spend and requests summed over its keys; accounts hold no balance). A key
    /// that spends from a pool reports the pool's `remaining` and names it in `pool`.
    /// Pending counters are flushed first, so the figures are exact at the time of the call:
    /// with no grant held, `spent + remaining + lost_to_crash == granted`. Units reserved by
    /// grants still held, or charged by requests that committed while this call ran, are in
    /// `leased` and in neither `spent` nor `remaining` (they are no longer spendable and not
    /// yet written as spent).
    pub fn usage(&self, id: &str) -> Result<Usage> {
        let (kind, internal) = self.credit_id(id)?;
        match self.ledger.flush() {
            // A close flushed everything already.
            Ok(()) | Err(Error::Closed) => {}
            Err(e) => return Err(e),
        }
        let read = self.ledger.inner.store.begin_read()?;
        let pool = match kind {
            IdKind::Key | IdKind::Token => {
                store::get::<KeyRecord>(&read.open_table(KEYS)?, internal)?.and_then(|k| k.pool)
            }
            _ => None,
        };
        let balances = read.open_table(CREDITS)?;
        let credits: Option<CreditsRecord> = store::get(&balances, internal)?;
        let usage: UsageRecord =
            store::get(&read.open_table(USAGE)?, internal)?.unwrap_or_default();
        let engine = &self.ledger.inner.engine;
        // A key on a pool has no balance of its own: it can spend what the pool has left
        // (0 for a pool without a balance, as `pool` shows it), never unmetered.
        // A refill that has come due counts as applied, in every figure.
        let own = credits.map(|c| engine.balance_now(internal, &c));
        let remaining = match pool {
            Some(pool) => Some(
                store::get::<CreditsRecord>(&balances, pool)?
                    .map_or(0, |c| engine.remaining(pool, &c)),
            ),
            None => own.as_ref().map(|(_, left)| *left),
        };
        let ids = &self.ledger.inner.ids;
        let c = own.map(|(c, _)| c).unwrap_or_default();
        Ok(Usage {
            id: ids.encode(kind, internal),
            remaining,
            pool: pool.map(|p| ids.encode(IdKind::Pool, p)),
            granted: c.granted,
            spent: c.spent,
            lost_to_crash: c.lost_to_crash,
            leased: c.leased,
            requests: usage.requests,
            lifetime_spent: usage.spent,
            last_used_at: usage.last_used_at,
        })
    }

    /// Why a key, token or pool has no balance to change, as the error to return.
    fn no_balance(&self, kind: IdKind, internal: u64) -> Result<Error> {
        let not_found = Error::NotFound {
            what: "credit balance",
        };
        if kind == IdKind::Pool {
            return Ok(not_found);
        }
        let read = self.ledger.inner.store.begin_read()?;
        let key: Option<KeyRecord> = store::get(&read.open_table(KEYS)?, internal)?;
        Ok(match key {
            Some(k) if k.pool.is_some() => Error::invalid(
                "id",
                format!(
                    "this {} spends from a pool: top up or set the pool instead",
                    kind.noun()
                ),
            ),
            Some(_) => Error::invalid(
                "id",
                format!(
                    "this {0} is unmetered: give it credits with a {0} update first",
                    kind.noun()
                ),
            ),
            None => not_found,
        })
    }

    /// The kind and internal id of a key, token, pool or account public id whose record
    /// exists.
    fn credit_id(&self, id: &str) -> Result<(IdKind, u64)> {
        let ids = &self.ledger.inner.ids;
        let (kind, table) = match id.split_once('_').map(|(p, _)| p) {
            Some("pool") => (IdKind::Pool, POOLS),
            Some("tok") => (IdKind::Token, KEYS),
            Some("acct") => (IdKind::Account, ACCOUNTS),
            Some("key") => (IdKind::Key, KEYS),
            _ => {
                return Err(Error::invalid(
                    "id",
                    "expected a key, token, pool or account id",
                ));
            }
        };
        let internal = ids.decode(kind, id)?;
        let read = self.ledger.inner.store.begin_read()?;
        let found = match kind {
            // An authentic id of another ledger with the same master key may name a record of
            // the other kind here: a `key_` id never reaches a token's balance, nor the reverse.
            IdKind::Key | IdKind::Token => {
                store::get::<KeyRecord>(&read.open_table(table)?, internal)?.is_some_and(|r| {
                    matches!(r.kind, KeyKind::Token { .. }) == (kind == IdKind::Token)
                })
            }
            _ => read.open_table(table)?.get(internal)?.is_some(),
        };
        if !found {
            return Err(Error::NotFound { what: kind.noun() });
        }
        Ok((kind, internal))
    }
}

impl Ledger {
    /// Balances, top-ups, pools and usage.
    pub fn credits(&self) -> Credits<'_> {
        Credits {
            ledger: self,
            actor: SYSTEM_ACTOR.into(),
        }
    }
}
