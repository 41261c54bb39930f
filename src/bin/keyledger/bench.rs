//! `keyledger bench`: load on a scratch database. Builds `--keys` keys (bulk insert, see
//! `keyledger::bench_support`), caches them, then runs verify + commit(1) on random keys for
//! `--seconds` on `--threads` threads, and measures the floor (HMAC-SHA256 → one map get →
//! one CAS) on the same keys, the same threads and the same index stream in the same run.
//!
//! Cache misses are timed first, on one key in 16 spread over all of them, after a scan of
//! the tables a miss reads has pulled their pages into redb's page cache, each with its
//! presented key read into the CPU caches before the clock starts (a server verifies a key
//! it has just parsed). The ledger is then
//! closed and opened again with an empty cache, the pages read again, and the cache filled
//! for the memory: measured with a counting global allocator, whose bookkeeping would
//! otherwise be in the misses' times. Allocations made by the thread that fills the cache are
//! counted, and so are their frees on any thread (the credit writer drains the queues the
//! filling thread fills). The figure is malloc's footprint
//! (each request rounded up as glibc does: 8-byte header, 16-byte granularity, 32-byte
//! minimum); the raw requested bytes and the RSS growth are reported alongside, and the
//! writer's lists of keys in use (its own allocations) apart, from their capacities.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use keyledger::bench_support::{Floor, Indices, Options, Workload, percentile};
use serde::Serialize;

use crate::output::print_json;
use crate::{CliError, CliResult};

/// `bench` arguments.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Keys in the scratch database, 1 to 100,000,000 (one account per 100 keys).
    #[arg(long, default_value_t = 1_000_000, value_parser = count_parser(100_000_000))]
    pub keys: usize,
    /// Threads running verify + commit (and the floor), 1 to 1,024.
    #[arg(long, default_value_t = 1, value_parser = count_parser(1_024))]
    pub threads: usize,
    /// Seconds of verify + commit traffic, 0.1 to 86,400 (the floor runs for half as long,
    /// in two halves around it).
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    pub seconds: f64,
    /// Create keys one by one through `keys().create` (one transaction and fsync each)
    /// instead of the bulk insert: shows why the bulk insert exists.
    #[arg(long)]
    pub via_api: bool,
    /// Verification-cache capacity, at least `--keys` (the figures are of cache hits), at
    /// most 100,000,000 (default: `--keys`, or the library default of 1,000,000 if larger).
    #[arg(long, value_parser = count_parser(100_000_000))]
    pub cache_capacity: Option<usize>,
}

/// Parses `--seconds`: a number from 0.1 to 86,400 (a day), so that every phase's duration
/// is one a `Duration` holds (`inf`, `NaN` and `1e20` are refused).
fn parse_seconds(s: &str) -> Result<f64, String> {
    let seconds: f64 = s.trim().parse().map_err(|e| format!("{e}"))?;
    if (0.1..=86_400.0).contains(&seconds) {
        Ok(seconds)
    } else {
        Err("expected seconds from 0.1 to 86,400".into())
    }
}

/// Parses a count from 1 to `max`: a scratch store or a thread count past that would run
/// the machine out of memory rather than measure anything.
fn count_parser(max: usize) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s| match s.trim().replace('_', "").parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(format!("expected a whole number from 1 to {max}")),
    }
}

/// Every `SAMPLE_EVERY`-th operation is timed on its own.
const SAMPLE_EVERY: u64 = 64;

