//! `demo`: a guided tour on a scratch ledger in a temporary directory. Needs no setup: the
//! master key is generated and thrown away, and a [`ManualClock`] lets the tour move time
//! forward to show grace periods and expiry.

mod tour;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::Path;

use keyledger::{Clock, Config, KeyInfo, Ledger, ManualClock, MasterKey, Secret, SystemClock};
use serde::Serialize;

use crate::misc::{authenticate_key, print_check};
use crate::output::{Table, mask};
use crate::{CliError, CliResult};

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
    /// Authentications that succeeded.
    pub authentications_ok: u64,
    /// Authentications refused, by denial code.
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

    /// Authenticates `plaintext`, prints one aligned line and counts the outcome. `want` is
    /// `ok` or the expected denial code; anything else stops the demo with an error.
    fn expect(&mut self, label: &str, plaintext: &str, want: &str) -> CliResult<()> {
        let outcome = authenticate_key(&self.ledger, plaintext)?;
        let (got, verdict) = match &outcome {
            Ok(info) => {
                self.summary.authentications_ok += 1;
                ("ok", format!("ok          {}  {}", info.id, info.name))
            }
            Err(denial) => {
                *self
                    .summary
                    .denials
                    .entry(denial.code().to_owned())
                    .or_default() += 1;
                (
                    denial.code(),
                    format!("denied: {} (HTTP {})", denial.code(), denial.http_status()),
                )
            }
        };
        self.say(format!(
            "  authenticate {label:<26} {:<18} → {verdict}",
            mask(plaintext)
        ));
        if got != want {
            return Err(CliError::new(format!(
                "demo: {label}: expected {want}, got {got}"
            )));
        }
        Ok(())
    }

    /// [`expect`](Self::expect) with the stored plaintext of the key named `name`.
    fn expect_named(&mut self, label: &str, name: &str, want: &str) -> CliResult<()> {
        let plaintext = self
            .secrets
            .get(name)
            .map(|s| s.expose().to_owned())
            .unwrap_or_default();
        let plaintext = zeroize::Zeroizing::new(plaintext);
        self.expect(label, &plaintext, want)
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
        println!("\n== 11. Integrity check (`keyledger check`)");
        print_check(&report);
    }
    Ok(report.is_ok())
}

/// Prints the closing summary.
fn print_summary(s: &Summary, json: bool) -> CliResult<()> {
    if json {
        return crate::output::print_json(s);
    }
    let denials: Vec<String> = s
        .denials
        .iter()
        .map(|(code, n)| format!("{code} ×{n}"))
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
        "authentications ok".to_owned(),
        s.authentications_ok.to_string(),
    ]);
    t.row(["denials".to_owned(), denials.join(", ")]);
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
