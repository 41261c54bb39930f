//! The `request` fuzz target: the request side of [`Ledger::verify`] on a small in-memory
//! ledger — header text, route, client IP, cost — against a plain reference model.
//!
//! The input's first byte chooses what else it sets up (0: nothing, the inputs of the
//! forty-sixth session read behind a 0 byte exactly as they did): named rate limits and a
//! token window on keys ([`RATES`]), a shared credit pool that keys may spend from
//! ([`POOL`]), daily or monthly refills of balances ([`REFILL`]), a clock moved between
//! requests ([`CLOCK`]), keys rolled between requests, their previous secret presented
//! during and after its grace ([`ROLL`]), and leases of exactly each request's cost
//! ([`EXACT`]: with the default leases, a small balance is all in memory, and a fault in
//! the stored balance's arithmetic may not show).
//!
//! The input then sets up one account (status, entitlements), perhaps a pool, up to 24
//! route rules (now and then 70, past what the permission bitmask describes) over a small
//! alphabet of prefixes, scopes and entitlements, with costs and prices, and three keys
//! (permissions with `*` and `scope:*` wildcards, an IP allowlist of addresses and ranges,
//! IPv4-mapped ones too, credits or none or the pool's, a refill, up to two named limits
//! and a token window, disabled, expired; the third deleted). Then up to 16 requests, each
//! with `Authorization` / `x-api-key` text (raw from the input, or one of the keys — its
//! current, previous or an earlier secret — written in one of several ways), a route, a
//! client IP as text, a cost; a grant is committed (at, under or over its reservation) or
//! dropped. Between requests a route rule may be set, which publishes a new route table,
//! the clock may move (1 ms to 32 days) and a key may be rolled.
//!
//! Properties: nothing panics; the headers give the key the reference reads from them; a key
//! that is none of the three is `malformed` or `not_found`; for one of them the outcome is the
//! reference's, denial code for denial code, through DESIGN §4's chain (a previous secret
//! past its grace or one replaced by a later roll is no key, state, route permission by
//! longest prefix, allowlist, subscription and entitlement, rate limits, credits) and a
//! `rate_limited` denial's retry-after is the reference's to the millisecond; a grant names
//! its key, its cost, its permissions, the credits left (its own balance's or the pool's,
//! refilled as DESIGN §5 says) and the rate-limit state, and its receipt charges and prices
//! what the reference does; `unavailable` never happens on this healthy ledger.
//!
//! The reference's rate limits are GCRA as the `limits` module's docs state it: `limit` per
//! window admits a burst of `limit`, then one every `window / limit`; a request is admitted
//! when its slot ends at most a window ahead, or (one costing more than the window holds)
//! once the window is empty; one request moves a window by at most 2⁶⁸ ns; a retry-after is
//! the slowest limit's wait in whole milliseconds rounded up; a refusal after the rate check
//! takes nothing; a dropped grant keeps its tokens, a committed one counts what it used
//! (exactly: requests here run one at a time, so nothing has queued behind a grant when it
//! gives tokens back, and the engine's bound on what concurrent changes leave to give back
//! is not modelled — the `limits` unit tests and the model tests hold it).
//! Times are kept exactly, in nanoseconds times the limit. Token windows hold 1, 4, 10 or
//! 1,000 tokens, which divide a second's nanoseconds: a token's share is a whole number of
//! nanoseconds, so the engine's rounding of shares to 2⁻³² ns, multiplied by a cost of 2⁴⁰,
//! has nothing to round (named limits weigh 1, where that rounding never shows).
//!
//! What it does not drive: spend tiers (no tiers configured: tier 0, multiplier 100 %),
//! imported keys, admin changes to a key's limits or balance, and concurrency (the `ops`
//! target and the model tests do).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::accounts::NewAccount;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::credits::NewPool;
use crate::engine::Durability;
use crate::keyfmt::Presented;
use crate::keys::NewKey;
use crate::ledger::Ledger;
use crate::record::{RefillInterval, RouteRule, SubscriptionStatus};
use crate::secret::MasterKey;
use crate::verify::Request;

const START: Timestamp = Timestamp(1_750_000_000_000);
/// Feature bits of an input's first byte (see the module docs).
pub const RATES: u8 = 1;
/// The account gets a pool, which keys may spend from.
pub const POOL: u8 = 2;
/// Balances (a key's own, the pool's) may refill.
pub const REFILL: u8 = 4;
/// The clock may move before each request.
pub const CLOCK: u8 = 8;
/// A key may be rolled before each request, and requests may present earlier secrets.
pub const ROLL: u8 = 16;
/// The ledger leases exactly what each request needs ([`Durability::Exact`]): every
/// reservation and refund goes through the writer and the stored balance.
pub const EXACT: u8 = 32;
/// Steps the clock may take before a request, in ms: none, within a window, past windows,
/// days and months.
const CLOCK_STEPS: [u64; 11] = [
    0,
    0,
    0,
    1,
    100,
    333,
    1_000,
    60_000,
    3_600_000,
    86_400_000,
    32 * 86_400_000,
];
/// A named limit's requests and windows, and a token window's tokens (dividing a second's
/// nanoseconds: see the module docs).
const LIMITS: [u64; 4] = [1, 2, 3, 5];
const WINDOWS: [u64; 3] = [1, 2, 60];
const TOKENS: [u64; 4] = [1, 4, 10, 1_000];
const NAMES: [&str; 2] = ["requests", "burst"];
/// A roll's grace, in seconds.
const GRACES: [u64; 3] = [0, 1, 3_600];
/// Refill amounts, and a pool's starting credits.
const REFILLS: [u64; 4] = [1, 2, 5, 9];
const POOL_CREDITS: [u64; 4] = [0, 3, 6, 1 << 40];
/// Most requests per input.
const MAX_REQUESTS: usize = 16;
/// Scopes keys hold and rules ask for: wildcards that cover some of the others.
const SCOPES: [&str; 8] = ["*", "a:*", "a:b", "a:b:*", "a:b:c", "b:a", "a:", "ab:b"];
const ENTITLEMENTS: [&str; 2] = ["pro", "beta"];
/// Characters of prefixes and routes (a prefix with `//` or `/./` is refused, and left out).
const ROUTE_CHARS: &[u8] = b"ab/.?";

/// The denial codes of DESIGN §4. (`unavailable`, a store that failed, is not there and has
/// no place on this healthy in-memory ledger.)
const DESIGN_CODES: [&str; 10] = [
    "malformed",
    "not_found",
    "disabled",
    "expired",
    "forbidden",
    "ip_not_allowed",
    "subscription_inactive",
    "not_entitled",
    "rate_limited",
    "usage_exceeded",
];

struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn below(&mut self, n: u64) -> u64 {
        u64::from(self.byte()) % n
    }

    fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// Up to `max` bytes of text (lossy UTF-8), length first.
    fn text(&mut self, max: u64) -> String {
        let len = self.below(max + 1) as usize;
        let start = self.pos.min(self.data.len());
        let end = (start + len).min(self.data.len());
        self.pos += len;
        String::from_utf8_lossy(&self.data[start..end]).into_owned()
    }

    fn path(&mut self, max: u64) -> String {
        let len = self.below(max + 1);
        (0..len)
            .map(|_| ROUTE_CHARS[self.below(ROUTE_CHARS.len() as u64) as usize] as char)
            .collect()
    }

    fn cost(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => u64::MAX,
            2 => 1 << 40,
            n => n - 2,
        }
    }

    /// An address: IPv4, IPv6, or IPv4-mapped IPv6, from few bytes so ranges get hit.
    fn ip(&mut self) -> IpAddr {
        let v4 = std::net::Ipv4Addr::new(10, 0, self.below(3) as u8, self.byte() & 0x0f);
        match self.below(3) {
            0 => IpAddr::V4(v4),
            1 => IpAddr::V6(v4.to_ipv6_mapped()),
            _ => IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001,
                0xdb8,
                self.below(3) as u16,
                0,
                0,
                0,
                0,
                u16::from(self.byte() & 0x0f),
            )),
        }
    }
}

/// A key as the reference knows it.
struct Key {
    id: String,
    plaintext: String,
    /// The secret the last roll replaced, and when its grace ends (ms; a roll without grace
    /// ends it at once).
    previous: Option<(String, u64)>,
    /// Secrets replaced by a roll before the last one: no key's any more.
    retired: Vec<String>,
    permissions: Vec<String>,
    /// The allowlist as written (ranges, not truncated).
    ips: Vec<IpNet>,
    /// The balance it spends from (an index into the balances: its own or the pool's);
    /// `None`: unmetered.
    balance: Option<usize>,
    rates: Rates,
    disabled: bool,
    expires_at: Option<u64>,
    /// Deleted right after its creation.
    deleted: bool,
}

/// A credit balance as DESIGN §5 describes it: spent down, never below zero; a refill
/// *replaces* it at the start of each period (00:00 UTC daily, or on the 1st of the month),
/// the first one in the period after the balance was created.
#[derive(Debug, Clone, Copy)]
struct Balance {
    left: u64,
    refill: Option<(u64, RefillInterval)>,
    /// The start of the period last refilled (or created in).
    refilled_at: u64,
    /// Refills so far.
    refills: u32,
}

impl Balance {
    fn new(left: u64, refill: Option<(u64, RefillInterval)>, now: u64) -> Self {
        let refilled_at = refill.map_or(0, |(_, interval)| period_start(interval, now));
        Balance {
            left,
            refill,
            refilled_at,
            refills: 0,
        }
    }

    /// Refills the balance if a period began since the last refill: whether it did.
    fn catch_up(&mut self, now: u64) -> bool {
        let Some((amount, interval)) = self.refill else {
            return false;
        };
        let start = period_start(interval, now);
        if start <= self.refilled_at {
            return false;
        }
        self.left = amount;
        self.refilled_at = start;
        self.refills += 1;
        true
    }
}

const DAY_MS: u64 = 86_400_000;

/// The start (ms) of the period holding `now`: its day, or the 1st of its month, 00:00 UTC.
fn period_start(interval: RefillInterval, now: u64) -> u64 {
    let day = now / DAY_MS;
    if interval == RefillInterval::Daily {
        return day * DAY_MS;
    }
    // Months counted from 1970-01-01, one by one.
    let mut start = 0;
    for year in 1970u64.. {
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        for month in 0..12 {
            let days = match month {
                1 if leap => 29,
                1 => 28,
                3 | 5 | 8 | 10 => 30,
                _ => 31,
            };
            if start + days > day {
                return start * DAY_MS;
            }
            start += days;
        }
    }
    unreachable!("a month holds every day")
}

/// The most one request moves a window's arrival time (the `limits` module's `MAX_STEP`).
const MAX_STEP_NS: u128 = 1 << 68;
const NANOS_PER_MILLI: u128 = 1_000_000;

/// A GCRA limit as the reference reads it (see the module docs), its times in nanoseconds
/// on the clock's monotonic scale times `limit`, so that a unit's share (the window's
/// nanoseconds) is exact.
#[derive(Debug, Clone, Copy)]
struct Window {
    limit: u128,
    window_ns: u128,
    /// When the slots taken so far end (ns × limit).
    tat: u128,
}

impl Window {
    fn new(limit: u64, window_secs: u64) -> Self {
        Window {
            limit: u128::from(limit),
            window_ns: u128::from(window_secs) * 1_000_000_000,
            tat: 0,
        }
    }

    /// How far `weight` units move the arrival time (ns × limit).
    fn step(&self, weight: u64) -> u128 {
        (u128::from(weight) * self.window_ns).min(MAX_STEP_NS * self.limit)
    }

    /// The wait (ms, rounded up) before `weight` units are admitted at `now_ns`; 0: now.
    fn wait_ms(&self, now_ns: u64, weight: u64) -> u128 {
        let now = u128::from(now_ns) * self.limit;
        let window = self.window_ns * self.limit;
        let ahead = self.tat.max(now) + self.step(weight) - now;
        if ahead <= window {
            return 0;
        }
        // A step past the whole window fits once the window is empty.
        let wait = (ahead - window).min(self.tat.saturating_sub(now));
        wait.div_ceil(NANOS_PER_MILLI * self.limit)
    }

    fn take(&mut self, now_ns: u64, weight: u64) {
        self.tat = self.tat.max(u128::from(now_ns) * self.limit) + self.step(weight);
    }

    /// Units admissible at `now_ns`.
    fn remaining(&self, now_ns: u64) -> u64 {
        let used = self.tat.saturating_sub(u128::from(now_ns) * self.limit);
        let left = (self.window_ns * self.limit).saturating_sub(used) / self.window_ns;
        u64::try_from(left).unwrap_or(u64::MAX)
    }
}

/// A key's rate limits: named limits (one request each) and a token window (the cost).
#[derive(Debug, Clone, Default)]
struct Rates {
    named: Vec<Window>,
    tokens: Option<Window>,
}

