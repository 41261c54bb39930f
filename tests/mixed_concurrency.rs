//! T threads × mixed verify / commit (below, at and above the reservation) / refund on keys
//! and a pool they share, while an admin thread tops up balances and disables a key: the
//! totals are exact (every charged unit is spent, every top-up granted, nothing lost on a
//! clean close) and a disabled key is never granted by a verify that started after `disable`
//! returned. `tests/concurrency.rs` covers single-purpose workloads; this one mixes them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use keyledger::{
    Config, Durability, KeyUpdate, Ledger, MasterKey, NewAccount, NewKey, NewPool, Presented,
    Request,
};

const THREADS: u64 = 4;
const PER_THREAD: u64 = 3_000;

/// A ledger in a scratch directory with an account and that account's pool of
/// `pool_credits`: the directory (keep it alive), the file, its config, the ledger, the
/// account and the pool.
type Setup = (
    tempfile::TempDir,
    std::path::PathBuf,
    Config,
    Ledger,
    keyledger::Account,
    keyledger::Pool,
);

fn setup(durability: Durability, pool_credits: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.redb");
    let config = Config::builder()
        .master_key(MasterKey::from_bytes(&[5u8; 32]).unwrap())
        .durability(durability)
        .build()
        .unwrap();
    let ledger = Ledger::open(&path, config.clone()).unwrap();
    let account = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let pool = ledger
        .credits()
        .create_pool(NewPool::new(account.id.as_str(), "shared").credits(pool_credits))
        .unwrap();
    (dir, path, config, ledger, account, pool)
}

