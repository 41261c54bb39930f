//! `credits top-up|set` and `pools create|update|delete`: balances of keys, tokens and shared pools.

use keyledger::{NewPool, PoolUpdate};

use crate::CliResult;
use crate::cli::{CreditsCommand, PoolsCommand};
use crate::context::Context;
use crate::output::{pool_table, print_json};

/// Runs a `credits` subcommand.
pub fn credits(ctx: &Context, command: CreditsCommand) -> CliResult<u8> {
    let (CreditsCommand::TopUp { id, .. } | CreditsCommand::Set { id, .. }) = &command;
    crate::verify::credit_id(id)?;
    let ledger = ctx.open()?;
    let credits = ledger.credits().by(&ctx.actor);
    let (id, units, balance, verb) = match command {
        CreditsCommand::TopUp { id, units } => {
            let balance = credits.top_up(&id, units)?;
            (id, units, balance, "Topped up")
        }
        CreditsCommand::Set { id, units } => {
            let balance = credits.set(&id, units)?;
            (id, units, balance, "Set")
        }
    };
    ledger.close()?;
    if ctx.json {
        print_json(&serde_json::json!({ "id": id, "units": units, "balance": balance }))?;
    } else if verb == "Set" {
        println!("Set {id} to {balance} credits");
    } else {
        println!("{verb} {id} by {units}: {balance} credits");
    }
    Ok(0)
}

/// Runs a `pools` subcommand.
pub fn pools(ctx: &Context, command: PoolsCommand) -> CliResult<u8> {
    let ledger = ctx.open()?;
    match command {
        PoolsCommand::Create {
            owner,
            name,
            credits,
            refill,
            low_balance,
        } => {
            let mut new = NewPool::new(owner, name).credits(credits);
            if let Some(refill) = refill.refill() {
                new = new.refill(refill.amount, refill.interval);
            }
            if let Some(threshold) = low_balance {
                new = new.low_balance_threshold(threshold);
            }
            let pool = ledger.credits().by(&ctx.actor).create_pool(new)?;
            if ctx.json {
                print_json(&pool)?;
            } else {
                println!("Created pool {}", pool.id);
                pool_table(&pool).indent(2).print();
                println!(
                    "\n  Keys join it with: keyledger keys create … --pool {}",
                    pool.id
                );
                println!("  Its balance:       keyledger usage {}", pool.id);
            }
        }
        PoolsCommand::List { owner } => {
            let pools = ledger.credits().pools(&owner)?;
            if ctx.json {
                print_json(&pools)?;
            } else if pools.is_empty() {
                println!("{owner} has no pools");
            } else {
                for (i, pool) in pools.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    pool_table(pool).print();
                }
            }
        }
        PoolsCommand::Get { id } => {
            let pool = ledger.credits().pool(&id)?;
            if ctx.json {
                print_json(&pool)?;
            } else {
                pool_table(&pool).print();
            }
        }
        PoolsCommand::Update {
            id,
            name,
            refill,
            no_refill,
            low_balance,
            no_low_balance,
        } => {
            let mut update = PoolUpdate::new();
            if let Some(name) = name {
                update = update.name(name);
            }
            if let Some(refill) = refill.refill() {
                update = update.refill(Some(refill));
            } else if no_refill {
                update = update.refill(None);
            }
            if low_balance.is_some() || no_low_balance {
                update = update.low_balance_threshold(low_balance);
            }
            let pool = ledger.credits().by(&ctx.actor).update_pool(&id, update)?;
            if ctx.json {
                print_json(&pool)?;
            } else {
                println!("Updated pool {}", pool.id);
                pool_table(&pool).indent(2).print();
            }
        }
        PoolsCommand::Delete { id } => {
            let left = ledger.credits().by(&ctx.actor).delete_pool(&id)?;
            if ctx.json {
                print_json(&serde_json::json!({ "deleted": id, "credits_left": left }))?;
            } else {
                println!("Deleted {id} ({left} credits left went with it)");
            }
        }
    }
    ledger.close()?;
    Ok(0)
}
