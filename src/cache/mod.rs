//! The verification cache: key hash → [`CachedKey`], sharded so that a hit takes only the read
//! side of one of many shard locks (never a lock every thread shares) and touches no disk.
//!
//! A cached key is one allocation holding everything `verify` checks plus the key's live
//! counters and credit lease, so a hit reads one slot and one [`CachedKey`] (and a pool's
//! meter for pooled keys). Admin changes evict synchronously, so the very next verify re-reads
//! the record; the rebuilt snapshot keeps using the live part of the first one (see
//! [`CachedKey`]). Misses are cached too (bounded), and forgotten when a key that could match
//! is created.

mod table;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering, fence};

use arc_swap::ArcSwap;
use ipnet::IpNet;
use parking_lot::RwLock;

use crate::credits::meter::Meter;
use crate::hashing::KeyHash;
use crate::limits::KeyLimits;
use crate::policy::RouteTable;
use crate::public_id::{IdCipher, IdKind, PublicId};
use crate::record::SubscriptionStatus;
pub(crate) use table::Slot;
use table::Table;

/// Most shards of the cache; a power of two.
const MAX_SHARDS: usize = 256;
/// A smaller cache has fewer shards, at least this many keys each on average, so that what
/// it holds stays close to its capacity (each of several shards has slack for the spread of
/// keys over them: four standard deviations, which at this size is 13 %); one below twice
/// this holds exactly its capacity.
const MIN_KEYS_PER_SHARD: usize = 1024;

/// Usage counters of one key since the writer last took them. They live in the key's first
/// cached snapshot (its "home") and survive rebuilds of the snapshot by admin changes.
#[derive(Debug)]
struct Usage {
    requests: AtomicU64,
    last_used_ms: AtomicU64,
    spent: AtomicU64,
}

/// The owner account's state, shared by all its cached keys. Keys copy what the hot path
/// needs (subscription, entitlement bits) when cached; an account change evicts its keys.
#[derive(Debug)]
pub(crate) struct AccountState {
    /// The account's id.
    pub id: u64,
    status: AtomicU8,
    pub entitlements: ArcSwap<BTreeSet<String>>,
    /// The account's public id, on first request: one for all its cached keys.
    public_id: std::sync::OnceLock<PublicId>,
}

impl AccountState {
    pub(crate) fn new(id: u64, status: SubscriptionStatus, entitlements: BTreeSet<String>) -> Self {
        AccountState {
            id,
            status: AtomicU8::new(status_code(status)),
            entitlements: ArcSwap::from_pointee(entitlements),
            public_id: std::sync::OnceLock::new(),
        }
    }

    /// The account's public id.
    pub(crate) fn public_id(&self, ids: &IdCipher) -> PublicId {
        *self
            .public_id
            .get_or_init(|| ids.encode(IdKind::Account, self.id))
    }

    /// Whether the subscription lets keys work (active, trialing or past due).
    #[inline]
    pub(crate) fn subscription_ok(&self) -> bool {
        self.status.load(Ordering::Acquire) < status_code(SubscriptionStatus::Canceled)
    }

