//! What redb itself costs for the reads a cache miss makes, on tables of N entries held in its
//! page cache (the floor under `keyledger bench`'s miss p50/p99): a read transaction, a table
//! open, and gets shaped like keyledger's tables — hash → id (format 1's index), id → 150-byte
//! record (a key record), hash → 64-byte record (format 2's verify record), id → 24-byte
//! record (a credits record), and a format-2 miss's two reads with the transaction and its
//! tables kept open. Every figure is p50 / p99 of 200,000 random look-ups; three rounds.
//!
//! ```sh
//! cargo run --release --example redb_floor            # 1M entries per table, ≈ 1 minute
//! cargo run --release --example redb_floor -- 100000
//! ```

use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

const HASH_TO_ID: TableDefinition<&[u8; 32], u64> = TableDefinition::new("hash_to_id");
const ID_TO_RECORD: TableDefinition<u64, &[u8]> = TableDefinition::new("id_to_record");
const HASH_TO_VERIFY: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("hash_to_verify");
const ID_TO_CREDITS: TableDefinition<u64, &[u8]> = TableDefinition::new("id_to_credits");

const OPS: usize = 200_000;

fn hash_of(i: u64) -> [u8; 32] {
    *blake3::hash(&i.to_le_bytes()).as_bytes()
}

/// A deterministic stream of indices below `n` (xorshift).
struct Indices(u64, u64);

impl Indices {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % self.1
    }
}

/// Times `f` on `OPS` indices; prints p50 / p99 in ns.
fn row(name: &str, n: u64, seed: u64, mut f: impl FnMut(u64, &[u8; 32])) {
    let mut idx = Indices(0x9E37_79B9_7F4A_7C15 ^ seed, n);
    let mut samples: Vec<u64> = (0..OPS)
        .map(|_| {
            let i = idx.next();
            let hash = hash_of(i);
            let t = Instant::now();
            f(i, &hash);
            t.elapsed().as_nanos() as u64
        })
        .collect();
    samples.sort_unstable();
    println!(
        "  {name:<58} p50 {:>6} ns   p99 {:>6} ns",
        samples[OPS / 2],
        samples[OPS * 99 / 100]
    );
}

/// A format-2 miss's two point reads: the verify record by hash, the balance by id.
fn format_2_reads(
    verify: &redb::ReadOnlyTable<&[u8; 32], &[u8]>,
    credits: &redb::ReadOnlyTable<u64, &[u8]>,
    i: u64,
    hash: &[u8; 32],
) {
    let v = verify.get(hash).expect("get").expect("present");
    std::hint::black_box(v.value().len());
    let c = credits.get(i).expect("get").expect("present");
    std::hint::black_box(c.value().len());
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Database::create(dir.path().join("floor.redb")).expect("create");
    let record = [7u8; 150];
    let verify = [9u8; 64];
    let credits = [3u8; 24];
    let t = Instant::now();
    for start in (0..n).step_by(50_000) {
        let txn = db.begin_write().expect("write");
        {
            let mut a = txn.open_table(HASH_TO_ID).expect("open");
            let mut b = txn.open_table(ID_TO_RECORD).expect("open");
            let mut c = txn.open_table(HASH_TO_VERIFY).expect("open");
            let mut d = txn.open_table(ID_TO_CREDITS).expect("open");
            for i in start..(start + 50_000).min(n) {
                let hash = hash_of(i);
                a.insert(&hash, i).expect("insert");
                b.insert(i, record.as_slice()).expect("insert");
                c.insert(&hash, verify.as_slice()).expect("insert");
                d.insert(i, credits.as_slice()).expect("insert");
            }
        }
        txn.commit().expect("commit");
    }
    eprintln!("built 4 tables of {n} entries in {:.1?}", t.elapsed());
    {
        // Pull every page into redb's page cache, as `keyledger bench` does.
        let read = db.begin_read().expect("read");
        for entry in read
            .open_table(HASH_TO_ID)
            .expect("open")
            .iter()
            .expect("iter")
        {
            std::hint::black_box(entry.expect("entry").1.value());
        }
        for table in [ID_TO_RECORD, ID_TO_CREDITS] {
            for entry in read.open_table(table).expect("open").iter().expect("iter") {
                std::hint::black_box(entry.expect("entry").1.value().len());
            }
        }
        for entry in read
            .open_table(HASH_TO_VERIFY)
            .expect("open")
            .iter()
            .expect("iter")
        {
            std::hint::black_box(entry.expect("entry").1.value().len());
        }
    }
    for round in 0..3u64 {
        println!("round {}", round + 1);
        row("begin_read", n, round, |_, _| {
            std::hint::black_box(db.begin_read().expect("read"));
        });
        row("begin_read + open_table", n, round, |_, _| {
            let read = db.begin_read().expect("read");
            std::hint::black_box(read.open_table(ID_TO_RECORD).expect("open"));
        });
        row(
            "begin_read + open + get: hash → id",
            n,
            round,
            |_, hash| {
                let read = db.begin_read().expect("read");
                let table = read.open_table(HASH_TO_ID).expect("open");
                std::hint::black_box(table.get(hash).expect("get").expect("present").value());
            },
        );
        row("begin_read + open + get: id → 150 B", n, round, |i, _| {
            let read = db.begin_read().expect("read");
            let table = read.open_table(ID_TO_RECORD).expect("open");
            let value = table.get(i).expect("get").expect("present");
            std::hint::black_box(value.value().len());
        });
        row(
            "begin_read + open + get: hash → 64 B",
            n,
            round,
            |_, hash| {
                let read = db.begin_read().expect("read");
                let table = read.open_table(HASH_TO_VERIFY).expect("open");
                let value = table.get(hash).expect("get").expect("present");
                std::hint::black_box(value.value().len());
            },
        );
        row(
            "format 1 miss: hash → id, id → 150 B, id → 24 B",
            n,
            round,
            |_, hash| {
                let read = db.begin_read().expect("read");
                let ids = read.open_table(HASH_TO_ID).expect("open");
                let id = ids.get(hash).expect("get").expect("present").value();
                let records = read.open_table(ID_TO_RECORD).expect("open");
                let record = records.get(id).expect("get").expect("present");
                std::hint::black_box(record.value().len());
                let credits = read.open_table(ID_TO_CREDITS).expect("open");
                let c = credits.get(id).expect("get").expect("present");
                std::hint::black_box(c.value().len());
            },
        );
        row(
            "format 2 miss: hash → 64 B, id → 24 B",
            n,
            round,
            |i, hash| {
                let read = db.begin_read().expect("read");
                let verify = read.open_table(HASH_TO_VERIFY).expect("open");
                let credits = read.open_table(ID_TO_CREDITS).expect("open");
                format_2_reads(&verify, &credits, i, hash);
            },
        );
        let read = db.begin_read().expect("read");
        let table = read.open_table(HASH_TO_VERIFY).expect("open");
        row(
            "get alone (table already open): hash → 64 B",
            n,
            round,
            |_, hash| {
                let value = table.get(hash).expect("get").expect("present");
                std::hint::black_box(value.value().len());
            },
        );
        // What a miss path that kept one read transaction and its tables open (renewing them
        // after each commit) would still pay: the two point reads themselves.
        let credits = read.open_table(ID_TO_CREDITS).expect("open");
        row(
            "format 2 miss, transaction and tables reused",
            n,
            round,
            |i, hash| format_2_reads(&table, &credits, i, hash),
        );
    }
}
