//! `keys …` and `tokens …`: the key lifecycle, import and hash-scheme rotation.

use keyledger::{
    Clock, HashScheme, ImportKey, ImportedHash, KeyInfo, KeyUpdate, Keys, Ledger, NewKey,
    PageRequest, SystemClock,
};

use crate::cli::{
    CreateArgs, KeysCommand, Lifecycle, PageArgs, Sha256Arg, TokensCommand, UpdateArgs,
    parse_sha256,
};
use crate::context::Context;
use crate::misc::read_key;
use crate::output::{Table, key_table, print_created, print_json, print_key, print_next_cursor};
use crate::{CliError, CliResult};

/// API keys or tokens.
#[derive(Clone, Copy)]
enum Kind {
    Keys,
    Tokens,
}

impl Kind {
    /// The library handle for this kind.
    fn handle<'l>(self, ledger: &'l Ledger, ctx: &Context) -> Keys<'l> {
        let keys = match self {
            Kind::Keys => ledger.keys(),
            Kind::Tokens => ledger.tokens(),
        };
        keys.by(&ctx.actor)
    }

    /// The CLI command name.
    fn command(self) -> &'static str {
        match self {
            Kind::Keys => "keys",
            Kind::Tokens => "tokens",
        }
    }
}

/// Runs a `keys` subcommand.
pub fn run_keys(ctx: &Context, command: KeysCommand) -> CliResult<u8> {
    match command {
        KeysCommand::Create { args, test } => {
            let ledger = ctx.open()?;
            let mut new = apply_settings(NewKey::new(&args.owner, &args.name), &args);
            if test {
                new = new.test();
            }
            create(ctx, Kind::Keys.handle(&ledger, ctx), new)
        }
        KeysCommand::Lifecycle(step) => lifecycle(ctx, &ctx.open()?, Kind::Keys, step),
        KeysCommand::Import {
            owner,
            name,
            sha256,
            prefix,
            suffix,
        } => {
            // Read first: a digest typed or piped in slowly must not hold the file meanwhile.
            let sha256 = match sha256 {
                Sha256Arg::Given(digest) => digest,
                // `sha256sum` prints `<digest>  -`: its first word is the digest.
                Sha256Arg::Stdin => {
                    let given = read_key("-")?;
                    parse_sha256(given.split_whitespace().next().unwrap_or_default())
                        .map_err(|e| CliError::usage(format!("--sha256 - (stdin): {e}")))?
                }
            };
            let ledger = ctx.open()?;
            let import = ImportKey::new(owner, name, ImportedHash::Sha256(*sha256), prefix, suffix);
            let info = Kind::Keys.handle(&ledger, ctx).import(import)?;
            show(ctx, &info, "Imported")
        }
        KeysCommand::RotateHash { pepper, blake3 } => {
            rotate_hash(ctx, &ctx.open()?, pepper, blake3)
        }
        KeysCommand::HashStatus => hash_status(ctx, &ctx.open()?),
    }
}

/// Runs a `tokens` subcommand.
pub fn run_tokens(ctx: &Context, command: TokensCommand) -> CliResult<u8> {
    let ledger = ctx.open()?;
    match command {
        TokensCommand::Create { args, token_type } => {
            let new = apply_settings(NewKey::token(&args.owner, token_type, &args.name), &args);
            create(ctx, Kind::Tokens.handle(&ledger, ctx), new)
        }
        TokensCommand::Lifecycle(step) => lifecycle(ctx, &ledger, Kind::Tokens, step),
    }
}

