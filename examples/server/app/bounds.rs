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
//! - a key may change or delete only keys no broader than itself (so not the admin key).

use std::net::IpAddr;

use axum::http::StatusCode;
use ipnet::IpNet;
use keyledger::{KeyInfo, Ledger, NewKey};

use super::auth::Caller;

/// A refusal: status, code, message.
pub type Refused = (StatusCode, &'static str, String);

/// The caller's own settings, or no bounds at all (auth off: every request acts as `*`).
pub struct Bounds {
    caller: Option<(KeyInfo, Vec<IpNet>)>,
}

fn forbidden(message: impl Into<String>) -> Refused {
    (StatusCode::FORBIDDEN, "forbidden", message.into())
}

/// An allowlist entry as the library takes it: an address or a CIDR range.
fn range(text: &str) -> Result<IpNet, Refused> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            let message = format!("`{text}` is not an IP address or CIDR range");
            (StatusCode::BAD_REQUEST, "invalid_request", message)
        })
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
                    "`{text}` is outside this key's own IP allowlist"
                )));
            }
        }
        Ok(asked)
    }

    /// Refuses to touch a key broader than the caller: one with a permission the caller
    /// lacks, or, when the caller has an IP allowlist, one usable from outside it.
    pub fn covers(&self, target: &KeyInfo) -> Result<(), Refused> {
        let Some((info, own)) = &self.caller else {
            return Ok(());
        };
        let narrower_ips = own.is_empty()
            || (!target.ips.is_empty()
                && target.ips.iter().all(|t| {
                    t.parse::<IpNet>()
                        .is_ok_and(|t| own.iter().any(|r| r.contains(&t)))
                }));
        let narrower = narrower_ips
            && target
                .permissions
                .iter()
                .all(|p| keyledger::permits(&info.permissions, p));
        match narrower {
            true => Ok(()),
            false => Err(forbidden(
                "this key cannot change a key broader than itself",
            )),
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
