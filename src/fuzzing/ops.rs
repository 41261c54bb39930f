//! The operation-sequence driver behind the `ops` fuzz target and `tests/crash.rs`: bytes
//! choose a workload (keys, pools, verify + commit/refund at random costs, top-ups, sets,
//! refills, disables, deletes, pool deletions, keys moved between pools and their own
//! balances, low-balance threshold changes, account deletions, clean closes, power losses, a
//! dying disk), which runs on a [`CrashBackend`] against a reference model. After every
//! reopen the ledger must hold every acknowledged admin write, every balance must satisfy
//! `spent + lost_to_crash + remaining == granted` and `spent ≤ granted`, no unit the model
//! knows was charged may come back, what a crash lost must stay within the lease bound, and
//! `Ledger::check_with_backend` must pass.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use super::backend::{CrashBackend, CrashImage};
use crate::accounts::NewAccount;
use crate::clock::{ManualClock, Timestamp};
use crate::config::Config;
use crate::credits::meter::MAX_LEASE;
use crate::credits::{NewPool, PoolUpdate};
use crate::denial::Denial;
use crate::engine::Durability;
use crate::error::Error;
use crate::keyfmt::Presented;
use crate::keys::{KeyUpdate, NewKey};
use crate::ledger::Ledger;
use crate::record::{Refill, RefillInterval};
use crate::secret::MasterKey;
use crate::verify::{Grant, Request};

/// 2025-06-15T15:06:40Z, as in the end-to-end tests.
const START: Timestamp = Timestamp(1_750_000_000_000);
/// Most operations one input runs (keeps each run to milliseconds).
const MAX_OPS: usize = 64;
/// Most open → crash/close cycles per input.
const MAX_EPOCHS: usize = 5;
const REFILL_AMOUNT: u64 = 25;

/// The workload bytes for a seed (xorshift64*, 40–300 bytes): what `tests/crash.rs` runs
/// and the `ops` fuzz target's seed corpus starts from.
pub fn workload(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let len = 40 + (next() % 260) as usize;
    (0..len).map(|_| (next() >> 32) as u8).collect()
}

/// Reads choices from the input; an exhausted input ends the workload.
struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bytes<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = self.data.get(self.pos).copied();
        self.pos += 1;
        b
    }

    /// A value below `n` (0 once the input is exhausted).
    fn below(&mut self, n: u64) -> u64 {
        self.byte().map_or(0, |b| u64::from(b) % n)
    }

    fn exhausted(&self) -> bool {
        self.pos >= self.data.len()
    }
}

/// What one run did, for the tests' figures.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// Operations run.
    pub ops: usize,
    /// Admin writes acknowledged (and then checked after every reopen).
    pub acknowledged: usize,
    /// Power losses survived.
    pub crashes: usize,
    /// Clean closes.
    pub closes: usize,
    /// Whether the disk died during the run.
    pub disk_failed: bool,
    /// Units counted as lost to crashes, over all balances, at the end.
    pub lost_to_crash: u64,
    /// Successful grants.
    pub grants: usize,
    /// Pools deleted (acknowledged).
    pub pools_deleted: usize,
    /// Low-balance thresholds changed (acknowledged).
    pub thresholds_changed: usize,
    /// Pool refills set or removed (acknowledged).
    pub pool_refills_changed: usize,
    /// Keys moved into, between or out of pools (acknowledged).
    pub pool_moves: usize,
    /// Keys the cache evicted to make room.
    pub cache_evictions: u64,
    /// Accounts deleted once they owned nothing (acknowledged); a new one takes their place.
    pub accounts_deleted: usize,
}

/// A balance the model follows: a key's own credits or a pool.
#[derive(Debug, Clone)]
struct Balance {
    /// Upper bound on the credits left (exact while `exact`).
    ub: u64,
    /// Units ever granted (exact while `exact`).
    granted: u64,
    /// Whether `ub` and `granted` are exact (no refill, no unacknowledged change).
    exact: bool,
    refill: bool,
    /// The clock passed a refill boundary since the last acknowledged `set` or `top_up`: a
    /// refill may be due and not applied yet (it is applied lazily, at the next lease), so
    /// the durable balance read after a reopen may still become the refill amount. A `set`
    /// or `top_up` applies a due refill before its own change, so it clears this.
    refill_pending: bool,
    /// Upper bound on the balance as it was before the refill `refill_pending` speaks of:
    /// removing the refill cancels that refill, and the balance it would have replaced stays.
    before_refill: u64,
    /// Stamp (unique over the run) of the latest acknowledged `set`, or of the balance's
    /// creation: a reservation made before the latest set is not refunded (the set is final),
    /// its units leave `granted` instead.
    epoch: u64,
    /// Stamp of the balance's creation. A grant reserved before it spent from an earlier
    /// balance under the same id (the key was made unmetered, then metered again): nothing
    /// it does reaches this one.
    born: u64,
    /// Reserved units dropped from the books after a `set`, not yet known to be durable (the
    /// writer records the discard asynchronously; a crash first counts them as lost).
    discarded: u64,
    /// Units charged by acknowledged commits, plus what crashes lost, over the balance's life.
    charged: u64,
    /// `spent` seen at the last flush.
    spent_flushed: u64,
    /// `lost_to_crash` seen at the last reopen.
    lost: u64,
    /// Costs of the verifies tried in this epoch (the lease bound under `Durability::Exact`).
    attempted: u64,
    /// Units reserved by grants held right now.
    held: u64,
    /// Units charged since the last flush the model knows of.
    unflushed: u64,
    /// The balance exists for sure (`None`: an unacknowledged create or delete).
    exists: Option<bool>,
}

impl Model {
    /// A new stamp for a balance's creation or `set`.
    fn stamp(&mut self) -> u64 {
        self.stamps += 1;
        self.stamps
    }

    /// The balance a grant reserved from at stamp `epoch`, unless it has gone since
    /// (possibly replaced by a new balance under the same id).
    fn balance_of(&mut self, credit: &Option<String>, epoch: u64) -> Option<&mut Balance> {
        let bal = self.balances.get_mut(credit.as_ref()?)?;
        (bal.born <= epoch).then_some(bal)
    }

    /// The account was deleted, so it owned nothing: every key and pool the model made for it
    /// is gone (those in doubt never landed, or were deleted), with their balances: grants
    /// still held on them refund nowhere.
    fn account_deleted(&mut self) {
        let account = self.account.take().or(self.account_in_doubt.take());
        self.deleted_accounts.extend(account);
        for key in &mut self.keys {
            key.exists = Some(false);
            if key.credit.as_ref() == Some(&key.id) {
                self.balances.remove(&key.id);
            }
        }
        for pool in self.pools.drain(..) {
            self.balances.remove(&pool);
        }
        self.maybe_pool_users.clear();
        self.maybe_unknown_owned = false;
        self.outcome.accounts_deleted += 1;
    }

