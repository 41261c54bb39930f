//! The credit meters in memory, by balance id: how a clean close, a `set` or top-up, and a
//! key coming back into the cache find the live lease of a balance.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::cache::{CachedKey, MeterRef, Metering};
use crate::credits::meter::Meter;
use crate::sweep::SweepSchedule;

/// Meters by CREDITS id (a key's id or a pool's; ids are unique across both). Keys' own
/// meters — one per cached metered key, so the bulk of the entries — are a [`Homes`] table
/// of their home snapshots' `Arc`s found by the id each carries. Pools are few: a map.
/// The homes of keys without a meter of their own are a second [`Homes`] table.
pub(crate) struct Registry {
    keys: Homes,
    pools: HashMap<u64, Arc<Meter>>,
    /// The homes of keys that spend from a pool or not at all: no meter, but the same live
    /// part, so that a key cached again while its usage still waits for the writer counts
    /// on that home rather than on a new one (found in the thirty-eighth round: a key missed
    /// again and again left one home per miss listed until the writer's next idle round).
    /// Each leaves once nothing but the writer's list or the cache held it (see
    /// [`forget_home`](Self::forget_home)); the few that leave otherwise (a grant let go of
    /// them last) are swept when the table has doubled.
    others: Homes,
    /// When `others` is next swept of homes only it holds.
    others_sweeps: SweepSchedule,
    /// Balances whose meter had reported an exhaustion when it left (its key left a full
    /// cache) and that have not grown since: a new meter for one starts with the exhaustion
    /// reported, so that a key cached again is not reported exhausted again. At most
    /// [`MAX_REPORTED_EMPTY`]: past that a key cached again may be reported a second time.
    reported_empty: HashSet<u64>,
}

/// Most balances [`Registry::reported_empty`] remembers (≈ 1.2 MB when full, by arithmetic:
/// 131,072 buckets of 9 bytes).
const MAX_REPORTED_EMPTY: usize = 65_536;

