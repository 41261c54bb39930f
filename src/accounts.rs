//! Accounts: the owners of keys, with subscription status and entitlements.

use std::collections::BTreeSet;

use redb::ReadableTable;
use serde::Serialize;

use crate::audit;
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::keys::KIND_TOKEN;
use crate::ledger::Ledger;
use crate::page::{Page, PageRequest};
use crate::public_id::{IdKind, PublicId};
use crate::record::{AccountRecord, SubscriptionStatus, rules};
use crate::store::{
    self,
    tables::{ACCOUNTS, KEYS_BY_OWNER, POOLS_BY_OWNER, USAGE},
};
use crate::vault::owner_rows;
use crate::vault::tables::{CONNECTORS, OWNER_SECRETS};

/// An account as callers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Account {
    /// Public id (`acct_…`).
    pub id: PublicId,
    /// Display name.
    pub name: String,
    /// Subscription status.
    pub status: SubscriptionStatus,
    /// Entitlements (features the subscription includes).
    pub entitlements: BTreeSet<String>,
    /// Creation time.
    pub created_at: Timestamp,
    /// Who created it.
    pub created_by: String,
    /// Last change.
    pub updated_at: Timestamp,
    /// Who changed it last.
    pub updated_by: String,
}

/// A new account.
#[derive(Debug, Clone)]
pub struct NewAccount {
    name: String,
    status: SubscriptionStatus,
    entitlements: Vec<String>,
}

impl NewAccount {
    /// An active account with no entitlements.
    pub fn new(name: impl Into<String>) -> Self {
        NewAccount {
            name: name.into(),
            status: SubscriptionStatus::Active,
            entitlements: vec![],
        }
    }

    /// Initial subscription status.
    pub fn status(mut self, status: SubscriptionStatus) -> Self {
        self.status = status;
        self
    }

    /// Initial entitlements: at most 100 distinct feature names (scope characters, no `*`).
    pub fn entitlements<I: IntoIterator<Item = S>, S: Into<String>>(mut self, items: I) -> Self {
        self.entitlements = items.into_iter().map(Into::into).collect();
        self
    }
}

/// A partial update: only the fields set are changed.
#[derive(Debug, Clone, Default)]
pub struct AccountUpdate {
    name: Option<String>,
    status: Option<SubscriptionStatus>,
    entitlements: Option<Vec<String>>,
}

impl AccountUpdate {
    /// An empty update.
    pub fn new() -> Self {
        Self::default()
    }

    /// New name.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// New subscription status.
    pub fn status(mut self, status: SubscriptionStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Replaces the entitlements (at most 100 distinct, as [`NewAccount::entitlements`]).
    pub fn entitlements<I: IntoIterator<Item = S>, S: Into<String>>(mut self, items: I) -> Self {
        self.entitlements = Some(items.into_iter().map(Into::into).collect());
        self
    }
}

/// What account `owner` still owns, as a deletion refused for it says: "2 keys, 1 pool";
/// empty if nothing.
fn owned_by(txn: &redb::WriteTransaction, owner: u64) -> Result<String> {
    let (mut keys, mut tokens) = (0u64, 0u64);
    let by_owner = txn.open_table(KEYS_BY_OWNER)?;
    for entry in by_owner.range((owner, 0, 0)..=(owner, u8::MAX, u64::MAX))? {
        match entry?.0.value().1 {
            KIND_TOKEN => tokens += 1,
            _ => keys += 1,
        }
    }
    let mut pools = 0u64;
    for entry in txn
        .open_table(POOLS_BY_OWNER)?
        .range((owner, 0)..=(owner, u64::MAX))?
    {
        entry?;
        pools += 1;
    }
    let rows =
        |table| -> Result<u64> { Ok(owner_rows(&txn.open_table(table)?, owner)?.len() as u64) };
    let (connectors, secrets) = (rows(CONNECTORS)?, rows(OWNER_SECRETS)?);
    let counted = [
        (keys, "key"),
        (tokens, "token"),
        (pools, "pool"),
        (connectors, "connection"),
        (secrets, "secret"),
    ];
    let said: Vec<String> = counted
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .map(|(n, what)| format!("{n} {what}{}", if n == 1 { "" } else { "s" }))
        .collect();
    Ok(said.join(", "))
}

fn entitlements(ledger: &Ledger, items: &[String]) -> Result<BTreeSet<String>> {
    ledger.holding_no_key("entitlements", items.iter().map(String::as_str))?;
    let set = items
        .iter()
        .map(|e| rules::entitlement("entitlements", e))
        .collect::<Result<BTreeSet<String>>>()?;
    // Every account change decodes the set, and every account view copies it.
    if set.len() > rules::MAX_ENTITLEMENTS {
        return Err(Error::invalid(
            "entitlements",
            format!("at most {}, got {}", rules::MAX_ENTITLEMENTS, set.len()),
        ));
    }
    Ok(set)
}

/// Account operations. Get one with [`Ledger::accounts`].
pub struct Accounts<'a> {
    pub(crate) ledger: &'a Ledger,
    pub(crate) actor: String,
}

