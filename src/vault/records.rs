//! The vault's stored records and the layout of the plaintext sealed inside them.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::clock::Timestamp;
use crate::codec::Record;
use crate::error::CodecError;
use crate::secret::Secret;
use crate::vault::provider_error::ProviderErrorKind;

/// Stored connection health. `refresh_due` is not stored: it is derived from the clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum StoredHealth {
    /// The last connect or refresh succeeded.
    Healthy,
    /// A refresh failed for this reason; the refresher may retry.
    RefreshFailed(ProviderErrorKind),
    /// The provider revoked the grant; only a new `connect` helps.
    Revoked(ProviderErrorKind),
}

/// A stored connector: plaintext-safe metadata and the sealed tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ConnectorRecord {
    pub scopes: Vec<String>,
    pub expires_at: Option<Timestamp>,
    pub has_refresh_token: bool,
    pub health: StoredHealth,
    pub connected_at: Timestamp,
    pub connected_by: String,
    pub updated_at: Timestamp,
    pub updated_by: String,
    pub last_refreshed_at: Option<Timestamp>,
    /// `nonce ‖ AES-SIV(tokens)`, bound to (owner public id, provider, schema version).
    /// A later schema version must keep the version each ciphertext was sealed under.
    pub sealed: Vec<u8>,
}

impl Record for ConnectorRecord {
    const NAME: &'static str = "connector";
    const VERSION: u8 = 1;
}

/// A stored owner secret: allowed hosts and the sealed value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SecretRecord {
    /// Normalized host patterns (`api.example.com`, `*.example.com`, `host:8443`).
    pub allowed_hosts: Vec<String>,
    /// 1 when put, +1 at each rotation.
    pub version: u32,
    pub created_at: Timestamp,
    pub created_by: String,
    pub updated_at: Timestamp,
    pub updated_by: String,
    pub rotated_at: Option<Timestamp>,
    /// `nonce ‖ AES-SIV(value)`, bound to (owner public id, name, schema version, allowed
    /// hosts, version).
    pub sealed: Vec<u8>,
}

impl Record for SecretRecord {
    const NAME: &'static str = "owner secret";
    /// 2: the value is also bound to the allowed hosts and version (format 3). Schema 1 has
    /// the same layout; the migration to format 3 re-seals every schema-1 record.
    const VERSION: u8 = 2;

    fn upgrade(version: u8, _payload: &[u8]) -> Result<Self, CodecError> {
        Err(CodecError::Corrupt {
            record: Self::NAME,
            reason: format!(
                "schema {version} binds the value to owner and name only; the migration to \
                 file format 3 re-sealed every such secret that opened, so this one is \
                 corrupt or was written back since"
            ),
        })
    }
}

/// The tokens sealed in a connector row: `len(access) u32 LE ‖ access ‖ flag u8 ‖
/// [len(refresh) u32 LE ‖ refresh]`. Written into one exactly sized, zeroized buffer.
pub(crate) fn encode_tokens(access: &Secret, refresh: Option<&Secret>) -> Zeroizing<Vec<u8>> {
    let size = 4 + access.len() + 1 + refresh.map_or(0, |r| 4 + r.len());
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    push_str(&mut out, access.expose());
    match refresh {
        Some(r) => {
            out.push(1);
            push_str(&mut out, r.expose());
        }
        None => out.push(0),
    }
    out
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // Token lengths are validated far below 4 GiB before sealing.
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Decodes [`encode_tokens`]; `None` for any malformed input (never panics).
pub(crate) fn decode_tokens(bytes: &[u8]) -> Option<(Secret, Option<Secret>)> {
    let (access, rest) = take_str(bytes)?;
    let (&flag, rest) = rest.split_first()?;
    let (refresh, rest) = match flag {
        0 => (None, rest),
        1 => {
            let (r, rest) = take_str(rest)?;
            (Some(r), rest)
        }
        _ => return None,
    };
    rest.is_empty().then_some((access, refresh))
}

fn take_str(bytes: &[u8]) -> Option<(Secret, &[u8])> {
    let len_bytes: [u8; 4] = bytes.get(..4)?.try_into().ok()?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let body = bytes.get(4..4usize.checked_add(len)?)?;
    let text = std::str::from_utf8(body).ok()?;
    Some((Secret::new(text), &bytes[4 + len..]))
}

/// Decodes a sealed owner-secret value.
pub(crate) fn decode_value(bytes: &[u8]) -> Option<Secret> {
    std::str::from_utf8(bytes).ok().map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn records_round_trip(
            scopes in proptest::collection::vec("\\PC{1,20}", 0..4),
            hosts in proptest::collection::vec("[a-z.*:0-9]{1,20}", 0..4),
            n in any::<[u64; 4]>(), sealed in proptest::collection::vec(any::<u8>(), 0..80),
            flag in any::<bool>(), v in any::<u32>(),
        ) {
            let c = ConnectorRecord {
                scopes, expires_at: flag.then_some(Timestamp(n[0])), has_refresh_token: flag,
                health: if flag { StoredHealth::Healthy } else { StoredHealth::Revoked(ProviderErrorKind::Revoked) },
                connected_at: Timestamp(n[1]), connected_by: "a".into(),
                updated_at: Timestamp(n[2]), updated_by: "b".into(),
                last_refreshed_at: None, sealed: sealed.clone(),
            };
            prop_assert_eq!(decode::<ConnectorRecord>(&encode(&c)).unwrap(), c);
            let s = SecretRecord {
                allowed_hosts: hosts, version: v, created_at: Timestamp(n[3]), created_by: "a".into(),
                updated_at: Timestamp(n[0]), updated_by: "c".into(), rotated_at: Some(Timestamp(1)), sealed,
            };
            prop_assert_eq!(decode::<SecretRecord>(&encode(&s)).unwrap(), s);
        }

        #[test]
        fn tokens_round_trip(access in "\\PC{0,40}", refresh in proptest::option::of("\\PC{0,40}")) {
            let refresh = refresh.map(Secret::new);
            let bytes = encode_tokens(&Secret::new(access.clone()), refresh.as_ref());
            let (a, r) = decode_tokens(&bytes).unwrap();
            prop_assert_eq!(a.expose(), access.as_str());
            prop_assert_eq!(r, refresh);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_tokens(&bytes);
            let _ = decode_value(&bytes);
            let _ = decode::<ConnectorRecord>(&bytes);
            let _ = decode::<SecretRecord>(&bytes);
        }
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let good = encode_tokens(&Secret::new("abc"), None);
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert!(decode_tokens(&trailing).is_none());
        assert!(decode_tokens(&good[..good.len() - 1]).is_none());
        assert!(decode_tokens(&[255, 255, 255, 255]).is_none());
        let mut bad_flag = good.to_vec();
        *bad_flag.last_mut().unwrap() = 7;
        assert!(decode_tokens(&bad_flag).is_none());
    }
}
