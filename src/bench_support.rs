//! The benchmark workload shared by `benches/verify.rs`, `examples/compare.rs` and
//! `keyledger bench`, so all three measure the same thing. Not part of the public API.
//!
//! - [`Workload`]: a scratch ledger in a temporary directory holding `N` keys (one account per
//!   [`KEYS_PER_ACCOUNT`] keys, each key granted [`CREDITS_PER_KEY`] credits and the
//!   permission [`PERMISSION`]), one route rule requiring that permission, and the presented
//!   keys.
//! - [`Floor`]: the minimal path the verify hot path is compared with (DESIGN §9): the
//!   configured hash (HMAC-SHA256 from a precomputed keyed state, as `hashing` computes it) →
//!   one get in a `HashMap<[u8; 32], AtomicU64>` of the same `N` entries → one CAS decrement.
//!
//! Keys are written by [`bulk_insert`]: the same records, indexes and audit events as
//! `keys().create`, in one write transaction per [`BULK_CHUNK`] keys instead of one
//! transaction (one durable commit) per key.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, KeyInit, Mac};
use redb::ReadableTable;
use sha2::Sha256;

use crate::cache::{MeterRef, Slot};
use crate::codec;
use crate::config::Config;
use crate::engine::Durability;
use crate::error::Result;
use crate::hashing::KeyHash;
use crate::keyfmt::{KeyClass, Presented};
use crate::ledger::Ledger;
use crate::public_id::IdKind;
use crate::record::{
    AccountRecord, AuditEvent, KeyKind, KeyRecord, Limits, RouteRule, SubscriptionStatus,
};
use crate::secret::MasterKey;
use crate::store::{self, tables::*};
use crate::verify::Request;

/// The route every benchmark request asks for.
pub const ROUTE: &str = "/api/v1/quickhits/create";
/// The route rule's prefix.
pub const ROUTE_PREFIX: &str = "/api/v1/quickhits/";
/// The permission the route rule requires and every key holds.
pub const PERMISSION: &str = "quickhits:create";
/// Keys per account.
pub const KEYS_PER_ACCOUNT: usize = 100;
/// Credits granted to every key: enough never to run out during a benchmark.
pub const CREDITS_PER_KEY: u64 = 1_000_000_000_000;
/// Keys written per write transaction by [`bulk_insert`].
pub const BULK_CHUNK: usize = 50_000;
/// Actor recorded in the audit trail for benchmark records.
const ACTOR: &str = "bench";

/// How to build a [`Workload`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Keys to create.
    pub keys: usize,
    /// Verification-cache capacity (`None`: the default, 1,000,000).
    pub cache_capacity: Option<usize>,
    /// Credit durability mode.
    pub durability: Durability,
    /// Create keys one by one through `keys().create` (one transaction each) instead of
    /// [`bulk_insert`].
    pub via_api: bool,
    /// How often usage is flushed in the background (`None`: the default, 30 s). A test that
    /// counts the commits of one explicit flush sets it long, so that a background round on a
    /// slow machine cannot take part of the work first.
    pub usage_flush_interval: Option<std::time::Duration>,
}

impl Options {
    /// `keys` keys, default cache, leased credits, bulk insert.
    pub fn new(keys: usize) -> Self {
        Options {
            keys,
            cache_capacity: None,
            durability: Durability::Leased,
            via_api: false,
            usage_flush_interval: None,
        }
    }
}

/// A scratch ledger with its keys. The temporary directory is removed on drop.
pub struct Workload {
    /// The open ledger.
    pub ledger: Ledger,
    /// The presented keys, in creation order.
    pub keys: Vec<Presented>,
    master: MasterKey,
    durability: Durability,
    path: PathBuf,
    // Dropped last: the ledger's file lives here.
    _dir: tempfile::TempDir,
}

impl Workload {
    /// Builds the scratch ledger. `progress` is called with the number of keys written so far.
    pub fn build(options: &Options, progress: &mut dyn FnMut(usize)) -> Result<Workload> {
        let dir = tempfile::tempdir().map_err(|e| crate::Error::from(redb::StorageError::Io(e)))?;
        let path = dir.path().join("bench.redb");
        let master = MasterKey::generate()?;
        let ledger = Ledger::open(&path, config(&master, options)?)?;
        ledger
            .routes()
            .set(RouteRule::new(ROUTE_PREFIX).permission(PERMISSION))?;
        let keys = if options.via_api {
            create_via_api(&ledger, options.keys, progress)?
        } else {
            bulk_insert(&ledger, options.keys, progress)?
        };
        Ok(Workload {
            ledger,
            keys,
            master,
            durability: options.durability,
            path,
            _dir: dir,
        })
    }

