//! The redb store: opening and format checks, id allocation, meta entries and typed record
//! access inside transactions. Every write goes through one `WriteTransaction` so that a
//! record, its indexes and its audit event commit together or not at all.

pub(crate) mod tables;
mod txn;
mod unwritten;

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};

use crate::codec::{self, Record};
use crate::error::{CodecError, ConfigError, Error, Result};
use crate::hashing::HashScheme;
use crate::record::{KeyRecord, VerifyRecord};
use crate::secret::{MasterKey, context, shown_path};
use tables::{META, meta};
pub(crate) use txn::{ReadSnapshot, WriteTxn};
pub(crate) use unwritten::Unwritten;

/// First bytes of the `format` meta entry.
pub(crate) const MAGIC: &[u8; 8] = b"keyledgr";
/// The file format this build writes. History:
/// - 1: first release (accounts, keys, hashes, owner/prefix indexes, credits, routes, audit).
/// - 2: the hash index `key_hashes` (hash → key id) is replaced by `key_verify` (hash → the
///   key id and what verify checks, a `VerifyRecord`), so a cache miss reads one record
///   instead of two. A format-1 file is migrated when it is opened (see [`migrate_1_to_2`]).
/// - 3: an owner secret's value is sealed with its allowed hosts and version bound as
///   associated data, so they cannot be changed beside it (schema 2 of `SecretRecord`). A
///   format-2 file is migrated when it is opened (see [`migrate_2_to_3`]).
/// - 4: the BLAKE3 key-hash scheme is keyed apart from HMAC-SHA256 (format 3's was keyed
///   with HMAC's pepper key; its hashes now decode as `Blake3KeyedLegacy`, read only). A
///   format-3 file hashing with BLAKE3 moves to the new scheme when it is opened (see
///   [`migrate_3_to_4`]).
/// - 5: import reservations (`imported_hashes`, `imports_by_key`): the hash a key was
///   imported by stays reserved while the key exists (see [`migrate_4_to_5`]).
/// - 6: a new file's public ids and cursors are sealed with a salt of its own
///   ([`meta::ID_SALT`]); an older file moves to 6 without one, keeping its ids.
pub(crate) const FORMAT_VERSION: u32 = 8;

/// The opened database and what its meta table says.
pub(crate) struct Store {
    /// The cache misses' shared read snapshot (see [`Store::snapshot`]). Declared first, so
    /// dropped before the database it reads.
    snapshot: ArcSwapOption<ReadSnapshot>,
    /// Always `Some` until the store is dropped (see its `Drop`).
    db: Option<Database>,
    /// Moved on by every commit through [`WriteTxn`].
    generation: AtomicU64,
    /// Set once the ledger has closed: no write transaction begins after it.
    closed: AtomicBool,
    /// What redb said when it panicked on this file (see [`Store::guard`]): from then on
    /// nothing is read or written.
    broken: OnceLock<String>,
    /// Set when a commit failed: redb refuses every later write, but goes on answering reads
    /// from its page cache with the state from before that commit, which may have reached
    /// the disk all the same. From then on nothing is read or written, as after a panic.
    failed_commit: AtomicBool,
    /// Whether a commit made without a sync ([`WriteTxn::without_sync`]) may not be durable
    /// yet: what it wrote, and the audit events it appended, a crash may still undo. Set
    /// before such a commit, cleared by the next commit that syncs.
    unsynced: AtomicBool,
    /// Held by each [`WriteTxn`] from its beginning until it commits or rolls back.
    commit_order: Mutex<()>,
    /// Taken by a commit's in-memory effects before the commit gives up `commit_order` (see
    /// [`WriteTxn::commit_then`]): effects run in commit order, while the next transaction,
    /// the writer's included, need not wait for them.
    effects_order: Mutex<()>,
    /// Runs once, on the thread named, just before its next commit (tests of what may happen
    /// while a change commits).
    #[cfg(test)]
    pub(crate) before_commit: Mutex<Option<(std::thread::ThreadId, Pause)>>,
    /// Runs once, on the thread named, between a commit and its effects (tests of what may
    /// happen there).
    #[cfg(test)]
    pub(crate) after_commit: Mutex<Option<(std::thread::ThreadId, Pause)>>,
}

impl Drop for Store {
    fn drop(&mut self) {
        let (snapshot, db) = (self.snapshot.swap(None), self.db.take());
        match self.broken.get() {
            // redb may have left one of its locks poisoned when it panicked, and its drop
            // would then panic too: a damaged file must not take the process down.
            Some(_) => {
                let _ = std::panic::catch_unwind(AssertUnwindSafe(move || drop((snapshot, db))));
            }
            None => drop((snapshot, db)),
        }
    }
}

/// What a test runs at a point of a commit (see `Store::before_commit`, `Store::after_commit`).
#[cfg(test)]
pub(crate) type Pause = Box<dyn FnOnce() + Send>;

/// Meta values read at open.
pub(crate) struct OpenedMeta {
    pub(crate) hash_scheme: HashScheme,
    /// The file's public-id salt ([`meta::ID_SALT`]), if it has one.
    pub(crate) id_salt: Option<[u8; 16]>,
}

