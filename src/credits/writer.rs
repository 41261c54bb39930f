//! The writer thread: the one owner of hot-path writes. It batches every pending lease,
//! shortfall, balance change, spend flush and usage flush into one write transaction,
//! committed with `Durability::Immediate` (group commit: one durable commit per batch, not
//! per key), and only then makes leased units spendable in memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use crossbeam::queue::SegQueue;
use parking_lot::Mutex;
use redb::ReadableTable;

use super::events::{CreditEvent, CreditEventKind};
use super::meter::{MAX_LEASE_FLOOR, MAX_LEASED, MIN_LEASE, Meter, Told};
use super::refill;
use super::registry::Registry;
use crate::cache::{CachedKey, MeterRef, Metering};
use crate::clock::{Clock, Timestamp};
use crate::codec;
use crate::error::{CodecError, Error, Result};
use crate::public_id::{IdCipher, IdKind};
use crate::record::{CreditsRecord, KeyRecord, PoolRecord, UsageRecord};
use crate::store::Store;
use crate::store::tables::{ACCOUNTS, CREDITS, KEYS, POOLS, USAGE};

/// How long the writer waits for messages before looking at the clock again.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Spend and usage counters are written for every key once per round, a round starting every
/// `Config::usage_flush_interval` (and everything at every `flush`, `usage` and `close`).
/// Between rounds a meter's spend is written only when the writer leases for it anyway, so a
/// busy key costs one record write per lease, not one per request. Unflushed spend is still
/// `leased` on disk: a crash counts it as lost, never as available.
///
/// A round writes at most this many meters and this many keys' usage per transaction, one
/// chunk per batch: at 1M active keys a round is ≈ 2M record writes, and in one transaction
/// that held every lease renewal back for seconds.
const FLUSH_CHUNK: usize = 4_096;
/// Most messages folded into one transaction.
const MAX_BATCH: usize = 8_192;
/// Prefetches (lease top-ups nobody waits for: asked for while half the lease is left)
/// gather this long after the first one rings the writer's bell before they commit, so that
/// many keys' renewals share one transaction, one durable commit and the B-tree pages they
/// have in common. Any other message ends the wait at once.
const PREFETCH_GATHER: Duration = Duration::from_millis(100);

/// A change to a durable balance, ordered with leases.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Adjust {
    /// The balance becomes exactly this.
    Set(u64),
    /// The balance grows by this.
    TopUp(u64),
}

/// What a request waiting for a lease is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handoff {
    /// Units out of the new lease: what it needed, or fewer when the durable balance had
    /// fewer (the rest may be in memory already), and the balance epoch they were leased
    /// under (a `set` earlier in the same batch moved it; the request read it before).
    Units { units: u64, epoch: u32 },
    /// The balance and the lease in memory together cannot cover it: refuse the request.
    Short,
    /// The balance cannot be leased from: its record no longer decodes, or the ledger is
    /// closing. Asking again would not change that.
    Unavailable,
    /// The balance is gone: its key was deleted, made unmetered or moved to a pool
    /// meanwhile. The key as it is now may answer (see `Ledger::reserve_slow`).
    Gone,
}

/// Who changed a balance and how, for the audit trail.
#[derive(Debug)]
pub(crate) struct AuditLine {
    pub actor: String,
    pub action: &'static str,
    /// The public id of the key, token or pool.
    pub target: String,
}

pub(crate) enum Msg {
    /// Lease more units into `meter`; the caller waits (`reply`: it is handed `need` of them,
    /// or fewer if the balance has fewer) or not (prefetch).
    Lease {
        meter: MeterRef,
        need: u64,
        reply: Option<Sender<Handoff>>,
    },
    /// Charge units beyond a reservation straight from the durable balance.
    Shortfall {
        meter: MeterRef,
        units: u64,
        reply: Sender<u64>,
    },
    /// Set or top up a balance; replies with the new spendable total.
    Adjust {
        id: u64,
        change: Adjust,
        /// The audit entry, written in the same transaction as the change (`None`: the
        /// caller's own change already recorded it).
        audit: Option<AuditLine>,
        reply: Sender<Result<u64>>,
    },
    /// A meter leaves memory (its key left the cache): return its lease, flush its spend, and
    /// drop it from the registry unless something still uses it. (A meter whose balance was
    /// deleted is retired by the change itself, which sends nothing.)
    Retire { meter: MeterRef },
    /// Refunded units the lease does not keep (`Exact` mode keeps none), or could not take
    /// because their epoch had ended: back to the balance if it is still the one of `epoch`,
    /// else out of `leased` and `granted` (the `set` that ended it was final). Checked here,
    /// in batch order, after any `set` before it — and after a failed batch restored the
    /// epoch its `set` had ended.
    Return {
        meter: MeterRef,
        units: u64,
        epoch: u32,
        /// Answered once the batch is durable, or failed (then the meter keeps what its
        /// lease can, and the rest is tried again with the next batch). `None`: nobody waits.
        reply: Option<Sender<()>>,
    },
    /// Write what `meter` has spent since its last write (`Exact` mode sends one per
    /// commit, so that a crash finds a settled charge spent, not lost). Gathered like a
    /// prefetch: it waits for company up to [`PREFETCH_GATHER`], not for a commit of its own.
    Settle { meter: MeterRef },
    /// Flush now.
    Flush { reply: Sender<Result<()>> },
    /// Return every lease and flush, as a close does, but keep running: what grants still
    /// hold stays leased, and [`Shared::held`] says how much (see `Engine::close`).
    Drain { reply: Sender<Result<()>> },
    /// Return every lease, flush, and stop.
    Close { reply: Sender<Result<()>> },
    /// Prefetches wait in [`Shared::prefetches`]: take them. Sent only by the request that
    /// rings the bell, so a busy verify thread wakes the writer once per batch, not once per
    /// prefetch (each wake is a futex syscall on the verify thread).
    PrefetchBell,
    /// Stop at once, writing nothing: what a crash leaves behind (tests only).
    Abandon,
    /// Wait until this is answered or dropped before taking the rest of the batch, so that
    /// what is sent meanwhile lands in one batch, in the order sent (see `tests::one_batch`).
    #[cfg(test)]
    Hold(Receiver<()>),
}

/// State shared by the writer and the verify path.
pub(crate) struct Shared {
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
    pub ids: Arc<IdCipher>,
    pub exact: bool,
    /// How often a flush round starts (see [`FLUSH_CHUNK`]).
    pub flush_every: Duration,
    /// Credit meters in memory, by CREDITS id.
    pub meters: Mutex<Registry>,
    /// Bumped, under the `meters` lock, by every admin change after which a meter built
    /// from an earlier read of the key would be wrong — its balance taken away (deletion,
    /// credits removed) or its low-balance threshold changed — whether or not its meter was
    /// in memory: a cache miss that read the key before such a change must not register a
    /// meter for it.
    pub meter_resets: AtomicU64,
    pub dirty_meters: SegQueue<MeterRef>,
    pub dirty_usage: SegQueue<Arc<CachedKey>>,
    /// Background lease top-ups waiting for the writer.
    pub prefetches: Prefetches,
    pub events: Sender<CreditEvent>,
    /// Write transactions committed by the writer (each one durable commit).
    pub commits: AtomicU64,
    /// The most bytes the writer's lists of meters and keys in use have held at once (their
    /// capacities, a batch's working lists included), for memory accounting: they grow with
    /// the keys in use.
    pub list_bytes: AtomicU64,
    /// Usage counts left out of a flush because the usage record they add to is unreadable.
    pub usage_unwritable: AtomicU64,
    /// Credit events dropped because the channel was full (see [`Shared::send_event`]).
    pub events_dropped: AtomicU64,
    /// How long requests waited for a lease.
    pub lease_waits: super::WaitHistogram,
    /// Every key's rate-limit state (src/engine.rs): the writer raises a state's lifetime
    /// spend to what a flush made durable, which may include spend that bypassed it.
    pub limits: Mutex<crate::engine::LiveLimits>,
    /// The last limits generation `limits` handed out (moved under its lock): a miss reads
    /// it before its snapshot, so that a key reconfigured since is read again.
    pub limits_generation: AtomicU64,
    /// The smallest lease the writer grants now: `MIN_LEASE`, more while it is behind.
    pub lease_floor: AtomicU64,
    /// The ledger is closing: lease nothing more (requests that need a lease are refused as
    /// unavailable), so that the grants still held are the last.
    pub closing: AtomicBool,
    /// Units still leased, once the last `Drain` or `Close` gave every lease back: what grants
    /// still held have reserved.
    pub held: AtomicU64,
    /// The writer's reads of this balance fail, as on a failing disk (0: none).
    #[cfg(test)]
    pub fail_reads_of: AtomicU64,
}

impl Shared {
    /// An event about `meter`'s balance, with the credits left.
    pub(crate) fn event(
        &self,
        kind: CreditEventKind,
        meter: &Meter,
        remaining: u64,
    ) -> CreditEvent {
        self.event_of(kind, meter.subject, meter.id, remaining)
    }

    /// The same for balance `id`, named as `subject`, when no meter is in memory.
    pub(crate) fn event_of(
        &self,
        kind: CreditEventKind,
        subject: IdKind,
        id: u64,
        remaining: u64,
    ) -> CreditEvent {
        CreditEvent {
            kind,
            subject: self.ids.encode(subject, id),
            remaining,
        }
    }

