//! When to sweep a table whose dead entries only a full scan finds (shared states no one
//! holds, dead weak references, homes nothing uses): once it has doubled since the last
//! sweep left it, never below [`SWEEP_FROM`] entries. Sweeping then costs O(1) per insert,
//! amortized, and a table of live entries is not scanned again until it has doubled.

/// No sweep below this many entries.
pub(crate) const SWEEP_FROM: usize = 1_024;

/// The length at which a table is next due for a sweep.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SweepSchedule {
    due_at: usize,
    /// The schedule never waits past this length (a table bounded at it is swept whenever
    /// full, as often as its owner allows).
    most: usize,
}

impl Default for SweepSchedule {
    fn default() -> Self {
        SweepSchedule::up_to(usize::MAX)
    }
}

impl SweepSchedule {
    /// A schedule for a table bounded at `most` entries.
    pub(crate) const fn up_to(most: usize) -> Self {
        SweepSchedule {
            due_at: if SWEEP_FROM < most { SWEEP_FROM } else { most },
            most,
        }
    }

    /// Whether a table of `len` entries is due.
    pub(crate) fn due(&self, len: usize) -> bool {
        len >= self.due_at
    }

    /// A sweep left `len` entries: the next is due once they have doubled.
    pub(crate) fn swept(&mut self, len: usize) {
        self.due_at = len
            .saturating_mul(2)
            .clamp(SWEEP_FROM.min(self.most), self.most);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_due_once_it_has_doubled_and_never_below_the_floor_or_past_its_bound() {
        let mut s = SweepSchedule::default();
        assert!(!s.due(SWEEP_FROM - 1) && s.due(SWEEP_FROM));
        s.swept(3_000);
        assert!(!s.due(5_999) && s.due(6_000));
        s.swept(10);
        assert!(!s.due(SWEEP_FROM - 1) && s.due(SWEEP_FROM), "the floor");
        let mut bounded = SweepSchedule::up_to(4_096);
        bounded.swept(4_000);
        assert!(!bounded.due(4_095) && bounded.due(4_096), "the bound");
        assert!(
            SweepSchedule::up_to(100).due(100),
            "a bound below the floor"
        );
    }
}
