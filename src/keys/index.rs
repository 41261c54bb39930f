//! The verify index (`key_verify`): each live hash of a key → its [`VerifyRecord`], the one
//! record a cache miss reads. Every write of a [`KeyRecord`] goes through [`put`], which
//! rewrites the entries of the record's hashes in the same transaction, so the index never
//! disagrees with the record; hashes that stop being live leave through [`remove`].

use redb::WriteTransaction;

use crate::codec;
use crate::error::Result;
use crate::hashing::KeyHash;
use crate::record::{KeyRecord, VerifyRecord};
use crate::store::{self, tables::KEY_VERIFY};

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
