//! Transactions as the store hands them out: every write commits through [`WriteTxn`], which
//! moves the store's commit generation on; cache misses read through a shared
//! [`ReadSnapshot`], reused until the next commit, because opening a redb table (a look-up in
//! its table tree) costs more than the read itself (docs/PERFORMANCE.md, "Eighth round").

use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use parking_lot::MutexGuard;

use super::Store;
use super::tables::{ACCOUNTS, CREDITS, KEY_VERIFY, USAGE};
use crate::error::Result;

/// A write transaction of this store. Derefs to redb's; [`commit`](Self::commit) also
/// retires the shared read snapshot, so no miss after the commit reads older data.
///
/// Write transactions take turns, one at a time from beginning to commit; a commit's
/// in-memory effects ([`commit_then`](Self::commit_then)) take a second turn before the
/// first is given up. Two admin changes from two threads then reach the cache, the meters
/// and the route table in the order they reached the file, and the next transaction need
/// not wait for the effects of the last (a route change recompiles every cached key).
pub(crate) struct WriteTxn<'s> {
    txn: redb::WriteTransaction,
    store: &'s Store,
    /// Whether its commit syncs (see [`without_sync`](Self::without_sync)).
    synced: bool,
    /// Declared after `txn`, so that a transaction dropped uncommitted rolls back before the
    /// next one's turn.
    in_turn: MutexGuard<'s, ()>,
}

impl<'s> WriteTxn<'s> {
    pub(super) fn new(
        txn: redb::WriteTransaction,
        store: &'s Store,
        in_turn: MutexGuard<'s, ()>,
    ) -> Self {
        WriteTxn {
            txn,
            store,
            synced: true,
            in_turn,
        }
    }

    /// Commits without a sync of its own: durable with the next commit that syncs (redb's
    /// `Durability::None`, kept in this process's memory until then). A crash before then
    /// undoes it whole. For changes that nothing depends on having lasted (a rehash); the
    /// audit trail shows no event of one until it is durable (see
    /// [`Store::durable_audit_bound`]).
    pub(crate) fn without_sync(&mut self) -> Result<()> {
        self.txn
            .set_durability(redb::Durability::None)
            .map_err(redb::Error::from)?;
        self.synced = false;
        Ok(())
    }

    /// Commits, then moves the commit generation on (also when the commit failed: whatever
    /// it left, the next miss reads afresh).
    pub(crate) fn commit(self) -> std::result::Result<(), redb::CommitError> {
        self.commit_inner().map(drop)
    }

    /// [`commit`](Self::commit)s an administrative change, then runs `effects` — what the
    /// change does in memory — before the next write transaction of this store may begin.
    ///
    /// The effects run also when the commit failed: it may have reached the disk (the disk
    /// failed at its last sync), and this process must not go on serving what the change
    /// revoked. They must therefore be safe for a change that did not land either — drops
    /// from the cache and the like, after which a miss reads the store, which a failed
    /// commit has fenced off (`unavailable`). `effects` is told whether the commit
    /// succeeded. Such a failure is `Error::Uncertain`.
    pub(crate) fn commit_then<T>(self, effects: impl FnOnce(bool) -> T) -> Result<T> {
        let store = self.store;
        let (in_turn, failed) = match self.commit_inner() {
            Ok((_, in_turn)) => (Some(in_turn), None),
            Err(e) => (None, Some(e)),
        };
        let effects_turn = store.effects_order.lock();
        drop(in_turn);
        #[cfg(test)]
        pause(&store.after_commit);
        let done = effects(failed.is_none());
        drop(effects_turn);
        match failed {
            None => Ok(done),
            Some(e) => Err(uncertain(e)),
        }
    }

    /// Commits an administrative change with no effects in memory; a failure is
    /// `Error::Uncertain`.
    pub(crate) fn commit_change(self) -> Result<()> {
        self.commit_inner().map(drop).map_err(uncertain)
    }

