//! No plaintext key and no master key ever reaches the database file, a `Debug` or `Display`
//! output, a serialized view, an error message or the audit trail.

mod common;

use common::*;
use keyledger::{
    Config, Error, HashScheme, ImportKey, ImportedHash, KeyUpdate, Ledger, MasterKey, NewKey,
    PageRequest, Presented, Request, RouteRule,
};
use sha2::{Digest, Sha256};

/// Everything secret a workload produced.
struct Secrets {
    plaintexts: Vec<String>,
    master_hex: String,
    master_bytes: Vec<u8>,
}

impl Secrets {
    /// The strings that must never appear: each plaintext, its body without the prefix, any 8
    /// characters of its hidden random part, and the master key in hex (lower and upper case).
    fn needles(&self) -> Vec<String> {
        let mut out = Vec::new();
        for p in &self.plaintexts {
            out.push(p.clone());
            let body = p.split_once('_').and_then(|(_, rest)| rest.split_once('_'));
            let body = body.map_or(p.as_str(), |(_, b)| b);
            assert!(body.len() >= 32, "body of a plaintext: {}", body.len());
            out.push(body.to_owned());
            // Any 8 characters of the random part past what the visible prefix shows (at most
            // its first 5): a record or a display showing most of a key leaks it too.
            let hidden = &body[5..32];
            out.extend((0..=hidden.len() - 8).map(|i| hidden[i..i + 8].to_owned()));
        }
        out.push(self.master_hex.clone());
        out.push(self.master_hex.to_uppercase());
        out
    }

