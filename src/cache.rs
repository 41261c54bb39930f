//! The verification cache: key hash → [`CachedKey`], sharded so that a hit takes only the read
//! side of one of many shard locks (never a lock every thread shares) and touches no disk.
//!
//! A cached key is one allocation holding everything `verify` checks plus the key's live
//! counters and credit lease, so a hit reads one slot and one [`CachedKey`] (and a pool's
//! meter for pooled keys). Admin changes evict synchronously, so the very next verify re-reads
//! the record; the rebuilt snapshot keeps using the live part of the first one (see
//! [`CachedKey`]). Misses are cached too (bounded), and forgotten when a key that could match
//! is created.

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
use crate::public_id::{IdCipher, IdKind, PublicId};
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

/// Usage counters and spend tier of one key. They live in the key's first cached snapshot
/// (its "home") and survive rebuilds of the snapshot by admin changes.
#[derive(Debug)]
struct Usage {
    spent: AtomicU64,
    requests: AtomicU64,
    last_used_ms: AtomicU64,
    dirty: AtomicBool,
    /// Lifetime spend (durable at load + everything since), for spend tiers.
    lifetime_spent: AtomicU64,
    /// Current tier multiplier (percent) and the spend at which the next tier starts.
    tier_pct: AtomicU32,
    next_tier_at: AtomicU64,
}

/// The owner account's state, shared by all its cached keys. Keys copy what the hot path
/// needs (subscription, entitlement bits) when cached; an account change evicts its keys.
#[derive(Debug)]
pub(crate) struct AccountState {
    status: AtomicU8,
    pub entitlements: ArcSwap<BTreeSet<String>>,
}

impl AccountState {
    pub(crate) fn new(status: SubscriptionStatus, entitlements: BTreeSet<String>) -> Self {
        AccountState {
            status: AtomicU8::new(status_code(status)),
            entitlements: ArcSwap::from_pointee(entitlements),
        }
    }

    /// Whether the subscription lets keys work (active, trialing or past due).
    #[inline]
    pub(crate) fn subscription_ok(&self) -> bool {
        self.status.load(Ordering::Acquire) < status_code(SubscriptionStatus::Canceled)
    }

    /// The entitlements as route bits of `table`.
    pub(crate) fn entitlement_bits(&self, table: &RouteTable) -> u64 {
        table.entitlement_bits(&self.entitlements.load())
    }

