//! The connector data types: [`OAuthGrant`] in, [`Connection`] / [`ConnectionInfo`] /
//! [`DueRefresh`] / [`Disconnected`] out, [`Health`], and the validation of grants.

use serde::Serialize;

use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::public_id::PublicId;
use crate::record::rules;
use crate::secret::Secret;
use crate::vault::provider::Provider;
use crate::vault::provider_error::ProviderErrorKind;
use crate::vault::records::{ConnectorRecord, StoredHealth};

/// Longest access or refresh token, in bytes.
pub(crate) const TOKEN_MAX_BYTES: usize = 16 * 1024;
/// Most scopes per grant.
const MAX_SCOPES: usize = 100;
/// Longest scope, in bytes (Google's scopes are urls).
const SCOPE_MAX_BYTES: usize = 256;
/// A healthy connection whose access token expires within this many seconds reads as
/// [`Health::RefreshDue`].
pub const REFRESH_DUE_WITHIN_SECS: u64 = 300;

/// An OAuth grant as the provider's token endpoint returned it.
///
/// `Debug` redacts the tokens.
#[derive(Debug, Clone)]
pub struct OAuthGrant {
    pub(crate) access_token: Secret,
    pub(crate) refresh_token: Option<Secret>,
    pub(crate) scopes: Vec<String>,
    pub(crate) expires: Option<Expiry>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Expiry {
    At(Timestamp),
    InSecs(u64),
}

impl OAuthGrant {
    /// A grant with an access token, no refresh token, no scopes and no expiry.
    pub fn new(access_token: Secret) -> Self {
        OAuthGrant {
            access_token,
            refresh_token: None,
            scopes: Vec::new(),
            expires: None,
        }
    }

    /// The refresh token.
    pub fn refresh_token(mut self, token: Secret) -> Self {
        self.refresh_token = Some(token);
        self
    }

    /// The granted scopes (OAuth's space-separated `scope`, split).
    pub fn scopes<I: IntoIterator<Item = S>, S: Into<String>>(mut self, scopes: I) -> Self {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// When the access token expires.
    pub fn expires_at(mut self, at: Timestamp) -> Self {
        self.expires = Some(Expiry::At(at));
        self
    }

    /// OAuth's `expires_in`: seconds from now, by the ledger's clock when the grant is stored.
    pub fn expires_in_secs(mut self, secs: u64) -> Self {
        self.expires = Some(Expiry::InSecs(secs));
        self
    }
}

/// Health of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Health {
    /// Connected, and the access token is not about to expire.
    Healthy,
    /// The access token expires within [`REFRESH_DUE_WITHIN_SECS`] (or has expired): derived
    /// from the ledger's clock, never stored.
    RefreshDue,
    /// The last refresh failed (see `health_reason`); a refresher may retry.
    RefreshFailed,
    /// The provider revoked the grant; the owner must connect again.
    Revoked,
}

impl Health {
    /// The snake_case name (`refresh_due`…).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::RefreshDue => "refresh_due",
            Health::RefreshFailed => "refresh_failed",
            Health::Revoked => "revoked",
        }
    }
}

/// A connection's metadata: everything but the tokens. Safe to show and serialize.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionInfo {
    /// The owning account's public id.
    pub owner: PublicId,
    /// The provider.
    pub provider: Provider,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// When the access token expires, if the provider said.
    pub expires_at: Option<Timestamp>,
    /// Whether a refresh token is stored (without one, an expired grant needs a new connect).
    pub has_refresh_token: bool,
    /// Health, with `refresh_due` derived from the ledger's clock.
    pub health: Health,
    /// Why the connection is unhealthy (`refresh_failed` or `revoked`).
    pub health_reason: Option<ProviderErrorKind>,
    /// When the owner connected (or last reconnected).
    pub connected_at: Timestamp,
    /// Who connected it.
    pub connected_by: String,
    /// Last change.
    pub updated_at: Timestamp,
    /// Who changed it last.
    pub updated_by: String,
    /// Last successful refresh.
    pub last_refreshed_at: Option<Timestamp>,
    /// Which stored grant this is: changes at every connect and every successful refresh
    /// (not at a health change). [`record_refresh`](crate::Vault::record_refresh) and
    /// [`mark_unhealthy`](crate::Vault::mark_unhealthy) take the info a refresh or call
    /// started from and land only on the grant it came from.
    pub revision: u64,
    /// Record schema version.
    pub schema_version: u8,
}

