//! Key and token management (`/v2/keys`, `/v2/tokens`) and connections (`/v2/connectors`),
//! in the `{success, result, links, errors}` envelope.
//!
//! Every call acts on the caller's own account only: the handle is
//! `keys().owned_by(caller.owner)`, so another owner's key id is `404`, exactly like an id
//! that does not exist. Reads need the `fetch` scope (the `/v2/` route rule); writes also
//! need `manage`, which `fetch`-only keys lack, and never make a key broader than the caller
//! ([`super::bounds`]). Ledger calls run on tokio's blocking pool: writes commit a redb
//! transaction with an fsync.

use std::sync::Arc;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use keyledger::{Error, KeyInfo, KeyUpdate, Keys, Ledger, NewKey, PageRequest, Timestamp};
use serde::{Deserialize, Serialize};

use super::bounds::{Bounds, Refused};
use super::envelope::{Links, body_code, managed, managed_error, parse_json};
use super::{App, AuthMode, Caller, READ_ONLY, READ_SCOPE, WRITE_SCOPE};

/// Keys or tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Key,
    Token,
}

impl Kind {
    /// The `{id}` of a path. One that is not UTF-8 (`%FF`) names nothing: answered as an
    /// unknown id is, in the envelope (axum's own answer is plain text).
    fn id(self, path: IdPath) -> Result<String, Fail> {
        path.map(|Path(id)| id).map_err(|_| Fail {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: match self {
                Kind::Key => "key not found".into(),
                Kind::Token => "token not found".into(),
            },
        })
    }

    fn path(self) -> &'static str {
        match self {
            Kind::Key => "/v2/keys",
            Kind::Token => "/v2/tokens",
        }
    }

    /// The ledger handle for this kind, scoped to `caller`'s account, recording the caller's
    /// key id as the author of changes.
    fn handle<'l>(self, ledger: &'l Ledger, caller: &Caller) -> keyledger::Result<Keys<'l>> {
        let keys = match self {
            Kind::Key => ledger.keys(),
            Kind::Token => ledger.tokens(),
        };
        Ok(keys.owned_by(&caller.owner)?.by(caller.key_id.as_str()))
    }
}

/// A key or token as the API shows it.
#[derive(Debug, Serialize)]
struct KeyView {
    id: String,
    name: String,
    #[serde(rename = "type")]
    kind: String,
    /// `[]` for a read/write key (stored as `*`), `["fetch"]` for a read-only one, the
    /// stored scopes of a key made through the library or the CLI, and `null` for one that
    /// holds none (`[]` would read as read/write).
    permissions: Option<Vec<String>>,
    ips: Vec<String>,
    created_by: String,
    created_time: String,
    updated_by: String,
    updated_time: String,
    /// The key itself: only in the response that created it.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
}

impl KeyView {
    fn of(info: KeyInfo) -> KeyView {
        let permissions = if info.permissions == ["*"] {
            Some(vec![])
        } else {
            Some(info.permissions).filter(|p| !p.is_empty())
        };
        KeyView {
            id: info.id.to_string(),
            name: info.name,
            kind: info.kind.label().to_owned(),
            permissions,
            ips: info.ips,
            created_by: info.created_by,
            created_time: rfc3339(info.created_at),
            updated_by: info.updated_by,
            updated_time: rfc3339(info.updated_at),
            value: None,
        }
    }
}

/// `2025-01-31T12:00:00.000Z` from milliseconds since the epoch.
fn rfc3339(t: Timestamp) -> String {
    let ms = t.as_millis();
    let (days, rem) = (ms / 86_400_000, ms % 86_400_000);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// A library error as a management response. Validation → 400, unknown or foreign id → 404,
/// conflict → 409, a change that may or may not have been made → 500 `outcome_unknown`,
/// anything else → 500 (its message names no secret, but stays in the log).
fn failure(e: &Error) -> Response {
    match e {
        Error::InvalidInput { .. } => {
            managed_error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
        }
        Error::NotFound { what } => managed_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        ),
        // Worded as for an unknown id: a forged id must not read differently from a foreign
        // or deleted one.
        Error::InvalidId(e) => managed_error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} not found", e.expected),
        ),
        Error::Conflict(_) => managed_error(StatusCode::CONFLICT, "conflict", e.to_string()),
        // Not "try again": a change repeated blindly (a top-up) may count twice.
        Error::Uncertain { .. } => {
            eprintln!("management call may or may not have been made: {e}");
            managed_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "outcome_unknown",
                "the key store failed while saving the change, which may have been made: \
                 look the resource up once the service is back before repeating it",
            )
        }
        _ => {
            eprintln!("management call failed: {e}");
            managed_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the key store failed; try again",
            )
        }
    }
}

