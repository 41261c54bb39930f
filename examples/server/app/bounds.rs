//! What a calling key may hand on: a key it creates or changes is never broader than itself.
//!
//! A key that may write (`manage`) could otherwise mint a key — or widen itself — past its
//! own permissions, IP allowlist, expiry, rate limits or credit budget. So:
//!
//! - permissions asked for must be ones the caller holds (`*` only from a `*` key);
//! - a caller with an IP allowlist hands it on: ranges asked for must lie inside its own,
//!   and none asked for means its own;
//! - a new key expires no later than the caller, and gets the caller's rate limits (its own
//!   counters: each key is limited on its own);
//! - a new key spends from the caller's pool; a caller with a balance of its own cannot mint
//!   keys (a key's balance is not shared), and an unmetered caller's keys spend from the
//!   account's pool when it has one;
//! - a test key mints test keys (and no tokens, which are always live);
//! - a key may change or delete only keys no broader than itself: no permission it lacks,
//!   no use from outside its allowlist, no later expiry, none of its rate limits missing or
//!   looser, the same credit budget (its pool, or itself), and test keys only for a test
//!   key. The admin key is no broader than a `*` key on the account's pool without
//!   further bounds, so such a key may change it (and the admin key may change that one).

use std::net::IpAddr;

use axum::http::StatusCode;
use ipnet::IpNet;
use keyledger::{KeyClass, KeyInfo, Ledger, NewKey};

use super::auth::Caller;
use super::{READ_ONLY, WRITE_SCOPE};

/// A refusal: status, code, message.
pub type Refused = (StatusCode, &'static str, String);

/// The caller's own settings, or no bounds at all (auth off: every request acts as `*`).
pub struct Bounds {
    caller: Option<(KeyInfo, Vec<IpNet>)>,
}

fn unauthorized(code: &'static str, message: &str) -> Refused {
    (StatusCode::UNAUTHORIZED, code, message.into())
}

fn forbidden(message: impl Into<String>) -> Refused {
    (StatusCode::FORBIDDEN, "forbidden", message.into())
}

/// An allowlist entry as the library stores it: trimmed, an address or a CIDR range, an
/// IPv4-mapped IPv6 range (`::ffff:a.b.c.d/n`, n ≥ 96) as the IPv4 range it maps, host bits
/// cleared. Checked in any other form, `::ffff:0.0.0.0/96` would pass as inside `::/0` and
/// be stored as `0.0.0.0/0`.
fn range(text: &str) -> Result<IpNet, Refused> {
    let text = text.trim();
    let net = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            let message = format!(
                "{} is not an IP address or CIDR range",
                super::envelope::shown(text)
            );
            (StatusCode::BAD_REQUEST, "invalid_request", message)
        })?;
    let mapped = match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => v6
            .addr()
            .to_ipv4_mapped()
            .and_then(|v4| ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).ok())
            .map(IpNet::V4),
        _ => None,
    };
    Ok(mapped.unwrap_or(net).trunc())
}

impl Bounds {
    /// The bounds of `caller` (`None`: unbounded, for auth off).
    pub fn of(ledger: &Ledger, caller: Option<&Caller>) -> keyledger::Result<Bounds> {
        let Some(caller) = caller else {
            return Ok(Bounds { caller: None });
        };
        let id = caller.key_id.as_str();
        let info = match id.starts_with("tok_") {
            true => ledger.tokens().get(id)?,
            false => ledger.keys().get(id)?,
        };
        // Stored ranges are canonical CIDR, as `KeyInfo` shows them.
        let ranges = info.ips.iter().filter_map(|r| r.parse().ok()).collect();
        Ok(Bounds {
            caller: Some((info, ranges)),
        })
    }

    /// Refuses a caller changed since its request was verified (the body may take up to the
    /// request deadline to arrive): disabled, or no longer allowed to write. Other changes
    /// (expiry, the account's status, a rolled secret's grace) apply from its next request.
    pub fn in_force(&self) -> Result<(), Refused> {
        match &self.caller {
            Some((info, _)) if info.disabled_at.is_some() => {
                Err(unauthorized("disabled", "this key has been disabled"))
            }
            Some((info, _)) if !keyledger::permits(&info.permissions, WRITE_SCOPE) => {
                Err(forbidden(READ_ONLY))
            }
            _ => Ok(()),
        }
    }

    /// The refusal for a caller deleted since its request was verified.
    pub fn deleted() -> Refused {
        unauthorized("not_found", "this key has been deleted")
    }

    /// Refuses a test key minting a token (tokens have no test class: it would be live).
    pub fn may_mint_tokens(&self) -> Result<(), Refused> {
        match &self.caller {
            Some((info, _)) if info.class == KeyClass::Test => Err(forbidden(
                "a test key cannot create tokens (a token is always live)",
            )),
            _ => Ok(()),
        }
    }

