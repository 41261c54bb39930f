//! The server's application: shared state, the route table, and the bootstrap that seeds a
//! fresh database. `main.rs` serves it; `tests/server.rs` and `examples/load.rs` build the
//! same router in-process (they include this directory with `#[path]`).
//!
//! Layers, outermost first:
//!
//! 1. [`envelope::render`] serializes the generation envelope once the request is settled,
//!    filling in `token_stats` and `pricing` from the receipt the auth layer left behind;
//! 2. [`auth::guard`] verifies the presented key (`Ledger::verify`), refuses with the denial's
//!    status and a safe JSON error, and commits the grant only after a 2xx (else drops it:
//!    refund);
//! 3. the handlers ([`generate`], [`manage`]).

pub mod auth;
mod bounds;
pub mod envelope;
mod generate;
mod manage;
mod stall;
pub mod start;

use std::sync::Arc;

use axum::Router;
use axum::middleware::{from_fn_with_state, map_response};
use axum::routing::{get, post};
use keyledger::{Ledger, NewAccount, NewKey, NewPool, PageRequest, PublicId, RouteRule, Secret};

pub use auth::{AuthMode, Caller};

/// Scope a key needs to read the management API (`GET /v2/…`). Keys created with
/// `permissions: ["fetch"]` hold only this one: they are read-only.
pub const READ_SCOPE: &str = "fetch";
/// Scope a key needs to change keys and tokens (`POST`, `PATCH`, `DELETE /v2/…`). A key
/// created with `permissions: []` (read/write) is stored with `*`, which grants it.
pub const WRITE_SCOPE: &str = "manage";
/// What a write by a key without [`WRITE_SCOPE`] is told.
pub const READ_ONLY: &str =
    "this key is read-only (`fetch`): it may GET but not POST, PATCH or DELETE";
/// Entitlement the `/api/v1/projects/` route requires of the caller's account.
pub const PROJECTS_ENTITLEMENT: &str = "projects";
/// Credits in the credit pool of the account a fresh database starts with.
pub const STARTING_CREDITS: u64 = 1_000_000;

/// One route rule the server seeds: prefix, permission, entitlement, cost (credits reserved
/// per request), price of one credit in micros.
pub struct SeedRule {
    /// Route prefix.
    pub prefix: &'static str,
    /// Permission a key needs.
    pub permission: &'static str,
    /// Entitlement the key's account needs, if any.
    pub entitlement: Option<&'static str>,
    /// Credits reserved (and, on success, charged) per request.
    pub cost: u64,
    /// Price of one credit, in millionths of the currency unit.
    pub price_micros: u64,
}

/// The route rules a database gets on first start (missing prefixes are added on every start;
/// rules an operator changed are left alone).
pub const SEED_RULES: [SeedRule; 5] = [
    SeedRule {
        prefix: "/api/v1/quickhits/",
        permission: "quickhits:create",
        entitlement: None,
        cost: 1,
        price_micros: 2_000,
    },
    SeedRule {
        prefix: "/api/v1/roadmaps/",
        permission: "roadmaps:create",
        entitlement: None,
        cost: 3,
        price_micros: 2_000,
    },
    SeedRule {
        prefix: "/api/v1/quizzes/",
        permission: "quizzes:create",
        entitlement: None,
        cost: 2,
        price_micros: 2_000,
    },
    SeedRule {
        prefix: "/api/v1/projects/",
        permission: "projects:create",
        entitlement: Some(PROJECTS_ENTITLEMENT),
        cost: 5,
        price_micros: 2_000,
    },
    // Key management and connectors: any key that may read; free (cost 0 is a peek).
    SeedRule {
        prefix: "/v2/",
        permission: READ_SCOPE,
        entitlement: None,
        cost: 0,
        price_micros: 0,
    },
];

/// Shared state of every handler.
#[derive(Debug)]
pub struct App {
    /// The ledger. `Ledger` is a cheap handle (an `Arc` inside); grants borrow it for the
    /// length of one request future (see [`auth::guard`]).
    pub ledger: Ledger,
    /// Whether requests are verified (`Off` only for the load run's baseline).
    pub auth: AuthMode,
    /// The account requests act as when auth is off.
    pub default_owner: PublicId,
    /// How long a verified request's body may take to arrive before it is answered 408,
    /// and then how long a generation handler may take before it is answered 504 (its grant
    /// dropped, refunded, either way): 30 s in `main.rs`.
    pub request_deadline: std::time::Duration,
    /// How long a client may take to send a request's headers, and how long a write of a
    /// response may wait for the client to read before the connection is closed: 10 s in
    /// `main.rs`.
    pub header_deadline: std::time::Duration,
    /// Connections [`serve`] holds open at once ([`MAX_CONNECTIONS`] in `main.rs`): past
    /// it, new ones wait in the listen backlog until one closes.
    pub max_connections: usize,
}

/// What [`bootstrap`] found or made.
#[derive(Debug)]
pub struct Bootstrap {
    /// The first account: created on a fresh database.
    pub account: PublicId,
    /// Its credit pool, if it has one (keys created through the API spend from it).
    pub pool: Option<PublicId>,
    /// The admin key (permissions `*`), only when the database was fresh: print it once.
    pub admin_key: Option<Secret>,
    /// The admin key's public id, when it was just created.
    pub admin_key_id: Option<PublicId>,
}

