//! `check`: redb's integrity check, then every record decoded and every index and counter
//! cross-checked against the records.

use std::collections::BTreeMap;
use std::path::Path;

use redb::{ReadableTable, ReadableTableMetadata};
use serde::Serialize;

use crate::codec;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hashing::HashScheme;
use crate::ledger::Ledger;
use crate::record::{AccountRecord, AuditEvent, CreditsRecord, KeyRecord, RouteRule, VerifyRecord};
use crate::store::{self, tables::*};

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
    /// Credit units lost to crashes (leased in memory when a process died), all balances.
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
    /// record decodability and index consistency. Errors only when the file cannot be opened
    /// at all; everything else is reported in the [`CheckReport`].
    pub fn check(path: impl AsRef<Path>, config: Config) -> Result<CheckReport> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(Error::NotFound {
                what: "database file",
            });
        }
        let integrity_ok = {
            let mut db = redb::Database::builder().open(path)?;
            db.check_integrity()?
        };
        let ledger = Ledger::open(path, config)?;
        let mut report = CheckReport {
            integrity_ok,
            ..CheckReport::default()
        };
        ledger.check_records(&mut report)?;
        Ok(report)
    }

    /// [`check`](Self::check) on a storage backend. The backend is cloned: one clone for
    /// redb's integrity check, one to open the ledger, so clones must share their bytes.
    pub fn check_with_backend(
        backend: impl redb::StorageBackend + Clone,
        config: Config,
    ) -> Result<CheckReport> {
        let integrity_ok = {
            let mut db = redb::Database::builder().create_with_backend(backend.clone())?;
            db.check_integrity()?
        };
        let ledger = Ledger::open_with_backend(backend, config)?;
        let mut report = CheckReport {
            integrity_ok,
            ..CheckReport::default()
        };
        ledger.check_records(&mut report)?;
        Ok(report)
    }

    fn check_records(&self, report: &mut CheckReport) -> Result<()> {
        let read = self.inner.store.begin_read()?;
        let ids = &self.inner.ids;
        let problems = &mut report.problems;

        let accounts = read.open_table(ACCOUNTS)?;
        for entry in accounts.iter()? {
            let (k, v) = entry?;
            match codec::decode::<AccountRecord>(v.value()) {
                Ok(_) => report.accounts += 1,
                Err(e) => problems.push(format!("account #{}: {e}", k.value())),
            }
        }

        let keys = read.open_table(KEYS)?;
        let hashes = read.open_table(KEY_VERIFY)?;
        let by_owner = read.open_table(KEYS_BY_OWNER)?;
        let by_prefix = read.open_table(KEYS_BY_PREFIX)?;
        let mut expected_counts: BTreeMap<HashScheme, u64> = BTreeMap::new();
        let mut expected_hashes = 0u64;
        for entry in keys.iter()? {
            let (k, v) = entry?;
            let id = k.value();
            let record = match codec::decode::<KeyRecord>(v.value()) {
                Ok(r) => r,
                Err(e) => {
                    problems.push(format!("key #{id}: {e}"));
                    continue;
                }
            };
            let kind = record.kind.id_kind();
            let tag = u8::from(kind == crate::public_id::IdKind::Token);
            if tag == 0 {
                report.keys += 1
            } else {
                report.tokens += 1
            }
            let public = ids.encode(kind, id);
            if accounts.get(record.owner)?.is_none() {
                problems.push(format!("{public}: owner account missing"));
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
            if by_owner.get((record.owner, tag, id))?.is_none() {
                problems.push(format!("{public}: owner index entry missing"));
            }
            if by_prefix.get((record.key_prefix.as_str(), id))?.is_none() {
                problems.push(format!("{public}: prefix index entry missing"));
            }
        }
        if hashes.len()? != expected_hashes {
            problems.push(format!(
                "hash index has {} entries, records hold {expected_hashes}",
                hashes.len()?
            ));
        }
        let stored_counts = store::scheme_counts(&read.open_table(META)?)?;
        if stored_counts != expected_counts {
            problems.push("hash scheme counters disagree with the records".into());
        }
        if by_owner.len()? != report.keys + report.tokens {
            problems.push("owner index has entries for missing keys".into());
        }
        if by_prefix.len()? != report.keys + report.tokens {
            problems.push("prefix index has entries for missing keys".into());
        }

        let pools = read.open_table(POOLS)?;
        for entry in read.open_table(CREDITS)?.iter()? {
            let (k, v) = entry?;
            match codec::decode::<CreditsRecord>(v.value()) {
                Ok(c) => {
                    report.credit_records += 1;
                    report.lost_to_crash = report.lost_to_crash.saturating_add(c.lost_to_crash);
                    if keys.get(k.value())?.is_none() && pools.get(k.value())?.is_none() {
                        problems.push(format!("credits #{}: key or pool missing", k.value()));
                    }
                    if !c.balanced() {
                        problems.push(format!(
                            "credits #{}: spent + lost + leased + balance != granted",
                            k.value()
                        ));
                    }
                }
                Err(e) => problems.push(format!("credits #{}: {e}", k.value())),
            }
        }
        for entry in read.open_table(ROUTES)?.iter()? {
            let (k, v) = entry?;
            match codec::decode::<RouteRule>(v.value()) {
                Ok(_) => report.routes += 1,
                Err(e) => problems.push(format!("route {}: {e}", k.value().escape_default())),
            }
        }
        for entry in read.open_table(AUDIT)?.iter()? {
            let (k, v) = entry?;
            match codec::decode::<AuditEvent>(v.value()) {
                Ok(_) => report.audit_events += 1,
                Err(e) => problems.push(format!("audit event {}: {e}", k.value())),
            }
        }
        crate::vault::check_tables(self, &read, problems)?;
        Ok(())
    }
}
