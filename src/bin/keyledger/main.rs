//! `keyledger`: the command-line interface to a keyledger database.
//!
//! Exit codes: 0 success, 1 error (printed as `error: …` on stderr), 2 usage error,
//! 3 `authenticate` or `verify` refused the key, 4 `check` found problems.

mod accounts;
mod bench;
mod cli;
mod context;
mod credits;
mod demo;
mod keys;
mod misc;
mod output;
mod vault;
mod verify;

use std::fmt;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

use cli::{Cli, Command};
use context::Context;

/// An error to print as `error: <message>` before exiting with status 1, or 2 for a usage
/// error.
#[derive(Debug)]
pub struct CliError {
    message: String,
    exit_code: u8,
}

impl CliError {
    /// An error with this message (exit 1).
    pub fn new(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            exit_code: 1,
        }
    }

    /// A usage error found after parsing (exit 2, like clap's own): the command line is
    /// incomplete, e.g. `keys update ID` with nothing to change.
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            exit_code: 2,
            ..CliError::new(message)
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Converts library and I/O errors; their messages never contain secrets.
macro_rules! cli_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for CliError {
            fn from(e: $t) -> Self {
                CliError::new(e.to_string())
            }
        }
    )*};
}
cli_error_from!(
    keyledger::Error,
    keyledger::ConfigError,
    keyledger::HeaderError,
    serde_json::Error,
    std::io::Error
);

/// Result of a CLI step.
pub type CliResult<T> = Result<T, CliError>;

fn main() -> ExitCode {
    let cli = parse();
    let ctx = Context {
        db: cli.db,
        key_file: cli.key_file,
        json: cli.json,
        prefixes: cli.prefixes,
        actor: cli.actor,
    };
    // A panic (a bug here, or redb on a corrupt page the library does not guard) ends the
    // command with one line and exit 1, not a backtrace. The hook only keeps the message: a
    // panic the library catches and turns into an error must print nothing.
    static PANIC: std::sync::Mutex<Option<(String, String)>> = std::sync::Mutex::new(None);
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        if std::thread::current().name() != Some("main") {
            eprintln!("error: internal error in a background thread ({what}{at})");
        }
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some((what, at));
    }));
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&ctx, cli.command)));
    match ran {
        Ok(Ok(code)) => ExitCode::from(code),
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code)
        }
        Err(_) => {
            let (what, at) = PANIC
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_default();
            // `println!` panics when stdout cannot take the text (a full disk, a reader that
            // went away): the output's failure, not the database's.
            match what.strip_prefix("failed printing to stdout: ") {
                Some(cause) => {
                    eprintln!("error: the output could not be written to stdout: {cause}")
                }
                None => eprintln!(
                    "error: internal error ({what}{at}); if the database file is damaged, \
                     `keyledger check` says so"
                ),
            }
            ExitCode::from(1)
        }
    }
}

/// Parses the command line. An environment variable set but empty (`KEYLEDGER_DB=`, a
/// common way to leave one out) counts as unset, as `KEYLEDGER_MASTER_KEY` does, instead of
/// failing as a flag given without a value.
fn parse() -> Cli {
    let mut cmd = Cli::command();
    let empty: Vec<clap::Id> = cmd
        .get_arguments()
        .filter(|arg| {
            arg.get_env()
                .and_then(std::env::var_os)
                // Blank too, as `Config::from_env` reads `KEYLEDGER_MASTER_KEY_FILE`.
                .is_some_and(|value| value.to_string_lossy().trim().is_empty())
        })
        .map(|arg| arg.get_id().clone())
        .collect();
    for id in empty {
        cmd = cmd.mut_arg(id, |arg| arg.env(None::<&str>));
    }
    let matches = cmd.try_get_matches().unwrap_or_else(|e| refuse_usage(e));
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Ends a command line clap refused, with exit 2, or prints the help or version asked for.
/// What the user typed is not repeated once it is long enough to hold a key (16 characters
/// or more): a key pasted into the wrong flag (`--sha256 vb_live_…`), as a stray argument or
/// in place of a subcommand would be printed to the terminal and its logs (found by
/// reviewers).
fn refuse_usage(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !e.use_stderr() {
        e.exit()
    }
    let values = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => vec![s.as_str()],
        Some(ContextValue::Strings(v)) => v.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    };
    let mut typed = values(ContextKind::InvalidValue);
    typed.extend(values(ContextKind::InvalidSubcommand));
    // Otherwise the name of the flag a value was given to.
    if e.kind() == ErrorKind::UnknownArgument {
        typed.extend(values(ContextKind::InvalidArg));
    }
    let mut text = e.render().to_string();
    for value in typed.into_iter().filter(|v| v.chars().count() >= 16) {
        text = text.replace(value, "…");
    }
    eprint!("{text}");
    std::process::exit(e.exit_code())
}

/// Dispatches a command; returns the exit code.
fn run(ctx: &Context, command: Command) -> CliResult<u8> {
    ctx.refuse_master_keys_as_paths()?;
    match command {
        Command::Init => context::init(ctx),
        Command::Accounts(c) => accounts::run(ctx, c),
        Command::Keys(c) => keys::run_keys(ctx, c),
        Command::Tokens(c) => keys::run_tokens(ctx, c),
        Command::Routes(c) => misc::routes(ctx, c),
        Command::Audit { limit, after } => misc::audit(ctx, limit, after),
        Command::Authenticate { key } => misc::authenticate(ctx, &key),
        Command::Verify(args) => verify::verify(ctx, &args),
        Command::Usage { id } => verify::usage(ctx, &id),
        Command::Credits(c) => credits::credits(ctx, c),
        Command::Pools(c) => credits::pools(ctx, c),
        Command::Connectors(c) => vault::connectors(ctx, c),
        Command::Secrets(c) => vault::secrets(ctx, c),
        Command::Check => misc::check(ctx),
        Command::Demo => demo::run(ctx.json),
        Command::Bench(args) => bench::run(ctx.json, args),
    }
}