    /// Applies an admin change (the engine then evicts the account's cached keys).
    pub(crate) fn update(&self, status: SubscriptionStatus, entitlements: BTreeSet<String>) {
        self.entitlements.store(Arc::new(entitlements));
        self.status.store(status_code(status), Ordering::Release);
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

/// How a cached key pays for requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Metering {
    /// No credit balance.
    Unmetered,
    /// Its own balance: the meter inside its home snapshot.
    Own,
    /// A shared pool's balance.
    Pool,
}

/// A cached key: everything the verify chain checks, and the key's live counters and credit
/// lease, in one allocation, so that a cache hit reads one slot and one `CachedKey`.
///
/// The snapshot part is immutable while cached; an admin change evicts it and the next verify
/// builds a new one from the record. The live part (usage, own meter, public ids) must survive
/// that, since grants in flight and the credit writer still use it: a rebuilt snapshot points
/// at the key's first snapshot (`home`) and uses the live part there.
#[derive(Debug)]
pub(crate) struct CachedKey {
    pub id: u64,
    pub owner: u64,
    pub kind: IdKind,
    pub disabled: bool,
    /// The owner's subscription lets keys work (copied at load; an account change evicts).
    pub subscription_ok: bool,
    pub metering: Metering,
    /// Expiry in ms (`u64::MAX`: none).
    pub expires_at: u64,
    /// For a rolled key's previous secret: when it stops working (`u64::MAX` otherwise).
    pub secret_valid_until: u64,
    /// Route-table generation the two bit sets below were compiled against (written last).
    pub route_generation: AtomicU64,
    pub permission_bits: AtomicU64,
    /// The owner's entitlements as route bits.
    pub entitlement_bits: AtomicU64,
    pub permissions: Arc<[String]>,
    pub ips: Box<[IpNet]>,
    /// The owner account's state (entitlement names, for routes without a bit).
    pub account: Arc<AccountState>,
    /// Rate limits (`None`: none), kept across rebuilds while configured the same.
    pub limits: Option<Arc<KeyLimits>>,
    /// The pool's meter when `metering` is `Pool`.
    pub pool: Option<Arc<Meter>>,
    home: Option<Arc<CachedKey>>,
    usage: Usage,
    own_meter: Meter,
    /// The key's and owner's public ids, encoded on first request (an AES-SIV operation each).
    public_ids: OnceLock<Box<(PublicId, PublicId)>>,
}

/// What [`CachedKey::new`] needs besides the live part.
pub(crate) struct Snapshot {
    pub id: u64,
    pub owner: u64,
    pub kind: IdKind,
    pub disabled: bool,
    pub expires_at: u64,
    pub secret_valid_until: u64,
    pub permissions: Arc<[String]>,
    pub ips: Box<[IpNet]>,
    pub account: Arc<AccountState>,
    pub limits: Option<Arc<KeyLimits>>,
    pub metering: Metering,
    pub pool: Option<Arc<Meter>>,
}

impl CachedKey {
    /// A snapshot compiled against `table`. With `home`, the live part is the home's (the
    /// key is already in memory); otherwise it is new, with `own_meter` as the key's meter.
    pub(crate) fn new(
        s: Snapshot,
        table: &RouteTable,
        home: Option<Arc<CachedKey>>,
        own_meter: Meter,
        lifetime_spent: u64,
        tiers: &[crate::SpendTier],
    ) -> Self {
        let home = home.map(|h| h.home.clone().unwrap_or(h));
        let (tier_pct, next_tier_at) = crate::limits::tier_for(tiers, lifetime_spent);
        CachedKey {
            id: s.id,
            owner: s.owner,
            kind: s.kind,
            disabled: s.disabled,
            subscription_ok: s.account.subscription_ok(),
            metering: s.metering,
            expires_at: s.expires_at,
            secret_valid_until: s.secret_valid_until,
            route_generation: AtomicU64::new(table.generation),
            permission_bits: AtomicU64::new(table.permission_bits(&s.permissions)),
            entitlement_bits: AtomicU64::new(s.account.entitlement_bits(table)),
            permissions: s.permissions,
            ips: s.ips,
            account: s.account,
            limits: s.limits,
            pool: s.pool,
            home,
            usage: Usage {
                spent: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                last_used_ms: AtomicU64::new(0),
                dirty: AtomicBool::new(false),
                lifetime_spent: AtomicU64::new(lifetime_spent),
                tier_pct: AtomicU32::new(tier_pct),
                next_tier_at: AtomicU64::new(next_tier_at),
            },
            own_meter,
            public_ids: OnceLock::new(),
        }
    }

    /// The snapshot holding the live part (itself unless rebuilt).
    #[inline]
    pub(crate) fn home(&self) -> &CachedKey {
        self.home.as_deref().unwrap_or(self)
    }

    /// The `Arc` of [`home`](Self::home).
    pub(crate) fn home_arc(self: &Arc<Self>) -> Arc<CachedKey> {
        self.home.clone().unwrap_or_else(|| self.clone())
    }

    /// The meter requests spend from (`None`: unmetered).
    #[inline]
    pub(crate) fn meter(&self) -> Option<&Meter> {
        match self.metering {
            Metering::Unmetered => None,
            Metering::Own => Some(&self.home().own_meter),
            Metering::Pool => self.pool.as_deref(),
        }
    }

    /// A handle on that meter for the writer.
    pub(crate) fn meter_ref(self: &Arc<Self>) -> Option<MeterRef> {
        match self.metering {
            Metering::Unmetered => None,
            Metering::Own => Some(MeterRef::Own(self.home_arc())),
            Metering::Pool => self.pool.clone().map(MeterRef::Pool),
        }
    }

    /// Whether `ip` may use the key (an empty allowlist allows any address).
    #[inline]
    pub(crate) fn ip_allowed(&self, ip: Option<IpAddr>) -> bool {
        self.ips.is_empty() || ip.is_some_and(|ip| self.ips.iter().any(|net| net.contains(&ip)))
    }

    /// Recompiles the permission and entitlement bits against a new route table.
    pub(crate) fn recompile(&self, table: &RouteTable) {
        self.permission_bits
            .store(table.permission_bits(&self.permissions), Ordering::Relaxed);
        self.entitlement_bits
            .store(self.account.entitlement_bits(table), Ordering::Relaxed);
        self.route_generation
            .store(table.generation, Ordering::Release);
    }

    /// Current spend-tier multiplier, in percent.
    #[inline]
    pub(crate) fn tier_pct(&self) -> u32 {
        self.home().usage.tier_pct.load(Ordering::Relaxed)
    }