    /// Closes the ledger cleanly and opens the same file again with another cache capacity
    /// (an empty cache).
    pub fn reopen(self, cache_capacity: Option<usize>) -> Result<Workload> {
        self.reopen_after(cache_capacity, |ledger| {
            ledger.close()?;
            Ok(())
        })
    }

    /// Stops the ledger as a crash would (nothing returned or flushed) and opens the same
    /// file again, with the default cache. For crash tests.
    pub fn crash_and_reopen(self) -> Result<Workload> {
        self.reopen_after(None, |ledger| {
            ledger.simulate_crash();
            Ok(())
        })
    }

    fn reopen_after(
        self,
        cache_capacity: Option<usize>,
        stop: impl FnOnce(Ledger) -> Result<()>,
    ) -> Result<Workload> {
        let Workload {
            ledger,
            keys,
            master,
            durability,
            path,
            _dir,
        } = self;
        stop(ledger)?;
        let options = Options {
            keys: keys.len(),
            cache_capacity,
            durability,
            via_api: false,
            usage_flush_interval: None,
        };
        let ledger = Ledger::open(&path, config(&master, &options)?)?;
        Ok(Workload {
            ledger,
            keys,
            master,
            durability,
            path,
            _dir,
        })
    }

    /// The request for key `i`: [`ROUTE`], the rule's cost (1).
    #[inline]
    pub fn request(&self, i: usize) -> Request<'_> {
        Request::new(&self.keys[i], ROUTE)
    }

    /// verify + commit(1) for key `i`. Returns whether it was granted. Never inlined (nor is
    /// [`Floor::check`]), so both cost one call and show up by name in a profile.
    #[inline(never)]
    pub fn verify_commit(&self, i: usize) -> bool {
        match self.ledger.verify(&self.request(i)) {
            Ok(grant) => {
                let _ = grant.commit(1);
                true
            }
            Err(_) => false,
        }
    }

    /// Step 1 of the chain alone for key `i`: the key format check (prefix, length,
    /// alphabet, checksum) that `verify` runs before hashing. Returns whether it passed.
    #[inline]
    pub fn format_check(&self, i: usize) -> bool {
        self.ledger
            .inner
            .format
            .parse(self.keys[i].expose())
            .is_ok()
    }

    /// A peek (`cost(0)`) on key `i`: the whole chain, caching the entry on a miss, without
    /// spending or leasing.
    #[inline]
    pub fn peek(&self, i: usize) -> bool {
        self.ledger.verify(&self.request(i).cost(0)).is_ok()
    }

    /// [`peek`](Self::peek), asking the grant for the key's and the owner's public ids, as a
    /// server that names the caller on every request does.
    pub fn peek_naming(&self, i: usize) -> bool {
        match self.ledger.verify(&self.request(i).cost(0)) {
            Ok(grant) => {
                std::hint::black_box((grant.key_id(), grant.owner_id()));
                true
            }
            Err(_) => false,
        }
    }

    /// Scans every table a cache miss reads (key hashes, keys, accounts, usage, pools, meta)
    /// once, in key order: fills redb's page cache with those pages, so that a memory
    /// measurement of [`warm`](Self::warm) sees the verification cache alone. Returns the
    /// entries read.
    pub fn touch_pages(&self, progress: &mut dyn FnMut(usize)) -> Result<usize> {
        let read = self.ledger.inner.store.begin_read()?;
        let mut entries = 0;
        for entry in read.open_table(KEY_VERIFY)?.iter()? {
            std::hint::black_box(entry?.1.value().len());
            entries += 1;
            if entries % 65_536 == 0 {
                progress(entries / 2);
            }
        }
        for table in [KEYS, ACCOUNTS, USAGE, POOLS] {
            for entry in read.open_table(table)?.iter()? {
                std::hint::black_box(entry?.1.value().len());
                entries += 1;
            }
        }
        for entry in read.open_table(META)?.iter()? {
            std::hint::black_box(entry?.1.value().len());
        }
        progress(self.keys.len());
        Ok(entries)
    }

    /// Caches every key with a peek, in a scattered order (see [`scattered`](Self::scattered)).
    /// Returns how many were granted.
    pub fn warm(&self, progress: &mut dyn FnMut(usize)) -> usize {
        let mut granted = 0;
        for (j, i) in self.scattered().enumerate() {
            granted += usize::from(self.peek(i));
            if j % 4096 == 0 {
                progress(j);
            }
        }
        progress(self.keys.len());
        granted
    }

    /// Asks every cached key's grant for its public ids, as a server that names the caller
    /// does (a key's id is sealed per call; its account's is kept, shared by its keys).
    /// Returns how many were asked.
    pub fn ask_public_ids(&self) -> usize {
        let mut asked = 0;
        for i in 0..self.keys.len() {
            if let Ok(grant) = self.ledger.verify(&self.request(i).cost(0)) {
                std::hint::black_box((grant.key_id(), grant.owner_id()));
                asked += 1;
            }
        }
        asked
    }

    /// Times `count` cache misses on an empty cache: peeks of the first `count` keys in
    /// [`warm`](Self::warm)'s order, each one redb look-up and then cached, each key
    /// [touched](Self::touch_key) before its clock starts. Returns their latencies in ns, in
    /// the order taken.
    pub fn time_misses(&self, count: usize) -> Vec<u64> {
        self.scattered()
            .take(count)
            .map(|i| {
                self.touch_key(i);
                let t = std::time::Instant::now();
                std::hint::black_box(self.peek(i));
                t.elapsed().as_nanos() as u64
            })
            .collect()
    }

    /// Reads key `i`'s presented bytes into the CPU caches, where a server's key is when it
    /// has just parsed the request that carries it; not where this bench keeps a million of
    /// them (two cold reads away, ≈ 1 µs of a miss's time at 1M keys, measured).
    pub fn touch_key(&self, i: usize) {
        let bytes = self.keys[i].expose().as_bytes();
        std::hint::black_box(bytes.iter().fold(0u8, |a, b| a ^ b));
    }

    /// Every key index once, by a stride coprime with the key count: redb's pages are read
    /// as randomly as a server's misses read them, and any prefix is spread over all keys.
    fn scattered(&self) -> impl Iterator<Item = usize> {
        const STRIDE: usize = 7_919 * 127;
        let n = self.keys.len();
        let stride = if n.is_multiple_of(7_919) || n.is_multiple_of(127) {
            1
        } else {
            STRIDE % n.max(1)
        };
        (0..n).map(move |j| (j * stride) % n)
    }

    /// Gives every cached key a credit lease through the writer's prefetch path (the message
    /// the hot path itself sends when a lease runs low), then waits for the writer. The
    /// writer folds up to 8,192 lease requests into one transaction (one durable commit). Returns the
    /// writer commits this took.
    pub fn prime_leases(&self) -> Result<u64> {
        let before = self.ledger.stats().writer_commits;
        for meter in self.cached_meters() {
            meter.pending.store(true, Ordering::Release);
            self.ledger.inner.engine.prefetch(&meter);
        }
        self.ledger.flush()?;
        Ok(self.ledger.stats().writer_commits - before)
    }

    /// Requests one lease refill for each of the first `n` keys (cached) and waits until they
    /// are durable. Returns the writer commits this took.
    pub fn refill_batch(&self, n: usize) -> Result<u64> {
        let before = self.ledger.stats().writer_commits;
        for key in &self.keys[..n] {
            if let Some(meter) = self.meter_of(key) {
                meter.pending.store(true, Ordering::Release);
                self.ledger.inner.engine.prefetch(&meter);
            }
        }
        self.ledger.flush()?;
        Ok(self.ledger.stats().writer_commits - before)
    }

    /// Units leased into memory and not yet reserved, for key `i` (`None`: not cached).
    pub fn lease_of(&self, i: usize) -> Option<u64> {
        self.meter_of(&self.keys[i]).map(|m| m.leased())
    }

    /// Bytes of the cache's tables.
    pub fn cache_table_bytes(&self) -> usize {
        self.ledger.inner.engine.cache.table_bytes()
    }

    fn meter_of(&self, key: &Presented) -> Option<MeterRef> {
        let hash = self.ledger.hasher().hash_current(key.expose());
        self.ledger
            .inner
            .engine
            .cache
            .with(&hash, |slot| match slot {
                Slot::Key(key) => key.meter_ref(),
                Slot::Missing => None,
            })
            .flatten()
    }

    fn cached_meters(&self) -> Vec<MeterRef> {
        self.keys.iter().filter_map(|k| self.meter_of(k)).collect()
    }
}

