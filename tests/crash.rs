//! Crash simulation through redb's `StorageBackend` (the way redb tests itself): a backend
//! that keeps live and durable bytes apart, loses power (keeping only synced bytes, or a
//! random subset of the unsynced writes) and can fail every I/O after a countdown. Seeded
//! workloads run against a reference model (`keyledger::fuzzing::ops`, shared with the `ops`
//! fuzz target); after every reopen each acknowledged admin write must be there, every
//! balance must satisfy `spent + lost_to_crash + remaining == granted` and `spent ≤ granted`,
//! charged units must stay counted, losses must stay within the lease bound, and `check` must
//! pass.
//!
//! A failing seed prints itself; replay it with
//! `KEYLEDGER_SEED=<seed> cargo test --test crash replay_seed -- --nocapture`.
//! Soak: `KEYLEDGER_SOAK_SEEDS=20000 cargo test --release --test crash soak -- --ignored`.

use std::panic::{AssertUnwindSafe, catch_unwind};

use keyledger::fuzzing::{self, CrashBackend, CrashImage};
use keyledger::{Config, Ledger, MasterKey, NewAccount, NewKey};
use redb::{ReadableDatabase, TableDefinition};

/// Seeds in the default run.
const DEFAULT_SEEDS: u64 = 240;

#[derive(Default, Debug)]
struct Totals {
    seeds: u64,
    ops: usize,
    acknowledged: usize,
    grants: usize,
    crashes: usize,
    closes: usize,
    disk_failures: usize,
    lost: u64,
    pools_deleted: usize,
    thresholds_changed: usize,
    pool_refills_changed: usize,
    pool_moves: usize,
    cache_evictions: u64,
    accounts_deleted: usize,
}

/// Runs one seed; on a violation or a panic, fails naming the seed.
fn run_seed(seed: u64, totals: &mut Totals) {
    let bytes = fuzzing::ops::workload(seed);
    let result = catch_unwind(AssertUnwindSafe(|| fuzzing::ops::run(&bytes)));
    let replay =
        format!("replay: KEYLEDGER_SEED={seed} cargo test --test crash replay_seed -- --nocapture");
    match result {
        Ok(Ok(o)) => {
            totals.seeds += 1;
            totals.ops += o.ops;
            totals.acknowledged += o.acknowledged;
            totals.grants += o.grants;
            totals.crashes += o.crashes;
            totals.closes += o.closes;
            totals.disk_failures += usize::from(o.disk_failed);
            totals.lost += o.lost_to_crash;
            totals.pools_deleted += o.pools_deleted;
            totals.thresholds_changed += o.thresholds_changed;
            totals.pool_refills_changed += o.pool_refills_changed;
            totals.pool_moves += o.pool_moves;
            totals.cache_evictions += o.cache_evictions;
            totals.accounts_deleted += o.accounts_deleted;
        }
        Ok(Err(violation)) => panic!("seed {seed}: {violation}\n{replay}"),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("seed {seed} panicked: {message}\n{replay}");
        }
    }
}

fn run_range(seeds: std::ops::Range<u64>) -> Totals {
    let mut totals = Totals::default();
    for seed in seeds {
        run_seed(seed, &mut totals);
    }
    println!("{totals:?}");
    totals
}

#[test]
fn random_workloads_survive_power_loss_and_dying_disks_first_half() {
    let t = run_range(0..DEFAULT_SEEDS / 2);
    assert_eq!(t.seeds, DEFAULT_SEEDS / 2);
    assert!(t.crashes > 0 && t.grants > 0 && t.acknowledged > 0);
    assert!(
        t.pools_deleted > 0
            && t.thresholds_changed > 0
            && t.pool_refills_changed > 0
            && t.pool_moves > 0
            && t.accounts_deleted > 0,
        "some seeds must delete pools, change thresholds and pool refills, move keys \
         between pools and delete accounts: {t:?}"
    );
    assert!(
        t.cache_evictions > 0,
        "the seeds with a 2-key cache must evict keys for room: {t:?}"
    );
}

#[test]
fn random_workloads_survive_power_loss_and_dying_disks_second_half() {
    let t = run_range(DEFAULT_SEEDS / 2..DEFAULT_SEEDS);
    assert_eq!(t.seeds, DEFAULT_SEEDS / 2);
    assert!(
        t.disk_failures > 0,
        "some seeds must exercise the I/O countdown"
    );
}

/// Seeds the soak found, each run several times: their failures depended on the writer's
/// timing. 52,112,671: a grant dropped after a pool's refill fell due refunded into the
/// balance the refill would replace; removing the refill kept it, and the model's bound on
/// that balance had not counted the refund (failed 11 of 20 runs before the model's fix).
/// 52,385,968: a batch taking a lease back failed at its commit's last sync, but a power
/// loss kept its header: the units put back in memory were spent there and found in the
/// balance again (failed about 1 run in 15 before the ledger's fix).
#[test]
fn seeds_found_by_the_soak() {
    for seed in [52_112_671, 52_385_968] {
        for _ in 0..8 {
            run_range(seed..seed + 1);
        }
    }
}