impl<'a> Accounts<'a> {
    /// The same handle, recording `actor` as the author of its changes: 1–254 characters,
    /// no control characters and no API key (a change by an actor that breaks these is
    /// refused as [`Error::InvalidInput`](crate::Error::InvalidInput) on `actor`).
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// Creates an account.
    pub fn create(&self, new: NewAccount) -> Result<Account> {
        self.ledger.guarded(|| {
            let name = self.ledger.label("name", &new.name)?;
            let entitlements = entitlements(self.ledger, &new.entitlements)?;
            let now = self.ledger.now();
            let record = AccountRecord {
                name,
                status: new.status,
                entitlements,
                created_at: now,
                created_by: self.actor.clone(),
                updated_at: now,
                updated_by: self.actor.clone(),
            };
            let txn = self.ledger.inner.store.begin_write()?;
            let id = store::next_id(&txn)?;
            store::put(&mut txn.open_table(ACCOUNTS)?, id, &record)?;
            let public = self.public_id(id);
            audit::append(
                &txn,
                self.ledger,
                now,
                &self.actor,
                "account.created",
                &public,
                &[],
            )?;
            txn.commit_change()?;
            Ok(self.view(id, record))
        })
    }

    /// Reads an account.
    pub fn get(&self, id: &str) -> Result<Account> {
        self.ledger.guarded(|| {
            let internal = self.internal_id(id)?;
            let read = self.ledger.inner.store.begin_read()?;
            let record = store::get(&read.open_table(ACCOUNTS)?, internal)?
                .ok_or(Error::NotFound { what: "account" })?;
            Ok(self.view(internal, record))
        })
    }

    /// Applies a partial update.
    pub fn update(&self, id: &str, update: AccountUpdate) -> Result<Account> {
        self.ledger.guarded(|| {
            let internal = self.internal_id(id)?;
            let name = update
                .name
                .as_deref()
                .map(|n| self.ledger.label("name", n))
                .transpose()?;
            let ents = update
                .entitlements
                .as_deref()
                .map(|e| entitlements(self.ledger, e))
                .transpose()?;
            let txn = self.ledger.inner.store.begin_write()?;
            let record = {
                let mut table = txn.open_table(ACCOUNTS)?;
                let mut record: AccountRecord =
                    store::get(&table, internal)?.ok_or(Error::NotFound { what: "account" })?;
                let before = record.clone();
                let mut changed = Vec::new();
                if let Some(name) = name {
                    audit::set(&mut changed, "name", &mut record.name, name);
                }
                if let Some(status) = update.status {
                    audit::set(&mut changed, "status", &mut record.status, status);
                }
                if let Some(ents) = ents {
                    audit::set(&mut changed, "entitlements", &mut record.entitlements, ents);
                }
                // Like keys: a change that touches no field writes nothing (no audit entry, no
                // eviction of the account's cached keys).
                if record == before {
                    self.ledger.actor_ok(&self.actor)?; // refused all the same
                    drop(table);
                    txn.abort()?;
                    return Ok(self.view(internal, record));
                }
                record.updated_at = self.ledger.now();
                record.updated_by = self.actor.clone();
                store::put(&mut table, internal, &record)?;
                audit::append(
                    &txn,
                    self.ledger,
                    record.updated_at,
                    &self.actor,
                    "account.updated",
                    id,
                    &changed,
                )?;
                record
            };
            txn.commit_then(|_| self.ledger.inner.engine.account_changed(internal))?;
            Ok(self.view(internal, record))
        })
    }

