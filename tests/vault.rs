//! End-to-end tests of the credentials vault, through the public API only (plus raw redb
//! access to the closed file, to move ciphertexts the way an attacker with the file would).

use std::time::Duration;

use keyledger::{
    Clock, CodecError, Config, ConnectionInfo, Error, Health, Ledger, ManualClock, MasterKey,
    NewAccount, OAuthGrant, OutboundRefusal, Provider, ProviderErrorKind, PublicId, Secret,
    Timestamp, normalize_provider_error,
};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

const START: Timestamp = Timestamp(1_750_000_000_000);
const CONNECTORS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("vault_connectors");
const SECRETS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("vault_secrets");

const ACCESS: &str = "ya29.ACCESS-known-plaintext-7f3a9c";
const REFRESH: &str = "1//REFRESH-known-plaintext-b81d2e";
const NOTION_TOKEN: &str = "secret_NOTION-known-plaintext-44c0";
const API_SECRET: &str = "sk_live_OWNER-known-plaintext-9e1f";

/// An [`Env`] whose ledger was closed: its directory, path, master key and clock.
type Closed = (
    tempfile::TempDir,
    std::path::PathBuf,
    MasterKey,
    ManualClock,
);

struct Env {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    master: MasterKey,
    clock: ManualClock,
    ledger: Ledger,
}

fn config(master: &MasterKey, clock: &ManualClock) -> Config {
    Config::builder()
        .master_key(master.clone())
        .clock(clock.clone())
        .build()
        .expect("config")
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.redb");
        let master = MasterKey::generate().expect("randomness");
        let clock = ManualClock::new(START);
        let ledger = Ledger::open(&path, config(&master, &clock)).expect("open");
        Env {
            _dir: dir,
            path,
            master,
            clock,
            ledger,
        }
    }

    fn account(&self, name: &str) -> PublicId {
        self.ledger
            .accounts()
            .create(NewAccount::new(name))
            .expect("account")
            .id
    }

    /// Closes the ledger and runs `Ledger::check` on the file.
    fn check(self) -> keyledger::CheckReport {
        self.close_and_check().0
    }

    /// Closes the ledger and runs `Ledger::check` on the file; gives back the report and
    /// the closed ledger's parts.
    fn close_and_check(self) -> (keyledger::CheckReport, Closed) {
        // `check` reads the route table, which a file without route rules may lack.
        let env = self.with_raw_file(|db| {
            let txn = db.begin_write().expect("write");
            txn.open_table(TableDefinition::<&str, &[u8]>::new("routes"))
                .expect("routes table");
            txn.commit().expect("commit");
        });
        let Env {
            ledger,
            path,
            master,
            clock,
            _dir,
        } = env;
        drop(ledger);
        let report = Ledger::check(&path, config(&master, &clock)).expect("check");
        (report, (_dir, path, master, clock))
    }

    /// Closes the ledger, runs `edit` on the raw redb file, and opens the ledger again.
    fn with_raw_file(self, edit: impl FnOnce(&redb::Database)) -> Env {
        let Env {
            _dir,
            path,
            master,
            clock,
            ledger,
        } = self;
        drop(ledger);
        {
            let db = redb::Database::open(&path).expect("raw open");
            edit(&db);
        }
        let ledger = Ledger::open(&path, config(&master, &clock)).expect("reopen");
        Env {
            _dir,
            path,
            master,
            clock,
            ledger,
        }
    }
}

fn google_grant() -> OAuthGrant {
    OAuthGrant::new(Secret::new(ACCESS))
        .refresh_token(Secret::new(REFRESH))
        .scopes(["https://www.googleapis.com/auth/drive.readonly", "openid"])
        .expires_in_secs(3600)
}

fn rows(
    db: &redb::Database,
    def: TableDefinition<(u64, &str), &[u8]>,
) -> Vec<(u64, String, Vec<u8>)> {
    let read = db.begin_read().expect("read");
    let table = read.open_table(def).expect("table");
    table
        .iter()
        .expect("iter")
        .map(|e| {
            let (k, v) = e.expect("row");
            let (o, n) = k.value();
            (o, n.to_owned(), v.value().to_vec())
        })
        .collect()
}

/// Writes a row as an attacker with the file would: a record's checksum (its version byte
/// flagged, a CRC-32 in its last four bytes) is a guard against damage, not a seal, so it is
/// taken again over the edited bytes.
fn write_row(
    db: &redb::Database,
    def: TableDefinition<(u64, &str), &[u8]>,
    key: (u64, &str),
    value: &[u8],
) {
    let mut value = value.to_vec();
    if value.len() > 4 && value[0] & 0x80 != 0 {
        let body = value.len() - 4;
        let crc = crc32fast::hash(&value[..body]);
        value[body..].copy_from_slice(&crc.to_le_bytes());
    }
    let txn = db.begin_write().expect("write");
    txn.open_table(def)
        .expect("table")
        .insert(key, value.as_slice())
        .expect("insert");
    txn.commit().expect("commit");
}

#[track_caller]
/// Writes `value` as it is, checksum and all: damage, not an edit.
fn write_raw(
    db: &redb::Database,
    def: TableDefinition<(u64, &str), &[u8]>,
    key: (u64, &str),
    value: &[u8],
) {
    let txn = db.begin_write().expect("write");
    txn.open_table(def)
        .expect("table")
        .insert(key, value)
        .expect("insert");
    txn.commit().expect("commit");
}

/// Damages every row of `def` one way or another, in row order: a flipped byte (the
/// checksum fails), a truncated payload under a valid checksum, and a newer schema version.
fn damage_rows(db: &redb::Database, def: TableDefinition<(u64, &str), &[u8]>) -> Vec<String> {
    let mut kinds = Vec::new();
    for (i, (owner, name, mut bytes)) in rows(db, def).into_iter().enumerate() {
        match i % 3 {
            0 => {
                let middle = bytes.len() / 2;
                bytes[middle] ^= 0x40;
                write_raw(db, def, (owner, &name), &bytes);
                kinds.push("fails its checksum".to_owned());
            }
            1 => {
                bytes.truncate(bytes.len() / 2);
                write_row(db, def, (owner, &name), &bytes);
                kinds.push("record is corrupt".to_owned());
            }
            _ => {
                bytes[0] = 0x80 | 0x7f;
                write_row(db, def, (owner, &name), &bytes);
                kinds.push("schema version 127".to_owned());
            }
        }
    }
    kinds
}

/// `check`'s report names every damaged row, and says of each damage what it was.
fn assert_names_each(
    report: &keyledger::CheckReport,
    rows: impl Iterator<Item = String>,
    kinds: &[String],
) {
    let problems = &report.problems;
    for row in rows {
        let named = problems.iter().any(|p| p.starts_with(&row));
        assert!(named, "check names {row}: {problems:?}");
    }
    for kind in kinds {
        let said = problems.iter().any(|p| p.contains(kind.as_str()));
        assert!(said, "{kind:?} in {problems:?}");
    }
}

impl Env {
    /// Closes the ledger, runs `Ledger::check` on the file, and opens the ledger again.
    fn check_and_reopen(self) -> (keyledger::CheckReport, Env) {
        let (report, (_dir, path, master, clock)) = self.close_and_check();
        let ledger = Ledger::open(&path, config(&master, &clock)).expect("reopen");
        let env = Env {
            _dir,
            path,
            master,
            clock,
            ledger,
        };
        (report, env)
    }
}

fn assert_decryption_failed<T: std::fmt::Debug>(result: Result<T, Error>) {
    match result {
        Err(e @ Error::DecryptionFailed { .. }) => {
            let msg = e.to_string();
            for plain in [ACCESS, REFRESH, NOTION_TOKEN, API_SECRET] {
                assert!(!msg.contains(plain));
            }
        }
        other => panic!("expected DecryptionFailed, got {other:?}"),
    }
}

