//! Response envelopes, opaque response ids, and JSON request bodies.
//!
//! Generation routes answer `{success, id, message, data, token_stats, pricing, error}`;
//! the management routes `{success, result, links, errors}`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::header::{
    CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, VARY, WWW_AUTHENTICATE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use keyledger::{Pricing, Receipt, TokenStats};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::auth::Refusal;

/// `application/json`, the only request and response body type.
const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A new opaque id, `kind_` + 22 base64url characters: the first 128 bits of
/// BLAKE3-keyed(process key, sequence number).
///
/// The library seals ids only for its own records (`acct_`, `key_`, `tok_`, `pool_`) and
/// offers no way to mint one for a host's resource, so the server mints its own: a keyed
/// PRF of a counter under a key drawn from the OS at start, so ids reveal nothing (not the
/// order, not the count) and never repeat within a process (nor, with overwhelming
/// probability, across restarts). Generated resources are placeholders that are not stored,
/// so nothing needs to look an id up again.
pub fn mint_id(kind: &str) -> String {
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let key = KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        // Without OS randomness, fall back to the clock: ids stay unique, just guessable.
        if getrandom::fill(&mut key).is_err() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            key = *blake3::hash(&now.as_nanos().to_le_bytes()).as_bytes();
        }
        key
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag = blake3::keyed_hash(key, &n.to_le_bytes());
    format!("{kind}_{}", URL_SAFE_NO_PAD.encode(&tag.as_bytes()[..16]))
}

/// The generation envelope.
#[derive(Debug, Clone, Serialize)]
pub struct Envelope {
    /// Whether the request succeeded.
    pub success: bool,
    /// Opaque id of the generated resource (`qh_…`, `rm_…`, `quiz_…`, `proj_…`), or of the
    /// failed request (`req_…`).
    pub id: String,
    /// A short human-readable summary.
    pub message: String,
    /// The generated resource (`null` on failure).
    pub data: Option<Value>,
    /// What the request used and was charged (`null` unless it succeeded and was verified).
    pub token_stats: Option<TokenStats>,
    /// What it costs at the route's price (`null` likewise).
    pub pricing: Option<Pricing>,
    /// `{code, message}` on failure, else `null`.
    pub error: Option<ErrorBody>,
}

/// A machine-readable code and a human-readable message.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    /// Stable code (`invalid_request`, `not_found`, `rate_limited`…).
    pub code: String,
    /// What went wrong; never contains a secret.
    pub message: String,
}

/// A generation response whose envelope is serialized by [`render`], after the auth layer
/// has settled the grant (so `token_stats` and `pricing` can be filled in).
///
/// Boxed, so that `Result<_, Pending>` stays small on the validation paths.
#[derive(Debug, Clone)]
pub struct Pending(Box<PendingInner>);

#[derive(Debug, Clone)]
struct PendingInner {
    status: StatusCode,
    envelope: Envelope,
}

impl Pending {
    /// A successful generation of a `kind` resource.
    pub fn ok(kind: &str, message: impl Into<String>, data: Value) -> Pending {
        Pending(Box::new(PendingInner {
            status: StatusCode::OK,
            envelope: Envelope {
                success: true,
                id: mint_id(kind),
                message: message.into(),
                data: Some(data),
                token_stats: None,
                pricing: None,
                error: None,
            },
        }))
    }

    /// A failed request.
    pub fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Pending {
        let message = message.into();
        Pending(Box::new(PendingInner {
            status,
            envelope: Envelope {
                success: false,
                id: mint_id("req"),
                message: message.clone(),
                data: None,
                token_stats: None,
                pricing: None,
                error: Some(ErrorBody {
                    code: code.into(),
                    message,
                }),
            },
        }))
    }