fn mixed(durability: Durability) {
    let (_dir, path, config, ledger, account, pool) = setup(durability, 3_000);
    // Two keys with their own credits, two on the pool, one unmetered key to revoke.
    let mut keys = Vec::new();
    for i in 0..4 {
        let new = NewKey::new(account.id, format!("k{i}"));
        let new = if i < 2 {
            new.credits(2_500)
        } else {
            new.pool(pool.id.to_string())
        };
        let created = ledger.keys().create(new).unwrap();
        let credit = if i < 2 {
            created.info.id.to_string()
        } else {
            pool.id.to_string()
        };
        keys.push((credit, created.plaintext.expose().to_owned()));
    }
    let revoked_key = ledger
        .keys()
        .create(NewKey::new(account.id, "revoked"))
        .unwrap();
    let revoked_plain = revoked_key.plaintext.expose().to_owned();
    let revoked = AtomicBool::new(false);
    let late_grants = AtomicU64::new(0);
    let charged: BTreeMap<String, AtomicU64> = keys
        .iter()
        .map(|(c, _)| (c.clone(), AtomicU64::new(0)))
        .collect();
    let topped: BTreeMap<String, AtomicU64> = keys
        .iter()
        .map(|(c, _)| (c.clone(), AtomicU64::new(0)))
        .collect();
    let charged = Arc::new(charged);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (ledger, keys, charged) = (&ledger, &keys, &charged);
            let (revoked, late_grants, revoked_plain) = (&revoked, &late_grants, &revoked_plain);
            s.spawn(move || {
                let mut x = (t + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let revoked_presented = Presented::new(revoked_plain).unwrap();
                for _ in 0..PER_THREAD {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    if x % 11 == 0 {
                        let was_revoked = revoked.load(Ordering::Acquire);
                        let r = ledger.verify(&Request::new(&revoked_presented, "/r").cost(0));
                        if was_revoked && r.is_ok() {
                            late_grants.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    let (credit, plaintext) = &keys[(x % keys.len() as u64) as usize];
                    let presented = Presented::new(plaintext).unwrap();
                    let cost = (x >> 8) % 5;
                    let Ok(grant) = ledger.verify(&Request::new(&presented, "/r").cost(cost))
                    else {
                        continue;
                    };
                    match (x >> 16) % 4 {
                        0 => drop(grant),
                        _ => {
                            let actual = (x >> 24) % 7; // below, at or above the reservation
                            let receipt = grant.commit(actual);
                            charged[credit]
                                .fetch_add(receipt.token_stats.charged, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
        // The admin thread: top-ups on every balance, then revoke one key mid-traffic.
        let (ledger, keys, topped, revoked) = (&ledger, &keys, &topped, &revoked);
        let revoked_id = revoked_key.info.id.to_string();
        s.spawn(move || {
            for round in 0..40u64 {
                let (credit, _) = &keys[(round % keys.len() as u64) as usize];
                ledger.credits().top_up(credit, 7).unwrap();
                topped[credit].fetch_add(7, Ordering::Relaxed);
                if round == 20 {
                    ledger.keys().disable(&revoked_id).unwrap();
                    revoked.store(true, Ordering::Release);
                }
                std::thread::yield_now();
            }
        });
    });
    assert_eq!(
        late_grants.load(Ordering::Relaxed),
        0,
        "a revoked key was granted"
    );
    let initial = |credit: &str| {
        if credit == pool.id.as_str() {
            3_000
        } else {
            2_500
        }
    };
    let check = |ledger: &Ledger, when: &str| {
        for credit in charged.keys() {
            let u = ledger.credits().usage(credit).unwrap();
            let spent = charged[credit].load(Ordering::Relaxed);
            let granted = initial(credit) + topped[credit].load(Ordering::Relaxed);
            assert_eq!(u.granted, granted, "{when} {credit}: {u:?}");
            assert_eq!(
                u.spent, spent,
                "{when} {credit}: every charged unit is spent: {u:?}"
            );
            assert_eq!(u.lost_to_crash, 0, "{when}: {u:?}");
            assert_eq!(u.remaining, Some(granted - spent), "{when} {credit}: {u:?}");
        }
    };
    check(&ledger, "live");
    ledger.close().unwrap();
    drop(ledger);
    let ledger = Ledger::open(&path, config.clone()).unwrap();
    check(&ledger, "after a clean close");
    drop(ledger);
    let report = Ledger::check(&path, config).unwrap();
    assert!(report.is_ok(), "{:?}", report.problems);
}

#[test]
fn mixed_traffic_and_admin_changes_keep_exact_totals_leased() {
    mixed(Durability::Leased);
}

#[test]
fn mixed_traffic_and_admin_changes_keep_exact_totals_exact() {
    mixed(Durability::Exact);
}

/// Two admins change one key's balance at once — made unmetered, given credits, moved into
/// a pool and out again — while requests spend from it: no lease is stranded (a clean close
/// returns every unit, so it succeeds) and the file checks clean.
fn two_admins_on_one_balance(durability: Durability, seed: u64) {
    let (_dir, path, config, ledger, account, pool) = setup(durability, 1_000_000);
    let key = ledger
        .keys()
        .create(NewKey::new(account.id, "k").credits(1_000))
        .unwrap();
    let (id, plain) = (key.info.id.to_string(), key.plaintext.expose().to_owned());
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (ledger, plain, stop) = (&ledger, &plain, &stop);
            s.spawn(move || {
                let presented = Presented::new(plain).unwrap();
                let mut n = t;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    if let Ok(grant) = ledger.verify(&Request::new(&presented, "/r").cost(3)) {
                        // Some settle below, at and above the reservation; some refund.
                        match n % 4 {
                            0 => drop(grant),
                            k => drop(grant.commit(k + 1)),
                        }
                    }
                }
            });
        }
        let admins: Vec<_> = (0..2u64)
            .map(|a| {
                let (ledger, id, pool_id) = (&ledger, &id, pool.id.to_string());
                s.spawn(move || {
                    let mut x = (seed * 2 + a + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    for _ in 0..150 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let update = match x % 4 {
                            0 => KeyUpdate::new().credits(None),
                            1 => KeyUpdate::new().credits(Some(500 + x % 100)),
                            2 => KeyUpdate::new().credits(None).pool(Some(&pool_id)),
                            _ => KeyUpdate::new().pool(None).credits(Some(700)),
                        };
                        // Refusals (credits for a key in the pool, say) are part of the race.
                        let _ = ledger.keys().update(id, update);
                    }
                })
            })
            .collect();
        for admin in admins {
            admin.join().unwrap();
        }
        stop.store(true, Ordering::Release);
    });
    ledger
        .close()
        .unwrap_or_else(|e| panic!("seed {seed}: a clean close returns every lease: {e}"));
    drop(ledger);
    let report = Ledger::check(&path, config).unwrap();
    assert!(report.is_ok(), "seed {seed}: {:?}", report.problems);
}

#[test]
fn two_admins_changing_one_balance_strand_no_lease_leased() {
    for seed in 0..8 {
        two_admins_on_one_balance(Durability::Leased, seed);
    }
}

#[test]
fn two_admins_changing_one_balance_strand_no_lease_exact() {
    for seed in 0..3 {
        two_admins_on_one_balance(Durability::Exact, seed);
    }
}
