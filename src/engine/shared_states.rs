//! States the cached keys share — an account's, an interned scope — each forgotten once
//! nothing but its map holds it. Both maps only ever grew before (found by a reviewer: about
//! 12 KB an account with 100 entitlements, kept whatever the cache's capacity after its keys
//! had left it). A map is swept whenever it has doubled since its last sweep, so sweeping
//! costs O(1) per insert, amortized, and only misses insert.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

/// No sweep below this many entries.
const SWEEP_FROM: usize = 1_024;

/// A map of shared states (a `HashMap` by id, or a `HashSet` interning by value). Read it
/// through `Deref`; insert through [`insert`](SharedStates::insert), which sweeps.
#[derive(Default)]
pub(super) struct SharedStates<M> {
    map: M,
    swept_len: usize,
}

impl<M> std::ops::Deref for SharedStates<M> {
    type Target = M;
    fn deref(&self) -> &M {
        &self.map
    }
}

impl<M> SharedStates<M> {
    /// Whether a map of `len` entries is due for a sweep; if so, `sweep` runs and the length
    /// it leaves is the next sweep's base.
    fn sweep_if_grown(&mut self, len: usize, sweep: impl FnOnce(&mut M) -> usize) {
        if len >= (2 * self.swept_len).max(SWEEP_FROM) {
            self.swept_len = sweep(&mut self.map);
        }
    }
}

// A state only this map holds has no cached key, carried snapshot or grant left holding it;
// no one can clone it but through the map, whose lock the caller holds: the count is stable.
fn unheld<T>(state: &Arc<T>) -> bool {
    Arc::strong_count(state) == 1
}

impl<V> SharedStates<HashMap<u64, Arc<V>>> {
    pub(super) fn insert(&mut self, id: u64, state: Arc<V>) {
        self.sweep_if_grown(self.map.len(), |map| {
            map.retain(|_, s| !unheld(s));
            map.len()
        });
        self.map.insert(id, state);
    }

    pub(super) fn remove(&mut self, id: u64) {
        self.map.remove(&id);
    }
}

impl<T: Hash + Eq> SharedStates<HashSet<Arc<T>>> {
    pub(super) fn insert(&mut self, state: Arc<T>) {
        self.sweep_if_grown(self.map.len(), |set| {
            set.retain(|s| !unheld(s));
            set.len()
        });
        self.map.insert(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_nothing_else_holds_are_forgotten_once_the_map_has_doubled() {
        let mut states = SharedStates::<HashMap<u64, Arc<u64>>>::default();
        let held: Vec<Arc<u64>> = (0..10).map(Arc::new).collect();
        for (id, state) in held.iter().enumerate() {
            states.insert(id as u64, state.clone());
        }
        for id in 10..SWEEP_FROM as u64 {
            states.insert(id, Arc::new(id)); // dropped by the caller at once
        }
        assert_eq!(states.len(), SWEEP_FROM, "no sweep below the threshold");
        states.insert(u64::MAX, Arc::new(0));
        assert_eq!(
            states.len(),
            held.len() + 1,
            "the held ones and the new one"
        );
        assert!((0..10).all(|id| states.contains_key(&id)));

        let mut interned = SharedStates::<HashSet<Arc<u64>>>::default();
        let kept = Arc::new(7);
        interned.insert(kept.clone());
        for v in 100..100 + SWEEP_FROM as u64 {
            interned.insert(Arc::new(v));
        }
        assert_eq!(
            interned.len(),
            2,
            "swept at the threshold: the held one and the last"
        );
        assert!(interned.contains(&kept));
    }
}
