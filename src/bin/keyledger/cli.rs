//! Command-line definitions (clap derive). Parsing only: the commands live in their own modules.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use keyledger::{Refill, RefillInterval, SubscriptionStatus};
use zeroize::Zeroizing;

/// keyledger: API keys, tokens, accounts and route rules in an embedded redb database.
#[derive(Debug, Parser)]
#[command(name = "keyledger", version, propagate_version = true)]
pub struct Cli {
    /// The database file.
    #[arg(
        long,
        global = true,
        env = "KEYLEDGER_DB",
        hide_env_values = true,
        default_value = "./keyledger.redb"
    )]
    pub db: PathBuf,

    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,

    /// Key file holding the master key (mode 0600). Default: `<db>.key` if it exists.
    /// `KEYLEDGER_MASTER_KEY` (64 hex digits) takes precedence over any file.
    #[arg(
        long,
        global = true,
        env = "KEYLEDGER_MASTER_KEY_FILE",
        hide_env_values = true
    )]
    pub key_file: Option<PathBuf>,

    /// Who makes the changes, as the audit trail and the records' `updated_by` keep it
    /// (1–254 characters, no control characters, no API key).
    #[arg(
        long = "by",
        global = true,
        env = "KEYLEDGER_ACTOR",
        hide_env_values = true,
        default_value = "cli",
        value_name = "WHO"
    )]
    pub actor: String,

    /// Key prefixes, for a database whose server configures its own.
    #[command(flatten)]
    pub prefixes: Prefixes,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The key prefixes the server sharing the database configures, so that the CLI mints and
/// recognizes the same keys (they are configuration, not stored in the file).
#[derive(Debug, Args)]
pub struct Prefixes {
    /// Prefix of live API keys (default `vb_live_`).
    #[arg(long, global = true, env = keyledger::ENV_LIVE_PREFIX, hide_env_values = true)]
    pub live_prefix: Option<String>,
    /// Prefix of test API keys (default `vb_test_`).
    #[arg(long, global = true, env = keyledger::ENV_TEST_PREFIX, hide_env_values = true)]
    pub test_prefix: Option<String>,
    /// Prefix of internal tokens (default `vb_tok_`).
    #[arg(long, global = true, env = keyledger::ENV_TOKEN_PREFIX, hide_env_values = true)]
    pub token_prefix: Option<String>,
    /// Prefix of keys imported from another system (repeatable; comma-separated in
    /// `KEYLEDGER_LEGACY_PREFIXES`).
    #[arg(
        long = "legacy-prefix",
        global = true,
        env = keyledger::ENV_LEGACY_PREFIXES,
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub legacy_prefixes: Vec<String>,
}

/// The top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new database and a master key file `<db>.key` next to it.
    Init,
    /// Manage accounts (the owners of keys).
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage internal tokens (same lifecycle as keys, with a type).
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Manage route rules (route prefix → permission, entitlement, cost).
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Show recent audit events, newest first; or, with `--after`, the events after one,
    /// oldest first (to export the trail, or to read on past a damaged event).
    Audit {
        /// How many events (1–1,000).
        #[arg(long, default_value_t = 20, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
        limit: usize,
        /// Show the events after this sequence number, oldest first.
        #[arg(long, value_name = "SEQ")]
        after: Option<u64>,
    },
    /// Identify a key: format, look-up, disabled and expiry checks. Exit 3 on denial.
    Authenticate {
        /// The full plaintext key, or `-` to read it from stdin.
        key: String,
    },
    /// Verify a request as a server would: format, key, state, route permission, IP,
    /// subscription and entitlement, rate limits, credits. Exit 0 on a grant, 3 on a denial.
    ///
    /// A grant is committed with the reserved cost, as if the work was done at the quoted
    /// price: the credits are spent. `--commit N` settles the real cost instead (less refunds
    /// the difference, more charges it, never below zero), `--refund` drops the grant so the
    /// reservation goes back, and `--cost 0` checks without spending. Rate-limit state lives
    /// in the process's memory, so each CLI invocation starts with full limits.
    Verify(VerifyArgs),
    /// Credits and usage of a key, token or pool: remaining, granted, spent, lost to crashes,
    /// leased, requests, lifetime spend, last use. For an account, requests and spend summed
    /// over its keys.
    Usage {
        /// Key (`key_…`), token (`tok_…`), pool (`pool_…`) or account (`acct_…`) id.
        id: String,
    },
    /// Change the credit balance of a key, token or pool.
    #[command(subcommand)]
    Credits(CreditsCommand),
    /// Shared credit pools: several keys of one account spending one budget.
    #[command(subcommand)]
    Pools(PoolsCommand),
    /// An owner's OAuth connections (metadata only, never tokens).
    #[command(subcommand)]
    Connectors(ConnectorsCommand),
    /// An owner's secrets for outbound calls (names and hosts only, never values).
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Check database integrity and ledger invariants. Exit 4 if a problem is found, 1 if the
    /// check could not run (no such file, in use, another master key…).
    ///
    /// Read-only: the file is left byte for byte as it was, so a check can be repeated and a
    /// backup checked in place. It recovers no leases (units a crash left leased are reported
    /// as lost, as the next open records them) and migrates no older format (refused: open it
    /// first).
    Check,
    /// Run a guided tour on a scratch ledger in a temporary directory; needs no setup.
    Demo,
    /// Load test on a scratch database: throughput, latency and the ratio to the floor.
    Bench(crate::bench::BenchArgs),
}