impl Store {
    /// Opens or creates the database at `path` and checks that it is a keyledger file of a
    /// known format, opened with the right master key.
    pub(crate) fn open(
        path: &Path,
        master: &MasterKey,
        page_cache_bytes: usize,
    ) -> Result<(Store, OpenedMeta)> {
        refuse_master_key_in_path(path, master)?;
        if std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0) {
            let path = shown_path(path);
            return Err(Error::EmptyFile { path });
        }
        // Named, as the other errors about the file name it: "Permission denied" alone does
        // not say which file (found by a reviewer).
        let (file, created) = open_file(path).map_err(|e| {
            let e = std::io::Error::new(e.kind(), format!("{}: {e}", shown_path(path)));
            redb::DatabaseError::from(redb::StorageError::Io(e))
        })?;
        let opened = redb::backends::FileBackend::new(file)
            .map_err(Error::from)
            .and_then(|backend| Store::open_backend_at(backend, path, master, page_cache_bytes));
        // A file this call created holds nothing yet when the open fails (a full disk fails
        // redb's first write): removed, or every later open would refuse it as a ledger that
        // lost its bytes, and a server retrying its start would never start (found by a
        // reviewer). Not when another open holds it: that one is making it a ledger.
        if created && opened.as_ref().is_err_and(|e| !matches!(e, Error::InUse)) {
            // The file itself, not a symbolic link to it.
            let _ = std::fs::canonicalize(path).and_then(std::fs::remove_file);
        }
        opened
    }

    /// Like [`open`](Self::open), on any redb storage backend (crash-simulating tests,
    /// in-memory ledgers).
    pub(crate) fn open_backend(
        backend: impl redb::StorageBackend,
        master: &MasterKey,
        page_cache_bytes: usize,
    ) -> Result<(Store, OpenedMeta)> {
        let path = Path::new("<storage backend>");
        Store::open_backend_at(backend, path, master, page_cache_bytes)
    }

    /// Opens `backend` (the file at `path`, for messages) with a page cache of at most
    /// `page_cache_bytes`.
    fn open_backend_at(
        backend: impl redb::StorageBackend,
        path: &Path,
        master: &MasterKey,
        page_cache_bytes: usize,
    ) -> Result<(Store, OpenedMeta)> {
        let db = unless_redb_panics(|| {
            Database::builder()
                .set_cache_size(page_cache_bytes)
                .create_with_backend(backend)
        })??;
        Store::init(db, path, master)
    }

    /// Opens an existing file of the current format for `check`, writing nothing: no tables
    /// created, no migration run. An older format is refused with [`Error::OlderFormat`].
    pub(crate) fn open_for_check(
        db: Database,
        path: &Path,
        master: &MasterKey,
    ) -> Result<(Store, OpenedMeta)> {
        let store = Store::new(db);
        let opened = store.guard(|| match store.format(path)? {
            None => Err(Error::NotALedger {
                path: shown_path(path),
            }),
            Some(found) if found < FORMAT_VERSION => Err(Error::OlderFormat {
                found,
                current: FORMAT_VERSION,
            }),
            Some(found) => store.opened_meta(master, found),
        })?;
        Ok((store, opened))
    }

    fn new(db: Database) -> Store {
        Store {
            snapshot: ArcSwapOption::empty(),
            db: Some(db),
            generation: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            broken: OnceLock::new(),
            failed_commit: AtomicBool::new(false),
            unsynced: AtomicBool::new(false),
            commit_order: Mutex::new(()),
            effects_order: Mutex::new(()),
            #[cfg(test)]
            before_commit: Mutex::new(None),
            #[cfg(test)]
            after_commit: Mutex::new(None),
        }
    }

    /// Fails once redb has panicked on the file (see [`guard`](Self::guard)) or a commit
    /// has failed (see `failed_commit`).
    pub(crate) fn usable(&self) -> Result<()> {
        self.db().map(drop)
    }

    /// Fails once redb has panicked on the file, with what it said (not after a commit
    /// that merely failed: see [`usable`](Self::usable)).
    pub(crate) fn not_panicked(&self) -> Result<()> {
        match self.broken.get() {
            Some(what) => Err(damaged(&format!("{what}; nothing more is read or written"))),
            None => Ok(()),
        }
    }

    /// The database, unless redb panicked on it or a commit failed before.
    fn db(&self) -> Result<&Database> {
        match (self.broken.get(), &self.db) {
            (None, Some(_)) if self.failed_commit.load(Ordering::Acquire) => {
                Err(Error::Storage(Box::new(redb::Error::PreviousIo)))
            }
            (None, Some(db)) => Ok(db),
            (Some(what), _) => Err(damaged(&format!("{what}; nothing more is read or written"))),
            (None, None) => Err(Error::Closed),
        }
    }

    /// Runs work that reads or writes the file, turning a panic of redb's into a typed
    /// error (see [`unless_redb_panics`]) — and, since redb may have left its state half
    /// changed, fencing the file off: every later call gets an error, and the database is
    /// dropped under a guard. Every public call that touches the file runs in one.
    pub(crate) fn guard<T>(&self, work: impl FnOnce() -> Result<T>) -> Result<T> {
        self.db()?;
        match std::panic::catch_unwind(AssertUnwindSafe(work)) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic_message(panic.as_ref());
                let error = damaged(&what);
                let _ = self.broken.set(what);
                Err(error)
            }
        }
    }

    /// The file's format version; `None` for a new, empty file.
    fn format(&self, path: &Path) -> Result<Option<u32>> {
        let read = self.db()?.begin_read()?;
        match read.open_table(META) {
            Ok(table) => Ok(Some(read_format(&table, path)?)),
            Err(TableError::TableDoesNotExist(_)) => {
                // Any table at all (multimap ones too) is another application's file.
                if read.list_tables()?.next().is_some()
                    || read.list_multimap_tables()?.next().is_some()
                {
                    return Err(Error::NotALedger {
                        path: shown_path(path),
                    });
                }
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a file that says it is older than format 3 holds what only later formats write:
    /// format 5's tables, or an owner secret sealed at schema 2. Its number was lowered then
    /// (it is not authenticated), maybe to have the re-seal of [`migrate_2_to_3`] bind the
    /// hosts of an old row put back with them edited (found by a reviewer). Checked before
    /// any migration writes.
    fn format_lowered(&self, master: &MasterKey, opened: &OpenedMeta) -> Result<bool> {
        use redb::TableHandle;
        let later = [
            tables::IMPORTED_HASHES.name(),
            tables::IMPORTS_BY_KEY.name(),
            tables::POOLS_BY_OWNER.name(),
        ];
        let read = self.db()?.begin_read()?;
        if read.list_tables()?.any(|t| later.contains(&t.name())) {
            return Ok(true);
        }
        let ids = crate::public_id::IdCipher::for_file(master, opened.id_salt.as_ref());
        crate::vault::secrets::any_sealed_at_schema_2(&read, master, &ids)
    }

    /// Checks that `master` is the key the file was created with and reads its hash scheme
    /// and id salt, as a file of `format` holds them.
    fn opened_meta(&self, master: &MasterKey, format: u32) -> Result<OpenedMeta> {
        let read = self.db()?.begin_read()?;
        let table = read.open_table(META)?;
        let damaged = |reason: String| CodecError::Corrupt {
            record: "meta",
            reason,
        };
        // Written with every file since the first release: a verifier gone or cut short is
        // damage (restore a backup), not another master key (found by a reviewer).
        match table.get(meta::VERIFIER)?.map(|v| v.value().to_vec()) {
            None => return Err(damaged("the master-key verifier is missing".into()).into()),
            Some(s) if s.len() != 32 => {
                return Err(damaged("the master-key verifier is not 32 bytes".into()).into());
            }
            Some(s) if !crate::hashing::hashes_equal_slices(&s, &verifier(master)) => {
                return Err(Error::WrongMasterKey);
            }
            Some(_) => {}
        }
        let hash_scheme = hash_scheme(&table)?;
        // Format 4 moved format 3's BLAKE3 scheme on; only a migration reads it as current.
        if format >= 4 && !hash_scheme.can_be_current() {
            let label = hash_scheme.label();
            return Err(damaged(format!("its current hash scheme, {label}, is read only")).into());
        }
        let id_salt = match table.get(meta::ID_SALT)? {
            // Format 7's mark of a file migrated without one.
            Some(v) if v.value().is_empty() => None,
            Some(v) => Some(
                v.value()
                    .try_into()
                    .map_err(|_| damaged("the public-id salt is not 16 bytes".into()))?,
            ),
            None if format >= 7 => {
                return Err(damaged(
                    "the public-id salt is missing: every public id and cursor would change".into(),
                )
                .into());
            }
            None => None,
        };
        Ok(OpenedMeta {
            hash_scheme,
            id_salt,
        })
    }

    /// The store over `db`, its format created, checked or migrated. Its reads run under
    /// [`guard`](Self::guard): the store is dropped after a redb panic, never during one.
    fn init(db: Database, path: &Path, master: &MasterKey) -> Result<(Store, OpenedMeta)> {
        let store = Store::new(db);
        let opened = store.guard(|| store.set_up(path, master))?;
        Ok((store, opened))
    }

    /// [`init`](Self::init)'s reads and writes.
    fn set_up(&self, path: &Path, master: &MasterKey) -> Result<OpenedMeta> {
        let store = self;
        let existing = store.format(path)?;
        if existing.is_none() {
            let txn = store.begin_write()?;
            {
                let mut table = txn.open_table(META)?;
                let mut format = MAGIC.to_vec();
                format.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
                table.insert(meta::FORMAT, format.as_slice())?;
                table.insert(meta::NEXT_ID, 1u64.to_le_bytes().as_slice())?;
                let scheme = postcard::to_allocvec(&HashScheme::HmacSha256 { pepper: 1 })
                    .expect("encode scheme");
                table.insert(meta::HASH_SCHEME, scheme.as_slice())?;
                table.insert(meta::VERIFIER, verifier(master).as_slice())?;
                let mut salt = [0u8; 16];
                getrandom::fill(&mut salt)
                    .map_err(|e| Error::Config(ConfigError::Randomness(e.to_string())))?;
                table.insert(meta::ID_SALT, salt.as_slice())?;
            }
            create_tables(&txn)?;
            txn.commit()?;
        }
        let format = existing.unwrap_or(FORMAT_VERSION);
        let opened = store.opened_meta(master, format)?;
        if existing.is_some_and(|format| format < 3) && store.format_lowered(master, &opened)? {
            return Err(lowered_format_error());
        }
        if existing == Some(1) {
            migrate_1_to_2(store)?;
        }
        if existing.is_some_and(|format| format < 3) {
            migrate_2_to_3(store, master)?;
        }
        let opened = match existing.is_some_and(|format| format < 4) {
            true => {
                migrate_3_to_4(store, opened.hash_scheme)?;
                store.opened_meta(master, 4)? // the current scheme may have moved on
            }
            false => opened,
        };
        if existing.is_some_and(|format| format < 5) {
            migrate_4_to_5(store)?;
        }
        if existing.is_some_and(|format| format < 6) {
            // Format 6 seals new files' ids with a salt of their own; an older file keeps the
            // ids it gave out (no salt), and an older build refuses the new ones.
            let txn = store.begin_write()?;
            set_format(&txn, 6)?;
            txn.commit()?;
        }
        if existing.is_some_and(|format| format < 7) {
            migrate_6_to_7(store, master)?;
        }
        if existing.is_some_and(|format| format < 8) {
            migrate_7_to_8(store, master)?;
        }
        // A migrated file was given every table with its last migration.
        if existing == Some(FORMAT_VERSION) {
            store.refuse_missing_tables()?;
        }
        Ok(opened)
    }

    /// A write transaction with two-phase commit (redb's advice for files that may hold
    /// attacker-supplied data) and immediate durability.
    pub(crate) fn begin_write(&self) -> Result<WriteTxn<'_>> {
        let in_turn = self.commit_order.lock();
        // Checked in turn: a change queued behind the close's last batch does not begin.
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let mut txn = self.db()?.begin_write()?;
        txn.set_two_phase_commit(true);
        Ok(WriteTxn::new(txn, self, in_turn))
    }

    /// The last audit sequence number a reader may be shown: every event up to it is
    /// durable. A commit made without a sync is made durable first, by a commit that syncs
    /// (nothing else in it): an event a crash could still undo must not be read, as its
    /// number would be given to the next event, which an exporter paging with
    /// `Audit::since` would then skip (found by a reviewer). `None` once the ledger refuses
    /// writes (see [`refuse_writes`](Self::refuse_writes)).
    ///
    /// Call it after beginning the read it bounds: `None` then also when no commit made
    /// without a sync is visible to that read (`unsynced` is set before such a commit and
    /// cleared only by a later commit that syncs), so that a read does not wait for the
    /// write turn (a writer batch, an admin change) unless it must.
    pub(crate) fn durable_audit_bound(&self) -> Result<Option<u64>> {
        if !self.unsynced.load(Ordering::Acquire) {
            return Ok(None);
        }
        let txn = match self.begin_write() {
            Ok(txn) => txn,
            Err(Error::Closed) => return Ok(None),
            Err(e) => return Err(e),
        };
        let last = txn
            .open_table(tables::AUDIT)?
            .last()?
            .map_or(0, |(k, _)| k.value());
        match self.unsynced.load(Ordering::Acquire) {
            true => txn.commit_change()?,
            false => txn.abort()?,
        }
        Ok(Some(last))
    }

    /// Refuses every write from now on (the ledger closed: its leases are back and its
    /// counters flushed, and nothing may change a balance behind them). In turn, after a
    /// commit made without a sync since the close's last batch (a rehash racing the close)
    /// is made durable: nothing read after the close may be undone by a crash before the
    /// file is dropped. A failure here fences the store, as any failed commit does.
    pub(crate) fn refuse_writes(&self) -> Result<()> {
        let mut made_durable = Ok(());
        if let Ok(txn) = self.begin_write() {
            self.closed.store(true, Ordering::Release);
            match self.unsynced.load(Ordering::Acquire) {
                true => made_durable = txn.commit_change(),
                false => drop(txn.abort()),
            }
        }
        self.closed.store(true, Ordering::Release);
        made_durable
    }

    /// Whether [`refuse_writes`](Self::refuse_writes) was called.
    pub(crate) fn refuses_writes(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn begin_read(&self) -> Result<redb::ReadTransaction> {
        Ok(self.db()?.begin_read()?)
    }
}

/// Runs redb's work on a file not yet known to be sound (opening it, which repairs it after a
/// crash; the first reads of its meta and records; the integrity check), turning a panic into
/// a typed error. On some malformed pages redb
/// reaches an `assert!` or a slice index instead of returning `StorageError::Corrupted`
/// (cberner/redb#1277 and the like), and a corrupt file must get an error, never a crash.
pub(crate) fn unless_redb_panics<T>(f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .map_err(|panic| damaged(&panic_message(panic.as_ref())))
}

/// What a panic said.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// The error for a file whose read or write panicked: redb on a malformed page, most likely,
/// but the panic may be this crate's own, so the message says what happened, not whose.
fn damaged(what: &str) -> Error {
    Error::Storage(Box::new(redb::Error::Corrupted(format!(
        "the file may be corrupt: reading or writing it failed unexpectedly ({what})"
    ))))
}

/// Refuses a database path that holds the ledger's own master key (`KEYLEDGER_DB` and
/// `KEYLEDGER_MASTER_KEY` swapped, or the key pasted where the path goes), before anything
/// is read or created: otherwise a file named by the key is made, and every listing of its
/// directory shows the key. The error does not repeat the path.
pub(crate) fn refuse_master_key_in_path(path: &Path, master: &MasterKey) -> Result<()> {
    let text = zeroize::Zeroizing::new(path.to_string_lossy().into_owned());
    match master.appears_in(&text) {
        true => Err(Error::invalid(
            "database path",
            "it holds this ledger's master key (the path and the key swapped?); not shown, \
             and nothing was created",
        )),
        false => Ok(()),
    }
}

/// Opens the file at `path` for redb (as `Builder::create` does), creating it readable and
/// writable by its owner only on Unix — from its first instant: a descriptor another user
/// opened meanwhile would go on reading whatever is written later. The file holds no secret
/// in the clear, but names, metadata, the audit trail and the keys' hashes are nobody else's
/// business. An existing file keeps its mode. Also says whether this call created the file.
fn open_file(path: &Path) -> std::io::Result<(std::fs::File, bool)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.clone().create_new(true).open(path) {
        Ok(file) => Ok((file, true)),
        // Or a symbolic link (`O_EXCL` follows none, dangling or not): opened through it, its
        // target created if missing, as always (found by a reviewer: a dangling link failed).
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let target_existed = std::fs::metadata(path).is_ok();
            Ok((options.create(true).open(path)?, !target_existed))
        }
        Err(e) => Err(e),
    }
}

