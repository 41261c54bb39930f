//! Starting the server: `main.rs` reads the environment into a [`Launch`] and calls
//! [`launch`], which binds, opens the ledger, prints the banner (with the admin key of a
//! fresh database), serves until shut down, and closes the ledger.

use std::ffi::OsStr;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keyledger::{Config, Ledger};

use super::{App, AuthMode};

/// How long a verified request's body may take, then its handler (`App::request_deadline`).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// How long a client may take to send a request's headers, or to read an answer
/// (`App::header_deadline`).
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);

/// How long a shutdown waits for open connections before it closes the ledger anyway.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// What `main.rs` found in the environment.
pub struct Launch {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Whether requests are verified.
    pub auth: AuthMode,
    /// The database file.
    pub path: PathBuf,
    /// The ledger's configuration (its master key).
    pub config: Config,
    /// Where the database and master key come from, for the banner: paths in it are shown
    /// through [`shown_path`].
    pub description: String,
}

/// `KEYLEDGER_AUTH`: `on` (or unset) or `off`. Anything else is refused without being
/// repeated whole (a key or master key set here by mistake is shown by its length only).
pub fn auth_mode(value: Option<&OsStr>) -> Result<AuthMode, String> {
    let Some(value) = value else {
        return Ok(AuthMode::On);
    };
    match value.to_str() {
        Some("on") => Ok(AuthMode::On),
        Some("off") => Ok(AuthMode::Off),
        _ => Err(format!(
            "KEYLEDGER_AUTH must be `on` or `off`, not {}",
            super::envelope::shown(&value.to_string_lossy())
        )),
    }
}

/// `path` as the banner shows it: as the library's errors show it ([`keyledger::shown_path`]),
/// withholding a component that reads as a key or a master key (found by a reviewer: with
/// `KEYLEDGER_DB` and `KEYLEDGER_MASTER_KEY` swapped, the banner printed the master key as
/// the database's path).
pub fn shown_path(path: &Path) -> String {
    keyledger::shown_path(path)
}

/// Binds `launch.addr`, opens the ledger, bootstraps it, prints the banner to `out`, and
/// serves until `shutdown` resolves (then at most [`DRAIN_DEADLINE`] more), then closes the
/// ledger — also when anything after its opening failed.
///
/// The listener is bound before the ledger is opened (found by a reviewer: on a fresh
/// database the admin key, minted and printed before the bind, was lost when the port was
/// taken: the next start found an account and printed no key).
pub fn launch(
    launch: Launch,
    out: &mut dyn Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let addr = launch.addr;
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| format!("listen on {addr}: {e}"))?;
    let ledger = Ledger::open(&launch.path, launch.config.clone()).map_err(|e| e.to_string())?;
    let served = serve_on(&ledger, &launch, listener, out, shutdown);
    // Return leased credits to their balances and flush counters.
    let closed = ledger.close().map_err(|e| format!("close: {e}"));
    served.and(closed)
}

fn serve_on(
    ledger: &Ledger,
    launch: &Launch,
    listener: std::net::TcpListener,
    out: &mut dyn Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let print = |out: &mut dyn Write, line: &str| {
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("stdout: {e}"))
    };
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listen on {local}: {e}"))?;
    let boot = super::bootstrap(ledger).map_err(|e| format!("bootstrap: {e}"))?;
    print(out, "keyledger server")?;
    print(out, &launch.description)?;
    print(out, &format!("listening on http://{local}"))?;
    match &boot.admin_key {
        Some(key) => {
            let pool = boot.pool.as_deref().unwrap_or("none");
            let id = boot.admin_key_id.as_deref().unwrap_or("?");
            print(
                out,
                &format!(
                    "new database: account {} with credit pool {pool} ({} credits); \
                     admin key {id} (permissions *):",
                    boot.account,
                    super::STARTING_CREDITS
                ),
            )?;
            print(out, &format!("admin key: {}", key.expose()))?;
            print(out, "(shown once; only its hash is stored)")?;
        }
        None => print(
            out,
            &format!(
                "existing database: account {}; no key printed",
                boot.account
            ),
        )?,
    }
    if launch.auth == AuthMode::Off {
        print(
            out,
            "WARNING: KEYLEDGER_AUTH=off — requests are NOT verified (benchmark baseline only)",
        )?;
    }
    // Zeroizes the admin key's plaintext now that it has been shown.
    let super::Bootstrap { account, .. } = boot;
    let state = Arc::new(App {
        ledger: ledger.clone(),
        auth: launch.auth,
        default_owner: account,
        request_deadline: REQUEST_DEADLINE,
        header_deadline: HEADER_DEADLINE,
        max_connections: super::MAX_CONNECTIONS,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let drained: Result<bool, String> = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)
            .map_err(|e| format!("listen on {local}: {e}"))?;
        let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
        let serve = super::serve(listener, state, async move {
            shutdown.await;
            let _ = signalled.send(());
        });
        // A graceful shutdown waits for open connections; a client that never finishes its
        // request must not keep the ledger from closing.
        let drained = async move {
            match on_signal.await {
                Ok(()) => tokio::time::sleep(DRAIN_DEADLINE).await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = serve => Ok(false),
            () = drained => Ok(true),
        }
    });
    // Requests still running are dropped here, which refunds their grants.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if drained? {
        let secs = DRAIN_DEADLINE.as_secs();
        print(
            out,
            &format!("connections still open after {secs} s: closed anyway"),
        )?;
    }
    Ok(())
}
