//! Shared setup for the end-to-end tests: a ledger in a temporary directory, opened with a
//! known master key and a `ManualClock`, plus helpers a server author would write.
#![allow(dead_code)]

use std::path::PathBuf;

use keyledger::{
    Account, AuditEvent, Config, ConfigBuilder, Denial, Error, HashScheme, KeyInfo, Ledger,
    ManualClock, MasterKey, NewAccount, NewKey, PageRequest, Presented, PublicId, RouteRule,
    Timestamp,
};

/// 2025-06-15T15:06:40Z: an arbitrary, fixed start so every timestamp is predictable.
pub const START: Timestamp = Timestamp(1_750_000_000_000);

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A ledger in its own temporary directory, with the master key and clock it was opened with.
pub struct TestLedger {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub master: MasterKey,
    pub clock: ManualClock,
    config: Config,
    pub ledger: Ledger,
}

impl TestLedger {
    /// A fresh ledger with a random master key and a manual clock set to [`START`].
    pub fn new() -> TestLedger {
        Self::with_master(MasterKey::generate().expect("OS randomness"))
    }

    /// A fresh ledger opened with `master`.
    pub fn with_master(master: MasterKey) -> TestLedger {
        Self::with_settings(master, |b| b)
    }

    /// A fresh ledger whose config builder (master key and clock already set) goes through
    /// `settings` first, e.g. to add a legacy prefix.
    pub fn with_settings(
        master: MasterKey,
        settings: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
    ) -> TestLedger {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.redb");
        let clock = ManualClock::new(START);
        let builder = Config::builder()
            .master_key(master.clone())
            .clock(clock.clone());
        let config = settings(builder).build().expect("config");
        let ledger = Ledger::open(&path, config.clone()).expect("open a new ledger");
        TestLedger {
            dir,
            path,
            master,
            clock,
            config,
            ledger,
        }
    }

    /// The config this ledger was opened with (same master key, same clock).
    pub fn config(&self) -> Config {
        self.config.clone()
    }

    /// Closes the database and opens it again with the same config.
    pub fn reopen(self) -> TestLedger {
        let TestLedger {
            dir,
            path,
            master,
            clock,
            config,
            ledger,
        } = self;
        drop(ledger);
        let ledger = Ledger::open(&path, config.clone()).expect("reopen the ledger");
        TestLedger {
            dir,
            path,
            master,
            clock,
            config,
            ledger,
        }
    }

    /// Closes the database (so `Ledger::check` or raw reads can look at the file) and returns
    /// what is needed to look at it.
    pub fn close(self) -> (tempfile::TempDir, PathBuf, Config) {
        drop(self.ledger);
        (self.dir, self.path, self.config)
    }

    /// Creates an active account and returns its public id.
    pub fn account(&self, name: &str) -> PublicId {
        account(&self.ledger, name)
    }

    /// Creates an API key with default settings; returns its info and plaintext.
    pub fn key(&self, owner: &str, name: &str) -> (KeyInfo, String) {
        let created = self
            .ledger
            .keys()
            .create(NewKey::new(owner, name))
            .expect("create key");
        let plaintext = created.plaintext.expose().to_owned();
        (created.info, plaintext)
    }

    /// Authenticates a plaintext as a server would.
    pub fn auth(&self, plaintext: &str) -> Result<KeyInfo, Denial> {
        authenticate(&self.ledger, plaintext)
    }

    /// The clock's current time.
    pub fn now(&self) -> Timestamp {
        keyledger::Clock::now(&self.clock)
    }
}

/// A config with `master` and `clock`.
pub fn config(master: &MasterKey, clock: &ManualClock) -> Config {
    Config::builder()
        .master_key(master.clone())
        .clock(clock.clone())
        .build()
        .expect("config")
}

/// Creates an active account and returns its public id.
pub fn account(ledger: &Ledger, name: &str) -> PublicId {
    ledger
        .accounts()
        .create(NewAccount::new(name))
        .expect("create account")
        .id
}

/// Authenticates a plaintext as a server would (`x-api-key` header).
pub fn authenticate(ledger: &Ledger, plaintext: &str) -> Result<KeyInfo, Denial> {
    let presented = Presented::from_headers(None, Some(plaintext)).expect("well-formed header");
    ledger.authenticate(&presented)
}

/// A key in the keyledger format (`prefix` + 32 base62 chars + 6-char base62 CRC32), built
/// outside the library, e.g. as another system using the same format would have issued it.
pub fn formatted_key(prefix: &str, seed: u64) -> String {
    let mut key = prefix.to_owned();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for _ in 0..32 {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        key.push(BASE62[((state >> 33) % 62) as usize] as char);
    }
    let mut crc = crc32fast::hash(key.as_bytes());
    let mut checksum = [b'0'; 6];
    for slot in checksum.iter_mut().rev() {
        *slot = BASE62[(crc % 62) as usize];
        crc /= 62;
    }
    key.extend(checksum.iter().map(|&b| b as char));
    key
}

/// The key with its body character at `pos` replaced by another base62 character.
pub fn with_char_changed(key: &str, pos: usize) -> String {
    let mut bytes = key.as_bytes().to_vec();
    bytes[pos] = if bytes[pos] == b'a' { b'b' } else { b'a' };
    String::from_utf8(bytes).expect("ascii")
}

/// Everything a rejected write must leave untouched, as seen through the public API.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub audit: Vec<AuditEvent>,
    pub accounts: Vec<Account>,
    pub keys: Vec<KeyInfo>,
    pub tokens: Vec<KeyInfo>,
    /// An error string rather than a panic: see `routes_on_a_fresh_ledger_are_empty`.
    pub routes: Result<Vec<RouteRule>, String>,
    pub schemes: Vec<(HashScheme, u64)>,
}

