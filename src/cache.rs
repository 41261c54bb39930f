//! The verification cache: key hash → [`KeyEntry`], sharded so that a hit takes only the read
//! side of one of many shard locks (never a lock every thread shares) and touches no disk.
//!
//! An entry is a snapshot of everything `verify` checks, laid out so a hit reads the slot and,
//! for metered keys, one meter. Mutable per-key state lives behind `Arc`s that survive entry
//! rebuilds: the credit [`Meter`] (registry by credit id) and the [`KeyState`] (usage counters
//! and GCRA arrival times). Admin changes evict entries synchronously, so the very next
//! verify re-reads the record. Misses are cached too (bounded), and forgotten when a key that
//! could match is created.

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};

use crate::credits::meter::Meter;
use crate::hashing::KeyHash;
use crate::limits::KeyLimits;
use crate::public_id::IdKind;
use crate::record::SubscriptionStatus;

/// Shards of the cache; a power of two.
const SHARDS: usize = 256;

/// Key hashes are HMAC outputs, uniformly random: their first bytes are already a hash.
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

type Map = HashMap<KeyHash, Slot, BuildHasherDefault<PassThrough>>;

/// Per-key mutable state that survives entry rebuilds: usage counters and rate limits.
#[derive(Debug)]
pub(crate) struct KeyState {
    pub id: u64,
    pub owner: u64,
    pub limits: KeyLimits,
    spent: AtomicU64,
    requests: AtomicU64,
    last_used_ms: AtomicU64,
    dirty: AtomicBool,
    /// Lifetime spend (durable at load + everything since), for spend tiers.
    lifetime_spent: AtomicU64,
    /// Current tier multiplier (percent) and the spend at which the next tier starts.
    pub tier_pct: AtomicU32,
    next_tier_at: AtomicU64,
}

impl KeyState {
    pub(crate) fn new(id: u64, owner: u64, limits: KeyLimits, lifetime_spent: u64) -> Self {
        KeyState {
            id,
            owner,
            limits,
            spent: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            lifetime_spent: AtomicU64::new(lifetime_spent),
            tier_pct: AtomicU32::new(100),
            next_tier_at: AtomicU64::new(0),
        }
    }

    /// Counts one successful verify. Returns true when the state must be queued for a flush.
    #[inline]
    pub(crate) fn record_use(&self, now_ms: u64) -> bool {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
        self.mark_dirty()
    }

    /// Counts spend. Returns true when the state must be queued for a flush.
    pub(crate) fn record_spend(&self, units: u64, tiers: &[crate::SpendTier]) -> bool {
        if units == 0 {
            return false;
        }
        self.spent.fetch_add(units, Ordering::Relaxed);
        let lifetime = self.lifetime_spent.fetch_add(units, Ordering::Relaxed) + units;
        if lifetime >= self.next_tier_at.load(Ordering::Relaxed) {
            self.retier(tiers, lifetime);
        }
        self.mark_dirty()
    }

    /// Recomputes the tier for a lifetime spend.
    pub(crate) fn retier(&self, tiers: &[crate::SpendTier], lifetime: u64) {
        let (pct, next) = crate::limits::tier_for(tiers, lifetime);
        self.tier_pct.store(pct, Ordering::Relaxed);
        self.next_tier_at.store(next, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn mark_dirty(&self) -> bool {
        !self.dirty.load(Ordering::Relaxed) && !self.dirty.swap(true, Ordering::AcqRel)
    }

    /// Takes the unflushed (spend, requests, last used) for the writer.
    pub(crate) fn take(&self) -> (u64, u64, u64) {
        self.dirty.store(false, Ordering::Release);
        (
            self.spent.swap(0, Ordering::AcqRel),
            self.requests.swap(0, Ordering::AcqRel),
            self.last_used_ms.load(Ordering::Acquire),
        )
    }

    /// Puts back what [`take`](Self::take) returned when the flush failed.
    pub(crate) fn restore(&self, spent: u64, requests: u64, last_used: u64) {
        self.spent.fetch_add(spent, Ordering::AcqRel);
        self.requests.fetch_add(requests, Ordering::AcqRel);
        self.last_used_ms.fetch_max(last_used, Ordering::AcqRel);
    }
}

/// A cached key: everything the verify chain checks, without touching the database.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    pub id: u64,
    pub kind: IdKind,
    pub disabled: bool,
    pub status: SubscriptionStatus,
    /// Expiry in ms (`u64::MAX`: none).
    pub expires_at: u64,
    /// For a rolled key's previous secret: when it stops working (`u64::MAX` otherwise).
    pub secret_valid_until: u64,
    /// Route-table generation the bits below were compiled against.
    pub route_generation: u64,
    pub permission_bits: u64,
    pub entitlement_bits: u64,
    pub permissions: Arc<[String]>,
    pub entitlements: Arc<BTreeSet<String>>,
    pub ips: Box<[IpNet]>,
    pub state: Arc<KeyState>,
    pub meter: Option<Arc<Meter>>,
}

impl KeyEntry {
    /// Whether `ip` may use the key (an empty allowlist allows any address).
    #[inline]
    pub(crate) fn ip_allowed(&self, ip: Option<IpAddr>) -> bool {
        self.ips.is_empty() || ip.is_some_and(|ip| self.ips.iter().any(|net| net.contains(&ip)))
    }
}

/// A cache slot: a key, or a remembered miss.
#[derive(Debug)]
pub(crate) enum Slot {
    Key(Box<KeyEntry>),
    Missing,
}

/// The sharded cache plus the reverse indexes admin changes need.
pub(crate) struct Cache {
    shards: Box<[RwLock<Map>]>,
    per_shard: usize,
    /// Key id → cached hashes (a rolled key can have two).
    by_id: Mutex<HashMap<u64, Vec<KeyHash>>>,
    /// Owner id → cached key ids.
    by_owner: Mutex<HashMap<u64, Vec<u64>>>,
    /// Bumped by every invalidation. A miss that read the database before a bump does not
    /// cache what it read: the change it may have missed has already evicted.
    epoch: AtomicU64,
}

/// What eviction took out, for the engine to settle (retire meters).
pub(crate) type Evicted = Vec<(KeyHash, Box<KeyEntry>)>;

impl Cache {
    pub(crate) fn new(capacity: usize) -> Self {
        Cache {
            shards: (0..SHARDS).map(|_| RwLock::new(Map::default())).collect(),
            per_shard: capacity.div_ceil(SHARDS).max(1),
            by_id: Mutex::new(HashMap::new()),
            by_owner: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        }
    }

