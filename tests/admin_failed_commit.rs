//! Administrative changes (outside the credit writer) whose commit fails — at a sync before
//! the header, or at the last one, after which the change has landed — or panics there.

use keyledger::fuzzing::{CrashBackend, CrashImage};
use keyledger::{Config, Error, Ledger, MasterKey, NewAccount, NewKey, Presented, Request};

fn config() -> Config {
    Config::builder()
        .master_key(MasterKey::from_bytes(&[3u8; 32]).unwrap())
        .usage_flush_interval(std::time::Duration::from_secs(3_600))
        .build()
        .unwrap()
}

fn served(ledger: &Ledger, key: &str) -> bool {
    let presented = Presented::new(key).unwrap();
    ledger
        .verify(&Request::new(&presented, "/x").cost(1))
        .is_ok()
}

/// For each sync in turn, failing or panicking: a fresh ledger with one account and two
/// unmetered keys, `a` verified (cached) and `b` not; `change` runs, and if it fails,
/// `after(ledger, a, b, error)` says what went wrong in this process, if anything; it must
/// be nothing where the image keeping every write shows the change (`landed`). Returns how
/// many failures landed.
fn each_failed_change(
    change: impl Fn(&Ledger, &str, &str) -> keyledger::Result<()>,
    after: impl Fn(&Ledger, &str, &str, &Error) -> Option<String>,
    landed: impl Fn(&Ledger, &str, &str) -> bool,
) -> usize {
    let mut failures = 0;
    for panics in [false, true] {
        for nth in 1.. {
            let backend = CrashBackend::new();
            let ledger = Ledger::open_with_backend(backend.clone(), config()).unwrap();
            let owner = ledger
                .accounts()
                .create(NewAccount::new("Acme"))
                .unwrap()
                .id
                .to_string();
            let a = ledger
                .keys()
                .create(NewKey::new(owner.clone(), "a"))
                .unwrap();
            let b = ledger.keys().create(NewKey::new(owner, "b")).unwrap();
            assert!(served(&ledger, a.plaintext.expose()));
            ledger.flush().unwrap();
            match panics {
                false => backend.fail_sync(nth),
                true => backend.panic_at_sync(nth),
            }
            let (a_id, b_id) = (a.info.id.to_string(), b.info.id.to_string());
            let Err(err) = change(&ledger, &a_id, &b_id) else {
                break;
            };
            let wrong = after(&ledger, a.plaintext.expose(), b.plaintext.expose(), &err);
            let image = backend.power_loss(CrashImage::AllWritten);
            drop(ledger);
            let reopened = Ledger::open_with_backend(image, config()).unwrap();
            if landed(&reopened, &a_id, &b_id) {
                failures += 1;
                let fault = if panics { "panicked" } else { "failed" };
                assert_eq!(
                    wrong, None,
                    "sync {nth} {fault}, the change landed; error: {err}"
                );
            }
        }
    }
    failures
}

/// A disable whose commit failed may have landed: the key must not go on being served from
/// this process's cache (before: served, with the disk saying disabled), and the host must
/// hear that the change may have been made (before: a plain storage error).
#[test]
fn a_disable_whose_commit_failed_is_not_served_from_memory() {
    let failures = each_failed_change(
        |ledger, a, _| ledger.keys().disable(a).map(drop),
        |ledger, a, _, err| match (served(ledger, a), err) {
            (true, _) => Some("this process still serves the key".into()),
            (_, Error::Uncertain { .. }) => None,
            _ => Some("the error does not say the change may have been made".into()),
        },
        |reopened, a, _| reopened.keys().get(a).unwrap().disabled_at.is_some(),
    );
    assert!(failures > 0);
}

/// After a failed commit redb answers reads from its page cache with the state from before
/// that commit. A key whose disable failed but landed, never cached: a miss must not read it
/// as enabled and serve it (before: served), nor `get` report it enabled.
#[test]
fn a_miss_after_a_failed_disable_does_not_read_the_state_before_it() {
    let failures = each_failed_change(
        |ledger, _, b| ledger.keys().disable(b).map(drop),
        |ledger, _, b, _| served(ledger, b).then(|| "a miss served the key".into()),
        |reopened, _, b| reopened.keys().get(b).unwrap().disabled_at.is_some(),
    );
    assert!(failures > 0);
}

/// An owner secret deleted on a failing disk must not be attached to outbound requests
/// afterwards (before: attached, from redb's page cache, though the deletion had landed).
#[test]
fn a_secret_whose_delete_failed_is_not_attached_afterwards() {
    let mut failures = 0;
    for nth in 1.. {
        let backend = CrashBackend::new();
        let ledger = Ledger::open_with_backend(backend.clone(), config()).unwrap();
        let owner = ledger
            .accounts()
            .create(NewAccount::new("Acme"))
            .unwrap()
            .id
            .to_string();
        let value = keyledger::Secret::new("sk_live_123".to_string());
        ledger
            .secrets()
            .put(&owner, "s", value, ["api.example.com"])
            .unwrap();
        ledger
            .secrets()
            .bearer(&owner, "s", "https://api.example.com/")
            .unwrap();
        backend.fail_sync(nth);
        if ledger.secrets().delete(&owner, "s").is_ok() {
            break;
        }
        let after = ledger
            .secrets()
            .bearer(&owner, "s", "https://api.example.com/");
        let image = backend.power_loss(CrashImage::AllWritten);
        drop(ledger);
        let reopened = Ledger::open_with_backend(image, config()).unwrap();
        if reopened.secrets().info(&owner, "s").is_err() {
            failures += 1;
            assert!(
                after.is_err(),
                "sync {nth}: the delete failed but landed; secret still attached"
            );
        }
    }
    assert!(failures > 0);
}
