//! [`Config`]: the master key, key prefixes and clock a [`Ledger`](crate::Ledger) opens with.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::clock::{Clock, CoarseClock};
use crate::engine::Durability;
use crate::error::ConfigError;
use crate::keyfmt::{MAX_VISIBLE_PREFIX_LEN, VISIBLE_PREFIX_LEN};
use crate::limits::SpendTier;
use crate::record::Limits;
use crate::secret::MasterKey;

/// Environment variable holding the master key as 64 hex digits.
pub const ENV_MASTER_KEY: &str = "KEYLEDGER_MASTER_KEY";
/// Environment variable naming a key file (mode 0600) holding the master key.
pub const ENV_MASTER_KEY_FILE: &str = "KEYLEDGER_MASTER_KEY_FILE";
/// Environment variable holding the prefix of live API keys.
pub const ENV_LIVE_PREFIX: &str = "KEYLEDGER_LIVE_PREFIX";
/// Environment variable holding the prefix of test API keys.
pub const ENV_TEST_PREFIX: &str = "KEYLEDGER_TEST_PREFIX";
/// Environment variable holding the prefix of internal tokens.
pub const ENV_TOKEN_PREFIX: &str = "KEYLEDGER_TOKEN_PREFIX";
/// Environment variable holding the prefixes of imported keys, comma-separated.
pub const ENV_LEGACY_PREFIXES: &str = "KEYLEDGER_LEGACY_PREFIXES";

/// redb's page cache unless [`ConfigBuilder::page_cache_bytes`] says otherwise (redb's own
/// default).
const DEFAULT_PAGE_CACHE_BYTES: usize = 1 << 30;

/// The most spend tiers a configuration may have.
const MAX_SPEND_TIERS: usize = 16;

/// How a ledger is opened. Build with [`Config::builder`] or [`Config::from_env`].
#[derive(Clone)]
pub struct Config {
    pub(crate) master_key: MasterKey,
    pub(crate) live_prefix: String,
    pub(crate) test_prefix: String,
    pub(crate) token_prefix: String,
    pub(crate) legacy_prefixes: Vec<String>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) durability: Durability,
    pub(crate) cache_capacity: usize,
    pub(crate) page_cache_bytes: usize,
    pub(crate) spend_tiers: Vec<SpendTier>,
    pub(crate) usage_flush_interval: std::time::Duration,
    pub(crate) close_grace: std::time::Duration,
}

