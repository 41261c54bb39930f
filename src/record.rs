//! The records stored in redb, and the validation every write goes through.
//!
//! These are the on-disk shapes. Public views ([`KeyInfo`](crate::KeyInfo),
//! [`Account`](crate::Account)…) are built from them and never expose internal ids or hashes.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::codec::Record;
use crate::error::Error;
use crate::hashing::{HashScheme, KeyHash};
use crate::keyfmt::KeyClass;

/// Subscription state of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionStatus {
    /// Paid and current.
    Active,
    /// In a trial period.
    Trialing,
    /// Payment failed; still usable while the host decides.
    PastDue,
    /// Ended by the customer.
    Canceled,
    /// Stopped by the operator.
    Suspended,
}

impl SubscriptionStatus {
    /// Every status, in declaration order.
    pub const ALL: [SubscriptionStatus; 5] = [
        SubscriptionStatus::Active,
        SubscriptionStatus::Trialing,
        SubscriptionStatus::PastDue,
        SubscriptionStatus::Canceled,
        SubscriptionStatus::Suspended,
    ];

    /// The snake_case name (`past_due`).
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriptionStatus::Active => "active",
            SubscriptionStatus::Trialing => "trialing",
            SubscriptionStatus::PastDue => "past_due",
            SubscriptionStatus::Canceled => "canceled",
            SubscriptionStatus::Suspended => "suspended",
        }
    }
}

impl std::str::FromStr for SubscriptionStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        SubscriptionStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "status",
                    "expected active, trialing, past_due, canceled or suspended",
                )
            })
    }
}

/// A stored account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AccountRecord {
    pub name: String,
    pub status: SubscriptionStatus,
    pub entitlements: BTreeSet<String>,
    pub created_at: Timestamp,
    pub created_by: String,
    pub updated_at: Timestamp,
    pub updated_by: String,
}

impl Record for AccountRecord {
    const NAME: &'static str = "account";
    const VERSION: u8 = 1;
}

/// How often a refill replaces the balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefillInterval {
    /// Every day at 00:00 UTC.
    Daily,
    /// On the first of every month, 00:00 UTC.
    Monthly,
}

/// A refill: the balance is *replaced* by `amount` each interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Refill {
    /// The balance after each refill.
    pub amount: u64,
    /// How often.
    pub interval: RefillInterval,
}

/// A named rate limit: at most `limit` requests per `window_secs`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RateLimit {
    /// Name (`requests`, `burst`…), unique per key.
    pub name: String,
    /// Requests allowed per window.
    pub limit: u64,
    /// Window length in seconds.
    pub window_secs: u64,
}

/// A token window: at most `tokens` of cost per `window_secs`. A request costing more than
/// the whole window is admitted once the window is empty, and the key's next requests wait
/// until its excess is paid off at the window's rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TokenWindow {
    /// Tokens allowed per window.
    pub tokens: u64,
    /// Window length in seconds.
    pub window_secs: u64,
}

/// Spending and rate limits of a key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Starting credits; `None` means unmetered.
    pub credits: Option<u64>,
    /// Periodic refill of the balance.
    pub refill: Option<Refill>,
    /// Named request-rate limits.
    pub rate_limits: Vec<RateLimit>,
    /// Token window.
    pub token_window: Option<TokenWindow>,
    /// Emit a low-balance event when the credits left fall to or below this.
    pub low_balance_threshold: Option<u64>,
}

impl Limits {
    /// Whether a named rate limit or a token window applies.
    pub(crate) fn rate_limited(&self) -> bool {
        !self.rate_limits.is_empty() || self.token_window.is_some()
    }

    /// Whether `other` configures the same rate limits: the same named limits (a name
    /// decides which rate a spend tier sets), in any order, and token window.
    pub(crate) fn same_rates(&self, other: &Limits) -> bool {
        fn by_name(limits: &Limits) -> Vec<&RateLimit> {
            let mut named: Vec<&RateLimit> = limits.rate_limits.iter().collect();
            named.sort_by(|a, b| a.name.cmp(&b.name));
            named
        }
        by_name(self) == by_name(other) && self.token_window == other.token_window
    }
}

