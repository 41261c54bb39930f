//! Route rules: `route prefix → required permission, entitlement, default cost`, matched by
//! longest prefix; and the permission check with `*` and `scope:*` wildcards.

use crate::audit;
use crate::codec;
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::record::{RouteRule, rules};
use crate::store::tables::ROUTES;

/// Longest route prefix accepted.
const MAX_ROUTE_LEN: usize = 256;

/// Refuses a prefix `set` does not store: not a path of printable ASCII; holding a `//`,
/// `/./` or `/../`, which no route passed as [`Request::new`](crate::Request::new) asks can
/// hold (they arrive resolved), so its rule would protect nothing; or holding a `*`, which
/// reads as a wildcard but matches only itself (rules match by plain prefix: `/v1/*` left
/// `/v1/users` open; found by a reviewer). `check` names a stored rule that fails it.
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    if !prefix.starts_with('/')
        || prefix.len() > MAX_ROUTE_LEN
        || !prefix.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Error::invalid(
            "prefix",
            format!(
                "a route prefix starts with `/` and has 1–{MAX_ROUTE_LEN} printable ASCII characters"
            ),
        ));
    }
    if prefix.contains('*') {
        return Err(Error::invalid(
            "prefix",
            "a rule matches by plain prefix: write `/v1/`, not `/v1/*`, for every route under /v1/",
        ));
    }
    if ["//", "/./", "/../"].iter().any(|s| prefix.contains(s)) {
        return Err(Error::invalid(
            "prefix",
            "routes are matched with `.` and `..` segments and repeated slashes resolved: \
             a prefix holding one would never match",
        ));
    }
    Ok(())
}

/// Route-rule operations. Get one with [`Ledger::routes`].
pub struct Routes<'a> {
    pub(crate) ledger: &'a Ledger,
    pub(crate) actor: String,
}

impl Routes<'_> {
    /// The same handle, recording `actor` as the author of its changes: 1–254 characters,
    /// no control characters and no API key (a change by an actor that breaks these is
    /// refused as [`Error::InvalidInput`](crate::Error::InvalidInput) on `actor`).
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// Sets (creates or replaces) the rule for `rule.prefix`.
    pub fn set(&self, rule: RouteRule) -> Result<RouteRule> {
        self.ledger.guarded(|| {
            let prefix = &rule.prefix;
            // A rule is kept in plain text, listed and named in the audit trail. Checked
            // first, so that no format error below can be the one to refuse a key.
            self.ledger.holding_no_key("prefix", [prefix.as_str()])?;
            self.ledger
                .holding_no_key("permission", rule.permission.as_deref())?;
            self.ledger
                .holding_no_key("entitlement", rule.entitlement.as_deref())?;
            check_prefix(prefix)?;
            if let Some(p) = &rule.permission {
                rules::scope("permission", p)?;
            }
            if let Some(e) = &rule.entitlement {
                rules::entitlement("entitlement", e)?;
            }
            let inner = &self.ledger.inner;
            inner.engine.change_routes(&inner.store, |txn| {
                let before: Option<RouteRule> = {
                    let mut table = txn.open_table(ROUTES)?;
                    let old = table.insert(prefix.as_str(), codec::encode(&rule).as_slice())?;
                    // An unreadable old rule is replaced like a missing one.
                    old.and_then(|v| codec::decode(v.value()).ok())
                };
                // The fields this set changed (all of them for a new rule).
                let fields: Vec<&str> = [
                    (
                        "permission",
                        before.as_ref().map(|b| b.permission != rule.permission),
                    ),
                    (
                        "entitlement",
                        before.as_ref().map(|b| b.entitlement != rule.entitlement),
                    ),
                    ("cost", before.as_ref().map(|b| b.cost != rule.cost)),
                    (
                        "price_micros",
                        before.as_ref().map(|b| b.price_micros != rule.price_micros),
                    ),
                ]
                .into_iter()
                .filter(|(_, changed)| changed.unwrap_or(true))
                .map(|(field, _)| field)
                .collect();
                if fields.is_empty() {
                    // The same rule again: nothing to audit, as for an account or a key
                    // update that changes nothing (the actor is still checked).
                    return self.ledger.actor_ok(&self.actor);
                }
                let now = self.ledger.now();
                audit::append(
                    txn,
                    self.ledger,
                    now,
                    &self.actor,
                    "route.set",
                    prefix,
                    &fields,
                )
            })?;
            Ok(rule)
        })
    }

    /// Removes the rule for exactly `prefix`.
    pub fn remove(&self, prefix: &str) -> Result<()> {
        // The prefix is named in the audit trail.
        self.ledger.holding_no_key("prefix", [prefix])?;
        self.ledger.guarded(|| {
            let inner = &self.ledger.inner;
            inner.engine.change_routes(&inner.store, |txn| {
                if txn.open_table(ROUTES)?.remove(prefix)?.is_none() {
                    return Err(Error::NotFound { what: "route rule" });
                }
                let now = self.ledger.now();
                audit::append(
                    txn,
                    self.ledger,
                    now,
                    &self.actor,
                    "route.removed",
                    prefix,
                    &[],
                )
            })
        })
    }

    /// All rules, sorted by prefix.
    pub fn list(&self) -> Result<Vec<RouteRule>> {
        self.ledger.guarded(|| {
            let read = self.ledger.inner.store.begin_read()?;
            crate::engine::rules_in(&read.open_table(ROUTES)?)
        })
    }

    /// The rule with the longest prefix of `route`, if any.
    pub fn matching(&self, route: &str) -> Result<Option<RouteRule>> {
        self.ledger
            .guarded(|| Ok(longest_match(&self.list()?, route).cloned()))
    }
}