/// Applies the shared create flags to a new key. A refill without `--credits` starts the
/// balance at the refill amount (a refill needs a metered balance).
fn apply_settings(mut new: NewKey, args: &CreateArgs) -> NewKey {
    new = new.permissions(&args.permissions).ips(&args.ips);
    let refill = args.refill.refill();
    let starting = args.credits.or(refill.map(|r| r.amount));
    if let Some(credits) = starting {
        new = new.credits(credits);
    }
    if let Some(refill) = refill {
        new = new.refill(refill.amount, refill.interval);
    }
    if let Some(pool) = &args.pool {
        new = new.pool(pool);
    }
    if let Some(threshold) = args.low_balance {
        new = new.low_balance_threshold(threshold);
    }
    if let Some(tw) = args.token_window {
        new = new.token_window(tw.tokens, tw.window_secs);
    }
    if let Some(secs) = args.expires_in {
        new = new.expires_at(SystemClock.now().plus_secs(secs));
    }
    for (k, v) in &args.metadata {
        new = new.metadata(k, v);
    }
    for rl in &args.rate_limits {
        new = new.rate_limit(&rl.name, rl.limit, rl.window_secs);
    }
    new
}

/// Creates a key and prints it with its one-time plaintext.
fn create(ctx: &Context, keys: Keys<'_>, new: NewKey) -> CliResult<u8> {
    let created = keys.create(new)?;
    print_created(ctx.json, "Created", &created.info, &created.plaintext)?;
    Ok(0)
}

/// Runs a lifecycle subcommand on keys or tokens.
fn lifecycle(ctx: &Context, ledger: &Ledger, kind: Kind, step: Lifecycle) -> CliResult<u8> {
    let keys = kind.handle(ledger, ctx);
    match step {
        Lifecycle::List { owner, page } => list(ctx, &keys, kind, &owner, page),
        Lifecycle::Show { id } => show(ctx, &keys.get(&id)?, ""),
        Lifecycle::Update(args) => {
            show(ctx, &keys.update(&args.id, key_update(&args)?)?, "Updated")
        }
        Lifecycle::Disable { id } => show(ctx, &keys.disable(&id)?, "Disabled"),
        Lifecycle::Enable { id } => show(ctx, &keys.enable(&id)?, "Enabled"),
        Lifecycle::Roll { id, grace } => {
            let rolled = keys.roll(&id, grace)?;
            print_created(ctx.json, "Rolled", &rolled.info, &rolled.plaintext)?;
            if !ctx.json && grace > 0 {
                println!(
                    "  The previous secret keeps working for {grace} s, while the key is \
                     enabled and unexpired."
                );
            }
            Ok(0)
        }
        Lifecycle::Delete { id } => {
            keys.delete(&id)?;
            if ctx.json {
                print_json(&serde_json::json!({ "deleted": id }))?;
            } else {
                println!("Deleted {id}");
            }
            Ok(0)
        }
        Lifecycle::Find { prefix } => find(ctx, &keys, &prefix),
    }
}

/// Builds the update from `update` flags; refuses an empty one.
fn key_update(args: &UpdateArgs) -> CliResult<KeyUpdate> {
    let mut update = KeyUpdate::new();
    let mut any = false;
    if let Some(name) = &args.name {
        update = update.name(name);
        any = true;
    }
    if !args.permissions.is_empty() {
        update = update.permissions(&args.permissions);
        any = true;
    } else if args.no_permissions {
        update = update.permissions(Vec::<String>::new());
        any = true;
    }
    if !args.ips.is_empty() {
        update = update.ips(&args.ips);
        any = true;
    } else if args.any_ip {
        update = update.ips(Vec::<String>::new());
        any = true;
    }
    if let Some(credits) = args.credits {
        update = update.credits(Some(credits));
        any = true;
    } else if args.no_credits {
        update = update.credits(None);
        any = true;
    }
    if let Some(pool) = &args.pool {
        update = update.pool(Some(pool));
        any = true;
    } else if args.no_pool {
        update = update.pool(None);
        any = true;
    }
    if let Some(secs) = args.expires_in {
        update = update.expires_at(Some(SystemClock.now().plus_secs(secs)));
        any = true;
    } else if args.no_expiry {
        update = update.expires_at(None);
        any = true;
    }
    if let Some(threshold) = args.low_balance {
        update = update.low_balance_threshold(Some(threshold));
        any = true;
    } else if args.no_low_balance {
        update = update.low_balance_threshold(None);
        any = true;
    }
    if !any {
        return Err(CliError::usage(
            "nothing to update: give --name, --permission, --no-permissions, --ip, --any-ip, \
             --credits, --no-credits, --pool, --no-pool, --expires-in, --no-expiry, \
             --low-balance or --no-low-balance",
        ));
    }
    Ok(update)
}