    /// Notes a dead disk; returns whether results are now loose.
    fn check_disk(&mut self) -> bool {
        if self.backend.has_failed() {
            self.faulted = true;
            self.outcome.disk_failed = true;
        }
        self.faulted
    }
}

impl Balance {
    fn new(credits: u64, refill: bool, stamp: u64) -> Self {
        Balance {
            ub: credits,
            granted: credits,
            exact: !refill,
            refill,
            refill_pending: false,
            before_refill: 0,
            epoch: stamp,
            born: stamp,
            discarded: 0,
            charged: 0,
            spent_flushed: 0,
            lost: 0,
            attempted: 0,
            held: 0,
            unflushed: 0,
            exists: Some(true),
        }
    }
}

#[derive(Debug, Clone)]
struct Key {
    id: String,
    plaintext: String,
    name: String,
    /// Credit id (`key_…` or `pool_…`) in `Model::balances`; `None`: unmetered.
    credit: Option<String>,
    disabled: bool,
    /// `None`: an unacknowledged change may or may not have landed.
    exists: Option<bool>,
    certain: bool,
}

#[derive(Default)]
struct Model {
    /// The account keys and pools are made for (`None`: deleted, a new one not made yet).
    account: Option<String>,
    /// An account whose deletion failed on a dying disk: it may have landed. Nothing is made
    /// for it; the next reopen finds out.
    account_in_doubt: Option<String>,
    /// Accounts whose deletion was acknowledged: they must stay gone.
    deleted_accounts: Vec<String>,
    /// A key or pool creation failed on a dying disk: one the model never learnt of may
    /// exist, and keep its account from being deleted.
    maybe_unknown_owned: bool,
    keys: Vec<Key>,
    pools: Vec<String>,
    balances: BTreeMap<String, Balance>,
    outcome: Outcome,
    /// The disk has died in this epoch: errors are expected, results are loose.
    faulted: bool,
    /// Keys whose disable or delete answered `Error::Uncertain` in this epoch: it may have
    /// landed, so this process must not serve them again (a reopened ledger may).
    revocations_in_doubt: BTreeSet<usize>,
    /// Pools a key creation that failed (the disk died) may still have given a key: the
    /// creation may have committed, and the model never learnt the key's id.
    maybe_pool_users: BTreeSet<String>,
    exact_durability: bool,
    /// Last stamp handed out (see `Balance::epoch`).
    stamps: u64,
    /// An open has succeeded: the file exists for good (before, a crash may leave it
    /// half-created).
    opened: bool,
    backend: CrashBackend,
    log: String,
}

type Violation = String;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// A grant held across operations, with what the model reserved for it.
struct Held<'l> {
    grant: Grant<'l>,
    credit: Option<String>,
    epoch: u64,
}

/// Runs the workload `data` describes; returns the first invariant violation.
pub fn run(data: &[u8]) -> Result<Outcome, Violation> {
    let mut b = Bytes { data, pos: 0 };
    let durability = if b.below(2) == 0 {
        Durability::Leased
    } else {
        Durability::Exact
    };
    let cache = if b.below(2) == 0 { 2 } else { 1_000 };
    // A disk that dies: late in one workload of four, early in another (mostly within the
    // first epoch's batches, where a commit that fails at its last sync is likelier), and
    // at one of its first 64 syncs in a third (every write before it made, so a commit
    // whose last sync it is has landed in the image that keeps every write). Healthy in the
    // fourth.
    let (countdown, failing_sync) = match b.below(4) {
        0 => (Some(b.below(256) * 3), None),
        2 => (Some(b.below(256)), None),
        3 => (None, Some(b.below(64) + 1)),
        _ => (None, None),
    };
    let clock = ManualClock::new(START);
    // With the small cache, flush rounds start every millisecond (the writer's chunked
    // rounds run between almost every batch); with the large one, at the default interval.
    let flush_every = std::time::Duration::from_millis(if cache == 2 { 1 } else { 30_000 });
    let config = Config::builder()
        .master_key(MasterKey::from_bytes(&[7u8; 32]).expect("32 bytes"))
        .clock(clock.clone())
        .durability(durability)
        .cache_capacity(cache)
        .usage_flush_interval(flush_every)
        .build()
        .expect("valid config");
    let mut model = Model {
        exact_durability: durability == Durability::Exact,
        ..Model::default()
    };
    let _ = write!(
        model.log,
        "durability={durability:?} cache={cache} countdown={countdown:?} failing_sync={failing_sync:?} flush_every={flush_every:?};"
    );
    let mut backend = CrashBackend::new();
    if let Some(n) = countdown {
        backend.fail_after(n);
    }
    if let Some(nth) = failing_sync {
        backend.fail_sync(nth);
    }
    let mut epoch = 0;
    while epoch < MAX_EPOCHS {
        epoch += 1;
        let ledger = match open(&mut backend, &config, &model) {
            Ok(l) => l,
            Err(e) => {
                ensure!(backend.has_failed(), "open failed on a healthy disk: {e}");
                model.outcome.disk_failed = true;
                backend = backend.power_loss(CrashImage::DurableOnly);
                continue;
            }
        };
        model.opened = true;
        model.faulted = false;
        model.revocations_in_doubt.clear();
        model.backend = backend.clone();
        reconcile(&ledger, &mut model, epoch > 1)?;
        let end = run_epoch(&ledger, &mut model, &mut b, &clock, &backend)?;
        // Half the power losses keep some unsynced writes; one in four of those keeps all
        // of them (then a commit that failed at its last sync has landed).
        let image = match b.below(2) {
            0 => CrashImage::DurableOnly,
            _ => match b.byte().unwrap_or(1) {
                byte if byte % 4 == 3 => CrashImage::AllWritten,
                byte => CrashImage::Torn(u64::from(byte) + 1),
            },
        };
        model.outcome.cache_evictions += ledger.stats().cache_evictions;
        match end {
            End::Close if !model.faulted => {
                ensure!(
                    ledger.close().is_ok() || backend.has_failed(),
                    "clean close failed on a healthy disk"
                );
                if !backend.has_failed() {
                    model.outcome.closes += 1;
                    let _ = write!(model.log, " close;");
                }
                drop(ledger);
                backend = backend.power_loss(CrashImage::DurableOnly);
            }
            _ => {
                let crashed = backend.crash_image(image);
                backend.kill();
                ledger.simulate_crash();
                backend = CrashBackend::from_bytes(crashed);
                model.outcome.crashes += 1;
                let _ = write!(model.log, " crash({image:?});");
            }
        }
        if b.exhausted() {
            break;
        }
    }
    let ledger = open(&mut backend, &config, &model)
        .map_err(|e| format!("final reopen failed: {e} [{}]", model.log))?;
    reconcile(&ledger, &mut model, true).map_err(|v| format!("{v} [{}]", model.log))?;
    model.outcome.lost_to_crash = model.balances.values().map(|b| b.lost).sum();
    drop(ledger);
    let report = Ledger::check_with_backend(backend, config)
        .map_err(|e| format!("check could not open the file: {e} [{}]", model.log))?;
    ensure!(
        report.is_ok(),
        "check failed: {:?} [{}]",
        report.problems,
        model.log
    );
    Ok(model.outcome)
}

