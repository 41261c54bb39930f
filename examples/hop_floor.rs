//! Where a cache-hit verify's time goes beyond the floor, measured by building the floor up
//! towards what verify does and timing each step on the same keys (docs/PERFORMANCE.md,
//! "Seventh round").
//!
//! Each variant runs `ITERS` operations on random keys, five rounds, interleaved; the median
//! of each is printed with its ratio to the floor:
//! - `floor`: `keyledger bench`'s floor (HMAC-SHA256 → one map get → one CAS);
//! - `floor + hop`: the map holds a pointer to a separately allocated 248-byte object (a
//!   `CachedKey`'s size with its `Arc` counts), three of whose cache lines are read before
//!   the CAS — the one extra dependent miss the cache's layout adds;
//! - `floor + hop + locks`: that, plus a shard read lock and verify+commit's other atomic
//!   read-modify-writes, each line touched in the order verify touches them;
//! - `peek`: `verify` with cost 0 (the whole chain, no lease taken) and the grant dropped;
//! - `peek + key_id + owner_id`: the same, asking the grant for both public ids, as a server
//!   that names its caller does;
//! - `verify + commit`: what `keyledger bench` times;
//! - `floor + hop + locks + 20 reads`: the third variant plus a short loop of 20 dependent
//!   reads of the object's first line after the miss: what a chain of checks adds, at its
//!   smallest;
//! - the floor, the third variant and `verify + commit` again, **one at a time**: a serializing
//!   instruction (`lfence`) after each operation, so that no operation starts before the
//!   previous one has finished — as in a server, where thousands of instructions of request
//!   handling separate two verifies. Back to back, the CPU runs the next operation's hashing
//!   and look-up in the shadow of the current one's cache misses, which only an operation
//!   with next to nothing after its last miss allows (docs/PERFORMANCE.md, "Eighth round").
//!
//! ```sh
//! cargo run --release --example hop_floor                 # 100k keys, ≈ 1 minute
//! cargo run --release --example hop_floor -- 1000000      # ≈ 2 minutes
//! cargo run --release --example hop_floor -- 2000         # everything in the CPU caches
//! ```

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use hmac::{Hmac, KeyInit, Mac};
use keyledger::Presented;
use keyledger::bench_support::{Floor, Indices, Options, Workload};
use parking_lot::RwLock;
use sha2::Sha256;

const ITERS: usize = 2_000_000;
const ROUNDS: usize = 5;
/// Index of the "floor, one at a time" variant.
const SERIAL_FLOOR: usize = 7;

/// 232 bytes, as a `CachedKey`: with its `Arc` counts and malloc's header, a 256-byte chunk.
/// The fields a variant touches sit where verify's do: counts and usage in the first line,
/// the checked fields in the second, the lease in the third, the route generation last.
#[repr(C)]
struct Object {
    requests: AtomicU64,
    spent: AtomicU64,
    _usage: [u64; 4],
    valid_until: u64,
    permission_bits: u64,
    _snapshot: [u64; 8],
    lease: AtomicU64,
    meter_spent: AtomicU64,
    _meter: [u64; 10],
    route_generation: u64,
}

/// Key hashes are uniformly random: their first 8 bytes are the hash (as in the cache).
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = u64::from_le_bytes(bytes[..8].try_into().expect("a 32-byte hash"));
    }
}

struct HopFloor {
    state: Hmac<Sha256>,
    objects: HashMap<[u8; 32], std::sync::Arc<Object>, BuildHasherDefault<PassThrough>>,
    shards: Vec<RwLock<()>>,
}

impl HopFloor {
    fn new(keys: &[Presented]) -> HopFloor {
        let state = Hmac::<Sha256>::new_from_slice(b"hop-floor pepper").expect("any key size");
        let mut objects = HashMap::with_capacity_and_hasher(keys.len(), Default::default());
        for key in keys {
            let object = Object {
                requests: AtomicU64::new(0),
                spent: AtomicU64::new(0),
                _usage: [0; 4],
                valid_until: u64::MAX,
                permission_bits: 1,
                _snapshot: [0; 8],
                lease: AtomicU64::new(1 << 40),
                meter_spent: AtomicU64::new(0),
                _meter: [0; 10],
                route_generation: 1,
            };
            objects.insert(hash(&state, key), std::sync::Arc::new(object));
        }
        HopFloor {
            state,
            objects,
            shards: (0..256).map(|_| RwLock::new(())).collect(),
        }
    }

    /// Hash → get → three lines of the object → one CAS on its lease.
    #[inline(never)]
    fn hop(&self, key: &Presented) -> bool {
        let Some(o) = self.objects.get(&hash(&self.state, key)) else {
            return false;
        };
        let valid = o.valid_until > 0 && o.permission_bits & 1 != 0 && o.route_generation == 1;
        valid && take(&o.lease)
    }

