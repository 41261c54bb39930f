//! A database written by format version 1 (`tests/data/v1.redb`, with the plaintexts of its
//! key and token in `tests/data/v1.plaintexts`) still opens and reads back: accounts, keys,
//! tokens, a route, a pool, credits and the audit trail. A file whose format version is newer
//! than this build knows is refused with `UpgradeRequired`, not misread. Opening a version 1
//! file migrates it to version 2 (the hash index becomes the verify index).
//!
//! Regenerate (only when the format version changes, keeping the old file as `vN.redb`):
//! `cargo test --test golden -- --ignored write_golden_file`.

use std::path::{Path, PathBuf};

use keyledger::{
    Config, Denial, Error, HashScheme, ImportKey, ImportedHash, Ledger, ManualClock, MasterKey,
    NewAccount, NewKey, NewPool, PageRequest, Presented, Request, RouteRule, Timestamp,
};
use sha2::{Digest, Sha256};

/// The master key of the golden file (test data, not a secret).
const MASTER_HEX: &str = "6b65796c656467657220676f6c64656e2066696c65206d6173746572206b6579";
/// When the golden file was written (2025-06-15T15:06:40Z).
const WRITTEN_AT: Timestamp = Timestamp(1_750_000_000_000);

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

fn config(at: Timestamp) -> Config {
    Config::builder()
        .master_key(MasterKey::parse(MASTER_HEX).unwrap())
        .clock(ManualClock::new(at))
        .build()
        .unwrap()
}

/// A scratch copy of the golden file (opening a file writes to it).
fn copy() -> (tempfile::TempDir, PathBuf) {
    copy_of("v1.redb")
}

/// A scratch copy of `tests/data/<name>`.
fn copy_of(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::copy(data(name), &path).unwrap();
    (dir, path)
}

fn plaintexts() -> (String, String) {
    let text = std::fs::read_to_string(data("v1.plaintexts")).unwrap();
    let mut lines = text.lines();
    (
        lines.next().unwrap().to_owned(),
        lines.next().unwrap().to_owned(),
    )
}

#[test]
fn a_version_1_file_opens_and_reads_back() {
    let (_dir, path) = copy();
    let ledger = Ledger::open(&path, config(WRITTEN_AT.plus_secs(86_400))).unwrap();
    let accounts = ledger.accounts().list(&PageRequest::first()).unwrap();
    assert_eq!(accounts.items.len(), 1);
    let account = &accounts.items[0];
    assert_eq!(account.name, "Golden Corp");
    let keys = ledger
        .keys()
        .list(&account.id, &PageRequest::first())
        .unwrap();
    assert_eq!(keys.items.len(), 2, "a metered key and a pool key");
    let tokens = ledger
        .tokens()
        .list(&account.id, &PageRequest::first())
        .unwrap();
    assert_eq!(tokens.items.len(), 1);
    assert_eq!(tokens.items[0].name, "golden token");
    let metered = keys.items.iter().find(|k| k.name == "golden key").unwrap();
    assert_eq!(metered.permissions, vec!["quickhits:*".to_owned()]);
    assert_eq!(metered.limits.credits, Some(100));
    let routes = ledger.routes().list().unwrap();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].cost, 2);
    // Usage as written: 100 granted, 7 spent.
    let usage = ledger.credits().usage(&metered.id).unwrap();
    assert_eq!(
        (usage.granted, usage.spent, usage.remaining),
        (100, 7, Some(93))
    );
    assert_eq!(usage.lost_to_crash, 0);
    // The key still verifies and spends.
    let (key, token) = plaintexts();
    let presented = Presented::new(&key).unwrap();
    let grant = ledger
        .verify(&Request::new(&presented, "/api/v1/quickhits/create"))
        .unwrap();
    assert_eq!(grant.key_id(), metered.id);
    assert_eq!(grant.reserved(), 2, "the route's cost");
    let receipt = grant.commit(2);
    assert_eq!(receipt.token_stats.charged, 2);
    assert_eq!(
        ledger.credits().usage(&metered.id).unwrap().remaining,
        Some(91)
    );
    let info = ledger
        .authenticate(&Presented::new(&token).unwrap())
        .unwrap();
    assert_eq!(info.name, "golden token");
    // The pool key spends from the pool.
    let pooled = keys.items.iter().find(|k| k.name == "pool key").unwrap();
    let pool = pooled.pool.unwrap();
    assert_eq!(ledger.credits().usage(&pool).unwrap().remaining, Some(50));
    // The account lists it: the migration indexed pools by owner (format 8).
    let listed = ledger.credits().pools(&account.id).unwrap();
    assert_eq!(listed.iter().map(|p| p.id).collect::<Vec<_>>(), [pool]);
    // The audit trail reads back.
    let audit = ledger.audit().recent(100).unwrap();
    assert!(audit.len() >= 6, "{audit:?}");
    drop(ledger);
    // Opening migrated the file to format 8 (through 2: the verify index replaced the hash index;
    // through 7: every record sealed with its checksum; through 8: imported digests keyed).
    {
        let db = redb::Database::open(&path).unwrap();
        let read = redb::ReadableDatabase::begin_read(&db).unwrap();
        let format = read.open_table(META).unwrap();
        let format = format.get("format").unwrap().unwrap();
        assert_eq!(format.value()[8..], 8u32.to_le_bytes());
        assert_every_record_is_sealed(&read);
        let tables: Vec<String> = read
            .list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_owned())
            .collect();
        assert!(tables.contains(&"key_verify".to_owned()), "{tables:?}");
        assert!(!tables.contains(&"key_hashes".to_owned()), "{tables:?}");
    }
    let report = Ledger::check(&path, config(WRITTEN_AT)).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// A format-3 file whose keys were hashed with BLAKE3 keyed with HMAC-SHA256's pepper key
