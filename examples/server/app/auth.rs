//! Authentication middleware on [`Ledger::verify`] — the piece a real server copies.
//!
//! Per request: take the key from `Authorization: Bearer …` or `x-api-key`, verify it for the
//! request's path and client address, refuse with the denial's HTTP status and a JSON error
//! that never echoes the key (plus `Retry-After` on `rate_limited`), otherwise run the handler
//! and commit the grant only if the handler answered 2xx. Any other outcome drops the grant,
//! which refunds its credit reservation: a client is charged only for work it received.
//!
//! **Where the ledger lives.** `Grant<'l>` borrows the `Ledger` it came from. The ledger sits
//! in `Arc<App>`, the middleware state; axum hands [`guard`] its own clone of that `Arc`, which
//! the request's future owns for its whole life. The grant borrows from that owned `Arc` and
//! never leaves the future (it is held across `next.run(req).await`, which is fine: async
//! functions may borrow their own locals across awaits, and `Grant` is `Send`), so no
//! `'static` ledger (`Box::leak`) is needed. Handlers learn about the caller through an owned
//! [`Caller`] in the request extensions, not through the grant.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, HeaderName};
use axum::middleware::Next;
use axum::response::Response;
use keyledger::{Denial, Grant, HeaderError, Ledger, PublicId};

use super::App;

/// The `x-api-key` header.
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Whether the server verifies keys. `Off` exists only to measure what verification costs
/// (the load run's baseline); every request then acts as the default account with `*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Verify every request (the default).
    On,
    /// Verify nothing. Never use outside a benchmark.
    Off,
}

/// The verified caller, as handlers see it: public ids and scopes, never the key.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The key's (or token's) public id; recorded as the author of changes it makes.
    pub key_id: PublicId,
    /// The owning account: every management call is scoped to it.
    pub owner: PublicId,
    /// The key's scopes.
    pub permissions: Vec<String>,
}

impl Caller {
    fn of(grant: &Grant<'_>) -> Caller {
        Caller {
            key_id: grant.key_id(),
            owner: grant.owner_id(),
            permissions: grant.permissions().to_vec(),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone)]
pub enum Refusal {
    /// No usable key in the headers.
    Header(HeaderError),
    /// `Ledger::verify` said no.
    Denied(Denial),
    /// The request's body did not arrive within the guard's deadline: the grant was
    /// dropped, refunding its reservation.
    BodyTimedOut(Duration),
    /// The handler did not answer within the guard's deadline once the body had arrived:
    /// the grant was dropped, refunding its reservation. The client is not to blame, so this
    /// is no 408 (which invites a client or proxy to send the request again, even a POST).
    HandlerTimedOut(Duration),
}

impl Refusal {
    /// HTTP status: the denial's own, 401 for a missing, malformed or non-Bearer key, 400 for
    /// two different keys in one request.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Denied(d) => d.http_status(),
            Refusal::Header(e) => e.http_status(),
            Refusal::BodyTimedOut(_) => 408,
            Refusal::HandlerTimedOut(_) => 504,
        }
    }

    /// Stable machine-readable code: the denial's (`not_found`, `rate_limited`…), or
    /// `missing_key`, `unsupported_scheme`, `conflicting_keys`, `malformed` for header
    /// problems, `request_timeout` for a body that did not arrive in time, `server_timeout`
    /// for a handler that did not answer in time.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Denied(d) => d.code(),
            Refusal::Header(HeaderError::Missing) => "missing_key",
            Refusal::Header(HeaderError::UnsupportedScheme) => "unsupported_scheme",
            Refusal::Header(HeaderError::Conflict) => "conflicting_keys",
            Refusal::Header(_) => "malformed",
            Refusal::BodyTimedOut(_) => "request_timeout",
            Refusal::HandlerTimedOut(_) => "server_timeout",
        }
    }

    /// A human-readable explanation. Safe to send: it names what is wrong, never a value.
    pub fn message(&self) -> String {
        match self {
            Refusal::Header(e) => e.to_string(),
            Refusal::BodyTimedOut(limit) => format!(
                "the request body did not arrive within {} s; nothing was charged",
                limit.as_secs_f64()
            ),
            Refusal::HandlerTimedOut(limit) => format!(
                "the server did not finish this request within {} s; nothing was charged",
                limit.as_secs_f64()
            ),
            Refusal::Denied(d) => match d {
                Denial::Malformed(why) => format!("malformed API key: {why}"),
                Denial::NotFound => "the API key is not valid".into(),
                Denial::Disabled => "the API key is disabled".into(),
                Denial::Expired => "the API key has expired".into(),
                Denial::Forbidden => "the API key lacks the permission this route needs".into(),
                Denial::IpNotAllowed => "the API key may not be used from this address".into(),
                Denial::SubscriptionInactive => "the account's subscription is not active".into(),
                Denial::NotEntitled => "the account's plan does not include this route".into(),
                Denial::RateLimited { retry_after } => format!(
                    "rate limit reached; retry after {} s",
                    retry_after_secs(*retry_after)
                ),
                Denial::UsageExceeded => "not enough credits left for this request".into(),
                Denial::Unavailable => {
                    "the key store is unavailable; nothing was charged, retry later".into()
                }
                other => other.to_string(),
            },
        }
    }

    /// For `rate_limited`: the `Retry-After` value in whole seconds (rounded up, at least 1).
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Refusal::Denied(d) => d.retry_after().map(retry_after_secs),
            Refusal::Header(_) | Refusal::BodyTimedOut(_) | Refusal::HandlerTimedOut(_) => None,
        }
    }
}