#[test]
fn round_trip_per_provider_survives_reopen() {
    let env = Env::new();
    let owner = env.account("Acme");
    let dropbox: Provider = "dropbox".parse().unwrap();
    let vault = env.ledger.vault().by("alice");
    let info = vault
        .connect(&owner, &Provider::GoogleDrive, google_grant())
        .unwrap();
    assert_eq!(info.health, Health::Healthy);
    assert_eq!(info.expires_at, Some(START.plus_secs(3600)));
    assert!(info.has_refresh_token);
    assert_eq!(info.connected_by, "alice");
    vault
        .connect(
            &owner,
            &Provider::Notion,
            OAuthGrant::new(Secret::new(NOTION_TOKEN)),
        )
        .unwrap();
    vault
        .connect(
            &owner,
            &dropbox,
            OAuthGrant::new(Secret::new("dbx-token")).expires_at(START.plus_secs(60)),
        )
        .unwrap();

    let env = env.with_raw_file(|_| {});
    let vault = env.ledger.vault();
    let g = vault.get(&owner, &Provider::GoogleDrive).unwrap();
    assert_eq!(g.access_token.expose(), ACCESS);
    assert_eq!(g.refresh_token.as_ref().map(Secret::expose), Some(REFRESH));
    assert_eq!(
        g.info.scopes,
        ["https://www.googleapis.com/auth/drive.readonly", "openid"]
    );
    let n = vault.get(&owner, &Provider::Notion).unwrap();
    assert_eq!(n.access_token.expose(), NOTION_TOKEN);
    assert!(n.refresh_token.is_none() && n.info.expires_at.is_none());
    assert_eq!(n.info.health, Health::Healthy);
    let d = vault
        .get(&owner, &Provider::Other("dropbox".into()))
        .unwrap();
    assert_eq!(d.access_token.expose(), "dbx-token");
    assert_eq!(
        d.info.health,
        Health::RefreshDue,
        "expires within 5 minutes"
    );

    let listed: Vec<String> = vault
        .list(&owner)
        .unwrap()
        .iter()
        .map(|c| c.provider.to_string())
        .collect();
    assert_eq!(listed, ["dropbox", "google_drive", "notion"]);

    // Reconnecting replaces the grant.
    vault
        .connect(
            &owner,
            &Provider::Notion,
            OAuthGrant::new(Secret::new("second")),
        )
        .unwrap();
    assert_eq!(
        vault
            .get(&owner, &Provider::Notion)
            .unwrap()
            .access_token
            .expose(),
        "second"
    );
    let report = env.check();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn owners_are_isolated_and_must_exist() {
    let env = Env::new();
    let a = env.account("A");
    let b = env.account("B");
    let vault = env.ledger.vault();
    vault
        .connect(&a, &Provider::GoogleDrive, google_grant())
        .unwrap();
    assert!(matches!(
        vault.get(&b, &Provider::GoogleDrive),
        Err(Error::NotFound { what: "connector" })
    ));
    assert!(vault.list(&b).unwrap().is_empty());
    assert!(matches!(
        vault.disconnect(&b, &Provider::GoogleDrive),
        Err(Error::NotFound { what: "connector" })
    ));
    assert!(matches!(
        vault.get("acct_forged", &Provider::Notion),
        Err(Error::InvalidId(_))
    ));
    // A key id is not an owner id.
    let key = env
        .ledger
        .keys()
        .create(keyledger::NewKey::new(a, "k"))
        .unwrap();
    assert!(matches!(vault.list(&key.info.id), Err(Error::InvalidId(_))));

    // An account id of another ledger with the same master key: sealed apart, so invalid here.
    let other = {
        let dir = tempfile::tempdir().unwrap();
        let ledger =
            Ledger::open(dir.path().join("o.redb"), config(&env.master, &env.clock)).unwrap();
        let mut last = None;
        for i in 0..6 {
            last = Some(
                ledger
                    .accounts()
                    .create(NewAccount::new(format!("x{i}")))
                    .unwrap()
                    .id,
            );
        }
        last.unwrap()
    };
    assert!(matches!(
        vault.connect(&other, &Provider::Notion, google_grant()),
        Err(Error::InvalidId(_))
    ));
    assert!(matches!(
        env.ledger.secrets().list(&other),
        Err(Error::InvalidId(_))
    ));
}

/// A row's ciphertext copied over another owner's or another provider's row does not open
/// there (it is bound to its owner and name), `check` names each such row, and each can be
/// replaced or removed as a row that cannot be read: nothing of it kept, audited
/// `unreadable` (found by the forty-seventh session: `put` kept the moved row's version and
/// creation).
#[test]
fn ciphertext_moved_between_owners_or_providers_fails_to_decrypt() {
    let env = Env::new();
    let a = env.account("A");
    let b = env.account("B");
    let vault = env.ledger.vault();
    vault
        .connect(&a, &Provider::GoogleDrive, google_grant())
        .unwrap();
    vault
        .connect(
            &a,
            &Provider::Notion,
            OAuthGrant::new(Secret::new(NOTION_TOKEN)),
        )
        .unwrap();
    vault
        .connect(
            &b,
            &Provider::GoogleDrive,
            OAuthGrant::new(Secret::new("b-token")),
        )
        .unwrap();
    let secrets = env.ledger.secrets();
    secrets
        .put(&a, "STRIPE", Secret::new(API_SECRET), ["api.stripe.com"])
        .unwrap();
    secrets
        .put(&b, "STRIPE", Secret::new("b-secret"), ["api.stripe.com"])
        .unwrap();
    secrets
        .put(&a, "OTHER", Secret::new("a-other"), ["api.stripe.com"])
        .unwrap();

    let env = env.with_raw_file(|db| {
        let conn = rows(db, CONNECTORS);
        let owners: Vec<u64> = {
            let mut o: Vec<u64> = conn.iter().map(|r| r.0).collect();
            o.dedup();
            o
        };
        let (a_id, b_id) = (owners[0], owners[1]);
        let a_google = conn
            .iter()
            .find(|r| r.0 == a_id && r.1 == "google_drive")
            .unwrap()
            .2
            .clone();
        // A's Google grant copied over B's, and over A's Notion row.
        write_row(db, CONNECTORS, (b_id, "google_drive"), &a_google);
        write_row(db, CONNECTORS, (a_id, "notion"), &a_google);
        let secs = rows(db, SECRETS);
        let a_stripe = secs
            .iter()
            .find(|r| r.0 == a_id && r.1 == "STRIPE")
            .unwrap()
            .2
            .clone();
        write_row(db, SECRETS, (b_id, "STRIPE"), &a_stripe);
        write_row(db, SECRETS, (a_id, "OTHER"), &a_stripe);
    });
    let vault = env.ledger.vault();
    assert_decryption_failed(vault.get(&b, &Provider::GoogleDrive));
    assert_decryption_failed(vault.get(&a, &Provider::Notion));
    assert_eq!(
        vault
            .get(&a, &Provider::GoogleDrive)
            .unwrap()
            .access_token
            .expose(),
        ACCESS,
        "the original row still opens"
    );
    let url = "https://api.stripe.com/v1/charges";
    let secrets = env.ledger.secrets();
    assert_decryption_failed(secrets.bearer(&b, "STRIPE", url));
    assert_decryption_failed(secrets.bearer(&a, "OTHER", url));
    assert_eq!(
        secrets.bearer(&a, "STRIPE", url).unwrap().value.expose(),
        format!("Bearer {API_SECRET}")
    );
    // A refresh that must keep the stored refresh token cannot launder a moved row either.
    assert_decryption_failed(vault.record_refresh(
        &connection(&vault, &b, &Provider::GoogleDrive),
        OAuthGrant::new(Secret::new("new")),
    ));
    // `check` reports the moved rows, naming rows, never values.
    drop((vault, secrets));
    let (report, env) = env.check_and_reopen();
    assert_eq!(report.problems.len(), 4, "{:?}", report.problems);
    let text = format!("{report:?}");
    for plain in [ACCESS, REFRESH, NOTION_TOKEN, API_SECRET] {
        assert!(!text.contains(plain));
    }

    // Each can be replaced or removed, as a row that cannot be read: nothing of it is kept
    // (its version, hosts and metadata are what was moved), and the audit event says so.
    let (vault, secrets) = (env.ledger.vault(), env.ledger.secrets());
    let last = |env: &Env| env.ledger.audit().recent(1).unwrap().remove(0);
    let put = secrets.put(&b, "STRIPE", Secret::new(NEW_SECRET), ["api.stripe.com"]);
    assert_eq!(
        put.unwrap().version,
        1,
        "a new secret, not A's next version"
    );
    assert_eq!(last(&env).fields, ["value", "allowed_hosts", "unreadable"]);
    assert_eq!(
        secrets.bearer(&b, "STRIPE", url).unwrap().value.expose(),
        format!("Bearer {NEW_SECRET}")
    );
    secrets.delete(&a, "OTHER").unwrap();
    assert_eq!(last(&env).fields, ["unreadable"]);
    vault
        .connect(&b, &Provider::GoogleDrive, google_grant())
        .unwrap();
    assert_eq!(
        last(&env).fields,
        [
            "access_token",
            "refresh_token",
            "scopes",
            "expires_at",
            "unreadable"
        ]
    );
    let removed = vault.disconnect(&a, &Provider::Notion).unwrap();
    assert_eq!(removed.info, None, "moved metadata is not reported as A's");
    assert_eq!(last(&env).fields, ["unreadable"]);
    // Rows that open are replaced and removed as before: nothing `unreadable`.
    let put = secrets.put(&a, "STRIPE", Secret::new(NEW_SECRET), ["api.stripe.com"]);
    assert_eq!(put.unwrap().version, 2);
    assert_eq!(last(&env).fields, ["value"]);
    let removed = vault.disconnect(&a, &Provider::GoogleDrive).unwrap();
    assert!(removed.info.is_some());
    assert!(last(&env).fields.is_empty());
    drop((vault, secrets));
    assert!(env.check().is_ok(), "nothing unreadable is left");
}

#[test]
fn refresh_scheduling_follows_the_clock() {
    let env = Env::new();
    let (a, b, c) = (env.account("A"), env.account("B"), env.account("C"));
    let vault = env.ledger.vault().by("refresher");
    vault
        .connect(&a, &Provider::GoogleDrive, google_grant())
        .unwrap(); // expires +3600
    vault
        .connect(
            &b,
            &Provider::Notion,
            OAuthGrant::new(Secret::new(NOTION_TOKEN))
                .refresh_token(Secret::new("notion-refresh"))
                .expires_in_secs(600),
        )
        .unwrap();
    // No refresh token: cannot be refreshed, so never listed.
    vault
        .connect(
            &c,
            &Provider::Notion,
            OAuthGrant::new(Secret::new("x")).expires_in_secs(10),
        )
        .unwrap();
    // No expiry: never listed.
    vault
        .connect(
            &c,
            &Provider::GoogleDrive,
            OAuthGrant::new(Secret::new("y")).refresh_token(Secret::new("z")),
        )
        .unwrap();
    let skew = Duration::from_secs(300);
    let due = |env: &Env| vault.due_for_refresh(env.clock.now(), skew).unwrap();
    assert!(due(&env).is_empty());

    env.clock.advance_secs(400); // B expires in 200 s
    let list = due(&env);
    assert_eq!(list.len(), 1);
    assert_eq!((&list[0].owner, &list[0].provider), (&b, &Provider::Notion));
    assert_eq!(list[0].expires_at, START.plus_secs(600));
    assert_eq!(list[0].health, Health::RefreshDue);
    assert!(!format!("{list:?}").contains(NOTION_TOKEN));
    assert_eq!(
        vault.get(&b, &Provider::Notion).unwrap().info.health,
        Health::RefreshDue
    );
    assert_eq!(
        vault.get(&a, &Provider::GoogleDrive).unwrap().info.health,
        Health::Healthy
    );

    // The refresher refreshes B; the provider did not rotate the refresh token.
    let refreshed = vault
        .record_refresh(
            &connection(&vault, &b, &Provider::Notion),
            OAuthGrant::new(Secret::new("notion-access-2")).expires_in_secs(3600),
        )
        .unwrap();
    assert_eq!(refreshed.health, Health::Healthy);
    assert_eq!(refreshed.last_refreshed_at, Some(env.clock.now()));
    let got = vault.get(&b, &Provider::Notion).unwrap();
    assert_eq!(got.access_token.expose(), "notion-access-2");
    assert_eq!(
        got.refresh_token.unwrap().expose(),
        "notion-refresh",
        "kept"
    );
    assert!(due(&env).is_empty());

    // Past A's expiry, with the skew: A is due, soonest first before B.
    env.clock.advance_secs(3600 - 400 - 100);
    let list = due(&env);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].owner, a);
    // Later still, both; ordered by expiry.
    let later = env.clock.now().plus_secs(4000);
    let both = vault.due_for_refresh(later, skew).unwrap();
    assert_eq!(both.iter().map(|d| d.owner).collect::<Vec<_>>(), [a, b]);

    // A refresh attempt fails with a rate limit: still listed, as refresh_failed.
    let err = normalize_provider_error(&Provider::GoogleDrive, 429, r#"{"error":"rate"}"#);
    assert_eq!(err.kind, ProviderErrorKind::RateLimited);
    let info = vault
        .mark_unhealthy(
            &vault.get(&a, &Provider::GoogleDrive).unwrap().info,
            err.kind,
        )
        .unwrap();
    assert_eq!(
        (info.health, info.health_reason),
        (Health::RefreshFailed, Some(ProviderErrorKind::RateLimited))
    );
    assert_eq!(due(&env)[0].health, Health::RefreshFailed);

    // Then the grant is revoked: no longer listed, refresh refused, reconnect heals.
    let err = normalize_provider_error(&Provider::GoogleDrive, 400, r#"{"error":"invalid_grant"}"#);
    assert_eq!(err.kind, ProviderErrorKind::Revoked);
    vault
        .mark_unhealthy(
            &vault.get(&a, &Provider::GoogleDrive).unwrap().info,
            err.kind,
        )
        .unwrap();
    assert!(due(&env).is_empty());
    assert_eq!(
        vault.get(&a, &Provider::GoogleDrive).unwrap().info.health,
        Health::Revoked
    );
    assert!(matches!(
        vault.record_refresh(
            &connection(&vault, &a, &Provider::GoogleDrive),
            OAuthGrant::new(Secret::new("n"))
        ),
        Err(Error::Conflict(_))
    ));
    let info = vault
        .connect(&a, &Provider::GoogleDrive, google_grant())
        .unwrap();
    assert_eq!((info.health, info.health_reason), (Health::Healthy, None));

    // A rotated refresh token and new scopes are stored.
    vault
        .record_refresh(
            &connection(&vault, &a, &Provider::GoogleDrive),
            OAuthGrant::new(Secret::new("a2"))
                .refresh_token(Secret::new("r2"))
                .scopes(["openid"]),
        )
        .unwrap();
    let got = vault.get(&a, &Provider::GoogleDrive).unwrap();
    assert_eq!(got.refresh_token.unwrap().expose(), "r2");
    assert_eq!(got.info.scopes, ["openid"]);
    assert_eq!(got.info.expires_at, None);

    let actions: Vec<String> = env
        .ledger
        .audit()
        .since(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.actor == "refresher")
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        [
            "connector.connected",
            "connector.connected",
            "connector.connected",
            "connector.connected",
            "connector.refreshed",
            "connector.marked_unhealthy",
            "connector.marked_unhealthy",
            "connector.connected",
            "connector.refreshed",
        ]
    );
}

