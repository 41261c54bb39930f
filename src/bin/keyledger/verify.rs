//! `verify` and `usage`: the per-request check a server runs, from the command line, and the
//! credit and usage figures it leaves behind.

use keyledger::{Denial, Grant, PublicId, RateState, Receipt, Request};
use serde::Serialize;

use crate::cli::VerifyArgs;
use crate::context::Context;
use crate::misc::{EXIT_DENIED, describe, present, read_key};
use crate::output::{Table, list_or, print_json, rate_text, receipt_rows, usage_table};
use crate::{CliError, CliResult};

/// What a grant says before it is settled (DESIGN §4: key, owner, permissions, remaining
/// credits, rate-limit state), plus the units it reserved.
#[derive(Debug, Clone, Serialize)]
pub struct GrantView {
    /// The key's public id.
    pub key_id: PublicId,
    /// The owning account's public id.
    pub owner: PublicId,
    /// The key's granted scopes.
    pub permissions: Vec<String>,
    /// Units reserved for the request.
    pub reserved: u64,
    /// Credits left counting the reservation as spent (`None`: unmetered).
    pub remaining_credits: Option<u64>,
    /// Rate-limit state right after the grant.
    pub rate_limit: RateState,
}

impl GrantView {
    /// Reads everything a grant shows.
    pub fn of(grant: &Grant<'_>) -> Self {
        GrantView {
            key_id: grant.key_id(),
            owner: grant.owner_id(),
            permissions: grant.permissions().to_vec(),
            reserved: grant.reserved(),
            remaining_credits: grant.remaining_credits(),
            rate_limit: grant.rate_limit(),
        }
    }
}

/// A denial as JSON: the stable code, the HTTP status, and for `rate_limited` the wait.
#[derive(Debug, Serialize)]
struct DenialJson {
    ok: bool,
    code: &'static str,
    http_status: u16,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
    /// The value for an HTTP `Retry-After` header: whole seconds, rounded up.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_secs: Option<u64>,
}

impl DenialJson {
    fn of(denial: &Denial) -> Self {
        let wait = denial.retry_after();
        DenialJson {
            ok: false,
            code: denial.code(),
            http_status: denial.http_status(),
            message: denial.to_string(),
            retry_after_ms: wait.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            retry_after_secs: wait.map(retry_after_secs),
        }
    }
}

