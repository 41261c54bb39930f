//! `connectors list` and `secrets list`: an owner's vault, metadata only. Neither command can
//! print a token or a secret value: the library calls they use never return one.

use crate::CliResult;
use crate::cli::{ConnectorsCommand, SecretsCommand};
use crate::context::Context;
use crate::output::{connection_table, print_json, secret_table};

/// Runs a `connectors` subcommand.
pub fn connectors(ctx: &Context, command: ConnectorsCommand) -> CliResult<u8> {
    let ledger = ctx.open()?;
    match command {
        ConnectorsCommand::List { owner } => {
            let connections = ledger.vault().list(&owner)?;
            if ctx.json {
                print_json(&connections)?;
            } else if connections.is_empty() {
                println!("no connectors for {owner}");
            } else {
                connection_table(&connections).print();
            }
        }
    }
    Ok(0)
}

/// Runs a `secrets` subcommand.
pub fn secrets(ctx: &Context, command: SecretsCommand) -> CliResult<u8> {
    let ledger = ctx.open()?;
    match command {
        SecretsCommand::List { owner } => {
            let secrets = ledger.secrets().list(&owner)?;
            if ctx.json {
                print_json(&secrets)?;
            } else if secrets.is_empty() {
                println!("no secrets for {owner}");
            } else {
                secret_table(&secrets).print();
            }
        }
    }
    Ok(0)
}
