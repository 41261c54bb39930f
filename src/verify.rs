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

use crate::cache::{CachedKey, Metering, Slot};
use crate::credits::meter::{MAX_LEASE, MAX_LEASED, Meter};
use crate::credits::writer::Handoff;
use crate::denial::Denial;
use crate::engine::{Loaded, Stripe};
use crate::keyfmt::Presented;
use crate::ledger::Ledger;
use crate::limits::{Admission, tier_multiplier};
use crate::policy::RouteTable;
use crate::public_id::PublicId;
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
    ///
    /// Pass the path the server routes on, as it routes it: percent-decoded, without a query,
    /// with `.` and `..` segments and repeated slashes resolved, in the case the route rules
    /// use. Rules match by plain prefix (the longest wins), so `/admin/` does not cover
    /// `/admin` or `/x/../admin/users`; end a rule with `/` to stop it at a segment boundary
    /// (`/api/v1` also covers `/api/v10`). A route no rule matches needs no permission; a
    /// route that is no path (empty, or not starting with `/`) is refused as `forbidden`.
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
    /// How many of the configured spend tiers the key has reached (0: none, or no rate
    /// limits).
    pub tier: u32,
    /// The reached tier's multiplier, in percent, for the limits it does not set explicitly
    /// (100: no tier).
    pub tier_multiplier_pct: u32,
}