/// `verify` arguments.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("settle").args(["commit", "refund"])))]
pub struct VerifyArgs {
    /// The full plaintext key, or `-` to read it from stdin.
    pub key: String,
    /// The request's route, e.g. `/api/v1/quickhits/create`.
    #[arg(long)]
    pub route: String,
    /// The client's address, checked against the key's IP allowlist.
    #[arg(long)]
    pub ip: Option<IpAddr>,
    /// Credits to reserve (default: the route rule's cost, or 1); 0 checks without spending.
    #[arg(long, value_name = "N")]
    pub cost: Option<u64>,
    /// Commit this actual cost instead of the reserved one; prints the receipt.
    #[arg(long, value_name = "N")]
    pub commit: Option<u64>,
    /// Drop the grant uncommitted: the reservation is refunded.
    #[arg(long)]
    pub refund: bool,
}

/// `credits …`
#[derive(Debug, Subcommand)]
pub enum CreditsCommand {
    /// Add credits to a key's, token's or pool's balance.
    TopUp {
        /// Key, token or pool id.
        id: String,
        /// Credits to add.
        units: u64,
    },
    /// Set a key's, token's or pool's balance to exactly N credits.
    Set {
        /// Key, token or pool id.
        id: String,
        /// The new balance.
        units: u64,
    },
}

/// `pools …`
#[derive(Debug, Subcommand)]
pub enum PoolsCommand {
    /// Create a pool; keys join it with `keys create --pool POOL_ID` or `keys update KEY_ID
    /// --pool POOL_ID`.
    Create {
        /// Owning account id (`acct_…`).
        #[arg(long)]
        owner: String,
        /// Display name (1–50 characters).
        #[arg(long)]
        name: String,
        /// Starting credits.
        #[arg(long)]
        credits: u64,
        /// Periodic refill.
        #[command(flatten)]
        refill: RefillArgs,
        /// Emit a low-balance event when the pool falls to or below this many credits.
        #[arg(long, value_name = "T")]
        low_balance: Option<u64>,
    },
    /// List an owner's pools, oldest first: id, name, credits, refill, threshold.
    List {
        /// Owning account id (`acct_…`).
        #[arg(long)]
        owner: String,
    },
    /// Show one pool.
    Get {
        /// Pool id (`pool_…`).
        id: String,
    },
    /// Rename a pool, change its refill or its low-balance threshold (its balance changes
    /// with `credits top-up` and `credits set`).
    #[command(group(
        ArgGroup::new("change")
            .args(["name", "refill_daily", "refill_monthly", "no_refill", "low_balance", "no_low_balance"])
            .required(true)
            .multiple(true)
    ))]
    Update {
        /// Pool id (`pool_…`).
        id: String,
        /// New display name (1–50 characters).
        #[arg(long)]
        name: Option<String>,
        /// New refill. A new one starts with the next period; a changed one also refills,
        /// on the new terms, a period that began since the last refill.
        #[command(flatten)]
        refill: RefillArgs,
        /// Stop refilling the pool.
        #[arg(long, conflicts_with_all = ["refill_daily", "refill_monthly"])]
        no_refill: bool,
        /// Emit a low-balance event when the pool falls to or below this many credits.
        #[arg(long, value_name = "T", conflicts_with = "no_low_balance")]
        low_balance: Option<u64>,
        /// Remove the low-balance threshold.
        #[arg(long)]
        no_low_balance: bool,
    },
    /// Delete a pool and its balance (refused while a key or token spends from it).
    Delete {
        /// Pool id (`pool_…`).
        id: String,
    },
}

