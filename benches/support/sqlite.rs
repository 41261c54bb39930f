//! The SQLite baseline shared by `examples/compare.rs` and `benches/sqlite.rs`: the same check
//! as keyledger's verify + commit, as one SQLite transaction per request.
//!
//! rusqlite, bundled, WAL; `synchronous=FULL` (the same durability promise as keyledger's
//! group-committed leases) or `synchronous=NORMAL`. Per request: hash the presented key with
//! HMAC-SHA256 from a precomputed keyed state (as keyledger does), then `BEGIN IMMEDIATE`;
//! `SELECT` the key's state, expiry and credits by hash; check them; `UPDATE` credits =
//! credits − 1 when credits ≥ 1; `COMMIT`.

use hmac::{Hmac, KeyInit, Mac};
use keyledger::Presented;
use rusqlite::{Connection, params};
use sha2::Sha256;

/// A SQLite database holding the same keys as a keyledger workload, by HMAC hash.
pub struct Baseline {
    conn: Connection,
    state: Hmac<Sha256>,
    now: i64,
}

impl Baseline {
    /// A database in `dir` with `synchronous` (`"FULL"` or `"NORMAL"`) holding `keys`, each
    /// with 10¹² credits (as the keyledger workload gives them).
    pub fn new(
        dir: &std::path::Path,
        synchronous: &str,
        keys: &[Presented],
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let mut pepper = [0u8; 32];
        pepper[0] = 1;
        let state = Hmac::<Sha256>::new_from_slice(&pepper)?;
        let conn = Connection::open(dir.join(format!("baseline-{synchronous}.sqlite")))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.execute_batch(
            "CREATE TABLE keys (
                 hash BLOB PRIMARY KEY,
                 disabled INTEGER NOT NULL,
                 expires_at INTEGER,
                 credits INTEGER NOT NULL
             ) WITHOUT ROWID;",
        )?;
        let tx = conn.unchecked_transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO keys (hash, disabled, expires_at, credits) VALUES (?1, 0, NULL, ?2)",
            )?;
            for key in keys {
                insert.execute(params![hash(&state, key).as_slice(), 1_000_000_000_000i64])?;
            }
        }
        tx.commit()?;
        Ok(Baseline {
            conn,
            state,
            now: 1_700_000_000_000,
        })
    }

    /// One request as one SQLite transaction: look up, check, decrement. `false`: refused
    /// (or the transaction failed, and was rolled back).
    pub fn check(&self, key: &Presented) -> bool {
        let h = hash(&self.state, key);
        let conn = &self.conn;
        let run = || -> rusqlite::Result<bool> {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            let row: Option<(i64, Option<i64>, i64)> = {
                let mut select = conn.prepare_cached(
                    "SELECT disabled, expires_at, credits FROM keys WHERE hash = ?1",
                )?;
                let mut rows = select.query(params![h.as_slice()])?;
                match rows.next()? {
                    Some(r) => Some((r.get(0)?, r.get(1)?, r.get(2)?)),
                    None => None,
                }
            };
            let ok = matches!(row, Some((0, expires, credits))
                if expires.is_none_or(|e| e > self.now) && credits >= 1);
            if ok {
                conn.prepare_cached(
                    "UPDATE keys SET credits = credits - 1 WHERE hash = ?1 AND credits >= 1",
                )?
                .execute(params![h.as_slice()])?;
            }
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(ok)
        };
        run().unwrap_or_else(|_| {
            let _ = conn.execute_batch("ROLLBACK");
            false
        })
    }
}

fn hash(state: &Hmac<Sha256>, key: &Presented) -> [u8; 32] {
    let mut mac = state.clone();
    mac.update(key.expose().as_bytes());
    mac.finalize().into_bytes().into()
}