/// Runs a ledger call on the blocking pool.
async fn blocking(
    app: &Arc<App>,
    f: impl FnOnce(&Ledger) -> Response + Send + 'static,
) -> Response {
    let ledger = app.ledger.clone();
    tokio::task::spawn_blocking(move || f(&ledger))
        .await
        .unwrap_or_else(|_| {
            managed_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request failed",
            )
        })
}

/// The caller's bounds (none with auth off), once it is known to be still in force.
fn bounds(app: &App, ledger: &Ledger, caller: &Caller) -> Result<Bounds, Box<Response>> {
    let bounds =
        Bounds::of(ledger, (app.auth == AuthMode::On).then_some(caller)).map_err(|e| match e {
            Error::NotFound { .. } => Box::new(refused(Bounds::deleted())),
            e => Box::new(failure(&e)),
        })?;
    bounds.in_force().map_err(|r| Box::new(refused(r)))?;
    Ok(bounds)
}

/// The caller's bounds and the handle to change key `id` with, once `id` is known to be no
/// broader than the caller; otherwise the response that says why not.
fn may_change<'l>(
    app: &App,
    ledger: &'l Ledger,
    caller: &Caller,
    kind: Kind,
    id: &str,
) -> Result<(Bounds, Keys<'l>), Box<Response>> {
    let failed = |e: Error| Box::new(failure(&e));
    let bounds = bounds(app, ledger, caller)?;
    let keys = kind.handle(ledger, caller).map_err(failed)?;
    let target = keys.get(id).map_err(failed)?;
    bounds.covers(&target).map_err(|r| Box::new(refused(r)))?;
    Ok((bounds, keys))
}