/// `connectors …`
#[derive(Debug, Subcommand)]
pub enum ConnectorsCommand {
    /// List an owner's connections: provider, scopes, expiry, health, last update.
    List {
        /// Owning account id (`acct_…`).
        #[arg(long)]
        owner: String,
    },
}

/// `secrets …`
#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// List an owner's secrets: names, allowed hosts, version and dates.
    List {
        /// Owning account id (`acct_…`).
        #[arg(long)]
        owner: String,
    },
}

/// A refill that replaces the balance every day or every month (at most one of the two).
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct RefillArgs {
    /// Set the balance to AMOUNT every day at 00:00 UTC.
    #[arg(long, value_name = "AMOUNT")]
    pub refill_daily: Option<u64>,
    /// Set the balance to AMOUNT on the first of every month, 00:00 UTC.
    #[arg(long, value_name = "AMOUNT")]
    pub refill_monthly: Option<u64>,
}

impl RefillArgs {
    /// The refill the flags ask for, if any.
    pub fn refill(&self) -> Option<Refill> {
        let (amount, interval) = match (self.refill_daily, self.refill_monthly) {
            (Some(amount), _) => (amount, RefillInterval::Daily),
            (None, Some(amount)) => (amount, RefillInterval::Monthly),
            (None, None) => return None,
        };
        Some(Refill { amount, interval })
    }
}

/// `accounts …`
#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account.
    Create {
        /// Display name (1–50 characters).
        #[arg(long)]
        name: String,
        /// Subscription status.
        #[arg(long, value_parser = parse_status, default_value = "active")]
        status: SubscriptionStatus,
        /// An entitlement (repeatable).
        #[arg(long = "entitlement")]
        entitlements: Vec<String>,
    },
    /// List accounts in creation order.
    List(PageArgs),
    /// Show one account.
    Show {
        /// Account id (`acct_…`).
        id: String,
    },
    /// Change an account.
    Update {
        /// Account id (`acct_…`).
        id: String,
        /// New display name.
        #[arg(long)]
        name: Option<String>,
        /// New subscription status.
        #[arg(long, value_parser = parse_status)]
        status: Option<SubscriptionStatus>,
        /// Replaces the entitlements (repeatable).
        #[arg(long = "entitlement", conflicts_with = "no_entitlements")]
        entitlements: Vec<String>,
        /// Remove every entitlement (routes that require one refuse the account's keys).
        #[arg(long)]
        no_entitlements: bool,
    },
    /// Delete an account that owns nothing (refused while it owns keys, tokens, pools,
    /// connections or secrets).
    Delete {
        /// Account id (`acct_…`).
        id: String,
    },
}

/// Page size and cursor of a listing.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Items per page (1–100, default 25).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100))]
    pub limit: Option<usize>,
    /// The `next cursor` printed by the previous page (it may start with `-`).
    #[arg(long, allow_hyphen_values = true)]
    pub cursor: Option<String>,
}

