//! `check`: redb's integrity check, then every record decoded and every index and counter
//! cross-checked against the records.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};
use serde::Serialize;

use crate::codec;
use crate::config::Config;
use crate::error::{CodecError, Error, Result};
use crate::hashing::HashScheme;
use crate::ledger::Ledger;
use crate::public_id::{IdCipher, IdKind};
use crate::record::{
    AccountRecord, AuditEvent, CreditsRecord, KeyRecord, PoolRecord, RouteRule, UsageRecord,
    VerifyRecord,
};
use crate::secret::shown_path;
use crate::store::{self, OpenedMeta, Store, tables::*, unless_redb_panics};

/// What `check` found. `problems` is empty for a healthy file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// redb's own page-level integrity check passed.
    pub integrity_ok: bool,
    /// Accounts decoded.
    pub accounts: u64,
    /// API keys decoded.
    pub keys: u64,
    /// Tokens decoded.
    pub tokens: u64,
    /// Credit records decoded.
    pub credit_records: u64,
    /// Credit units lost to crashes (leased in memory when a process died, or held by grants
    /// still running when a close's grace ended), all balances, counting those still leased
    /// in the file (its next open records them as lost).
    pub lost_to_crash: u64,
    /// Route rules decoded.
    pub routes: u64,
    /// Audit events decoded.
    pub audit_events: u64,
    /// Every inconsistency found, one line each (ids are public ids; no secret appears).
    pub problems: Vec<String>,
}

impl CheckReport {
    /// Whether the file is healthy.
    pub fn is_ok(&self) -> bool {
        self.integrity_ok && self.problems.is_empty()
    }
}

impl Ledger {
    /// Checks the database at `path`, which must not be open elsewhere: redb integrity, then
    /// record decodability and index consistency. Changes nothing in the file: what redb
    /// writes while checking it (it repairs a file not closed cleanly, and its integrity check
    /// writes a commit header) stays in memory, so a check can be repeated with the same
    /// result, and a backup or a read-only file can be checked in place. An older format is
    /// refused with [`Error::OlderFormat`]. Pages that fail redb's checksums, and a file
    /// whose structure redb cannot open or read (cut short, a malformed page), are reported
    /// (`integrity_ok` false, and a problem line); errors only when the file cannot be
    /// checked at all (missing, in use, not a redb file or not a ledger, another master key),
    /// or a path holding `config`'s own master key ([`Error::InvalidInput`] on
    /// `database path`, which does not repeat it).
    pub fn check(path: impl AsRef<Path>, config: Config) -> Result<CheckReport> {
        let path = path.as_ref();
        store::refuse_master_key_in_path(path, &config.master_key)?;
        if !path.exists() {
            return Err(Error::NotFound {
                what: "database file",
            });
        }
        let file = std::fs::File::open(path).map_err(|e| Error::Storage(Box::new(e.into())))?;
        // As `open` names it: a ledger that lost its bytes, not another application's file.
        if file.metadata().is_ok_and(|m| m.is_file() && m.len() == 0) {
            let path = shown_path(path);
            return Err(Error::EmptyFile { path });
        }
        let view = store::Unwritten::new(file).map_err(|e| Error::Storage(Box::new(e.into())))?;
        check_backend(view, path, &config)
    }

    /// [`check`](Self::check) on a storage backend. The backend is cloned: one clone for
    /// redb's integrity check, one for the records, so clones must share their bytes.
    pub fn check_with_backend(
        backend: impl redb::StorageBackend + Clone,
        config: Config,
    ) -> Result<CheckReport> {
        check_backend(backend, Path::new("<storage backend>"), &config)
    }
}