    /// The entitlements as route bits of `table`.
    pub(crate) fn entitlement_bits(&self, table: &RouteTable) -> u64 {
        // The set is one more cold cache line a miss waits for: read only when it matters.
        if !table.asks_entitlements() {
            return table.entitlement_bits(&BTreeSet::new());
        }
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

/// What a presented secret may reach: its permissions, its IP allowlist and, for a rolled
/// key's previous secret, until when it works. Interned: keys with the same permissions and
/// allowlist share one, so a cached key spends one pointer on all three.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct Scope {
    /// Granted permissions.
    pub permissions: Vec<String>,
    /// IP allowlist (empty: any address).
    pub ips: Vec<IpNet>,
    /// For a rolled key's previous secret: when it stops working (`u64::MAX` otherwise).
    pub secret_valid_until: u64,
}

/// [`CachedKey::flags`] bits.
const DISABLED: u8 = 1;
/// The owner's subscription does not let keys work (copied at load; an account change evicts).
const SUBSCRIPTION_INACTIVE: u8 = 1 << 1;
/// The scope has an IP allowlist.
const IP_ALLOWLIST: u8 = 1 << 2;
/// The secret stops working at the scope's `secret_valid_until` (a rolled key's previous one).
const SECRET_DEADLINE: u8 = 1 << 3;
/// [`CachedKey::route_generation`] while the bits are being rewritten.
const RECOMPILING: u32 = u32::MAX;

/// A cached key: everything the verify chain checks, and the key's live counters and credit
/// lease, in one allocation, so that a cache hit reads one slot and one `CachedKey`: 168
/// bytes, a 192-byte malloc chunk with `Arc`'s counts (the per-key memory budget).
///
/// The snapshot part is immutable while cached; an admin change evicts it and the next verify
/// builds a new one from the record. The live part (usage, own meter, public ids) must survive
/// that, since grants in flight and the credit writer still use it: a rebuilt snapshot points
/// at the key's first snapshot (`home`) and uses the live part there.
#[derive(Debug)]
pub(crate) struct CachedKey {
    /// The first time (ms) this secret does not work: its expiry, or a rolled key's previous
    /// secret's deadline if earlier (`u64::MAX`: none). Past it, the chain asks which.
    deadline: u64,
    /// Route-table generation the two bit sets below were compiled against (its low 32 bits:
    /// every route change recompiles every cached key, so no stale key can meet a generation
    /// 2³² changes later), [`RECOMPILING`] while they are rewritten. Read them through
    /// [`compiled_bits`](Self::compiled_bits).
    route_generation: AtomicU32,
    pub kind: IdKind,
    pub metering: Metering,
    /// [`DISABLED`], [`SUBSCRIPTION_INACTIVE`], [`IP_ALLOWLIST`], [`SECRET_DEADLINE`].
    flags: u8,
    /// The usage counters are queued for a flush (the home's is the one used).
    usage_dirty: AtomicBool,
    permission_bits: AtomicU64,
    /// The owner's entitlements as route bits.
    entitlement_bits: AtomicU64,
    /// Permissions, IP allowlist, secret deadline (interned).
    pub scope: Arc<Scope>,
    /// Rate limits and spend tier (`None`: no limits), kept across rebuilds while configured
    /// the same.
    pub limits: Option<Arc<KeyLimits>>,
    /// The pool's meter when `metering` is `Pool`.
    pub pool: Option<Arc<Meter>>,
    home: Option<Arc<CachedKey>>,
    usage: Usage,
    /// The key's own meter; its id is the key's id (see [`id`](Self::id)).
    own_meter: Meter,
    /// The owner account's state (entitlement names, for routes without a bit).
    pub account: Arc<AccountState>,
}

/// What [`CachedKey::new`] needs besides the live part.
pub(crate) struct Snapshot {
    pub kind: IdKind,
    pub disabled: bool,
    pub expires_at: u64,
    pub scope: Arc<Scope>,
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
    ) -> Self {
        let home = home.map(|h| h.home.clone().unwrap_or(h));
        let secret_valid_until = s.scope.secret_valid_until;
        let flags = [
            (s.disabled, DISABLED),
            (!s.account.subscription_ok(), SUBSCRIPTION_INACTIVE),
            (!s.scope.ips.is_empty(), IP_ALLOWLIST),
            (secret_valid_until != u64::MAX, SECRET_DEADLINE),
        ]
        .into_iter()
        .filter_map(|(set, bit)| set.then_some(bit))
        .fold(0, |flags, bit| flags | bit);
        CachedKey {
            deadline: s.expires_at.min(secret_valid_until),
            kind: s.kind,
            metering: s.metering,
            flags,
            usage_dirty: AtomicBool::new(false),
            route_generation: AtomicU32::new(table.generation as u32),
            permission_bits: AtomicU64::new(table.permission_bits(&s.scope.permissions)),
            entitlement_bits: AtomicU64::new(s.account.entitlement_bits(table)),
            scope: s.scope,
            account: s.account,
            limits: s.limits,
            pool: s.pool,
            home,
            usage: Usage {
                requests: AtomicU64::new(0),
                last_used_ms: AtomicU64::new(0),
                spent: AtomicU64::new(0),
            },
            own_meter,
        }
    }

