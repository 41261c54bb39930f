//! Finding a key record from its plaintext: hash under the current scheme, look the hash up,
//! and — only while records under other schemes exist — try those too, rehashing the record
//! to the current scheme on a hit. This is the cache-miss path of `verify`.

use redb::{ReadableTable, WriteTransaction};

use crate::audit;
use crate::clock::Timestamp;
use crate::codec;
use crate::engine::KeyChange;
use crate::error::{Error, Result};
use crate::hashing::{HashScheme, KeyHash, KeyHasher, hashes_equal};
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
            let Some(entry) = find_under_old_schemes(ledger, &read, key, now)? else {
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
/// the miss path's shared `snapshot` (which goes on to read a pool's balance): one look-up
/// while every key is under the current scheme. With it, whether the entry is stored at
/// `hash` — the hash admin changes evict from the cache — which it is not when `hash` was
/// made before a rotation published a new hasher.
pub(crate) fn find_in(
    ledger: &Ledger,
    snapshot: &ReadSnapshot,
    hash: &KeyHash,
    key: &str,
    now: Timestamp,
) -> Result<Option<(VerifyRecord, bool)>> {
    match probe_table(&snapshot.verify, hash, ledger.hasher().current(), now)? {
        Some(found) => Ok(Some((found, true))),
        // The hasher loaded again, after the search (which loads its own): a rotation that
        // published before either is seen.
        None => Ok(
            find_under_old_schemes(ledger, &snapshot.txn, key, now)?.map(|found| {
                (
                    found,
                    hashes_equal(&ledger.hasher().hash_current(key), hash),
                )
            }),
        ),
    }
}

/// The part of [`find_in`] after the current scheme missed: tries the schemes that still
/// have records (none, usually: then this is one read of the scheme counts) and rehashes a
/// key found under one. Every hash here comes from one hasher, read once: the caller's hash
/// may predate a rotation that published since, and rehashing to it under the new scheme's
/// label would leave the record unfindable.
fn find_under_old_schemes(
    ledger: &Ledger,
    read: &redb::ReadTransaction,
    key: &str,
    now: Timestamp,
) -> Result<Option<VerifyRecord>> {
    let hasher = ledger.hasher();
    let current = hasher.current();
    let others = |read: &redb::ReadTransaction| -> Result<Vec<HashScheme>> {
        let counts = store::scheme_counts(&read.open_table(META)?)?;
        let others = counts.into_iter().filter(|&(s, n)| s != current && n > 0);
        Ok(others.map(|(scheme, _)| scheme).collect())
    };
    if others(read)?.is_empty() {
        return Ok(None);
    }
    // A newer read, and the schemes it counts: a concurrent miss of the same key may have
    // rehashed it since the caller's read, to this scheme or to another (across a rotation).
    let read = ledger.inner.store.begin_read()?;
    let new_hash = hasher.hash(current, key);
    if let Some(found) = probe(&read, &new_hash, current, now)? {
        return Ok(Some(found));
    }
    for scheme in others(&read)? {
        let old_hash = hasher.hash(scheme, key);
        if let Some(found) = probe(&read, &old_hash, scheme, now)? {
            drop(read);
            return match rehash(ledger, found.id, key, &hasher) {
                // A closed ledger writes nothing, and its reads still answer: the key is
                // served as found, and rehashed by its first use after the next open.
                Err(Error::Closed) => Ok(Some(found)),
                done => done,
            };
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

/// Moves the secret `key` of record `id` (its current secret or its rolled one, which a miss
/// found under an older scheme) to `hasher`'s current scheme. Returns the secret's verify
/// entry (`None`: a concurrent change, such as a roll or a delete, took it out first).
///
/// The secret is recognised by its hash under the scheme its slot holds, so a concurrent
/// miss that moved it first is no obstacle, whichever hasher it had (two misses straddling a
/// rotation move it to two schemes). Nothing is moved when it is under the current scheme
/// already, or when the file's scheme is no longer `hasher`'s (a rotation committed since
/// this miss read its hasher): its entry is returned as it is, and a later miss moves it.
///
/// The new hash may be another record's verify entry already (the plaintext was imported by
/// its SHA-256 while another key held it). A rolled secret of that record past its grace is
/// pruned to make room; any other entry stays, and so does the record under its old scheme:
/// overwriting it would leave the other record's secret without an entry, or, once the other
/// record dropped it, this one's. Then that entry is returned if it is live, as a look-up
/// under the current scheme would find it.
fn rehash(ledger: &Ledger, id: u64, key: &str, hasher: &KeyHasher) -> Result<Option<VerifyRecord>> {
    let now = ledger.now();
    let scheme = hasher.current();
    let mut txn = ledger.inner.store.begin_write()?;
    // Durable with the next commit that syncs (the writer's next batch or usage round, any
    // change, a clean close, an audit read), not with a sync of its own: after a rotation
    // every active key's first use comes here, and a sync each held the commit lock that
    // lease batches wait for (found by a reviewer). Lost to a crash before then, it is
    // undone whole: the key is found under its old scheme again and rehashed again.
    txn.without_sync()?;
    let mut keys = txn.open_table(KEYS)?;
    // Deleted since the probe: not found, as for any other key that is gone.
    let Some(mut record): Option<KeyRecord> = store::get(&keys, id)? else {
        return Ok(None);
    };
    // The secret presented must still be one of the record's: a roll that committed since
    // the probe may have replaced it (and put another secret in the rolled slot).
    let holds = |hash: &KeyHash, scheme| hashes_equal(hash, &hasher.hash(scheme, key));
    let in_rolled = record
        .rolled
        .as_ref()
        .is_some_and(|o| holds(&o.key_hash, o.scheme));
    let (stored_hash, stored_scheme) =
        match (holds(&record.key_hash, record.scheme), &mut record.rolled) {
            (true, _) => (&mut record.key_hash, &mut record.scheme),
            (false, Some(o)) if in_rolled => (&mut o.key_hash, &mut o.scheme),
            _ => return Ok(None),
        };
    let old_hash = *stored_hash;
    if *stored_scheme == scheme || store::hash_scheme(&txn.open_table(META)?)? != scheme {
        return Ok(entry_of(id, &record, &old_hash)); // the transaction aborts on drop
    }
    let new_hash = hasher.hash_current(key);
    let mut pruned = None;
    match holder(&txn, &mut keys, id, &new_hash, now)? {
        Holder::Free => {}
        Holder::DeadRolled(other) => pruned = Some(other),
        Holder::Other(entry) => {
            let live = entry.valid_until.is_none_or(|until| now < until);
            return Ok((entry.scheme == scheme && live).then_some(*entry));
        }
    }
    index::remove(&txn, &old_hash)?;
    store::adjust_scheme_count(&txn, *stored_scheme, -1)?;
    store::adjust_scheme_count(&txn, scheme, 1)?;
    *stored_hash = new_hash;
    *stored_scheme = scheme;
    index::put(&txn, &mut keys, id, &record)?;
    drop(keys);
    let kind = record.kind.id_kind();
    let public = ledger.inner.ids.encode(kind, id);
    let action = format!("{}.rehashed", kind.noun());
    audit::append(
        &txn,
        ledger,
        now,
        SYSTEM_ACTOR,
        &action,
        &public,
        &["hash_scheme"],
    )?;
    txn.commit_then(|_| {
        if let Some(other) = pruned {
            // Its dead secret may be cached, where it would answer for this key's plaintext.
            let engine = &ledger.inner.engine;
            engine.key_changed(other, &[new_hash], KeyChange::Settings);
        }
    })?;
    Ok(entry_of(id, &record, &new_hash))
}

/// The verify entry of record `id` for its secret hashed as `hash`.
fn entry_of(id: u64, record: &KeyRecord, hash: &KeyHash) -> Option<VerifyRecord> {
    VerifyRecord::entries(id, record)
        .find(|(h, _)| hashes_equal(h, hash))
        .map(|(_, entry)| entry)
}

/// Who holds a hash a rehash is about to write, seen from the record `id` moving there.
enum Holder {
    /// No record, or `id` itself: the hash is free to write.
    Free,
    /// Record `0`'s rolled secret past its grace period, pruned now to make room.
    DeadRolled(u64),
    /// Anything else: another record's live secret, or an entry whose record is gone (which
    /// `check` reports). Left as it is.
    Other(Box<VerifyRecord>),
}

/// Finds who holds `hash` in the verify index and, if it is another record's rolled secret
/// past its grace period, prunes that secret in `txn` (as the record's next change would).
fn holder(
    txn: &WriteTransaction,
    keys: &mut redb::Table<u64, &'static [u8]>,
    id: u64,
    hash: &KeyHash,
    now: Timestamp,
) -> Result<Holder> {
    let entry = match txn.open_table(KEY_VERIFY)?.get(hash)? {
        Some(bytes) => codec::decode::<VerifyRecord>(bytes.value())?,
        None => return Ok(Holder::Free),
    };
    if entry.id == id {
        return Ok(Holder::Free);
    }
    let other: Option<KeyRecord> = store::get(keys, entry.id)?;
    let Some(mut other) = other.filter(|r| {
        r.rolled
            .as_ref()
            .is_some_and(|old| hashes_equal(&old.key_hash, hash) && old.valid_until <= now)
    }) else {
        return Ok(Holder::Other(Box::new(entry)));
    };
    super::prune_expired_rolled(txn, &mut other, now)?;
    index::put(txn, keys, entry.id, &other)?;
    Ok(Holder::DeadRolled(entry.id))
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
        let found = self
            .guarded(|| find(self, key, now))
            .map_err(|_| Denial::Unavailable)?
            .ok_or(Denial::NotFound)?;
        let record = found.record;
        if record.disabled_at.is_some() {
            return Err(Denial::Disabled);
        }
        if record.expires_at.is_some_and(|at| at <= now) {
            return Err(Denial::Expired);
        }
        let kind = record.kind.id_kind();
        self.guarded(|| Ok(super::key_info(self, kind, found.id, record)))
            .map_err(|_| Denial::Unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, MasterKey, NewAccount, NewKey, Presented};

    const V1: HashScheme = HashScheme::HmacSha256 { pepper: 1 };
    const V2: HashScheme = HashScheme::HmacSha256 { pepper: 2 };
    const V3: HashScheme = HashScheme::HmacSha256 { pepper: 3 };

    struct Fixture {
        dir: tempfile::TempDir,
        config: Config,
        ledger: Ledger,
        id: u64,
        public: String,
        plaintext: String,
    }

    /// A ledger holding one key, made under `V1`.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::builder()
            .master_key(MasterKey::from_bytes(&[5u8; 32]).unwrap())
            .build()
            .unwrap();
        let ledger = Ledger::open(dir.path().join("keys.redb"), config.clone()).unwrap();
        let owner = ledger
            .accounts()
            .create(NewAccount::new("Acme"))
            .unwrap()
            .id;
        let created = ledger.keys().create(NewKey::new(owner, "k")).unwrap();
        let public = created.info.id.to_string();
        Fixture {
            id: ledger.keys().internal_id(&public).unwrap(),
            public,
            plaintext: created.plaintext.expose().to_owned(),
            dir,
            config,
            ledger,
        }
    }

    impl Fixture {
        fn works(&self, plaintext: &str) -> bool {
            self.ledger
                .authenticate(&Presented::new(plaintext).unwrap())
                .is_ok()
        }

        fn roll(&self) -> String {
            let rolled = self.ledger.keys().roll(&self.public, 3_600).unwrap();
            rolled.plaintext.expose().to_owned()
        }

        /// What a miss that found `plaintext` under an older scheme before now would rehash.
        fn rehash_from_v1(&self, plaintext: &str) -> Option<VerifyRecord> {
            rehash(&self.ledger, self.id, plaintext, &self.ledger.hasher()).unwrap()
        }

        /// Closes the ledger and runs `keyledger check` on its file.
        fn check(self) -> Vec<String> {
            self.ledger.close().unwrap();
            drop(self.ledger);
            let report = Ledger::check(self.dir.path().join("keys.redb"), self.config).unwrap();
            report.problems.iter().map(|p| format!("{p:?}")).collect()
        }
    }

    #[test]
    fn a_rehash_that_lost_a_race_with_a_roll_writes_nothing() {
        let f = fixture();
        let first = f.plaintext.clone();
        f.ledger.rotate_hash_scheme(V2).unwrap();
        // A miss finds the first secret under V1 … and two rolls commit before its rehash:
        // the first secret is gone, the second is the rolled one in its grace period.
        let second = f.roll();
        let third = f.roll();
        assert!(!f.works(&first) && f.works(&second) && f.works(&third));

        assert!(
            f.rehash_from_v1(&first).is_none(),
            "not the record's any more"
        );
        assert!(!f.works(&first), "a replaced secret must stay replaced");
        assert!(f.works(&second) && f.works(&third));
        assert_eq!(f.check(), Vec::<String>::new());
    }

    #[test]
    fn a_second_rehash_of_the_same_secret_finds_it_done() {
        let f = fixture();
        let first = f.plaintext.clone();
        let second = f.roll(); // both under V1: the second current, the first rolled
        f.ledger.rotate_hash_scheme(V2).unwrap();

        // Two misses of the second secret both found it under V1.
        let done = f.rehash_from_v1(&second).expect("rehashed");
        let again = f.rehash_from_v1(&second).expect("found rehashed");
        assert_eq!((again.id, again.scheme), (done.id, done.scheme));
        assert_eq!(
            again.valid_until, None,
            "still the current secret, no deadline"
        );
        assert!(f.works(&first), "the rolled secret keeps its grace period");
        assert!(f.works(&second));
        assert_eq!(f.check(), Vec::<String>::new());
    }

    #[test]
    fn a_miss_whose_snapshot_predates_a_concurrent_rehash_still_finds_the_key() {
        let f = fixture();
        f.ledger.rotate_hash_scheme(V2).unwrap();
        // This miss's snapshot still has the key under V1; another miss rehashes it.
        let stale = f.ledger.inner.store.begin_read().unwrap();
        f.rehash_from_v1(&f.plaintext).expect("rehashed");
        let found = find_under_old_schemes(&f.ledger, &stale, &f.plaintext, f.ledger.now());
        let found = found.unwrap().expect("found under the current scheme");
        assert_eq!((found.id, found.scheme), (f.id, V2));
        drop(stale);
        assert_eq!(f.check(), Vec::<String>::new());
    }

    /// A rehash never overwrites another record's live verify entry: here another key was
    /// imported by the current-scheme hash of this key's plaintext between the miss's probe
    /// (which would otherwise have found it) and the rehash.
    #[test]
    fn a_rehash_leaves_another_records_live_entry_and_its_own_record_as_they_were() {
        let f = fixture();
        f.ledger.rotate_hash_scheme(V2).unwrap();
        let taken = f.ledger.hasher().hash(V2, &f.plaintext);
        let owner = f.ledger.keys().get(&f.public).unwrap().owner;
        let import = crate::ImportKey::new(
            owner,
            "other",
            crate::ImportedHash::Current(taken),
            &f.plaintext[..12],
            "wxyz",
        );
        let other = f.ledger.keys().import(import).unwrap();
        let other_id = f.ledger.keys().internal_id(&other.id).unwrap();

        let found = f.rehash_from_v1(&f.plaintext).expect("the live entry");
        assert_eq!((found.id, found.scheme), (other_id, V2));
        let read = f.ledger.inner.store.begin_read().unwrap();
        let mine: KeyRecord = store::get(&read.open_table(KEYS).unwrap(), f.id)
            .unwrap()
            .unwrap();
        assert_eq!(mine.scheme, V1, "left under its old scheme");
        drop(read);
        assert_eq!(f.check(), Vec::<String>::new());
    }

    #[test]
    fn a_rehash_that_lost_a_race_with_a_delete_finds_nothing() {
        let f = fixture();
        f.ledger.rotate_hash_scheme(V2).unwrap();
        f.ledger.keys().delete(&f.public).unwrap();
        let out = rehash(&f.ledger, f.id, &f.plaintext, &f.ledger.hasher());
        assert!(
            matches!(out, Ok(None)),
            "{:?}",
            out.map(|o| o.map(|e| e.id))
        );
    }

    /// Two misses straddling a rotation (found by a reviewer): one moved the key from V1 to
    /// V2 with the hasher it had read; the other, holding V3's, probed V1 and found its
    /// secret moved — to V2, not V3 — and reported the key missing, which its miss then
    /// cached until the next restart. The secret is recognised under whichever scheme it
    /// holds now, and moved on.
    #[test]
    fn misses_straddling_a_rotation_both_find_the_key() {
        let f = fixture();
        f.ledger.rotate_hash_scheme(V2).unwrap();
        let v2 = f.ledger.hasher();
        let first = rehash(&f.ledger, f.id, &f.plaintext, &v2).unwrap();
        assert_eq!(first.expect("moved").scheme, V2);
        f.ledger.rotate_hash_scheme(V3).unwrap();
        let v3 = f.ledger.hasher();
        let second = rehash(&f.ledger, f.id, &f.plaintext, &v3).unwrap();
        assert_eq!(second.expect("found under V2, moved on").scheme, V3);
        // A stale hasher moves nothing once the file's scheme is another: V2's hasher
        // would move the key back.
        let third = rehash(&f.ledger, f.id, &f.plaintext, &v2).unwrap();
        assert_eq!(third.expect("found where it is").scheme, V3);
        assert!(f.works(&f.plaintext));
        assert_eq!(f.check(), Vec::<String>::new());
    }

    /// A miss whose snapshot counted only V1, racing a miss that moved the key to V2 and a
    /// rotation to V3 since, probes the schemes its own newer read counts.
    #[test]
    fn a_miss_whose_snapshot_predates_a_rehash_and_a_rotation_still_finds_the_key() {
        let f = fixture();
        f.ledger.rotate_hash_scheme(V2).unwrap();
        let stale = f.ledger.inner.store.begin_read().unwrap();
        f.rehash_from_v1(&f.plaintext).expect("moved to V2");
        f.ledger.rotate_hash_scheme(V3).unwrap();
        let found = find_under_old_schemes(&f.ledger, &stale, &f.plaintext, f.ledger.now());
        let found = found.unwrap().expect("found under V2, moved on");
        assert_eq!((found.id, found.scheme), (f.id, V3));
        drop(stale);
        assert_eq!(f.check(), Vec::<String>::new());
    }
}