/// `KEYLEDGER_SEED=<n>`: replays one seed (prints its figures). A tool, not a test: ignored
/// unless asked for, so that it never counts as a passing test that checked nothing.
#[test]
#[ignore = "a tool: KEYLEDGER_SEED=<n> replays one seed"]
fn replay_seed() {
    let seed = std::env::var("KEYLEDGER_SEED").expect("KEYLEDGER_SEED=<n>: the seed to replay");
    let seed: u64 = seed.parse().expect("KEYLEDGER_SEED is a number");
    let t = run_range(seed..seed + 1);
    println!("seed {seed}: {t:?}");
}

/// Thousands of seeds: `KEYLEDGER_SOAK_SEEDS` (default 5,000) from `KEYLEDGER_SOAK_START`.
#[test]
#[ignore = "soak: thousands of seeds"]
fn soak() {
    let count = std::env::var("KEYLEDGER_SOAK_SEEDS").map_or(5_000, |v| v.parse().unwrap());
    let start = std::env::var("KEYLEDGER_SOAK_START").map_or(1_000_000, |v| v.parse().unwrap());
    let t = run_range(start..start + count);
    assert_eq!(t.seeds, count);
}

fn config() -> Config {
    Config::builder()
        .master_key(MasterKey::from_bytes(&[3u8; 32]).unwrap())
        .build()
        .unwrap()
}

const T: TableDefinition<u64, u64> = TableDefinition::new("t");

#[test]
fn the_backend_loses_unsynced_writes_and_keeps_synced_ones() {
    let backend = CrashBackend::new();
    let db = redb::Database::builder()
        .create_with_backend(backend.clone())
        .unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(T).unwrap().insert(1, 1).unwrap();
    txn.commit().unwrap();
    let mut txn = db.begin_write().unwrap();
    txn.set_durability(redb::Durability::None).unwrap();
    txn.open_table(T).unwrap().insert(2, 2).unwrap();
    txn.commit().unwrap();
    let rebooted = backend.power_loss(CrashImage::DurableOnly);
    drop(db);
    let db = redb::Database::builder()
        .create_with_backend(rebooted)
        .unwrap();
    let read = db.begin_read().unwrap();
    let table = read.open_table(T).unwrap();
    assert_eq!(table.get(1).unwrap().map(|v| v.value()), Some(1));
    assert!(
        table.get(2).unwrap().is_none(),
        "a non-durable commit must not survive"
    );
}

#[test]
fn a_dead_disk_fails_every_operation_with_a_typed_error() {
    let backend = CrashBackend::new();
    let ledger = Ledger::open_with_backend(backend.clone(), config()).unwrap();
    let account = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    backend.kill();
    let err = ledger
        .keys()
        .create(NewKey::new(account.id, "k").credits(5))
        .unwrap_err();
    // The commit failed on its first write, but nothing outside redb can tell that from a
    // failure at its last sync, after which it may have landed.
    assert!(
        matches!(
            err,
            keyledger::Error::Storage(_) | keyledger::Error::Uncertain { .. }
        ),
        "{err:?}"
    );
    drop(ledger);
    let reopened =
        Ledger::open_with_backend(backend.power_loss(CrashImage::DurableOnly), config()).unwrap();
    assert!(reopened.accounts().get(&account.id).is_ok());
}

