//! The credentials vault: OAuth connector credentials and owner secrets, encrypted at rest
//! behind the owner boundary.
//!
//! - [`Vault`] ([`Ledger::vault`]) keeps one OAuth grant per (owner, [`Provider`]): tokens
//!   sealed with AES-SIV, metadata (scopes, expiry, health) in the clear.
//! - [`Secrets`] ([`Ledger::secrets`]) keeps named owner secrets (API keys of third-party
//!   services) and attaches them to outbound requests only for their allowed hosts.
//! - [`normalize_provider_error`] turns a provider's error response into a safe
//!   [`ProviderError`].
//!
//! Every call names the owner (an account's public id; the account must exist) and reads or
//! writes only that owner's rows. The one exception is [`Vault::due_for_refresh`], which a
//! background refresher needs across owners and which therefore returns no secret at all.
//!
//! The vault does not look at the owner's subscription: a suspended or canceled account's
//! secrets still attach and its connections are still listed for refresh. A suspension is
//! meant to be undone; a grant left to lapse meanwhile (many providers drop refresh tokens
//! that go unused) would make the customer connect again after paying. What stops work for
//! such an account is [`Ledger::verify`](crate::Ledger::verify), which refuses its keys with
//! `subscription_inactive`; a job that acts for an owner without a request in hand checks
//! [`Accounts::get`](crate::Accounts::get)'s status itself.
//!
//! Values are sealed with a random nonce and bound, as associated data, to the owner's public
//! id, the provider or secret name and the record's schema version: a ciphertext copied to
//! another row fails with [`Error::DecryptionFailed`](crate::Error::DecryptionFailed). Plaintexts
//! leave only as [`Secret`](crate::Secret)s or redacting [`OutboundHeader`]/[`OutboundUrl`];
//! audit events carry names only.

mod cipher;
mod connection;
mod connectors;
pub(crate) mod hosts;
mod outbound;
mod provider;
mod provider_error;
pub(crate) mod records;
pub(crate) mod secrets;
pub(crate) mod tables;

use redb::{ReadTransaction, ReadableTable, TableDefinition, TableError};

pub use crate::error::OutboundRefusal;
pub use connection::{
    Connection, ConnectionInfo, Disconnected, DueRefresh, Health, OAuthGrant,
    REFRESH_DUE_WITHIN_SECS,
};
pub use connectors::Vault;
pub use outbound::{OutboundHeader, OutboundUrl, SecretInfo};
pub use provider::{PROVIDER_NAME_MAX, Provider};
pub use provider_error::{ProviderError, ProviderErrorKind, normalize_provider_error};
pub use secrets::Secrets;

use crate::codec::{self, Record};
use crate::error::{Error, Result};
use crate::ledger::{Ledger, SYSTEM_ACTOR};
use crate::public_id::{IdCipher, IdKind, PublicId};
use crate::secret::MasterKey;
use crate::store::tables::ACCOUNTS;

impl Ledger {
    /// Connector credentials: OAuth grants for Google Drive, Notion and other providers.
    pub fn vault(&self) -> Vault<'_> {
        Vault {
            ledger: self,
            actor: SYSTEM_ACTOR.into(),
        }
    }

    /// Owner secrets for outbound calls, attached only for their allowed hosts.
    pub fn secrets(&self) -> Secrets<'_> {
        Secrets {
            ledger: self,
            actor: SYSTEM_ACTOR.into(),
        }
    }
}

/// An owner, resolved: internal id for table keys, canonical public id for associated data.
pub(crate) struct Owner {
    pub(crate) id: u64,
    pub(crate) public: PublicId,
}

/// Decodes an owner's public id; the account must exist in `accounts`.
pub(crate) fn owner(
    ledger: &Ledger,
    accounts: &impl ReadableTable<u64, &'static [u8]>,
    text: &str,
) -> Result<Owner> {
    let id = ledger.inner.ids.decode(IdKind::Account, text)?;
    if accounts.get(id)?.is_none() {
        return Err(Error::NotFound { what: "account" });
    }
    Ok(Owner {
        id,
        public: ledger.inner.ids.encode(IdKind::Account, id),
    })
}

