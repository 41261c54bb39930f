//! The verify engine: the cache, the route table, the credit registry and the writer thread,
//! started with the ledger and closed with it. Admin operations call its hooks so the next
//! verify sees their change.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use crossbeam::channel::{self, Receiver, Sender};
use crossbeam::queue::SegQueue;
use parking_lot::Mutex;

use std::collections::{HashMap, HashSet};

use crate::cache::{AccountState, Cache, CachedKey, Evicted, MeterRef, Metering, Scope};
use crate::config::Config;
use crate::credits::events::{CreditEvent, CreditEventKind, EVENT_CAPACITY};
use crate::credits::meter::{MAX_LEASED, MIN_LEASE, Meter, UNREAD};
use crate::credits::refill;
use crate::credits::registry::Registry;
use crate::credits::writer::{self, Adjust, AuditLine, FLUSH_CHUNK, Handoff, Msg, Shared};
use crate::error::{Error, Result};
use crate::hashing::{KeyHash, KeyHasher};
use crate::limits::SpendTier;
use crate::policy::RouteTable;
use crate::public_id::IdCipher;
use crate::record::{AccountRecord, CreditsRecord, KeyRecord, RouteRule};
use crate::store::{self, Store, tables::*};

mod in_flight;
mod limits;
mod miss;
mod recover;
mod shared_states;
#[cfg(test)]
mod tests;

pub(crate) use in_flight::{InFlight, Stripe};
pub(crate) use limits::LiveLimits;
pub(crate) use miss::Loaded;
#[cfg(test)]
pub(crate) use miss::init_meter;
pub(crate) use recover::rules_in;
use recover::{load_routes, recover_leases};
use shared_states::SharedStates;

/// How much credit state is guarded by leases, and so what a crash can cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Leases of about a second of each key's traffic (at least 16 units — up to 256 while
    /// the writer is behind on renewals — and at most 100,000; only a key that spent its last
    /// lease within a second gets more than a quarter of its balance): verify rarely waits
    /// for the disk; a crash loses at most the outstanding leases, reported as
    /// `lost_to_crash`, and never lets a key spend more than it was granted.
    #[default]
    Leased,
    /// Leases of exactly the units a request needs: every reservation is a group-committed
    /// write before `verify` returns, and every commit's charge is written with the next
    /// batch (within 100 ms). A crash loses at most the reservations in flight and the
    /// charges of that last window. (Usage counters — requests, lifetime spend, last used —
    /// are flushed in rounds in both modes.)
    Exact,
}

/// What an admin change did to a key, for the engine's hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyChange {
    /// Settings only (name, permissions, state…).
    Settings,
    /// Its balance or refill changed.
    CreditsChanged,
    /// It became unmetered: its balance record is gone.
    CreditsRemoved,
    /// It was deleted.
    Deleted,
}

/// Snapshots an admin change evicted, kept until the key's next verify rebuilds it (so the
/// rebuild keeps the live counters, lease and rate-limit state). Bounded: beyond this many
/// they are forgotten (their unflushed usage is already queued for the writer, and their
/// rate-limit states that still count are held in [`LiveLimits`]).
const MAX_CARRIED: usize = 65_536;

pub(crate) struct Engine {
    pub cache: Cache,
    pub shared: Arc<Shared>,
    pub tx: Sender<Msg>,
    /// The key hasher and the route table, swapped as one.
    pub policy: ArcSwap<Policy>,
    pub events: Receiver<CreditEvent>,
    pub tiers: Vec<SpendTier>,
    /// The last snapshot of keys an admin change evicted, by key id.
    carried: Mutex<HashMap<u64, Arc<CachedKey>>>,
    /// Interned scopes: keys with the same permissions and allowlist share one allocation.
    scopes: Mutex<SharedStates<HashSet<Arc<Scope>>>>,
    /// Shared state of the accounts with a cached key.
    accounts: Mutex<SharedStates<HashMap<u64, Arc<AccountState>>>>,
    /// Grants that reserved no credits, still held: `close` waits for them too.
    pub in_flight: InFlight,
    /// Units found leased at open (a crash before): now counted in `lost_to_crash`.
    pub lost_at_open: u64,
    /// Balances found unreadable at open (see `recover_leases`).
    pub unreadable_at_open: u64,
    /// How long `close` waits for grants still held (`Config::close_grace`).
    close_grace: std::time::Duration,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// How the close ended, once one has (the error's message).
    closed: Mutex<Option<std::result::Result<(), String>>>,
}