#[test]
fn disconnect_removes_and_is_audited() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault().by("ops");
    vault
        .connect(
            &a,
            &Provider::Notion,
            OAuthGrant::new(Secret::new(NOTION_TOKEN)),
        )
        .unwrap();
    let removed = vault.disconnect(&a, &Provider::Notion).unwrap();
    assert_eq!((&removed.owner, &removed.provider), (&a, &Provider::Notion));
    let info = removed.info.expect("a readable row's metadata");
    assert_eq!(info.provider, Provider::Notion);
    assert!(matches!(
        vault.get(&a, &Provider::Notion),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        vault.disconnect(&a, &Provider::Notion),
        Err(Error::NotFound { .. })
    ));
    let last = &env.ledger.audit().recent(1).unwrap()[0];
    assert_eq!(last.action, "connector.disconnected");
    assert_eq!(last.target, format!("{a}/connectors/notion"));
    assert_eq!(last.actor, "ops");
    assert!(last.fields.is_empty(), "{last:?}");
}

/// A connector row that does not decode — damaged (its checksum fails, or its payload is cut
/// short under a valid one) or written by a newer schema — fails its owner's `list` and
/// `get`, and `check` names it; `disconnect` removes it all the same, audited as unreadable
/// (found by a reviewer: it decoded the removed row and its error aborted the removal).
#[test]
fn a_connector_row_that_does_not_decode_can_be_disconnected() {
    let env = Env::new();
    let (a, b) = (env.account("A"), env.account("B"));
    let providers = [
        Provider::GoogleDrive,
        Provider::Notion,
        Provider::Other("dropbox".into()),
    ];
    for provider in &providers {
        env.ledger
            .vault()
            .connect(&a, provider, google_grant())
            .unwrap();
    }
    env.ledger
        .vault()
        .connect(&b, &Provider::Notion, google_grant())
        .unwrap();
    let mut kinds = Vec::new();
    let env = env.with_raw_file(|db| {
        let owner_a = rows(db, CONNECTORS)
            .into_iter()
            .find(|(_, name, _)| name == "dropbox")
            .unwrap()
            .0;
        // A's three rows, one damage each; B's is put back whole.
        let kept: Vec<_> = rows(db, CONNECTORS)
            .into_iter()
            .filter(|(owner, _, _)| *owner != owner_a)
            .collect();
        kinds = damage_rows(db, CONNECTORS);
        for (owner, name, bytes) in kept {
            write_raw(db, CONNECTORS, (owner, &name), &bytes);
        }
    });
    let (report, env) = env.check_and_reopen();
    let rows = providers
        .iter()
        .map(|p| format!("{a}/connectors/{}", p.as_str()));
    assert_names_each(&report, rows, &kinds);
    let vault = env.ledger.vault().by("ops");
    assert!(matches!(vault.list(&a), Err(Error::Codec(_))));
    assert!(matches!(
        vault.get(&a, &Provider::Notion),
        Err(Error::Codec(_))
    ));
    for provider in &providers {
        let removed = vault.disconnect(&a, provider).unwrap();
        assert_eq!((&removed.owner, &removed.provider), (&a, provider));
        assert_eq!(removed.info, None, "{provider:?}");
        let last = &env.ledger.audit().recent(1).unwrap()[0];
        assert_eq!(last.action, "connector.disconnected");
        assert_eq!(last.target, format!("{a}/connectors/{}", provider.as_str()));
        assert_eq!(
            (last.actor.as_str(), &last.fields[..]),
            ("ops", &["unreadable".to_owned()][..])
        );
        assert!(matches!(
            vault.disconnect(&a, provider),
            Err(Error::NotFound { what: "connector" })
        ));
    }
    assert!(vault.list(&a).unwrap().is_empty());
    assert_eq!(vault.list(&b).unwrap().len(), 1, "B's row is untouched");
    assert!(env.check().is_ok(), "nothing unreadable is left");
}

/// The same for an owner secret: `delete` removes a row that does not decode (it never
/// decoded what it removes; this keeps it so).
#[test]
fn a_secret_row_that_does_not_decode_can_be_deleted() {
    let env = Env::new();
    let a = env.account("A");
    let names = ["ALPHA", "BETA", "GAMMA"];
    for name in names {
        env.ledger
            .secrets()
            .put(&a, name, Secret::new(API_SECRET), ["api.stripe.com"])
            .unwrap();
    }
    let mut kinds = Vec::new();
    let env = env.with_raw_file(|db| kinds = damage_rows(db, SECRETS));
    let (report, env) = env.check_and_reopen();
    let rows = names.iter().map(|name| format!("{a}/secrets/{name}"));
    assert_names_each(&report, rows, &kinds);
    let secrets = env.ledger.secrets().by("ops");
    assert!(matches!(secrets.list(&a), Err(Error::Codec(_))));
    for name in names {
        secrets.delete(&a, name).unwrap();
        let last = &env.ledger.audit().recent(1).unwrap()[0];
        assert_eq!(last.action, "secret.deleted");
        assert_eq!(last.target, format!("{a}/secrets/{name}"));
        assert_eq!(
            last.fields,
            ["unreadable"],
            "told from an ordinary deletion"
        );
    }
    assert!(secrets.list(&a).unwrap().is_empty());
    assert!(env.check().is_ok(), "nothing unreadable is left");
}

/// A stored row: owner's internal id, name, bytes.
type Row = (u64, String, Vec<u8>);

/// Damages, as [`damage_rows`] does, every row of `def` of the owner of the row named
/// `owners` (a name no other owner has) but the one named `kept`; the other rows are written
/// back whole. Returns every row as it was stored before the damage, and the name of each
/// damaged row with the kind of damage done to it, in row order.
fn damage_owner_rows_but(
    db: &redb::Database,
    def: TableDefinition<(u64, &str), &[u8]>,
    owners: &str,
    kept: &str,
) -> (Vec<Row>, Vec<(String, String)>) {
    let stored = rows(db, def);
    let owner = stored.iter().find(|(_, name, _)| name == owners).unwrap().0;
    let kinds = damage_rows(db, def);
    let mut damaged = Vec::new();
    for ((row_owner, name, bytes), kind) in stored.iter().zip(kinds) {
        if *row_owner != owner || name == kept {
            write_raw(db, def, (*row_owner, name), bytes);
        } else {
            damaged.push((name.clone(), kind));
        }
    }
    (stored, damaged)
}

