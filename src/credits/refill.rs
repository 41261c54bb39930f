//! Lazy refills: a refill *replaces* the balance at the start of each period (00:00 UTC daily,
//! or the 1st of the month), applied when a lease is next taken, never by a timer.

use crate::clock::Timestamp;
use crate::record::{CreditsRecord, Refill, RefillInterval};

const DAY_MS: u64 = 86_400_000;

/// Start of the period containing `now`.
pub(crate) fn period_start(interval: RefillInterval, now: Timestamp) -> Timestamp {
    let day = now.0 / DAY_MS;
    match interval {
        RefillInterval::Daily => Timestamp(day * DAY_MS),
        RefillInterval::Monthly => {
            let (y, m, _) = civil_from_days(day as i64);
            Timestamp(days_from_civil(y, m, 1) as u64 * DAY_MS)
        }
    }
}

/// Start of the period after the one containing `now`.
pub(crate) fn next_period(interval: RefillInterval, now: Timestamp) -> Timestamp {
    let start = period_start(interval, now);
    match interval {
        RefillInterval::Daily => Timestamp(start.0.saturating_add(DAY_MS)),
        RefillInterval::Monthly => {
            period_start(interval, Timestamp(start.0.saturating_add(32 * DAY_MS)))
        }
    }
}

/// When the next refill of `record` is due (ms; `u64::MAX` without a refill). At or after
/// this time the balance must be refilled before it is spent. A refill recorded for a period
/// still to come (the clock was ahead, then set back) counts for the period
/// [`counted_for`] says.
pub(crate) fn due_at(record: &CreditsRecord, now: Timestamp, stepped_back: u64) -> u64 {
    let Some(refill) = record.refill else {
        return u64::MAX;
    };
    let counted = record
        .refilled_at
        .map(|at| counted_for(refill.interval, at, now, stepped_back));
    match counted {
        Some(at) if at >= period_start(refill.interval, now) => next_period(refill.interval, now).0,
        _ => 0,
    }
}

/// The period a refill recorded for period `at` counts for, at `now`. One for a period still
/// to come was made while the clock was ahead, and the clock has since been set back — by
/// `stepped_back` ms, the last step back the credit writer saw (0: none seen since the
/// ledger opened). Made in the period just before its own (a clock a moment, or a few hours,
/// ahead at midnight), it is that period's refill made early, and counts for it: that period
/// gets no second one. Made further ahead, it counts for the period it was really made in,
/// `stepped_back` before its own — so a period after that one refills again, however long
/// the key then goes unused. Where a step of a fraction of a period leaves two periods it
/// may have been made in, it counts as made in the later: a period may go without a refill,
/// none gets two. (Found by reviewers: kept as it was, no refill came until the
/// clock caught up with it; then, judged by the time of the next use rather than by the
/// step, one made two periods ahead and first used again in the next period was read as
/// made early for the one after, and neither refilled; and one made 90 minutes early and
/// used again before midnight gave one day two refills.) With no step seen (the ledger
/// reopened since), a refill for the next period counts for it, any other for this one.
pub(crate) fn counted_for(
    interval: RefillInterval,
    at: Timestamp,
    now: Timestamp,
    stepped_back: u64,
) -> Timestamp {
    let start = period_start(interval, now);
    if at <= start {
        return at;
    }
    let made_in = match stepped_back {
        0 => start,
        step => {
            // Made at `at` or later by the clock, before its next period: that, `step` back.
            let latest = next_period(interval, at)
                .0
                .saturating_sub(step)
                .saturating_sub(1);
            period_start(interval, Timestamp(latest)).min(start)
        }
    };
    if at == next_period(interval, made_in) {
        at
    } else {
        made_in
    }
}

/// Puts `refill` in place of `record`'s. Refills apply lazily, so a refill that was due under
/// the old terms and not applied yet is applied on the new ones, rather than skipped;
/// otherwise the new terms start with the next period of their own interval, and the balance
/// of this one stays. (Found by a reviewer: a changed interval kept the old one's date, so
/// monthly → daily mid-month refilled at once, and daily → monthly skipped a due refill.)
pub(crate) fn replace(
    record: &mut CreditsRecord,
    refill: Option<Refill>,
    now: Timestamp,
    stepped_back: u64,
) {
    if record.refill == refill {
        return;
    }
    let due = due_at(record, now, stepped_back) <= now.0;
    record.refilled_at = match refill {
        Some(new) if !due => Some(period_start(new.interval, now)),
        _ => None,
    };
    record.refill = refill;
}

