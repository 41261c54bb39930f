//! Provider error normalization: a provider's HTTP error becomes a [`ProviderError`] with a
//! category and a fixed, safe message. The body is read only to classify; nothing of it is
//! kept except a provider error code from a fixed list.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::vault::provider::Provider;

/// Bodies longer than this are classified by HTTP status alone.
const MAX_BODY: usize = 64 * 1024;

/// What kind of failure a provider reported, and so what the caller should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProviderErrorKind {
    /// The access token expired or was rejected: refresh the connection, then retry.
    AuthExpired,
    /// The grant was revoked or the refresh token is no longer valid: the owner must connect
    /// again.
    Revoked,
    /// The provider is rate limiting: retry later.
    RateLimited,
    /// The provider is down or timed out: retry later.
    Unavailable,
    /// The request was invalid or not permitted (bad parameters, missing object, insufficient
    /// scope or sharing): fix the request; retrying it as is will fail again.
    InvalidRequest,
    /// Anything else.
    Unknown,
}

impl ProviderErrorKind {
    /// The snake_case name (`auth_expired`, `rate_limited`…).
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderErrorKind::AuthExpired => "auth_expired",
            ProviderErrorKind::Revoked => "revoked",
            ProviderErrorKind::RateLimited => "rate_limited",
            ProviderErrorKind::Unavailable => "unavailable",
            ProviderErrorKind::InvalidRequest => "invalid_request",
            ProviderErrorKind::Unknown => "unknown",
        }
    }

    /// Whether the same call may succeed later without any change.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ProviderErrorKind::RateLimited | ProviderErrorKind::Unavailable
        )
    }

    /// A fixed message for callers.
    pub fn message(self) -> &'static str {
        match self {
            ProviderErrorKind::AuthExpired => {
                "the provider rejected the access token as expired or invalid; refresh the connection"
            }
            ProviderErrorKind::Revoked => {
                "the provider revoked the grant; the owner must connect again"
            }
            ProviderErrorKind::RateLimited => "the provider is rate limiting; retry later",
            ProviderErrorKind::Unavailable => "the provider is unavailable; retry later",
            ProviderErrorKind::InvalidRequest => {
                "the provider rejected the request as invalid or not permitted"
            }
            ProviderErrorKind::Unknown => "the provider returned an unexpected error",
        }
    }
}

impl fmt::Display for ProviderErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A provider's error, safe to show to callers and to log: a category, the HTTP status, and
/// the provider's error code when it is one of a fixed list of known codes. Never the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderError {
    /// The provider that failed.
    pub provider: Provider,
    /// The failure's category.
    pub kind: ProviderErrorKind,
    /// The HTTP status the provider answered with.
    pub http_status: u16,
    /// The provider's error code, when it is a known one (`invalid_grant`, `rate_limited`…).
    pub provider_code: Option<&'static str>,
}

