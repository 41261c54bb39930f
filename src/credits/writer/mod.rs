//! The writer thread: the one owner of hot-path writes. It batches every pending lease,
//! shortfall, balance change, spend flush and usage flush into one write transaction,
//! committed with `Durability::Immediate` (group commit: one durable commit per batch, not
//! per key), and only then makes leased units spendable in memory.
//!
//! This file holds the messages and the loop that gathers them into batches; `batch` runs
//! one batch into a write transaction, `leasing` is what a batch does to one balance,
//! `flush` writes the spend and usage counted in memory, `effects` publishes a committed
//! batch in memory (or undoes a failed one), and `lists` keeps what a flush round found in
//! use and the queue of lease top-ups.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use crossbeam::queue::SegQueue;
use parking_lot::Mutex;

use super::events::{CreditEvent, CreditEventKind};
use super::meter::{MAX_LEASE_FLOOR, MIN_LEASE, Meter};
use super::registry::Registry;
use crate::cache::{CachedKey, MeterRef};
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::public_id::{IdCipher, IdKind};
use crate::store::Store;

mod batch;
mod effects;
mod flush;
mod leasing;
mod lists;
#[cfg(test)]
mod tests;

use effects::commit;
use leasing::set_refill_at;
use lists::Listed;
pub(crate) use lists::Prefetches;

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
pub(crate) const FLUSH_CHUNK: usize = 4_096;
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
    /// Keys listed or queued for usage past which a round starts early (see `run`).
    pub usage_list_bound: usize,
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
    /// Meters of evicted keys not yet told to the writer (`Engine::retire`).
    pub retiring: Retiring,
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
    /// Run once by the next `reclaim`, after it has looked at what memory holds.
    #[cfg(test)]
    pub after_reclaim_look: parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Run once by the next batch that writes, after its messages, before its commit.
    #[cfg(test)]
    pub before_commit: parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Run once by the next flush round that finds a key or a pool's meter idle, after its
    /// take found nothing, before the unlisting takes again: a request racing the unlisting.
    #[cfg(test)]
    pub before_unlisting: parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Run once by the next request waiting for a lease, after it looked at the empty mark,
    /// before it tries the lease (see `Ledger::reserve_slow`).
    #[cfg(test)]
    pub after_empty_look: parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Run once by the next cache miss that reads an account not yet in memory, after the
    /// read, before it looks at the cache's epoch (see `Engine::read_miss`).
    #[cfg(test)]
    pub after_account_read: parking_lot::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Shared {
    /// Runs [`before_unlisting`](Self::before_unlisting), if set.
    #[cfg(test)]
    pub(super) fn race_the_unlisting(&self) {
        let race = self.before_unlisting.lock().take();
        if let Some(race) = race {
            race();
        }
    }

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
                let retired = retirements(&shared, &rx);
                apply(&shared, &mut listed, retired, true, Flush::All);
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
        batch.extend(retirements(&shared, &rx));
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
        } else if dirty && (last_round.elapsed() >= shared.flush_every || crowded(&shared, &listed))
        {
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

/// Whether the keys listed or queued for usage have passed their bound: then a round starts
/// without waiting for the flush interval. A listed key holds its whole snapshot, cached or
/// not, until a round finds it idle since the round before; when keys leave a full cache as
/// fast as misses bring others in, the keys used and evicted within two intervals would
/// otherwise all stay in memory — a footprint growing with the miss rate, not bounded by the
/// cache (found by a reviewer: about 200 bytes a miss, for 30 to 60 s). This bounds them
/// only while the writer keeps up: what queues while a round runs is not limited, and a
/// miss of an unmetered or pooled key builds a new home even while one is still listed
/// (docs/RELIABILITY.md, thirty-eighth session).
fn crowded(shared: &Shared, listed: &Listed) -> bool {
    shared.dirty_usage.len() + listed.keys.list.len() > shared.usage_list_bound
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

/// Meters of evicted keys not yet told to the writer: an eviction does not send (a send
/// that finds the writer parked wakes it, ≈ 11 µs of the miss: docs/PERFORMANCE.md,
/// forty-third round). Each is sent before the next message anyone sends the writer (but a
/// prefetch's bell, rung from a cache hit: the writer takes prefetches first in any case), or
/// the writer takes them at its turn once every message sent before them is in its batch.
#[derive(Default)]
pub(crate) struct Retiring {
    list: Mutex<Vec<MeterRef>>,
    /// Whether `list` may hold any: a send skips the lock when none wait. Set with a push,
    /// cleared under the lock once the list is sent or taken.
    waiting: AtomicBool,
}

impl Retiring {
    /// Adds an evicted meter; returns how many wait.
    pub(crate) fn push(&self, meter: MeterRef) -> usize {
        let mut list = self.list.lock();
        list.push(meter);
        self.waiting.store(true, Ordering::Release);
        list.len()
    }

    /// Sends every waiting meter through `send`, under the lock: a message sent after this
    /// (or after seeing none wait) comes after them in the channel.
    pub(crate) fn send_all(&self, mut send: impl FnMut(MeterRef)) {
        if !self.waiting.load(Ordering::Acquire) {
            return;
        }
        let mut list = self.list.lock();
        list.drain(..).for_each(&mut send);
        self.waiting.store(false, Ordering::Release);
    }

    /// How many wait (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.list.lock().len()
    }
}

/// The retirements waiting in [`Shared::retiring`], once nothing is left in the channel:
/// every message sent before them is then in the batch they join, last (a sender sends them
/// before its own message).
fn retirements(shared: &Shared, rx: &Receiver<Msg>) -> Vec<Msg> {
    let mut taken = Vec::new();
    if rx.is_empty() {
        shared
            .retiring
            .send_all(|meter| taken.push(Msg::Retire { meter }));
    }
    taken
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
