//! [`Meter`]: the in-memory side of one credit balance (a key's own or a pool's).
//!
//! Units move only in this order: durable `balance` → durable `leased` (a write transaction
//! by the writer thread, committed before the units appear here) → this meter's `lease`
//! (reserved by `verify` with a CAS that never goes below zero) → `spent` (counted here, then
//! flushed durably by the writer). A crash can therefore lose units to `lost_to_crash`, never
//! let more be spent than was granted.
//!
//! A `set` of the balance (or a refill, which replaces it) is final for every reservation
//! taken before it: their refunds must not land in the new balance. The lease word therefore
//! carries the low 16 bits of the balance's epoch next to its units, and a refund is one CAS
//! that fails once the writer has started a new epoch ([`Meter::new_epoch`]): a refund that
//! checked the epoch and then added could fall on either side of the writer's swap.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;

/// The smallest and largest adaptive lease (`Exact` mode leases exactly what is needed).
/// A key used once a minute still keeps a lease of 16, so its requests never wait for the
/// disk; the price is at most that many units lost to a crash.
pub(crate) const MIN_LEASE: u64 = 16;
pub(crate) const MAX_LEASE: u64 = 100_000;
/// The most the smallest lease grows to while the writer is behind (see `writer::pace_leases`).
pub(crate) const MAX_LEASE_FLOOR: u64 = 16 * MIN_LEASE;

/// Bits of the lease word holding units; the 16 above them hold the epoch's low bits.
const UNIT_BITS: u32 = 48;
/// The most units a lease word holds (2⁴⁸ − 1, ≈ 2.8 × 10¹⁴). Leases are at most
/// [`MAX_LEASE`] and refunds kept in memory at most that too; only a single reservation this
/// large, handed back into memory, could reach it (see [`Meter::give_back`]).
pub(crate) const MAX_LEASED: u64 = (1 << UNIT_BITS) - 1;

/// The lease word's epoch tag for a full epoch.
fn tag(epoch: u32) -> u64 {
    u64::from(epoch as u16) << UNIT_BITS
}

/// The full epoch whose low 16 bits are `word`'s tag: the latest at or before `now` (the
/// epoch read after the word). Exact unless 65,536 epochs began between the two reads.
fn epoch_of(word: u64, now: u32) -> u32 {
    let behind = (now as u16).wrapping_sub((word >> UNIT_BITS) as u16);
    now.wrapping_sub(u32::from(behind))
}

/// One credit balance's in-memory side: 64 bytes, one cache line's worth, since every key
/// carries one inline (see `CachedKey`).
#[derive(Debug)]
pub(crate) struct Meter {
    /// Units leased into memory and not yet reserved (low 48 bits), and the low 16 bits of
    /// the epoch of the balance they came from.
    lease: AtomicU64,
    /// Units spent since the last flush (still `leased` on disk).
    pub spent: AtomicU64,
    /// Durable balance after the writer's last change (for grants' remaining credits);
    /// [`UNREAD`] until the writer (or, for a pool, the miss that made the meter) first read
    /// it: a key's own balance is not read on a cache miss, its first lease reads it.
    pub durable_balance: AtomicU64,
    /// CREDITS record id (key id or pool id).
    pub id: u64,
    /// Low-balance threshold and what the writer last saw (`None`: no events), out of line:
    /// few balances set one. Swapped whole when an admin changes the threshold.
    low_balance: ArcSwapOption<LowBalance>,
    /// Bumped by every `set` of the balance and every refill (writer thread only, through
    /// [`new_epoch`](Self::new_epoch)): reservations taken before are not refunded into the
    /// new balance. Only compared for equality between a reservation and its refund, so 32
    /// bits (wrapping after 2³² sets) are plenty.
    epoch: AtomicU32,
    /// Next lease size; adapts to about a second of traffic.
    pub lease_size: AtomicU32,
    /// When the last lease was granted, in tenths of a second (the clock's ms / 100, wrapping
    /// every 13.6 years; 0: never), to adapt the lease size.
    last_lease_ds: AtomicU32,
    /// When the next refill is due, in whole minutes ([`NEVER`]: no refill; see
    /// [`refill_at_ms`](Self::refill_at_ms)). From then on the lease belongs to an old period,
    /// so reservations go through the writer, which applies it. 0 in a new meter: nothing is
    /// known of the balance until the writer has read it.
    refill_at_min: AtomicU32,
    /// Until when (whole minutes; [`NEVER`]: for good) the durable balance is known to be
    /// empty: no refill is due before then and no top-up happened since. Lets an exhausted
    /// key fail fast without the writer.
    empty_until_min: AtomicU32,
    /// A lease request is queued or in flight.
    pub pending: AtomicBool,
    /// Queued for a spend flush (a pool's meter; a key's own is flushed with its usage).
    pub dirty: AtomicBool,
    /// [`RETIRED`], [`EXHAUSTION_REPORTED`] and [`UNREADABLE`] in the low bits; above them,
    /// how many times the balance grew, wrapping at 32 (see [`ONE_GROWTH`]).
    state: AtomicU8,
    /// What its events name: a key, a token or a pool.
    pub subject: crate::public_id::IdKind,
}

/// A balance's low-balance threshold, and the credits not yet spent when the writer last
/// looked (for edge-triggered events; see `writer::leasing::unspent`).
#[derive(Debug)]
pub(crate) struct LowBalance {
    threshold: u64,
    last_remaining: AtomicU64,
    /// `last_remaining` is a figure of the credits left (reservations counted as spent), set
    /// by a refusal made in memory that reported the fall: the writer measures on that figure
    /// too until it rises above the threshold or the two agree (no reservation held), or a
    /// reservation still held would read as a rise, and its commit as a second fall.
    on_left: AtomicBool,
}

/// One change the writer made to what the host has been told of a balance: undone with
/// [`Meter::untell`] if its batch fails (the batch's events are never sent, its changes never
/// happened). Each undoes only what the writer itself changed, not a mark a verify thread
/// set meanwhile.
pub(crate) enum Told {
    /// The writer marked the balance's exhaustion reported.
    Reported,
    /// The writer cleared that mark (the balance grew).
    Replenished,
    /// The writer recorded a new credits-left figure for low-balance edges; this was the
    /// figure before (in the threshold it was recorded in).
    Remaining(Arc<LowBalance>, u64),
}