    #[track_caller]
    fn assert_absent(&self, what: &str, haystack: &str) {
        for needle in self.needles() {
            assert!(!haystack.contains(&needle), "a secret appears in {what}");
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Creates keys and tokens, rolls some, imports one, rotates the pepper and authenticates
/// through it: every path that handles a plaintext.
fn workload(t: &TestLedger) -> Vec<String> {
    let mut plaintexts = Vec::new();
    let a = t.account("Acme");
    let b = t.account("Globex");
    let mut ids = Vec::new();
    for (i, owner) in [&a, &a, &b].into_iter().enumerate() {
        let c = t
            .ledger
            .keys()
            .by("alice")
            .create(
                NewKey::new(owner, format!("key {i}"))
                    .credits(100)
                    .metadata("i", "x"),
            )
            .unwrap();
        plaintexts.push(c.plaintext.expose().to_owned());
        ids.push(c.info.id);
    }
    let test_key = t
        .ledger
        .keys()
        .create(NewKey::new(a, "test").test())
        .unwrap();
    plaintexts.push(test_key.plaintext.expose().to_owned());
    for i in 0..2 {
        let tok = t
            .ledger
            .tokens()
            .create(NewKey::token(b, "svc", format!("t{i}")))
            .unwrap();
        plaintexts.push(tok.plaintext.expose().to_owned());
        if i == 0 {
            let rolled = t.ledger.tokens().roll(&tok.info.id, 600).unwrap();
            plaintexts.push(rolled.plaintext.expose().to_owned());
        }
    }
    for (id, grace) in [(&ids[0], 3600), (&ids[1], 0)] {
        let rolled = t.ledger.keys().roll(id, grace).unwrap();
        plaintexts.push(rolled.plaintext.expose().to_owned());
    }
    let imported = formatted_key("vb_live_", 2024);
    let digest: [u8; 32] = Sha256::digest(imported.as_bytes()).into();
    let hash = ImportedHash::Sha256(digest);
    let import = ImportKey::new(a, "imported", hash, &imported[..12], &imported[42..]);
    // Its SHA-256 finds a short legacy key offline: no `Debug` shows it.
    let shown = format!("{import:?} {import:#?}");
    assert!(!shown.contains(&format!("{:?}", digest)), "{shown}");
    t.ledger.keys().import(import).unwrap();
    plaintexts.push(imported.clone());
    t.ledger
        .keys()
        .update(&ids[2], KeyUpdate::new().name("renamed"))
        .unwrap();
    t.ledger.routes().set(RouteRule::new("/api/")).unwrap();

    t.ledger
        .rotate_hash_scheme(HashScheme::HmacSha256 { pepper: 2 })
        .unwrap();
    for p in &plaintexts {
        let _ = t.auth(p);
    }
    t.ledger
        .rotate_hash_scheme(HashScheme::Blake3Keyed { pepper: 3 })
        .unwrap();
    let late = t.ledger.keys().create(NewKey::new(b, "late")).unwrap();
    plaintexts.push(late.plaintext.expose().to_owned());
    t.ledger.keys().delete(&ids[2]).unwrap();
    assert!(t.auth(&imported).is_ok());
    plaintexts
}

#[test]
fn the_database_file_holds_no_plaintext_and_no_master_key() {
    let t = TestLedger::new();
    let plaintexts = workload(&t);
    let secrets = Secrets {
        plaintexts,
        master_hex: t.master.to_hex().expose().to_owned(),
        master_bytes: (0..32)
            .map(|i| u8::from_str_radix(&t.master.to_hex().expose()[2 * i..2 * i + 2], 16).unwrap())
            .collect(),
    };
    let (_dir, path, config) = t.close();
    let raw = std::fs::read(&path).unwrap();
    assert!(raw.len() > 4096, "the file holds the workload");
    for needle in secrets.needles() {
        assert!(
            !contains(&raw, needle.as_bytes()),
            "a secret is stored in the database file"
        );
    }
    assert!(
        !contains(&raw, &secrets.master_bytes),
        "the raw master key is stored"
    );
    // The visible parts are stored on purpose (support looks keys up by them). The test key
    // (`plaintexts[3]`) is live and unchanged; `plaintexts[2]`'s key was deleted, so its
    // prefix is in the file only while no later write happens to reuse the freed page.
    let visible = &secrets.plaintexts[3][..12];
    assert!(
        contains(&raw, visible.as_bytes()),
        "the 12-char visible prefix is stored"
    );

    // And the file is healthy.
    let report = Ledger::check(&path, config).unwrap();
    assert!(report.is_ok(), "problems: {:?}", report.problems);
    secrets.assert_absent("the check report", &format!("{report:?}"));
}

#[test]
fn debug_display_json_errors_and_audit_never_show_a_secret() {
    let t = TestLedger::new();
    let plaintexts = workload(&t);
    let secrets = Secrets {
        plaintexts: plaintexts.clone(),
        master_hex: t.master.to_hex().expose().to_owned(),
        master_bytes: vec![],
    };
    let owner = t.account("Views");
    let created = t
        .ledger
        .keys()
        .by("alice")
        .create(NewKey::new(owner, "view me"))
        .unwrap();
    let mut all = secrets;
    all.plaintexts.push(created.plaintext.expose().to_owned());
    let fresh = created.plaintext.expose().to_owned();

    all.assert_absent("CreatedKey Debug", &format!("{created:?} {:#?}", created));
    all.assert_absent("Secret Display", &format!("{}", created.plaintext));
    assert_eq!(format!("{:?}", created.plaintext), "Secret(***)");
    all.assert_absent("KeyInfo Debug", &format!("{:?}", created.info));
    all.assert_absent(
        "KeyInfo JSON",
        &serde_json::to_string(&created.info).unwrap(),
    );
    let config = t.config();
    all.assert_absent("Config Debug", &format!("{config:?}"));
    let builder = Config::builder().master_key(t.master.clone());
    all.assert_absent("ConfigBuilder Debug", &format!("{builder:?}"));
    all.assert_absent("Ledger Debug", &format!("{:?}", t.ledger));
    all.assert_absent("MasterKey Debug", &format!("{:?}", t.master));
    let presented = Presented::new(&fresh).unwrap();
    all.assert_absent("Presented Debug", &format!("{presented:?}"));

    // Listings, look-ups and authentication results.
    let page = t.ledger.keys().list(&owner, &PageRequest::first()).unwrap();
    all.assert_absent("Page Debug", &format!("{page:?}"));
    all.assert_absent("Page JSON", &serde_json::to_string(&page).unwrap());
    let found = t.ledger.keys().find_by_prefix(&fresh[..12]).unwrap();
    all.assert_absent("find_by_prefix", &format!("{found:?}"));
    let authed = t.ledger.authenticate(&presented).unwrap();
    all.assert_absent("authenticate", &format!("{authed:?}"));
    // A grant's `Debug` names the key and its reservation, nothing of the secret.
    let grant = t
        .ledger
        .verify(&Request::new(&presented, "/x").cost(3))
        .unwrap();
    let shown = format!("{grant:?} {grant:#?}");
    all.assert_absent("Grant Debug", &shown);
    assert_eq!(
        format!("{grant:?}"),
        format!("Grant {{ key_id: {:?}, reserved: 3, .. }}", created.info.id)
    );
    drop(grant);

    // The audit trail: names and ids only.
    let events = t.ledger.audit().recent(1000).unwrap();
    assert!(events.len() > 10);
    all.assert_absent("audit events", &format!("{events:?}"));
    all.assert_absent("audit JSON", &serde_json::to_string(&events).unwrap());

    // Errors caused by passing a secret where it does not belong never echo it.
    let mut errors: Vec<Error> = vec![
        t.ledger.keys().get(&fresh).unwrap_err(),
        t.ledger.keys().find_by_prefix(&fresh).unwrap_err(),
        t.ledger
            .keys()
            .list(&fresh, &PageRequest::first())
            .unwrap_err(),
        t.ledger
            .keys()
            .list(&owner, &PageRequest::first().after(&fresh))
            .unwrap_err(),
        t.ledger.accounts().get(&fresh).unwrap_err(),
        t.ledger
            .keys()
            .create(NewKey::new(&fresh, "x"))
            .unwrap_err(),
        t.ledger.keys().owned_by(&fresh).map(|_| ()).unwrap_err(),
    ];
    let wrong = Config::builder()
        .master_key(MasterKey::generate().unwrap())
        .build()
        .unwrap();
    let (_dir, path, right) = t.close();
    errors.push(Ledger::open(&path, wrong).unwrap_err());
    for e in &errors {
        all.assert_absent("an error", &format!("{e} | {e:?}"));
    }
    // Denials of malformed variants of a real key do not echo it either.
    let ledger = Ledger::open(&path, right).unwrap();
    for variant in [
        with_char_changed(&fresh, 20),
        fresh[..fresh.len() - 1].to_owned(),
    ] {
        let denial = authenticate(&ledger, &variant).unwrap_err();
        all.assert_absent("a denial", &format!("{denial} | {denial:?}"));
        assert!(!format!("{denial} {denial:?}").contains(&variant[8..]));
    }
}

/// An imported key's plain SHA-256 — enough to find a short legacy key offline — is never
/// written to the file: its record and verify entry hold it keyed with the master key
/// (format 8), and so does its import reservation (format 7). Before, the reservation kept
/// the plain digest for the life of the key (found by a reviewer); then the verify entry
/// left it in freed pages once the key's first use, or its delete, removed it (found by
/// another). Whatever happens to the key: unused, used or deleted (rolled: the next test).
#[test]
fn an_imported_keys_sha256_is_never_in_the_file() {
    for fate in ["unused", "used", "deleted"] {
        let t = TestLedger::new();
        let a = t.account("Acme");
        let imported = formatted_key("vb_live_", 78);
        let digest: [u8; 32] = Sha256::digest(imported.as_bytes()).into();
        let hash = ImportedHash::Sha256(digest);
        let import = ImportKey::new(a, "legacy", hash, &imported[..12], &imported[42..]);
        let info = t.ledger.keys().import(import).unwrap();
        match fate {
            "used" => assert!(t.auth(&imported).is_ok()),
            "deleted" => t.ledger.keys().delete(&info.id).unwrap(),
            _ => {}
        }
        let (_dir, path, config) = t.close();
        let raw = std::fs::read(&path).unwrap();
        assert!(
            !contains(&raw, &digest),
            "{fate}: the plain SHA-256 is in the file"
        );
        let report = Ledger::check(&path, config).unwrap();
        assert!(report.is_ok(), "{fate}: problems: {:?}", report.problems);
    }
}

/// An import reservation outlives the key's first use and a roll: the same import is refused
/// while the key exists, and no plain SHA-256 is kept for it.
#[test]
fn an_imported_keys_sha256_is_not_kept_once_its_first_use_has_rehashed_it() {
    let t = TestLedger::new();
    let a = t.account("Acme");
    let imported = formatted_key("vb_live_", 77);
    let digest: [u8; 32] = Sha256::digest(imported.as_bytes()).into();
    let hash = ImportedHash::Sha256(digest);
    let import = ImportKey::new(a, "legacy", hash, &imported[..12], &imported[42..]);
    let info = t.ledger.keys().import(import.clone()).unwrap();
    assert!(t.auth(&imported).is_ok(), "the first use rehashes it");
    t.ledger.keys().roll(&info.id, 0).unwrap();
    // Still reserved: the same import is refused while the key exists.
    assert!(matches!(
        t.ledger.keys().import(import),
        Err(keyledger::Error::Conflict(_))
    ));
    let (_dir, path, config) = t.close();
    let raw = std::fs::read(&path).unwrap();
    assert!(!contains(&raw, &digest), "the plain SHA-256 is in the file");
    let report = Ledger::check(&path, config).unwrap();
    assert!(report.is_ok(), "problems: {:?}", report.problems);
}

/// An imported key rolled before its first use keeps its plain SHA-256 in the rolled slot:
/// refused once the grace ends, but the digest stayed in the file until the key next
/// changed (found by a reviewer). A close prunes it.
#[test]
fn an_imported_keys_sha256_rolled_away_unused_is_gone_after_a_close() {
    let t = TestLedger::new();
    let a = t.account("Acme");
    let imported = formatted_key("vb_live_", 91);
    let digest: [u8; 32] = Sha256::digest(imported.as_bytes()).into();
    let hash = ImportedHash::Sha256(digest);
    let import = ImportKey::new(a, "legacy", hash, &imported[..12], &imported[42..]);
    let info = t.ledger.keys().import(import).unwrap();
    let rolled = t.ledger.keys().roll(&info.id, 60).unwrap();
    t.clock.advance_secs(3_600);
    assert!(t.auth(rolled.plaintext.expose()).is_ok());
    assert!(t.auth(&imported).is_err(), "past its grace");
    t.ledger.close().unwrap();
    let counts = t.ledger.hash_scheme_counts().unwrap();
    let imported_left = counts
        .iter()
        .find(|(s, _)| *s == HashScheme::Sha256Imported);
    assert!(imported_left.is_none_or(|(_, n)| *n == 0), "{counts:?}");
    let (_dir, path, config) = t.close();
    let raw = std::fs::read(&path).unwrap();
    assert!(!contains(&raw, &digest), "the plain SHA-256 is in the file");
    let report = Ledger::check(&path, config).unwrap();
    assert!(report.is_ok(), "problems: {:?}", report.problems);
}

/// A file the ledger creates is its owner's only from its first instant (a reviewer saw it
/// 0644 for a moment before it was made 0600: a descriptor another user opened then would
/// go on reading whatever is written later); one that exists keeps the mode its owner gave
/// it.
#[cfg(unix)]
#[test]
fn a_new_database_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mode = |path: &std::path::Path| {
        let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777);
        mode.ok()
    };
    for _ in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new.redb");
        let opened = AtomicBool::new(false);
        let seen = std::thread::scope(|s| {
            let watcher = s.spawn(|| {
                let mut seen = std::collections::BTreeSet::new();
                while !opened.load(Ordering::Relaxed) {
                    seen.extend(mode(&path));
                }
                seen
            });
            let config = Config::builder()
                .master_key(MasterKey::generate().unwrap())
                .build()
                .unwrap();
            let ledger = Ledger::open(&path, config).unwrap();
            opened.store(true, Ordering::Relaxed);
            drop(ledger);
            watcher.join().unwrap()
        });
        let seen: Vec<String> = seen.iter().map(|m| format!("{m:o}")).collect();
        assert!(seen.iter().all(|m| m == "600"), "modes seen: {seen:?}");
        assert_eq!(mode(&path), Some(0o600));
    }
    let t = TestLedger::new();
    let (_dir, path, config) = t.close();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let reopened = Ledger::open(&path, config).unwrap();
    assert_eq!(
        mode(&path),
        Some(0o640),
        "an existing file's mode is its owner's call"
    );
    drop(reopened);
}

