//! Rate limits as GCRA (generic cell rate algorithm): one atomic "theoretical arrival time" per
//! limit, so a check is a load and a CAS, with no lock and no timer. A named limit of `limit`
//! requests per `window` admits a burst of `limit` and then one request every `window/limit`;
//! the token window is the same algorithm with the request's cost as its weight. Spend tiers
//! scale every limit of a key by a multiplier chosen from the key's lifetime spend.
//!
//! Arrival times are kept in [`Ticks`], nanoseconds with 32 fractional bits: a window rarely
//! divides into whole nanoseconds per unit (7,000,000 tokens a minute are 8,571.43 ns each),
//! and an interval rounded to the nanosecond either inflates a burst (rounded down, that
//! window admits 7,000,350 tokens at once) or cuts it short (rounded up, 3 a second admits 2).
//! A unit's share is rounded down to a tick, so a burst is exactly the limit for any limit
//! below about two billion per second (the rounding would have to add up to a whole unit's
//! share within one window).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use portable_atomic::AtomicU128;

use crate::record::{self, Limits, RateLimit};

const NANOS_PER_SEC: u64 = 1_000_000_000;
const NANOS_PER_MILLI: u64 = 1_000_000;

/// Nanoseconds on the clock's monotonic scale, with 32 fractional bits.
type Ticks = u128;
const TICKS_PER_NANO: Ticks = 1 << 32;

fn ticks(ns: u64) -> Ticks {
    Ticks::from(ns) * TICKS_PER_NANO
}

/// The most one request moves an arrival time: 2⁶⁸ ns, about 9,000 years, far past any
/// window (a request that large waits "for ever" either way), and far enough below the top
/// of the scale that arrival times do not saturate: a saturated one would lose what a
/// commit gives back or charges.
const MAX_STEP: Ticks = 1 << 100;

/// The longest rate window, 100 years: "so many, ever" fits.
pub(crate) const MAX_WINDOW_SECS: u64 = 100 * 365 * 86_400 + 25 * 86_400;

/// One GCRA limit: parameters fixed at build, arrival time shared by all threads.
#[derive(Debug)]
pub(crate) struct Gcra {
    /// Requests (or tokens) per window, before the tier multiplier.
    limit: u64,
    window_ns: u64,
    /// One unit's share of the window at the base limit (no tier): kept, as a division
    /// costs more than the rest of a check.
    unit: Ticks,
    /// The share at each spend tier: `raised[i]` once a key has reached `i + 1` tiers
    /// (empty without tiers).
    raised: Box<[Ticks]>,
    /// Theoretical arrival time on the clock's monotonic scale (`Clock::monotonic_ns`).
    tat: AtomicU128,
}

impl PartialEq for Gcra {
    /// Same parameters (the arrival time is state, not configuration).
    fn eq(&self, other: &Gcra) -> bool {
        self.limit == other.limit && self.window_ns == other.window_ns
    }
}

impl Gcra {
    pub(crate) fn new(limit: u64, window_secs: u64) -> Self {
        Gcra::tiered(limit, window_secs, None, &[])
    }

    /// The limit `limit` per `window_secs`, as the spend `tiers` raise the limit `name`
    /// (`None`: the token window).
    fn tiered(limit: u64, window_secs: u64, name: Option<&str>, tiers: &[SpendTier]) -> Self {
        let limit = limit.max(1);
        let window_ns = window_in_ns(window_secs);
        let unit = unit_share(limit, window_ns, 100);
        // Never more than the tier below's share: a tier never lowers a limit.
        let raised = tiers
            .iter()
            .scan(unit, |share, tier| {
                *share = (*share).min(tier.unit(name, limit, window_ns));
                Some(*share)
            })
            .collect();
        Gcra {
            limit,
            window_ns,
            unit,
            raised,
            tat: AtomicU128::new(0),
        }
    }

    fn same(&self, limit: u64, window_secs: u64) -> bool {
        *self == Gcra::new(limit, window_secs)
    }

    fn window(&self) -> Ticks {
        ticks(self.window_ns)
    }

    /// How far `weight` units move the arrival time for a key that has reached `tier` spend
    /// tiers.
    fn increment(&self, weight: u64, tier: u32) -> Ticks {
        let raised = (tier as usize)
            .checked_sub(1)
            .and_then(|i| self.raised.get(i));
        let unit = raised.copied().unwrap_or(self.unit);
        unit.saturating_mul(Ticks::from(weight)).min(MAX_STEP)
    }