/// Runs `$each!(definition)` for every table of the current format but `meta`: one list
/// for the tables a new or migrated file is given and those an opened file must have.
macro_rules! for_every_table {
    ($each:ident) => {
        for table in ALL_RECORD_TABLES {
            $each!(table);
        }
        $each!(tables::KEY_VERIFY);
        $each!(tables::IMPORTED_HASHES);
        $each!(tables::IMPORTS_BY_KEY);
        $each!(tables::KEYS_BY_OWNER);
        $each!(tables::KEYS_BY_PREFIX);
        $each!(tables::POOLS_BY_OWNER);
        $each!(tables::ROUTES);
    };
}

/// Creates every table of the current format that `txn`'s file lacks.
fn create_tables(txn: &redb::WriteTransaction) -> Result<()> {
    macro_rules! create {
        ($table:expr) => {
            txn.open_table($table)?;
        };
    }
    for_every_table!(create);
    Ok(())
}

impl Store {
    /// Refuses a file of the current format that lacks one of its tables (every such file
    /// was given them all): opened, the first write would create it empty, what it held gone
    /// without a trace `check` could name — an audit trail numbered from 1 again, an
    /// exporter paging on from its last number skipping every new event (found by a
    /// reviewer).
    fn refuse_missing_tables(&self) -> Result<()> {
        let read = self.db()?.begin_read()?;
        macro_rules! require {
            ($table:expr) => {
                match read.open_table($table) {
                    Err(TableError::TableDoesNotExist(name)) => {
                        return Err(Error::Storage(Box::new(redb::Error::Corrupted(format!(
                            "its table `{name}` is missing: the file is damaged; restore it \
                             from a backup"
                        )))));
                    }
                    Err(e) => return Err(e.into()),
                    Ok(_) => {}
                }
            };
        }
        for_every_table!(require);
        Ok(())
    }
}

