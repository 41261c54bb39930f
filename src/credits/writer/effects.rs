//! What a batch changes in memory, kept aside until its commit: published once the batch
//! is durable (`commit`), undone if it is not.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crossbeam::channel::Sender;

use crate::cache::{CachedKey, MeterRef};
use crate::credits::events::CreditEvent;
use crate::credits::meter::{LowBalance, MAX_LEASED, Meter, Told};
use crate::error::{Error, Result};

use super::batch::build;
use super::leasing::set_refill_at;
use super::lists::{Listed, bytes};
use super::{Handoff, Msg, Shared};

/// What to do in memory once the batch is durable, or to undo if it is not.
#[derive(Default)]
pub(super) struct Effects {
    pub(super) leases: Vec<(MeterRef, u64, u64)>, // meter, units granted, empty until (ms)
    /// Units left leased once every lease was given back (a closing batch only).
    pub(super) held: Option<u64>,
    /// The meters holding them (see [`Listed::still_leased`]).
    pub(super) still_leased: Option<Vec<MeterRef>>,
    /// Where in `leases` units were granted, by meter id: what a later message in the
    /// batch takes back without scanning every lease of the batch.
    pub(super) granted_at: HashMap<u64, Vec<usize>>,
    /// Units of those leases handed to waiting requests, by meter id: reserved, not left.
    pub(super) handed: HashMap<u64, u64>,
    /// Waiting requests: the lease (index in `leases`) their units come out of, how many
    /// they need (`None`: the balance cannot cover it), the balance epoch when it was leased,
    /// and where to hand them.
    pub(super) handoffs: Vec<(usize, Option<u64>, u32, Sender<Handoff>)>,
    pub(super) shortfalls: Vec<(Sender<u64>, u64)>,
    /// Refunds given back to the balance (see [`Msg::Return`]), answered once durable.
    pub(super) returns: Vec<(MeterRef, u64, u32, Option<Sender<()>>)>,
    /// Each balance's durable figure as this batch leaves it, in batch order: the meters
    /// learn it once the batch is durable (a failed one leaves them the committed figure).
    pub(super) balances: Vec<(MeterRef, u64)>,
    /// Returns left by a failed batch that this one could not read for either: kept for the
    /// next, whatever becomes of this one.
    pub(super) late: Vec<(MeterRef, u64, u32)>,
    /// Meters whose epoch this batch ended, with the epoch and refill time (ms) before:
    /// restored if it fails (a failed refill must still be due).
    pub(super) ended: Vec<(MeterRef, u32, u64)>,
    /// What this batch changed of what the host has been told of each balance (an
    /// exhaustion reported, a low-balance figure, a top-up's "grew"): undone, newest first,
    /// if the batch fails, since its events are not sent and its changes did not happen.
    pub(super) told: Vec<(MeterRef, Told)>,
    /// Each low-balance figure the batch measured, with the threshold it was measured
    /// against (see [`Meter::raise_if_replaced`]).
    pub(super) figures: Vec<(MeterRef, Option<Arc<LowBalance>>, u64)>,
    /// Replies to balance changes, sent once the batch is durable (a refused change too: its
    /// `reclaim` changed the meter, which the caller's next request must find settled).
    pub(super) adjusts: Vec<(Sender<Result<u64>>, Result<u64>)>,
    pub(super) flushed_spend: Vec<(MeterRef, u64)>,
    pub(super) flushed_usage: Vec<(Arc<CachedKey>, u64, u64, u64)>,
    /// Keys' durable lifetime spend after this batch's usage writes, for their spend tiers.
    pub(super) durable_spent: Vec<(u64, u64)>,
    /// The meters and keys this batch flushes (all listed and queued ones, or a round's
    /// chunk): what goes back to be flushed if the batch fails.
    pub(super) meters_seen: Vec<MeterRef>,
    pub(super) usage_seen: Vec<Arc<CachedKey>>,
    /// What stays listed if it commits, and what was unlisted: keys' own meters, and the
    /// homes of keys without one.
    pub(super) meters_kept: Vec<MeterRef>,
    pub(super) usage_kept: Vec<Arc<CachedKey>>,
    pub(super) unlisted: Vec<MeterRef>,
    pub(super) unlisted_homes: Vec<Arc<CachedKey>>,
    pub(super) reclaimed: Vec<(MeterRef, u64)>,
    pub(super) events: Vec<CreditEvent>,
    pub(super) syncs: Vec<Sender<Result<()>>>,
    /// The message a storage error stopped halfway, if it can still be answered: answered as
    /// those the failed batch did not reach.
    pub(super) stopped: Option<Msg>,
    pub(super) retired: Vec<MeterRef>,
    /// The commit itself failed: its writes may still be durable (the disk died at the
    /// commit's last sync after writing the header, and a power loss kept it). Units the
    /// batch took out of memory — leases taken back, refunds returned to the balance — then
    /// stay out: whichever image survives counts them right (the old one as leased, so lost
    /// to the crash; the new one in the balance). Put back, they were spent from memory and
    /// found in the balance again after the crash (found by a reviewer, from crash-soak
    /// seed 52,385,968: 18 left where 16 could be). A top-up or set is answered that it may
    /// have been made (unless the batch refused it), not that the balance is unchanged. Set
    /// from the commit's start until it returns Ok: a commit that panics may have landed too.
    pub(super) uncertain: bool,
    /// Balances whose remembered exhaustion a change forgot (see [`Registry::grew`](crate::credits::registry::Registry::grew)):
    /// remembered again if the batch fails.
    pub(super) forgotten: Vec<u64>,
}