/// The master key pasted where text goes — an actor (kept in the audit trail for good), a
/// permission, metadata, an entitlement, a route, a secret's name, an OAuth scope — is
/// refused without being repeated, and the file never holds it. (Found by a reviewer: every
/// one of these was stored in clear and listed.)
#[test]
fn the_master_key_given_as_text_is_refused_everywhere_and_never_stored() {
    use keyledger::{NewAccount, OAuthGrant, Provider, Secret};
    let t = TestLedger::new();
    let hex = t.master.to_hex().expose().to_owned();
    let shouted = hex.to_uppercase();
    let owner = t.account("Acme");
    let l = &t.ledger;
    let new = || NewKey::new(owner, "k");
    let grant = |scope: &str| OAuthGrant::new(Secret::new("t")).scopes([scope]);
    let attempts: Vec<(&str, Result<(), Error>)> = vec![
        ("actor", l.keys().by(&hex).create(new()).map(drop)),
        (
            "actor",
            l.accounts()
                .by(format!("ops {shouted}"))
                .create(NewAccount::new("B"))
                .map(drop),
        ),
        (
            "permissions",
            l.keys().create(new().permissions([hex.as_str()])).map(drop),
        ),
        (
            "metadata",
            l.keys().create(new().metadata("note", &hex)).map(drop),
        ),
        (
            "metadata",
            l.keys().create(new().metadata(&hex, "x")).map(drop),
        ),
        (
            "entitlements",
            l.accounts()
                .create(NewAccount::new("E").entitlements([hex.as_str()]))
                .map(drop),
        ),
        (
            "prefix",
            l.routes().set(RouteRule::new(format!("/{hex}/"))).map(drop),
        ),
        (
            "permission",
            l.routes()
                .set(RouteRule::new("/r/").permission(&hex))
                .map(drop),
        ),
        (
            "name",
            l.secrets()
                .put(&owner, &hex, Secret::new("v"), ["a.example.com"])
                .map(drop),
        ),
        (
            "scopes",
            l.vault()
                .connect(&owner, &Provider::Notion, grant(&hex))
                .map(drop),
        ),
    ];
    for (field, result) in attempts {
        let refused = result.unwrap_err();
        let said = format!("{refused} {refused:?}");
        assert!(
            matches!(&refused, Error::InvalidInput { field: f, .. } if *f == field),
            "{said}"
        );
        assert!(said.contains("master key"), "{said}");
        assert!(!said.to_lowercase().contains(&hex), "never echoed: {said}");
    }
    let (_dir, path, _) = t.close();
    let raw = std::fs::read(&path).unwrap();
    assert!(!contains(&raw, hex.as_bytes()) && !contains(&raw, shouted.as_bytes()));
}

