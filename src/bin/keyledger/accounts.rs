//! `accounts create|list|show|update|delete`.

use keyledger::{AccountUpdate, NewAccount, PageRequest};

use crate::cli::{AccountsCommand, PageArgs};
use crate::context::Context;
use crate::output::{account_table, print_account, print_json, print_next_cursor};
use crate::{CliError, CliResult};

/// Runs an `accounts` subcommand.
pub fn run(ctx: &Context, command: AccountsCommand) -> CliResult<u8> {
    let ledger = ctx.open()?;
    let accounts = ledger.accounts().by(&ctx.actor);
    let account = match command {
        AccountsCommand::Create {
            name,
            status,
            entitlements,
        } => accounts.create(
            NewAccount::new(name)
                .status(status)
                .entitlements(entitlements),
        )?,
        AccountsCommand::List(page) => return list(ctx, &ledger, page),
        AccountsCommand::Show { id } => accounts.get(&id)?,
        AccountsCommand::Delete { id } => {
            accounts.delete(&id)?;
            if ctx.json {
                print_json(&serde_json::json!({ "deleted": id }))?;
            } else {
                println!("Deleted {id}");
            }
            return Ok(0);
        }
        AccountsCommand::Update {
            id,
            name,
            status,
            entitlements,
            no_entitlements,
        } => {
            if name.is_none() && status.is_none() && entitlements.is_empty() && !no_entitlements {
                return Err(CliError::usage(
                    "nothing to update: give --name, --status, --entitlement or --no-entitlements",
                ));
            }
            let mut update = AccountUpdate::new();
            if let Some(name) = name {
                update = update.name(name);
            }
            if let Some(status) = status {
                update = update.status(status);
            }
            if !entitlements.is_empty() || no_entitlements {
                update = update.entitlements(entitlements);
            }
            accounts.update(&id, update)?
        }
    };
    if ctx.json {
        print_json(&account)?;
    } else {
        print_account(&account);
    }
    Ok(0)
}

/// `accounts list`.
fn list(ctx: &Context, ledger: &keyledger::Ledger, page: PageArgs) -> CliResult<u8> {
    let request = PageRequest {
        limit: page.limit,
        cursor: page.cursor,
    };
    let page = ledger.accounts().list(&request)?;
    if ctx.json {
        print_json(&page)?;
        return Ok(0);
    }
    if page.items.is_empty() {
        println!("no accounts");
    } else {
        account_table(&page.items).print();
    }
    let hint = match request.limit {
        Some(n) => format!("keyledger accounts list --limit {n}"),
        None => "keyledger accounts list".to_owned(),
    };
    print_next_cursor(page.next_cursor.as_deref(), &hint);
    Ok(0)
}
