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
/// still to come (the clock was ahead, then set back) counts for the current one.
pub(crate) fn due_at(record: &CreditsRecord, now: Timestamp) -> u64 {
    let Some(refill) = record.refill else {
        return u64::MAX;
    };
    match record.refilled_at {
        Some(at) if at >= period_start(refill.interval, now) => next_period(refill.interval, now).0,
        _ => 0,
    }
}

/// Puts `refill` in place of `record`'s. Refills apply lazily, so a refill that was due under
/// the old terms and not applied yet is applied on the new ones, rather than skipped;
/// otherwise the new terms start with the next period of their own interval, and the balance
/// of this one stays. (Found by a reviewer: a changed interval kept the old one's date, so
/// monthly → daily mid-month refilled at once, and daily → monthly skipped a due refill.)
pub(crate) fn replace(record: &mut CreditsRecord, refill: Option<Refill>, now: Timestamp) {
    if record.refill == refill {
        return;
    }
    let due = due_at(record, now) <= now.0;
    record.refilled_at = match refill {
        Some(new) if !due => Some(period_start(new.interval, now)),
        _ => None,
    };
    record.refill = refill;
}

/// Applies a due refill to `record`: the balance becomes the refill amount. Returns whether
/// one was applied. `granted` moves with it so the conservation invariant holds: a refill
/// so large (`u64::MAX`, "unlimited") that everything ever granted would pass `u64::MAX`
/// gives what still fits.
pub(crate) fn apply_due(record: &mut CreditsRecord, now: Timestamp) -> bool {
    let Some(refill) = record.refill else {
        return false;
    };
    let start = period_start(refill.interval, now);
    match record.refilled_at {
        // Refilled for a period still to come: the clock was ahead, and has been set back.
        // Made early for the next period, the refill counts for that one (a clock a moment
        // ahead at midnight must not give one day two refills); made further ahead, it counts
        // for this period, and the next one refills again (found by a reviewer: kept as it
        // was, no refill came until the clock caught up with it).
        Some(at) if at > start => {
            if at != next_period(refill.interval, now) {
                record.refilled_at = Some(start);
            }
            return false;
        }
        Some(at) if at == start => return false,
        _ => {}
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
        assert!(!apply_due(&mut r, NOW), "same month: nothing due");
        let december = next_period(RefillInterval::Monthly, NOW);
        assert!(apply_due(&mut r, december));
        assert_eq!((r.balance, r.granted), (1_000, 1_997));
        assert!(r.balanced());
        assert!(!apply_due(&mut r, december), "applied once");
    }
}