fn config(master: &MasterKey, options: &Options) -> Result<Config> {
    let mut builder = Config::builder()
        .master_key(master.clone())
        .durability(options.durability);
    if let Some(capacity) = options.cache_capacity {
        builder = builder.cache_capacity(capacity);
    }
    if let Some(every) = options.usage_flush_interval {
        builder = builder.usage_flush_interval(every);
    }
    Ok(builder.build()?)
}

/// Creates `n` keys through the public API: one write transaction (one durable commit) per key.
fn create_via_api(
    ledger: &Ledger,
    n: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Presented>> {
    use crate::{NewAccount, NewKey};
    let mut keys = Vec::with_capacity(n);
    let mut owner = String::new();
    for i in 0..n {
        if i % KEYS_PER_ACCOUNT == 0 {
            owner = ledger
                .accounts()
                .by(ACTOR)
                .create(NewAccount::new(format!("bench {}", i / KEYS_PER_ACCOUNT)))?
                .id
                .to_string();
        }
        let created = ledger.keys().by(ACTOR).create(
            NewKey::new(&owner, format!("k{i}"))
                .permissions([PERMISSION])
                .credits(CREDITS_PER_KEY),
        )?;
        keys.push(Presented::new(created.plaintext.expose()).expect("a generated key parses"));
        if i % 64 == 0 {
            progress(i);
        }
    }
    progress(n);
    Ok(keys)
}

/// Writes `n` keys (and one account per [`KEYS_PER_ACCOUNT`] keys) with the same records,
/// index entries, scheme counts, credit balances and audit events `accounts().create` and
/// `keys().create` write — keys generated and hashed the same way — but [`BULK_CHUNK`] keys
/// per write transaction. Returns the presented keys.
pub fn bulk_insert(
    ledger: &Ledger,
    n: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Presented>> {
    let inner = &ledger.inner;
    let hasher = ledger.hasher();
    let scheme = hasher.current();
    let mut keys = Vec::with_capacity(n);
    let mut owner = 0u64;
    let mut done = 0;
    while done < n {
        let end = (done + BULK_CHUNK).min(n);
        let now = ledger.now();
        let txn = inner.store.begin_write()?;
        {
            let mut meta_table = txn.open_table(META)?;
            let mut next_id = match meta_table.get(meta::NEXT_ID)? {
                Some(v) => u64::from_le_bytes(v.value().try_into().map_err(|_| {
                    crate::error::CodecError::Corrupt {
                        record: "meta",
                        reason: "next_id is not 8 bytes".into(),
                    }
                })?),
                None => 1,
            };
            let mut accounts = txn.open_table(ACCOUNTS)?;
            let mut records = txn.open_table(KEYS)?;
            let mut hashes = txn.open_table(KEY_VERIFY)?;
            let mut by_owner = txn.open_table(KEYS_BY_OWNER)?;
            let mut by_prefix = txn.open_table(KEYS_BY_PREFIX)?;
            let mut credits = txn.open_table(CREDITS)?;
            let mut audit = txn.open_table(AUDIT)?;
            let mut seq = audit.last()?.map_or(1, |(k, _)| k.value() + 1);
            let mut event = |table: &mut redb::Table<u64, &[u8]>, action: &str, target: String| {
                let e = AuditEvent {
                    seq,
                    at: now,
                    actor: ACTOR.into(),
                    action: action.into(),
                    target,
                    fields: vec![],
                };
                seq += 1;
                table
                    .insert(e.seq, codec::encode(&e).as_slice())
                    .map(|_| ())
            };
            for i in done..end {
                if i % KEYS_PER_ACCOUNT == 0 {
                    owner = next_id;
                    next_id += 1;
                    let account = AccountRecord {
                        name: format!("bench {}", i / KEYS_PER_ACCOUNT),
                        status: SubscriptionStatus::Active,
                        entitlements: Default::default(),
                        created_at: now,
                        created_by: ACTOR.into(),
                        updated_at: now,
                        updated_by: ACTOR.into(),
                    };
                    store::put(&mut accounts, owner, &account)?;
                    let public = inner.ids.encode(IdKind::Account, owner).to_string();
                    event(&mut audit, "account.created", public)?;
                }
                let plaintext = inner.format.generate(KeyClass::Live)?;
                let key_hash: KeyHash = hasher.hash_current(plaintext.expose());
                let (key_prefix, key_suffix) = inner.format.visible_parts(plaintext.expose());
                let id = next_id;
                next_id += 1;
                let record = KeyRecord {
                    kind: KeyKind::Api,
                    class: KeyClass::Live,
                    owner,
                    name: format!("k{i}"),
                    key_prefix,
                    key_suffix,
                    key_hash,
                    scheme,
                    permissions: vec![PERMISSION.into()],
                    ips: vec![],
                    limits: Limits {
                        credits: Some(CREDITS_PER_KEY),
                        ..Limits::default()
                    },
                    metadata: Default::default(),
                    created_at: now,
                    created_by: ACTOR.into(),
                    updated_at: now,
                    updated_by: ACTOR.into(),
                    expires_at: None,
                    disabled_at: None,
                    last_used_at: None,
                    rolled: None,
                    pool: None,
                };
                store::put(&mut records, id, &record)?;
                crate::keys::index::put_entries(&mut hashes, id, &record)?;
                // Kind tag 0: API keys (as `Keys` writes it).
                by_owner.insert((owner, 0u8, id), ())?;
                by_prefix.insert((record.key_prefix.as_str(), id), ())?;
                let balance = crate::keys::new_balance(CREDITS_PER_KEY, None, now);
                store::put(&mut credits, id, &balance)?;
                let public = inner.ids.encode(IdKind::Key, id).to_string();
                event(&mut audit, "key.created", public)?;
                keys.push(Presented::new(plaintext.expose()).expect("a generated key parses"));
            }
            meta_table.insert(meta::NEXT_ID, next_id.to_le_bytes().as_slice())?;
        }
        store::adjust_scheme_count(&txn, scheme, (end - done) as i64)?;
        txn.commit()?;
        done = end;
        progress(done);
    }
    // What `keys().create` tells the engine, once for the lot.
    inner.engine.hashes_changed();
    Ok(keys)
}

/// Same hashing for every scheme the floor may stand for.
fn floor_state(key: &[u8; 32]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key size")
}

/// The floor: HMAC-SHA256 from a precomputed keyed state → one get in a map of the same
/// key hashes → one CAS decrement. The map is built once and only read, so it needs no lock;
/// it uses the same pass-through hasher as the verification cache (key hashes are already
/// uniformly random).
pub struct Floor {
    state: Hmac<Sha256>,
    map: HashMap<KeyHash, AtomicU64, BuildHasherDefault<PassThrough>>,
}

impl Floor {
    /// A floor over `keys`, each with [`CREDITS_PER_KEY`] units.
    pub fn new(keys: &[Presented]) -> Floor {
        let mut pepper = [0u8; 32];
        getrandom::fill(&mut pepper).expect("OS randomness");
        let state = floor_state(&pepper);
        let mut map = HashMap::with_capacity_and_hasher(keys.len(), Default::default());
        for key in keys {
            let mut mac = state.clone();
            mac.update(key.expose().as_bytes());
            let hash: KeyHash = mac.finalize().into_bytes().into();
            map.insert(hash, AtomicU64::new(CREDITS_PER_KEY));
        }
        Floor { state, map }
    }

    /// Hash → get → CAS decrement by one. Returns whether a unit was taken.
    #[inline(never)]
    pub fn check(&self, key: &Presented) -> bool {
        let mut mac = self.state.clone();
        mac.update(key.expose().as_bytes());
        let hash: KeyHash = mac.finalize().into_bytes().into();
        let Some(counter) = self.map.get(&hash) else {
            return false;
        };
        let mut current = counter.load(Ordering::Acquire);
        loop {
            let Some(left) = current.checked_sub(1) else {
                return false;
            };
            match counter.compare_exchange_weak(current, left, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Units left for `key` (`None`: unknown key).
    pub fn units(&self, key: &Presented) -> Option<u64> {
        let mut mac = self.state.clone();
        mac.update(key.expose().as_bytes());
        let hash: KeyHash = mac.finalize().into_bytes().into();
        self.map.get(&hash).map(|c| c.load(Ordering::Acquire))
    }
}

/// A small, fast pseudo-random index stream (xorshift64*), the same for every measurement.
#[derive(Debug, Clone)]
pub struct Indices(u64);

impl Indices {
    /// A stream from `seed` (any value; zero is replaced).
    pub fn new(seed: u64) -> Self {
        Indices(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next index below `n`.
    #[inline]
    pub fn next_below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        ((x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as usize * n) >> 32
    }
}

/// The `p`-th percentile (0–100) of sorted samples (0 when empty).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Key hashes are HMAC outputs, uniformly random: their first bytes are already a hash, so
/// the floor's map uses them as is.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length then its bytes; keep the first 8 key bytes.
        if bytes.len() >= 8 && self.0 == 0 {
            self.0 = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        } else if bytes.len() >= 8 {
            self.0 ^= u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        }
    }
    fn write_usize(&mut self, _: usize) {}
}