/// `message` (an error's `Display` and `Debug`) holds no known plaintext and no run of any
/// stored row's bytes, in hex or as a list of numbers: nothing of a ciphertext.
#[track_caller]
fn assert_holds_nothing_stored(message: &str, stored: &[Row]) {
    for plain in [ACCESS, REFRESH, NOTION_TOKEN, API_SECRET, NEW_SECRET] {
        assert!(!message.contains(plain), "{message}");
    }
    for (_, _, bytes) in stored {
        for run in bytes.windows(6) {
            let hex: String = run.iter().map(|b| format!("{b:02x}")).collect();
            let numbers = format!("{run:?}");
            let numbers = numbers.trim_matches(['[', ']']);
            assert!(!message.to_lowercase().contains(&hex), "{message}");
            assert!(!message.contains(numbers), "{message}");
        }
    }
}

const NEW_SECRET: &str = "sk_live_REPLACEMENT-known-plaintext-3d7b";

/// A damaged owner-secret row (a bad checksum, a truncated payload, a newer schema) fails its
/// owner's `list` with an error that names it — and holds nothing of its bytes — so the
/// operator knows what to remove or replace; `put` replaces it (a value replaces everything
/// the row held), as a new secret, audited `unreadable`. The owner's other rows, and another
/// owner's row of the same name, are untouched (found by the forty-sixth session: the list's
/// error did not say which row, and a put over the row failed on its decoding).
#[test]
fn a_damaged_secret_row_is_named_by_its_owners_list_and_put_replaces_it() {
    let env = Env::new();
    let (a, b) = (env.account("A"), env.account("B"));
    let names = ["ALPHA", "BETA", "GAMMA"];
    for name in names.iter().chain(&["KEPT"]) {
        env.ledger
            .secrets()
            .put(&a, name, Secret::new(API_SECRET), ["api.stripe.com"])
            .unwrap();
    }
    let kept = env
        .ledger
        .secrets()
        .rotate(&a, "KEPT", Secret::new(API_SECRET))
        .unwrap();
    env.ledger
        .secrets()
        .put(&b, "ALPHA", Secret::new(API_SECRET), ["api.stripe.com"])
        .unwrap();
    let owner_b = env.ledger.secrets().info(&b, "ALPHA").unwrap();
    let (mut stored, mut damaged) = (Vec::new(), Vec::new());
    let env = env.with_raw_file(|db| {
        (stored, damaged) = damage_owner_rows_but(db, SECRETS, "BETA", "KEPT");
    });
    let damaged_names: Vec<&str> = damaged.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(damaged_names, names);

    env.clock.advance_secs(60);
    let now = env.clock.now();
    let secrets = env.ledger.secrets().by("ops");
    for (name, (_, kind)) in names.iter().zip(&damaged) {
        // The list stops at the first damaged row left, in name order, and names it.
        let err = secrets.list(&a).unwrap_err();
        let row = format!("{a}/secrets/{name}");
        assert_names_damaged_row(&err, &row, kind, "`secrets().delete`", &stored);
        // So does every call on the row that needs what it held.
        for err in [
            secrets.info(&a, name).map(drop),
            secrets.rotate(&a, name, Secret::new(NEW_SECRET)).map(drop),
            secrets
                .bearer(&a, name, "https://api.stripe.com/v1")
                .map(drop),
        ] {
            let err = err.unwrap_err();
            assert_names_damaged_row(&err, &row, kind, "`secrets().delete`", &stored);
        }

        let info = secrets
            .put(&a, name, Secret::new(NEW_SECRET), ["api.openai.com"])
            .unwrap();
        assert_eq!(
            (info.version, info.created_at, info.created_by.as_str()),
            (1, now, "ops"),
            "nothing of the old row is read: a new secret"
        );
        assert_eq!((info.updated_at, info.rotated_at), (now, None));
        assert_eq!(info.allowed_hosts, ["api.openai.com"]);
        let last = &env.ledger.audit().recent(1).unwrap()[0];
        assert_eq!(last.action, "secret.replaced");
        assert_eq!(last.target, format!("{a}/secrets/{name}"));
        assert_eq!(last.fields, ["value", "allowed_hosts", "unreadable"]);
        let header = secrets
            .bearer(&a, name, "https://api.openai.com/v1/models")
            .unwrap();
        assert_eq!(header.value.expose(), format!("Bearer {NEW_SECRET}"));
    }
    let listed: Vec<_> = secrets.list(&a).unwrap();
    let listed_names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(listed_names, ["ALPHA", "BETA", "GAMMA", "KEPT"]);
    assert_eq!(listed[3], kept, "A's undamaged row is untouched");
    let header = secrets
        .bearer(&a, "KEPT", "https://api.stripe.com/v1")
        .unwrap();
    assert_eq!(header.value.expose(), format!("Bearer {API_SECRET}"));
    assert_eq!(secrets.list(&b).unwrap(), [owner_b], "B's row is untouched");
    let header = secrets
        .bearer(&b, "ALPHA", "https://api.stripe.com/v1")
        .unwrap();
    assert_eq!(header.value.expose(), format!("Bearer {API_SECRET}"));

    // A readable row replaced is an ordinary replacement again: nothing `unreadable`.
    let info = secrets
        .put(&a, "ALPHA", Secret::new(API_SECRET), ["api.openai.com"])
        .unwrap();
    assert_eq!((info.version, info.created_at), (2, now));
    let last = &env.ledger.audit().recent(1).unwrap()[0];
    assert_eq!(
        (last.action.as_str(), &last.fields[..]),
        ("secret.replaced", &["value".to_owned()][..])
    );
    assert!(env.check().is_ok(), "nothing unreadable is left");
}

/// `err`, a listing's, names the damaged row `row` and what is wrong with it (`kind`, a
/// damage of `damage_rows`) with `remedy`, and holds nothing of what `stored` rows held.
fn assert_names_damaged_row(err: &Error, row: &str, kind: &str, remedy: &str, stored: &[Row]) {
    let Error::Codec(CodecError::Row { row: named, .. }) = err else {
        panic!("{err:?}");
    };
    assert_eq!(named, row);
    let message = err.to_string();
    assert!(message.contains(&format!("{row}: ")), "{message}");
    assert!(message.contains(kind), "{kind:?} in {message}");
    // A newer schema is not called damage (written by a newer release, perhaps).
    let newer = kind.contains("schema version");
    assert_eq!(message.contains("upgrade keyledger"), newer, "{message}");
    assert_eq!(message.contains("corrupt database"), !newer, "{message}");
    assert!(message.contains(remedy), "{message}");
    assert_holds_nothing_stored(&format!("{message} {err:?}"), stored);
}

/// The same for a connector row: its owner's `list` fails naming it, and `connect` (which
/// never read the row it replaces) stores the new grant over it, its audit event naming
/// `unreadable` as well, to tell it from an ordinary reconnect.
#[test]
fn a_damaged_connector_row_is_named_by_its_owners_list_and_connect_replaces_it() {
    let env = Env::new();
    let (a, b) = (env.account("A"), env.account("B"));
    let providers = [
        Provider::Other("dropbox".into()),
        Provider::GoogleDrive,
        Provider::Notion,
    ];
    let kept_provider = Provider::Other("zoom".into());
    let mut connected = Vec::new();
    for provider in providers.iter().chain([&kept_provider]) {
        let info = env.ledger.vault().connect(&a, provider, google_grant());
        connected.push(info.unwrap());
    }
    let kept = connection(&env.ledger.vault(), &a, &kept_provider);
    let owner_b = env
        .ledger
        .vault()
        .connect(&b, &Provider::Notion, google_grant())
        .unwrap();
    let (mut stored, mut damaged) = (Vec::new(), Vec::new());
    let env = env.with_raw_file(|db| {
        (stored, damaged) = damage_owner_rows_but(db, CONNECTORS, "dropbox", "zoom");
    });
    let damaged_names: Vec<&str> = damaged.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(damaged_names, ["dropbox", "google_drive", "notion"]);

    let vault = env.ledger.vault().by("ops");
    for ((provider, (_, kind)), info) in providers.iter().zip(&damaged).zip(&connected) {
        let err = vault.list(&a).unwrap_err();
        let row = format!("{a}/connectors/{}", provider.as_str());
        assert_names_damaged_row(&err, &row, kind, "`vault().disconnect`", &stored);
        // So does every call on the row that needs what it held.
        let refreshed = OAuthGrant::new(Secret::new(NEW_SECRET));
        for err in [
            vault.get(&a, provider).map(drop),
            vault.record_refresh(info, refreshed).map(drop),
            vault
                .mark_unhealthy(info, ProviderErrorKind::Revoked)
                .map(drop),
        ] {
            let err = err.unwrap_err();
            assert_names_damaged_row(&err, &row, kind, "`vault().disconnect`", &stored);
        }

        let grant = OAuthGrant::new(Secret::new(NEW_SECRET)).scopes(["files.read"]);
        let info = vault.connect(&a, provider, grant).unwrap();
        assert_eq!(
            (info.scopes.as_slice(), info.has_refresh_token),
            (&["files.read".to_owned()][..], false)
        );
        let last = &env.ledger.audit().recent(1).unwrap()[0];
        assert_eq!(last.action, "connector.connected");
        assert_eq!(last.target, format!("{a}/connectors/{}", provider.as_str()));
        assert_eq!(
            last.fields,
            ["access_token", "scopes", "expires_at", "unreadable"]
        );
        let got = vault.get(&a, provider).unwrap();
        assert_eq!(got.access_token.expose(), NEW_SECRET);
        assert_eq!(got.refresh_token, None);
    }
    let listed = vault.list(&a).unwrap();
    assert_eq!(listed.len(), 4);
    assert_eq!(listed[3], kept, "A's undamaged row is untouched");
    let got = vault.get(&a, &kept_provider).unwrap();
    assert_eq!(got.access_token.expose(), ACCESS);
    assert_eq!(vault.list(&b).unwrap(), [owner_b], "B's row is untouched");
    assert_eq!(
        vault
            .get(&b, &Provider::Notion)
            .unwrap()
            .access_token
            .expose(),
        ACCESS
    );

    // A readable row replaced is an ordinary reconnect again: nothing `unreadable`.
    vault
        .connect(&a, &Provider::Notion, google_grant())
        .unwrap();
    let last = &env.ledger.audit().recent(1).unwrap()[0];
    assert_eq!(
        last.fields,
        ["access_token", "refresh_token", "scopes", "expires_at"]
    );
    assert!(env.check().is_ok(), "nothing unreadable is left");
}

