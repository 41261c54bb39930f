//! [`Credits`]: balances, top-ups, pools and usage, by public id.

use serde::Serialize;

use super::writer::{Adjust, AuditLine};
use crate::clock::Timestamp;
use crate::error::{Error, InvalidId, Result};
use crate::ledger::{Ledger, SYSTEM_ACTOR};
use crate::public_id::{IdKind, PublicId};
use crate::record::{CreditsRecord, KeyKind, KeyRecord, PoolRecord, UsageRecord};
use crate::store::{self, tables::*};

/// Credit operations. Get one with [`Ledger::credits`].
pub struct Credits<'a> {
    pub(crate) ledger: &'a Ledger,
    pub(crate) actor: String,
    /// Set by [`Credits::owned_by`]: only this account's keys, pools and self are found.
    pub(crate) owner: Option<u64>,
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
    /// running when a close's grace ended): counted as spent. A lease taken before a refill
    /// came due and lost in a crash after it counts here too, though the refill would have
    /// dropped it from the books had the process lived to apply it.
    pub lost_to_crash: u64,
    /// Units leased into memory right now: what `remaining` counts beyond the durable
    /// balance, plus what grants hold reserved and what they charged since the last flush.
    pub leased: u64,
    /// Successful verifies (a key's; an account's sums its keys'; pools report 0).
    pub requests: u64,
    /// Units charged over the key's life, metered or not (an account's sums its keys';
    /// pools report 0). With `requests` and
    /// `last_used_at`, written in the writer's usage rounds (every 30 s by default, and at
    /// every flush and clean close), while `spent` is also written with each lease: after a
    /// crash, the last round's worth may be missing here though `spent` counts it, and spend
    /// tiers, which count from this figure, start from it.
    pub lifetime_spent: u64,
    /// Last successful verify (a key's; an account's is its keys' latest; pools: `None`).
    pub last_used_at: Option<Timestamp>,
}

impl Credits<'_> {
    /// The same handle, recording `actor` as the author of its changes: 1–254 characters,
    /// no control characters and no API key (a change by an actor that breaks these is
    /// refused as [`Error::InvalidInput`](crate::Error::InvalidInput) on `actor`).
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// The same handle, restricted to `owner` (an account's public id): its own usage, and
    /// the keys, tokens and pools it owns. Any other owner's is `NotFound`, exactly like an
    /// id that names nothing, so a server can pass a customer's ids straight in.
    pub fn owned_by(mut self, owner: &str) -> Result<Self> {
        self.owner = Some(self.ledger.inner.ids.decode(IdKind::Account, owner)?);
        Ok(self)
    }

    /// Whether this handle may see what `owner` owns.
    pub(super) fn sees(&self, owner: u64) -> bool {
        self.owner.is_none_or(|o| o == owner)
    }

    /// Whether this handle sees every owner's records (it is not owner-scoped).
    pub(super) fn sees_all(&self) -> bool {
        self.owner.is_none()
    }

    /// Adds `units` to a key's or pool's balance. Returns the durable balance after.
    pub fn top_up(&self, id: &str, units: u64) -> Result<u64> {
        self.ledger
            .guarded(|| self.adjust(id, Adjust::TopUp(units), "credits.topped_up"))
    }

    /// Sets a key's or pool's balance to exactly `units` (leases in memory are taken back
    /// first). Returns the balance.
    pub fn set(&self, id: &str, units: u64) -> Result<u64> {
        self.ledger
            .guarded(|| self.adjust(id, Adjust::Set(units), "credits.set"))
    }

    fn adjust(&self, id: &str, change: Adjust, action: &'static str) -> Result<u64> {
        // Checked here: the writer's transaction, which appends the entry, is shared.
        self.ledger.actor_ok(&self.actor)?;
        let (kind, internal) = self.credit_id(id)?;
        if kind == IdKind::Account {
            return Err(Error::invalid(
                "id",
                "an account holds no balance: top up or set its keys or pools",
            ));
        }
        // A top-up of nothing changes nothing: answered, not recorded.
        let audit = (!matches!(change, Adjust::TopUp(0))).then(|| AuditLine {
            actor: self.actor.clone(),
            action,
            target: id.to_owned(),
        });
        match self.ledger.inner.engine.adjust(internal, change, audit) {
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
        self.ledger.guarded(|| {
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
                    "this {0} is unmetered: give it credits with a {0} update first (the \
                     CLI's `{0}s update --credits`)",
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
            // Damaged where the kind is named: as forged as a damaged body.
            _ => {
                let expected = "key, token, pool or account";
                return Err(InvalidId {
                    expected,
                    given: None,
                }
                .into());
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
                        && self.sees(r.owner)
                })
            }
            IdKind::Pool => store::get::<PoolRecord>(&read.open_table(table)?, internal)?
                .is_some_and(|r| self.sees(r.owner)),
            _ => self.sees(internal) && read.open_table(table)?.get(internal)?.is_some(),
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
            owner: None,
        }
    }
}
