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

/// Rules a look-up scans one by one; a larger table is searched by halves. Measured with
/// `examples/route_rules` (docs/PERFORMANCE.md, thirtieth round): at 16 rules the scan costs
/// 256–292 ns for the first rule it reaches and 301–407 ns for the last, the search 303–373
/// ns for either; at 64 rules the scan's last costs 517–745 ns, the search 342–371.
const SCANNED: usize = 16;

/// An immutable snapshot of the route rules.
#[derive(Debug, Default)]
pub(crate) struct RouteTable {
    /// Generation, bumped on every change.
    pub generation: u64,
    /// Rules, longest prefix first: a rule's place is its bit, so the most specific rules
    /// are the ones checked by bit when there are more than [`MAX_BITS`].
    rules: Vec<RouteRule>,
    /// The rules in the order of their prefixes, for the longest-prefix search.
    by_prefix: Vec<Sorted>,
    /// Whether any rule asks for an entitlement.
    entitled: bool,
}

/// A rule in [`RouteTable::by_prefix`].
#[derive(Debug)]
struct Sorted {
    /// Its prefix (a copy: the search compares it without a hop to the rule).
    prefix: Box<str>,
    /// Its place in `rules`.
    rule: usize,
    /// The place in `by_prefix` of the longest other rule whose prefix begins this one's.
    parent: Option<usize>,
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
        let mut order: Vec<usize> = (0..rules.len()).collect();
        order.sort_by(|&a, &b| rules[a].prefix.cmp(&rules[b].prefix));
        // In prefix order, the rules whose prefixes begin a rule's own come before it, and
        // the chain of them ending at the rule before is on the stack.
        let mut by_prefix: Vec<Sorted> = Vec::with_capacity(rules.len());
        let mut chain: Vec<usize> = Vec::new();
        for rule in order {
            let prefix = rules[rule].prefix.as_str();
            while let Some(&top) = chain.last() {
                if prefix.starts_with(&*by_prefix[top].prefix) {
                    break;
                }
                chain.pop();
            }
            let parent = chain.last().copied();
            chain.push(by_prefix.len());
            by_prefix.push(Sorted {
                prefix: prefix.into(),
                rule,
                parent,
            });
        }
        RouteTable {
            generation,
            entitled: rules.iter().any(|r| r.entitlement.is_some()),
            rules,
            by_prefix,
        }
    }

    /// The longest rule prefixing `route`. Up to [`SCANNED`] rules, the first that matches
    /// in longest-first order; past that, in O(log rules + how deep rules nest): the last
    /// prefix not after the route begins it, or the longest rule prefixing that prefix does.
    /// (Every string between a prefix of the route and the route itself begins with that
    /// prefix.)
    pub(crate) fn resolve(&self, route: &str) -> RouteMatch<'_> {
        let found = if self.rules.len() <= SCANNED {
            (self.rules.iter()).position(|r| route.starts_with(r.prefix.as_str()))
        } else {
            let after = self.by_prefix.partition_point(|s| &*s.prefix <= route);
            let candidates =
                std::iter::successors(after.checked_sub(1), |&i| self.by_prefix[i].parent);
            (candidates.map(|i| &self.by_prefix[i]))
                .find(|s| route.starts_with(&*s.prefix))
                .map(|s| s.rule)
        };
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

    /// Whether any rule asks for an entitlement: if none does, an account's entitlements
    /// need not be read to learn [`entitlement_bits`](Self::entitlement_bits).
    pub(crate) fn asks_entitlements(&self) -> bool {
        self.entitled
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
    use proptest::prelude::*;

    proptest! {
        /// The search finds what a scan of every rule, longest first, finds: over a small
        /// alphabet, so that prefixes nest, share beginnings and sort between each other.
        #[test]
        fn resolve_finds_the_longest_prefix_a_scan_finds(
            prefixes in proptest::collection::btree_set("/[ab/]{0,5}", 0..24),
            routes in proptest::collection::vec("[ab/]{0,8}", 1..24),
        ) {
            let rules: Vec<RouteRule> = prefixes.iter().map(RouteRule::new).collect();
            let table = RouteTable::new(1, rules.clone());
            for route in routes {
                let route = format!("/{route}");
                let scanned = prefixes
                    .iter()
                    .filter(|p| route.starts_with(p.as_str()))
                    .max_by_key(|p| p.len());
                let found = table.resolve(&route);
                prop_assert_eq!(found.rule.map(|r| &r.prefix), scanned, "{}", route);
                if let (Some(i), Some(rule)) = (found.index, found.rule) {
                    prop_assert_eq!(&table.rules[i], rule, "the index is the rule's bit");
                }
            }
        }
    }

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