    /// Admits `weight` units at `now_ns`, returning when their slot ends (the arrival time
    /// they moved the limit to), or says how long until they would be admitted.
    pub(crate) fn acquire(&self, now_ns: u64, weight: u64, tier: u32) -> Result<Ticks, Duration> {
        let now = ticks(now_ns);
        let increment = self.increment(weight, tier);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new_tat = tat.max(now).saturating_add(increment);
            if let Some(wait) = self.wait_for(tat, new_tat, now) {
                return Err(wait);
            }
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(new_tat),
                Err(actual) => tat = actual,
            }
        }
    }

    /// How long until `weight` units would be admitted (`None`: now), admitting nothing.
    fn wait(&self, now_ns: u64, weight: u64, tier: u32) -> Option<Duration> {
        let now = ticks(now_ns);
        let increment = self.increment(weight, tier);
        let tat = self.tat.load(Ordering::Acquire);
        self.wait_for(tat, tat.max(now).saturating_add(increment), now)
    }

    /// The wait before moving the arrival time from `tat` to `new_tat` fits in the window
    /// (`None`: it does now). A step larger than the whole window (a cost above the token
    /// window's capacity) could never fit: it fits once the window is empty, and the key's
    /// next requests wait until it is paid off, so the long-run rate still holds and the wait
    /// given is one after which the request is admitted.
    fn wait_for(&self, tat: Ticks, new_tat: Ticks, now: Ticks) -> Option<Duration> {
        let ahead = new_tat - now;
        if ahead <= self.window() {
            return None;
        }
        let wait = (ahead - self.window()).min(tat.saturating_sub(now));
        // In whole milliseconds, rounded up: the clock reads milliseconds, so a wait cut
        // short by a fraction of one would be refused again.
        let per_milli = ticks(NANOS_PER_MILLI);
        let millis = u64::try_from(wait.div_ceil(per_milli)).unwrap_or(u64::MAX);
        (wait > 0).then(|| Duration::from_millis(millis))
    }

    /// Gives back the last `increment` of a slot that ends at `until`, as far as it is still
    /// ahead of the monotonic time `now` reads: the part already past has drained by itself,
    /// and taking it off again would take other requests' slots. Never moves the arrival time
    /// below that time. The clock is read after the arrival time it changes: a thread
    /// stalled between a reading and its swap could otherwise find its slot drained and
    /// another request's in its place, and erase it (found by a reviewer).
    fn release(&self, now: impl Fn() -> u64, until: Ticks, increment: Ticks) {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let now = ticks(now());
            let decrement = increment.min(until.saturating_sub(now));
            if decrement == 0 {
                return;
            }
            let new_tat = tat.saturating_sub(decrement).max(now);
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(actual) => tat = actual,
            }
        }
    }

    /// Units still admissible right now (for grants' rate-limit state).
    pub(crate) fn remaining(&self, now_ns: u64, tier: u32) -> u64 {
        let used = self
            .tat
            .load(Ordering::Acquire)
            .saturating_sub(ticks(now_ns));
        // A unit weighs at least a tick (`unit_share`).
        let left = self.window().saturating_sub(used) / self.increment(1, tier);
        u64::try_from(left).unwrap_or(u64::MAX)
    }

    /// Whether arrivals are still ahead of `now_ns`.
    fn busy(&self, now_ns: u64) -> bool {
        self.tat.load(Ordering::Acquire) > ticks(now_ns)
    }
}

/// The token window: a GCRA limit whose arrival time changes only under `queue`'s lock, so
/// that a commit of fewer tokens than reserved can give back the room the changes after its
/// admission leave (see [`TokenWindow::give_back`]). Reads (room left, waits) take no lock.
#[derive(Debug)]
struct TokenWindow {
    gcra: Gcra,
    queue: Mutex<Queue>,
}

/// How many suffix minima [`Queue`] keeps.
const MINIMA: usize = 4;

/// How far the token window's changes (admissions, charges, give-backs) found themselves
/// queued: for any change, the least that any later change found queued ahead of it.
#[derive(Debug, Default)]
struct Queue {
    /// Changes so far: each is numbered by the count.
    changes: u64,
    /// (number, ns queued) of the changes no later one queued less than, oldest first, so
    /// the queue found increases along it; the oldest two merge when it is full, which can
    /// only understate what a change's successors found.
    minima: [(u64, u64); MINIMA],
    len: usize,
}

impl Queue {
    /// Counts a change that found `queued` ahead of it; returns its number.
    fn note(&mut self, queued: Ticks) -> u64 {
        self.changes += 1;
        // Rounded down: an understatement is on the safe side.
        let queued = u64::try_from(queued / TICKS_PER_NANO).unwrap_or(u64::MAX);
        self.push((self.changes, queued));
        self.changes
    }

    /// Adds the newest minimum, dropping those it undercuts.
    fn push(&mut self, (number, queued): (u64, u64)) {
        while self.len > 0 && self.minima[self.len - 1].1 >= queued {
            self.len -= 1;
        }
        if self.len == MINIMA {
            // The oldest two become one with the newer's number and the older's queue: a
            // change before both still gets its answer, one between them a smaller one.
            self.minima[0].0 = self.minima[1].0;
            self.minima.copy_within(2.., 1);
            self.len -= 1;
        }
        self.minima[self.len] = (number, queued);
        self.len += 1;
    }

    /// A give-back of `decrement` by change `number` moved every later change up by that
    /// much: they have that much less room to give.
    fn consumed(&mut self, number: u64, decrement: Ticks) {
        let decrement = u64::try_from(decrement.div_ceil(TICKS_PER_NANO)).unwrap_or(u64::MAX);
        let entries = self.minima;
        let len = std::mem::take(&mut self.len);
        // Pushed again, oldest first: a lowered one drops those before it that it undercuts.
        for (n, queued) in entries.into_iter().take(len) {
            let queued = match n > number {
                true => queued.saturating_sub(decrement),
                false => queued,
            };
            self.push((n, queued));
        }
    }

    /// The least any change after change `number` found queued ahead of it (`Ticks::MAX`:
    /// none came after it).
    fn least_after(&self, number: u64) -> Ticks {
        let later = self.minima[..self.len].iter().find(|(n, _)| *n > number);
        later.map_or(Ticks::MAX, |&(_, queued)| ticks(queued))
    }
}

impl TokenWindow {
    fn new(gcra: Gcra) -> Self {
        TokenWindow {
            gcra,
            queue: Mutex::default(),
        }
    }

    /// Admits `tokens` at `now_ns`: the admission's number, or how long until they would be
    /// admitted.
    fn admit(&self, now_ns: u64, tokens: u64, tier: u32) -> Result<u64, Duration> {
        let now = ticks(now_ns);
        let increment = self.gcra.increment(tokens, tier);
        let mut queue = self.queue.lock();
        let tat = self.gcra.tat.load(Ordering::Acquire);
        let new_tat = tat.max(now).saturating_add(increment);
        if let Some(wait) = self.gcra.wait_for(tat, new_tat, now) {
            return Err(wait);
        }
        let number = queue.note(tat.saturating_sub(now));
        self.gcra.tat.store(new_tat, Ordering::Release);
        Ok(number)
    }

    /// Charges `increment` more without refusing (work already done): the key's next
    /// requests wait for it.
    fn charge(&self, now_ns: u64, increment: Ticks) {
        let now = ticks(now_ns);
        let mut queue = self.queue.lock();
        let tat = self.gcra.tat.load(Ordering::Acquire);
        queue.note(tat.saturating_sub(now));
        let new_tat = tat.max(now).saturating_add(increment);
        self.gcra.tat.store(new_tat, Ordering::Release);
    }

