//! Rate limits as GCRA (generic cell rate algorithm): one atomic "theoretical arrival time" per
//! limit, so a check is a load and a CAS, with no lock and no timer. A named limit of `limit`
//! requests per `window` admits a burst of `limit` and then one request every `window/limit`;
//! the token window is the same algorithm with the request's cost as its weight. Spend tiers
//! scale every limit of a key by a multiplier chosen from the key's lifetime spend.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::record::Limits;

const NANOS_PER_SEC: u64 = 1_000_000_000;
const NANOS_PER_MILLI: u64 = 1_000_000;

/// The longest rate window, 100 years: "so many, ever" fits, and arrival times (ns, on a
/// scale no later than the Unix epoch's) keep centuries of headroom below `u64::MAX`. A
/// window near that bound would let them saturate, and a saturated arrival time admits
/// everything.
pub(crate) const MAX_WINDOW_SECS: u64 = 100 * 365 * 86_400 + 25 * 86_400;

/// One GCRA limit: parameters fixed at build, arrival time shared by all threads.
#[derive(Debug)]
pub(crate) struct Gcra {
    /// Requests (or tokens) per window, before the tier multiplier.
    limit: u64,
    window_ns: u64,
    /// Theoretical arrival time, ns on the clock's monotonic scale (`Clock::monotonic_ns`).
    tat: AtomicU64,
}

impl PartialEq for Gcra {
    /// Same parameters (the arrival time is state, not configuration).
    fn eq(&self, other: &Gcra) -> bool {
        self.limit == other.limit && self.window_ns == other.window_ns
    }
}

impl Gcra {
    pub(crate) fn new(limit: u64, window_secs: u64) -> Self {
        Gcra {
            limit: limit.max(1),
            // Clamped for records stored before windows were bounded.
            window_ns: window_secs
                .min(MAX_WINDOW_SECS)
                .saturating_mul(NANOS_PER_SEC)
                .max(1),
            tat: AtomicU64::new(0),
        }
    }

    fn same(&self, limit: u64, window_secs: u64) -> bool {
        *self == Gcra::new(limit, window_secs)
    }

    /// Emission interval for one unit at `multiplier_pct` percent of the base limit.
    fn interval_ns(&self, multiplier_pct: u32) -> u64 {
        let scaled = (self.limit as u128 * multiplier_pct.max(1) as u128 / 100).max(1);
        (self.window_ns as u128 / scaled).max(1) as u64
    }

    /// Admits `weight` units at `now_ns`, returning when their slot ends (the arrival time
    /// they moved the limit to), or says how long until they would be admitted.
    pub(crate) fn acquire(
        &self,
        now_ns: u64,
        weight: u64,
        multiplier_pct: u32,
    ) -> Result<u64, Duration> {
        let increment = self.interval_ns(multiplier_pct).saturating_mul(weight);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let new_tat = tat.max(now_ns).saturating_add(increment);
            if let Some(wait) = self.wait_for(tat, new_tat, now_ns) {
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
    fn wait(&self, now_ns: u64, weight: u64, multiplier_pct: u32) -> Option<Duration> {
        let increment = self.interval_ns(multiplier_pct).saturating_mul(weight);
        let tat = self.tat.load(Ordering::Acquire);
        self.wait_for(tat, tat.max(now_ns).saturating_add(increment), now_ns)
    }

    /// The wait before moving the arrival time from `tat` to `new_tat` fits in the window
    /// (`None`: it does now). A step larger than the whole window (a cost above the token
    /// window's capacity) could never fit: it fits once the window is empty, and the key's
    /// next requests wait until it is paid off, so the long-run rate still holds and the wait
    /// given is one after which the request is admitted.
    fn wait_for(&self, tat: u64, new_tat: u64, now_ns: u64) -> Option<Duration> {
        let ahead = new_tat - now_ns;
        if ahead <= self.window_ns {
            return None;
        }
        let wait = (ahead - self.window_ns).min(tat.saturating_sub(now_ns));
        // In whole milliseconds, rounded up: the clock reads milliseconds, so a wait cut
        // short by a fraction of one would be refused again.
        (wait > 0).then(|| Duration::from_millis(wait.div_ceil(NANOS_PER_MILLI)))
    }

    /// Charges `weight` more units without refusing (work already done): the key's next
    /// requests wait for them.
    fn charge(&self, now_ns: u64, weight: u64, multiplier_pct: u32) {
        let increment = self.interval_ns(multiplier_pct).saturating_mul(weight);
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.max(now_ns).saturating_add(increment))
            });
    }

    /// Gives back the last `weight` units of a slot [`acquire`](Self::acquire) admitted and
    /// said ends at `until_ns`, as far as they are still ahead of `now_ns`: the part already
    /// past has drained by itself, and taking it off again would take other requests' slots.
    /// Never moves the arrival time below `now_ns`.
    pub(crate) fn release(&self, now_ns: u64, until_ns: u64, weight: u64, multiplier_pct: u32) {
        let decrement = (self.interval_ns(multiplier_pct).saturating_mul(weight))
            .min(until_ns.saturating_sub(now_ns));
        if decrement == 0 {
            return;
        }
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| {
                Some(tat.saturating_sub(decrement).max(now_ns))
            });
    }

    /// Units still admissible right now (for grants' rate-limit state).
    pub(crate) fn remaining(&self, now_ns: u64, multiplier_pct: u32) -> u64 {
        let interval = self.interval_ns(multiplier_pct);
        let used = self.tat.load(Ordering::Acquire).saturating_sub(now_ns);
        self.window_ns.saturating_sub(used) / interval
    }
}

