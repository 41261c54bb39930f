//! A database written by format version 1 (`tests/data/v1.redb`, with the plaintexts of its
//! key and token in `tests/data/v1.plaintexts`) still opens and reads back: accounts, keys,
//! tokens, a route, a pool, credits and the audit trail. A file whose format version is newer
//! than this build knows is refused with `UpgradeRequired`, not misread.
//!
//! Regenerate (only when the format version changes, keeping the old file as `vN.redb`):
//! `cargo test --test golden -- --ignored write_golden_file`.

use std::path::{Path, PathBuf};

use keyledger::{
    Config, Error, Ledger, ManualClock, MasterKey, NewAccount, NewKey, PageRequest, Presented,
    Request, RouteRule, Timestamp,
};

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
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.redb");
    std::fs::copy(data("v1.redb"), &path).unwrap();
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
    let pool = pooled.pool.clone().unwrap();
    assert_eq!(ledger.credits().usage(&pool).unwrap().remaining, Some(50));
    // The audit trail reads back.
    let audit = ledger.audit().recent(100).unwrap();
    assert!(audit.len() >= 6, "{audit:?}");
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
        }) => assert_eq!(supported, 1),
        other => panic!("expected UpgradeRequired {{ found: 99 }}, got {other:?}"),
    }
    // `check` refuses it the same way rather than reporting garbage.
    assert!(matches!(
        Ledger::check(&path, config(WRITTEN_AT)),
        Err(Error::UpgradeRequired { found: 99, .. })
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
            NewKey::new(&account.id, "golden key")
                .permissions(["quickhits:*"])
                .credits(100)
                .metadata("team", "infra"),
        )
        .unwrap();
    let pool = ledger
        .credits()
        .create_pool(&account.id, "shared", 50, None, None)
        .unwrap();
    ledger
        .keys()
        .create(
            NewKey::new(&account.id, "pool key")
                .permissions(["*"])
                .pool(pool.id.to_string()),
        )
        .unwrap();
    let token = ledger
        .tokens()
        .create(NewKey::token(&account.id, "service", "golden token").permissions(["*"]))
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