    /// Refuses permissions the caller does not hold.
    pub fn permissions(&self, asked: &[String]) -> Result<(), Refused> {
        let Some((info, _)) = &self.caller else {
            return Ok(());
        };
        match asked
            .iter()
            .find(|p| !keyledger::permits(&info.permissions, p))
        {
            Some(p) => Err(forbidden(format!(
                "this key cannot hand on a permission it lacks (`{p}`)"
            ))),
            None => Ok(()),
        }
    }

    /// The allowlist a key gets when `asked` for: as asked when the caller has none;
    /// otherwise the caller's own when nothing is asked, and only ranges inside it.
    pub fn ips(&self, asked: Vec<String>) -> Result<Vec<String>, Refused> {
        let Some((info, own)) = self.caller.as_ref().filter(|(_, own)| !own.is_empty()) else {
            return Ok(asked);
        };
        if asked.is_empty() {
            return Ok(info.ips.clone());
        }
        for text in &asked {
            let asked = range(text)?;
            if !own.iter().any(|r| r.contains(&asked)) {
                return Err(forbidden(format!(
                    "`{asked}` is outside this key's own IP allowlist"
                )));
            }
        }
        Ok(asked)
    }

    /// Refuses to touch a key broader than the caller: one with a permission it lacks, one
    /// usable from outside its IP allowlist, expiring later, without one of its rate limits
    /// (or with a looser one: a higher limit or a shorter window), or spending from another
    /// credit budget than its pool (a caller with a balance of its own: only itself).
    pub fn covers(&self, target: &KeyInfo) -> Result<(), Refused> {
        let Some((info, own)) = &self.caller else {
            return Ok(());
        };
        let broader = |why: String| {
            Err(forbidden(format!(
                "this key cannot change a key broader than itself: {why}"
            )))
        };
        if info.class == KeyClass::Test && target.class != KeyClass::Test {
            return broader("a test key changes test keys only".into());
        }
        let permits = |p: &&String| keyledger::permits(&info.permissions, p);
        if let Some(p) = target.permissions.iter().find(|p| !permits(p)) {
            return broader(format!("that key has `{p}`"));
        }
        let inside = |t: &String| {
            t.parse::<IpNet>()
                .is_ok_and(|t| own.iter().any(|r| r.contains(&t)))
        };
        if !own.is_empty() && (target.ips.is_empty() || !target.ips.iter().all(inside)) {
            return broader("that key can be used from outside this key's IP allowlist".into());
        }
        if let Some(own_expiry) = info.expires_at
            && target.expires_at.is_none_or(|at| at > own_expiry)
        {
            return broader("that key expires later".into());
        }
        for limit in &info.limits.rate_limits {
            let as_tight = |t: &&keyledger::RateLimit| {
                t.name == limit.name && t.limit <= limit.limit && t.window_secs >= limit.window_secs
            };
            if !target.limits.rate_limits.iter().any(|t| as_tight(&t)) {
                return broader(format!(
                    "that key lacks or loosens rate limit `{}`",
                    limit.name
                ));
            }
        }
        if let Some(own) = info.limits.token_window {
            let as_tight = target
                .limits
                .token_window
                .is_some_and(|t| t.tokens <= own.tokens && t.window_secs >= own.window_secs);
            if !as_tight {
                return broader("that key lacks or loosens the token window".into());
            }
        }
        let same_budget = match (&info.pool, info.limits.credits) {
            (Some(pool), _) => target.pool.as_ref() == Some(pool),
            (None, Some(_)) => target.id == info.id,
            (None, None) => true,
        };
        match same_budget {
            true => Ok(()),
            false => broader("that key spends from another credit budget".into()),
        }
    }

    /// `new` with what the caller hands on: its expiry, rate limits and credit budget.
    /// `account_pool`: the account's pool, for an unmetered caller's keys.
    pub fn hand_on(&self, mut new: NewKey, account_pool: Option<&str>) -> Result<NewKey, Refused> {
        let Some((info, _)) = &self.caller else {
            return Ok(match account_pool {
                Some(pool) => new.pool(pool),
                None => new,
            });
        };
        if info.class == KeyClass::Test {
            new = new.test();
        }
        if let Some(at) = info.expires_at {
            new = new.expires_at(at);
        }
        for limit in &info.limits.rate_limits {
            new = new.rate_limit(limit.name.clone(), limit.limit, limit.window_secs);
        }
        if let Some(window) = info.limits.token_window {
            new = new.token_window(window.tokens, window.window_secs);
        }
        match (&info.pool, info.limits.credits) {
            (Some(pool), _) => Ok(new.pool(pool.as_str())),
            (None, Some(_)) => Err(forbidden(
                "a key with a credit balance of its own cannot mint keys (they could not \
                 share it): put the account's keys on a credit pool",
            )),
            (None, None) => Ok(match account_pool {
                Some(pool) => new.pool(pool),
                None => new,
            }),
        }
    }
}