/// What every verify reads before its cache look-up — how to hash the key, and the route
/// rules — in one snapshot, so that a verify pays one `ArcSwap` load (two atomic
/// read-modify-writes with its release) instead of two.
pub(crate) struct Policy {
    pub hasher: Arc<KeyHasher>,
    pub routes: Arc<RouteTable>,
}

impl Engine {
    pub(crate) fn start(
        store: Arc<Store>,
        ids: Arc<IdCipher>,
        hasher: KeyHasher,
        config: &Config,
    ) -> Result<Engine> {
        // The first reads of every record: a damaged page must give an error, not a panic.
        let (recovered, routes) =
            store.guard(|| Ok((recover_leases(&store)?, load_routes(&store)?)))?;
        let (events_tx, events) = channel::bounded(EVENT_CAPACITY);
        let shared = Arc::new(Shared {
            store,
            clock: config.clock.clone(),
            ids,
            exact: config.durability == Durability::Exact,
            flush_every: config.usage_flush_interval,
            // Twice the keys the cache can hold (all of them may be in use, and as many
            // again evicted since the last round), and at least one round's chunk.
            usage_list_bound: config.cache_capacity.saturating_mul(2).max(FLUSH_CHUNK),
            meters: Mutex::new(Registry::with_capacity(config.cache_capacity)),
            meter_resets: AtomicU64::new(0),
            dirty_meters: SegQueue::new(),
            dirty_usage: SegQueue::new(),
            prefetches: Default::default(),
            retiring: Default::default(),
            events: events_tx,
            commits: Default::default(),
            list_bytes: Default::default(),
            usage_unwritable: Default::default(),
            events_dropped: Default::default(),
            lease_waits: Default::default(),
            limits: Mutex::new(LiveLimits::new(config.spend_tiers.clone())),
            limits_generation: AtomicU64::new(0),
            lease_floor: AtomicU64::new(MIN_LEASE),
            closing: std::sync::atomic::AtomicBool::new(false),
            held: AtomicU64::new(0),
            #[cfg(test)]
            fail_reads_of: AtomicU64::new(0),
            #[cfg(test)]
            after_reclaim_look: parking_lot::Mutex::new(None),
            #[cfg(test)]
            before_commit: parking_lot::Mutex::new(None),
            #[cfg(test)]
            before_unlisting: parking_lot::Mutex::new(None),
            #[cfg(test)]
            after_empty_look: parking_lot::Mutex::new(None),
            #[cfg(test)]
            after_account_read: parking_lot::Mutex::new(None),
        });
        let (tx, rx) = channel::unbounded();
        let writer_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("keyledger-writer".into())
            .spawn(move || writer::run(writer_shared, rx))
            .map_err(|e| Error::Conflict(format!("cannot start the writer thread: {e}")))?;
        Ok(Engine {
            cache: Cache::new(config.cache_capacity),
            shared,
            tx,
            policy: ArcSwap::from_pointee(Policy {
                hasher: Arc::new(hasher),
                routes: Arc::new(RouteTable::new(1, routes)),
            }),
            events,
            tiers: config.spend_tiers.clone(),
            accounts: Mutex::default(),
            carried: Mutex::new(HashMap::new()),
            scopes: Mutex::default(),
            in_flight: InFlight::default(),
            lost_at_open: recovered.lost,
            unreadable_at_open: recovered.unreadable,
            close_grace: config.close_grace,
            writer: Mutex::new(Some(handle)),
            closed: Mutex::new(None),
        })
    }