    /// A 400 `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Pending {
        Pending::error(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for Pending {
    fn into_response(self) -> Response {
        let mut response = self.0.status.into_response();
        response.extensions_mut().insert(self);
        response
    }
}

/// Outermost layer: serializes a [`Pending`] envelope, with the [`Receipt`] the auth layer
/// stored when it committed the grant. Other responses pass through unchanged.
pub async fn render(mut response: Response) -> Response {
    let Some(Pending(mut pending)) = response.extensions_mut().remove::<Pending>() else {
        return response;
    };
    if let Some(receipt) = response.extensions_mut().remove::<Receipt>() {
        pending.envelope.token_stats = Some(receipt.token_stats);
        pending.envelope.pricing = Some(receipt.pricing);
    }
    let mut out = json(pending.status, &pending.envelope);
    for (name, value) in response.headers() {
        if name != CONTENT_TYPE && name != CONTENT_LENGTH {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

/// `value` as a JSON response with `status`.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(CONTENT_TYPE, JSON)], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Adds the headers a refusal carries: `Retry-After` on `rate_limited`, `WWW-Authenticate`
/// on 401.
fn refusal_headers(refusal: &Refusal, mut response: Response) -> Response {
    let headers = response.headers_mut();
    if let Some(secs) = refusal.retry_after_secs() {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if refusal.status() == 401 {
        headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn status_of(refusal: &Refusal) -> StatusCode {
    StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::UNAUTHORIZED)
}

/// A refusal in the generation envelope.
pub fn generation_refusal(refusal: &Refusal) -> Response {
    let Pending(pending) = Pending::error(status_of(refusal), refusal.code(), refusal.message());
    let response = json(pending.status, &pending.envelope);
    refusal_headers(refusal, response)
}

/// The management envelope.
#[derive(Debug, Serialize)]
pub struct Managed<T: Serialize> {
    /// Whether the request succeeded.
    pub success: bool,
    /// The key, token, page of them, or connections (`null` on failure).
    pub result: Option<T>,
    /// `self`, and `next` when a listing has more.
    pub links: Option<Links>,
    /// `[{code, message}]` on failure, else `[]`.
    pub errors: Vec<ErrorBody>,
}

/// Links of a management response.
#[derive(Debug, Serialize)]
pub struct Links {
    /// This resource or page.
    #[serde(rename = "self")]
    pub this: String,
    /// The next page, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A successful management response.
pub fn managed<T: Serialize>(status: StatusCode, result: T, links: Option<Links>) -> Response {
    json(
        status,
        &Managed {
            success: true,
            result: Some(result),
            links,
            errors: vec![],
        },
    )
}

/// A failed management response.
pub fn managed_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    json(
        status,
        &Managed::<()> {
            success: false,
            result: None,
            links: None,
            errors: vec![ErrorBody {
                code: code.into(),
                message: message.into(),
            }],
        },
    )
}

/// A refusal in the management envelope.
pub fn management_refusal(refusal: &Refusal) -> Response {
    let response = managed_error(status_of(refusal), refusal.code(), refusal.message());
    refusal_headers(refusal, response)
}

/// Outermost layer: every answer is for one key's holder, so no shared cache may keep it
/// (`no-store`), and `Vary` names the headers that carry the key. A cache treats requests
/// with `Authorization` as private, but not those with `x-api-key`: without these, a
/// proxy could replay one account's key listing to anyone asking for the same URL.
pub async fn private(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(VARY, HeaderValue::from_static("authorization, x-api-key"));
    response
}

/// The code of a body that could not be read: `payload_too_large` for a 413, otherwise
/// `invalid_request`.
pub fn body_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        _ => "invalid_request",
    }
}

/// Why a request body was refused: 415 or 400, with a message.
#[derive(Debug)]
pub struct BodyError {
    /// 415 (`unsupported_media_type`) or 400 (`invalid_request`).
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Parses a JSON body: `Content-Type: application/json` or a JSON type by its suffix
/// (`application/vnd.api+json`, RFC 6839), parameters such as `charset` allowed, is
/// required, and the body must decode into `T` (unknown fields are refused by the request
/// types, so a misspelt field is an error rather than silently ignored). A value that does
/// not decode is named by its path (`context[0].type`), found by `serde_path_to_error`.
pub fn parse_json<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, BodyError> {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .is_some_and(|t| match t.strip_prefix("application/") {
            Some(sub) => sub == "json" || sub.len() > "+json".len() && sub.ends_with("+json"),
            None => false,
        });
    if !is_json {
        return Err(BodyError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "unsupported_media_type",
            message: "send the body as JSON with `Content-Type: application/json`".into(),
        });
    }
    let mut json = serde_json::Deserializer::from_slice(body);
    let decoded = serde_path_to_error::deserialize(&mut json)
        .map_err(|e| {
            let at = field_path(e.path());
            let why = body_error(e.inner());
            at.map_or(why.clone(), |at| format!("`{at}`: {why}"))
        })
        .and_then(|value| json.end().map(|()| value).map_err(|e| body_error(&e)));
    decoded.map_err(|why| BodyError {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request",
        message: format!("invalid request body: {why}"),
    })
}

/// Where in a body a value was refused, as `field.inner[2].name`, or `None` for the body as
/// a whole. A name of 16 characters or more (a map's key: a key can be sent as one) is
/// shown by its length only, as [`shown`] shows values.
fn field_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key: name } | Segment::Enum { variant: name } => {
                if !out.is_empty() {
                    out.push('.');
                }
                match name.chars().count() {
                    n @ 16.. => out.push_str(&format!("<a name of {n} characters>")),
                    _ => out.push_str(&name.escape_default().to_string().replace('`', "\\`")),
                }
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

/// A refused value as a message may show it: quoted when short, otherwise by its length
/// only, so that no response repeats an API key (or any secret) sent by mistake — the
/// library's rule for its own messages.
pub fn shown(value: &str) -> String {
    match value.chars().count() {
        n @ 16.. => format!("a value of {n} characters"),
        _ => format!("`{}`", value.escape_default()),
    }
}

/// serde's message for a refused body, unless it holds a run of 16 characters or more: a
/// key sent as a value or as a field's name can be one, however it is quoted or escaped
/// (found by reviewers: serde's messages echoed it, and hiding only what stood between
/// quotes let a quote inside the key end the hiding). Then only what kind of error it is,
/// and where.
fn body_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let message = e.to_string();
    let is_break = |c: char| c.is_whitespace() || "`\"'\\,:;()[]{}".contains(c);
    if message.split(is_break).all(|run| run.chars().count() < 16) {
        return message;
    }
    let what = match e.classify() {
        Category::Syntax => "not valid JSON",
        Category::Eof => "the JSON ends early",
        Category::Data => "a field is unknown, or a value is of the wrong type or out of range",
        Category::Io => "it could not be read",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

/// 404 for an unknown path, in the envelope of the surface the path belongs to.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/v2/") {
        managed_error(StatusCode::NOT_FOUND, "not_found", "no such route")
    } else {
        Pending::error(StatusCode::NOT_FOUND, "not_found", "no such route").into_response()
    }
}

/// 405 for a known path with another method.
pub async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    let message = "this route does not accept this method";
    if uri.path().starts_with("/v2/") {
        managed_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    } else {
        Pending::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
        .into_response()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::http::HeaderMap;
    use axum::http::header::CONTENT_TYPE;

    use super::parse_json;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Tagged {
        metadata: BTreeMap<String, u32>,
    }

    /// A map's key is user text: a key sent as one is shown by its length, a short one as
    /// it is.
    #[test]
    fn a_path_through_a_map_never_shows_a_long_name() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, "application/json".parse().unwrap());
        let long = "vb_live_0123456789abcdefghijABCDEFGHIJ";
        let body = format!(r#"{{"metadata":{{"{long}":"x"}}}}"#);
        let e = parse_json::<Tagged>(&headers, body.as_bytes()).unwrap_err();
        assert!(!e.message.contains("0123456789abcdef"), "{}", e.message);
        assert!(
            e.message.contains("`metadata.<a name of 38 characters>`"),
            "{}",
            e.message
        );
        let e = parse_json::<Tagged>(&headers, br#"{"metadata":{"env":"x"}}"#).unwrap_err();
        assert!(
            e.message.contains("`metadata.env`: invalid type"),
            "{}",
            e.message
        );
        let e = parse_json::<Tagged>(&headers, br#"{"metadata":{}} x"#).unwrap_err();
        assert!(e.message.contains("trailing characters"), "{}", e.message);
    }
}