    /// Sends `event` to the host unless the channel is full (the host is not draining it):
    /// then it is dropped, and counted, rather than slowing the ledger.
    pub(crate) fn send_event(&self, event: CreditEvent) {
        if self.events.try_send(event).is_err() {
            self.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Keys and pools' meters that a flush round found in use. They stay listed here, their
/// dirty mark still set, so that their next request does not queue them again: otherwise
/// every key in use was pushed onto a queue by its first request after every flush (an
/// allocation, and a contended tail, on the hot path). A round that finds one idle since the
/// previous round unlists it and clears its mark; its next request queues it again.
///
/// A key's own meter is flushed with the key (its home): only pools' meters, shared by many
/// keys and few, have a list of their own. So a key in use costs the writer 8 bytes.
#[derive(Default)]
struct Listed {
    /// Home snapshots: their usage counters and own meter's spend.
    keys: InUse<Arc<CachedKey>>,
    /// Pools' meters.
    pools: InUse<MeterRef>,
    /// When the last round started (clock ms): a meter leased since then is in use even if
    /// its leases settled all its spend.
    flushed_at_ms: u64,
    /// When the round in progress started, if one is.
    round_started_ms: Option<u64>,
    /// Returns a failed batch could neither make durable nor put back into their meter (its
    /// epoch had moved on, or its lease word was full): tried again with the next batch.
    /// One entry per balance and epoch (a balance's record id is unique across keys and
    /// pools), so an outage that fails batch after batch grows it by balances, not refunds.
    returns: HashMap<(u64, u32), (MeterRef, u64)>,
    /// Once a closing pass over every meter has committed: the meters it left with units
    /// leased (grants still held). Closing leases nothing, so a meter it left with none has
    /// none for good, and the next pass (the next drain, or the close) visits only these.
    still_leased: Option<Vec<MeterRef>>,
}

impl Listed {
    /// Starts a round over everything listed and queued (a round in progress starts over).
    fn start_round(&mut self, shared: &Shared, now_ms: u64) {
        self.keys.start_round(&shared.dirty_usage, |key| key.id());
        self.pools
            .start_round(&shared.dirty_meters, |meter| meter.id);
        self.round_started_ms = Some(now_ms);
    }

    fn in_round(&self) -> bool {
        self.round_started_ms.is_some()
    }

    /// Lists again what a chunk found still in use; ends the round once nothing is left.
    fn keep(&mut self, keys: Vec<Arc<CachedKey>>, pools: Vec<MeterRef>) {
        self.keys.keep(keys);
        self.pools.keep(pools);
        if self.keys.left == 0 && self.pools.left == 0 {
            if let Some(started) = self.round_started_ms.take() {
                self.flushed_at_ms = started;
            }
            self.keys.trim();
            self.pools.trim();
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.list.is_empty() && self.pools.list.is_empty() && self.returns.is_empty()
    }

    /// Lists `units` reserved under `epoch` for the next batch to return.
    fn retry_return(&mut self, meter: MeterRef, units: u64, epoch: u32) {
        let entry = self.returns.entry((meter.id, epoch)).or_insert((meter, 0));
        // A balance's refunds never add up to more than it granted, itself a u64.
        entry.1 = entry.1.saturating_add(units);
    }

    /// Bytes of the lists.
    fn bytes(&self) -> usize {
        self.keys.bytes() + self.pools.bytes()
    }
}

/// One list of things in use. A round takes them from the front [`FLUSH_CHUNK`] at a time
/// and puts those still in use at the back, so it never needs a second list beside this
/// one: a round's lists never hold more than the things listed when it started.
struct InUse<T> {
    list: VecDeque<T>,
    /// How many at the front the round in progress has still to flush.
    left: usize,
}

impl<T> Default for InUse<T> {
    fn default() -> Self {
        InUse {
            list: VecDeque::new(),
            left: 0,
        }
    }
}

impl<T> InUse<T> {
    /// Appends what is queued now (not what is queued meanwhile: that waits for the next
    /// round, its mark set) and makes all of it the round's to flush, in the order of `id`:
    /// the records of one chunk then share their B-tree pages, and a round writes each page
    /// about once (in queue order each chunk's keys spread over the whole table, so every
    /// chunk copied pages the others copied too: a flush of 1M keys took ≈ 12 s longer,
    /// docs/PERFORMANCE.md, tenth round).
    fn start_round(&mut self, queued: &SegQueue<T>, id: impl Fn(&T) -> u64) {
        let n = queued.len();
        self.list.reserve_exact(n);
        self.list.extend((0..n).map_while(|_| queued.pop()));
        self.list.make_contiguous().sort_unstable_by_key(id);
        self.left = self.list.len();
    }

    /// The next chunk to flush.
    fn chunk(&mut self) -> Vec<T> {
        let n = self.left.min(FLUSH_CHUNK);
        self.left -= n;
        self.list.drain(..n).collect()
    }

    /// Lists again what a chunk found in use (no more than the chunk took).
    fn keep(&mut self, kept: Vec<T>) {
        self.list.extend(kept);
    }

    /// Puts a chunk whose flush failed back in front, to be flushed again.
    fn put_back(&mut self, seen: Vec<T>) {
        self.left += seen.len();
        for item in seen.into_iter().rev() {
            self.list.push_front(item);
        }
    }

    /// Gives memory back once a round leaves the list under half its capacity.
    fn trim(&mut self) {
        if self.list.capacity() > 2 * self.list.len() + FLUSH_CHUNK {
            self.list.shrink_to(self.list.len() + self.list.len() / 4);
        }
    }

    /// Bytes the list holds (its capacity).
    fn bytes(&self) -> usize {
        self.list.capacity() * size_of::<T>()
    }
}

/// Bytes a list holds (its capacity).
fn bytes<T>(v: &Vec<T>) -> usize {
    v.capacity() * size_of::<T>()
}

/// How much of the listed and queued spend and usage a batch writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    /// Only what the batch's own messages touch.
    Nothing,
    /// The next chunk of the round in progress (starting one if none is).
    Chunk,
    /// Everything, now: `flush`, `usage`, `close`. A round over everything listed and
    /// queued, all its chunks (one transaction each) written before anyone is answered.
    All,
}

/// Meters asking for a background lease top-up (each at most once: its `pending` mark),
/// and the writer's bell for them: only the request that finds the bell silent rings it
/// (sends [`Msg::PrefetchBell`]), so a busy verify thread wakes the writer once per batch.
#[derive(Default)]
pub(crate) struct Prefetches {
    queue: SegQueue<MeterRef>,
    bell: AtomicBool,
}

impl Prefetches {
    /// Queues `meter`; true when the caller must ring the bell.
    ///
    /// The push comes before the bell's swap and [`take`](Self::take) clears the bell before
    /// it pops (both `SeqCst`): a request that finds the bell ringing pushed before the
    /// writer's clear, so that writer's pops see its meter.
    pub(crate) fn push(&self, meter: MeterRef) -> bool {
        self.queue.push(meter);
        !self.bell.swap(true, Ordering::SeqCst)
    }

    /// Takes up to `max` queued meters, clearing the bell first. With more left, the bell
    /// stays rung: the writer comes back for the rest without waiting (see `run`).
    fn take(&self, max: usize) -> Vec<MeterRef> {
        self.bell.store(false, Ordering::SeqCst);
        let taken: Vec<MeterRef> = std::iter::from_fn(|| self.queue.pop()).take(max).collect();
        if !self.queue.is_empty() {
            self.bell.store(true, Ordering::SeqCst);
        }
        taken
    }

    fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    fn len(&self) -> usize {
        self.queue.len()
    }
}

/// Runs the writer loop until `Close`, `Abandon` or every sender is gone.
pub(crate) fn run(shared: Arc<Shared>, rx: Receiver<Msg>) {
    let mut listed = Listed::default();
    let mut last_round = std::time::Instant::now();
    let mut failed = false;
    let mut clock_seen = shared.clock.now().0;
    loop {
        // A backlog of prefetches (more than one batch's worth) or a round in progress is
        // taken up without waiting — unless the last commit failed: a disk that keeps
        // failing (or a file fenced off after a redb panic) is retried at the flush interval,
        // not in a loop that would take a core.
        let wait = if failed || (shared.prefetches.is_empty() && !listed.in_round()) {
            FLUSH_INTERVAL
        } else {
            Duration::ZERO
        };
        let first = match rx.recv_timeout(wait) {
            Ok(msg) => Some(msg),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                apply(&shared, &mut listed, Vec::new(), true, Flush::All);
                return;
            }
        };
        let mut batch: Vec<Msg> = first.into_iter().collect();
        #[cfg(test)]
        if let Some(Msg::Hold(release)) = batch.first() {
            let _ = release.recv();
            batch.clear();
        }
        drain(&rx, &mut batch);
        if !batch.is_empty() && batch.iter().all(is_bell) && !listed.in_round() {
            let until = std::time::Instant::now() + PREFETCH_GATHER;
            while batch.len() < MAX_BATCH && shared.prefetches.len() < MAX_BATCH {
                let left = until.saturating_duration_since(std::time::Instant::now());
                let Ok(msg) = rx.recv_timeout(left) else {
                    break; // the window closed (or every sender is gone: the next turn sees it)
                };
                let start = batch.len();
                batch.push(msg);
                drain(&rx, &mut batch);
                if !batch[start..].iter().all(is_bell) {
                    break;
                }
            }
        }
        if batch.iter().any(|m| matches!(m, Msg::Abandon)) {
            return;
        }
        let now = shared.clock.now().0;
        if now.saturating_add(CLOCK_STEP_BACK) < clock_seen {
            forget_times(&shared);
        }
        clock_seen = now;
        // A flush covers every prefetch asked for before it: a backlog goes first, a batch
        // at a time.
        let syncing = batch.iter().any(|m| matches!(m, Msg::Flush { .. }));
        if syncing {
            while shared.prefetches.len() > MAX_BATCH {
                apply(
                    &shared,
                    &mut listed,
                    prefetch_batch(&shared),
                    false,
                    Flush::Nothing,
                );
            }
        }
        // Queued prefetches go first: each was asked for before any message that follows
        // its request's bell, and a lease granted before a retire or a set is taken back by it.
        let mut prefetched = prefetch_batch(&shared);
        pace_leases(&shared, prefetched.len());
        batch.retain(|m| !matches!(m, Msg::PrefetchBell));
        prefetched.append(&mut batch);
        let batch = prefetched;
        let closing = batch.iter().any(|m| matches!(m, Msg::Close { .. }));
        let draining = batch.iter().any(|m| matches!(m, Msg::Drain { .. }));
        let dirty =
            !shared.dirty_meters.is_empty() || !shared.dirty_usage.is_empty() || !listed.is_empty();
        let flush = if closing || draining || syncing {
            last_round = std::time::Instant::now();
            Flush::All
        } else if listed.in_round() {
            Flush::Chunk
        } else if dirty && last_round.elapsed() >= shared.flush_every {
            last_round = std::time::Instant::now();
            Flush::Chunk
        } else {
            Flush::Nothing
        };
        if batch.is_empty() && flush == Flush::Nothing {
            continue;
        }
        failed = !apply(&shared, &mut listed, batch, closing || draining, flush);
        if closing {
            return;
        }
    }
}

/// How far the wall clock must go back between two turns of the writer for the meters'
/// refill and empty times to be worked out again.
const CLOCK_STEP_BACK: u64 = 1_000;

/// The wall clock was set back (an NTP step, a resumed VM): every meter's refill and empty
/// times were worked out for a period it may not have reached. Each is made due now, so its
/// next request asks the writer, which works them out again, counting a refill made while the
/// clock was ahead as this period's (`refill::apply_due`). Found by a reviewer: a clock a year
/// ahead, then set right, left an emptied key refused in memory, with no refill, for a year.
/// Within a writer turn of the step (it wakes every `FLUSH_INTERVAL` at least).
fn forget_times(shared: &Shared) {
    for meter in shared.meters.lock().all() {
        meter.set_empty_until(0);
        set_refill_at(shared, &meter, 0);
    }
}

/// Adjusts the smallest lease to the writer's backlog, given the prefetches it just took.
///
/// Every renewal is a record write on a page of its own: with many keys each used now and
/// then (1M keys at 700k requests/s: ≈ 45k renewals/s of 16 units), renewals can outrun the
/// writer; then the prefetch queue grows, top-ups land late, and requests whose lease ran
/// out wait behind it for hundreds of ms (docs/PERFORMANCE.md). While prefetches are left
/// after a full take, the smallest lease doubles (up to `MAX_LEASE_FLOOR`), so each renewal
/// lasts longer; once a take finds few, it halves back. A crash still loses at most the
/// leases in memory — larger ones only while the writer is behind, and never more than a
/// quarter of a balance because of the floor (see [`Meter::adapt`]).
fn pace_leases(shared: &Shared, taken: usize) {
    let floor = shared.lease_floor.load(Ordering::Relaxed);
    let next = next_lease_floor(floor, taken, !shared.prefetches.is_empty());
    shared.lease_floor.store(next, Ordering::Relaxed);
}

/// The smallest lease after a take of `taken` prefetches that left some queued (`behind`)
/// or not.
fn next_lease_floor(floor: u64, taken: usize, behind: bool) -> u64 {
    if behind {
        (floor * 2).min(MAX_LEASE_FLOOR)
    } else if taken < MAX_BATCH / 8 {
        (floor / 2).max(MIN_LEASE)
    } else {
        floor
    }
}

/// Up to `MAX_BATCH` queued prefetches, as lease messages.
fn prefetch_batch(shared: &Shared) -> Vec<Msg> {
    let meters = shared.prefetches.take(MAX_BATCH).into_iter();
    meters
        .map(|meter| Msg::Lease {
            meter,
            need: 0,
            reply: None,
        })
        .collect()
}

/// Moves every message already queued into `batch` (up to `MAX_BATCH`).
fn drain(rx: &Receiver<Msg>, batch: &mut Vec<Msg>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(msg) => batch.push(msg),
            Err(_) => break,
        }
    }
}

/// A message nobody waits for, which gathers company before a batch commits: the bell of
/// queued lease top-ups, or a settlement.
fn is_bell(msg: &Msg) -> bool {
    matches!(msg, Msg::PrefetchBell | Msg::Settle { .. })
}

/// Records touched by one batch, loaded once and written once.
struct Working<'t> {
    table: redb::Table<'t, u64, &'static [u8]>,
    records: BTreeMap<u64, Option<CreditsRecord>>,
    /// Records that did not decode, and why. They read as no record and are never written:
    /// left as they are, for `check` to name. Failing the batch instead would hold back every
    /// other message in it, and writing over one would lose what it held. A meter whose
    /// record the writer finds unreadable is marked so (`Meter::mark_unreadable`): it is
    /// leased nothing and its key's peeks are refused.
    unreadable: HashMap<u64, CodecError>,
    /// Reads of this id fail (see `Shared::fail_reads_of`).
    #[cfg(test)]
    fail_reads_of: u64,
}

impl Working<'_> {
    fn get(&mut self, id: u64) -> Result<Option<&mut CreditsRecord>> {
        #[cfg(test)]
        if id == self.fail_reads_of {
            let failed = std::io::Error::other("simulated read failure");
            return Err(redb::StorageError::Io(failed).into());
        }
        if !self.records.contains_key(&id) {
            let record = match self.table.get(id)? {
                Some(bytes) => match codec::decode::<CreditsRecord>(bytes.value()) {
                    Ok(record) if record.balanced() => Some(record),
                    // Decoded, but its figures were changed on disk: leasing from it could
                    // hand out credits never granted.
                    Ok(_) => {
                        let e = CodecError::Corrupt {
                            record: <CreditsRecord as codec::Record>::NAME,
                            reason: "its figures do not add up (spent + lost + leased + balance \
                                     is not what was granted)"
                                .into(),
                        };
                        self.unreadable.insert(id, e);
                        None
                    }
                    Err(e) => {
                        self.unreadable.insert(id, e);
                        None
                    }
                },
                None => None,
            };
            self.records.insert(id, record);
        }
        Ok(self.records.get_mut(&id).and_then(Option::as_mut))
    }

    /// Units leased from balance `id`, read without loading the record for writing (0 if
    /// it is absent or unreadable).
    fn leased(&mut self, id: u64) -> Result<u64> {
        #[cfg(test)]
        if id == self.fail_reads_of {
            return self.get(id).map(|_| 0);
        }
        if let Some(record) = self.records.get(&id) {
            return Ok(record.as_ref().map_or(0, |r| r.leased));
        }
        let Some(bytes) = self.table.get(id)? else {
            return Ok(0);
        };
        let record = codec::decode::<CreditsRecord>(bytes.value());
        Ok(record.map_or(0, |r| r.leased))
    }

    fn write_all(&mut self) -> Result<()> {
        for (id, record) in &self.records {
            if let Some(record) = record {
                self.table.insert(*id, codec::encode(record).as_slice())?;
            }
        }
        Ok(())
    }
}

/// What to do in memory once the batch is durable, or to undo if it is not.
#[derive(Default)]
struct Effects {
    leases: Vec<(MeterRef, u64, u64)>, // meter, units granted, empty until (ms)
    /// Units left leased once every lease was given back (a closing batch only).
    held: Option<u64>,
    /// The meters holding them (see [`Listed::still_leased`]).
    still_leased: Option<Vec<MeterRef>>,
    /// Where in `leases` units were granted, by meter id: what a later message in the
    /// batch takes back without scanning every lease of the batch.
    granted_at: HashMap<u64, Vec<usize>>,
    /// Units of those leases handed to waiting requests, by meter id: reserved, not left.
    handed: HashMap<u64, u64>,
    /// Waiting requests: the lease (index in `leases`) their units come out of, how many
    /// they need (`None`: the balance cannot cover it), the balance epoch when it was leased,
    /// and where to hand them.
    handoffs: Vec<(usize, Option<u64>, u32, Sender<Handoff>)>,
    shortfalls: Vec<(Sender<u64>, u64)>,
    /// Refunds given back to the balance (see [`Msg::Return`]), answered once durable.
    returns: Vec<(MeterRef, u64, u32, Option<Sender<()>>)>,
    /// Each balance's durable figure as this batch leaves it, in batch order: the meters
    /// learn it once the batch is durable (a failed one leaves them the committed figure).
    balances: Vec<(MeterRef, u64)>,
    /// Returns left by a failed batch that this one could not read for either: kept for the
    /// next, whatever becomes of this one.
    late: Vec<(MeterRef, u64, u32)>,
    /// Meters whose epoch this batch ended, with the epoch and refill time (ms) before:
    /// restored if it fails (a failed refill must still be due).
    ended: Vec<(MeterRef, u32, u64)>,
    /// What this batch changed of what the host has been told of each balance (an
    /// exhaustion reported, a low-balance figure, a top-up's "grew"): undone, newest first,
    /// if the batch fails, since its events are not sent and its changes did not happen.
    told: Vec<(MeterRef, Told)>,
    /// Replies to balance changes, sent once the batch is durable (a refused change too: its
    /// `reclaim` changed the meter, which the caller's next request must find settled).
    adjusts: Vec<(Sender<Result<u64>>, Result<u64>)>,
    flushed_spend: Vec<(MeterRef, u64)>,
    flushed_usage: Vec<(Arc<CachedKey>, u64, u64, u64)>,
    /// Keys' durable lifetime spend after this batch's usage writes, for their spend tiers.
    durable_spent: Vec<(u64, u64)>,
    /// The meters and keys this batch flushes (all listed and queued ones, or a round's
    /// chunk): what goes back to be flushed if the batch fails.
    meters_seen: Vec<MeterRef>,
    usage_seen: Vec<Arc<CachedKey>>,
    /// What stays listed if it commits, and what was unlisted.
    meters_kept: Vec<MeterRef>,
    usage_kept: Vec<Arc<CachedKey>>,
    unlisted: Vec<MeterRef>,
    reclaimed: Vec<(MeterRef, u64)>,
    events: Vec<CreditEvent>,
    syncs: Vec<Sender<Result<()>>>,
    /// The message a storage error stopped halfway, if it can still be answered: answered as
    /// those the failed batch did not reach.
    stopped: Option<Msg>,
    retired: Vec<MeterRef>,
    /// Balances whose remembered exhaustion a change forgot (see [`Registry::grew`]):
    /// remembered again if the batch fails.
    forgotten: Vec<u64>,
}

/// Runs `batch` (and the flush asked for) as one transaction, or for [`Flush::All`] as
/// many as the round takes, and answers `flush` and `close` once all are durable.
/// Returns whether it committed.
fn apply(
    shared: &Shared,
    listed: &mut Listed,
    batch: Vec<Msg>,
    closing: bool,
    flush: Flush,
) -> bool {
    let now = shared.clock.now().0;
    let chunked = match flush {
        Flush::Nothing => false,
        Flush::Chunk => {
            if !listed.in_round() {
                listed.start_round(shared, now);
            }
            true
        }
        Flush::All => {
            listed.start_round(shared, now);
            true
        }
    };
    let (mut syncs, mut outcome) = commit(shared, listed, batch, closing, chunked);
    while flush == Flush::All && outcome.is_ok() && listed.in_round() {
        let (more, next) = commit(shared, listed, Vec::new(), false, true);
        syncs.extend(more);
        outcome = next;
    }
    for reply in syncs {
        let _ = reply.send(match &outcome {
            Ok(()) => Ok(()),
            Err(message) => Err(Error::Conflict(format!("flush failed: {message}"))),
        });
    }
    outcome.is_ok()
}