impl Rates {
    /// The wait (ms) before a request of `cost` is admitted: the slowest limit's (0: now). A
    /// request of no cost takes no tokens.
    fn wait_ms(&self, now_ns: u64, cost: u64) -> u128 {
        let named = self.named.iter().map(|w| w.wait_ms(now_ns, 1));
        let tokens = self.tokens.iter().filter(|_| cost > 0);
        let tokens = tokens.map(|w| w.wait_ms(now_ns, cost));
        named.chain(tokens).max().unwrap_or(0)
    }

    /// Admits a request of `cost`, all limits at once.
    fn take(&mut self, now_ns: u64, cost: u64) {
        for w in &mut self.named {
            w.take(now_ns, 1);
        }
        if let Some(w) = self.tokens.as_mut().filter(|_| cost > 0) {
            w.take(now_ns, cost);
        }
    }
}

/// Whether `granted` scopes allow `required`: the docs' rule, written out.
fn permits(granted: &[String], required: &str) -> bool {
    granted.iter().any(|g| {
        g == "*"
            || g == required
            || (g.len() >= 2 && g.ends_with(":*") && required.starts_with(&g[..g.len() - 1]))
    })
}

/// Whether the allowlist admits `client`: IPv4 clients as IPv4 (a dual-stack listener's
/// `::ffff:a.b.c.d` too), by an IPv4 range or an IPv4-mapped IPv6 range (/96 or longer);
/// IPv6 clients by IPv6 ranges.
fn ip_allowed(ips: &[IpNet], client: Option<IpAddr>) -> bool {
    if ips.is_empty() {
        return true;
    }
    let Some(client) = client else {
        return false;
    };
    let v4 = match client {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    ips.iter().any(|net| match (net, v4) {
        (IpNet::V4(n), Some(a)) => n.contains(&a),
        (IpNet::V6(n), Some(a)) => n.prefix_len() >= 96 && n.contains(&a.to_ipv6_mapped()),
        (IpNet::V6(n), None) => match client {
            IpAddr::V6(a) => n.contains(&a),
            IpAddr::V4(_) => false,
        },
        (IpNet::V4(_), None) => false,
    })
}

/// The key the headers carry, as the docs of `Presented::from_headers` describe it:
/// `Ok(key)`, or the error's code.
fn reference_headers(auth: Option<&str>, x_api_key: Option<&str>) -> Result<String, &'static str> {
    let trim = |s: &str| s.trim_matches([' ', '\t']).to_owned();
    let checked = |key: String| -> Result<String, &'static str> {
        if key.len() > crate::keyfmt::MAX_PRESENTED_LEN
            || !key.bytes().all(|b| b.is_ascii_graphic())
        {
            Err("malformed")
        } else {
            Ok(key)
        }
    };
    let bearer = auth.map(trim).filter(|v| !v.is_empty()).map(|v| {
        let split = v.find([' ', '\t']);
        let (scheme, rest) = match split {
            Some(i) => (&v[..i], trim(&v[i + 1..])),
            None => (v.as_str(), String::new()),
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            Err("unsupported_scheme")
        } else if rest.is_empty() {
            Err("missing_key")
        } else {
            Ok(rest)
        }
    });
    let api_key = x_api_key.map(trim).filter(|v| !v.is_empty());
    match (bearer, api_key) {
        (None, None) => Err("missing_key"),
        (Some(b), None) => checked(b?),
        (None | Some(Err(_)), Some(k)) => checked(k),
        (Some(Ok(a)), Some(b)) => {
            let (a, b) = (checked(a)?, checked(b)?);
            if a == b {
                Ok(a)
            } else {
                Err("conflicting_keys")
            }
        }
    }
}

/// What an input reached, for the seeds' tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    /// Grants of a key with rate limits.
    pub rated_grants: u32,
    /// `rate_limited` denials.
    pub rate_limited: u32,
    /// Grants spending from the pool.
    pub pool_grants: u32,
    /// Pool keys refused for want of credits.
    pub pool_exhausted: u32,
    /// Refills that came due.
    pub refills: u32,
    /// Grants from a balance refilled at least once.
    pub refilled_grants: u32,
    /// Grants to a previous secret in its grace.
    pub previous_grants: u32,
    /// Refusals of a previous secret past its grace, or of one a later roll replaced.
    pub dead_secrets: u32,
}