/// Token accounting of a committed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TokenStats {
    /// Units the request really used (what `commit` was given).
    pub used: u64,
    /// Units charged: `used`, unless the balance ran out first.
    pub charged: u64,
    /// Units that could not be charged: the balance hit zero or, rarely, the storage failed
    /// while the writer charged them past the reservation. (A disk that failed at that
    /// commit's last sync may have charged them after all: the reopened ledger's usage
    /// shows which.)
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
    /// `units × unit_price_micros`, held at `u64::MAX` (≈ 18.4 million million currency
    /// units) should the product pass it.
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
/// The request still counts against the key's rate limits, and its token window keeps the
/// tokens reserved: the request was let through, whatever became of its work.
#[must_use = "commit the grant with the real cost; dropping it refunds the reservation"]
pub struct Grant<'l> {
    ledger: &'l Ledger,
    /// The cached key (its live part holds the lease and counters this grant settles into).
    key: Arc<CachedKey>,
    reserved: u64,
    price_micros: u64,
    /// What rate limits admitted (to give the slots back on a late refusal, or settle the
    /// token window at commit).
    admission: Option<Admission>,
    /// The meter's balance epoch when the units were reserved: a `set` since then is final,
    /// so a refund is discarded instead of returned.
    epoch: u32,
    settled: bool,
    /// Where the grant is counted among those that reserved nothing (see `InFlight`).
    counted: Option<Stripe>,
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
    ///
    /// A cache hit whose key holds enough leased credits touches no disk and takes no lock
    /// other threads share. Otherwise it blocks the calling thread: a miss reads the key's
    /// record (microseconds), and a request its key's lease cannot cover waits for the writer
    /// thread's next durable commit (about a millisecond, more on a slow disk; counted in
    /// [`Stats::lease_waits`](crate::Stats::lease_waits)). An async server calls it inline,
    /// accepting those waits on its executor thread, or under
    /// `tokio::task::block_in_place` (the example server's `auth.rs` says which it does).
    pub fn verify<'l>(&'l self, request: &Request<'_>) -> Result<Grant<'l>, Denial> {
        self.verify_once(request, GONE_RETRIES)
    }

    /// [`verify`](Self::verify), running the chain again up to `retries` times for a request
    /// whose balance is removed while it waits for a lease (see
    /// [`reserve_slow`](Self::reserve_slow)).
    #[inline(always)]
    fn verify_once<'l>(&'l self, request: &Request<'_>, retries: u32) -> Result<Grant<'l>, Denial> {
        let key = request.key.expose();
        // 1. Format: prefix, length, alphabet, checksum — before any hashing.
        self.inner.format.parse(key).map_err(Denial::Malformed)?;
        // 2. Hash, then the cache; a miss reads redb once and caches what it found.
        let engine = &self.inner.engine;
        let policy = engine.policy.load();
        let hash = policy.hasher.hash_current(key);
        let now = self.now();
        let routes = &policy.routes;
        let checked = |slot: &Slot| match slot {
            Slot::Key(key) => Some(check(self, key, request, routes, now.0)),
            Slot::Missing => None,
        };
        let cached = match engine.cache.with(&hash, checked) {
            // No key of its own any more, but the store may know its plaintext as another
            // (imported by its SHA-256): forgotten and looked up like any other miss, which
            // remembers it if nothing is.
            Some(Some(Checked::DeadSecret)) => {
                engine.forget_dead_secret(&hash);
                None
            }
            cached => cached,
        };
        let outcome = match cached {
            Some(Some(outcome)) => outcome,
            Some(None) => return Err(Denial::NotFound),
            None => match engine
                .load(self, &hash, key, now)
                .map_err(|_| Denial::Unavailable)?
            {
                Loaded::Missing => return Err(Denial::NotFound),
                Loaded::Cached(key) | Loaded::Uncached(key) => {
                    check(self, &key, request, routes, now.0)
                }
            },
        };
        match outcome {
            Checked::Granted(grant) => Ok(grant),
            Checked::Denied(denial) => Err(denial),
            Checked::DeadSecret => Err(Denial::NotFound),
            Checked::NeedsLease(grant) => self.reserve_slow(grant, request, retries),
        }
    }

    /// The lease ran short: have the writer lease more (it batches every waiting meter into
    /// one commit and hands each waiting request its units directly) and try again, until the
    /// reservation fits or the durable balance is known to be empty.
    ///
    /// A balance removed meanwhile (its key moved to a pool or made unmetered; or deleted)
    /// is no failure of the store: the chain runs again on the key as it is now (`retries`
    /// times at most: the writer can answer before the change has evicted the key's old
    /// entry), instead of answering `unavailable` (found by a reviewer moving keys under
    /// load).
    #[cold]
    fn reserve_slow<'l>(
        &'l self,
        mut grant: Grant<'l>,
        request: &Request<'_>,
        retries: u32,
    ) -> Result<Grant<'l>, Denial> {
        let engine = &self.inner.engine;
        let key = grant.key.clone();
        let meter = key.meter().expect("only metered grants need a lease");
        let handle = key.meter_ref().expect("metered");
        let cost = grant.reserved;
        let mut denial = Denial::Unavailable; // the writer kept losing the race: retry later
        let mut gone = false;
        // The growth count under which a refusal made in memory found the balance known
        // empty: its report stands only if no growth came since (see `report_exhausted`).
        let mut refused_under = None;
        for _ in 0..64 {
            let now = self.now().0;
            // A lease taken before a refill came due belongs to the old period: the writer
            // must apply the refill (replacing it) before anything more is spent.
            if meter.current(now) {
                // Read before the take: the writer hands a lease over before it marks the
                // balance empty, so a take after seeing the mark sees that lease too.
                // Before the empty mark: a growth clears that mark, then counts itself.
                let growths = meter.growths();
                let empty = meter.empty_at(now);
                #[cfg(test)]
                if let Some(pause) = engine.shared.after_empty_look.lock().take() {
                    pause();
                }
                if let Some((_, epoch)) = meter.try_take(cost) {
                    grant.epoch = epoch;
                    grant.note_use(now);
                    return Ok(grant);
                }
                // Read again: the writer clears the mark before it takes a lease back (see
                // `reclaim`), so a take that failed on a lease taken back meanwhile asks the
                // writer instead of refusing.
                if empty && meter.empty_at(now) {
                    // Counted again: the same count means no growth came while this looked,
                    // so the empty balance it saw is the one of that count.
                    if meter.growths() == growths {
                        denial = Denial::UsageExceeded;
                        refused_under = Some(growths);
                        break;
                    }
                    continue; // a growth came meanwhile: look again
                }
            }
            match engine.lease_now(&handle, cost) {
                None => break,
                Some(Handoff::Units { units, epoch }) if units == cost => {
                    // The epoch of the balance they came from: a `set` that ran in the same
                    // batch, after this request read the epoch, does not make them final.
                    grant.epoch = epoch;
                    grant.note_use(now);
                    return Ok(grant);
                }
                // Fewer than needed (the balance is running out): back into the lease, as
                // a refund of a reservation of that epoch, kept whole for the next take.
                Some(Handoff::Units { units, epoch }) => {
                    grant.epoch = epoch;
                    grant.put_back(meter, units, MAX_LEASED);
                }
                Some(Handoff::Short) => {
                    denial = Denial::UsageExceeded;
                    break;
                }
                Some(Handoff::Unavailable) => break,
                Some(Handoff::Gone) => {
                    gone = true;
                    break;
                }
            }
        }
        // A refusal the writer made (`Handoff::Short`) it reported, in batch order.
        if let Some(growths) = refused_under {
            engine.report_exhausted(meter, growths);
        }
        grant.settled = true; // nothing was reserved
        grant.release_rate();
        if retries > 0 && gone {
            drop(grant);
            return self.verify_once(request, retries - 1);
        }
        Err(denial)
    }
}