/// One write transaction: `batch`, and with `chunked` the next chunk of the round in
/// progress. Returns the `flush` and `close` requests it carried, for [`apply`] to answer,
/// and whether it committed (the error's message if not).
fn commit(
    shared: &Shared,
    listed: &mut Listed,
    batch: Vec<Msg>,
    closing: bool,
    chunked: bool,
) -> (Vec<Sender<Result<()>>>, std::result::Result<(), String>) {
    let mut fx = Effects::default();
    let mut batch = batch.into_iter();
    let result = shared
        .store
        .guard(|| build(shared, listed, &mut batch, closing, chunked, &mut fx));
    for (meter, units, epoch) in std::mem::take(&mut fx.late) {
        listed.retry_return(meter, units, epoch);
    }
    let working = fx.list_bytes() + listed.bytes();
    shared
        .list_bytes
        .fetch_max(working as u64, Ordering::Relaxed);
    match result {
        Ok(()) => {
            shared.commits.fetch_add(1, Ordering::Relaxed);
            if let Some(held) = fx.held {
                shared.held.store(held, Ordering::Release);
                listed.still_leased = fx.still_leased.take();
            }
            // A waiting request gets the units it asked for straight out of the lease taken
            // for it, before anyone else can reserve them: handed to the meter, they could go to
            // another thread every time (`Exact` mode, many threads on one key).
            let handed: Vec<_> = fx
                .handoffs
                .into_iter()
                .map(|(at, need, epoch, reply)| {
                    let (meter, units, _) = &mut fx.leases[at];
                    let handed = need.map(|need| need.min(*units));
                    *units -= handed.unwrap_or(0);
                    (meter.clone(), handed, epoch, reply)
                })
                .collect();
            for (meter, balance) in fx.balances {
                meter.durable_balance.store(balance, Ordering::Release);
            }
            for (meter, units, empty_until) in fx.leases {
                meter.give_back(units);
                meter.set_empty_until(empty_until);
                meter.pending.store(false, Ordering::Release);
            }
            // Before any answer (a `flush` caller then sees the tiers it made durable).
            if !fx.durable_spent.is_empty() {
                let mut limits = shared.limits.lock();
                for (id, spent) in fx.durable_spent.drain(..) {
                    limits.spent_durably(id, spent);
                }
            }
            // Before any answer: whoever got one finds the batch's events already sent.
            for event in fx.events {
                shared.send_event(event);
            }
            // Only now, with the rest of each lease in its meter: a woken request may commit
            // or refund at once, and whoever looks next must see the whole lease.
            for (meter, units, epoch, reply) in handed {
                let handoff = units.map_or(Handoff::Short, |units| Handoff::Units { units, epoch });
                if reply.send(handoff).is_err() {
                    meter.give_back(units.unwrap_or(0)); // nobody waits: the meter keeps them
                }
            }
            for (r, n) in fx.shortfalls {
                let _ = r.send(n);
            }
            for (_, _, _, r) in fx.returns {
                if let Some(r) = r {
                    let _ = r.send(());
                }
            }
            for (r, n) in fx.adjusts {
                let _ = r.send(n);
            }
            drop((fx.flushed_spend, fx.reclaimed, fx.flushed_usage));
            drop((fx.meters_seen, fx.usage_seen));
            if chunked {
                listed.keep(fx.usage_kept, fx.meters_kept);
            }
            let mut meters = shared.meters.lock();
            for meter in fx.retired {
                // The registry's handle and this one: nobody else uses it, so it can go.
                // (`remove` checks that it is the registered one: with a grant in flight
                // holding it instead, two handles would not mean that.) Unless a grant that
                // ended during the commit refunded into it: then it keeps that lease until a
                // miss takes it up again or the close returns it.
                if MeterRef::strong_count(&meter) == 2 && meter.leased() == 0 {
                    meters.remove(&meter);
                }
            }
            for meter in fx.unlisted {
                // A key's meter that left the cache while listed (so its retirement left it
                // in the registry): with its lease returned and nobody else holding it, it goes.
                let unused =
                    MeterRef::strong_count(&meter) == 2 && meter.leased() == 0 && !meter.is_pool();
                if unused {
                    meters.remove(&meter);
                }
            }
        }
        Err(e) => {
            // Nothing became durable: put every swapped counter back and refuse the requests.
            // What the flush saw goes back to the front of its round, marked first so the
            // restores below do not queue it a second time.
            for meter in &fx.meters_seen {
                meter.dirty.store(true, Ordering::SeqCst);
            }
            for key in &fx.usage_seen {
                key.mark_dirty();
            }
            listed.pools.put_back(std::mem::take(&mut fx.meters_seen));
            listed.keys.put_back(std::mem::take(&mut fx.usage_seen));
            for (meter, units) in fx.flushed_spend {
                if meter.spend(units) {
                    shared.dirty_meters.push(meter);
                } else if let MeterRef::Own(home) = &meter {
                    // A key's own meter is flushed with the key: list it if it is not.
                    if units > 0 && home.mark_dirty() {
                        shared.dirty_usage.push(home.clone());
                    }
                }
            }
            for (state, spent, requests, last_used) in fx.flushed_usage {
                state.restore(spent, requests, last_used);
                if state.mark_dirty() {
                    shared.dirty_usage.push(state);
                }
            }
            // The epochs first, newest change first: the lease taken back below belongs to
            // the balance that stays.
            for (meter, epoch, refill_at) in fx.ended.into_iter().rev() {
                meter.restore_epoch(epoch);
                set_refill_at(shared, &meter, refill_at);
            }
            for (meter, told) in fx.told.into_iter().rev() {
                meter.untell(told);
            }
            if !fx.forgotten.is_empty() {
                let mut meters = shared.meters.lock();
                for id in fx.forgotten {
                    meters.ungrew(id);
                }
            }
            for (meter, units) in fx.reclaimed {
                meter.give_back(units);
            }
            for (meter, _, _) in fx.leases {
                meter.pending.store(false, Ordering::Release);
            }
            let message = e.to_string();
            for (_, _, epoch, r) in fx.handoffs {
                let _ = r.send(Handoff::Units { units: 0, epoch });
            }
            for (r, _) in fx.shortfalls {
                let _ = r.send(0);
            }
            for (meter, units, epoch, r) in fx.returns {
                keep_or_retry(listed, meter, units, epoch, r);
            }
            for (r, _) in fx.adjusts {
                let _ = r.send(Err(not_changed(&message)));
            }
            // The messages the batch did not reach get the same answers.
            for msg in fx.stopped.take().into_iter().chain(batch) {
                refuse(msg, &message, listed, &mut fx.syncs);
            }
            return (fx.syncs, Err(message));
        }
    }
    (fx.syncs, Ok(()))
}

/// A return whose batch failed: the meter keeps what its lease takes under `epoch` (as
/// before the refund asked; a close returns it), the next batch tries the rest again.
fn keep_or_retry(
    listed: &mut Listed,
    meter: MeterRef,
    units: u64,
    epoch: u32,
    reply: Option<Sender<()>>,
) {
    let kept = meter.give_back_up_to(units, MAX_LEASED, epoch).unwrap_or(0);
    if kept < units && !meter.retired() {
        listed.retry_return(meter, units - kept, epoch);
    }
    if let Some(reply) = reply {
        let _ = reply.send(());
    }
}

/// Answers a message of a batch that failed before reaching it, as [`commit`] answers those
/// it reached: nothing became durable. (A retirement is dropped: the storage has failed, so
/// no later batch could write it either; the close returns the meter's lease.)
fn refuse(msg: Msg, message: &str, listed: &mut Listed, syncs: &mut Vec<Sender<Result<()>>>) {
    match msg {
        Msg::Lease { meter, reply, .. } => {
            meter.pending.store(false, Ordering::Release);
            if let Some(reply) = reply {
                let epoch = meter.epoch();
                let _ = reply.send(Handoff::Units { units: 0, epoch });
            }
        }
        Msg::Shortfall { reply, .. } => {
            let _ = reply.send(0);
        }
        Msg::Adjust { reply, .. } => {
            let _ = reply.send(Err(not_changed(message)));
        }
        Msg::Flush { reply } | Msg::Drain { reply } | Msg::Close { reply } => syncs.push(reply),
        Msg::Return {
            meter,
            units,
            epoch,
            reply,
        } => keep_or_retry(listed, meter, units, epoch, reply),
        // A settlement not written stays in its meter, for the next write to take.
        Msg::Settle { .. } | Msg::Retire { .. } | Msg::Abandon | Msg::PrefetchBell => {}
        #[cfg(test)]
        Msg::Hold(_) => {}
    }
}

/// The answer to a balance change whose batch failed with `message`.
fn not_changed(message: &str) -> Error {
    Error::Conflict(format!("balance not changed: {message}"))
}

/// Runs `batch` into one transaction and commits it. On an error, what `batch` still holds
/// was not reached.
fn build(
    shared: &Shared,
    listed: &mut Listed,
    batch: &mut std::vec::IntoIter<Msg>,
    closing: bool,
    chunked: bool,
    fx: &mut Effects,
) -> Result<()> {
    let now = shared.clock.now();
    // Closing, or about to: every lease is about to be returned, so hand out none.
    let leasing_stopped = closing || shared.closing.load(Ordering::Acquire);
    let txn = shared.store.begin_write()?;
    {
        let mut work = Working {
            table: txn.open_table(CREDITS)?,
            records: BTreeMap::new(),
            unreadable: HashMap::new(),
            #[cfg(test)]
            fail_reads_of: shared.fail_reads_of.load(Ordering::Relaxed),
        };
        // Returns a failed batch left. One whose record cannot be read waits for the next
        // batch again rather than failing this one (and every one after it) for the others;
        // those it applies are listed with this batch's, so that a failure tries them again.
        for ((_, epoch), (meter, units)) in std::mem::take(&mut listed.returns) {
            match return_units(&mut work, fx, meter.clone(), units, epoch) {
                Ok(()) => fx.returns.push((meter, units, epoch, None)),
                Err(_) => fx.late.push((meter, units, epoch)),
            }
        }
        if chunked {
            fx.meters_seen = listed.pools.chunk();
            fx.usage_seen = listed.keys.chunk();
            flush_spend(shared, &mut work, fx, listed.flushed_at_ms)?;
            flush_usage(shared, &txn, &mut work, fx)?;
        }
        for msg in batch {
            match msg {
                // A top-up leased for since it was queued (by a waiting request's own
                // commit): leasing again would double the lease in memory for nothing.
                Msg::Lease {
                    meter,
                    need: 0,
                    reply: None,
                } if !leasing_stopped && !meter.wants_top_up(now.0) => {
                    meter.pending.store(false, Ordering::Release);
                }
                Msg::Lease { meter, need, reply } => {
                    let id = meter.id;
                    let (at, covered) = if leasing_stopped {
                        (fx.grant(meter, 0, 0), true)
                    } else {
                        match lease(shared, &mut work, fx, meter.clone(), need, now) {
                            Ok(leased) => leased,
                            Err(e) => {
                                fx.stopped = Some(Msg::Lease { meter, need, reply });
                                return Err(e);
                            }
                        }
                    };
                    if !covered {
                        refused(shared, &work, fx, at);
                    }
                    // Closing, or retired, undecodable or absent: its balance cannot be leased
                    // from (now or ever).
                    let absent = matches!(work.records.get(&id), Some(None));
                    let retired = fx.leases[at].0.retired();
                    match reply {
                        // At once: asking again would meet the same record.
                        Some(reply) if leasing_stopped || absent || retired => {
                            let gone = retired || !work.unreadable.contains_key(&id);
                            let _ = reply.send(if gone && !leasing_stopped {
                                Handoff::Gone
                            } else {
                                Handoff::Unavailable
                            });
                        }
                        Some(reply) => {
                            let epoch = fx.leases[at].0.epoch();
                            if covered {
                                let handed = fx.handed.entry(id).or_default();
                                *handed = handed.saturating_add(need);
                            }
                            fx.handoffs
                                .push((at, covered.then_some(need), epoch, reply));
                        }
                        None => {}
                    }
                }
                Msg::Shortfall {
                    meter,
                    units,
                    reply,
                } => {
                    let pending = cancel_pending_leases(fx, &meter);
                    let charged = match live(&mut work, &meter)? {
                        Some(r) => {
                            // Units leased earlier in this batch go back first, so the
                            // balance is whole.
                            let pending = pending.min(r.leased);
                            r.leased -= pending;
                            r.balance += pending;
                            new_period(shared, fx, &meter, r, now);
                            let from_balance = units.min(r.balance);
                            r.balance -= from_balance;
                            // A lease that reached memory since the grant's commit looked.
                            let from_lease = meter.take_up_to((units - from_balance).min(r.leased));
                            fx.reclaimed.push((meter.clone(), from_lease));
                            r.leased -= from_lease;
                            r.spent += from_balance + from_lease;
                            fx.balances.push((meter.clone(), r.balance));
                            // Spend that reached no lease (a peek, then a commit of the real
                            // cost) must tell the host as a leased spend does.
                            let remaining = r.balance + meter.leased();
                            low_balance(shared, fx, &meter, remaining);
                            let charged = from_balance + from_lease;
                            if charged < units {
                                exhausted(shared, fx, &meter, remaining);
                            }
                            charged
                        }
                        None => 0,
                    };
                    fx.shortfalls.push((reply, charged));
                }
                Msg::Adjust {
                    id,
                    change,
                    audit,
                    reply,
                } => {
                    // Listed before anything here can fail: a failed batch answers every
                    // listed change with its error (dropped, the caller would be told the
                    // ledger is closed). The answer is set below.
                    let at = fx.adjusts.len();
                    fx.adjusts.push((reply, Ok(0)));
                    let (meter, forgot) = {
                        let mut meters = shared.meters.lock();
                        let forgot = meters.grew(id);
                        if forgot {
                            fx.forgotten.push(id);
                        }
                        (meters.get(id), forgot)
                    };
                    // A refused change did not grow the balance: its exhaustion stands.
                    let refuse = |fx: &mut Effects| {
                        if forgot {
                            fx.forgotten.pop();
                            shared.meters.lock().ungrew(id);
                        }
                    };
                    if let Some(meter) = &meter {
                        reclaim(shared, &mut work, fx, meter)?;
                    }
                    let Some(r) = work.get(id)? else {
                        let refused = match work.unreadable.get(&id) {
                            Some(e) => {
                                if let Some(meter) = &meter {
                                    meter.mark_unreadable();
                                }
                                Error::Codec(e.clone())
                            }
                            None => Error::NotFound {
                                what: "credit balance",
                            },
                        };
                        fx.adjusts[at].1 = Err(refused);
                        refuse(fx);
                        continue;
                    };
                    if let Some(meter) = &meter {
                        // Units reserved by grants still held may have crossed the
                        // low-balance threshold (settled spend, `reclaim` told): told now,
                        // before the change below moves the figure crossings are measured
                        // from.
                        low_balance(shared, fx, meter, r.balance);
                    }
                    // What a refusal saw: the change is news only if it grows the balance.
                    let start = r.balance;
                    // A refill that fell due comes first: the admin's change is the newer one
                    // and must not be replaced by it later.
                    let refilled = refill::apply_due(r, now);
                    let before = r.balance;
                    let balance = match change {
                        Adjust::Set(n) => Some(n),
                        Adjust::TopUp(n) => r.balance.checked_add(n),
                    };
                    // Everything ever granted must stay countable: spent + lost + left.
                    let granted =
                        balance.and_then(|b| r.granted.saturating_sub(before).checked_add(b));
                    let applied = match (balance, granted) {
                        (Some(balance), Some(granted)) => {
                            r.balance = balance;
                            r.granted = granted;
                            true
                        }
                        _ => {
                            let too_many = Error::invalid(
                                "credits",
                                format!(
                                    "the credits ever granted to this balance (spent, lost \
                                     and left) would pass {}",
                                    u64::MAX
                                ),
                            );
                            fx.adjusts[at].1 = Err(too_many);
                            // A refill applied above is written with the batch even so: the
                            // meter must learn of the new period below.
                            if !refilled {
                                refuse(fx);
                                continue;
                            }
                            false
                        }
                    };
                    if applied {
                        // In this transaction: a change reported as failed must not have
                        // landed (a caller retrying a top-up would add it twice).
                        if let Some(AuditLine {
                            actor,
                            action,
                            target,
                        }) = audit
                        {
                            let fields = &["balance"];
                            crate::audit::append_checked(
                                &txn, now, &actor, action, &target, fields,
                            )?;
                        }
                        fx.adjusts[at].1 = Ok(r.balance);
                    }
                    let grew = r.balance > start;
                    if !grew {
                        refuse(fx); // a run-out remembered stands
                    }
                    if let Some(meter) = meter {
                        // A reservation made from the old lease carries the old epoch, so a
                        // set makes it final, and so does a refill applied here (its refund
                        // must not land in the new period, as in `new_period`). What the
                        // lease holds now arrived since `reclaim` took it: refunds of the
                        // old balance, final too.
                        if (applied && matches!(change, Adjust::Set(_))) || refilled {
                            end_epoch(fx, &meter, r);
                        }
                        if grew {
                            fx.tell(&meter, meter.replenished());
                        }
                        fx.balances.push((meter.clone(), r.balance));
                        set_refill_at(shared, &meter, refill::due_at(r, now));
                        // A set below the threshold is a fall like any other.
                        low_balance(shared, fx, &meter, r.balance);
                        fx.leases.push((meter, 0, empty_until(r, now)));
                    } else if let Some((threshold, subject)) = threshold_of(&txn, id) {
                        // No meter in memory, so none knows the figure before: this change's
                        // own fall is told here (the next meter starts from the new figure).
                        if start > threshold && r.balance <= threshold {
                            let low = CreditEventKind::LowBalance;
                            fx.events.push(shared.event_of(low, subject, id, r.balance));
                        }
                    }
                }
                Msg::Retire { meter } => {
                    reclaim(shared, &mut work, fx, &meter)?;
                    fx.retired.push(meter);
                }
                Msg::Return {
                    meter,
                    units,
                    epoch,
                    reply,
                } => {
                    fx.returns.push((meter.clone(), units, epoch, reply));
                    return_units(&mut work, fx, meter, units, epoch)?;
                }
                Msg::Settle { meter } => {
                    let units = meter.spent.swap(0, Ordering::AcqRel);
                    settle_spend(shared, &mut work, fx, meter, units)?;
                }
                Msg::Flush { reply } | Msg::Drain { reply } | Msg::Close { reply } => {
                    fx.syncs.push(reply)
                }
                Msg::Abandon | Msg::PrefetchBell => {}
                #[cfg(test)]
                Msg::Hold(_) => {}
            }
        }
        if closing {
            // Taken, not cloned: a batch that fails leaves none, and the next pass visits all.
            let mut meters = match listed.still_leased.take() {
                Some(meters) => meters,
                None => shared.meters.lock().all(),
            };
            // In key order, the records are read page after page, not at random.
            meters.sort_unstable_by_key(|m| m.id);
            let mut held = 0u64;
            let mut still_leased = Vec::new();
            for meter in meters {
                // No request reserves from the lease any more (`Meter::current` is false:
                // each asks the writer, which refuses while closing), or a refund landing in
                // it after this could be reserved again by a new request, and a close under
                // traffic would wait out its grace.
                meter.set_refill_at(0);
                let left = reclaim(shared, &mut work, fx, &meter)?;
                if left > 0 {
                    held = held.saturating_add(left);
                    still_leased.push(meter);
                }
            }
            fx.held = Some(held);
            fx.still_leased = Some(still_leased);
        }
        // Whether a balance is empty is known only once the whole batch has run (a later
        // message may have put units back): decide it from the final records.
        for (meter, _, empty) in fx.leases.iter_mut() {
            if let Some(Some(r)) = work.records.get(&meter.id) {
                *empty = empty_until(r, now);
                fx.balances.push((meter.clone(), r.balance));
            }
        }
        work.write_all()?;
    }
    txn.commit()?;
    Ok(())
}

