//! Command-line definitions (clap derive). Parsing only: the commands live in their own modules.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use keyledger::SubscriptionStatus;

/// keyledger: API keys, tokens, accounts and route rules in an embedded redb database.
#[derive(Debug, Parser)]
#[command(name = "keyledger", version, propagate_version = true)]
pub struct Cli {
    /// The database file.
    #[arg(
        long,
        global = true,
        env = "KEYLEDGER_DB",
        default_value = "./keyledger.redb"
    )]
    pub db: PathBuf,

    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,

    /// Key file holding the master key (mode 0600). Default: `<db>.key` if it exists.
    /// `KEYLEDGER_MASTER_KEY` (64 hex digits) takes precedence over any file.
    #[arg(long, global = true, env = "KEYLEDGER_MASTER_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
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
    /// Show recent audit events, newest first.
    Audit {
        /// How many events.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Identify a key: format, look-up, disabled and expiry checks. Exit 3 on denial.
    Authenticate {
        /// The full plaintext key, or `-` to read it from stdin.
        key: String,
    },
    /// Check database integrity and ledger invariants. Exit 1 if a problem is found.
    Check,
    /// Run a guided tour on a scratch ledger in a temporary directory; needs no setup.
    Demo,
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
        #[arg(long = "entitlement")]
        entitlements: Vec<String>,
    },
}

/// Page size and cursor of a listing.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Items per page (1–100, default 25).
    #[arg(long)]
    pub limit: Option<usize>,
    /// The `next cursor` printed by the previous page.
    #[arg(long)]
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
    /// Starting credits (without: unmetered).
    #[arg(long)]
    pub credits: Option<u64>,
    /// Expire this many seconds from now.
    #[arg(long, value_name = "SECS")]
    pub expires_in: Option<u64>,
    /// Metadata entry `key=value` (repeatable; not secret, shown in listings).
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_metadata)]
    pub metadata: Vec<(String, String)>,
    /// Named rate limit `name=limit/secs`, e.g. `requests=100/60` (repeatable).
    #[arg(long = "rate-limit", value_name = "NAME=LIMIT/SECS", value_parser = parse_rate_limit)]
    pub rate_limits: Vec<RateLimitArg>,
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
    /// List an account's keys (masked), a page at a time.
    List {
        /// Owning account id (`acct_…`).
        #[arg(long)]
        owner: String,
        /// Page size and cursor.
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one key (masked).
    Show {
        /// Key id.
        id: String,
    },
    /// Change a key's name, permissions, IP allowlist, credits or expiry.
    Update(UpdateArgs),
    /// Disable a key: it is refused from the next request on.
    Disable {
        /// Key id.
        id: String,
    },
    /// Re-enable a disabled key.
    Enable {
        /// Key id.
        id: String,
    },
    /// Issue a new secret for a key (printed once); the old one works for `--grace` seconds.
    Roll {
        /// Key id.
        id: String,
        /// Seconds the old secret keeps working.
        #[arg(long, default_value_t = 0, value_name = "SECS")]
        grace: u64,
    },
    /// Delete a key for good.
    Delete {
        /// Key id.
        id: String,
    },
    /// Support look-up by the visible prefix (8–12 characters); shows masked keys.
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
    #[arg(long = "permission")]
    pub permissions: Vec<String>,
    /// Replaces the IP allowlist (repeatable).
    #[arg(long = "ip")]
    pub ips: Vec<String>,
    /// Sets the credit balance.
    #[arg(long)]
    pub credits: Option<u64>,
    /// Expire this many seconds from now.
    #[arg(long, value_name = "SECS")]
    pub expires_in: Option<u64>,
    /// Remove the expiry.
    #[arg(long)]
    pub no_expiry: bool,
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
        /// SHA-256 of the key, 64 hex digits.
        #[arg(long, value_name = "HEX64", value_parser = parse_sha256)]
        sha256: [u8; 32],
        /// Visible prefix as the old system showed it (≤ 12 characters).
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

/// Parses 64 hex digits into 32 bytes.
fn parse_sha256(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "expected 64 hex digits, got {} characters",
            s.chars().count()
        ));
    }
    let mut out = [0u8; 32];
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
        assert_eq!(parse_sha256(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert!(parse_sha256("xyz").is_err());
        assert!(parse_sha256(&"g".repeat(64)).is_err());
        let rl = parse_rate_limit("requests=100/60").unwrap();
        assert_eq!(
            (rl.name.as_str(), rl.limit, rl.window_secs),
            ("requests", 100, 60)
        );
        assert!(parse_rate_limit("requests=100").is_err());
        assert_eq!(parse_metadata("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_status("nope").is_err());
    }
}