/// Whole seconds to wait, rounded up (an HTTP `Retry-After` value).
pub fn retry_after_secs(wait: std::time::Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

/// How the CLI settled a grant.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
enum Settled {
    /// Committed with this actual cost.
    Committed,
    /// Dropped uncommitted: the reservation went back.
    Refunded,
}

/// A grant and how it was settled, as JSON.
#[derive(Debug, Serialize)]
struct GrantJson {
    ok: bool,
    #[serde(flatten)]
    grant: GrantView,
    settled: Settled,
    /// The commit's receipt (`None` when refunded).
    receipt: Option<Receipt>,
}

/// `verify KEY --route R [--ip A] [--cost N] [--commit N | --refund]`: exit 0 on a grant, 3
/// on a denial. A grant is committed with the reserved cost unless `--commit` gives the
/// actual cost or `--refund` drops it.
pub fn verify(ctx: &Context, args: &VerifyArgs) -> CliResult<u8> {
    // Read first: a key typed or piped in slowly must not hold the file meanwhile.
    let key = read_key(&args.key)?;
    let ledger = ctx.open()?;
    let presented = match present(&key)? {
        Ok(presented) => presented,
        Err(denial) => return denied(ctx, &denial),
    };
    let mut request = Request::new(&presented, &args.route);
    if let Some(ip) = args.ip {
        request = request.client_ip(ip);
    }
    if let Some(cost) = args.cost {
        request = request.cost(cost);
    }
    let (view, receipt) = match ledger.verify(&request) {
        Err(denial) => {
            let code = denied(ctx, &denial)?;
            let hint = match denial {
                Denial::IpNotAllowed if args.ip.is_none() => {
                    Some("no --ip given: this key has an IP allowlist")
                }
                Denial::Unavailable => {
                    Some("the store could not be read or written; nothing was charged")
                }
                _ => None,
            };
            if let Some(hint) = hint.filter(|_| !ctx.json) {
                println!("  ({hint})");
            }
            return Ok(code);
        }
        Ok(grant) => {
            let view = GrantView::of(&grant);
            let receipt = if args.refund {
                drop(grant);
                None
            } else {
                Some(grant.commit(args.commit.unwrap_or(view.reserved)))
            };
            (view, receipt)
        }
    };
    // Return the lease and flush the spend now, so errors are reported rather than lost.
    ledger.close()?;
    print_grant(ctx, view, receipt)?;
    Ok(0)
}

/// Prints a denial; returns the denial exit code.
fn denied(ctx: &Context, denial: &Denial) -> CliResult<u8> {
    if ctx.json {
        print_json(&DenialJson::of(denial))?;
    } else {
        println!("denied: {}", describe(denial));
        if let Some(wait) = denial.retry_after() {
            println!("  Retry-After: {}", retry_after_secs(wait));
        }
    }
    Ok(EXIT_DENIED)
}

/// Prints a grant and its receipt (or its refund).
fn print_grant(ctx: &Context, view: GrantView, receipt: Option<Receipt>) -> CliResult<()> {
    if ctx.json {
        let settled = if receipt.is_some() {
            Settled::Committed
        } else {
            Settled::Refunded
        };
        return print_json(&GrantJson {
            ok: true,
            grant: view,
            settled,
            receipt,
        });
    }
    println!("granted  {}", view.key_id);
    let mut t = Table::bare().indent(2);
    t.row(["owner", view.owner.as_str()]);
    t.row([
        "permissions".to_owned(),
        list_or(&view.permissions, "(none)"),
    ]);
    t.row(["reserved".to_owned(), view.reserved.to_string()]);
    let left = view.remaining_credits.map_or_else(
        || "unmetered".to_owned(),
        |n| format!("{n} credits (counting the reservation)"),
    );
    t.row(["remaining".to_owned(), left]);
    t.row(["rate limits".to_owned(), rate_text(&view.rate_limit)]);
    match &receipt {
        Some(receipt) => {
            t.row(["committed".to_owned(), receipt.token_stats.used.to_string()]);
            receipt_rows(&mut t, receipt);
        }
        None => t.row([
            "refunded".to_owned(),
            format!("{} (grant dropped uncommitted)", view.reserved),
        ]),
    }
    t.print();
    Ok(())
}

/// Refuses an id that is not a key's, token's or pool's, with a message saying which are.
pub fn credit_id(id: &str) -> CliResult<()> {
    if ["key_", "tok_", "pool_"].iter().any(|p| id.starts_with(p)) {
        return Ok(());
    }
    // Not echoed: what was given may be a plaintext key.
    Err(CliError::new(
        "that is not a key (key_…), token (tok_…) or pool (pool_…) id",
    ))
}

/// `usage ID`: credits and usage of a key, token, pool or account.
pub fn usage(ctx: &Context, id: &str) -> CliResult<u8> {
    if !id.starts_with("acct_") {
        credit_id(id).map_err(|_| {
            CliError::new(
                "that is not a key (key_…), token (tok_…), pool (pool_…) or account (acct_…) id",
            )
        })?;
    }
    let ledger = ctx.open()?;
    let usage = ledger.credits().usage(id)?;
    if ctx.json {
        print_json(&usage)?;
    } else {
        usage_table(&usage).print();
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::retry_after_secs;
    use std::time::Duration;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(12_000)), 12);
        assert_eq!(retry_after_secs(Duration::from_millis(12_001)), 13);
        assert_eq!(retry_after_secs(Duration::ZERO), 0);
    }
}
