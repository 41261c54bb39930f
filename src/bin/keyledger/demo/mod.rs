//! `demo`: a guided tour on a scratch ledger in a temporary directory. Needs no setup: the
//! master key is generated and thrown away, and a [`ManualClock`] lets the tour move time
//! forward to show grace periods and expiry. It walks the key lifecycle, then runs traffic
//! through `verify`: a commit with its receipt, a refund, a shared pool, and every denial.

mod probe;
mod tour;
mod traffic;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::Path;

use keyledger::{Clock, Config, KeyInfo, Ledger, ManualClock, MasterKey, Secret, SystemClock};
use serde::Serialize;

use crate::CliResult;
use crate::misc::print_check;
use crate::output::Table;

/// What the tour did, printed at the end (as JSON with `--json`).
#[derive(Debug, Default, Serialize)]
pub struct Summary {
    /// Accounts created.
    pub accounts_created: u64,
    /// Route rules set.
    pub routes_set: u64,
    /// API keys created (imported ones excluded).
    pub keys_created: u64,
    /// Tokens created.
    pub tokens_created: u64,
    /// Keys seen while paging.
    pub keys_listed: u64,
    /// Pages walked.
    pub pages_walked: u64,
    /// Keys updated.
    pub keys_updated: u64,
    /// Keys rolled.
    pub keys_rolled: u64,
    /// Keys disabled.
    pub keys_disabled: u64,
    /// Keys deleted.
    pub keys_deleted: u64,
    /// Keys imported by hash.
    pub keys_imported: u64,
    /// Keys rehashed to a newer scheme on use.
    pub keys_rehashed: u64,
    /// Credit pools created.
    pub pools_created: u64,
    /// Manual top-ups.
    pub top_ups: u64,
    /// Verifies granted.
    pub verifies_granted: u64,
    /// Grants committed (each with a receipt).
    pub grants_committed: u64,
    /// Grants dropped uncommitted (their reservation refunded).
    pub grants_refunded: u64,
    /// Credits charged by the commits.
    pub credits_charged: u64,
    /// Verifies refused, by denial code (every code appears).
    pub denials: BTreeMap<String, u64>,
    /// Audit events recorded.
    pub audit_events: u64,
    /// Whether `check` found the file healthy.
    pub check_ok: bool,
}

/// The tour's state: the ledger, its clock, the plaintexts it holds, and the running summary.
pub struct Demo {
    ledger: Ledger,
    clock: ManualClock,
    json: bool,
    /// Plaintexts by key name, kept in memory only (zeroized on drop).
    secrets: BTreeMap<String, Secret>,
    /// Key public ids by key name.
    ids: BTreeMap<String, String>,
    /// The shared pool's id, once created.
    pool_id: String,
    summary: Summary,
}

/// Runs the demo; exit code 0 when everything behaved and `check` passed.
pub fn run(json: bool) -> CliResult<u8> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("demo.redb");
    let clock = ManualClock::new(SystemClock.now());
    let config = Config::builder()
        .master_key(MasterKey::generate()?)
        .clock(clock.clone())
        .build()?;
    let mut demo = Demo {
        ledger: Ledger::open(&path, config.clone())?,
        clock,
        json,
        secrets: BTreeMap::new(),
        ids: BTreeMap::new(),
        pool_id: String::new(),
        summary: Summary::default(),
    };
    demo.say(format!(
        "keyledger demo: a scratch ledger at {} (deleted on exit), with a fresh master key\n\
         and a manual clock so the tour can move time forward.",
        path.display()
    ));
    demo.tour(dir.path())?;
    let mut summary = demo.finish();
    summary.check_ok = run_check(&path, config, json)?;
    print_summary(&summary, json)?;
    Ok(if summary.check_ok { 0 } else { 1 })
}

impl Demo {
    /// Prints a line in human mode.
    fn say(&self, text: impl Display) {
        if !self.json {
            println!("{text}");
        }
    }

    /// Prints a section header in human mode.
    fn section(&self, title: &str) {
        self.say(format!("\n== {title}"));
    }

    /// Prints a table in human mode.
    fn table(&self, table: &Table) {
        if !self.json {
            table.print();
        }
    }

    /// The clock's current time.
    fn now(&self) -> keyledger::Timestamp {
        self.clock.now()
    }

