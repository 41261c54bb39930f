//! Time, injected: every expiry, refill and rate window reads a [`Clock`], so tests advance a
//! [`ManualClock`] instead of sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn as_millis(self) -> u64 {
        self.0
    }

    /// This instant plus `secs` seconds (saturating).
    pub fn plus_secs(self, secs: u64) -> Timestamp {
        Timestamp(self.0.saturating_add(secs.saturating_mul(1000)))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({})", self.0)
    }
}

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;

    /// Nanoseconds on a clock that never goes back, from any fixed start. Rate limits measure
    /// their windows on it, so that a wall clock stepped back (NTP, a resumed VM) does not
    /// hold every recently used key back by the step. The default is [`now`](Self::now) in
    /// nanoseconds, right for a clock that never goes back itself (and reads before the
    /// year 2554, past which its nanoseconds no longer fit).
    fn monotonic_ns(&self) -> u64 {
        self.now().0.saturating_mul(1_000_000)
    }

    /// How far a reading of [`monotonic_ns`](Self::monotonic_ns) may lag the time it stands
    /// for: a clock that moves once per kernel tick is up to a tick behind. A rate limit's
    /// retry-after adds it, so that a client waiting exactly that long is not refused again.
    /// The default is zero.
    fn monotonic_resolution(&self) -> Duration {
        Duration::ZERO
    }
}

/// The operating system's wall clock at full resolution.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(since.as_millis() as u64)
    }

    fn monotonic_ns(&self) -> u64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let start = START.get_or_init(std::time::Instant::now);
        u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The operating system's wall clock at the kernel's tick resolution (Linux:
/// `CLOCK_REALTIME_COARSE`, 1–4 ms depending on the kernel's tick rate; elsewhere the same as
/// [`SystemClock`]). The default clock of a [`Config`](crate::Config).
///
/// `verify` reads the clock on every request. A precise read (`rdtsc` behind an ordering
/// fence) first waits for every memory access in flight, which on a large cache means the
/// request's cache misses; the coarse clock is a plain read of a value the kernel keeps.
/// Measured at 1M cached keys: verify + commit 1,351 → 1,258 ns (medians of six interleaved
/// runs; docs/PERFORMANCE.md, "Fifth round"). The price: an expiry or a rate window takes
/// effect up to one tick late. Pass [`SystemClock`] to `ConfigBuilder::clock` to trade the
/// other way.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoarseClock;

impl Clock for CoarseClock {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn now(&self) -> Timestamp {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
        let millis = (t.tv_sec.max(0) as u64)
            .saturating_mul(1000)
            .saturating_add(t.tv_nsec.max(0) as u64 / 1_000_000);
        Timestamp(millis)
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn now(&self) -> Timestamp {
        SystemClock.now()
    }

    /// `CLOCK_MONOTONIC_COARSE`: a plain read, like [`now`](Clock::now).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn monotonic_ns(&self) -> u64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
        (t.tv_sec.max(0) as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec.max(0) as u64)
    }

    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    fn monotonic_ns(&self) -> u64 {
        SystemClock.monotonic_ns()
    }

    /// The kernel's tick (`clock_getres` of `CLOCK_MONOTONIC_COARSE`: 1–4 ms).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn monotonic_resolution(&self) -> Duration {
        let t = rustix::time::clock_getres(rustix::time::ClockId::MonotonicCoarse);
        Duration::new(
            t.tv_sec.max(0) as u64,
            t.tv_nsec.clamp(0, 999_999_999) as u32,
        )
    }
}

/// A clock that moves only when told to. Clones share the same time. Like a real system's,
/// its monotonic clock moves with every step forward and stays put when the wall clock is
/// [`set`](Self::set) back.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<ManualTimes>);

#[derive(Debug, Default)]
struct ManualTimes {
    /// The wall clock, ms; changed only under `steps`.
    wall: AtomicU64,
    /// The monotonic clock, ms since the clock was made (from the epoch, its nanoseconds
    /// would pass `u64::MAX` for a clock started after the year 2554).
    monotonic: AtomicU64,
    steps: parking_lot::Mutex<()>,
}

