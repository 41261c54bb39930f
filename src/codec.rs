//! The versioned record codec: one schema-version byte, the record in postcard, then a
//! CRC-32 of both.
//!
//! `decode` is the first thing the fuzzers attack: any byte string gives `Ok` or a
//! [`CodecError`], never a panic, and `decode(encode(x)) == x` for every record. A record type
//! bumps its `VERSION` when its layout changes and keeps decoding older versions in
//! [`Record::upgrade`], so files written by earlier releases stay readable.
//!
//! **The checksum** (format 7). Damage that still decodes — a flipped bit in a balance, an
//! expiry, a permission — would otherwise be served as written, and redb recomputes its own
//! page checksums whenever a page is rewritten, so a later `check` would not see it either.
//! Each record therefore carries its own: the version byte has [`CHECKED`] set and the last
//! four bytes are the little-endian CRC-32 of everything before them. A record written before
//! format 7 has no checksum (the flag clear) and decodes as before; opening such a file seals
//! every record ([`seal_legacy`]). A flag cleared by damage leaves the four checksum bytes as
//! trailing bytes, which decoding refuses too.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::CodecError;

/// Set in the version byte of a record that ends with its CRC-32.
pub(crate) const CHECKED: u8 = 0x80;
/// Bytes of the checksum trailer.
const CRC_LEN: usize = 4;

/// A record stored in a redb table.
pub(crate) trait Record: Serialize + DeserializeOwned {
    /// Name used in error messages.
    const NAME: &'static str;
    /// The schema version this build writes (below [`CHECKED`]).
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

/// Encodes a record with its schema-version byte and checksum.
pub(crate) fn encode<R: Record>(record: &R) -> Vec<u8> {
    let mut out = vec![R::VERSION | CHECKED];
    // Serializing plain data structs into a Vec cannot fail.
    postcard::to_io(record, &mut out).expect("postcard encoding into a Vec");
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a record, rejecting a failed checksum, unknown versions, corrupt payloads and
/// trailing bytes.
pub(crate) fn decode<R: Record>(bytes: &[u8]) -> Result<R, CodecError> {
    let (version, payload) = unsealed::<R>(bytes)?;
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

/// The schema version and payload of a stored record, its checksum (if it has one) checked
/// and taken off.
pub(crate) fn unsealed<R: Record>(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    let (&first, rest) = bytes.split_first().ok_or(CodecError::Empty)?;
    if first & CHECKED == 0 {
        return Ok((first, rest));
    }
    let failed = CodecError::Checksum { record: R::NAME };
    // The body holds at least the version byte.
    let Some(split) = bytes.len().checked_sub(CRC_LEN).filter(|&n| n > 0) else {
        return Err(failed);
    };
    let (body, crc) = bytes.split_at(split);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(failed);
    }
    Ok((first & !CHECKED, &body[1..]))
}

/// The bytes of a record written before format 7, sealed with the checksum [`encode`] gives
/// (the flag set, the CRC appended) without decoding them: a record that does not decode
/// stays as undecodable as it was, for `check` to name. `None`: already sealed (or empty).
pub(crate) fn seal_legacy(bytes: &[u8]) -> Option<Vec<u8>> {
    let (&first, rest) = bytes.split_first()?;
    if first & CHECKED != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() + CRC_LEN);
    out.push(first | CHECKED);
    out.extend_from_slice(rest);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{CreditsRecord, RouteRule};

    fn balance() -> CreditsRecord {
        CreditsRecord {
            granted: 10_000,
            balance: 9_000,
            spent: 1_000,
            ..CreditsRecord::default()
        }
    }

    /// A bit flipped anywhere in a stored balance — its figures, its version byte, the
    /// checksum flag, the checksum itself — is refused with a typed error: the damage that
    /// still decodes (9,000 left becoming 9,001) is what the checksum is for.
    #[test]
    fn a_flipped_bit_anywhere_in_a_record_is_refused() {
        let bytes = encode(&balance());
        assert_eq!(decode::<CreditsRecord>(&bytes), Ok(balance()));
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let got = decode::<CreditsRecord>(&damaged);
            assert!(
                matches!(
                    got,
                    Err(CodecError::Checksum { .. } | CodecError::Corrupt { .. })
                ),
                "bit {bit}: {got:?}"
            );
        }
        // Without the checksum, one of those flips decodes as another balance.
        let mut legacy = bytes[..bytes.len() - CRC_LEN].to_vec();
        legacy[0] &= !CHECKED;
        legacy[1] ^= 1; // the balance's first byte
        let misread = CreditsRecord {
            balance: 9_001,
            ..balance()
        };
        assert_eq!(decode::<CreditsRecord>(&legacy), Ok(misread));
    }

    #[test]
    fn a_truncated_record_is_refused() {
        let bytes = encode(&RouteRule::new("/api/v1/").cost(3));
        for len in 0..bytes.len() {
            assert!(decode::<RouteRule>(&bytes[..len]).is_err(), "{len} bytes");
        }
    }

    /// A record written before format 7 decodes as it did; sealing it (what opening an older
    /// file does) gives the bytes `encode` writes, and sealing twice changes nothing. A
    /// record that did not decode is sealed as it is and still does not.
    #[test]
    fn records_from_before_checksums_decode_and_seal_to_what_encode_writes() {
        let sealed = encode(&balance());
        let mut legacy = sealed[..sealed.len() - CRC_LEN].to_vec();
        legacy[0] &= !CHECKED;
        assert_eq!(decode::<CreditsRecord>(&legacy), Ok(balance()));
        assert_eq!(seal_legacy(&legacy), Some(sealed.clone()));
        assert_eq!(seal_legacy(&sealed), None);
        assert_eq!(seal_legacy(&[]), None);
        let undecodable = [CreditsRecord::VERSION, 0xff, 0xff];
        let resealed = seal_legacy(&undecodable).unwrap();
        assert!(matches!(
            decode::<CreditsRecord>(&resealed),
            Err(CodecError::Corrupt { .. })
        ));
    }
}
