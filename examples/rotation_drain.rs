//! What a hash-scheme rotation costs the keys in use: every key's first verify after it
//! misses under the new scheme, finds the key under the old one and rehashes it. Times those
//! first verifies from 4 threads (throughput, p50 / p99), each a miss and a rehash.
//!
//! ```sh
//! cargo run --release --example rotation_drain          # 2,000 keys
//! cargo run --release --example rotation_drain -- 10000
//! ```

use std::time::Instant;

use keyledger::{Config, HashScheme, Ledger, MasterKey, NewAccount, NewKey, Presented, Request};

const THREADS: usize = 4;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 2_000,
    };
    let dir = tempfile::tempdir()?;
    let config = Config::builder()
        .master_key(MasterKey::generate()?)
        .build()?;
    let ledger = Ledger::open(dir.path().join("keys.redb"), config)?;
    let owner = ledger.accounts().create(NewAccount::new("Acme"))?.id;
    let keys = (0..n)
        .map(|i| {
            let created = ledger
                .keys()
                .create(NewKey::new(owner.as_str(), format!("k{i}")))?;
            Ok(created.plaintext.expose().to_owned())
        })
        .collect::<keyledger::Result<Vec<String>>>()?;
    ledger.rotate_hash_scheme(HashScheme::HmacSha256 { pepper: 2 })?;

    let started = Instant::now();
    let mut latencies: Vec<u64> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (ledger, keys) = (&ledger, &keys);
                s.spawn(move || {
                    let mine = keys.iter().skip(t).step_by(THREADS);
                    mine.map(|key| {
                        let presented = Presented::new(key.as_str()).expect("a created key");
                        let t = Instant::now();
                        let granted = ledger.verify(&Request::new(&presented, "/x")).is_ok();
                        assert!(granted, "a key rotated away from still verifies");
                        t.elapsed().as_nanos() as u64
                    })
                    .collect::<Vec<u64>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect()
    });
    let wall = started.elapsed();
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] / 1_000;
    println!(
        "{n} first verifies after a rotation, {THREADS} threads: {:.0} a second, p50 {} µs, p99 {} µs",
        n as f64 / wall.as_secs_f64(),
        at(0.5),
        at(0.99),
    );
    println!("schemes now: {:?}", ledger.hash_scheme_counts()?);
    Ok(())
}