fn check_backend(
    backend: impl redb::StorageBackend + Clone,
    path: &Path,
    config: &Config,
) -> Result<CheckReport> {
    // A file whose structure redb cannot open (truncated, or a page its opening repair or
    // its check trips over: an error or one of redb's panics) is damage to report like pages
    // failing their checksums, not a check that could not run (found by a reviewer: exit 1
    // and no report, where a script restores from a backup on exit 4).
    let opened =
        unless_redb_panics(|| redb::Database::builder().create_with_backend(backend.clone()));
    let not_opened = |why: &str| Ok(unreadable("redb could not open the file", why));
    let mut db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(redb::DatabaseError::Storage(e))) => match damage_in(&e) {
            Some(what) => return not_opened(&what),
            None => return Err(redb::DatabaseError::Storage(e).into()),
        },
        Ok(Err(e)) => return Err(e.into()),
        Err(panicked) => return not_opened(&panicked.to_string()),
    };
    let integrity = match unless_redb_panics(|| integrity(db.check_integrity())) {
        Ok(checked) => checked?,
        Err(panicked) => Integrity::Damaged(panicked.to_string()),
    };
    drop(db);
    // Reading a corrupt file's records can reach redb's panics too.
    unless_redb_panics(|| {
        let db = redb::Database::builder().create_with_backend(backend)?;
        match (
            Store::open_for_check(db, path, &config.master_key),
            &integrity,
        ) {
            (Ok(opened), _) => check_store(opened, config, &integrity),
            // Damaged pages can make the file's own meta entries unreadable (its master-key
            // verifier among them): the damage is the finding, not a wrong key.
            (Err(e), Integrity::Damaged(what)) => Ok(CheckReport {
                problems: vec![damaged(what), format!("the file could not be opened: {e}")],
                ..CheckReport::default()
            }),
            (Err(e), _) => Err(e),
        }
    })
    .unwrap_or_else(|panicked| {
        let mut report = unreadable("reading its records failed", &panicked.to_string());
        match &integrity {
            Integrity::Damaged(what) => report.problems.insert(0, damaged(what)),
            Integrity::Ok | Integrity::Repaired => report.integrity_ok = true,
        }
        Ok(report)
    })
}

/// The report on a file whose structure redb could not read: `failed` says what, `why` is
/// redb's message.
fn unreadable(failed: &str, why: &str) -> CheckReport {
    CheckReport {
        problems: vec![format!(
            "{failed} ({why}): the file is damaged; restore it from a backup"
        )],
        ..CheckReport::default()
    }
}

/// The problem line of pages that fail redb's checksums.
fn damaged(what: &str) -> String {
    format!("redb's page check failed ({what}): the file is damaged; restore it from a backup")
}

/// What redb's page-level check found.
enum Integrity {
    Ok,
    /// The check passed after a repair (the file was not closed cleanly).
    Repaired,
    /// Pages fail their checksums: redb's message.
    Damaged(String),
}