    /// Returns every lease, flushes, and stops the writer. Idempotent: a close while another
    /// runs waits for it and reports how it ended (not "closed" while the first is still
    /// waiting for grants, or about to fail).
    pub(crate) fn close(&self) -> Result<()> {
        let mut ended = self.closed.lock();
        if let Some(ended) = &*ended {
            return ended.clone().map_err(Error::Conflict);
        }
        let result = self.stop_writer().map_err(|e| self.fenced_or(e));
        // However the writer ended (a closing batch that failed before it took the leases
        // back, on a store fenced off by an earlier failure; a writer that had died), no
        // request reserves from a lease in memory any more: each asks the writer, which is
        // gone, and is refused as `unavailable`, as an unmetered one is. Its commit would be
        // written nowhere (found by a reviewer: every cached key went on being granted).
        for meter in self.shared.meters.lock().all() {
            meter.set_refill_at(0);
        }
        let result = result.and(self.shared.store.refuse_writes());
        *ended = Some(match &result {
            Ok(()) => Ok(()),
            // Quoted once: "conflict: the ledger's close failed: conflict: …" said it twice.
            Err(Error::Conflict(why)) => Err(format!("the ledger's close failed: {why}")),
            Err(e) => Err(format!("the ledger's close failed: {e}")),
        });
        result
    }

    /// Grants still held (requests still running) are waited for, up to the close grace:
    /// the writer leases nothing more, and gives back every lease and flushes every spend
    /// until what is still leased — what those grants reserved — is zero. Without the wait
    /// their units would stay leased, and the next open would count them as lost to a crash.
    fn stop_writer(&self) -> Result<()> {
        let Some(handle) = self.writer.lock().take() else {
            return Ok(());
        };
        // `SeqCst`, as a grant counted in `in_flight` reads it (see `InFlight::enter`).
        self.shared.closing.store(true, Ordering::SeqCst);
        // A grace too long to add to the clock is no deadline.
        let deadline = std::time::Instant::now().checked_add(self.close_grace);
        while self.drain().is_ok()
            && (self.shared.held.load(Ordering::Acquire) > 0 || self.in_flight.held() > 0)
            && deadline.is_none_or(|d| std::time::Instant::now() < d)
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let (reply, done) = channel::bounded(1);
        // The writer answers a close once the leases are back, or with the error that kept
        // them; one that stopped without answering returned nothing.
        let stopped = || {
            Error::Conflict(
                "the credit writer stopped before returning the leases (they count as \
                 lost_to_crash at the next open)"
                    .into(),
            )
        };
        let result = match self.send(Msg::Close { reply }) {
            Ok(()) => done.recv().unwrap_or_else(|_| Err(stopped())),
            Err(_) => Err(stopped()),
        };
        let _ = handle.join();
        result?;
        match (
            self.shared.held.load(Ordering::Acquire),
            self.in_flight.held(),
        ) {
            (0, 0) => Ok(()),
            (0, grants) => Err(Error::Conflict(format!(
                "{grants} grants that reserved no credits were still held after the close \
                 grace: what they commit is not recorded"
            ))),
            (held, _) => Err(Error::Conflict(format!(
                "{held} units reserved by grants still held after the close grace stay \
                 leased: the next open counts them as lost_to_crash"
            ))),
        }
    }

    /// Why the writer did not answer: the ledger closed, or (a panic, a test's simulated
    /// crash) the writer stopped without one.
    fn closed(&self) -> Error {
        match self.shared.closing.load(Ordering::Acquire) {
            true => Error::Closed,
            false => Error::Conflict("the credit writer stopped; reopen the ledger".into()),
        }
    }

    /// Gives every lease back and flushes, as a close does, but keeps the writer running;
    /// [`Shared::held`] then says what grants still hold.
    fn drain(&self) -> Result<()> {
        let (reply, done) = channel::bounded(1);
        self.send(Msg::Drain { reply }).map_err(|_| self.closed())?;
        done.recv().map_err(|_| self.closed())?
    }

    /// Stops the writer without writing anything, as a crash would (tests only).
    pub(crate) fn abandon(&self) {
        if let Some(handle) = self.writer.lock().take() {
            let _ = self.send(Msg::Abandon);
            let _ = handle.join();
        }
    }

    /// Flushes pending spend and usage now.
    pub(crate) fn flush(&self) -> Result<()> {
        let (reply, done) = channel::bounded(1);
        self.send(Msg::Flush { reply }).map_err(|_| self.closed())?;
        done.recv()
            .map_err(|_| self.closed())?
            .map_err(|e| self.fenced_or(e))
    }