/// What an admission by [`KeyLimits::acquire`] holds, to give back or settle later: where
/// its slots end and the tier it was admitted at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    /// The earliest end of its slots in the named limits (`u64::MAX`: none).
    named_until_ns: u64,
    /// The end of its slot in the token window (0: none taken).
    tokens_until_ns: u64,
    /// The spend-tier multiplier it was admitted at.
    tier_pct: u32,
}

/// The GCRA limits of one key: its named limits, then its token window if any; and its
/// spend tier, which only ever scales these limits (a key without limits keeps none).
#[derive(Debug, Default)]
pub(crate) struct KeyLimits {
    /// The key's limits generation when built (see `LiveLimits` in src/engine.rs): a state
    /// of an older one is never reused, even if configured the same.
    pub(crate) generation: u64,
    named: Box<[Gcra]>,
    tokens: Option<Box<Gcra>>,
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
                .map(|l| Gcra::new(l.limit, l.window_secs))
                .collect(),
            tokens: limits
                .token_window
                .map(|t| Box::new(Gcra::new(t.tokens, t.window_secs))),
        }
    }

    /// Whether these limits were built from `limits` (same named limits and token window).
    pub(crate) fn configured_as(&self, limits: &Limits) -> bool {
        let named = self.named.len() == limits.rate_limits.len()
            && self
                .named
                .iter()
                .zip(&limits.rate_limits)
                .all(|(g, l)| g.same(l.limit, l.window_secs));
        let tokens = match (&self.tokens, limits.token_window) {
            (None, None) => true,
            (Some(g), Some(t)) => g.same(t.tokens, t.window_secs),
            _ => false,
        };
        named && tokens
    }

    /// Admits one request of `cost` tokens against every limit, all or nothing.
    pub(crate) fn acquire(
        &self,
        now_ns: u64,
        cost: u64,
        multiplier_pct: u32,
    ) -> Result<Admission, Duration> {
        let mut admission = Admission {
            named_until_ns: u64::MAX,
            tokens_until_ns: 0,
            tier_pct: multiplier_pct,
        };
        // A roll-back gives back slots taken at this very `now_ns`: wholly still ahead.
        let roll_back = |taken: &[Gcra]| {
            taken
                .iter()
                .for_each(|g| g.release(now_ns, u64::MAX, 1, multiplier_pct))
        };
        for (i, gcra) in self.named.iter().enumerate() {
            match gcra.acquire(now_ns, 1, multiplier_pct) {
                Ok(until) => admission.named_until_ns = admission.named_until_ns.min(until),
                Err(wait) => {
                    roll_back(&self.named[..i]);
                    // A retry must wait for the slowest limit, not just the first that refused.
                    let later = self.named[i + 1..]
                        .iter()
                        .filter_map(|g| g.wait(now_ns, 1, multiplier_pct));
                    let tokens = self.tokens.as_ref().filter(|_| cost > 0);
                    let tokens = tokens.and_then(|t| t.wait(now_ns, cost, multiplier_pct));
                    return Err(later.chain(tokens).fold(wait, Duration::max));
                }
            }
        }
        if let Some(tokens) = &self.tokens {
            if cost > 0 {
                match tokens.acquire(now_ns, cost, multiplier_pct) {
                    Ok(until) => admission.tokens_until_ns = until,
                    Err(wait) => {
                        roll_back(&self.named);
                        return Err(wait);
                    }
                }
            }
        }
        Ok(admission)
    }

    /// Moves the token window from the `reserved` tokens a request was admitted with to the
    /// `used` tokens its commit reports: the window counts tokens used, not estimates. More
    /// are charged even past the window (the work is done; the key's next requests wait for
    /// them), fewer are given back as far as their slot is still ahead.
    pub(crate) fn settle_tokens(
        &self,
        now_ns: u64,
        admitted: &Admission,
        reserved: u64,
        used: u64,
    ) {
        let Some(tokens) = &self.tokens else {
            return;
        };
        let pct = admitted.tier_pct;
        match used.cmp(&reserved) {
            std::cmp::Ordering::Greater => tokens.charge(now_ns, used - reserved, pct),
            std::cmp::Ordering::Less => {
                tokens.release(now_ns, admitted.tokens_until_ns, reserved - used, pct)
            }
            std::cmp::Ordering::Equal => {}
        }
    }

    /// Gives back what a successful [`acquire`](Self::acquire) of `cost` took (a later check
    /// refused the request), as far as its slots are still ahead of `now_ns`.
    pub(crate) fn release(&self, now_ns: u64, admitted: &Admission, cost: u64) {
        let pct = admitted.tier_pct;
        self.named
            .iter()
            .for_each(|g| g.release(now_ns, admitted.named_until_ns, 1, pct));
        if let Some(tokens) = &self.tokens {
            tokens.release(now_ns, admitted.tokens_until_ns, cost, pct);
        }
    }

    /// Whether a limit still holds arrivals at `now_ns` (monotonic): dropping the state now
    /// would forget them. Once every arrival time has passed, a new state admits exactly what
    /// this one would.
    pub(crate) fn running(&self, now_ns: u64) -> bool {
        let mut all = self.named.iter().chain(self.tokens.as_deref());
        all.any(|g| g.tat.load(Ordering::Acquire) > now_ns)
    }

    /// Lifetime spend counted so far (0 without spend tiers).
    pub(crate) fn lifetime_spent(&self) -> u64 {
        self.lifetime_spent.load(Ordering::Relaxed)
    }

    /// The spend-tier multiplier under the configured `tiers`, in percent.
    #[inline]
    pub(crate) fn tier_pct(&self, tiers: &[SpendTier]) -> u32 {
        tier_multiplier(tiers, self.tiers_reached.load(Ordering::Relaxed))
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

    /// Requests left in the tightest named limit, and tokens left in the window.
    pub(crate) fn remaining(&self, now_ns: u64, multiplier_pct: u32) -> (Option<u64>, Option<u64>) {
        let requests = self
            .named
            .iter()
            .map(|g| g.remaining(now_ns, multiplier_pct))
            .min();
        let tokens = self
            .tokens
            .as_ref()
            .map(|g| g.remaining(now_ns, multiplier_pct));
        (requests, tokens)
    }
}