/// A connector change names only what it changed, and one that changes nothing records
/// nothing — though a refused actor is refused all the same (found by a reviewer: a refresh
/// named an unchanged expiry and health, a second `revoked` mark was a second event, and a
/// stale mark by an actor every other change refuses answered `Ok`).
#[test]
fn connector_changes_name_only_what_changed_and_no_change_records_nothing() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault().by("refresher");
    let grant = OAuthGrant::new(Secret::new(NOTION_TOKEN)).refresh_token(Secret::new(REFRESH));
    let first = vault.connect(&a, &Provider::Notion, grant).unwrap();
    let events = || env.ledger.audit().recent(usize::MAX).unwrap().len();
    let newest_fields = || env.ledger.audit().recent(1).unwrap().remove(0).fields;

    // Healthy, no expiry before and after: only the token changed.
    let refreshed = vault
        .record_refresh(&first, OAuthGrant::new(Secret::new("tok2")))
        .unwrap();
    assert_eq!(newest_fields(), ["access_token"]);
    let revoked = ProviderErrorKind::Revoked;
    vault.mark_unhealthy(&refreshed, revoked).unwrap();
    assert_eq!(newest_fields(), ["health"]);
    let before = events();
    let again = vault.mark_unhealthy(&refreshed, revoked).unwrap();
    assert_eq!((again.health, events()), (Health::Revoked, before));

    // A stale mark (the grant was replaced since) changes nothing, but a refused actor is
    // refused before that is known.
    vault
        .connect(&a, &Provider::Notion, OAuthGrant::new(Secret::new("t3")))
        .unwrap();
    let forged = env.ledger.vault().by("line\nforged");
    let refused = forged.mark_unhealthy(&refreshed, revoked);
    assert!(
        matches!(refused, Err(Error::InvalidInput { field: "actor", .. })),
        "{refused:?}"
    );
    let stale = vault.mark_unhealthy(&refreshed, revoked).unwrap();
    assert_eq!(stale.health, Health::Healthy);

    // A refresh of a connection marked failed heals it: named.
    let current = connection(&vault, &a, &Provider::Notion);
    let failed = vault
        .mark_unhealthy(&current, ProviderErrorKind::RateLimited)
        .unwrap();
    let healed = OAuthGrant::new(Secret::new("t4")).expires_in_secs(60);
    vault.record_refresh(&failed, healed).unwrap();
    assert_eq!(newest_fields(), ["access_token", "expires_at", "health"]);
}

#[test]
fn providers_are_validated_with_typo_suggestions() {
    let env = Env::new();
    let a = env.account("A");
    for typo in [
        "Notion",
        "google-drive",
        "googledrive",
        "notoin",
        "google_drvie",
    ] {
        let err = typo.parse::<Provider>().unwrap_err();
        assert!(err.to_string().contains("did you mean"), "{typo}: {err}");
    }
    for bad in ["", "Drop Box", "x".repeat(33).as_str(), "dröpbox"] {
        assert!(matches!(
            bad.parse::<Provider>(),
            Err(Error::InvalidInput {
                field: "provider",
                ..
            })
        ));
    }
    let vault = env.ledger.vault();
    assert!(matches!(
        vault.connect(&a, &Provider::Other("Notion".into()), google_grant()),
        Err(Error::InvalidInput {
            field: "provider",
            ..
        })
    ));
    // `Other("notion")` is the built-in, not a second provider.
    vault
        .connect(&a, &Provider::Other("notion".into()), google_grant())
        .unwrap();
    assert_eq!(vault.list(&a).unwrap()[0].provider, Provider::Notion);
    assert_eq!(
        vault
            .get(&a, &Provider::Notion)
            .unwrap()
            .access_token
            .expose(),
        ACCESS
    );
}

#[test]
fn grants_are_validated_without_echoing_values() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault();
    let cases = [
        (OAuthGrant::new(Secret::new("")), "access_token"),
        (
            OAuthGrant::new(Secret::new(format!("{ACCESS}\nInjected: 1"))),
            "access_token",
        ),
        (
            OAuthGrant::new(Secret::new("x".repeat(20_000))),
            "access_token",
        ),
        (
            OAuthGrant::new(Secret::new("ok")).refresh_token(Secret::new(format!("{REFRESH} x"))),
            "refresh_token",
        ),
        (
            OAuthGrant::new(Secret::new("ok")).scopes(["has space"]),
            "scopes",
        ),
        (OAuthGrant::new(Secret::new("ok")).scopes([""]), "scopes"),
        // Listed like a name, so refused where a name is: a bidirectional override or a
        // line separator reorders what a terminal shows after it (found by a reviewer).
        (
            OAuthGrant::new(Secret::new("ok")).scopes(["drive\u{202E}exe.txt"]),
            "scopes",
        ),
        (
            OAuthGrant::new(Secret::new("ok")).scopes(["x\u{2066}y"]),
            "scopes",
        ),
        (
            OAuthGrant::new(Secret::new("ok")).scopes(["a\u{2028}b"]),
            "scopes",
        ),
    ];
    for (grant, field) in cases {
        match vault.connect(&a, &Provider::Notion, grant) {
            Err(e @ Error::InvalidInput { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(field), "{msg}");
                assert!(!msg.contains(ACCESS) && !msg.contains(REFRESH), "{msg}");
            }
            other => panic!("expected InvalidInput for {field}, got {other:?}"),
        }
    }
    assert!(vault.list(&a).unwrap().is_empty(), "nothing was written");
}

fn refused_host<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::Refused(
            OutboundRefusal::HostNotAllowed { host, .. }
            | OutboundRefusal::InsecureScheme { host, .. }
            | OutboundRefusal::UserInfo { host, .. },
        )) => host,
        other => panic!("expected a refusal naming a host, got {other:?}"),
    }
}

#[test]
fn secrets_are_attached_only_for_allowed_hosts() {
    let env = Env::new();
    let a = env.account("A");
    let secrets = env.ledger.secrets();
    let info = secrets
        .put(
            &a,
            "API_KEY",
            Secret::new(API_SECRET),
            [
                "API.Allowed.com",
                "*.example.org",
                "localhost:8080",
                "bücher.example",
                "ports.test:8443",
            ],
        )
        .unwrap();
    assert_eq!(
        info.allowed_hosts,
        [
            "*.example.org",
            "api.allowed.com",
            "localhost:8080",
            "ports.test:8443",
            "xn--bcher-kva.example"
        ]
    );
    // An exact pattern stays exact: a `*` spelled `%2a` is no host, and no wildcard either.
    let encoded = secrets.put(&a, "OTHER", Secret::new(API_SECRET), ["%2a.example.com"]);
    assert!(
        matches!(
            &encoded,
            Err(Error::InvalidInput {
                field: "allowed_hosts",
                ..
            })
        ),
        "{encoded:?}"
    );
    let ok = |url: &str| {
        let h = secrets
            .bearer(&a, "API_KEY", url)
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(h.name, "Authorization");
        assert_eq!(h.value.expose(), format!("Bearer {API_SECRET}"));
        h.url
    };
    // The header carries the url as the check read it, for the request to go to.
    assert_eq!(
        ok("https://api.allowed.com/v1/x?y=1"),
        "https://api.allowed.com/v1/x?y=1"
    );
    assert_eq!(
        ok("https://API.ALLOWED.COM/v1"),
        "https://api.allowed.com/v1"
    );
    assert_eq!(
        ok("https://api.allowed.com:443/"),
        "https://api.allowed.com/"
    );
    ok("https://a.example.org/");
    ok("https://deep.a.example.org/");
    assert_eq!(
        ok("https://BÜCHER.example/"),
        "https://xn--bcher-kva.example/"
    );
    ok("https://xn--bcher-kva.example/");
    assert_eq!(
        ok("http://localhost:8080/hook"),
        "http://localhost:8080/hook"
    );
    ok("https://ports.test:8443/");

    let refuse = |url: &str, host: &str| {
        let got = refused_host(secrets.bearer(&a, "API_KEY", url));
        assert_eq!(got, host, "{url}");
    };
    refuse("https://evil.com/", "evil.com");
    refuse("https://allowed.com/", "allowed.com");
    refuse("https://api.allowed.com@evil.com/", "evil.com");
    refuse("https://api.allowed.com:pw@evil.com/", "evil.com");
    refuse("https://user@api.allowed.com/", "api.allowed.com"); // user info itself refused
    refuse("https://example.org/", "example.org"); // `*.` does not match the apex
    refuse("https://a.example.org.evil.com/", "a.example.org.evil.com");
    refuse(
        "https://api.allowed.com.evil.com/",
        "api.allowed.com.evil.com",
    );
    refuse("http://api.allowed.com/", "api.allowed.com");
    refuse("http://a.example.org/", "a.example.org");
    refuse("https://api.allowed.com:8443/", "api.allowed.com:8443");
    refuse("https://localhost/", "localhost");
    refuse("http://localhost:9090/", "localhost:9090");
    refuse("https://ports.test/", "ports.test");
    refuse("https://bucher.example/", "bucher.example");
    refuse("ftp://api.allowed.com/", "api.allowed.com");
    for unusable in [
        "not a url",
        "/relative",
        "https://api.allowed.com\\@evil.com/",
        "https://",
    ] {
        assert!(
            matches!(
                secrets.bearer(&a, "API_KEY", unusable),
                Err(Error::Refused(OutboundRefusal::InvalidUrl { .. }))
            ),
            "{unusable}"
        );
    }
    // Refusal messages name the host and the secret's name, never its value.
    let err = secrets
        .bearer(&a, "API_KEY", "https://evil.com/")
        .unwrap_err()
        .to_string();
    assert!(err.contains("evil.com") && err.contains("API_KEY"), "{err}");
    assert!(!err.contains(API_SECRET));

    // Loopback over http is allowed only when listed.
    secrets
        .put(
            &a,
            "LOCAL",
            Secret::new("local-secret"),
            ["127.0.0.1:3000", "[::1]"],
        )
        .unwrap();
    assert!(
        secrets
            .bearer(&a, "LOCAL", "http://127.0.0.1:3000/")
            .is_ok()
    );
    assert!(secrets.bearer(&a, "LOCAL", "http://[::1]/").is_ok());
    assert_eq!(
        refused_host(secrets.bearer(&a, "LOCAL", "http://127.0.0.2:3000/")),
        "127.0.0.2:3000"
    );
}