/// A refusal in the management envelope; a 401 carries `WWW-Authenticate`, as the auth
/// layer's own 401s do (RFC 9110 §15.5.2: a 401 must; found by a reviewer).
fn refused((status, code, message): Refused) -> Response {
    let mut response = managed_error(status, code, message);
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// A refused management request, before it reaches the ledger.
#[derive(Debug)]
struct Fail {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Fail {
    fn invalid(message: impl Into<String>) -> Fail {
        Fail {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: message.into(),
        }
    }
}

impl IntoResponse for Fail {
    fn into_response(self) -> Response {
        managed_error(self.status, self.code, self.message)
    }
}

/// 403 unless the caller may write.
fn require_write(caller: &Caller) -> Result<(), Fail> {
    if keyledger::permits(&caller.permissions, WRITE_SCOPE) {
        Ok(())
    } else {
        Err(Fail {
            status: StatusCode::FORBIDDEN,
            code: "forbidden",
            message: READ_ONLY.into(),
        })
    }
}

/// API permissions → stored scopes: `[]` (read/write) is `*`, `["fetch"]` stays.
fn scopes(permissions: &[String]) -> Result<Vec<String>, Fail> {
    match permissions {
        [] => Ok(vec!["*".into()]),
        [only] if only == READ_SCOPE => Ok(vec![READ_SCOPE.into()]),
        _ => Err(Fail::invalid(
            "permissions must be [] (read/write) or [\"fetch\"] (read-only)",
        )),
    }
}

fn body<T: serde::de::DeserializeOwned>(headers: &HeaderMap, Raw(raw): Raw) -> Result<T, Fail> {
    let bytes = raw?;
    parse_json(headers, &bytes).map_err(|e| Fail {
        status: e.status,
        code: e.code,
        message: e.message,
    })
}

async fn list(kind: Kind, app: Arc<App>, caller: Caller, query: Q) -> Result<Response, Fail> {
    let Ok(Query(query)) = query else {
        return Err(Fail::invalid("unreadable query"));
    };
    // A parameter given twice is refused, not read as its first or last value: a proxy
    // or cache in front may read the other one.
    let mut seen = std::collections::HashSet::new();
    if let Some((name, _)) = query.iter().find(|(name, _)| !seen.insert(name)) {
        return Err(Fail::invalid(format!(
            "{} is given more than once",
            super::envelope::shown(name)
        )));
    }
    let get = |name: &str| query.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let mut page = PageRequest::first();
    if let Some(limit) = get("limit") {
        let digits = !limit.is_empty() && limit.bytes().all(|b| b.is_ascii_digit());
        match limit.parse::<usize>() {
            Ok(n) if digits && (1..=keyledger::MAX_LIMIT).contains(&n) => page = page.limit(n),
            _ => {
                return Err(Fail::invalid(format!(
                    "limit must be 1–{}",
                    keyledger::MAX_LIMIT
                )));
            }
        }
    }
    if let Some(cursor) = get("cursor") {
        page = page.after(cursor.as_str());
    }
    Ok(blocking(&app, move |ledger| {
        let listed = kind
            .handle(ledger, &caller)
            .and_then(|keys| keys.list(&caller.owner, &page));
        match listed {
            Ok(found) => {
                let limit = page.limit.unwrap_or(keyledger::DEFAULT_LIMIT);
                let base = format!("{}?limit={limit}", kind.path());
                let this = match &page.cursor {
                    Some(c) => format!("{base}&cursor={c}"),
                    None => base.clone(),
                };
                let links = Links {
                    this,
                    // Cursors are base64url: safe in a query string as they are.
                    next: found.next_cursor.map(|c| format!("{base}&cursor={c}")),
                };
                let items: Vec<KeyView> = found.items.into_iter().map(KeyView::of).collect();
                managed(StatusCode::OK, items, Some(links))
            }
            Err(e) => failure(&e),
        }
    })
    .await)
}

async fn get_one(kind: Kind, app: Arc<App>, caller: Caller, id: IdPath) -> Result<Response, Fail> {
    let id = kind.id(id)?;
    Ok(blocking(&app, move |ledger| {
        match kind.handle(ledger, &caller).and_then(|keys| keys.get(&id)) {
            Ok(info) => {
                let links = Links {
                    this: format!("{}/{}", kind.path(), info.id),
                    next: None,
                };
                managed(StatusCode::OK, KeyView::of(info), Some(links))
            }
            Err(e) => failure(&e),
        }
    })
    .await)
}

/// `POST /v2/keys` and `/v2/tokens` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    /// `api` for keys (may be left out); required for tokens.
    #[serde(rename = "type", default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    permissions: Vec<String>,
    #[serde(default)]
    ips: Vec<String>,
}

async fn create(
    kind: Kind,
    app: Arc<App>,
    caller: Caller,
    headers: HeaderMap,
    raw: Raw,
) -> Result<Response, Fail> {
    // A caller that may not write was refused by `Raw`, before its body was read.
    let req: CreateRequest = body(&headers, raw)?;
    let scopes = scopes(&req.permissions)?;
    let new = match (kind, req.kind.as_deref()) {
        (Kind::Key, None | Some("api")) => NewKey::new(caller.owner.as_str(), req.name),
        (Kind::Key, Some(_)) => return Err(Fail::invalid("type must be \"api\" for a key")),
        (Kind::Token, None) => return Err(Fail::invalid("type is required for a token")),
        (Kind::Token, Some(t)) => NewKey::token(caller.owner.as_str(), t, req.name),
    };
    Ok(blocking(&app.clone(), move |ledger| {
        let bounds = match bounds(&app, ledger, &caller) {
            Ok(b) => b,
            Err(response) => return *response,
        };
        if let Err(r) = bounds.permissions(&scopes) {
            return refused(r);
        }
        if kind == Kind::Token
            && let Err(r) = bounds.may_mint_tokens()
        {
            return refused(r);
        }
        let new = match bounds.ips(req.ips) {
            Ok(ips) => new.permissions(scopes).ips(ips),
            Err(r) => return refused(r),
        };
        // Minting keys never mints credits: a new key spends from the caller's pool (or,
        // for an unmetered caller, the account's), and has the caller's expiry and limits.
        let pool = match ledger.credits().pools(&caller.owner) {
            Ok(pools) => pools.into_iter().next().map(|p| p.id),
            Err(e) => return failure(&e),
        };
        let new = match bounds.hand_on(new, pool.as_ref().map(|p| p.as_str())) {
            Ok(new) => new,
            Err(r) => return refused(r),
        };
        match kind
            .handle(ledger, &caller)
            .and_then(|keys| keys.create(new))
        {
            Ok(created) => {
                let links = Links {
                    this: format!("{}/{}", kind.path(), created.info.id),
                    next: None,
                };
                let mut view = KeyView::of(created.info);
                view.value = Some(created.plaintext.expose().to_owned());
                // `envelope::private` marks it `no-store`, as every answer.
                managed(StatusCode::CREATED, view, Some(links))
            }
            Err(e) => failure(&e),
        }
    })
    .await)
}

/// `PATCH /v2/keys/{id}` and `/v2/tokens/{id}` body: any of these.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateRequest {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    permissions: Option<Vec<String>>,
    #[serde(default)]
    ips: Option<Vec<String>>,
}