/// Tables keyed by id whose values are codec records; all created with a new file.
pub(crate) const ALL_RECORD_TABLES: [TableDefinition<'static, u64, &'static [u8]>; 6] = [
    tables::ACCOUNTS,
    tables::KEYS,
    tables::CREDITS,
    tables::AUDIT,
    tables::POOLS,
    tables::USAGE,
];

fn read_format(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    path: &Path,
) -> Result<u32> {
    let not_ledger = || Error::NotALedger {
        path: shown_path(path),
    };
    let format = table.get(meta::FORMAT)?.ok_or_else(not_ledger)?;
    let bytes = format.value();
    if bytes.len() != 12 || &bytes[..8] != MAGIC {
        return Err(not_ledger());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    // No release wrote format 0: whatever wrote it is not a ledger this code can migrate.
    if version == 0 {
        return Err(not_ledger());
    }
    if version > FORMAT_VERSION {
        return Err(Error::UpgradeRequired {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    Ok(version)
}

/// Format 1 → 2: every entry of the hash index `key_hashes` (hash → key id) becomes an entry
/// of `key_verify` (hash → `VerifyRecord`), built from the key record, and the old index is
/// deleted, in one transaction with the new format version: a crash leaves format 1 intact.
/// An index entry whose record is gone, does not decode or holds another hash is dropped, as
/// `check` would have reported it.
fn migrate_1_to_2(store: &Store) -> Result<()> {
    let txn = store.begin_write()?;
    {
        let old = txn.open_table(tables::KEY_HASHES_V1)?;
        let keys = txn.open_table(tables::KEYS)?;
        let mut verify = txn.open_table(tables::KEY_VERIFY)?;
        for entry in old.iter()? {
            let (hash, id) = entry?;
            let (hash, id) = (*hash.value(), id.value());
            // An undecodable record is `check`'s to report (its key cannot verify as it is),
            // not a reason to refuse the whole file, found by a reviewer.
            let Ok(Some(record)) = get::<KeyRecord>(&keys, id) else {
                continue;
            };
            let found = VerifyRecord::entries(id, &record).find(|(h, _)| *h == hash);
            if let Some((_, entry)) = found {
                verify.insert(&hash, codec::encode(&entry).as_slice())?;
            }
        }
    }
    txn.delete_table(tables::KEY_HASHES_V1)?;
    set_format(&txn, 2)?;
    txn.commit()?;
    Ok(())
}

/// Format 2 → 3: every owner secret is re-sealed with its hosts and version bound (see
/// `vault::secrets::reseal_for_format_3`), in one transaction with the new format version.
fn migrate_2_to_3(store: &Store, master: &MasterKey) -> Result<()> {
    let txn = store.begin_write()?;
    crate::vault::secrets::reseal_for_format_3(&txn, master)?;
    set_format(&txn, 3)?;
    txn.commit()?;
    Ok(())
}

/// The error for a file whose format number is lower than what it holds.
fn lowered_format_error() -> Error {
    Error::Codec(CodecError::Corrupt {
        record: "meta",
        reason: "the file's format number is older than the records it holds (altered?); \
                 refusing to migrate it"
            .into(),
    })
}

/// Format 4 keys BLAKE3 apart from HMAC-SHA256 (format 3's BLAKE3 scheme used HMAC's pepper
/// key). A file hashing new keys with BLAKE3 goes on with the new BLAKE3 scheme of the same
/// pepper version; its keys hashed the old way (`Blake3KeyedLegacy`, which decodes from
/// format 3's tag) are rehashed on first use, as after any rotation.
fn migrate_3_to_4(store: &Store, current: HashScheme) -> Result<()> {
    let txn = store.begin_write()?;
    if let HashScheme::Blake3KeyedLegacy { pepper } = current {
        set_hash_scheme(&txn, HashScheme::Blake3Keyed { pepper })?;
    }
    set_format(&txn, 4)?;
    txn.commit()?;
    Ok(())
}

/// Format 5 keeps import reservations (`imported_hashes`, `imports_by_key`): the migration
/// reserves the hash of every key still under `Sha256Imported` (as its current or its rolled
/// secret) and sets the format, in one transaction (after a crash the next open runs it
/// again). Keys already rehashed get none (their imported hash is gone), nor do keys imported
/// by their current-scheme hash (nothing tells them from created keys). A format change, not
/// just new tables: a build from before would write to the file without keeping them.
fn migrate_4_to_5(store: &Store) -> Result<()> {
    let txn = store.begin_write()?;
    {
        let keys = txn.open_table(tables::KEYS)?;
        let mut hashes = txn.open_table(tables::IMPORTED_HASHES)?;
        let mut by_key = txn.open_table(tables::IMPORTS_BY_KEY)?;
        for entry in keys.iter()? {
            let (k, v) = entry?;
            let id = k.value();
            // An undecodable record is `check`'s to report, not a reason to refuse the file.
            let Ok(record) = codec::decode::<KeyRecord>(v.value()) else {
                continue;
            };
            let imported = std::iter::once((record.key_hash, record.scheme))
                .chain(record.rolled.map(|old| (old.key_hash, old.scheme)))
                .find(|(_, scheme)| *scheme == HashScheme::Sha256Imported);
            if let Some((hash, _)) = imported
                && hashes.get(&hash)?.is_none()
            {
                hashes.insert(&hash, id)?;
                by_key.insert(id, &hash)?;
            }
        }
    }
    set_format(&txn, 5)?;
    txn.commit()?;
    Ok(())
}

/// Format 7: every record carries a CRC-32 of its bytes (see [`codec`]), and an import
/// reservation holds its hash keyed with the master key, not the plain SHA-256 of a key
/// (see `keys::index::reservation`). The migration seals every record written before,
/// without decoding it (one that does not decode stays so, for `check`), and keys every
/// reservation, in one transaction with the new format number: a crash leaves format 6
/// intact.
fn migrate_6_to_7(store: &Store, master: &MasterKey) -> Result<()> {
    let txn = store.begin_write()?;
    key_import_reservations(&txn, master)?;
    {
        // A file that moved to format 6 without an id salt says so (an empty one): from
        // format 7 on, a missing salt is damage, not an older file.
        let mut table = txn.open_table(META)?;
        if table.get(meta::ID_SALT)?.is_none() {
            table.insert(meta::ID_SALT, [].as_slice())?;
        }
    }
    for table in ALL_RECORD_TABLES {
        seal_table(&txn, table)?;
    }
    seal_table(&txn, tables::KEY_VERIFY)?;
    seal_table(&txn, tables::ROUTES)?;
    seal_table(&txn, crate::vault::tables::CONNECTORS)?;
    seal_table(&txn, crate::vault::tables::OWNER_SECRETS)?;
    set_format(&txn, 7)?;
    txn.commit()?;
    Ok(())
}

/// Format 8: a key imported by its SHA-256 is stored under the digest keyed with the master
/// key (`KeyHasher::imported`), never the plain digest, from which an old system's key can
/// be guessed offline (found by a reviewer: it stayed in freed pages after the key's first
/// use). The migration rekeys every secret still under `Sha256Imported`, in its record and
/// its verify entry, in one transaction with the new format number. The plain digests it
/// replaces may stay in the file's freed pages until redb writes over them.
///
/// Format 8 also indexes pools by owner (`pools_by_owner`): listing an account's pools read
/// every pool of every account. The migration fills it in the same transaction.
fn migrate_7_to_8(store: &Store, master: &MasterKey) -> Result<()> {
    let key = crate::hashing::import_key(master);
    let rekey = |hash: &mut [u8; 32], verify: &mut crate::keys::index::VerifyTable<'_>| {
        verify.remove(&*hash)?;
        *hash = crate::hashing::imported_sha256(&key, hash);
        Ok::<_, Error>(())
    };
    let txn = store.begin_write()?;
    {
        let mut keys = txn.open_table(tables::KEYS)?;
        let mut verify = txn.open_table(tables::KEY_VERIFY)?;
        let imported = HashScheme::Sha256Imported;
        let mut records = Vec::new();
        for entry in keys.iter()? {
            let (id, bytes) = entry?;
            // An undecodable record is `check`'s to report, not a reason to refuse the file.
            if let Ok(record) = codec::decode::<KeyRecord>(bytes.value()) {
                let rolled = record.rolled.as_ref().map(|old| old.scheme);
                if record.scheme == imported || rolled == Some(imported) {
                    records.push((id.value(), record));
                }
            }
        }
        for (id, mut record) in records {
            if record.scheme == imported {
                rekey(&mut record.key_hash, &mut verify)?;
            }
            if let Some(old) = record.rolled.as_mut().filter(|old| old.scheme == imported) {
                rekey(&mut old.key_hash, &mut verify)?;
            }
            crate::keys::index::put_entries(&mut verify, id, &record)?;
            keys.insert(id, codec::encode(&record).as_slice())?;
        }
        let pools = txn.open_table(tables::POOLS)?;
        let mut by_owner = txn.open_table(tables::POOLS_BY_OWNER)?;
        for entry in pools.iter()? {
            let (id, bytes) = entry?;
            // An undecodable pool is `check`'s to report; it is listed under no owner.
            if let Ok(pool) = codec::decode::<crate::record::PoolRecord>(bytes.value()) {
                by_owner.insert((pool.owner, id.value()), ())?;
            }
        }
    }
    // Every table of the format, in the commit that marks the file as of it (an older file
    // may never have had one its format did not use): a file of the current format lacking
    // one is damage (`refuse_missing_tables`), never a migration a crash cut short.
    create_tables(&txn)?;
    set_format(&txn, 8)?;
    txn.commit()?;
    Ok(())
}

/// Replaces each import reservation's plain hash with its keyed one, in both tables. There
/// is one per imported key, so they are read into memory together.
fn key_import_reservations(txn: &redb::WriteTransaction, master: &MasterKey) -> Result<()> {
    use crate::keys::index::reservation;
    let mut hashes = txn.open_table(tables::IMPORTED_HASHES)?;
    let plain: Vec<([u8; 32], u64)> = hashes
        .iter()?
        .map(|entry| entry.map(|(hash, id)| (*hash.value(), id.value())))
        .collect::<std::result::Result<_, _>>()?;
    hashes.retain(|_, _| false)?;
    for (hash, id) in &plain {
        hashes.insert(&reservation(master, hash), id)?;
    }
    let mut by_key = txn.open_table(tables::IMPORTS_BY_KEY)?;
    let plain: Vec<(u64, [u8; 32])> = by_key
        .iter()?
        .map(|entry| entry.map(|(id, hash)| (id.value(), *hash.value())))
        .collect::<std::result::Result<_, _>>()?;
    for (id, hash) in &plain {
        by_key.insert(id, &reservation(master, hash))?;
    }
    Ok(())
}

/// Seals every record of `table` that has no checksum yet, a few thousand at a time (a
/// table of a million keys is never copied into memory whole).
fn seal_table<K: redb::Key + 'static>(
    txn: &redb::WriteTransaction,
    table: TableDefinition<K, &'static [u8]>,
) -> Result<()> {
    use std::ops::Bound;
    const BATCH: usize = 4_096;
    let mut table = txn.open_table(table)?;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (mut sealed, mut last) = (Vec::new(), None);
        let range = match &after {
            None => table.range::<K::SelfType<'_>>(..)?,
            Some(key) => table.range((Bound::Excluded(K::from_bytes(key)), Bound::Unbounded))?,
        };
        for entry in range.take(BATCH) {
            let (key, value) = entry?;
            let key = K::as_bytes(&key.value()).as_ref().to_vec();
            if let Some(value) = codec::seal_legacy(value.value()) {
                sealed.push((key.clone(), value));
            }
            last = Some(key);
        }
        let Some(last) = last else {
            return Ok(());
        };
        for (key, value) in &sealed {
            table.insert(K::from_bytes(key), value.as_slice())?;
        }
        after = Some(last);
    }
}

fn set_format(txn: &redb::WriteTransaction, version: u32) -> Result<()> {
    let mut format = MAGIC.to_vec();
    format.extend_from_slice(&version.to_le_bytes());
    txn.open_table(META)?
        .insert(meta::FORMAT, format.as_slice())?;
    Ok(())
}

fn verifier(master: &MasterKey) -> [u8; 32] {
    blake3::keyed_hash(&master.derive(context::VERIFIER).0, b"keyledger master key").into()
}

/// Allocates the next internal id.
///
/// Never one in use: a counter set back (damage, or an edit; `check` reports it) would hand
/// out an existing account's, key's or pool's id, and a key and a pool of one id share a
/// balance and a usage record, so the id is at least one above the highest in use.
pub(crate) fn next_id(txn: &redb::WriteTransaction) -> Result<u64> {
    let in_use = highest_id_in_use(
        &txn.open_table(tables::ACCOUNTS)?,
        &txn.open_table(tables::KEYS)?,
        &txn.open_table(tables::POOLS)?,
    )?;
    let mut table = txn.open_table(META)?;
    let stored = stored_next_id(&table)?;
    // Ids never wrap: a wrapped counter would hand out ids of existing records.
    let exhausted = || CodecError::Corrupt {
        record: "meta",
        reason: "next_id is exhausted".into(),
    };
    let id = stored.max(in_use.checked_add(1).ok_or_else(exhausted)?);
    let next = id.checked_add(1).ok_or_else(|| CodecError::Corrupt {
        record: "meta",
        reason: "next_id is exhausted".into(),
    })?;
    table.insert(meta::NEXT_ID, next.to_le_bytes().as_slice())?;
    Ok(id)
}

/// The `next_id` meta entry (1 in a file that has none yet).
pub(crate) fn stored_next_id(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64> {
    match table.get(meta::NEXT_ID)? {
        Some(v) => Ok(u64::from_le_bytes(v.value().try_into().map_err(|_| {
            CodecError::Corrupt {
                record: "meta",
                reason: "next_id is not 8 bytes".into(),
            }
        })?)),
        None => Ok(1),
    }
}

/// The highest id an account, a key or a pool holds (one counter gives them all), 0 if none.
pub(crate) fn highest_id_in_use(
    accounts: &impl ReadableTable<u64, &'static [u8]>,
    keys: &impl ReadableTable<u64, &'static [u8]>,
    pools: &impl ReadableTable<u64, &'static [u8]>,
) -> Result<u64> {
    let last = |table: Option<(redb::AccessGuard<'_, u64>, _)>| table.map_or(0, |(k, _)| k.value());
    Ok(last(accounts.last()?)
        .max(last(keys.last()?))
        .max(last(pools.last()?)))
}

/// Reads and decodes one record.
pub(crate) fn get<R: Record>(
    table: &impl ReadableTable<u64, &'static [u8]>,
    id: u64,
) -> Result<Option<R>> {
    match table.get(id)? {
        Some(bytes) => Ok(Some(codec::decode(bytes.value())?)),
        None => Ok(None),
    }
}

/// Encodes and writes one record.
pub(crate) fn put<R: Record>(
    table: &mut redb::Table<u64, &'static [u8]>,
    id: u64,
    record: &R,
) -> Result<()> {
    table.insert(id, codec::encode(record).as_slice())?;
    Ok(())
}

/// The scheme new keys are hashed with, as stored (a file that never rotated: HMAC-SHA256
/// under pepper 1).
pub(crate) fn hash_scheme(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<HashScheme> {
    match table.get(meta::HASH_SCHEME)? {
        Some(v) => postcard::from_bytes(v.value()).map_err(|e| {
            Error::from(CodecError::Corrupt {
                record: "meta",
                reason: e.to_string(),
            })
        }),
        // Written with every file since the first release: gone is damage, not "never
        // rotated" (read as HMAC-SHA256 under pepper 1, it undid a rotation as keys were
        // used; found by a reviewer).
        None => Err(Error::from(CodecError::Corrupt {
            record: "meta",
            reason: "the hash scheme is missing".into(),
        })),
    }
}

/// Live hashes per scheme, so verify only tries old schemes while such records exist.
pub(crate) fn scheme_counts(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<BTreeMap<HashScheme, u64>> {
    match table.get(meta::SCHEME_COUNTS)? {
        Some(v) => {
            let list: Vec<(HashScheme, u64)> =
                postcard::from_bytes(v.value()).map_err(|e| CodecError::Corrupt {
                    record: "meta",
                    reason: e.to_string(),
                })?;
            Ok(list.into_iter().collect())
        }
        None => Ok(BTreeMap::new()),
    }
}

/// Adds `delta` (may be negative) to the count of hashes under `scheme`.
pub(crate) fn adjust_scheme_count(
    txn: &redb::WriteTransaction,
    scheme: HashScheme,
    delta: i64,
) -> Result<BTreeMap<HashScheme, u64>> {
    let mut table = txn.open_table(META)?;
    let mut counts = scheme_counts(&table)?;
    let entry = counts.entry(scheme).or_default();
    *entry = entry.saturating_add_signed(delta);
    counts.retain(|_, n| *n > 0);
    let list: Vec<(HashScheme, u64)> = counts.iter().map(|(s, n)| (*s, *n)).collect();
    table.insert(
        meta::SCHEME_COUNTS,
        postcard::to_allocvec(&list).expect("encode").as_slice(),
    )?;
    Ok(counts)
}

/// Sets the scheme new keys are hashed with.
pub(crate) fn set_hash_scheme(txn: &redb::WriteTransaction, scheme: HashScheme) -> Result<()> {
    let mut table = txn.open_table(META)?;
    table.insert(
        meta::HASH_SCHEME,
        postcard::to_allocvec(&scheme).expect("encode").as_slice(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::index::VerifyTable;
    use crate::{Config, ImportKey, ImportedHash, Ledger, NewAccount, Presented};
    use sha2::{Digest, Sha256};

    fn config() -> Config {
        let master = MasterKey::from_bytes(&[7u8; 32]).unwrap();
        let config = Config::builder().master_key(master).legacy_prefix("sk_");
        config.build().unwrap()
    }

    /// Storage in memory that counts reads.
    #[derive(Debug, Default)]
    struct CountingReads {
        inner: redb::backends::InMemoryBackend,
        reads: std::sync::Arc<std::sync::atomic::AtomicU64>,
    }

    impl redb::StorageBackend for CountingReads {
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.inner.write(offset, data)
        }
    }

    /// `page_cache_bytes` reaches redb: verify misses of keys read before are served from
    /// the default page cache, while through one of 16 KiB they read the storage again.
    #[test]
    fn the_page_cache_is_as_large_as_configured() {
        let storage_reads = |page_cache: Option<usize>| {
            let backend = CountingReads::default();
            let reads = backend.reads.clone();
            let master = MasterKey::generate().unwrap();
            let mut config = Config::builder().master_key(master).cache_capacity(16);
            if let Some(bytes) = page_cache {
                config = config.page_cache_bytes(bytes);
            }
            let ledger = Ledger::open_with_backend(backend, config.build().unwrap()).unwrap();
            let keys = crate::bench_support::bulk_insert(&ledger, 2_000, &mut |_| {}).unwrap();
            let verify_all = || {
                for key in &keys {
                    let grant = ledger.verify(&crate::Request::new(key, "/x").cost(0));
                    assert!(grant.is_ok(), "every key verifies");
                }
            };
            verify_all(); // every page read once; a cache of 16 keys: every verify a miss
            let before = reads.load(Ordering::Relaxed);
            verify_all();
            reads.load(Ordering::Relaxed) - before
        };
        assert_eq!(storage_reads(None), 0, "1 GiB holds every page");
        assert!(
            storage_reads(Some(16 * 1024)) >= 1_000,
            "16 KiB holds four pages"
        );
    }

    /// A format-7 file (made from a format-8 one by putting the plain digests back in the
    /// records and verify entries, as format 7 stored them) with an imported key rolled within
    /// its grace and an unused one: after the migration both verify, both digests stay
    /// reserved, and `check` finds nothing (written by a reviewer of the migration).
    #[test]
    fn a_format_7_file_with_a_rolled_and_an_unused_import_migrates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.redb");
        let (rolled, unused) = (
            "sk_AAAAbbbbCCCCddddEEEEffff1",
            "sk_ZZZZyyyyXXXXwwwwVVVVuuuu3",
        );
        let digest = |key: &str| -> [u8; 32] { Sha256::digest(key.as_bytes()).into() };
        let (d1, d3) = (digest(rolled), digest(unused));
        let new_secret = {
            let ledger = Ledger::open(&path, config()).unwrap();
            let owner = ledger.accounts().create(NewAccount::new("A")).unwrap().id;
            let import = |name: &str, d, key: &str| {
                let hash = ImportedHash::Sha256(d);
                ImportKey::new(owner, name, hash, &key[..7], &key[key.len() - 4..])
            };
            let first = ledger.keys().import(import("one", d1, rolled)).unwrap();
            ledger.keys().import(import("three", d3, unused)).unwrap();
            let new = ledger.keys().roll(&first.id, 3_600).unwrap();
            ledger.close().unwrap();
            new.plaintext.expose().to_owned()
        };
        {
            let key = crate::hashing::import_key(&config().master_key);
            let plain = |h: &[u8; 32]| {
                [d1, d3]
                    .into_iter()
                    .find(|d| crate::hashing::imported_sha256(&key, d) == *h)
            };
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut keys = txn.open_table(tables::KEYS).unwrap();
                let mut verify: VerifyTable<'_> = txn.open_table(tables::KEY_VERIFY).unwrap();
                let all: Vec<(u64, KeyRecord)> = keys
                    .iter()
                    .unwrap()
                    .map(|e| e.unwrap())
                    .map(|(id, v)| (id.value(), codec::decode(v.value()).unwrap()))
                    .collect();
                let mut changed = 0;
                for (id, mut record) in all {
                    let rolled = record.rolled.as_mut().map(|old| &mut old.key_hash);
                    for hash in std::iter::once(&mut record.key_hash).chain(rolled) {
                        if let Some(d) = plain(hash) {
                            verify.remove(&*hash).unwrap();
                            *hash = d;
                            changed += 1;
                        }
                    }
                    crate::keys::index::put_entries(&mut verify, id, &record).unwrap();
                    keys.insert(id, codec::encode(&record).as_slice()).unwrap();
                }
                assert_eq!(changed, 2, "the rolled and the unused import");
            }
            set_format(&txn, 7).unwrap();
            txn.commit().unwrap();
        }
        let ledger = Ledger::open(&path, config()).unwrap();
        let works = |key: &str| ledger.authenticate(&Presented::new(key).unwrap()).is_ok();
        let owner = ledger.authenticate(&Presented::new(new_secret.as_str()).unwrap());
        let owner = owner.unwrap().owner;
        let again = |d| ImportKey::new(owner, "again", ImportedHash::Sha256(d), "sk_x", "");
        let conflict = |d| matches!(ledger.keys().import(again(d)), Err(Error::Conflict(_)));
        assert!(conflict(d1) && conflict(d3), "reserved before use");
        assert!(works(rolled), "the rolled import, in its grace");
        assert!(works(unused), "the unused import");
        assert!(conflict(d1) && conflict(d3), "reserved after use");
        ledger.close().unwrap();
        drop(ledger);
        let report = Ledger::check(&path, config()).unwrap();
        assert!(report.is_ok(), "{:?}", report.problems);
    }
}