/// `count` CJK ideographs then `.com`: 3 bytes a character as written, more as punycode.
fn cjk_host(count: u32) -> String {
    let label: String = (0..count)
        .map(|i| char::from_u32(0x4E00 + (i * 359) % 0x5000).expect("a CJK ideograph"))
        .collect();
    format!("{label}.com")
}

#[test]
fn an_allowed_host_is_listed_only_if_it_is_honoured() {
    let env = Env::new();
    let a = env.account("A");
    let secrets = env.ledger.secrets();
    // 298 bytes as written, 336 as punycode: it was stored, listed, then never matched
    // (every attach parses the stored form again under the 300-byte cap; found by a
    // reviewer).
    let long = cjk_host(98);
    assert!(long.len() <= 300);
    match secrets.put(&a, "IDN", Secret::new(API_SECRET), [long.as_str()]) {
        Err(Error::InvalidInput {
            field: "allowed_hosts",
            reason,
        }) => assert!(reason.contains("normal form"), "{reason}"),
        other => panic!("expected the pattern refused, got {other:?}"),
    }
    // One that fits as punycode is honoured, and what is listed can be put back.
    let host = cjk_host(40);
    let info = secrets
        .put(&a, "IDN", Secret::new(API_SECRET), [host.as_str()])
        .expect("put");
    assert!(info.allowed_hosts[0].starts_with("xn--"));
    let header = secrets
        .bearer(&a, "IDN", &format!("https://{host}/v1"))
        .expect("the listed host is honoured");
    assert_eq!(header.url, format!("https://{}/v1", info.allowed_hosts[0]));
    secrets
        .put(&a, "IDN", Secret::new(API_SECRET), &info.allowed_hosts)
        .expect("the listed hosts are accepted back");
}

#[test]
fn header_and_query_forms_redact() {
    let env = Env::new();
    let a = env.account("A");
    let secrets = env.ledger.secrets();
    secrets
        .put(
            &a,
            "maps.key",
            Secret::new(API_SECRET),
            ["maps.example.com"],
        )
        .unwrap();
    let h = secrets
        .header(&a, "maps.key", "X-Api-Key", "https://maps.example.com/v1")
        .unwrap();
    assert_eq!(
        (h.name.as_str(), h.value.expose()),
        ("X-Api-Key", API_SECRET)
    );
    assert_eq!(h.to_string(), "X-Api-Key: Secret(***)");
    assert!(!format!("{h:?}").contains(API_SECRET));
    assert!(matches!(
        secrets.header(&a, "maps.key", "Bad Header", "https://maps.example.com/"),
        Err(Error::InvalidInput {
            field: "header_name",
            ..
        })
    ));

    let u = secrets
        .query(
            &a,
            "maps.key",
            "key",
            "https://maps.example.com/geocode?address=Paris#top",
        )
        .unwrap();
    let exposed = url::Url::parse(u.expose()).unwrap();
    let pairs: Vec<(String, String)> = exposed.query_pairs().into_owned().collect();
    assert_eq!(
        pairs,
        [
            ("address".into(), "Paris".into()),
            ("key".into(), API_SECRET.into())
        ]
    );
    assert_eq!(
        u.redacted(),
        "https://maps.example.com/geocode?address=Paris&key=***#top"
    );
    assert_eq!(u.to_string(), u.redacted());
    assert!(!format!("{u:?}").contains(API_SECRET));
    assert!(matches!(
        secrets.query(
            &a,
            "maps.key",
            "address",
            "https://maps.example.com/?address=x"
        ),
        Err(Error::InvalidInput { field: "param", .. })
    ));
    assert!(matches!(
        secrets.query(&a, "maps.key", "key", "https://evil.com/"),
        Err(Error::Refused(OutboundRefusal::HostNotAllowed { .. }))
    ));
}

#[test]
fn secret_lifecycle_put_rotate_list_delete() {
    let env = Env::new();
    let a = env.account("A");
    let b = env.account("B");
    let secrets = env.ledger.secrets().by("admin");
    let url = "https://api.openai.com/v1/chat";
    let first = secrets
        .put(&a, "OPENAI", Secret::new("v1"), ["api.openai.com"])
        .unwrap();
    assert_eq!((first.version, first.rotated_at), (1, None));
    env.clock.advance_secs(60);
    let rotated = secrets.rotate(&a, "OPENAI", Secret::new("v2")).unwrap();
    assert_eq!(rotated.version, 2);
    assert_eq!(rotated.rotated_at, Some(env.clock.now()));
    assert_eq!(rotated.allowed_hosts, ["api.openai.com"]);
    assert_eq!(rotated.created_at, START);
    assert_eq!(
        secrets.bearer(&a, "OPENAI", url).unwrap().value.expose(),
        "Bearer v2"
    );
    // Put replaces value and hosts.
    let replaced = secrets
        .put(&a, "OPENAI", Secret::new("v3"), ["*.openai.com"])
        .unwrap();
    assert_eq!(
        (replaced.version, replaced.allowed_hosts.clone()),
        (3, vec!["*.openai.com".to_owned()])
    );
    secrets
        .put(&a, "ANTHROPIC", Secret::new("w"), ["api.anthropic.com"])
        .unwrap();
    let names: Vec<String> = secrets
        .list(&a)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["ANTHROPIC", "OPENAI"]);
    assert!(secrets.list(&b).unwrap().is_empty());
    assert!(matches!(
        secrets.bearer(&b, "OPENAI", url),
        Err(Error::NotFound { what: "secret" })
    ));
    assert!(matches!(
        secrets.rotate(&b, "OPENAI", Secret::new("x")),
        Err(Error::NotFound { .. })
    ));
    assert_eq!(secrets.info(&a, "OPENAI").unwrap().version, 3);
    secrets.delete(&a, "OPENAI").unwrap();
    assert!(matches!(
        secrets.delete(&a, "OPENAI"),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        secrets.bearer(&a, "OPENAI", url),
        Err(Error::NotFound { .. })
    ));

    let actions: Vec<(String, String)> = env
        .ledger
        .audit()
        .since(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.actor == "admin")
        .map(|e| (e.action, e.target))
        .collect();
    let t = |n: &str| format!("{a}/secrets/{n}");
    assert_eq!(
        actions,
        [
            ("secret.created".into(), t("OPENAI")),
            ("secret.rotated".into(), t("OPENAI")),
            ("secret.replaced".into(), t("OPENAI")),
            ("secret.created".into(), t("ANTHROPIC")),
            ("secret.deleted".into(), t("OPENAI")),
        ]
    );

    // Validation: names, values, hosts.
    let bad = |r: Result<keyledger::SecretInfo, Error>, field: &str| match r {
        Err(Error::InvalidInput { field: f, .. }) => assert_eq!(f, field),
        other => panic!("expected InvalidInput {field}, got {other:?}"),
    };
    bad(secrets.put(&a, "", Secret::new("x"), ["a.com"]), "name");
    bad(
        secrets.put(&a, "has space", Secret::new("x"), ["a.com"]),
        "name",
    );
    bad(secrets.put(&a, "N", Secret::new(""), ["a.com"]), "value");
    bad(
        secrets.put(&a, "N", Secret::new("a\r\nX-Evil: 1"), ["a.com"]),
        "value",
    );
    bad(
        secrets.put(&a, "N", Secret::new("x"), Vec::<String>::new()),
        "allowed_hosts",
    );
    for pattern in [
        "*",
        "*.com",
        "https://a.com",
        "a.com/path",
        "user@a.com",
        "a.*.com",
    ] {
        bad(
            secrets.put(&a, "N", Secret::new("x"), [pattern]),
            "allowed_hosts",
        );
    }
}