/// The one JSON object `--json` prints.
#[derive(Debug, Serialize)]
struct Report {
    threads: usize,
    keys: usize,
    /// Keys in the verification cache after filling it (evictions make this < `keys`).
    cached_keys: u64,
    /// Same, after the timed run.
    cached_keys_after_run: u64,
    seconds: f64,
    /// verify + commit(1) per second, all threads together.
    ops_per_sec: f64,
    /// Sampled single-operation latency of verify + commit.
    p50_ns: u64,
    p99_ns: u64,
    p999_ns: u64,
    max_ns: u64,
    /// Wall time per verify + commit per thread (`threads × 1e9 / ops_per_sec`).
    verify_ns: f64,
    /// The same for the floor, measured in this run on the same keys and threads.
    floor_ns: f64,
    floor_ops_per_sec: f64,
    floor_p50_ns: u64,
    floor_p99_ns: u64,
    /// `verify_ns / floor_ns`: the target's ratio, operations back to back.
    ratio_to_floor: f64,
    /// `p50_ns / floor_p50_ns`, each less `clock_ns`: the same ratio for operations run one
    /// at a time (each sample sits between two clock reads, which wait for earlier
    /// instructions), as in a server.
    /// Back to back, the CPU overlaps the next operation's hashing and look-up with the
    /// current one's cache misses, which only an operation with almost nothing after its
    /// last miss allows (docs/PERFORMANCE.md, "Eighth round").
    p50_ratio_to_floor: f64,
    /// What a sample's two clock reads cost by themselves (median), taken off both p50s of
    /// `p50_ratio_to_floor` (left in `p50_ns` and `floor_p50_ns`).
    clock_ns: u64,
    /// Cache-miss latency (a peek of an uncached key: one redb look-up, then cached),
    /// sampled while the cache filled in scattered key order, with redb's pages in memory.
    /// A peek takes no credit lease: a key's first spending request after a miss also waits
    /// for its first lease (one writer commit), which this does not include.
    miss_p50_ns: u64,
    miss_p99_ns: u64,
    /// Heap footprint per cached key (counting allocator, malloc rounding included): the
    /// cache's entries and tables, the meter registry, the accounts' state.
    bytes_per_cached_key: f64,
    /// The most the credit writer's lists of keys in use held at once (fill, flush and
    /// timed run), per cached key.
    writer_list_bytes_per_cached_key: f64,
    /// The two above: what a cached key costs in all while every cached key is in use.
    total_bytes_per_cached_key: f64,
    /// What asking every key's grant for its public ids adds, per cached key: a key's id is
    /// sealed per call and kept nowhere; an account's is kept once, shared by its keys.
    public_id_bytes_per_cached_key: f64,
    /// Bytes requested per cached key (no malloc rounding).
    requested_bytes_per_cached_key: f64,
    /// The cache tables' share (they grow as the cache fills: included in the two above).
    table_bytes_per_cached_key: f64,
    /// Live allocations per cached key.
    allocations_per_cached_key: f64,
    /// RSS growth per cached key while the cache filled.
    rss_bytes_per_cached_key: f64,
    /// verify + commit calls that were refused (expected: 0).
    denied: u64,
    /// Writer transactions during the timed run (each one commit: two fsyncs, redb's
    /// two-phase commit).
    writer_commits_during_run: u64,
    /// Writer transactions while every key was leased its first credits before the run
    /// (usage flushes falling in that time included).
    writer_commits_priming: u64,
    /// Verifies in the timed run that found their lease short and waited for the writer
    /// (every one counted, not sampled), and upper bounds of their p99 and longest wait.
    lease_waits_during_run: u64,
    lease_wait_p99_ns: u64,
    lease_wait_max_ns: u64,
    /// The kernel's transparent-huge-page mode (`always`, `madvise`, `never`; `None`: not
    /// readable). Under `madvise`, glibc's heap gets huge pages only with `malloc_hugetlb`.
    transparent_hugepages: Option<String>,
    /// Whether `GLIBC_TUNABLES` asks glibc's malloc for huge pages (`glibc.malloc.hugetlb`
    /// 1 or 2): at 1M keys every look-up then misses the TLB far less often
    /// (docs/PERFORMANCE.md, "Nineteenth round").
    malloc_hugetlb: bool,
    /// Where the wall time went, in seconds.
    phases: Phases,
}

/// The selected mode in `/sys/kernel/mm/transparent_hugepage/enabled` (`always [madvise]
/// never`).
fn transparent_hugepages() -> Option<String> {
    let modes = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = modes.find('[')? + 1;
    let end = start + modes[start..].find(']')?;
    Some(modes[start..end].to_owned())
}