    /// Whether the key is past its deadline at `now_ms` (expired, or a previous secret past
    /// its grace period): then the chain asks [`secret_expired`](Self::secret_expired).
    #[inline]
    pub(crate) fn past_deadline(&self, now_ms: u64) -> bool {
        self.deadline <= now_ms
    }

    /// Whether this is a rolled key's previous secret and its grace period is over.
    pub(crate) fn secret_expired(&self, now_ms: u64) -> bool {
        self.flags & SECRET_DEADLINE != 0 && self.scope.secret_valid_until <= now_ms
    }

    /// Whether the key is disabled.
    #[inline]
    pub(crate) fn disabled(&self) -> bool {
        self.flags & DISABLED != 0
    }

    /// Whether the owner's subscription lets keys work (as it was when cached).
    #[inline]
    pub(crate) fn subscription_ok(&self) -> bool {
        self.flags & SUBSCRIPTION_INACTIVE == 0
    }

    /// The key's id (its own meter's: every snapshot's own meter is made for the key).
    #[inline]
    pub(crate) fn id(&self) -> u64 {
        self.own_meter.id
    }

    /// The owner account's id.
    #[inline]
    pub(crate) fn owner(&self) -> u64 {
        self.account.id
    }

    /// The snapshot holding the live part (itself unless rebuilt).
    #[inline]
    pub(crate) fn home(&self) -> &CachedKey {
        self.home.as_deref().unwrap_or(self)
    }

