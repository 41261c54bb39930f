//! `verify`: may this presented key make this request right now, and charge it?
//!
//! The chain runs cheapest check first and stops at the first refusal (DESIGN §4):
//! format → hash → cache (one redb read on a miss) → disabled / expired → route permission →
//! IP allowlist → subscription and entitlement → rate limits → credit reservation. On a cache
//! hit nothing here takes a lock other threads share or touches the disk.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::cache::{KeyEntry, KeyState, Slot};
use crate::credits::meter::Meter;
use crate::denial::Denial;
use crate::engine::Loaded;
use crate::hashing::KeyHash;
use crate::keyfmt::Presented;
use crate::ledger::Ledger;
use crate::policy::RouteTable;
use crate::public_id::{IdKind, PublicId};
use crate::routes::permits;

/// One request to verify.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    key: &'a Presented,
    route: &'a str,
    client_ip: Option<IpAddr>,
    cost: Option<u64>,
}

impl<'a> Request<'a> {
    /// A request with `key` for `route` (e.g. `/api/v1/quickhits/create`).
    pub fn new(key: &'a Presented, route: &'a str) -> Self {
        Request {
            key,
            route,
            client_ip: None,
            cost: None,
        }
    }

    /// The client's address, checked against the key's IP allowlist.
    pub fn client_ip(mut self, ip: IpAddr) -> Self {
        self.client_ip = Some(ip);
        self
    }

    /// Credits to reserve (default: the route rule's cost, or 1). `0` verifies without
    /// spending (a peek).
    pub fn cost(mut self, cost: u64) -> Self {
        self.cost = Some(cost);
        self
    }
}

/// Rate-limit state at the time of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateState {
    /// Requests left right now in the key's tightest named limit (`None`: no named limit).
    pub requests_remaining: Option<u64>,
    /// Tokens left in the token window (`None`: no token window).
    pub tokens_remaining: Option<u64>,
    /// Spend-tier multiplier applied to the limits, in percent.
    pub tier_multiplier_pct: u32,
}

/// Token accounting of a committed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenStats {
    /// Units the request really used (what `commit` was given).
    pub used: u64,
    /// Units charged: `used`, unless the balance ran out first.
    pub charged: u64,
    /// Units that could not be charged because the balance hit zero.
    pub uncovered: u64,
    /// Credits left after the charge (`None`: unmetered).
    pub remaining_credits: Option<u64>,
}

/// What a committed request costs, at the route's unit price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Pricing {
    /// Units charged.
    pub units: u64,
    /// Price of one unit in millionths of the currency unit.
    pub unit_price_micros: u64,
    /// `units × unit_price_micros`.
    pub total_micros: u64,
}

/// The result of [`Grant::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Receipt {
    /// Token accounting.
    pub token_stats: TokenStats,
    /// Price.
    pub pricing: Pricing,
}

/// Permission to go ahead, holding a credit reservation. [`commit`](Grant::commit) it with
/// the real cost when the work is done; dropping it uncommitted refunds the reservation.
#[must_use = "commit the grant with the real cost; dropping it refunds the reservation"]
pub struct Grant<'l> {
    ledger: &'l Ledger,
    id: u64,
    kind: IdKind,
    state: Arc<KeyState>,
    meter: Option<Arc<Meter>>,
    /// The key hash, to look the cached entry up again for rarely needed fields.
    hash: KeyHash,
    reserved: u64,
    price_micros: u64,
    /// When rate limits admitted the request (to give the slots back on a late refusal).
    rate_charged_at_ns: Option<u64>,
    /// The meter's balance epoch when the units were reserved: a `set` since then is final,
    /// so a refund is discarded instead of returned.
    epoch: u64,
    settled: bool,
}

