//! The credit meters in memory, by balance id: how a clean close, a `set` or top-up, and a
//! key coming back into the cache find the live lease of a balance.

use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use crate::cache::MeterRef;

/// Meters by CREDITS id (a key's id or a pool's). A table of the handles themselves, found
/// by the id each meter carries: 16 bytes a slot where a map from id to handle takes 24 (at
/// 1M keys, 2²¹ slots: ≈ 36 bytes per cached key instead of ≈ 52).
#[derive(Default)]
pub(crate) struct Registry(HashTable<MeterRef>);

/// Ids are mostly sequential: a multiplication spreads them over the low bits (the slot)
/// and the high bits (hashbrown's tag).
fn hash(id: u64) -> u64 {
    (id ^ (id >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

impl Registry {
    /// The meter of balance `id`.
    pub(crate) fn get(&self, id: u64) -> Option<&MeterRef> {
        self.0.find(hash(id), |m| m.id == id)
    }

    /// Registers `meter` for its balance, replacing any other.
    pub(crate) fn insert(&mut self, meter: MeterRef) {
        let id = meter.id;
        match self.0.entry(hash(id), |m| m.id == id, |m| hash(m.id)) {
            Entry::Occupied(mut slot) => *slot.get_mut() = meter,
            Entry::Vacant(slot) => {
                slot.insert(meter);
            }
        }
    }

    /// Unregisters `meter` if it is the one registered for its balance.
    pub(crate) fn remove(&mut self, meter: &MeterRef) {
        if let Ok(slot) = self
            .0
            .find_entry(hash(meter.id), |m| MeterRef::ptr_eq(m, meter))
        {
            slot.remove();
        }
    }

    /// Every registered meter.
    pub(crate) fn all(&self) -> Vec<MeterRef> {
        self.0.iter().cloned().collect()
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
                .is_some_and(|found| MeterRef::ptr_eq(found, m))
        }));
        assert!(registry.get(0).is_none() && registry.get(10_001).is_none());
        let newer = pool(7);
        registry.insert(newer.clone());
        assert!(
            MeterRef::ptr_eq(registry.get(7).unwrap(), &newer),
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
}