/// An imported hash is wiped when it is dropped: a plain SHA-256 of a key is all a look-up by
/// it needs. Before, `ImportedHash` was `Copy` and kept its digest in a plain array. Seen
/// through the bytes the value occupied — this test's own storage, read again after the drop
/// (the only way to see a wipe; the library itself has no `unsafe`).
#[test]
fn an_imported_hash_is_wiped_when_dropped() {
    use std::mem::{MaybeUninit, size_of};
    const SIZE: usize = size_of::<ImportedHash>();
    // A tag byte and the digest, without padding: every byte read below is initialized.
    assert_eq!(SIZE, 33, "ImportedHash's layout changed: adapt this test");
    let digest_bytes = |slot: &MaybeUninit<ImportedHash>| -> usize {
        // SAFETY: `slot` is SIZE bytes of this function's caller's storage, all initialized
        // (no padding, asserted above); dropping the value in it does not de-initialize them.
        let bytes: [u8; SIZE] = unsafe { std::ptr::read(slot.as_ptr().cast()) };
        bytes.iter().filter(|&&b| b == 0xa5).count()
    };
    let variants: [fn([u8; 32]) -> ImportedHash; 2] = [ImportedHash::Sha256, ImportedHash::Current];
    for variant in variants {
        let mut slot = MaybeUninit::new(variant([0xa5; 32]));
        assert_eq!(digest_bytes(&slot), 32, "the digest, before the drop");
        // SAFETY: initialized just above, dropped once, never read as a value again.
        unsafe { slot.assume_init_drop() };
        assert_eq!(digest_bytes(&slot), 0, "no byte of the digest after it");
    }
}

/// `Debug` of an imported hash names its scheme only, in every form.
#[test]
fn an_imported_hash_debug_shows_no_byte_of_it() {
    let digest: [u8; 32] = Sha256::digest(b"vb_live_legacy").into();
    for (hash, shown) in [
        (ImportedHash::Sha256(digest), "Sha256(***)"),
        (ImportedHash::Current(digest), "Current(***)"),
    ] {
        for debug in [format!("{hash:?}"), format!("{hash:#?}")] {
            assert_eq!(debug, shown);
        }
    }
}