    /// `failed`, the writer's answer, unless the file was fenced off after a redb panic:
    /// then that error, as every direct call gets it (the writer's says only "failed").
    fn fenced_or(&self, failed: Error) -> Error {
        // "May have been made" stays: the fence (a commit failed or panicked, maybe this
        // very change's) says nothing about whether the change landed.
        if matches!(failed, Error::Uncertain { .. }) {
            return failed;
        }
        self.shared.store.not_panicked().err().unwrap_or(failed)
    }

    /// Sets or tops up a balance through the writer, ordered with leases.
    pub(crate) fn adjust(&self, id: u64, change: Adjust, audit: Option<AuditLine>) -> Result<u64> {
        let (reply, done) = channel::bounded(1);
        self.send(Msg::Adjust {
            id,
            change,
            audit,
            reply,
        })
        .map_err(|_| self.closed())?;
        done.recv()
            .map_err(|_| self.closed())?
            .map_err(|e| self.fenced_or(e))
    }

    /// Balance `id` as a request finds it now: `record` with a refill that has come due
    /// applied as the next lease will apply it (dropping what memory holds leased from the
    /// old period), and the credits left — the balance plus what memory holds leased and
    /// not yet reserved (at most what the record says is leased).
    ///
    /// After a close, memory spends and returns nothing more: what the record says is leased
    /// (held by grants past the close's grace, or refunded to memory since) is what the next
    /// open counts as lost, and is counted so here already.
    pub(crate) fn balance_now(&self, id: u64, record: &CreditsRecord) -> (CreditsRecord, u64) {
        let mut view = record.clone();
        let in_memory = if self.shared.store.refuses_writes() {
            view.lost_to_crash = view.lost_to_crash.saturating_add(view.leased);
            view.leased = 0;
            0
        } else {
            let meters = self.shared.meters.lock();
            meters.get(id).map_or(0, |m| m.leased()).min(view.leased)
        };
        if refill::apply_due(&mut view, self.shared.clock.now()) {
            view.leased -= in_memory;
            view.granted = view.granted.saturating_sub(in_memory);
            let left = view.balance;
            return (view, left);
        }
        let left = view.balance + in_memory;
        (view, left)
    }

    /// Credits left on balance `id` (see [`balance_now`](Self::balance_now)).
    pub(crate) fn remaining(&self, id: u64, record: &CreditsRecord) -> u64 {
        self.balance_now(id, record).1
    }

    /// Credits left on `meter`'s balance when it has not read it yet (see
    /// [`Meter::remaining`]), read from the latest commit. A balance that has no record or
    /// cannot be read has none to spend: 0 (and one that does not decode marks the meter).
    pub(crate) fn read_remaining(&self, meter: &Meter) -> u64 {
        let store = &self.shared.store;
        let read = store.guard(|| {
            let snapshot = store.snapshot()?;
            store::get::<CreditsRecord>(&snapshot.credits, meter.id)
        });
        match read {
            Ok(record) => record.map_or(0, |r| self.remaining(meter.id, &r)),
            Err(e) => {
                if matches!(e, Error::Codec(_)) {
                    meter.mark_unreadable();
                }
                0
            }
        }
    }

    /// Waits until the writer has leased into `meter`; returns what this caller was handed
    /// out of that lease, `None` if the writer is gone.
    pub(crate) fn lease_now(&self, meter: &MeterRef, need: u64) -> Option<Handoff> {
        let (reply, done) = channel::bounded(1);
        meter.pending.store(true, Ordering::Release);
        let msg = Msg::Lease {
            meter: meter.clone(),
            need,
            reply: Some(reply),
        };
        let started = std::time::Instant::now();
        self.send(msg).ok()?;
        let handed = done.recv().ok();
        self.shared.lease_waits.record(started.elapsed());
        handed
    }

    /// Starts a background lease top-up.
    pub(crate) fn prefetch(&self, meter: &MeterRef) {
        if self.shared.prefetches.push(meter.clone()) {
            // Straight into the channel, not through `send`: this is a cache hit, under its
            // shard's read lock, and the retirements waiting are behind a lock every thread
            // shares. They need not go first: the writer takes queued prefetches ahead of the
            // rest of a batch, and the retirements waiting at its turn.
            let _ = self.tx.send(Msg::PrefetchBell);
        }
    }