    /// Commits and moves the generation on; hands back the turn, still held.
    fn commit_inner(
        self,
    ) -> std::result::Result<(&'s Store, MutexGuard<'s, ()>), redb::CommitError> {
        let WriteTxn {
            txn,
            store,
            synced,
            in_turn,
        } = self;
        // A panic in redb's commit (or the backend's sync) is a failed commit too, and may
        // have landed as well: caught here, so that the change's effects run and its answer
        // says so; the file is fenced off as `Store::guard` would.
        #[cfg(test)]
        pause(&store.before_commit);
        if !synced {
            // Before the commit is visible: an audit read that sees it also sees this.
            store.unsynced.store(true, Ordering::Release);
        }
        let result = match std::panic::catch_unwind(AssertUnwindSafe(|| txn.commit())) {
            Ok(result) => result,
            Err(panic) => {
                let what = super::panic_message(panic.as_ref());
                let _ = store.broken.set(what.clone());
                let what = format!("the commit panicked: {what}");
                Err(redb::CommitError::Storage(redb::StorageError::Corrupted(
                    what,
                )))
            }
        };
        match result {
            // In turn: every commit before this one is durable now.
            Ok(()) if synced => store.unsynced.store(false, Ordering::Release),
            Ok(()) => {}
            // Before the next miss reads: redb would answer it from its page cache, with the
            // state from before this commit, which may be on the disk now (see
            // `Store::failed_commit`).
            Err(_) => store.failed_commit.store(true, Ordering::Release),
        }
        store.generation.fetch_add(1, Ordering::AcqRel);
        // Dropped now rather than at the next miss: a snapshot kept alive would hold back
        // the reuse of every page this and later commits free.
        store.snapshot.store(None);
        result.map(|()| (store, in_turn))
    }

    /// Rolls back (nothing changed: the shared snapshot stays).
    pub(crate) fn abort(self) -> std::result::Result<(), redb::StorageError> {
        self.txn.abort()
    }
}

impl Deref for WriteTxn<'_> {
    type Target = redb::WriteTransaction;
    fn deref(&self) -> &redb::WriteTransaction {
        &self.txn
    }
}

impl DerefMut for WriteTxn<'_> {
    fn deref_mut(&mut self) -> &mut redb::WriteTransaction {
        &mut self.txn
    }
}

/// The answer to an administrative change whose commit failed: it may have landed. Even
/// redb's "previous I/O error" may come after the commit wrote its header (another
/// thread's read failed meanwhile, and the commit's last sync was refused), so no commit
/// error says "not made" (found by a reviewer, by reading).
fn uncertain(e: redb::CommitError) -> crate::error::Error {
    crate::error::Error::Uncertain {
        what: "the change",
        reason: e.to_string(),
    }
}

/// A read transaction with the two tables every cache miss reads already open, and the
/// accounts and usage tables once a miss has needed them.
pub(crate) struct ReadSnapshot {
    /// The commit generation read before the transaction began: the snapshot holds every
    /// commit up to it (and maybe later ones).
    generation: u64,
    pub txn: redb::ReadTransaction,
    /// Key hash → verify record.
    pub verify: redb::ReadOnlyTable<&'static [u8; 32], &'static [u8]>,
    /// Balances.
    pub credits: IdTable,
    /// Opened by the first miss that needs each: an account not in memory, a key's lifetime
    /// spend (spend tiers). A table open costs a miss about as much as the read it is for
    /// (≈ 0.6 µs of an account's ≈ 1.5 µs, measured), and a snapshot serves many misses.
    accounts: OnceLock<IdTable>,
    usage: OnceLock<IdTable>,
}

/// A table of records by id.
type IdTable = redb::ReadOnlyTable<u64, &'static [u8]>;

impl ReadSnapshot {
    /// The accounts table.
    pub(crate) fn accounts(&self) -> Result<&IdTable> {
        self.opened(&self.accounts, ACCOUNTS)
    }

    /// The usage table.
    pub(crate) fn usage(&self) -> Result<&IdTable> {
        self.opened(&self.usage, USAGE)
    }

    /// `table` in `cell`, opened on first use (racing misses may both open it; one keeps its
    /// copy).
    fn opened<'s>(
        &'s self,
        cell: &'s OnceLock<IdTable>,
        table: redb::TableDefinition<u64, &'static [u8]>,
    ) -> Result<&'s IdTable> {
        if let Some(open) = cell.get() {
            return Ok(open);
        }
        let open = self.txn.open_table(table)?;
        Ok(cell.get_or_init(|| open))
    }
}

