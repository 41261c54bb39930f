//! One batch as one write transaction: each message applied to the records it touches
//! (`build`), what it changes in memory kept aside in [`Effects`] until the commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use crossbeam::channel::Sender;
use redb::ReadableTable;

use crate::cache::MeterRef;
use crate::clock::Timestamp;
use crate::codec;
use crate::credits::events::CreditEventKind;
use crate::credits::refill;
use crate::error::{CodecError, Error, Result};
use crate::record::CreditsRecord;
use crate::store::tables::CREDITS;

use super::effects::Effects;
use super::flush::{flush_spend, flush_usage, settle_spend};
use super::leasing::{
    cancel_pending_leases, empty_until, end_epoch, exhausted, lease, live, low_balance, new_period,
    reclaim, refused, return_units, set_refill_at, threshold_of, unspent,
};
use super::lists::Listed;
use super::{Adjust, AuditLine, Handoff, Msg, Shared};

/// Records touched by one batch, loaded once and written once.
pub(super) struct Working<'t> {
    pub(super) table: redb::Table<'t, u64, &'static [u8]>,
    pub(super) records: BTreeMap<u64, Option<CreditsRecord>>,
    /// Records that did not decode, and why. They read as no record and are never written:
    /// left as they are, for `check` to name. Failing the batch instead would hold back every
    /// other message in it, and writing over one would lose what it held. A meter whose
    /// record the writer finds unreadable is marked so (`Meter::mark_unreadable`): it is
    /// leased nothing and its key's peeks are refused.
    pub(super) unreadable: HashMap<u64, CodecError>,
    /// Reads of this id fail (see `Shared::fail_reads_of`).
    #[cfg(test)]
    pub(super) fail_reads_of: u64,
}