/// A spend tier: keys that have spent at least `min_spent` units get their rate limits
/// multiplied by `multiplier_pct / 100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpendTier {
    /// Lifetime spend (units) from which the tier applies.
    pub min_spent: u64,
    /// Multiplier in percent (200 doubles every limit).
    pub multiplier_pct: u32,
}

/// How many of `tiers` (sorted by `min_spent`, as `Config` keeps them) a lifetime spend has
/// reached.
pub(crate) fn tiers_reached(tiers: &[SpendTier], spent: u64) -> u32 {
    // At most `tiers.len()`, which a `Vec` of 12-byte tiers keeps far below 2³².
    tiers.partition_point(|t| t.min_spent <= spent) as u32
}

/// The multiplier (percent) of a key that has reached `reached` of the sorted `tiers`: the
/// highest tier's, or 100 below the first.
pub(crate) fn tier_multiplier(tiers: &[SpendTier], reached: u32) -> u32 {
    (reached as usize)
        .checked_sub(1)
        .and_then(|i| tiers.get(i))
        .map_or(100, |t| t.multiplier_pct)
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

    const S: u64 = NANOS_PER_SEC;

    #[test]
    fn burst_then_steady_rate() {
        let g = Gcra::new(10, 1); // 10 per second
        let t0 = 1_000 * S;
        for _ in 0..10 {
            assert!(g.acquire(t0, 1, 100).is_ok());
        }
        let wait = g.acquire(t0, 1, 100).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(
            g.acquire(t0 + S / 10, 1, 100).is_ok(),
            "one slot frees every 100 ms"
        );
        assert!(g.acquire(t0 + S / 10, 1, 100).is_err());
        assert!(
            g.acquire(t0 + 5 * S, 1, 100).is_ok(),
            "idle time restores the burst"
        );
    }

    #[test]
    fn weights_and_multipliers() {
        let g = Gcra::new(100, 60); // 100 tokens a minute
        let t0 = 7 * S;
        assert!(g.acquire(t0, 100, 100).is_ok());
        assert!(g.acquire(t0, 1, 100).is_err());
        let doubled = Gcra::new(100, 60);
        assert!(
            doubled.acquire(t0, 200, 200).is_ok(),
            "a 2× tier admits 200"
        );
        assert!(doubled.acquire(t0, 1, 200).is_err());
    }

    #[test]
    fn a_request_larger_than_the_window_fits_once_it_is_empty_and_is_paid_off_after() {
        let g = Gcra::new(100, 60); // 100 tokens a minute: one every 600 ms
        let t0 = 7 * S;
        assert!(g.acquire(t0, 10, 100).is_ok());
        // 250 tokens never fit beside others: the wait is until the window is empty.
        assert_eq!(g.acquire(t0, 250, 100), Err(Duration::from_secs(6)));
        assert!(g.acquire(t0 + 6 * S - 1, 250, 100).is_err());
        assert!(
            g.acquire(t0 + 6 * S, 250, 100).is_ok(),
            "the wait given was true"
        );
        // 150 tokens over the window's capacity are owed: one more token waits 90.6 s.
        let wait = g.acquire(t0 + 6 * S, 1, 100).unwrap_err();
        assert_eq!(wait, Duration::from_millis(90_600));
        assert!(
            g.acquire(t0 + 6 * S + wait.as_nanos() as u64, 1, 100)
                .is_ok()
        );
        assert_eq!(g.remaining(t0 + 6 * S, 100), 0);
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

    #[test]
    fn all_or_nothing_across_limits() {
        let limits = Limits {
            token_window: Some(crate::TokenWindow {
                tokens: 50,
                window_secs: 60,
            }),
            ..per_second_and_minute(5, 6)
        };
        let k = KeyLimits::new(&limits, 0, &[]);
        let t0 = 100 * S;
        assert!(k.acquire(t0, 10, 100).is_ok());
        assert!(k.acquire(t0, 45, 100).is_err(), "token window refuses");
        // The refused request gave its named-limit slots back: 4 more fit this second.
        for _ in 0..4 {
            assert!(k.acquire(t0, 1, 100).is_ok());
        }
        assert!(k.acquire(t0, 1, 100).is_err());
        assert_eq!(k.remaining(t0, 100).0, Some(0));
    }

    #[test]
    fn a_refusal_asks_to_wait_for_the_slowest_limit() {
        let k = KeyLimits::new(&per_second_and_minute(5, 5), 0, &[]);
        let t0 = 100 * S;
        for _ in 0..5 {
            assert!(k.acquire(t0, 1, 100).is_ok());
        }
        // The per-second limit refuses first, for 200 ms; the per-minute one for 12 s.
        assert_eq!(k.acquire(t0, 1, 100), Err(Duration::from_secs(12)));
        assert!(
            k.acquire(t0 + 12 * S, 1, 100).is_ok(),
            "after that wait it fits"
        );
    }

    #[test]
    fn spend_past_the_largest_count_saturates() {
        let tiers = [tier(100, 150)];
        let k = KeyLimits::new(&Limits::default(), 90, &tiers);
        k.record_spend(u64::MAX, &tiers);
        k.record_spend(5, &tiers);
        assert_eq!(k.lifetime_spent.load(Ordering::Relaxed), u64::MAX);
        assert_eq!(k.tier_pct(&tiers), 150);
    }

    fn tier(min_spent: u64, multiplier_pct: u32) -> SpendTier {
        SpendTier {
            min_spent,
            multiplier_pct,
        }
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
        assert_eq!(k.tier_pct(&tiers), 100, "90 spent before it was cached");
        k.record_spend(10, &tiers);
        assert_eq!(k.tier_pct(&tiers), 150);
        k.record_spend(5_000, &tiers);
        assert_eq!(k.tier_pct(&tiers), 300, "straight past the second");
        let fresh = KeyLimits::new(&limits, 5_000, &[]);
        fresh.record_spend(5_000, &[]);
        assert_eq!(fresh.tier_pct(&[]), 100, "no tiers configured");
    }

    #[test]
    fn tiers_pick_the_highest_reached() {
        let config = crate::Config::builder()
            .master_key(crate::MasterKey::from_bytes(&[7; 32]).unwrap())
            .spend_tiers([tier(1_000, 200), tier(100, 150), tier(1_000, 300)])
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
        // Of two tiers with one threshold, the one given last applies.
        assert_eq!(at(1_000), (300, u64::MAX));
        assert_eq!(at(5_000), (300, u64::MAX));
    }
}