/// Runs one input (see the module docs); `Err` names a property that failed.
fn run(data: &[u8]) -> Result<Reached, String> {
    let mut reached = Reached::default();
    let mut b = Bytes { data, pos: 0 };
    let features = b.byte();
    let clock = ManualClock::new(START);
    let config = Config::builder()
        .master_key(MasterKey::from_bytes(&[7u8; 32]).expect("32 bytes"))
        .clock(clock.clone())
        .durability(match features & EXACT {
            0 => Durability::Leased,
            _ => Durability::Exact,
        })
        .build()
        .expect("valid config");
    let ledger = Ledger::open_with_backend(redb::backends::InMemoryBackend::new(), config)
        .map_err(|e| format!("open: {e}"))?;
    // Mostly active: an inactive subscription stops every request before the later checks.
    let status = SubscriptionStatus::ALL
        .get(b.below(10) as usize)
        .copied()
        .unwrap_or(SubscriptionStatus::Active);
    let owned = b.byte();
    let entitlements: BTreeSet<String> = (ENTITLEMENTS.iter().enumerate())
        .filter(|(i, _)| owned & (1 << i) != 0)
        .map(|(_, e)| e.to_string())
        .collect();
    let account = ledger
        .accounts()
        .create(
            NewAccount::new("Acme")
                .status(status)
                .entitlements(entitlements.iter().cloned()),
        )
        .map_err(|e| format!("account: {e}"))?
        .id
        .to_string();
    let mut balances: Vec<Balance> = Vec::new();
    let pool = match features & POOL {
        0 => None,
        _ => Some(create_pool(
            &ledger,
            &account,
            features,
            &mut b,
            &mut balances,
        )?),
    };
    let mut rules: BTreeMap<String, RouteRule> = BTreeMap::new();
    let count = match b.byte() {
        255 => 70,
        n => n % 25,
    };
    // Written in one transaction (a `set` each would be most of an input's time); each
    // `set` between requests goes through `Routes::set`.
    let initial: Vec<RouteRule> = (0..count)
        .map(|_| rule(&mut b))
        .filter(|r| crate::routes::check_prefix(&r.prefix).is_ok())
        .collect();
    let inner = &ledger.inner;
    inner
        .engine
        .change_routes(&inner.store, |txn| {
            let mut table = txn.open_table(crate::store::tables::ROUTES)?;
            for r in &initial {
                table.insert(r.prefix.as_str(), crate::codec::encode(r).as_slice())?;
            }
            Ok(())
        })
        .map_err(|e| format!("route rules: {e}"))?;
    rules.extend(initial.into_iter().map(|r| (r.prefix.clone(), r)));
    let mut keys = Vec::new();
    for k in 0..3 {
        let new = NewKeyInput {
            account: &account,
            k,
            features,
            pool: pool.as_deref(),
        };
        keys.push(create_key(&ledger, &new, &mut b, &mut balances)?);
    }
    // Now and then past every expiry.
    let advanced = b.below(4) == 0;
    if advanced {
        clock.advance_secs(7_200);
    }
    let mut now = START.0 + if advanced { 7_200_000 } else { 0 };
    for balance in &mut balances {
        reached.refills += u32::from(balance.catch_up(now));
    }
    let subscription_ok = !matches!(
        status,
        SubscriptionStatus::Canceled | SubscriptionStatus::Suspended
    );
    let mut requests = 0;
    while !b.exhausted() && requests < MAX_REQUESTS {
        requests += 1;
        if b.below(6) == 0 {
            set_rule(&ledger, &mut rules, &mut b)?;
        }
        if features & CLOCK != 0 {
            let step = CLOCK_STEPS[b.below(CLOCK_STEPS.len() as u64) as usize];
            if step > 0 {
                now += step;
                clock.set(Timestamp(now));
                for balance in &mut balances {
                    reached.refills += u32::from(balance.catch_up(now));
                }
            }
        }
        if features & ROLL != 0 && b.below(8) == 0 {
            let k = b.below(2) as usize;
            let grace = GRACES[b.below(GRACES.len() as u64) as usize];
            roll(&ledger, &mut keys[k], grace, now)?;
        }
        // Headers.
        let mode = b.below(8);
        let i = b.below(3) as usize;
        let secret = match features & ROLL {
            0 => 2,
            _ => b.below(4),
        };
        let key = match (secret, &keys[i].previous, keys[i].retired.last()) {
            (0, Some((previous, _)), _) => previous.clone(),
            (1, _, Some(retired)) => retired.clone(),
            _ => keys[i].plaintext.clone(),
        };
        let other = keys[(i + 1) % 3].plaintext.clone();
        let raw = b.text(40);
        let (auth, x_api_key): (Option<String>, Option<String>) = match mode {
            0 => (Some(raw), None),
            1 => (Some(format!("Bearer {key}")), None),
            2 => (None, Some(key)),
            3 => (Some(format!("bearer\t {key} ")), Some(format!(" {key}"))),
            4 => (Some(format!("Bearer {key}")), Some(other)),
            5 => (Some(raw), Some(key)),
            6 => {
                // One character of the key changed, or the key cut short.
                let mut bytes = key.into_bytes();
                let at = b.below(bytes.len() as u64) as usize;
                match b.below(3) {
                    0 => bytes.truncate(at),
                    _ => bytes[at] = raw.bytes().next().unwrap_or(b'A'),
                }
                (
                    Some(format!("BEARER {}", String::from_utf8_lossy(&bytes))),
                    None,
                )
            }
            _ => (None, Some(raw)),
        };
        // A rule's own prefix, or one with a little more, half the time: the routes that
        // tell the longest match from a shorter one, and the search's bounds.
        let route = match b.below(4) {
            0 => b.path(6),
            1 | 2 if !rules.is_empty() => {
                let at = b.below(rules.len() as u64) as usize;
                let prefix = rules.keys().nth(at).expect("below the count");
                format!("{prefix}{}", b.path(2))
            }
            _ => format!("/{}", b.path(6)),
        };
        let ip_text = match b.below(4) {
            0 => String::new(),
            1 => b.text(12),
            _ => b.ip().to_string(),
        };
        let client_ip: Option<IpAddr> = ip_text.parse().ok();
        let cost = match b.below(3) {
            0 => None,
            _ => Some(b.cost()),
        };
        let settle = b.below(4);
        let extra = b.below(4);

        let headers = Presented::from_headers(auth.as_deref(), x_api_key.as_deref());
        let expected_headers = reference_headers(auth.as_deref(), x_api_key.as_deref());
        let context = format!(
            "auth {auth:?}, x-api-key {x_api_key:?}, route {route:?}, ip {ip_text:?}, cost {cost:?}, \
             at {} ms",
            now - START.0
        );
        match (&headers, &expected_headers) {
            (Ok(p), Ok(k)) if p.expose() == k => {}
            (Err(e), Err(code)) if e.code() == *code => {}
            _ => {
                return Err(format!(
                    "headers read as {:?}, reference {expected_headers:?} ({context})",
                    headers.as_ref().map(|p| p.expose().to_owned())
                ));
            }
        }
        let Ok(presented) = headers else {
            continue;
        };
        let mut request = Request::new(&presented, &route);
        if let Some(ip) = client_ip {
            request = request.client_ip(ip);
        }
        if let Some(cost) = cost {
            request = request.cost(cost);
        }
        let outcome = ledger.verify(&request);
        if let Err(denial) = &outcome
            && !DESIGN_CODES.contains(&denial.code())
        {
            return Err(format!(
                "denial {denial:?} is none of DESIGN §4's ({context})"
            ));
        }
        let text = presented.expose();
        let found = keys.iter().enumerate().find_map(|(k, key)| {
            let previous = key.previous.as_ref().filter(|(p, _)| p == text);
            if key.plaintext == text {
                Some((k, Secret::Current))
            } else if let Some((_, until)) = previous {
                Some((k, Secret::Previous(*until)))
            } else if key.retired.iter().any(|r| r == text) {
                Some((k, Secret::Retired))
            } else {
                None
            }
        });
        let Some((k, which)) = found else {
            return match outcome {
                Err(d) if matches!(d.code(), "malformed" | "not_found") => continue,
                other => Err(format!(
                    "no key's text, answered {:?} ({context})",
                    other.map(|g| g.key_id())
                )),
            };
        };
        // The reference chain.
        let rule = route
            .starts_with('/')
            .then(|| {
                rules
                    .values()
                    .filter(|r| route.starts_with(r.prefix.as_str()))
                    .max_by_key(|r| r.prefix.len())
            })
            .flatten();
        let want_cost = cost.unwrap_or_else(|| rule.map_or(1, |r| r.cost));
        let key = &keys[k];
        let left = key.balance.map(|i| balances[i].left);
        // The monotonic clock started with the ledger's and only moved forward with it.
        let now_ns = (now - START.0) * 1_000_000;
        let wait_ms = key.rates.wait_ms(now_ns, want_cost);
        let dead = match which {
            Secret::Current => false,
            Secret::Previous(until) => until <= now,
            Secret::Retired => true,
        };
        let expected: Result<(), &str> = if key.deleted || dead {
            Err("not_found")
        } else if key.disabled {
            Err("disabled")
        } else if key.expires_at.is_some_and(|at| at <= now) {
            Err("expired")
        } else if !route.starts_with('/')
            || rule
                .and_then(|r| r.permission.as_deref())
                .is_some_and(|p| !permits(&key.permissions, p))
        {
            Err("forbidden")
        } else if !ip_allowed(&key.ips, client_ip) {
            Err("ip_not_allowed")
        } else if !subscription_ok {
            Err("subscription_inactive")
        } else if rule
            .and_then(|r| r.entitlement.as_ref())
            .is_some_and(|e| !entitlements.contains(e))
        {
            Err("not_entitled")
        } else if wait_ms > 0 {
            Err("rate_limited")
        } else if want_cost > 0 && left.is_some_and(|c| c < want_cost) {
            Err("usage_exceeded")
        } else {
            Ok(())
        };
        // The pool's balance is the first.
        let on_pool = pool.is_some() && key.balance == Some(0);
        let grant = match (outcome, expected) {
            (Err(d), Err(code)) if d.code() == code => {
                let retry_after = u64::try_from(wait_ms).map(Duration::from_millis);
                if code == "rate_limited" && d.retry_after() != retry_after.ok() {
                    return Err(format!(
                        "key {k} refused with retry-after {:?}, reference {wait_ms} ms \
                         (limits {:?}) ({context})",
                        d.retry_after(),
                        key.rates
                    ));
                }
                reached.rate_limited += u32::from(code == "rate_limited");
                reached.pool_exhausted += u32::from(code == "usage_exceeded" && on_pool);
                reached.dead_secrets += u32::from(dead);
                continue;
            }
            (Ok(grant), Ok(())) => grant,
            (got, want) => {
                return Err(format!(
                    "key {k} ({which:?}, {:?}, ips {:?}, credits {left:?}, disabled {}, \
                     expires {:?}, limits {:?}): verify gave {:?}, reference {want:?}; \
                     rule {rule:?}; account {status:?} {entitlements:?} ({context})",
                    key.permissions,
                    key.ips,
                    key.disabled,
                    key.expires_at,
                    key.rates,
                    got.map(|g| g.reserved())
                        .map_err(|d| (d.code(), d.retry_after())),
                ));
            }
        };
        if grant.key_id().as_str() != key.id
            || grant.reserved() != want_cost
            || grant.permissions() != key.permissions
        {
            return Err(format!(
                "grant of key {k} names {} reserving {} with {:?} ({context})",
                grant.key_id(),
                grant.reserved(),
                grant.permissions()
            ));
        }
        let rated = !key.rates.named.is_empty() || key.rates.tokens.is_some();
        reached.rated_grants += u32::from(rated);
        reached.pool_grants += u32::from(on_pool);
        reached.previous_grants += u32::from(matches!(which, Secret::Previous(_)));
        let refilled = key.balance.is_some_and(|i| balances[i].refills > 0);
        reached.refilled_grants += u32::from(refilled);
        let tokens_before = key.rates.tokens;
        let key = &mut keys[k];
        key.rates.take(now_ns, want_cost);
        let state = grant.rate_limit();
        let want_state = crate::verify::RateState {
            requests_remaining: key.rates.named.iter().map(|w| w.remaining(now_ns)).min(),
            tokens_remaining: key.rates.tokens.map(|w| w.remaining(now_ns)),
            tier: 0,
            tier_multiplier_pct: 100,
        };
        if state != want_state {
            return Err(format!(
                "grant of key {k} has rate state {state:?}, reference {want_state:?} \
                 (limits {:?}) ({context})",
                key.rates
            ));
        }
        let price = rule.map_or(0, |r| r.price_micros);
        let after = left.map(|c| c - want_cost.min(c));
        if grant.remaining_credits() != after {
            return Err(format!(
                "grant of {want_cost} from {left:?} credits says {:?} are left ({context})",
                grant.remaining_credits()
            ));
        }
        let actual = match settle {
            0 => {
                // Dropped: the credits come back, the tokens stay taken.
                drop(grant);
                continue;
            }
            1 => want_cost,
            2 => want_cost.saturating_sub(extra),
            _ => want_cost.saturating_add(extra),
        };
        let receipt = grant.commit(actual);
        // Over the reservation, what the balance has left covers the rest, down to zero.
        let charged = match after {
            Some(after) if actual > want_cost => want_cost + (actual - want_cost).min(after),
            _ => actual,
        };
        let credits = left.map(|c| c - charged.min(c));
        let stats = receipt.token_stats;
        let pricing = receipt.pricing;
        if stats.used != actual
            || stats.charged != charged
            || stats.uncovered != actual - charged
            || stats.remaining_credits != credits
            || pricing.units != charged
            || pricing.unit_price_micros != price
            || pricing.total_micros != charged.saturating_mul(price)
        {
            return Err(format!(
                "commit({actual}) of {want_cost} reserved from {left:?} credits at {price}: \
                 {receipt:?}, reference charges {charged}, leaves {credits:?} ({context})",
            ));
        }
        if let (Some(i), Some(credits)) = (key.balance, credits) {
            balances[i].left = credits;
        }
        // The token window counts what the request used, not what it reserved.
        if let (Some(window), Some(before)) = (key.rates.tokens.as_mut(), tokens_before) {
            *window = before;
            window.take(now_ns, actual);
        }
    }
    Ok(reached)
}

