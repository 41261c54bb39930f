//! The `request` fuzz target: the request side of [`Ledger::verify`] on a small in-memory
//! ledger — header text, route, client IP, cost — against a plain reference model.
//!
//! The input sets up one account (status, entitlements), up to 24 route rules (now and then
//! 70, past what the permission bitmask describes) over a small alphabet of prefixes, scopes
//! and entitlements, with costs and prices, and three keys (permissions with `*` and `scope:*`
//! wildcards, an IP allowlist of addresses and ranges, IPv4-mapped ones too, credits or
//! none, disabled, expired; the third deleted). Then up to 16 requests, each with
//! `Authorization` / `x-api-key` text (raw from the input, or one of the keys written in one
//! of several ways), a route, a client IP as text, a cost; a grant is committed (at, under or
//! over its reservation) or dropped. Between requests a route rule may be set, which publishes a new route table.
//!
//! Properties: nothing panics; the headers give the key the reference reads from them; a key
//! that is none of the three is `malformed` or `not_found`; for one of them the outcome is the
//! reference's, denial code for denial code, through DESIGN §4's chain (state, route
//! permission by longest prefix, allowlist, subscription and entitlement, credits); a
//! grant names its key, its cost, its permissions and the credits left, and its receipt
//! charges and prices what the reference does; `unavailable` never happens on this healthy
//! ledger.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use crate::accounts::NewAccount;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::keyfmt::Presented;
use crate::keys::NewKey;
use crate::ledger::Ledger;
use crate::record::{RouteRule, SubscriptionStatus};
use crate::secret::MasterKey;
use crate::verify::Request;

const START: Timestamp = Timestamp(1_750_000_000_000);
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
    permissions: Vec<String>,
    /// The allowlist as written (ranges, not truncated).
    ips: Vec<IpNet>,
    /// Credits left; `None`: unmetered.
    credits: Option<u64>,
    disabled: bool,
    expires_at: Option<u64>,
    /// Deleted right after its creation.
    deleted: bool,
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

/// Runs one input (see the module docs); `Err` names a property that failed.
fn run(data: &[u8]) -> Result<(), String> {
    let mut b = Bytes { data, pos: 0 };
    let clock = ManualClock::new(START);
    let config = Config::builder()
        .master_key(MasterKey::from_bytes(&[7u8; 32]).expect("32 bytes"))
        .clock(clock.clone())
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
        keys.push(create_key(&ledger, &account, k, &mut b)?);
    }
    // Now and then past every expiry.
    let advanced = b.below(4) == 0;
    if advanced {
        clock.advance_secs(7_200);
    }
    let now = START.0 + if advanced { 7_200_000 } else { 0 };
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
        // Headers.
        let mode = b.below(8);
        let i = b.below(3) as usize;
        let key = keys[i].plaintext.clone();
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
            "auth {auth:?}, x-api-key {x_api_key:?}, route {route:?}, ip {ip_text:?}, cost {cost:?}"
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
        let Some(k) = keys.iter().position(|k| k.plaintext == presented.expose()) else {
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
        let expected: Result<(), &str> = if key.deleted {
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
        } else if want_cost > 0 && key.credits.is_some_and(|c| c < want_cost) {
            Err("usage_exceeded")
        } else {
            Ok(())
        };
        let grant = match (outcome, expected) {
            (Err(d), Err(code)) if d.code() == code => continue,
            (Ok(grant), Ok(())) => grant,
            (got, want) => {
                return Err(format!(
                    "key {k} ({:?}, ips {:?}, credits {:?}, disabled {}, expires {:?}): \
                     verify gave {:?}, reference {want:?}; rule {rule:?}; account {status:?} \
                     {entitlements:?} ({context})",
                    key.permissions,
                    key.ips,
                    key.credits,
                    key.disabled,
                    key.expires_at,
                    got.map(|g| g.reserved()).map_err(|d| d.code()),
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
        let price = rule.map_or(0, |r| r.price_micros);
        let left = key.credits.map(|c| c - want_cost.min(c));
        if grant.remaining_credits() != left {
            return Err(format!(
                "grant of {want_cost} from {:?} credits says {:?} are left ({context})",
                key.credits,
                grant.remaining_credits()
            ));
        }
        let actual = match settle {
            0 => {
                drop(grant);
                continue;
            }
            1 => want_cost,
            2 => want_cost.saturating_sub(extra),
            _ => want_cost.saturating_add(extra),
        };
        let receipt = grant.commit(actual);
        // Over the reservation, what the balance has left covers the rest, down to zero.
        let charged = match left {
            Some(left) if actual > want_cost => want_cost + (actual - want_cost).min(left),
            _ => actual,
        };
        let credits = key.credits.map(|c| c - charged.min(c));
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
                "commit({actual}) of {want_cost} reserved from {:?} credits at {price}: \
                 {receipt:?}, reference charges {charged}, leaves {credits:?} ({context})",
                key.credits
            ));
        }
        keys[k].credits = credits;
    }
    Ok(())
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

fn create_key(ledger: &Ledger, account: &str, k: u8, b: &mut Bytes<'_>) -> Result<Key, String> {
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
    let credits = match (shape >> 4) % 4 {
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
    if let Some(c) = credits {
        new = new.credits(c);
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
        permissions,
        ips,
        credits,
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

/// Seeds: inputs from a fixed generator, long enough for several requests each.
pub fn seeds() -> Vec<Vec<u8>> {
    (0..6)
        .map(|seed| super::ops::workload(1_000 + seed))
        .collect()
}