/// Reads every account, key, token, route and audit event (small ledgers only).
pub fn snapshot(ledger: &Ledger) -> Snapshot {
    let accounts = ledger
        .accounts()
        .list(&PageRequest::first().limit(100))
        .expect("accounts")
        .items;
    let mut keys = Vec::new();
    let mut tokens = Vec::new();
    for a in &accounts {
        keys.extend(all_keys(ledger, &a.id, false));
        tokens.extend(all_keys(ledger, &a.id, true));
    }
    Snapshot {
        audit: ledger.audit().recent(1000).expect("audit"),
        accounts,
        keys,
        tokens,
        routes: ledger.routes().list().map_err(|e| e.to_string()),
        schemes: ledger.hash_scheme_counts().expect("scheme counts"),
    }
}

/// Every key (or token) of `owner`, walking all pages.
pub fn all_keys(ledger: &Ledger, owner: &str, tokens: bool) -> Vec<KeyInfo> {
    let mut out = Vec::new();
    let mut page = PageRequest::first().limit(100);
    loop {
        let handle = if tokens {
            ledger.tokens()
        } else {
            ledger.keys()
        };
        let got = handle.list(owner, &page).expect("list");
        out.extend(got.items);
        match got.next_cursor {
            Some(c) => page = PageRequest::first().limit(100).after(c),
            None => return out,
        }
    }
}

/// Asserts `result` is `InvalidInput` for `field`, with a message naming the field.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Error>, field: &str) {
    match result {
        Err(e @ Error::InvalidInput { field: f, .. }) => {
            assert_eq!(f, field, "wrong field in {e}");
            assert!(
                e.to_string().contains(field),
                "message `{e}` does not name `{field}`"
            );
        }
        other => panic!("expected InvalidInput for `{field}`, got {other:?}"),
    }
}

/// Asserts `result` is `InvalidId` for an id of kind `expected`.
#[track_caller]
pub fn assert_invalid_id<T: std::fmt::Debug>(result: Result<T, Error>, expected: &str) {
    match result {
        Err(Error::InvalidId(e)) => assert_eq!(e.expected, expected),
        other => panic!("expected InvalidId({expected}), got {other:?}"),
    }
}

/// Asserts `result` is `NotFound` for `what`.
#[track_caller]
pub fn assert_not_found<T: std::fmt::Debug>(result: Result<T, Error>, what: &str) {
    match result {
        Err(Error::NotFound { what: w }) => assert_eq!(w, what),
        other => panic!("expected NotFound({what}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Verify-path helpers (tests/verify.rs, credits.rs, concurrency.rs, restart.rs).

/// A fresh ledger with `durability`, a manual clock at [`START`] and a random master key.
pub fn ledger_with(durability: keyledger::Durability) -> TestLedger {
    TestLedger::with_settings(MasterKey::generate().expect("OS randomness"), |b| {
        b.durability(durability)
    })
}

/// A presented key, as a server takes it from a header.
pub fn presented(plaintext: &str) -> Presented {
    Presented::new(plaintext).expect("non-empty printable key")
}

/// Verifies `plaintext` for `route` (default cost) and drops the grant (refunding it).
/// Returns the denial code, or `"ok"`.
pub fn verify_code(ledger: &Ledger, plaintext: &str, route: &str) -> &'static str {
    let key = presented(plaintext);
    match ledger.verify(&keyledger::Request::new(&key, route)) {
        Ok(_) => "ok",
        Err(d) => d.code(),
    }
}

/// Verifies with `cost` reserved and commits `actual`.
pub fn spend(
    ledger: &Ledger,
    plaintext: &str,
    route: &str,
    cost: u64,
    actual: u64,
) -> Result<keyledger::Receipt, Denial> {
    let key = presented(plaintext);
    let grant = ledger.verify(&keyledger::Request::new(&key, route).cost(cost))?;
    Ok(grant.commit(actual))
}

/// Creates a key from `new` and returns its public id and plaintext.
pub fn create_key(ledger: &Ledger, new: NewKey) -> (PublicId, String) {
    let created = ledger.keys().create(new).expect("create key");
    (created.info.id, created.plaintext.expose().to_owned())
}

impl TestLedger {
    /// `Ledger::close()` (leases returned, counters flushed), then opens the file again.
    pub fn close_and_reopen(self) -> TestLedger {
        self.ledger.close().expect("clean close");
        self.reopen()
    }

    /// Stops the ledger as a crash would (`simulate_crash`: no lease returned, nothing
    /// flushed), then opens the file again.
    pub fn crash_and_reopen(self) -> TestLedger {
        let TestLedger {
            dir,
            path,
            master,
            clock,
            config,
            ledger,
        } = self;
        ledger.simulate_crash();
        let ledger = Ledger::open(&path, config.clone()).expect("reopen after a crash");
        TestLedger {
            dir,
            path,
            master,
            clock,
            config,
            ledger,
        }
    }

    /// Closes the ledger and runs `Ledger::check` on the file, then opens it again.
    pub fn checked(self) -> (TestLedger, keyledger::CheckReport) {
        let TestLedger {
            dir,
            path,
            master,
            clock,
            config,
            ledger,
        } = self;
        ledger.close().expect("clean close");
        drop(ledger);
        let report = Ledger::check(&path, config.clone()).expect("check runs");
        let ledger = Ledger::open(&path, config.clone()).expect("reopen after check");
        let t = TestLedger {
            dir,
            path,
            master,
            clock,
            config,
            ledger,
        };
        (t, report)
    }
}