impl std::fmt::Debug for Grant<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("key_id", &self.key_id())
            .field("reserved", &self.reserved)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Runs the verify chain and, on success, reserves the request's cost.
    pub fn verify<'l>(&'l self, request: &Request<'_>) -> Result<Grant<'l>, Denial> {
        let key = request.key.expose();
        // 1. Format: prefix, length, alphabet, checksum — before any hashing.
        self.inner.format.parse(key).map_err(Denial::Malformed)?;
        // 2. Hash, then the cache; a miss reads redb once and caches what it found.
        let hash = self.inner.hasher.load().hash_current(key);
        let engine = &self.inner.engine;
        let now = self.now();
        let routes = engine.routes.load();
        let checked = |slot: &Slot| match slot {
            Slot::Key(entry) => Some(check(self, &hash, entry, request, &routes, now.0)),
            Slot::Missing => None,
        };
        let outcome = match engine.cache.with(&hash, checked) {
            Some(Some(outcome)) => outcome,
            Some(None) => return Err(Denial::NotFound),
            None => match engine
                .load(self, &hash, key, now)
                .map_err(|_| Denial::Unavailable)?
            {
                Loaded::Missing => return Err(Denial::NotFound),
                Loaded::Uncached(entry) => check(self, &hash, &entry, request, &routes, now.0),
                Loaded::Cached => engine
                    .cache
                    .with(&hash, checked)
                    .flatten()
                    .ok_or(Denial::NotFound)?,
            },
        };
        match outcome {
            Checked::Granted(grant) => Ok(grant),
            Checked::Denied(denial) => Err(denial),
            Checked::NeedsLease(grant) => self.reserve_slow(grant),
        }
    }

    /// The lease ran short: have the writer lease more (it batches every waiting meter into
    /// one commit) and try again, until the reservation fits or the durable balance is known
    /// to be empty.
    fn reserve_slow<'l>(&'l self, mut grant: Grant<'l>) -> Result<Grant<'l>, Denial> {
        let engine = &self.inner.engine;
        let meter = grant
            .meter
            .clone()
            .expect("only metered grants need a lease");
        let cost = grant.reserved;
        let mut denial = Denial::Unavailable; // the writer kept losing the race: retry later
        for _ in 0..64 {
            let now = self.now().0;
            // A lease taken before a refill came due belongs to the old period: the writer
            // must apply the refill (replacing it) before anything more is spent.
            if meter.current(now) {
                grant.epoch = meter.epoch.load(Ordering::Acquire);
                if meter.try_take(cost).is_some() {
                    grant.note_use(now);
                    return Ok(grant);
                }
                if meter.empty_until_ms.load(Ordering::Acquire) > now {
                    denial = Denial::UsageExceeded;
                    break;
                }
            }
            if !engine.lease_now(&meter, cost) {
                break;
            }
        }
        grant.settled = true; // nothing was reserved
        grant.release_rate();
        Err(denial)
    }
}

enum Checked<'l> {
    Granted(Grant<'l>),
    Denied(Denial),
    /// Every check passed but the in-memory lease is short.
    NeedsLease(Grant<'l>),
}

/// Steps 3–8 on a cached entry, under the shard's read lock.
#[inline]
fn check<'l>(
    ledger: &'l Ledger,
    hash: &KeyHash,
    entry: &KeyEntry,
    request: &Request<'_>,
    routes: &RouteTable,
    now_ms: u64,
) -> Checked<'l> {
    use Checked::Denied;
    // 3. State.
    if entry.secret_valid_until <= now_ms {
        return Denied(Denial::NotFound);
    }
    if entry.disabled {
        return Denied(Denial::Disabled);
    }
    if entry.expires_at <= now_ms {
        return Denied(Denial::Expired);
    }
    // 4. Route permission: the longest matching rule, checked by bit when compiled.
    let route = routes.resolve(request.route);
    let by_bit = entry.route_generation == routes.generation;
    let bit = route
        .index
        .filter(|&i| by_bit && RouteTable::has_bit(i))
        .map(|i| 1u64 << i);
    if let Some(rule) = route.rule {
        let allowed = match (bit, &rule.permission) {
            (Some(bit), _) => entry.permission_bits & bit != 0,
            (None, Some(p)) => permits(&entry.permissions, p),
            (None, None) => true,
        };
        if !allowed {
            return Denied(Denial::Forbidden);
        }
    }
    // 5. Client IP.
    if !entry.ip_allowed(request.client_ip) {
        return Denied(Denial::IpNotAllowed);
    }
    // 6. Subscription, then the route's entitlement (account state shared by its keys).
    let account = &entry.account;
    if !account.subscription_ok() {
        return Denied(Denial::SubscriptionInactive);
    }
    if let Some(required) = route.rule.and_then(|r| r.entitlement.as_ref()) {
        let compiled = account.route_generation.load(Ordering::Acquire) == routes.generation;
        let entitled = match route.index.filter(|&i| compiled && RouteTable::has_bit(i)) {
            Some(i) => account.entitlement_bits.load(Ordering::Acquire) & (1 << i) != 0,
            None => account.entitlements.load().contains(required),
        };
        if !entitled {
            return Denied(Denial::NotEntitled);
        }
    }
    let cost = request
        .cost
        .unwrap_or_else(|| route.rule.map_or(1, |r| r.cost));
    // 7. Rate limits (GCRA), scaled by the key's spend tier.
    let state = &entry.state;
    let tier = state.tier_pct.load(Ordering::Relaxed);
    let now_ns = now_ms.saturating_mul(1_000_000);
    if !state.limits.is_empty() {
        if let Err(retry_after) = state.limits.acquire(now_ns, cost, tier) {
            return Denied(Denial::RateLimited { retry_after });
        }
    }
    // 8. Credits: reserve from the in-memory lease with a CAS.
    let grant = Grant {
        ledger,
        id: entry.id,
        kind: entry.kind,
        state: state.clone(),
        meter: entry.meter.clone(),
        hash: *hash,
        reserved: cost,
        price_micros: route.rule.map_or(0, |r| r.price_micros),
        rate_charged_at_ns: if state.limits.is_empty() {
            None
        } else {
            Some(now_ns)
        },
        epoch: entry
            .meter
            .as_ref()
            .map_or(0, |m| m.epoch.load(Ordering::Acquire)),
        settled: false,
    };
    let reserved = match &entry.meter {
        Some(meter) if cost > 0 && !meter.current(now_ms) => false,
        Some(meter) if cost > 0 => match meter.try_take(cost) {
            Some(left) => {
                if meter.wants_prefetch(left) {
                    ledger.inner.engine.prefetch(meter);
                }
                true
            }
            None => false,
        },
        _ => true,
    };
    if !reserved {
        return Checked::NeedsLease(grant);
    }
    grant.note_use(now_ms);
    Checked::Granted(grant)
}

