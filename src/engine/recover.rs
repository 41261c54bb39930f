//! What the engine reads at open: leases a crash left (counted as lost) and the route rules.

use redb::ReadableTable;

use crate::codec;
use crate::error::Result;
use crate::record::{CreditsRecord, RouteRule};
use crate::store::{self, Store, tables::*};

/// What [`recover_leases`] found at open.
pub(super) struct Recovered {
    /// Units found leased, now counted in `lost_to_crash`.
    pub(super) lost: u64,
    /// Balances whose record could not be decoded, left as they are.
    pub(super) unreadable: u64,
}

/// At open: units still `leased` were in memory when the process died. Count them as lost
/// (spent, never re-granted) so no crash can let them be spent twice.
///
/// A record that does not decode is left as it is and counted, for `check` to name: refusing
/// to open would stop every other key for one damaged balance, and writing over it would lose
/// what it held. Nothing can spend from it meanwhile: the writer leases nothing from it and
/// changes nothing in it, and once a meter has met it the key's peeks are refused too.
pub(super) fn recover_leases(store: &Store) -> Result<Recovered> {
    let txn = store.begin_write()?;
    let mut lost: u64 = 0;
    let mut unreadable = 0;
    {
        let mut table = txn.open_table(CREDITS)?;
        let mut changed = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let Ok(mut record) = codec::decode::<CreditsRecord>(v.value()) else {
                unreadable += 1;
                continue;
            };
            if record.leased > 0 {
                // Summed over every balance, which may each hold up to u64::MAX.
                lost = lost.saturating_add(record.leased);
                record.lost_to_crash = record.lost_to_crash.saturating_add(record.leased);
                record.leased = 0;
                changed.push((k.value(), record));
            }
        }
        for (id, record) in changed {
            store::put(&mut table, id, &record)?;
        }
    }
    txn.commit()?;
    Ok(Recovered { lost, unreadable })
}

pub(super) fn load_routes(store: &Store) -> Result<Vec<RouteRule>> {
    rules_in(&store.begin_read()?.open_table(ROUTES)?)
}

/// Every rule in `table`, sorted by prefix.
pub(crate) fn rules_in(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<RouteRule>> {
    let mut rules = Vec::new();
    for entry in table.iter()? {
        let (prefix, bytes) = entry?;
        // Every verify is routed by the whole table: a ledger does not open without it.
        let remedy = "the ledger cannot route requests without it: restore the file from a backup";
        let rule = codec::decode(bytes.value())
            .map_err(|e| e.of_row(format!("route rule {:?}", prefix.value()), remedy))?;
        rules.push(rule);
    }
    Ok(rules)
}
