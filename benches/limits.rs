//! What rate limits add to a cache hit: verify + commit(1) on one cached key without limits,
//! on one with two named limits and a token window (large enough never to refuse), and on
//! such a key that has reached a spend tier (of a ledger with tiers configured).
//!
//! `cargo bench --bench limits`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keyledger::{Config, Ledger, NewAccount, NewKey, Presented, Request, SpendTier};

/// A scratch ledger `name` with `tiers` and one key of each kind: (ledger, unlimited,
/// limited).
fn ledger(
    dir: &tempfile::TempDir,
    name: &str,
    tiers: Vec<SpendTier>,
) -> (Ledger, Presented, Presented) {
    let config = Config::builder()
        .master_key(keyledger::MasterKey::generate().unwrap())
        .spend_tiers(tiers)
        .build()
        .unwrap();
    let ledger = Ledger::open(dir.path().join(name), config).expect("open a scratch ledger");
    let owner = ledger
        .accounts()
        .create(NewAccount::new("Bench"))
        .unwrap()
        .id;
    let key = |new: NewKey| {
        let created = ledger.keys().create(new).expect("create a key");
        Presented::new(created.plaintext.expose()).expect("a well-formed key")
    };
    let plain = key(NewKey::new(owner, "unlimited"));
    let limited = key(NewKey::new(owner, "limited")
        .rate_limit("second", 1_000_000_000, 1)
        .rate_limit("minute", 60_000_000_000, 60)
        .token_window(60_000_000_000, 60));
    (ledger, plain, limited)
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("scratch directory");
    let (base, plain, limited) = ledger(&dir, "base.redb", Vec::new());
    // Reached from the first unit spent: every request runs at 150 %.
    let (tiered, _, at_tier) = ledger(&dir, "tiered.redb", vec![SpendTier::multiplier(1, 150)]);

    let mut group = c.benchmark_group("limits");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for (name, ledger, key) in [
        ("none", &base, &plain),
        ("two_named_and_tokens", &base, &limited),
        ("two_named_and_tokens_at_a_tier", &tiered, &at_tier),
    ] {
        let request = Request::new(key, "/api/run");
        group.bench_function(name, |b| {
            b.iter(|| black_box(ledger.verify(&request).expect("granted").commit(1)))
        });
    }
    group.finish();
    base.close().expect("close");
    tiered.close().expect("close");
}

criterion_group!(benches, bench);
criterion_main!(benches);
