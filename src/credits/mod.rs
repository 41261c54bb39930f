//! Credits that never over-spend: in-memory leases over durable balances, a single writer
//! thread with group commit, lazy refills, shared pools and balance events (DESIGN §5).

mod api;
pub(crate) mod events;
mod pools;

pub use api::{Credits, Usage};
pub use pools::{NewPool, Pool, PoolUpdate};
pub use waits::LeaseWaits;
pub(crate) mod meter;
pub(crate) mod refill;
pub(crate) mod registry;
mod waits;
pub(crate) use waits::WaitHistogram;
pub(crate) mod writer;

/// The refusal of a balance change that would take the credits ever granted to a balance
/// (spent, lost and left) past `u64::MAX`, where they could no longer be counted.
pub(crate) fn too_many_granted() -> crate::Error {
    crate::Error::invalid(
        "credits",
        format!(
            "the credits ever granted to this balance (spent, lost and left) would pass {}",
            u64::MAX
        ),
    )
}