fn retry_after_secs(d: Duration) -> u64 {
    u64::try_from(d.as_millis().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}

/// Takes the key from the headers and verifies it for `route` from `client_ip`.
///
/// Header values that are not visible ASCII are passed on (lossily decoded) so the library's
/// own check rejects them as malformed. A header sent twice must carry the same key each time
/// (`Bearer K` and `bearer K` do), or the request is refused as conflicting keys, as
/// `Authorization` and `x-api-key` naming two keys are: a proxy that reads the last value
/// would charge the other key.
pub fn verify<'l>(
    ledger: &'l Ledger,
    headers: &HeaderMap,
    route: &str,
    client_ip: Option<IpAddr>,
) -> Result<Grant<'l>, Refusal> {
    let values = |name: &HeaderName| -> Vec<String> {
        let all = headers.get_all(name).iter();
        all.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    };
    let (authorization, x_api_key) = (values(&AUTHORIZATION), values(&X_API_KEY));
    let presented = keyledger::Presented::from_headers(
        authorization.first().map(String::as_str),
        x_api_key.first().map(String::as_str),
    )
    .map_err(Refusal::Header)?;
    // Every further value, read with the other header's first value as the library reads
    // a pair (so a proxy's repeated `Basic` next to `x-api-key` stays ignored), must name
    // the same key.
    let (first_a, first_k) = (authorization.first(), x_api_key.first());
    let first_k = first_k.map(String::as_str);
    let again = authorization
        .iter()
        .skip(1)
        .map(|a| (Some(a.as_str()), first_k));
    let first_a = first_a.map(String::as_str);
    let again = again.chain(
        x_api_key
            .iter()
            .skip(1)
            .map(|k| (first_a, Some(k.as_str()))),
    );
    for (a, k) in again {
        let other = keyledger::Presented::from_headers(a, k).map_err(Refusal::Header)?;
        if other.expose() != presented.expose() {
            return Err(Refusal::Header(HeaderError::Conflict));
        }
    }
    let mut request = keyledger::Request::new(&presented, route);
    if let Some(ip) = client_ip {
        request = request.client_ip(ip);
    }
    ledger.verify(&request).map_err(Refusal::Denied)
}

/// Middleware state: the app, how this API surface renders a refusal, and whether its
/// handlers need the [`Caller`].
#[derive(Clone)]
pub struct Guard {
    app: Arc<App>,
    refuse: fn(&Refusal) -> Response,
    /// Building a `Caller` costs `Grant::key_id` and `Grant::owner_id` (cached per key: about
    /// 100 ns together, `examples/load`'s in-process line), so surfaces whose handlers do not
    /// ask who called skip it.
    with_caller: bool,
    /// The caller every request acts as when auth is off.
    anonymous: Caller,
    /// How long a verified request's body may take to arrive, and then its handler to
    /// answer ([`Guard::deadline`]).
    deadline: Option<Duration>,
}

impl Guard {
    /// A guard for one API surface; `refuse` renders a refusal in that surface's envelope;
    /// with `with_caller`, handlers find the verified [`Caller`] in the request extensions.
    pub fn new(app: &Arc<App>, refuse: fn(&Refusal) -> Response, with_caller: bool) -> Guard {
        Guard {
            app: app.clone(),
            refuse,
            with_caller,
            anonymous: Caller {
                key_id: app.default_owner,
                owner: app.default_owner,
                permissions: vec!["*".into()],
            },
            deadline: None,
        }
    }

