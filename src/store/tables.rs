//! Every redb table keyledger uses, in one place. Values are [`codec`](crate::codec)-encoded
//! records unless noted.

use redb::TableDefinition;

/// `name → bytes`: format, id sequence, hash scheme, scheme counts, master-key verifier.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// `account id → AccountRecord`.
pub(crate) const ACCOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("accounts");
/// `key id → KeyRecord` (API keys and tokens).
pub(crate) const KEYS: TableDefinition<u64, &[u8]> = TableDefinition::new("keys");
/// `key hash → VerifyRecord` (the key id and what verify checks): the verify look-up, one
/// read per cache miss. A rolled key has two hashes here during its grace. Since format 2.
pub(crate) const KEY_VERIFY: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("key_verify");
/// Format 1's hash index, `key hash → key id`: read by the migration to format 2, which
/// replaces it with [`KEY_VERIFY`] and deletes it.
pub(crate) const KEY_HASHES_V1: TableDefinition<&[u8; 32], u64> =
    TableDefinition::new("key_hashes");
/// `imported hash → key id`: the hash each key or token was imported by (either
/// [`ImportedHash`](crate::ImportedHash)), reserved for as long as its record exists — through
/// the rehash of its first use, rolls and prunes — so that the same hash cannot be imported
/// again as a second record of one plaintext. Written by `import`, removed by `delete`, with
/// [`IMPORTS_BY_KEY`] (the same pairs the other way round).
///
/// Created with a new file, or by the migration to format 5, which reserves the hashes of
/// keys still under `Sha256Imported`. Keys imported earlier and already rehashed have no
/// entry (their SHA-256 is gone), nor have keys imported earlier by their current-scheme
/// hash (nothing tells them from created keys).
pub(crate) const IMPORTED_HASHES: TableDefinition<&[u8; 32], u64> =
    TableDefinition::new("imported_hashes");
/// `key id → imported hash`: [`IMPORTED_HASHES`] by key, so `delete` finds the hash to free
/// (the record itself no longer holds it once rehashed or rolled).
pub(crate) const IMPORTS_BY_KEY: TableDefinition<u64, &[u8; 32]> =
    TableDefinition::new("imports_by_key");
/// `(owner id, kind tag, key id) → ()`: cursor-paginated listing per owner.
pub(crate) const KEYS_BY_OWNER: TableDefinition<(u64, u8, u64), ()> =
    TableDefinition::new("keys_by_owner");
/// `(visible prefix, key id) → ()`: masked look-up for support.
pub(crate) const KEYS_BY_PREFIX: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("keys_by_prefix");
/// `key id → CreditsRecord`.
pub(crate) const CREDITS: TableDefinition<u64, &[u8]> = TableDefinition::new("credits");
/// `pool id → PoolRecord`; its balance is in CREDITS under the same id.
pub(crate) const POOLS: TableDefinition<u64, &[u8]> = TableDefinition::new("pools");
/// `(owner account id, pool id) → ()`: an account's pools without reading every pool
/// (format 8).
pub(crate) const POOLS_BY_OWNER: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("pools_by_owner");
/// `key or account id → UsageRecord`, flushed by the writer thread.
pub(crate) const USAGE: TableDefinition<u64, &[u8]> = TableDefinition::new("usage");
/// `route prefix → RouteRule`.
pub(crate) const ROUTES: TableDefinition<&str, &[u8]> = TableDefinition::new("routes");
/// `sequence → AuditEvent`.
pub(crate) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Meta entry names.
pub(crate) mod meta {
    /// `MAGIC ++ format version (u32 LE)`.
    pub(crate) const FORMAT: &str = "format";
    /// Next internal id (u64 LE).
    pub(crate) const NEXT_ID: &str = "next_id";
    /// Hash scheme for new keys (postcard `HashScheme`).
    pub(crate) const HASH_SCHEME: &str = "hash_scheme";
    /// Number of live hashes per scheme (postcard `Vec<(HashScheme, u64)>`).
    pub(crate) const SCHEME_COUNTS: &str = "scheme_counts";
    /// Keyed BLAKE3 of a fixed string under the master key, to detect a wrong key at open.
    pub(crate) const VERIFIER: &str = "verifier";
    /// 16 random bytes mixed into the key that seals this file's public ids and cursors,
    /// written with a file created at format 6 or later: ledgers that share a master key then
    /// give different ids, and one's id names nothing in another. Empty in a file
    /// migrated from before format 6, whose ids stay what they were; absent from a file of
    /// format 7 or later only if damaged (such a file is refused).
    pub(crate) const ID_SALT: &str = "id_salt";
}