/// Moves spent units from `leased` to `spent` for every pool's meter the flush saw, keeping
/// listed those in use since the last round started (`since_ms`).
fn flush_spend(
    shared: &Shared,
    work: &mut Working<'_>,
    fx: &mut Effects,
    since_ms: u64,
) -> Result<()> {
    for i in 0..fx.meters_seen.len() {
        let meter = fx.meters_seen[i].clone();
        if meter.retired() {
            continue; // its balance is gone: nothing to write, nothing to keep
        }
        let mut units = meter.spent.swap(0, Ordering::SeqCst);
        if units == 0 && !meter.leased_since(since_ms) {
            units = meter.unlist();
            if units == 0 {
                continue;
            }
            // A spend raced the unlisting: whoever set the mark again keeps the meter.
            if !meter.dirty.swap(true, Ordering::AcqRel) {
                fx.meters_kept.push(meter.clone());
            }
        } else {
            fx.meters_kept.push(meter.clone());
        }
        settle_spend(shared, work, fx, meter, units)?;
    }
    Ok(())
}

/// Writes `units` spent through `meter` into its balance's record (leased → spent).
fn settle_spend(
    shared: &Shared,
    work: &mut Working<'_>,
    fx: &mut Effects,
    meter: MeterRef,
    units: u64,
) -> Result<()> {
    if units == 0 {
        return Ok(());
    }
    // Listed before the read: if it fails, the batch gives them back to the meter (taken from
    // it and not yet durable, they would otherwise be lost).
    fx.flushed_spend.push((meter.clone(), units));
    if let Some(r) = live(work, &meter)? {
        let units = units.min(r.leased);
        r.leased -= units;
        r.spent += units;
        let remaining = r.balance + meter.leased();
        low_balance(shared, fx, &meter, remaining);
    }
    Ok(())
}

/// The durable record behind a meter, unless the meter was retired.
fn live<'w>(work: &'w mut Working<'_>, meter: &Meter) -> Result<Option<&'w mut CreditsRecord>> {
    if meter.retired() {
        return Ok(None);
    }
    // What the meter learns first, then the record again (kept by `work`: no second read),
    // since a borrow returned on one branch could not be let go on the other.
    match work.get(meter.id)?.map(|r| r.balance) {
        Some(balance) => meter.sighted(balance + meter.leased()),
        None if work.unreadable.contains_key(&meter.id) => meter.mark_unreadable(),
        None => {}
    }
    work.get(meter.id)
}

/// Returns `units` reserved under `epoch` to `meter`'s balance, or, if that epoch has ended
/// (a `set` or a refill earlier, in batch order), drops them from the books with it.
fn return_units(
    work: &mut Working<'_>,
    fx: &mut Effects,
    meter: MeterRef,
    units: u64,
    epoch: u32,
) -> Result<()> {
    if let Some(r) = live(work, &meter)? {
        let units = units.min(r.leased);
        r.leased -= units;
        if meter.epoch() == epoch {
            r.balance += units;
            fx.balances.push((meter.clone(), r.balance));
            // The balance grew: `build` decides empty-ness from the record.
            fx.leases.push((meter, 0, 0));
        } else {
            r.granted = r.granted.saturating_sub(units);
        }
    }
    Ok(())
}

/// Reports the request refused by the lease at `at` (the balance and the lease in memory
/// could not cover it), if it is the first refusal since the balance last grew.
///
/// Here, in batch order, not by the request once the batch is durable: by then a top-up later
/// in the batch would count among the credits left, and marking the refusal reported would
/// come after that top-up cleared the mark, hiding the next refusal for good.
fn refused(shared: &Shared, work: &Working<'_>, fx: &mut Effects, at: usize) {
    let meter = fx.leases[at].0.clone();
    let balance = match work.records.get(&meter.id) {
        Some(Some(r)) => r.balance,
        _ => 0,
    };
    let remaining = balance.saturating_add(fx.in_memory(&meter));
    // Spend in memory may have crossed the threshold since the writer last looked: "low"
    // comes before "exhausted".
    low_balance(shared, fx, &meter, remaining);
    exhausted(shared, fx, &meter, remaining);
}

/// A refusal for want of credits, with `remaining` left: reported if it is the first since
/// the balance last grew (and unmarked again if the batch fails, its event unsent).
fn exhausted(shared: &Shared, fx: &mut Effects, meter: &MeterRef, remaining: u64) {
    if meter.first_refusal() {
        fx.tell(meter, Some(Told::Reported));
        let event = shared.event(CreditEventKind::Exhausted, meter, remaining);
        fx.events.push(event);
    }
}

/// Emits a low-balance event when the credits left cross the meter's threshold downwards.
fn low_balance(shared: &Shared, fx: &mut Effects, meter: &MeterRef, remaining: u64) {
    let (crossed, told) = meter.note_remaining(remaining);
    fx.tell(meter, told);
    if crossed {
        let event = shared.event(CreditEventKind::LowBalance, meter, remaining);
        fx.events.push(event);
    }
}

/// Gives `meter`'s lease back to its balance and flushes its spend; returns the units still
/// leased after that (what grants still held have reserved). Spend settled here may have
/// crossed the low-balance threshold: told now, as by any other settling (the meter may be
/// leaving: a key evicted, the ledger closing; its next meter takes the figure as known).
fn reclaim(
    shared: &Shared,
    work: &mut Working<'_>,
    fx: &mut Effects,
    meter: &MeterRef,
) -> Result<u64> {
    // Leases granted earlier in this batch reach memory only after the commit: take them
    // back here too, or they would land on top of what this batch decides.
    let pending = cancel_pending_leases(fx, meter);
    // The lease goes back to the balance now, but the meter learns the balance is not empty
    // only after the commit: until then a request finding the lease gone would take the old
    // mark for the truth and refuse with credits left. Cleared first, so that a request that
    // sees the lease gone sees the mark gone too (and asks the writer, which knows).
    meter.set_empty_until(0);
    let lease = meter.take_lease();
    let spent = meter.spent.swap(0, Ordering::AcqRel);
    if pending == 0 && lease == 0 && spent == 0 {
        // Nothing to move (every meter of a second pass while closing, most of them): read
        // what is still leased, writing nothing.
        return work.leased(meter.id);
    }
    // Listed before the read: if it fails, the batch gives them back to the meter.
    fx.reclaimed.push((meter.clone(), lease));
    fx.flushed_spend.push((meter.clone(), spent));
    // A retired meter's balance is gone: a record of its id now is a successor's, which its
    // lease, spend and threshold have nothing to do with (found by a reviewer: a retirement
    // queued behind "unmetered, then metered again" reported the new balance as low).
    if let Some(r) = live(work, meter)? {
        let pending = pending.min(r.leased);
        r.leased -= pending;
        r.balance += pending;
        let back = lease.min(r.leased);
        r.leased -= back;
        r.balance += back;
        let spent = spent.min(r.leased);
        r.leased -= spent;
        r.spent += spent;
        if pending + back > 0 {
            // The durable balance grew: a meter marked empty (its lease had taken the whole
            // balance) must learn it is not, or it refuses verifies while credits are left.
            // A lease entry of no units has `build` decide empty-ness from the final record.
            fx.leases.push((meter.clone(), 0, 0));
        }
        low_balance(shared, fx, meter, r.balance);
        return Ok(r.leased);
    }
    Ok(0)
}

impl Effects {
    /// Lists a change to what the host has been told of `meter`'s balance, if one was made.
    fn tell(&mut self, meter: &MeterRef, told: Option<Told>) {
        if let Some(told) = told {
            self.told.push((meter.clone(), told));
        }
    }

    /// Bytes of the batch's lists of meters and keys.
    fn list_bytes(&self) -> usize {
        bytes(&self.meters_seen)
            + bytes(&self.usage_seen)
            + bytes(&self.meters_kept)
            + bytes(&self.usage_kept)
            + bytes(&self.flushed_spend)
            + bytes(&self.flushed_usage)
            + bytes(&self.unlisted)
    }

    /// Units `meter` can still spend from memory: its lease there and what this batch
    /// leased to it (memory gets it after the commit), less what the batch handed to
    /// requests waiting for it, which are no longer left.
    fn in_memory(&self, meter: &Meter) -> u64 {
        let granted = self.granted_at.get(&meter.id);
        let granted: u64 = granted.map_or(0, |at| at.iter().map(|&i| self.leases[i].1).sum());
        let handed = self.handed.get(&meter.id).copied().unwrap_or(0);
        meter
            .leased()
            .saturating_add(granted)
            .saturating_sub(handed)
    }

    /// A lease of `units` for `meter`, handed over once the batch is durable. Returns its
    /// index in `leases`.
    fn grant(&mut self, meter: MeterRef, units: u64, empty_until: u64) -> usize {
        let at = self.leases.len();
        if units > 0 {
            self.granted_at.entry(meter.id).or_default().push(at);
        }
        self.leases.push((meter, units, empty_until));
        at
    }
}

/// Zeroes the leases granted to `meter` earlier in this batch; returns how many units.
/// Those are all of one meter, the balance's live one: a retired meter (a grant that
/// outlived its key's balance, committing through it) shares its id but had none, and must
/// not cancel its successor's (found by a reviewer: the units stayed leased on disk with no
/// meter holding them, lost at the next open).
fn cancel_pending_leases(fx: &mut Effects, meter: &Meter) -> u64 {
    let granted = fx.granted_at.get(&meter.id).and_then(|at| at.first());
    let mine = granted.is_none_or(|&i| std::ptr::eq(&*fx.leases[i].0, meter));
    if meter.retired() || !mine {
        return 0;
    }
    fx.handed.remove(&meter.id);
    let granted_at = fx.granted_at.remove(&meter.id).unwrap_or_default();
    granted_at
        .into_iter()
        .map(|i| std::mem::take(&mut fx.leases[i].1))
        .sum()
}

/// Moves up to the adaptive lease size (at least `need`) from `balance` to `leased`. Returns
/// the lease's index in `fx.leases`, and whether the balance and the lease in memory together
/// cover `need` (if not, nothing is leased).
fn lease(
    shared: &Shared,
    work: &mut Working<'_>,
    fx: &mut Effects,
    meter: MeterRef,
    need: u64,
    now: Timestamp,
) -> Result<(usize, bool)> {
    // A reservation larger than a lease word holds cannot be made of a handoff and the lease
    // in memory: that lease comes back to the balance first, which alone then covers the
    // request or refuses it. (Found by a reviewer: each answer went into the lease, the
    // request asked again, and 2^48 units ended up in memory, beyond the lease bound.)
    if need > MAX_LEASED {
        reclaim(shared, work, fx, &meter)?;
    }
    // One adaptive lease per meter per batch: a prefetch and a waiting request for the same
    // meter in one batch would otherwise double the size twice (and a crash would lose both);
    // the second gets just what it needs.
    let first = !fx.granted_at.contains_key(&meter.id);
    let Some(r) = live(work, &meter)? else {
        return Ok((fx.grant(meter, 0, 0), true));
    };
    // The record is being written anyway: settle this meter's spend with it.
    let spent = meter.spent.swap(0, Ordering::AcqRel).min(r.leased);
    r.leased -= spent;
    r.spent += spent;
    fx.flushed_spend.push((meter.clone(), spent));
    new_period(shared, fx, &meter, r, now);
    // A request that everything left cannot cover is refused, not handed all of it: that
    // would move the whole balance into memory, beyond the lease bound a crash may lose (and,
    // under `Exact`, past the per-request commits), for a request that fails anyway.
    let in_memory = fx.in_memory(&meter);
    if need > r.balance.saturating_add(in_memory) {
        let empty_until = empty_until(r, now);
        return Ok((fx.grant(meter, 0, empty_until), false));
    }
    let size = if first {
        let floor = shared.lease_floor.load(Ordering::Relaxed);
        meter.adapt(now.0, shared.exact, floor, r.balance)
    } else {
        0
    };
    // A waiting request takes what it needs and tops memory up to one lease, counting what
    // memory still holds: one sent here with a lease in memory (its meter made due, as when
    // the clock went back) does not double what a crash may lose (found by a reviewer).
    let want = match (shared.exact, need) {
        (true, _) => need.max(1),
        (false, 0) => size,
        (false, _) => need.max(size.saturating_sub(meter.leased())),
    };
    // Credits left before this request's reservation (as for a batch's first lease): the
    // leases granted earlier in this batch count, though not yet in memory, less what they
    // hand to the requests waiting for them.
    let remaining = r.balance.saturating_add(in_memory);
    // Requests spend what memory holds unseen: while the credits left are above the
    // low-balance threshold, a lease stops at it (unless this request needs more), so that
    // the crossing is seen at a later lease, with the threshold's figure, and is reported
    // before the balance runs out.
    let unseen = match meter.low_balance_threshold() {
        Some(threshold) if remaining > threshold => r.balance.saturating_sub(threshold).max(need),
        _ => r.balance,
    };
    let grant = want.min(unseen).min(r.balance);
    r.balance -= grant;
    r.leased += grant;
    fx.balances.push((meter.clone(), r.balance));
    low_balance(shared, fx, &meter, remaining);
    let empty_until = empty_until(r, now);
    Ok((fx.grant(meter, grant, empty_until), true))
}