    /// The key's and owner's public ids, encoded once.
    pub(crate) fn public_ids(&self, ids: &IdCipher) -> &(PublicId, PublicId) {
        self.home().public_ids.get_or_init(|| {
            Box::new((
                ids.encode(self.kind, self.id),
                ids.encode(IdKind::Account, self.owner),
            ))
        })
    }

    /// Counts one successful verify. Returns true when the key must be queued for a flush.
    #[inline]
    pub(crate) fn record_use(&self, now_ms: u64) -> bool {
        let usage = &self.home().usage;
        usage.requests.fetch_add(1, Ordering::Relaxed);
        usage.last_used_ms.fetch_max(now_ms, Ordering::Relaxed);
        self.mark_dirty()
    }

    /// Counts spend. Returns true when the key must be queued for a flush.
    pub(crate) fn record_spend(&self, units: u64, tiers: &[crate::SpendTier]) -> bool {
        if units == 0 {
            return false;
        }
        let usage = &self.home().usage;
        usage.spent.fetch_add(units, Ordering::Relaxed);
        let lifetime = usage.lifetime_spent.fetch_add(units, Ordering::Relaxed) + units;
        if lifetime >= usage.next_tier_at.load(Ordering::Relaxed) {
            let (pct, next) = crate::limits::tier_for(tiers, lifetime);
            usage.tier_pct.store(pct, Ordering::Relaxed);
            usage.next_tier_at.store(next, Ordering::Relaxed);
        }
        self.mark_dirty()
    }

    /// Marks the usage unflushed; true if it was not already (queue it then).
    #[inline]
    pub(crate) fn mark_dirty(&self) -> bool {
        let dirty = &self.home().usage.dirty;
        !dirty.load(Ordering::Relaxed) && !dirty.swap(true, Ordering::AcqRel)
    }

    /// Takes the unflushed (spend, requests, last used) for the writer.
    pub(crate) fn take(&self) -> (u64, u64, u64) {
        let usage = &self.home().usage;
        usage.dirty.store(false, Ordering::Release);
        (
            usage.spent.swap(0, Ordering::AcqRel),
            usage.requests.swap(0, Ordering::AcqRel),
            usage.last_used_ms.load(Ordering::Acquire),
        )
    }

    /// Puts back what [`take`](Self::take) returned when the flush failed.
    pub(crate) fn restore(&self, spent: u64, requests: u64, last_used: u64) {
        let usage = &self.home().usage;
        usage.spent.fetch_add(spent, Ordering::AcqRel);
        usage.requests.fetch_add(requests, Ordering::AcqRel);
        usage.last_used_ms.fetch_max(last_used, Ordering::AcqRel);
    }
}

/// A credit meter as the writer holds it: a key's own (inside its home snapshot) or a pool's.
#[derive(Debug, Clone)]
pub(crate) enum MeterRef {
    /// The meter of this home snapshot.
    Own(Arc<CachedKey>),
    /// A pool's meter.
    Pool(Arc<Meter>),
}

impl std::ops::Deref for MeterRef {
    type Target = Meter;
    #[inline]
    fn deref(&self) -> &Meter {
        match self {
            MeterRef::Own(key) => &key.home().own_meter,
            MeterRef::Pool(meter) => meter,
        }
    }
}

impl MeterRef {
    /// Whether both handles are the same meter.
    pub(crate) fn ptr_eq(a: &MeterRef, b: &MeterRef) -> bool {
        std::ptr::eq::<Meter>(&**a, &**b)
    }

    /// Handles on the meter's allocation (for "is anybody else using it").
    pub(crate) fn strong_count(this: &MeterRef) -> usize {
        match this {
            MeterRef::Own(key) => Arc::strong_count(key),
            MeterRef::Pool(meter) => Arc::strong_count(meter),
        }
    }
}

/// A cache slot: a key, or a remembered miss.
#[derive(Debug)]
pub(crate) enum Slot {
    Key(Arc<CachedKey>),
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
pub(crate) type Evicted = Vec<(KeyHash, Arc<CachedKey>)>;

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
        entry: Arc<CachedKey>,
        epoch: u64,
    ) -> Result<Evicted, Arc<CachedKey>> {
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
            if let Some(Slot::Key(old)) = shard.insert(hash, Slot::Key(entry)) {
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

    /// Applies `f` to every cached key (route-table recompilation).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&CachedKey)) {
        for shard in self.shards.iter() {
            for slot in shard.read().values() {
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
