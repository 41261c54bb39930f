//! What rate limits add to a cache hit: verify + commit(1) on one cached key without limits,
//! and on one with two named limits and a token window (large enough never to refuse).
//!
//! `cargo bench --bench limits`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use keyledger::{Config, Ledger, NewAccount, NewKey, Presented, Request};

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("scratch directory");
    let ledger = Ledger::open(dir.path().join("limits.redb"), Config::ephemeral().unwrap())
        .expect("open a scratch ledger");
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

    let mut group = c.benchmark_group("limits");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    for (name, key) in [("none", &plain), ("two_named_and_tokens", &limited)] {
        let request = Request::new(key, "/api/run");
        group.bench_function(name, |b| {
            b.iter(|| black_box(ledger.verify(&request).expect("granted").commit(1)))
        });
    }
    group.finish();
    ledger.close().expect("close");
}

criterion_group!(benches, bench);
criterion_main!(benches);