/// Whether `GLIBC_TUNABLES` sets `glibc.malloc.hugetlb` to 1 (madvise) or 2 (hugetlbfs).
fn malloc_hugetlb() -> bool {
    std::env::var("GLIBC_TUNABLES").is_ok_and(|tunables| {
        tunables.split(':').any(|t| {
            t.strip_prefix("glibc.malloc.hugetlb=")
                .is_some_and(|v| v == "1" || v == "2")
        })
    })
}

#[derive(Debug, Default, Serialize)]
struct Phases {
    build: f64,
    read_pages: f64,
    /// Timing cache misses (one key in 16).
    time_misses: f64,
    /// Close, open again (an empty cache), read the pages again.
    reopen: f64,
    /// The fill whose memory is counted, and its flush.
    fill_cache: f64,
    prime_leases: f64,
    floor_build: f64,
    floor_run: f64,
    verify_run: f64,
    total: f64,
}

/// Runs the benchmark; prints text or, with `json`, one JSON object.
pub fn run(json: bool, args: BenchArgs) -> CliResult<u8> {
    let started = Instant::now();
    let (threads, keys) = (args.threads, args.keys);
    // A cache smaller than the store would time misses as hits, and the ratios would
    // compare them with a floor that finds every key.
    if args.cache_capacity.is_some_and(|capacity| capacity < keys) {
        return Err(CliError::usage(
            "--cache-capacity must be at least --keys: the bench times cache hits",
        ));
    }
    let seconds = args.seconds;
    let mut phases = Phases::default();

    let t = Instant::now();
    let bar = progress(keys as u64, "creating keys");
    let cache_capacity = Some(args.cache_capacity.unwrap_or(keys.max(1_000_000)));
    let options = Options {
        via_api: args.via_api,
        cache_capacity,
        ..Options::new(keys)
    };
    let work = Workload::build(&options, &mut |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    phases.build = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let bar = progress(keys as u64, "reading pages");
    work.touch_pages(&mut |n| bar.set_position(n as u64))?;
    bar.finish_and_clear();
    phases.read_pages = t.elapsed().as_secs_f64();

    // Misses are timed on their own, on one key in 16 spread over all of them: under the
    // counting allocator below, each of their allocations and frees would also probe its
    // address table (that added ≈ 2.5 µs to the p99).
    let t = Instant::now();
    let mut miss_samples = work.time_misses(keys.div_ceil(16));
    miss_samples.sort_unstable();
    phases.time_misses = t.elapsed().as_secs_f64();

    // Then the same file again with an empty cache, its pages read again, for the memory.
    let t = Instant::now();
    let work = work.reopen(cache_capacity)?;
    work.touch_pages(&mut |_| {})?;
    phases.reopen = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let bar = progress(keys as u64, "filling the cache");
    let rss_before = rss_bytes();
    // Measured once the writer has taken what the fill queued for it (the queues' blocks are
    // freed then), as a server would run.
    let (cached, heap) = counted(|| {
        let cached = work.warm(&mut |n| bar.set_position(n as u64));
        work.ledger.flush().map(|()| cached)
    });
    let cached = cached?;
    let rss_after = rss_bytes();
    let cached_keys = work.ledger.stats().cached_entries;
    bar.finish_and_clear();
    phases.fill_cache = t.elapsed().as_secs_f64();
    // What a server that names its callers (`Grant::key_id`, `owner_id`) adds on top.
    let (_, ids_heap) = counted(|| work.ask_public_ids());
    if cached < keys {
        return Err(crate::CliError::new(format!(
            "only {cached} of {keys} keys verified while filling the cache"
        )));
    }

    let t = Instant::now();
    let spinner = ProgressBar::new_spinner().with_message("leasing credits");
    spinner.enable_steady_tick(Duration::from_millis(100));
    let priming = work.prime_leases()?;
    spinner.finish_and_clear();
    phases.prime_leases = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let floor = Floor::new(&work.keys);
    phases.floor_build = t.elapsed().as_secs_f64();

    let half = Duration::from_secs_f64(seconds / 4.0);
    let full = Duration::from_secs_f64(seconds);
    let spinner = ProgressBar::new_spinner().with_message(format!(
        "running on {threads} thread(s) for {:.1} s",
        seconds * 1.5
    ));
    spinner.enable_steady_tick(Duration::from_millis(200));
    let n = work.keys.len();
    let floor_a = drive(threads, half, 1, |i| floor.check(&work.keys[i]), n);
    let before = work.ledger.stats();
    let verify = drive(threads, full, 2, |i| work.verify_commit(i), n);
    let after = work.ledger.stats();
    // The most the writer's lists held, through the fill, its flush and the timed run.
    let writer_list_bytes = after.writer_list_bytes as i64;
    let commits_during = after.writer_commits - before.writer_commits;
    let waits = after.lease_waits.since(&before.lease_waits);
    let wait_ns = |d: Option<Duration>| d.map_or(0, |d| d.as_nanos() as u64);
    let floor_b = drive(threads, half, 3, |i| floor.check(&work.keys[i]), n);
    let clock_ns = clock_overhead_ns();
    spinner.finish_and_clear();
    phases.floor_run = floor_a.elapsed + floor_b.elapsed;
    phases.verify_run = verify.elapsed;

    let floor_all = floor_a.merge(floor_b);
    let verify_ns = threads as f64 * 1e9 / verify.ops_per_sec();
    let floor_ns = threads as f64 * 1e9 / floor_all.ops_per_sec();
    phases.total = started.elapsed().as_secs_f64();
    let per_key = |x: i64| x as f64 / cached_keys.max(1) as f64;
    let table_bytes = work.cache_table_bytes() as i64;
    let report = Report {
        threads,
        keys,
        cached_keys,
        cached_keys_after_run: work.ledger.stats().cached_entries,
        seconds,
        ops_per_sec: verify.ops_per_sec(),
        p50_ns: percentile(&verify.samples, 50.0),
        p99_ns: percentile(&verify.samples, 99.0),
        p999_ns: percentile(&verify.samples, 99.9),
        max_ns: verify.samples.last().copied().unwrap_or(0),
        verify_ns,
        floor_ns,
        floor_ops_per_sec: floor_all.ops_per_sec(),
        floor_p50_ns: percentile(&floor_all.samples, 50.0),
        floor_p99_ns: percentile(&floor_all.samples, 99.0),
        ratio_to_floor: verify_ns / floor_ns,
        p50_ratio_to_floor: percentile(&verify.samples, 50.0).saturating_sub(clock_ns) as f64
            / percentile(&floor_all.samples, 50.0)
                .saturating_sub(clock_ns)
                .max(1) as f64,
        clock_ns,
        miss_p50_ns: percentile(&miss_samples, 50.0),
        miss_p99_ns: percentile(&miss_samples, 99.0),
        bytes_per_cached_key: per_key(heap.footprint),
        writer_list_bytes_per_cached_key: per_key(writer_list_bytes),
        total_bytes_per_cached_key: per_key(heap.footprint + writer_list_bytes),
        public_id_bytes_per_cached_key: per_key(ids_heap.footprint),
        requested_bytes_per_cached_key: per_key(heap.requested),
        table_bytes_per_cached_key: per_key(table_bytes),
        allocations_per_cached_key: per_key(heap.allocations),
        rss_bytes_per_cached_key: per_key(rss_after.saturating_sub(rss_before) as i64),
        denied: verify.failed,
        writer_commits_during_run: commits_during,
        writer_commits_priming: priming,
        lease_waits_during_run: waits.count(),
        lease_wait_p99_ns: wait_ns(waits.percentile(99.0)),
        lease_wait_max_ns: wait_ns(waits.max()),
        transparent_hugepages: transparent_hugepages(),
        malloc_hugetlb: malloc_hugetlb(),
        phases,
    };
    if json {
        print_json(&report)?;
    } else {
        print_text(&report);
    }
    // The scratch file is deleted next: returning a million leases to it first (a clean
    // close rewrites every credit record: ≈ 6 s at 1M keys) would only add time to the
    // run. Stop the writer instead. (`examples/compare` closes cleanly and times it.)
    work.ledger.clone().simulate_crash();
    Ok(0)
}

fn print_text(r: &Report) {
    println!(
        "keyledger bench: {} keys, {} thread(s), {:.1} s",
        r.keys, r.threads, r.seconds
    );
    println!(
        "  verify + commit   {:>12.0} ops/s   {:>7.0} ns/op/thread   p50 {} ns   p99 {} ns   p99.9 {} ns   max {} ns",
        r.ops_per_sec, r.verify_ns, r.p50_ns, r.p99_ns, r.p999_ns, r.max_ns
    );
    println!(
        "  floor             {:>12.0} ops/s   {:>7.0} ns/op/thread   p50 {} ns   p99 {} ns",
        r.floor_ops_per_sec, r.floor_ns, r.floor_p50_ns, r.floor_p99_ns
    );
    println!(
        "  ratio to floor    {:.2}×   (target ≤ 1.5×); one at a time (p50 over p50) {:.2}×",
        r.ratio_to_floor, r.p50_ratio_to_floor
    );
    println!(
        "  cache miss        p50 {} ns   p99 {} ns   (target p99 ≤ 3,000 ns on 1M keys)",
        r.miss_p50_ns, r.miss_p99_ns
    );
    println!(
        "  memory            {:.0} bytes per cached key (target ≤ 256; heap footprint incl. {:.0} of cache table; {:.0} requested in {:.1} allocations; RSS growth {:.0}); with the writer's lists of keys in use at their peak, {:.0} more: {:.0} in all",
        r.bytes_per_cached_key,
        r.table_bytes_per_cached_key,
        r.requested_bytes_per_cached_key,
        r.allocations_per_cached_key,
        r.rss_bytes_per_cached_key,
        r.writer_list_bytes_per_cached_key,
        r.total_bytes_per_cached_key
    );
    println!(
        "                    asking every grant for its public ids adds {:.0} more: {:.0}",
        r.public_id_bytes_per_cached_key,
        r.total_bytes_per_cached_key + r.public_id_bytes_per_cached_key
    );
    println!(
        "  cache             {} of {} keys cached after filling, {} after the run",
        r.cached_keys, r.keys, r.cached_keys_after_run
    );
    println!(
        "  writer commits    {} priming the leases, {} during the run; {} refused",
        r.writer_commits_priming, r.writer_commits_during_run, r.denied
    );
    println!(
        "  lease waits       {} during the run (every one counted); p99 < {} ns, longest < {} ns",
        r.lease_waits_during_run, r.lease_wait_p99_ns, r.lease_wait_max_ns
    );
    println!(
        "  huge pages        kernel mode {}, malloc {}",
        r.transparent_hugepages.as_deref().unwrap_or("unknown"),
        if r.malloc_hugetlb {
            "asks for them (GLIBC_TUNABLES)"
        } else {
            "does not ask (GLIBC_TUNABLES=glibc.malloc.hugetlb=1 would)"
        }
    );
    let p = &r.phases;
    println!(
        "  time              build {:.1} s, page read {:.1} s, misses {:.1} s, reopen {:.1} s, cache fill {:.1} s, leases {:.1} s, floor map {:.1} s, runs {:.1} s; total {:.1} s",
        p.build,
        p.read_pages,
        p.time_misses,
        p.reopen,
        p.fill_cache,
        p.prime_leases,
        p.floor_build,
        p.floor_run + p.verify_run,
        p.total
    );
}

fn progress(len: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(message);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>18} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// What the threads of one timed phase did.
struct Run {
    ops: u64,
    failed: u64,
    elapsed: f64,
    samples: Vec<u64>,
}

impl Run {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.max(1e-9)
    }

    fn merge(mut self, other: Run) -> Run {
        self.ops += other.ops;
        self.failed += other.failed;
        self.elapsed += other.elapsed;
        self.samples.extend(other.samples);
        self.samples.sort_unstable();
        self
    }
}

