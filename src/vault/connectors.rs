//! Connector credentials: one OAuth grant per (owner, provider).

use std::time::Duration;

use redb::{ReadableTable, WriteTransaction};

use crate::audit;
use crate::clock::Timestamp;
use crate::codec::{self, Record};
use crate::error::{Error, Result};
use crate::ledger::Ledger;
use crate::public_id::{IdKind, PublicId};
use crate::secret::{MasterKey, Secret};
use crate::store::tables::ACCOUNTS;
use crate::vault::cipher::{self, Binding, VaultCipher};
use crate::vault::connection::{
    Connection, ConnectionInfo, Disconnected, DueRefresh, Expiry, Health, OAuthGrant, health,
    validate_scopes, validate_token,
};
use crate::vault::provider::Provider;
use crate::vault::provider_error::ProviderErrorKind;
use crate::vault::records::{self, ConnectorRecord, StoredHealth};
use crate::vault::tables::CONNECTORS;
use crate::vault::{Owner, open_read, owner, owner_read, owner_rows, stored_row, target};

/// What removes or replaces a connector row that does not decode, for the error that names it.
const REMEDY: &str = "`vault().disconnect` removes it, `vault().connect` replaces it";

/// Connector operations. Get one with [`Ledger::vault`].
pub struct Vault<'a> {
    pub(crate) ledger: &'a Ledger,
    pub(crate) actor: String,
}

fn binding<'b>(owner: &'b PublicId, provider: &'b str) -> Binding<'b> {
    Binding {
        kind: cipher::CONNECTOR,
        owner,
        name: provider,
        version: ConnectorRecord::VERSION,
        fields: &[],
    }
}

fn parse_provider(name: &str) -> Provider {
    name.parse()
        .unwrap_or_else(|_| Provider::Other(name.to_owned()))
}

fn open_tokens(
    master: &MasterKey,
    owner: &PublicId,
    provider: &str,
    record: &ConnectorRecord,
) -> Result<(Secret, Option<Secret>)> {
    let plain = VaultCipher::new(master).open(binding(owner, provider), &record.sealed)?;
    records::decode_tokens(&plain).ok_or(Error::DecryptionFailed {
        what: "connector credential",
    })
}

/// The stored row `bytes` of `owner`'s connection to `provider`, if it can be read: it
/// decodes, and its tokens open under the owner and provider it is stored with. `None`:
/// damaged, written by a newer schema, or moved beside its ciphertext.
fn readable(
    master: &MasterKey,
    owner: &PublicId,
    provider: &str,
    bytes: &[u8],
) -> Option<ConnectorRecord> {
    let opens = |r: &ConnectorRecord| open_tokens(master, owner, provider, r).is_ok();
    codec::decode(bytes).ok().filter(opens)
}

/// Decodes and decrypts one stored row, for `check`.
pub(crate) fn check_row(
    master: &MasterKey,
    owner: &PublicId,
    provider: &str,
    bytes: &[u8],
) -> Result<()> {
    let record: ConnectorRecord = codec::decode(bytes)?;
    provider.parse::<Provider>()?;
    open_tokens(master, owner, provider, &record).map(drop)
}

impl<'a> Vault<'a> {
    fn master(&self) -> &MasterKey {
        &self.ledger.inner.config.master_key
    }

