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
