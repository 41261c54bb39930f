//! Rate-limit states shared by all of a key's cached entries, and kept for evicted keys
//! whose window still counts.

use std::sync::Arc;

use std::collections::HashMap;

use crate::holders::held_by_at_most;
use crate::limits::{KeyLimits, SpendTier};
use crate::sweep::SweepSchedule;

/// The rate-limit state of each cached key with limits, so that all of a key's cached
/// entries share one: during a roll's grace its two secrets are cached apart, and each with
/// limits of its own would admit twice the key's rate (and a roll would start one afresh).
/// Held weakly: the state lives as long as an entry or carried snapshot uses it — and, for
/// an entry evicted to make room or by a hash-scheme rotation, in `held` for as long as its
/// window still counts arrivals, so that losing the entry does not hand the key a fresh window.
pub(crate) struct LiveLimits {
    /// The configured spend tiers.
    tiers: Vec<SpendTier>,
    by_key: HashMap<u64, std::sync::Weak<KeyLimits>>,
    /// When dead references are next swept.
    sweeps: SweepSchedule,
    /// Evicted keys' states still running (see [`KeyLimits::running`]), until the key's next
    /// miss takes its state back. At most [`MAX_HELD`]; beyond that an evicted key starts a
    /// fresh window, as every one did before.
    pub(super) held: HashMap<u64, Arc<KeyLimits>>,
    /// When states no longer running are next swept from `held`; once it is full of
    /// running ones, at most once a second (a sweep reads every state).
    held_sweeps: SweepSchedule,
    held_swept_ns: u64,
    /// Each key's limits generation, moved on by every admin change that reconfigures its
    /// windows (absent: 0), with the limits the change configures. A miss reuses only a
    /// state of the key's current generation, so limits changed and changed back start new
    /// windows; the generation moves before the change commits, so a miss that reads the new
    /// limits builds its state in the new one. A miss that reads while the change commits
    /// sees the new generation with the old limits: its state is not the key's current one
    /// (see [`current`](Self::current)).
    generations: HashMap<u64, (u64, crate::record::Limits)>,
    /// The generation of the last change whose `reconfigure` pruned `generations`: a key
    /// absent since may have been reconfigured then, so a miss whose read began before
    /// reads again (it may have read a change's old limits, and its state would pass for
    /// the key's current one).
    pruned_through: u64,
}

/// Evicted keys whose rate-limit state is kept (≈ 100 bytes each with the map's slot for a
/// key with one limit; a reviewer measured ≈ 2.2 KB for one with 16 limits and a token
/// window). A key evicted while this many are held starts its windows afresh (README).
pub(super) const MAX_HELD: usize = 65_536;

/// The rate-limit state a miss chose for its entry (see [`LiveLimits::of`]).
pub(super) struct Chosen {
    pub(super) limits: Arc<KeyLimits>,
    /// The key's live state before, which a miss that cannot cache gives back.
    pub(super) previous: Option<std::sync::Weak<KeyLimits>>,
}

impl LiveLimits {
    /// No state yet, with the configured spend `tiers`.
    pub(crate) fn new(tiers: Vec<SpendTier>) -> Self {
        LiveLimits {
            tiers,
            by_key: HashMap::new(),
            sweeps: SweepSchedule::default(),
            held: HashMap::new(),
            held_sweeps: SweepSchedule::up_to(MAX_HELD),
            held_swept_ns: 0,
            generations: HashMap::new(),
            pruned_through: 0,
        }
    }

    /// The limits for a new entry of key `id` configured as `configured`: the state of an
    /// entry of the key still in use, or else the one `carried` over from an evicted entry,
    /// if built from the same configuration; else a new one, built by `new` from the most
    /// lifetime spend those counted (spend not yet flushed still counts for the tiers).
    ///
    /// `None`: the key was reconfigured after the miss's read began (`read_generation` is
    /// the last generation handed out then): what it read may be the old limits, whose new
    /// state would admit a fresh window; the miss reads again.
    pub(super) fn of(
        &mut self,
        id: u64,
        configured: &crate::record::Limits,
        carried: Option<&Arc<KeyLimits>>,
        read_generation: u64,
        new: impl FnOnce(u64) -> KeyLimits,
    ) -> Option<Chosen> {
        let generation = match self.generations.get(&id) {
            Some((generation, _)) => *generation,
            None if self.pruned_through > read_generation => return None,
            None => 0,
        };
        if generation > read_generation {
            return None;
        }
        let live = self.by_key.get(&id).and_then(std::sync::Weak::upgrade);
        // Left in `held` until the miss caches its entry (`release`, just before the insert);
        // a miss that cannot cache holds what it chose again (`uncached`).
        let held = self.held.get(&id).cloned();
        let known = || live.iter().chain(carried).chain(held.iter());
        let current =
            |l: &&Arc<KeyLimits>| l.generation == generation && l.configured_as(configured);
        let limits = match known().find(current) {
            Some(same) => same.clone(),
            None => {
                let spent = known().map(|l| l.lifetime_spent()).max().unwrap_or(0);
                let mut state = new(spent);
                state.generation = generation;
                Arc::new(state)
            }
        };
        let previous = self.by_key.insert(id, Arc::downgrade(&limits));
        if self.sweeps.due(self.by_key.len()) {
            self.by_key.retain(|_, l| l.strong_count() > 0);
            self.sweeps.swept(self.by_key.len());
        }
        Some(Chosen { limits, previous })
    }