/// (`tests/data/v3-blake3.redb`: a key made under `hmac-sha256/v1`, then a rotation to
/// `blake3/v2` as format 3 did it and a key made under it; their plaintexts in
/// `v3-blake3.plaintexts`). Format 4 keys BLAKE3 apart: the file goes on with the new BLAKE3
/// scheme, and both keys still verify, each rehashed to it on first use.
#[test]
fn a_format_3_file_hashing_with_blake3_moves_to_a_key_of_its_own_and_every_key_verifies() {
    let (_dir, path) = copy_of("v3-blake3.redb");
    let text = std::fs::read_to_string(data("v3-blake3.plaintexts")).unwrap();
    let plaintexts: Vec<&str> = text.lines().collect();
    let ledger = Ledger::open(&path, config(WRITTEN_AT)).unwrap();
    let blake3 = HashScheme::Blake3Keyed { pepper: 2 };
    assert_eq!(ledger.hash_scheme(), blake3);
    let legacy = HashScheme::Blake3KeyedLegacy { pepper: 2 };
    let hmac = HashScheme::HmacSha256 { pepper: 1 };
    let mut counts = ledger.hash_scheme_counts().unwrap();
    counts.retain(|(_, n)| *n > 0);
    assert_eq!(counts, [(hmac, 1), (legacy, 1)], "as format 3 wrote them");
    assert!(
        ledger.rotate_hash_scheme(legacy).is_err(),
        "the legacy scheme is never current again"
    );
    for plaintext in &plaintexts {
        let info = ledger
            .authenticate(&Presented::new(plaintext).unwrap())
            .unwrap();
        assert_eq!(info.hash_scheme, "blake3/v2", "{}", info.name);
    }
    let mut counts = ledger.hash_scheme_counts().unwrap();
    counts.retain(|(_, n)| *n > 0);
    assert_eq!(counts, [(blake3, 2)], "both rehashed");
    ledger.close().unwrap();
    drop(ledger);
    let ledger = Ledger::open(&path, config(WRITTEN_AT)).unwrap();
    for plaintext in &plaintexts {
        let presented = Presented::new(plaintext).unwrap();
        let grant = ledger.verify(&Request::new(&presented, "/x")).unwrap();
        assert_eq!(grant.commit(1).token_stats.charged, 1);
    }
    ledger.close().unwrap();
    drop(ledger);
    let report = Ledger::check(&path, config(WRITTEN_AT)).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn the_golden_file_refuses_another_master_key() {
    let (_dir, path) = copy();
    let other = Config::builder()
        .master_key(MasterKey::from_bytes(&[1u8; 32]).unwrap())
        .build()
        .unwrap();
    assert!(matches!(
        Ledger::open(&path, other),
        Err(Error::WrongMasterKey)
    ));
}

const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

/// Every record of every table keyledger encodes ends with the CRC-32 of its bytes, its
/// version byte flagged (format 7): a migrated file has no record left without one.
fn assert_every_record_is_sealed(read: &redb::ReadTransaction) {
    use redb::{ReadableTable, TableDefinition};
    fn each<K: redb::Key + 'static>(read: &redb::ReadTransaction, name: &str) -> usize {
        let table = match read.open_table(TableDefinition::<K, &[u8]>::new(name)) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return 0,
            Err(e) => panic!("{name}: {e}"),
        };
        let mut count = 0;
        for row in table.iter().unwrap() {
            let bytes = row.unwrap().1.value().to_vec();
            let (body, crc) = bytes.split_at(bytes.len() - 4);
            assert!(
                body[0] & 0x80 != 0,
                "{name}: a record without its checksum flag"
            );
            assert_eq!(crc, crc32fast::hash(body).to_le_bytes(), "{name}: checksum");
            count += 1;
        }
        count
    }
    let by_id = ["accounts", "keys", "credits", "audit", "pools", "usage"];
    let sealed = by_id
        .iter()
        .map(|name| each::<u64>(read, name))
        .sum::<usize>()
        + each::<&[u8; 32]>(read, "key_verify")
        + each::<&str>(read, "routes")
        + each::<(u64, &str)>(read, "vault_connectors")
        + each::<(u64, &str)>(read, "vault_secrets");
    assert!(sealed > 0, "no records found");
}

