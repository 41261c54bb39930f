//! The vault's redb tables. Keys are `(owner internal id, provider or secret name)`, so every
//! read and listing is a range inside one owner; values are codec-encoded records.

use redb::TableDefinition;

/// `(owner id, provider name) → ConnectorRecord`.
pub(crate) const CONNECTORS: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("vault_connectors");
/// `(owner id, secret name) → SecretRecord`.
pub(crate) const OWNER_SECRETS: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("vault_secrets");