    /// Whether leases are of exactly what a request needs ([`Durability::Exact`]).
    pub(crate) fn exact(&self) -> bool {
        self.shared.exact
    }

    /// Gives refunded units back to the durable balance, reserved under the balance's
    /// `epoch` (see `Grant`): discarded instead if a `set` came since. Waits until that is
    /// durable, as a reservation in `Exact` mode waits for its lease; with the writer gone
    /// (closed), the meter keeps them.
    pub(crate) fn give_back(&self, meter: &MeterRef, units: u64, epoch: u32) {
        let (reply, done) = channel::bounded(1);
        let msg = Msg::Return {
            meter: meter.clone(),
            units,
            epoch,
            reply: Some(reply),
        };
        if self.send(msg).is_err() || done.recv().is_err() {
            let _ = meter.give_back_up_to(units, MAX_LEASED, epoch);
        }
    }

    /// Refunded units reserved under an `epoch` that has ended (a `set` since, see `Grant`):
    /// the writer drops them from the books — or returns them, if the batch of that `set`
    /// failed and restored the epoch. Nobody waits.
    pub(crate) fn return_stale(&self, meter: &MeterRef, units: u64, epoch: u32) {
        let _ = self.send(Msg::Return {
            meter: meter.clone(),
            units,
            epoch,
            reply: None,
        });
    }

    /// Asks the writer to write what `meter` has spent (`Exact` mode, after a commit).
    pub(crate) fn settle(&self, meter: MeterRef) {
        let _ = self.send(Msg::Settle { meter });
    }

    /// Charges units beyond a reservation from the durable balance; returns units charged.
    pub(crate) fn shortfall(&self, meter: &MeterRef, units: u64) -> u64 {
        let (reply, done) = channel::bounded(1);
        let msg = Msg::Shortfall {
            meter: meter.clone(),
            units,
            reply,
        };
        if self.send(msg).is_err() {
            return 0;
        }
        done.recv().unwrap_or(0)
    }

    /// An admin change is about to give key `id` rate windows configured as `configured`
    /// (called before it commits: see `LiveLimits::generations`).
    pub(crate) fn limits_reconfigured(&self, id: u64, configured: &crate::record::Limits) {
        let mut live = self.shared.limits.lock();
        // Moved under the lock, so that generations reach the map in the order handed out.
        let generation = self.shared.limits_generation.fetch_add(1, Ordering::AcqRel) + 1;
        live.reconfigure(id, generation, configured);
    }

    /// Drops a cached rolled-away secret past its grace (`verify` found it there): the next
    /// verify of it asks the store, as for any hash no key holds.
    pub(crate) fn forget_dead_secret(&self, hash: &KeyHash) {
        let evicted = self.cache.evict(std::slice::from_ref(hash));
        self.carry(evicted);
    }

    /// An admin change to a key: drop the cached entries of its secrets' `hashes` so the
    /// next verify re-reads the record. A deleted key's meter retires.
    pub(crate) fn key_changed(&self, id: u64, hashes: &[KeyHash], change: KeyChange) {
        let evicted = self.cache.evict(hashes);
        if change != KeyChange::Deleted {
            self.carry(evicted);
        }
        let mut meters = self.shared.meters.lock();
        if change == KeyChange::Deleted {
            meters.drop_home(id);
        }
        let meter = meters.get(id).filter(|m| !m.is_pool());
        match change {
            KeyChange::Deleted | KeyChange::CreditsRemoved => {
                // Counted even when no meter is in memory: a miss that read the key before
                // this change and registers only now would otherwise leave one behind.
                self.shared.meter_resets.fetch_add(1, Ordering::AcqRel);
                // A balance given to the key later is a new one: its first refusal is news.
                meters.grew(id);
                if let Some(meter) = meter {
                    // Retired and out of the registry now, in the change's turn: a key metered
                    // again gets a new meter, and this one leases from no later balance (else
                    // what grants reserved from it would stay leased for good). What it holds
                    // went with the balance; the writer ignores it from now on.
                    meter.retire();
                    meters.remove(&meter);
                }
            }
            KeyChange::CreditsChanged => {
                if let Some(meter) = meter {
                    // A new refill or balance may make an empty meter spendable again.
                    meter.set_empty_until(0);
                    meter.set_refill_at(0);
                }
            }
            KeyChange::Settings => {}
        }
    }