/// Applies a due refill to `record`: the balance becomes the refill amount. Returns whether
/// one was applied. `granted` moves with it so the conservation invariant holds: a refill
/// so large (`u64::MAX`, "unlimited") that everything ever granted would pass `u64::MAX`
/// gives what still fits. A refill recorded for a period still to come is first recorded
/// for the period it counts for ([`counted_for`]).
pub(crate) fn apply_due(record: &mut CreditsRecord, now: Timestamp, stepped_back: u64) -> bool {
    let Some(refill) = record.refill else {
        return false;
    };
    let start = period_start(refill.interval, now);
    if let Some(at) = record.refilled_at.filter(|&at| at > start) {
        record.refilled_at = Some(counted_for(refill.interval, at, now, stepped_back));
    }
    if record.refilled_at.is_some_and(|at| at >= start) {
        return false;
    }
    let granted_before = record.granted.saturating_sub(record.balance);
    record.balance = refill.amount.min(u64::MAX - granted_before);
    record.granted = granted_before + record.balance;
    record.refilled_at = Some(start);
    true
}

// Howard Hinnant's civil-date algorithms (public domain), for UTC month boundaries.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Refill;

    // 2026-11-23T16:00:00Z
    const NOW: Timestamp = Timestamp(1_795_392_000_000 + 16 * 3_600_000);

    #[test]
    fn period_boundaries() {
        assert_eq!(
            period_start(RefillInterval::Daily, NOW),
            Timestamp(1_795_392_000_000)
        );
        // 2026-11-01T00:00Z and 2026-12-01T00:00Z
        assert_eq!(
            period_start(RefillInterval::Monthly, NOW),
            Timestamp(1_793_491_200_000)
        );
        assert_eq!(
            next_period(RefillInterval::Monthly, NOW),
            Timestamp(1_796_083_200_000)
        );
        assert_eq!(civil_from_days(days_from_civil(2028, 2, 29)), (2028, 2, 29));
    }

    #[test]
    fn refill_replaces_the_balance_once_per_period() {
        let mut r = CreditsRecord {
            balance: 3,
            spent: 997,
            granted: 1_000,
            refilled_at: Some(period_start(RefillInterval::Monthly, NOW)),
            refill: Some(Refill {
                amount: 1_000,
                interval: RefillInterval::Monthly,
            }),
            ..CreditsRecord::default()
        };
        assert!(!apply_due(&mut r, NOW, 0), "same month: nothing due");
        let december = next_period(RefillInterval::Monthly, NOW);
        assert!(apply_due(&mut r, december, 0));
        assert_eq!((r.balance, r.granted), (1_000, 1_997));
        assert!(r.balanced());
        assert!(!apply_due(&mut r, december, 0), "applied once");
    }

    /// A refill recorded for a period still to come counts for the period it was made in,
    /// the clock's step back before its own: for its own when that is the one before it.
    #[test]
    fn a_refill_made_ahead_counts_for_the_period_it_was_made_in() {
        const HOUR: u64 = 3_600_000;
        let daily = RefillInterval::Daily;
        let today = period_start(daily, NOW);
        let day = |n: u64| Timestamp(today.0 + n * DAY_MS);
        let counted = |at, now, step| counted_for(daily, at, now, step);
        // A moment, or hours, early at midnight: tomorrow's refill.
        for step in [2_000, HOUR / 2, 90 * HOUR / 60, 3 * HOUR] {
            assert_eq!(counted(day(1), NOW, step), day(1), "{step} ms");
        }
        // Two days ahead: made today, and seen tomorrow it is still today's, so tomorrow's
        // refill is due.
        assert_eq!(counted(day(2), NOW, 2 * DAY_MS), today);
        assert_eq!(counted(day(2), day(1), 2 * DAY_MS), today);
        // A day and a half ahead: made today or tomorrow; seen tomorrow, counted as
        // tomorrow's early (no day gets two).
        assert_eq!(counted(day(2), day(1), 36 * HOUR), day(2));
        assert_eq!(counted(day(2), NOW, 36 * HOUR), today);
        // No step seen (the ledger reopened since): for the next period counts for it,
        // further ahead for this one.
        assert_eq!(counted(day(1), NOW, 0), day(1));
        assert_eq!(counted(day(2), NOW, 0), today);
        // A refill in the past is where it was.
        assert_eq!(counted(today, day(1), 2 * DAY_MS), today);
        let mut r = CreditsRecord {
            refilled_at: Some(day(2)),
            refill: Some(Refill {
                amount: 10,
                interval: daily,
            }),
            ..CreditsRecord::default()
        };
        assert_eq!(
            due_at(&r, day(1), 2 * DAY_MS),
            0,
            "due: counted for yesterday"
        );
        assert!(apply_due(&mut r, day(1), 2 * DAY_MS));
        assert_eq!((r.balance, r.refilled_at), (10, Some(day(1))));
    }
}
