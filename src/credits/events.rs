//! Credit events for the host: a balance fell to its low-balance threshold, or ran out.
//! Delivered on a bounded channel ([`Ledger::credit_events`](crate::Ledger::credit_events));
//! if the host does not drain it, new events are dropped rather than slowing the ledger.

use serde::Serialize;

use crate::public_id::PublicId;

/// Capacity of the event channel.
pub(crate) const EVENT_CAPACITY: usize = 4_096;

/// What happened to a balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditEventKind {
    /// The credits left fell to or below the key's or pool's low-balance threshold: by
    /// spending, or by an admin's `set` or a refill to a figure at or below it. Reported
    /// once per fall: the next comes after the balance has been above the threshold again
    /// (a verify thread and the credit writer seeing one fall at once may, rarely, both
    /// report it: a duplicate, never a loss). Units requests hold reserved count as not yet
    /// spent: a reservation is no fall and its refund no rise (so a `set` or refill made
    /// while requests hold reservations of the balance before it is told once those
    /// settle). A balance already at or below it when its key is cached (after a restart,
    /// say) is no news.
    LowBalance,
    /// A request needed more credits than were left. Reported once per run-out: for the
    /// first such refusal since the balance last grew (a top-up, a set or a refill to any
    /// figure above zero); a refusal a growth overtook (made just before it, reported after)
    /// is not reported, as the growth answered it. Units a
    /// request reserved and gave back (a refund) are not growth, and a key that ran out, left a
    /// full cache and came back is not reported again (of up to 65,536 such keys at once;
    /// past that, one may be reported a second time). A balance first cached empty (a key
    /// created with no credits, or after a restart) is reported at its first refusal.
    Exhausted,
}

/// A credit event, naming the key or pool by public id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreditEvent {
    /// What happened.
    pub kind: CreditEventKind,
    /// The key (`key_…`), internal token (`tok_…`) or pool (`pool_…`) whose balance it is.
    pub subject: PublicId,
    /// Credits left (durable balance plus what memory holds).
    pub remaining: u64,
}