    /// Gives back up to `increment` of admission number `admitted`, the last part of a slot
    /// that ends at `until` or later. Every change since was stacked behind it by no less
    /// than it found queued (less what give-backs since took up): taking `increment` off the
    /// admission moves each of them up by that much, up to the least of those queues (past
    /// it, the window would have gone idle and started afresh). The queues kept can
    /// understate that least (see [`Queue::push`]: with five changes in a busy period, the
    /// first one's unused tokens never came back, found by a reviewer); the part of the slot
    /// still ahead of now bounds it too, as every change since was stacked behind the slot's
    /// end: the larger of the two is given back. Never below now: never more than an
    /// admission of fewer tokens would have left. The clock is read under the lock, after
    /// every change it bounds (see [`Gcra::release`]).
    fn give_back(&self, now: impl Fn() -> u64, admitted: u64, until: Ticks, increment: Ticks) {
        let mut queue = self.queue.lock();
        let now = ticks(now());
        let ahead = until.saturating_sub(now);
        let decrement = increment.min(queue.least_after(admitted).max(ahead));
        if decrement == 0 {
            return;
        }
        let tat = self.gcra.tat.load(Ordering::Acquire);
        let new_tat = tat.saturating_sub(decrement).max(now);
        queue.consumed(admitted, decrement);
        queue.note(new_tat - now);
        self.gcra.tat.store(new_tat, Ordering::Release);
    }
}

/// A window of `window_secs` in nanoseconds, clamped for records stored before windows were
/// bounded.
fn window_in_ns(window_secs: u64) -> u64 {
    window_secs
        .min(MAX_WINDOW_SECS)
        .saturating_mul(NANOS_PER_SEC)
        .max(1)
}

/// One unit's share of a window of `window_ns` for `limit` units at `multiplier_pct` percent,
/// rounded down to a tick. The scaled limit is not rounded first: 150 % of 1 a minute is one
/// every 40 s, not 1 a minute.
fn unit_share(limit: u64, window_ns: u64, multiplier_pct: u32) -> Ticks {
    let scaled = (u128::from(limit) * u128::from(multiplier_pct.max(1))).max(1);
    // Below 2¹⁰¹ (a window is at most 2⁶² ns, so 2⁹⁴ ticks, times 100): no overflow. At
    // least a tick: a unit that weighed nothing (over 2³² units a nanosecond) would switch
    // the limit off.
    (ticks(window_ns) * 100 / scaled).max(1)
}

/// What an admission by [`KeyLimits::acquire`] holds, to give back or settle later: when it
/// was admitted, its number among the token window's changes, and the tier it was admitted
/// at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    /// The number of its admission in the token window (see [`Queue`]; 0: none).
    tokens_admission: u64,
    /// When it was admitted (monotonic ns). Its slot in each named limit ends at least one
    /// interval later: what it gives back is bounded by that, not by each slot's exact end,
    /// which would take up to 16 more words in every grant. Exact when a limit was idle;
    /// otherwise short by the time since admission (the checks after the rate limits).
    admitted_ns: u64,
    /// How many spend tiers the key had reached when it was admitted: its slots are given
    /// back or settled at that tier's rates.
    tier: u32,
}

/// The GCRA limits of one key: its named limits, then its token window if any; and its
/// spend tier, which only ever scales these limits (a key without limits keeps none).
#[derive(Debug, Default)]
pub(crate) struct KeyLimits {
    /// The key's limits generation when built (see `LiveLimits` in src/engine.rs): a state
    /// of an older one is never reused, even if configured the same.
    pub(crate) generation: u64,
    named: Box<[Gcra]>,
    /// The names of `named`, in order: a tier's explicit rates depend on them, so a state
    /// built under other names is not the state of these limits (out of `Gcra`, which the
    /// hot path reads).
    names: Box<[Box<str>]>,
    tokens: Option<Box<TokenWindow>>,
    /// Lifetime spend (durable when the limits were built, plus everything since), kept
    /// only when spend tiers are configured.
    lifetime_spent: AtomicU64,
    /// How many of the configured spend tiers (sorted) the lifetime spend has reached: the
    /// multiplier and the next threshold are looked up from it.
    tiers_reached: AtomicU32,
}

impl KeyLimits {
    /// The limits `limits` configures, for a key that has spent `lifetime_spent` units under
    /// the configured spend `tiers`.
    pub(crate) fn new(limits: &Limits, lifetime_spent: u64, tiers: &[SpendTier]) -> Self {
        KeyLimits {
            generation: 0,
            lifetime_spent: AtomicU64::new(lifetime_spent),
            tiers_reached: AtomicU32::new(tiers_reached(tiers, lifetime_spent)),
            named: limits
                .rate_limits
                .iter()
                .map(|l| Gcra::tiered(l.limit, l.window_secs, Some(&l.name), tiers))
                .collect(),
            names: limits
                .rate_limits
                .iter()
                .map(|l| l.name.as_str().into())
                .collect(),
            tokens: limits.token_window.map(|t| {
                let gcra = Gcra::tiered(t.tokens, t.window_secs, None, tiers);
                Box::new(TokenWindow::new(gcra))
            }),
        }
    }

    /// Whether these limits were built from `limits` (same named limits, names included, in
    /// any order — names are unique — and token window) under the same spend tiers.
    pub(crate) fn configured_as(&self, limits: &Limits) -> bool {
        let named = self.named.len() == limits.rate_limits.len()
            && self.named.iter().zip(&self.names).all(|(g, name)| {
                let same = |l: &&RateLimit| **name == *l.name && g.same(l.limit, l.window_secs);
                limits.rate_limits.iter().any(|l| same(&l))
            });
        let tokens = match (&self.tokens, limits.token_window) {
            (None, None) => true,
            (Some(w), Some(t)) => w.gcra.same(t.tokens, t.window_secs),
            _ => false,
        };
        named && tokens
    }

