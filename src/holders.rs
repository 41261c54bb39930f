//! "Does anybody else still use it?", asked of an `Arc`'s count before reading what the
//! other holders wrote.
//!
//! `Arc::strong_count` is a relaxed load: seeing another thread's handle dropped does not
//! make what that thread wrote before dropping it visible (on a weakly ordered CPU, the
//! later read of a lease or a rate window may be served before the count's). The drop's
//! decrement is a release; an acquire fence after a count that saw it pairs with it, so
//! everything the dropped holders wrote is visible after [`held_by_at_most`] says so.
//! Found by a reviewer of memory orderings, by reading (x86 never reorders the two loads).

use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

/// Whether at most `most` handles on `this` are left; if so, whatever the holders that
/// dropped theirs wrote before dropping them is visible from here on. (The fence is paid
/// only when the answer is yes: the hot path's check, a grant's end, almost always says no.)
#[inline]
pub(crate) fn held_by_at_most<T: ?Sized>(this: &Arc<T>, most: usize) -> bool {
    let few = Arc::strong_count(this) <= most;
    if few {
        fence(Ordering::Acquire);
    }
    few
}