    /// Whether this snapshot is its key's home (the first one built, not a rebuild).
    #[inline]
    pub(crate) fn is_home(&self) -> bool {
        self.home.is_none()
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
            Metering::Own => Some(self.own_meter()),
            Metering::Pool => self.pool.as_deref(),
        }
    }

    /// The key's own meter (its home's), whatever the key spends from.
    #[inline]
    pub(crate) fn own_meter(&self) -> &Meter {
        &self.home().own_meter
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
        self.flags & IP_ALLOWLIST == 0
            || ip.is_some_and(|ip| {
                // A dual-stack listener reports IPv4 clients as `::ffff:a.b.c.d`.
                let ip = ip.to_canonical();
                self.scope.ips.iter().any(|net| net.contains(&ip))
            })
    }

    /// The permission and entitlement bits, if they were compiled against `table` and no
    /// recompilation overlapped the read (`None`: check by name instead).
    #[inline]
    pub(crate) fn compiled_bits(&self, table: &RouteTable) -> Option<(u64, u64)> {
        let generation = table.generation as u32;
        let before = self.route_generation.load(Ordering::Acquire);
        if before != generation || generation == RECOMPILING {
            return None;
        }
        let permission = self.permission_bits.load(Ordering::Relaxed);
        let entitlement = self.entitlement_bits.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let after = self.route_generation.load(Ordering::Relaxed);
        (after == generation).then_some((permission, entitlement))
    }

    /// Recompiles the permission and entitlement bits against a new route table.
    pub(crate) fn recompile(&self, table: &RouteTable) {
        // A seqlock with one writer at a time (route changes publish one after another): a
        // reader that sees any of the new bits sees the generation changed, so it never
        // tests one table's rule index against another table's bits.
        self.route_generation.store(RECOMPILING, Ordering::Relaxed);
        fence(Ordering::Release);
        self.permission_bits.store(
            table.permission_bits(&self.scope.permissions),
            Ordering::Relaxed,
        );
        self.entitlement_bits
            .store(self.account.entitlement_bits(table), Ordering::Relaxed);
        self.route_generation
            .store(table.generation as u32, Ordering::Release);
    }

    /// The key's public id, sealed per call (≈ 80 ns: cheaper than the memory of keeping it).
    pub(crate) fn public_id(&self, ids: &IdCipher) -> PublicId {
        ids.encode(self.kind, self.id())
    }

    /// Counts one successful verify. Returns true when the key must be queued for a flush.
    #[inline]
    pub(crate) fn record_use(&self, now_ms: u64) -> bool {
        let usage = &self.home().usage;
        // The time before the count: a writer's `take` that counts this request (its swap
        // acquires what this add releases) then reads this time too. The other way round, a
        // take between the two wrote the request with the time before it, and the next round,
        // finding no new request, unlisted the key without writing the time (found by a
        // reviewer, by reading: the stored last use trailed the last counted request).
        // A plain store, not a read-modify-write: two requests racing may leave either's
        // time, both of which are "last used".
        if usage.last_used_ms.load(Ordering::Relaxed) < now_ms {
            usage.last_used_ms.store(now_ms, Ordering::Relaxed);
        }
        // `SeqCst` here and in `mark_dirty` pairs with the writer's unlisting (see `unlist`).
        usage.requests.fetch_add(1, Ordering::SeqCst);
        self.mark_dirty()
    }

    /// The time of the last successful verify this process counted (ms; 0: none), flushed
    /// or not.
    pub(crate) fn last_used_ms(&self) -> u64 {
        self.home().usage.last_used_ms.load(Ordering::Acquire)
    }

    /// Counts spend. Returns true when the key must be queued for a flush.
    pub(crate) fn record_spend(&self, units: u64, tiers: &[crate::SpendTier]) -> bool {
        if units == 0 {
            return false;
        }
        saturating_add(&self.home().usage.spent, units);
        if let Some(limits) = &self.limits {
            limits.record_spend(units, tiers);
        }
        self.mark_dirty()
    }

    /// Spend counted on this key's home that the writer has not taken yet (so not yet in
    /// the durable usage record).
    pub(crate) fn unflushed_spend(&self) -> u64 {
        self.home().usage.spent.load(Ordering::SeqCst)
    }

    /// Marks the usage unflushed; true if it was not already (queue it then). The mark stays
    /// set while the writer keeps the key listed, so a key in use is queued once, not once
    /// per flush.
    #[inline]
    pub(crate) fn mark_dirty(&self) -> bool {
        let dirty = &self.home().usage_dirty;
        !dirty.load(Ordering::SeqCst) && !dirty.swap(true, Ordering::AcqRel)
    }

    /// Takes the unflushed (spend, requests, last used) for the writer; the key stays marked.
    pub(crate) fn take(&self) -> (u64, u64, u64) {
        let usage = &self.home().usage;
        (
            usage.spent.swap(0, Ordering::SeqCst),
            usage.requests.swap(0, Ordering::SeqCst),
            usage.last_used_ms.load(Ordering::Acquire),
        )
    }

    /// The writer found the key idle for a whole flush interval: clears its mark and takes
    /// the counters again. A request racing this either saw the mark cleared and queued the
    /// key itself, or counted before the second take, which returns what it counted.
    /// (Counting and `mark_dirty`'s load are `SeqCst`, as are the store and the take here, so
    /// a request cannot both miss the cleared mark and count after the take.)
    pub(crate) fn unlist(&self) -> (u64, u64, u64) {
        self.home().usage_dirty.store(false, Ordering::SeqCst);
        self.take()
    }

    /// Puts back what [`take`](Self::take) returned when the flush failed.
    pub(crate) fn restore(&self, spent: u64, requests: u64, last_used: u64) {
        let usage = &self.home().usage;
        saturating_add(&usage.spent, spent);
        saturating_add(&usage.requests, requests);
        usage.last_used_ms.fetch_max(last_used, Ordering::AcqRel);
    }
}

/// Adds `n` to `counter`, stopping at `u64::MAX`: an unmetered key charges what its commits
/// say, and a lifetime spend must not wrap to a small figure. One `fetch_add`, as before
/// (commit's hot path); an add that wrapped stores the maximum. Adds racing it may wrap
/// again (each then stores the maximum too) or add to the wrapped figure before the store,
/// and a flush between the two takes that figure: the counter still ends at the maximum, and
/// so does the durable spend, which adds what each flush takes with `saturating_add`.
fn saturating_add(counter: &AtomicU64, n: u64) {
    let before = counter.fetch_add(n, Ordering::SeqCst);
    if before.checked_add(n).is_none() {
        counter.store(u64::MAX, Ordering::SeqCst);
    }
}

/// A cached key with its own meter for balance `id` and nothing else set (unit tests).
#[cfg(test)]
pub(crate) fn test_key(id: u64) -> Arc<CachedKey> {
    test_key_metered(id, Metering::Own)
}

