//! keyledger verify + commit against the same check as one SQLite transaction per request
//! (`support/sqlite.rs`: WAL, `synchronous=FULL` and `synchronous=NORMAL`), same keys, same
//! random key stream.
//!
//! `cargo bench --bench sqlite` (keys: `KEYLEDGER_BENCH_KEYS`, default 100,000). After
//! criterion's report, a summary runs each contender for 2 s in turn and prints the speed-ups
//! against the targets (≥ 100× FULL, ≥ 25× NORMAL). `cargo run --release --example compare --
//! --json` prints the same comparison as JSON.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keyledger::bench_support::{Indices, Options, Workload};

#[path = "support/sqlite.rs"]
mod sqlite;

fn key_count() -> usize {
    std::env::var("KEYLEDGER_BENCH_KEYS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(100_000)
}

/// Operations per second of `op` over `seconds`, on the same index stream as criterion's runs.
fn rate(seconds: f64, n: usize, mut op: impl FnMut(usize) -> bool) -> f64 {
    let mut idx = Indices::new(1);
    let start = Instant::now();
    let mut ops = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        for _ in 0..16 {
            assert!(op(idx.next_below(n)), "every request is granted");
        }
        ops += 16;
    }
    ops as f64 / start.elapsed().as_secs_f64()
}

fn bench(c: &mut Criterion) {
    let keys = key_count();
    let work = Workload::build(&Options::new(keys), &mut |_| {}).expect("build the ledger");
    assert_eq!(work.warm(&mut |_| {}), keys, "every key verifies");
    work.prime_leases().expect("lease credits");
    let n = work.keys.len();

    let mut group = c.benchmark_group("per_request");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    let mut idx = Indices::new(1);
    group.bench_function("keyledger_verify_commit", |b| {
        b.iter(|| black_box(work.verify_commit(idx.next_below(n))))
    });
    let keyledger = rate(2.0, n, |i| work.verify_commit(i));
    // Closed before SQLite runs, so that keyledger's writer does no work during it.
    work.ledger.close().expect("close");

    let dir = tempfile::tempdir().expect("scratch directory");
    let mut rates = Vec::new();
    for synchronous in ["FULL", "NORMAL"] {
        let baseline =
            sqlite::Baseline::new(dir.path(), synchronous, &work.keys).expect("SQLite baseline");
        group.sample_size(10);
        let mut idx = Indices::new(1);
        group.bench_function(format!("sqlite_{}", synchronous.to_lowercase()), |b| {
            b.iter(|| black_box(baseline.check(&work.keys[idx.next_below(n)])))
        });
        rates.push(rate(2.0, n, |i| baseline.check(&work.keys[i])));
    }
    group.finish();

    let (full, normal) = (rates[0], rates[1]);
    println!("\nSQLite bench summary ({keys} keys, one thread, 2 s each)");
    println!("  keyledger verify+commit {keyledger:>12.0} /s");
    println!(
        "  SQLite WAL FULL         {full:>12.0} /s  → {:.1}× (target ≥ 100×)",
        keyledger / full
    );
    println!(
        "  SQLite WAL NORMAL       {normal:>12.0} /s  → {:.1}× (target ≥ 25×)",
        keyledger / normal
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