/// The median cost of the two clock reads around a sample, with nothing between them.
fn clock_overhead_ns() -> u64 {
    let mut samples: Vec<u64> = (0..100_000)
        .map(|_| {
            let t0 = Instant::now();
            let t1 = Instant::now();
            (t1 - t0).as_nanos() as u64
        })
        .collect();
    samples.sort_unstable();
    percentile(&samples, 50.0)
}

/// Runs `op` on random key indices on `threads` threads for `duration`, each thread on its
/// own slice of the `n` keys (disjoint keys, as the 2-thread target says); every
/// [`SAMPLE_EVERY`]-th call is timed. Elapsed is the longest thread's.
fn drive(
    threads: usize,
    duration: Duration,
    seed: u64,
    op: impl Fn(usize) -> bool + Sync,
    n: usize,
) -> Run {
    let results: Vec<(u64, u64, f64, Vec<u64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let op = &op;
                let (lo, hi) = (t * n / threads, (t + 1) * n / threads);
                let next = move |indices: &mut Indices| lo + indices.next_below(hi - lo);
                s.spawn(move || {
                    let mut indices = Indices::new(seed * 1_000 + t as u64);
                    let mut samples = Vec::with_capacity(1 << 16);
                    let (mut ops, mut failed) = (0u64, 0u64);
                    let start = Instant::now();
                    let deadline = start + duration;
                    loop {
                        for _ in 0..SAMPLE_EVERY - 1 {
                            failed += u64::from(!op(next(&mut indices)));
                        }
                        let i = next(&mut indices);
                        let t0 = Instant::now();
                        failed += u64::from(!op(i));
                        let t1 = Instant::now();
                        samples.push((t1 - t0).as_nanos() as u64);
                        ops += SAMPLE_EVERY;
                        if t1 >= deadline {
                            break;
                        }
                    }
                    (ops, failed, start.elapsed().as_secs_f64(), samples)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("bench thread"))
            .collect()
    });
    let mut run = Run {
        ops: 0,
        failed: 0,
        elapsed: 0.0,
        samples: Vec::new(),
    };
    for (ops, failed, elapsed, samples) in results {
        run.ops += ops;
        run.failed += failed;
        run.elapsed = run.elapsed.max(elapsed);
        run.samples.extend(samples);
    }
    run.samples.sort_unstable();
    run
}