/// A key like [`test_key`]'s, metered as `metering`.
#[cfg(test)]
pub(crate) fn test_key_metered(id: u64, metering: Metering) -> Arc<CachedKey> {
    let account = Arc::new(AccountState::new(
        1,
        SubscriptionStatus::Active,
        BTreeSet::new(),
    ));
    let snapshot = Snapshot {
        kind: IdKind::Key,
        disabled: false,
        expires_at: u64::MAX,
        scope: Arc::new(Scope {
            permissions: Vec::new(),
            ips: Vec::new(),
            secret_valid_until: u64::MAX,
        }),
        account,
        limits: None,
        metering,
        pool: None,
    };
    let meter = Meter::new(id, None, IdKind::Key, false);
    let table = RouteTable::new(0, Vec::new());
    Arc::new(CachedKey::new(snapshot, &table, None, meter))
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
            MeterRef::Own(key) => key.own_meter(),
            MeterRef::Pool(meter) => meter,
        }
    }
}

impl MeterRef {
    /// Whether both handles are the same meter.
    pub(crate) fn ptr_eq(a: &MeterRef, b: &MeterRef) -> bool {
        std::ptr::eq::<Meter>(&**a, &**b)
    }

    /// Whether at most `most` handles on the meter's allocation are left (for "is anybody
    /// else using it"), and if so, what the others wrote before dropping theirs is visible
    /// (see [`held_by_at_most`](crate::holders::held_by_at_most)).
    pub(crate) fn held_by_at_most(this: &MeterRef, most: usize) -> bool {
        match this {
            MeterRef::Own(key) => crate::holders::held_by_at_most(key, most),
            MeterRef::Pool(meter) => crate::holders::held_by_at_most(meter, most),
        }
    }
}

/// The sharded cache.
pub(crate) struct Cache {
    shards: Box<[RwLock<Table>]>,
    /// `shards.len() - 1` (a power of two less one).
    shard_mask: usize,
    /// Keys evicted to make room.
    evictions: AtomicU64,
    /// Bumped by every invalidation. A miss that read the database before a bump does not
    /// cache what it read: the change it may have missed has already evicted.
    epoch: AtomicU64,
}

/// What eviction took out, for the engine to settle (retire meters).
pub(crate) type Evicted = Vec<Arc<CachedKey>>;