/// Whether a record is an API key or an internal token (with its `type`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// An API key handed to a customer.
    Api,
    /// An internal token with a required type (`service`, `webhook`…).
    Token {
        /// The token's type.
        token_type: String,
    },
}

/// A secret that was rolled: it keeps working until `valid_until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RolledSecret {
    pub key_hash: KeyHash,
    pub scheme: HashScheme,
    pub key_prefix: String,
    pub key_suffix: String,
    pub valid_until: Timestamp,
}

/// A stored key or token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct KeyRecord {
    pub kind: KeyKind,
    pub class: KeyClass,
    pub owner: u64,
    pub name: String,
    pub key_prefix: String,
    pub key_suffix: String,
    pub key_hash: KeyHash,
    pub scheme: HashScheme,
    pub permissions: Vec<String>,
    pub ips: Vec<IpNet>,
    pub limits: Limits,
    pub metadata: BTreeMap<String, String>,
    pub created_at: Timestamp,
    pub created_by: String,
    pub updated_at: Timestamp,
    pub updated_by: String,
    pub expires_at: Option<Timestamp>,
    pub disabled_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
    pub rolled: Option<RolledSecret>,
    /// Spend from this credit pool instead of an own balance.
    pub pool: Option<u64>,
}

impl KeyKind {
    /// The public-id kind of records of this kind (`key_…` or `tok_…`).
    pub(crate) fn id_kind(&self) -> crate::public_id::IdKind {
        match self {
            KeyKind::Api => crate::public_id::IdKind::Key,
            KeyKind::Token { .. } => crate::public_id::IdKind::Token,
        }
    }

    /// `api` for API keys, the token's type for tokens.
    pub fn label(&self) -> &str {
        match self {
            KeyKind::Api => "api",
            KeyKind::Token { token_type } => token_type,
        }
    }
}

impl Record for KeyRecord {
    const NAME: &'static str = "key";
    const VERSION: u8 = 1;
}

/// What the cache-miss path of `verify` needs of a key, stored under each of the key's live
/// hashes (format 2): one look-up by the presented key's hash finds everything its cache
/// entry is built from, where format 1 read the hash index and then the key record. Written
/// from the [`KeyRecord`] in the same transaction every time that is written (see
/// `keys::index`), so the two never disagree; `check` compares them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct VerifyRecord {
    /// The key's internal id.
    pub id: u64,
    /// The scheme this hash was made with.
    pub scheme: HashScheme,
    /// For a rolled secret: when it stops working (`None`: the current secret).
    pub valid_until: Option<Timestamp>,
    /// A token (`tok_…`) rather than an API key.
    pub token: bool,
    pub owner: u64,
    pub disabled: bool,
    pub expires_at: Option<Timestamp>,
    pub permissions: Vec<String>,
    pub ips: Vec<IpNet>,
    pub limits: Limits,
    pub pool: Option<u64>,
}

impl VerifyRecord {
    /// The record to store under each live hash of key `id`: the current secret's, then the
    /// rolled secret's while it has one.
    pub(crate) fn entries(id: u64, record: &KeyRecord) -> impl Iterator<Item = (KeyHash, Self)> {
        let current = (record.key_hash, record.scheme, None);
        let rolled = record
            .rolled
            .as_ref()
            .map(|old| (old.key_hash, old.scheme, Some(old.valid_until)));
        std::iter::once(current)
            .chain(rolled)
            .map(move |(hash, scheme, valid_until)| {
                let verify = VerifyRecord {
                    id,
                    scheme,
                    valid_until,
                    token: matches!(record.kind, KeyKind::Token { .. }),
                    owner: record.owner,
                    disabled: record.disabled_at.is_some(),
                    expires_at: record.expires_at,
                    permissions: record.permissions.clone(),
                    ips: record.ips.clone(),
                    limits: record.limits.clone(),
                    pool: record.pool,
                };
                (hash, verify)
            })
    }

    /// The public-id kind of the key (`key_…` or `tok_…`).
    pub(crate) fn id_kind(&self) -> crate::public_id::IdKind {
        match self.token {
            true => crate::public_id::IdKind::Token,
            false => crate::public_id::IdKind::Key,
        }
    }
}