async fn update(
    kind: Kind,
    app: Arc<App>,
    caller: Caller,
    id: IdPath,
    headers: HeaderMap,
    raw: Raw,
) -> Result<Response, Fail> {
    let id = kind.id(id)?;
    // A caller that may not write was refused by `Raw`, before its body was read.
    let req: UpdateRequest = body(&headers, raw)?;
    if req.name.is_none() && req.permissions.is_none() && req.ips.is_none() {
        return Err(Fail::invalid("give at least one of name, permissions, ips"));
    }
    let scopes = req.permissions.as_deref().map(scopes).transpose()?;
    Ok(blocking(&app.clone(), move |ledger| {
        let (bounds, keys) = match may_change(&app, ledger, &caller, kind, &id) {
            Ok(found) => found,
            Err(response) => return *response,
        };
        let mut update = KeyUpdate::new();
        if let Some(name) = req.name {
            update = update.name(name);
        }
        if let Some(scopes) = scopes {
            if let Err(r) = bounds.permissions(&scopes) {
                return refused(r);
            }
            update = update.permissions(scopes);
        }
        if let Some(ips) = req.ips {
            match bounds.ips(ips) {
                Ok(ips) => update = update.ips(ips),
                Err(r) => return refused(r),
            }
        }
        match keys.update(&id, update) {
            Ok(info) => {
                let links = Links {
                    this: format!("{}/{}", kind.path(), info.id),
                    next: None,
                };
                managed(StatusCode::OK, KeyView::of(info), Some(links))
            }
            Err(e) => failure(&e),
        }
    })
    .await)
}

/// What `DELETE` answers.
#[derive(Debug, Serialize)]
struct Deleted {
    id: String,
    deleted: bool,
}

async fn delete(kind: Kind, app: Arc<App>, caller: Caller, id: IdPath) -> Result<Response, Fail> {
    let id = kind.id(id)?;
    require_write(&caller)?;
    Ok(blocking(&app.clone(), move |ledger| {
        let keys = match may_change(&app, ledger, &caller, kind, &id) {
            Ok((_, keys)) => keys,
            Err(response) => return *response,
        };
        match keys.delete(&id) {
            Ok(()) => managed(StatusCode::OK, Deleted { id, deleted: true }, None),
            Err(e) => failure(&e),
        }
    })
    .await)
}

type Q = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The `{id}` segment of a path, or why it could not be read.
type IdPath = Result<Path<String>, PathRejection>;

/// A management request's body, read within the app's `request_deadline` (408 otherwise).
/// Management routes have no deadline on the whole request — a write started on the
/// blocking pool commits whatever the client is told — so the wait for the body is bounded
/// here, before anything is written: a client trickling its body can neither hold a
/// connection for ever nor act long after its key was verified.
pub struct Raw(Result<Bytes, Fail>);

impl FromRequest<Arc<App>> for Raw {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, app: &Arc<App>) -> Result<Raw, Self::Rejection> {
        // A key that may not write is refused before its body is read (or, with
        // `Expect: 100-continue`, asked for).
        if let Some(caller) = req.extensions().get::<Caller>()
            && let Err(refused) = require_write(caller)
        {
            return Ok(Raw(Err(refused)));
        }
        let limit = app.request_deadline;
        let read = match tokio::time::timeout(limit, Bytes::from_request(req, app)).await {
            Ok(read) => read.map_err(|e: BytesRejection| Fail {
                status: e.status(),
                code: body_code(e.status()),
                message: e.body_text(),
            }),
            Err(_) => Err(Fail {
                status: StatusCode::REQUEST_TIMEOUT,
                code: "request_timeout",
                message: format!(
                    "the request body did not arrive within {} s; nothing was changed",
                    limit.as_secs_f64()
                ),
            }),
        };
        Ok(Raw(read))
    }
}