impl ManualClock {
    /// A clock set to `start`.
    pub fn new(start: Timestamp) -> Self {
        let clock = ManualClock::default();
        clock.0.wall.store(start.0, Ordering::SeqCst);
        clock
    }

    /// Moves the clock forward by `secs` seconds. Steps from several threads all count.
    pub fn advance_secs(&self, secs: u64) {
        self.step(|from| from.saturating_add(secs.saturating_mul(1000)));
    }

    /// Sets the wall clock to `to`; the monotonic clock moves forward as much, or not at all.
    pub fn set(&self, to: Timestamp) {
        self.step(|_| to.0);
    }

    /// Moves the wall clock from where it is to where `to` says, in one step.
    fn step(&self, to: impl FnOnce(u64) -> u64) {
        let _step = self.0.steps.lock();
        let from = self.0.wall.load(Ordering::SeqCst);
        let to = to(from);
        self.0.wall.store(to, Ordering::SeqCst);
        let monotonic = self.0.monotonic.load(Ordering::SeqCst);
        let monotonic = monotonic.saturating_add(to.saturating_sub(from));
        self.0.monotonic.store(monotonic, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.wall.load(Ordering::SeqCst))
    }

    fn monotonic_ns(&self) -> u64 {
        self.0
            .monotonic
            .load(Ordering::SeqCst)
            .saturating_mul(1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default clock reports the tick it moves by, which retry-afters add.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_coarse_clock_reports_its_tick() {
        let tick = CoarseClock.monotonic_resolution();
        assert!(
            tick > Duration::ZERO && tick <= Duration::from_millis(20),
            "{tick:?}"
        );
    }

    /// Found by a reviewer: `advance_secs` read the time outside the step's lock, so two
    /// threads advancing at once could both move it from the same time (four threads'
    /// 200,000 steps of a second moved it 80,000–172,000 s).
    #[test]
    fn steps_from_several_threads_all_count() {
        let clock = ManualClock::new(Timestamp(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..20_000).for_each(|_| clock.advance_secs(1)));
            }
        });
        assert_eq!(clock.now(), Timestamp(80_000_000));
        assert_eq!(clock.monotonic_ns(), 80_000_000 * 1_000_000);
    }

    #[test]
    fn a_manual_clocks_monotonic_time_moves_forward_only() {
        let clock = ManualClock::new(Timestamp(10_000));
        let at = |ms: u64| ms * 1_000_000;
        assert_eq!(clock.monotonic_ns(), 0, "counted from the clock's start");
        clock.advance_secs(2);
        assert_eq!(clock.monotonic_ns(), at(2_000));
        clock.set(Timestamp(5_000));
        assert_eq!(clock.now(), Timestamp(5_000));
        assert_eq!(
            clock.monotonic_ns(),
            at(2_000),
            "a step back does not move it"
        );
        clock.set(Timestamp(5_500));
        assert_eq!(clock.monotonic_ns(), at(2_500), "steps forward do");
        // Started far in the future, it still counts (found by a reviewer: from the epoch,
        // past the year 2554 its nanoseconds stuck at `u64::MAX` and rate limits never let
        // a key through again).
        let far = ManualClock::new(Timestamp(20_000_000_000_000));
        far.advance_secs(5);
        assert_eq!(far.monotonic_ns(), at(5_000));
        let a = CoarseClock.monotonic_ns();
        assert!(CoarseClock.monotonic_ns() >= a);
        let b = SystemClock.monotonic_ns();
        assert!(SystemClock.monotonic_ns() >= b);
    }

    /// The default clock is the wall clock, a tick behind at most (a tick is ≤ 10 ms on any
    /// kernel this runs on; the bound leaves room for a descheduled test thread).
    #[test]
    fn the_coarse_clock_reads_the_wall_clock() {
        for _ in 0..100 {
            let before = SystemClock.now().0;
            let coarse = CoarseClock.now().0;
            let after = SystemClock.now().0;
            assert!(coarse <= after, "coarse {coarse} is ahead of {after}");
            assert!(
                before - coarse.min(before) < 100,
                "coarse {coarse} lags {before}"
            );
        }
    }
}