#[test]
fn a_secret_replaced_names_its_hosts_only_when_they_changed() {
    let env = Env::new();
    let a = env.account("A");
    let secrets = env.ledger.secrets().by("admin");
    for (value, hosts) in [
        ("v1", "api.openai.com"),
        ("v2", "api.openai.com"),
        ("v3", "*.openai.com"),
    ] {
        secrets
            .put(&a, "OPENAI", Secret::new(value), [hosts])
            .unwrap();
    }
    let fields: Vec<(String, Vec<String>)> = env
        .ledger
        .audit()
        .since(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.actor == "admin")
        .map(|e| (e.action, e.fields))
        .collect();
    let both = vec!["value".to_owned(), "allowed_hosts".to_owned()];
    assert_eq!(
        fields,
        [
            ("secret.created".to_owned(), both.clone()),
            ("secret.replaced".to_owned(), vec!["value".to_owned()]),
            ("secret.replaced".to_owned(), both),
        ]
    );
}

#[test]
fn plaintexts_never_leak_to_file_debug_errors_or_audit() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault();
    let secrets = env.ledger.secrets();
    let mut shown: Vec<String> = Vec::new();
    let mut show = |s: String| shown.push(s);

    let info = vault
        .connect(&a, &Provider::GoogleDrive, google_grant())
        .unwrap();
    show(format!("{info:?}"));
    show(serde_json::to_string(&info).unwrap());
    let info = vault
        .connect(
            &a,
            &Provider::Notion,
            OAuthGrant::new(Secret::new(NOTION_TOKEN)).refresh_token(Secret::new(REFRESH)),
        )
        .unwrap();
    show(format!("{info:?}"));
    show(format!("{:?}", google_grant()));
    let conn = vault.get(&a, &Provider::GoogleDrive).unwrap();
    show(format!("{conn:?}"));
    show(format!(
        "{} {}",
        conn.access_token,
        conn.refresh_token.as_ref().unwrap()
    ));
    show(format!("{:?}", vault.list(&a).unwrap()));
    show(serde_json::to_string(&vault.list(&a).unwrap()).unwrap());
    env.clock.advance_secs(3500);
    show(format!(
        "{:?}",
        vault
            .due_for_refresh(env.clock.now(), Duration::from_secs(300))
            .unwrap()
    ));
    show(format!(
        "{:?}",
        vault
            .record_refresh(
                &connection(&vault, &a, &Provider::GoogleDrive),
                OAuthGrant::new(Secret::new(format!("{ACCESS}-2"))).expires_in_secs(60)
            )
            .unwrap()
    ));
    show(format!(
        "{:?}",
        vault
            .mark_unhealthy(
                &vault.get(&a, &Provider::Notion).unwrap().info,
                ProviderErrorKind::AuthExpired
            )
            .unwrap()
    ));

    let s = secrets
        .put(&a, "KEY", Secret::new(API_SECRET), ["api.example.com"])
        .unwrap();
    show(format!("{s:?}"));
    show(serde_json::to_string(&secrets.list(&a).unwrap()).unwrap());
    let h = secrets
        .bearer(&a, "KEY", "https://api.example.com/")
        .unwrap();
    show(format!("{h:?} {h}"));
    let h = secrets
        .header(&a, "KEY", "X-Key", "https://api.example.com/")
        .unwrap();
    show(format!("{h:?} {h}"));
    let u = secrets
        .query(&a, "KEY", "k", "https://api.example.com/")
        .unwrap();
    show(format!("{u:?} {u} {}", u.redacted()));
    show(format!(
        "{:?}",
        secrets
            .rotate(&a, "KEY", Secret::new(format!("{API_SECRET}-2")))
            .unwrap()
    ));

    // Errors of every kind the vault returns.
    let errors: Vec<Error> = vec![
        secrets.bearer(&a, "KEY", "https://evil.com/").unwrap_err(),
        secrets
            .bearer(&a, "KEY", &format!("https://{API_SECRET}@evil.com/"))
            .unwrap_err(),
        secrets
            .bearer(
                &a,
                "KEY",
                &format!("https://x@api.example.com/?q={API_SECRET}"),
            )
            .unwrap_err(),
        secrets
            .bearer(&a, "KEY", &format!("http://api.example.com/{API_SECRET}"))
            .unwrap_err(),
        secrets
            .bearer(&a, "KEY", &format!("{API_SECRET} not a url"))
            .unwrap_err(),
        secrets
            .bearer(
                &a,
                "KEY",
                &format!("https://api.example.com:99999/{API_SECRET}"),
            )
            .unwrap_err(),
        secrets
            .put(&a, "N", Secret::new(format!("{API_SECRET}\n")), ["a.com"])
            .unwrap_err(),
        secrets
            .put(
                &a,
                "N",
                Secret::new(API_SECRET),
                [format!("{API_SECRET}.com/x")],
            )
            .unwrap_err(),
        vault
            .connect(
                &a,
                &Provider::Notion,
                OAuthGrant::new(Secret::new(format!("{ACCESS} {REFRESH}"))),
            )
            .unwrap_err(),
        vault.get(&a, &Provider::Other(ACCESS.into())).unwrap_err(),
        vault
            .get(&a, &Provider::Other(NOTION_TOKEN.into()))
            .unwrap_err(),
    ];
    for e in &errors {
        show(format!("{e} {e:?}"));
    }
    let pe = normalize_provider_error(
        &Provider::GoogleDrive,
        401,
        &format!(r#"{{"error":"invalid_token","token":"{ACCESS}"}}"#),
    );
    show(format!("{pe} {pe:?}"));

    let audit = env.ledger.audit().since(0, 1000).unwrap();
    assert!(audit.len() >= 7);
    show(format!("{audit:?}"));

    let plaintexts = [ACCESS, REFRESH, NOTION_TOKEN, API_SECRET];
    for text in &shown {
        for p in plaintexts {
            assert!(!text.contains(p), "`{p}` leaked in: {text}");
        }
    }

    let Env {
        ledger, path, _dir, ..
    } = env;
    drop(ledger);
    let bytes = std::fs::read(&path).unwrap();
    for p in plaintexts {
        assert!(
            !bytes.windows(p.len()).any(|w| w == p.as_bytes()),
            "`{p}` found in the raw database file"
        );
    }
}

/// Someone who can write the file but has no master key cannot send a secret elsewhere by
/// widening its hosts, nor pass an older value off as the current version: both fields are
/// sealed with the value, so a record changed beside its ciphertext fails to open.
#[test]
fn a_secrets_hosts_and_version_cannot_be_changed_beside_its_ciphertext() {
    const HOST: &[u8] = b"api.example.com";
    let env = Env::new();
    let a = env.account("A");
    let put = env.ledger.secrets();
    put.put(&a, "API_KEY", Secret::new("sk-first"), ["api.example.com"])
        .unwrap();
    put.rotate(&a, "API_KEY", Secret::new("sk-second")).unwrap();
    let mut second = Vec::new();
    let env = env.with_raw_file(|db| second = rows(db, SECRETS).remove(0).2);
    env.ledger
        .secrets()
        .rotate(&a, "API_KEY", Secret::new(API_SECRET))
        .unwrap();
    let mut third = (0, String::new(), Vec::new());
    let env = env.with_raw_file(|db| third = rows(db, SECRETS).remove(0));
    let (owner, name, current) = third;
    let at = current.windows(HOST.len()).position(|w| w == HOST).unwrap();
    let bearer = |env: &Env, url: &str| env.ledger.secrets().bearer(&a, "API_KEY", url);
    let sent = bearer(&env, "https://api.example.com/").unwrap();
    assert_eq!(sent.value.expose(), format!("Bearer {API_SECRET}"));

    // The second value, its record claiming the third version (the byte after the hosts).
    assert_eq!(second[at + HOST.len()], 2, "the version follows the hosts");
    let mut rolled_back = second.clone();
    rolled_back[at + HOST.len()] = 3;
    let env = env.with_raw_file(|db| write_row(db, SECRETS, (owner, &name), &rolled_back));
    assert_decryption_failed(bearer(&env, "https://api.example.com/"));

    // The current value, its hosts widened to another host.
    let mut widened = current.clone();
    widened[at..at + HOST.len()].copy_from_slice(b"evi.example.com");
    let env = env.with_raw_file(|db| write_row(db, SECRETS, (owner, &name), &widened));
    assert_eq!(
        env.ledger
            .secrets()
            .info(&a, "API_KEY")
            .unwrap()
            .allowed_hosts,
        ["evi.example.com"]
    );
    assert_decryption_failed(bearer(&env, "https://evi.example.com/"));
    // Nor does a rotation (the owner, seeing the secret fail) seal a new value to the
    // widened hosts: it opens the old value first (found by a reviewer: the new value went
    // to the edited host).
    let rotated = env
        .ledger
        .secrets()
        .rotate(&a, "API_KEY", Secret::new("sk-fourth"));
    assert_decryption_failed(rotated);
    assert_decryption_failed(bearer(&env, "https://evi.example.com/"));
    let report = env.check();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("secrets/API_KEY")),
        "{:?}",
        report.problems
    );
}

/// Of two refreshers of one grant, the loser's `invalid_grant` (it presented the refresh
/// token the winner spent) stored first does not throw away the winner's result, the only
/// live grant (found by a reviewer: the owner had to connect again). A refresh begun from
/// the revoked view is still refused.
#[test]
fn a_spent_refresh_tokens_failure_stored_first_does_not_drop_the_winners_grant() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault();
    vault
        .connect(&a, &Provider::Notion, google_grant())
        .unwrap();
    let first = vault.get(&a, &Provider::Notion).unwrap();
    let second = vault.get(&a, &Provider::Notion).unwrap();
    let refused = normalize_provider_error(&Provider::Notion, 400, r#"{"error":"invalid_grant"}"#);
    vault.mark_unhealthy(&second.info, refused.kind).unwrap();
    let rotated = OAuthGrant::new(Secret::new("access-2"))
        .refresh_token(Secret::new("refresh-2"))
        .expires_in_secs(3_600);
    let stored = vault.record_refresh(&first.info, rotated).unwrap();
    assert_eq!(stored.health, Health::Healthy);
    let now = vault.get(&a, &Provider::Notion).unwrap();
    assert_eq!(now.refresh_token.unwrap().expose(), "refresh-2");
    let revoked = vault
        .mark_unhealthy(&now.info, ProviderErrorKind::Revoked)
        .unwrap();
    let late = OAuthGrant::new(Secret::new("access-3"));
    assert!(matches!(
        vault.record_refresh(&revoked, late),
        Err(Error::Conflict(_))
    ));
}