    /// A miss that chose `chosen` for key `id` could not cache its entry (an admin change
    /// raced its read): it serves one request. The state it chose is held, so that the window
    /// that request counts in is the next miss's too; and the key's live state goes back to
    /// what it was, since what the miss read may be older than the entries cached meanwhile
    /// (it would split the key between two states).
    pub(super) fn uncached(&mut self, id: u64, chosen: &Chosen, now_ns: u64) {
        let ours = Arc::downgrade(&chosen.limits);
        let still_ours = self.by_key.get(&id).is_some_and(|l| l.ptr_eq(&ours));
        let previous = chosen.previous.as_ref();
        if let Some(previous) = previous.filter(|p| still_ours && p.strong_count() > 0) {
            self.by_key.insert(id, previous.clone());
        }
        self.hold(id, &chosen.limits, true, now_ns);
    }

    /// Keeps the state of an evicted entry of key `id` while it still counts arrivals at
    /// `now_ns` or is still `in_use` (a grant holding the entry may yet charge it: a token
    /// count known only at commit), unless `held` is full of such states.
    /// Only the key's [`current`](Self::current) state is held: another is reused by no miss,
    /// and held it would take the place of the current one, which `held` may be all that
    /// keeps (found by a reviewer: a miss that read while a change narrowing the limits to 1
    /// an hour committed, installing late, dropped the new window's running state, and the
    /// key was admitted twice in the hour).
    pub(super) fn hold(&mut self, id: u64, limits: &Arc<KeyLimits>, in_use: bool, now_ns: u64) {
        if (!in_use && !limits.running(now_ns)) || !self.current(id, limits) {
            return;
        }
        let full = self.held.len() >= MAX_HELD;
        let due = !full || now_ns >= self.held_swept_ns.saturating_add(1_000_000_000);
        if self.held_sweeps.due(self.held.len()) && due {
            // Held here only, and no longer counting: a fresh state admits the same.
            self.held
                .retain(|_, l| !held_by_at_most(l, 1) || l.running(now_ns));
            self.held_sweeps.swept(self.held.len());
            self.held_swept_ns = now_ns;
        }
        if self.held.len() >= MAX_HELD {
            // Full between sweeps: a few states looked at, those run out let go, so that a
            // running window is not dropped for states that count nothing any more (found by
            // a reviewer: a key admitted twice in its hour). A few, not all: a full sweep is
            // what the second between sweeps bounds.
            const LOOKED_AT: usize = 64;
            let run_out: Vec<u64> = (self.held.iter().take(LOOKED_AT))
                .filter(|(_, l)| held_by_at_most(l, 1) && !l.running(now_ns))
                .map(|(id, _)| *id)
                .collect();
            for id in run_out {
                self.held.remove(&id);
            }
        }
        if self.held.len() < MAX_HELD {
            self.held.insert(id, limits.clone());
        }
    }

    /// A flush made key `id`'s lifetime spend `spent` durable: its live state counts at least
    /// that, which includes spend that bypassed it (a grant that held an older entry across
    /// a change, an entry whose state was let go before its spend was flushed).
    pub(crate) fn spent_durably(&mut self, id: u64, spent: u64) {
        if self.tiers.is_empty() {
            return;
        }
        if let Some(state) = self.by_key.get(&id).and_then(std::sync::Weak::upgrade) {
            state.count_at_least(spent, &self.tiers);
        }
    }

    /// Whether `state` is key `id`'s current one: of its current generation and, if a change
    /// moved that on, configured as the change configures (not built from the limits a miss
    /// read while the change was committing).
    fn current(&self, id: u64, state: &KeyLimits) -> bool {
        match self.generations.get(&id) {
            None => state.generation == 0,
            Some((generation, configured)) => {
                state.generation == *generation && state.configured_as(configured)
            }
        }
    }

    /// An admin change is about to give key `id` other limits, `configured`: its next miss
    /// starts new windows, those of `generation`.
    pub(super) fn reconfigure(
        &mut self,
        id: u64,
        generation: u64,
        configured: &crate::record::Limits,
    ) {
        self.held.remove(&id);
        if self.generations.len() >= MAX_HELD {
            // Only keys with a state still known need theirs: any other's next state is new.
            let known = |id: &u64| {
                self.held.contains_key(id)
                    || self.by_key.get(id).is_some_and(|l| l.strong_count() > 0)
            };
            self.generations.retain(|id, _| known(id));
            self.pruned_through = generation;
        }
        self.generations
            .insert(id, (generation, configured.clone()));
    }

    /// Key `id`'s new entry, sharing `limits`, is cached: the state need not be held apart.
    pub(super) fn release(&mut self, id: u64, limits: &Arc<KeyLimits>) {
        if self.held.get(&id).is_some_and(|h| Arc::ptr_eq(h, limits)) {
            self.held.remove(&id);
        }
    }
}
