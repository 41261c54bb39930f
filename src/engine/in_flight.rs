//! Grants that reserved no credits (an unmetered key's, a peek's), counted so that `close`
//! can wait for them: a grant that reserved units shows in what is still leased, but one
//! that reserved none shows nowhere, and its commit (the usage it records, a peek's charge)
//! would land after the writer stopped (found by a reviewer).
//!
//! One counter per stripe of threads, each on a cache line of its own, so that threads
//! verifying unmetered keys do not contend on one line; a grant leaves the stripe it entered.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam::utils::CachePadded;

const STRIPES: usize = 16;

/// The grants that reserved nothing and are still held.
#[derive(Default)]
pub(crate) struct InFlight {
    stripes: [CachePadded<AtomicU64>; STRIPES],
}

/// Where a counted grant was counted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stripe(u8);

thread_local! {
    /// This thread's stripe, handed out in turn.
    static STRIPE: Stripe = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        Stripe((NEXT.fetch_add(1, Ordering::Relaxed) % STRIPES) as u8)
    };
}

impl InFlight {
    /// Counts a grant in; `SeqCst`, so that of a grant entering and a close starting (its
    /// `closing` store, then [`held`](Self::held)), at least one sees the other.
    pub(crate) fn enter(&self) -> Stripe {
        let stripe = STRIPE.with(|s| *s);
        self.stripes[usize::from(stripe.0)].fetch_add(1, Ordering::SeqCst);
        stripe
    }

    /// Counts a grant out, once whatever it recorded is in memory for the writer.
    pub(crate) fn leave(&self, stripe: Stripe) {
        self.stripes[usize::from(stripe.0)].fetch_sub(1, Ordering::SeqCst);
    }

    /// How many are held.
    pub(crate) fn held(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_leaving_on_other_threads_leave_the_stripe_they_entered() {
        let in_flight = InFlight::default();
        let entered: Vec<Stripe> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..STRIPES + 3)
                .map(|_| s.spawn(|| in_flight.enter()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(in_flight.held(), (STRIPES + 3) as u64);
        let (first, rest) = entered.split_first().unwrap();
        in_flight.leave(*first);
        assert_eq!(in_flight.held(), (STRIPES + 2) as u64);
        for stripe in rest {
            in_flight.leave(*stripe);
        }
        assert_eq!(in_flight.held(), 0);
    }
}
