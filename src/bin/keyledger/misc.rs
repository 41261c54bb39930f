//! `routes …`, `audit`, `authenticate` and `check`.

use keyledger::{
    CheckReport, Denial, HeaderError, KeyInfo, Ledger, MalformedKey, Presented, RouteRule,
};

use zeroize::Zeroizing;

use crate::cli::RoutesCommand;
use crate::context::Context;
use crate::output::{audit_table, print_json, printable, route_table};
use crate::{CliError, CliResult};

/// Exit code of `authenticate` and `verify` when the key is refused.
pub const EXIT_DENIED: u8 = 3;

/// Runs a `routes` subcommand.
pub fn routes(ctx: &Context, command: RoutesCommand) -> CliResult<u8> {
    let ledger = ctx.open()?;
    let routes = ledger.routes().by(&ctx.actor);
    match command {
        RoutesCommand::Set {
            prefix,
            permission,
            entitlement,
            cost,
            price_micros,
        } => {
            let mut rule = RouteRule::new(prefix).cost(cost).price_micros(price_micros);
            if let Some(permission) = permission {
                rule = rule.permission(permission);
            }
            if let Some(entitlement) = entitlement {
                rule = rule.entitlement(entitlement);
            }
            let rule = routes.set(rule)?;
            if ctx.json {
                print_json(&rule)?;
            } else {
                println!("Set route rule");
                route_table([&rule]).indent(2).print();
            }
        }
        RoutesCommand::List => {
            let rules = routes.list()?;
            if ctx.json {
                print_json(&rules)?;
            } else if rules.is_empty() {
                println!("no route rules");
            } else {
                route_table(&rules).print();
            }
        }
        RoutesCommand::Remove { prefix } => {
            routes.remove(&prefix)?;
            if ctx.json {
                print_json(&serde_json::json!({ "removed": prefix }))?;
            } else {
                println!("Removed route rule {prefix}");
            }
        }
    }
    Ok(0)
}

/// `audit --limit N [--after SEQ]`: the newest events, newest first, or those after `SEQ`,
/// oldest first.
pub fn audit(ctx: &Context, limit: usize, after: Option<u64>) -> CliResult<u8> {
    let ledger = ctx.open()?;
    let events = match after {
        Some(seq) => ledger.audit().since(seq, limit)?,
        None => ledger.audit().recent(limit)?,
    };
    if ctx.json {
        print_json(&events)?;
    } else if events.is_empty() {
        println!("no audit events");
    } else {
        audit_table(&events).print();
    }
    // A page ends early before a damaged event (its sequence numbers have no gaps): said, so
    // that a short page is not taken for the whole trail. Newest first, the events left are
    // the older ones; oldest first, the newer ones.
    let damaged = match (after, events.last()) {
        (None, Some(oldest)) if events.len() < limit && oldest.seq > 1 => Some((
            oldest.seq - 1,
            "the events before it: `audit --after 0`".to_owned(),
        )),
        (Some(seq), last) if events.len() < limit => {
            let seen = last.map_or(seq, |e| e.seq);
            // An event after `seen` fails to read only if there is one: `seen + 1` fits.
            let unread = ledger.audit().since(seen, 1).is_err();
            unread.then(|| {
                (
                    seen + 1,
                    format!("`audit --after {}` reads on past it", seen + 1),
                )
            })
        }
        _ => None,
    };
    if let Some((seq, how)) = damaged {
        eprintln!(
            "note: event {seq} could not be read (damaged; `keyledger check` reports it); {how}"
        );
    }
    Ok(0)
}

/// Wraps a plaintext key for the library; a value that cannot be a key (empty, far too long)
/// is a `malformed` denial, as a server would answer it.
pub fn present(key: &str) -> CliResult<Result<Presented, Denial>> {
    match Presented::new(key) {
        Ok(presented) => Ok(Ok(presented)),
        Err(HeaderError::Malformed(why)) => Ok(Err(Denial::Malformed(why))),
        Err(HeaderError::Missing) => Ok(Err(Denial::Malformed(MalformedKey::Empty))),
        Err(other) => Err(CliError::new(other.to_string())),
    }
}