/// What [`Vault::disconnect`](crate::Vault::disconnect) removed.
///
/// A row that does not decode (damaged since it was written, or written by a newer schema;
/// [`Ledger::check`](crate::Ledger::check) names such rows) is removed all the same, so an
/// owner can always get rid of a connection: its metadata is then unknown, and `info` is
/// `None`. `owner` and `provider` are always those of the row removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Disconnected {
    /// The owning account's public id.
    pub owner: PublicId,
    /// The provider.
    pub provider: Provider,
    /// The removed connection's metadata; `None` if its row did not decode.
    pub info: Option<ConnectionInfo>,
}

/// A connection with its tokens, as [`Secret`]s.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Metadata.
    pub info: ConnectionInfo,
    /// The access token.
    pub access_token: Secret,
    /// The refresh token, if the provider issued one.
    pub refresh_token: Option<Secret>,
}

/// A connection whose access token expires soon, or whose last refresh or call failed: what
/// a background refresher needs to find it, and no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DueRefresh {
    /// The owning account's public id.
    pub owner: PublicId,
    /// The provider.
    pub provider: Provider,
    /// When the access token expires (or expired; for a failed one, at the latest now).
    pub expires_at: Timestamp,
    /// Current health (`refresh_due`, or `refresh_failed` after a failed attempt).
    pub health: Health,
}

pub(crate) fn validate_token(field: &'static str, token: &Secret) -> Result<()> {
    if token.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if token.len() > TOKEN_MAX_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "must be at most {TOKEN_MAX_BYTES} bytes, got {}",
                token.len()
            ),
        ));
    }
    if token
        .expose()
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::invalid(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    Ok(())
}

pub(crate) fn validate_scopes(scopes: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for s in scopes {
        if s.is_empty()
            || s.len() > SCOPE_MAX_BYTES
            || s.chars().any(|c| c.is_whitespace() || rules::hostile(c))
        {
            // Scopes are listed: a line separator or bidirectional control in one would
            // reorder what a terminal shows after it, as in any other listed text.
            return Err(Error::invalid(
                "scopes",
                format!(
                    "each scope must be 1–{SCOPE_MAX_BYTES} bytes without whitespace, \
                     control or bidirectional-control characters"
                ),
            ));
        }
        if !out.contains(s) {
            out.push(s.clone());
            // Checked here, not after the loop: `contains` is linear, so a huge list would
            // cost quadratic time before being refused.
            if out.len() > MAX_SCOPES {
                return Err(Error::invalid("scopes", format!("at most {MAX_SCOPES}")));
            }
        }
    }
    Ok(out)
}

/// Health as of `now`.
pub(crate) fn health(
    record: &ConnectorRecord,
    now: Timestamp,
) -> (Health, Option<ProviderErrorKind>) {
    match record.health {
        StoredHealth::Revoked(k) => (Health::Revoked, Some(k)),
        StoredHealth::RefreshFailed(k) => (Health::RefreshFailed, Some(k)),
        StoredHealth::Healthy
            if record
                .expires_at
                .is_some_and(|e| e <= now.plus_secs(REFRESH_DUE_WITHIN_SECS)) =>
        {
            (Health::RefreshDue, None)
        }
        StoredHealth::Healthy => (Health::Healthy, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_capped_while_deduplicating() {
        let distinct: Vec<String> = (0..=MAX_SCOPES).map(|i| format!("s{i}")).collect();
        let err = validate_scopes(&distinct).unwrap_err().to_string();
        assert!(err.contains(&format!("at most {MAX_SCOPES}")), "{err}");

        // Refused at the first scope past the cap, before the rest is even looked at.
        let mut long = distinct.clone();
        long.push("not valid".into());
        let err = validate_scopes(&long).unwrap_err().to_string();
        assert!(err.contains(&format!("at most {MAX_SCOPES}")), "{err}");

        let dupes = vec!["drive.readonly".to_owned(); 10 * MAX_SCOPES];
        assert_eq!(validate_scopes(&dupes).unwrap(), ["drive.readonly"]);
    }
}