/// How many times a request runs the chain again when its balance goes while it waits.
const GONE_RETRIES: u32 = 8;

enum Checked<'l> {
    /// A rolled key's previous secret past its grace period: no key at all.
    DeadSecret,
    Granted(Grant<'l>),
    Denied(Denial),
    /// Every check passed but the in-memory lease is short.
    NeedsLease(Grant<'l>),
}

/// Steps 3–8 on a cached key, under the shard's read lock.
#[inline]
fn check<'l>(
    ledger: &'l Ledger,
    key: &Arc<CachedKey>,
    request: &Request<'_>,
    routes: &RouteTable,
    now_ms: u64,
) -> Checked<'l> {
    use Checked::Denied;
    // 3. State: a previous secret past its grace period is no key at all; then disabled,
    // then expired (past the deadline, the previous secret's is not the one that passed).
    let past_deadline = key.past_deadline(now_ms);
    if past_deadline && key.secret_expired(now_ms) {
        return Checked::DeadSecret;
    }
    if key.disabled() {
        return Denied(Denial::Disabled);
    }
    if past_deadline {
        return Denied(Denial::Expired);
    }
    // 4. Route permission: the longest matching rule, checked by bit when compiled. A route
    // that is no path matches no rule; refused rather than let through as needing no
    // permission (a server that failed to parse its path would open every route).
    if !request.route.starts_with('/') {
        return Denied(Denial::Forbidden);
    }
    let route = routes.resolve(request.route);
    let compiled = route
        .index
        .filter(|&i| RouteTable::has_bit(i))
        .and_then(|i| Some((1u64 << i, key.compiled_bits(routes)?)));
    if let Some(rule) = route.rule {
        let allowed = match (compiled, &rule.permission) {
            (Some((bit, (permissions, _))), _) => permissions & bit != 0,
            (None, Some(p)) => permits(&key.scope.permissions, p),
            (None, None) => true,
        };
        if !allowed {
            return Denied(Denial::Forbidden);
        }
    }
    // 5. Client IP.
    if !key.ip_allowed(request.client_ip) {
        return Denied(Denial::IpNotAllowed);
    }
    // 6. Subscription, then the route's entitlement (copied from the account when cached).
    if !key.subscription_ok() {
        return Denied(Denial::SubscriptionInactive);
    }
    if let Some(required) = route.rule.and_then(|r| r.entitlement.as_ref()) {
        let entitled = match compiled {
            Some((bit, (_, entitlements))) => entitlements & bit != 0,
            None => key.account.entitlements.load().contains(required),
        };
        if !entitled {
            return Denied(Denial::NotEntitled);
        }
    }
    let cost = request
        .cost
        .unwrap_or_else(|| route.rule.map_or(1, |r| r.cost));
    let meter = key.meter();
    // A balance whose record does not decode can be charged nothing: no peek, and no spend
    // either, even from a lease taken before the damage (the writer could not record it).
    if meter.is_some_and(Meter::unreadable) {
        return Denied(Denial::Unavailable);
    }
    // 7. Rate limits (GCRA), at the key's spend tier.
    let admission = match &key.limits {
        Some(limits) => match limits.acquire(|| ledger.monotonic_ns(), cost) {
            Ok(admission) => Some(admission),
            Err(wait) => {
                // A wait measured on a clock a tick behind may come up a tick short.
                let retry_after = wait.saturating_add(ledger.inner.retry_slack);
                return Denied(Denial::RateLimited { retry_after });
            }
        },
        None => None,
    };
    // 8. Credits: reserve from the in-memory lease with a CAS.
    let mut grant = Grant {
        ledger,
        key: key.clone(),
        reserved: cost,
        price_micros: route.rule.map_or(0, |r| r.price_micros),
        admission,
        epoch: 0, // the epoch of the units reserved, once they are
        settled: false,
        counted: None,
    };
    let reserved = match meter {
        Some(meter) if cost > 0 && !meter.current(now_ms) => false,
        Some(meter) if cost > 0 => match meter.try_take(cost) {
            Some((left, epoch)) => {
                grant.epoch = epoch;
                if meter.wants_prefetch(left)
                    && let Some(handle) = key.meter_ref()
                {
                    ledger.inner.engine.prefetch(&handle);
                }
                true
            }
            None => false,
        },
        // Nothing to reserve (an unmetered key, a peek): counted, so that `close` waits for
        // what the grant commits; refused once the ledger is closing, as a request that needs
        // the writer is (counted before that look, see `InFlight::enter`). Looked at before
        // counting too: a request refused for a close under way is then not counted, so the
        // close's last look at what is held does not catch it passing (found by a reviewer:
        // the close reported a grant still held).
        _ => {
            let engine = &ledger.inner.engine;
            let closing = || engine.shared.closing.load(Ordering::SeqCst);
            let refused = closing() || {
                grant.counted = Some(engine.in_flight.enter());
                closing()
            };
            if refused {
                grant.settled = true;
                grant.release_rate();
                return Denied(Denial::Unavailable);
            }
            true
        }
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
        if self.key.record_use(now_ms) {
            let home = self.key.home_arc();
            self.ledger.inner.engine.shared.dirty_usage.push(home);
        }
    }

    /// Gives back the rate-limit slots of a request refused after the rate check.
    fn release_rate(&self) {
        if let (Some(admission), Some(limits)) = (&self.admission, &self.key.limits) {
            limits.release(|| self.ledger.monotonic_ns(), admission, self.reserved);
        }
    }

    /// The key's public id.
    pub fn key_id(&self) -> PublicId {
        self.key.public_id(&self.ledger.inner.ids)
    }

    /// The owning account's public id.
    pub fn owner_id(&self) -> PublicId {
        self.key.account.public_id(&self.ledger.inner.ids)
    }

    /// The key's granted scopes, as they were when the request was verified.
    pub fn permissions(&self) -> Vec<String> {
        self.key.scope.permissions.clone()
    }

    /// Units reserved by this grant: the request's cost. For an unmetered key no credits
    /// move (its [`remaining_credits`](Self::remaining_credits) is `None`), but the cost is
    /// still what a token window counts and what [`commit`](Self::commit) settles against.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Credits left, counting this reservation as spent (`None`: unmetered). A key's own
    /// balance is read by its first lease, not by the cache miss: until then (a peek of a key
    /// just cached) this reads it from the store, and a balance that cannot be read has 0.
    pub fn remaining_credits(&self) -> Option<u64> {
        remaining(self.ledger, self.key.meter()?)
    }

    /// Rate-limit state now.
    pub fn rate_limit(&self) -> RateState {
        let Some(limits) = &self.key.limits else {
            return RateState {
                requests_remaining: None,
                tokens_remaining: None,
                tier: 0,
                tier_multiplier_pct: 100,
            };
        };
        let tier = limits.tier();
        let (requests_remaining, tokens_remaining) =
            limits.remaining(self.ledger.monotonic_ns(), tier);
        RateState {
            requests_remaining,
            tokens_remaining,
            tier,
            tier_multiplier_pct: tier_multiplier(&self.ledger.inner.engine.tiers, tier),
        }
    }

    /// Settles the real cost. Less than reserved refunds the difference; more takes the rest
    /// from the lease and then the durable balance — down to zero, never below (what could
    /// not be charged is reported as `uncovered`). A token window counts `actual` too: the
    /// difference from the reservation is charged to it or given back.
    ///
    /// A commit of the reservation, or of less when the difference fits back into the lease,
    /// does not wait for the writer thread; one that charges beyond the lease, or gives back
    /// more than the lease keeps (in `Exact` mode, any refund), waits for the writer's
    /// durable commit, as [`Ledger::verify`] can. Dropping an uncommitted grant refunds the
    /// same way.
    pub fn commit(mut self, actual: u64) -> Receipt {
        self.settled = true;
        let engine = &self.ledger.inner.engine;
        let reserved = self.reserved;
        let (charged, uncovered) = match self.key.meter() {
            None => {
                self.record_usage(actual);
                (actual, 0)
            }
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
                let handle = || self.key.meter_ref().expect("metered");
                let short = actual - from_lease;
                let direct = if short > 0 {
                    engine.shortfall(&handle(), short)
                } else {
                    0
                };
                // Counted before the reservation is spent: until then its units are still
                // leased, which holds a close off, so the close's last flush counts this
                // usage (found by a reviewer: a close could end between the two).
                self.record_usage(from_lease + direct);
                if meter.spend(from_lease) {
                    engine.shared.dirty_meters.push(handle());
                }
                if engine.shared.exact && from_lease > 0 {
                    // Written within a gather window, not at the next flush round: a crash
                    // then finds the charge spent, not lost (what `Exact` promises).
                    engine.settle(handle());
                }
                (from_lease + direct, short - direct)
            }
        };
        if actual != reserved
            && let (Some(admission), Some(limits)) = (&self.admission, &self.key.limits)
        {
            limits.settle_tokens(|| self.ledger.monotonic_ns(), admission, reserved, actual);
        }
        Receipt {
            token_stats: TokenStats {
                used: actual,
                charged,
                uncovered,
                remaining_credits: self.key.meter().and_then(|m| remaining(self.ledger, m)),
            },
            pricing: Pricing {
                units: charged,
                unit_price_micros: self.price_micros,
                total_micros: charged.saturating_mul(self.price_micros),
            },
        }
    }
}