impl Working<'_> {
    pub(super) fn get(&mut self, id: u64) -> Result<Option<&mut CreditsRecord>> {
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
    pub(super) fn leased(&mut self, id: u64) -> Result<u64> {
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

    pub(super) fn write_all(&mut self) -> Result<()> {
        for (id, record) in &self.records {
            if let Some(record) = record {
                self.table.insert(*id, codec::encode(record).as_slice())?;
            }
        }
        Ok(())
    }
}

/// Runs `batch` into one transaction and commits it — or, if it changed nothing (keys that
/// left the cache with nothing leased or spent: each such batch was a durable commit that
/// also made every cache miss after it open a new read snapshot), rolls it back. Returns
/// whether it committed. On an error, what `batch` still holds was not reached.
pub(super) fn build(
    shared: &Shared,
    listed: &mut Listed,
    batch: &mut std::vec::IntoIter<Msg>,
    closing: bool,
    chunked: bool,
    fx: &mut Effects,
) -> Result<bool> {
    let now = shared.clock.now();
    // Closing, or about to: every lease is about to be returned, so hand out none.
    let leasing_stopped = closing || shared.closing.load(Ordering::Acquire);
    let txn = shared.store.begin_write()?;
    // Whether this batch may have changed the file: only the messages below that are known to
    // change nothing leave it false.
    let mut wrote = closing || chunked || !listed.returns.is_empty();
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
            match return_units(shared, &mut work, fx, meter.clone(), units, epoch) {
                Ok(()) => fx.returns.push((meter, units, epoch, None)),
                Err(_) => fx.late.push((meter, units, epoch)),
            }
        }
        // Listed as retired before any is reclaimed: a failure puts all of them back.
        let orphaned = std::mem::take(&mut listed.orphaned);
        fx.retired.extend(orphaned.iter().cloned());
        for meter in &orphaned {
            wrote |= reclaim(shared, &mut work, fx, meter)?.is_some();
        }
        if chunked {
            fx.meters_seen = listed.pools.chunk();
            fx.usage_seen = listed.keys.chunk();
            flush_spend(shared, &mut work, fx, listed.flushed_at_ms)?;
            flush_usage(shared, &txn, &mut work, fx)?;
        }
        for msg in batch {
            wrote |= !matches!(
                msg,
                Msg::Retire { .. } | Msg::Abandon | Msg::PrefetchBell | Msg::Lease { need: 0, .. }
            );
            match msg {
                // Closing, or about to: nothing is leased, and a waiting request is told so
                // at once (asking again would meet the same answer).
                Msg::Lease { meter, reply, .. } if leasing_stopped => {
                    fx.grant(meter, 0, 0);
                    if let Some(reply) = reply {
                        let _ = reply.send(Handoff::Unavailable);
                    }
                }
                // A top-up leased for since it was queued (by a waiting request's own
                // commit): leasing again would double the lease in memory for nothing.
                Msg::Lease {
                    meter,
                    need: 0,
                    reply: None,
                } if !meter.wants_top_up(now.0) => {
                    meter.pending.store(false, Ordering::Release);
                }
                Msg::Lease { meter, need, reply } => {
                    wrote = true;
                    lease_for(shared, &mut work, fx, meter, need, reply, now)?
                }
                Msg::Shortfall {
                    meter,
                    units,
                    reply,
                } => charge_shortfall(shared, &mut work, fx, meter, units, reply, now)?,
                Msg::Adjust {
                    id,
                    change,
                    audit,
                    reply,
                } => adjust(shared, &txn, &mut work, fx, id, change, audit, reply, now)?,
                Msg::Retire { meter } => {
                    wrote |= reclaim(shared, &mut work, fx, &meter)?.is_some();
                    fx.retired.push(meter);
                }
                Msg::Return {
                    meter,
                    units,
                    epoch,
                    reply,
                } => {
                    fx.returns.push((meter.clone(), units, epoch, reply));
                    return_units(shared, &mut work, fx, meter, units, epoch)?;
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
            take_back_leases(shared, listed, &mut work, fx)?;
        }
        // Whether a balance is empty is known only once the whole batch has run (a later
        // message may have put units back): decide it from the final records.
        for (meter, _, empty) in fx.leases.iter_mut() {
            if let Some(Some(r)) = work.records.get(&meter.id) {
                *empty = empty_until(r, now);
                fx.balances.push((meter.clone(), r.balance));
            }
        }
        wrote |= !work.records.is_empty();
        work.write_all()?;
    }
    #[cfg(test)]
    if wrote && let Some(pause) = shared.before_commit.lock().take() {
        pause();
    }
    if wrote {
        // A commit that fails may still have reached the disk (see `Effects::uncertain`), and
        // so may one that panics (redb's code or the backend's: `WriteTxn::commit` catches it
        // and fences the store, and the failed batch is undone with what this says).
        fx.uncertain = true;
        txn.commit()?;
        fx.uncertain = false;
    } else {
        txn.abort()?;
    }
    Ok(wrote)
}

/// A lease for `meter` (`need` for a request waiting on `reply`, else a top-up), or the
/// answer that none can be had.
fn lease_for(
    shared: &Shared,
    work: &mut Working<'_>,
    fx: &mut Effects,
    meter: MeterRef,
    need: u64,
    reply: Option<Sender<Handoff>>,
    now: Timestamp,
) -> Result<()> {
    let id = meter.id;
    let (at, covered) = match lease(shared, work, fx, meter.clone(), need, now) {
        Ok(leased) => leased,
        Err(e) => {
            fx.stopped = Some(Msg::Lease { meter, need, reply });
            return Err(e);
        }
    };
    if !covered {
        refused(shared, work, fx, at);
    }
    // Retired, undecodable or absent: its balance cannot be leased from (now or ever).
    let absent = matches!(work.records.get(&id), Some(None));
    let retired = fx.leases[at].0.retired();
    match reply {
        // At once: asking again would meet the same record.
        Some(reply) if absent || retired => {
            let gone = retired || !work.unreadable.contains_key(&id);
            let _ = reply.send(if gone {
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
    Ok(())
}

/// Charges `units` a grant used beyond its reservation straight from the balance (never
/// below zero) and answers how many were charged.
fn charge_shortfall(
    shared: &Shared,
    work: &mut Working<'_>,
    fx: &mut Effects,
    meter: MeterRef,
    units: u64,
    reply: Sender<u64>,
    now: Timestamp,
) -> Result<()> {
    let pending = cancel_pending_leases(fx, &meter);
    let charged = match live(work, &meter)? {
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
            low_balance(shared, fx, &meter, unspent(r, &meter), remaining);
            let charged = from_balance + from_lease;
            if charged < units {
                exhausted(shared, fx, &meter, remaining);
            }
            charged
        }
        None => 0,
    };
    fx.shortfalls.push((reply, charged));
    Ok(())
}

/// Sets or tops up balance `id`, after taking its lease back and applying a refill that
/// fell due, with its audit entry in the same transaction.
#[allow(clippy::too_many_arguments)]
fn adjust(
    shared: &Shared,
    txn: &redb::WriteTransaction,
    work: &mut Working<'_>,
    fx: &mut Effects,
    id: u64,
    change: Adjust,
    audit: Option<AuditLine>,
    reply: Sender<Result<u64>>,
    now: Timestamp,
) -> Result<()> {
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
        reclaim(shared, work, fx, meter)?;
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
        return Ok(());
    };
    if let Some(meter) = &meter {
        // Units reserved by grants still held may have crossed the
        // low-balance threshold (settled spend, `reclaim` told): told now,
        // before the change below moves the figure crossings are measured
        // from.
        low_balance(shared, fx, meter, unspent(r, meter), r.balance);
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
    let granted = balance.and_then(|b| r.granted.saturating_sub(before).checked_add(b));
    let applied = match (balance, granted) {
        (Some(balance), Some(granted)) => {
            r.balance = balance;
            r.granted = granted;
            true
        }
        _ => {
            fx.adjusts[at].1 = Err(crate::credits::too_many_granted());
            // A refill applied above is written with the batch even so: the
            // meter must learn of the new period below.
            if !refilled {
                refuse(fx);
                return Ok(());
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
            crate::audit::append_checked(txn, now, &actor, action, &target, fields)?;
        }
        fx.adjusts[at].1 = Ok(r.balance);
    }
    // A set (or a refill applied here) to a positive figure is news too, even below what a
    // refusal saw: that refusal may have been of a request larger than what was left
    // (Exhausted with credits remaining), and the new credits running out is a run-out of
    // its own.
    let set = applied && matches!(change, Adjust::Set(_));
    let grew = r.balance > start || ((set || refilled) && r.balance > 0);
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
            fx.tell(&meter, meter.grew());
        }
        fx.balances.push((meter.clone(), r.balance));
        set_refill_at(shared, &meter, refill::due_at(r, now));
        // A set below the threshold is a fall like any other.
        low_balance(shared, fx, &meter, unspent(r, &meter), r.balance);
        fx.leases.push((meter, 0, empty_until(r, now)));
    } else if let Some((threshold, subject)) = threshold_of(txn, id) {
        // No meter in memory, so none knows the figure before: this change's
        // own fall is told here (the next meter starts from the new figure).
        if start > threshold && r.balance <= threshold {
            let low = CreditEventKind::LowBalance;
            fx.events.push(shared.event_of(low, subject, id, r.balance));
        }
    }
    Ok(())
}

/// A closing batch takes every lease in memory back into its balance; what grants still
/// hold stays leased and is counted in `fx.held`.
fn take_back_leases(
    shared: &Shared,
    listed: &mut Listed,
    work: &mut Working<'_>,
    fx: &mut Effects,
) -> Result<()> {
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
        // Nothing to move (every meter of a second pass while closing, most of them): read
        // what is still leased, writing nothing.
        let left = match reclaim(shared, work, fx, &meter)? {
            Some(left) => left,
            None => work.leased(meter.id)?,
        };
        if left > 0 {
            held = held.saturating_add(left);
            still_leased.push(meter);
        }
    }
    fx.held = Some(held);
    fx.still_leased = Some(still_leased);
    Ok(())
}