    /// Moves the clock forward and says so.
    fn advance(&self, secs: u64, why: &str) {
        self.clock.advance_secs(secs);
        self.say(format!("  ⏱  clock +{} ({why})", human_duration(secs)));
    }

    /// Remembers a created key's id and plaintext under its name.
    fn remember(&mut self, info: &KeyInfo, plaintext: Secret) {
        self.ids.insert(info.name.clone(), info.id.to_string());
        self.secrets.insert(info.name.clone(), plaintext);
    }

    /// The public id of the key named `name`.
    fn id(&self, name: &str) -> String {
        self.ids.get(name).cloned().unwrap_or_default()
    }

    /// Counts the audit trail and closes the ledger so `check` can open the file.
    fn finish(self) -> Summary {
        let mut summary = self.summary;
        summary.audit_events = self
            .ledger
            .audit()
            .since(0, 1000)
            .map_or(0, |e| e.len() as u64);
        summary
    }
}

/// Runs `check` on the closed scratch file and prints its report.
fn run_check(path: &Path, config: Config, json: bool) -> CliResult<bool> {
    let report = Ledger::check(path, config)?;
    if !json {
        println!("\n== 13. Integrity check (`keyledger check`)");
        print_check(&report);
    }
    Ok(report.is_ok())
}

/// Prints the closing summary.
fn print_summary(s: &Summary, json: bool) -> CliResult<()> {
    if json {
        return crate::output::print_json(s);
    }
    // Chain order (then any code the chain list does not know), five to a line.
    let known = traffic::DENIAL_CODES;
    let others = s.denials.keys().map(String::as_str);
    let codes: Vec<&str> = known
        .into_iter()
        .chain(others.filter(|c| !known.contains(c)))
        .collect();
    let denials: Vec<String> = codes
        .iter()
        .filter_map(|code| s.denials.get(*code).map(|n| format!("{code} ×{n}")))
        .collect();
    let mut t = Table::bare().indent(2);
    t.row([
        "accounts created".to_owned(),
        s.accounts_created.to_string(),
    ]);
    t.row(["route rules set".to_owned(), s.routes_set.to_string()]);
    t.row([
        "keys created".to_owned(),
        format!("{} (+ {} token)", s.keys_created, s.tokens_created),
    ]);
    t.row([
        "keys listed".to_owned(),
        format!("{} over {} pages", s.keys_listed, s.pages_walked),
    ]);
    t.row(["keys updated".to_owned(), s.keys_updated.to_string()]);
    t.row(["keys rolled".to_owned(), s.keys_rolled.to_string()]);
    t.row(["keys disabled".to_owned(), s.keys_disabled.to_string()]);
    t.row(["keys deleted".to_owned(), s.keys_deleted.to_string()]);
    t.row(["keys imported".to_owned(), s.keys_imported.to_string()]);
    t.row(["keys rehashed".to_owned(), s.keys_rehashed.to_string()]);
    t.row([
        "pools".to_owned(),
        format!("{} created, {} top-up", s.pools_created, s.top_ups),
    ]);
    t.row([
        "verifies granted".to_owned(),
        format!(
            "{} ({} committed, {} credits charged; {} refunded)",
            s.verifies_granted, s.grants_committed, s.credits_charged, s.grants_refunded
        ),
    ]);
    for (i, line) in denials.chunks(5).enumerate() {
        let label = if i == 0 { "denials" } else { "" };
        t.row([label.to_owned(), line.join(", ")]);
    }
    t.row(["audit events".to_owned(), s.audit_events.to_string()]);
    t.row([
        "check".to_owned(),
        if s.check_ok { "ok" } else { "FAILED" }.to_owned(),
    ]);
    println!("\n== Summary");
    t.print();
    println!(
        "\nNext: `keyledger init` creates a real database; `keyledger --help` lists the commands."
    );
    Ok(())
}

/// `90 s`, `1 h 1 s`, `1 d`…
fn human_duration(secs: u64) -> String {
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3600, "h"),
        (secs % 3600 / 60, "min"),
        (secs % 60, "s"),
    ];
    let shown: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n} {unit}"))
        .collect();
    if shown.is_empty() {
        "0 s".to_owned()
    } else {
        shown.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::human_duration;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(3601), "1 h 1 s");
        assert_eq!(human_duration(86_400), "1 d");
        assert_eq!(human_duration(0), "0 s");
    }
}
