//! The verify hot path against its floor, on one scratch ledger (`keyledger::bench_support`).
//!
//! `cargo bench --bench verify` (keys: `KEYLEDGER_BENCH_KEYS`, default 100,000 so that a
//! criterion run stays short; `keyledger bench` runs 1,000,000).
//!
//! - `hit/floor` vs `hit/verify_commit`: HMAC-SHA256 → map get → CAS, vs verify + commit(1)
//!   on a cached key, the same random key stream over the same key set.
//! - `threads/{disjoint,hot}/{1,2}`: aggregate time per op with 1 and 2 threads, on disjoint
//!   halves of the key set and on one hot key (whose units are then checked: none lost or
//!   double-counted).
//! - `refill/N`: the writer leasing more credits to N keys at once (one transaction, one
//!   durable commit per batch; the commits per batch are printed).
//! - `miss/peek`: verify (cost 0) with a 1,024-entry cache over the whole key set, so nearly
//!   every call is a miss: one redb look-up, then the entry is cached (evicting another).
//!
//! After criterion's own report, a summary measures the ratios again as medians of
//! alternating rounds and prints them with the miss p50/p99.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keyledger::bench_support::{Floor, Indices, Options, Workload, percentile};

fn key_count() -> usize {
    std::env::var("KEYLEDGER_BENCH_KEYS")
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(100_000)
}

fn ready(keys: usize) -> Workload {
    let t = Instant::now();
    let work = Workload::build(&Options::new(keys), &mut |_| {}).expect("build the ledger");
    let built = t.elapsed();
    assert_eq!(work.warm(&mut |_| {}), keys, "every key verifies");
    let commits = work.prime_leases().expect("lease credits");
    eprintln!(
        "setup: {keys} keys built in {:.1} s, cached and leased in {:.1} s ({commits} writer commits)",
        built.as_secs_f64(),
        (t.elapsed() - built).as_secs_f64()
    );
    work
}

fn bench(c: &mut Criterion) {
    let keys = key_count();
    let work = ready(keys);
    let floor = Floor::new(&work.keys);
    let n = work.keys.len();

    let mut group = c.benchmark_group("hit");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    let mut idx = Indices::new(1);
    group.bench_function("floor", |b| {
        b.iter(|| black_box(floor.check(&work.keys[idx.next_below(n)])))
    });
    let mut idx = Indices::new(1);
    group.bench_function("verify_commit", |b| {
        b.iter(|| black_box(work.verify_commit(idx.next_below(n))))
    });
    group.finish();

    let mut group = c.benchmark_group("threads");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));
    group.sample_size(20);
    for threads in [1, 2] {
        group.bench_function(format!("disjoint/{threads}"), |b| {
            b.iter_custom(|iters| parallel(&work, threads, iters, Pick::Disjoint))
        });
    }
    let hot_before = hot_remaining(&work);
    let mut hot_ops = 0u64;
    for threads in [1, 2] {
        group.bench_function(format!("hot/{threads}"), |b| {
            b.iter_custom(|iters| {
                hot_ops += iters * threads as u64;
                parallel(&work, threads, iters, Pick::Hot)
            })
        });
    }
    group.finish();
    let hot_after = hot_remaining(&work);
    assert_eq!(
        hot_before - hot_after,
        hot_ops,
        "one hot key: every granted unit counted once"
    );
    eprintln!("hot key: {hot_ops} grants, {hot_ops} units gone from its balance: exact");

    let mut group = c.benchmark_group("refill");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(2));
    group.warm_up_time(Duration::from_millis(500));
    for batch in [1usize, 64, 1_024, 8_192.min(n)] {
        let mut commits = 0;
        let mut batches = 0;
        group.bench_function(format!("{batch}"), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    commits += work.refill_batch(batch).expect("refill");
                    batches += 1;
                }
                t.elapsed()
            })
        });
        eprintln!(
            "refill batch of {batch} keys: {:.2} writer commits per batch",
            commits as f64 / batches as f64
        );
    }
    group.finish();

    let summary = summarize(&work, &floor);
    drop(floor);

    let work = work.reopen(Some(1_024)).expect("reopen with a small cache");
    let mut group = c.benchmark_group("miss");
    group.measurement_time(Duration::from_secs(3));
    let mut idx = Indices::new(7);
    group.bench_function("peek", |b| {
        b.iter(|| black_box(work.peek(idx.next_below(n))))
    });
    group.finish();
    let (miss_p50, miss_p99) = miss_latency(&work, 50_000);
    let cached = work.ledger.stats().cached_entries;
    work.ledger.close().expect("close");

    println!("\nverify bench summary ({keys} keys; medians of 5 alternating rounds)");
    println!(
        "  hit: floor {:.0} ns, verify+commit {:.0} ns  → ratio {:.2}× (target ≤ 1.5×)",
        summary.floor_ns,
        summary.verify_ns,
        summary.verify_ns / summary.floor_ns
    );
    println!(
        "  threads, disjoint keys: 1 → {:.0} ns/op, 2 → {:.0} ns/op  → speed-up {:.2}× (target ≥ 1.7×)",
        summary.disjoint[0],
        summary.disjoint[1],
        summary.disjoint[0] / summary.disjoint[1]
    );
    println!(
        "  threads, one hot key:   1 → {:.0} ns/op, 2 → {:.0} ns/op  → speed-up {:.2}×",
        summary.hot[0],
        summary.hot[1],
        summary.hot[0] / summary.hot[1]
    );
    println!(
        "  miss (peek, cache of 1,024 over {keys}; {cached} cached at the end): p50 {miss_p50} ns, p99 {miss_p99} ns (target p99 ≤ 3,000 ns on 1M keys)"
    );
}

