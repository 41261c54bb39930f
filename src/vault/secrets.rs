//! Owner secrets: named values (third-party API keys) attached to outbound requests only for
//! their allowed hosts.

use redb::{ReadableTable, WriteTransaction};

use crate::audit;
use crate::codec::{self, Record};
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::public_id::{IdCipher, IdKind, PublicId};
use crate::secret::{MasterKey, Secret};
use crate::store::tables::ACCOUNTS;
use crate::vault::cipher::{self, Binding, VaultCipher};
use crate::vault::hosts;
use crate::vault::outbound::{
    OutboundHeader, OutboundUrl, SecretInfo, validate_header_name, validate_name, validate_param,
    validate_value,
};
use crate::vault::records::{self, SecretRecord};
use crate::vault::tables::OWNER_SECRETS;
use crate::vault::{Owner, open_read, owner, owner_read, owner_rows, stored_row, target};

/// What removes or replaces a secret row that does not decode, for the error that names it.
const REMEDY: &str = "`secrets().delete` removes it, `secrets().put` replaces it";

/// Owner-secret operations. Get one with [`Ledger::secrets`].
pub struct Secrets<'a> {
    pub(crate) ledger: &'a Ledger,
    pub(crate) actor: String,
}

/// The record fields a secret's value is sealed with (schema 2): its allowed hosts, each
/// length-prefixed, and its version. Changed beside the ciphertext — the hosts widened, the
/// version wound back — they make it fail to open.
struct BoundFields {
    hosts: Vec<u8>,
    version: [u8; 4],
}

impl BoundFields {
    fn of(allowed_hosts: &[String], version: u32) -> Self {
        let mut hosts = Vec::new();
        for host in allowed_hosts {
            // Normalized hosts are at most 253 characters and a port.
            hosts.extend_from_slice(&(host.len() as u16).to_le_bytes());
            hosts.extend_from_slice(host.as_bytes());
        }
        BoundFields {
            hosts,
            version: version.to_le_bytes(),
        }
    }

    fn as_headers(&self) -> [&[u8]; 2] {
        [&self.hosts, &self.version]
    }
}

/// Seals `value` for secret `name` of `owner`, with the allowed hosts and version of the
/// record it is stored in.
fn seal_value(
    cipher: &VaultCipher,
    owner: &PublicId,
    name: &str,
    allowed_hosts: &[String],
    version: u32,
    value: &Secret,
) -> Result<Vec<u8>> {
    let fields = BoundFields::of(allowed_hosts, version);
    let headers = fields.as_headers();
    cipher.seal(
        binding(owner, name, SecretRecord::VERSION, &headers),
        value.expose().as_bytes(),
    )
}

fn binding<'b>(
    owner: &'b PublicId,
    name: &'b str,
    version: u8,
    fields: &'b [&'b [u8]],
) -> Binding<'b> {
    Binding {
        kind: cipher::SECRET,
        owner,
        name,
        version,
        fields,
    }
}

fn open_value(
    master: &MasterKey,
    owner: &PublicId,
    name: &str,
    record: &SecretRecord,
) -> Result<Secret> {
    let fields = BoundFields::of(&record.allowed_hosts, record.version);
    let headers = fields.as_headers();
    let plain = VaultCipher::new(master).open(
        binding(owner, name, SecretRecord::VERSION, &headers),
        &record.sealed,
    )?;
    decode_value(&plain)
}

/// The stored row `bytes` of secret `name`, if it can be read: it decodes, and its value
/// opens under the owner, name, hosts and version it is stored with. `None`: damaged,
/// written by a newer schema, or moved or edited beside its ciphertext.
fn readable(
    master: &MasterKey,
    owner: &PublicId,
    name: &str,
    bytes: &[u8],
) -> Option<SecretRecord> {
    let opens = |r: &SecretRecord| open_value(master, owner, name, r).is_ok();
    codec::decode(bytes).ok().filter(opens)
}

fn decode_value(plain: &[u8]) -> Result<Secret> {
    records::decode_value(plain).ok_or(Error::DecryptionFailed {
        what: "owner secret",
    })
}

