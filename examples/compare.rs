//! keyledger verify + commit against the same check as one SQLite transaction per request.
//!
//! `cargo run --release --example compare -- [--json] [--keys N] [--seconds S]`
//! (defaults: 100,000 keys, 4 s per contender; well under a minute in all).
//!
//! SQLite: `benches/support/sqlite.rs` (rusqlite, bundled, WAL, `synchronous=FULL` and
//! `synchronous=NORMAL`; one transaction per request). keyledger: the full verify chain and
//! commit(1) on the scratch ledger of `keyledger::bench_support`, cache warm. Both draw keys
//! from the same random index stream over the same number of keys. `cargo bench --bench
//! sqlite` measures the same three with criterion.

use std::time::{Duration, Instant};

use keyledger::bench_support::{Indices, Options, Workload};

#[path = "../benches/support/sqlite.rs"]
mod sqlite;

struct Args {
    json: bool,
    keys: usize,
    seconds: f64,
}

fn args() -> Args {
    let mut out = Args {
        json: false,
        keys: 100_000,
        seconds: 4.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => out.json = true,
            "--keys" => out.keys = value("--keys", it.next(), |&n: &usize| n >= 1),
            "--seconds" => {
                out.seconds = value("--seconds", it.next(), |s: &f64| {
                    (0.1..=3_600.0).contains(s)
                })
            }
            other => {
                eprintln!(
                    "unknown argument {other}; usage: compare [--json] [--keys N] [--seconds S]"
                );
                std::process::exit(2);
            }
        }
    }
    out
}

/// The value after `flag`, parsed and in range, or exit 2 saying so.
fn value<T: std::str::FromStr>(flag: &str, given: Option<String>, ok: impl Fn(&T) -> bool) -> T {
    match given.as_deref().map(str::parse) {
        Some(Ok(v)) if ok(&v) => v,
        _ => {
            eprintln!("{flag}: expected a number (keys at least 1, seconds 0.1 to 3600)");
            std::process::exit(2);
        }
    }
}

/// Requests per second of `op` on random key indices for `seconds`.
fn rate(seconds: f64, n: usize, seed: u64, mut op: impl FnMut(usize) -> bool) -> (f64, u64) {
    let mut idx = Indices::new(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let (mut ops, mut refused) = (0u64, 0u64);
    loop {
        for _ in 0..16 {
            refused += u64::from(!op(idx.next_below(n)));
        }
        ops += 16;
        if Instant::now() >= deadline {
            break;
        }
    }
    (ops as f64 / start.elapsed().as_secs_f64(), refused)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args();
    let work = Workload::build(&Options::new(args.keys), &mut |_| {})?;
    assert_eq!(work.warm(&mut |_| {}), args.keys);
    work.prime_leases()?;
    let n = work.keys.len();
    let (keyledger, refused_k) = rate(args.seconds, n, 1, |i| work.verify_commit(i));
    // A clean close returns every key's lease (one record write each): its time is reported.
    // Closed before SQLite runs, so that keyledger's writer does no work during them.
    let closing = std::time::Instant::now();
    work.ledger.close()?;
    let close_seconds = closing.elapsed().as_secs_f64();

    let dir = tempfile::tempdir()?;
    let mut sqlite_rates = Vec::new();
    for synchronous in ["FULL", "NORMAL"] {
        let baseline = sqlite::Baseline::new(dir.path(), synchronous, &work.keys)?;
        let (r, refused) = rate(args.seconds, n, 1, |i| baseline.check(&work.keys[i]));
        assert_eq!(refused, 0, "every SQLite request is granted");
        sqlite_rates.push(r);
    }
    assert_eq!(refused_k, 0, "every keyledger request is granted");
    let (full, normal) = (sqlite_rates[0], sqlite_rates[1]);
    let report = serde_json::json!({
        "keys": n,
        "seconds_per_contender": args.seconds,
        "keyledger_ops_per_sec": keyledger.round(),
        "sqlite_full_ops_per_sec": full.round(),
        "sqlite_normal_ops_per_sec": normal.round(),
        "keyledger_us_per_op": 1e6 / keyledger,
        "sqlite_full_us_per_op": 1e6 / full,
        "sqlite_normal_us_per_op": 1e6 / normal,
        "keyledger_close_seconds": close_seconds,
        "speedup_vs_sqlite_full": keyledger / full,
        "speedup_vs_sqlite_normal": keyledger / normal,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{n} keys, one thread, {:.1} s each", args.seconds);
        println!(
            "  keyledger verify+commit {keyledger:>12.0} /s   {:>8.2} µs",
            1e6 / keyledger
        );
        println!(
            "  SQLite WAL FULL         {full:>12.0} /s   {:>8.2} µs   → {:.0}× (target ≥ 100×)",
            1e6 / full,
            keyledger / full
        );
        println!(
            "  SQLite WAL NORMAL       {normal:>12.0} /s   {:>8.2} µs   → {:.0}× (target ≥ 25×)",
            1e6 / normal,
            keyledger / normal
        );
        println!("  keyledger clean close (every lease returned): {close_seconds:.2} s");
    }
    Ok(())
}