/// Applies a due refill: the new period's balance replaces everything, including the lease
/// memory still holds from the old period. A fall to the low-balance threshold in the old
/// period is told first, with the old period's figure; the new balance is a fall of its own
/// if it is at or below the threshold.
fn new_period(
    shared: &Shared,
    fx: &mut Effects,
    meter: &MeterRef,
    r: &mut CreditsRecord,
    now: Timestamp,
) {
    let old_period = r.balance + meter.leased();
    if refill::apply_due(r, now) {
        low_balance(shared, fx, meter, old_period);
        let pending = cancel_pending_leases(fx, meter).min(r.leased);
        r.leased -= pending;
        r.granted = r.granted.saturating_sub(pending);
        // Like a `set`: a reservation from the old period is final, its refund must not
        // land in the new one.
        end_epoch(fx, meter, r);
        fx.tell(meter, meter.replenished());
        low_balance(shared, fx, meter, r.balance);
    }
    set_refill_at(shared, meter, refill::due_at(r, now));
}

/// The low-balance threshold of balance `id`, if it has one, and what its events name: from
/// its key's or pool's record (ids are never shared between the two). A record that cannot
/// be read has none here: `check` names it, and the change goes on.
fn threshold_of(txn: &redb::WriteTransaction, id: u64) -> Option<(u64, IdKind)> {
    let key = txn.open_table(KEYS).ok()?;
    if let Some(key) = crate::store::get::<KeyRecord>(&key, id).ok()? {
        let threshold = key.limits.low_balance_threshold?;
        return Some((threshold, key.kind.id_kind()));
    }
    let pools = txn.open_table(POOLS).ok()?;
    let pool = crate::store::get::<PoolRecord>(&pools, id).ok()??;
    Some((pool.low_balance_threshold?, IdKind::Pool))
}

/// Tells `meter` when its next refill is due (ms) — or, once the ledger is closing or the
/// meter retired, that it is due now, so that no request reserves from memory any more:
/// each asks the writer, which refuses. Else a shortfall or an admin change during the close
/// grace would let a refund landing in the lease be reserved again by a new request (found
/// by a reviewer), and a failed batch's roll-back could reopen a retired meter's lease.
fn set_refill_at(shared: &Shared, meter: &Meter, due: u64) {
    let stopped = shared.closing.load(Ordering::Acquire) || meter.retired();
    meter.set_refill_at(if stopped { 0 } else { due });
}

/// Starts a new epoch of `meter`'s balance (a set, a refill): the lease memory holds
/// belongs to the old balance and leaves the books with it.
fn end_epoch(fx: &mut Effects, meter: &MeterRef, r: &mut CreditsRecord) {
    fx.ended
        .push((meter.clone(), meter.epoch(), meter.refill_at_ms()));
    let swapped = meter.new_epoch();
    let back = swapped.min(r.leased);
    r.leased -= back;
    r.granted = r.granted.saturating_sub(back);
    fx.reclaimed.push((meter.clone(), swapped));
}

/// Until when a balance is known to stay empty: the next refill, or for ever.
fn empty_until(r: &CreditsRecord, now: Timestamp) -> u64 {
    match (r.balance, r.refill) {
        (0, Some(refill)) => refill::next_period(refill.interval, now).0,
        (0, None) => u64::MAX,
        _ => 0,
    }
}