#[test]
fn a_file_from_a_newer_format_version_is_refused_with_upgrade_required() {
    let (_dir, path) = copy();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let mut format = b"keyledgr".to_vec();
            format.extend_from_slice(&99u32.to_le_bytes());
            meta.insert("format", format.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    match Ledger::open(&path, config(WRITTEN_AT)) {
        Err(Error::UpgradeRequired {
            found: 99,
            supported,
        }) => assert_eq!(supported, 8),
        other => panic!("expected UpgradeRequired {{ found: 99 }}, got {other:?}"),
    }
    // `check` refuses it the same way rather than reporting garbage.
    assert!(matches!(
        Ledger::check(&path, config(WRITTEN_AT)),
        Err(Error::UpgradeRequired { found: 99, .. })
    ));
}

#[test]
fn a_file_claiming_format_0_is_not_a_ledger() {
    // No release wrote format 0: migrating it as if it were format 1 or 2 would skip the
    // steps that build its index, and every key would verify as unavailable.
    let (_dir, path) = copy();
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let mut format = b"keyledgr".to_vec();
            format.extend_from_slice(&0u32.to_le_bytes());
            meta.insert("format", format.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    assert!(matches!(
        Ledger::open(&path, config(WRITTEN_AT)),
        Err(Error::NotALedger { .. })
    ));
}

/// Writes `tests/data/v1.redb` and `tests/data/v1.plaintexts`.
#[test]
#[ignore = "writes the golden file"]
fn write_golden_file() {
    let path = data("v1.redb");
    let _ = std::fs::remove_file(&path);
    let ledger = Ledger::open(&path, config(WRITTEN_AT)).unwrap();
    let account = ledger
        .accounts()
        .by("golden")
        .create(NewAccount::new("Golden Corp").entitlements(["pro"]))
        .unwrap();
    ledger
        .routes()
        .set(
            RouteRule::new("/api/v1/")
                .permission("quickhits:create")
                .cost(2),
        )
        .unwrap();
    let key = ledger
        .keys()
        .by("golden")
        .create(
            NewKey::new(account.id, "golden key")
                .permissions(["quickhits:*"])
                .credits(100)
                .metadata("team", "infra"),
        )
        .unwrap();
    let pool = ledger
        .credits()
        .create_pool(NewPool::new(account.id, "shared").credits(50))
        .unwrap();
    ledger
        .keys()
        .create(
            NewKey::new(account.id, "pool key")
                .permissions(["*"])
                .pool(pool.id.to_string()),
        )
        .unwrap();
    let token = ledger
        .tokens()
        .create(NewKey::token(account.id, "service", "golden token").permissions(["*"]))
        .unwrap();
    let presented = Presented::new(key.plaintext.expose()).unwrap();
    let grant = ledger
        .verify(&Request::new(&presented, "/api/v1/quickhits/create").cost(7))
        .unwrap();
    let _ = grant.commit(7);
    ledger.close().unwrap();
    drop(ledger);
    std::fs::write(
        data("v1.plaintexts"),
        format!("{}\n{}\n", key.plaintext.expose(), token.plaintext.expose()),
    )
    .unwrap();
}

/// The secrets file's keys, in the order `write_golden_secrets_file` wrote them.
struct SecretsFile {
    /// Rolled away with an hour's grace (its hash is under pepper 1, the previous one).
    rolled_old: String,
    /// What the roll issued (pepper 1).
    rolled_new: String,
    /// Imported by its plain SHA-256.
    imported: String,
    /// Disabled.
    disabled: String,
    /// Created under pepper 1 before the rotation to pepper 2.
    previous_pepper: String,
}

fn secrets_file_plaintexts() -> SecretsFile {
    let text = std::fs::read_to_string(data("v1-secrets.plaintexts")).unwrap();
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let [rolled_old, rolled_new, imported, disabled, previous_pepper] =
        <[String; 5]>::try_from(lines).unwrap();
    SecretsFile {
        rolled_old,
        rolled_new,
        imported,
        disabled,
        previous_pepper,
    }
}

fn peek(ledger: &Ledger, plaintext: &str) -> Result<(), Denial> {
    let presented = Presented::new(plaintext).unwrap();
    ledger
        .verify(&Request::new(&presented, "/api/v1/quickhits/create").cost(0))
        .map(drop)
}

/// Every way the cache-miss path finds a key, on a file written by format version 1: the
/// secrets file has a rolled key in its grace period (both secrets under the previous
/// pepper), a key under the previous pepper, an imported SHA-256 key and a disabled key.
#[test]
fn a_version_1_file_with_rolled_imported_and_old_pepper_keys_verifies() {
    let (_dir, path) = copy_of("v1-secrets.redb");
    let keys = secrets_file_plaintexts();
    let clock = ManualClock::new(WRITTEN_AT.plus_secs(60));
    let config = || {
        Config::builder()
            .master_key(MasterKey::parse(MASTER_HEX).unwrap())
            .clock(clock.clone())
            .build()
            .unwrap()
    };
    let ledger = Ledger::open(&path, config()).unwrap();
    assert_eq!(
        ledger.hash_scheme(),
        HashScheme::HmacSha256 { pepper: 2 },
        "the file was rotated to pepper 2"
    );
    // The migration reserved the unused import's SHA-256 (format 5) and keyed its stored
    // digest (format 8): the key is found by its plaintext, and importing it again is
    // refused.
    let digest: [u8; 32] = Sha256::digest(keys.imported.as_bytes()).into();
    let owner = ledger.authenticate(&Presented::new(keys.imported.as_str()).unwrap());
    let owner = owner.unwrap().owner;
    let again = || ImportKey::new(owner, "again", ImportedHash::Sha256(digest), "vb_live_", "");
    assert!(matches!(
        ledger.keys().import(again()),
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        peek(&ledger, &keys.imported),
        Ok(()),
        "found by its plaintext"
    );
    assert!(matches!(
        ledger.keys().import(again()),
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        peek(&ledger, &keys.rolled_old),
        Ok(()),
        "in its grace period"
    );
    assert_eq!(peek(&ledger, &keys.rolled_new), Ok(()));
    assert_eq!(peek(&ledger, &keys.imported), Ok(()));
    assert_eq!(peek(&ledger, &keys.previous_pepper), Ok(()));
    assert_eq!(peek(&ledger, &keys.disabled), Err(Denial::Disabled));
    // Those found under an old scheme were rehashed: only the current scheme is left.
    let counts = ledger.hash_scheme_counts().unwrap();
    assert_eq!(
        counts,
        vec![(HashScheme::HmacSha256 { pepper: 2 }, 5)],
        "4 keys, one with a rolled secret"
    );
    // After a reopen (the rehashed records are read back from the file, not the cache).
    ledger.close().unwrap();
    drop(ledger);
    let ledger = Ledger::open(&path, config()).unwrap();
    for key in [
        &keys.rolled_old,
        &keys.rolled_new,
        &keys.imported,
        &keys.previous_pepper,
    ] {
        assert_eq!(peek(&ledger, key), Ok(()));
    }
    assert_eq!(peek(&ledger, &keys.disabled), Err(Denial::Disabled));
    // Past the grace period the rolled secret stops working; the new one does not.
    clock.set(WRITTEN_AT.plus_secs(7_200));
    ledger.close().unwrap();
    drop(ledger);
    let ledger = Ledger::open(&path, config()).unwrap();
    assert_eq!(peek(&ledger, &keys.rolled_old), Err(Denial::NotFound));
    assert_eq!(peek(&ledger, &keys.rolled_new), Ok(()));
    ledger.close().unwrap();
    drop(ledger);
    let report = Ledger::check(&path, config()).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// Writes `tests/data/v1-secrets.redb` and `tests/data/v1-secrets.plaintexts` (run at format
/// version 1, commit `b956879`).
#[test]
#[ignore = "writes a golden file"]
fn write_golden_secrets_file() {
    let path = data("v1-secrets.redb");
    let _ = std::fs::remove_file(&path);
    // A key issued elsewhere (another master key), to import by its SHA-256.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = Ledger::open(
        elsewhere.path().join("other.redb"),
        Config::builder()
            .master_key(MasterKey::from_bytes(&[7u8; 32]).unwrap())
            .build()
            .unwrap(),
    )
    .unwrap();
    let other_owner = other
        .accounts()
        .create(NewAccount::new("Elsewhere"))
        .unwrap();
    let foreign = other
        .keys()
        .create(NewKey::new(other_owner.id, "foreign key"))
        .unwrap();
    other.close().unwrap();
    drop(other);

    let ledger = Ledger::open(&path, config(WRITTEN_AT)).unwrap();
    let account = ledger
        .accounts()
        .by("golden")
        .create(NewAccount::new("Secrets Corp"))
        .unwrap();
    ledger
        .routes()
        .set(RouteRule::new("/api/v1/").permission("quickhits:create"))
        .unwrap();
    let key = |name: &str| {
        ledger
            .keys()
            .create(
                NewKey::new(account.id, name)
                    .permissions(["quickhits:*"])
                    .credits(100),
            )
            .unwrap()
    };
    let previous_pepper = key("previous pepper");
    let rolled = key("rolled");
    let rolled_new = ledger.keys().roll(&rolled.info.id, 3_600).unwrap();
    ledger
        .rotate_hash_scheme(HashScheme::HmacSha256 { pepper: 2 })
        .unwrap();
    let plain = foreign.plaintext.expose();
    ledger
        .keys()
        .import(
            ImportKey::new(
                account.id,
                "imported",
                ImportedHash::Sha256(Sha256::digest(plain.as_bytes()).into()),
                &plain[..12],
                &plain[plain.len() - 4..],
            )
            .permissions(["quickhits:*"]),
        )
        .unwrap();
    let disabled = key("disabled");
    ledger.keys().disable(&disabled.info.id).unwrap();
    ledger.close().unwrap();
    drop(ledger);
    std::fs::write(
        data("v1-secrets.plaintexts"),
        [
            rolled.plaintext.expose(),
            rolled_new.plaintext.expose(),
            plain,
            disabled.plaintext.expose(),
            previous_pepper.plaintext.expose(),
        ]
        .map(|p| format!("{p}\n"))
        .concat(),
    )
    .unwrap();
}

/// A power loss or a dead disk at any I/O point of the first open of a format-1 file (the
/// migrations to formats 2, 3, 4 and 5 are one transaction each) leaves a file that opens,
/// after a reboot, at format 1 to 5 — migrating then if needed — and every key still
/// verifies as before.
#[test]
fn a_crash_at_any_point_of_the_migration_leaves_a_file_that_opens_and_verifies() {
    use keyledger::fuzzing::{CrashBackend, CrashImage};
    let bytes = std::fs::read(data("v1-secrets.redb")).unwrap();
    let keys = secrets_file_plaintexts();
    let config = || config(WRITTEN_AT.plus_secs(60));
    let clean = CrashBackend::from_bytes(bytes.clone());
    let ledger = Ledger::open_with_backend(clean.clone(), config()).unwrap();
    let (writes, syncs) = clean.io_counts();
    ledger.close().unwrap();
    drop(ledger);
    let mut reopened = 0;
    let mut formats = [0u32; 8];
    for countdown in 0..writes + syncs + 2 {
        let backend = CrashBackend::from_bytes(bytes.clone());
        backend.fail_after(countdown);
        if let Ok(ledger) = Ledger::open_with_backend(backend.clone(), config()) {
            ledger.simulate_crash();
        }
        for image in [CrashImage::DurableOnly, CrashImage::Torn(countdown)] {
            let reboot = backend.power_loss(image);
            formats[format_of(&reboot) as usize - 1] += 1;
            let ledger = Ledger::open_with_backend(reboot.clone(), config())
                .unwrap_or_else(|e| panic!("countdown {countdown}, {image:?}: {e}"));
            for key in [&keys.rolled_old, &keys.rolled_new, &keys.imported] {
                assert_eq!(peek(&ledger, key), Ok(()), "countdown {countdown}");
            }
            assert_eq!(peek(&ledger, &keys.disabled), Err(Denial::Disabled));
            ledger.close().unwrap();
            drop(ledger);
            let report = Ledger::check_with_backend(reboot, config()).unwrap();
            assert!(
                report.is_ok(),
                "countdown {countdown}: {:?}",
                report.problems
            );
            reopened += 1;
        }
    }
    assert!(reopened >= 4, "{reopened} reboots");
    assert!(
        formats.iter().all(|&n| n > 0),
        "reboots found format 1 / 2 / 3 / 4 / 5 / 6 / 7 / 8 {formats:?} times: the crash points cover both \
         sides of each migration's commit"
    );
}

/// A format-1 file with one undecodable key record opens (the migration leaves that key
/// out of the new verify index instead of refusing the whole file, which also left `check`
/// refusing it as an older format: found by a reviewer); every other key verifies, and
/// `check` names the damaged one.
#[test]
fn a_format_1_file_with_one_damaged_key_record_opens_and_check_names_it() {
    const KEYS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("keys");
    let (_dir, path) = copy();
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut keys = txn.open_table(KEYS).unwrap();
            // The last key written: the token.
            let last = redb::ReadableTable::last(&keys).unwrap().unwrap().0.value();
            keys.insert(last, [1u8, 0xff, 0xff].as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let config = || config(WRITTEN_AT.plus_secs(86_400));
    let ledger = Ledger::open(&path, config()).unwrap();
    let (key, token) = plaintexts();
    assert!(ledger.authenticate(&Presented::new(&key).unwrap()).is_ok());
    let lost = ledger.authenticate(&Presented::new(&token).unwrap());
    assert_eq!(lost.unwrap_err().code(), "not_found");
    ledger.close().unwrap();
    drop(ledger);
    let report = Ledger::check(&path, config()).unwrap();
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert!(
        // The token's record: named by the kind its owner index entry gives.
        report.problems[0].starts_with("tok_") && report.problems[0].contains("corrupt"),
        "{:?}",
        report.problems
    );
}

/// The format version in the meta table of the file on `backend`.
fn format_of(backend: &keyledger::fuzzing::CrashBackend) -> u32 {
    let db = redb::Database::builder()
        .create_with_backend(backend.clone())
        .unwrap();
    let read = redb::ReadableDatabase::begin_read(&db).unwrap();
    let meta = read.open_table(META).unwrap();
    let format = meta.get("format").unwrap().unwrap();
    u32::from_le_bytes(format.value()[8..12].try_into().unwrap())
}

/// The vault's golden file: what `write_golden_vault_file` stored, read back the same way.
mod vault_file {
    /// A connector's access and refresh tokens (test data, not secrets).
    pub const ACCESS: &str = "ya29.golden-access-token";
    pub const REFRESH: &str = "1//golden-refresh-token";
    /// Owner secrets: name, value, allowed hosts.
    pub const OPENAI: (&str, &str, &[&str]) =
        ("OPENAI_KEY", "sk-golden-rotated", &["api.openai.com"]);
    pub const STRIPE: (&str, &str, &[&str]) = (
        "STRIPE_KEY",
        "sk_live_golden",
        &["api.stripe.com", "*.stripe.com"],
    );
}

/// Reads back everything `write_golden_vault_file` stored, through the public API.
fn assert_vault_file_reads_back(ledger: &Ledger) {
    use keyledger::Provider;
    use vault_file::*;
    let accounts = ledger.accounts().list(&PageRequest::first()).unwrap();
    let owner = &accounts.items[0].id;
    let drive = ledger.vault().get(owner, &Provider::GoogleDrive).unwrap();
    assert_eq!(drive.access_token.expose(), ACCESS);
    assert_eq!(drive.refresh_token.as_ref().unwrap().expose(), REFRESH);
    let secrets = ledger.secrets();
    for ((name, value, hosts), version) in [(OPENAI, 2), (STRIPE, 1)] {
        let info = secrets.info(owner, name).unwrap();
        let mut stored = hosts.to_vec();
        stored.sort_unstable(); // hosts are kept sorted
        assert_eq!(info.allowed_hosts, stored);
        assert_eq!(info.version, version);
        let url = format!("https://{}/v1", hosts[0]);
        let header = secrets.bearer(owner, name, &url).unwrap();
        assert_eq!(header.value.expose(), format!("Bearer {value}"));
        assert!(
            secrets
                .bearer(owner, name, "https://evil.example/")
                .is_err()
        );
    }
}

/// A format-2 file's owner secrets are re-sealed with their hosts and version bound when it
/// is opened (format 3): every value, host list and version reads back as written, the
/// connection too, and `check` finds nothing wrong.
#[test]
fn a_format_2_vault_reads_back_after_its_secrets_are_resealed() {
    let (_dir, path) = copy_of("v2-vault.redb");
    let before = std::fs::read(&path).unwrap();
    let ledger = Ledger::open(&path, config(WRITTEN_AT.plus_secs(60))).unwrap();
    assert_vault_file_reads_back(&ledger);
    ledger.close().unwrap();
    drop(ledger);
    let db = redb::Database::open(&path).unwrap();
    let read = redb::ReadableDatabase::begin_read(&db).unwrap();
    let format = read.open_table(META).unwrap();
    assert_eq!(
        format.get("format").unwrap().unwrap().value()[8..],
        8u32.to_le_bytes()
    );
    assert_every_record_is_sealed(&read);
    let secrets = read
        .open_table(redb::TableDefinition::<(u64, &str), &[u8]>::new(
            "vault_secrets",
        ))
        .unwrap();
    for row in redb::ReadableTable::iter(&secrets).unwrap() {
        let (key, value) = row.unwrap();
        assert_eq!(
            value.value()[0],
            0x80 | 2,
            "{:?} re-sealed at schema 2, with a checksum",
            key.value()
        );
        let sealed = &value.value()[value.value().len() - 20..value.value().len() - 4];
        assert!(!before.windows(16).any(|w| w == sealed), "a new ciphertext");
    }
    drop((secrets, format, read, db));
    let report = Ledger::check(&path, config(WRITTEN_AT)).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

/// A migrated file whose format number is lowered back to 2 (the number is not
/// authenticated: anyone who can write the file can change it) is refused, not migrated
/// again: the re-seal would bind whatever hosts an old row put back in it names (found by a
/// reviewer, who had a secret sent to a host of their choosing that way).
#[test]
fn a_file_whose_format_number_was_lowered_is_not_migrated_again() {
    let (_dir, path) = copy_of("v2-vault.redb");
    let config = || config(WRITTEN_AT.plus_secs(60));
    Ledger::open(&path, config()).unwrap().close().unwrap();
    let lower = |to: u32, drop_later_tables: bool| {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let stored = redb::ReadableTable::get(&meta, "format").unwrap().unwrap();
            let mut format = stored.value().to_vec();
            drop(stored);
            format[8..].copy_from_slice(&to.to_le_bytes());
            meta.insert("format", format.as_slice()).unwrap();
        }
        if drop_later_tables {
            for name in ["imported_hashes", "imports_by_key"] {
                let table: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new(name);
                txn.delete_table(table).unwrap();
            }
        }
        txn.commit().unwrap();
    };
    // Format 5's tables give it away; without them, the re-sealed rows do. Lowered to 1, it
    // is refused before the migration to 2 writes anything.
    for (to, drop_later_tables) in [(2, false), (2, true), (1, false)] {
        lower(to, drop_later_tables);
        let refused = Ledger::open(&path, config()).unwrap_err();
        assert!(matches!(refused, Error::Codec(_)), "{refused:?}");
        assert!(refused.to_string().contains("format number"), "{refused}");
        let bytes = std::fs::read(&path).unwrap();
        let format = format_of(&keyledger::fuzzing::CrashBackend::from_bytes(bytes));
        assert_eq!(format, to, "left as it was");
    }
}

/// A genuine format-2 file with a secret row damaged into another schema version still
/// opens: the row is left for `check` to report, as before, not taken for a lowered format.
#[test]
fn a_format_2_file_with_a_damaged_secret_row_still_opens() {
    let (_dir, path) = copy_of("v2-vault.redb");
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def = redb::TableDefinition::<(u64, &str), &[u8]>::new("vault_secrets");
            let mut secrets = txn.open_table(def).unwrap();
            let first = redb::ReadableTable::iter(&secrets)
                .unwrap()
                .next()
                .unwrap()
                .unwrap();
            let (owner, name) = first.0.value();
            let (owner, name) = (owner, name.to_owned());
            let mut row = first.1.value().to_vec();
            drop(first);
            for version in [7u8, 2] {
                row[0] = version;
                secrets
                    .insert((owner, name.as_str()), row.as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let ledger = Ledger::open(&path, config(WRITTEN_AT.plus_secs(60))).unwrap();
    ledger.close().unwrap();
}

/// A file migrated from before format 6 has no id salt, so the ids it gave out stay valid;
/// two such files with one master key therefore still share ids. There, an authentic key id
/// whose number is the other file's token names no balance (the twin-id guard).
#[test]
fn twin_migrated_files_share_ids_and_a_key_id_reaches_no_token_balance() {
    let (_a_dir, a_path) = copy_of("v2-vault.redb");
    let (_b_dir, b_path) = copy_of("v2-vault.redb");
    let config = || config(WRITTEN_AT.plus_secs(60));
    let (a, b) = (
        Ledger::open(&a_path, config()).unwrap(),
        Ledger::open(&b_path, config()).unwrap(),
    );
    let a_owner = a.accounts().create(NewAccount::new("a")).unwrap().id;
    let b_owner = b.accounts().create(NewAccount::new("b")).unwrap().id;
    assert_eq!(a_owner, b_owner, "no salt: the same number seals the same");
    let token = a
        .tokens()
        .create(NewKey::token(a_owner, "svc", "t").credits(10))
        .unwrap()
        .info
        .id;
    let key = b.keys().create(NewKey::new(b_owner, "k")).unwrap().info.id;
    for result in [
        a.credits().usage(&key).map(drop),
        a.credits().top_up(&key, 5).map(drop),
        a.credits().set(&key, 0).map(drop),
    ] {
        assert!(
            matches!(result, Err(Error::NotFound { what: "key" })),
            "{result:?}"
        );
    }
    assert_eq!(a.credits().usage(&token).unwrap().remaining, Some(10));
}

/// A power loss at any I/O point of the re-sealing migration (and the ones to formats 4 and 5
/// after it) leaves a file at format 2 to 5 that opens, migrating then if needed, with every
/// secret readable.
#[test]
fn a_crash_at_any_point_of_the_resealing_leaves_every_secret_readable() {
    use keyledger::fuzzing::{CrashBackend, CrashImage};
    let bytes = std::fs::read(data("v2-vault.redb")).unwrap();
    let config = || config(WRITTEN_AT.plus_secs(60));
    let clean = CrashBackend::from_bytes(bytes.clone());
    let ledger = Ledger::open_with_backend(clean.clone(), config()).unwrap();
    let (writes, syncs) = clean.io_counts();
    drop(ledger);
    let mut formats = [0u32; 8];
    for countdown in 0..writes + syncs + 2 {
        let backend = CrashBackend::from_bytes(bytes.clone());
        backend.fail_after(countdown);
        if let Ok(ledger) = Ledger::open_with_backend(backend.clone(), config()) {
            ledger.simulate_crash();
        }
        for image in [CrashImage::DurableOnly, CrashImage::Torn(countdown)] {
            let reboot = backend.power_loss(image);
            formats[format_of(&reboot) as usize - 1] += 1;
            let ledger = Ledger::open_with_backend(reboot, config())
                .unwrap_or_else(|e| panic!("countdown {countdown}, {image:?}: {e}"));
            assert_vault_file_reads_back(&ledger);
            ledger.simulate_crash();
        }
    }
    assert!(
        formats[1..].iter().all(|&n| n > 0),
        "reboots found format 2 / 3 / 4 / 5 / 6 / 7 / 8 {formats:?} times: both sides of each migration's commit"
    );
}

/// Writes `tests/data/v2-vault.redb` (run at format version 2, commit `a45171f`): one
/// account with a Google Drive connection and two owner secrets, one rotated once.
#[test]
#[ignore = "writes a golden file"]
fn write_golden_vault_file() {
    use keyledger::{OAuthGrant, Provider, Secret};
    use vault_file::*;
    let path = data("v2-vault.redb");
    let _ = std::fs::remove_file(&path);
    let ledger = Ledger::open(&path, config(WRITTEN_AT)).unwrap();
    let account = ledger
        .accounts()
        .by("golden")
        .create(NewAccount::new("Vault Corp"))
        .unwrap();
    ledger
        .vault()
        .connect(
            &account.id,
            &Provider::GoogleDrive,
            OAuthGrant::new(Secret::new(ACCESS))
                .refresh_token(Secret::new(REFRESH))
                .scopes(["openid"])
                .expires_in_secs(3600),
        )
        .unwrap();
    let secrets = ledger.secrets();
    let (name, value, hosts) = OPENAI;
    secrets
        .put(&account.id, name, Secret::new("sk-golden-first"), hosts)
        .unwrap();
    secrets
        .rotate(&account.id, name, Secret::new(value))
        .unwrap();
    let (name, value, hosts) = STRIPE;
    secrets
        .put(&account.id, name, Secret::new(value), hosts)
        .unwrap();
    ledger.close().unwrap();
}