/// Every I/O point of a small workload: the disk dies at write/sync number `n`, for every
/// `n` until the workload completes; the file reopened after a power loss — keeping the
/// synced bytes only, or every write — always passes `check`, and never holds more credit
/// than was granted less what was served.
#[test]
fn a_disk_dying_at_every_io_point_of_a_workload_leaves_a_consistent_file() {
    let mut n = 0;
    loop {
        let backend = CrashBackend::new();
        backend.fail_after(n);
        let mut served = 0;
        let completed = (|| -> keyledger::Result<()> {
            let ledger = Ledger::open_with_backend(backend.clone(), config())?;
            let account = ledger.accounts().create(NewAccount::new("Acme"))?;
            let key = ledger
                .keys()
                .create(NewKey::new(account.id, "k").credits(50))?;
            let presented = keyledger::Presented::new(key.plaintext.expose()).unwrap();
            for _ in 0..5 {
                if let Ok(g) = ledger.verify(&keyledger::Request::new(&presented, "/x").cost(3)) {
                    served += g.commit(2).token_stats.charged;
                }
            }
            ledger.credits().top_up(&key.info.id, 10)?;
            ledger.close()
        })()
        .is_ok();
        for image in [CrashImage::DurableOnly, CrashImage::AllWritten] {
            let image = backend.power_loss(image);
            let Ok(ledger) = Ledger::open_with_backend(image.clone(), config()) else {
                continue;
            };
            let accounts = ledger
                .accounts()
                .list(&keyledger::PageRequest::first())
                .unwrap();
            for a in accounts.items {
                let keys = ledger
                    .keys()
                    .list(&a.id, &keyledger::PageRequest::first())
                    .unwrap();
                for k in keys.items {
                    let u = ledger.credits().usage(&k.id).unwrap();
                    let left = u.remaining.unwrap();
                    assert_eq!(u.spent + u.lost_to_crash + left, u.granted, "n={n}: {u:?}");
                    assert!(left + served <= 60, "n={n}: {served} served: {u:?}");
                }
            }
            drop(ledger);
            let report = Ledger::check_with_backend(image, config()).unwrap();
            assert!(report.is_ok(), "n={n}: {:?}", report.problems);
        }
        if completed {
            assert!(n > 10, "the workload does some I/O");
            println!("workload completed after {n} I/O operations");
            break;
        }
        n += 1;
    }
}

/// A ledger on a crash backend whose usage rounds run only on `flush`, with one key holding
/// `credits`; everything durable.
fn one_key_on_a_crash_backend(
    credits: u64,
) -> (CrashBackend, Config, Ledger, keyledger::CreatedKey) {
    let config = Config::builder()
        .master_key(MasterKey::from_bytes(&[3u8; 32]).unwrap())
        .usage_flush_interval(std::time::Duration::from_secs(3_600))
        .build()
        .unwrap();
    let backend = CrashBackend::new();
    let ledger = Ledger::open_with_backend(backend.clone(), config.clone()).unwrap();
    let account = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let key = ledger
        .keys()
        .create(NewKey::new(account.id, "k").credits(credits))
        .unwrap();
    ledger.flush().unwrap();
    (backend, config, ledger, key)
}

/// A close that could not take the leases back (its store fenced off by an earlier failed
/// commit, so its closing batch failed before reaching them) still refuses new requests, as
/// `close` promises: what such a grant commits is written nowhere (found by a reviewer: every
/// cached key went on being granted from its lease in memory, receipts and all, for as long
/// as the process ran).
#[test]
fn a_close_that_could_not_take_the_leases_back_still_refuses_new_requests() {
    let (backend, _config, ledger, key) = one_key_on_a_crash_backend(1_000);
    let presented = keyledger::Presented::new(key.plaintext.expose()).unwrap();
    let request = keyledger::Request::new(&presented, "/x");
    // The first request leases units into memory.
    let _ = ledger.verify(&request).unwrap().commit(1);
    backend.kill();
    assert!(ledger.accounts().create(NewAccount::new("late")).is_err());
    assert!(ledger.close().is_err(), "the disk is dead");
    let after: Vec<_> = (0..5)
        .map(|_| {
            ledger
                .verify(&request)
                .map(|g| g.commit(1).token_stats.charged)
        })
        .collect();
    assert!(
        after
            .iter()
            .all(|r| r.as_ref().is_err_and(|d| d.code() == "unavailable")),
        "after the close: {after:?}"
    );
}

/// A refund too large for the lease goes back to the balance in a batch of its own. The
/// disk dies at each sync of that batch in turn, and the power loss keeps every write: at
/// the commit's last sync the header that makes it durable is written, and the refund has
/// landed though the commit failed. Whatever the grant's thread hears, it must not put those
/// units back in the lease as well, for requests to spend from memory before the crash and
/// find in the balance after it. The same where the sync panics instead (the store catches
/// it; found by a reviewer: the batch was then undone as one that never reached the disk).
#[test]
fn a_refund_whose_commit_failed_but_landed_is_not_also_spent_from_memory() {
    const CREDITS: u64 = 1_000_000;
    const COST: u64 = 1_000;
    for panics in [false, true] {
        let mut landed_after_failing = 0;
        for nth in 1.. {
            let (backend, config, ledger, key) = one_key_on_a_crash_backend(CREDITS);
            let presented = keyledger::Presented::new(key.plaintext.expose()).unwrap();
            let request = |cost| keyledger::Request::new(&presented, "/x").cost(cost);
            let large = ledger.verify(&request(CREDITS / 2)).unwrap();
            ledger.flush().unwrap();
            match panics {
                false => backend.fail_sync(nth),
                true => backend.panic_at_sync(nth),
            }
            drop(large); // the lease keeps what it may; the rest goes to the balance
            if !backend.has_failed() {
                break; // the refund's batch has no sync `nth`
            }
            let mut served = 0;
            while served < CREDITS {
                let Ok(grant) = ledger.verify(&request(COST)) else {
                    break;
                };
                grant.commit(COST);
                served += COST;
            }
            assert!(served > 0, "the lease in memory still serves");
            let image = backend.power_loss(CrashImage::AllWritten);
            drop(ledger);
            let reopened = Ledger::open_with_backend(image, config).unwrap();
            let usage = reopened.credits().usage(&key.info.id).unwrap();
            let left = usage.remaining.unwrap();
            landed_after_failing += usize::from(left > CREDITS / 2);
            assert!(
                served + left <= CREDITS,
                "sync {nth} failed (panicked: {panics}): {served} served before the crash \
                 and {left} left after it, of {CREDITS}"
            );
        }
        assert!(
            landed_after_failing > 0,
            "a failed commit that lands is the case under test (panicked: {panics})"
        );
    }
}

