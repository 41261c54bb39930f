//! The in-memory route table the verify path reads: rules sorted for longest-prefix match,
//! and each key's grants compiled to a bitmask over the rules so the hot path checks a bit
//! instead of comparing scope strings. A table is immutable; a change publishes a new one
//! with a new generation, and keys compiled against an older generation fall back to the
//! string check until their cache entry is rebuilt.

use std::collections::BTreeSet;

use crate::record::RouteRule;
use crate::routes::permits;

/// Rules a bitmask can describe; beyond that every check takes the string path.
const MAX_BITS: usize = 64;

/// An immutable snapshot of the route rules.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    /// Generation, bumped on every change.
    pub generation: u64,
    /// Rules, longest prefix first, so the first match is the longest.
    rules: Vec<RouteRule>,
}

/// What a request's route resolves to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteMatch<'t> {
    /// Index of the rule (its bit), or `None` when no rule matches.
    pub index: Option<usize>,
    pub rule: Option<&'t RouteRule>,
}

impl RouteTable {
    pub(crate) fn new(generation: u64, mut rules: Vec<RouteRule>) -> Self {
        rules.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(a.prefix.cmp(&b.prefix))
        });
        RouteTable { generation, rules }
    }

    /// The longest rule prefixing `route`.
    pub(crate) fn resolve(&self, route: &str) -> RouteMatch<'_> {
        let found = self
            .rules
            .iter()
            .position(|r| route.starts_with(r.prefix.as_str()));
        RouteMatch {
            index: found,
            rule: found.map(|i| &self.rules[i]),
        }
    }

    /// Bit `i` set when `permissions` allow rule `i`'s required permission (or it needs none).
    pub(crate) fn permission_bits(&self, permissions: &[String]) -> u64 {
        self.bits(|rule| {
            rule.permission
                .as_deref()
                .is_none_or(|p| permits(permissions, p))
        })
    }

    /// Bit `i` set when `entitlements` include rule `i`'s entitlement (or it needs none).
    pub(crate) fn entitlement_bits(&self, entitlements: &BTreeSet<String>) -> u64 {
        self.bits(|rule| {
            rule.entitlement
                .as_ref()
                .is_none_or(|e| entitlements.contains(e))
        })
    }

    fn bits(&self, allowed: impl Fn(&RouteRule) -> bool) -> u64 {
        self.rules
            .iter()
            .take(MAX_BITS)
            .enumerate()
            .filter(|(_, r)| allowed(r))
            .fold(0, |bits, (i, _)| bits | 1 << i)
    }

    /// Whether rule `index` can be checked by bit.
    pub(crate) fn has_bit(index: usize) -> bool {
        index < MAX_BITS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_match_the_string_checks() {
        let table = RouteTable::new(
            1,
            vec![
                RouteRule::new("/api/").permission("api:read"),
                RouteRule::new("/api/v1/quickhits/")
                    .permission("quickhits:create")
                    .entitlement("pro"),
                RouteRule::new("/health"),
            ],
        );
        let m = table.resolve("/api/v1/quickhits/create");
        assert_eq!(m.rule.unwrap().prefix, "/api/v1/quickhits/");
        let i = m.index.unwrap();
        let perms = vec!["quickhits:*".to_owned()];
        assert_ne!(table.permission_bits(&perms) & (1 << i), 0);
        let api = table.resolve("/api/v2/x").index.unwrap();
        assert_eq!(table.permission_bits(&perms) & (1 << api), 0);
        let health = table.resolve("/health").index.unwrap();
        assert_ne!(
            table.permission_bits(&[]) & (1 << health),
            0,
            "no permission needed"
        );
        let pro: BTreeSet<String> = ["pro".to_owned()].into();
        assert_ne!(table.entitlement_bits(&pro) & (1 << i), 0);
        assert_eq!(table.entitlement_bits(&BTreeSet::new()) & (1 << i), 0);
        assert!(table.resolve("/other").index.is_none());
    }
}
