//! What keeping a key's hot fields in the cache table's own slot would buy (DESIGN §9: "keep
//! the hot fields in the map slot"), measured against `keyledger bench`'s floor on the same
//! keys. A prototype of the layout only — not the engine: no writer, no admin changes, no
//! eviction — to decide whether the redesign that the 1.5× and 256-byte targets need is worth
//! building (docs/PERFORMANCE.md, "Fifth round").
//!
//! The prototype: 256 shards behind `parking_lot` read locks (as the cache), open addressing
//! over 64-byte slots aligned to a cache line, each holding the hash's key and tag, expiry,
//! permission bits, the credit lease, spend, request count and last use. `verify` hashes,
//! read-locks the shard, finds the slot, checks expiry and the route's bit, takes one unit
//! from the lease with a CAS and returns the slot's place; `commit` locks the shard again and
//! counts the spend and the request in the same line — the two phases a `Grant` has.
//!
//! ```sh
//! cargo run --release --example slot_floor                        # 1M keys, ≈ 30 s
//! cargo run --release --example slot_floor -- 100000
//! cargo run --release --example slot_floor -- 1000000 one-phase  # commit inside verify
//! cargo run --release --example slot_floor -- 1000000 no-clock   # no clock read at all
//! ```
//!
//! The two variants take out, one at a time, what the layout alone does not: `one-phase`
//! counts the spend in verify's own lock section (no second round trip to the shard lock),
//! `no-clock` skips reading the clock (no expiry check against the time, no last use).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hmac::{Hmac, KeyInit, Mac};
use keyledger::bench_support::{Floor, Indices};
use keyledger::{Clock, CoarseClock, Presented};
use parking_lot::RwLock;
use sha2::Sha256;

const SHARDS: usize = 256;
const ROUTE_BIT: u64 = 1 << 3;
const OPS: usize = 2_000_000;
const ROUNDS: usize = 5;

/// One cache line: everything a cache-hit verify and its commit read or write.
#[repr(C, align(64))]
#[derive(Default)]
struct Slot {
    /// Bytes 0..8 of the hash with the low bit set (0: empty).
    key: u64,
    /// Bytes 8..16 of the hash.
    tag: u64,
    expires_at_ms: u64,
    permission_bits: u64,
    lease: AtomicU64,
    spent: AtomicU64,
    requests: AtomicU64,
    last_used_ms: AtomicU64,
}

struct Shard {
    slots: Box<[Slot]>,
}

impl Shard {
    fn home(&self, key: u64) -> usize {
        ((key as u128 * self.slots.len() as u128) >> 64) as usize
    }

    fn find(&self, key: u64, tag: u64) -> Option<usize> {
        let mut i = self.home(key);
        loop {
            let slot = &self.slots[i];
            if slot.key == 0 {
                return None;
            }
            if slot.key == key && slot.tag == tag {
                return Some(i);
            }
            i = (i + 1) % self.slots.len();
        }
    }
}

struct SlotTable {
    state: Hmac<Sha256>,
    shards: Vec<RwLock<Shard>>,
}

/// One unit spent and one request made, last used now.
fn count(slot: &Slot, now_ms: u64) {
    slot.spent.fetch_add(1, Ordering::AcqRel);
    slot.requests.fetch_add(1, Ordering::AcqRel);
    if slot.last_used_ms.load(Ordering::Relaxed) < now_ms {
        slot.last_used_ms.store(now_ms, Ordering::Relaxed);
    }
}

fn split(hash: &[u8; 32]) -> (u64, u64, usize) {
    let word = |i: usize| u64::from_le_bytes(hash[i..i + 8].try_into().expect("8 bytes"));
    (word(0) | 1, word(8), hash[16] as usize % SHARDS)
}

