//! The verify index (`key_verify`): each live hash of a key → its [`VerifyRecord`], the one
//! record a cache miss reads. Every write of a [`KeyRecord`] goes through [`put`], which
//! rewrites the entries of the record's hashes in the same transaction, so the index never
//! disagrees with the record; hashes that stop being live leave through [`remove`].
//!
//! Beside it, the import reservations (`imported_hashes`, `imports_by_key`): the hash a key
//! was imported by stays taken for the life of its record, long after the rehash of its first
//! use has taken it out of `key_verify`, so the same import cannot run twice. A reservation
//! holds that hash keyed with the master key ([`reservation`]), not the hash itself: a plain
//! SHA-256 of a key, kept for good, would let anyone holding the file guess the key offline.

use redb::{ReadableTable, WriteTransaction};

use crate::codec;
use crate::error::Result;
use crate::hashing::KeyHash;
use crate::record::{KeyRecord, VerifyRecord};
use crate::secret::{MasterKey, context};
use crate::store::{
    self,
    tables::{IMPORTED_HASHES, IMPORTS_BY_KEY, KEY_VERIFY, KEYS_BY_OWNER, KEYS_BY_PREFIX},
};

use super::{KIND_API, KIND_TOKEN};

/// The open verify-index table of a write transaction.
pub(crate) type VerifyTable<'txn> = redb::Table<'txn, &'static [u8; 32], &'static [u8]>;

/// Writes `record` under `id` into `keys` (the transaction's open `keys` table) and the
/// verify entries of its current and rolled hashes.
pub(crate) fn put(
    txn: &WriteTransaction,
    keys: &mut redb::Table<u64, &'static [u8]>,
    id: u64,
    record: &KeyRecord,
) -> Result<()> {
    store::put(keys, id, record)?;
    put_entries(&mut txn.open_table(KEY_VERIFY)?, id, record)
}

/// Writes the verify entries of `record`'s current and rolled hashes.
pub(crate) fn put_entries(table: &mut VerifyTable<'_>, id: u64, record: &KeyRecord) -> Result<()> {
    for (hash, entry) in VerifyRecord::entries(id, record) {
        table.insert(&hash, codec::encode(&entry).as_slice())?;
    }
    Ok(())
}

/// Removes the verify entry of a hash that is no longer live.
pub(crate) fn remove(txn: &WriteTransaction, hash: &KeyHash) -> Result<()> {
    txn.open_table(KEY_VERIFY)?.remove(hash)?;
    Ok(())
}

/// What the reservation of the imported hash `imported` stores (format 7; formats 5 and 6
/// stored `imported` itself, and opening such a file replaces them).
pub(crate) fn reservation(master: &MasterKey, imported: &KeyHash) -> KeyHash {
    let key = master.derive(context::IMPORT_RESERVATION);
    blake3::keyed_hash(&key.0, imported).into()
}

/// Whether `hash` is the imported hash of a key (every key keeps its reservation until it is
/// deleted; format 5, so no older build deletes one without freeing it).
pub(crate) fn import_reserved(
    txn: &WriteTransaction,
    master: &MasterKey,
    hash: &KeyHash,
) -> Result<bool> {
    let reserved = reservation(master, hash);
    Ok(txn.open_table(IMPORTED_HASHES)?.get(&reserved)?.is_some())
}

/// Reserves `hash` as the imported hash of the new key `id`.
pub(crate) fn reserve_import(
    txn: &WriteTransaction,
    master: &MasterKey,
    hash: &KeyHash,
    id: u64,
) -> Result<()> {
    let reserved = reservation(master, hash);
    txn.open_table(IMPORTED_HASHES)?.insert(&reserved, id)?;
    txn.open_table(IMPORTS_BY_KEY)?.insert(id, &reserved)?;
    Ok(())
}

/// Frees the imported hash of key `id`, if it has one (its record is being deleted).
pub(crate) fn release_import(txn: &WriteTransaction, id: u64) -> Result<()> {
    let Some(hash) = txn
        .open_table(IMPORTS_BY_KEY)?
        .remove(id)?
        .map(|v| *v.value())
    else {
        return Ok(());
    };
    let mut hashes = txn.open_table(IMPORTED_HASHES)?;
    let reserved_by = hashes.get(&hash)?.map(|v| v.value());
    if reserved_by == Some(id) {
        hashes.remove(&hash)?;
    }
    Ok(())
}

/// Removes the verify entries and index entries of key `id`, whose record does not decode
/// (so its hashes, owner and prefix are unknown), by scanning the verify index and both
/// listing indexes for it; returns the hashes removed, for the cache to drop. A damaged
/// record must not keep its key working: the verify index, read on a cache miss, does not
/// look at the record.
///
/// `kind` (the handle's kind tag) and `owner` (an owner-scoped handle's owner) are what the
/// caller may remove: a key the indexes say is of another kind or owner gives `None`, as one
/// not found, and so does one nothing names the owner of, for an owner-scoped handle.
pub(crate) fn remove_unreadable(
    txn: &WriteTransaction,
    id: u64,
    kind: u8,
    owner: Option<u64>,
) -> Result<Option<Vec<KeyHash>>> {
    let mut listed = Vec::new();
    for entry in txn.open_table(KEYS_BY_OWNER)?.iter()? {
        let (o, k, key) = entry?.0.value();
        if key == id {
            listed.push((o, k));
        }
    }
    let mut verify = txn.open_table(KEY_VERIFY)?;
    let mut live = Vec::new();
    for entry in verify.iter()? {
        let (hash, bytes) = entry?;
        // An entry that does not decode either is left for `check` to name.
        if let Ok(v) = codec::decode::<VerifyRecord>(bytes.value())
            && v.id == id
        {
            live.push((*hash.value(), v.scheme, v.token, v.owner));
        }
    }
    let tag = |token: bool| if token { KIND_TOKEN } else { KIND_API };
    let seen: Vec<(u64, u8)> = listed
        .iter()
        .copied()
        .chain(live.iter().map(|&(_, _, token, o)| (o, tag(token))))
        .collect();
    let fits = |&(o, k): &(u64, u8)| k == kind && owner.is_none_or(|scope| scope == o);
    // With nothing saying whose it was, only an unscoped handle may remove it (its id,
    // sealed with its kind, says the kind).
    let removable = match seen.is_empty() {
        true => owner.is_none(),
        false => seen.iter().all(fits),
    };
    if !removable {
        return Ok(None);
    }
    let mut by_owner = txn.open_table(KEYS_BY_OWNER)?;
    for (o, k) in listed {
        by_owner.remove((o, k, id))?;
    }
    let mut prefixes = Vec::new();
    let mut by_prefix = txn.open_table(KEYS_BY_PREFIX)?;
    for entry in by_prefix.iter()? {
        let (guard, _) = entry?;
        let (prefix, key) = guard.value();
        if key == id {
            prefixes.push(prefix.to_owned());
        }
    }
    for prefix in &prefixes {
        by_prefix.remove((prefix.as_str(), id))?;
    }
    let mut hashes = Vec::with_capacity(live.len());
    for (hash, scheme, _, _) in live {
        verify.remove(&hash)?;
        store::adjust_scheme_count(txn, scheme, -1)?;
        hashes.push(hash);
    }
    Ok(Some(hashes))
}
