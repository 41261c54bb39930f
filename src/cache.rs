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
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::RwLock;

use crate::credits::meter::Meter;
use crate::hashing::KeyHash;
use crate::limits::KeyLimits;
use crate::policy::RouteTable;
use crate::public_id::{IdKind, PublicId};
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
    /// The key's and owner's public ids, encoded on first request (encoding costs an
    /// AES-SIV operation each).
    pub public_ids: OnceLock<(PublicId, PublicId)>,
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
            public_ids: OnceLock::new(),
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

/// The owner account's state, shared by all its cached keys and updated in place by admin
/// changes, so suspending an account reaches every key at once.
#[derive(Debug)]
pub(crate) struct AccountState {
    status: AtomicU8,
    /// Route-table generation `entitlement_bits` was compiled against.
    pub route_generation: AtomicU64,
    pub entitlement_bits: AtomicU64,
    pub entitlements: ArcSwap<BTreeSet<String>>,
}

impl AccountState {
    pub(crate) fn new(
        status: SubscriptionStatus,
        entitlements: BTreeSet<String>,
        table: &RouteTable,
    ) -> Self {
        AccountState {
            status: AtomicU8::new(status_code(status)),
            route_generation: AtomicU64::new(table.generation),
            entitlement_bits: AtomicU64::new(table.entitlement_bits(&entitlements)),
            entitlements: ArcSwap::from_pointee(entitlements),
        }
    }

    /// Whether the subscription lets keys work (active, trialing or past due).
    #[inline]
    pub(crate) fn subscription_ok(&self) -> bool {
        self.status.load(Ordering::Acquire) < status_code(SubscriptionStatus::Canceled)
    }

    /// Applies an admin change.
    pub(crate) fn update(
        &self,
        status: SubscriptionStatus,
        entitlements: BTreeSet<String>,
        table: &RouteTable,
    ) {
        self.entitlement_bits
            .store(table.entitlement_bits(&entitlements), Ordering::Release);
        self.route_generation
            .store(table.generation, Ordering::Release);
        self.entitlements.store(Arc::new(entitlements));
        self.status.store(status_code(status), Ordering::Release);
    }

    /// Recompiles the entitlement bits against a new route table.
    pub(crate) fn recompile(&self, table: &RouteTable) {
        let bits = table.entitlement_bits(&self.entitlements.load());
        self.entitlement_bits.store(bits, Ordering::Release);
        self.route_generation
            .store(table.generation, Ordering::Release);
    }
}

/// Statuses that allow use sort before `Canceled`.
fn status_code(status: SubscriptionStatus) -> u8 {
    match status {
        SubscriptionStatus::Active => 0,
        SubscriptionStatus::Trialing => 1,
        SubscriptionStatus::PastDue => 2,
        SubscriptionStatus::Canceled => 3,
        SubscriptionStatus::Suspended => 4,
    }
}

/// A cached key: everything the verify chain checks, without touching the database.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    pub id: u64,
    pub kind: IdKind,
    pub disabled: bool,
    /// Expiry in ms (`u64::MAX`: none).
    pub expires_at: u64,
    /// For a rolled key's previous secret: when it stops working (`u64::MAX` otherwise).
    pub secret_valid_until: u64,
    /// Route-table generation the bits below were compiled against.
    pub route_generation: u64,
    pub permission_bits: u64,
    pub permissions: Arc<[String]>,
    pub ips: Box<[IpNet]>,
    pub account: Arc<AccountState>,
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
            // Shard sizes vary (keys land by hash): 25% slack so `capacity` keys fit.
            per_shard: (capacity + capacity / 4).div_ceil(SHARDS).max(1),
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

    /// Removes the cached entries for `hashes` (a key's current and rolled secrets).
    pub(crate) fn evict(&self, hashes: &[KeyHash]) -> Evicted {
        self.bump();
        let mut evicted = Vec::new();
        for hash in hashes {
            if let Some(Slot::Key(e)) = self.shard(hash).write().remove(hash) {
                evicted.push((*hash, e));
            }
        }
        evicted
    }

    /// Removes every entry (after a hash-scheme change, when every cache key changes).
    pub(crate) fn clear(&self) -> Evicted {
        self.bump();
        let mut evicted = Vec::new();
        for shard in self.shards.iter() {
            for (hash, slot) in shard.write().drain() {
                if let Slot::Key(e) = slot {
                    evicted.push((hash, e));
                }
            }
        }
        evicted
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
}