/// The rule whose prefix is the longest prefix of `route`.
pub(crate) fn longest_match<'r>(rules: &'r [RouteRule], route: &str) -> Option<&'r RouteRule> {
    rules
        .iter()
        .filter(|r| route.starts_with(r.prefix.as_str()))
        .max_by_key(|r| r.prefix.len())
}

/// Whether `granted` scopes allow `required`: exact, `*`, or `scope:*` covering
/// `scope:anything` (and nested `a:b:*` covering `a:b:c`).
pub fn permits<S: AsRef<str>>(granted: &[S], required: &str) -> bool {
    granted.iter().any(|g| {
        let g = g.as_ref();
        g == "*"
            || g == required
            || g.strip_suffix('*')
                .is_some_and(|stem| stem.ends_with(':') && required.starts_with(stem))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(prefix: &str) -> RouteRule {
        RouteRule::new(prefix)
    }

    #[test]
    fn longest_prefix_wins() {
        let rules = vec![rule("/api/"), rule("/api/v1/quickhits/"), rule("/api/v1/")];
        assert_eq!(
            longest_match(&rules, "/api/v1/quickhits/create")
                .unwrap()
                .prefix,
            "/api/v1/quickhits/"
        );
        assert_eq!(
            longest_match(&rules, "/api/v1/roadmaps/create")
                .unwrap()
                .prefix,
            "/api/v1/"
        );
        assert_eq!(longest_match(&rules, "/api/v2").unwrap().prefix, "/api/");
        assert!(longest_match(&rules, "/health").is_none());
    }

    #[test]
    fn wildcards() {
        assert!(permits(&["*"], "quickhits:create"));
        assert!(permits(&["quickhits:*"], "quickhits:create"));
        assert!(permits(&["quickhits:create"], "quickhits:create"));
        assert!(!permits(&["quickhits:read"], "quickhits:create"));
        assert!(!permits(&["quickhits:*"], "quickhitsx:create"));
        assert!(!permits(&["quick*"], "quickhits:create"));
        assert!(permits(&["a:b:*"], "a:b:c"));
        assert!(!permits::<&str>(&[], "x"));
    }
}