    /// A request was refused in memory for want of credits, the balance known empty while
    /// it had grown `growths` times: the first refusal since the balance last grew is
    /// reported on the event channel (the host tells its customer once, not per request).
    ///
    /// Only a refusal made in memory is reported here. One the writer made (it could not
    /// lease what the request needed) the writer reported, in batch order.
    ///
    /// A growth (a top-up, a set, a refill) since the refusal answered it: nothing is
    /// reported then. The refusal's thread may have been preempted before getting here, for
    /// any length of time: checked against the empty mark instead, the report was made
    /// after a top-up (a second event for a run-out already told, LowBalance(0) with it), or,
    /// once the topped-up credits had run low and the balance was known empty again, told
    /// the new run-out early with credits left and left it marked, so that its real first
    /// refusal was silent. Checked against the clock, a refusal made just before a refill
    /// came due was never reported (the refill, finding no mark, cleared nothing).
    pub(crate) fn report_exhausted(&self, meter: &Meter, growths: u8) {
        if meter.first_refusal_under(growths) {
            // The durable balance is empty (so the mark said when the request looked),
            // whatever the meter's figure shows: a top-up the writer has applied but not yet
            // committed is not there.
            let left = meter.leased();
            // Requests spent the lease that emptied it in memory, unseen by the writer: the
            // fall past the low-balance threshold comes first. (The writer records the
            // credits left too; should it record a stale, higher figure right after this,
            // the next fall reports again — a duplicate, never a loss.)
            if meter.note_remaining(left).0 {
                meter.measured_on_left();
                let low = self.shared.event(CreditEventKind::LowBalance, meter, left);
                self.shared.send_event(low);
            }
            let event = self.shared.event(CreditEventKind::Exhausted, meter, left);
            self.shared.send_event(event);
        }
    }

    /// A pool was deleted (no key spends from it any more): its meter, if in memory, leaves
    /// the registry now and retires, so what late grants refund or spend through it is
    /// ignored.
    pub(crate) fn pool_deleted(&self, id: u64) {
        let mut meters = self.shared.meters.lock();
        // Counted as a reset: a miss that read the pool before the deletion does not
        // register a meter for it (see `pool_meter`).
        self.shared.meter_resets.fetch_add(1, Ordering::AcqRel);
        if let Some(meter) = meters.get(id).filter(|m| m.is_pool()) {
            meter.retire();
            meters.remove(&meter);
        }
    }

    /// A pool's refill changed: its meter in memory, if any, asks the writer before its
    /// next spend, which reads the new terms (a refill may now be due, or an empty balance
    /// spendable). Counted as a reset, so a miss that read the old terms before the change
    /// does not register a meter with them (it reads again).
    pub(crate) fn pool_refill_changed(&self, id: u64) {
        let meters = self.shared.meters.lock();
        self.shared.meter_resets.fetch_add(1, Ordering::AcqRel);
        if let Some(meter) = meters.get(id).filter(|m| m.is_pool()) {
            meter.set_empty_until(0);
            meter.set_refill_at(0);
        }
    }

    /// A key's or pool's low-balance threshold changed: its meter in memory, if any, learns
    /// it. Counted as a reset, so a miss that read the old threshold before the change does
    /// not register a meter with it (it reads again).
    pub(crate) fn low_balance_changed(&self, id: u64, threshold: Option<u64>) {
        // Edges are measured on the credits not yet spent, as the writer measures them
        // (`writer::leasing::unspent`): units requests hold reserved count, or the commit of
        // a reservation held across the change is no fall (found by a reviewer). Read before
        // the lock (no I/O under it): a batch committing between the two can leave the figure
        // high (a spurious event at worst), and the batch's own figures reach the new
        // threshold once it commits (`Meter::raise_if_replaced`).
        let store = &self.shared.store;
        let stored = threshold.and_then(|_| {
            let read = store.guard(|| {
                let snapshot = store.snapshot()?;
                store::get::<CreditsRecord>(&snapshot.credits, id)
            });
            read.ok().flatten()
        });
        let meters = self.shared.meters.lock();
        self.shared.meter_resets.fetch_add(1, Ordering::AcqRel);
        if let Some(meter) = meters.get(id) {
            let figure = match (meter.remaining(), stored) {
                (Some(left), Some(r)) => r
                    .balance
                    .saturating_add(r.leased)
                    .saturating_sub(meter.spent.load(Ordering::Acquire))
                    .max(left),
                (left, _) => left.unwrap_or(UNREAD),
            };
            meter.set_low_balance(threshold, figure);
        }
    }

