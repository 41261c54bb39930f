//! `credits top-up|set` and `pools create|update|delete`: balances of keys, tokens and shared pools.

use crate::CliResult;
use crate::cli::{CreditsCommand, PoolsCommand};
use crate::context::Context;
use crate::output::{pool_table, print_json};

/// The actor recorded in the audit trail for CLI changes.
const ACTOR: &str = "cli";

/// Runs a `credits` subcommand.
pub fn credits(ctx: &Context, command: CreditsCommand) -> CliResult<u8> {
    let (CreditsCommand::TopUp { id, .. } | CreditsCommand::Set { id, .. }) = &command;
    crate::verify::credit_id(id)?;
    let ledger = ctx.open()?;
    let credits = ledger.credits().by(ACTOR);
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
            let refill = refill.refill();
            let pool = ledger.credits().by(ACTOR).create_pool(
                &owner,
                &name,
                credits,
                refill,
                low_balance,
            )?;
            if ctx.json {
                let mut value = serde_json::to_value(&pool)?;
                if let Some(map) = value.as_object_mut() {
                    map.insert("refill".into(), serde_json::to_value(refill)?);
                    map.insert("low_balance_threshold".into(), low_balance.into());
                }
                print_json(&value)?;
            } else {
                println!("Created pool {}", pool.id);
                pool_table(&pool, refill, low_balance).indent(2).print();
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
                    pool_table(pool, pool.refill, pool.low_balance_threshold).print();
                }
            }
        }
        PoolsCommand::Get { id } => {
            let pool = ledger.credits().pool(&id)?;
            if ctx.json {
                print_json(&pool)?;
            } else {
                pool_table(&pool, pool.refill, pool.low_balance_threshold).print();
            }
        }
        PoolsCommand::Update {
            id, low_balance, ..
        } => {
            let pool = ledger
                .credits()
                .by(ACTOR)
                .set_pool_low_balance_threshold(&id, low_balance)?;
            if ctx.json {
                let mut value = serde_json::to_value(&pool)?;
                if let Some(map) = value.as_object_mut() {
                    map.insert("low_balance_threshold".into(), low_balance.into());
                }
                print_json(&value)?;
            } else {
                println!("Updated pool {}", pool.id);
                pool_table(&pool, pool.refill, low_balance)
                    .indent(2)
                    .print();
            }
        }
        PoolsCommand::Delete { id } => {
            let left = ledger.credits().by(ACTOR).delete_pool(&id)?;
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