    /// Answers a request whose body has not all arrived `limit` after it was verified with
    /// 408, and one whose handler has not answered `limit` after that (or after it dropped
    /// the body unread) with 504, dropping its grant either way, which refunds the
    /// reservation: a client trickling its body, or a handler stuck on an upstream, must not
    /// hold credits (or a graceful shutdown) for ever. The client is told 408 only when its
    /// body was late (found by a reviewer: a slow handler was answered 408 "a body sent too
    /// slowly?", which invites a resend of a POST). Only for handlers that may be stopped at
    /// any await: the blocking ledger write a management handler starts would still commit
    /// after the answer.
    pub fn deadline(mut self, limit: Duration) -> Guard {
        self.deadline = Some(limit);
        self
    }
}

/// The middleware (`axum::middleware::from_fn_with_state(guard_state, guard)`).
///
/// The route verified is the request path as it arrived (not percent-decoded). That is safe
/// here because axum routes on that same raw path and this guard is a `route_layer`: a path
/// that reaches a handler is one of its literal routes. Used as a global layer, or in front
/// of anything that decodes or normalizes paths, it must pass the path the handler will see
/// (`Request::new` says how). The client address comes from the connection
/// (`ConnectInfo`). Behind a reverse proxy, take it from the proxy's header instead — only
/// from a proxy you trust. Without a known address, keys with an IP allowlist are refused.
///
/// `verify` is synchronous and takes microseconds on a cache hit; on a miss it reads redb
/// once, and when a credit lease runs dry it waits for the writer's group commit. A server
/// with many such slow paths could run it under `tokio::task::block_in_place`.
pub async fn guard(State(guard): State<Guard>, mut req: Request, next: Next) -> Response {
    if guard.app.auth == AuthMode::Off {
        if guard.with_caller {
            req.extensions_mut().insert(guard.anonymous.clone());
        }
        return next.run(req).await;
    }
    let client_ip = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| peer.ip());
    // `guard.app` is owned by this future; the grant borrows it until the end of the request.
    let grant = match verify(
        &guard.app.ledger,
        req.headers(),
        req.uri().path(),
        client_ip,
    ) {
        Ok(grant) => grant,
        Err(refusal) => return (guard.refuse)(&refusal),
    };
    if guard.with_caller {
        req.extensions_mut().insert(Caller::of(&grant));
    }
    // The grant is held until the request ends, body included.
    let mut response = match guard.deadline {
        None => next.run(req).await,
        Some(limit) => match within(limit, req, next).await {
            Ok(response) => response,
            Err(refusal) => {
                drop(grant); // refunds the reservation
                return (guard.refuse)(&refusal);
            }
        },
    };
    if response.status().is_success() {
        let reserved = grant.reserved();
        let receipt = grant.commit(reserved);
        // `envelope::render` reads it to fill in `token_stats` and `pricing`.
        response.extensions_mut().insert(receipt);
    } else {
        drop(grant); // the handler failed: refund the reservation
    }
    response
}

/// Runs the handler with `limit` for its body to arrive, then `limit` for it to answer.
async fn within(limit: Duration, req: Request, next: Next) -> Result<Response, Refusal> {
    let (read, mut body_read) = tokio::sync::oneshot::channel();
    let req = req.map(|inner| {
        axum::body::Body::new(Watched {
            inner,
            read: Some(read),
        })
    });
    let handler = next.run(req);
    tokio::pin!(handler);
    let body_late = tokio::time::sleep(limit);
    tokio::select! {
        biased;
        response = &mut handler => return Ok(response),
        // The body ended, failed, or was dropped unread: the handler has it all.
        _ = &mut body_read => {}
        () = body_late => return Err(Refusal::BodyTimedOut(limit)),
    }
    tokio::time::timeout(limit, handler)
        .await
        .map_err(|_| Refusal::HandlerTimedOut(limit))
}

/// A request body that tells [`within`] when it is over: when it ends or fails, or is
/// dropped (its sender with it).
struct Watched {
    inner: axum::body::Body,
    read: Option<tokio::sync::oneshot::Sender<()>>,
}

impl axum::body::HttpBody for Watched {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(None | Some(Err(_))) = &polled {
            self.read = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