impl Config {
    /// A builder; [`ConfigBuilder::build`] fails unless a master key was given.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder::default()
    }

    /// Reads the master key from `KEYLEDGER_MASTER_KEY`, or else from the file named by
    /// `KEYLEDGER_MASTER_KEY_FILE`, and the key prefixes from the variables the `keyledger`
    /// CLI reads too ([`ConfigBuilder::prefixes_from_env`]), so a server and the CLI
    /// sharing a database and an environment mint and accept the same keys; everything else
    /// takes its default. Prefixes are not stored in the file: a server whose environment
    /// names another live prefix than the one its keys were minted with refuses them all as
    /// malformed.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::builder()
            .master_key_from_env()?
            .prefixes_from_env()?
            .build()
    }

    /// A config with a fresh random master key: for demos and tests only, since the data
    /// cannot be read again once the key is dropped.
    pub fn ephemeral() -> Result<Config, ConfigError> {
        Config::builder().master_key(MasterKey::generate()?).build()
    }

    /// The prefix of live API keys (default `vb_live_`).
    pub fn live_prefix(&self) -> &str {
        &self.live_prefix
    }

    /// The prefix of test API keys (default `vb_test_`).
    pub fn test_prefix(&self) -> &str {
        &self.test_prefix
    }

    /// The prefix of internal tokens (default `vb_tok_`).
    pub fn token_prefix(&self) -> &str {
        &self.token_prefix
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("master_key", &"***")
            .field("live_prefix", &self.live_prefix)
            .field("test_prefix", &self.test_prefix)
            .field("token_prefix", &self.token_prefix)
            .field("legacy_prefixes", &self.legacy_prefixes)
            .field("durability", &self.durability)
            .field("cache_capacity", &self.cache_capacity)
            .field("page_cache_bytes", &self.page_cache_bytes)
            .field("usage_flush_interval", &self.usage_flush_interval)
            .field("close_grace", &self.close_grace)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Config`]. Its `Debug` shows whether a master key is set, never the key.
#[derive(Default)]
pub struct ConfigBuilder {
    master_key: Option<MasterKey>,
    live_prefix: Option<String>,
    test_prefix: Option<String>,
    token_prefix: Option<String>,
    legacy_prefixes: Vec<String>,
    clock: Option<Arc<dyn Clock>>,
    durability: Durability,
    cache_capacity: Option<usize>,
    page_cache_bytes: Option<usize>,
    spend_tiers: Vec<SpendTier>,
    usage_flush_interval: Option<std::time::Duration>,
    close_grace: Option<std::time::Duration>,
}

impl fmt::Debug for ConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |present: bool| if present { "***" } else { "unset" };
        f.debug_struct("ConfigBuilder")
            .field("master_key", &set(self.master_key.is_some()))
            .field("live_prefix", &self.live_prefix)
            .field("test_prefix", &self.test_prefix)
            .field("token_prefix", &self.token_prefix)
            .field("legacy_prefixes", &self.legacy_prefixes)
            .field("durability", &self.durability)
            .field("cache_capacity", &self.cache_capacity)
            .field("page_cache_bytes", &self.page_cache_bytes)
            .field("spend_tiers", &self.spend_tiers)
            .field("usage_flush_interval", &self.usage_flush_interval)
            .field("close_grace", &self.close_grace)
            .finish_non_exhaustive()
    }
}

impl ConfigBuilder {
    /// Sets the master key.
    pub fn master_key(mut self, key: MasterKey) -> Self {
        self.master_key = Some(key);
        self
    }

    /// Reads the master key from a key file (mode 0600).
    pub fn master_key_file(self, path: impl Into<PathBuf>) -> Result<Self, ConfigError> {
        let key = MasterKey::from_file(&path.into())?;
        Ok(self.master_key(key))
    }

    /// Reads the master key from `KEYLEDGER_MASTER_KEY` or `KEYLEDGER_MASTER_KEY_FILE`. An
    /// empty (or blank) variable counts as unset.
    pub fn master_key_from_env(self) -> Result<Self, ConfigError> {
        self.master_key_from(std::env::var_os)
    }

    fn master_key_from(
        self,
        var: impl Fn(&'static str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError> {
        if let Some(key) = master_key_in_env_value(var(ENV_MASTER_KEY))? {
            return Ok(self.master_key(key));
        }
        // Found by a reviewer: `KEYLEDGER_MASTER_KEY_FILE=` opened a file named "".
        let file = var(ENV_MASTER_KEY_FILE);
        match file.filter(|path| !path.to_string_lossy().trim().is_empty()) {
            Some(path) => self.master_key_file(path),
            None => Err(ConfigError::MissingMasterKey),
        }
    }

    /// Reads the key prefixes from `KEYLEDGER_LIVE_PREFIX`, `KEYLEDGER_TEST_PREFIX`,
    /// `KEYLEDGER_TOKEN_PREFIX` and `KEYLEDGER_LEGACY_PREFIXES` (comma-separated), the
    /// variables the `keyledger` CLI reads. An unset, empty or blank variable leaves its
    /// prefix as it was; [`build`](Self::build) checks the values.
    pub fn prefixes_from_env(self) -> Result<Self, ConfigError> {
        self.prefixes_from(std::env::var_os)
    }

    fn prefixes_from(
        mut self,
        var: impl Fn(&'static str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError> {
        let read = |setting: &'static str| match var(setting) {
            None => Ok(None),
            Some(value) => match value.into_string() {
                Ok(text) if text.trim().is_empty() => Ok(None),
                Ok(text) => Ok(Some(text.trim().to_owned())),
                Err(_) => Err(ConfigError::InvalidSetting {
                    setting,
                    reason: "not valid UTF-8".into(),
                }),
            },
        };
        if let Some(prefix) = read(ENV_LIVE_PREFIX)? {
            self = self.live_prefix(prefix);
        }
        if let Some(prefix) = read(ENV_TEST_PREFIX)? {
            self = self.test_prefix(prefix);
        }
        if let Some(prefix) = read(ENV_TOKEN_PREFIX)? {
            self = self.token_prefix(prefix);
        }
        for prefix in read(ENV_LEGACY_PREFIXES)?.iter().flat_map(|l| l.split(',')) {
            if !prefix.trim().is_empty() {
                self = self.legacy_prefix(prefix.trim());
            }
        }
        Ok(self)
    }

    /// Prefix of live keys, e.g. `acme_live_`: 3–12 characters of `[a-z0-9_]` ending in `_`.
    pub fn live_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.live_prefix = Some(prefix.into());
        self
    }

    /// Prefix of test keys, same rules as [`live_prefix`](Self::live_prefix).
    pub fn test_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.test_prefix = Some(prefix.into());
        self
    }

    /// Prefix of internal tokens, same rules as [`live_prefix`](Self::live_prefix).
    pub fn token_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.token_prefix = Some(prefix.into());
        self
    }

    /// Accepts keys issued by another system under `prefix` (e.g. `sk_live_`), so imported
    /// keys keep working. Such keys carry no checksum: the parser checks only the prefix,
    /// a length of 16–100 characters after it and printable ASCII. The prefix is 2–12
    /// characters of `[A-Za-z0-9_-]`: an imported key's visible prefix (up to 16
    /// characters) must start with it.
    pub fn legacy_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.legacy_prefixes.push(prefix.into());
        self
    }

    /// How credits are leased: [`Durability::Leased`] (default) or [`Durability::Exact`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Keys the verification cache holds (default 1,000,000; at least 1). Below 2,048
    /// exactly that many; a larger cache is split in up to 256 shards, each sized for its
    /// share of keys plus four standard deviations of their spread over shards, so that many
    /// fit before a shard is full, and at most 13.3 % more (1,000,000: 1,065,728). When a
    /// key's shard is full, a remembered miss makes room if the shard holds one, else the
    /// entry nearest the key's slot. Misses are remembered within the same bound, never in
    /// place of a key.
    ///
    /// The bound is in keys, not bytes: a plain key costs about 240 bytes cached (`keyledger
    /// bench`), but a key's permissions, IP allowlist and rate limits are held with it — kept
    /// once for every key with the same set, but one key with 100 long scopes and 100 IP
    /// ranges of its own costs about 16 KB, and one with 16 named rate limits about 2 KB more.
    pub fn cache_capacity(mut self, keys: usize) -> Self {
        self.cache_capacity = Some(keys);
        self
    }

    /// The most bytes of the database file's pages kept in memory by redb, below the
    /// verification cache (default 1 GiB, redb's own default; it grows to that only as pages
    /// are read or written). A miss of the verification cache reads one record through it;
    /// a smaller page cache bounds the process's memory at the cost of misses that read the
    /// operating system's page cache instead (the file stays fully usable at any size, even
    /// 0).
    pub fn page_cache_bytes(mut self, bytes: usize) -> Self {
        self.page_cache_bytes = Some(bytes);
        self
    }

    /// Spend tiers: a key that has spent at least `min_spent` units gets its rate limits
    /// raised, to the tier's explicit rates for the limits it names and by its multiplier for
    /// the others (see [`SpendTier`]). The highest tier reached applies, and never lowers a
    /// limit: a rate lower than the key's own or a lower tier's keeps the higher one.
    /// `build` refuses more than 16 tiers (every rate-limited key keeps a rate per limit per
    /// tier), a multiplier below 100 % and an explicit rate that is not a valid limit (zero,
    /// a window over 100 years, two of one name).
    pub fn spend_tiers(mut self, tiers: impl IntoIterator<Item = SpendTier>) -> Self {
        self.spend_tiers = tiers.into_iter().collect();
        // Sorted, so a key keeps only how many tiers it has reached.
        self.spend_tiers.sort_by_key(|t| t.min_spent);
        self
    }

    /// How often every key's unwritten spend and usage (requests, last use) reach the disk
    /// (default 30 s; also at every `flush`, `usage` and clean close). The writer spreads
    /// each round over small transactions between lease batches, so requests never wait
    /// behind it. What a crash loses of it is reporting, never money: unwritten spend is
    /// still leased on disk and counts as `lost_to_crash`. Zero is refused by `build`.
    /// A round also starts early when more keys wait for one than twice the cache's
    /// capacity (at least 4,096): keys evicted after use stay in memory until written, so a
    /// cache smaller than the keys in use would otherwise hold every key used within the
    /// interval.
    pub fn usage_flush_interval(mut self, every: std::time::Duration) -> Self {
        self.usage_flush_interval = Some(every);
        self
    }

    /// How long [`Ledger::close`](crate::Ledger::close) waits for grants still held (requests
    /// still running) to be committed or dropped, refusing new requests meanwhile
    /// (default 10 s). Units a grant still holds after that stay leased: the next open
    /// counts them as `lost_to_crash` (never re-granted) and `close` reports them.
    pub fn close_grace(mut self, grace: std::time::Duration) -> Self {
        self.close_grace = Some(grace);
        self
    }

    /// The clock used for timestamps, expiry and refills (default: [`CoarseClock`](crate::CoarseClock),
    /// the system clock at the kernel's tick resolution; [`SystemClock`](crate::SystemClock)
    /// for full resolution).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Validates and builds the config.
    pub fn build(self) -> Result<Config, ConfigError> {
        let master_key = self.master_key.ok_or(ConfigError::MissingMasterKey)?;
        let live_prefix = checked_prefix("live_prefix", self.live_prefix, "vb_live_")?;
        let test_prefix = checked_prefix("test_prefix", self.test_prefix, "vb_test_")?;
        let token_prefix = checked_prefix("token_prefix", self.token_prefix, "vb_tok_")?;
        let mut legacy_prefixes = Vec::new();
        for prefix in self.legacy_prefixes {
            // As long as a native prefix at most: an imported key's visible prefix (up to 16
            // characters) must start with it, and should show some of the key after it.
            let ok = (2..=VISIBLE_PREFIX_LEN).contains(&prefix.len())
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if !ok {
                return Err(ConfigError::InvalidSetting {
                    setting: "legacy_prefix",
                    reason: format!(
                        "2–{VISIBLE_PREFIX_LEN} characters of A-Z, a-z, 0-9, `_` and `-` \
                         (an imported key's visible prefix, at most \
                         {MAX_VISIBLE_PREFIX_LEN} characters, must start with it)"
                    ),
                });
            }
            legacy_prefixes.push(prefix);
        }
        let mut distinct = vec![&live_prefix, &test_prefix, &token_prefix];
        distinct.extend(legacy_prefixes.iter());
        for (i, a) in distinct.iter().enumerate() {
            for b in &distinct[i + 1..] {
                if a.starts_with(b.as_str()) || b.starts_with(a.as_str()) {
                    return Err(ConfigError::InvalidSetting {
                        setting: "prefixes",
                        reason: format!("`{a}` and `{b}` overlap; each prefix must be distinct"),
                    });
                }
            }
        }
        // Tiers raise limits as spend grows: one that lowered them would make a key's limits
        // shrink as it pays more. Lower than a lower tier's, a multiplier or an explicit rate
        // keeps the higher rate (see `SpendTier`); below 100 %, it can only be a mistake.
        if self.spend_tiers.len() > MAX_SPEND_TIERS {
            return Err(ConfigError::InvalidSetting {
                setting: "spend_tiers",
                reason: format!(
                    "{} tiers: at most {MAX_SPEND_TIERS} (every rate-limited key keeps a rate \
                     per limit per tier)",
                    self.spend_tiers.len()
                ),
            });
        }
        for tier in &self.spend_tiers {
            if tier.multiplier_pct < 100 {
                return Err(ConfigError::InvalidSetting {
                    setting: "spend_tiers",
                    reason: format!(
                        "the tier from {} spent multiplies by {} % (tiers only raise limits: \
                         100 % or more)",
                        tier.min_spent, tier.multiplier_pct
                    ),
                });
            }
            let explicit = Limits {
                rate_limits: tier.rate_limits.clone(),
                token_window: tier.token_window,
                ..Limits::default()
            };
            if let Err(e) = crate::record::rules::limits(&explicit) {
                return Err(ConfigError::InvalidSetting {
                    setting: "spend_tiers",
                    reason: format!("the tier from {} spent: {e}", tier.min_spent),
                });
            }
        }
        let cache_capacity = self.cache_capacity.unwrap_or(1_000_000);
        if cache_capacity == 0 {
            return Err(ConfigError::InvalidSetting {
                setting: "cache_capacity",
                reason: "must be at least 1 key (a verify caches the key it found)".into(),
            });
        }
        let usage_flush_interval = self
            .usage_flush_interval
            .unwrap_or(std::time::Duration::from_secs(30));
        if usage_flush_interval.is_zero() {
            return Err(ConfigError::InvalidSetting {
                setting: "usage_flush_interval",
                reason: "must be longer than zero (zero would rewrite every key on every batch)"
                    .into(),
            });
        }
        Ok(Config {
            master_key,
            live_prefix,
            test_prefix,
            token_prefix,
            legacy_prefixes,
            durability: self.durability,
            cache_capacity,
            page_cache_bytes: self.page_cache_bytes.unwrap_or(DEFAULT_PAGE_CACHE_BYTES),
            spend_tiers: self.spend_tiers,
            usage_flush_interval,
            close_grace: self
                .close_grace
                .unwrap_or(std::time::Duration::from_secs(10)),
            clock: self.clock.unwrap_or_else(|| Arc::new(CoarseClock)),
        })
    }
}

