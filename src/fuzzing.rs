//! Entry points for the fuzz targets in `fuzz/` and the corpus replay test. Not API: hidden
//! from the docs, no stability promise. Each function must never panic on any input; the
//! record decoder additionally checks that decode → encode → decode is stable, and
//! `allowed_hosts`, `request` and `ops` check the library against reference models.

pub mod backend;
pub mod hosts;
pub mod ops;
pub mod request;

pub use backend::{CrashBackend, CrashImage};
pub use hosts::allowed_hosts;
pub use ops::ops;
pub use request::request;

use crate::codec::{self, Record};
use crate::config::Config;
use crate::keyfmt::{KeyFormat, Presented};
use crate::public_id::{IdCipher, IdKind};
use crate::record::{
    AccountRecord, AuditEvent, CreditsRecord, KeyRecord, PoolRecord, RouteRule, UsageRecord,
    VerifyRecord,
};
use crate::secret::MasterKey;
use crate::vault::records::{ConnectorRecord, SecretRecord};

fn round_trip<R: Record + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(record) = codec::decode::<R>(data) {
        let encoded = codec::encode(&record);
        let again = codec::decode::<R>(&encoded).expect("re-decoding an encoded record");
        assert_eq!(
            record,
            again,
            "decode → encode → decode changed a {}",
            R::NAME
        );
    }
}

/// Decodes `data` as every record type, as it is and with a checksum of its bytes (what
/// opening a file from before format 7 seals its records with), so that random bytes reach
/// the payload decoder behind a checksum too.
pub fn decode_records(data: &[u8]) {
    for bytes in std::iter::once(data.to_vec()).chain(codec::seal_legacy(data)) {
        round_trip::<KeyRecord>(&bytes);
        round_trip::<VerifyRecord>(&bytes);
        round_trip::<AccountRecord>(&bytes);
        round_trip::<CreditsRecord>(&bytes);
        round_trip::<RouteRule>(&bytes);
        round_trip::<AuditEvent>(&bytes);
        round_trip::<PoolRecord>(&bytes);
        round_trip::<UsageRecord>(&bytes);
        round_trip::<ConnectorRecord>(&bytes);
        round_trip::<SecretRecord>(&bytes);
    }
}

fn fixed_master() -> MasterKey {
    MasterKey::from_bytes(&[7u8; 32]).expect("32 bytes")
}

/// Parses `data` as a presented key: header extraction, then the key format.
pub fn parse_key(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = Config::builder()
        .master_key(fixed_master())
        .legacy_prefix("sk_")
        .build()
        .expect("valid config");
    let format = KeyFormat::new(&config);
    let _ = format.parse(text);
    // Split at a char boundary: the input may hold multi-byte characters.
    let mut middle = text.len() / 2;
    while !text.is_char_boundary(middle) {
        middle -= 1;
    }
    let (auth, api_key) = text.split_at(middle);
    if let Ok(p) = Presented::from_headers(Some(auth), Some(api_key)) {
        let _ = format.parse(p.expose());
    }
}

/// Decodes `data` as a public id of every kind; a decoded id must re-encode to the input.
pub fn decode_public_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let ids = IdCipher::new(&fixed_master());
    for kind in [IdKind::Account, IdKind::Key, IdKind::Token] {
        if let Ok(id) = ids.decode(kind, text) {
            assert_eq!(
                ids.encode(kind, id).as_str(),
                text,
                "public ids are canonical"
            );
        }
    }
}

/// A record as written before format 7 (the checksum flag clear, no CRC): the form
/// [`decode_records`] decodes both as it is and sealed, so that the fuzzer's mutations reach the
/// payload decoder instead of stopping at a checksum.
fn unsealed(sealed: &[u8]) -> Vec<u8> {
    let mut out = sealed[..sealed.len() - 4].to_vec();
    out[0] &= !codec::CHECKED;
    out
}