/// Opens the ledger on `backend`. A power loss inside redb's initialisation of a new file
/// (the header synced, the magic number that marks the file initialised not yet) leaves a
/// file redb refuses to open (`Error::Storage`: not a redb database). Until an open has
/// succeeded nothing was acknowledged, so the model does what an operator would: it starts
/// over with a new file.
fn open(backend: &mut CrashBackend, config: &Config, model: &Model) -> Result<Ledger, Error> {
    match Ledger::open_with_backend(backend.clone(), config.clone()) {
        Err(Error::Storage(_)) if !model.opened && !backend.has_failed() => {
            *backend = CrashBackend::new();
            Ledger::open_with_backend(backend.clone(), config.clone())
        }
        other => other,
    }
}

/// The `ops` fuzz target: any input runs without a panic or an invariant violation.
pub fn ops(data: &[u8]) {
    if let Err(violation) = run(data) {
        panic!("invariant violated: {violation}");
    }
}

enum End {
    Crash,
    Close,
}

/// Runs operations until the input, the operation budget or the disk runs out, or the input
/// asks for a crash or a close; then settles what is still held.
fn run_epoch(
    ledger: &Ledger,
    model: &mut Model,
    b: &mut Bytes<'_>,
    clock: &ManualClock,
    backend: &CrashBackend,
) -> Result<End, Violation> {
    let mut held = Vec::new();
    let end = run_ops(ledger, model, b, clock, backend, &mut held)?;
    // Grants still held are dropped, refunding their reservations, before the close or the
    // crash: a close returns them with the leases; a crash loses them — unless the balance
    // was `set` since they were reserved, in which case the writer discards them from
    // `granted` in a batch of its own, which the crash image may or may not hold.
    for h in held.drain(..) {
        refund(model, &h.credit, h.grant.reserved(), h.epoch);
        if let Some(bal) = model.balance_of(&h.credit, h.epoch) {
            bal.held = bal.held.saturating_sub(h.grant.reserved());
        }
        drop(h.grant);
    }
    Ok(end)
}

fn run_ops<'l>(
    ledger: &'l Ledger,
    model: &mut Model,
    b: &mut Bytes<'_>,
    clock: &ManualClock,
    backend: &CrashBackend,
    held: &mut Vec<Held<'l>>,
) -> Result<End, Violation> {
    let mut after_fault = 0;
    loop {
        if model.account.is_none() && model.account_in_doubt.is_none() {
            match ledger.accounts().create(NewAccount::new("Acme")) {
                Ok(a) => {
                    model.account = Some(a.id.to_string());
                    model.outcome.acknowledged += 1;
                }
                Err(_) => model.faulted = true,
            }
        }
        if model.outcome.ops >= MAX_OPS || b.exhausted() {
            return Ok(End::Crash);
        }
        if backend.has_failed() {
            model.faulted = true;
            model.outcome.disk_failed = true;
            after_fault += 1;
            if after_fault > 3 {
                return Ok(End::Crash);
            }
        }
        model.outcome.ops += 1;
        let op = b.below(20);
        let result = match op {
            0 | 1 => create_key(ledger, model, b),
            2 => create_pool(ledger, model, b),
            3..=6 => verify(ledger, model, b, held),
            7 => adjust(ledger, model, b, true),
            8 => adjust(ledger, model, b, false),
            9 => toggle(ledger, model, b),
            10 => delete(ledger, model, b),
            11 => rename(ledger, model, b),
            12 => usage(ledger, model, b),
            13 => {
                clock.advance_secs(32 * 86_400);
                let _ = write!(model.log, " +32d;");
                for bal in model.balances.values_mut().filter(|x| x.refill) {
                    bal.before_refill = match bal.refill_pending {
                        true => bal.before_refill.max(bal.ub),
                        false => bal.ub,
                    };
                    bal.ub = bal.ub.max(REFILL_AMOUNT);
                    bal.refill_pending = true;
                }
                Ok(())
            }
            14 => settle_held(model, b, held),
            15 if b.below(2) == 0 => update_credits(ledger, model, b),
            15 => move_pool(ledger, model, b),
            16 => return Ok(End::Crash),
            17 => return Ok(End::Close),
            18 => delete_pool(ledger, model, b),
            _ => change_threshold(ledger, model, b),
        };
        result?;
    }
}

fn pick_index(model: &Model, b: &mut Bytes<'_>) -> Option<usize> {
    (!model.keys.is_empty()).then(|| b.below(model.keys.len() as u64) as usize)
}

/// An operation failed: fine once the disk has died, a violation before.
fn failed(model: &mut Model, what: &str, e: &Error) -> Result<(), Violation> {
    if model.backend.has_failed() {
        model.faulted = true;
    }
    ensure!(
        model.faulted,
        "{what} failed on a healthy disk: {e} [{}]",
        model.log
    );
    Ok(())
}

