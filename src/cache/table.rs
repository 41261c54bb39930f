//! One cache shard's table: open addressing with linear probing over 24-byte entries.
//!
//! Key hashes are HMAC outputs, so their bytes are already uniformly random: the first 8
//! bytes are the entry's key (and choose its home slot), the next 8 its tag, checked on a
//! match and stored with its low bit set (an empty entry's tag is 0), so a hit compares 127
//! bits of the hash — as unforgeable as the whole without knowing the pepper. Compared
//! with a general-purpose map holding the 32-byte hash this halves the memory per key and a
//! look-up reads one entry instead of a control byte and then a bucket.
//!
//! Removal shifts later entries of the cluster back (no tombstones), so probe sequences stay
//! short however many keys come and go.

use std::sync::Arc;

use super::CachedKey;
use crate::hashing::KeyHash;

/// What an entry holds: a cached key, or a remembered miss (8 bytes: a miss is the null
/// pointer).
#[derive(Debug)]
pub(crate) enum Slot {
    Key(Arc<CachedKey>),
    Missing,
}

/// 24 bytes: the hash's key and tag, and the slot.
#[derive(Debug)]
struct Entry {
    key: u64,
    /// The tag with its low bit set; [`EMPTY`] for an empty entry.
    tag: u64,
    slot: Slot,
}

const EMPTY: u64 = 0;

impl Default for Entry {
    fn default() -> Self {
        Entry {
            key: 0,
            tag: EMPTY,
            slot: Slot::Missing,
        }
    }
}

impl Entry {
    #[inline]
    fn is_empty(&self) -> bool {
        self.tag == EMPTY
    }
}

/// The entry key and stored tag of a hash.
#[inline]
fn split(hash: &KeyHash) -> (u64, u64) {
    let word = |i: usize| u64::from_le_bytes(hash[i..i + 8].try_into().expect("8 bytes"));
    (word(0), word(8) | 1)
}

/// A table holding at most `capacity` entries. It starts small and doubles as it fills,
/// the last step straight to its full size; a quarter of its entries always stay empty, so
/// probe sequences are short and always end.
#[derive(Debug)]
pub(crate) struct Table {
    entries: Box<[Entry]>,
    len: usize,
    /// How many of the `len` entries are remembered misses (so forgetting them all can
    /// skip a table that has none).
    missing: usize,
    capacity: usize,
}

/// Entries needed to hold `n` at three quarters full.
fn size_for(n: usize) -> usize {
    n + n / 3 + 1
}

fn empty(size: usize) -> Box<[Entry]> {
    (0..size).map(|_| Entry::default()).collect()
}

impl Table {
    pub(crate) fn new(capacity: usize) -> Self {
        Table {
            entries: empty(size_for(capacity.min(16))),
            len: 0,
            missing: 0,
            capacity,
        }
    }

    /// Entries this table holds before it must grow (or, at full size, evict).
    fn limit(&self) -> usize {
        (self.entries.len() * 3 / 4).min(self.capacity)
    }

    /// Doubles the entry array (or takes it to full size), re-placing every entry.
    fn grow(&mut self) {
        let size = (self.entries.len() * 2).min(size_for(self.capacity));
        let old = std::mem::replace(&mut self.entries, empty(size));
        for entry in old.into_vec() {
            if !entry.is_empty() {
                self.place(entry);
            }
        }
    }

    /// Puts an entry known to be absent in the first free place of its probe sequence.
    fn place(&mut self, entry: Entry) {
        let mut i = self.home(entry.key);
        while !self.entries[i].is_empty() {
            i = self.next(i);
        }
        self.entries[i] = entry;
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// How many entries are remembered misses.
    pub(crate) fn missing(&self) -> usize {
        self.missing
    }

    /// Bytes of the entry array (allocated up front).
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(&*self.entries)
    }

    /// Whether a new entry would evict one.
    pub(crate) fn is_full(&self) -> bool {
        self.len >= self.capacity
    }