/// Which of a key's secrets a request presented.
#[derive(Debug, Clone, Copy)]
enum Secret {
    Current,
    /// The one the last roll replaced, in its grace until this time (ms).
    Previous(u64),
    /// One replaced by an earlier roll.
    Retired,
}

/// A rule from the input.
fn rule(b: &mut Bytes<'_>) -> RouteRule {
    let mut rule = RouteRule::new(format!("/{}", b.path(4)));
    let shape = b.byte();
    if shape & 1 != 0 {
        rule = rule.permission(SCOPES[b.below(SCOPES.len() as u64) as usize]);
    }
    if shape & 2 != 0 {
        rule = rule.entitlement(ENTITLEMENTS[b.below(2) as usize]);
    }
    if shape & 4 != 0 {
        rule = rule.cost(b.cost());
    }
    if shape & 8 != 0 {
        rule = rule.price_micros(match b.below(4) {
            0 => u64::MAX,
            n => n * 250,
        });
    }
    rule
}

/// Sets a rule from the input (a prefix `set` refuses is left out of the reference too).
fn set_rule(
    ledger: &Ledger,
    rules: &mut BTreeMap<String, RouteRule>,
    b: &mut Bytes<'_>,
) -> Result<(), String> {
    let rule = rule(b);
    match ledger.routes().set(rule.clone()) {
        Ok(_) => {
            rules.insert(rule.prefix.clone(), rule);
        }
        Err(crate::error::Error::InvalidInput { .. }) => {}
        Err(e) => return Err(format!("routes().set({rule:?}): {e}")),
    }
    Ok(())
}

