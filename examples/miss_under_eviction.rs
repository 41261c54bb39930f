//! Cache misses when the cache is full: what `keyledger bench`'s miss figures (misses into a
//! cache with room) leave out. A server whose keys in use outnumber its cache evicts a key
//! on every miss, and each evicted key's meter is retired through the credit writer.
//!
//! Builds `keyledger bench`'s workload (N keys, default 1M), reads redb's pages once, then
//! times peeks (`cost(0)`: the whole chain, no spend) on keys spread over all of them, in
//! batches of N/16: first with a cache of N/10 with room, then once it is full (every miss
//! evicts). Prints p50 / p90 / p99 per batch, with the writer's commits and the evictions
//! each batch caused.
//!
//! ```sh
//! cargo run --release --example miss_under_eviction            # 1M keys, ≈ 40 s
//! cargo run --release --example miss_under_eviction -- 100000
//! ```

use std::time::Instant;

use keyledger::bench_support::{Options, Workload, percentile};

fn main() -> keyledger::Result<()> {
    let keys: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().expect("a key count"),
        None => 1_000_000,
    };
    let options = Options {
        cache_capacity: Some(keys / 10),
        ..Options::new(keys)
    };
    let work = Workload::build(&options, &mut |_| {})?;
    work.touch_pages(&mut |_| {})?;
    // Every key once, by a stride coprime with the key count, as `keyledger bench` does.
    let stride = if keys.is_multiple_of(7_919) || keys.is_multiple_of(127) {
        1
    } else {
        7_919 * 127 % keys
    };
    let order: Vec<usize> = (0..keys).map(|j| j * stride % keys).collect();
    let per_batch = keys / 16;
    println!("{keys} keys, a cache of {}", keys / 10);
    for (b, batch) in order.chunks(per_batch).take(8).enumerate() {
        let before = work.ledger.stats();
        let mut times: Vec<u64> = batch
            .iter()
            .map(|&i| {
                work.touch_key(i);
                let t = Instant::now();
                std::hint::black_box(work.peek(i));
                t.elapsed().as_nanos() as u64
            })
            .collect();
        let after = work.ledger.stats();
        times.sort_unstable();
        let evictions = after.cache_evictions - before.cache_evictions;
        println!(
            "batch {b} ({}): p50 {:>6} ns  p90 {:>6} ns  p99 {:>6} ns  writer commits {:>5}  evictions {:>6}",
            if evictions == 0 { "room " } else { "full " },
            percentile(&times, 50.0),
            percentile(&times, 90.0),
            percentile(&times, 99.0),
            after.writer_commits - before.writer_commits,
            evictions,
        );
    }
    Ok(())
}