    /// Holds the rate-limit states of entries leaving the cache while they still count (see
    /// [`LiveLimits::hold`]): the key's next miss takes them back.
    fn hold_limits(&self, leaving: &[Arc<CachedKey>]) {
        let limited = leaving.iter().filter_map(|k| Some((k, k.limits.as_ref()?)));
        let mut limited = limited.peekable();
        if limited.peek().is_some() {
            let now_ns = self.shared.clock.monotonic_ns();
            let mut live = self.shared.limits.lock();
            for (key, limits) in limited {
                // Besides `leaving`, a grant or the writer's lists may hold the entry. Spend
                // not yet flushed is counted only by the state (and by a home the writer
                // holds, which a miss cannot find): the tiers would lose it.
                // The count first: its fence makes what the last grants wrote visible.
                let in_use = !crate::holders::held_by_at_most(key, 1)
                    || (!self.tiers.is_empty() && key.unflushed_spend() > 0);
                live.hold(key.id(), limits, in_use, now_ns);
            }
        }
    }

    /// Keeps evicted snapshots for the rebuild (live counters and rate limits survive it).
    /// Their rate-limit states are held apart too: beyond `MAX_CARRIED` snapshots are
    /// forgotten, and a window still counting must not start afresh with them.
    fn carry(&self, evicted: Evicted) {
        self.hold_limits(&evicted);
        let mut carried = self.carried.lock();
        if carried.len() > MAX_CARRIED {
            carried.clear();
        }
        for key in evicted {
            carried.insert(key.id(), key);
        }
    }

    /// An admin change to an account: its cached keys copied its state, so they are evicted
    /// (found through the owner index) and the next verify of each sees the change.
    pub(crate) fn account_changed(&self, owner: u64) {
        let known = {
            let mut accounts = self.accounts.lock();
            // A miss that read the account before this change must not keep what it read:
            // after this bump it caches neither the key nor a new account state (see `load`).
            self.cache.invalidate();
            let known = accounts.get(&owner).cloned();
            if let Some(state) = &known {
                // Read again under the lock rather than applying the caller's record: of two
                // changes racing, the one publishing last then reads the later commit.
                let read = self.shared.store.begin_read();
                let stored = read.and_then(|read| {
                    let table = read.open_table(ACCOUNTS)?;
                    store::get::<AccountRecord>(&table, owner)
                });
                match stored {
                    Ok(Some(record)) => state.update(record.status, record.entitlements),
                    // Unreadable (or gone): forget the state; the next miss reads it afresh.
                    _ => {
                        accounts.remove(owner);
                    }
                }
            }
            known.is_some()
        };
        if !known {
            return; // no cached key holds this account's state
        }
        match owner_key_hashes(&self.shared.store, owner) {
            Ok(hashes) => {
                let evicted = self.cache.evict(&hashes);
                self.carry(evicted);
            }
            // Cannot tell which keys are this account's: start from an empty cache.
            Err(_) => self.scheme_changed(),
        }
    }

    /// A key with this hash was created: forget a remembered miss.
    pub(crate) fn key_created(&self, hash: &KeyHash) {
        self.cache.forget_missing(hash);
    }

    /// Keys may now match hashes that missed before (an import).
    pub(crate) fn hashes_changed(&self) {
        self.cache.forget_all_missing();
    }

    /// The hash scheme changed: every cache key changes, so start from an empty cache.
    pub(crate) fn scheme_changed(&self) {
        let evicted = self.cache.clear();
        self.retire(evicted);
    }

