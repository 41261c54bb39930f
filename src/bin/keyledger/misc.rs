//! `routes …`, `audit`, `authenticate` and `check`.

use keyledger::{
    CheckReport, Denial, HeaderError, KeyInfo, Ledger, MalformedKey, Presented, RouteRule,
};

use crate::cli::RoutesCommand;
use crate::context::Context;
use crate::output::{audit_table, print_json, route_table};
use crate::{CliError, CliResult};

/// Exit code of `authenticate` when the key is refused.
pub const EXIT_DENIED: u8 = 3;

/// Runs a `routes` subcommand.
pub fn routes(ctx: &Context, command: RoutesCommand) -> CliResult<u8> {
    let ledger = ctx.open()?;
    let routes = ledger.routes().by("cli");
    match command {
        RoutesCommand::Set {
            prefix,
            permission,
            entitlement,
            cost,
        } => {
            let mut rule = RouteRule::new(prefix).cost(cost);
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
            let rules = list_routes(&routes)?;
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

/// All route rules. A database that never had one may lack the routes table (a library gap,
/// see `context::create_routes_table`): that reads as no rules.
fn list_routes(routes: &keyledger::Routes<'_>) -> CliResult<Vec<RouteRule>> {
    match routes.list() {
        Err(keyledger::Error::Storage(e)) if matches!(*e, redb::Error::TableDoesNotExist(_)) => {
            Ok(Vec::new())
        }
        other => Ok(other?),
    }
}

/// `audit --limit N`: the newest events, newest first.
pub fn audit(ctx: &Context, limit: usize) -> CliResult<u8> {
    let events = ctx.open()?.audit().recent(limit)?;
    if ctx.json {
        print_json(&events)?;
    } else if events.is_empty() {
        println!("no audit events");
    } else {
        audit_table(&events).print();
    }
    Ok(0)
}

/// Authenticates a plaintext key; a malformed header value counts as a `malformed` denial.
pub fn authenticate_key(ledger: &Ledger, key: &str) -> CliResult<Result<KeyInfo, Denial>> {
    match Presented::new(key) {
        Ok(presented) => Ok(ledger.authenticate(&presented)),
        Err(HeaderError::Malformed(why)) => Ok(Err(Denial::Malformed(why))),
        Err(HeaderError::Missing) => Ok(Err(Denial::Malformed(MalformedKey::Empty))),
        Err(other) => Err(CliError::new(other.to_string())),
    }
}

/// `authenticate KEY`: exit 0 with the key's id and name, or exit 3 with the denial code.
/// `-` reads the key from stdin, keeping it out of shell history and process listings.
pub fn authenticate(ctx: &Context, key: &str) -> CliResult<u8> {
    let ledger = ctx.open()?;
    let key = if key == "-" {
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::stdin().read_line(&mut line)?;
        line
    } else {
        zeroize::Zeroizing::new(key.to_owned())
    };
    let outcome = authenticate_key(&ledger, &key)?;
    match (&outcome, ctx.json) {
        (Ok(info), true) => print_json(&serde_json::json!({
            "ok": true, "id": info.id, "name": info.name, "owner": info.owner,
        }))?,
        (Ok(info), false) => println!("ok  {}  {}", info.id, info.name),
        (Err(denial), true) => print_json(&serde_json::json!({
            "ok": false, "code": denial.code(), "http_status": denial.http_status(),
            "message": denial.to_string(),
        }))?,
        (Err(denial), false) => println!("denied: {}", describe(denial)),
    }
    Ok(if outcome.is_ok() { 0 } else { EXIT_DENIED })
}

/// `check`: integrity and invariants; exit 1 when a problem is found.
pub fn check(ctx: &Context) -> CliResult<u8> {
    ctx.require_db()?;
    let report = Ledger::check(&ctx.db, ctx.config()?)?;
    if ctx.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(map) = value.as_object_mut() {
            map.insert("ok".into(), report.is_ok().into());
        }
        print_json(&value)?;
    } else {
        print_check(&report);
    }
    Ok(if report.is_ok() { 0 } else { 1 })
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