/// Seeds missing route rules and, on a database without accounts, creates an account with
/// the `projects` entitlement and a pool of [`STARTING_CREDITS`], and one admin key on it.
pub fn bootstrap(ledger: &Ledger) -> keyledger::Result<Bootstrap> {
    let existing = ledger.routes().list()?;
    for seed in &SEED_RULES {
        if existing.iter().all(|r| r.prefix != seed.prefix) {
            let mut rule = RouteRule::new(seed.prefix)
                .permission(seed.permission)
                .cost(seed.cost)
                .price_micros(seed.price_micros);
            if let Some(e) = seed.entitlement {
                rule = rule.entitlement(e);
            }
            ledger.routes().by("server bootstrap").set(rule)?;
        }
    }
    let accounts = ledger.accounts().list(&PageRequest::first().limit(1))?;
    if let Some(account) = accounts.items.into_iter().next() {
        let pool = ledger.credits().pools(&account.id)?.into_iter().next();
        return Ok(Bootstrap {
            account: account.id,
            pool: pool.map(|p| p.id),
            admin_key: None,
            admin_key_id: None,
        });
    }
    let account = ledger
        .accounts()
        .by("server bootstrap")
        .create(NewAccount::new("Default account").entitlements([PROJECTS_ENTITLEMENT]))?;
    let pool = ledger
        .credits()
        .by("server bootstrap")
        .create_pool(NewPool::new(account.id, "Default pool").credits(STARTING_CREDITS))?;
    let created = ledger.keys().by("server bootstrap").create(
        NewKey::new(account.id, "admin")
            .permissions(["*"])
            .pool(pool.id),
    )?;
    Ok(Bootstrap {
        account: account.id,
        pool: Some(pool.id),
        admin_key: Some(created.plaintext),
        admin_key_id: Some(created.info.id),
    })
}

/// The [`App::max_connections`] of `main.rs`: far from the process's file descriptor limit
/// (1,024 by default), which the ledger needs some of.
pub const MAX_CONNECTIONS: usize = 512;

/// The most of a connection's input read and not yet answered (a request's headers must
/// fit in it): 64 KiB, not hyper's 400 KiB, so that `max_connections` clients pipelining
/// requests hold at most 32 MiB of them.
pub const READ_AHEAD: usize = 64 << 10;

/// Serves `app` on `listener` until `shutdown` resolves, then waits for the connections
/// still open (the caller bounds that wait). Each request carries its connection's peer
/// address (`ConnectInfo`), which the auth layer checks against keys' IP allowlists.
///
/// A connection idle for `header_deadline` (new, or kept alive after a response) is closed,
/// and so is one whose client stops *reading* its responses for as long, or reads them more
/// slowly than [`stall::MIN_DRAIN_RATE`] ([`stall`]: hyper has no write deadline, so
/// clients that pipelined requests and never read held every one of the `max_connections`
/// for good, with no key). A client that pipelines requests has at
/// most [`READ_AHEAD`] bytes of them read ahead.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use axum::extract::ConnectInfo;
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut http = hyper::server::conn::http1::Builder::new();
    // `axum::serve` sets no header deadline: a client trickling header lines, with no key
    // yet, could hold a connection for ever.
    http.timer(TokioTimer::new())
        .header_read_timeout(app.header_deadline)
        .max_buf_size(READ_AHEAD);
    let write_deadline = app.header_deadline;
    let connections = app.max_connections;
    let router = router(app);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // At most this many connections at once: past it, new ones wait in the listen backlog
    // instead of taking the process's last file descriptors (the ledger needs some).
    let open = Arc::new(tokio::sync::Semaphore::new(connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = open.clone().acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        let Ok(permit) = permit else {
            break; // the semaphore is never closed
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // A client that gave up before it was accepted is no news; anything else
                // (out of file descriptors) is, and is retried after a pause, not in a spin.
                use std::io::ErrorKind::{ConnectionAborted, ConnectionReset};
                if !matches!(e.kind(), ConnectionAborted | ConnectionReset) {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            // A `Router` is always ready (its `poll_ready` never waits).
            tower_service::Service::call(&mut router.clone(), req.map(axum::body::Body::new))
        });
        let stream = stall::WriteDeadline::new(stream, write_deadline, stall::MIN_DRAIN_RATE);
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The whole router: generation routes, key management, connectors.
pub fn router(app: Arc<App>) -> Router {
    let generation = Router::new()
        .route("/api/v1/quickhits/create", post(generate::quickhits))
        .route("/api/v1/roadmaps/create", post(generate::roadmaps))
        .route("/api/v1/quizzes/create", post(generate::quizzes))
        .route("/api/v1/projects/create", post(generate::projects))
        // `route_layer`: only matched routes are verified, so an unknown path is a 404,
        // not a 401 that would tell a prober nothing useful anyway.
        .route_layer(from_fn_with_state(
            auth::Guard::new(&app, envelope::generation_refusal, false)
                .deadline(app.request_deadline),
            auth::guard,
        ));
    let management = Router::new()
        .route("/v2/keys", get(manage::list_keys).post(manage::create_key))
        .route(
            "/v2/keys/{id}",
            get(manage::get_key)
                .patch(manage::update_key)
                .delete(manage::delete_key),
        )
        .route(
            "/v2/tokens",
            get(manage::list_tokens).post(manage::create_token),
        )
        .route(
            "/v2/tokens/{id}",
            get(manage::get_token)
                .patch(manage::update_token)
                .delete(manage::delete_token),
        )
        .route("/v2/connectors", get(manage::connectors))
        // No deadline on the whole request: a write, once started on the blocking pool,
        // commits whatever the client is told. Their bodies have one (`manage::Raw`).
        .route_layer(from_fn_with_state(
            auth::Guard::new(&app, envelope::management_refusal, true),
            auth::guard,
        ));
    Router::new()
        .merge(generation)
        .merge(management)
        .fallback(envelope::not_found)
        .method_not_allowed_fallback(envelope::method_not_allowed)
        .layer(map_response(envelope::render))
        .layer(map_response(envelope::private))
        .with_state(app)
}
