//! What an import costs a ledger whose cache is full: 1M keys, all cached, then imports one
//! at a time (each makes every remembered miss stale), timed alone and as the longest
//! cache-hit peek (verify at cost 0) another thread saw meanwhile. Medians of 15 imports.
//!
//! ```sh
//! cargo run --release --example import_stall
//! ```
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keyledger::bench_support::{Options, Workload};
use keyledger::{ImportKey, ImportedHash, NewAccount};

const KEYS: usize = 1_000_000;
const IMPORTS: usize = 15;

fn main() {
    let w = Workload::build(&Options::new(KEYS), &mut |_| {}).unwrap();
    assert_eq!(w.warm(&mut |_| {}), KEYS, "every key cached");
    let owner = w
        .ledger
        .accounts()
        .create(NewAccount::new("Imports"))
        .unwrap();
    let stop = AtomicBool::new(false);
    let (mut imports, worst) = std::thread::scope(|s| {
        let worst = s.spawn(|| {
            let mut worst = Duration::ZERO;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                w.peek(i % KEYS);
                worst = worst.max(t.elapsed());
                i += 7919;
            }
            worst
        });
        let imports: Vec<Duration> = (0..IMPORTS)
            .map(|n| {
                let hash = ImportedHash::Sha256(*blake3::hash(&n.to_le_bytes()).as_bytes());
                let key =
                    ImportKey::new(owner.id.as_str(), "imported", hash, "vb_live_AbCd", "wxyz");
                let t = Instant::now();
                w.ledger.keys().import(key).unwrap();
                t.elapsed()
            })
            .collect();
        stop.store(true, Ordering::Relaxed);
        (imports, worst.join().unwrap())
    });
    imports.sort();
    println!(
        "import median {:.2} ms (min {:.2}, max {:.2}); longest concurrent peek {:.2} ms",
        imports[IMPORTS / 2].as_secs_f64() * 1e3,
        imports[0].as_secs_f64() * 1e3,
        imports[IMPORTS - 1].as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3
    );
}
