//! What owner secrets look like on the way in and out: [`SecretInfo`], the redacting
//! [`OutboundHeader`] and [`OutboundUrl`], and the validation of names and values.

use std::fmt;

use serde::Serialize;

use crate::clock::Timestamp;
use crate::error::{Error, Result};
use crate::public_id::PublicId;
use crate::secret::Secret;

/// Longest secret name.
pub(crate) const SECRET_NAME_MAX: usize = 64;
/// Longest secret value, in bytes.
pub(crate) const SECRET_VALUE_MAX_BYTES: usize = 8 * 1024;
/// Longest header or query parameter name.
const FIELD_NAME_MAX: usize = 64;

/// An owner secret's metadata: never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    /// The owning account's public id.
    pub owner: PublicId,
    /// The secret's name.
    pub name: String,
    /// Normalized allowed-host patterns (`api.example.com`, `*.example.com`, `host:8443`).
    pub allowed_hosts: Vec<String>,
    /// 1 when first put, +1 at each rotation or replacement.
    pub version: u32,
    /// When it was first put.
    pub created_at: Timestamp,
    /// Who put it.
    pub created_by: String,
    /// Last change.
    pub updated_at: Timestamp,
    /// Who changed it last.
    pub updated_by: String,
    /// Last rotation.
    pub rotated_at: Option<Timestamp>,
}

/// A header to add to an outbound request. `Debug` and `Display` redact the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundHeader {
    /// Header name (`Authorization`, `X-Api-Key`…).
    pub name: String,
    /// Header value, secret attached (`Bearer …`).
    pub value: Secret,
    /// The url the host check passed, as it parsed it (normal form: lowercase host, IDN as
    /// punycode). Send the request to this text rather than the one you passed: then no
    /// difference between this crate's url parser and your HTTP client's can take the
    /// secret to another host.
    pub url: String,
}

impl fmt::Display for OutboundHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.value)
    }
}

/// A url with a secret as a query parameter. `Debug` and `Display` show it with the
/// parameter's value replaced by `***`; [`expose`](Self::expose) reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct OutboundUrl {
    pub(crate) url: Secret,
    pub(crate) redacted: String,
}

impl OutboundUrl {
    /// The url with the secret attached: pass it to the HTTP client, nowhere else.
    pub fn expose(&self) -> &str {
        self.url.expose()
    }

    /// The url with the secret parameter's value shown as `***`, for logs.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

impl fmt::Debug for OutboundUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OutboundUrl({})", self.redacted)
    }
}

impl fmt::Display for OutboundUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = (1..=SECRET_NAME_MAX).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            format!(
                "a secret name is 1–{SECRET_NAME_MAX} characters of [A-Za-z0-9_.-], \
                 starting with a letter or digit"
            ),
        ))
    }
}

pub(crate) fn validate_value(value: &Secret) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid("value", "must not be empty"));
    }
    if value.len() > SECRET_VALUE_MAX_BYTES {
        return Err(Error::invalid(
            "value",
            format!(
                "must be at most {SECRET_VALUE_MAX_BYTES} bytes, got {}",
                value.len()
            ),
        ));
    }
    if value.expose().chars().any(char::is_control) {
        // It is sent in headers and urls, where a line break would inject a header.
        return Err(Error::invalid(
            "value",
            "must not contain control characters (line breaks, NUL…)",
        ));
    }
    Ok(())
}

/// An HTTP header name (RFC 9110 token).
pub(crate) fn validate_header_name(name: &str) -> Result<()> {
    let ok = (1..=FIELD_NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "header_name",
            format!("a header name is 1–{FIELD_NAME_MAX} token characters (e.g. X-Api-Key)"),
        ))
    }
}

pub(crate) fn validate_param(param: &str) -> Result<()> {
    let ok = (1..=FIELD_NAME_MAX).contains(&param.len())
        && param
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "param",
            format!("a query parameter name is 1–{FIELD_NAME_MAX} characters of [A-Za-z0-9_.-]"),
        ))
    }
}
