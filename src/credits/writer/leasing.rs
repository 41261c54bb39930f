//! What a batch does to one balance: leases, returns, reclaims, new periods, and the
//! low-balance and exhaustion events they raise.

use std::sync::atomic::Ordering;

use crate::cache::MeterRef;
use crate::clock::Timestamp;
use crate::credits::events::CreditEventKind;
use crate::credits::meter::{MAX_LEASED, Meter, Told};
use crate::credits::refill;
use crate::error::Result;
use crate::public_id::IdKind;
use crate::record::{CreditsRecord, KeyRecord, PoolRecord};
use crate::store::tables::{KEYS, POOLS};

use super::Shared;
use super::batch::Working;
use super::effects::Effects;

/// The durable record behind a meter, unless the meter was retired.
pub(super) fn live<'w>(
    work: &'w mut Working<'_>,
    meter: &Meter,
) -> Result<Option<&'w mut CreditsRecord>> {
    if meter.retired() {
        return Ok(None);
    }
    // What the meter learns first, then the record again (kept by `work`: no second read),
    // since a borrow returned on one branch could not be let go on the other.
    match work.get(meter.id)?.map(|r| unspent(r, meter)) {
        Some(unspent) => meter.sighted(unspent),
        None if work.unreadable.contains_key(&meter.id) => meter.mark_unreadable(),
        None => {}
    }
    work.get(meter.id)
}