    /// Admits one request of `cost` tokens against every limit, all or nothing, at the
    /// monotonic time `now` reads.
    pub(crate) fn acquire(&self, now: impl Fn() -> u64, cost: u64) -> Result<Admission, Duration> {
        let tier = self.tier();
        let now_ns = now();
        let mut admission = Admission {
            admitted_ns: now_ns,
            tokens_admission: 0,
            tier,
        };
        // A roll-back reads the clock again (see `Gcra::release`).
        let roll_back = |taken: &[Gcra]| self.release_named(taken, &now, &admission);
        for (i, gcra) in self.named.iter().enumerate() {
            if let Err(wait) = gcra.acquire(now_ns, 1, tier) {
                roll_back(&self.named[..i]);
                // A retry must wait for the slowest limit, not just the first that refused.
                let later = self.named[i + 1..]
                    .iter()
                    .filter_map(|g| g.wait(now_ns, 1, tier));
                let tokens = self.tokens.as_ref().filter(|_| cost > 0);
                let tokens = tokens.and_then(|t| t.gcra.wait(now_ns, cost, tier));
                return Err(later.chain(tokens).fold(wait, Duration::max));
            }
        }
        if let Some(tokens) = &self.tokens
            && cost > 0
        {
            match tokens.admit(now_ns, cost, tier) {
                Ok(number) => admission.tokens_admission = number,
                Err(wait) => {
                    roll_back(&self.named);
                    return Err(wait);
                }
            }
        }
        Ok(admission)
    }

    /// Moves the token window from the `reserved` tokens a request was admitted with to the
    /// `used` tokens its commit reports: the window counts tokens used, not estimates. More
    /// are charged even past the window (the work is done; the key's next requests wait for
    /// them). Fewer are given back as far as their slot is still ahead, or, while the window
    /// stayed busy, as far as the requests queued behind them leave room
    /// ([`TokenWindow::give_back`]).
    pub(crate) fn settle_tokens(
        &self,
        now: impl Fn() -> u64,
        admitted: &Admission,
        reserved: u64,
        used: u64,
    ) {
        let Some(tokens) = &self.tokens else {
            return;
        };
        let tier = admitted.tier;
        // The difference of the two increments, so that the window ends up exactly where an
        // admission of `used` would have left it.
        let (was, is) = (
            tokens.gcra.increment(reserved, tier),
            tokens.gcra.increment(used, tier),
        );
        let number = admitted.tokens_admission;
        match is.cmp(&was) {
            std::cmp::Ordering::Greater => tokens.charge(now(), is - was),
            std::cmp::Ordering::Less => {
                let until = ticks(admitted.admitted_ns).saturating_add(was);
                tokens.give_back(now, number, until, was - is)
            }
            std::cmp::Ordering::Equal => {}
        }
    }

    /// Gives back what a successful [`acquire`](Self::acquire) of `cost` took (a later check
    /// refused the request), as far as its slots are still ahead of the monotonic time `now`
    /// reads.
    pub(crate) fn release(&self, now: impl Fn() -> u64, admitted: &Admission, cost: u64) {
        self.release_named(&self.named, &now, admitted);
        if let Some(tokens) = &self.tokens {
            let increment = tokens.gcra.increment(cost, admitted.tier);
            let until = ticks(admitted.admitted_ns).saturating_add(increment);
            tokens.give_back(&now, admitted.tokens_admission, until, increment);
        }
    }

    /// Gives each of the named limits `taken` back the slot `admitted` took in it, as far as
    /// that slot can still be ahead of the time `now` reads (see [`Admission::admitted_ns`]).
    fn release_named(&self, taken: &[Gcra], now: impl Fn() -> u64, admitted: &Admission) {
        for gcra in taken {
            let increment = gcra.increment(1, admitted.tier);
            let until_at_least = ticks(admitted.admitted_ns).saturating_add(increment);
            gcra.release(&now, until_at_least, increment);
        }
    }

    /// Whether a limit still holds arrivals at `now_ns` (monotonic): dropping the state now
    /// would forget them. Once every arrival time has passed, a new state admits exactly what
    /// this one would.
    pub(crate) fn running(&self, now_ns: u64) -> bool {
        let tokens = self.tokens.as_deref().map(|t| &t.gcra);
        let mut all = self.named.iter().chain(tokens);
        all.any(|g| g.busy(now_ns))
    }

    /// Lifetime spend counted so far (0 without spend tiers).
    pub(crate) fn lifetime_spent(&self) -> u64 {
        self.lifetime_spent.load(Ordering::Relaxed)
    }

    /// How many of the configured spend tiers the key has reached.
    #[inline]
    pub(crate) fn tier(&self) -> u32 {
        self.tiers_reached.load(Ordering::Relaxed)
    }

    /// Counts `units` of spend towards the spend tiers (nothing to do without tiers).
    pub(crate) fn record_spend(&self, units: u64, tiers: &[SpendTier]) {
        if tiers.is_empty() {
            return;
        }
        // Saturating: a commit of `u64::MAX` units (unmetered keys charge what they are told)
        // must neither panic nor wrap the count back below the tiers already reached.
        let before = self
            .lifetime_spent
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
                Some(s.saturating_add(units))
            })
            .unwrap_or_else(|s| s);
        let lifetime = before.saturating_add(units);
        let reached = self.tiers_reached.load(Ordering::Relaxed);
        if lifetime >= next_tier_at(tiers, reached) {
            // The maximum: two requests crossing tiers at once leave the higher.
            self.tiers_reached
                .fetch_max(tiers_reached(tiers, lifetime), Ordering::Relaxed);
        }
    }

    /// Counts a lifetime spend of at least `spent` (made durable, maybe in part through other
    /// states of the key) towards the spend tiers.
    pub(crate) fn count_at_least(&self, spent: u64, tiers: &[SpendTier]) {
        self.lifetime_spent.fetch_max(spent, Ordering::Relaxed);
        self.tiers_reached
            .fetch_max(tiers_reached(tiers, spent), Ordering::Relaxed);
    }

    /// Requests left in the tightest named limit, and tokens left in the window, at `tier`.
    pub(crate) fn remaining(&self, now_ns: u64, tier: u32) -> (Option<u64>, Option<u64>) {
        let requests = self.named.iter().map(|g| g.remaining(now_ns, tier)).min();
        let tokens = self.tokens.as_ref().map(|t| t.gcra.remaining(now_ns, tier));
        (requests, tokens)
    }
}