/// [`Meter::durable_balance`] and [`LowBalance::last_remaining`] before the balance was
/// first read.
pub(crate) const UNREAD: u64 = u64::MAX;

/// `remaining` as [`LowBalance::last_remaining`] keeps it: a balance of exactly `u64::MAX`
/// ("unlimited") as one less, so it does not read as [`UNREAD`] and its fall to the
/// threshold is still an edge. Both are above any threshold that can be crossed.
fn known(remaining: u64) -> u64 {
    remaining.min(UNREAD - 1)
}

/// [`Meter::state`]'s bits above its flags count the balance's growths (wrapping at 32):
/// a refusal made in memory is reported only if none came since it found the balance
/// known empty (see [`Meter::first_refusal_under`]). A refusal's thread preempted across
/// exactly a multiple of 32 growths would report anyway (an early `Exhausted`, and the
/// real run-out silent): the meter's 64 bytes have no room for a wider count.
const ONE_GROWTH: u8 = 8;
/// A time in whole minutes that never comes (`u64::MAX` ms).
const NEVER: u32 = u32::MAX;
/// [`Meter::state`]: the balance is gone.
const RETIRED: u8 = 1;
/// [`Meter::state`]: a refusal since the balance last grew has been reported.
const EXHAUSTION_REPORTED: u8 = 2;
/// [`Meter::state`]: the balance's record does not decode (damaged): nothing can be charged
/// to it, so no request of its keys is granted, not even a peek.
const UNREADABLE: u8 = 4;

/// Milliseconds to whole minutes, rounded down, for the two times a meter keeps. Both are
/// period starts (midnight UTC) or 0 or `u64::MAX` ("never"), so nothing is lost; were one
/// not, rounding down makes it come early, the safe side for both (the writer is asked
/// sooner). Minutes, not seconds: 32 bits of seconds end in 2106, where a due time read as
/// never and no refill came (found by a reviewer); of minutes, in the year 10,136.
fn to_mins(ms: u64) -> u32 {
    match ms {
        u64::MAX => NEVER,
        ms => u32::try_from(ms / 60_000).unwrap_or(NEVER - 1),
    }
}

fn to_ms(mins: u32) -> u64 {
    match mins {
        NEVER => u64::MAX,
        m => u64::from(m) * 60_000,
    }
}

impl Meter {
    pub(crate) fn new(
        id: u64,
        threshold: Option<u64>,
        subject: crate::public_id::IdKind,
        exact: bool,
    ) -> Self {
        Meter {
            id,
            lease: AtomicU64::new(0),
            spent: AtomicU64::new(0),
            lease_size: AtomicU32::new(if exact { 1 } else { MIN_LEASE as u32 }),
            pending: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            empty_until_min: AtomicU32::new(0),
            last_lease_ds: AtomicU32::new(0),
            durable_balance: AtomicU64::new(UNREAD),
            refill_at_min: AtomicU32::new(0),
            epoch: AtomicU32::new(0),
            state: AtomicU8::new(0),
            low_balance: ArcSwapOption::new(threshold.map(|threshold| {
                Arc::new(LowBalance {
                    threshold,
                    last_remaining: AtomicU64::new(UNREAD),
                    on_left: AtomicBool::new(false),
                })
            })),
            subject,
        }
    }

    /// Records the figure low-balance edges are measured on (the writer's credits not yet
    /// spent, a refusal's credits left): whether it crossed the threshold downwards since the
    /// last time (never without a threshold), and the change made (`None`: no threshold).
    pub(crate) fn note_remaining(&self, remaining: u64) -> (bool, Option<Told>) {
        let Some(l) = self.low_balance.load_full() else {
            return (false, None);
        };
        let previous = l.last_remaining.swap(known(remaining), Ordering::AcqRel);
        // Unread: a threshold set while the writer was reading the balance for the first
        // time (between `sighted` and this). What was left before is unknown: no edge.
        let crossed = previous != UNREAD && previous > l.threshold && remaining <= l.threshold;
        (crossed, Some(Told::Remaining(l, previous)))
    }

    /// The figure the writer measures low-balance edges on: the credits not yet spent
    /// (`unspent`), or the credits `left` while a refusal in memory's report stands (see
    /// [`LowBalance::on_left`]).
    pub(crate) fn edge_figure(&self, unspent: u64, left: u64) -> u64 {
        let Some(l) = self.low_balance.load_full() else {
            return unspent;
        };
        if !l.on_left.load(Ordering::Acquire) {
            return unspent;
        }
        let figure = left.min(unspent);
        if figure > l.threshold || figure == unspent {
            l.on_left.store(false, Ordering::Release);
        }
        figure
    }

    /// The threshold in force now (`None`: none), for [`raise_if_replaced`](Self::raise_if_replaced).
    pub(crate) fn threshold_seen(&self) -> Option<Arc<LowBalance>> {
        self.low_balance.load_full()
    }

