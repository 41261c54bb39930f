//! A real HTTP server on keyledger: the generation API (`/api/v1/…/create`) and the key
//! management API (`/v2/keys`, `/v2/tokens`, `/v2/connectors`), authenticated by a middleware
//! built on `Ledger::verify`.
//!
//! ```sh
//! cargo run --release --example server
//! ```
//!
//! Environment:
//!
//! - `KEYLEDGER_ADDR`: where to listen (default `127.0.0.1:8787`).
//! - `KEYLEDGER_DB`: the database file. With it, the master key must come from
//!   `KEYLEDGER_MASTER_KEY` (64 hex digits) or `KEYLEDGER_MASTER_KEY_FILE` (mode 0600; the
//!   CLI's `keyledger init` writes one). Without it, the server uses a scratch database in a
//!   temporary directory, deleted on exit, under an ephemeral master key (or the one given).
//! - `KEYLEDGER_AUTH=off`: serve without verifying keys, as the default account. Only for
//!   measuring what verification costs (`examples/load.rs`); never in production.
//!
//! On a database without accounts it creates one (with a pool of credits and the `projects`
//! entitlement) and one admin key with permissions `*`, printed once as `admin key: …`.

mod app;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use keyledger::{Config, MasterKey};

use app::start;

/// Where the database and master key come from.
struct Storage {
    path: PathBuf,
    config: Config,
    /// Kept alive until exit, then deleted with the scratch database in it.
    _scratch: Option<tempfile::TempDir>,
    description: String,
}

/// The variable's value, unless it is unset or blank: `KEYLEDGER_DB=` (a common way to
/// leave one out) counts as unset, as the CLI and `Config::from_env` count it.
fn env_set(name: &str) -> Option<std::ffi::OsString> {
    std::env::var_os(name).filter(|v| !v.to_string_lossy().trim().is_empty())
}

fn storage() -> Result<Storage, String> {
    let from_env = env_set(keyledger::ENV_MASTER_KEY).is_some()
        || env_set(keyledger::ENV_MASTER_KEY_FILE).is_some();
    match env_set("KEYLEDGER_DB") {
        Some(path) => {
            let config = Config::from_env().map_err(|e| format!("KEYLEDGER_DB is set, but {e}"))?;
            let path = PathBuf::from(path);
            Ok(Storage {
                description: format!(
                    "database: {} (from KEYLEDGER_DB)\nmaster key: from the environment",
                    start::shown_path(&path)
                ),
                path,
                config,
                _scratch: None,
            })
        }
        None => {
            let dir = tempfile::tempdir().map_err(|e| format!("scratch directory: {e}"))?;
            let path = dir.path().join("keys.redb");
            let (config, key) = if from_env {
                (
                    Config::from_env().map_err(|e| e.to_string())?,
                    "from the environment",
                )
            } else {
                let key = MasterKey::generate().map_err(|e| e.to_string())?;
                let config = Config::builder()
                    .master_key(key)
                    .prefixes_from_env()
                    .and_then(|c| c.build());
                (config.map_err(|e| e.to_string())?, "ephemeral, never shown")
            };
            Ok(Storage {
                description: format!(
                    "database: {} (scratch, deleted on exit; set KEYLEDGER_DB to keep one)\n\
                     master key: {key}",
                    start::shown_path(&path)
                ),
                path,
                config,
                _scratch: Some(dir),
            })
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let addr: SocketAddr = std::env::var("KEYLEDGER_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:8787".into())
        .parse()
        .map_err(|e| format!("KEYLEDGER_ADDR: {e}"))?;
    let auth = start::auth_mode(std::env::var_os("KEYLEDGER_AUTH").as_deref())?;
    // Kept until the ledger is closed: a scratch database is deleted with it.
    let Storage {
        path,
        config,
        _scratch,
        description,
    } = storage()?;
    let launch = start::Launch {
        addr,
        auth,
        path,
        config,
        description,
    };
    start::launch(launch, &mut std::io::stdout(), shutdown_signal())
}

/// Resolves on Ctrl-C or SIGTERM, so the scratch database is deleted and leases returned.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    println!("shutting down");
}