/// Runs `change` on a fresh ledger (one key of 100 credits) whose sync `nth` fails (then,
/// panics), for each `nth` until the change succeeds; where the image keeping every write
/// shows the key's `granted` at `landed_granted` though the change failed, `check` gets
/// which sync did what ("sync 3 panicked") and the error. At least one such case must come.
fn each_change_that_failed_and_landed(
    landed_granted: u64,
    change: impl Fn(&Ledger, &str) -> keyledger::Result<()>,
    check: impl Fn(&str, keyledger::Error),
) {
    let mut landed_after_failing = 0;
    for panics in [false, true] {
        for nth in 1.. {
            let (backend, config, ledger, key) = one_key_on_a_crash_backend(100);
            match panics {
                false => backend.fail_sync(nth),
                true => backend.panic_at_sync(nth),
            }
            let Err(err) = change(&ledger, &key.info.id) else {
                break; // the change's batches have no sync `nth`
            };
            let image = backend.power_loss(CrashImage::AllWritten);
            drop(ledger);
            let reopened = Ledger::open_with_backend(image, config).unwrap();
            if reopened.credits().usage(&key.info.id).unwrap().granted == landed_granted {
                landed_after_failing += 1;
                let fault = if panics { "panicked" } else { "failed" };
                check(&format!("sync {nth} {fault}"), err);
            }
        }
    }
    assert!(
        landed_after_failing > 0,
        "a failed commit that lands is the case under test"
    );
}

/// A top-up whose commit fails (or panics) at its last sync may have landed: the error must
/// say so (`Error::Uncertain`), not that the balance is unchanged, for a retry would add the
/// credits twice. (Where the sync panicked, the store's fence error had replaced the
/// writer's answer: found by a reviewer.)
#[test]
fn a_top_up_whose_commit_failed_does_not_claim_the_balance_unchanged() {
    each_change_that_failed_and_landed(
        150,
        |ledger, id| ledger.credits().top_up(id, 50).map(drop),
        |sync, err| {
            assert!(
                matches!(err, keyledger::Error::Uncertain { .. }),
                "{sync}, the top-up landed, and the host was told: {err}"
            )
        },
    );
}

/// A key update that changes a setting and the balance: the settings commit, then the balance
/// is set through the writer. If that set's commit fails at its last sync and lands, the
/// host must not be told the balance was not set.
#[test]
fn a_key_update_whose_balance_set_failed_but_landed_does_not_claim_it_was_not_set() {
    each_change_that_failed_and_landed(
        40,
        |ledger, id| {
            let update = keyledger::KeyUpdate::new()
                .name("renamed")
                .credits(Some(40));
            ledger.keys().update(id, update).map(drop)
        },
        |sync, err| {
            let said = err.to_string();
            assert!(
                matches!(err, keyledger::Error::Uncertain { .. })
                    && said.contains("settings were saved"),
                "{sync}, the balance set landed, and the host was told: {said}"
            );
        },
    );
}

/// A top-up the writer refuses (it would overflow what was ever granted) in a batch whose
/// commit fails: the change was never made, landed or not, and the host must hear why, not
/// that it may have been made.
#[test]
fn a_refused_top_up_in_a_failed_commit_is_not_answered_as_maybe_made() {
    let mut failed = 0;
    for nth in 1.. {
        let (backend, _config, ledger, key) = one_key_on_a_crash_backend(100);
        backend.fail_sync(nth);
        let err = ledger.credits().top_up(&key.info.id, u64::MAX).unwrap_err();
        if !backend.has_failed() {
            break; // the top-up's batch has no sync `nth`
        }
        failed += 1;
        let said = err.to_string();
        assert!(
            !said.contains("may have been made"),
            "sync {nth} failed; a top-up refused as too large was answered: {said}"
        );
    }
    assert!(failed > 0, "a failed commit is the case under test");
}