impl Store {
    /// A snapshot holding every commit made before this call began: the shared one if no
    /// commit came since it was taken, else a new one (then shared).
    ///
    /// Callers that must notice changes committed after their read (the miss path's epoch
    /// and removal counts) read those counts *before* calling this: a change bumps them only
    /// after its commit moved the generation on, so a snapshot reused here is never older
    /// than a change they did not see.
    pub(crate) fn snapshot(&self) -> Result<Arc<ReadSnapshot>> {
        self.usable()?;
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(shared) = self.snapshot.load_full()
            && shared.generation == generation
        {
            return Ok(shared);
        }
        let txn = self.begin_read()?;
        let fresh = Arc::new(ReadSnapshot {
            generation,
            verify: txn.open_table(KEY_VERIFY)?,
            credits: txn.open_table(CREDITS)?,
            accounts: OnceLock::new(),
            usage: OnceLock::new(),
            txn,
        });
        // Racing misses may store an older one over a newer: the generation check above
        // turns it away.
        self.snapshot.store(Some(fresh.clone()));
        Ok(fresh)
    }
}

/// Runs the pause in `slot` (`Store::before_commit`, `Store::after_commit`), if one waits
/// for this thread.
#[cfg(test)]
fn pause(slot: &parking_lot::Mutex<Option<(std::thread::ThreadId, super::Pause)>>) {
    let mut slot = slot.lock();
    if slot
        .as_ref()
        .is_some_and(|(thread, _)| *thread == std::thread::current().id())
    {
        let (_, pause) = slot.take().expect("checked");
        drop(slot);
        pause();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::MasterKey;

    fn balance_in(snapshot: &ReadSnapshot, id: u64) -> Option<Vec<u8>> {
        let got = snapshot.credits.get(id).unwrap();
        got.map(|v| v.value().to_vec())
    }

    /// After a panic in redb's code the file is fenced off: every later read, write and
    /// shared snapshot (which misses reuse) is refused with the panic's message, and the
    /// store drops without panicking (here the panic is simulated; the damage test in
    /// tests/bad_input.rs meets real ones).
    #[test]
    fn a_panic_under_the_guard_fences_the_file_off() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::from_bytes(&[9; 32]).unwrap();
        let (store, _) = Store::open(&dir.path().join("s.redb"), &master, 1 << 20).unwrap();
        let _cached = store.snapshot().unwrap();
        assert_eq!(store.guard(|| Ok(7)).unwrap(), 7);
        let failed = store.guard(|| -> Result<()> { panic!("simulated page damage") });
        let message = failed.unwrap_err().to_string();
        assert!(message.contains("simulated page damage"), "{message}");
        assert!(store.begin_read().is_err());
        assert!(store.begin_write().is_err());
        assert!(
            store.snapshot().is_err(),
            "the shared snapshot is not handed out"
        );
        let again = store.guard(|| Ok(())).unwrap_err().to_string();
        assert!(again.contains("simulated page damage"), "{again}");
        drop(store);
    }

    #[test]
    fn misses_share_a_snapshot_until_a_commit_and_then_see_it() {
        let dir = tempfile::tempdir().unwrap();
        let master = MasterKey::from_bytes(&[9; 32]).unwrap();
        let (store, _) = Store::open(&dir.path().join("s.redb"), &master, 1 << 20).unwrap();
        let first = store.snapshot().unwrap();
        assert!(Arc::ptr_eq(&first, &store.snapshot().unwrap()), "shared");

        // Balance 7 written as `value`, not committed yet.
        let write = |value: u8| {
            let txn = store.begin_write().unwrap();
            let mut credits = txn.open_table(CREDITS).unwrap();
            credits.insert(7, [value].as_slice()).unwrap();
            drop(credits);
            txn
        };
        // A rolled-back write changes nothing: the snapshot stays shared.
        write(1).abort().unwrap();
        assert!(Arc::ptr_eq(&first, &store.snapshot().unwrap()));

        // A committed one retires it: the next snapshot holds the write, the old one not.
        write(2).commit().unwrap();
        let after = store.snapshot().unwrap();
        assert!(!Arc::ptr_eq(&first, &after));
        assert_eq!(balance_in(&after, 7), Some(vec![2]));
        assert_eq!(
            balance_in(&first, 7),
            None,
            "a snapshot in use keeps its view"
        );
        assert!(
            Arc::ptr_eq(&after, &store.snapshot().unwrap()),
            "shared again"
        );
    }
}