/// The pool from the input's next byte (its balance is the first): its public id.
fn create_pool(
    ledger: &Ledger,
    account: &str,
    features: u8,
    b: &mut Bytes<'_>,
    balances: &mut Vec<Balance>,
) -> Result<String, String> {
    let shape = b.byte();
    let credits = POOL_CREDITS[usize::from(shape & 3)];
    let refill = (features & REFILL != 0 && shape & 4 != 0).then(|| {
        let interval = match shape & 8 {
            0 => RefillInterval::Daily,
            _ => RefillInterval::Monthly,
        };
        (REFILLS[usize::from((shape >> 4) & 3)], interval)
    });
    let mut new = NewPool::new(account, "shared").credits(credits);
    if let Some((amount, interval)) = refill {
        new = new.refill(amount, interval);
    }
    let pool = ledger
        .credits()
        .create_pool(new)
        .map_err(|e| format!("create pool: {e}"))?;
    balances.push(Balance::new(credits, refill, START.0));
    Ok(pool.id.to_string())
}

/// Rolls key `key` with `grace` seconds at `now` (ms).
fn roll(ledger: &Ledger, key: &mut Key, grace: u64, now: u64) -> Result<(), String> {
    let rolled = ledger
        .keys()
        .roll(&key.id, grace)
        .map_err(|e| format!("roll({}, {grace}): {e}", key.id))?;
    if rolled.info.id.as_str() != key.id {
        return Err(format!("rolled {} into {}", key.id, rolled.info.id));
    }
    let replaced = std::mem::replace(&mut key.plaintext, rolled.plaintext.expose().to_owned());
    let earlier = key.previous.replace((replaced, now + grace * 1_000));
    key.retired.extend(earlier.map(|(secret, _)| secret));
    Ok(())
}

/// What a key's creation reads besides the input.
struct NewKeyInput<'a> {
    account: &'a str,
    k: u8,
    features: u8,
    /// The pool's public id, if the account has one.
    pool: Option<&'a str>,
}

fn create_key(
    ledger: &Ledger,
    input: &NewKeyInput<'_>,
    b: &mut Bytes<'_>,
    balances: &mut Vec<Balance>,
) -> Result<Key, String> {
    let NewKeyInput {
        account,
        k,
        features,
        pool,
    } = *input;
    let shape = b.byte();
    let permissions: Vec<String> = (0..shape % 4)
        .map(|_| SCOPES[b.below(SCOPES.len() as u64) as usize].to_owned())
        .fold(Vec::new(), |mut v, s| {
            if !v.contains(&s) {
                v.push(s);
            }
            v
        });
    let mut ips = Vec::new();
    let mut written = Vec::new();
    for _ in 0..(shape >> 2) % 4 {
        let ip = b.ip();
        let bits = match ip {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        // Whole addresses, and ranges around the ones the requests use.
        let prefix = match b.below(4) {
            0 => bits,
            1 => bits - 4,
            2 => bits - 16,
            _ => b.below(u64::from(bits) + 1) as u8,
        };
        let net = IpNet::new(ip, prefix).map_err(|e| e.to_string())?;
        written.push(if prefix == bits && b.below(2) == 0 {
            ip.to_string()
        } else {
            net.to_string()
        });
        ips.push(net);
    }
    let mut credits = match (shape >> 4) % 4 {
        0 => None,
        n => Some(u64::from(n - 1) * 3),
    };
    // Key 2 is deleted; one in eight of the others disabled, one in eight expiring.
    let state = b.below(8);
    let deleted = k == 2;
    let expires = state == 1;
    let mut new = NewKey::new(account, format!("key {k}"))
        .permissions(permissions.iter().cloned())
        .ips(written.iter().cloned());
    // The pool, a refill, rate limits: read only for the features the input has.
    let mut balance = None;
    let mut refill = None;
    if features & (POOL | REFILL) != 0 {
        let extra = b.byte();
        match pool {
            Some(pool) if extra & 1 != 0 => {
                new = new.pool(pool);
                credits = None;
                balance = Some(0);
            }
            _ if features & REFILL != 0 && credits.is_some() && extra & 2 != 0 => {
                let interval = match extra & 4 {
                    0 => RefillInterval::Daily,
                    _ => RefillInterval::Monthly,
                };
                refill = Some((REFILLS[usize::from((extra >> 3) & 3)], interval));
            }
            _ => {}
        }
    }
    let mut rates = Rates::default();
    if features & RATES != 0 {
        let shape = b.byte();
        for name in NAMES.iter().take(usize::from(shape % 3)) {
            let limit = b.byte();
            let (per, window) = (
                LIMITS[usize::from(limit & 3)],
                WINDOWS[usize::from(limit >> 2) % 3],
            );
            new = new.rate_limit(*name, per, window);
            rates.named.push(Window::new(per, window));
        }
        if (shape / 3) % 2 == 1 {
            let limit = b.byte();
            let (tokens, window) = (
                TOKENS[usize::from(limit & 3)],
                WINDOWS[usize::from(limit >> 2) % 3],
            );
            new = new.token_window(tokens, window);
            rates.tokens = Some(Window::new(tokens, window));
        }
    }
    if let Some(c) = credits {
        new = new.credits(c);
        balance = Some(balances.len());
        balances.push(Balance::new(c, refill, START.0));
    }
    if let Some((amount, interval)) = refill {
        new = new.refill(amount, interval);
    }
    let expires_at = expires.then_some(START.0 + 3_600_000);
    if let Some(at) = expires_at {
        new = new.expires_at(Timestamp(at));
    }
    let created = ledger
        .keys()
        .create(new)
        .map_err(|e| format!("create key {k} with ips {written:?}: {e}"))?;
    let id = created.info.id.to_string();
    let disabled = state == 0 && !deleted;
    if deleted {
        ledger
            .keys()
            .delete(&id)
            .map_err(|e| format!("delete: {e}"))?;
    }
    if disabled {
        ledger
            .keys()
            .disable(&id)
            .map_err(|e| format!("disable: {e}"))?;
    }
    Ok(Key {
        id,
        plaintext: created.plaintext.expose().to_owned(),
        previous: None,
        retired: Vec::new(),
        permissions,
        ips,
        balance,
        rates,
        disabled,
        expires_at,
        deleted,
    })
}

/// The `request` fuzz target (see the module docs).
pub fn request(data: &[u8]) {
    if let Err(violation) = run(data) {
        panic!("request property failed: {violation}");
    }
}

/// Seeds: inputs from a fixed generator, long enough for several requests each; then one
/// written for each feature (see `Script`), the first byte of each naming its features.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<Vec<u8>> = (0..6)
        .map(|seed| super::ops::workload(1_000 + seed))
        .collect();
    seeds.extend([
        rate_limit_seed(),
        token_window_seed(),
        pool_seed(false),
        refill_seed(),
        roll_seed(),
        pool_seed(true),
    ]);
    seeds
}

