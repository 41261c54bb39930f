//! States the cached keys share — an account's, an interned scope — each forgotten once
//! nothing but its map holds it. Both maps only ever grew before (found by a reviewer: about
//! 12 KB an account with 100 entitlements, kept whatever the cache's capacity after its keys
//! had left it). A map is swept on a [`SweepSchedule`] (once it has doubled), and only
//! misses insert.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;

use crate::sweep::SweepSchedule;

/// A map of shared states (a `HashMap` by id, or a `HashSet` interning by value). Read it
/// through `Deref`; insert through [`insert`](SharedStates::insert), which sweeps.
#[derive(Default)]
pub(super) struct SharedStates<M> {
    map: M,
    sweeps: SweepSchedule,
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
        if self.sweeps.due(len) {
            let left = sweep(&mut self.map);
            self.sweeps.swept(left);
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
    /// Keeps `state` if the set holds fewer than `max` after a sweep that fell due (or that
    /// reaching `max` makes due: else a set swept at over half of `max` would never be
    /// swept again). Returns whether it was kept.
    pub(super) fn insert(&mut self, state: Arc<T>, max: usize) -> bool {
        let len = self.map.len();
        let sweep = |set: &mut HashSet<Arc<T>>| {
            set.retain(|s| !unheld(s));
            set.len()
        };
        if len >= max {
            let left = sweep(&mut self.map);
            self.sweeps.swept(left);
        } else {
            self.sweep_if_grown(len, sweep);
        }
        self.map.len() < max && self.map.insert(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::SWEEP_FROM;

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
        interned.insert(kept.clone(), usize::MAX);
        for v in 100..100 + SWEEP_FROM as u64 {
            interned.insert(Arc::new(v), usize::MAX);
        }
        assert_eq!(
            interned.len(),
            2,
            "swept at the threshold: the held one and the last"
        );
        assert!(interned.contains(&kept));
    }

    /// A set swept at over half its bound is swept again at the bound, not never (found by
    /// a reviewer: the next sweep was due only past the bound, which inserts never reach).
    #[test]
    fn a_bounded_set_is_swept_when_it_reaches_its_bound() {
        let max = 3 * SWEEP_FROM;
        let mut interned = SharedStates::<HashSet<Arc<u64>>>::default();
        // Swept last at 2,048 entries, all held: the next sweep falls due past the bound.
        let held: Vec<Arc<u64>> = (0..2_500).map(Arc::new).collect();
        for state in &held {
            assert!(interned.insert(state.clone(), max));
        }
        drop(held);
        let mut kept = 0;
        for v in 1_000_000..1_000_000 + 2 * max as u64 {
            kept += usize::from(interned.insert(Arc::new(v), max));
        }
        assert_eq!(kept, 2 * max, "every one kept: room is made by sweeping");
        assert!(interned.len() <= max);
    }
}