/// Returns `units` reserved under `epoch` to `meter`'s balance, or, if that epoch has ended
/// (a `set` or a refill earlier, in batch order), drops them from the books with it.
pub(super) fn return_units(
    shared: &Shared,
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
            // Reserved before a `set` or refill, counted as not spent until now: leaving the
            // books, they may take what is not spent to the threshold.
            let left = r.balance + meter.leased();
            low_balance(shared, fx, &meter, unspent(r, &meter), left);
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
pub(super) fn refused(shared: &Shared, work: &Working<'_>, fx: &mut Effects, at: usize) {
    let meter = fx.leases[at].0.clone();
    let balance = match work.records.get(&meter.id) {
        Some(Some(r)) => r.balance,
        _ => 0,
    };
    let remaining = balance.saturating_add(fx.in_memory(&meter));
    let not_spent = match work.records.get(&meter.id) {
        Some(Some(r)) => unspent(r, &meter),
        _ => remaining,
    };
    // Spend in memory may have crossed the threshold since the writer last looked: "low"
    // comes before "exhausted".
    low_balance(shared, fx, &meter, not_spent, remaining);
    exhausted(shared, fx, &meter, remaining);
}

/// A refusal for want of credits, with `remaining` left: reported if it is the first since
/// the balance last grew (and unmarked again if the batch fails, its event unsent).
pub(super) fn exhausted(shared: &Shared, fx: &mut Effects, meter: &MeterRef, remaining: u64) {
    if meter.first_refusal() {
        fx.tell(meter, Some(Told::Reported));
        let event = shared.event(CreditEventKind::Exhausted, meter, remaining);
        fx.events.push(event);
    }
}

/// Credits of `r` not yet spent: the durable balance, the lease in memory and what grants
/// still hold reserved (`leased` on disk, less what memory counted spent since the last
/// write). Low-balance edges are measured on this figure, not on the credits left: a
/// reservation is no fall and its refund no rise (measured on the credits left, requests
/// holding reservations near the threshold and refunding them reported one fall again and
/// again: found by a reviewer).
pub(super) fn unspent(r: &CreditsRecord, meter: &Meter) -> u64 {
    r.balance
        .saturating_add(r.leased)
        .saturating_sub(meter.spent.load(Ordering::Acquire))
}

/// Emits a low-balance event when the credits not yet spent (`unspent`) cross the meter's
/// threshold downwards; the event names the credits left (`remaining`, at most that).
pub(super) fn low_balance(
    shared: &Shared,
    fx: &mut Effects,
    meter: &MeterRef,
    unspent: u64,
    remaining: u64,
) {
    let seen = meter.threshold_seen();
    let unspent = meter.edge_figure(unspent, remaining);
    fx.figures.push((meter.clone(), seen, unspent));
    let (crossed, told) = meter.note_remaining(unspent);
    fx.tell(meter, told);
    if crossed {
        let left = remaining.min(unspent);
        let event = shared.event(CreditEventKind::LowBalance, meter, left);
        fx.events.push(event);
    }
}

/// Gives `meter`'s lease back to its balance and flushes its spend; returns the units still
/// leased after that (what grants still held have reserved), or `None` if there was nothing
/// to move (then nothing was read or written: a key leaving the cache unused since its last
/// lease costs the writer no read, and its batch maybe no commit). Spend settled here may
/// have crossed the low-balance threshold: told now, as by any other settling (the meter may
/// be leaving: a key evicted, the ledger closing; its next meter takes the figure as known).
pub(super) fn reclaim(
    shared: &Shared,
    work: &mut Working<'_>,
    fx: &mut Effects,
    meter: &MeterRef,
) -> Result<Option<u64>> {
    // Leases granted earlier in this batch reach memory only after the commit: take them
    // back here too, or they would land on top of what this batch decides.
    let pending = cancel_pending_leases(fx, meter);
    // The lease goes back to the balance now, but the meter learns the balance is not empty
    // only after the commit: until then a request finding the lease gone would take the old
    // mark for the truth and refuse with credits left. Cleared first, so that a request that
    // sees the lease gone sees the mark gone too (and asks the writer, which knows) — but
    // only if something goes back: a balance that stays empty keeps its mark (found by a
    // reviewer: a key evicted with nothing leased lost it, and a refusal racing the eviction
    // took that for a top-up and reported the same run-out twice). With nothing leased the
    // lease is not taken either: a refund landing after the look stays in memory, spendable
    // there (taken, it would have left the lease gone under a mark still set: found by the
    // next reviewer). Every caller handles a lease left in memory, as it handles one a grant
    // refunds after the batch.
    let returning = pending > 0 || meter.leased() > 0;
    #[cfg(test)]
    if let Some(pause) = shared.after_reclaim_look.lock().take() {
        pause();
    }
    let lease = if returning {
        meter.set_empty_until(0);
        meter.take_lease()
    } else {
        0
    };
    if lease > 0 {
        // Taken back unspent (a top-up, a set, the key leaving the cache): no sign of a busy
        // key, whose next lease doubles (found by a reviewer: each take-back doubled it, so
        // a key topped up between requests soon held its balance in memory, lost in a crash).
        meter.forget_last_lease();
    }
    let spent = meter.spent.swap(0, Ordering::AcqRel);
    if pending == 0 && lease == 0 && spent == 0 {
        return Ok(None);
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
        low_balance(shared, fx, meter, unspent(r, meter), r.balance);
        return Ok(Some(r.leased));
    }
    Ok(Some(0))
}

/// Zeroes the leases granted to `meter` earlier in this batch; returns how many units.
/// Those are all of one meter, the balance's live one: a retired meter (a grant that
/// outlived its key's balance, committing through it) shares its id but had none, and must
/// not cancel its successor's (found by a reviewer: the units stayed leased on disk with no
/// meter holding them, lost at the next open).
pub(super) fn cancel_pending_leases(fx: &mut Effects, meter: &Meter) -> u64 {
    let granted = fx.granted_at.get(&meter.id).and_then(|at| at.first());
    let mine = granted.is_none_or(|&i| std::ptr::eq(&*fx.leases[i].0, meter));
    if meter.retired() || !mine {
        return 0;
    }
    // What those leases hand to requests waiting for them stays theirs: reserved before this
    // change, as units a request takes from memory are (a `set` makes them final, with their
    // epoch). Cancelled too, each such request was answered with nothing and asked again —
    // and with a change in every batch (a top-up a millisecond, a slow disk) it was refused
    // as unavailable after 64 tries (found looking into a concurrency test of top-ups that
    // hung once in CI; whether this was its cause is not known).
    //
    // The leases' units are kept as one sum, in batch order: a request whose own lease came
    // short (the balance ran low) was counted as covered by what an earlier lease of the
    // batch would leave in memory, and later requests were judged, maybe refused, on that.
    // Kept lease by lease, the shortfall went back to the balance with the rest, and the
    // request, handed too few units of an epoch the change had ended, was refused in turn
    // (found by a reviewer: 41 credits, 8 spent, then 27 and 7 both refused).
    let granted_at = fx.granted_at.remove(&meter.id).unwrap_or_default();
    let total: u64 = granted_at.iter().map(|&i| fx.leases[i].1).sum();
    let mut cancelled = total;
    for i in granted_at {
        let waiting = fx.handoffs.iter().filter(|h| h.0 == i);
        let needed = waiting.fold(0u64, |n, h| n.saturating_add(h.1.unwrap_or(0)));
        let kept = needed.min(cancelled);
        cancelled -= kept;
        fx.leases[i].1 = kept;
    }
    // What is kept is no longer counted as leased by the batch (`granted_at`), so no longer
    // subtracted from it as handed either: else what memory will hold was undercounted, and
    // a later request in the batch was refused with credits left (found by a reviewer).
    if let Some(handed) = fx.handed.get_mut(&meter.id) {
        *handed = handed.saturating_sub(total - cancelled);
    }
    if cancelled > 0 {
        // Back unspent, as a lease `reclaim` takes back: the next is not doubled for it.
        meter.forget_last_lease();
    }
    cancelled
}

/// Moves up to the adaptive lease size (at least `need`) from `balance` to `leased`. Returns
/// the lease's index in `fx.leases`, and whether the balance and the lease in memory together
/// cover `need` (if not, nothing is leased).
pub(super) fn lease(
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
    low_balance(shared, fx, &meter, unspent(r, &meter), remaining);
    let empty_until = empty_until(r, now);
    Ok((fx.grant(meter, grant, empty_until), true))
}

/// Applies a due refill: the new period's balance replaces everything, including the lease
/// memory still holds from the old period. A fall to the low-balance threshold in the old
/// period is told first, with the old period's figure; the new balance is a fall of its own
/// if it is at or below the threshold.
pub(super) fn new_period(
    shared: &Shared,
    fx: &mut Effects,
    meter: &MeterRef,
    r: &mut CreditsRecord,
    now: Timestamp,
) {
    let old_period = r.balance + meter.leased();
    let old_unspent = unspent(r, meter);
    if refill::apply_due(r, now) {
        low_balance(shared, fx, meter, old_unspent, old_period);
        let pending = cancel_pending_leases(fx, meter).min(r.leased);
        r.leased -= pending;
        r.granted = r.granted.saturating_sub(pending);
        // Like a `set`: a reservation from the old period is final, its refund must not
        // land in the new one.
        end_epoch(fx, meter, r);
        // As for a set: a refill to any figure above zero makes the next refusal news, even
        // one below what a refused request saw (found by a reviewer: its credits ran out
        // silently); a refill of nothing into a run-out balance is not news (it reported the
        // same run-out once a period).
        if r.balance > 0 {
            fx.tell(meter, meter.grew());
        }
        low_balance(shared, fx, meter, unspent(r, meter), r.balance);
    }
    set_refill_at(shared, meter, refill::due_at(r, now));
}

/// The low-balance threshold of balance `id`, if it has one, and what its events name: from
/// its key's or pool's record (ids are never shared between the two). A record that cannot
/// be read has none here: `check` names it, and the change goes on.
pub(super) fn threshold_of(txn: &redb::WriteTransaction, id: u64) -> Option<(u64, IdKind)> {
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
pub(super) fn set_refill_at(shared: &Shared, meter: &Meter, due: u64) {
    let stopped = shared.closing.load(Ordering::Acquire) || meter.retired();
    meter.set_refill_at(if stopped { 0 } else { due });
}

/// Starts a new epoch of `meter`'s balance (a set, a refill): the lease memory holds
/// belongs to the old balance and leaves the books with it.
pub(super) fn end_epoch(fx: &mut Effects, meter: &MeterRef, r: &mut CreditsRecord) {
    fx.ended
        .push((meter.clone(), meter.epoch(), meter.refill_at_ms()));
    let swapped = meter.new_epoch();
    let back = swapped.min(r.leased);
    r.leased -= back;
    r.granted = r.granted.saturating_sub(back);
    fx.reclaimed.push((meter.clone(), swapped));
}

/// Until when a balance is known to stay empty: the next refill, or for ever.
pub(super) fn empty_until(r: &CreditsRecord, now: Timestamp) -> u64 {
    match (r.balance, r.refill) {
        (0, Some(refill)) => refill::next_period(refill.interval, now).0,
        (0, None) => u64::MAX,
        _ => 0,
    }
}
