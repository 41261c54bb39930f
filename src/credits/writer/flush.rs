//! Spend and usage flushes: what the hot path counted in memory, written to the records.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use redb::ReadableTable;

use crate::cache::{CachedKey, MeterRef, Metering};
use crate::clock::Timestamp;
use crate::codec;
use crate::error::Result;
use crate::record::UsageRecord;
use crate::store::tables::{ACCOUNTS, KEYS, USAGE};

use super::Shared;
use super::batch::Working;
use super::effects::Effects;
use super::leasing::{live, low_balance, unspent};

/// Moves spent units from `leased` to `spent` for every pool's meter the flush saw, keeping
/// listed those in use since the last round started (`since_ms`).
pub(super) fn flush_spend(
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
            #[cfg(test)]
            shared.race_the_unlisting();
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
pub(super) fn settle_spend(
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
        low_balance(shared, fx, &meter, unspent(r, &meter), remaining);
    }
    Ok(())
}

/// Writes usage deltas (last used, spend, requests) for keys and their accounts, and what
/// each key spent through its own meter, keeping listed the keys used since the last round.
pub(super) fn flush_usage(
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
            #[cfg(test)]
            shared.race_the_unlisting();
            (spent, requests, last_used, metered) = taken(&state, state.unlist());
            if spent == 0 && requests == 0 && metered == 0 {
                match state.metering {
                    Metering::Own => fx.unlisted.push(MeterRef::Own(state)),
                    _ => fx.unlisted_homes.push(state),
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