    /// Deletes an account that owns nothing. Refused with [`Error::Conflict`] while it still
    /// owns keys, tokens, pools, connections or secrets, which the message counts: delete
    /// them first (a key's spend and usage are the key's to settle, a pool's balance and a
    /// vault row the owner's to give up). Its usage counters go with it; the audit trail
    /// keeps its history and records the deletion. A record that does not decode (`check`
    /// names it) is deleted all the same, its audit event naming the field `unreadable`.
    pub fn delete(&self, id: &str) -> Result<()> {
        self.ledger.guarded(|| {
            let internal = self.internal_id(id)?;
            let public = self.public_id(internal);
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            let unreadable = {
                let mut table = txn.open_table(ACCOUNTS)?;
                let unreadable = match table.get(internal)? {
                    Some(v) => crate::codec::decode::<AccountRecord>(v.value()).is_err(),
                    None => return Err(Error::NotFound { what: "account" }),
                };
                let owned = owned_by(&txn, internal)?;
                if !owned.is_empty() {
                    return Err(Error::Conflict(format!(
                        "account {public} still owns {owned}: delete them first"
                    )));
                }
                table.remove(internal)?;
                txn.open_table(USAGE)?.remove(internal)?;
                unreadable
            };
            let fields: &[&str] = if unreadable { &["unreadable"] } else { &[] };
            let action = "account.deleted";
            audit::append(&txn, self.ledger, now, &self.actor, action, &public, fields)?;
            txn.commit_then(|_| self.ledger.inner.engine.account_changed(internal))?;
            Ok(())
        })
    }

    /// Sets the subscription status.
    pub fn set_status(&self, id: &str, status: SubscriptionStatus) -> Result<Account> {
        self.ledger
            .guarded(|| self.update(id, AccountUpdate::new().status(status)))
    }

    /// Lists accounts in creation order. A record that does not decode fails the page with
    /// [`CodecError::Row`](crate::CodecError::Row) naming the account.
    pub fn list(&self, page: &PageRequest) -> Result<Page<Account>> {
        self.ledger.guarded(|| {
            let limit = page.checked_limit()?;
            let ad: [&[u8]; 1] = [b"cursor:accounts"];
            let start = match &page.cursor {
                // The last id listed, which only a forged file could make `u64::MAX`.
                Some(c) => self
                    .ledger
                    .inner
                    .ids
                    .open(&ad, c)
                    .ok_or_else(|| {
                        Error::invalid("cursor", "not a cursor issued for this listing")
                    })?
                    .saturating_add(1),
                None => 0,
            };
            let read = self.ledger.inner.store.begin_read()?;
            let table = read.open_table(ACCOUNTS)?;
            let mut items = Vec::new();
            let (mut next_cursor, mut last) = (None, 0);
            for entry in table.range(start..)? {
                let (k, v) = entry?;
                if items.len() == limit {
                    next_cursor = Some(self.ledger.inner.ids.seal(&ad, last));
                    break;
                }
                last = k.value();
                // Named, as a damaged key is by its owner's key list.
                let record = crate::codec::decode(v.value()).map_err(|e| {
                    e.of_row(
                        self.public_id(last).to_string(),
                        "`accounts().delete` removes it once it owns nothing",
                    )
                })?;
                items.push(self.view(last, record));
            }
            Ok(Page { items, next_cursor })
        })
    }

    pub(crate) fn internal_id(&self, id: &str) -> Result<u64> {
        Ok(self.ledger.inner.ids.decode(IdKind::Account, id)?)
    }

    fn public_id(&self, id: u64) -> PublicId {
        self.ledger.inner.ids.encode(IdKind::Account, id)
    }

    fn view(&self, id: u64, r: AccountRecord) -> Account {
        Account {
            id: self.public_id(id),
            name: r.name,
            status: r.status,
            entitlements: r.entitlements,
            created_at: r.created_at,
            created_by: r.created_by,
            updated_at: r.updated_at,
            updated_by: r.updated_by,
        }
    }
}