impl Effects {
    /// Lists a change to what the host has been told of `meter`'s balance, if one was made.
    pub(super) fn tell(&mut self, meter: &MeterRef, told: Option<Told>) {
        if let Some(told) = told {
            self.told.push((meter.clone(), told));
        }
    }

    /// Bytes of the batch's lists of meters and keys.
    pub(super) fn list_bytes(&self) -> usize {
        bytes(&self.meters_seen)
            + bytes(&self.usage_seen)
            + bytes(&self.meters_kept)
            + bytes(&self.usage_kept)
            + bytes(&self.flushed_spend)
            + bytes(&self.flushed_usage)
            + bytes(&self.unlisted)
            + bytes(&self.unlisted_homes)
    }

    /// Units `meter` can still spend from memory: its lease there and what this batch
    /// leased to it (memory gets it after the commit), less what the batch handed to
    /// requests waiting for it, which are no longer left.
    pub(super) fn in_memory(&self, meter: &Meter) -> u64 {
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
    pub(super) fn grant(&mut self, meter: MeterRef, units: u64, empty_until: u64) -> usize {
        let at = self.leases.len();
        if units > 0 {
            self.granted_at.entry(meter.id).or_default().push(at);
        }
        self.leases.push((meter, units, empty_until));
        at
    }
}

/// One write transaction: `batch`, and with `chunked` the next chunk of the round in
/// progress. Returns the `flush` and `close` requests it carried, for [`apply`](super::apply) to answer,
/// and whether it committed (the error's message if not).
pub(super) fn commit(
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
        Ok(committed) => (publish(shared, listed, fx, chunked, committed), Ok(())),
        Err(e) => {
            let message = e.to_string();
            (undo(shared, listed, fx, batch, &message), Err(message))
        }
    }
}

