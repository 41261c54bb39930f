//! The credit meters in memory, by balance id: how a clean close, a `set` or top-up, and a
//! key coming back into the cache find the live lease of a balance.

use std::collections::HashMap;
use std::sync::Arc;

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::cache::{CachedKey, MeterRef};
use crate::credits::meter::Meter;

/// Meters by CREDITS id (a key's id or a pool's; ids are unique across both). Keys' own
/// meters — one per cached metered key, so the bulk of the entries — are a table of their
/// home snapshots' `Arc`s found by the id each carries: 8 bytes a slot (at 1M keys, 2²¹
/// slots and their control bytes: ≈ 19 bytes per cached key). Pools are few: a map.
#[derive(Default)]
pub(crate) struct Registry {
    keys: HashTable<Arc<CachedKey>>,
    pools: HashMap<u64, Arc<Meter>>,
}

/// Ids are mostly sequential: a multiplication spreads them over the low bits (the slot)
/// and the high bits (hashbrown's tag).
fn hash(id: u64) -> u64 {
    (id ^ (id >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Registry {
    /// The meter of balance `id`.
    pub(crate) fn get(&self, id: u64) -> Option<MeterRef> {
        match self.keys.find(hash(id), |k| k.id() == id) {
            Some(home) => Some(MeterRef::Own(home.clone())),
            None => self.pools.get(&id).cloned().map(MeterRef::Pool),
        }
    }

    /// Registers `meter` for its balance, replacing any other.
    pub(crate) fn insert(&mut self, meter: MeterRef) {
        match meter {
            MeterRef::Own(home) => {
                let id = home.id();
                match self
                    .keys
                    .entry(hash(id), |k| k.id() == id, |k| hash(k.id()))
                {
                    Entry::Occupied(mut slot) => *slot.get_mut() = home,
                    Entry::Vacant(slot) => {
                        slot.insert(home);
                    }
                }
            }
            MeterRef::Pool(pool) => {
                self.pools.insert(pool.id, pool);
            }
        }
    }

    /// Unregisters `meter` if it is the one registered for its balance.
    pub(crate) fn remove(&mut self, meter: &MeterRef) {
        match meter {
            MeterRef::Own(home) => {
                let own = home.own_meter();
                let same = |k: &Arc<CachedKey>| std::ptr::eq(k.own_meter(), own);
                if let Ok(slot) = self.keys.find_entry(hash(home.id()), same) {
                    slot.remove();
                }
            }
            MeterRef::Pool(pool) => {
                if self
                    .pools
                    .get(&pool.id)
                    .is_some_and(|p| Arc::ptr_eq(p, pool))
                {
                    self.pools.remove(&pool.id);
                }
            }
        }
    }

    /// Every registered meter.
    pub(crate) fn all(&self) -> Vec<MeterRef> {
        let keys = self.keys.iter().cloned().map(MeterRef::Own);
        keys.chain(self.pools.values().cloned().map(MeterRef::Pool))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::credits::meter::Meter;
    use crate::public_id::IdKind;

    fn pool(id: u64) -> MeterRef {
        MeterRef::Pool(Arc::new(Meter::new(id, None, IdKind::Pool, false)))
    }

    #[test]
    fn meters_are_found_replaced_and_removed_by_their_balance_id() {
        let mut registry = Registry::default();
        let metered: Vec<MeterRef> = (1..=10_000).map(pool).collect();
        for meter in &metered {
            registry.insert(meter.clone());
        }
        assert!(metered.iter().all(|m| {
            registry
                .get(m.id)
                .is_some_and(|found| MeterRef::ptr_eq(&found, m))
        }));
        assert!(registry.get(0).is_none() && registry.get(10_001).is_none());
        let newer = pool(7);
        registry.insert(newer.clone());
        assert!(
            MeterRef::ptr_eq(&registry.get(7).unwrap(), &newer),
            "replaced"
        );
        registry.remove(&metered[6]); // the replaced one: not registered any more
        assert!(
            registry.get(7).is_some(),
            "removing another meter leaves it"
        );
        registry.remove(&newer);
        assert!(registry.get(7).is_none());
        assert_eq!(registry.all().len(), 9_999);
    }

    #[test]
    fn keys_own_meters_are_found_by_key_id_beside_pools() {
        let mut registry = Registry::default();
        let keys: Vec<MeterRef> = (1..=1_000)
            .map(|id| MeterRef::Own(crate::cache::test_key(id)))
            .collect();
        for meter in keys.iter().cloned().chain([pool(5_000)]) {
            registry.insert(meter);
        }
        assert!(keys.iter().all(|k| {
            registry
                .get(k.id)
                .is_some_and(|found| MeterRef::ptr_eq(&found, k) && !found.is_pool())
        }));
        assert!(registry.get(5_000).is_some_and(|p| p.is_pool()));
        // A key cached again with a new home replaces the old one, which no longer removes it.
        let newer = MeterRef::Own(crate::cache::test_key(7));
        registry.insert(newer.clone());
        registry.remove(&keys[6]);
        assert!(
            registry
                .get(7)
                .is_some_and(|m| MeterRef::ptr_eq(&m, &newer))
        );
        registry.remove(&newer);
        assert!(registry.get(7).is_none());
        assert_eq!(registry.all().len(), 1_000, "999 keys and the pool");
    }
}