    /// Runs a route change: `change` writes it into a transaction, which commits only if
    /// every rule it then holds decodes; those rules are published once it has committed, so
    /// a change that returns `Ok` is enforced from the next verify, and one that fails is not
    /// stored (reading the rules back after the commit could fail and leave a stored rule
    /// unenforced). Published in the commit's turn, so that two changes publish in the order
    /// they committed.
    pub(crate) fn change_routes<T>(
        &self,
        store: &Store,
        change: impl FnOnce(&store::WriteTxn<'_>) -> Result<T>,
    ) -> Result<T> {
        let txn = store.begin_write()?;
        let changed = change(&txn)?;
        let rules = rules_in(&txn.open_table(ROUTES)?)?;
        // A commit that failed may or may not have landed: neither table can be trusted, so
        // every cached key goes (the store is fenced off now, so no miss serves one).
        txn.commit_then(|committed| match committed {
            true => self.publish_routes(rules),
            false => self.scheme_changed(),
        })?;
        Ok(changed)
    }

    /// Publishes route rules and recompiles every cached key's bits against them.
    fn publish_routes(&self, rules: Vec<RouteRule>) {
        let generation = self.policy.load().routes.generation + 1;
        let table = Arc::new(RouteTable::new(generation, rules));
        // A hash-scheme rotation may publish at the same time: keep its hasher.
        self.policy.rcu(|policy| Policy {
            hasher: policy.hasher.clone(),
            routes: table.clone(),
        });
        self.cache.for_each(|key| key.recompile(&table));
    }

    /// The hasher keys are hashed with now.
    pub(crate) fn hasher(&self) -> Arc<KeyHasher> {
        self.policy.load().hasher.clone()
    }

    /// Publishes a new hash scheme (the caller then empties the cache).
    pub(crate) fn set_hasher(&self, hasher: KeyHasher) {
        let hasher = Arc::new(hasher);
        // A route change may publish at the same time: keep its table.
        self.policy.rcu(|policy| Policy {
            hasher: hasher.clone(),
            routes: policy.routes.clone(),
        });
    }

    /// Entries left the cache for good (capacity): their own meters, and the homes of keys
    /// without one, may leave memory.
    fn retire(&self, evicted: Evicted) {
        self.hold_limits(&evicted);
        for key in evicted {
            let (home, own) = (key.home_arc(), key.metering == Metering::Own);
            drop(key);
            if own {
                // The writer frees the meter when only its handles are left. Told without a
                // wake: a send that finds the writer parked wakes it, ≈ 11 µs of the miss
                // that evicted (docs/PERFORMANCE.md, forty-third round); the writer takes
                // the retirements at its next turn (200 ms at most), or with the next
                // message anyone sends it, or when this many wait.
                const MAX_WAITING: usize = 4_096;
                if self.shared.retiring.push(MeterRef::Own(home)) >= MAX_WAITING {
                    self.send_retirements();
                }
            } else {
                self.shared.meters.lock().forget_home(home);
            }
        }
    }

    /// Sends `msg` to the writer after the retirements waiting to be told (see `retire`): a
    /// message comes after the evictions before it, as when each eviction sent its own.
    fn send(&self, msg: Msg) -> Result<(), channel::SendError<Msg>> {
        self.send_retirements();
        self.tx.send(msg)
    }

    /// Sends the retirements waiting (none waiting: one atomic load, no lock).
    fn send_retirements(&self) {
        (self.shared.retiring).send_all(|meter| drop(self.tx.send(Msg::Retire { meter })));
    }
}

/// The hashes of every secret of `owner`'s keys and tokens.
fn owner_key_hashes(store: &Store, owner: u64) -> Result<Vec<KeyHash>> {
    let read = store.begin_read()?;
    let index = read.open_table(KEYS_BY_OWNER)?;
    let keys = read.open_table(KEYS)?;
    let mut hashes = Vec::new();
    for entry in index.range((owner, 0, 0)..=(owner, u8::MAX, u64::MAX))? {
        let id = entry?.0.value().2;
        if let Some(record) = store::get::<KeyRecord>(&keys, id)? {
            hashes.push(record.key_hash);
            hashes.extend(record.rolled.map(|r| r.key_hash));
        }
    }
    Ok(hashes)
}