impl Record for VerifyRecord {
    const NAME: &'static str = "key verify entry";
    const VERSION: u8 = 1;
}

/// The durable credit state of a key or a pool. Invariant:
/// `spent + lost_to_crash + leased + balance == granted`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CreditsRecord {
    /// Units available to lease.
    pub balance: u64,
    /// Units moved into in-memory leases and not yet returned or spent.
    pub leased: u64,
    /// Units spent in total.
    pub spent: u64,
    /// Units that were leased when the process died: counted as spent, never re-granted.
    pub lost_to_crash: u64,
    /// Units ever granted (initial credits, top-ups, refills), less units removed by a set.
    pub granted: u64,
    /// Start of the refill period the balance belongs to.
    pub refilled_at: Option<Timestamp>,
    /// The refill that replaces the balance each period (copied from the key or pool).
    pub refill: Option<Refill>,
}

impl CreditsRecord {
    /// Whether the conservation invariant holds.
    pub fn balanced(&self) -> bool {
        [self.spent, self.lost_to_crash, self.leased, self.balance]
            .iter()
            .try_fold(0u64, |acc, x| acc.checked_add(*x))
            == Some(self.granted)
    }
}

/// A shared credit pool several keys of one account draw on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PoolRecord {
    pub owner: u64,
    pub name: String,
    pub refill: Option<Refill>,
    pub low_balance_threshold: Option<u64>,
    pub created_at: Timestamp,
    pub created_by: String,
}

impl Record for PoolRecord {
    const NAME: &'static str = "credit pool";
    const VERSION: u8 = 1;
}

/// Usage of a key or account, flushed by the writer thread.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct UsageRecord {
    /// Last successful verify.
    pub last_used_at: Option<Timestamp>,
    /// Units charged in total (metered or not): drives spend tiers.
    pub spent: u64,
    /// Successful verifies.
    pub requests: u64,
}

impl Record for UsageRecord {
    const NAME: &'static str = "usage";
    const VERSION: u8 = 1;
}

impl Record for CreditsRecord {
    const NAME: &'static str = "credits";
    const VERSION: u8 = 1;
}

/// A route rule: requests under `prefix` need `permission` and `entitlement`, and cost `cost`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRule {
    /// Route prefix, e.g. `/api/v1/quickhits/`: a plain prefix of resolved paths (1–256
    /// printable ASCII characters from `/`; no `*`, `//`, `/./` or `/../`).
    pub prefix: String,
    /// Permission a key must hold (`None`: any valid key).
    pub permission: Option<String>,
    /// Entitlement the owner's account must hold (`None`: none needed).
    pub entitlement: Option<String>,
    /// Default cost of one request.
    pub cost: u64,
    /// Price of one unit in millionths of the currency unit (0: free), for receipts.
    pub price_micros: u64,
}

impl RouteRule {
    /// A rule for `prefix` needing no permission or entitlement, costing 1, free.
    pub fn new(prefix: impl Into<String>) -> Self {
        RouteRule {
            prefix: prefix.into(),
            permission: None,
            entitlement: None,
            cost: 1,
            price_micros: 0,
        }
    }

    /// Requires `permission` of the key.
    pub fn permission(mut self, permission: impl Into<String>) -> Self {
        self.permission = Some(permission.into());
        self
    }

    /// Requires `entitlement` of the owner's subscription.
    pub fn entitlement(mut self, entitlement: impl Into<String>) -> Self {
        self.entitlement = Some(entitlement.into());
        self
    }

    /// Default cost of one request.
    pub fn cost(mut self, cost: u64) -> Self {
        self.cost = cost;
        self
    }

    /// Price of one unit in millionths of the currency unit.
    pub fn price_micros(mut self, price: u64) -> Self {
        self.price_micros = price;
        self
    }
}

impl Record for RouteRule {
    const NAME: &'static str = "route rule";
    const VERSION: u8 = 1;
}