/// A spend tier: keys that have spent at least `min_spent` units get higher rate limits.
/// Each named limit the tier lists by name (and its token window, if it sets one) runs at
/// the tier's explicit rate; every other limit is multiplied by `multiplier_pct / 100`.
///
/// A tier never lowers a limit: each of a key's limits runs at the highest rate that its own
/// configuration or any tier the key has reached gives it. An explicit rate is a count per
/// window (the tier's); the key's own window stays the span its burst is measured over, so a
/// key allowed 60 a minute, at a tier of 6,000 an hour, runs at 100 a minute.
///
/// ```
/// use keyledger::SpendTier;
/// let tiers = [
///     SpendTier::multiplier(1_000, 150),
///     SpendTier::multiplier(10_000, 200)
///         .rate_limit("requests", 1_000, 60)
///         .token_window(5_000_000, 60),
/// ];
/// assert_eq!(tiers[1].rate_limits[0].limit, 1_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpendTier {
    /// Lifetime spend (units) from which the tier applies.
    pub min_spent: u64,
    /// Multiplier in percent (200 doubles every limit the tier does not set explicitly).
    pub multiplier_pct: u32,
    /// Explicit rates for the key limits of these names (a name no key has sets nothing).
    pub rate_limits: Vec<RateLimit>,
    /// An explicit rate for the token window (`None`: scaled by the multiplier).
    pub token_window: Option<record::TokenWindow>,
}

impl SpendTier {
    /// A tier from `min_spent` units that multiplies every limit by `multiplier_pct / 100`.
    pub const fn multiplier(min_spent: u64, multiplier_pct: u32) -> Self {
        SpendTier {
            min_spent,
            multiplier_pct,
            rate_limits: Vec::new(),
            token_window: None,
        }
    }

    /// A tier from `min_spent` units that sets explicit rates (add them with
    /// [`rate_limit`](Self::rate_limit) and [`token_window`](Self::token_window)); limits it
    /// does not set keep the rate of the tier below it (multiplier 100 %).
    pub const fn explicit(min_spent: u64) -> Self {
        SpendTier::multiplier(min_spent, 100)
    }

    /// Sets the key limit named `name` to `limit` per `window_secs` at this tier.
    pub fn rate_limit(mut self, name: impl Into<String>, limit: u64, window_secs: u64) -> Self {
        self.rate_limits.push(RateLimit {
            name: name.into(),
            limit,
            window_secs,
        });
        self
    }

    /// Sets the token window to `tokens` per `window_secs` at this tier.
    pub fn token_window(mut self, tokens: u64, window_secs: u64) -> Self {
        self.token_window = Some(record::TokenWindow {
            tokens,
            window_secs,
        });
        self
    }

    /// One unit's share, at this tier, of a named limit (`name`; `None`: the token window)
    /// of `limit` per `window_ns`.
    fn unit(&self, name: Option<&str>, limit: u64, window_ns: u64) -> Ticks {
        let explicit = match name {
            Some(name) => self
                .rate_limits
                .iter()
                .find(|r| r.name == name)
                .map(|r| (r.limit, r.window_secs)),
            None => self.token_window.map(|t| (t.tokens, t.window_secs)),
        };
        match explicit {
            Some((limit, window_secs)) => unit_share(limit.max(1), window_in_ns(window_secs), 100),
            None => unit_share(limit, window_ns, self.multiplier_pct),
        }
    }
}

/// How many of `tiers` (sorted by `min_spent`, as `Config` keeps them) a lifetime spend has
/// reached.
pub(crate) fn tiers_reached(tiers: &[SpendTier], spent: u64) -> u32 {
    // At most `tiers.len()`, which a `Vec` of 12-byte tiers keeps far below 2³².
    tiers.partition_point(|t| t.min_spent <= spent) as u32
}

/// The multiplier (percent) of a key that has reached `reached` of the sorted `tiers`: the
/// highest of theirs (a tier never lowers a limit), or 100 below the first.
pub(crate) fn tier_multiplier(tiers: &[SpendTier], reached: u32) -> u32 {
    let reached = tiers.iter().take(reached as usize);
    reached.map(|t| t.multiplier_pct).fold(100, u32::max)
}

