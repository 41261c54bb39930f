//! Starts the example server (`examples/server/app`) in-process on an ephemeral loopback
//! port, and records every response so tests can check that no secret ever left it.

#![allow(dead_code)] // each test binary uses its own subset

pub mod http;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use keyledger::{Clock, Config, Ledger, ManualClock, MasterKey, PublicId, SystemClock};

use crate::app::{self, App, AuthMode};
pub use http::Response;

/// The test server's [`App::request_deadline`]: short, so a test can outwait it.
pub const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

/// A running server and the ledger behind it.
pub struct Server {
    /// Dropped first: stops the server's tasks before the ledger closes.
    runtime: tokio::runtime::Runtime,
    /// Where it listens (127.0.0.1, ephemeral port).
    pub addr: SocketAddr,
    /// The same ledger the server uses, for set-up and checks behind its back.
    pub ledger: Ledger,
    /// The ledger's clock: tests move it instead of sleeping.
    pub clock: ManualClock,
    /// The bootstrapped account.
    pub account: PublicId,
    /// Its credit pool.
    pub pool: PublicId,
    /// The admin key's plaintext and public id.
    pub admin: String,
    /// The admin key's public id.
    pub admin_id: PublicId,
    /// The master key, as hex: must never appear in a response.
    master_hex: String,
    /// Every response received, in order.
    log: Mutex<Vec<Response>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// A server on a fresh database, with auth on.
    pub fn start() -> Server {
        Server::start_with(AuthMode::On)
    }

    /// A server on a fresh database.
    pub fn start_with(auth: AuthMode) -> Server {
        Server::launch(
            auth,
            app::MAX_CONNECTIONS,
            std::time::Duration::from_secs(1),
        )
    }

    /// A server holding at most `connections` open at once, whose idle connections stay
    /// open for a minute (so a test decides when they close).
    pub fn start_capped(connections: usize) -> Server {
        Server::launch(
            AuthMode::On,
            connections,
            std::time::Duration::from_secs(60),
        )
    }

    /// A server holding at most `connections` open at once, whose header and write deadline
    /// is `deadline`.
    pub fn start_capped_with(connections: usize, deadline: std::time::Duration) -> Server {
        Server::launch(AuthMode::On, connections, deadline)
    }

    fn launch(
        auth: AuthMode,
        max_connections: usize,
        header_deadline: std::time::Duration,
    ) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let master = MasterKey::generate().expect("master key");
        let master_hex = master.to_hex().expose().to_owned();
        let clock = ManualClock::new(SystemClock.now());
        let config = Config::builder()
            .master_key(master)
            .clock(clock.clone())
            .build()
            .expect("config");
        let ledger = Ledger::open(dir.path().join("keys.redb"), config).expect("open");
        let boot = app::bootstrap(&ledger).expect("bootstrap");
        let admin = boot
            .admin_key
            .as_ref()
            .expect("fresh database")
            .expose()
            .to_owned();
        let state = Arc::new(App {
            ledger: ledger.clone(),
            auth,
            default_owner: boot.account,
            request_deadline: REQUEST_DEADLINE,
            header_deadline,
            max_connections,
        });
        let (runtime, listener, addr) = listening();
        runtime.spawn(async move {
            app::serve(listener, state, std::future::pending()).await;
        });
        Server {
            runtime,
            addr,
            ledger,
            clock,
            account: boot.account,
            pool: boot.pool.expect("pool"),
            admin,
            admin_id: boot.admin_key_id.expect("admin id"),
            master_hex,
            log: Mutex::new(Vec::new()),
            _dir: dir,
        }
    }

    /// Sends a request on a new connection and logs the response.
    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Response {
        let response = http::call(self.addr, method, path, headers, body).expect("request");
        self.log.lock().unwrap().push(response.clone());
        response
    }

    /// A JSON request authenticated with `Authorization: Bearer key`.
    pub fn json(&self, method: &str, path: &str, key: &str, body: &str) -> Response {
        let auth = format!("Bearer {key}");
        self.send(
            method,
            path,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(body),
        )
    }

    /// A body-less request authenticated with `Authorization: Bearer key`.
    pub fn get(&self, method: &str, path: &str, key: &str) -> Response {
        let auth = format!("Bearer {key}");
        self.send(method, path, &[("authorization", &auth)], None)
    }

    /// How many logged responses (status line, headers or body) contain `needle`.
    pub fn responses_containing(&self, needle: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|r| r.raw().contains(needle)).count()
    }

    /// Every logged response so far.
    pub fn responses(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Checks that neither the master key nor the admin key appeared in any response, nor
    /// any of `presented` (keys sent by the test that no response may echo).
    pub fn assert_no_secrets(&self, presented: &[&str]) {
        assert!(self.responses() > 0);
        for secret in [self.master_hex.as_str(), self.admin.as_str()]
            .into_iter()
            .chain(presented.iter().copied())
        {
            assert_eq!(
                self.responses_containing(secret),
                0,
                "a response contained a secret"
            );
        }
    }
}