/// redb's integrity check result as a finding: a file whose pages fail their checksums is
/// damage to report, not an error (redb returns one when the primary copy fails its
/// checksums despite two-phase commit).
fn integrity(checked: std::result::Result<bool, redb::DatabaseError>) -> Result<Integrity> {
    match checked {
        Ok(true) => Ok(Integrity::Ok),
        Ok(false) => Ok(Integrity::Repaired),
        Err(redb::DatabaseError::Storage(e)) => match damage_in(&e) {
            Some(what) => Ok(Integrity::Damaged(what)),
            None => Err(redb::DatabaseError::Storage(e).into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// What a redb storage error says of damage to the file: pages found corrupt, or a read past
/// the file's end (a page number or length in the file pointing beyond it: one flipped bit in
/// the table tree can send a table's root there; found by a reviewer). `None`: another
/// failure (the disk, the system), which the check cannot report on.
fn damage_in(e: &redb::StorageError) -> Option<String> {
    match e {
        redb::StorageError::Corrupted(what) => Some(what.clone()),
        redb::StorageError::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Some(io.to_string())
        }
        _ => None,
    }
}

fn check_store(
    (store, meta): (Store, OpenedMeta),
    config: &Config,
    integrity: &Integrity,
) -> Result<CheckReport> {
    let mut report = CheckReport {
        integrity_ok: matches!(integrity, Integrity::Ok),
        ..CheckReport::default()
    };
    match integrity {
        Integrity::Ok => {}
        Integrity::Repaired => report.problems.push(
            "redb's page check had to repair the file's allocation state (in memory: the file \
             is unchanged); the file was not closed cleanly or its free-page lists are damaged, \
             and opening the ledger repairs it"
                .to_owned(),
        ),
        Integrity::Damaged(what) => report.problems.push(damaged(what)),
    }
    let ids = IdCipher::for_file(&config.master_key, meta.id_salt.as_ref());
    let read = store.begin_read()?;
    // A page that redb cannot read (an error, or one of its panics) ends the scan; what was
    // found up to it is reported, with the damage as a problem of its own.
    let scanned = unless_redb_panics(|| {
        check_records(&read, &ids, &mut report)?;
        crate::vault::check_tables(&config.master_key, &ids, &read, &mut report.problems)
    })
    .and_then(|scanned| scanned);
    if let Err(e) = scanned {
        report.integrity_ok = false;
        report.problems.push(format!(
            "the records could not all be read ({e}): the file is damaged; restore it from a \
             backup"
        ));
    }
    Ok(report)
}

/// Opens a table, `None` if the file lacks it.
fn open_if_present<K: redb::Key + 'static, V: redb::Value + 'static>(
    read: &ReadTransaction,
    table: redb::TableDefinition<K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>> {
    match read.open_table(table) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn check_records(read: &ReadTransaction, ids: &IdCipher, report: &mut CheckReport) -> Result<()> {
    let problems = &mut report.problems;
    let account = |id| ids.encode(IdKind::Account, id);

    let accounts = read.open_table(ACCOUNTS)?;
    for entry in accounts.iter()? {
        let (k, v) = entry?;
        match codec::decode::<AccountRecord>(v.value()) {
            Ok(_) => report.accounts += 1,
            Err(e) => problems.push(format!("{}: {e}", account(k.value()))),
        }
    }

    let pools = read.open_table(POOLS)?;
    let credits = read.open_table(CREDITS)?;
    // One counter gives accounts, keys and pools their ids: set back, it would give out ids
    // in use (`next_id` skips them; the counter is still damaged).
    let highest = store::highest_id_in_use(&accounts, &read.open_table(KEYS)?, &pools)?;
    match store::stored_next_id(&read.open_table(META)?) {
        Ok(next) if next <= highest => problems.push(format!(
            "next id: {next}, not above the highest id in use ({highest})"
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("next id: {e}")),
    }
    // Each pool's owner, for the keys drawing on it.
    let mut pool_owners: BTreeMap<u64, u64> = BTreeMap::new();
    let pools_by_owner = read.open_table(POOLS_BY_OWNER)?;
    for entry in pools.iter()? {
        let (k, v) = entry?;
        let (id, public) = (k.value(), ids.encode(IdKind::Pool, k.value()));
        match codec::decode::<PoolRecord>(v.value()) {
            Ok(pool) => {
                pool_owners.insert(id, pool.owner);
                if accounts.get(pool.owner)?.is_none() {
                    problems.push(format!("{public}: owner account missing"));
                }
                if pools_by_owner.get((pool.owner, id))?.is_none() {
                    problems.push(format!("{public}: owner index entry missing"));
                }
                if credits.get(id)?.is_none() {
                    problems.push(format!("{public}: credit balance missing"));
                }
            }
            Err(e) => problems.push(format!("{public}: {e}")),
        }
    }
    for entry in pools_by_owner.iter()? {
        let (owner, id) = entry?.0.value();
        let listed = match pool_owners.get(&id) {
            Some(&of) => of == owner,
            None => pools.get(id)?.is_some(), // undecodable: reported above
        };
        if !listed {
            let public = ids.encode(IdKind::Pool, id);
            problems.push(format!("{public}: owner index entry of no such pool"));
        }
    }

    let keys = read.open_table(KEYS)?;
    let hashes = read.open_table(KEY_VERIFY)?;
    let by_owner = read.open_table(KEYS_BY_OWNER)?;
    let by_prefix = read.open_table(KEYS_BY_PREFIX)?;
    // Every file of format 5 or later has both (check refuses older ones); a missing one is
    // damage.
    let imports = match (
        open_if_present(read, IMPORTED_HASHES)?,
        open_if_present(read, IMPORTS_BY_KEY)?,
    ) {
        (Some(hashes), Some(by_key)) => Some((hashes, by_key)),
        _ => {
            problems.push("import reservations: a table is missing".into());
            None
        }
    };
    let mut expected_counts: BTreeMap<HashScheme, u64> = BTreeMap::new();
    let mut expected_hashes = 0u64;
    // Keys and tokens by id: what each credit balance belongs to.
    let mut key_kinds: BTreeMap<u64, IdKind> = BTreeMap::new();
    // Keys and tokens with a balance of their own (neither pooled nor unmetered).
    let mut own_balances: BTreeSet<u64> = BTreeSet::new();
    // Undecodable key records: their index entries are still there.
    let mut undecodable: Vec<(u64, CodecError)> = Vec::new();
    for entry in keys.iter()? {
        let (k, v) = entry?;
        let id = k.value();
        let record = match codec::decode::<KeyRecord>(v.value()) {
            Ok(r) => r,
            Err(e) => {
                undecodable.push((id, e));
                continue;
            }
        };
        let kind = record.kind.id_kind();
        key_kinds.insert(id, kind);
        let tag = u8::from(kind == IdKind::Token);
        if tag == 0 {
            report.keys += 1
        } else {
            report.tokens += 1
        }
        let public = ids.encode(kind, id);
        if accounts.get(record.owner)?.is_none() {
            problems.push(format!("{public}: owner account missing"));
        }
        if record.pool.is_none() && record.limits.credits.is_some() {
            own_balances.insert(id);
        }
        match (record.pool, record.limits.credits) {
            (Some(pool), _) => match pool_owners.get(&pool) {
                None if pools.get(pool)?.is_none() => {
                    problems.push(format!("{public}: its credit pool is missing"))
                }
                Some(&owner) if owner != record.owner => problems.push(format!(
                    "{public}: its credit pool belongs to another account"
                )),
                _ => {}
            },
            (None, Some(_)) if credits.get(id)?.is_none() => {
                problems.push(format!("{public}: credit balance missing"))
            }
            _ => {}
        }
        for (hash, expected) in VerifyRecord::entries(id, &record) {
            *expected_counts.entry(expected.scheme).or_default() += 1;
            expected_hashes += 1;
            let stored = hashes.get(&hash)?;
            match stored.map(|v| codec::decode::<VerifyRecord>(v.value())) {
                None => problems.push(format!("{public}: hash index entry missing")),
                Some(Err(e)) => problems.push(format!("{public}: hash index entry: {e}")),
                Some(Ok(entry)) if entry != expected => {
                    problems.push(format!("{public}: hash index entry differs from the key"))
                }
                Some(Ok(_)) => {}
            }
        }
        if let Some((imported, by_key)) = &imports {
            // A secret still under its imported hash: reserved for this key. (The record
            // holds the digest keyed, the reservation is of the digest itself: it is found
            // through the key's id.)
            let mut schemes =
                std::iter::once(record.scheme).chain(record.rolled.as_ref().map(|old| old.scheme));
            if schemes.any(|scheme| scheme == HashScheme::Sha256Imported) {
                let reserved = by_key.get(id)?.map(|v| *v.value());
                let holder = match reserved {
                    Some(reserved) => imported.get(&reserved)?.map(|v| v.value()),
                    None => None,
                };
                if holder != Some(id) {
                    problems.push(format!("{public}: imported hash not reserved"));
                }
            }
        }
        if by_owner.get((record.owner, tag, id))?.is_none() {
            problems.push(format!("{public}: owner index entry missing"));
        }
        if by_prefix.get((record.key_prefix.as_str(), id))?.is_none() {
            problems.push(format!("{public}: prefix index entry missing"));
        }
    }
    // An undecodable record is named by the kind its owner index entry gives, or as a key
    // when no entry says: a token as `tok_…`, the id `tokens().delete` takes (every one was
    // named `key_…` before, an id no handle deletes a token by).
    if !undecodable.is_empty() {
        let mut kinds: BTreeMap<u64, IdKind> = undecodable
            .iter()
            .map(|(id, _)| (*id, IdKind::Key))
            .collect();
        for entry in by_owner.iter()? {
            let (_, tag, id) = entry?.0.value();
            if let Some(kind) = kinds.get_mut(&id).filter(|_| tag == 1) {
                *kind = IdKind::Token;
            }
        }
        for (id, e) in &undecodable {
            let kind = kinds[id];
            problems.push(format!("{}: {e}", ids.encode(kind, *id)));
        }
    }
    // How many hashes an undecodable record holds (one, or two while rolled) and under which
    // schemes is unknown: the hash counts are checked only when every record was read.
    if undecodable.is_empty() {
        if hashes.len()? != expected_hashes {
            problems.push(format!(
                "hash index has {} entries, records hold {expected_hashes}",
                hashes.len()?
            ));
        }
        match store::scheme_counts(&read.open_table(META)?) {
            Ok(stored) if stored != expected_counts => {
                problems.push("hash scheme counters disagree with the records".into())
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("hash scheme counters: {e}")),
        }
    }
    if let Some((imported, by_key)) = &imports {
        for entry in imported.iter()? {
            let (k, v) = entry?;
            let (hash, id) = (*k.value(), v.value());
            let public = ids.encode(key_kinds.get(&id).copied().unwrap_or(IdKind::Key), id);
            if keys.get(id)?.is_none() {
                problems.push(format!(
                    "{public}: imported hash reserved for a missing key"
                ));
            }
            if by_key.get(id)?.map(|v| *v.value()) != Some(hash) {
                problems.push(format!(
                    "{public}: imports_by_key entry missing or different"
                ));
            }
        }
        if imported.len()? != by_key.len()? {
            problems.push("import reservations: the two tables disagree".into());
        }
    }
    // Every record, readable or not, has one owner and one prefix entry.
    let records = report.keys + report.tokens + undecodable.len() as u64;
    // More entries than records point at keys that are gone (a record's own missing entry is
    // named with it above).
    if by_owner.len()? > records {
        problems.push("owner index has entries for missing keys".into());
    }
    if by_prefix.len()? > records {
        problems.push("prefix index has entries for missing keys".into());
    }

    for entry in credits.iter()? {
        let (k, v) = entry?;
        let id = k.value();
        let owner = match key_kinds.get(&id) {
            Some(&kind) => Some(kind),
            None if pools.get(id)?.is_some() => Some(IdKind::Pool),
            None => None,
        };
        let what = format!(
            "credit balance of {}",
            ids.encode(owner.unwrap_or(IdKind::Key), id)
        );
        match codec::decode::<CreditsRecord>(v.value()) {
            Ok(c) => {
                report.credit_records += 1;
                // Units still leased in a file not closed cleanly: its next open counts them
                // as lost, as an earlier open did with those in `lost_to_crash`.
                let lost = c.lost_to_crash.saturating_add(c.leased);
                report.lost_to_crash = report.lost_to_crash.saturating_add(lost);
                if owner.is_none() && keys.get(id)?.is_none() {
                    problems.push(format!("{what}: key or pool missing"));
                }
                // What `usage` would report as the key's own figures. (Found by a reviewer.)
                if key_kinds.contains_key(&id) && !own_balances.contains(&id) {
                    problems.push(format!(
                        "{what}: the key has no balance of its own (pooled or unmetered)"
                    ));
                }
                if !c.balanced() {
                    problems.push(format!(
                        "{what}: spent + lost + leased + balance != granted"
                    ));
                }
            }
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }
    for entry in read.open_table(USAGE)?.iter()? {
        let (k, v) = entry?;
        let id = k.value();
        let kind = match key_kinds.get(&id) {
            Some(&kind) => Some(kind),
            None if accounts.get(id)?.is_some() => Some(IdKind::Account),
            None if pools.get(id)?.is_some() => Some(IdKind::Pool),
            None => None,
        };
        // Keys and accounts take their ids from one sequence: an orphaned row could be
        // either's, so it is named as both.
        let what = match kind {
            Some(kind) => format!("usage of {}", ids.encode(kind, id)),
            None => format!(
                "usage of {} or {}",
                ids.encode(IdKind::Key, id),
                ids.encode(IdKind::Account, id)
            ),
        };
        match codec::decode::<UsageRecord>(v.value()) {
            // A key record that does not decode has its id in no map: named above already.
            Ok(_) if kind.is_none() && keys.get(id)?.is_none() => {
                problems.push(format!("{what}: key or account missing"));
            }
            Ok(_) => {}
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }
    for entry in read.open_table(ROUTES)?.iter()? {
        let (k, v) = entry?;
        let route = k.value().escape_default();
        match codec::decode::<RouteRule>(v.value()) {
            Ok(rule) if rule.prefix != k.value() => problems.push(format!(
                "route {route}: its rule is for {}",
                rule.prefix.escape_default()
            )),
            // Kept by an older version, or edited in: a rule `set` refuses today, such as
            // one that protects nothing. `routes().remove` takes it out.
            Ok(rule) => match crate::routes::check_prefix(&rule.prefix) {
                Ok(()) => report.routes += 1,
                Err(e) => problems.push(format!("route {route}: {e}")),
            },
            Err(e) => problems.push(format!("route {route}: {e}")),
        }
    }
    for entry in read.open_table(AUDIT)?.iter()? {
        let (k, v) = entry?;
        let seq = k.value();
        match codec::decode::<AuditEvent>(v.value()) {
            Ok(event) if event.seq != seq => problems.push(format!(
                "audit event {seq}: its sequence number says {}",
                event.seq
            )),
            // Nothing can be appended after it: every change would be refused.
            Ok(_) if seq == u64::MAX => problems.push(format!(
                "audit event {seq}: the trail's last possible number"
            )),
            Ok(_) => report.audit_events += 1,
            Err(e) => problems.push(format!("audit event {seq}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::record::RouteRule;
    use crate::store::tables::ROUTES;
    use crate::{Config, Ledger, MasterKey, NewAccount, NewKey, Presented, Request};

    /// A rule an older version kept that `set` refuses today (`/v1/*` guards nothing) still
    /// loads and is listed; `check` names it, so it can be found and removed. (Found by the
    /// thirtieth session's diff reviewer.)
    #[test]
    fn check_names_a_stored_rule_that_guards_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        let master = MasterKey::generate().unwrap();
        let config = Config::builder().master_key(master).build().unwrap();
        let ledger = Ledger::open(&path, config.clone()).unwrap();
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let created = ledger.keys().create(NewKey::new(owner.id.as_str(), "k"));
        let plaintext = created.unwrap().plaintext;
        ledger.close().unwrap();
        drop(ledger);
        {
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let rule = RouteRule::new("/v1/*").permission("admin");
            let mut routes = txn.open_table(ROUTES).unwrap();
            routes
                .insert("/v1/*", crate::codec::encode(&rule).as_slice())
                .unwrap();
            drop(routes);
            txn.commit().unwrap();
        }
        let report = Ledger::check(&path, config.clone()).unwrap();
        assert_eq!(report.routes, 0);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.starts_with("route /v1/*: ")),
            "{:?}",
            report.problems
        );
        let ledger = Ledger::open(&path, config).unwrap();
        let key = Presented::new(plaintext.expose()).unwrap();
        assert!(
            ledger.verify(&Request::new(&key, "/v1/users")).is_ok(),
            "it guards nothing"
        );
        ledger.routes().remove("/v1/*").unwrap();
        assert!(ledger.routes().list().unwrap().is_empty());
    }
}