    /// Where probing for `key` starts: the key scaled onto the table (no division).
    #[inline]
    fn home(&self, key: u64) -> usize {
        ((key as u128 * self.entries.len() as u128) >> 64) as usize
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.entries.len() {
            0
        } else {
            i + 1
        }
    }

    /// The index of the entry for (`key`, `tag`).
    #[inline]
    fn find(&self, key: u64, tag: u64) -> Option<usize> {
        let mut i = self.home(key);
        loop {
            let entry = &self.entries[i];
            if entry.is_empty() {
                return None;
            }
            if entry.key == key && entry.tag == tag {
                return Some(i);
            }
            i = self.next(i);
        }
    }

    /// The slot for `hash`.
    #[inline]
    pub(crate) fn get(&self, hash: &KeyHash) -> Option<&Slot> {
        let (key, tag) = split(hash);
        self.find(key, tag).map(|i| &self.entries[i].slot)
    }

    /// Puts `slot` in for `hash`. Returns what it replaced, and what was evicted to make room
    /// when the table was full.
    pub(crate) fn insert(&mut self, hash: &KeyHash, slot: Slot) -> (Option<Slot>, Option<Slot>) {
        let (key, tag) = split(hash);
        // Counted once in the table: `evict_near` looks for the misses already there.
        let miss = usize::from(matches!(slot, Slot::Missing));
        if let Some(i) = self.find(key, tag) {
            let replaced = std::mem::replace(&mut self.entries[i].slot, slot);
            self.missing = self.missing + miss - usize::from(matches!(replaced, Slot::Missing));
            return (Some(replaced), None);
        }
        while self.len >= self.limit() && self.limit() < self.capacity {
            self.grow();
        }
        let evicted = if self.len >= self.capacity {
            self.evict_near(key)
        } else {
            None
        };
        self.place(Entry { key, tag, slot });
        self.len += 1;
        self.missing += miss;
        (None, evicted)
    }

    /// Removes the first remembered miss at or after `key`'s home if the table holds one (a
    /// flood of unknown keys must not cost the real ones their places: found by a reviewer,
    /// keys then evicted each other while the misses stayed), else the first entry there
    /// (one in its way, which the insert that follows then needs to probe past one less).
    fn evict_near(&mut self, key: u64) -> Option<Slot> {
        let mut i = self.home(key);
        let miss = |e: &Entry| !e.is_empty() && matches!(e.slot, Slot::Missing);
        let wanted = |e: &Entry| {
            if self.missing > 0 {
                miss(e)
            } else {
                !e.is_empty()
            }
        };
        while !wanted(&self.entries[i]) {
            i = self.next(i);
        }
        self.remove_at(i)
    }

    /// Removes the slot for `hash`.
    pub(crate) fn remove(&mut self, hash: &KeyHash) -> Option<Slot> {
        let (key, tag) = split(hash);
        let i = self.find(key, tag)?;
        self.remove_at(i)
    }

    /// Empties entry `hole`, then moves back each later entry of the cluster that may live
    /// there (its home is not between the hole and where it is).
    fn remove_at(&mut self, mut hole: usize) -> Option<Slot> {
        let removed = std::mem::take(&mut self.entries[hole]);
        if removed.is_empty() {
            return None;
        }
        self.len -= 1;
        self.missing -= usize::from(matches!(removed.slot, Slot::Missing));
        let size = self.entries.len();
        let mut j = hole;
        loop {
            j = self.next(j);
            if self.entries[j].is_empty() {
                return Some(removed.slot);
            }
            let home = self.home(self.entries[j].key);
            if (hole + size - home) % size < (j + size - home) % size {
                self.entries.swap(hole, j);
                hole = j;
            }
        }
    }