/// The stored connection's metadata (no tokens), as a refresher reads it before a refresh.
fn connection(vault: &keyledger::Vault<'_>, owner: &str, provider: &Provider) -> ConnectionInfo {
    vault
        .list(owner)
        .unwrap()
        .into_iter()
        .find(|c| &c.provider == provider)
        .expect("connected")
}

#[test]
fn a_revoked_connection_stays_revoked_until_the_owner_connects_again() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault();
    vault
        .connect(&a, &Provider::GoogleDrive, google_grant())
        .unwrap();
    vault
        .mark_unhealthy(
            &vault.get(&a, &Provider::GoogleDrive).unwrap().info,
            ProviderErrorKind::Revoked,
        )
        .unwrap();
    let audit_before = env.ledger.audit().recent(100).unwrap().len();
    // A call made before the revocation fails late, for another reason.
    let info = vault
        .mark_unhealthy(
            &vault.get(&a, &Provider::GoogleDrive).unwrap().info,
            ProviderErrorKind::RateLimited,
        )
        .unwrap();
    assert_eq!(info.health, Health::Revoked);
    assert_eq!(
        env.ledger.audit().recent(100).unwrap().len(),
        audit_before,
        "nothing changed, nothing written"
    );
    let later = env.clock.now().plus_secs(7_200);
    assert!(
        vault
            .due_for_refresh(later, Duration::ZERO)
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        vault.record_refresh(
            &connection(&vault, &a, &Provider::GoogleDrive),
            OAuthGrant::new(Secret::new("n"))
        ),
        Err(Error::Conflict(_))
    ));
}

#[test]
fn a_refresh_of_the_old_grant_does_not_overwrite_a_reconnect() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault();
    let grant = |access: &str, refresh: &str, secs| {
        OAuthGrant::new(Secret::new(access))
            .refresh_token(Secret::new(refresh))
            .expires_in_secs(secs)
    };
    vault
        .connect(
            &a,
            &Provider::Notion,
            grant("old-access", "old-refresh", 60),
        )
        .unwrap();
    // The refresher reads the grant it will refresh...
    let before = vault.get(&a, &Provider::Notion).unwrap();
    // ...while the owner connects again (in the same millisecond: the clock stands still)...
    vault
        .connect(
            &a,
            &Provider::Notion,
            grant("new-access", "new-refresh", 3_600),
        )
        .unwrap();
    // ...and then stores what the provider answered for the old refresh token.
    match vault.record_refresh(
        &before.info,
        OAuthGrant::new(Secret::new("old-access-2")).expires_in_secs(3_600),
    ) {
        Err(e @ Error::Conflict(_)) => assert!(e.to_string().contains("connected again"), "{e}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let now = vault.get(&a, &Provider::Notion).unwrap();
    assert_eq!(now.access_token.expose(), "new-access");
    assert_eq!(now.refresh_token.unwrap().expose(), "new-refresh");
    // A late failure of the old grant does not revoke the new one either.
    let info = vault
        .mark_unhealthy(&before.info, ProviderErrorKind::Revoked)
        .unwrap();
    assert_eq!(info.health, Health::Healthy);
}

#[test]
fn of_two_refreshers_the_one_that_lost_the_race_changes_nothing() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault();
    vault
        .connect(&a, &Provider::Notion, google_grant())
        .unwrap();
    // Both read the same grant; the provider rotates the refresh token at the first refresh.
    let first = vault.get(&a, &Provider::Notion).unwrap();
    let second = vault.get(&a, &Provider::Notion).unwrap();
    assert_eq!(first.info.revision, second.info.revision);
    let rotated = OAuthGrant::new(Secret::new("access-2"))
        .refresh_token(Secret::new("refresh-2"))
        .expires_in_secs(3_600);
    let stored = vault.record_refresh(&first.info, rotated).unwrap();
    assert_ne!(
        stored.revision, first.info.revision,
        "a refresh is a new revision"
    );
    // The second presents the spent refresh token: the provider says `invalid_grant`.
    let refused = normalize_provider_error(&Provider::Notion, 400, r#"{"error":"invalid_grant"}"#);
    assert_eq!(refused.kind, ProviderErrorKind::Revoked);
    let audit_before = env.ledger.audit().recent(100).unwrap().len();
    let info = vault.mark_unhealthy(&second.info, refused.kind).unwrap();
    assert_eq!(
        info.health,
        Health::Healthy,
        "the stale failure revoked fresh tokens"
    );
    assert_eq!(env.ledger.audit().recent(100).unwrap().len(), audit_before);
    // Had it refreshed instead, its result would be dropped, not mixed in.
    let late = OAuthGrant::new(Secret::new("access-3")).expires_in_secs(3_600);
    assert!(matches!(
        vault.record_refresh(&second.info, late),
        Err(Error::Conflict(_))
    ));
    let now = vault.get(&a, &Provider::Notion).unwrap();
    assert_eq!(now.access_token.expose(), "access-2");
    assert_eq!(now.refresh_token.unwrap().expose(), "refresh-2");
    // A failure of the grant now stored is recorded.
    let info = vault
        .mark_unhealthy(&now.info, ProviderErrorKind::Revoked)
        .unwrap();
    assert_eq!(info.health, Health::Revoked);
}

#[test]
fn a_connection_a_provider_refused_early_is_offered_for_refresh() {
    let env = Env::new();
    let a = env.account("A");
    let vault = env.ledger.vault();
    // One with an expiry an hour away, one without any.
    vault
        .connect(&a, &Provider::GoogleDrive, google_grant())
        .unwrap();
    vault
        .connect(
            &a,
            &Provider::Notion,
            OAuthGrant::new(Secret::new("n")).refresh_token(Secret::new("r")),
        )
        .unwrap();
    let now = env.clock.now();
    assert!(
        vault
            .due_for_refresh(now, Duration::ZERO)
            .unwrap()
            .is_empty()
    );
    for provider in [Provider::GoogleDrive, Provider::Notion] {
        vault
            .mark_unhealthy(
                &vault.get(&a, &provider).unwrap().info,
                ProviderErrorKind::AuthExpired,
            )
            .unwrap();
    }
    // Failed ones are due now, also when their expiry falls within the look-ahead (they
    // sort ahead of healthy ones due later).
    for skew in [Duration::ZERO, Duration::from_secs(7_200)] {
        let due = vault.due_for_refresh(now, skew).unwrap();
        assert_eq!(due.len(), 2, "{due:?}");
        assert!(
            due.iter()
                .all(|d| d.health == Health::RefreshFailed && d.expires_at <= now),
            "{due:?}"
        );
    }
}

#[test]
fn an_unreadable_connector_row_does_not_stop_other_owners_refreshes() {
    let env = Env::new();
    let (a, b) = (env.account("A"), env.account("B"));
    let vault = env.ledger.vault();
    vault
        .connect(&a, &Provider::GoogleDrive, google_grant())
        .unwrap();
    vault
        .connect(&b, &Provider::Notion, google_grant())
        .unwrap();
    let env = env.with_raw_file(|db| {
        let owner_b = rows(db, CONNECTORS)
            .into_iter()
            .find(|(_, name, _)| name == "notion")
            .unwrap()
            .0;
        write_row(db, CONNECTORS, (owner_b, "notion"), &[99, 1, 2, 3]);
    });
    let later = env.clock.now().plus_secs(7_200);
    let due = env
        .ledger
        .vault()
        .due_for_refresh(later, Duration::ZERO)
        .unwrap();
    assert_eq!(
        due.len(),
        1,
        "A's connection, and B's unreadable one left out"
    );
    assert_eq!(due[0].owner, a);
    assert!(!env.check().is_ok(), "check names the unreadable row");
}

/// The vault does not follow the owner's subscription (the module's docs say why): a
/// suspended account's secret still attaches and its grant is still refreshed, while its keys
/// are refused `subscription_inactive`, which is what stops work done for it.
#[test]
fn a_suspended_owners_secrets_and_grants_are_kept_working_while_its_keys_are_refused() {
    use keyledger::{NewKey, Presented, Request, SubscriptionStatus};
    let env = Env::new();
    let owner = env.account("Acme");
    let created = env.ledger.keys().create(NewKey::new(owner, "ci")).unwrap();
    let url = "https://api.stripe.com/v1/charges";
    env.ledger
        .secrets()
        .put(
            &owner,
            "STRIPE",
            Secret::new(API_SECRET),
            ["api.stripe.com"],
        )
        .unwrap();
    env.ledger
        .vault()
        .connect(&owner, &Provider::GoogleDrive, google_grant())
        .unwrap();
    env.ledger
        .accounts()
        .set_status(&owner, SubscriptionStatus::Suspended)
        .unwrap();

    let presented = Presented::new(created.plaintext.expose()).unwrap();
    let denial = env
        .ledger
        .verify(&Request::new(&presented, "/v1/x"))
        .unwrap_err();
    assert_eq!(denial.code(), "subscription_inactive");
    let header = env.ledger.secrets().bearer(&owner, "STRIPE", url).unwrap();
    assert_eq!(header.value.expose(), format!("Bearer {API_SECRET}"));
    let due = env
        .ledger
        .vault()
        .due_for_refresh(env.clock.now().plus_secs(7_200), Duration::ZERO)
        .unwrap();
    assert_eq!(due.iter().map(|d| d.owner).collect::<Vec<_>>(), [owner]);
}
