//! The key-identification path as it stands before the verification cache: format check,
//! HMAC, one redb read per look-up. Compared with its floor (HMAC from a precomputed keyed
//! state alone) in the same run. `cargo bench --bench authenticate`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use hmac::{Hmac, KeyInit, Mac};
use keyledger::{Config, Ledger, NewAccount, NewKey, Presented};
use sha2::Sha256;

const KEYS: usize = 10_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path().join("bench.redb"), Config::ephemeral().unwrap()).unwrap();
    let owner = ledger
        .accounts()
        .create(NewAccount::new("bench"))
        .unwrap()
        .id;
    let presented: Vec<Presented> = (0..KEYS)
        .map(|i| {
            let key = ledger
                .keys()
                .create(NewKey::new(owner, format!("k{i}")))
                .unwrap();
            Presented::new(key.plaintext.expose()).unwrap()
        })
        .collect();

    let mut group = c.benchmark_group("identify");
    let mut i = 0;
    group.bench_function("floor_hmac_sha256", |b| {
        let state = Hmac::<Sha256>::new_from_slice(&[7u8; 32]).unwrap();
        b.iter(|| {
            i = (i + 7919) % KEYS;
            let mut mac = state.clone();
            mac.update(presented[i].expose().as_bytes());
            black_box(mac.finalize().into_bytes())
        })
    });
    group.bench_function("authenticate_redb_read", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            black_box(ledger.authenticate(&presented[i]).unwrap())
        })
    });
    let unknown = Presented::new("vb_live_0000000000000000000000000000000000000").unwrap();
    group.bench_function("authenticate_malformed", |b| {
        b.iter(|| black_box(ledger.authenticate(&unknown).unwrap_err()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
