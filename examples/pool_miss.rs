//! What a cache miss costs on keys that spend from a shared pool: 4,000 keys over 8 pools,
//! a cache of 256 entries (nearly every verify misses), 90,000 timed peeks (`cost(0)`) on
//! random keys after 10,000 untimed ones; prints p50, p90 and p99.
//!
//! ```sh
//! cargo run --release --example pool_miss
//! ```
use keyledger::{Config, Ledger, MasterKey, NewAccount, NewKey, NewPool, Presented, Request};
use std::time::Instant;

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::builder()
        .master_key(MasterKey::generate().unwrap())
        .cache_capacity(256)
        .build()
        .unwrap();
    let ledger = Ledger::open(dir.path().join("k.redb"), config).unwrap();
    let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let pools: Vec<_> = (0..8)
        .map(|i| {
            ledger
                .credits()
                .create_pool(NewPool::new(owner.id, format!("p{i}")).credits(1_000_000_000))
                .unwrap()
        })
        .collect();
    let keys: Vec<String> = (0..4_000)
        .map(|i| {
            let k = NewKey::new(owner.id.as_str(), "k").pool(pools[i % 8].id);
            ledger
                .keys()
                .create(k)
                .unwrap()
                .plaintext
                .expose()
                .to_owned()
        })
        .collect();
    let presented: Vec<Presented> = keys.iter().map(|k| Presented::new(k).unwrap()).collect();
    let mut samples = Vec::new();
    let mut x: u64 = 12345;
    for round in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % presented.len() as u64) as usize;
        let t = Instant::now();
        let g = ledger.verify(&Request::new(&presented[i], "/x").cost(0));
        let ns = t.elapsed().as_nanos() as u64;
        assert!(g.is_ok());
        drop(g);
        if round > 10_000 {
            samples.push(ns);
        }
    }
    samples.sort_unstable();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "pool miss p50 {} ns p90 {} p99 {} ns",
        p(0.5),
        p(0.9),
        p(0.99)
    );
    ledger.close().unwrap();
}
