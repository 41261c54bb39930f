//! How long requests waited for the credit writer (their lease had run out): a histogram of
//! powers of two, so that a server — and `keyledger bench` — can see the tail of those waits
//! without timing every request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const BUCKETS: usize = 32;
/// Bucket 0 ends at 2^`SHIFT` ns (1 µs: nothing waits for another thread less).
const SHIFT: u32 = 10;

/// Counts of lease waits by duration: bucket 0 counts waits under 1,024 ns, bucket `i` those
/// from 2^(`i`+9) to 2^(`i`+10) ns; the last one also counts any longer (over 18 minutes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LeaseWaits {
    buckets: [u64; BUCKETS],
}

impl LeaseWaits {
    /// Number of waits.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// An upper bound of the `p`-th percentile wait (`p` in 0–100): the end of its bucket,
    /// so at most twice the real figure (a wait over 18 minutes reads as 36). `None` without
    /// waits.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * count as f64)
            .ceil()
            .max(1.0) as u64;
        let mut seen = 0;
        let bucket = self.buckets.iter().position(|&n| {
            seen += n;
            seen >= rank
        })?;
        Some(Duration::from_nanos(1u64 << (bucket as u32 + SHIFT)))
    }

    /// An upper bound of the longest wait (see [`percentile`](Self::percentile)).
    pub fn max(&self) -> Option<Duration> {
        self.percentile(100.0)
    }

    /// The waits counted since `earlier`, a snapshot taken before this one.
    pub fn since(&self, earlier: &LeaseWaits) -> LeaseWaits {
        let mut out = *self;
        for (now, before) in out.buckets.iter_mut().zip(earlier.buckets) {
            *now = now.saturating_sub(before);
        }
        out
    }
}

/// The live histogram behind [`LeaseWaits`].
#[derive(Debug, Default)]
pub(crate) struct WaitHistogram {
    buckets: [AtomicU64; BUCKETS],
}

impl WaitHistogram {
    /// Counts one wait.
    pub(crate) fn record(&self, wait: Duration) {
        let ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        let bucket = (u64::BITS - (ns >> SHIFT).leading_zeros()) as usize;
        self.buckets[bucket.min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// The counts now.
    pub(crate) fn snapshot(&self) -> LeaseWaits {
        LeaseWaits {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_counted_by_power_of_two_and_read_back_as_upper_bounds() {
        let h = WaitHistogram::default();
        assert_eq!(h.snapshot().max(), None, "no waits yet");
        for us in [3, 5, 6, 7, 900] {
            h.record(Duration::from_micros(us));
        }
        let before = h.snapshot();
        assert_eq!(before.count(), 5);
        // 3 µs is in [2.0, 4.1) µs; 5–7 µs in [4.1, 8.2); 900 µs in [524, 1049).
        assert_eq!(before.percentile(20.0), Some(Duration::from_nanos(1 << 12)));
        assert_eq!(before.percentile(80.0), Some(Duration::from_nanos(1 << 13)));
        assert_eq!(before.max(), Some(Duration::from_nanos(1 << 20)));
        h.record(Duration::from_millis(150));
        let run = h.snapshot().since(&before);
        assert_eq!(run.count(), 1, "only the wait after the first snapshot");
        assert_eq!(
            run.max(),
            Some(Duration::from_nanos(1 << 28)),
            "268 ms bounds 150 ms"
        );
        h.record(Duration::from_nanos(10));
        h.record(Duration::MAX);
        let all = h.snapshot();
        assert_eq!(all.percentile(0.0), Some(Duration::from_nanos(1 << 10)));
        assert_eq!(
            all.max(),
            Some(Duration::from_nanos(1 << 41)),
            "the last bucket"
        );
    }
}
