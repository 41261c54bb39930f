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