/// Prints one key (JSON: the KeyInfo), under an optional heading verb.
fn show(ctx: &Context, info: &KeyInfo, verb: &str) -> CliResult<u8> {
    if ctx.json {
        print_json(info)?;
    } else {
        if !verb.is_empty() {
            println!("{verb} {} {}", crate::output::noun(info), info.id);
        }
        print_key(info);
    }
    Ok(0)
}

/// `list --owner`: masked keys, one page.
fn list(ctx: &Context, keys: &Keys<'_>, kind: Kind, owner: &str, page: PageArgs) -> CliResult<u8> {
    let request = PageRequest {
        limit: page.limit,
        cursor: page.cursor,
    };
    let page = keys.list(owner, &request)?;
    if ctx.json {
        print_json(&page)?;
        return Ok(0);
    }
    if page.items.is_empty() {
        println!("no {} for {owner}", kind.command());
    } else {
        key_table(&page.items, SystemClock.now()).print();
    }
    let mut hint = format!("keyledger {} list --owner {owner}", kind.command());
    if let Some(n) = request.limit {
        hint.push_str(&format!(" --limit {n}"));
    }
    print_next_cursor(page.next_cursor.as_deref(), &hint);
    Ok(0)
}

/// `find PREFIX`: support look-up, masked.
fn find(ctx: &Context, keys: &Keys<'_>, prefix: &str) -> CliResult<u8> {
    let found = keys.find_by_prefix(prefix)?;
    if ctx.json {
        print_json(&found)?;
    } else if found.is_empty() {
        // Only what was searched for: the part after a `…` (a pasted masked key, or worse, a
        // whole secret) is not repeated.
        let searched = prefix.split('…').next().unwrap_or_default();
        println!("no key starts with {searched}");
    } else {
        key_table(&found, SystemClock.now()).print();
    }
    Ok(0)
}

/// `keys rotate-hash`.
fn rotate_hash(
    ctx: &Context,
    ledger: &Ledger,
    pepper: Option<u32>,
    blake3: Option<u32>,
) -> CliResult<u8> {
    let scheme = match (pepper, blake3) {
        (Some(pepper), _) => HashScheme::HmacSha256 { pepper },
        (None, Some(pepper)) => HashScheme::Blake3Keyed { pepper },
        (None, None) => return Err(CliError::new("give --pepper N or --blake3 N")),
    };
    let before = ledger.hash_scheme();
    ledger.rotate_hash_scheme_by(scheme, &ctx.actor)?;
    let changed = before != scheme;
    if ctx.json {
        let value = serde_json::json!({
            "previous": before.label(),
            "current": scheme.label(),
            "changed": changed,
        });
        print_json(&value)?;
    } else if !changed {
        println!(
            "{} is already the current scheme; nothing changed.",
            scheme.label()
        );
    } else {
        println!(
            "New keys are now hashed with {} (was {}).",
            scheme.label(),
            before.label()
        );
        println!("Existing keys move over as they are used; see `keyledger keys hash-status`.");
    }
    Ok(0)
}

/// `keys hash-status`: stored hashes per scheme.
fn hash_status(ctx: &Context, ledger: &Ledger) -> CliResult<u8> {
    let current = ledger.hash_scheme();
    let counts = ledger.hash_scheme_counts()?;
    if ctx.json {
        let schemes: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|(s, n)| (s.label(), (*n).into()))
            .collect();
        print_json(&serde_json::json!({ "current": current.label(), "schemes": schemes }))?;
        return Ok(0);
    }
    println!("current scheme: {}", current.label());
    let mut t = Table::new(["SCHEME", "HASHES"]);
    for (scheme, n) in &counts {
        let label = if *scheme == current {
            format!("{} (current)", scheme.label())
        } else {
            scheme.label()
        };
        t.row([label, n.to_string()]);
    }
    if t.is_empty() {
        println!("no stored key hashes");
    } else {
        t.print();
    }
    Ok(0)
}