/// Format 2 → 3: re-seals every owner secret (schema 1, its value bound to owner and name
/// only) with its allowed hosts and version bound too (schema 2), inside the migration's
/// transaction. A schema-1 secret that does not open is
/// left as it is, for `check` to report: re-sealing it is impossible and deleting it would
/// lose it.
pub(crate) fn reseal_for_format_3(
    txn: &WriteTransaction,
    master: &crate::secret::MasterKey,
) -> Result<()> {
    let cipher = VaultCipher::new(master);
    let ids = IdCipher::new(master);
    let mut table = txn.open_table(OWNER_SECRETS)?;
    let mut resealed = Vec::new();
    for entry in table.iter()? {
        let (key, bytes) = entry?;
        let (owner, name) = key.value();
        let Some((1, payload)) = bytes.value().split_first().map(|(v, p)| (*v, p)) else {
            continue;
        };
        let Ok(record) = codec::decode_payload::<SecretRecord>(payload) else {
            continue;
        };
        let public = ids.encode(IdKind::Account, owner);
        let Ok(plain) = cipher.open(binding(&public, name, 1, &[]), &record.sealed) else {
            continue;
        };
        let value = decode_value(&plain)?;
        let sealed = seal_value(
            &cipher,
            &public,
            name,
            &record.allowed_hosts,
            record.version,
            &value,
        )?;
        let record = SecretRecord { sealed, ..record };
        resealed.push((owner, name.to_owned(), codec::encode(&record)));
    }
    for (owner, name, bytes) in &resealed {
        table.insert((*owner, name.as_str()), bytes.as_slice())?;
    }
    Ok(())
}