    /// `hop` with a shard read lock around it and verify+commit's other read-modify-writes
    /// (an `Arc` count up and down, the request count, the spend twice), and `reads`
    /// dependent reads of the object's first line after the miss.
    #[inline(never)]
    fn hop_locks(&self, key: &Presented, reads: usize) -> bool {
        let hash = hash(&self.state, key);
        let _shard = self.shards[hash[16] as usize].read();
        let Some(o) = self.objects.get(&hash) else {
            return false;
        };
        if o.valid_until == 0 || o.permission_bits & 1 == 0 {
            return false;
        }
        let mut sum = 0u64;
        for j in 0..reads {
            sum = sum.wrapping_add(o._usage[j % 4] ^ j as u64);
        }
        if sum == u64::MAX {
            return false;
        }
        let grant = o.clone();
        if o.route_generation != 1 || !take(&grant.lease) {
            return false;
        }
        grant.requests.fetch_add(1, Ordering::SeqCst);
        grant.meter_spent.fetch_add(1, Ordering::SeqCst);
        grant.spent.fetch_add(1, Ordering::SeqCst);
        true
    }
}

fn hash(state: &Hmac<Sha256>, key: &Presented) -> [u8; 32] {
    let mut mac = state.clone();
    mac.update(key.expose().as_bytes());
    mac.finalize().into_bytes().into()
}

/// Returns `result` once every earlier instruction has finished: `lfence` dispatches nothing
/// after it until then, so the next operation cannot overlap this one.
#[inline(always)]
fn one_at_a_time(result: bool) -> bool {
    let result = std::hint::black_box(result);
    // SAFETY: `lfence` only orders instructions; SSE2, which it belongs to, is part of every
    // x86_64 CPU.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_lfence()
    };
    #[cfg(not(target_arch = "x86_64"))]
    std::sync::atomic::fence(Ordering::SeqCst);
    result
}

/// One unit from `lease` with a CAS, never below zero.
fn take(lease: &AtomicU64) -> bool {
    lease
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |l| l.checked_sub(1))
        .is_ok()
}

fn main() -> keyledger::Result<()> {
    let keys: usize = std::env::args()
        .nth(1)
        .map_or(100_000, |s| s.parse().expect("a key count"));
    let work = Workload::build(&Options::new(keys), &mut |_| {})?;
    work.warm(&mut |_| {});
    work.prime_leases()?;
    let floor = Floor::new(&work.keys);
    let hop = HopFloor::new(&work.keys);
    type Variant<'a> = (&'a str, Box<dyn Fn(usize) -> bool + 'a>);
    let variants: Vec<Variant> = vec![
        ("floor", Box::new(|i| floor.check(&work.keys[i]))),
        ("floor + hop", Box::new(|i| hop.hop(&work.keys[i]))),
        (
            "floor + hop + locks",
            Box::new(|i| hop.hop_locks(&work.keys[i], 0)),
        ),
        ("peek", Box::new(|i| work.peek(i))),
        (
            "peek + key_id + owner_id",
            Box::new(|i| work.peek_naming(i)),
        ),
        ("verify + commit", Box::new(|i| work.verify_commit(i))),
        (
            "floor + hop + locks + 20 reads",
            Box::new(|i| hop.hop_locks(&work.keys[i], 20)),
        ),
        (
            "floor, one at a time",
            Box::new(|i| one_at_a_time(floor.check(&work.keys[i]))),
        ),
        (
            "floor + hop + locks, one at a time",
            Box::new(|i| one_at_a_time(hop.hop_locks(&work.keys[i], 0))),
        ),
        (
            "verify + commit, one at a time",
            Box::new(|i| one_at_a_time(work.verify_commit(i))),
        ),
    ];
    let mut indices = Indices::new(7);
    let mut times = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (v, (_, run)) in variants.iter().enumerate() {
            let start = Instant::now();
            for _ in 0..ITERS {
                std::hint::black_box(run(indices.next_below(keys)));
            }
            times[v].push(start.elapsed().as_nanos() as f64 / ITERS as f64);
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|t| {
            t.sort_by(f64::total_cmp);
            t[ROUNDS / 2]
        })
        .collect();
    println!("{keys} keys, median of {ROUNDS} rounds of {ITERS} operations:");
    // Rows run one at a time are compared with the floor run one at a time.
    let serial_floor = medians[SERIAL_FLOOR];
    for ((name, _), median) in variants.iter().zip(&medians) {
        let (floor, which) = if name.ends_with("one at a time") {
            (serial_floor, "the floor one at a time")
        } else {
            (medians[0], "the floor")
        };
        println!(
            "  {name:<36} {median:>6.0} ns  {:.2}× {which}",
            median / floor
        );
    }
    work.ledger.clone().simulate_crash();
    Ok(())
}