/// Heap growth seen by the counting allocator.
#[derive(Debug, Clone, Copy, Default)]
struct Heap {
    requested: i64,
    footprint: i64,
    allocations: i64,
}

/// Runs `f` on this thread with the counting allocator on; returns its result and the net
/// heap growth of the allocations this thread made, less those freed meanwhile on any thread.
fn counted<R>(f: impl FnOnce() -> R) -> (R, Heap) {
    let before = Heap {
        requested: REQUESTED.load(Ordering::Relaxed),
        footprint: FOOTPRINT.load(Ordering::Relaxed),
        allocations: LIVE.load(Ordering::Relaxed),
    };
    MEASURING.store(true, Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let result = f();
    COUNTING.with(|c| c.set(false));
    // Off again: every free in the process would otherwise keep probing the address table.
    MEASURING.store(false, Ordering::Relaxed);
    let heap = Heap {
        requested: REQUESTED.load(Ordering::Relaxed) - before.requested,
        footprint: FOOTPRINT.load(Ordering::Relaxed) - before.footprint,
        allocations: LIVE.load(Ordering::Relaxed) - before.allocations,
    };
    (result, heap)
}

/// Resident set size from `/proc/self/statm` (0 where unavailable).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

static REQUESTED: AtomicI64 = AtomicI64::new(0);
static FOOTPRINT: AtomicI64 = AtomicI64::new(0);
static LIVE: AtomicI64 = AtomicI64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

/// glibc malloc's chunk size for a request: 8-byte header, 16-byte granularity, 32 minimum.
fn chunk(size: usize) -> i64 {
    (size + 8).next_multiple_of(16).max(32) as i64
}

fn count(requested: i64, footprint: i64, allocations: i64) {
    LIVE.fetch_add(allocations, Ordering::Relaxed);
    REQUESTED.fetch_add(requested, Ordering::Relaxed);
    FOOTPRINT.fetch_add(footprint, Ordering::Relaxed);
}

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

/// The addresses of the live blocks a counting thread allocated: a free of one on any thread
/// is counted too. Open addressing over a static array (no allocation inside the allocator);
/// 2²² slots hold the ≈ 1.1M blocks of a 1M-key fill at a quarter full.
mod tracked {
    use std::sync::atomic::{AtomicUsize, Ordering};

    const SLOTS: usize = 1 << 22;
    const EMPTY: usize = 0;
    /// A freed slot (no block starts at address 1).
    const GONE: usize = 1;

    static TABLE: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(EMPTY) }; SLOTS];

    fn home(addr: usize) -> usize {
        (addr as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) as usize >> 10 & (SLOTS - 1)
    }

    /// Remembers `addr`; false if the table is full (the block is then not counted).
    pub fn insert(addr: usize) -> bool {
        let start = home(addr);
        (0..SLOTS).any(|i| {
            let slot = &TABLE[(start + i) & (SLOTS - 1)];
            let seen = slot.load(Ordering::Relaxed);
            (seen == EMPTY || seen == GONE)
                && slot
                    .compare_exchange(seen, addr, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// Forgets `addr`; true if it was remembered.
    pub fn remove(addr: usize) -> bool {
        let start = home(addr);
        for i in 0..SLOTS {
            let slot = &TABLE[(start + i) & (SLOTS - 1)];
            match slot.load(Ordering::Acquire) {
                EMPTY => return false,
                seen if seen == addr => {
                    return slot
                        .compare_exchange(addr, GONE, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok();
                }
                _ => {}
            }
        }
        false
    }
}

/// While a measurement runs, frees on every thread are checked against [`tracked`].
static MEASURING: AtomicBool = AtomicBool::new(false);

fn allocated(p: *mut u8, size: usize) {
    if !p.is_null() && counting() && tracked::insert(p as usize) {
        count(size as i64, chunk(size), 1);
    }
}

fn freed(p: *mut u8, size: usize) -> bool {
    let counted = MEASURING.load(Ordering::Relaxed) && tracked::remove(p as usize);
    if counted {
        count(-(size as i64), -chunk(size), -1);
    }
    counted
}

/// The system allocator, counting the bytes of threads that turned counting on.
struct Counting;

// SAFETY: every method forwards to `System` unchanged; the counters and the address table
// have no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, forwarded as is.
        let p = unsafe { System.alloc(layout) };
        allocated(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        allocated(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        freed(ptr, layout.size());
        // SAFETY: `ptr` was allocated by `System` with `layout` (we forward every call).
        unsafe { System.dealloc(ptr, layout) };
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Forgotten before `System` may hand the address out again to another thread.
        let was_counted = freed(ptr, layout.size());
        // SAFETY: as for `dealloc`; `new_size` is the caller's, forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            // The old block is still there, and still ours.
            if was_counted && tracked::insert(ptr as usize) {
                count(layout.size() as i64, chunk(layout.size()), 1);
            }
        } else if was_counted || counting() {
            // A counted block grown on any thread stays counted.
            if tracked::insert(p as usize) {
                count(new_size as i64, chunk(new_size), 1);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[cfg(test)]
mod tests {
    use super::parse_seconds;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn seconds_are_from_a_tenth_to_a_day() {
        assert_eq!(parse_seconds("0.1"), Ok(0.1));
        assert_eq!(parse_seconds("86400"), Ok(86_400.0));
        for bad in ["inf", "NaN", "1e20", "0", "-1", "0.09", "86401", "x"] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        let cli = Cli::try_parse_from(["keyledger", "bench"]).expect("the default parses");
        let Command::Bench(args) = cli.command else {
            panic!("not bench")
        };
        assert_eq!(args.seconds, 5.0);
    }
}