    /// Keeps only the slots `keep` accepts.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&Slot) -> bool) {
        let size = self.entries.len();
        let old = std::mem::replace(&mut self.entries, empty(size));
        self.len = 0;
        self.missing = 0;
        for entry in old.into_vec() {
            if !entry.is_empty() && keep(&entry.slot) {
                self.missing += usize::from(matches!(entry.slot, Slot::Missing));
                self.place(entry);
                self.len += 1;
            }
        }
    }

    /// Takes every slot out.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = Slot> {
        let old = std::mem::replace(self, Table::new(self.capacity));
        old.entries
            .into_vec()
            .into_iter()
            .filter(|e| !e.is_empty())
            .map(|e| e.slot)
    }

    /// Every slot.
    pub(crate) fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.entries
            .iter()
            .filter(|e| !e.is_empty())
            .map(|e| &e.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn hash(key: u64, tag: u64) -> KeyHash {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&key.to_le_bytes());
        // The tag's low bit is not compared (it marks the entry taken).
        h[8..16].copy_from_slice(&(tag << 1).to_le_bytes());
        h
    }

    proptest! {
        /// Inserts and removes (keys drawn from a small range, so clusters and wrap-around
        /// are common) agree with a `HashMap` on every look-up.
        #[test]
        fn behaves_like_a_map(ops in proptest::collection::vec((any::<bool>(), any::<bool>(), 0u64..40, 0u64..3), 1..400)) {
            let mut table = Table::new(64);
            // Whether each entry is a remembered miss.
            let mut model: HashMap<(u64, u64), bool> = HashMap::new();
            for (insert, miss, k, t) in ops {
                // Spread the small keys over the whole u64 range so homes differ.
                let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let h = hash(key, t);
                if insert && (model.len() < 64 || model.contains_key(&(key, t))) {
                    let slot = if miss { Slot::Missing } else { Slot::Key(super::super::test_key(key)) };
                    table.insert(&h, slot);
                    model.insert((key, t), miss);
                } else if !insert {
                    let removed = table.remove(&h).is_some();
                    prop_assert_eq!(removed, model.remove(&(key, t)).is_some());
                }
                prop_assert_eq!(table.len(), model.len());
                prop_assert_eq!(table.missing(), model.values().filter(|&&m| m).count());
                for k in 0u64..40 {
                    let key = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                    for t in 0..3 {
                        let found = table.get(&hash(key, t)).is_some();
                        prop_assert_eq!(found, model.contains_key(&(key, t)));
                    }
                }
            }
        }
    }

    #[test]
    fn a_full_table_evicts_to_make_room() {
        let mut table = Table::new(8);
        for k in 1..=8u64 {
            assert!(table.insert(&hash(k << 60, 0), Slot::Missing).1.is_none());
        }
        let (replaced, evicted) = table.insert(&hash(9 << 59, 0), Slot::Missing);
        assert!(replaced.is_none());
        assert!(evicted.is_some(), "the ninth key evicts one");
        assert_eq!(table.len(), 8);
        assert!(table.get(&hash(9 << 59, 0)).is_some());
        assert_eq!(table.missing(), 8, "an evicted miss is no longer counted");
        table.retain(|_| false);
        assert_eq!((table.len(), table.missing()), (0, 0));
    }

    /// Misses remembered in a full table make room for keys before any key does, wherever
    /// they sit; only a table of keys alone evicts a key.
    #[test]
    fn a_full_table_evicts_remembered_misses_before_keys() {
        let mut table = Table::new(16);
        let key = |k: u64| k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for k in 0..16u64 {
            let slot = match k % 4 {
                0 => Slot::Missing,
                _ => Slot::Key(super::super::test_key(key(k))),
            };
            table.insert(&hash(key(k), 0), slot);
        }
        assert_eq!((table.len(), table.missing()), (16, 4));
        for k in 16..20u64 {
            let new = Slot::Key(super::super::test_key(key(k)));
            let (_, evicted) = table.insert(&hash(key(k), 0), new);
            assert!(
                matches!(evicted, Some(Slot::Missing)),
                "key {k} took a miss's place"
            );
        }
        assert_eq!((table.len(), table.missing()), (16, 0));
        let new = Slot::Key(super::super::test_key(key(20)));
        let (_, evicted) = table.insert(&hash(key(20), 0), new);
        assert!(
            matches!(evicted, Some(Slot::Key(_))),
            "no miss left: a key makes room"
        );
        // A miss into a table of keys alone (the cache never asks it to) is counted once it
        // is in: the eviction looks for no miss that is not there yet (a reviewer's point).
        let (_, evicted) = table.insert(&hash(key(21), 0), Slot::Missing);
        assert!(matches!(evicted, Some(Slot::Key(_))));
        assert_eq!((table.len(), table.missing()), (16, 1));
    }

    /// The key of the `k`th of a few keys, spread over the whole `u64` range.
    fn spread(k: u64) -> u64 {
        k.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
    }

    /// A key whose home entry is free sits there, so its look-up reads that one entry: the
    /// home is the key scaled onto the table. (With every home the same entry the table
    /// would still find every key, one probe through the whole cluster at a time.)
    #[test]
    fn a_key_whose_home_is_free_sits_there() {
        let mut table = Table::new(16);
        let size = table.entries.len();
        // The smallest key whose home is entry `i`: ⌈i · 2⁶⁴ / size⌉.
        let key = |i: usize| ((i as u128) << 64).div_ceil(size as u128) as u64;
        // Every other entry: 11 of 22, below the 16 that make the table grow.
        for i in (0..size).step_by(2) {
            table.insert(&hash(key(i), 0), Slot::Missing);
        }
        assert_eq!(table.entries.len(), size);
        for i in (0..size).step_by(2) {
            assert_eq!(table.entries[i].key, key(i), "entry {i}");
            assert!(table.get(&hash(key(i), 0)).is_some());
        }
    }

    /// Every tag word is a tag, odd ones included: the stored tag is the word with its low
    /// bit set, so a hash whose tag word is 1 is stored as 1 (not as an empty entry's 0) and
    /// found, and two hashes that differ only in that bit are one entry.
    #[test]
    fn a_hash_with_an_odd_tag_word_is_found() {
        let raw = |key: u64, tag: u64| {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&key.to_le_bytes());
            h[8..16].copy_from_slice(&tag.to_le_bytes());
            h
        };
        let mut table = Table::new(8);
        for tag in [1, 3, u64::MAX] {
            let key = Slot::Key(super::super::test_key(tag));
            assert!(table.insert(&raw(5, tag), key).0.is_none(), "tag {tag}");
        }
        assert_eq!(table.len(), 3);
        for tag in [1, 3, u64::MAX] {
            let found = table.get(&raw(5, tag));
            assert!(
                matches!(found, Some(Slot::Key(k)) if k.id() == tag),
                "tag {tag}: {found:?}"
            );
        }
        let found = table.get(&raw(5, 0));
        assert!(
            matches!(found, Some(Slot::Key(k)) if k.id() == 1),
            "{found:?}"
        );
    }

    /// `retain` keeps exactly what it accepts, where it is found again, and counts it: a
    /// table whose counts went wrong would evict keys while misses stay (or look for misses
    /// it no longer holds), or hold more than its capacity.
    #[test]
    fn retain_keeps_what_it_accepts_and_counts_it() {
        let mut table = Table::new(8);
        let slot = |k: u64| match k % 2 {
            0 => Slot::Missing,
            _ => Slot::Key(super::super::test_key(k)),
        };
        for k in 0..8u64 {
            table.insert(&hash(spread(k), 0), slot(k));
        }
        // Forgetting the misses, as the cache does after an import, keeps every key.
        table.retain(|slot| matches!(slot, Slot::Key(_)));
        assert_eq!((table.len(), table.missing()), (4, 0));
        for k in 0..8u64 {
            let found = table.get(&hash(spread(k), 0));
            assert_eq!(found.is_some(), k % 2 == 1, "key {k}: {found:?}");
        }
        for k in [8, 10, 12, 14] {
            table.insert(&hash(spread(k), 0), slot(k));
        }
        table.retain(|_| true);
        assert_eq!((table.len(), table.missing()), (8, 4));
        // Full: each new key takes a miss's place, never a key's.
        for k in [17, 19, 21, 23] {
            let (_, evicted) = table.insert(&hash(spread(k), 0), slot(k));
            assert!(
                matches!(evicted, Some(Slot::Missing)),
                "key {k}: {evicted:?}"
            );
        }
        assert_eq!((table.len(), table.missing()), (8, 0));
        for k in [1, 3, 5, 7, 17, 19, 21, 23] {
            assert!(table.get(&hash(spread(k), 0)).is_some(), "key {k}");
        }
    }

    /// `slots` lists every entry once and `drain` takes every one out (the cache recompiles
    /// and retires the keys they give), leaving an empty table of the same capacity.
    #[test]
    fn slots_and_drain_give_every_entry() {
        let mut table = Table::new(8);
        for k in 0..6u64 {
            let slot = match k % 3 {
                0 => Slot::Missing,
                _ => Slot::Key(super::super::test_key(k)),
            };
            table.insert(&hash(spread(k), 0), slot);
        }
        let given = |slots: Vec<&Slot>| {
            let mut keys: Vec<u64> = Vec::new();
            let mut misses = 0;
            for slot in slots {
                match slot {
                    Slot::Key(key) => keys.push(key.id()),
                    Slot::Missing => misses += 1,
                }
            }
            keys.sort_unstable();
            (keys, misses)
        };
        let listed = given(table.slots().collect());
        assert_eq!(listed, (vec![1, 2, 4, 5], 2));
        let drained: Vec<Slot> = table.drain().collect();
        assert_eq!(given(drained.iter().collect()), listed);
        assert_eq!((table.len(), table.missing()), (0, 0));
        assert_eq!(table.slots().count(), 0);
        for k in 0..6u64 {
            assert!(table.get(&hash(spread(k), 0)).is_none(), "key {k}");
        }
        for k in 10..18u64 {
            let (_, evicted) = table.insert(&hash(spread(k), 0), Slot::Missing);
            assert!(evicted.is_none(), "key {k}");
        }
        let (_, evicted) = table.insert(&hash(spread(18), 0), Slot::Missing);
        assert!(evicted.is_some(), "capacity 8, as before");
    }

    /// A table allocates for what it holds: it starts at 22 entries, doubles as it fills
    /// (so a filled table re-placed its entries a few times, not once per insert), and never
    /// holds more than twice the entries its keys need, up to its full size of 4/3 of its
    /// capacity: 32 bytes a key in a full table (the budget is 256 with the `CachedKey`).
    /// A quarter of its entries are always empty, so every probe ends at one.
    #[test]
    fn a_table_doubles_as_it_fills_up_to_its_full_size() {
        let capacity = 10_000;
        let mut table = Table::new(capacity);
        let entry = size_of::<Entry>();
        assert_eq!(entry, 24);
        assert_eq!(table.bytes(), 22 * entry);
        let mut sizes = vec![22];
        for k in 0..capacity as u64 {
            table.insert(&hash(spread(k), 0), Slot::Missing);
            let size = table.bytes() / entry;
            assert!(size <= (2 * size_for(table.len())).max(22), "{size} at {k}");
            // A quarter always empty: it grew before it filled past three quarters.
            assert!(
                table.len() <= size * 3 / 4,
                "{} keys in {size}",
                table.len()
            );
            if size != sizes[sizes.len() - 1] {
                sizes.push(size);
            }
        }
        assert_eq!(table.len(), capacity);
        assert_eq!(sizes[sizes.len() - 1], size_for(capacity));
        for step in sizes.windows(2).take(sizes.len() - 2) {
            assert_eq!(step[1], 2 * step[0], "{sizes:?}");
        }
        assert_eq!(sizes.len(), 11, "{sizes:?}");
        assert!(table.bytes() <= capacity * 33);
    }

    #[test]
    fn same_key_with_another_tag_is_another_entry() {
        let mut table = Table::new(8);
        table.insert(&hash(7, 1), Slot::Missing);
        assert!(table.get(&hash(7, 2)).is_none());
        table.insert(&hash(7, 2), Slot::Missing);
        assert_eq!(table.len(), 2);
        assert!(matches!(table.remove(&hash(7, 1)), Some(Slot::Missing)));
        assert!(matches!(table.get(&hash(7, 2)), Some(Slot::Missing)));
    }
}
