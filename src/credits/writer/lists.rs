//! The writer's lists: meters and keys a flush round found in use, and the queue of lease
//! top-ups nobody waits for.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam::queue::SegQueue;

use crate::cache::{CachedKey, MeterRef};

use super::{FLUSH_CHUNK, Shared};

/// Keys and pools' meters that a flush round found in use. They stay listed here, their
/// dirty mark still set, so that their next request does not queue them again: otherwise
/// every key in use was pushed onto a queue by its first request after every flush (an
/// allocation, and a contended tail, on the hot path). A round that finds one idle since the
/// previous round unlists it and clears its mark; its next request queues it again.
///
/// A key's own meter is flushed with the key (its home): only pools' meters, shared by many
/// keys and few, have a list of their own. So a key in use costs the writer 8 bytes.
#[derive(Default)]
pub(super) struct Listed {
    /// Home snapshots: their usage counters and own meter's spend.
    pub(super) keys: InUse<Arc<CachedKey>>,
    /// Pools' meters.
    pub(super) pools: InUse<MeterRef>,
    /// When the last round started (clock ms): a meter leased since then is in use even if
    /// its leases settled all its spend.
    pub(super) flushed_at_ms: u64,
    /// When the round in progress started, if one is.
    pub(super) round_started_ms: Option<u64>,
    /// Returns a failed batch could neither make durable nor put back into their meter (its
    /// epoch had moved on, or its lease word was full): tried again with the next batch.
    /// One entry per balance and epoch (a balance's record id is unique across keys and
    /// pools), so an outage that fails batch after batch grows it by balances, not refunds.
    pub(super) returns: HashMap<(u64, u32), (MeterRef, u64)>,
    /// Once a closing pass over every meter has committed: the meters it left with units
    /// leased (grants still held). Closing leases nothing, so a meter it left with none has
    /// none for good, and the next pass (the next drain, or the close) visits only these.
    pub(super) still_leased: Option<Vec<MeterRef>>,
    /// Keys' meters that nothing but the registry held when the writer unlisted their key,
    /// still with units leased: a grant refunded them after the key left the cache (its
    /// retirement came first). The next batch takes the units back and drops the meter, as a
    /// retirement does; before, they stayed in memory until the key came back or the ledger
    /// closed (a reviewer counted 31,014 meters for a cache of 64).
    pub(super) orphaned: Vec<MeterRef>,
}

impl Listed {
    /// Starts a round over everything listed and queued (a round in progress starts over).
    pub(super) fn start_round(&mut self, shared: &Shared, now_ms: u64) {
        self.keys.start_round(&shared.dirty_usage, |key| key.id());
        self.pools
            .start_round(&shared.dirty_meters, |meter| meter.id);
        self.round_started_ms = Some(now_ms);
    }

    pub(super) fn in_round(&self) -> bool {
        self.round_started_ms.is_some()
    }