/// Resolves an owner in a read transaction.
pub(crate) fn owner_read(ledger: &Ledger, read: &ReadTransaction, text: &str) -> Result<Owner> {
    owner(ledger, &read.open_table(ACCOUNTS)?, text)
}

type VaultTable = TableDefinition<'static, (u64, &'static str), &'static [u8]>;
type VaultReadTable = redb::ReadOnlyTable<(u64, &'static str), &'static [u8]>;

/// Opens a vault table for reading; `None` if nothing was ever stored in it.
pub(crate) fn open_read(read: &ReadTransaction, def: VaultTable) -> Result<Option<VaultReadTable>> {
    match read.open_table(def) {
        Ok(t) => Ok(Some(t)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Every `(name, value)` row of one owner, in name order.
pub(crate) fn owner_rows(
    table: &impl ReadableTable<(u64, &'static str), &'static [u8]>,
    owner: u64,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in table.range((owner, "")..)? {
        let (k, v) = entry?;
        let (o, name) = k.value();
        if o != owner {
            break;
        }
        out.push((name.to_owned(), v.value().to_vec()));
    }
    Ok(out)
}

/// Audit target of a vault row: `acct_…/connectors/notion`, `acct_…/secrets/OPENAI_KEY`.
pub(crate) fn target(owner: &PublicId, kind: &str, name: &str) -> String {
    format!("{owner}/{kind}/{name}")
}

/// A stored row as `check` and a listing's error name it: its [`target`], the name escaped
/// (a name written through the API was validated; one in a damaged or edited file may hold
/// anything, a terminal control included).
fn row_name(owner: &PublicId, kind: &str, name: &str) -> String {
    target(owner, kind, &name.escape_default().to_string())
}

/// Decodes row `name` of `owner` in the vault table `kind` (`connectors`, `secrets`): one
/// that does not decode fails the call (a listing, or a call on that row that needs what it
/// held) with a [`CodecError::Row`](crate::CodecError::Row) naming the row (never its bytes)
/// and saying, in `remedy`, how to get rid of it. Silently leaving it out of a listing would
/// hide the damage; failing without a name left the operator to run `check` to find it.
pub(crate) fn stored_row<R: Record>(
    owner: &PublicId,
    kind: &str,
    name: &str,
    bytes: &[u8],
    remedy: &'static str,
) -> Result<R> {
    codec::decode(bytes).map_err(|e| e.of_row(row_name(owner, kind, name), remedy).into())
}

/// Decodability, owner and decryption checks of the vault tables, for `Ledger::check`.
pub(crate) fn check_tables(
    master: &MasterKey,
    ids: &IdCipher,
    read: &ReadTransaction,
    problems: &mut Vec<String>,
) -> Result<()> {
    let accounts = read.open_table(ACCOUNTS)?;
    if let Some(table) = open_read(read, tables::CONNECTORS)? {
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (owner, name) = k.value();
            let public = ids.encode(IdKind::Account, owner);
            let what = row_name(&public, "connectors", name);
            if accounts.get(owner)?.is_none() {
                problems.push(format!("{what}: owner account missing"));
            }
            if let Err(e) = connectors::check_row(master, &public, name, v.value()) {
                problems.push(format!("{what}: {e}"));
            }
        }
    }
    if let Some(table) = open_read(read, tables::OWNER_SECRETS)? {
        for entry in table.iter()? {
            let (k, v) = entry?;
            let (owner, name) = k.value();
            let public = ids.encode(IdKind::Account, owner);
            let what = row_name(&public, "secrets", name);
            if accounts.get(owner)?.is_none() {
                problems.push(format!("{what}: owner account missing"));
            }
            if let Err(e) = secrets::check_row(master, &public, name, v.value()) {
                problems.push(format!("{what}: {e}"));
            }
        }
    }
    Ok(())
}
