//! [`Denial`]: why a presented key may not make a request, with a stable code and the HTTP
//! status a server should answer with.

use std::fmt;
use std::time::Duration;

use crate::error::MalformedKey;

/// A refused request. `code()` is stable across releases; servers may match on it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Denial {
    /// The key is not in the key format (prefix, length, alphabet, checksum). 401.
    Malformed(MalformedKey),
    /// No such key (or its rolled secret's grace period is over). 401.
    NotFound,
    /// The key is disabled. 401.
    Disabled,
    /// The key has expired. 401.
    Expired,
    /// The key lacks the route's permission, or the route is no path (empty, or not
    /// starting with `/`). 403.
    Forbidden,
    /// The client IP is not in the key's allowlist. 403.
    IpNotAllowed,
    /// The owner's subscription is canceled or suspended (active, trialing and past due
    /// pass). 402.
    SubscriptionInactive,
    /// The owner's subscription lacks the route's entitlement. 403.
    NotEntitled,
    /// A rate limit is exhausted; retry after the given time. 429.
    RateLimited {
        /// When a retry may succeed: the wait for the key's next slot, in whole milliseconds
        /// rounded up, plus the clock's resolution (one kernel tick on the default
        /// [`CoarseClock`](crate::CoarseClock)), so that waiting exactly this long is enough.
        retry_after: Duration,
    },
    /// Not enough credits for the request's cost. 402.
    UsageExceeded,
    /// The request could not be decided now; it was not charged. 503. The store failed
    /// (an unreadable record or balance, a disk that failed), the ledger is closing or
    /// closed, or the credit writer could not be reached for a lease. Retrying later (or
    /// on a reopened ledger) may succeed.
    Unavailable,
}

impl Denial {
    /// The stable string code (`malformed`, `not_found`, …).
    pub fn code(&self) -> &'static str {
        match self {
            Denial::Malformed(_) => "malformed",
            Denial::NotFound => "not_found",
            Denial::Disabled => "disabled",
            Denial::Expired => "expired",
            Denial::Forbidden => "forbidden",
            Denial::IpNotAllowed => "ip_not_allowed",
            Denial::SubscriptionInactive => "subscription_inactive",
            Denial::NotEntitled => "not_entitled",
            Denial::RateLimited { .. } => "rate_limited",
            Denial::UsageExceeded => "usage_exceeded",
            Denial::Unavailable => "unavailable",
        }
    }

    /// The HTTP status a server should return.
    pub fn http_status(&self) -> u16 {
        match self {
            Denial::Malformed(_) | Denial::NotFound | Denial::Disabled | Denial::Expired => 401,
            Denial::Forbidden | Denial::IpNotAllowed | Denial::NotEntitled => 403,
            Denial::SubscriptionInactive | Denial::UsageExceeded => 402,
            Denial::RateLimited { .. } => 429,
            Denial::Unavailable => 503,
        }
    }

    /// For `rate_limited`: how long to wait before retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Denial::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::Malformed(why) => write!(f, "malformed: {why}"),
            Denial::RateLimited { retry_after } => {
                write!(
                    f,
                    "rate_limited: retry after {} ms",
                    retry_after.as_millis()
                )
            }
            other => f.write_str(other.code()),
        }
    }
}

impl std::error::Error for Denial {}
