//! Why verify + commit cannot come within 1.5× of the floor back to back: the floor's lead is
//! overlap between one request's last cache miss and the next request's first, and any work
//! placed after a request's last miss takes it away, however little and whatever it depends
//! on (docs/PERFORMANCE.md, "Twenty-seventh round").
//!
//! Every row runs `ITERS` operations on random keys of a 1M-key workload (the same keys as
//! `keyledger bench`), five rounds, interleaved; the medians are printed with their ratio to
//! the floor (HMAC-SHA256 → one map get → one CAS):
//! - `format, then floor` / `floor, then format`: the key format check `verify` runs first
//!   (prefix, length, alphabet, CRC-32), before the floor and after it;
//! - `floor + N steps after`: `N` rounds of four dependent rotate-and-xor steps on registers
//!   (no memory; ≈ 0.3 ns a step, as the `alone` rows measure), after the floor's CAS. `independent` seeds them from the request's index, `dependent` from the CAS's
//!   result;
//! - `N steps alone`: the same work without the floor, what it costs by itself.
//!
//! ```sh
//! cargo run --release --example overlap                 # 1M keys, ≈ 2 minutes
//! cargo run --release --example overlap -- 100000
//! ```

use std::hint::black_box;
use std::time::Instant;

use keyledger::bench_support::{Floor, Indices, Options, Workload};

const ITERS: usize = 2_000_000;
const ROUNDS: usize = 5;

/// `N` rounds of four dependent register steps: work that touches no memory.
#[inline(always)]
fn steps<const N: usize>(seed: u64) -> u64 {
    let (mut a, mut b, mut c, mut d) = (seed, seed ^ 0x55, seed ^ 0xaa, seed ^ 0xff);
    for _ in 0..N {
        a = a.rotate_left(7) ^ d;
        b = b.rotate_left(11) ^ a;
        c = c.rotate_left(13) ^ b;
        d = d.rotate_left(17) ^ c;
    }
    a ^ b ^ c ^ d
}

fn main() -> keyledger::Result<()> {
    let keys: usize = std::env::args()
        .nth(1)
        .map_or(1_000_000, |s| s.parse().expect("a key count"));
    let work = Workload::build(&Options::new(keys), &mut |_| {})?;
    let floor = Floor::new(&work.keys);
    let floor = |i: usize| floor.check(&work.keys[i]);
    macro_rules! after {
        ($n:expr, independent) => {
            Box::new(move |i: usize| {
                let granted = floor(i);
                black_box(steps::<$n>(black_box(i as u64)));
                granted
            })
        };
        ($n:expr, dependent) => {
            Box::new(move |i: usize| {
                let granted = floor(i);
                black_box(steps::<$n>(granted as u64 ^ i as u64));
                granted
            })
        };
    }
    type Row<'a> = (&'a str, Box<dyn Fn(usize) -> bool + 'a>);
    let rows: Vec<Row> = vec![
        ("floor", Box::new(floor)),
        (
            "format, then floor",
            Box::new(|i| work.format_check(i) && floor(i)),
        ),
        (
            "floor, then format",
            Box::new(|i| floor(i) && work.format_check(i)),
        ),
        ("floor + 8 steps after, independent", after!(8, independent)),
        (
            "floor + 25 steps after, independent",
            after!(25, independent),
        ),
        (
            "floor + 100 steps after, independent",
            after!(100, independent),
        ),
        ("floor + 8 steps after, dependent", after!(8, dependent)),
        ("floor + 25 steps after, dependent", after!(25, dependent)),
        (
            "8 steps alone",
            Box::new(|i| steps::<8>(black_box(i as u64)) == 1),
        ),
        (
            "25 steps alone",
            Box::new(|i| steps::<25>(black_box(i as u64)) == 1),
        ),
        (
            "100 steps alone",
            Box::new(|i| steps::<100>(black_box(i as u64)) == 1),
        ),
    ];
    let mut indices = Indices::new(7);
    let mut times = vec![Vec::new(); rows.len()];
    for _ in 0..ROUNDS {
        for (r, (_, run)) in rows.iter().enumerate() {
            let start = Instant::now();
            for _ in 0..ITERS {
                black_box(run(indices.next_below(keys)));
            }
            times[r].push(start.elapsed().as_nanos() as f64 / ITERS as f64);
        }
    }
    println!("{keys} keys, median of {ROUNDS} rounds of {ITERS} operations:");
    let mut floor_ns = 0.0;
    for ((name, _), t) in rows.iter().zip(times.iter_mut()) {
        t.sort_by(f64::total_cmp);
        let median = t[ROUNDS / 2];
        if floor_ns == 0.0 {
            floor_ns = median;
        }
        println!(
            "  {name:<38} {median:>6.0} ns  {:.2}× the floor",
            median / floor_ns
        );
    }
    work.ledger.clone().simulate_crash();
    Ok(())
}
