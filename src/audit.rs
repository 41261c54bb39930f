//! The audit trail: an append-only table of lifecycle events, written in the same transaction
//! as the change it records. Events carry names and public ids, never values.

use redb::{AccessGuard, ReadableTable, StorageError, WriteTransaction};

use crate::clock::Timestamp;
use crate::codec;
use crate::error::{CodecError, Result};
use crate::ledger::Ledger;
use crate::record::AuditEvent;
use crate::store::tables::AUDIT;

/// Appends an event inside `txn`, after checking the actor (see [`Ledger::actor_ok`]).
pub(crate) fn append(
    txn: &WriteTransaction,
    ledger: &Ledger,
    at: Timestamp,
    actor: &str,
    action: &str,
    target: &str,
    fields: &[&str],
) -> Result<()> {
    // Every change is audited in its own transaction, so a refused actor writes nothing.
    ledger.actor_ok(actor)?;
    append_checked(txn, at, actor, action, target, fields)
}

/// Appends an event inside `txn` for an actor [`Ledger::actor_ok`] accepted when the change
/// was asked for (the credit writer's, which records changes made on a caller's behalf).
pub(crate) fn append_checked(
    txn: &WriteTransaction,
    at: Timestamp,
    actor: &str,
    action: &str,
    target: &str,
    fields: &[&str],
) -> Result<()> {
    let mut table = txn.open_table(AUDIT)?;
    let last = table.last()?.map_or(0, |(k, _)| k.value());
    // Only a damaged key reaches the end of the sequence: refused, never wrapped to 0 (which
    // would overwrite the trail's first events).
    let seq = last.checked_add(1).ok_or_else(|| CodecError::Corrupt {
        record: "audit event",
        reason: format!("the last sequence number is {last}: the trail's key is damaged"),
    })?;
    let event = AuditEvent {
        seq,
        at,
        actor: actor.to_owned(),
        action: action.to_owned(),
        target: target.to_owned(),
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
    };
    table.insert(seq, codec::encode(&event).as_slice())?;
    Ok(())
}

/// Sets `field` to `value`; names it in `changed` if that changed it (an event lists the
/// fields a change changed, not those the caller passed again).
pub(crate) fn set<T: PartialEq>(
    changed: &mut Vec<&'static str>,
    name: &'static str,
    field: &mut T,
    value: T,
) {
    if *field != value {
        *field = value;
        changed.push(name);
    }
}

/// Reads the audit trail. Get one with [`Ledger::audit`].
pub struct Audit<'a> {
    pub(crate) ledger: &'a Ledger,
}

impl Audit<'_> {
    /// Events with `seq > after`, oldest first, at most `limit` (capped at 1,000). A page
    /// ends before an event that does not decode (a damaged file); a page that would start
    /// with one fails with an error naming its number, to read on after. So a page can be
    /// shorter than `limit` before the trail's end: the end is an empty page.
    pub fn since(&self, after: u64, limit: usize) -> Result<Vec<AuditEvent>> {
        self.ledger.guarded(|| {
            let read = self.ledger.inner.store.begin_read()?;
            let bound = self.ledger.inner.store.durable_audit_bound()?;
            let table = read.open_table(AUDIT)?;
            let from = after.saturating_add(1);
            let events = match bound {
                Some(last) if last < from => return Ok(Vec::new()),
                Some(last) => table.range(from..=last)?,
                None => table.range(from..)?,
            };
            read_page(events.take(limit.min(1000)))
        })
    }

    /// The newest `limit` events, newest first (capped at 1,000), ending before a damaged
    /// one as [`since`](Self::since) does.
    pub fn recent(&self, limit: usize) -> Result<Vec<AuditEvent>> {
        self.ledger.guarded(|| {
            let read = self.ledger.inner.store.begin_read()?;
            let bound = self.ledger.inner.store.durable_audit_bound()?;
            let table = read.open_table(AUDIT)?;
            let events = match bound {
                Some(last) => table.range(..=last)?,
                None => table.range(0..)?,
            };
            read_page(events.rev().take(limit.min(1000)))
        })
    }
}

/// The events of a page, in the order given, up to a damaged one: a page that would start
/// with one fails, naming it. An exporter paging with [`Audit::since`] so gets every event
/// before the damaged one, then its number to read on after (found by a reviewer: the whole
/// page failed, and a reader that skipped to the named event lost the good ones before it).
fn read_page(
    events: impl Iterator<
        Item = Result<
            (
                AccessGuard<'static, u64>,
                AccessGuard<'static, &'static [u8]>,
            ),
            StorageError,
        >,
    >,
) -> Result<Vec<AuditEvent>> {
    let mut out = Vec::new();
    for entry in events {
        let (seq, bytes) = entry?;
        match decode(seq.value(), bytes.value()) {
            Ok(event) => out.push(event),
            Err(_) if !out.is_empty() => break,
            Err(damaged) => return Err(damaged),
        }
    }
    Ok(out)
}

/// Event `seq`, or an error naming it: a reader exporting the trail can skip a damaged
/// event (`since(seq, …)`) rather than stall on it.
fn decode(seq: u64, bytes: &[u8]) -> Result<AuditEvent> {
    let remedy = "the events after it can still be read (`audit().since(seq, …)`, the CLI's \
                  `audit --after SEQ`)";
    codec::decode(bytes).map_err(|e| e.of_row(format!("audit event {seq}"), remedy).into())
}