impl ProviderError {
    /// The fixed message for this error's category.
    pub fn message(&self) -> &'static str {
        self.kind.message()
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (HTTP {}",
            self.provider,
            self.kind.message(),
            self.http_status
        )?;
        if let Some(code) = self.provider_code {
            write!(f, ", {code}")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for ProviderError {}

/// Known provider error codes (OAuth 2.0, Google APIs, Notion) and their categories. Only these
/// static strings can reach a [`ProviderError`].
const CODES: &[(&str, ProviderErrorKind)] = {
    use ProviderErrorKind::*;
    &[
        // OAuth 2.0 (RFC 6749 §5.2, RFC 6750 §3.1) token and resource errors.
        ("invalid_grant", Revoked),
        ("unauthorized_client", Revoked),
        ("access_denied", Revoked),
        ("invalid_token", AuthExpired),
        ("invalid_client", InvalidRequest),
        ("invalid_request", InvalidRequest),
        ("invalid_scope", InvalidRequest),
        ("insufficient_scope", InvalidRequest),
        ("unsupported_grant_type", InvalidRequest),
        ("temporarily_unavailable", Unavailable),
        ("server_error", Unavailable),
        // Google APIs: `error.status` and `error.errors[].reason`.
        ("UNAUTHENTICATED", AuthExpired),
        ("authError", AuthExpired),
        ("RESOURCE_EXHAUSTED", RateLimited),
        ("rateLimitExceeded", RateLimited),
        ("userRateLimitExceeded", RateLimited),
        ("dailyLimitExceeded", RateLimited),
        ("UNAVAILABLE", Unavailable),
        ("backendError", Unavailable),
        ("INTERNAL", Unavailable),
        ("PERMISSION_DENIED", InvalidRequest),
        ("insufficientPermissions", InvalidRequest),
        ("NOT_FOUND", InvalidRequest),
        ("notFound", InvalidRequest),
        ("INVALID_ARGUMENT", InvalidRequest),
        ("badRequest", InvalidRequest),
        // Notion: `code`.
        ("unauthorized", AuthExpired),
        ("rate_limited", RateLimited),
        ("restricted_resource", InvalidRequest),
        ("object_not_found", InvalidRequest),
        ("validation_error", InvalidRequest),
        ("invalid_json", InvalidRequest),
        ("conflict_error", InvalidRequest),
        ("internal_server_error", Unavailable),
        ("service_unavailable", Unavailable),
        ("database_connection_unavailable", Unavailable),
        ("gateway_timeout", Unavailable),
    ]
};

/// Turns a provider's HTTP error into a safe [`ProviderError`].
///
/// The category comes from a known error code in a JSON body (OAuth 2.0 `error`, Google's
/// `error.status` / `error.errors[].reason`, Notion's `code`), else from the status: 401 →
/// `auth_expired`, 429 → `rate_limited`, 408 and 5xx → `unavailable`, other 4xx →
/// `invalid_request`. Never fails and never panics; nothing of `body` is echoed.
pub fn normalize_provider_error(
    provider: &Provider,
    http_status: u16,
    body: &str,
) -> ProviderError {
    let code = if body.len() <= MAX_BODY {
        serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| known_code(&v))
    } else {
        None
    };
    let kind = match code {
        Some((_, kind)) => kind,
        None => match http_status {
            401 => ProviderErrorKind::AuthExpired,
            429 => ProviderErrorKind::RateLimited,
            408 | 500..=599 => ProviderErrorKind::Unavailable,
            400..=499 => ProviderErrorKind::InvalidRequest,
            _ => ProviderErrorKind::Unknown,
        },
    };
    ProviderError {
        provider: provider
            .validated()
            .unwrap_or_else(|_| Provider::Other("other".into())),
        kind,
        http_status,
        provider_code: code.map(|(c, _)| c),
    }
}

/// The first known code in the usual places of a provider's error body.
fn known_code(body: &Value) -> Option<(&'static str, ProviderErrorKind)> {
    let lookup = |v: Option<&Value>| -> Option<(&'static str, ProviderErrorKind)> {
        let text = v?.as_str()?;
        CODES.iter().find(|(c, _)| *c == text).copied()
    };
    let error = body.get("error");
    let reasons = error
        .and_then(|e| e.get("errors"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .take(8)
        .map(|r| r.get("reason"));
    // Google's per-error reason is more specific than its status (a 403 `PERMISSION_DENIED`
    // with reason `rateLimitExceeded` is a rate limit).
    reasons
        .map(lookup)
        .find(Option::is_some)
        .flatten()
        .or_else(|| lookup(error))
        .or_else(|| lookup(error.and_then(|e| e.get("status"))))
        .or_else(|| lookup(body.get("code")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderErrorKind::*;

    fn kind(status: u16, body: &str) -> ProviderErrorKind {
        normalize_provider_error(&Provider::GoogleDrive, status, body).kind
    }

    #[test]
    fn oauth_google_and_notion_bodies_are_classified() {
        assert_eq!(
            kind(
                400,
                r#"{"error":"invalid_grant","error_description":"Token has been expired or revoked."}"#
            ),
            Revoked
        );
        assert_eq!(
            kind(
                401,
                r#"{"error":{"code":401,"status":"UNAUTHENTICATED","message":"x"}}"#
            ),
            AuthExpired
        );
        assert_eq!(
            kind(
                403,
                r#"{"error":{"code":403,"status":"PERMISSION_DENIED","errors":[{"reason":"userRateLimitExceeded"}]}}"#
            ),
            RateLimited
        );
        assert_eq!(
            kind(403, r#"{"error":{"status":"PERMISSION_DENIED"}}"#),
            InvalidRequest
        );
        assert_eq!(
            kind(
                429,
                r#"{"object":"error","status":429,"code":"rate_limited","message":"slow"}"#
            ),
            RateLimited
        );
        assert_eq!(
            kind(401, r#"{"object":"error","code":"unauthorized"}"#),
            AuthExpired
        );
        assert_eq!(kind(404, r#"{"code":"object_not_found"}"#), InvalidRequest);
        assert_eq!(kind(503, "<html>down</html>"), Unavailable);
        assert_eq!(kind(401, ""), AuthExpired);
        assert_eq!(kind(418, "{}"), InvalidRequest);
        assert_eq!(kind(302, "{}"), Unknown);
        assert_eq!(kind(200, r#"{"code":"made_up"}"#), Unknown);
    }

    #[test]
    fn nothing_of_the_body_is_echoed() {
        let token = "ya29.a0AfH6SMB-leaked-token";
        let body = format!(
            r#"{{"error":"invalid_grant","error_description":"bad token {token}","code":"{token}"}}"#
        );
        let e = normalize_provider_error(&Provider::Notion, 400, &body);
        for shown in [
            e.to_string(),
            format!("{e:?}"),
            serde_json::to_string(&e).unwrap(),
        ] {
            assert!(!shown.contains(token), "{shown}");
            assert!(!shown.contains("bad token"), "{shown}");
        }
        assert_eq!(e.provider_code, Some("invalid_grant"));
        let e = normalize_provider_error(&Provider::Other(token.into()), 500, token);
        assert!(!e.to_string().contains(token) && !format!("{e:?}").contains(token));
    }

    #[test]
    fn hostile_bodies_never_panic() {
        let deep = "[".repeat(10_000);
        let _ = kind(400, &deep);
        let _ = kind(400, &"x".repeat(MAX_BODY + 1));
        let _ = kind(0, "\u{0}\u{ffff}");
        let _ = kind(u16::MAX, r#"{"error":{"errors":"notalist"}}"#);
    }
}