/// A batch that committed (or, `committed` false, changed nothing and was rolled back): makes
/// what it changed visible in memory — leases, handoffs to waiting requests, balances,
/// events — and answers everyone it carried. Returns the `flush` and `close` requests, for
/// [`apply`](super::apply) to answer.
fn publish(
    shared: &Shared,
    listed: &mut Listed,
    mut fx: Effects,
    chunked: bool,
    committed: bool,
) -> Vec<Sender<Result<()>>> {
    if committed {
        shared.commits.fetch_add(1, Ordering::Relaxed);
    }
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
    for (meter, seen, figure) in fx.figures.drain(..) {
        meter.raise_if_replaced(&seen, figure);
    }
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
    // Every handle the batch's lists hold goes before the registry counts who still uses
    // a meter (`ended` and `told` held one, so a retirement in a batch with a `set` left
    // its meter registered: found by a reviewer).
    drop((
        fx.flushed_spend,
        fx.reclaimed,
        fx.flushed_usage,
        fx.ended,
        fx.told,
        fx.figures,
    ));
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
        if MeterRef::held_by_at_most(&meter, 2) && meter.leased() == 0 {
            meters.remove(&meter);
        }
    }
    for meter in fx.unlisted {
        // A key's meter that left the cache while listed (so its retirement left it
        // in the registry): with its lease returned and nobody else holding it, it goes;
        // with units a grant refunded since, the next batch takes them back first.
        if !MeterRef::held_by_at_most(&meter, 2) || meter.is_pool() {
            continue;
        }
        if meter.leased() == 0 {
            meters.remove(&meter);
        } else if !meter.retired()
            && meters
                .get(meter.id)
                .is_some_and(|m| MeterRef::ptr_eq(&m, &meter))
        {
            listed.orphaned.push(meter);
        }
    }
    for home in fx.unlisted_homes {
        meters.forget_home(home); // unless an entry, a grant or a carried snapshot holds it
    }
    fx.syncs
}

/// A failed batch: nothing became durable, so every counter it swapped goes back (but the
/// units it took out of memory, when its commit failed: see `Effects::uncertain`) and every
/// request it carried, reached or not (`batch`), is refused with `message`. Returns the
/// `flush` and `close` requests, as [`publish`] does.
fn undo(
    shared: &Shared,
    listed: &mut Listed,
    mut fx: Effects,
    batch: std::vec::IntoIter<Msg>,
    message: &str,
) -> Vec<Sender<Result<()>>> {
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
    if !fx.uncertain {
        for (meter, units) in fx.reclaimed {
            meter.give_back(units);
        }
    }
    // Retirements, and meters left leased after their key left (see `Listed::orphaned`):
    // the next batch takes their leases back instead (found by a reviewer: dropped here,
    // they stayed leased in memory until the key came back or the ledger closed).
    listed
        .orphaned
        .extend(fx.retired.drain(..).filter(|m| !m.retired()));
    for (meter, _, _) in fx.leases {
        meter.pending.store(false, Ordering::Release);
    }
    for (_, _, epoch, r) in fx.handoffs {
        let _ = r.send(Handoff::Units { units: 0, epoch });
    }
    for (r, _) in fx.shortfalls {
        let _ = r.send(0);
    }
    for (meter, units, epoch, reply) in fx.returns {
        match (fx.uncertain, reply) {
            (false, reply) => keep_or_retry(listed, meter, units, epoch, reply),
            // The balance may have them: answered as done, for the refunding thread keeps
            // whatever the writer could not answer (found by a test of the commit that
            // fails at its last sync and lands: dropped, this answer put them back).
            (true, Some(reply)) => drop(reply.send(())),
            (true, None) => {}
        }
    }
    for (r, outcome) in fx.adjusts {
        let _ = r.send(Err(match (fx.uncertain, outcome) {
            (false, _) => not_changed(message),
            // Refused in the batch: not made, whether or not the commit landed.
            (true, Err(refused)) => refused,
            (true, Ok(_)) => maybe_changed(message),
        }));
    }
    // The messages the batch did not reach get the same answers.
    for msg in fx.stopped.take().into_iter().chain(batch) {
        refuse(msg, message, listed, &mut fx.syncs);
    }
    fx.syncs
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
/// it reached: nothing became durable. (A retirement is left for the next batch.)
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
        // A retirement not written is tried again by the next batch.
        Msg::Retire { meter } => listed.orphaned.push(meter),
        // A settlement not written stays in its meter, for the next write to take.
        Msg::Settle { .. } | Msg::Abandon | Msg::PrefetchBell => {}
        #[cfg(test)]
        Msg::Hold(_) => {}
    }
}

/// The answer to a balance change whose batch failed with `message`.
fn not_changed(message: &str) -> Error {
    Error::Conflict(format!("balance not changed: {message}"))
}

/// The answer to a change whose commit failed: it may have reached the disk, and a retry
/// could make it twice (see `Effects::uncertain`).
fn maybe_changed(message: &str) -> Error {
    Error::Uncertain {
        what: "balance change",
        reason: message.to_owned(),
    }
}