/// Settings shared by `keys create` and `tokens create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Owning account id (`acct_…`).
    #[arg(long)]
    pub owner: String,
    /// Display name (1–50 characters).
    #[arg(long)]
    pub name: String,
    /// A permission scope, e.g. `quickhits:create`, `quickhits:*`, `*` (repeatable).
    #[arg(long = "permission")]
    pub permissions: Vec<String>,
    /// An allowed client address or CIDR range (repeatable; none: any).
    #[arg(long = "ip")]
    pub ips: Vec<String>,
    /// Starting credits (without: unmetered, unless a refill or pool is given).
    #[arg(long)]
    pub credits: Option<u64>,
    /// Spend from this shared pool (`pool_…`) instead of an own balance.
    #[arg(
        long,
        value_name = "POOL_ID",
        conflicts_with_all = ["credits", "refill_daily", "refill_monthly"]
    )]
    pub pool: Option<String>,
    /// Periodic refill; without `--credits` the balance starts at the refill amount.
    #[command(flatten)]
    pub refill: RefillArgs,
    /// Emit a low-balance event when the credits left fall to or below this.
    #[arg(long, value_name = "T")]
    pub low_balance: Option<u64>,
    /// Expire this many seconds from now (at least 1).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub expires_in: Option<u64>,
    /// Metadata entry `key=value` (repeatable; not secret, shown in listings).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_metadata)]
    pub metadata: Vec<(String, String)>,
    /// Named rate limit `name=limit/secs`, e.g. `requests=100/60` (repeatable).
    #[arg(long = "rate-limit", value_name = "NAME=LIMIT/SECS", value_parser = parse_rate_limit)]
    pub rate_limits: Vec<RateLimitArg>,
    /// Token window `tokens/secs`, e.g. `10000/60`: at most this much cost per window. A
    /// request costing more than a whole window is admitted once the window is empty; the
    /// key's next requests then wait until the excess is paid off at the window's rate.
    #[arg(long, value_name = "TOKENS/SECS", value_parser = parse_token_window)]
    pub token_window: Option<TokenWindowArg>,
}

/// A parsed `--token-window tokens/secs`.
#[derive(Debug, Clone, Copy)]
pub struct TokenWindowArg {
    /// Tokens (units of cost) per window.
    pub tokens: u64,
    /// Window in seconds.
    pub window_secs: u64,
}

/// A parsed `--rate-limit name=limit/secs`.
#[derive(Debug, Clone)]
pub struct RateLimitArg {
    /// Limit name.
    pub name: String,
    /// Requests per window.
    pub limit: u64,
    /// Window in seconds.
    pub window_secs: u64,
}

/// Subcommands shared by keys and tokens.
#[derive(Debug, Subcommand)]
pub enum Lifecycle {
    /// List an account's keys or tokens (masked), a page at a time.
    List {
        /// Owning account id (`acct_…`).
        #[arg(long)]
        owner: String,
        /// Page size and cursor.
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one key or token (masked).
    Show {
        /// Key or token id.
        id: String,
    },
    /// Change a key's or token's name, permissions, IP allowlist, credits or expiry.
    Update(UpdateArgs),
    /// Disable a key or token: it is refused from the next request on.
    Disable {
        /// Key or token id.
        id: String,
    },
    /// Re-enable a disabled key or token.
    Enable {
        /// Key or token id.
        id: String,
    },
    /// Issue a new secret for a key or token (printed once); the old one works for `--grace`
    /// seconds (at most 30 days).
    Roll {
        /// Key or token id.
        id: String,
        /// Seconds the old secret keeps working (0 to 2,592,000: 30 days).
        #[arg(
            long,
            default_value_t = 0,
            value_name = "SECS",
            value_parser = clap::value_parser!(u64).range(..=keyledger::MAX_ROLL_GRACE_SECS)
        )]
        grace: u64,
    },
    /// Delete a key or token for good.
    Delete {
        /// Key or token id.
        id: String,
    },
    /// Support look-up by the start of a visible prefix (a key prefix, then up to the 12
    /// characters a default key shows); shows masked keys or tokens.
    Find {
        /// The visible start of the key, e.g. `vb_live_AbCd`.
        prefix: String,
    },
}

