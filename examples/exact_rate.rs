//! Verify + commit(1) per second under `Durability::Exact` (every reservation a durable
//! group commit), with 1 thread on one key and 4 threads on a key each: 400 requests a
//! thread. The figure is the disk's fsync rate shared out by group commit.
//!
//! ```sh
//! cargo run --release --example exact_rate
//! ```
use keyledger::{Config, Durability, Ledger, MasterKey, NewAccount, NewKey, Presented, Request};
use std::time::Instant;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::builder()
        .master_key(MasterKey::generate().unwrap())
        .durability(Durability::Exact)
        .build()
        .unwrap();
    let ledger = Ledger::open(dir.path().join("k.redb"), config).unwrap();
    let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let keys: Vec<Presented> = (0..4)
        .map(|_| {
            let k = NewKey::new(owner.id.as_str(), "k").credits(1_000_000);
            Presented::new(ledger.keys().create(k).unwrap().plaintext.expose()).unwrap()
        })
        .collect();
    for threads in [1usize, 4] {
        let n = 400;
        let t = Instant::now();
        std::thread::scope(|s| {
            for key in keys.iter().take(threads) {
                let ledger = &ledger;
                s.spawn(move || {
                    for _ in 0..n {
                        ledger
                            .verify(&Request::new(key, "/x").cost(1))
                            .unwrap()
                            .commit(1);
                    }
                });
            }
        });
        let rate = (n * threads) as f64 / t.elapsed().as_secs_f64();
        println!("{threads} threads: {rate:.0} verify+commit/s");
    }
    ledger.close().unwrap();
}