/// Credits left on `meter`'s balance: as memory knows them, or read if it has not read them
/// or a refill has come due since (the store's record, refilled as the next lease will).
fn remaining(ledger: &Ledger, meter: &Meter) -> Option<u64> {
    match meter.remaining() {
        Some(left) if meter.current_lazily(|| ledger.now().0) => Some(left),
        _ => Some(ledger.inner.engine.read_remaining(meter)),
    }
}

impl Grant<'_> {
    /// Counts `charged` in the key's (and through it the account's) usage.
    fn record_usage(&self, charged: u64) {
        let engine = &self.ledger.inner.engine;
        if self.key.record_spend(charged, &engine.tiers) {
            engine.shared.dirty_usage.push(self.key.home_arc());
        }
    }

    /// Returns reserved units: to the lease up to a full lease (`Exact` mode: none), the rest
    /// to the durable balance through the writer, so that a crash loses no more than the
    /// mode promises; or — if the balance was `set` since they were reserved — out of the
    /// books, since the set was final.
    fn refund(&self, meter: &Meter, units: u64) {
        if units == 0 {
            return; // a commit of exactly the reservation: the hot path
        }
        let cap = if self.ledger.inner.engine.exact() {
            0
        } else {
            MAX_LEASE
        };
        self.put_back(meter, units, cap);
    }

    /// Returns `units` reserved under this grant's epoch: into the lease up to `cap`, the rest
    /// to the durable balance; all of them out of the books if a new epoch began since.
    fn put_back(&self, meter: &Meter, units: u64, cap: u64) {
        if units == 0 {
            return;
        }
        let engine = &self.ledger.inner.engine;
        let kept = meter.give_back_up_to(units, cap, self.epoch);
        if let (true, Some(handle)) = (kept != Some(units), self.key.meter_ref()) {
            match kept {
                Some(kept) => engine.give_back(&handle, units - kept, self.epoch),
                None => engine.return_stale(&handle, units, self.epoch),
            }
        }
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        if !self.settled
            && let Some(meter) = self.key.meter()
        {
            self.refund(meter, self.reserved);
        }
        // The last user of an entry that left the cache, of a key spending its own balance:
        // the writer is to see the key again, so that any units in its lease (a refund, or a
        // lease the eviction's retirement came too early to take back) go back to the
        // balance and the meter leaves memory. Else they stayed leased (found by a
        // reviewer), or with nothing leased the meter stayed registered (found by a mutation
        // review), until the key came back or the ledger closed. A cached entry is held by
        // the cache too, and a home by the meter registry, so on the hot path this is one
        // load of the count.
        if crate::holders::held_by_at_most(&self.key, 1 + usize::from(self.key.is_home()))
            && self.key.metering == Metering::Own
            && self.key.mark_dirty()
        {
            let engine = &self.ledger.inner.engine;
            engine.shared.dirty_usage.push(self.key.home_arc());
        }
        // After a commit's spend and usage are in memory (`commit` ends in this drop).
        if let Some(stripe) = self.counted {
            self.ledger.inner.engine.in_flight.leave(stripe);
        }
    }
}