/// `keys update` / `tokens update` arguments.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("expiry").args(["expires_in", "no_expiry"])))]
pub struct UpdateArgs {
    /// Key id.
    pub id: String,
    /// New display name.
    #[arg(long)]
    pub name: Option<String>,
    /// Replaces the permissions (repeatable).
    #[arg(long = "permission", conflicts_with = "no_permissions")]
    pub permissions: Vec<String>,
    /// Remove every permission (routes that require one refuse the key).
    #[arg(long)]
    pub no_permissions: bool,
    /// Replaces the IP allowlist (repeatable).
    #[arg(long = "ip", conflicts_with = "any_ip")]
    pub ips: Vec<String>,
    /// Clear the IP allowlist: the key is accepted from any address.
    #[arg(long)]
    pub any_ip: bool,
    /// Sets the credit balance.
    #[arg(long, conflicts_with = "no_credits")]
    pub credits: Option<u64>,
    /// Make the key unmetered: its balance, refill and low-balance threshold go.
    #[arg(long)]
    pub no_credits: bool,
    /// Move the key to this credit pool of its owner (`pool_…`); a key with a balance of its
    /// own joins only with `--no-credits`, which drops that balance.
    #[arg(long, conflicts_with_all = ["no_pool", "credits"])]
    pub pool: Option<String>,
    /// Take the key out of its pool: unmetered, or on its own balance with `--credits`.
    #[arg(long)]
    pub no_pool: bool,
    /// Expire this many seconds from now (at least 1; `disable` stops it now).
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub expires_in: Option<u64>,
    /// Remove the expiry.
    #[arg(long)]
    pub no_expiry: bool,
    /// Emit a low-balance event when the credits left fall to or below this.
    #[arg(long, value_name = "CREDITS", conflicts_with = "no_low_balance")]
    pub low_balance: Option<u64>,
    /// Remove the low-balance threshold.
    #[arg(long)]
    pub no_low_balance: bool,
}

/// `keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create an API key; its plaintext is printed this once.
    Create {
        /// Key settings.
        #[command(flatten)]
        args: CreateArgs,
        /// Make a test key (`vb_test_…`).
        #[arg(long)]
        test: bool,
    },
    /// The lifecycle subcommands.
    #[command(flatten)]
    Lifecycle(Lifecycle),
    /// Import a key issued elsewhere by its plain SHA-256 hash; rehashed on first use.
    Import {
        /// Owning account id (`acct_…`).
        #[arg(long)]
        owner: String,
        /// Display name (1–50 characters).
        #[arg(long)]
        name: String,
        /// SHA-256 of the key, 64 hex digits, or `-` to read them from stdin (keeping them
        /// out of shell history and process listings: with the digest, a short key can be
        /// found offline).
        #[arg(long, value_name = "HEX64|-", value_parser = parse_sha256_arg)]
        sha256: Sha256Arg,
        /// Visible prefix as the old system showed it (≤ 12 characters, or the key prefix
        /// and 4 more when longer).
        #[arg(long)]
        prefix: String,
        /// Visible suffix as the old system showed it (≤ 4 characters).
        #[arg(long)]
        suffix: String,
    },
    /// Switch new keys to another hash scheme; old keys move over as they are used.
    #[command(group(ArgGroup::new("scheme").args(["pepper", "blake3"]).required(true)))]
    RotateHash {
        /// HMAC-SHA256 with this pepper version.
        #[arg(long, value_name = "N")]
        pepper: Option<u32>,
        /// BLAKE3 keyed with this pepper version.
        #[arg(long, value_name = "N")]
        blake3: Option<u32>,
    },
    /// How many stored key hashes each scheme still has.
    HashStatus,
}

/// `tokens …`
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token of a type; its plaintext is printed this once.
    Create {
        /// Token settings.
        #[command(flatten)]
        args: CreateArgs,
        /// The token's type, e.g. `service` or `webhook`.
        #[arg(long = "type", value_name = "T")]
        token_type: String,
    },
    /// The lifecycle subcommands.
    #[command(flatten)]
    Lifecycle(Lifecycle),
}