    /// The invalidation epoch; read it before loading a record to cache.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    #[inline]
    fn shard(&self, hash: &KeyHash) -> &RwLock<Map> {
        &self.shards[(hash[8] as usize | (hash[9] as usize) << 8) % SHARDS]
    }

    /// Runs `f` on the slot for `hash` under the shard's read lock. `None`: not cached.
    #[inline]
    pub(crate) fn with<R>(&self, hash: &KeyHash, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        let shard = self.shard(hash).read();
        shard.get(hash).map(f)
    }

    /// Caches a key entry read at `epoch` (replacing what was there). Gives the entry back
    /// when an invalidation happened since; otherwise returns entries evicted to make room.
    pub(crate) fn insert(
        &self,
        hash: KeyHash,
        entry: KeyEntry,
        epoch: u64,
    ) -> Result<Evicted, KeyEntry> {
        // Index first: an eviction that runs from here on finds the hash.
        {
            let mut by_id = self.by_id.lock();
            let hashes = by_id.entry(entry.id).or_default();
            if !hashes.contains(&hash) {
                hashes.push(hash);
            }
        }
        {
            let mut by_owner = self.by_owner.lock();
            let ids = by_owner.entry(entry.state.owner).or_default();
            if !ids.contains(&entry.id) {
                ids.push(entry.id);
            }
        }
        let mut evicted = Vec::new();
        {
            let mut shard = self.shard(&hash).write();
            if self.epoch() != epoch {
                return Err(entry);
            }
            if shard.len() >= self.per_shard && !shard.contains_key(&hash) {
                if let Some(victim) = shard.keys().next().copied() {
                    if let Some(Slot::Key(e)) = shard.remove(&victim) {
                        evicted.push((victim, e));
                    }
                }
            }
            if let Some(Slot::Key(old)) = shard.insert(hash, Slot::Key(Box::new(entry))) {
                evicted.push((hash, old));
            }
        }
        self.unindex(&evicted);
        Ok(evicted)
    }

    /// Remembers that `hash` matches no key (bounded like key entries).
    pub(crate) fn insert_missing(&self, hash: KeyHash, epoch: u64) {
        let mut shard = self.shard(&hash).write();
        if shard.len() < self.per_shard && self.epoch() == epoch {
            shard.entry(hash).or_insert(Slot::Missing);
        }
    }

    /// Forgets a remembered miss for `hash` (a key with this hash now exists).
    pub(crate) fn forget_missing(&self, hash: &KeyHash) {
        self.bump();
        let mut shard = self.shard(hash).write();
        if matches!(shard.get(hash), Some(Slot::Missing)) {
            shard.remove(hash);
        }
    }

    /// Forgets every remembered miss (after an import or a hash-scheme change).
    pub(crate) fn forget_all_missing(&self) {
        self.bump();
        for shard in self.shards.iter() {
            shard.write().retain(|_, slot| matches!(slot, Slot::Key(_)));
        }
    }

    /// Removes every cached entry of key `id`.
    pub(crate) fn evict_key(&self, id: u64) -> Evicted {
        self.bump();
        let hashes = self.by_id.lock().get(&id).cloned().unwrap_or_default();
        let mut evicted = Vec::new();
        for hash in hashes {
            if let Some(Slot::Key(e)) = self.shard(&hash).write().remove(&hash) {
                evicted.push((hash, e));
            }
        }
        self.unindex(&evicted);
        evicted
    }

    /// Removes every cached key of `owner`.
    pub(crate) fn evict_owner(&self, owner: u64) -> Evicted {
        let ids = self
            .by_owner
            .lock()
            .get(&owner)
            .cloned()
            .unwrap_or_default();
        ids.into_iter().flat_map(|id| self.evict_key(id)).collect()
    }

    /// Applies `f` to every cached entry (route-table recompilation).
    pub(crate) fn for_each_mut(&self, mut f: impl FnMut(&mut KeyEntry)) {
        for shard in self.shards.iter() {
            for slot in shard.write().values_mut() {
                if let Slot::Key(entry) = slot {
                    f(entry);
                }
            }
        }
    }

    /// Number of cached keys and misses.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    fn unindex(&self, evicted: &[(KeyHash, Box<KeyEntry>)]) {
        if evicted.is_empty() {
            return;
        }
        let mut by_id = self.by_id.lock();
        let mut by_owner = self.by_owner.lock();
        for (hash, e) in evicted {
            let Some(hashes) = by_id.get_mut(&e.id) else {
                continue;
            };
            hashes.retain(|h| h != hash);
            if !hashes.is_empty() {
                continue;
            }
            by_id.remove(&e.id);
            if let Some(ids) = by_owner.get_mut(&e.state.owner) {
                ids.retain(|&i| i != e.id);
                if ids.is_empty() {
                    by_owner.remove(&e.state.owner);
                }
            }
        }
    }
}