/// Whether an owner secret is sealed at schema 2, which only format 3 and later write: a
/// row that opens under schema 2's binding, which takes the master key to make (`ids` seal
/// the owners' ids as the file does). A row damaged into another version opens under none
/// and is left for `check`, as the re-seal leaves it.
pub(crate) fn any_sealed_at_schema_2(
    read: &redb::ReadTransaction,
    master: &MasterKey,
    ids: &IdCipher,
) -> Result<bool> {
    let table = match read.open_table(OWNER_SECRETS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    for entry in table.iter()? {
        let (key, bytes) = entry?;
        let (owner, name) = key.value();
        let owner = ids.encode(IdKind::Account, owner);
        if codec::unsealed::<SecretRecord>(bytes.value()).is_ok_and(|(version, _)| version == 2)
            && check_row(master, &owner, name, bytes.value()).is_ok()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Decodes and decrypts one stored row, for `check`.
pub(crate) fn check_row(
    master: &MasterKey,
    owner: &PublicId,
    name: &str,
    bytes: &[u8],
) -> Result<()> {
    let record: SecretRecord = codec::decode(bytes)?;
    validate_name(name)?;
    open_value(master, owner, name, &record).map(drop)
}

fn owner_write(ledger: &Ledger, txn: &WriteTransaction, text: &str) -> Result<Owner> {
    owner(ledger, &txn.open_table(ACCOUNTS)?, text)
}

impl<'a> Secrets<'a> {
    /// The same handle, recording `actor` as the author of its changes: 1–254 characters,
    /// no control characters and no API key (a change by an actor that breaks these is
    /// refused as [`Error::InvalidInput`](crate::Error::InvalidInput) on `actor`).
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    /// A name a change may write: [`validate_name`]'s rules, and no API key in it, since the
    /// name is listed and kept in the audit trail (found by a reviewer: a key fits the name's
    /// characters). `delete` does not ask it, so a name stored before can still be removed.
    fn new_name(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        self.ledger.holding_no_key("name", [name])
    }

    fn view(owner: &Owner, name: &str, r: &SecretRecord) -> SecretInfo {
        SecretInfo {
            owner: owner.public,
            name: name.to_owned(),
            allowed_hosts: r.allowed_hosts.clone(),
            version: r.version,
            created_at: r.created_at,
            created_by: r.created_by.clone(),
            updated_at: r.updated_at,
            updated_by: r.updated_by.clone(),
            rotated_at: r.rotated_at,
        }
    }

    /// Stores secret `name` of `owner`, to be sent only to `allowed_hosts` (see the host
    /// rules on [`Secrets::bearer`]); replaces the value and hosts of an existing one.
    ///
    /// The value must be 1–8 KiB without control characters; 1–32 host patterns are needed.
    ///
    /// A replacement keeps the secret's creation time and author and counts its version up.
    /// Over a row that cannot be read — it does not decode (damaged, or written by a newer
    /// schema: `list`, `info` and `rotate` fail on it), or its value does not open (moved or
    /// edited beside its ciphertext: attaching it fails); [`Ledger::check`] names either —
    /// the put succeeds all the same, since it replaces everything the row held, but none
    /// of the old row is kept: the secret starts again as if new — version 1, created now
    /// by this actor, never rotated — and its audit event, `secret.replaced`, names the
    /// field `unreadable` as well as `value` and `allowed_hosts`, to tell it from an
    /// ordinary replacement. (The secret's earlier events are still in the audit trail.)
    pub fn put<I, S>(
        &self,
        owner: &str,
        name: &str,
        value: Secret,
        allowed_hosts: I,
    ) -> Result<SecretInfo>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.ledger.guarded(|| {
            self.new_name(name)?;
            validate_value(&value)?;
            // Checked as given: a host pattern is listed, and once lowercased an API key in
            // it would no longer be recognised, yet still be all but given away.
            let allowed_hosts: Vec<S> = allowed_hosts.into_iter().collect();
            let given = allowed_hosts.iter().map(AsRef::as_ref);
            self.ledger.holding_no_key("allowed_hosts", given)?;
            let allowed_hosts = hosts::normalize(allowed_hosts)?;
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            let owner = owner_write(self.ledger, &txn, owner)?;
            let record = {
                let mut table = txn.open_table(OWNER_SECRETS)?;
                // A row that cannot be read is replaced as if none were there (see above).
                let master = &self.ledger.inner.config.master_key;
                let (previous, unreadable) = match table.get((owner.id, name))? {
                    Some(v) => match readable(master, &owner.public, name, v.value()) {
                        Some(record) => (Some(record), false),
                        None => (None, true),
                    },
                    None => (None, false),
                };
                let version = previous.as_ref().map_or(1, |p| p.version.saturating_add(1));
                let sealed = seal_value(
                    &VaultCipher::new(&self.ledger.inner.config.master_key),
                    &owner.public,
                    name,
                    &allowed_hosts,
                    version,
                    &value,
                )?;
                let record = SecretRecord {
                    allowed_hosts,
                    version,
                    created_at: previous.as_ref().map_or(now, |p| p.created_at),
                    created_by: previous
                        .as_ref()
                        .map_or_else(|| self.actor.clone(), |p| p.created_by.clone()),
                    updated_at: now,
                    updated_by: self.actor.clone(),
                    rotated_at: previous.as_ref().and(Some(now)),
                    sealed,
                };
                table.insert((owner.id, name), codec::encode(&record).as_slice())?;
                // A replacement always rewrites the value (sealed anew, a version up); its hosts
                // are named only if they changed.
                let (action, fields): (_, &[&str]) = match &previous {
                    None if unreadable => {
                        ("secret.replaced", &["value", "allowed_hosts", "unreadable"])
                    }
                    None => ("secret.created", &["value", "allowed_hosts"]),
                    Some(p) if p.allowed_hosts != record.allowed_hosts => {
                        ("secret.replaced", &["value", "allowed_hosts"])
                    }
                    Some(_) => ("secret.replaced", &["value"]),
                };
                let target = target(&owner.public, "secrets", name);
                audit::append(&txn, self.ledger, now, &self.actor, action, &target, fields)?;
                record
            };
            txn.commit_change()?;
            Ok(Self::view(&owner, name, &record))
        })
    }

    /// Replaces the value of an existing secret, keeping its allowed hosts.
    ///
    /// A row that does not decode fails with
    /// [`Error::Codec`]`(`[`CodecError::Row`](crate::CodecError::Row)`)`, which names it:
    /// the hosts to keep are unknown. [`put`](Self::put), which takes them anew, replaces it.
    pub fn rotate(&self, owner: &str, name: &str, value: Secret) -> Result<SecretInfo> {
        self.ledger.guarded(|| {
            self.new_name(name)?;
            validate_value(&value)?;
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            let owner = owner_write(self.ledger, &txn, owner)?;
            let record = {
                let mut table = txn.open_table(OWNER_SECRETS)?;
                let mut record: SecretRecord = match table.get((owner.id, name))? {
                    Some(v) => stored_row(&owner.public, "secrets", name, v.value(), REMEDY)?,
                    None => return Err(Error::NotFound { what: "secret" }),
                };
                // The new value keeps the record's hosts and follows its version, so both
                // must be those sealed with the old value: a row changed beside its
                // ciphertext (its hosts widened by someone who can write the file) is
                // refused, not laundered into a value that opens (found by a reviewer).
                let master = &self.ledger.inner.config.master_key;
                drop(open_value(master, &owner.public, name, &record)?);
                record.version = record.version.saturating_add(1);
                record.sealed = seal_value(
                    &VaultCipher::new(&self.ledger.inner.config.master_key),
                    &owner.public,
                    name,
                    &record.allowed_hosts,
                    record.version,
                    &value,
                )?;
                record.updated_at = now;
                record.updated_by = self.actor.clone();
                record.rotated_at = Some(now);
                table.insert((owner.id, name), codec::encode(&record).as_slice())?;
                let target = target(&owner.public, "secrets", name);
                audit::append(
                    &txn,
                    self.ledger,
                    now,
                    &self.actor,
                    "secret.rotated",
                    &target,
                    &["value"],
                )?;
                record
            };
            txn.commit_change()?;
            Ok(Self::view(&owner, name, &record))
        })
    }

    /// Deletes a secret. `NotFound` if there is none. A row that cannot be read (it does not
    /// decode, or its value does not open: see [`put`](Self::put)) is deleted all the same,
    /// and its audit event names the field `unreadable`, to tell it from an ordinary
    /// deletion.
    pub fn delete(&self, owner: &str, name: &str) -> Result<()> {
        self.ledger.guarded(|| {
            validate_name(name)?;
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            let owner = owner_write(self.ledger, &txn, owner)?;
            let unreadable = {
                let mut table = txn.open_table(OWNER_SECRETS)?;
                let master = &self.ledger.inner.config.master_key;
                match table.remove((owner.id, name))? {
                    // Read only to say so: the removal never depends on it.
                    Some(v) => readable(master, &owner.public, name, v.value()).is_none(),
                    None => return Err(Error::NotFound { what: "secret" }),
                }
            };
            let fields: &[&str] = if unreadable { &["unreadable"] } else { &[] };
            let target = target(&owner.public, "secrets", name);
            audit::append(
                &txn,
                self.ledger,
                now,
                &self.actor,
                "secret.deleted",
                &target,
                fields,
            )?;
            txn.commit_change()?;
            Ok(())
        })
    }

    /// One secret's metadata (never its value). `NotFound` if there is none; a row that does
    /// not decode fails with [`Error::Codec`]`(`[`CodecError::Row`](crate::CodecError::Row)`)`,
    /// which names it (as does every call that attaches the secret).
    pub fn info(&self, owner: &str, name: &str) -> Result<SecretInfo> {
        self.ledger.guarded(|| {
            validate_name(name)?;
            let read = self.ledger.inner.store.begin_read()?;
            let owner = owner_read(self.ledger, &read, owner)?;
            let record = self.load(&read, &owner, name)?;
            Ok(Self::view(&owner, name, &record))
        })
    }

    /// The owner's secrets: names, hosts and dates, never values; in name order.
    ///
    /// A row that does not decode (damaged, or written by a newer schema) fails the list
    /// with [`Error::Codec`]`(`[`CodecError::Row`](crate::CodecError::Row)`)`, which names
    /// the row (`acct_…/secrets/NAME`, as [`Ledger::check`] does) and never holds its bytes:
    /// the list is not given without it, which would hide the damage.
    /// [`delete`](Self::delete) removes such a row and [`put`](Self::put) replaces it.
    pub fn list(&self, owner: &str) -> Result<Vec<SecretInfo>> {
        self.ledger.guarded(|| {
            let read = self.ledger.inner.store.begin_read()?;
            let owner = owner_read(self.ledger, &read, owner)?;
            let Some(table) = open_read(&read, OWNER_SECRETS)? else {
                return Ok(Vec::new());
            };
            owner_rows(&table, owner.id)?
                .into_iter()
                .map(|(name, bytes)| {
                    let record = stored_row(&owner.public, "secrets", &name, &bytes, REMEDY)?;
                    Ok(Self::view(&owner, &name, &record))
                })
                .collect()
        })
    }

    fn load(
        &self,
        read: &redb::ReadTransaction,
        owner: &Owner,
        name: &str,
    ) -> Result<SecretRecord> {
        let table = open_read(read, OWNER_SECRETS)?.ok_or(Error::NotFound { what: "secret" })?;
        match table.get((owner.id, name))? {
            Some(v) => stored_row(&owner.public, "secrets", name, v.value(), REMEDY),
            None => Err(Error::NotFound { what: "secret" }),
        }
    }

    /// Checks `url` against the secret's allowed hosts and returns the decrypted value with
    /// the parsed url.
    fn attach(&self, owner: &str, name: &str, url: &str) -> Result<(Secret, url::Url)> {
        validate_name(name)?;
        let read = self.ledger.inner.store.begin_read()?;
        let owner = owner_read(self.ledger, &read, owner)?;
        let record = self.load(&read, &owner, name)?;
        let url = hosts::check_url(name, &record.allowed_hosts, url)?;
        let value = open_value(
            &self.ledger.inner.config.master_key,
            &owner.public,
            name,
            &record,
        )?;
        Ok((value, url))
    }

    /// `Authorization: Bearer <secret>` for a request to `url`.
    ///
    /// The secret is attached only if `url` is `https` (`http` only for `localhost` and
    /// loopback addresses), carries no user info, and its host and port match one of the
    /// secret's allowed hosts: exactly, or as a subdomain of a `*.domain` pattern (which does
    /// not match `domain` itself). Hosts compare in normal form (lowercase, IDN as punycode);
    /// a pattern without a port matches the scheme's default port only. Otherwise the call
    /// fails with [`Error::Refused`], naming the secret and the host, never the value.
    ///
    /// A `*.domain` pattern trusts everyone who can name a host under `domain`: over a
    /// shared or public suffix (`*.vercel.app`, `*.github.io`, `*.co.uk`) that is every site
    /// there, not only yours. Name your own hosts under such suffixes one by one.
    ///
    /// Send the request to the header's [`url`](OutboundHeader::url), the one checked, and
    /// with redirects turned off: the check saw only that url, and many HTTP clients carry a
    /// header (all but `Authorization`, in most) on to whatever host a redirect names.
    pub fn bearer(&self, owner: &str, name: &str, url: &str) -> Result<OutboundHeader> {
        self.ledger.guarded(|| {
            let (value, url) = self.attach(owner, name, url)?;
            let mut header = String::with_capacity(7 + value.len());
            header.push_str("Bearer ");
            header.push_str(value.expose());
            Ok(OutboundHeader {
                name: "Authorization".into(),
                value: Secret::new(header),
                url: url.into(),
            })
        })
    }

    /// `<header_name>: <secret>` for a request to `url`, under the rules of
    /// [`bearer`](Self::bearer).
    pub fn header(
        &self,
        owner: &str,
        name: &str,
        header_name: &str,
        url: &str,
    ) -> Result<OutboundHeader> {
        self.ledger.guarded(|| {
            validate_header_name(header_name)?;
            let (value, url) = self.attach(owner, name, url)?;
            Ok(OutboundHeader {
                name: header_name.to_owned(),
                value,
                url: url.into(),
            })
        })
    }

    /// `url` with the secret appended as query parameter `param`, under the rules of
    /// [`bearer`](Self::bearer). The url must not already have a `param` parameter.
    pub fn query(&self, owner: &str, name: &str, param: &str, url: &str) -> Result<OutboundUrl> {
        self.ledger.guarded(|| {
            validate_param(param)?;
            let (value, url) = self.attach(owner, name, url)?;
            if url.query_pairs().any(|(k, _)| k == param) {
                return Err(Error::invalid(
                    "param",
                    format!("the url already has a `{param}` parameter"),
                ));
            }
            let mut redacted = url.clone();
            redacted.query_pairs_mut().append_pair(param, "***");
            Ok(OutboundUrl {
                url: Secret::new(with_query_pair(url, param, value.expose())),
                redacted: redacted.into(),
            })
        })
    }
}

/// `url` with `name=value` appended to its query, form-encoded as `append_pair` does, built
/// in one allocation of the final size: growing a buffer that holds the secret would leave
/// copies of it behind in freed memory, where zeroizing the result cannot reach them.
fn with_query_pair(mut url: url::Url, name: &str, value: &str) -> String {
    use url::form_urlencoded::byte_serialize;
    let fragment = url.fragment().map(str::to_owned);
    url.set_fragment(None);
    let separator = match url.query() {
        None => "?",
        Some("") => "",
        Some(_) => "&",
    };
    let base = String::from(url);
    let encoded_len = |s: &str| byte_serialize(s.as_bytes()).map(str::len).sum::<usize>();
    let len = base.len()
        + separator.len()
        + encoded_len(name)
        + 1
        + encoded_len(value)
        + fragment.as_ref().map_or(0, |f| f.len() + 1);
    let mut out = String::with_capacity(len);
    out.push_str(&base);
    out.push_str(separator);
    out.extend(byte_serialize(name.as_bytes()));
    out.push('=');
    out.extend(byte_serialize(value.as_bytes()));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(&fragment);
    }
    debug_assert_eq!(out.len(), len, "sized exactly: no reallocation");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_pair_is_appended_exactly_as_append_pair_does() {
        let values = ["plain", "a b&c=d#e?f", "ünïcødé/+%", ""];
        let urls = [
            "https://api.example.com/",
            "https://api.example.com/v1?x=1",
            "https://api.example.com/v1?",
            "https://api.example.com/v1?x=1&y=#frag",
            "https://api.example.com/v1#frag?not-a-query",
        ];
        for url in urls {
            for value in values {
                let parsed = url::Url::parse(url).unwrap();
                let mut expected = parsed.clone();
                expected.query_pairs_mut().append_pair("key", value);
                assert_eq!(
                    with_query_pair(parsed, "key", value),
                    String::from(expected),
                    "{url} + {value}"
                );
            }
        }
    }
}