/// Seed inputs for each target: valid encodings the fuzzer mutates from.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    use crate::clock::Timestamp;
    use crate::hashing::HashScheme;
    use crate::keyfmt::KeyClass;
    use crate::record::{KeyKind, Limits, RateLimit, Refill, RefillInterval, SubscriptionStatus};
    use crate::vault::ProviderErrorKind;
    use crate::vault::records::StoredHealth;
    match target {
        "decode_records" => {
            let key = KeyRecord {
                kind: KeyKind::Token {
                    token_type: "service".into(),
                },
                class: KeyClass::Token,
                owner: 3,
                name: "CI deploy key".into(),
                key_prefix: "vb_tok_AbCde".into(),
                key_suffix: "wxyz".into(),
                key_hash: [9; 32],
                scheme: HashScheme::HmacSha256 { pepper: 1 },
                permissions: vec!["quickhits:*".into()],
                ips: vec!["10.0.0.0/8".parse().expect("cidr")],
                limits: Limits {
                    credits: Some(1000),
                    rate_limits: vec![RateLimit {
                        name: "rps".into(),
                        limit: 10,
                        window_secs: 1,
                    }],
                    ..Limits::default()
                },
                metadata: [("team".to_owned(), "infra".to_owned())].into(),
                created_at: Timestamp(1),
                created_by: "alice".into(),
                updated_at: Timestamp(2),
                updated_by: "bob".into(),
                expires_at: Some(Timestamp(3)),
                disabled_at: None,
                last_used_at: None,
                rolled: None,
                pool: None,
            };
            let account = AccountRecord {
                name: "Acme".into(),
                status: SubscriptionStatus::Trialing,
                entitlements: ["pro".to_owned()].into(),
                created_at: Timestamp(1),
                created_by: "system".into(),
                updated_at: Timestamp(1),
                updated_by: "system".into(),
            };
            let rule = RouteRule::new("/api/v1/")
                .permission("quickhits:create")
                .price_micros(250);
            let verify = VerifyRecord::entries(1, &key)
                .next()
                .expect("the current secret's");
            let event = AuditEvent {
                seq: 1,
                at: Timestamp(1),
                actor: "alice".into(),
                action: "key.updated".into(),
                target: "key_AbCd".into(),
                fields: vec!["name".into(), "permissions".into()],
            };
            [
                codec::encode(&key),
                codec::encode(&account),
                codec::encode(&CreditsRecord {
                    balance: 5,
                    granted: 5,
                    ..Default::default()
                }),
                codec::encode(&rule),
                codec::encode(&verify.1),
                codec::encode(&event),
                codec::encode(&PoolRecord {
                    owner: 3,
                    name: "shared".into(),
                    refill: Some(Refill {
                        amount: 1000,
                        interval: RefillInterval::Monthly,
                    }),
                    low_balance_threshold: Some(10),
                    created_at: Timestamp(1),
                    created_by: "alice".into(),
                }),
                codec::encode(&UsageRecord {
                    last_used_at: Some(Timestamp(4)),
                    spent: 7,
                    requests: 3,
                }),
                codec::encode(&ConnectorRecord {
                    scopes: vec!["drive.readonly".into()],
                    expires_at: Some(Timestamp(5)),
                    has_refresh_token: true,
                    health: StoredHealth::RefreshFailed(ProviderErrorKind::RateLimited),
                    connected_at: Timestamp(1),
                    connected_by: "alice".into(),
                    updated_at: Timestamp(2),
                    updated_by: "refresher".into(),
                    last_refreshed_at: Some(Timestamp(2)),
                    sealed: vec![0xa5; 40],
                }),
                codec::encode(&SecretRecord {
                    allowed_hosts: vec!["*.example.com".into(), "api.example.com:8443".into()],
                    version: 2,
                    created_at: Timestamp(1),
                    created_by: "alice".into(),
                    updated_at: Timestamp(3),
                    updated_by: "bob".into(),
                    rotated_at: Some(Timestamp(3)),
                    sealed: vec![0x5a; 48],
                }),
            ]
            .iter()
            .map(|sealed| unsealed(sealed))
            .collect()
        }
        "parse_key" => {
            // A fixed key (the seed file written first), so that regenerating the seeds
            // leaves the committed files as they are.
            let live = "vb_live_xAbGlWRk0srAOuySTeKnb5iWQfWrMShJ0pNI02";
            vec![
                live.as_bytes().to_vec(),
                format!("Bearer {live}{live}").into_bytes(),
                b"sk_0123456789abcdefghij".to_vec(),
            ]
        }
        "decode_public_id" => {
            let ids = IdCipher::new(&fixed_master());
            vec![
                ids.encode(IdKind::Key, 1).as_str().as_bytes().to_vec(),
                b"acct_".to_vec(),
            ]
        }
        "ops" => (0..8).map(ops::workload).collect(),
        "allowed_hosts" => hosts::seeds(),
        "request" => request::seeds(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `decode_records` seed is a record that decodes, as it is (a record written before
    /// format 7) and sealed, so that the fuzzer starts from every record type's payload.
    #[test]
    fn every_record_seed_decodes_as_written_and_sealed() {
        fn decodes(bytes: &[u8]) -> usize {
            fn ok<R: Record>(bytes: &[u8]) -> usize {
                usize::from(codec::decode::<R>(bytes).is_ok())
            }
            ok::<KeyRecord>(bytes)
                + ok::<VerifyRecord>(bytes)
                + ok::<AccountRecord>(bytes)
                + ok::<CreditsRecord>(bytes)
                + ok::<RouteRule>(bytes)
                + ok::<AuditEvent>(bytes)
                + ok::<PoolRecord>(bytes)
                + ok::<UsageRecord>(bytes)
                + ok::<ConnectorRecord>(bytes)
                + ok::<SecretRecord>(bytes)
        }
        let seeds = seeds("decode_records");
        assert_eq!(seeds.len(), 10, "one seed per record type");
        for seed in seeds {
            assert!(decodes(&seed) >= 1, "{seed:?} decodes as no record");
            let sealed = codec::seal_legacy(&seed).expect("written unsealed");
            assert!(decodes(&sealed) >= 1, "{sealed:?} decodes as no record");
        }
    }

    /// The `parse_key` seeds start from a valid key, fixed so that regenerating the seed
    /// files leaves them unchanged.
    #[test]
    fn the_parse_key_seed_is_a_valid_fixed_key() {
        let config = Config::builder().master_key(fixed_master()).build();
        let format = KeyFormat::new(&config.expect("config"));
        let first = seeds("parse_key").remove(0);
        let text = std::str::from_utf8(&first).expect("text");
        assert_eq!(format.parse(text), Ok(crate::keyfmt::KeyClass::Live));
        assert_eq!(seeds("parse_key"), seeds("parse_key"));
    }
}