/// Ids are mostly sequential: a multiplication spreads them over the whole word, whose high
/// bits choose the home slot.
fn hash(id: u64) -> u64 {
    (id ^ (id >> 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A slot: a home snapshot or, as the null pointer, nothing (8 bytes either way).
type Slot = Option<Arc<CachedKey>>;

const _: () = assert!(std::mem::size_of::<Slot>() == std::mem::size_of::<usize>());

/// Slots needed to hold `n` homes at three quarters full.
fn size_for(n: usize) -> usize {
    n.saturating_add(n / 3).saturating_add(1)
}

/// The size a table starts at (or less, when the expected homes need less).
const START: usize = 16;

/// Home snapshots by key id: open addressing with linear probing over 8-byte slots, the key
/// of a slot being the id its snapshot carries (a probe reads through the `Arc`: the
/// registry is off the verify path). Removal shifts later entries of the cluster back (no
/// tombstones), so probe sequences stay short however many keys come and go.
///
/// Sized for `expected` homes (the cache's capacity): it starts small and doubles as it
/// fills, the last step straight to [`size_for`]`(expected)` slots (≈ 10.7 bytes a home
/// when full; fewer when a doubled size already holds them). Evicted keys whose homes are still in use can take it past `expected` for a
/// while: from there it grows by a quarter at a time. A quarter of its slots always stay
/// empty, so probe sequences are short.
struct Homes {
    slots: Box<[Slot]>,
    len: usize,
    expected: usize,
}

/// `size` empty slots.
fn empty(size: usize) -> Box<[Slot]> {
    (0..size).map(|_| None).collect()
}

impl Homes {
    /// An empty table (nothing allocated yet) for `expected` homes.
    fn new(expected: usize) -> Self {
        Homes {
            slots: Box::default(),
            len: 0,
            expected,
        }
    }

    /// Whether `n` homes fit at three quarters full.
    fn fits(&self, n: usize) -> bool {
        n.saturating_mul(4) <= self.slots.len().saturating_mul(3)
    }

    /// The next size: doubling up to the expected homes' size, a quarter more past it, and
    /// always enough for one more home.
    fn grown_size(&self) -> usize {
        let size = self.slots.len();
        let full = size_for(self.expected);
        let next = if size < full {
            size.saturating_mul(2).max(START).min(full)
        } else {
            size.saturating_add(size / 4)
        };
        next.max(size_for(self.len.saturating_add(1)))
    }

    /// Moves every home into a larger slot array.
    fn grow(&mut self) {
        let slots = empty(self.grown_size());
        let old = std::mem::replace(&mut self.slots, slots);
        for home in old.into_vec().into_iter().flatten() {
            self.place(home);
        }
    }

    /// Puts a home whose id is absent in the first empty slot of its probe sequence.
    fn place(&mut self, home: Arc<CachedKey>) {
        let mut i = self.home(home.id());
        for _ in 0..self.slots.len() {
            if self.slots[i].is_none() {
                self.slots[i] = Some(home);
                return;
            }
            i = self.next(i);
        }
    }

    /// Where probing for `id` starts: its hash scaled onto the table (no division).
    fn home(&self, id: u64) -> usize {
        ((hash(id) as u128 * self.slots.len() as u128) >> 64) as usize
    }

    /// The slot after `i`, wrapping around.
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() { 0 } else { i + 1 }
    }

    /// The index of the slot holding `id`'s home.
    fn find(&self, id: u64) -> Option<usize> {
        let mut i = self.home(id);
        for _ in 0..self.slots.len() {
            match &self.slots[i] {
                None => return None,
                Some(home) if home.id() == id => return Some(i),
                Some(_) => i = self.next(i),
            }
        }
        None
    }

    /// `id`'s home.
    fn get(&self, id: u64) -> Option<&Arc<CachedKey>> {
        self.find(id).and_then(|i| self.slots[i].as_ref())
    }

    /// Puts `home` in for its id, replacing any other.
    fn insert(&mut self, home: Arc<CachedKey>) {
        if let Some(i) = self.find(home.id()) {
            self.slots[i] = Some(home);
            return;
        }
        if !self.fits(self.len.saturating_add(1)) {
            self.grow();
        }
        self.place(home);
        self.len += 1;
    }

    /// Removes `id`'s home if `same` accepts it; whether it did.
    fn remove_if(&mut self, id: u64, same: impl FnOnce(&CachedKey) -> bool) -> bool {
        let found = self.find(id);
        let found = found.filter(|&i| self.slots[i].as_deref().is_some_and(same));
        if let Some(i) = found {
            self.remove_at(i);
        }
        found.is_some()
    }

    /// Empties slot `hole`, then moves back each later home of the cluster that may live
    /// there (its home slot is not between the hole and where it is).
    fn remove_at(&mut self, mut hole: usize) {
        if self.slots[hole].take().is_none() {
            return;
        }
        self.len -= 1;
        let size = self.slots.len();
        let mut j = hole;
        for _ in 0..size {
            j = self.next(j);
            let Some(id) = self.slots[j].as_ref().map(|home| home.id()) else {
                return;
            };
            let home = self.home(id);
            if (hole + size - home) % size < (j + size - home) % size {
                self.slots.swap(hole, j);
                hole = j;
            }
        }
    }

    /// Every home.
    fn iter(&self) -> impl Iterator<Item = &Arc<CachedKey>> {
        self.slots.iter().flatten()
    }

    /// Keeps only the homes `keep` accepts (the slots stay as many).
    fn retain(&mut self, mut keep: impl FnMut(&Arc<CachedKey>) -> bool) {
        let size = self.slots.len();
        let old = std::mem::replace(&mut self.slots, empty(size));
        self.len = 0;
        for home in old.into_vec().into_iter().flatten().filter(|h| keep(h)) {
            self.place(home);
            self.len += 1;
        }
    }
}

impl Registry {
    /// An empty registry sized for `keys` cached keys (the cache's capacity).
    pub(crate) fn with_capacity(keys: usize) -> Self {
        Registry {
            keys: Homes::new(keys),
            pools: HashMap::new(),
            others: Homes::new(keys),
            others_sweeps: SweepSchedule::default(),
            reported_empty: HashSet::new(),
        }
    }

    /// The meter of balance `id`.
    pub(crate) fn get(&self, id: u64) -> Option<MeterRef> {
        match self.keys.get(id) {
            Some(home) => Some(MeterRef::Own(home.clone())),
            None => self.pools.get(&id).cloned().map(MeterRef::Pool),
        }
    }

    /// Registers `meter` for its balance, replacing any other.
    pub(crate) fn insert(&mut self, meter: MeterRef) {
        if self.reported_empty.remove(&meter.id) {
            meter.mark_exhaustion_reported();
        }
        match meter {
            MeterRef::Own(home) => self.keys.insert(home),
            MeterRef::Pool(pool) => {
                self.pools.insert(pool.id, pool);
            }
        }
    }

    /// Unregisters `meter` if it is the one registered for its balance.
    pub(crate) fn remove(&mut self, meter: &MeterRef) {
        let removed = match meter {
            MeterRef::Own(home) => {
                let own = home.own_meter();
                self.keys
                    .remove_if(home.id(), |k| std::ptr::eq(k.own_meter(), own))
            }
            MeterRef::Pool(pool) => {
                let registered = self.pools.get(&pool.id);
                let same = registered.is_some_and(|p| Arc::ptr_eq(p, pool));
                if same {
                    self.pools.remove(&pool.id);
                }
                same
            }
        };
        // A retired meter's balance is gone: nothing to remember.
        let remember = removed && meter.exhaustion_reported() && !meter.retired();
        if remember && self.reported_empty.len() < MAX_REPORTED_EMPTY {
            self.reported_empty.insert(meter.id);
        }
    }

    /// Balance `id` grew (a top-up or a set): a refusal of it is news again, whatever meter
    /// it comes through. Returns whether an exhaustion was remembered (for
    /// [`ungrew`](Self::ungrew) if the change fails).
    pub(crate) fn grew(&mut self, id: u64) -> bool {
        self.reported_empty.remove(&id)
    }

    /// The growth of balance `id` that [`grew`](Self::grew) forgot an exhaustion for did not
    /// happen (its batch failed): the exhaustion stands, on the meter registered since, if
    /// any, or remembered again.
    pub(crate) fn ungrew(&mut self, id: u64) {
        match self.get(id) {
            Some(meter) => meter.mark_exhaustion_reported(),
            None if self.reported_empty.len() < MAX_REPORTED_EMPTY => {
                self.reported_empty.insert(id);
            }
            None => {}
        }
    }

    /// The live home of key `id` that spends from a pool or not at all, if one is in use.
    pub(crate) fn home_of(&self, id: u64) -> Option<Arc<CachedKey>> {
        self.others.get(id).cloned()
    }

    /// Registers `home`, a new entry's home, as its key's live one (a key spending from its
    /// own balance is registered with its meter instead). Sweeps first when due.
    pub(crate) fn keep_home(&mut self, home: &Arc<CachedKey>) {
        if home.metering == Metering::Own {
            return;
        }
        if self
            .others
            .get(home.id())
            .is_some_and(|h| Arc::ptr_eq(h, home))
        {
            return;
        }
        if self.others_sweeps.due(self.others.len) {
            // Held by the table alone: nothing else can reach them but through this lock.
            self.others.retain(|h| Arc::strong_count(h) > 1);
            self.others_sweeps.swept(self.others.len);
        }
        self.others.insert(home.clone());
    }

    /// Forgets `home` if it is its key's registered one and the caller's handle is the only
    /// other: no entry, grant or writer list uses it any more, and none can take it up but
    /// through this lock. The caller's handle is dropped here, under the lock: of the last
    /// two holders forgetting it at once (an eviction and the writer's unlisting), the
    /// second then finds itself the only one (found by a reviewer: each dropped its handle
    /// after the other's look, and both left the home registered).
    pub(crate) fn forget_home(&mut self, home: Arc<CachedKey>) {
        if Arc::strong_count(&home) == 2 {
            self.others
                .remove_if(home.id(), |h| std::ptr::eq(h, &*home));
        }
    }

    /// Forgets key `id`'s home, whoever holds it: the key was deleted, or now spends from
    /// its own balance (a miss never asks for it again; the writer still flushes what it
    /// counted). Else one only the registry holds would wait for a sweep.
    pub(crate) fn drop_home(&mut self, id: u64) {
        self.others.remove_if(id, |_| true);
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

    use proptest::prelude::*;

    use crate::sweep::SWEEP_FROM;

    use super::*;
    use crate::cache::test_key;
    use crate::credits::meter::Meter;
    use crate::public_id::IdKind;

    fn pool(id: u64) -> MeterRef {
        MeterRef::Pool(Arc::new(Meter::new(id, None, IdKind::Pool, false)))
    }

    #[test]
    fn meters_are_found_replaced_and_removed_by_their_balance_id() {
        let mut registry = Registry::with_capacity(16);
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
        let mut registry = Registry::with_capacity(16);
        let keys: Vec<MeterRef> = (1..=1_000).map(|id| MeterRef::Own(test_key(id))).collect();
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
        let newer = MeterRef::Own(test_key(7));
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

    /// The meters' addresses, in order (to compare sets of meters).
    fn addresses<'a>(meters: impl IntoIterator<Item = &'a MeterRef>) -> Vec<usize> {
        let mut all: Vec<usize> = meters
            .into_iter()
            .map(|m| std::ptr::from_ref::<Meter>(m) as usize)
            .collect();
        all.sort_unstable();
        all
    }

    proptest! {
        /// Inserts, replacements and removals of keys' meters (ids from a small range, so
        /// clusters and wrap-around are common; a small capacity, so the table grows past it)
        /// and of pools' agree with a `HashMap` on every look-up and on `all`.
        #[test]
        fn behaves_like_a_map(
            capacity in 0usize..12,
            ops in proptest::collection::vec((0u8..4, 0u64..24, 0usize..4), 1..300),
        ) {
            let mut registry = Registry::with_capacity(capacity);
            let mut model: HashMap<u64, MeterRef> = HashMap::new();
            let mut inserted: Vec<MeterRef> = Vec::new();
            for (op, id, pick) in ops {
                match op {
                    0 | 1 => {
                        let meter = if op == 0 {
                            MeterRef::Own(test_key(id))
                        } else {
                            pool(1_000 + id % 4)
                        };
                        registry.insert(meter.clone());
                        model.insert(meter.id, meter.clone());
                        inserted.push(meter);
                    }
                    2 => {
                        // A meter once inserted for `id` (maybe replaced since), or one never
                        // registered.
                        let earlier: Vec<&MeterRef> =
                            inserted.iter().filter(|m| m.id == id).collect();
                        let meter = earlier
                            .get(pick)
                            .map_or_else(|| MeterRef::Own(test_key(id)), |&m| m.clone());
                        registry.remove(&meter);
                        if model.get(&id).is_some_and(|m| MeterRef::ptr_eq(m, &meter)) {
                            model.remove(&id);
                        }
                    }
                    _ => {
                        let found = registry.get(id);
                        prop_assert_eq!(found.is_some(), model.contains_key(&id));
                    }
                }
                for id in (0..24).chain(1_000..1_004) {
                    let found = registry.get(id);
                    let expected = model.get(&id);
                    prop_assert!(match (&found, expected) {
                        (Some(f), Some(e)) => MeterRef::ptr_eq(f, e),
                        (None, None) => true,
                        _ => false,
                    }, "id {}: found {:?}, expected {:?}", id, found.is_some(), expected.is_some());
                }
                let keys = model.values().filter(|m| !m.is_pool()).count();
                prop_assert_eq!(registry.keys.len, keys);
                prop_assert!(registry.keys.fits(keys), "at most three quarters full");
                prop_assert_eq!(addresses(&registry.all()), addresses(model.values()));
            }
        }
    }

    /// Homes of keys without a meter of their own: found by key id while registered, left
    /// out for a key with one, forgotten once the caller's handle is the only other, and
    /// swept of those nothing else holds once the table has doubled.
    #[test]
    fn homes_of_keys_without_a_meter_stay_while_held() {
        use crate::cache::{Metering, test_key_metered};
        let mut registry = Registry::with_capacity(16);
        let own = test_key(1);
        registry.keep_home(&own);
        assert!(
            registry.home_of(1).is_none(),
            "a key with a meter is not kept here"
        );

        let mut held: Vec<Arc<CachedKey>> = (10..20)
            .map(|id| test_key_metered(id, Metering::Unmetered))
            .collect();
        for home in &held {
            registry.keep_home(home);
        }
        assert!(held.iter().all(|h| {
            let found = registry.home_of(h.id());
            found.is_some_and(|f| Arc::ptr_eq(&f, h))
        }));
        // Held by an entry besides the caller: kept. The caller's handle alone: forgotten.
        let first = held.remove(0); // key 10
        let in_use = first.clone();
        registry.forget_home(first.clone());
        assert!(registry.home_of(10).is_some(), "an entry still holds it");
        drop(in_use);
        registry.forget_home(first);
        assert!(registry.home_of(10).is_none());
        // Its last two holders letting go one after the other (an eviction, the writer's
        // unlisting): the second finds itself the last.
        let (by_eviction, by_writer) = (held[1].clone(), held.remove(1)); // key 12
        let home = Arc::downgrade(&by_writer);
        registry.forget_home(by_eviction);
        registry.forget_home(by_writer);
        assert!(registry.home_of(12).is_none() && home.strong_count() == 0);
        // Another home of the same key is not forgotten through this one.
        let newer = test_key_metered(11, Metering::Pool);
        registry.keep_home(&newer);
        registry.forget_home(held[0].clone());
        assert!(
            registry
                .home_of(11)
                .is_some_and(|h| Arc::ptr_eq(&h, &newer))
        );
        registry.drop_home(11);
        assert!(registry.home_of(11).is_none(), "dropped, whoever holds it");

        // Homes whose holders let go without telling: swept once the table reaches 1,024.
        let unheld = (SWEEP_FROM - registry.others.len) as u64;
        for id in 1_000..1_000 + unheld {
            registry.keep_home(&test_key_metered(id, Metering::Unmetered));
        }
        assert_eq!(
            registry.others.len, SWEEP_FROM,
            "no sweep below the threshold"
        );
        registry.keep_home(&test_key_metered(5_000, Metering::Unmetered));
        assert_eq!(registry.others.len, 8, "the seven held and the new one");
        assert!(held[1..].iter().all(|h| registry.home_of(h.id()).is_some()));
        assert!(registry.home_of(5_000).is_some());
        assert!(registry.all().is_empty(), "none of them is a meter");
    }

    #[test]
    fn a_full_table_has_a_third_more_slots_than_keys() {
        for n in [
            1usize, 2, 3, 4, 5, 11, 12, 13, 16, 17, 24, 100, 1_000, 4_097, 20_000,
        ] {
            let mut registry = Registry::with_capacity(n);
            let keys: Vec<Arc<CachedKey>> = (1..=n as u64 + 1).map(test_key).collect();
            for key in &keys[..n] {
                registry.insert(MeterRef::Own(key.clone()));
            }
            let full = n + n / 3 + 1;
            let size = registry.keys.slots.len();
            if n % 12 == 0 {
                // 12 × 2ᵏ keys fill a doubled size, 16 × 2ᵏ slots, to three quarters.
                assert_eq!(size, n / 3 * 4, "{n} keys");
            } else {
                assert_eq!(size, full, "{n} keys");
            }
            // Past the capacity (evicted keys still in use) it grows by about a quarter.
            registry.insert(MeterRef::Own(keys[n].clone()));
            let grown = registry.keys.slots.len();
            let limit = (full + full / 4).max(n + 1 + (n + 1) / 3 + 1);
            assert!(grown > size && grown <= limit, "{n} keys: {grown}");
            assert!(keys.iter().all(|k| registry.get(k.id()).is_some()));
        }
    }
}