impl SlotTable {
    fn new(keys: &[Presented]) -> SlotTable {
        let state = Hmac::<Sha256>::new_from_slice(b"slot-floor pepper").expect("any key size");
        let per_shard = keys.len() / SHARDS + 4 * (keys.len() / SHARDS).isqrt() + 8;
        let size = per_shard + per_shard / 3 + 1;
        let mut shards: Vec<Shard> = (0..SHARDS)
            .map(|_| Shard {
                slots: (0..size).map(|_| Slot::default()).collect(),
            })
            .collect();
        let table = SlotTable {
            state,
            shards: Vec::new(),
        };
        for key in keys {
            let (k, tag, shard) = split(&table.hash(key));
            let shard = &mut shards[shard];
            let mut i = shard.home(k);
            while shard.slots[i].key != 0 {
                i = (i + 1) % shard.slots.len();
            }
            shard.slots[i] = Slot {
                key: k,
                tag,
                expires_at_ms: u64::MAX,
                permission_bits: ROUTE_BIT,
                lease: AtomicU64::new(1 << 40),
                ..Slot::default()
            };
        }
        SlotTable {
            shards: shards.into_iter().map(RwLock::new).collect(),
            ..table
        }
    }

    fn hash(&self, key: &Presented) -> [u8; 32] {
        let mut mac = self.state.clone();
        mac.update(key.expose().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Hash → slot → state and route checks → one unit from the lease (and, with
    /// `count_here`, the spend and the request too). Returns the grant's place (shard, slot).
    #[inline(never)]
    fn verify(&self, key: &Presented, now_ms: u64, count_here: bool) -> Option<(usize, usize)> {
        let (k, tag, s) = split(&self.hash(key));
        let shard = self.shards[s].read();
        let i = shard.find(k, tag)?;
        let slot = &shard.slots[i];
        if slot.expires_at_ms <= now_ms || slot.permission_bits & ROUTE_BIT == 0 {
            return None;
        }
        let mut current = slot.lease.load(Ordering::Acquire);
        loop {
            let left = current.checked_sub(1)?;
            match slot.lease.compare_exchange_weak(
                current,
                left,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if count_here {
            count(slot, now_ms);
        }
        Some((s, i))
    }

    /// Counts the spend and the request where the grant was taken.
    #[inline(never)]
    fn commit(&self, (s, i): (usize, usize), now_ms: u64) {
        count(&self.shards[s].read().slots[i], now_ms);
    }

    fn bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| std::mem::size_of_val(&*s.read().slots))
            .sum()
    }
}

/// The engine's default clock, read once per request as `verify` does.
fn now_ms() -> u64 {
    CoarseClock.now().as_millis()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let one_phase = args.iter().any(|a| a == "one-phase");
    let clock = !args.iter().any(|a| a == "no-clock");
    let mut idx = Indices::new(11);
    let keys: Vec<Presented> = (0..n)
        .map(|i| {
            let body: String = (0..4)
                .map(|j| {
                    format!(
                        "{:010x}",
                        (i * 4 + j) as u64 ^ idx.next_below(1 << 30) as u64
                    )
                })
                .collect();
            Presented::new(&format!("vb_live_{body}")).expect("a plain ASCII key")
        })
        .collect();
    let floor = Floor::new(&keys);
    let slots = SlotTable::new(&keys);
    let mut ratios = Vec::new();
    let mut slot_ns = Vec::new();
    let mut floor_ns = Vec::new();
    for _ in 0..ROUNDS {
        let mut time = |f: &mut dyn FnMut(usize) -> bool| {
            let t = Instant::now();
            let mut ok = 0;
            for _ in 0..OPS {
                ok += usize::from(f(idx.next_below(n)));
            }
            assert_eq!(ok, OPS, "every key is found and has units");
            t.elapsed().as_nanos() as f64 / OPS as f64
        };
        let f1 = time(&mut |i| floor.check(&keys[i]));
        let v = time(&mut |i| {
            let now = if clock { now_ms() } else { 1 };
            match slots.verify(&keys[i], now, one_phase) {
                Some(place) if !one_phase => {
                    slots.commit(place, now);
                    true
                }
                found => found.is_some(),
            }
        });
        let f2 = time(&mut |i| floor.check(&keys[i]));
        let f = (f1 + f2) / 2.0;
        ratios.push(v / f);
        slot_ns.push(v);
        floor_ns.push(f);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{{\"keys\": {n}, \"one_phase\": {one_phase}, \"clock\": {clock}, \"slot_verify_commit_ns\": {:.0}, \"floor_ns\": {:.0}, \
         \"ratio_to_floor\": {:.2}, \"slot_table_bytes_per_key\": {:.1}}}",
        median(&mut slot_ns),
        median(&mut floor_ns),
        median(&mut ratios),
        slots.bytes() as f64 / n as f64
    );
}