impl Cache {
    pub(crate) fn new(capacity: usize) -> Self {
        // The most shards, up to the largest power of two, that keep this many keys each.
        let shards =
            ((capacity / MIN_KEYS_PER_SHARD + 1).next_power_of_two() / 2).clamp(1, MAX_SHARDS);
        // Keys land in shards by hash, so shard sizes vary around the mean by about its
        // square root: four of those (plus a little) of slack let `capacity` keys fit. One
        // shard holds exactly `capacity`.
        let mean = capacity.div_ceil(shards).max(1);
        let per_shard = match shards {
            1 => mean,
            _ => mean + 4 * mean.isqrt() + 8,
        };
        Cache {
            shards: (0..shards)
                .map(|_| RwLock::new(Table::new(per_shard)))
                .collect(),
            shard_mask: shards - 1,
            evictions: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    /// The invalidation epoch; read it before loading a record to cache.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Makes every miss that began reading before now refuse to cache what it read.
    pub(crate) fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    #[inline]
    fn shard(&self, hash: &KeyHash) -> &RwLock<Table> {
        // Bytes 0..16 are the entry's key and tag; the shard comes from other bytes.
        &self.shards[hash[16] as usize & self.shard_mask]
    }

    /// Runs `f` on the slot for `hash` under the shard's read lock. `None`: not cached.
    #[inline]
    pub(crate) fn with<R>(&self, hash: &KeyHash, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        let shard = self.shard(hash).read();
        shard.get(hash).map(f)
    }

    /// Caches a key read at `epoch` (replacing what was there). Gives the key back when an
    /// invalidation happened since; otherwise returns the keys that left: one evicted to
    /// make room, and a different key's entry replaced, if any.
    pub(crate) fn insert(
        &self,
        hash: KeyHash,
        key: Arc<CachedKey>,
        epoch: u64,
    ) -> Result<Evicted, Arc<CachedKey>> {
        let id = key.id();
        let mut shard = self.shard(&hash).write();
        if self.epoch() != epoch {
            return Err(key);
        }
        let (replaced, evicted) = shard.insert(&hash, Slot::Key(key));
        drop(shard);
        let mut left = Vec::new();
        if let Some(Slot::Key(key)) = evicted {
            self.evictions.fetch_add(1, Ordering::Relaxed);
            left.push(key);
        }
        // A replaced snapshot of the same key did not leave: the new one took over its live
        // part (see `CachedKey`). Another key's did (no two live keys share a hash, and a
        // deleted key is evicted first, so this is defence, not a path in use).
        match replaced {
            Some(Slot::Key(key)) if key.id() != id => left.push(key),
            _ => {}
        }
        Ok(left)
    }

    /// Keys evicted to make room so far.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Remembers that `hash` matches no key (bounded like keys: never evicts a key for it).
    pub(crate) fn insert_missing(&self, hash: KeyHash, epoch: u64) {
        let mut shard = self.shard(&hash).write();
        if !shard.is_full() && self.epoch() == epoch && shard.get(&hash).is_none() {
            shard.insert(&hash, Slot::Missing);
        }
    }

    /// Forgets a remembered miss for `hash` (a key with this hash now exists).
    pub(crate) fn forget_missing(&self, hash: &KeyHash) {
        self.invalidate();
        let mut shard = self.shard(hash).write();
        if matches!(shard.get(hash), Some(Slot::Missing)) {
            shard.remove(hash);
        }
    }

    /// Forgets every remembered miss (after an import or a hash-scheme change).
    pub(crate) fn forget_all_missing(&self) {
        self.invalidate();
        for shard in self.shards.iter() {
            // Under the read lock first: most shards remember no miss, and rebuilding one
            // (its whole entry array) would hold its verifies back for nothing.
            if shard.read().missing() > 0 {
                shard.write().retain(|slot| matches!(slot, Slot::Key(_)));
            }
        }
    }

    /// Removes the cached keys for `hashes` (a key's current and rolled secrets).
    pub(crate) fn evict(&self, hashes: &[KeyHash]) -> Evicted {
        self.invalidate();
        let mut evicted = Vec::new();
        for hash in hashes {
            if let Some(Slot::Key(key)) = self.shard(hash).write().remove(hash) {
                evicted.push(key);
            }
        }
        evicted
    }

    /// Removes every entry (after a hash-scheme change, when every cache key changes).
    pub(crate) fn clear(&self) -> Evicted {
        self.invalidate();
        let mut evicted = Vec::new();
        for shard in self.shards.iter() {
            for slot in shard.write().drain() {
                if let Slot::Key(key) = slot {
                    evicted.push(key);
                }
            }
        }
        evicted
    }

    /// Applies `f` to every cached key (route-table recompilation).
    pub(crate) fn for_each(&self, mut f: impl FnMut(&CachedKey)) {
        for shard in self.shards.iter() {
            for slot in shard.read().slots() {
                if let Slot::Key(key) = slot {
                    f(key);
                }
            }
        }
    }

    /// Bytes of the shards' tables.
    pub(crate) fn table_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.read().bytes()).sum()
    }

