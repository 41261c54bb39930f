//! What the number of route rules costs a cache-hit verify + commit: one key holding
//! `svc:*`, N rules `/api/v1/rNNN/` each needing `svc:rNNN`, and requests for the rule the
//! longest-prefix search reaches first and for the one it reaches last. Medians of 7 rounds
//! of 500,000 requests each, per N, in one run.
//!
//! ```sh
//! cargo run --release --example route_rules
//! ```
use std::time::Instant;

use keyledger::{Config, Ledger, MasterKey, NewAccount, NewKey, Presented, Request, RouteRule};

const ROUNDS: usize = 7;
const OPS: usize = 500_000;

fn main() {
    println!("rules  first rule ns  last rule ns");
    for rules in [1usize, 16, 64, 65, 256] {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::builder()
            .master_key(MasterKey::generate().unwrap())
            .build()
            .unwrap();
        let ledger = Ledger::open(dir.path().join("k.redb"), config).unwrap();
        for i in 0..rules {
            let rule = RouteRule::new(format!("/api/v1/r{i:03}/")).permission(format!("svc:r{i}"));
            ledger.routes().set(rule).unwrap();
        }
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let key = NewKey::new(owner.id.as_str(), "k").permissions(["svc:*"]);
        let created = ledger.keys().create(key).unwrap();
        let key = Presented::new(created.plaintext.expose()).unwrap();
        let first = "/api/v1/r000/x".to_owned();
        let last = format!("/api/v1/r{:03}/x", rules - 1);
        let time = |route: &str| {
            let mut rounds: Vec<f64> = (0..ROUNDS)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..OPS {
                        ledger.verify(&Request::new(&key, route)).unwrap().commit(0);
                    }
                    t.elapsed().as_nanos() as f64 / OPS as f64
                })
                .collect();
            rounds.sort_by(f64::total_cmp);
            rounds[ROUNDS / 2]
        };
        let (first_ns, last_ns) = (time(&first), time(&last));
        println!("{rules:>5}  {first_ns:>13.0}  {last_ns:>12.0}");
        ledger.close().unwrap();
    }
}