/// The example's auth guard ([`app::auth::guard`], with the generation routes' deadline) in
/// front of handlers of a server author's own, under `/api/v1/quickhits/`:
/// `fail` answers 502 (an upstream failed), `panic` panics, `slow` sleeps 1.5 s, and
/// `echo` reads its body, then sleeps 0.7 s and answers it.
pub struct Guarded {
    /// Dropped first: stops the server's tasks before the ledger closes.
    runtime: tokio::runtime::Runtime,
    /// Where it listens.
    pub addr: SocketAddr,
    /// The ledger behind it.
    pub ledger: Ledger,
    /// A key with permissions `*` and 10 credits.
    pub key: String,
    /// Its public id.
    pub key_id: PublicId,
    _dir: tempfile::TempDir,
}

impl Guarded {
    /// The guard with `deadline`, on a fresh database.
    pub fn start(deadline: std::time::Duration) -> Guarded {
        use axum::middleware::from_fn_with_state;
        use axum::routing::post;
        use std::time::Duration;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config::builder()
            .master_key(MasterKey::generate().expect("master key"))
            .build()
            .expect("config");
        let ledger = Ledger::open(dir.path().join("keys.redb"), config).expect("open");
        let boot = app::bootstrap(&ledger).expect("bootstrap");
        let created = ledger
            .keys()
            .create(
                keyledger::NewKey::new(boot.account.as_str(), "ten")
                    .permissions(["*"])
                    .credits(10),
            )
            .expect("key");
        let state = Arc::new(App {
            ledger: ledger.clone(),
            auth: AuthMode::On,
            default_owner: boot.account,
            request_deadline: deadline,
            header_deadline: Duration::from_secs(10),
            max_connections: 16,
        });
        async fn fail() -> axum::http::StatusCode {
            axum::http::StatusCode::BAD_GATEWAY
        }
        async fn panic() -> &'static str {
            panic!("the author's handler has a bug")
        }
        async fn slow() -> &'static str {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            "done"
        }
        async fn echo(body: String) -> String {
            tokio::time::sleep(Duration::from_millis(700)).await;
            body
        }
        let guard = app::auth::Guard::new(&state, app::envelope::generation_refusal, false)
            .deadline(deadline);
        let router: axum::Router = axum::Router::new()
            .route("/api/v1/quickhits/fail", post(fail))
            .route("/api/v1/quickhits/panic", post(panic))
            .route("/api/v1/quickhits/slow", post(slow))
            .route("/api/v1/quickhits/echo", post(echo))
            .route_layer(from_fn_with_state(guard, app::auth::guard))
            .with_state(state);
        let (runtime, listener, addr) = listening();
        runtime.spawn(async move {
            let make = router.into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, make).await.expect("serve");
        });
        Guarded {
            runtime,
            addr,
            ledger,
            key: created.plaintext.expose().to_owned(),
            key_id: created.info.id,
            _dir: dir,
        }
    }

    /// `POST path` with the key and no body, on a new connection.
    pub fn post(&self, path: &str) -> std::io::Result<Response> {
        http::call(self.addr, "POST", path, &[("x-api-key", &self.key)], None)
    }

    /// The key's credits spent and left.
    pub fn spent(&self) -> (u64, Option<u64>) {
        let usage = self.ledger.credits().usage(&self.key_id).expect("usage");
        (usage.spent, usage.remaining)
    }
}

/// A two-worker runtime and a listener on a free loopback port, with its address.
fn listening() -> (tokio::runtime::Runtime, tokio::net::TcpListener, SocketAddr) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    (runtime, listener, addr)
}