    /// The same handle, recording `actor` as the author of its changes: 1–254 characters,
    /// no control characters and no API key (a change by an actor that breaks these is
    /// refused as [`Error::InvalidInput`](crate::Error::InvalidInput) on `actor`).
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }

    fn info(&self, owner: &Owner, provider: &str, r: &ConnectorRecord) -> ConnectionInfo {
        let (health, health_reason) = health(r, self.ledger.now());
        ConnectionInfo {
            owner: owner.public,
            provider: parse_provider(provider),
            scopes: r.scopes.clone(),
            expires_at: r.expires_at,
            has_refresh_token: r.has_refresh_token,
            health,
            health_reason,
            connected_at: r.connected_at,
            connected_by: r.connected_by.clone(),
            updated_at: r.updated_at,
            updated_by: r.updated_by.clone(),
            last_refreshed_at: r.last_refreshed_at,
            revision: revision(r),
            schema_version: ConnectorRecord::VERSION,
        }
    }

    fn expiry(&self, grant: &OAuthGrant) -> Option<Timestamp> {
        grant.expires.map(|e| match e {
            Expiry::At(t) => t,
            Expiry::InSecs(s) => self.ledger.now().plus_secs(s),
        })
    }

    /// Runs `change` on the existing row of (owner, provider) in one write transaction and
    /// appends the audit event `action` with the fields it returns. A change that returns no
    /// fields writes nothing.
    fn modify(
        &self,
        owner: &str,
        provider: &Provider,
        action: &str,
        change: impl FnOnce(&Owner, &str, &mut ConnectorRecord) -> Result<Vec<&'static str>>,
    ) -> Result<ConnectionInfo> {
        let provider = provider.validated()?;
        let name = provider.as_str();
        let txn = self.ledger.inner.store.begin_write()?;
        let owner = owner_write(self.ledger, &txn, owner)?;
        let record = {
            let mut table = txn.open_table(CONNECTORS)?;
            let mut record: ConnectorRecord = match table.get((owner.id, name))? {
                Some(v) => stored_row(&owner.public, "connectors", name, v.value(), REMEDY)?,
                None => return Err(Error::NotFound { what: "connector" }),
            };
            let fields = change(&owner, name, &mut record)?;
            if fields.is_empty() {
                self.ledger.actor_ok(&self.actor)?; // refused all the same
                return Ok(self.info(&owner, name, &record));
            }
            record.updated_at = self.ledger.now();
            record.updated_by = self.actor.clone();
            table.insert((owner.id, name), codec::encode(&record).as_slice())?;
            let target = target(&owner.public, "connectors", name);
            audit::append(
                &txn,
                self.ledger,
                record.updated_at,
                &self.actor,
                action,
                &target,
                &fields,
            )?;
            record
        };
        txn.commit_change()?;
        Ok(self.info(&owner, name, &record))
    }

    /// Checks a grant's tokens and scopes; returns the scopes, deduplicated. A scope is
    /// stored in plain text and listed, so one holding an API key is refused (found by a
    /// reviewer: it was kept and shown by `list`).
    fn checked(&self, grant: &OAuthGrant) -> Result<Vec<String>> {
        validate_token("access_token", &grant.access_token)?;
        if let Some(r) = &grant.refresh_token {
            validate_token("refresh_token", r)?;
        }
        let scopes = validate_scopes(&grant.scopes)?;
        self.ledger
            .holding_no_key("scopes", scopes.iter().map(String::as_str))?;
        Ok(scopes)
    }

    /// Stores the owner's grant for `provider`, replacing any earlier one (a reconnect resets
    /// health to healthy).
    ///
    /// Nothing of an earlier row is kept, so one that cannot be read (see
    /// [`disconnect`](Self::disconnect)) is replaced like any other; the audit event
    /// `connector.connected` then names the field `unreadable` as well, to tell it from an
    /// ordinary reconnect.
    pub fn connect(
        &self,
        owner: &str,
        provider: &Provider,
        grant: OAuthGrant,
    ) -> Result<ConnectionInfo> {
        self.ledger.guarded(|| {
            let provider = provider.validated()?;
            let name = provider.as_str();
            // Stored in clear, listed and named in the audit trail, as a secret's name is.
            self.ledger.holding_no_key("provider", [name])?;
            let scopes = self.checked(&grant)?;
            let now = self.ledger.now();
            let txn = self.ledger.inner.store.begin_write()?;
            let owner = owner_write(self.ledger, &txn, owner)?;
            let plain = records::encode_tokens(&grant.access_token, grant.refresh_token.as_ref());
            let sealed = VaultCipher::new(&self.ledger.inner.config.master_key)
                .seal(binding(&owner.public, name), &plain)?;
            let record = ConnectorRecord {
                scopes,
                expires_at: self.expiry(&grant),
                has_refresh_token: grant.refresh_token.is_some(),
                health: StoredHealth::Healthy,
                connected_at: now,
                connected_by: self.actor.clone(),
                updated_at: now,
                updated_by: self.actor.clone(),
                last_refreshed_at: None,
                sealed,
            };
            // The row replaced is read only to say, in the audit event, that it could not be.
            let unreadable = txn
                .open_table(CONNECTORS)?
                .insert((owner.id, name), codec::encode(&record).as_slice())?
                .is_some_and(|old| {
                    readable(self.master(), &owner.public, name, old.value()).is_none()
                });
            let mut fields = vec!["access_token"];
            if record.has_refresh_token {
                fields.push("refresh_token");
            }
            fields.extend(["scopes", "expires_at"]);
            if unreadable {
                fields.push("unreadable");
            }
            let target = target(&owner.public, "connectors", name);
            audit::append(
                &txn,
                self.ledger,
                now,
                &self.actor,
                "connector.connected",
                &target,
                &fields,
            )?;
            txn.commit_change()?;
            Ok(self.info(&owner, name, &record))
        })
    }

    /// The owner's connection to `provider`, with its tokens. `NotFound` if there is none; a
    /// row that does not decode fails with
    /// [`Error::Codec`]`(`[`CodecError::Row`](crate::CodecError::Row)`)`, which names it (as
    /// do [`record_refresh`](Self::record_refresh) and
    /// [`mark_unhealthy`](Self::mark_unhealthy)).
    pub fn get(&self, owner: &str, provider: &Provider) -> Result<Connection> {
        self.ledger.guarded(|| {
            let provider = provider.validated()?;
            let name = provider.as_str();
            let read = self.ledger.inner.store.begin_read()?;
            let owner = owner_read(self.ledger, &read, owner)?;
            let not_found = Error::NotFound { what: "connector" };
            let table = open_read(&read, CONNECTORS)?.ok_or(not_found)?;
            let record: ConnectorRecord = match table.get((owner.id, name))? {
                Some(v) => stored_row(&owner.public, "connectors", name, v.value(), REMEDY)?,
                None => return Err(Error::NotFound { what: "connector" }),
            };
            let (access_token, refresh_token) =
                open_tokens(self.master(), &owner.public, name, &record)?;
            Ok(Connection {
                info: self.info(&owner, name, &record),
                access_token,
                refresh_token,
            })
        })
    }

    /// The owner's connections, metadata only, in provider-name order.
    ///
    /// A row that does not decode (damaged, or written by a newer schema) fails the list
    /// with [`Error::Codec`]`(`[`CodecError::Row`](crate::CodecError::Row)`)`, which names
    /// the row (`acct_…/connectors/PROVIDER`, as [`Ledger::check`](crate::Ledger::check)
    /// does) and never holds its bytes: the list is not given without it, which would hide
    /// the damage. [`disconnect`](Self::disconnect) removes such a row and
    /// [`connect`](Self::connect) replaces it.
    pub fn list(&self, owner: &str) -> Result<Vec<ConnectionInfo>> {
        self.ledger.guarded(|| {
            let read = self.ledger.inner.store.begin_read()?;
            let owner = owner_read(self.ledger, &read, owner)?;
            let Some(table) = open_read(&read, CONNECTORS)? else {
                return Ok(Vec::new());
            };
            owner_rows(&table, owner.id)?
                .into_iter()
                .map(|(name, bytes)| {
                    let record = stored_row(&owner.public, "connectors", &name, &bytes, REMEDY)?;
                    Ok(self.info(&owner, &name, &record))
                })
                .collect()
        })
    }

    /// Connections, across all owners, whose access token expires at or before `now + skew`
    /// and that can be refreshed (a refresh token is stored and the grant is not revoked),
    /// soonest first. Failed refreshes stay listed so they are retried.
    ///
    /// This is the one vault call that is not scoped to an owner: a background refresher has
    /// to find the connections to refresh. It is allowed because it returns only owner ids,
    /// provider names, expiry times and health — never a token. The refresher then reads each
    /// grant through the owner-scoped [`get`](Self::get) and stores the result with
    /// [`record_refresh`](Self::record_refresh) or [`mark_unhealthy`](Self::mark_unhealthy).
    /// It scans every connector row; call it every few minutes, not per request.
    pub fn due_for_refresh(&self, now: Timestamp, skew: Duration) -> Result<Vec<DueRefresh>> {
        self.ledger.guarded(|| {
            let skew_ms = u64::try_from(skew.as_millis()).unwrap_or(u64::MAX);
            let horizon = Timestamp(now.0.saturating_add(skew_ms));
            let read = self.ledger.inner.store.begin_read()?;
            let Some(table) = open_read(&read, CONNECTORS)? else {
                return Ok(Vec::new());
            };
            let mut out = Vec::new();
            for entry in table.iter()? {
                let (k, v) = entry?;
                let (owner, name) = k.value();
                // An unreadable row (`check` names it) must not stop every other owner's refresh.
                let Ok(record) = codec::decode::<ConnectorRecord>(v.value()) else {
                    continue;
                };
                // A failed refresh, or a token the provider refused early, is due whatever its
                // stored expiry (and with none).
                let failed = matches!(record.health, StoredHealth::RefreshFailed(_));
                let expires_at = match (record.expires_at, failed) {
                    (Some(at), true) => at.min(now),
                    (None, true) => now,
                    (Some(at), false) if at <= horizon => at,
                    _ => continue,
                };
                if !record.has_refresh_token || matches!(record.health, StoredHealth::Revoked(_)) {
                    continue;
                }
                let health = match record.health {
                    StoredHealth::RefreshFailed(_) => Health::RefreshFailed,
                    _ => Health::RefreshDue,
                };
                out.push(DueRefresh {
                    owner: self.ledger.inner.ids.encode(IdKind::Account, owner),
                    provider: parse_provider(name),
                    expires_at,
                    health,
                });
            }
            out.sort_by(|a, b| {
                (a.expires_at, &a.owner, a.provider.as_str()).cmp(&(
                    b.expires_at,
                    &b.owner,
                    b.provider.as_str(),
                ))
            });
            Ok(out)
        })
    }

    /// Stores the result of a successful refresh: the new access token and expiry, the new
    /// refresh token if the provider rotated it (else the stored one is kept), and the new
    /// scopes if any were returned (else the stored ones are kept). Health becomes healthy.
    ///
    /// `refreshed` is the connection the refresh started from (the `info` of what
    /// [`get`](Self::get) returned). If the stored grant changed since (the owner connected
    /// again — a new grant, perhaps other scopes or another account at the provider — or
    /// another refresher stored its result first: see [`ConnectionInfo::revision`]), the
    /// result is refused with `Conflict`, as is one begun from a revoked connection (the owner
    /// must connect again). A revocation of the same grant recorded after the refresh began
    /// gives way to its result: it may be another refresher's `invalid_grant` for the refresh
    /// token this refresh spent, and the provider has just answered with a live grant.
    pub fn record_refresh(
        &self,
        refreshed: &ConnectionInfo,
        grant: OAuthGrant,
    ) -> Result<ConnectionInfo> {
        self.ledger.guarded(|| {
            let (owner, provider) = (refreshed.owner.as_str(), &refreshed.provider);
            let scopes = self.checked(&grant)?;
            let expires_at = self.expiry(&grant);
            let now = self.ledger.now();
            self.modify(
                owner,
                provider,
                "connector.refreshed",
                |owner, name, record| {
                    // A revocation recorded since this refresh began, of the grant it began from,
                    // may be a racing refresher's `invalid_grant` for the refresh token this one
                    // spent: dropping this result would drop the only live grant (found by a
                    // reviewer). One begun from a revoked view, or of another grant, is refused.
                    let revoked = matches!(record.health, StoredHealth::Revoked(_));
                    if revoked
                        && (refreshed.health == Health::Revoked
                            || revision(record) != refreshed.revision)
                    {
                        return Err(Error::Conflict(format!(
                            "the {name} connection was revoked; the owner must connect again"
                        )));
                    }
                    if revision(record) != refreshed.revision {
                        return Err(Error::Conflict(format!(
                            "the {name} connection changed since this refresh began (connected \
                         again, or refreshed by another refresher); its result is dropped: \
                         get the connection again"
                        )));
                    }
                    let mut fields = vec!["access_token"];
                    if record.expires_at != expires_at {
                        fields.push("expires_at");
                    }
                    let refresh = match &grant.refresh_token {
                        Some(r) => {
                            fields.push("refresh_token");
                            Some(r.clone())
                        }
                        None => open_tokens(self.master(), &owner.public, name, record)?.1,
                    };
                    if !scopes.is_empty() && scopes != record.scopes {
                        fields.push("scopes");
                        record.scopes = scopes;
                    }
                    let plain = records::encode_tokens(&grant.access_token, refresh.as_ref());
                    record.sealed = VaultCipher::new(&self.ledger.inner.config.master_key)
                        .seal(binding(&owner.public, name), &plain)?;
                    record.has_refresh_token = refresh.is_some();
                    record.expires_at = expires_at;
                    if record.health != StoredHealth::Healthy {
                        fields.push("health");
                    }
                    record.health = StoredHealth::Healthy;
                    record.last_refreshed_at = Some(now);
                    Ok(fields)
                },
            )
        })
    }

    /// Records that a refresh or call made with the grant `failed` describes (the `info` of
    /// what [`get`](Self::get) returned) failed for `reason` (a [`ProviderErrorKind`], e.g.
    /// from [`normalize_provider_error`](crate::normalize_provider_error)): `revoked` marks
    /// the connection revoked, anything else `refresh_failed`. No free text is stored.
    ///
    /// A late failure changes nothing: one of a grant replaced or refreshed since (a refresh
    /// token another refresher already spent is refused as `invalid_grant`, which reads as
    /// revoked), and one of a call made before a revocation (a revoked connection stays
    /// revoked until a new [`connect`](Self::connect)). The info returned is the connection
    /// as stored.
    pub fn mark_unhealthy(
        &self,
        failed: &ConnectionInfo,
        reason: ProviderErrorKind,
    ) -> Result<ConnectionInfo> {
        self.ledger.guarded(|| {
            self.modify(
                failed.owner.as_str(),
                &failed.provider,
                "connector.marked_unhealthy",
                |_, _, record| {
                    if revision(record) != failed.revision {
                        return Ok(Vec::new());
                    }
                    let health = match (reason, record.health) {
                        (ProviderErrorKind::Revoked, _) => StoredHealth::Revoked(reason),
                        (_, StoredHealth::Revoked(_)) => return Ok(Vec::new()),
                        _ => StoredHealth::RefreshFailed(reason),
                    };
                    // Marked so already: a change that changes nothing writes nothing.
                    let changed = std::mem::replace(&mut record.health, health) != health;
                    Ok(if changed { vec!["health"] } else { Vec::new() })
                },
            )
        })
    }

    /// Removes the owner's connection to `provider` and returns its metadata. `NotFound` if
    /// there is none. To revoke the grant at the provider too, [`get`](Self::get) the tokens
    /// first.
    ///
    /// A row that cannot be read — it does not decode (damaged, or written by a newer
    /// schema: `list` and `get` fail on it), or its tokens do not open (moved beside its
    /// ciphertext: `get` fails on it); [`Ledger::check`](crate::Ledger::check) names either —
    /// is removed all the same, with [`Disconnected::info`] `None`; its audit event names
    /// the field `unreadable`, to tell it from an ordinary disconnect.
    pub fn disconnect(&self, owner: &str, provider: &Provider) -> Result<Disconnected> {
        self.ledger.guarded(|| {
            let provider = provider.validated()?;
            let name = provider.as_str();
            let txn = self.ledger.inner.store.begin_write()?;
            let owner = owner_write(self.ledger, &txn, owner)?;
            let record: Option<ConnectorRecord> = {
                let mut table = txn.open_table(CONNECTORS)?;
                let removed = table.remove((owner.id, name))?;
                match removed {
                    // Not read to refuse: an owner must be able to remove a row nothing else
                    // can read (found by a reviewer: its decode error aborted the removal).
                    Some(v) => readable(self.master(), &owner.public, name, v.value()),
                    None => return Err(Error::NotFound { what: "connector" }),
                }
            };
            let fields: &[&str] = match record {
                Some(_) => &[],
                None => &["unreadable"],
            };
            let target = target(&owner.public, "connectors", name);
            let now = self.ledger.now();
            audit::append(
                &txn,
                self.ledger,
                now,
                &self.actor,
                "connector.disconnected",
                &target,
                fields,
            )?;
            txn.commit_change()?;
            Ok(Disconnected {
                owner: owner.public,
                provider: parse_provider(name),
                info: record.map(|r| self.info(&owner, name, &r)),
            })
        })
    }
}

/// Which stored grant `record` holds: a digest of its sealed tokens, which every connect and
/// refresh seals anew (under a fresh nonce).
fn revision(record: &ConnectorRecord) -> u64 {
    let digest = blake3::hash(&record.sealed);
    u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Resolves an owner inside a write transaction.
fn owner_write(ledger: &Ledger, txn: &WriteTransaction, text: &str) -> Result<Owner> {
    owner(ledger, &txn.open_table(ACCOUNTS)?, text)
}