impl Grant<'_> {
    /// Counts a successful verify in the key's usage.
    fn note_use(&self, now_ms: u64) {
        if self.state.record_use(now_ms) {
            self.ledger
                .inner
                .engine
                .shared
                .dirty_usage
                .push(self.state.clone());
        }
    }

    /// Gives back the rate-limit slots of a request refused after the rate check.
    fn release_rate(&self) {
        if let Some(at) = self.rate_charged_at_ns {
            let tier = self.state.tier_pct.load(Ordering::Relaxed);
            self.state.limits.release(at, self.reserved, tier);
        }
    }

    /// The key's public id.
    pub fn key_id(&self) -> PublicId {
        self.public_ids().0.clone()
    }

    /// The owning account's public id.
    pub fn owner_id(&self) -> PublicId {
        self.public_ids().1.clone()
    }

    fn public_ids(&self) -> &(PublicId, PublicId) {
        self.state.public_ids.get_or_init(|| {
            let ids = &self.ledger.inner.ids;
            (
                ids.encode(self.kind, self.id),
                ids.encode(IdKind::Account, self.state.owner),
            )
        })
    }

    /// The key's granted scopes.
    ///
    /// Read from the cache when asked (so a grant carries no reference to them); empty if
    /// the key was changed or evicted since the grant.
    pub fn permissions(&self) -> Vec<String> {
        let cache = &self.ledger.inner.engine.cache;
        let scopes = |slot: &Slot| match slot {
            Slot::Key(entry) if entry.id == self.id => entry.permissions.to_vec(),
            _ => Vec::new(),
        };
        cache.with(&self.hash, scopes).unwrap_or_default()
    }

    /// Units reserved by this grant.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Credits left, counting this reservation as spent (`None`: unmetered).
    pub fn remaining_credits(&self) -> Option<u64> {
        self.meter.as_ref().map(remaining)
    }

    /// Rate-limit state now.
    pub fn rate_limit(&self) -> RateState {
        let tier = self.state.tier_pct.load(Ordering::Relaxed);
        let now_ns = self.ledger.now().0.saturating_mul(1_000_000);
        let (requests_remaining, tokens_remaining) = self.state.limits.remaining(now_ns, tier);
        RateState {
            requests_remaining,
            tokens_remaining,
            tier_multiplier_pct: tier,
        }
    }

    /// Settles the real cost. Less than reserved refunds the difference; more takes the rest
    /// from the lease and then the durable balance — down to zero, never below (what could
    /// not be charged is reported as `uncovered`).
    pub fn commit(mut self, actual: u64) -> Receipt {
        self.settled = true;
        let engine = &self.ledger.inner.engine;
        let reserved = self.reserved;
        let (charged, uncovered) = match &self.meter {
            None => (actual, 0),
            Some(meter) => {
                // The clock is read only when the cost exceeds the reservation.
                let from_lease = if actual <= reserved {
                    self.refund(meter, reserved - actual);
                    actual
                } else if meter.current(self.ledger.now().0) {
                    reserved + meter.take_up_to(actual - reserved)
                } else {
                    reserved
                };
                if meter.spend(from_lease) {
                    engine.shared.dirty_meters.push(meter.clone());
                }
                let short = actual - from_lease;
                let direct = if short > 0 {
                    engine.shortfall(meter, short)
                } else {
                    0
                };
                (from_lease + direct, short - direct)
            }
        };
        if self.state.record_spend(charged, &engine.tiers) {
            engine.shared.dirty_usage.push(self.state.clone());
        }
        Receipt {
            token_stats: TokenStats {
                used: actual,
                charged,
                uncovered,
                remaining_credits: self.meter.as_ref().map(remaining),
            },
            pricing: Pricing {
                units: charged,
                unit_price_micros: self.price_micros,
                total_micros: charged.saturating_mul(self.price_micros),
            },
        }
    }
}

impl Grant<'_> {
    /// Returns reserved units: to the lease, or — if the balance was `set` since they were
    /// reserved — out of the books, since the set was final.
    fn refund(&self, meter: &Arc<Meter>, units: u64) {
        if units == 0 {
            return;
        }
        if meter.epoch.load(Ordering::Acquire) == self.epoch {
            meter.give_back(units);
        } else {
            self.ledger.inner.engine.discard(meter, units);
        }
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        if !self.settled {
            if let Some(meter) = self.meter.clone() {
                self.refund(&meter, self.reserved);
            }
        }
    }
}

fn remaining(meter: &Arc<Meter>) -> u64 {
    meter.durable_balance.load(Ordering::Acquire) + meter.lease.load(Ordering::Acquire)
}