    /// A committed batch measured `figure` against `seen`, and the threshold has been
    /// replaced since (an admin change whose effects ran while the batch was in flight: its
    /// starting figure was read before the batch committed, and the batch's figures went to
    /// the old threshold, or nowhere): the new one learns the figure if it is higher. Else a
    /// rise in that batch (a top-up) was lost, and the fall after it never reported (found
    /// by a reviewer). Only raised, never lowered: a fall in the batch (a `set`) is then
    /// told by the next look.
    pub(crate) fn raise_if_replaced(&self, seen: &Option<Arc<LowBalance>>, figure: u64) {
        let Some(now) = self.low_balance.load_full() else {
            return;
        };
        if seen.as_ref().is_some_and(|seen| Arc::ptr_eq(seen, &now)) {
            return;
        }
        let figure = known(figure);
        let _ = now
            .last_remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                (last != UNREAD && last < figure).then_some(figure)
            });
    }

    /// A refusal in memory reported a fall measured on the credits left (verify thread).
    pub(crate) fn measured_on_left(&self) {
        if let Some(l) = self.low_balance.load_full() {
            l.on_left.store(true, Ordering::Release);
        }
    }

    /// The low-balance threshold, if any.
    pub(crate) fn low_balance_threshold(&self) -> Option<u64> {
        self.low_balance.load().as_ref().map(|l| l.threshold)
    }

    /// Credits left to spend as memory sees them: the durable balance after the writer's last
    /// change, plus the lease not yet reserved. `None` until the balance was first read.
    #[inline]
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.durable_balance.load(Ordering::Acquire) {
            UNREAD => None,
            balance => Some(balance + self.leased()),
        }
    }

    /// The writer reads the balance (writer thread): the first time, the credits left become
    /// what later low-balance edges are measured from, as if the meter had known them all
    /// along — a balance already below its threshold when its key was cached is no news.
    pub(crate) fn sighted(&self, remaining: u64) {
        if let Some(l) = self.low_balance.load_full() {
            let _ = l.last_remaining.compare_exchange(
                UNREAD,
                known(remaining),
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// Units leased into memory and not yet reserved.
    #[inline]
    pub(crate) fn leased(&self) -> u64 {
        self.lease.load(Ordering::Acquire) & MAX_LEASED
    }

    /// The balance's epoch: reservations carry it, and a refund goes back only into the
    /// balance of the same epoch.
    pub(crate) fn epoch(&self) -> u32 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Starts a new epoch (writer thread: a `set`, a refill) and takes the whole lease, which
    /// belongs to the old balance. Returns its units. From here on a refund of a reservation
    /// taken before fails its CAS, whenever it started.
    pub(crate) fn new_epoch(&self) -> u64 {
        // The epoch first: a reservation that sees the new tag in the word (Acquire, after
        // this Release) then reads the new epoch too, so `epoch_of` never reconstructs an
        // epoch from before the tag.
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        self.lease.swap(tag(epoch), Ordering::AcqRel) & MAX_LEASED
    }

    /// Undoes [`new_epoch`](Self::new_epoch) of a writer batch that failed (writer thread):
    /// the `set` or refill never happened, so reservations of `epoch` are refundable again.
    /// Called before the batch gives back the lease it took: the word holds no units (only
    /// the writer adds to a new epoch, after a commit).
    pub(crate) fn restore_epoch(&self, epoch: u32) {
        self.epoch.store(epoch, Ordering::Release);
        let _ = self
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                Some(tag(epoch) | (word & MAX_LEASED))
            });
    }

    /// Takes the whole lease without ending the epoch (the writer, returning it to the
    /// durable balance); returns its units.
    pub(crate) fn take_lease(&self) -> u64 {
        self.take_up_to(MAX_LEASED)
    }

    /// Whether the balance this meter spent from is gone.
    pub(crate) fn retired(&self) -> bool {
        self.state.load(Ordering::Acquire) & RETIRED != 0
    }

    /// The balance's record was found not to decode (see [`UNREADABLE`]).
    pub(crate) fn mark_unreadable(&self) {
        self.state.fetch_or(UNREADABLE, Ordering::AcqRel);
    }

    /// Whether the balance's record was found not to decode.
    pub(crate) fn unreadable(&self) -> bool {
        self.state.load(Ordering::Acquire) & UNREADABLE != 0
    }

    /// The balance is gone (key deleted or made unmetered, pool deleted): the writer ignores
    /// this meter from now on and refunds into it vanish. What its lease held went with the
    /// balance, and nothing reserves from memory any more: a grant that outlived the balance
    /// and commits beyond its reservation asks the writer, which charges no balance that is
    /// gone (found by a reviewer: it took its overage from the lease of a pool reported
    /// deleted with those units left).
    pub(crate) fn retire(&self) {
        self.state.fetch_or(RETIRED, Ordering::AcqRel);
        self.set_refill_at(0);
        self.take_lease();
    }

    /// A request was refused for want of credits: true for the first refusal since the
    /// balance last grew, which is the one an `Exhausted` event reports.
    pub(crate) fn first_refusal(&self) -> bool {
        self.state.fetch_or(EXHAUSTION_REPORTED, Ordering::AcqRel) & EXHAUSTION_REPORTED == 0
    }

    /// How many times the balance grew (wrapping; only compared for equality).
    pub(crate) fn growths(&self) -> u8 {
        self.state.load(Ordering::Acquire) & !(ONE_GROWTH - 1)
    }

    /// A request was refused in memory, the balance known empty when the growth count was
    /// `growths`: true if this is the first refusal since the balance last grew and no growth
    /// came since (one that did answered the refusal: reported after it, the refusal would
    /// tell of the old run-out again, or, once the new credits ran low and the balance was
    /// known empty again, of the new one early, silencing its real first refusal).
    pub(crate) fn first_refusal_under(&self, growths: u8) -> bool {
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                let same = s & !(ONE_GROWTH - 1) == growths;
                (same && s & EXHAUSTION_REPORTED == 0).then_some(s | EXHAUSTION_REPORTED)
            })
            .is_ok()
    }

    /// Whether a refusal since the balance last grew has been reported.
    pub(crate) fn exhaustion_reported(&self) -> bool {
        self.state.load(Ordering::Acquire) & EXHAUSTION_REPORTED != 0
    }

    /// Marks a refusal reported without one (a new meter for a balance whose earlier meter
    /// had reported it: see [`Registry`](super::registry::Registry)).
    pub(crate) fn mark_exhaustion_reported(&self) {
        self.state.fetch_or(EXHAUSTION_REPORTED, Ordering::AcqRel);
    }

    /// The writer made the balance grow (a top-up, a set, a refill), in a batch not yet
    /// committed: the balance is no longer known empty, and the next refusal is news again.
    /// `Some` when this cleared the mark.
    ///
    /// In that order: a request that reads the growth count, then finds the balance known
    /// empty, saw the count from before this growth, and its report (which checks that the
    /// count is unchanged, see [`first_refusal_under`](Self::first_refusal_under)) is not
    /// made after it. (Marking first and clearing the empty mark only when the batch
    /// published hid the next run-out's event: found by a reviewer of memory orderings.)
    pub(crate) fn grew(&self) -> Option<Told> {
        self.set_empty_until(0);
        self.replenished()
    }

    /// The balance is not known empty any more: the next refusal is news again. `Some` when
    /// this cleared the mark.
    pub(crate) fn replenished(&self) -> Option<Told> {
        // Counted in the same step: a refusal decided before it is not reported after it.
        let before = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                Some((s & !EXHAUSTION_REPORTED).wrapping_add(ONE_GROWTH))
            })
            .unwrap_or_else(|s| s);
        (before & EXHAUSTION_REPORTED != 0).then_some(Told::Replenished)
    }

    /// Undoes a change the writer made (see [`Told`]).
    pub(crate) fn untell(&self, told: Told) {
        match told {
            Told::Reported => {
                self.state.fetch_and(!EXHAUSTION_REPORTED, Ordering::AcqRel);
            }
            Told::Replenished => {
                self.state.fetch_or(EXHAUSTION_REPORTED, Ordering::AcqRel);
            }
            Told::Remaining(low_balance, previous) => {
                low_balance
                    .last_remaining
                    .store(previous, Ordering::Release);
            }
        }
    }

    /// A new low-balance threshold (`None`: no events), with the credits left now: the next
    /// event comes when they fall from above the threshold to or below it, as for a new
    /// meter, so a threshold set above what is left reports nothing until a top-up lifts the
    /// balance over it and spending brings it down again.
    pub(crate) fn set_low_balance(&self, threshold: Option<u64>, remaining: u64) {
        self.low_balance.store(threshold.map(|threshold| {
            Arc::new(LowBalance {
                threshold,
                last_remaining: AtomicU64::new(remaining),
                on_left: AtomicBool::new(false),
            })
        }));
    }

    /// When the next refill is due (ms; `u64::MAX`: no refill).
    #[inline]
    pub(crate) fn refill_at_ms(&self) -> u64 {
        to_ms(self.refill_at_min.load(Ordering::Acquire))
    }

    /// Sets when the next refill is due (ms; `u64::MAX`: no refill; 0: due now).
    pub(crate) fn set_refill_at(&self, ms: u64) {
        self.refill_at_min.store(to_mins(ms), Ordering::Release);
    }

    /// Whether the durable balance is known to be empty at `now_ms`.
    #[inline]
    pub(crate) fn empty_at(&self, now_ms: u64) -> bool {
        to_ms(self.empty_until_min.load(Ordering::Acquire)) > now_ms
    }

    /// Sets until when the durable balance is known to be empty (ms; 0: it is not).
    pub(crate) fn set_empty_until(&self, ms: u64) {
        self.empty_until_min.store(to_mins(ms), Ordering::Release);
    }

    /// Whether this meter is a shared pool's.
    pub(crate) fn is_pool(&self) -> bool {
        self.subject == crate::public_id::IdKind::Pool
    }

    /// Takes `units` from the lease if it holds that many. Returns the lease left and the
    /// epoch of the balance the units came from (for the reservation to carry).
    #[inline]
    pub(crate) fn try_take(&self, units: u64) -> Option<(u64, u32)> {
        let mut word = self.lease.load(Ordering::Acquire);
        loop {
            let left = (word & MAX_LEASED).checked_sub(units)?;
            // No borrow from the tag: `units` ≤ the units in the word.
            match self.lease.compare_exchange_weak(
                word,
                word - units,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some((left, epoch_of(word, self.epoch()))),
                Err(actual) => word = actual,
            }
        }
    }

    /// Takes up to `units` from the lease; returns how many it took.
    pub(crate) fn take_up_to(&self, units: u64) -> u64 {
        let mut taken = 0;
        let _ = self
            .lease
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                taken = (word & MAX_LEASED).min(units);
                Some(word - taken)
            });
        taken
    }

    /// Returns units reserved from the balance of `epoch` to the lease while it holds fewer
    /// than `cap`. Returns how many it kept (none if the meter was retired), or `None` if a
    /// new epoch began since: the `set` was final, the units are not this balance's. What it
    /// does not keep goes back to the durable balance through the writer, so that a crash
    /// never loses more than a full lease.
    pub(crate) fn give_back_up_to(&self, units: u64, cap: u64, epoch: u32) -> Option<u64> {
        if self.epoch() != epoch {
            return None;
        }
        if self.retired() {
            return Some(0);
        }
        let cap = cap.min(MAX_LEASED);
        let kept = |word: u64| {
            let held = word & MAX_LEASED;
            held.saturating_add(units).min(cap.max(held)) - held
        };
        let mut word = self.lease.load(Ordering::Acquire);
        loop {
            // The tag, not just the epoch read above: a new epoch that began in between
            // swapped the word, so this CAS fails and the next round sees it.
            if word & !MAX_LEASED != tag(epoch) {
                return None;
            }
            let k = kept(word);
            if k == 0 {
                return Some(0);
            }
            match self.lease.compare_exchange_weak(
                word,
                word + k,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(k),
                Err(actual) => word = actual,
            }
        }
    }

    /// Adds units the writer leased (or could not make durable) to the lease, in the current
    /// epoch: only the writer starts epochs, so what it adds is the current balance's.
    /// Nothing if the meter was retired. Saturates at [`MAX_LEASED`]: what does not fit
    /// stays `leased` on disk, returned by no close and counted as lost to a crash at the
    /// next open — never spendable twice (only a reservation near 2⁴⁸ units could get here).
    pub(crate) fn give_back(&self, units: u64) {
        if units > 0 && !self.retired() {
            let _ = self
                .lease
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                    let held = word & MAX_LEASED;
                    Some(word - held + held.saturating_add(units).min(MAX_LEASED))
                });
        }
    }

    /// Records units as spent. Returns true when the meter must be queued for a flush: a
    /// pool's, on its first spend since the writer last unlisted it. A key's own meter is
    /// never queued on its own: the writer flushes it with its key's usage, and whoever
    /// spends from it then counts the spend in that usage too, which lists the key
    /// ([`CachedKey::record_spend`](crate::cache::CachedKey::record_spend), after this).
    pub(crate) fn spend(&self, units: u64) -> bool {
        if units == 0 {
            return false;
        }
        // `SeqCst`: pairs with the writer's unlisting (see `unlist`, `CachedKey::unlist`).
        self.spent.fetch_add(units, Ordering::SeqCst);
        self.is_pool()
            && !self.dirty.load(Ordering::SeqCst)
            && !self.dirty.swap(true, Ordering::AcqRel)
    }

    /// The writer found the meter idle for a whole flush interval: clears its dirty mark and
    /// takes what was spent since (a spend racing this either saw the mark cleared and queued
    /// the meter itself, or is returned here). See `CachedKey::unlist`.
    pub(crate) fn unlist(&self) -> u64 {
        self.dirty.store(false, Ordering::SeqCst);
        self.spent.swap(0, Ordering::SeqCst)
    }

    /// Whether the lease may be spent at `now_ms`: no refill has come due since it was taken.
    #[inline]
    pub(crate) fn current(&self, now_ms: u64) -> bool {
        now_ms < self.refill_at_ms()
    }

    /// [`current`](Self::current), reading the clock only for a balance that refills.
    #[inline]
    pub(crate) fn current_lazily(&self, now_ms: impl FnOnce() -> u64) -> bool {
        match self.refill_at_ms() {
            u64::MAX => true,
            refill_at => now_ms() < refill_at,
        }
    }

    /// Whether a background top-up of the lease should start: it has fallen below half.
    ///
    /// Half, not a quarter: the top-up lands a gathering window and a commit later (up to
    /// ≈ 100 ms), and a small lease's last quarter (4 units of a 16-unit lease) can go in that
    /// time, leaving the request that finds it empty waiting for a commit of its own. At
    /// 100k keys that wait cost a quarter of the bench's wall time (docs/PERFORMANCE.md).
    /// In memory there are now at most 1.5 leases instead of 1.25; a crash can lose that.
    #[inline]
    pub(crate) fn wants_prefetch(&self, left: u64) -> bool {
        self.below_half(left)
            && !self.pending.load(Ordering::Relaxed)
            && !self.pending.swap(true, Ordering::AcqRel)
    }

    /// Whether a queued top-up is still wanted at `now_ms`: the lease is below half its size,
    /// or belongs to a period that has ended.
    pub(crate) fn wants_top_up(&self, now_ms: u64) -> bool {
        !self.current(now_ms) || self.below_half(self.leased())
    }

    /// Whether `left` units are under half the current lease size.
    #[inline]
    fn below_half(&self, left: u64) -> bool {
        left < u64::from(self.lease_size.load(Ordering::Relaxed)) / 2
    }

    /// Whether a lease was granted at or after `since_ms` — to a tenth of a second: one
    /// granted up to 100 ms before counts too, which keeps a meter listed one round longer.
    pub(crate) fn leased_since(&self, since_ms: u64) -> bool {
        match self.last_lease_ds.load(Ordering::Acquire) {
            0 => since_ms == 0,
            // Wrapping: right for any two times less than 6.8 years apart.
            last => last.wrapping_sub((since_ms / 100) as u32) < 1 << 31,
        }
    }

    /// Forgets when the last lease was granted (writer thread only): it came back unspent,
    /// so the next is sized as a first one, not doubled as if it had been used up.
    pub(crate) fn forget_last_lease(&self) {
        self.last_lease_ds.store(0, Ordering::Release);
    }

    /// Adapts the next lease size to the time the last one lasted (writer thread only), never
    /// below the writer's `floor` unless that is more than a quarter of `balance`. Only a
    /// busy key (its last lease used up within a second) leases more than a quarter of its
    /// balance: a size that the floor raised, or that traffic raised before it slowed down,
    /// does not put a small balance in memory whole, where a crash would lose it.
    pub(crate) fn adapt(&self, now_ms: u64, exact: bool, floor: u64, balance: u64) -> u64 {
        if exact {
            return 1;
        }
        // Never 0, which means "never leased".
        let now_ds = ((now_ms / 100) as u32).max(1);
        let last = self.last_lease_ds.swap(now_ds, Ordering::AcqRel);
        let size = u64::from(self.lease_size.load(Ordering::Acquire));
        let lasted = u64::from(now_ds.wrapping_sub(last)) * 100;
        // Busy: the last lease was used up within a second. One that memory still holds half
        // of was not — a request that raced a take-back (a top-up, a set) asks while the
        // fresh lease sits in memory — and doubling for it, take-back after take-back, put
        // the whole balance in memory (found by a reviewer, with three threads).
        let busy = last != 0 && lasted < 1_000 && self.leased() < size / 2;
        let quarter = (balance / 4).max(MIN_LEASE);
        let next = if last == 0 {
            size
        } else if busy {
            size * 2
        } else if lasted > 4_000 {
            size / 2
        } else {
            size
        }
        .clamp(floor.min(quarter).max(MIN_LEASE), MAX_LEASE);
        let next = if busy { next } else { next.min(quarter) };
        // MAX_LEASE fits in 32 bits.
        self.lease_size.store(next as u32, Ordering::Release);
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_meter_is_64_bytes() {
        // Every cached key carries one inline: its size is most of the per-key budget.
        assert_eq!(size_of::<Meter>(), 64);
    }

    /// The writer's first read of a balance (`sighted`) and its edge check are two steps: a
    /// threshold set between them starts from an unknown figure, which is no edge. (Found by
    /// a reviewer: a balance below the new threshold all along was reported crossing it.)
    #[test]
    fn a_threshold_set_between_the_first_read_and_its_edge_check_is_no_news() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        m.sighted(30); // writer: no threshold yet, nothing to start from
        m.set_low_balance(Some(50), m.remaining().unwrap_or(UNREAD)); // admin: still unread
        assert!(!m.note_remaining(30).0, "30 left was below 50 all along");
        assert!(!m.note_remaining(20).0, "and still is");
        assert!(!m.note_remaining(60).0, "a top-up");
        assert!(m.note_remaining(40).0, "an edge once seen above");
    }

    #[test]
    fn refill_and_empty_times_are_kept_to_the_minute_rounded_early() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        assert_eq!(m.remaining(), None, "a new meter has not read its balance");
        assert!(
            !m.current(0),
            "so its lease is of no period until the writer reads it"
        );
        m.set_refill_at(u64::MAX);
        assert_eq!(m.refill_at_ms(), u64::MAX, "no refill");
        assert!(m.current(u64::MAX - 1));
        let midnight = 20_000 * 86_400_000;
        m.set_refill_at(midnight);
        assert_eq!(m.refill_at_ms(), midnight, "a period start is exact");
        assert!(m.current(midnight - 1) && !m.current(midnight));
        m.set_refill_at(midnight + 61_999);
        assert_eq!(
            m.refill_at_ms(),
            midnight + 60_000,
            "rounded down: due early"
        );
        m.set_refill_at(0);
        assert!(!m.current(0), "due now");
        let year_2200 = 7_258_118_400_000;
        m.set_refill_at(year_2200);
        assert_eq!(m.refill_at_ms(), year_2200, "past 2106 too");

        assert!(!m.empty_at(0), "not known empty");
        m.set_empty_until(midnight);
        assert!(m.empty_at(midnight - 1) && !m.empty_at(midnight));
        m.set_empty_until(u64::MAX);
        assert!(m.empty_at(u64::MAX - 1), "empty for good without a refill");
        m.set_empty_until(0);
        assert!(!m.empty_at(0));
    }

    /// A time past what 32 bits of minutes hold (the year 10,136) is kept as the latest they
    /// do: it comes early, never "never" — a refill then still comes, and a balance known
    /// empty until then is asked about again.
    #[test]
    fn a_time_beyond_what_minutes_hold_comes_early_not_never() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        let far = u64::MAX - 1;
        m.set_refill_at(far);
        let due = m.refill_at_ms();
        assert!(due < far, "rounded down: due early, at {due}");
        assert!(m.current(due - 1) && !m.current(due), "and it does come");
        m.set_empty_until(far);
        assert!(
            m.empty_at(due - 1) && !m.empty_at(due),
            "known empty until then only"
        );
    }

    #[test]
    fn a_low_balance_is_reported_once_on_the_way_down() {
        let m = Meter::new(1, Some(10), crate::public_id::IdKind::Key, false);
        let crossed = |m: &Meter, remaining| m.note_remaining(remaining).0;
        assert!(!crossed(&m, 50));
        assert!(crossed(&m, 10), "reached the threshold");
        assert!(!crossed(&m, 5), "still below: no second event");
        assert!(!crossed(&m, 100), "a top-up");
        assert!(crossed(&m, 9), "crossed again after the top-up");
        let none = Meter::new(2, None, crate::public_id::IdKind::Key, false);
        assert!(!crossed(&none, 50) && !crossed(&none, 0), "no threshold");
        assert!(none.note_remaining(0).1.is_none(), "nothing to undo");
    }

    /// A refusal in memory reported a fall measured on the credits left (reservations held
    /// count as spent). The writer measures on that figure too while its report stands —
    /// else a reservation still held reads as a rise and its commit as a second fall — and
    /// stops once the figures agree (nothing held) or the credits left rise above the
    /// threshold: from then on a fall is news again.
    #[test]
    fn a_fall_reported_on_the_credits_left_stands_until_nothing_is_held_or_they_rise() {
        let m = Meter::new(1, Some(10), crate::public_id::IdKind::Key, false);
        m.sighted(50);
        // A verify thread: 5 credits left, 3 more held reserved by grants.
        assert!(m.note_remaining(5).0, "the fall, reported by the refusal");
        m.measured_on_left();
        let writer = |m: &Meter, unspent, left| {
            let figure = m.edge_figure(unspent, left);
            (figure, m.note_remaining(figure).0)
        };
        assert_eq!(writer(&m, 8, 5), (5, false), "measured on what is left");
        assert_eq!(writer(&m, 8, 5), (5, false), "and still, while 3 are held");
        assert_eq!(
            writer(&m, 12, 10),
            (10, false),
            "at the threshold: still held"
        );
        assert_eq!(writer(&m, 12, 10), (10, false));
        assert_eq!(
            writer(&m, 5, 5),
            (5, false),
            "the grants committed: nothing held"
        );
        assert_eq!(
            writer(&m, 8, 5),
            (8, false),
            "on the credits not yet spent again"
        );

        m.measured_on_left();
        assert_eq!(
            writer(&m, 60, 55),
            (55, false),
            "a top-up: above the threshold"
        );
        assert_eq!(writer(&m, 60, 55), (60, false), "not yet spent again");
        assert_eq!(writer(&m, 9, 9), (9, true), "and the next fall is news");
    }

    /// A batch in flight while an admin replaced the threshold measured its figures against
    /// the old one. The new threshold learns the batch's figure if it is higher (a top-up,
    /// whose fall afterwards is news), never if it is lower (a fall in the batch, which the
    /// next look must still see as one).
    #[test]
    fn a_replaced_threshold_learns_a_batchs_rise_but_not_its_fall() {
        let m = Meter::new(1, Some(10), crate::public_id::IdKind::Key, false);
        m.sighted(100);
        let seen = m.threshold_seen(); // the batch starts
        m.set_low_balance(Some(50), 60); // the admin's change: 60 left as it read them
        m.raise_if_replaced(&seen, 30); // the batch committed a fall to 30
        assert!(m.note_remaining(30).0, "the next look tells the fall");

        let seen = m.threshold_seen();
        m.set_low_balance(Some(50), 40); // read before a top-up in the batch
        m.raise_if_replaced(&seen, 120);
        assert!(m.note_remaining(45).0, "the fall after the top-up is news");

        // The threshold kept: the batch's figure is no news to it. A refusal in memory
        // reported a fall after the batch measured 120; the fall is not told again.
        let seen = m.threshold_seen();
        assert!(!m.note_remaining(120).0, "the batch");
        assert!(
            m.note_remaining(5).0,
            "a refusal in memory reports the fall"
        );
        m.raise_if_replaced(&seen, 120); // the batch commits
        assert!(!m.note_remaining(5).0, "reported once");
    }

    #[test]
    fn a_fall_from_an_unlimited_balance_is_an_edge() {
        let m = Meter::new(1, Some(10), crate::public_id::IdKind::Key, false);
        m.sighted(u64::MAX);
        assert!(m.note_remaining(5).0, "first read at u64::MAX, then below");
        assert!(m.note_remaining(u64::MAX).1.is_some());
        assert!(m.note_remaining(0).0, "seen at u64::MAX, then below");
    }

    /// A failed batch undoes what the writer told, and only that: a mark set by someone else
    /// meanwhile stays.
    #[test]
    fn untelling_undoes_only_the_writers_own_change() {
        let m = Meter::new(1, Some(10), crate::public_id::IdKind::Key, false);
        let (_, told) = m.note_remaining(50);
        let (crossed, down) = m.note_remaining(5);
        assert!(crossed);
        m.untell(down.unwrap());
        assert!(m.note_remaining(5).0, "the edge is there again");
        m.untell(told.unwrap()); // and the figure before that
        assert!(m.replenished().is_none(), "nothing was reported");
        assert!(m.first_refusal());
        let cleared = m.replenished().expect("it cleared the mark");
        m.untell(cleared);
        assert!(!m.first_refusal(), "the mark is back");
    }

    /// The growth count lives above the flags: counting never touches them, it wraps at 32
    /// with them kept, and a refusal is marked reported only under the count it was
    /// decided under.
    #[test]
    fn growths_are_counted_above_the_flags_and_gate_a_refusals_report() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        m.mark_unreadable();
        m.retire();
        let start = m.growths();
        for _ in 0..31 {
            m.replenished();
        }
        assert!(
            m.unreadable() && m.retired(),
            "flags kept across 31 growths"
        );
        assert_ne!(m.growths(), start);
        m.replenished();
        assert_eq!(m.growths(), start, "the 32nd wraps");
        assert!(m.unreadable() && m.retired() && !m.exhaustion_reported());
        let stale = m.growths();
        m.replenished();
        assert!(!m.first_refusal_under(stale), "a growth came since");
        assert!(!m.exhaustion_reported());
        assert!(m.first_refusal_under(m.growths()));
        assert!(m.exhaustion_reported() && m.unreadable() && m.retired());
        assert!(!m.first_refusal_under(m.growths()), "reported once");
    }

    #[test]
    fn take_never_goes_below_zero_under_contention() {
        // Started together and long enough to overlap: without the barrier the threads ran
        // mostly one after another, and a take by load and store passed 83 times in 100.
        const UNITS: usize = 400_000;
        let meter = Arc::new(Meter::new(1, None, crate::public_id::IdKind::Key, false));
        meter.give_back(UNITS as u64);
        let start = Arc::new(std::sync::Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (m, start) = (meter.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    (0..UNITS / 2).filter(|_| m.try_take(1).is_some()).count()
                })
            })
            .collect();
        let taken: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(taken, UNITS);
        assert_eq!(meter.leased(), 0);
    }

    #[test]
    fn a_refund_goes_back_only_into_the_epoch_it_was_reserved_from() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        m.give_back(10);
        let (left, epoch) = m.try_take(4).unwrap();
        assert_eq!((left, epoch), (6, 0));
        assert_eq!(m.give_back_up_to(4, MAX_LEASE, epoch), Some(4));
        assert_eq!(m.leased(), 10);
        let (_, epoch) = m.try_take(4).unwrap();
        assert_eq!(m.new_epoch(), 6, "a set takes the old balance's lease");
        m.give_back(16); // the new balance's first lease
        assert_eq!(m.try_take(1).unwrap(), (15, 1));
        assert_eq!(
            m.give_back_up_to(4, MAX_LEASE, epoch),
            None,
            "reserved before the set: final"
        );
        assert_eq!(m.leased(), 15);
        assert_eq!(m.give_back_up_to(1, 15, 1), Some(0), "the lease is full");
        assert_eq!(m.give_back_up_to(3, 17, 1), Some(2), "kept up to the cap");
    }

    #[test]
    fn a_reservation_carries_the_full_epoch_its_units_came_from() {
        // The tag keeps 16 bits; the rest comes from the epoch read after the take.
        assert_eq!(epoch_of(tag(7), 7), 7);
        assert_eq!(
            epoch_of(tag(7), 8),
            7,
            "a set came between the take and the read"
        );
        assert_eq!(
            epoch_of(tag(0xFFFF), 0x1_0001),
            0xFFFF,
            "across the tag's wrap"
        );
        assert_eq!(
            epoch_of(tag(u32::MAX), 0),
            u32::MAX,
            "across the epoch's wrap"
        );
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        for _ in 0..70_000 {
            m.new_epoch();
        }
        m.give_back(3);
        assert_eq!(m.try_take(3), Some((0, 70_000)));
        assert_eq!(
            m.give_back_up_to(3, 3, 70_000 - 65_536),
            None,
            "same tag, old epoch"
        );
    }

    /// A retired meter's balance is gone: what it held went with it, and nothing given back
    /// afterwards (a lease landing late, a refund) can be reserved from it.
    #[test]
    fn a_retired_meter_takes_nothing_back() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        m.give_back(10);
        let (_, epoch) = m.try_take(4).unwrap();
        m.retire();
        assert_eq!(m.leased(), 0, "the lease went with the balance");
        m.give_back(16);
        assert_eq!(m.give_back_up_to(4, MAX_LEASE, epoch), Some(0));
        assert_eq!((m.leased(), m.try_take(1)), (0, None));
    }

    #[test]
    fn a_lease_saturates_instead_of_spilling_into_the_epoch() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        m.new_epoch();
        m.give_back(MAX_LEASED - 1);
        m.give_back(5);
        assert_eq!((m.leased(), m.epoch()), (MAX_LEASED, 1));
        assert_eq!(m.try_take(u64::MAX), None);
        assert_eq!(m.take_up_to(u64::MAX), MAX_LEASED);
        assert_eq!((m.leased(), m.epoch()), (0, 1));
    }

    /// A balance too large to cap any lease size.
    const BIG: u64 = u64::MAX;

    /// A lease taken back unspent (a top-up, a set, an eviction: `forget_last_lease`) is no
    /// sign of a busy key: the next lease has the size of the last, not twice it, however
    /// soon it comes (doubled at each take-back, a key topped up between requests would
    /// soon hold its balance in memory, where a crash loses it).
    #[test]
    fn a_lease_taken_back_unspent_does_not_double_the_next() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        assert_eq!(m.adapt(10_000, false, MIN_LEASE, BIG), 16);
        m.forget_last_lease();
        assert_eq!(m.adapt(10_500, false, MIN_LEASE, BIG), 16);
    }

    /// Busy means the last lease was used up within a second: one that lasted a whole
    /// second keeps its size, and so does one that memory still holds half of (a request
    /// that raced a take-back); less than half held, used up within a second, doubles. One
    /// that lasted four seconds keeps its size too; only a longer one halves.
    #[test]
    fn a_lease_that_lasted_a_second_or_is_half_held_keeps_its_size() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        let adapt = |now_ms| m.adapt(now_ms, false, MIN_LEASE, BIG);
        assert_eq!(adapt(10_000), 16);
        assert_eq!(adapt(11_000), 16, "lasted a second");
        m.give_back(8);
        assert_eq!(adapt(11_500), 16, "half of it held");
        assert_eq!(m.take_up_to(1), 1);
        assert_eq!(adapt(11_600), 32, "less than half: busy");
        assert_eq!(adapt(15_600), 32, "four seconds: kept");
        assert_eq!(adapt(19_700), 16, "more: halved");
    }

    #[test]
    fn lease_size_adapts_to_traffic() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        assert_eq!(
            m.adapt(10_000, false, MIN_LEASE, BIG),
            16,
            "the first lease has the initial size"
        );
        assert_eq!(
            m.adapt(10_500, false, MIN_LEASE, BIG),
            32,
            "leases lasting < 1 s double"
        );
        assert_eq!(m.adapt(11_000, false, MIN_LEASE, BIG), 64);
        assert_eq!(
            m.adapt(20_000, false, MIN_LEASE, BIG),
            32,
            "leases lasting > 4 s halve"
        );
        assert_eq!(m.adapt(30_000, false, MIN_LEASE, BIG), 16);
        assert_eq!(
            m.adapt(40_000, false, MIN_LEASE, BIG),
            16,
            "down to the minimum"
        );
        assert_eq!(
            m.adapt(50_000, false, 64, BIG),
            64,
            "or to the writer's floor while it is behind"
        );
        assert_eq!(
            m.adapt(50_001, true, 64, BIG),
            1,
            "exact mode leases one unit"
        );
    }

    #[test]
    fn a_lease_counts_as_recent_from_a_tenth_of_a_second_before_it_even_across_the_wrap() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        assert!(!m.leased_since(1), "never leased");
        m.adapt(10_050, false, MIN_LEASE, BIG);
        assert!(m.leased_since(9_000));
        assert!(m.leased_since(10_099), "the same tenth of a second");
        assert!(!m.leased_since(10_100));
        // Tenths of a second wrap at 2³²: a lease just after the wrap is still recent.
        let wrap_ms = (1u64 << 32) * 100;
        m.adapt(wrap_ms + 300, false, MIN_LEASE, BIG);
        assert!(m.leased_since(wrap_ms - 500));
        assert!(!m.leased_since(wrap_ms + 400));
        assert_eq!(
            m.adapt(wrap_ms + 800, false, MIN_LEASE, BIG),
            32,
            "half a second across the wrap is still a busy key's lease"
        );
    }

    #[test]
    fn the_writers_floor_takes_at_most_a_quarter_of_a_balance() {
        let first = |floor, balance| {
            Meter::new(1, None, crate::public_id::IdKind::Key, false)
                .adapt(10_000, false, floor, balance)
        };
        assert_eq!(first(256, 1_000_000), 256);
        assert_eq!(first(256, 400), 100, "a quarter of 400");
        assert_eq!(first(256, 40), MIN_LEASE, "never below the minimum");
        assert_eq!(first(MIN_LEASE, 1_000_000), MIN_LEASE, "not behind");
        let busy = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        busy.adapt(10_000, false, MIN_LEASE, 400);
        assert_eq!(
            busy.adapt(10_500, false, 256, 400),
            100,
            "a busy key's floor too"
        );
    }

    #[test]
    fn only_a_busy_key_leases_more_than_a_quarter_of_its_balance() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        // (now, floor, balance, lease size, why), in order: each adapts to the one before.
        let steps = [
            (10_000, 256, 400, 100, "the floor: a quarter"),
            (12_000, 16, 400, 100, "a slow key: a quarter"),
            (12_500, 16, 400, 200, "busy: it doubles"),
            (
                14_000,
                16,
                100,
                25,
                "traffic slowed, the balance fell: a quarter",
            ),
            (16_000, 16, 40, 16, "never below the minimum"),
        ];
        for (now, floor, balance, size, why) in steps {
            assert_eq!(m.adapt(now, false, floor, balance), size, "{why}");
        }
    }

    #[test]
    fn a_queued_top_up_is_still_wanted_only_below_half_or_after_a_refill_came_due() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        m.set_refill_at(u64::MAX); // read: no refill
        assert!(m.wants_top_up(0), "an empty lease");
        m.give_back(8);
        assert!(
            !m.wants_top_up(0),
            "half of a 16-unit lease: leased for meanwhile"
        );
        m.set_refill_at(60_000);
        assert!(!m.wants_top_up(59_999));
        assert!(
            m.wants_top_up(60_000),
            "the lease belongs to a period that has ended"
        );
    }

    #[test]
    fn a_top_up_is_asked_for_once_when_the_lease_falls_below_half() {
        let m = Meter::new(1, None, crate::public_id::IdKind::Key, false);
        assert!(!m.wants_prefetch(8), "16-unit lease, 8 left: not yet");
        assert!(m.wants_prefetch(7), "below half");
        assert!(!m.wants_prefetch(6), "already asked for");
        m.pending.store(false, Ordering::Release); // the writer leased
        assert!(m.wants_prefetch(0));
    }
}
