//! The versioned record codec: one schema-version byte, then the record in postcard.
//!
//! `decode` is the first thing the fuzzers attack: any byte string gives `Ok` or a
//! [`CodecError`], never a panic, and `decode(encode(x)) == x` for every record. A record type
//! bumps its `VERSION` when its layout changes and keeps decoding older versions in
//! [`Record::upgrade`], so files written by earlier releases stay readable.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

/// A record stored in a redb table.
pub(crate) trait Record: Serialize + DeserializeOwned {
    /// Name used in error messages.
    const NAME: &'static str;
    /// The schema version this build writes.
    const VERSION: u8;

    /// Decodes a payload written with an older schema `version`. The default knows none.
    fn upgrade(version: u8, payload: &[u8]) -> Result<Self, CodecError> {
        let _ = payload;
        Err(CodecError::UnknownVersion {
            record: Self::NAME,
            found: version,
            supported: Self::VERSION,
        })
    }
}

/// Encodes a record with its schema-version byte.
pub(crate) fn encode<R: Record>(record: &R) -> Vec<u8> {
    let mut out = vec![R::VERSION];
    // Serializing plain data structs into a Vec cannot fail.
    postcard::to_io(record, &mut out).expect("postcard encoding into a Vec");
    out
}

/// Decodes a record, rejecting unknown versions, corrupt payloads and trailing bytes.
pub(crate) fn decode<R: Record>(bytes: &[u8]) -> Result<R, CodecError> {
    let (&version, payload) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version == R::VERSION {
        decode_payload(payload)
    } else if version == 0 || version > R::VERSION {
        Err(CodecError::UnknownVersion {
            record: R::NAME,
            found: version,
            supported: R::VERSION,
        })
    } else {
        R::upgrade(version, payload)
    }
}

/// Decodes a postcard payload that must be consumed exactly.
pub(crate) fn decode_payload<T: DeserializeOwned + Record>(
    payload: &[u8],
) -> Result<T, CodecError> {
    let corrupt = |reason: String| CodecError::Corrupt {
        record: T::NAME,
        reason,
    };
    let (value, rest) = postcard::take_from_bytes(payload).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}