/// Which keys the threads of a parallel run use.
#[derive(Clone, Copy)]
enum Pick {
    /// Thread `t` of `T` draws from its own `1/T` of the keys.
    Disjoint,
    /// Every thread uses key 0.
    Hot,
}

/// `threads` threads each run `iters` verify + commit; returns wall time / threads (time per
/// op at the aggregate rate).
fn parallel(work: &Workload, threads: usize, iters: u64, pick: Pick) -> Duration {
    let n = work.keys.len();
    let share = n / threads;
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut idx = Indices::new(100 + t as u64);
                for _ in 0..iters {
                    let i = match pick {
                        Pick::Disjoint => t * share + idx.next_below(share),
                        Pick::Hot => 0,
                    };
                    assert!(work.verify_commit(i), "granted");
                }
            });
        }
    });
    start.elapsed() / threads as u32
}

/// Credits key 0 has left (durable balance + lease), through a peek.
fn hot_remaining(work: &Workload) -> u64 {
    // Let any lease in flight land first: its units count once it is committed.
    work.ledger.flush().expect("flush");
    let grant = work
        .ledger
        .verify(&work.request(0).cost(0))
        .expect("key 0 verifies");
    grant.remaining_credits().expect("metered")
}

struct Summary {
    floor_ns: f64,
    verify_ns: f64,
    disjoint: [f64; 2],
    hot: [f64; 2],
}

/// Medians of 5 alternating rounds: floor, verify+commit, 1 and 2 threads.
fn summarize(work: &Workload, floor: &Floor) -> Summary {
    const ROUNDS: usize = 5;
    const OPS: u64 = 10_000;
    let n = work.keys.len();
    let mut f = Vec::new();
    let mut v = Vec::new();
    let mut d = [Vec::new(), Vec::new()];
    let mut h = [Vec::new(), Vec::new()];
    let per_op = |d: Duration, ops: u64| d.as_nanos() as f64 / ops as f64;
    for round in 0..ROUNDS {
        let mut idx = Indices::new(round as u64 + 11);
        let t = Instant::now();
        for _ in 0..OPS {
            black_box(floor.check(&work.keys[idx.next_below(n)]));
        }
        f.push(per_op(t.elapsed(), OPS));
        let mut idx = Indices::new(round as u64 + 11);
        let t = Instant::now();
        for _ in 0..OPS {
            black_box(work.verify_commit(idx.next_below(n)));
        }
        v.push(per_op(t.elapsed(), OPS));
        for (slot, threads) in [1usize, 2].into_iter().enumerate() {
            d[slot].push(per_op(parallel(work, threads, OPS, Pick::Disjoint), OPS));
            h[slot].push(per_op(parallel(work, threads, OPS, Pick::Hot), OPS));
        }
    }
    Summary {
        floor_ns: median(f),
        verify_ns: median(v),
        disjoint: [median(d[0].clone()), median(d[1].clone())],
        hot: [median(h[0].clone()), median(h[1].clone())],
    }
}

/// p50 and p99 of `ops` single peeks on random keys.
fn miss_latency(work: &Workload, ops: usize) -> (u64, u64) {
    let n = work.keys.len();
    let mut idx = Indices::new(99);
    let mut samples: Vec<u64> = (0..ops)
        .map(|_| {
            let i = idx.next_below(n);
            work.touch_key(i);
            let t = Instant::now();
            black_box(work.peek(i));
            t.elapsed().as_nanos() as u64
        })
        .collect();
    samples.sort_unstable();
    (percentile(&samples, 50.0), percentile(&samples, 99.0))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

criterion_group!(benches, bench);
criterion_main!(benches);