/// One audit event. Names and public ids only, never a secret or a field's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Position in the trail (1, 2, …).
    pub seq: u64,
    /// When it happened.
    pub at: Timestamp,
    /// Who did it (the actor passed to the handle, `system` by default).
    pub actor: String,
    /// What happened: `key.created`, `key.disabled`, `account.updated`…
    pub action: String,
    /// What it happened to: a public id (`key_…`, `acct_…`, `pool_…`); for route rules the
    /// prefix; for the vault `acct_…/secrets/NAME` or `acct_…/connectors/PROVIDER`; for a
    /// hash-scheme rotation the new scheme (`hmac-sha256/v2`).
    pub target: String,
    /// Names of the fields changed. A deletion whose record (or balance) did not decode
    /// (`connector.disconnected`, `secret.deleted`, `key.deleted`, `token.deleted`,
    /// `pool.deleted`) names `unreadable`, and so does a replacement of a row that did not
    /// decode (`connector.connected`, `secret.replaced`).
    pub fields: Vec<String>,
}

impl Record for AuditEvent {
    const NAME: &'static str = "audit event";
    const VERSION: u8 = 1;
}

/// An IPv4-mapped IPv6 range (`::ffff:a.b.c.d/n`, n ≥ 96) as the IPv4 range it maps: a client
/// is matched in canonical form (a dual-stack listener's `::ffff:a.b.c.d` as `a.b.c.d`), which
/// an IPv6 range never contains. Other ranges are returned as they are.
pub(crate) fn ipv4_if_mapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// Limits on user-supplied fields.
pub(crate) mod rules {
    use super::*;

    pub const NAME_MAX_CHARS: usize = 50;
    pub const SCOPE_MAX_CHARS: usize = 100;
    pub const MAX_PERMISSIONS: usize = 100;
    pub const MAX_ENTITLEMENTS: usize = 100;
    pub const MAX_IPS: usize = 100;
    pub const MAX_METADATA: usize = 32;
    pub const METADATA_KEY_MAX: usize = 64;
    pub const METADATA_VALUE_MAX: usize = 1024;
    pub const MAX_RATE_LIMITS: usize = 16;
    pub const ACTOR_MAX_CHARS: usize = 254;

    /// A display name: 1–50 characters, no control characters (see [`text`]), not blank.
    pub fn name(field: &'static str, name: &str) -> Result<String, Error> {
        text(field, name, NAME_MAX_CHARS)?;
        Ok(name.to_owned())
    }

    /// Not blank (nor only invisible characters), at most `max` characters, no control
    /// characters, line or paragraph separators or bidirectional controls.
    fn text(field: &'static str, text: &str, max: usize) -> Result<(), Error> {
        let chars = text.chars().count();
        // Blank also when what is left shows nothing (a zero-width space, a BOM, a filler).
        if text.chars().all(|c| c.is_whitespace() || invisible(c)) {
            return Err(Error::invalid(field, "must not be empty"));
        }
        if chars > max {
            return Err(Error::invalid(
                field,
                format!("must be at most {max} characters, got {chars}"),
            ));
        }
        if text.chars().any(hostile) {
            return Err(Error::invalid(
                field,
                "must not contain control, line-separator or bidirectional-control characters",
            ));
        }
        Ok(())
    }

