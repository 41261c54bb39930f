//! keyledger verify + commit against the same check as one SQLite transaction per request.
//!
//! `cargo run --release --example compare -- [--json] [--keys N] [--seconds S]`
//! (defaults: 100,000 keys, 4 s per contender; well under a minute in all).
//!
//! SQLite (rusqlite, bundled, WAL; `synchronous=FULL`, the same durability promise as
//! keyledger's group-committed leases, and `synchronous=NORMAL`): per request, hash the
//! presented key with HMAC-SHA256 from a precomputed keyed state (as keyledger does), then
//! `BEGIN IMMEDIATE`; `SELECT` the key's state, expiry and credits by hash; check them;
//! `UPDATE` credits = credits − 1 when credits ≥ 1; `COMMIT`. keyledger: the full verify
//! chain and commit(1) on the scratch ledger of `keyledger::bench_support`, cache warm. Both
//! draw keys from the same random index stream over the same number of keys.

use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use keyledger::Presented;
use keyledger::bench_support::{Indices, Options, Workload};
use rusqlite::{Connection, params};
use sha2::Sha256;

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

/// A SQLite database in `dir` holding the same keys (by HMAC hash).
fn sqlite(
    dir: &std::path::Path,
    synchronous: &str,
    state: &Hmac<Sha256>,
    keys: &[Presented],
) -> rusqlite::Result<Connection> {
    let conn = Connection::open(dir.join(format!("compare-{synchronous}.sqlite")))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.execute_batch(
        "CREATE TABLE keys (
             hash BLOB PRIMARY KEY,
             disabled INTEGER NOT NULL,
             expires_at INTEGER,
             credits INTEGER NOT NULL
         ) WITHOUT ROWID;",
    )?;
    let tx = conn.unchecked_transaction()?;
    {
        let mut insert = tx.prepare(
            "INSERT INTO keys (hash, disabled, expires_at, credits) VALUES (?1, 0, NULL, ?2)",
        )?;
        for key in keys {
            insert.execute(params![hash(state, key).as_slice(), 1_000_000_000_000i64])?;
        }
    }
    tx.commit()?;
    Ok(conn)
}

fn hash(state: &Hmac<Sha256>, key: &Presented) -> [u8; 32] {
    let mut mac = state.clone();
    mac.update(key.expose().as_bytes());
    mac.finalize().into_bytes().into()
}

/// One request as one SQLite transaction: look up, check, decrement.
fn sqlite_check(conn: &Connection, state: &Hmac<Sha256>, key: &Presented, now: i64) -> bool {
    let h = hash(state, key);
    let run = || -> rusqlite::Result<bool> {
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let row: Option<(i64, Option<i64>, i64)> = {
            let mut select = conn
                .prepare_cached("SELECT disabled, expires_at, credits FROM keys WHERE hash = ?1")?;
            let mut rows = select.query(params![h.as_slice()])?;
            match rows.next()? {
                Some(r) => Some((r.get(0)?, r.get(1)?, r.get(2)?)),
                None => None,
            }
        };
        let ok = matches!(row, Some((0, expires, credits))
            if expires.is_none_or(|e| e > now) && credits >= 1);
        if ok {
            conn.prepare_cached(
                "UPDATE keys SET credits = credits - 1 WHERE hash = ?1 AND credits >= 1",
            )?
            .execute(params![h.as_slice()])?;
        }
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(ok)
    };
    run().unwrap_or_else(|_| {
        let _ = conn.execute_batch("ROLLBACK");
        false
    })
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
    let mut pepper = [0u8; 32];
    pepper[0] = 1;
    let state = Hmac::<Sha256>::new_from_slice(&pepper)?;
    let now = 1_700_000_000_000i64;
    let mut sqlite_rates = Vec::new();
    for synchronous in ["FULL", "NORMAL"] {
        let conn = sqlite(dir.path(), synchronous, &state, &work.keys)?;
        let (r, refused) = rate(args.seconds, n, 1, |i| {
            sqlite_check(&conn, &state, &work.keys[i], now)
        });
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