/// The spend at which the tier after `reached` starts (`u64::MAX`: none).
pub(crate) fn next_tier_at(tiers: &[SpendTier], reached: u32) -> u64 {
    tiers
        .get(reached as usize)
        .map_or(u64::MAX, |t| t.min_spent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A change made to a token window, for the reference below.
    #[derive(Debug, Clone)]
    enum Change {
        Admit {
            at: u64,
            increment: Ticks,
            id: usize,
        },
        Charge {
            at: u64,
            increment: Ticks,
        },
    }

    /// Where the window's arrival time would be had every admission in `changes` taken only
    /// what it kept (its increment less what it gave back), with every change at its time.
    fn as_if_kept(changes: &[Change], given_back: &[Ticks]) -> Ticks {
        changes.iter().fold(0, |tat, change| match change {
            Change::Admit { at, increment, id } => {
                tat.max(ticks(*at)) + increment.saturating_sub(given_back[*id])
            }
            Change::Charge { at, increment } => tat.max(ticks(*at)) + increment,
        })
    }

    proptest! {
        /// Whatever the order of admissions, charges, give-backs and the clock, the window
        /// never holds less than it would had every request taken only what it kept: giving
        /// back never admits more than the window allows. Admissions and charges may read
        /// the clock up to 20 s before they take the lock (a thread stalled in between);
        /// give-backs read it under the lock.
        #[test]
        fn giving_back_never_leaves_the_window_below_what_was_kept(
            steps in proptest::collection::vec(
                (0u8..4, 0u64..40, 0u64..60, any::<prop::sample::Index>(), 0u64..80),
                1..60,
            )
        ) {
            const S: u64 = 1_000_000_000;
            let window = TokenWindow::new(Gcra::new(100, 100)); // one token a second
            let mut now = 100 * S;
            let mut changes = Vec::new();
            let mut admitted: Vec<(u64, Ticks, u64)> = Vec::new(); // number, increment, at
            let mut given_back: Vec<Ticks> = Vec::new();
            for (kind, tokens, secs, pick, stale) in steps {
                let at = now - stale * S / 4;
                match kind {
                    0 => now += secs * S / 4,
                    1 => {
                        if let Ok(number) = window.admit(at, tokens.max(1), 0) {
                            let increment = window.gcra.increment(tokens.max(1), 0);
                            changes.push(Change::Admit { at, increment, id: admitted.len() });
                            admitted.push((number, increment, at));
                            given_back.push(0);
                        }
                    }
                    2 => {
                        let increment = window.gcra.increment(tokens % 10, 0);
                        window.charge(at, increment);
                        changes.push(Change::Charge { at, increment });
                    }
                    _ if !admitted.is_empty() => {
                        let id = pick.index(admitted.len());
                        let (number, increment, admitted_at) = admitted[id];
                        let left = increment - given_back[id];
                        let give = window.gcra.increment(tokens, 0).min(left);
                        window.give_back(|| now, number, ticks(admitted_at) + left, give);
                        given_back[id] += give;
                    }
                    _ => {}
                }
                let tat = window.gcra.tat.load(Ordering::Acquire).max(ticks(now));
                let kept = as_if_kept(&changes, &given_back).max(ticks(now));
                prop_assert!(tat >= kept, "window at {tat}, below {kept} as if kept");
            }
        }
    }

    const S: u64 = NANOS_PER_SEC;

    #[test]
    fn burst_then_steady_rate() {
        let g = Gcra::new(10, 1); // 10 per second
        let t0 = 1_000 * S;
        for _ in 0..10 {
            assert!(g.acquire(t0, 1, 0).is_ok());
        }
        let wait = g.acquire(t0, 1, 0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(
            g.acquire(t0 + S / 10, 1, 0).is_ok(),
            "one slot frees every 100 ms"
        );
        assert!(g.acquire(t0 + S / 10, 1, 0).is_err());
        assert!(
            g.acquire(t0 + 5 * S, 1, 0).is_ok(),
            "idle time restores the burst"
        );
    }

    #[test]
    fn weights_and_multipliers() {
        let g = Gcra::new(100, 60); // 100 tokens a minute
        let t0 = 7 * S;
        assert!(g.acquire(t0, 100, 0).is_ok());
        assert!(g.acquire(t0, 1, 0).is_err());
        let doubled = Gcra::tiered(100, 60, None, &[SpendTier::multiplier(0, 200)]);
        assert!(doubled.acquire(t0, 200, 1).is_ok(), "a 2× tier admits 200");
        assert!(doubled.acquire(t0, 1, 1).is_err());
    }

    #[test]
    fn a_request_larger_than_the_window_fits_once_it_is_empty_and_is_paid_off_after() {
        let g = Gcra::new(100, 60); // 100 tokens a minute: one every 600 ms
        let t0 = 7 * S;
        assert!(g.acquire(t0, 10, 0).is_ok());
        // 250 tokens never fit beside others: the wait is until the window is empty.
        assert_eq!(g.acquire(t0, 250, 0), Err(Duration::from_secs(6)));
        assert!(g.acquire(t0 + 6 * S - 1, 250, 0).is_err());
        assert!(
            g.acquire(t0 + 6 * S, 250, 0).is_ok(),
            "the wait given was true"
        );
        // 150 tokens over the window's capacity are owed: one more token waits 90.6 s.
        let wait = g.acquire(t0 + 6 * S, 1, 0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(90_600));
        assert!(g.acquire(t0 + 6 * S + wait.as_nanos() as u64, 1, 0).is_ok());
        assert_eq!(g.remaining(t0 + 6 * S, 0), 0);
    }

    /// Two named limits: `per_second` a second and `per_minute` a minute.
    fn per_second_and_minute(per_second: u64, per_minute: u64) -> Limits {
        let limit = |name: &str, limit, window_secs| crate::RateLimit {
            name: name.into(),
            limit,
            window_secs,
        };
        Limits {
            rate_limits: vec![
                limit("second", per_second, 1),
                limit("minute", per_minute, 60),
            ],
            ..Limits::default()
        }
    }

    /// `limits` with a token window of `tokens` per `window_secs`.
    fn with_token_window(tokens: u64, window_secs: u64, limits: Limits) -> Limits {
        let token_window = Some(crate::TokenWindow {
            tokens,
            window_secs,
        });
        Limits {
            token_window,
            ..limits
        }
    }

    #[test]
    fn all_or_nothing_across_limits() {
        let limits = with_token_window(50, 60, per_second_and_minute(5, 6));
        let k = KeyLimits::new(&limits, 0, &[]);
        let t0 = 100 * S;
        assert!(k.acquire(|| t0, 10).is_ok());
        assert!(k.acquire(|| t0, 45).is_err(), "token window refuses");
        // The refused request gave its named-limit slots back: 4 more fit this second.
        for _ in 0..4 {
            assert!(k.acquire(|| t0, 1).is_ok());
        }
        assert!(k.acquire(|| t0, 1).is_err());
        assert_eq!(k.remaining(t0, 0).0, Some(0));
    }

    #[test]
    fn a_refusal_asks_to_wait_for_the_slowest_limit() {
        let k = KeyLimits::new(&per_second_and_minute(5, 5), 0, &[]);
        let t0 = 100 * S;
        for _ in 0..5 {
            assert!(k.acquire(|| t0, 1).is_ok());
        }
        // The per-second limit refuses first, for 200 ms; the per-minute one for 12 s.
        assert_eq!(k.acquire(|| t0, 1), Err(Duration::from_secs(12)));
        assert!(
            k.acquire(|| t0 + 12 * S, 1).is_ok(),
            "after that wait it fits"
        );
    }

    /// A request refused by a named limit is told to wait for the token window too when it
    /// has tokens to spend: retrying when the named limit frees up would only be refused again.
    #[test]
    fn a_refusal_by_a_named_limit_asks_to_wait_for_the_token_window_too() {
        let limits = with_token_window(100, 3_600, per_second_and_minute(1, 1_000));
        let k = KeyLimits::new(&limits, 0, &[]);
        let t0 = 100 * S;
        assert!(k.acquire(|| t0, 100).is_ok(), "the window's 100 tokens");
        // The per-second limit refuses, for 1 s; the token window needs an hour.
        assert_eq!(k.acquire(|| t0, 100), Err(Duration::from_secs(3_600)));
        assert!(k.acquire(|| t0 + 3_599 * S, 100).is_err());
        assert!(
            k.acquire(|| t0 + 3_600 * S, 100).is_ok(),
            "the wait was true"
        );
    }

    /// A request of no tokens does not wait for the token window, even one overdrawn by a
    /// commit that used more than it reserved: neither to be admitted nor, when a named
    /// limit refuses it, in the wait it is given.
    #[test]
    fn a_request_of_no_tokens_never_waits_for_an_overdrawn_token_window() {
        let limits = with_token_window(100, 60, per_second_and_minute(1, 1_000));
        let k = KeyLimits::new(&limits, 0, &[]);
        let t0 = 100 * S;
        let admitted = k.acquire(|| t0, 100).expect("the window's 100 tokens");
        // It used 1,000: the window is overdrawn for ten minutes.
        k.settle_tokens(|| t0, &admitted, 100, 1_000);
        assert_eq!(k.acquire(|| t0, 1), Err(Duration::from_millis(540_600)));
        // The per-second limit refuses, for 1 s: that is the whole wait.
        assert_eq!(k.acquire(|| t0, 0), Err(Duration::from_secs(1)));
        assert!(k.acquire(|| t0 + S, 0).is_ok(), "no tokens: no token wait");
        assert_eq!(k.remaining(t0 + S, 0).1, Some(0));
    }

    /// An admission that settles for fewer tokens after its slot ended gives back as much as
    /// the requests queued behind it were kept waiting, no more and no less, even after a
    /// later request settled first: the window ends where admissions of the tokens used would
    /// have left it.
    #[test]
    fn a_late_settle_gives_back_what_the_requests_behind_it_waited() {
        let limits = with_token_window(100, 60, Limits::default());
        let k = KeyLimits::new(&limits, 0, &[]); // a token every 600 ms
        let t0 = 100 * S;
        let first = k.acquire(|| t0, 10).expect("10 tokens: until t0 + 6 s");
        // Admitted 1 s later, it waits 5 s behind the first: its 90 tokens end at t0 + 60 s.
        let second = k.acquire(|| t0 + S, 90).expect("the window's other 90");
        // It used 50: 24 s back, to t0 + 36 s.
        k.settle_tokens(|| t0 + S, &second, 90, 50);
        assert_eq!(k.remaining(t0 + S, 0).1, Some(41), "35 s of 60 taken");
        // The first used none, settled after its slot: the second need not have waited its
        // 5 s, but could not have started before it arrived at t0 + 1 s. Its 30 s of tokens
        // end at t0 + 31 s.
        k.settle_tokens(|| t0 + 7 * S, &first, 10, 0);
        let now = t0 + 7 * S;
        assert_eq!(k.remaining(now, 0).1, Some(60), "24 s of 60 taken");
        assert!(k.acquire(|| now, 60).is_ok());
        assert_eq!(k.acquire(|| now, 1), Err(Duration::from_millis(600)));
    }

    /// As above, with a request at the back of the queue refused (for credits) before the
    /// first settles: its give-back leaves the window as it was before it, so the first
    /// still gets back what the requests behind it waited.
    #[test]
    fn a_late_settle_after_a_refused_request_gives_back_what_the_requests_behind_it_waited() {
        let limits = with_token_window(100, 60, Limits::default());
        let k = KeyLimits::new(&limits, 0, &[]); // a token every 600 ms
        let t0 = 100 * S;
        let first = k.acquire(|| t0, 10).expect("10 tokens: until t0 + 6 s");
        // Three more of 10, 1 s later: they wait 5, 11 and 17 s; the last ends at t0 + 24 s.
        for _ in 0..2 {
            assert!(k.acquire(|| t0 + S, 10).is_ok());
        }
        let last = k.acquire(|| t0 + S, 10).expect("until t0 + 24 s");
        k.release(|| t0 + S, &last, 10);
        assert_eq!(k.remaining(t0 + S, 0).1, Some(71), "17 s of 60 taken");
        // The first used none, settled after its slot: the two behind it move up the 5 s
        // they waited for it, to end at t0 + 13 s.
        let now = t0 + 7 * S;
        k.settle_tokens(|| now, &first, 10, 0);
        assert_eq!(k.remaining(now, 0).1, Some(90), "6 s of 60 taken");
    }

    /// A request that took a slot and stalled before a later limit refused it gives back
    /// only what is left of its own slot: the request that took the next slot meanwhile
    /// keeps it. (Found by a reviewer: the roll-back gave back a whole interval at the
    /// stalled request's time, erasing the other request's slot.)
    #[test]
    fn a_stalled_roll_back_leaves_a_later_requests_slot_alone() {
        const MS: u64 = NANOS_PER_MILLI;
        // 1,000 a second (a slot is 1 ms) and one a minute.
        let k = KeyLimits::new(&per_second_and_minute(1_000, 1), 0, &[]);
        let t0 = 100 * S;
        assert!(k.acquire(|| t0, 1).is_ok(), "the minute's one request");
        let (stalled_at, other_at) = (t0 + 10 * MS, t0 + 15 * MS);
        let reads = std::cell::Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            if reads.get() == 1 {
                return stalled_at;
            }
            // Before the roll-back: another request takes the per-second limit's next slot.
            assert!(k.named[0].acquire(other_at, 1, 0).is_ok());
            other_at
        };
        assert!(k.acquire(clock, 1).is_err(), "the minute limit refuses");
        assert_eq!(reads.get(), 2, "the roll-back read the clock again");
        assert_eq!(
            k.named[0].remaining(other_at, 0),
            999,
            "the other request's slot is still taken"
        );
    }

    /// A give-back whose thread stalls after reading the clock, until its own slot has
    /// drained and another request took the next: it must not erase that request's slot.
    /// The clock below runs the other request inside the give-back's first reading, and
    /// answers with the time from before it. (Found by a reviewer: a limit of 1 a second
    /// admitted 2.)
    #[test]
    fn a_give_back_stalled_after_its_clock_reading_leaves_a_later_slot_alone() {
        let k = KeyLimits::new(&per_second_and_minute(1, 1_000), 0, &[]);
        let t0 = 100 * S;
        let admitted = k.acquire(|| t0, 1).expect("the second's one request");
        // Refused later (for credits); its thread reads the clock, then stalls past its slot.
        let (stalled_at, other_at) = (t0, t0 + 2 * S);
        let reads = std::cell::Cell::new(0);
        let clock = || {
            reads.set(reads.get() + 1);
            if reads.get() == 1 {
                assert!(k.named[0].acquire(other_at, 1, 0).is_ok(), "the next slot");
                return stalled_at;
            }
            other_at
        };
        k.release(clock, &admitted, 0);
        assert_eq!(
            k.named[0].remaining(other_at, 0),
            0,
            "the other request's slot is still taken"
        );
    }

    #[test]
    fn a_burst_is_the_limit_however_the_window_divides() {
        for limit in [1, 3, 7, 1_000, 7_000_000, 999_999_937] {
            let g = Gcra::new(limit, 60);
            let t0 = 5 * S;
            assert!(g.acquire(t0, limit - 1, 0).is_ok());
            assert!(g.acquire(t0, 1, 0).is_ok(), "{limit}: the last unit fits");
            assert!(g.acquire(t0, 1, 0).is_err(), "{limit}: one more does not");
            assert_eq!(g.remaining(t0, 0), 0);
        }
        let g = Gcra::new(3, 1);
        for _ in 0..3 {
            assert!(g.acquire(S, 1, 0).is_ok(), "three a second, one at a time");
        }
        assert_eq!(g.acquire(S, 1, 0), Err(Duration::from_millis(334)));
    }

    #[test]
    fn extreme_weights_and_windows_saturate_without_panicking() {
        let g = Gcra::tiered(
            1,
            MAX_WINDOW_SECS,
            None,
            &[SpendTier::multiplier(0, 1_000_000)],
        );
        assert!(g.acquire(S, u64::MAX, 1).is_ok(), "fits an empty window");
        let wait = g.acquire(S, 1, 0).unwrap_err();
        assert!(wait > Duration::from_secs(MAX_WINDOW_SECS), "{wait:?}");
        assert_eq!(g.remaining(u64::MAX, 0), 0);
        let huge = Gcra::tiered(u64::MAX, 1, None, &[SpendTier::multiplier(0, u32::MAX)]);
        let window_in_ticks = NANOS_PER_SEC << 32;
        assert_eq!(
            huge.remaining(u64::MAX, 1),
            window_in_ticks,
            "a tick a unit"
        );
        assert!(huge.acquire(u64::MAX, u64::MAX, 1).is_ok());
        assert!(huge.acquire(u64::MAX, 1, 1).is_err(), "still a limit");
    }

    #[test]
    fn spend_past_the_largest_count_saturates() {
        let tiers = [tier(100, 150)];
        let k = KeyLimits::new(&Limits::default(), 90, &tiers);
        k.record_spend(u64::MAX, &tiers);
        k.record_spend(5, &tiers);
        assert_eq!(k.lifetime_spent.load(Ordering::Relaxed), u64::MAX);
        assert_eq!(tier_multiplier(&tiers, k.tier()), 150);
    }

    fn tier(min_spent: u64, multiplier_pct: u32) -> SpendTier {
        SpendTier::multiplier(min_spent, multiplier_pct)
    }

    #[test]
    fn a_key_moves_up_its_tiers_as_it_spends() {
        let tiers = [tier(100, 150), tier(1_000, 300)];
        let limits = Limits {
            rate_limits: vec![crate::RateLimit {
                name: "per-second".into(),
                limit: 2,
                window_secs: 1,
            }],
            ..Limits::default()
        };
        let k = KeyLimits::new(&limits, 90, &tiers);
        assert_eq!(
            tier_multiplier(&tiers, k.tier()),
            100,
            "90 spent before it was cached"
        );
        k.record_spend(10, &tiers);
        assert_eq!(tier_multiplier(&tiers, k.tier()), 150);
        k.record_spend(5_000, &tiers);
        assert_eq!(
            tier_multiplier(&tiers, k.tier()),
            300,
            "straight past the second"
        );
        let fresh = KeyLimits::new(&limits, 5_000, &[]);
        fresh.record_spend(5_000, &[]);
        assert_eq!(
            tier_multiplier(&[], fresh.tier()),
            100,
            "no tiers configured"
        );
    }

    #[test]
    fn tiers_pick_the_highest_reached() {
        let config = crate::Config::builder()
            .master_key(crate::MasterKey::from_bytes(&[7; 32]).unwrap())
            .spend_tiers([tier(1_000, 300), tier(100, 150), tier(1_000, 200)])
            .build()
            .unwrap();
        let tiers = &config.spend_tiers;
        let at = |spent| {
            let reached = tiers_reached(tiers, spent);
            (
                tier_multiplier(tiers, reached),
                next_tier_at(tiers, reached),
            )
        };
        assert_eq!(at(0), (100, 100));
        assert_eq!(at(99), (100, 100));
        assert_eq!(at(100), (150, 1_000));
        // Of two tiers with one threshold, both apply: the higher multiplier wins, wherever
        // it was given.
        assert_eq!(at(1_000), (300, u64::MAX));
        assert_eq!(at(5_000), (300, u64::MAX));
    }
}