    /// Number of cached keys and misses.
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A verify racing a route change never tests one table's rule index against the next
    /// table's bits: rule 0 needs a permission the key lacks in odd generations and nothing
    /// in even ones. Generations only grow, as route changes publish them (a test that
    /// alternated two fixed generations would see a seqlock's ABA, which they cannot meet).
    #[test]
    fn compiled_bits_never_mix_two_route_tables() {
        let table = |generation: u64| {
            let rule = crate::RouteRule::new("/a/");
            let rule = match generation % 2 {
                1 => rule.permission("admin"),
                _ => rule,
            };
            Arc::new(RouteTable::new(generation, vec![rule]))
        };
        let key = test_key(1);
        let current = arc_swap::ArcSwap::new(table(1));
        key.recompile(&current.load());
        assert_eq!(key.compiled_bits(&current.load()), Some((0, 1)));
        assert_eq!(key.compiled_bits(&table(2)), None, "compiled against 1");
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for generation in 2.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let next = table(generation);
                    key.recompile(&next);
                    current.store(next);
                }
            });
            let (mut seen, mut mixed) = (0u64, 0u64);
            for _ in 0..2_000_000 {
                let table = current.load();
                if let Some((permissions, _)) = key.compiled_bits(&table) {
                    seen += 1;
                    mixed += permissions & table.generation & 1;
                }
            }
            stop.store(true, Ordering::Relaxed);
            assert!(seen > 0);
            assert_eq!(
                mixed, 0,
                "an even table's bits read as an odd one's {mixed} times of {seen}"
            );
        });
    }

    /// A cache holds about the keys it was sized for: exactly, when small (one shard), and
    /// within the shards' slack when large.
    #[test]
    fn a_cache_holds_about_its_capacity() {
        for capacity in [1, 2, 1_000, 2_047, 2_048, 4_095, 100_000] {
            let cache = Cache::new(capacity);
            let mut evicted = 0;
            for i in 0..capacity as u64 * 2 {
                let hash = *blake3::hash(&i.to_le_bytes()).as_bytes();
                let epoch = cache.epoch();
                evicted += cache.insert(hash, test_key(i), epoch).unwrap().len();
            }
            let held = cache.len();
            assert_eq!(held + evicted, capacity * 2, "capacity {capacity}");
            assert_eq!(cache.evictions(), evicted as u64);
            assert!(held <= capacity + capacity / 7, "{held} for {capacity}");
            if capacity < 2 * MIN_KEYS_PER_SHARD {
                assert_eq!(held, capacity);
            }
        }
    }

    /// A miss is remembered while its shard has room, and never takes a key's place: the
    /// next key takes the miss's, and a shard full of keys remembers no miss (each then reads
    /// the database again) and keeps every key.
    #[test]
    fn misses_are_remembered_only_while_there_is_room() {
        let cache = Cache::new(4);
        let hash = |i: u64| *blake3::hash(&i.to_le_bytes()).as_bytes();
        let missing = |i: u64| cache.with(&hash(i), |slot| matches!(slot, Slot::Missing));
        cache.insert_missing(hash(100), cache.epoch());
        assert_eq!(missing(100), Some(true), "remembered");
        let insert = |i: u64| cache.insert(hash(i), test_key(i), cache.epoch()).unwrap();
        for i in 0..3 {
            assert!(insert(i).is_empty());
        }
        assert_eq!(cache.len(), 4);
        assert!(insert(3).is_empty(), "no key left");
        assert_eq!(missing(100), None, "the fourth key took the miss's place");
        cache.insert_missing(hash(101), cache.epoch());
        assert_eq!(missing(101), None, "no room: not remembered");
        assert_eq!(cache.len(), 4);
        for i in 0..4 {
            assert_eq!(missing(i), Some(false), "key {i}");
        }
        assert_eq!(cache.evictions(), 0);
    }

    /// Replacing a key's own snapshot is not a departure (the new one carries its live
    /// part on); replacing another key's entry is, so its meter can be retired.
    #[test]
    fn an_entry_replaced_by_another_key_is_returned_as_leaving() {
        let cache = Cache::new(16);
        let hash = [7u8; 32];
        let insert = |key| cache.insert(hash, key, cache.epoch()).unwrap();
        assert!(insert(test_key(1)).is_empty());
        assert!(insert(test_key(1)).is_empty(), "the same key, rebuilt");
        let left = insert(test_key(2));
        assert_eq!(left.iter().map(|k| k.id()).collect::<Vec<_>>(), [1]);
        assert_eq!(cache.evictions(), 0, "not pushed out to make room");
    }

    /// The per-key memory budget (issue 3: ≤ 256 bytes per cached key at 1M keys) is spent
    /// mostly here: with `Arc`'s two counters and malloc's header, 168 bytes is a 192-byte
    /// chunk (176 would be 208). A field added without taking one out shows up here.
    #[test]
    fn a_cached_key_stays_within_its_allocation_class() {
        assert!(
            size_of::<CachedKey>() <= 168,
            "CachedKey grew to {} bytes",
            size_of::<CachedKey>()
        );
        assert_eq!(
            size_of::<Slot>(),
            8,
            "a table entry is key + tag + slot = 24 bytes"
        );
    }
}