/// The master key in `KEYLEDGER_MASTER_KEY`'s value, if it holds one. Empty or blank counts
/// as unset: `KEYLEDGER_MASTER_KEY=` is how compose files and shells often leave it out.
/// Errors name the variable, never the value.
fn master_key_in_env_value(
    value: Option<std::ffi::OsString>,
) -> Result<Option<MasterKey>, ConfigError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let invalid = |reason: String| ConfigError::InvalidSetting {
        setting: ENV_MASTER_KEY,
        reason,
    };
    let text = zeroize::Zeroizing::new(
        value
            .into_string()
            .map_err(|_| invalid("not valid UTF-8".into()))?,
    );
    if text.trim().is_empty() {
        return Ok(None);
    }
    MasterKey::parse(&text)
        .map(Some)
        .map_err(|e| invalid(e.to_string()))
}

fn checked_prefix(
    setting: &'static str,
    given: Option<String>,
    default: &str,
) -> Result<String, ConfigError> {
    let prefix = given.unwrap_or_else(|| default.to_owned());
    let ok_chars = prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !(3..=12).contains(&prefix.len()) || !ok_chars || !prefix.ends_with('_') {
        return Err(ConfigError::InvalidSetting {
            setting,
            reason: "3–12 characters of a-z, 0-9 and `_`, ending in `_`".into(),
        });
    }
    Ok(prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of no keys is refused, not made one of 1 (found by a reviewer).
    #[test]
    fn a_cache_of_no_keys_is_refused() {
        let master = || MasterKey::from_bytes(&[7; 32]).unwrap();
        let err = Config::builder()
            .master_key(master())
            .cache_capacity(0)
            .build()
            .err();
        let setting = match err {
            Some(ConfigError::InvalidSetting { setting, .. }) => setting,
            other => panic!("{other:?}"),
        };
        assert_eq!(setting, "cache_capacity");
        let one = Config::builder().master_key(master()).cache_capacity(1);
        assert_eq!(one.build().unwrap().cache_capacity, 1);
    }

    #[test]
    fn a_blank_master_key_file_variable_counts_as_unset() {
        for blank in ["", "  "] {
            let env = |name: &'static str| (name == ENV_MASTER_KEY_FILE).then(|| blank.into());
            let err = Config::builder().master_key_from(env).unwrap_err();
            assert!(
                matches!(err, ConfigError::MissingMasterKey),
                "{blank:?}: {err}"
            );
        }
    }

    #[test]
    fn prefixes_come_from_the_variables_the_cli_reads() {
        let env = |name: &'static str| {
            let value = match name {
                ENV_LIVE_PREFIX => "acme_live_",
                ENV_TEST_PREFIX => " ",
                ENV_TOKEN_PREFIX => "acme_tok_",
                ENV_LEGACY_PREFIXES => "sk_live_, rk_live_,",
                _ => return None,
            };
            Some(value.into())
        };
        let config = Config::builder()
            .master_key(MasterKey::from_bytes(&[7; 32]).unwrap())
            .prefixes_from(env)
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(config.live_prefix(), "acme_live_");
        assert_eq!(config.test_prefix(), "vb_test_", "blank counts as unset");
        assert_eq!(config.token_prefix(), "acme_tok_");
        assert_eq!(config.legacy_prefixes, ["sk_live_", "rk_live_"]);
        // A bad value is the build's error, naming the setting; not UTF-8 names the variable.
        let bad = |name: &'static str| (name == ENV_LIVE_PREFIX).then(|| "Live!".into());
        let built = Config::builder()
            .master_key(MasterKey::from_bytes(&[7; 32]).unwrap())
            .prefixes_from(bad)
            .unwrap()
            .build();
        assert!(matches!(built, Err(ConfigError::InvalidSetting { .. })));
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let not_utf8 = |_: &'static str| Some(std::ffi::OsString::from_vec(vec![0xff]));
            let err = Config::builder().prefixes_from(not_utf8).unwrap_err();
            assert!(err.to_string().contains(ENV_LIVE_PREFIX), "{err}");
        }
    }

    #[test]
    fn building_without_a_master_key_names_both_ways_to_give_one() {
        let err = Config::builder().build().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("KEYLEDGER_MASTER_KEY") && msg.contains("KEYLEDGER_MASTER_KEY_FILE"));
    }

    #[test]
    fn prefixes_are_validated() {
        let key = || MasterKey::generate().unwrap();
        assert!(
            Config::builder()
                .master_key(key())
                .live_prefix("Bad-")
                .build()
                .is_err()
        );
        assert!(
            Config::builder()
                .master_key(key())
                .live_prefix("nounderscore")
                .build()
                .is_err()
        );
        assert!(
            Config::builder()
                .master_key(key())
                .test_prefix("vb_live_")
                .build()
                .is_err()
        );
        let c = Config::builder()
            .master_key(key())
            .live_prefix("acme_")
            .build()
            .unwrap();
        assert_eq!(c.live_prefix(), "acme_");
        assert!(!format!("{c:?}").contains(key().to_hex().expose()));
    }

    #[test]
    fn legacy_prefixes_fit_in_an_imported_keys_visible_prefix() {
        let with_legacy = |p: &str| {
            Config::builder()
                .master_key(MasterKey::generate().unwrap())
                .legacy_prefix(p)
                .build()
        };
        assert!(with_legacy("sk_live_").is_ok());
        assert!(with_legacy("acme_legacy_").is_ok(), "12 characters");
        match with_legacy("acme_legacy_k_") {
            Err(ConfigError::InvalidSetting {
                setting: "legacy_prefix",
                reason,
            }) => assert!(reason.contains("2–12") && reason.contains("visible prefix")),
            other => panic!("{other:?}"),
        }
        assert!(with_legacy("x").is_err());
    }

    #[test]
    fn the_master_key_variable_is_unset_when_empty_and_named_when_bad() {
        use std::ffi::OsString;
        assert!(master_key_in_env_value(None).unwrap().is_none());
        assert!(master_key_in_env_value(Some("".into())).unwrap().is_none());
        assert!(
            master_key_in_env_value(Some(" \n".into()))
                .unwrap()
                .is_none()
        );
        let key = MasterKey::generate().unwrap();
        let hex = key.to_hex().expose().to_owned();
        let parsed = master_key_in_env_value(Some(OsString::from(&hex))).unwrap();
        assert_eq!(parsed.unwrap().to_hex().expose(), hex);

        let secretish = "deadbeefcafe0123";
        let err = master_key_in_env_value(Some(secretish.into())).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(ENV_MASTER_KEY) && msg.contains("64 hex digits"),
            "{msg}"
        );
        assert!(!msg.contains(secretish), "{msg}");
    }
}