/// The key argument: itself, or for `-` the first line of stdin (keeping the key out of shell
/// history and process listings). Zeroized when dropped.
pub fn read_key(arg: &str) -> CliResult<Zeroizing<String>> {
    if arg != "-" {
        return Ok(Zeroizing::new(arg.to_owned()));
    }
    use std::io::{BufRead, Read};
    // Allocated at its full size: a buffer that grew would leave copies of the key in freed
    // memory, where zeroizing cannot reach them.
    let mut line = Zeroizing::new(Vec::with_capacity(1024));
    // A key is far shorter: a longer line is refused as malformed, not read without end.
    std::io::stdin()
        .lock()
        .take(1024)
        .read_until(b'\n', &mut line)
        .map_err(|e| CliError::new(format!("reading the key from stdin (`-`): {e}")))?;
    // Bytes that are no text are no key either: refused as malformed, like any other.
    Ok(Zeroizing::new(String::from_utf8_lossy(&line).into_owned()))
}

/// Authenticates a plaintext key; a malformed header value counts as a `malformed` denial.
pub fn authenticate_key(ledger: &Ledger, key: &str) -> CliResult<Result<KeyInfo, Denial>> {
    Ok(present(key)?.and_then(|presented| ledger.authenticate(&presented)))
}

/// `authenticate KEY`: exit 0 with the key's id and name, or exit 3 with the denial code.
/// `-` reads the key from stdin.
pub fn authenticate(ctx: &Context, key: &str) -> CliResult<u8> {
    // Read first: a key typed or piped in slowly must not hold the file meanwhile.
    let key = read_key(key)?;
    let ledger = ctx.open()?;
    let outcome = authenticate_key(&ledger, &key)?;
    match (&outcome, ctx.json) {
        (Ok(info), true) => print_json(&serde_json::json!({
            "ok": true, "id": info.id, "name": info.name, "owner": info.owner,
        }))?,
        (Ok(info), false) => println!("ok  {}  {}", info.id, printable(info.name.clone())),
        (Err(denial), true) => print_json(&serde_json::json!({
            "ok": false, "code": denial.code(), "http_status": denial.http_status(),
            "message": denial.to_string(),
        }))?,
        (Err(denial), false) => println!("denied: {}", describe(denial)),
    }
    Ok(if outcome.is_ok() { 0 } else { EXIT_DENIED })
}

/// The exit code of a check that found problems (1: the check could not run).
pub const EXIT_PROBLEMS: u8 = 4;

/// `check`: integrity and invariants; exit 4 when a problem is found.
pub fn check(ctx: &Context) -> CliResult<u8> {
    ctx.require_db()?;
    let report = Ledger::check(&ctx.db, ctx.config()?).map_err(|e| ctx.explain(e))?;
    if ctx.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("ok".into(), report.is_ok().into());
        }
        print_json(&value)?;
    } else {
        print_check(&report);
    }
    Ok(if report.is_ok() { 0 } else { EXIT_PROBLEMS })
}

/// Prints a check report for people.
pub fn print_check(report: &CheckReport) {
    let verdict = if report.is_ok() {
        "ok"
    } else {
        "PROBLEMS FOUND"
    };
    println!("check: {verdict}");
    let counts = [
        plural(report.accounts, "account"),
        plural(report.keys, "key"),
        plural(report.tokens, "token"),
        plural(report.credit_records, "credit record"),
        plural(report.routes, "route rule"),
        plural(report.audit_events, "audit event"),
    ];
    let integrity = if report.integrity_ok { "ok" } else { "FAILED" };
    println!("  redb integrity {integrity}; {}", counts.join(", "));
    if report.lost_to_crash > 0 {
        println!(
            "  {} credit units were leased in memory when a process stopped without returning \
             them (a crash, or grants still held after a close's grace): counted as spent",
            report.lost_to_crash
        );
    }
    for problem in &report.problems {
        println!("  problem: {problem}");
    }
}

/// `1 key`, `2 keys`.
fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `code (HTTP status)`, with the reason when it says more than the code.
pub fn describe(denial: &Denial) -> String {
    let text = denial.to_string();
    let detail = text
        .strip_prefix(denial.code())
        .unwrap_or(&text)
        .trim_start_matches(':')
        .trim();
    if detail.is_empty() {
        format!("{} (HTTP {})", denial.code(), denial.http_status())
    } else {
        format!(
            "{} (HTTP {}): {detail}",
            denial.code(),
            denial.http_status()
        )
    }
}