/// Writes an input in the order [`run`] reads it: an account that is active and holds both
/// entitlements, no route rules, keys with no permissions and no allowlist, and requests
/// for `/` with the key in `x-api-key` and no client IP.
struct Script {
    bytes: Vec<u8>,
    features: u8,
}

/// A key for [`Script::key`].
#[derive(Default, Clone, Copy)]
struct KeySpec {
    /// 0: unmetered, else `(credits - 1) * 3` credits (so 1: none, 2: 3, 3: 6).
    credits: u8,
    /// Spends from the pool.
    pool: bool,
    /// A refill: index into `REFILLS`, monthly.
    refill: Option<(u8, bool)>,
    /// Named limits: index into `LIMITS` and into `WINDOWS`.
    named: [Option<(u8, u8)>; 2],
    /// A token window: index into `TOKENS` and into `WINDOWS`.
    tokens: Option<(u8, u8)>,
}

/// A request for [`Script::request`].
#[derive(Clone, Copy)]
struct Req {
    /// Index into `CLOCK_STEPS`, taken before the request.
    clock: u8,
    /// Roll a key (0 or 1) with a grace (index into `GRACES`) before the request.
    roll: Option<(u8, u8)>,
    key: u8,
    /// 0: the previous secret, 1: the last retired one, 2: the current one.
    secret: u8,
    /// Index into `Bytes::cost`'s choices: 0 → 0, 1 → `u64::MAX`, 2 → 2⁴⁰, n → n - 2.
    cost: u8,
    /// 0: dropped; 1: committed as reserved; 2: `extra` less; 3: `extra` more.
    settle: u8,
    extra: u8,
}

impl Req {
    /// Key `key`'s current secret, a cost of 1, committed as reserved.
    fn of(key: u8) -> Self {
        Req {
            clock: 0,
            roll: None,
            key,
            secret: 2,
            cost: 3,
            settle: 1,
            extra: 0,
        }
    }
}

impl Script {
    fn new(features: u8) -> Self {
        // Active (5 is past the statuses: active), both entitlements.
        Script {
            bytes: vec![features, 5, 3],
            features,
        }
    }

    /// The pool: starting credits (index into `POOL_CREDITS`) and a refill.
    fn pool(mut self, credits: u8, refill: Option<(u8, bool)>) -> Self {
        let refill = refill.map_or(0, |(amount, monthly)| {
            4 | (u8::from(monthly) << 3) | (amount << 4)
        });
        self.bytes.push(credits | refill);
        self
    }

    /// No route rules, then the three keys (the third is deleted), not past expiries.
    fn keys(mut self, keys: [KeySpec; 3]) -> Self {
        self.bytes.push(0);
        for key in keys {
            // No permissions, no allowlist; state 2: neither disabled nor expiring.
            self.bytes.extend([key.credits << 4, 2]);
            if self.features & (POOL | REFILL) != 0 {
                let refill = key.refill.map_or(0, |(amount, monthly)| {
                    2 | (u8::from(monthly) << 2) | (amount << 3)
                });
                self.bytes.push(u8::from(key.pool) | refill);
            }
            if self.features & RATES != 0 {
                let named = key.named.iter().flatten().count() as u8;
                let tokens = u8::from(key.tokens.is_some());
                self.bytes.push(named + 3 * tokens);
                for (limit, window) in key.named.iter().flatten().chain(&key.tokens) {
                    self.bytes.push(limit | (window << 2));
                }
            }
        }
        self.bytes.push(1);
        self
    }

    fn request(mut self, r: Req) -> Self {
        self.bytes.push(1); // no rule set
        if self.features & CLOCK != 0 {
            self.bytes.push(r.clock);
        }
        if self.features & ROLL != 0 {
            match r.roll {
                Some((key, grace)) => self.bytes.extend([0, key, grace]),
                None => self.bytes.push(1),
            }
        }
        self.bytes.extend([2, r.key]); // x-api-key
        if self.features & ROLL != 0 {
            self.bytes.push(r.secret);
        }
        // No raw text; route `/`; no client IP; the cost; how it settles.
        self.bytes
            .extend([0, 3, 0, 0, 1, r.cost, r.settle, r.extra]);
        self
    }

    fn requests(self, requests: impl IntoIterator<Item = Req>) -> Self {
        requests.into_iter().fold(self, Script::request)
    }
}

/// Key 0 allows 2 requests a second and 3 every 2 seconds: a burst of two, refused (the
/// slowest limit's wait), one more 500 ms on, refused by the second limit, then admitted
/// again; key 1, 1 a minute on 3 credits, refused for its rate before its credits.
fn rate_limit_seed() -> Vec<u8> {
    let key0 = KeySpec {
        named: [Some((1, 0)), Some((2, 1))],
        ..KeySpec::default()
    };
    let key1 = KeySpec {
        credits: 2,
        named: [Some((0, 2)), None],
        ..KeySpec::default()
    };
    let at = |clock| Req {
        clock,
        ..Req::of(0)
    };
    Script::new(RATES | CLOCK)
        .keys([key0, key1, KeySpec::default()])
        .requests([Req::of(0), Req::of(0), Req::of(0), at(4), at(5), at(6)])
        .requests([at(6), Req::of(1), Req::of(1), at(7), Req::of(1)])
        .bytes
}