fn create_key(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    let Some(owner) = model.account.clone() else {
        return Ok(());
    };
    let mode = b.below(4);
    let credits = b.below(40);
    let name = format!("key {}", model.keys.len());
    let mut new = NewKey::new(&owner, &name);
    let mut pool = None;
    match mode {
        0 => {}
        1 => new = new.credits(credits),
        2 => {
            new = new
                .credits(credits)
                .refill(REFILL_AMOUNT, RefillInterval::Monthly)
        }
        _ => match model.pools.last() {
            Some(p) => {
                new = new.pool(p.clone());
                pool = Some(p.clone());
            }
            None => new = new.credits(credits),
        },
    }
    let _ = write!(model.log, " create(mode={mode},{credits});");
    match ledger.keys().create(new) {
        Ok(created) => {
            let id = created.info.id.to_string();
            let credit = match (mode, pool) {
                (0, _) => None,
                (_, Some(p)) => Some(p),
                (m, None) => {
                    let stamp = model.stamp();
                    model
                        .balances
                        .insert(id.clone(), Balance::new(credits, m == 2, stamp));
                    Some(id.clone())
                }
            };
            model.keys.push(Key {
                id,
                plaintext: created.plaintext.expose().to_owned(),
                name,
                credit,
                disabled: false,
                exists: Some(true),
                certain: true,
            });
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(e) => {
            if let Some(p) = pool {
                model.maybe_pool_users.insert(p);
            }
            model.maybe_unknown_owned = true;
            failed(model, "keys().create", &e)
        }
    }
}

fn create_pool(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    let Some(owner) = model.account.clone() else {
        return Ok(());
    };
    let credits = b.below(60);
    let refill = b.below(3) == 0;
    let _ = write!(model.log, " pool({credits},refill {refill});");
    let mut new = NewPool::new(&owner, "shared").credits(credits);
    if refill {
        new = new.refill(REFILL_AMOUNT, RefillInterval::Monthly);
    }
    match ledger.credits().create_pool(new) {
        Ok(pool) => {
            let id = pool.id.to_string();
            ensure!(
                pool.remaining == credits,
                "new pool reports {}",
                pool.remaining
            );
            let stamp = model.stamp();
            model
                .balances
                .insert(id.clone(), Balance::new(credits, refill, stamp));
            model.pools.push(id);
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(e) => {
            model.maybe_unknown_owned = true;
            failed(model, "create_pool", &e)
        }
    }
}

/// `delete_pool`: refused while a key that may exist spends from the pool; otherwise its
/// balance goes, with at most the credits the model allows.
fn delete_pool(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    if model.pools.is_empty() {
        return Ok(());
    }
    let j = b.below(model.pools.len() as u64) as usize;
    let id = model.pools[j].clone();
    let users = || model.keys.iter().filter(|k| k.credit.as_ref() == Some(&id));
    let in_use = users().any(|k| k.exists == Some(true) && k.certain);
    let maybe_in_use =
        users().any(|k| k.exists.is_none() || !k.certain) || model.maybe_pool_users.contains(&id);
    let _ = write!(model.log, " delete_pool(p{j});");
    let result = ledger.credits().delete_pool(&id);
    let bal = model
        .balances
        .get_mut(&id)
        .expect("a listed pool has a balance");
    match result {
        Ok(left) => {
            ensure!(!in_use, "a pool in use was deleted [{}]", model.log);
            ensure!(
                bal.exists != Some(false),
                "a deleted pool was deleted again"
            );
            // At most: a lease the writer has committed but not yet handed to memory is not
            // counted (the credits go with the pool either way).
            ensure!(
                left <= bal.ub,
                "deleted pool had {left} left, the model allows at most {} [{}]",
                bal.ub,
                model.log
            );
            model.balances.remove(&id);
            model.pools.retain(|p| *p != id);
            model.outcome.pools_deleted += 1;
            // The deletion saw no key spending from it: those the model was unsure of are gone.
            for key in model
                .keys
                .iter_mut()
                .filter(|k| k.credit.as_ref() == Some(&id))
            {
                key.exists = Some(false);
            }
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(Error::Conflict(_)) if in_use || maybe_in_use => Ok(()),
        Err(Error::NotFound { .. }) if bal.exists != Some(true) || model.faulted => Ok(()),
        Err(e) => {
            bal.exists = None;
            failed(model, "delete_pool", &e)
        }
    }
}

/// A low-balance threshold set or cleared on a key or a pool in use: no balance moves, and
/// a pool's key takes none of its own. A pool's refill may be set or removed with it: the
/// balance moves only at the next period boundary.
fn change_threshold(
    ledger: &Ledger,
    model: &mut Model,
    b: &mut Bytes<'_>,
) -> Result<(), Violation> {
    let threshold = match b.below(3) {
        0 => None,
        _ => Some(b.below(40)),
    };
    if b.below(2) == 0 && !model.pools.is_empty() {
        let j = b.below(model.pools.len() as u64) as usize;
        let id = model.pools[j].clone();
        let refill = match b.below(4) {
            0 => Some(Some(Refill {
                amount: REFILL_AMOUNT,
                interval: RefillInterval::Monthly,
            })),
            1 => Some(None),
            _ => None,
        };
        let refilled = refill.map(|r| r.is_some());
        let _ = write!(
            model.log,
            " pool_update(p{j},{threshold:?},refill {refilled:?});"
        );
        let mut update = PoolUpdate::new().low_balance_threshold(threshold);
        if let Some(r) = refill {
            update = update.refill(r);
        }
        let result = ledger.credits().update_pool(&id, update);
        let bal = model.balances.get_mut(&id);
        let exists = bal.as_ref().and_then(|bal| bal.exists);
        if let Some(bal) = bal {
            match refilled {
                // Refilled from the next period on, whether or not the change was acknowledged.
                Some(true) => {
                    bal.refill = true;
                    bal.exact = false;
                }
                // A removal cancels a refill that came due and was not applied yet: the
                // balance it would have replaced may stay.
                Some(false) if bal.refill_pending => bal.ub = bal.ub.max(bal.before_refill),
                _ => {}
            }
        }
        return match result {
            Ok(pool) => {
                ensure!(
                    pool.low_balance_threshold == threshold,
                    "pool threshold not reported"
                );
                ensure!(
                    refill.is_none_or(|r| pool.refill == r),
                    "pool refill not reported"
                );
                ensure!(exists != Some(false), "a deleted pool was changed");
                if let (Some(false), Some(bal)) = (refilled, model.balances.get_mut(&id)) {
                    // No refill from now on; the balance is exact again once read back.
                    bal.refill = false;
                    bal.refill_pending = false;
                }
                model.outcome.acknowledged += 1;
                model.outcome.thresholds_changed += 1;
                model.outcome.pool_refills_changed += usize::from(refilled.is_some());
                Ok(())
            }
            Err(Error::NotFound { .. }) if exists != Some(true) || model.faulted => Ok(()),
            Err(e) => failed(model, "update_pool", &e),
        };
    }
    let Some(i) = pick_index(model, b) else {
        return Ok(());
    };
    let key = model.keys[i].clone();
    let pooled = key.credit.as_ref().is_some_and(|c| *c != key.id);
    // A pool's key, or an unmetered one, has no balance of its own to watch (which it is
    // is not known after a change that may or may not have landed).
    let unmetered = key.credit.is_none() && threshold.is_some();
    let refused =
        (pooled && threshold.is_some()) || unmetered || (!key.certain && threshold.is_some());
    let _ = write!(model.log, " key_threshold(k{i},{threshold:?});");
    let result = ledger
        .keys()
        .update(&key.id, KeyUpdate::new().low_balance_threshold(threshold));
    match result {
        Ok(info) => {
            ensure!(
                !(pooled && threshold.is_some()),
                "a pool's key took a threshold of its own"
            );
            ensure!(
                !(unmetered && key.certain),
                "an unmetered key took a threshold"
            );
            ensure!(
                info.limits.low_balance_threshold == threshold,
                "key threshold not reported"
            );
            ensure!(key.exists != Some(false), "a deleted key was changed");
            model.keys[i].exists = Some(true);
            model.outcome.acknowledged += 1;
            model.outcome.thresholds_changed += 1;
            Ok(())
        }
        Err(Error::InvalidInput { .. }) if refused => Ok(()),
        Err(Error::NotFound { .. }) if key.exists != Some(true) => Ok(()),
        Err(e) => {
            model.keys[i].certain = false;
            failed(model, "update low_balance_threshold", &e)
        }
    }
}

/// Units come back to a balance (a refund or an over-reservation) — unless the balance was
/// `set` since they were reserved: then they leave the books.
fn refund(model: &mut Model, credit: &Option<String>, units: u64, epoch: u64) {
    if let Some(bal) = model.balance_of(credit, epoch) {
        if bal.epoch == epoch {
            bal.ub += units;
            // A refill due and not applied yet: the refund lands in the balance it would
            // replace, which a refill removed before it applies keeps. (Found by the crash
            // soak, seed 52,112,671: a grant dropped after the refill fell due refunded 4
            // into a pool of 50; its refill was then removed, leaving 54.)
            if bal.refill_pending {
                bal.before_refill += units;
            }
        } else {
            bal.granted = bal.granted.saturating_sub(units);
            bal.discarded += units;
        }
    }
}

fn verify<'l>(
    ledger: &'l Ledger,
    model: &mut Model,
    b: &mut Bytes<'_>,
    held: &mut Vec<Held<'l>>,
) -> Result<(), Violation> {
    let Some(i) = pick_index(model, b) else {
        return Ok(());
    };
    let cost = b.below(7);
    let actual = b.below(10);
    let action = b.below(4);
    let key = model.keys[i].clone();
    let _ = write!(model.log, " verify(k{i},{cost},{actual},{action});");
    let presented = Presented::new(&key.plaintext).expect("a generated key");
    let result = ledger.verify(&Request::new(&presented, "/api/v1/run").cost(cost));
    if let Some(bal) = key.credit.as_ref().and_then(|c| model.balances.get_mut(c)) {
        bal.attempted += cost;
    }
    model.check_disk();
    let balance = key
        .credit
        .as_ref()
        .and_then(|c| model.balances.get(c))
        .cloned();
    let epoch = balance.as_ref().map_or(0, |b| b.epoch);
    // What the model allows.
    let exists = key.exists;
    let mut allowed: Vec<&str> = Vec::new();
    match exists {
        Some(false) => allowed.push("not_found"),
        None => allowed.extend(["not_found", "disabled", "usage_exceeded", "ok"]),
        Some(true) if key.disabled && key.certain => allowed.push("disabled"),
        Some(true) if !key.certain => allowed.extend(["disabled", "usage_exceeded", "ok"]),
        Some(true) => match &balance {
            Some(bal) if cost > 0 && cost > bal.ub => allowed.push("usage_exceeded"),
            Some(bal) if cost > 0 && !bal.exact => allowed.extend(["usage_exceeded", "ok"]),
            _ => allowed.push("ok"),
        },
    }
    if model.faulted {
        allowed.extend(["unavailable", "not_found", "usage_exceeded"]);
    }
    let code = match &result {
        Ok(_) => "ok",
        Err(d) => d.code(),
    };
    // Over-spend is never allowed, whatever the model is unsure of.
    if let (Ok(_), Some(bal)) = (&result, &balance) {
        ensure!(
            cost <= bal.ub,
            "over-spend: granted {cost} with at most {} left [{}]",
            bal.ub,
            model.log
        );
    }
    ensure!(
        allowed.contains(&code),
        "verify of k{i} returned {code}, model allows {allowed:?} [{}]",
        model.log
    );
    ensure!(
        code != "ok" || !model.revocations_in_doubt.contains(&i),
        "k{i} was served after its revocation's commit failed, maybe landed [{}]",
        model.log
    );
    let Ok(grant) = result else {
        if matches!(result, Err(Denial::Unavailable)) {
            ensure!(model.faulted, "unavailable on a healthy disk");
        }
        return Ok(());
    };
    model.outcome.grants += 1;
    if let Some(bal) = key.credit.as_ref().and_then(|c| model.balances.get_mut(c)) {
        bal.ub -= cost;
        if action == 1 {
            bal.held += cost;
        }
    }
    match action {
        0 => {
            refund(model, &key.credit, cost, epoch);
            drop(grant);
        }
        1 => held.push(Held {
            grant,
            credit: key.credit.clone(),
            epoch,
        }),
        _ => commit(model, &key.credit, grant, actual, epoch)?,
    }
    Ok(())
}

fn commit(
    model: &mut Model,
    credit: &Option<String>,
    grant: Grant<'_>,
    actual: u64,
    epoch: u64,
) -> Result<(), Violation> {
    let reserved = grant.reserved();
    let receipt = grant.commit(actual);
    // After the commit: its shortfall goes through the writer, whose batch may be what ran
    // the disk's countdown out.
    let faulted = model.check_disk();
    let charged = receipt.token_stats.charged;
    let Some(bal) = model.balance_of(credit, epoch) else {
        // A balance removed while the grant was held (made unmetered, maybe metered again
        // since): anything up to the real cost may be charged.
        ensure!(
            credit.is_some() && charged <= actual || charged == actual,
            "unmetered commit charged {charged} of {actual} [{}]",
            model.log
        );
        return Ok(());
    };
    let extra_room = bal.ub;
    let most = if actual <= reserved {
        actual
    } else {
        reserved + (actual - reserved).min(extra_room)
    };
    ensure!(
        charged <= most,
        "commit({actual}) of a {reserved}-unit reservation charged {charged}, at most {most} \
         was left [{}]",
        model.log
    );
    if bal.exact && !faulted {
        ensure!(
            charged == most,
            "commit({actual}) of a {reserved}-unit reservation charged {charged}, model says \
             {most} [{}]",
            model.log
        );
    }
    ensure!(
        charged + receipt.token_stats.uncovered == actual,
        "charged + uncovered != used"
    );
    if charged >= reserved {
        bal.ub -= charged - reserved;
    } else if bal.epoch == epoch {
        bal.ub += reserved - charged;
    } else {
        bal.granted = bal.granted.saturating_sub(reserved - charged);
        bal.discarded += reserved - charged;
    }
    bal.charged += charged;
    bal.unflushed += charged;
    Ok(())
}

fn settle_held(
    model: &mut Model,
    b: &mut Bytes<'_>,
    held: &mut Vec<Held<'_>>,
) -> Result<(), Violation> {
    if held.is_empty() {
        return Ok(());
    }
    let h = held.swap_remove(b.below(held.len() as u64) as usize);
    if let Some(bal) = model.balance_of(&h.credit, h.epoch) {
        bal.held = bal.held.saturating_sub(h.grant.reserved());
    }
    let actual = b.below(10);
    let _ = write!(model.log, " settle({actual});");
    if b.below(2) == 0 {
        refund(model, &h.credit, h.grant.reserved(), h.epoch);
        drop(h.grant);
        Ok(())
    } else {
        commit(model, &h.credit, h.grant, actual, h.epoch)
    }
}

fn adjust(
    ledger: &Ledger,
    model: &mut Model,
    b: &mut Bytes<'_>,
    top_up: bool,
) -> Result<(), Violation> {
    let ids: Vec<String> = model.balances.keys().cloned().collect();
    if ids.is_empty() {
        return Ok(());
    }
    let id = ids[b.below(ids.len() as u64) as usize].clone();
    let units = b.below(30);
    let _ = write!(
        model.log,
        " {}({units});",
        if top_up { "top_up" } else { "set" }
    );
    let result = if top_up {
        ledger.credits().top_up(&id, units)
    } else {
        ledger.credits().set(&id, units)
    };
    let stamp = model.stamp();
    let bal = model.balances.get_mut(&id).expect("listed");
    match result {
        Ok(_) => {
            ensure!(
                bal.exists != Some(false),
                "{id}: a change to a deleted balance was acknowledged"
            );
            if top_up {
                bal.ub += units;
                bal.granted += units;
            } else {
                bal.granted = bal.granted - bal.ub.min(bal.granted) + units;
                bal.ub = units;
                bal.epoch = stamp;
            }
            // A refill that fell due was applied before the change (a top-up adds to it:
            // `ub` already allows it), so it cannot come on top of the new balance later.
            bal.refill_pending = false;
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(Error::NotFound { .. }) if bal.exists != Some(true) || model.faulted => Ok(()),
        Err(e) => {
            // The change may have landed: the model only keeps an upper bound until reopen.
            bal.exact = false;
            bal.ub = if top_up {
                bal.ub + units
            } else {
                bal.ub.max(units)
            };
            failed(model, "credits adjust", &e)
        }
    }
}

fn toggle(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    let Some(i) = pick_index(model, b) else {
        return Ok(());
    };
    let key = &model.keys[i];
    let disable = !key.disabled;
    let _ = write!(
        model.log,
        " {}(k{i});",
        if disable { "disable" } else { "enable" }
    );
    let result = if disable {
        ledger.keys().disable(&key.id)
    } else {
        ledger.keys().enable(&key.id)
    };
    let key = &mut model.keys[i];
    match result {
        Ok(info) => {
            ensure!(key.exists != Some(false), "a deleted key was changed");
            ensure!(
                info.disabled_at.is_some() == disable,
                "disable state not reported"
            );
            key.disabled = disable;
            key.exists = Some(true);
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(Error::NotFound { .. }) if key.exists != Some(true) => Ok(()),
        Err(e) => {
            key.certain = false;
            if disable && matches!(e, Error::Uncertain { .. }) {
                model.revocations_in_doubt.insert(i);
            }
            failed(model, "disable/enable", &e)
        }
    }
}

/// Deletes a key; or, when the key picked is one the model knows deleted, the account.
fn delete(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    let Some(i) = pick_index(model, b) else {
        return Ok(());
    };
    if model.keys[i].exists == Some(false) {
        return delete_account(ledger, model);
    }
    let _ = write!(model.log, " delete(k{i});");
    let result = ledger.keys().delete(&model.keys[i].id);
    let key = &mut model.keys[i];
    let own_balance = key.credit.clone().filter(|c| *c == key.id);
    match result {
        Ok(()) => {
            ensure!(key.exists != Some(false), "a deleted key was deleted again");
            key.exists = Some(false);
            if let Some(c) = own_balance {
                model.balances.remove(&c);
            }
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(Error::NotFound { .. }) if key.exists != Some(true) => Ok(()),
        Err(e) => {
            key.exists = None;
            if matches!(e, Error::Uncertain { .. }) {
                model.revocations_in_doubt.insert(i);
            }
            if let Some(c) = own_balance
                && let Some(bal) = model.balances.get_mut(&c)
            {
                bal.exists = None;
            }
            failed(model, "delete", &e)
        }
    }
}

/// `accounts().delete`: refused while the account may own a key or a pool, and required to
/// be while it surely owns one; once it lands, nothing the model made for it exists.
fn delete_account(ledger: &Ledger, model: &mut Model) -> Result<(), Violation> {
    let Some(account) = model.account.clone() else {
        return Ok(());
    };
    let owns = model.keys.iter().any(|k| k.exists == Some(true))
        || (model.pools.iter()).any(|p| model.balances[p].exists == Some(true));
    let may_own = !model.pools.is_empty()
        || model.maybe_unknown_owned
        || model.keys.iter().any(|k| k.exists != Some(false));
    let _ = write!(model.log, " delete_account;");
    match ledger.accounts().delete(&account) {
        Ok(()) => {
            ensure!(
                !owns,
                "an account owning keys or pools was deleted [{}]",
                model.log
            );
            model.account_deleted();
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(Error::Conflict(_)) if may_own => Ok(()),
        Err(e) => {
            model.account = None;
            model.account_in_doubt = Some(account);
            failed(model, "accounts().delete", &e)
        }
    }
}

fn rename(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    let Some(i) = pick_index(model, b) else {
        return Ok(());
    };
    let name = format!("renamed {}", b.below(100));
    let _ = write!(model.log, " rename(k{i});");
    let result = ledger
        .keys()
        .update(&model.keys[i].id, KeyUpdate::new().name(&name));
    let key = &mut model.keys[i];
    match result {
        Ok(info) => {
            ensure!(info.name == name, "rename not reported");
            ensure!(key.exists != Some(false), "a deleted key was renamed");
            key.name = name;
            key.exists = Some(true);
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(Error::NotFound { .. }) if key.exists != Some(true) => Ok(()),
        Err(e) => {
            key.certain = false;
            failed(model, "rename", &e)
        }
    }
}

/// `update(credits)`: a new balance for a key with its own credits, or none (unmetered).
fn update_credits(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    let Some(i) = pick_index(model, b) else {
        return Ok(());
    };
    let key = model.keys[i].clone();
    let own = key.credit.clone().filter(|c| *c == key.id);
    if key.credit.is_some() && own.is_none() {
        return Ok(()); // pool keys keep their pool
    }
    let units = match b.below(3) {
        0 => None,
        n => Some(u64::from(n == 1) * b.below(30)),
    };
    let _ = write!(model.log, " update_credits(k{i},{units:?});");
    let result = ledger
        .keys()
        .update(&key.id, KeyUpdate::new().credits(units));
    match result {
        Ok(_) => {
            let stamp = model.stamp();
            let k = &mut model.keys[i];
            k.exists = Some(true);
            match (units, own) {
                (None, Some(c)) => {
                    model.balances.remove(&c);
                    k.credit = None;
                }
                (None, None) => {}
                (Some(n), Some(c)) => {
                    let bal = model.balances.get_mut(&c).expect("own balance");
                    bal.granted = bal.granted - bal.ub.min(bal.granted) + n;
                    bal.ub = n;
                    bal.epoch = stamp;
                    bal.refill_pending = false;
                }
                (Some(n), None) => {
                    model
                        .balances
                        .insert(key.id.clone(), Balance::new(n, false, stamp));
                    k.credit = Some(key.id.clone());
                }
            }
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(Error::NotFound { .. }) if key.exists != Some(true) => Ok(()),
        Err(e) => {
            model.keys[i].certain = false;
            if let Some(bal) = own.and_then(|c| model.balances.get_mut(&c)) {
                bal.exact = false;
                bal.ub = bal.ub.max(units.unwrap_or(0));
                bal.exists = None;
            }
            failed(model, "update credits", &e)
        }
    }
}

/// `update(pool)`: a key moves into a pool (dropping a balance of its own), to another, or
/// out of its pool (unmetered). Grants it holds settle where they reserved.
fn move_pool(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    let Some(i) = pick_index(model, b) else {
        return Ok(());
    };
    let target = match b.below(model.pools.len() as u64 + 1) as usize {
        0 => None,
        j => Some(model.pools[j - 1].clone()),
    };
    let key = model.keys[i].clone();
    let own = key.credit.clone().filter(|c| *c == key.id);
    let in_pool = key.credit.is_some() && own.is_none();
    // Out of a pool, sometimes onto a balance of its own.
    let onto = (target.is_none() && in_pool && b.below(2) == 0).then(|| b.below(30));
    let mut update = KeyUpdate::new().pool(target.as_deref());
    if target.is_some() && own.is_some() {
        update = update.credits(None);
    }
    if let Some(units) = onto {
        update = update.credits(Some(units));
    }
    let _ = write!(model.log, " move_pool(k{i},{target:?},{onto:?});");
    match ledger.keys().update(&key.id, update) {
        Ok(info) => {
            ensure!(
                info.pool.map(|p| p.to_string()) == target,
                "k{i}: moved to {target:?}, shows {:?} [{}]",
                info.pool,
                model.log
            );
            let k = &mut model.keys[i];
            k.exists = Some(true);
            match (&target, own) {
                (Some(_), Some(c)) => {
                    model.balances.remove(&c);
                    k.credit = target;
                }
                (Some(_), None) => k.credit = target,
                // Out of a pool: unmetered, or onto a new balance of its own; a key on its
                // own balance stays there.
                (None, Some(_)) => {}
                (None, None) => match onto {
                    Some(units) => {
                        let stamp = model.stamp();
                        let bal = Balance::new(units, false, stamp);
                        model.balances.insert(key.id.clone(), bal);
                        model.keys[i].credit = Some(key.id.clone());
                    }
                    None => k.credit = None,
                },
            }
            model.outcome.pool_moves += 1;
            model.outcome.acknowledged += 1;
            Ok(())
        }
        Err(Error::NotFound { .. }) if key.exists != Some(true) => Ok(()),
        Err(Error::NotFound { what: "pool" })
            if target
                .as_ref()
                .and_then(|p| model.balances.get(p))
                .is_none_or(|bal| bal.exists != Some(true)) =>
        {
            Ok(())
        }
        Err(e) => {
            // It may have landed: the key may spend from either side, and either pool may
            // have it as a user.
            model.keys[i].certain = false;
            for pool in [&key.credit, &target].into_iter().flatten() {
                if model.pools.contains(pool) {
                    model.maybe_pool_users.insert(pool.clone());
                }
            }
            if let Some(bal) = own.and_then(|c| model.balances.get_mut(&c)) {
                bal.exact = false;
                bal.exists = None;
            }
            failed(model, "update pool", &e)
        }
    }
}

/// `usage` flushes: live figures must match the model exactly where it is exact.
fn usage(ledger: &Ledger, model: &mut Model, b: &mut Bytes<'_>) -> Result<(), Violation> {
    let ids: Vec<String> = model.balances.keys().cloned().collect();
    if ids.is_empty() {
        return Ok(());
    }
    let id = ids[b.below(ids.len() as u64) as usize].clone();
    let _ = write!(model.log, " usage;");
    let result = ledger.credits().usage(&id);
    // After the call: the flush it makes (or a writer batch before it) may be what ran the
    // disk's countdown out.
    let faulted = model.check_disk();
    let bal = model.balances.get_mut(&id).expect("listed");
    let u = match result {
        Ok(u) => u,
        Err(Error::NotFound { .. }) if bal.exists != Some(true) => return Ok(()),
        Err(_) if faulted => return Ok(()),
        Err(e) => return Err(format!("usage({id}) failed on a healthy disk: {e}")),
    };
    let remaining = u
        .remaining
        .ok_or("a metered balance reports no remaining")?;
    ensure!(
        u.spent <= u.granted,
        "{id}: spent {} > granted {}",
        u.spent,
        u.granted
    );
    ensure!(
        remaining <= bal.ub,
        "{id}: {remaining} left, the model allows at most {} [{}]",
        bal.ub,
        model.log
    );
    if !faulted {
        ensure!(
            u.spent >= bal.spent_flushed && u.spent + u.lost_to_crash >= bal.charged,
            "{id}: spent {} + lost {} < charged {} [{}]",
            u.spent,
            u.lost_to_crash,
            bal.charged,
            model.log
        );
        bal.spent_flushed = u.spent;
        for other in model.balances.values_mut() {
            other.unflushed = 0;
            other.discarded = 0;
        }
        let bal = model.balances.get_mut(&id).expect("listed");
        if bal.exact {
            ensure!(
                remaining == bal.ub && u.granted == bal.granted,
                "{id}: remaining {remaining} granted {}, model {} / {} [{}]",
                u.granted,
                bal.ub,
                bal.granted,
                model.log
            );
        }
    }
    Ok(())
}

/// After a reopen: every acknowledged write is there, and every balance balances.
fn reconcile(ledger: &Ledger, model: &mut Model, after_crash: bool) -> Result<(), Violation> {
    if let Some(account) = &model.account {
        ensure!(
            ledger.accounts().get(account).is_ok(),
            "an acknowledged account is missing [{}]",
            model.log
        );
    }
    for account in &model.deleted_accounts {
        ensure!(
            matches!(ledger.accounts().get(account), Err(Error::NotFound { .. })),
            "a deleted account (acknowledged) is back [{}]",
            model.log
        );
    }
    if let Some(account) = model.account_in_doubt.clone() {
        match ledger.accounts().get(&account) {
            Ok(_) => model.account = model.account_in_doubt.take(),
            Err(Error::NotFound { .. }) => model.account_deleted(),
            Err(e) => return Err(format!("account in doubt unreadable: {e} [{}]", model.log)),
        }
    }
    let exact_durability = model.exact_durability;
    let mut gone = Vec::new();
    let mut appeared = Vec::new();
    for (i, key) in model.keys.iter_mut().enumerate() {
        match (ledger.keys().get(&key.id), key.exists) {
            (Ok(info), Some(false)) => {
                return Err(format!("k{i}: deleted (acknowledged) but back: {info:?}"));
            }
            (Ok(info), _) => {
                if key.certain && key.exists == Some(true) {
                    ensure!(
                        info.name == key.name,
                        "k{i}: acknowledged name {:?} lost, found {:?} [{}]",
                        key.name,
                        info.name,
                        model.log
                    );
                    ensure!(
                        info.disabled_at.is_some() == key.disabled,
                        "k{i}: acknowledged disabled={} lost [{}]",
                        key.disabled,
                        model.log
                    );
                }
                key.name = info.name.clone();
                key.disabled = info.disabled_at.is_some();
                key.exists = Some(true);
                let was_certain = std::mem::replace(&mut key.certain, true);
                let found = match (info.pool, info.limits.credits) {
                    (Some(pool), _) => Some(pool.to_string()),
                    (None, Some(_)) => Some(key.id.clone()),
                    (None, None) => None,
                };
                if found != key.credit {
                    ensure!(
                        !was_certain,
                        "k{i}: spends from {found:?}, acknowledged {:?} [{}]",
                        key.credit,
                        model.log
                    );
                    if let Some(c) = key.credit.take().filter(|c| *c == key.id) {
                        gone.push(c);
                    }
                    if found.as_ref() == Some(&key.id) {
                        appeared.push(key.id.clone());
                    }
                    key.credit = found;
                }
            }
            (Err(Error::NotFound { .. }), Some(true)) => {
                return Err(format!("k{i}: acknowledged key missing [{}]", model.log));
            }
            (Err(Error::NotFound { .. }), _) => {
                key.exists = Some(false);
                if let Some(c) = key.credit.clone().filter(|c| *c == key.id) {
                    gone.push(c);
                }
            }
            (Err(e), _) => return Err(format!("k{i}: get failed after reopen: {e}")),
        }
    }
    for c in gone {
        model.balances.remove(&c);
    }
    for c in appeared {
        let stamp = model.stamp();
        let mut bal = Balance::new(u64::MAX / 4, true, stamp);
        bal.exists = None;
        model.balances.insert(c, bal);
    }
    let mut deleted = Vec::new();
    for (id, bal) in model.balances.iter_mut() {
        let u = match ledger.credits().usage(id) {
            Ok(u) => u,
            // A pool whose deletion failed may be gone.
            Err(Error::NotFound { .. }) if bal.exists.is_none() && model.pools.contains(id) => {
                deleted.push(id.clone());
                continue;
            }
            Err(e) => {
                return Err(format!(
                    "{id}: usage failed after reopen: {e} [{}]",
                    model.log
                ));
            }
        };
        let remaining = u
            .remaining
            .ok_or_else(|| format!("{id}: metered balance without remaining"))?;
        ensure!(
            u.spent + u.lost_to_crash + remaining == u.granted,
            "{id}: spent {} + lost {} + remaining {remaining} != granted {} [{}]",
            u.spent,
            u.lost_to_crash,
            u.granted,
            model.log
        );
        ensure!(
            u.spent <= u.granted,
            "{id}: spent {} > granted {}",
            u.spent,
            u.granted
        );
        ensure!(
            u.leased == 0,
            "{id}: {} units still leased after reopen",
            u.leased
        );
        ensure!(
            remaining <= bal.ub,
            "{id}: over-spend risk: {remaining} left after reopen, model allows at most {} [{}]",
            bal.ub,
            model.log
        );
        ensure!(
            u.spent + u.lost_to_crash >= bal.charged,
            "{id}: charged units came back: spent {} + lost {} < charged {} [{}]",
            u.spent,
            u.lost_to_crash,
            bal.charged,
            model.log
        );
        ensure!(
            u.spent >= bal.spent_flushed,
            "{id}: flushed spend lost: {} < {} [{}]",
            u.spent,
            bal.spent_flushed,
            model.log
        );
        let lost = u.lost_to_crash.saturating_sub(bal.lost);
        ensure!(u.lost_to_crash >= bal.lost, "{id}: lost_to_crash went down");
        if !after_crash && !model.faulted {
            ensure!(lost == 0, "{id}: a clean close lost {lost} units");
        }
        // A crash loses what memory held: unreserved lease (inside `ub`), held reservations
        // and unflushed spend. Under `Exact`, leases are the verifies' own costs.
        let bound = if exact_durability {
            bal.attempted
        } else {
            2 * MAX_LEASE
        };
        // A refill that came due shows as applied (usage counts it as the next request
        // will): its credits replace what was left, and a crash's loss came out of those.
        let refilled = if bal.refill_pending {
            REFILL_AMOUNT + lost
        } else {
            0
        };
        let held = bal.ub + bal.held + bal.unflushed + bal.discarded;
        ensure!(
            lost <= bound + bal.discarded && remaining + lost <= held.max(refilled),
            "{id}: lost {lost} (lease bound {bound}), remaining {remaining}, model: ub {} + held \
             {} + unflushed {} [{}]",
            bal.ub,
            bal.held,
            bal.unflushed,
            model.log
        );
        if bal.exact && bal.exists == Some(true) && !model.faulted {
            ensure!(
                u.granted >= bal.granted && u.granted <= bal.granted + bal.discarded,
                "{id}: acknowledged grants lost: granted {} != model {} [{}]",
                u.granted,
                bal.granted,
                model.log
            );
        }
        bal.ub = remaining;
        if bal.refill_pending {
            bal.ub = bal.ub.max(REFILL_AMOUNT);
        }
        bal.granted = u.granted;
        bal.charged = u.spent + u.lost_to_crash;
        bal.spent_flushed = u.spent;
        bal.lost = u.lost_to_crash;
        bal.attempted = 0;
        bal.discarded = 0;
        bal.held = 0;
        bal.unflushed = 0;
        bal.exact = !bal.refill;
        bal.exists = Some(true);
    }
    for id in deleted {
        model.balances.remove(&id);
        model.pools.retain(|p| *p != id);
    }
    Ok(())
}