/// Writes usage deltas (last used, spend, requests) for keys and their accounts, and what
/// each key spent through its own meter, keeping listed the keys used since the last round.
fn flush_usage(
    shared: &Shared,
    txn: &redb::WriteTransaction,
    work: &mut Working<'_>,
    fx: &mut Effects,
) -> Result<()> {
    if fx.usage_seen.is_empty() {
        return Ok(());
    }
    let mut deltas: BTreeMap<u64, (u64, u64, u64)> = BTreeMap::new();
    let mut spenders = std::collections::BTreeSet::new(); // key ids, not accounts'
    for i in 0..fx.usage_seen.len() {
        let state = fx.usage_seen[i].clone();
        // The meter's spend is taken after the usage, as a commit counts it before (see
        // `Meter::spend`): a spend the usage take missed is not missed here either.
        let taken = |state: &CachedKey, (spent, requests, last_used)| {
            let metered = state.own_meter().spent.swap(0, Ordering::SeqCst);
            (spent, requests, last_used, metered)
        };
        let (mut spent, mut requests, mut last_used, mut metered) = taken(&state, state.take());
        if spent == 0 && requests == 0 && metered == 0 {
            (spent, requests, last_used, metered) = taken(&state, state.unlist());
            if spent == 0 && requests == 0 && metered == 0 {
                if state.metering == Metering::Own {
                    fx.unlisted.push(MeterRef::Own(state));
                }
                continue;
            }
            // A request raced the unlisting: whoever set the mark again keeps the key.
            if state.mark_dirty() {
                fx.usage_kept.push(state.clone());
            }
        } else {
            fx.usage_kept.push(state.clone());
        }
        if spent > 0 || requests > 0 {
            // Listed before the read below: if it fails, the batch puts them back.
            fx.flushed_usage
                .push((state.clone(), spent, requests, last_used));
        }
        settle_spend(shared, work, fx, MeterRef::Own(state.clone()), metered)?;
        if spent == 0 && requests == 0 {
            continue;
        }
        spenders.insert(state.id());
        for id in [state.id(), state.owner()] {
            let d = deltas.entry(id).or_default();
            // Lifetime counters of unmetered keys have no balance to bound them: saturate.
            d.0 = d.0.saturating_add(spent);
            d.1 = d.1.saturating_add(requests);
            d.2 = d.2.max(last_used);
        }
    }
    let mut table = txn.open_table(USAGE)?;
    let (keys, accounts) = (txn.open_table(KEYS)?, txn.open_table(ACCOUNTS)?);
    for (id, (spent, requests, last_used)) in deltas {
        let mut usage: UsageRecord = match table.get(id)? {
            Some(bytes) => match codec::decode(bytes.value()) {
                Ok(usage) => usage,
                // Left as it is, for `check` to name: failing the batch would hold back every
                // other key's spend and usage with it, and writing over it would lose what
                // it held. Only these counts are dropped.
                Err(_) => {
                    shared.usage_unwritable.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
            // Counts of a key (or account) deleted since they were taken have nowhere to go:
            // a row written now would outlive its key for good.
            None if keys.get(id)?.is_none() && accounts.get(id)?.is_none() => continue,
            None => UsageRecord::default(),
        };
        usage.spent = usage.spent.saturating_add(spent);
        if spent > 0 && spenders.contains(&id) {
            fx.durable_spent.push((id, usage.spent));
        }
        usage.requests = usage.requests.saturating_add(requests);
        if last_used > 0 {
            usage.last_used_at = usage.last_used_at.max(Some(Timestamp(last_used)));
        }
        table.insert(id, codec::encode(&usage).as_slice())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::public_id::IdKind;
    use crate::{Config, Durability, Ledger, MasterKey, NewAccount, NewKey, Presented, Request};

    fn open(config: Config) -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("keys.redb"), config).unwrap();
        (dir, ledger)
    }

    /// A ledger whose cache holds one key: caching another evicts it.
    fn one_key_cache() -> (tempfile::TempDir, Ledger) {
        let config = Config::builder()
            .master_key(MasterKey::generate().unwrap())
            .cache_capacity(1)
            .build()
            .unwrap();
        open(config)
    }

    fn ledger() -> (tempfile::TempDir, Ledger) {
        open(Config::ephemeral().unwrap())
    }

    /// Creates a key of `credits`; returns its public id and plaintext.
    fn key(ledger: &Ledger, credits: u64) -> (String, String) {
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let created = ledger
            .keys()
            .create(NewKey::new(owner.id.as_str(), "k").credits(credits))
            .unwrap();
        let plaintext = created.plaintext.expose().to_owned();
        (created.info.id.to_string(), plaintext)
    }

    /// A call that sends the writer one message and waits for its answer.
    type Call<'a, T> = Box<dyn FnOnce() -> T + Send + 'a>;

    /// Runs `calls` on threads of their own while the writer is held, each started once the
    /// one before has sent its message, then lets the writer go: their messages make one
    /// batch, in this order. Returns what each call returned.
    fn one_batch<'a, T: Send + 'a>(ledger: &'a Ledger, calls: Vec<Call<'a, T>>) -> Vec<T> {
        let tx = &ledger.inner.engine.tx;
        let queued = |n: usize| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while tx.len() != n {
                assert!(std::time::Instant::now() < deadline, "{} queued", tx.len());
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let (release, held) = crossbeam::channel::bounded::<()>(0);
        tx.send(Msg::Hold(held)).unwrap();
        queued(0);
        std::thread::scope(|s| {
            let mut running = Vec::new();
            for (i, call) in calls.into_iter().enumerate() {
                running.push(s.spawn(call));
                queued(i + 1);
            }
            drop(release);
            running.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Makes the writer's reads of balance `id` fail (a storage error) until dropped.
    struct FailingReads<'a>(&'a Shared);

    fn failing_reads(ledger: &Ledger, id: u64) -> FailingReads<'_> {
        let shared = &ledger.inner.engine.shared;
        shared.fail_reads_of.store(id, Ordering::Relaxed);
        FailingReads(shared)
    }

    impl FailingReads<'_> {
        /// Makes the reads of balance `id` fail instead, with no moment between when neither
        /// fails (a batch the writer runs on its own could fall there).
        fn switch_to(&self, id: u64) {
            self.0.fail_reads_of.store(id, Ordering::Relaxed);
        }
    }

    impl Drop for FailingReads<'_> {
        fn drop(&mut self) {
            self.0.fail_reads_of.store(0, Ordering::Relaxed);
        }
    }

    /// Writes bytes no record decodes from under CREDITS id `id`.
    fn damage_balance(ledger: &Ledger, id: u64) {
        let txn = ledger.inner.store.begin_write().unwrap();
        txn.open_table(CREDITS)
            .unwrap()
            .insert(id, [1u8, 0xff].as_slice())
            .unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn a_batch_that_meets_an_unreadable_balance_fails_only_the_change_to_it() {
        let (_dir, ledger) = ledger();
        let (damaged, _) = key(&ledger, 10);
        let (healthy, _) = key(&ledger, 10);
        damage_balance(&ledger, ledger.keys().internal_id(&damaged).unwrap());
        let credits = ledger.credits();
        let (credits, damaged, healthy) = (&credits, &damaged, &healthy);
        let answers = one_batch::<Result<u64>>(
            &ledger,
            vec![
                Box::new(move || credits.top_up(damaged, 5)),
                Box::new(move || credits.top_up(healthy, 5)),
                Box::new(|| ledger.flush().map(|()| 0)),
            ],
        );
        assert!(
            matches!(answers[0], Err(Error::Codec(_))),
            "{:?}",
            answers[0]
        );
        assert_eq!(answers[1].as_ref().ok(), Some(&15), "{:?}", answers[1]);
        assert!(answers[2].is_ok(), "{:?}", answers[2]);
        // Left as it was, not written over.
        let read = ledger.inner.store.begin_read().unwrap();
        let table = read.open_table(CREDITS).unwrap();
        let id = ledger.keys().internal_id(damaged).unwrap();
        assert_eq!(table.get(id).unwrap().unwrap().value(), [1u8, 0xff]);
    }

    /// A request that needs a lease from a balance whose record no longer decodes (damaged
    /// after its meter was built) is answered `unavailable` by the writer's first batch: it
    /// does not wait through a round trip after round trip that cannot lease anything.
    #[test]
    fn a_lease_from_a_balance_damaged_in_use_is_refused_at_once() {
        let (_dir, ledger) = ledger();
        let (id, plaintext) = key(&ledger, 1_000);
        assert_eq!(spend_one(&ledger, &plaintext), Ok(1));
        let internal = ledger.keys().internal_id(&id).unwrap();
        let meter = ledger.inner.engine.shared.meters.lock().get(internal);
        meter.expect("in memory").take_lease(); // the next request asks the writer
        damage_balance(&ledger, internal);
        let commits = ledger.stats().writer_commits;
        assert_eq!(
            spend_one(&ledger, &plaintext),
            Err("unavailable".to_owned())
        );
        let waited = ledger.stats().writer_commits - commits;
        assert!(waited <= 2, "answered after {waited} writer commits");
    }

    /// A cache miss does not read a key's own balance, so a key whose balance record was
    /// damaged before it was cached is granted its first peek, with 0 credits left. Once the
    /// damage is found (by that grant's figure, or by a commit of a real cost, reported
    /// uncovered), its peeks are refused `unavailable`, as its spends are by the writer.
    /// (Found by a reviewer: the peek-then-commit was served free for good.)
    #[test]
    fn a_balance_found_damaged_refuses_its_keys_peeks_and_spends() {
        for ask_credits_left in [true, false] {
            let (_dir, ledger) = ledger();
            let (id, plaintext) = key(&ledger, 1_000);
            damage_balance(&ledger, ledger.keys().internal_id(&id).unwrap());
            let key = Presented::new(&plaintext).unwrap();
            let peek = ledger.verify(&Request::new(&key, "/x").cost(0)).unwrap();
            if ask_credits_left {
                assert_eq!(peek.remaining_credits(), Some(0));
                drop(peek);
            } else {
                let stats = peek.commit(5).token_stats;
                assert_eq!((stats.charged, stats.uncovered), (0, 5), "{stats:?}");
            }
            for _ in 0..2 {
                let again = ledger.verify(&Request::new(&key, "/x").cost(0));
                assert_eq!(again.err().map(|d| d.code()), Some("unavailable"));
                let spend = spend_one(&ledger, &plaintext);
                assert_eq!(spend, Err("unavailable".to_owned()));
            }
        }
    }

    /// Damage found by the writer while the key still holds a lease: its spends are refused
    /// too, not granted from the lease while its peeks are refused. (Found by a reviewer.)
    #[test]
    fn a_balance_found_damaged_refuses_spends_from_the_lease_in_memory() {
        let (_dir, ledger) = ledger();
        let (id, plaintext) = key(&ledger, 1_000);
        assert_eq!(spend_one(&ledger, &plaintext), Ok(1)); // a lease in memory
        let internal = ledger.keys().internal_id(&id).unwrap();
        damage_balance(&ledger, internal);
        ledger.flush().unwrap(); // the writer flushes the spend and finds the damage
        let meter = ledger
            .inner
            .engine
            .shared
            .meters
            .lock()
            .get(internal)
            .unwrap();
        assert!(meter.unreadable() && meter.leased() > 0);
        assert_eq!(
            spend_one(&ledger, &plaintext),
            Err("unavailable".to_owned())
        );
    }

    /// The same for damage found after the key's balance was read: a peek-then-commit's
    /// shortfall meets it, and the key's peeks are refused from then on.
    #[test]
    fn a_balance_damaged_in_use_refuses_its_keys_peeks_once_found() {
        let (_dir, ledger) = ledger();
        let (id, plaintext) = key(&ledger, 1_000);
        assert_eq!(spend_one(&ledger, &plaintext), Ok(1));
        damage_balance(&ledger, ledger.keys().internal_id(&id).unwrap());
        let key = Presented::new(&plaintext).unwrap();
        let peek = ledger.verify(&Request::new(&key, "/x").cost(0)).unwrap();
        let stats = peek.commit(5_000).token_stats;
        assert_eq!(stats.uncovered, 5_000 - stats.charged, "{stats:?}");
        let again = ledger.verify(&Request::new(&key, "/x").cost(0));
        assert_eq!(again.err().map(|d| d.code()), Some("unavailable"));
    }

    /// A lease of a balance that has no record (a pool deleted while a miss built its meter)
    /// is answered `Gone` at once, as a retired one is (an undecodable one: `Unavailable`).
    #[test]
    fn a_lease_of_a_balance_with_no_record_is_answered_gone() {
        let (_dir, ledger) = ledger();
        let orphan = MeterRef::Pool(Arc::new(Meter::new(
            u64::MAX - 1,
            None,
            IdKind::Pool,
            false,
        )));
        let (reply, answer) = crossbeam::channel::bounded(1);
        let lease = Msg::Lease {
            meter: orphan,
            need: 1,
            reply: Some(reply),
        };
        ledger.inner.engine.tx.send(lease).unwrap();
        assert!(matches!(answer.recv().unwrap(), Handoff::Gone));
    }

    /// A lease whose own read fails (a storage error) is answered as the failed batch answers
    /// every lease it reached: no units, so the request asks again, and the meter is no longer
    /// marked pending (which would hold back its prefetches). (Found by a reviewer.)
    #[test]
    fn a_lease_whose_read_fails_is_answered() {
        let (_dir, ledger) = ledger();
        let (id, plaintext) = key(&ledger, 10);
        let internal = ledger.keys().internal_id(&id).unwrap();
        assert_eq!(spend_one(&ledger, &plaintext), Ok(1));
        let meter = ledger.inner.engine.shared.meters.lock().get(internal);
        let meter = meter.expect("in memory");
        let failing = failing_reads(&ledger, internal);
        let answer = ledger.inner.engine.lease_now(&meter, 1);
        drop(failing);
        assert!(
            matches!(answer, Some(Handoff::Units { units: 0, .. })),
            "answered: {}",
            answer.is_some()
        );
        assert!(!meter.pending.load(Ordering::Acquire), "still pending");
    }

    /// A balance change whose own read fails (a storage error) is answered with that error,
    /// not told the ledger is closed; the ledger goes on.
    #[test]
    fn a_top_up_whose_read_fails_gets_the_storage_error() {
        let (_dir, ledger) = ledger();
        let (id, _) = key(&ledger, 10);
        let failing = failing_reads(&ledger, ledger.keys().internal_id(&id).unwrap());
        let error = ledger.credits().top_up(&id, 5).unwrap_err().to_string();
        drop(failing);
        assert!(error.contains("simulated read failure"), "{error}");
        assert!(!error.contains("closed"), "{error}");
        assert_eq!(ledger.credits().top_up(&id, 5).unwrap(), 15);
    }

    /// Verifies `plaintext` at a cost of 1 and commits the grant; the denial's code if refused.
    fn spend_one(ledger: &Ledger, plaintext: &str) -> std::result::Result<u64, String> {
        let key = Presented::new(plaintext).unwrap();
        match ledger.verify(&Request::new(&key, "/x").cost(1)) {
            Ok(grant) => Ok(grant.commit(1).token_stats.charged),
            Err(denial) => Err(denial.code().to_owned()),
        }
    }

    /// The credit events waiting, as (kind, credits left).
    fn events(ledger: &Ledger) -> Vec<(CreditEventKind, u64)> {
        let channel = ledger.credit_events();
        channel.try_iter().map(|e| (e.kind, e.remaining)).collect()
    }

    /// A key of `credits` under `Durability::Exact` with a low-balance threshold: the ledger,
    /// the key's plaintext and its public id.
    fn exact_key(credits: u64, threshold: u64) -> (tempfile::TempDir, Ledger, String, String) {
        let config = Config::builder()
            .master_key(MasterKey::generate().unwrap())
            .durability(Durability::Exact)
            .build()
            .unwrap();
        let (dir, ledger) = open(config);
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let new = NewKey::new(owner.id.as_str(), "k")
            .credits(credits)
            .low_balance_threshold(threshold);
        let created = ledger.keys().create(new).unwrap();
        let plaintext = created.plaintext.expose().to_owned();
        (dir, ledger, plaintext, created.info.id.to_string())
    }

    fn low_balance_events(ledger: &Ledger) -> Vec<(CreditEventKind, u64)> {
        let all = events(ledger).into_iter();
        all.filter(|(kind, _)| *kind == CreditEventKind::LowBalance)
            .collect()
    }

    /// Waits until the writer has committed `n` more batches than `since` (at most 5 s).
    fn commits_past(ledger: &Ledger, since: u64, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while ledger.stats().writer_commits < since + n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// `Exact` mode writes each commit's charge in the next batch (`Msg::Settle`): that write
    /// reports the crossing, as the flush round it replaces did. (Found by a reviewer: the
    /// settlement took the spend from the flush round, and reported nothing.)
    #[test]
    fn an_exact_spend_down_to_the_threshold_reports_low_balance() {
        let (_dir, ledger, plaintext, id) = exact_key(10, 5);
        for _ in 0..5 {
            let commits = ledger.stats().writer_commits;
            assert_eq!(spend_one(&ledger, &plaintext), Ok(1));
            commits_past(&ledger, commits, 2); // the reservation, then the settlement
        }
        ledger.flush().unwrap();
        assert_eq!(ledger.credits().usage(&id).unwrap().remaining, Some(5));
        assert_eq!(
            low_balance_events(&ledger),
            [(CreditEventKind::LowBalance, 5)]
        );
    }

    /// Six `Exact` reservations of one key in one batch take it from 9 to 3 credits past a
    /// threshold of 5: reported once. Each lease counts the earlier ones of the batch as
    /// reserved, not left. (Found by a reviewer.)
    #[test]
    fn an_exact_burst_spending_past_the_threshold_in_one_batch_reports_low_balance() {
        let (_dir, ledger, plaintext, id) = exact_key(10, 5);
        assert_eq!(spend_one(&ledger, &plaintext), Ok(1));
        ledger.flush().unwrap();
        let (ledger, plaintext) = (&ledger, &plaintext);
        let calls: Vec<Call<'_, std::result::Result<u64, String>>> = (0..6)
            .map(|_| Box::new(move || spend_one(ledger, plaintext)) as Call<'_, _>)
            .collect();
        assert!(one_batch(ledger, calls).iter().all(|a| *a == Ok(1)));
        ledger.flush().unwrap();
        assert_eq!(ledger.credits().usage(&id).unwrap().remaining, Some(3));
        let low = low_balance_events(ledger);
        assert_eq!(low.len(), 1, "9 -> 3 crossed the threshold of 5: {low:?}");
    }

    /// Two leases of one meter in one batch: the second counts the first among the credits
    /// left (it reaches memory only after the commit), less what it hands to the request
    /// waiting for it, so no low-balance edge is reported from a figure that was never true.
    /// (Found by a reviewer: the second lease reported the balance less the whole first
    /// lease, crossing a threshold nothing had spent down to.)
    #[test]
    fn a_second_lease_in_one_batch_counts_the_first_among_the_credits_left() {
        let (_dir, ledger) = ledger();
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let created = ledger
            .keys()
            .create(
                NewKey::new(owner.id.as_str(), "k")
                    .credits(100)
                    .low_balance_threshold(99),
            )
            .unwrap();
        let plaintext = created.plaintext.expose().to_owned();
        let (ledger, plaintext) = (&ledger, &plaintext);
        // Neither request finds a lease: each asks the writer, in one batch.
        let answers = one_batch(
            ledger,
            vec![
                Box::new(move || spend_one(ledger, plaintext)),
                Box::new(move || spend_one(ledger, plaintext)),
            ],
        );
        assert_eq!(answers, [Ok(1), Ok(1)]);
        // The second lease reports what was left before its own reservation: 99, the
        // first's reserved unit counted as reserved, its prefetched rest as left.
        assert_eq!(events(ledger), [(CreditEventKind::LowBalance, 99)]);
        assert_eq!(
            ledger
                .credits()
                .usage(created.info.id.as_str())
                .unwrap()
                .remaining,
            Some(98)
        );
    }

    /// Two requests in one batch that each need more than half the balance: one is handed
    /// it, the other refused at once, since what the first was handed is no longer left.
    /// (Found by a reviewer: the second counted the first's units as its own and was handed
    /// the rest, to ask again in another commit; at half of `u64::MAX` each, adding up what
    /// the batch had handed overflowed, which killed the writer and so the ledger.)
    #[test]
    fn a_request_in_a_batch_cannot_count_what_an_earlier_one_was_handed() {
        for (credits, cost) in [(150, 100), (u64::MAX / 2 + 1, u64::MAX / 2 + 1)] {
            let (_dir, ledger) = ledger();
            let (id, plaintext) = key(&ledger, credits);
            let (ledger, plaintext) = (&ledger, &plaintext);
            let spend = move || {
                let key = Presented::new(plaintext.as_str()).unwrap();
                match ledger.verify(&Request::new(&key, "/x").cost(cost)) {
                    Ok(grant) => Ok(grant.commit(cost).token_stats.charged),
                    Err(denial) => Err(denial.code().to_owned()),
                }
            };
            let commits = ledger.stats().writer_commits;
            let mut answers = one_batch(ledger, vec![Box::new(spend), Box::new(spend)]);
            answers.sort();
            assert_eq!(answers, [Ok(cost), Err("usage_exceeded".to_owned())]);
            if cost < MAX_LEASED {
                assert_eq!(ledger.stats().writer_commits - commits, 1, "one batch");
            }
            let usage = ledger.credits().usage(&id).unwrap();
            assert_eq!(usage.spent, cost);
            assert_eq!(usage.remaining, Some(credits - cost));
        }
    }

    /// A request refused in the batch that handed its balance to an earlier one reports the
    /// credits left after that handoff (found by a reviewer: it reported them before).
    #[test]
    fn a_refusal_in_a_batch_reports_what_the_earlier_handoffs_left() {
        let (_dir, ledger) = ledger();
        let (_, plaintext) = key(&ledger, 150);
        let (ledger, plaintext) = (&ledger, &plaintext);
        let spend = move || {
            let key = Presented::new(plaintext.as_str()).unwrap();
            match ledger.verify(&Request::new(&key, "/x").cost(100)) {
                Ok(grant) => Ok(grant.commit(100).token_stats.charged),
                Err(denial) => Err(denial.code().to_owned()),
            }
        };
        let mut answers = one_batch(ledger, vec![Box::new(spend), Box::new(spend)]);
        answers.sort();
        assert_eq!(answers, [Ok(100), Err("usage_exceeded".to_owned())]);
        ledger.flush().unwrap();
        let exhausted: Vec<_> = events(ledger)
            .into_iter()
            .filter(|(kind, _)| *kind == CreditEventKind::Exhausted)
            .collect();
        assert_eq!(exhausted, [(CreditEventKind::Exhausted, 50)]);
    }

    #[test]
    fn a_refusal_batched_before_a_top_up_reports_the_empty_balance_and_the_next_refusal_too() {
        let (_dir, ledger) = ledger();
        let (id, plaintext) = key(&ledger, 0);
        let credits = ledger.credits();
        let (ledger, credits, id, plaintext) = (&ledger, &credits, &id, &plaintext);
        // A request that finds no lease asks the writer, which finds the balance empty; a
        // top-up comes in the same batch, after it.
        let answers = one_batch(
            ledger,
            vec![
                Box::new(move || spend_one(ledger, plaintext)),
                Box::new(move || credits.top_up(id, 5).map_err(|e| e.to_string())),
            ],
        );
        assert_eq!(answers, [Err("usage_exceeded".into()), Ok(5)]);
        assert_eq!(
            events(ledger),
            [(CreditEventKind::Exhausted, 0)],
            "the refusal came before the top-up: nothing was left"
        );
        for _ in 0..5 {
            assert_eq!(spend_one(ledger, plaintext), Ok(1));
        }
        assert_eq!(spend_one(ledger, plaintext), Err("usage_exceeded".into()));
        assert_eq!(
            events(ledger),
            [(CreditEventKind::Exhausted, 0)],
            "the top-up ran out: news again"
        );
    }

    #[test]
    fn a_flush_whose_read_failed_puts_back_the_spend_and_usage_it_had_taken() {
        // No flush round but the ones asked for: each takes everything in use.
        let config = Config::builder()
            .master_key(crate::MasterKey::generate().unwrap())
            .usage_flush_interval(Duration::from_secs(3_600))
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path().join("keys.redb"), config).unwrap();
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let pool = ledger
            .credits()
            .create_pool(crate::NewPool::new(owner.id.as_str(), "p").credits(100))
            .unwrap();
        let new_key = |key: NewKey| {
            let created = ledger.keys().create(key).unwrap();
            let plaintext = created.plaintext.expose().to_owned();
            (created.info.id.to_string(), plaintext)
        };
        let (own, own_plain) = new_key(NewKey::new(owner.id.as_str(), "own").credits(100));
        let (pooled, pooled_plain) = new_key(NewKey::new(owner.id.as_str(), "p").pool(pool.id));
        let internal = |id: &str| ledger.inner.ids.decode(IdKind::Pool, id);
        for _ in 0..3 {
            assert_eq!(spend_one(&ledger, &own_plain), Ok(1));
        }
        for _ in 0..2 {
            assert_eq!(spend_one(&ledger, &pooled_plain), Ok(1));
        }
        // The key's own balance: its usage counts and its meter's spend were taken first.
        let failing = failing_reads(&ledger, ledger.keys().internal_id(&own).unwrap());
        assert!(ledger.flush().is_err());
        // The pool's: its meter's spend was taken first.
        failing.switch_to(internal(pool.id.as_str()).unwrap());
        assert!(ledger.flush().is_err());
        drop(failing);
        let usage = |id: &str| {
            let u = ledger.credits().usage(id).unwrap();
            (u.spent, u.requests, u.lifetime_spent)
        };
        assert_eq!(usage(&own), (3, 3, 3), "nothing lost");
        assert_eq!(usage(pool.id.as_str()).0, 2, "nothing lost");
        assert_eq!(usage(&pooled), (0, 2, 2), "nothing lost");
    }

    #[test]
    fn a_set_whose_read_failed_puts_back_the_lease_and_spend_it_had_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        let config = Config::ephemeral().unwrap();
        let ledger = Ledger::open(&path, config.clone()).unwrap();
        let (id, plaintext) = key(&ledger, 100);
        for _ in 0..3 {
            assert_eq!(spend_one(&ledger, &plaintext), Ok(1));
        }
        let usage = |ledger: &Ledger| {
            let u = ledger.credits().usage(&id).unwrap();
            (u.spent, u.remaining)
        };
        assert_eq!(usage(&ledger), (3, Some(97)));
        let failing = failing_reads(&ledger, ledger.keys().internal_id(&id).unwrap());
        assert!(ledger.credits().set(&id, 50).is_err());
        drop(failing);
        assert_eq!(
            usage(&ledger),
            (3, Some(97)),
            "the lease and the spend are back"
        );
        ledger.close().unwrap();
        drop(ledger);
        let reopened = Ledger::open(path, config).unwrap();
        let u = reopened.credits().usage(&id).unwrap();
        assert_eq!((u.spent, u.remaining, u.lost_to_crash), (3, Some(97), 0));
    }

    /// A `set` whose batch fails restores the epoch it ended: a reservation taken before it is
    /// refunded into the balance, not dropped as if the set had happened.
    #[test]
    fn a_failed_set_does_not_make_earlier_reservations_final() {
        let (_dir, ledger) = ledger();
        let (a, a_plain) = key(&ledger, 100);
        let (b, _) = key(&ledger, 100);
        let presented = Presented::new(&a_plain).unwrap();
        let grant = ledger
            .verify(&Request::new(&presented, "/x").cost(5))
            .unwrap();
        // A storage error on another balance later in the same batch fails the whole batch.
        let b_id = ledger.keys().internal_id(&b).unwrap();
        let failing = failing_reads(&ledger, b_id);
        let credits = ledger.credits();
        let (credits, a_ref, b_ref) = (&credits, &a, &b);
        let answers = one_batch::<crate::Result<u64>>(
            &ledger,
            vec![
                Box::new(move || credits.set(a_ref, 50)),
                Box::new(move || credits.top_up(b_ref, 1)),
            ],
        );
        assert!(answers[0].is_err(), "the set failed: {:?}", answers[0]);
        assert!(answers[1].is_err(), "{:?}", answers[1]);
        drop(failing);
        drop(grant); // refund the 5 reserved before the (failed) set
        let u = ledger.credits().usage(&a).unwrap();
        assert_eq!(
            (u.spent, u.remaining, u.granted),
            (0, Some(100), 100),
            "nothing was spent and the set did not happen: all 100 credits must be left"
        );
    }

    /// A refusal reported in a batch that fails is unmarked with it: the retry's refusal sends
    /// the event.
    #[test]
    fn a_refusal_in_a_failed_batch_is_still_reported() {
        let (_dir, ledger) = ledger();
        let (_a, a_plain) = key(&ledger, 0);
        let (b, _) = key(&ledger, 10);
        let b_id = ledger.keys().internal_id(&b).unwrap();
        let failing = failing_reads(&ledger, b_id);
        let credits = ledger.credits();
        let (ledger_ref, credits, a_plain, b_ref) = (&ledger, &credits, &a_plain, &b);
        let answers = one_batch::<Result<u64, String>>(
            &ledger,
            vec![
                Box::new(move || spend_one(ledger_ref, a_plain)),
                Box::new(move || credits.top_up(b_ref, 1).map_err(|e| e.to_string())),
            ],
        );
        drop(failing);
        assert_eq!(answers[0], Err("usage_exceeded".to_owned()));
        let events: Vec<_> = ledger
            .credit_events()
            .try_iter()
            .map(|e| (e.kind, e.remaining))
            .collect();
        assert_eq!(
            events,
            [(CreditEventKind::Exhausted, 0)],
            "a refused request on an empty balance must be reported once"
        );
    }

    /// A refund checks the epoch, then sends a `Return` for what the lease does not keep (all of
    /// it in `Exact` mode). A `set` that commits in between makes them final even if the
    /// `Return`'s batch fails: they never reach the new balance's lease. (The race, step by
    /// step.)
    #[test]
    fn a_failed_return_does_not_land_in_a_new_epoch() {
        let config = Config::builder()
            .master_key(MasterKey::generate().unwrap())
            .durability(Durability::Exact)
            .build()
            .unwrap();
        let (_dir, ledger) = open(config);
        let (a, a_plain) = key(&ledger, 100);
        let presented = Presented::new(&a_plain).unwrap();
        let grant = ledger
            .verify(&Request::new(&presented, "/x").cost(5))
            .unwrap();
        let engine = &ledger.inner.engine;
        let a_id = ledger.keys().internal_id(&a).unwrap();
        let handle = engine.shared.meters.lock().get(a_id).expect("registered");
        let epoch = handle.epoch();
        // The refund's first half, as `Grant::put_back` runs it: the epoch still matches and
        // the lease keeps nothing (Exact), so the 5 units go to the writer as a `Return`...
        assert_eq!(handle.give_back_up_to(5, 0, epoch), Some(0));
        // ...but a `set` to 0 commits before that `Return` is processed.
        assert_eq!(ledger.credits().set(&a, 0).unwrap(), 0);
        assert_ne!(handle.epoch(), epoch);
        // The `Return`'s batch fails (a storage error).
        let failing = failing_reads(&ledger, a_id);
        engine.give_back(&handle, 5, epoch);
        drop(failing);
        std::mem::forget(grant); // its refund is the one simulated above
        let leased_after_failed_return = handle.leased();
        let spent_after_set = ledger
            .verify(&Request::new(&presented, "/x").cost(5))
            .map(|g| g.commit(5).token_stats.charged);
        assert_eq!(
            (leased_after_failed_return, spent_after_set),
            (0, Err(crate::Denial::UsageExceeded)),
            "units reserved before the set to 0 must not be spendable from the new balance"
        );
    }

    /// A refund whose `Return` batch fails and which does not fit in the lease word (2⁴⁸ − 1
    /// units) is tried again with the next batch: a clean close keeps every unit.
    #[test]
    fn a_failed_return_of_a_large_refund_keeps_every_unit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.redb");
        let config = Config::ephemeral().unwrap();
        let ledger = Ledger::open(&path, config.clone()).unwrap();
        let big = 1u64 << 50;
        let (a, a_plain) = key(&ledger, big);
        let presented = Presented::new(&a_plain).unwrap();
        let grant = ledger
            .verify(&Request::new(&presented, "/x").cost(1 << 49))
            .unwrap();
        let a_id = ledger.keys().internal_id(&a).unwrap();
        let failing = failing_reads(&ledger, a_id);
        // Refund: up to MAX_LEASE stays in the lease, the rest goes back as a `Return`, whose
        // batch fails: the meter is to keep it, "as before the refund asked".
        drop(grant);
        drop(failing);
        ledger.close().unwrap();
        drop(ledger);
        let reopened = Ledger::open(path, config).unwrap();
        let u = reopened.credits().usage(&a).unwrap();
        assert_eq!(
            (u.spent, u.lost_to_crash, u.remaining),
            (0, 0, Some(big)),
            "nothing spent, clean close: every unit must still be there"
        );
    }

    /// A return left for a retry whose balance's record still cannot be read waits again; it
    /// does not fail the batches of other balances' changes, leases and flushes.
    #[test]
    fn a_retried_return_that_still_cannot_be_read_fails_no_other_change() {
        let (_dir, ledger) = ledger();
        let (a, a_plain) = key(&ledger, 100);
        let (b, _) = key(&ledger, 100);
        let presented = Presented::new(&a_plain).unwrap();
        let grant = ledger
            .verify(&Request::new(&presented, "/x").cost(5))
            .unwrap();
        // A set commits: the grant's refund is for an ended epoch (a `Return` nobody waits for).
        assert_eq!(ledger.credits().set(&a, 50).unwrap(), 50);
        let a_id = ledger.keys().internal_id(&a).unwrap();
        let failing = failing_reads(&ledger, a_id);
        drop(grant);
        let _ = ledger.flush(); // the batch with that return fails: it is kept for a retry
        // The record of `a` still cannot be read; `b` has nothing to do with it.
        let top_up = ledger.credits().top_up(&b, 1);
        drop(failing);
        assert_eq!(
            top_up.as_ref().ok(),
            Some(&101),
            "a top-up of another balance must not fail: {top_up:?}"
        );
    }

    /// A refill whose batch fails is still due: the old period's lease, given back to the
    /// meter, is not spent after the refill time (it would be, late, had the failed batch
    /// left the next refill time set).
    #[test]
    fn a_failed_refill_is_still_due() {
        const DAY: u64 = 86_400_000;
        let clock = crate::ManualClock::new(crate::Timestamp(20_000 * DAY + 1_000));
        let config = Config::builder()
            .master_key(MasterKey::generate().unwrap())
            .clock(clock.clone())
            .build()
            .unwrap();
        let (_dir, ledger) = open(config);
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let daily = crate::RefillInterval::Daily;
        let new = NewKey::new(owner.id.as_str(), "a")
            .credits(100)
            .refill(10, daily);
        let a_plain = ledger
            .keys()
            .create(new)
            .unwrap()
            .plaintext
            .expose()
            .to_owned();
        let (b, _) = key(&ledger, 100);
        assert_eq!(spend_one(&ledger, &a_plain), Ok(1)); // a lease of the first period
        clock.set(crate::Timestamp(20_001 * DAY + 1_000));
        let failing = failing_reads(&ledger, ledger.keys().internal_id(&b).unwrap());
        let credits = ledger.credits();
        let (ledger_ref, credits, a_plain, b_ref) = (&ledger, &credits, &a_plain, &b);
        // The request's lease applies the refill; the top-up after it fails the batch.
        let answers = one_batch::<std::result::Result<u64, String>>(
            &ledger,
            vec![
                Box::new(move || spend_one(ledger_ref, a_plain)),
                Box::new(move || credits.top_up(b_ref, 1).map_err(|e| e.to_string())),
            ],
        );
        drop(failing);
        assert_eq!(answers[0], Ok(1), "served once the refill was written");
        let mut spent = 1;
        while spend_one(&ledger, a_plain).is_ok() {
            spent += 1;
        }
        assert_eq!(
            spent, 10,
            "the new period's 10, nothing of the old period's lease"
        );
    }

    /// A top-up whose batch fails leaves the meter the committed figure: grants do not report
    /// credits that were never added.
    #[test]
    fn a_failed_top_up_does_not_show_in_remaining_credits() {
        let (_dir, ledger) = ledger();
        let (a, a_plain) = key(&ledger, 100);
        let (b, _) = key(&ledger, 100);
        let remaining = |ledger: &Ledger| {
            let key = Presented::new(&a_plain).unwrap();
            let grant = ledger.verify(&Request::new(&key, "/x").cost(1)).unwrap();
            grant.commit(1).token_stats.remaining_credits
        };
        assert_eq!(remaining(&ledger), Some(99));
        let b_id = ledger.keys().internal_id(&b).unwrap();
        let failing = failing_reads(&ledger, b_id);
        let credits = ledger.credits();
        let (credits, a_ref, b_ref) = (&credits, &a, &b);
        let answers = one_batch::<Result<u64>>(
            &ledger,
            vec![
                Box::new(move || credits.top_up(a_ref, 50)),
                Box::new(move || credits.top_up(b_ref, 1)),
            ],
        );
        drop(failing);
        assert!(answers.iter().all(Result::is_err), "{answers:?}");
        assert_eq!(remaining(&ledger), Some(98), "the top-up failed");
    }

    /// A low-balance edge crossed in a batch that fails is crossed again when the charge is
    /// made again: the failed batch's event was never sent, so the retry must send it.
    #[test]
    fn a_low_balance_edge_crossed_in_a_failed_batch_is_reported_when_crossed_again() {
        let (_dir, ledger) = ledger();
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let new = NewKey::new(owner.id.as_str(), "a")
            .credits(100)
            .low_balance_threshold(50);
        let created = ledger.keys().create(new).unwrap();
        let a_plain = created.plaintext.expose().to_owned();
        let (b, _) = key(&ledger, 10);
        // A peek reserves nothing, so a commit of 60 is charged to the durable balance by
        // the writer: 100 → 40, under the threshold.
        let charge = |ledger: &Ledger| -> std::result::Result<u64, String> {
            let key = Presented::new(&a_plain).unwrap();
            let grant = ledger.verify(&Request::new(&key, "/x").cost(0)).unwrap();
            Ok(grant.commit(60).token_stats.charged)
        };
        let answers = {
            let _failing = failing_reads(&ledger, ledger.keys().internal_id(&b).unwrap());
            let credits = ledger.credits();
            let (ledger, credits, b) = (&ledger, &credits, &b);
            one_batch::<std::result::Result<u64, String>>(
                ledger,
                vec![
                    Box::new(move || charge(ledger)),
                    Box::new(move || credits.top_up(b, 1).map_err(|e| e.to_string())),
                ],
            )
        };
        assert_eq!(answers[0], Ok(0), "the batch failed: nothing charged");
        assert!(answers[1].is_err(), "{:?}", answers[1]);
        assert_eq!(events(&ledger), [], "a failed batch sends no event");
        assert_eq!(charge(&ledger), Ok(60));
        assert_eq!(
            events(&ledger),
            [(CreditEventKind::LowBalance, 40)],
            "the balance fell under its threshold: the host must hear of it once"
        );
    }

    /// Tops up `a` by 5 and `b` by 1 in one batch that fails (`b`'s read fails): both refused.
    fn top_ups_in_a_failed_batch(ledger: &Ledger, a: &str, b: &str) {
        let _failing = failing_reads(ledger, ledger.keys().internal_id(b).unwrap());
        let credits = ledger.credits();
        let credits = &credits;
        let answers = one_batch::<Result<u64>>(
            ledger,
            vec![
                Box::new(move || credits.top_up(a, 5)),
                Box::new(move || credits.top_up(b, 1)),
            ],
        );
        assert!(answers.iter().all(Result::is_err), "{answers:?}");
    }

    /// A top-up whose batch fails did not happen: the balance is the one already reported
    /// exhausted, and its next refusal is no news.
    #[test]
    fn a_failed_top_up_does_not_make_a_reported_exhaustion_news_again() {
        let (_dir, ledger) = ledger();
        let (a, a_plain) = key(&ledger, 0);
        let (b, _) = key(&ledger, 10);
        assert_eq!(
            spend_one(&ledger, &a_plain),
            Err("usage_exceeded".to_owned())
        );
        assert_eq!(events(&ledger), [(CreditEventKind::Exhausted, 0)]);
        top_ups_in_a_failed_batch(&ledger, &a, &b);
        assert_eq!(
            spend_one(&ledger, &a_plain),
            Err("usage_exceeded".to_owned())
        );
        assert_eq!(
            events(&ledger),
            [],
            "the balance never grew: its exhaustion was already reported"
        );
    }

    /// The same with the key's meter out of memory (its exhaustion remembered by the
    /// registry): the failed top-up must not make it forget, or the key cached again reports
    /// the same exhaustion a second time. (Found by a reviewer.)
    #[test]
    fn a_failed_top_up_of_a_balance_out_of_memory_does_not_make_its_exhaustion_news_again() {
        let (_dir, ledger) = one_key_cache();
        let (a, a_plain) = key(&ledger, 0);
        let (b, b_plain) = key(&ledger, 10);
        assert_eq!(spend_one(&ledger, &a_plain), Err("usage_exceeded".into()));
        // A cache of one: this evicts `a`, whose meter leaves memory, its exhaustion kept.
        assert_eq!(spend_one(&ledger, &b_plain), Ok(1));
        ledger.flush().unwrap();
        let a_id = ledger.keys().internal_id(&a).unwrap();
        assert!(ledger.inner.engine.shared.meters.lock().get(a_id).is_none());
        assert_eq!(events(&ledger), [(CreditEventKind::Exhausted, 0)]);
        top_ups_in_a_failed_batch(&ledger, &a, &b);
        assert_eq!(spend_one(&ledger, &a_plain), Err("usage_exceeded".into()));
        ledger.flush().unwrap();
        assert_eq!(
            events(&ledger),
            [],
            "the balance never grew: its exhaustion was already reported"
        );
    }

    /// A top-up refused in a batch that commits (it would grant more than `u64::MAX` in all)
    /// did not grow the balance either: the key cached again does not report its exhaustion
    /// a second time. (A reviewer's suspicion, confirmed here.)
    #[test]
    fn a_refused_top_up_of_a_balance_out_of_memory_does_not_make_its_exhaustion_news_again() {
        let config = Config::builder()
            .master_key(MasterKey::generate().unwrap())
            .cache_capacity(1)
            .usage_flush_interval(Duration::from_millis(1))
            .build()
            .unwrap();
        let (_dir, ledger) = open(config);
        let (a, a_plain) = key(&ledger, 1);
        let (_, b_plain) = key(&ledger, 10);
        assert_eq!(spend_one(&ledger, &a_plain), Ok(1));
        assert_eq!(spend_one(&ledger, &a_plain), Err("usage_exceeded".into()));
        // A cache of one: this evicts `a`, whose meter leaves memory, its exhaustion kept.
        assert_eq!(spend_one(&ledger, &b_plain), Ok(1));
        // Flushed, then unlisted by a round that finds it idle: out of the registry.
        let a_id = ledger.keys().internal_id(&a).unwrap();
        let in_memory = || ledger.inner.engine.shared.meters.lock().get(a_id).is_some();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while in_memory() && std::time::Instant::now() < deadline {
            ledger.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!in_memory());
        assert_eq!(events(&ledger), [(CreditEventKind::Exhausted, 0)]);
        let refused = ledger.credits().top_up(&a, u64::MAX);
        assert!(
            matches!(refused, Err(Error::InvalidInput { .. })),
            "{refused:?}"
        );
        assert_eq!(spend_one(&ledger, &a_plain), Err("usage_exceeded".into()));
        ledger.flush().unwrap();
        assert_eq!(events(&ledger), [], "the balance never grew");
    }

    /// A verify thread reports an exhaustion (and sends the event) while a batch that only
    /// noted the balance's low-balance figure is running; the batch fails. Its undo must not
    /// clear the verify thread's mark: the next refusal would report the same exhaustion a
    /// second time. (Found by a reviewer.)
    #[test]
    fn a_failed_batch_does_not_unmark_an_exhaustion_a_verify_thread_reported() {
        let (_dir, ledger) = ledger();
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let new = NewKey::new(owner.id.as_str(), "a")
            .credits(3)
            .low_balance_threshold(1);
        let created = ledger.keys().create(new).unwrap();
        let a_plain = created.plaintext.expose().to_owned();
        for _ in 0..3 {
            assert_eq!(spend_one(&ledger, &a_plain), Ok(1));
        }
        ledger.flush().unwrap(); // prefetches settled: the balance is known empty
        let _ = events(&ledger);
        let shared = &ledger.inner.engine.shared;
        let a_id = ledger.keys().internal_id(created.info.id.as_str()).unwrap();
        let m = shared.meters.lock().get(a_id).expect("in memory");
        let now = ledger.now().0;
        assert!(m.empty_at(now) && m.leased() == 0 && m.wants_top_up(now));
        let (b, _) = key(&ledger, 10);
        let b_id = ledger.keys().internal_id(&b).unwrap();
        // A retired meter: its lease request is answered mid-batch (a sync point).
        let d = MeterRef::Pool(Arc::new(Meter::new(
            u64::MAX - 1,
            None,
            IdKind::Pool,
            false,
        )));
        d.retire();
        // Hold the writer, then queue: a prefetch of `a` (it notes the low-balance figure),
        // the retired meter's lease, and a top-up of `b`, whose read fails.
        let tx = &ledger.inner.engine.tx;
        let (release, held) = crossbeam::channel::bounded::<()>(0);
        tx.send(Msg::Hold(held)).unwrap();
        while !tx.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (r2, d_answer) = crossbeam::channel::bounded(1);
        let (r3, b_answer) = crossbeam::channel::bounded(1);
        tx.send(Msg::Lease {
            meter: m.clone(),
            need: 0,
            reply: None,
        })
        .unwrap();
        tx.send(Msg::Lease {
            meter: d,
            need: 1,
            reply: Some(r2),
        })
        .unwrap();
        tx.send(Msg::Adjust {
            id: b_id,
            change: Adjust::TopUp(1),
            audit: None,
            reply: r3,
        })
        .unwrap();
        let failing = failing_reads(&ledger, b_id);
        let registry = shared.meters.lock(); // the top-up of `b` waits for it
        drop(release);
        assert!(matches!(d_answer.recv().unwrap(), Handoff::Gone));
        // Mid-batch: a request on `a` is refused in memory and reports the exhaustion.
        assert_eq!(
            spend_one(&ledger, &a_plain),
            Err("usage_exceeded".to_owned())
        );
        assert_eq!(events(&ledger), [(CreditEventKind::Exhausted, 0)]);
        drop(registry);
        let b_got = b_answer.recv();
        assert!(!matches!(b_got, Ok(Ok(_))), "the batch failed");
        drop(failing);
        ledger.flush().unwrap(); // the failed batch and its undo are behind us
        // Nothing grew: the next refusal is no news.
        assert_eq!(
            spend_one(&ledger, &a_plain),
            Err("usage_exceeded".to_owned())
        );
        assert_eq!(events(&ledger), [], "the exhaustion was already reported");
    }

    #[test]
    fn only_the_first_prefetch_after_a_take_rings_the_bell() {
        let pool = |id| MeterRef::Pool(Arc::new(Meter::new(id, None, IdKind::Pool, false)));
        let queue = Prefetches::default();
        let rings: Vec<bool> = (1..=3).map(|id| queue.push(pool(id))).collect();
        assert_eq!(rings, [true, false, false], "one bell for three prefetches");
        let ids: Vec<u64> = queue.take(10).iter().map(|m| m.id).collect();
        assert_eq!(ids, [1, 2, 3], "every queued meter, in order");
        assert!(queue.push(pool(4)), "a take silences the bell");
        queue.push(pool(5));
        queue.push(pool(6));
        assert_eq!(queue.take(2).len(), 2, "at most `max`");
        assert!(!queue.push(pool(7)), "with meters left the bell stays rung");
        assert_eq!(queue.take(10).len(), 2);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_round_flushes_each_listed_thing_once_in_id_order_and_keeps_the_busy_in_the_same_list() {
        let queued = SegQueue::new();
        (0..10_000u32).rev().for_each(|i| queued.push(i));
        let mut in_use = InUse::default();
        in_use.start_round(&queued, |&i| u64::from(i));
        assert!(queued.is_empty());
        let capacity = in_use.list.capacity();
        let mut flushed = Vec::new();
        while in_use.left > 0 {
            let chunk = in_use.chunk();
            assert!(!chunk.is_empty() && chunk.len() <= FLUSH_CHUNK);
            flushed.extend(chunk.iter().copied());
            // The even ones are still in use.
            in_use.keep(chunk.into_iter().filter(|i| i % 2 == 0).collect());
            assert_eq!(
                in_use.list.capacity(),
                capacity,
                "the busy go where the flushed were: no second list"
            );
        }
        assert_eq!(
            flushed,
            (0..10_000).collect::<Vec<_>>(),
            "each once, in order"
        );
        let evens: Vec<u32> = (0..10_000).filter(|i| i % 2 == 0).collect();
        assert!(in_use.list.iter().eq(evens.iter()), "the busy stay listed");

        // A chunk whose flush failed goes back to the front and is flushed next.
        (10_000..10_010).for_each(|i| queued.push(i));
        in_use.start_round(&queued, |&i| u64::from(i));
        assert_eq!(in_use.left, 5_010, "the listed and the newly queued");
        let chunk = in_use.chunk();
        in_use.put_back(chunk.clone());
        assert_eq!(in_use.left, 5_010);
        let again = in_use.chunk();
        assert_eq!(again, chunk);
        in_use.keep(again.into_iter().filter(|i| i % 1_000 == 0).collect());

        // A round that unlists most gives the memory back.
        while in_use.left > 0 {
            let chunk = in_use.chunk();
            in_use.keep(chunk.into_iter().filter(|i| i % 1_000 == 0).collect());
        }
        in_use.trim();
        assert_eq!(in_use.list.len(), 11);
        assert!(in_use.list.capacity() < 100, "{}", in_use.list.capacity());
    }

    #[test]
    fn the_smallest_lease_grows_while_the_writer_is_behind_and_shrinks_back() {
        let mut floor = MIN_LEASE;
        let mut seen = Vec::new();
        for _ in 0..6 {
            floor = next_lease_floor(floor, MAX_BATCH, true);
            seen.push(floor);
        }
        assert_eq!(
            seen,
            [32, 64, 128, 256, 256, 256],
            "doubles up to its bound"
        );
        assert_eq!(
            next_lease_floor(floor, MAX_BATCH, false),
            256,
            "a full take that empties the queue: not behind, not idle either"
        );
        let mut seen = Vec::new();
        for _ in 0..6 {
            floor = next_lease_floor(floor, 10, false);
            seen.push(floor);
        }
        assert_eq!(
            seen,
            [128, 64, 32, 16, 16, 16],
            "halves back to the minimum"
        );
    }

    #[test]
    fn cancelling_a_meters_pending_leases_takes_back_all_of_them_and_only_them() {
        let pool = |id| MeterRef::Pool(Arc::new(Meter::new(id, None, IdKind::Pool, false)));
        let (a, b) = (pool(1), pool(2));
        let mut fx = Effects::default();
        fx.grant(a.clone(), 16, 0);
        fx.grant(b.clone(), 32, 0);
        fx.grant(a.clone(), 0, 0); // an entry granting nothing
        assert_eq!(
            fx.grant(a.clone(), 64, 0),
            3,
            "its index in the batch's leases"
        );
        assert_eq!(cancel_pending_leases(&mut fx, &a), 80);
        assert_eq!(cancel_pending_leases(&mut fx, &a), 0, "already taken back");
        let left: Vec<u64> = fx.leases.iter().map(|(_, units, _)| *units).collect();
        assert_eq!(left, [0, 32, 0, 0], "b's lease is untouched");
        fx.grant(a.clone(), 8, 0);
        assert_eq!(
            cancel_pending_leases(&mut fx, &a),
            8,
            "a later grant is found"
        );
    }

    /// One update makes a key unmetered, the next gives it a new balance, while a batch that
    /// took a lease request of the removed balance's meter waits for the file: that meter
    /// must not lease from the new balance. (Retired only once the writer reached its
    /// message, it did, and what grants reserved through it stayed leased for good: a close
    /// failed, the next open counted them lost. Found by a reviewer.)
    #[test]
    fn a_meter_of_a_removed_balance_never_leases_from_the_next() {
        let (_dir, ledger) = ledger();
        let (key_id, plaintext) = key(&ledger, 1_000);
        assert_eq!(spend_one(&ledger, &plaintext), Ok(1));
        let id = ledger.keys().internal_id(&key_id).unwrap();
        let old = ledger.inner.engine.shared.meters.lock().get(id).unwrap();
        let tx = &ledger.inner.engine.tx;
        let wait_for = |queued: usize| {
            while tx.len() != queued {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let hold = || {
            let (release, held) = crossbeam::channel::bounded::<()>(0);
            tx.send(Msg::Hold(held)).unwrap();
            release
        };
        let release = hold();
        wait_for(0);
        let (reply, _answer) = crossbeam::channel::bounded(1);
        let reply = Some(reply); // a request waiting for units, as a prefetch may not be
        let meter = old.clone();
        tx.send(Msg::Lease {
            meter,
            need: 1,
            reply,
        })
        .unwrap();
        // The file is busy: the writer takes the lease request, then waits for the file.
        let txn = ledger.inner.store.begin_write().unwrap();
        drop(release);
        wait_for(0);
        // What the two updates commit (the balance removed, a new one created), with the
        // first one's change to the meters between them.
        let fresh = CreditsRecord {
            balance: 500,
            granted: 500,
            ..CreditsRecord::default()
        };
        crate::store::put(&mut txn.open_table(CREDITS).unwrap(), id, &fresh).unwrap();
        let release = hold();
        let change = crate::engine::KeyChange::CreditsRemoved;
        ledger.inner.engine.key_changed(id, &[], change);
        txn.commit().unwrap();
        wait_for(1); // the lease's batch ran; the writer holds before the meter's retirement
        let read = ledger.inner.store.begin_read().unwrap();
        let stored: CreditsRecord = crate::store::get(&read.open_table(CREDITS).unwrap(), id)
            .unwrap()
            .unwrap();
        assert_eq!(stored, fresh, "nothing leased from the new balance");
        drop(release);
        ledger.close().unwrap();
    }

    /// A key leaves a full cache (its meter's retirement queued behind a held writer); before
    /// the writer gets to it, the key is made unmetered (its threshold goes) and given credits
    /// again. The retirement must not read the new balance through the old meter: it
    /// reported the new balance as low, by the old threshold (found by a reviewer).
    #[test]
    fn a_retirement_queued_behind_a_new_balance_reports_nothing_of_it() {
        use crate::KeyUpdate;
        let (_dir, ledger) = one_key_cache();
        let (a_plain, a) = {
            let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
            let new = NewKey::new(owner.id.as_str(), "a").credits(1_000);
            let created = ledger
                .keys()
                .create(new.low_balance_threshold(100))
                .unwrap();
            let plaintext = created.plaintext.expose().to_owned();
            (plaintext, created.info.id.to_string())
        };
        let (_, b_plain) = key(&ledger, 1_000);
        assert_eq!(spend_one(&ledger, &a_plain), Ok(1)); // a lease in memory
        ledger.flush().unwrap();
        let _ = events(&ledger);
        let tx = &ledger.inner.engine.tx;
        let (release, held) = crossbeam::channel::bounded::<()>(0);
        tx.send(Msg::Hold(held)).unwrap();
        while !tx.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A peek of `b` caches it: `a` leaves the cache of one, its retirement queued.
        let key_b = Presented::new(&b_plain).unwrap();
        let peek = ledger.verify(&Request::new(&key_b, "/x").cost(0)).unwrap();
        peek.commit(0);
        assert_eq!(tx.len(), 1, "the retirement is queued");
        let keys = ledger.keys();
        keys.update(&a, KeyUpdate::new().credits(None)).unwrap();
        keys.update(&a, KeyUpdate::new().credits(Some(50))).unwrap();
        drop(release);
        ledger.flush().unwrap();
        assert_eq!(low_balance_events(&ledger), [], "{a} has no threshold now");
        assert_eq!(ledger.credits().usage(&a).unwrap().remaining, Some(50));
    }

    /// A pool miss that read the balance before an admin `set` (no meter in memory then)
    /// registers its meter after the writer reported the fall: the meter must not report it
    /// again from the figure the miss read (found by a reviewer).
    #[test]
    fn a_set_reported_with_no_meter_is_not_reported_again_by_a_racing_miss() {
        let (_dir, ledger) = ledger();
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let pool = crate::NewPool::new(owner.id.as_str(), "p")
            .credits(100)
            .low_balance_threshold(50);
        let pool = ledger.credits().create_pool(pool).unwrap().id.to_string();
        let key = NewKey::new(owner.id.as_str(), "k").pool(&pool);
        let created = ledger.keys().create(key).unwrap();
        let plain = created.plaintext.expose().to_owned();
        let id = ledger.inner.ids.decode(IdKind::Pool, &pool).unwrap();
        let _ = events(&ledger);
        // The miss reads the pool's balance ...
        let read = ledger.inner.store.begin_read().unwrap();
        let stale: CreditsRecord = crate::store::get(&read.open_table(CREDITS).unwrap(), id)
            .unwrap()
            .unwrap();
        drop(read);
        // ... the admin's set commits, reported with no meter in memory ...
        ledger.credits().set(&pool, 40).unwrap();
        // ... and the miss registers its meter from what it read.
        let meter = Meter::new(id, Some(50), IdKind::Pool, false);
        crate::engine::init_meter(&meter, &stale, ledger.now());
        let meters = &ledger.inner.engine.shared.meters;
        meters.lock().insert(MeterRef::Pool(Arc::new(meter)));
        assert_eq!(spend_one(&ledger, &plain), Ok(1));
        ledger.flush().unwrap();
        let once = [(CreditEventKind::LowBalance, 40)];
        assert_eq!(low_balance_events(&ledger), once, "one fall, one event");
    }
}