/// `routes …`
#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// Create or replace the rule for a route prefix.
    Set {
        /// Route prefix, e.g. `/api/v1/quickhits/`.
        prefix: String,
        /// Permission a key must hold.
        #[arg(long)]
        permission: Option<String>,
        /// Entitlement the owner's account must hold.
        #[arg(long)]
        entitlement: Option<String>,
        /// Default cost of one request.
        #[arg(long, default_value_t = 1)]
        cost: u64,
        /// Price of one unit of cost, in millionths of the currency unit (shown on receipts).
        #[arg(long, value_name = "N", default_value_t = 0)]
        price_micros: u64,
    },
    /// List all rules.
    List,
    /// Remove the rule for exactly this prefix.
    Remove {
        /// Route prefix.
        prefix: String,
    },
}

/// Parses a subscription status (`active`, `trialing`, `past_due`, `canceled`, `suspended`).
fn parse_status(s: &str) -> Result<SubscriptionStatus, String> {
    s.parse().map_err(|e: keyledger::Error| e.to_string())
}

/// Parses `key=value`.
fn parse_metadata(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((k.to_owned(), v.to_owned()))
}

/// Parses `name=limit/secs`.
fn parse_rate_limit(s: &str) -> Result<RateLimitArg, String> {
    let usage = "expected NAME=LIMIT/SECS, e.g. requests=100/60";
    let (name, rest) = s.split_once('=').ok_or(usage)?;
    let (limit, secs) = rest.split_once('/').ok_or(usage)?;
    let limit = limit.trim().parse().map_err(|_| usage)?;
    let window_secs = secs.trim().parse().map_err(|_| usage)?;
    Ok(RateLimitArg {
        name: name.to_owned(),
        limit,
        window_secs,
    })
}

/// Parses `tokens/secs`.
fn parse_token_window(s: &str) -> Result<TokenWindowArg, String> {
    let usage = "expected TOKENS/SECS, e.g. 10000/60";
    let (tokens, secs) = s.split_once('/').ok_or(usage)?;
    Ok(TokenWindowArg {
        tokens: tokens.trim().parse().map_err(|_| usage)?,
        window_secs: secs.trim().parse().map_err(|_| usage)?,
    })
}

/// `keys import --sha256`: the digest given, or `-` to read it from stdin. `Debug` shows
/// which, never the digest.
#[derive(Clone)]
pub enum Sha256Arg {
    /// `-`: 64 hex digits on stdin's first line.
    Stdin,
    /// The digest given on the command line.
    Given(Zeroizing<[u8; 32]>),
}

impl std::fmt::Debug for Sha256Arg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sha256Arg::Stdin => f.write_str("Stdin"),
            Sha256Arg::Given(_) => f.write_str("Given(***)"),
        }
    }
}

/// `-`, or 64 hex digits.
fn parse_sha256_arg(s: &str) -> Result<Sha256Arg, String> {
    match s {
        "-" => Ok(Sha256Arg::Stdin),
        s => parse_sha256(s).map(Sha256Arg::Given),
    }
}

/// Parses 64 hex digits (surrounding whitespace ignored) into 32 bytes, zeroized when
/// dropped. The error says how many characters were found, never what they were.
pub fn parse_sha256(s: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected 64 hex digits, got {} characters",
            s.chars().count()
        ));
    }
    let mut out = Zeroizing::new([0u8; 32]);
    for (byte, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn value_parsers() {
        assert_eq!(*parse_sha256(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert!(matches!(parse_sha256_arg("-"), Ok(Sha256Arg::Stdin)));
        let given = parse_sha256_arg(&"cd".repeat(32)).unwrap();
        assert_eq!(format!("{given:?}"), "Given(***)");
        assert!(parse_sha256("xyz").is_err());
        assert!(parse_sha256(&"g".repeat(64)).is_err());
        let rl = parse_rate_limit("requests=100/60").unwrap();
        assert_eq!(
            (rl.name.as_str(), rl.limit, rl.window_secs),
            ("requests", 100, 60)
        );
        assert!(parse_rate_limit("requests=100").is_err());
        let tw = parse_token_window("10000/60").unwrap();
        assert_eq!((tw.tokens, tw.window_secs), (10_000, 60));
        assert!(parse_token_window("10000").is_err());
        assert!(parse_token_window("x/60").is_err());
        assert_eq!(parse_metadata("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_status("nope").is_err());
    }
}
