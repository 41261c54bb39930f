//! Finding a key record from its plaintext: hash under the current scheme, look the hash up,
//! and — only while records under other schemes exist — try those too, rehashing the record
//! to the current scheme on a hit. This is the cache-miss path of `verify`.

use crate::audit;
use crate::clock::Timestamp;
use crate::codec;
use crate::error::Result;
use crate::hashing::{HashScheme, KeyHash, hashes_equal};
use crate::keys::index;
use crate::ledger::{Ledger, SYSTEM_ACTOR};
use crate::record::{KeyRecord, VerifyRecord};
use crate::store::{self, ReadSnapshot, tables::*};

/// A record found by its plaintext.
pub(crate) struct Found {
    pub id: u64,
    pub record: KeyRecord,
}

/// Finds the record whose current secret, or rolled secret still in its grace period, is
/// `key`. Rehashes a record found under an older scheme.
pub(crate) fn find(ledger: &Ledger, key: &str, now: Timestamp) -> Result<Option<Found>> {
    let hasher = ledger.hasher();
    let hash = hasher.hash_current(key);
    let mut read = ledger.inner.store.begin_read()?;
    let entry = match probe(&read, &hash, hasher.current(), now)? {
        Some(entry) => entry,
        None => {
            let Some(entry) = find_under_old_schemes(ledger, &read, &hash, key, now)? else {
                return Ok(None);
            };
            // A new transaction: the rehash committed after `read` began.
            read = ledger.inner.store.begin_read()?;
            entry
        }
    };
    let record = store::get::<KeyRecord>(&read.open_table(KEYS)?, entry.id)?;
    Ok(record.map(|record| Found {
        id: entry.id,
        record,
    }))
}

/// The verify entry of the secret `key`, whose current-scheme `hash` is known, read through
/// the miss path's shared `snapshot` (which goes on to read the key's balance): one look-up
/// while every key is under the current scheme.
pub(crate) fn find_in(
    ledger: &Ledger,
    snapshot: &ReadSnapshot,
    hash: &KeyHash,
    key: &str,
    now: Timestamp,
) -> Result<Option<VerifyRecord>> {
    match probe_table(&snapshot.verify, hash, ledger.hasher().current(), now)? {
        Some(found) => Ok(Some(found)),
        None => find_under_old_schemes(ledger, &snapshot.txn, hash, key, now),
    }
}

/// The part of [`find_in`] after the current scheme missed: tries the schemes that still
/// have records (none, usually: then this is one read of the scheme counts) and rehashes a
/// key found under one.
fn find_under_old_schemes(
    ledger: &Ledger,
    read: &redb::ReadTransaction,
    hash: &KeyHash,
    key: &str,
    now: Timestamp,
) -> Result<Option<VerifyRecord>> {
    let hasher = ledger.hasher();
    let current = hasher.current();
    let counts = store::scheme_counts(&read.open_table(META)?)?;
    for (&scheme, _) in counts.iter().filter(|(s, n)| **s != current && **n > 0) {
        let old_hash = hasher.hash(scheme, key);
        let read = ledger.inner.store.begin_read()?;
        if let Some(found) = probe(&read, &old_hash, scheme, now)? {
            drop(read);
            return rehash(ledger, found.id, &old_hash, hash, current);
        }
    }
    Ok(None)
}

/// Looks `hash` up: its verify entry, if it was made with `scheme` and is not a rolled
/// secret past its grace period.
fn probe(
    read: &redb::ReadTransaction,
    hash: &KeyHash,
    scheme: HashScheme,
    now: Timestamp,
) -> Result<Option<VerifyRecord>> {
    probe_table(&read.open_table(KEY_VERIFY)?, hash, scheme, now)
}

/// [`probe`] in an open table.
fn probe_table(
    table: &redb::ReadOnlyTable<&'static [u8; 32], &'static [u8]>,
    hash: &KeyHash,
    scheme: HashScheme,
    now: Timestamp,
) -> Result<Option<VerifyRecord>> {
    let Some(bytes) = table.get(hash)? else {
        return Ok(None);
    };
    let entry: VerifyRecord = codec::decode(bytes.value())?;
    let live = entry.valid_until.is_none_or(|until| now < until);
    Ok((entry.scheme == scheme && live).then_some(entry))
}

/// Replaces `old_hash` (current or rolled secret) by `new_hash` under the current scheme.
/// Returns the verify entry of `new_hash` (`None`: a concurrent change, such as a roll, took
/// `old_hash` out of the record first).
fn rehash(
    ledger: &Ledger,
    id: u64,
    old_hash: &KeyHash,
    new_hash: &KeyHash,
    scheme: HashScheme,
) -> Result<Option<VerifyRecord>> {
    let txn = ledger.inner.store.begin_write()?;
    let record = {
        let mut keys = txn.open_table(KEYS)?;
        let mut record: KeyRecord =
            store::get(&keys, id)?.ok_or(crate::Error::NotFound { what: "key" })?;
        let slot = if hashes_equal(&record.key_hash, old_hash) {
            Some((&mut record.key_hash, &mut record.scheme))
        } else {
            record
                .rolled
                .as_mut()
                .map(|o| (&mut o.key_hash, &mut o.scheme))
        };
        if let Some((stored_hash, stored_scheme)) = slot {
            index::remove(&txn, old_hash)?;
            store::adjust_scheme_count(&txn, *stored_scheme, -1)?;
            store::adjust_scheme_count(&txn, scheme, 1)?;
            *stored_hash = *new_hash;
            *stored_scheme = scheme;
        }
        index::put(&txn, &mut keys, id, &record)?;
        let kind = record.kind.id_kind();
        let public = ledger.inner.ids.encode(kind, id);
        let action = format!("{}.rehashed", kind.noun());
        audit::append(
            &txn,
            ledger.now(),
            SYSTEM_ACTOR,
            &action,
            &public,
            &["hash_scheme"],
        )?;
        record
    };
    txn.commit()?;
    Ok(VerifyRecord::entries(id, &record)
        .find(|(hash, _)| hashes_equal(hash, new_hash))
        .map(|(_, entry)| entry))
}

impl Ledger {
    /// Identifies a presented key: format check, hash, look-up, then the state checks
    /// (disabled, expired). The first steps of the verify chain, without route, IP,
    /// subscription, rate or credit checks and without charging anything.
    pub fn authenticate(
        &self,
        presented: &crate::Presented,
    ) -> Result<crate::KeyInfo, crate::Denial> {
        use crate::Denial;
        let key = presented.expose();
        // The hash covers the prefix, so a match also means the key's class is the record's.
        self.inner.format.parse(key).map_err(Denial::Malformed)?;
        let now = self.now();
        let found = find(self, key, now)
            .map_err(|_| Denial::Unavailable)?
            .ok_or(Denial::NotFound)?;
        let record = found.record;
        if record.disabled_at.is_some() {
            return Err(Denial::Disabled);
        }
        if record.expires_at.is_some_and(|at| at <= now) {
            return Err(Denial::Expired);
        }
        Ok(super::key_info(
            self,
            record.kind.id_kind(),
            found.id,
            record,
        ))
    }
}