    /// A control character, a line or paragraph separator, or a bidirectional control (an
    /// override, an isolate or a mark): each moves or reorders what follows it on a terminal
    /// as a line break would.
    pub(crate) fn hostile(c: char) -> bool {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
            // Bidirectional marks (ALM, LRM, RLM) reorder neutral characters as well.
            || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}')
    }

    /// A character that shows nothing by itself: Unicode's default-ignorable code points
    /// (zero-width characters, joiners, variation selectors, BOM, tags) and the Hangul
    /// fillers. Allowed among visible characters (emoji sequences use ZWJ and variation
    /// selectors), but a text of nothing else reads as blank.
    pub(crate) fn invisible(c: char) -> bool {
        matches!(c,
            '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}'
            | '\u{17B5}' | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
    }

    /// Who made a change (`by(…)`), as the audit trail and `created_by` / `updated_by` keep
    /// it: 1–254 characters (an e-mail address fits), no control characters, so that no
    /// actor can forge a line of the trail as an operator's terminal shows it.
    pub fn actor(actor: &str) -> Result<(), Error> {
        text("actor", actor, ACTOR_MAX_CHARS)
    }

    /// A refused value as an error message may show it: quoted when short, otherwise by its
    /// length only, so that no message repeats an API key (or any secret) given by mistake,
    /// whatever check refuses it first — the rule the CLI keeps for what is typed at it.
    fn shown(value: &str) -> String {
        match value.chars().count() {
            n @ 16.. => format!("a value of {n} characters"),
            _ => format!("`{}`", value.escape_default()),
        }
    }

    /// A scope like `quickhits:create`, `quickhits:*` or `*`.
    pub fn scope(field: &'static str, scope: &str) -> Result<String, Error> {
        let star_ok = match scope.find('*') {
            None => true,
            Some(i) => i == scope.len() - 1 && (i == 0 || scope.as_bytes()[i - 1] == b':'),
        };
        if !scope_chars(scope, b"*") || !star_ok {
            return Err(Error::invalid(
                field,
                format!(
                    "{} is not a scope: 1–{SCOPE_MAX_CHARS} of [A-Za-z0-9:_.-], \
                     optionally ending in `*` after a `:` (or just `*`)",
                    shown(scope)
                ),
            ));
        }
        Ok(scope.to_owned())
    }

    /// An entitlement: a scope naming one feature. Wildcards are for permissions; an
    /// entitlement compares by name, so a `*` in one would never match anything (and its
    /// refusal says so, rather than offering a scope's wildcard).
    pub fn entitlement(field: &'static str, name: &str) -> Result<String, Error> {
        if !scope_chars(name, b"") {
            return Err(Error::invalid(
                field,
                format!(
                    "{} is not an entitlement: 1–{SCOPE_MAX_CHARS} of [A-Za-z0-9:_.-], one \
                     feature's name (wildcards are for permissions)",
                    shown(name)
                ),
            ));
        }
        Ok(name.to_owned())
    }

    /// 1–[`SCOPE_MAX_CHARS`] bytes, each of a scope's alphabet or of `extra`.
    fn scope_chars(text: &str, extra: &[u8]) -> bool {
        (1..=SCOPE_MAX_CHARS).contains(&text.len())
            && text.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b':' | b'_' | b'-' | b'.')
                    || extra.contains(&b)
            })
    }

    /// A list of scopes, deduplicated, order kept.
    pub fn scopes<I, S>(items: I) -> Result<Vec<String>, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out: Vec<String> = Vec::new();
        for item in items {
            let scope = scope("permissions", item.as_ref())?;
            if !out.contains(&scope) {
                out.push(scope);
                // Checked here, not after the loop: `contains` is linear, so a huge list
                // would cost quadratic time before being refused.
                if out.len() > MAX_PERMISSIONS {
                    return Err(Error::invalid(
                        "permissions",
                        format!("at most {MAX_PERMISSIONS}"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// An allowlist of addresses and CIDR ranges; an address becomes a /32 or /128.
    pub fn ips<I, S>(items: I) -> Result<Vec<IpNet>, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = Vec::new();
        for item in items {
            let text = item.as_ref().trim();
            let net = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    Error::invalid(
                        "ips",
                        format!("{} is not an IP address or CIDR range", shown(text)),
                    )
                })?;
            let net = ipv4_if_mapped(net).trunc();
            if !out.contains(&net) {
                out.push(net);
                // In the loop for the same reason as in `scopes`.
                if out.len() > MAX_IPS {
                    return Err(Error::invalid("ips", format!("at most {MAX_IPS} entries")));
                }
            }
        }
        Ok(out)
    }

    /// Free-form metadata: at most 32 entries of short strings without control, line-separator
    /// or bidirectional-control characters (a CLI prints them as they are).
    pub fn metadata(map: &BTreeMap<String, String>) -> Result<(), Error> {
        if map.len() > MAX_METADATA {
            return Err(Error::invalid(
                "metadata",
                format!("at most {MAX_METADATA} entries"),
            ));
        }
        for (k, v) in map {
            if k.is_empty() || k.len() > METADATA_KEY_MAX || k.chars().any(hostile) {
                return Err(Error::invalid(
                    "metadata",
                    format!(
                        "keys must be 1–{METADATA_KEY_MAX} bytes without control, \
                         line-separator or bidirectional-control characters"
                    ),
                ));
            }
            if v.len() > METADATA_VALUE_MAX || v.chars().any(hostile) {
                return Err(Error::invalid(
                    "metadata",
                    format!(
                        "values must be at most {METADATA_VALUE_MAX} bytes without control, \
                         line-separator or bidirectional-control characters"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A rate window of at most [`MAX_WINDOW_SECS`](crate::limits::MAX_WINDOW_SECS).
    fn window(field: &'static str, secs: u64) -> Result<(), Error> {
        if secs > crate::limits::MAX_WINDOW_SECS {
            return Err(Error::invalid(
                field,
                format!(
                    "a window is at most {} seconds (100 years)",
                    crate::limits::MAX_WINDOW_SECS
                ),
            ));
        }
        Ok(())
    }

    /// Limits: positive windows of at most 100 years, unique rate-limit names.
    pub fn limits(limits: &Limits) -> Result<(), Error> {
        if limits.rate_limits.len() > MAX_RATE_LIMITS {
            return Err(Error::invalid(
                "rate_limits",
                format!("at most {MAX_RATE_LIMITS}"),
            ));
        }
        for (i, rl) in limits.rate_limits.iter().enumerate() {
            name("rate_limits.name", &rl.name)?;
            if rl.limit == 0 || rl.window_secs == 0 {
                return Err(Error::invalid(
                    "rate_limits",
                    "limit and window must be positive",
                ));
            }
            window("rate_limits", rl.window_secs)?;
            if let Some(j) = limits.rate_limits[..i]
                .iter()
                .position(|other| other.name == rl.name)
            {
                // Named by position, not echoed: an error may be logged.
                return Err(Error::invalid(
                    "rate_limits",
                    format!("limits {} and {} share a name", j + 1, i + 1),
                ));
            }
        }
        if let Some(tw) = limits.token_window {
            if tw.tokens == 0 || tw.window_secs == 0 {
                return Err(Error::invalid(
                    "token_window",
                    "tokens and window must be positive",
                ));
            }
            window("token_window", tw.window_secs)?;
        }
        if limits.refill.is_some() && limits.credits.is_none() {
            return Err(Error::invalid("refill", "a refill needs metered credits"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use proptest::prelude::*;

    fn arb_timestamp() -> impl Strategy<Value = Timestamp> {
        any::<u64>().prop_map(Timestamp)
    }

    fn arb_limits() -> impl Strategy<Value = Limits> {
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of((
                any::<u64>(),
                prop_oneof![Just(RefillInterval::Daily), Just(RefillInterval::Monthly)],
            )),
            proptest::collection::vec(("[a-z]{1,8}", any::<u64>(), any::<u64>()), 0..3),
            proptest::option::of((any::<u64>(), any::<u64>())),
        )
            .prop_map(|(credits, refill, rls, tw)| Limits {
                credits,
                refill: refill.map(|(amount, interval)| Refill { amount, interval }),
                rate_limits: rls
                    .into_iter()
                    .map(|(name, limit, window_secs)| RateLimit {
                        name,
                        limit,
                        window_secs,
                    })
                    .collect(),
                token_window: tw.map(|(tokens, window_secs)| TokenWindow {
                    tokens,
                    window_secs,
                }),
                low_balance_threshold: credits.map(|c| c / 10),
            })
    }

    prop_compose! {
        fn arb_key()(
            token in proptest::option::of("[a-z]{1,10}"),
            owner in any::<u64>(),
            name in "\\PC{1,50}",
            hash in any::<[u8; 32]>(),
            pepper in any::<u32>(),
            permissions in proptest::collection::vec("[a-z:*]{1,20}", 0..4),
            v4 in proptest::collection::vec((any::<[u8; 4]>(), 0u8..=32), 0..3),
            limits in arb_limits(),
            metadata in proptest::collection::btree_map("[a-z]{1,5}", "\\PC{0,10}", 0..3),
            times in (arb_timestamp(), arb_timestamp(), proptest::option::of(arb_timestamp()),
                      proptest::option::of(arb_timestamp()), proptest::option::of(arb_timestamp())),
            rolled in proptest::option::of((any::<[u8; 32]>(), arb_timestamp())),
        ) -> KeyRecord {
            KeyRecord {
                kind: token.map_or(KeyKind::Api, |token_type| KeyKind::Token { token_type }),
                class: KeyClass::Live,
                owner,
                name,
                key_prefix: "vb_live_abcd".into(),
                key_suffix: "wxyz".into(),
                key_hash: hash,
                scheme: HashScheme::HmacSha256 { pepper },
                permissions,
                ips: v4.into_iter().map(|(a, p)| IpNet::new(std::net::Ipv4Addr::from(a).into(), p).unwrap()).collect(),
                limits,
                metadata,
                created_at: times.0,
                created_by: "admin".into(),
                updated_at: times.1,
                updated_by: "admin".into(),
                expires_at: times.2,
                disabled_at: times.3,
                last_used_at: times.4,
                rolled: rolled.map(|(key_hash, valid_until)| RolledSecret {
                    key_hash,
                    scheme: HashScheme::Sha256Imported,
                    key_prefix: "vb_live_1234".into(),
                    key_suffix: "5678".into(),
                    valid_until,
                }),
                pool: Some(owner / 2),
            }
        }
    }

    proptest! {
        #[test]
        fn key_records_round_trip(record in arb_key()) {
            prop_assert_eq!(decode::<KeyRecord>(&encode(&record)).unwrap(), record);
        }

        #[test]
        fn verify_records_round_trip_and_follow_their_key(record in arb_key(), id in any::<u64>()) {
            let entries: Vec<_> = VerifyRecord::entries(id, &record).collect();
            prop_assert_eq!(entries.len(), 1 + usize::from(record.rolled.is_some()));
            for (hash, verify) in entries {
                prop_assert_eq!(decode::<VerifyRecord>(&encode(&verify)).unwrap(), verify.clone());
                prop_assert_eq!(verify.id, id);
                prop_assert_eq!(verify.id_kind(), record.kind.id_kind());
                prop_assert_eq!(verify.disabled, record.disabled_at.is_some());
                match &record.rolled {
                    Some(old) if old.key_hash == hash && verify.valid_until.is_some() => {
                        prop_assert_eq!(verify.valid_until, Some(old.valid_until));
                        prop_assert_eq!(verify.scheme, old.scheme);
                    }
                    _ => {
                        prop_assert_eq!(hash, record.key_hash);
                        prop_assert_eq!(verify.scheme, record.scheme);
                    }
                }
            }
        }

        #[test]
        fn accounts_credits_routes_events_round_trip(
            name in "\\PC{1,50}", ents in proptest::collection::btree_set("[a-z]{1,8}", 0..4),
            n in any::<[u64; 4]>(), prefix in "/[a-z/]{0,20}", perm in proptest::option::of("[a-z:]{1,10}"),
        ) {
            let account = AccountRecord {
                name: name.clone(), status: SubscriptionStatus::PastDue, entitlements: ents,
                created_at: Timestamp(n[0]), created_by: "a".into(),
                updated_at: Timestamp(n[1]), updated_by: "b".into(),
            };
            prop_assert_eq!(decode::<AccountRecord>(&encode(&account)).unwrap(), account);
            let credits = CreditsRecord { balance: n[0], leased: n[1], spent: n[2], lost_to_crash: 1, granted: n[3], refilled_at: None, refill: None };
            prop_assert_eq!(decode::<CreditsRecord>(&encode(&credits)).unwrap(), credits);
            let rule = RouteRule { prefix: prefix.clone(), permission: perm.clone(), entitlement: None, cost: n[0], price_micros: n[1] };
            prop_assert_eq!(decode::<RouteRule>(&encode(&rule)).unwrap(), rule);
            let event = AuditEvent { seq: n[0], at: Timestamp(n[1]), actor: name, action: "key.created".into(), target: prefix, fields: vec!["name".into()] };
            prop_assert_eq!(decode::<AuditEvent>(&encode(&event)).unwrap(), event);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode::<KeyRecord>(&bytes);
            let _ = decode::<VerifyRecord>(&bytes);
            let _ = decode::<AccountRecord>(&bytes);
            let _ = decode::<CreditsRecord>(&bytes);
            let _ = decode::<RouteRule>(&bytes);
            let _ = decode::<AuditEvent>(&bytes);
        }
    }

    #[test]
    fn unknown_versions_and_trailing_bytes_are_typed_errors() {
        use crate::error::CodecError;
        assert_eq!(decode::<RouteRule>(&[]), Err(CodecError::Empty));
        let rule = RouteRule::new("/x");
        let mut bytes = encode(&rule);
        bytes[0] = 9;
        assert!(matches!(
            decode::<RouteRule>(&bytes),
            Err(CodecError::UnknownVersion { found: 9, .. })
        ));
        let mut bytes = encode(&rule);
        bytes.push(0);
        assert!(matches!(
            decode::<RouteRule>(&bytes),
            Err(CodecError::Checksum { .. })
        ));
        // A record from before checksums: the version byte, the payload, nothing after it.
        let mut legacy = encode(&rule);
        legacy.truncate(legacy.len() - 4);
        legacy[0] &= !crate::codec::CHECKED;
        assert_eq!(decode::<RouteRule>(&legacy), Ok(rule));
        legacy.push(0);
        assert!(matches!(
            decode::<RouteRule>(&legacy),
            Err(CodecError::Corrupt { .. })
        ));
    }

    #[test]
    fn validation_rejects_bad_names_scopes_and_ips() {
        assert!(rules::name("name", "").is_err());
        assert!(rules::name("name", "   ").is_err());
        assert!(rules::name("name", &"x".repeat(51)).is_err());
        assert!(rules::name("name", &"é".repeat(50)).is_ok());
        assert!(rules::name("name", "bad\nname").is_err());
        assert!(rules::scope("p", "quickhits:*").is_ok());
        assert!(rules::scope("p", "*").is_ok());
        assert!(rules::scope("p", "quick*").is_err());
        assert!(rules::scope("p", "a b").is_err());
        assert_eq!(
            rules::ips(["10.0.0.0/8", "192.168.1.7", "::1"])
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            rules::ips(["10.1.2.3/8"]).unwrap()[0].to_string(),
            "10.0.0.0/8"
        );
        assert!(rules::ips(["10.0.0.300"]).is_err());
    }

    #[test]
    fn list_caps_apply_while_deduplicating() {
        use std::cell::Cell;
        use std::net::Ipv4Addr;
        // Distinct items, counting how many the validator pulls: it must stop at the first
        // item past the cap rather than deduplicate the whole (quadratic) list first.
        let pulled = Cell::new(0usize);
        let perms = (0..100_000)
            .map(|i| format!("p{i}"))
            .inspect(|_| pulled.set(pulled.get() + 1));
        let err = rules::scopes(perms).unwrap_err().to_string();
        assert!(
            err.contains(&format!("at most {}", rules::MAX_PERMISSIONS)),
            "{err}"
        );
        assert_eq!(pulled.get(), rules::MAX_PERMISSIONS + 1);

        pulled.set(0);
        let ips = (0u32..10_000)
            .map(|i| Ipv4Addr::from(i).to_string())
            .inspect(|_| pulled.set(pulled.get() + 1));
        let err = rules::ips(ips).unwrap_err().to_string();
        assert!(
            err.contains(&format!("at most {} entries", rules::MAX_IPS)),
            "{err}"
        );
        assert_eq!(pulled.get(), rules::MAX_IPS + 1);

        // Exactly at the cap is fine, and duplicates do not count towards it.
        let at_cap: Vec<String> = (0..rules::MAX_PERMISSIONS)
            .map(|i| format!("p{i}"))
            .collect();
        assert_eq!(
            rules::scopes(&at_cap).unwrap().len(),
            rules::MAX_PERMISSIONS
        );
        let dupes = vec!["keys:read"; 10 * rules::MAX_PERMISSIONS];
        assert_eq!(rules::scopes(dupes).unwrap(), ["keys:read"]);
        let dupes = vec!["10.0.0.1"; 10 * rules::MAX_IPS];
        assert_eq!(rules::ips(dupes).unwrap().len(), 1);
    }
}