/// `GET /v2/keys?limit=&cursor=`.
pub async fn list_keys(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    q: Q,
) -> Response {
    list(Kind::Key, app, c, q).await.into_response()
}

/// `GET /v2/tokens?limit=&cursor=`.
pub async fn list_tokens(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    q: Q,
) -> Response {
    list(Kind::Token, app, c, q).await.into_response()
}

/// `GET /v2/keys/{id}`.
pub async fn get_key(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    id: IdPath,
) -> Response {
    get_one(Kind::Key, app, c, id).await.into_response()
}

/// `GET /v2/tokens/{id}`.
pub async fn get_token(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    id: IdPath,
) -> Response {
    get_one(Kind::Token, app, c, id).await.into_response()
}

/// `POST /v2/keys`.
pub async fn create_key(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    h: HeaderMap,
    raw: Raw,
) -> Response {
    create(Kind::Key, app, c, h, raw).await.into_response()
}

/// `POST /v2/tokens`.
pub async fn create_token(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    h: HeaderMap,
    raw: Raw,
) -> Response {
    create(Kind::Token, app, c, h, raw).await.into_response()
}

/// `PATCH /v2/keys/{id}`.
pub async fn update_key(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    id: IdPath,
    h: HeaderMap,
    raw: Raw,
) -> Response {
    update(Kind::Key, app, c, id, h, raw).await.into_response()
}

/// `PATCH /v2/tokens/{id}`.
pub async fn update_token(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    id: IdPath,
    h: HeaderMap,
    raw: Raw,
) -> Response {
    update(Kind::Token, app, c, id, h, raw)
        .await
        .into_response()
}

/// `DELETE /v2/keys/{id}`.
pub async fn delete_key(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    id: IdPath,
) -> Response {
    delete(Kind::Key, app, c, id).await.into_response()
}

/// `DELETE /v2/tokens/{id}`.
pub async fn delete_token(
    State(app): State<Arc<App>>,
    Extension(c): Extension<Caller>,
    id: IdPath,
) -> Response {
    delete(Kind::Token, app, c, id).await.into_response()
}

/// A connection as `GET /v2/connectors` shows it: metadata only, never a token.
#[derive(Debug, Serialize)]
struct ConnectionView {
    provider: String,
    scopes: Vec<String>,
    health: &'static str,
    health_reason: Option<&'static str>,
    has_refresh_token: bool,
    expires_time: Option<String>,
    connected_time: String,
    connected_by: String,
    updated_time: String,
    last_refreshed_time: Option<String>,
}

/// `GET /v2/connectors`: the caller's account's connections.
pub async fn connectors(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    blocking(&app, move |ledger| {
        match ledger.vault().list(&caller.owner) {
            Ok(list) => {
                let views: Vec<ConnectionView> = list
                    .into_iter()
                    .map(|c| ConnectionView {
                        provider: c.provider.as_str().to_owned(),
                        scopes: c.scopes,
                        health: c.health.as_str(),
                        health_reason: c.health_reason.map(|k| k.as_str()),
                        has_refresh_token: c.has_refresh_token,
                        expires_time: c.expires_at.map(rfc3339),
                        connected_time: rfc3339(c.connected_at),
                        connected_by: c.connected_by,
                        updated_time: rfc3339(c.updated_at),
                        last_refreshed_time: c.last_refreshed_at.map(rfc3339),
                    })
                    .collect();
                let links = Links {
                    this: "/v2/connectors".into(),
                    next: None,
                };
                managed(StatusCode::OK, views, Some(links))
            }
            Err(e) => failure(&e),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change whose commit failed may have landed: the client must not be told to retry
    /// (a top-up repeated would count twice), but to look before repeating it.
    #[test]
    fn a_change_that_may_have_been_made_is_not_answered_try_again() {
        let response = failure(&Error::Uncertain {
            what: "balance change",
            reason: "I/O error".into(),
        });
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["errors"][0]["code"], "outcome_unknown");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("may have been made"), "{message}");
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(Timestamp(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Timestamp(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(
            rfc3339(Timestamp(1_767_225_599_999)),
            "2025-12-31T23:59:59.999Z"
        );
    }
}