/// Key 0 has a token window of 10 a second: 5 tokens, 5 more committed at 2, then 4 are
/// refused, 3 are let through and committed at 6 (the window charged past its end), a
/// grant of 1 dropped keeps its token; a cost of 2⁴⁰ on key 1 (4 tokens a minute, and 5
/// requests a second) is let through on the empty window and holds the next ones back, a
/// peek is not, and its commit of 2 is charged; 32 days on it still waits.
fn token_window_seed() -> Vec<u8> {
    let key0 = KeySpec {
        tokens: Some((2, 0)),
        ..KeySpec::default()
    };
    let key1 = KeySpec {
        tokens: Some((1, 2)),
        named: [Some((3, 0)), None],
        ..KeySpec::default()
    };
    let cost = |key, cost, settle, extra| Req {
        cost,
        settle,
        extra,
        ..Req::of(key)
    };
    Script::new(RATES | CLOCK)
        .keys([key0, key1, KeySpec::default()])
        .requests([cost(0, 7, 1, 0), cost(0, 7, 2, 3), cost(0, 6, 1, 0)])
        .requests([cost(0, 5, 3, 3), cost(0, 3, 1, 0)])
        .requests([
            Req {
                clock: 5,
                ..cost(0, 3, 0, 0)
            },
            cost(0, 3, 1, 0),
        ])
        .requests([cost(1, 2, 2, 1), cost(1, 3, 1, 0), cost(1, 0, 3, 2)])
        .requests([
            Req {
                clock: 10,
                ..cost(1, 4, 1, 0)
            },
            cost(0, 4, 1, 0),
        ])
        .bytes
}

/// Keys 0 and 1 spend from a pool of 6: their grants draw it down together, a dropped
/// grant gives back to the pool, a commit over the reservation takes the rest, and the
/// empty pool refuses both; key 1 also has a named limit of 5 a second. `exact`: leased
/// exactly (refunds go through the writer, not into a lease in memory).
fn pool_seed(exact: bool) -> Vec<u8> {
    let on_pool = KeySpec {
        pool: true,
        ..KeySpec::default()
    };
    let key1 = KeySpec {
        named: [Some((3, 0)), None],
        ..on_pool
    };
    let cost = |key, cost, settle, extra| Req {
        cost,
        settle,
        extra,
        ..Req::of(key)
    };
    Script::new(POOL | RATES | if exact { EXACT } else { 0 })
        .pool(2, None)
        .keys([on_pool, key1, KeySpec::default()])
        .requests([cost(0, 4, 1, 0), cost(1, 5, 0, 0), cost(1, 4, 3, 2)])
        .requests([cost(0, 5, 2, 1), cost(1, 3, 1, 0), cost(0, 3, 1, 0)])
        .requests([cost(1, 3, 1, 0), cost(0, 0, 1, 0)])
        .bytes
}

/// Key 0 has 3 credits refilled to 2 daily, key 1 spends from a pool of 2⁴⁰ refilled to 5
/// monthly: key 0 spent out and refused, an hour on still refused, refilled after midnight,
/// and refilled again with a credit left, which the refill replaces (a cost of 3 is
/// refused); the pool, with most of its 2⁴⁰ still stored (a lease holds a small part),
/// replaced by 5 on the 1st, and again a month on.
fn refill_seed() -> Vec<u8> {
    let key0 = KeySpec {
        credits: 2,
        refill: Some((1, false)),
        ..KeySpec::default()
    };
    let key1 = KeySpec {
        pool: true,
        ..KeySpec::default()
    };
    let cost = |key, cost| Req {
        cost,
        ..Req::of(key)
    };
    let at = |clock, key, cost| Req {
        clock,
        cost,
        ..Req::of(key)
    };
    Script::new(POOL | REFILL | CLOCK)
        .pool(3, Some((2, true)))
        .keys([key0, key1, KeySpec::default()])
        .requests([cost(0, 5), cost(0, 3), cost(1, 3), at(8, 0, 3), at(9, 0, 3)])
        .requests([at(9, 0, 5), cost(0, 4), cost(0, 3)])
        .requests([at(10, 1, 6), cost(1, 5), at(10, 1, 7), cost(1, 3)])
        .bytes
}

/// Key 0 (2 requests a second) rolled with a second's grace: both secrets pass and share
/// the limit, the previous one stops a second later; rolled again with an hour's, the first
/// secret is no key at all; key 1 rolled with none.
fn roll_seed() -> Vec<u8> {
    let key0 = KeySpec {
        named: [Some((1, 0)), None],
        ..KeySpec::default()
    };
    let secret = |key, secret| Req {
        secret,
        ..Req::of(key)
    };
    let rolled = |key, grace, secret| Req {
        roll: Some((key, grace)),
        secret,
        ..Req::of(key)
    };
    Script::new(ROLL | CLOCK | RATES)
        .keys([key0, KeySpec::default(), KeySpec::default()])
        .requests([rolled(0, 1, 0), secret(0, 2), secret(0, 0)])
        .requests([
            Req {
                clock: 6,
                ..secret(0, 0)
            },
            secret(0, 2),
        ])
        .requests([rolled(0, 2, 0), secret(0, 1), secret(0, 2)])
        .requests([rolled(1, 0, 0), secret(1, 2)])
        .bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each written seed reaches what it was written for.
    #[test]
    fn each_seed_reaches_its_feature() {
        let reached = |name, seed: Vec<u8>| {
            run(&seed).unwrap_or_else(|e| panic!("the {name} seed failed: {e}"))
        };
        let r = reached("rate limit", rate_limit_seed());
        assert!(r.rate_limited >= 3 && r.rated_grants >= 4, "{r:?}");
        let r = reached("token window", token_window_seed());
        assert!(r.rate_limited >= 2 && r.rated_grants >= 5, "{r:?}");
        for (name, exact) in [("pool", false), ("exact pool", true)] {
            let r = reached(name, pool_seed(exact));
            assert!(r.pool_grants >= 4 && r.pool_exhausted >= 2, "{r:?}");
        }
        let r = reached("refill", refill_seed());
        assert!(r.refills >= 2 && r.refilled_grants >= 2, "{r:?}");
        let r = reached("roll", roll_seed());
        assert!(r.previous_grants >= 2 && r.dead_secrets >= 3, "{r:?}");
        assert_eq!(seeds(), seeds(), "the seeds are fixed");
    }

    /// An input of the forty-sixth session reads the same behind a 0 byte: no feature, no
    /// byte read for one.
    #[test]
    fn no_features_reads_as_before() {
        let mut old = super::super::ops::workload(1_000);
        old.insert(0, 0);
        assert_eq!(run(&old).expect("passes"), Reached::default());
    }
}