    /// Lists again what a chunk found still in use; ends the round once nothing is left.
    pub(super) fn keep(&mut self, keys: Vec<Arc<CachedKey>>, pools: Vec<MeterRef>) {
        self.keys.keep(keys);
        self.pools.keep(pools);
        if self.keys.left == 0 && self.pools.left == 0 {
            if let Some(started) = self.round_started_ms.take() {
                self.flushed_at_ms = started;
            }
            self.keys.trim();
            self.pools.trim();
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.keys.list.is_empty()
            && self.pools.list.is_empty()
            && self.returns.is_empty()
            && self.orphaned.is_empty()
    }

    /// Lists `units` reserved under `epoch` for the next batch to return.
    pub(super) fn retry_return(&mut self, meter: MeterRef, units: u64, epoch: u32) {
        let entry = self.returns.entry((meter.id, epoch)).or_insert((meter, 0));
        // A balance's refunds never add up to more than it granted, itself a u64.
        entry.1 = entry.1.saturating_add(units);
    }

    /// Bytes of the lists.
    pub(super) fn bytes(&self) -> usize {
        self.keys.bytes() + self.pools.bytes()
    }
}

/// One list of things in use. A round takes them from the front [`FLUSH_CHUNK`] at a time
/// and puts those still in use at the back, so it never needs a second list beside this
/// one: a round's lists never hold more than the things listed when it started.
pub(super) struct InUse<T> {
    pub(super) list: VecDeque<T>,
    /// How many at the front the round in progress has still to flush.
    pub(super) left: usize,
}

impl<T> Default for InUse<T> {
    fn default() -> Self {
        InUse {
            list: VecDeque::new(),
            left: 0,
        }
    }
}

impl<T> InUse<T> {
    /// Appends what is queued now (not what is queued meanwhile: that waits for the next
    /// round, its mark set) and makes all of it the round's to flush, in the order of `id`:
    /// the records of one chunk then share their B-tree pages, and a round writes each page
    /// about once (in queue order each chunk's keys spread over the whole table, so every
    /// chunk copied pages the others copied too: a flush of 1M keys took ≈ 12 s longer,
    /// docs/PERFORMANCE.md, tenth round).
    pub(super) fn start_round(&mut self, queued: &SegQueue<T>, id: impl Fn(&T) -> u64) {
        let n = queued.len();
        self.list.reserve_exact(n);
        self.list.extend((0..n).map_while(|_| queued.pop()));
        self.list.make_contiguous().sort_unstable_by_key(id);
        self.left = self.list.len();
    }

    /// The next chunk to flush.
    pub(super) fn chunk(&mut self) -> Vec<T> {
        let n = self.left.min(FLUSH_CHUNK);
        self.left -= n;
        self.list.drain(..n).collect()
    }

    /// Lists again what a chunk found in use (no more than the chunk took).
    pub(super) fn keep(&mut self, kept: Vec<T>) {
        self.list.extend(kept);
    }

    /// Puts a chunk whose flush failed back in front, to be flushed again.
    pub(super) fn put_back(&mut self, seen: Vec<T>) {
        self.left += seen.len();
        for item in seen.into_iter().rev() {
            self.list.push_front(item);
        }
    }

    /// Gives memory back once a round leaves the list under half its capacity.
    pub(super) fn trim(&mut self) {
        if self.list.capacity() > 2 * self.list.len() + FLUSH_CHUNK {
            self.list.shrink_to(self.list.len() + self.list.len() / 4);
        }
    }

    /// Bytes the list holds (its capacity).
    pub(super) fn bytes(&self) -> usize {
        self.list.capacity() * size_of::<T>()
    }
}

/// Bytes a list holds (its capacity).
pub(super) fn bytes<T>(v: &Vec<T>) -> usize {
    v.capacity() * size_of::<T>()
}

/// Meters asking for a background lease top-up (each at most once: its `pending` mark),
/// and the writer's bell for them: only the request that finds the bell silent rings it
/// (sends [`Msg::PrefetchBell`](super::Msg::PrefetchBell)), so a busy verify thread wakes the writer once per batch.
#[derive(Default)]
pub(crate) struct Prefetches {
    pub(super) queue: SegQueue<MeterRef>,
    pub(super) bell: AtomicBool,
}

impl Prefetches {
    /// Queues `meter`; true when the caller must ring the bell.
    ///
    /// The push comes before the bell's swap and [`take`](Self::take) clears the bell before
    /// it pops (both `SeqCst`): a request that finds the bell ringing pushed before the
    /// writer's clear, so that writer's pops see its meter.
    pub(crate) fn push(&self, meter: MeterRef) -> bool {
        self.queue.push(meter);
        !self.bell.swap(true, Ordering::SeqCst)
    }

    /// Takes up to `max` queued meters, clearing the bell first. With more left, the bell
    /// stays rung: the writer comes back for the rest without waiting (see `run`).
    pub(super) fn take(&self, max: usize) -> Vec<MeterRef> {
        self.bell.store(false, Ordering::SeqCst);
        let taken: Vec<MeterRef> = std::iter::from_fn(|| self.queue.pop()).take(max).collect();
        if !self.queue.is_empty() {
            self.bell.store(true, Ordering::SeqCst);
        }
        taken
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }
}
