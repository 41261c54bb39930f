//! Human and JSON printing: aligned tables, field lists, timestamps. Never prints a plaintext
//! key except through [`write_plaintext_once`].

use std::io::Write;

use keyledger::{
    Account, AuditEvent, Clock, ConnectionInfo, KeyInfo, KeyKind, Limits, Pool, RateState, Receipt,
    Refill, RefillInterval, RouteRule, Secret, SecretInfo, SystemClock, Timestamp, Usage,
};
use serde::Serialize;

use crate::{CliError, CliResult};

/// A left-aligned text table whose columns fit their widest cell.
pub struct Table {
    rows: Vec<Vec<String>>,
    indent: usize,
}

impl Table {
    /// A table with a header row.
    pub fn new<const N: usize>(headers: [&str; N]) -> Self {
        Table {
            rows: vec![headers.iter().map(|h| (*h).to_owned()).collect()],
            indent: 0,
        }
    }

    /// A table without a header row.
    pub fn bare() -> Self {
        Table {
            rows: Vec::new(),
            indent: 0,
        }
    }

    /// Indents every line by `spaces`.
    pub fn indent(mut self, spaces: usize) -> Self {
        self.indent = spaces;
        self
    }

    /// Adds a row (its cells [`printable`]).
    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) {
        let cells = cells.into_iter().map(|cell| printable(cell.into()));
        self.rows.push(cells.collect());
    }

    /// Whether the table has only its header (or nothing).
    pub fn is_empty(&self) -> bool {
        self.rows.len() <= 1
    }

    /// Renders the table as lines.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| width(s))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = " ".repeat(self.indent);
            for (c, cell) in row.iter().enumerate() {
                line.push_str(cell);
                if c + 1 < row.len() {
                    line.push_str(&" ".repeat(widths[c] - width(cell) + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Prints the table to stdout.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// `text` with each character that would move or reorder what a terminal shows (a control
/// character such as ESC, a line or paragraph separator, a bidirectional control) written
/// as its escape (`\u{1b}`). The library refuses them in what it stores, but a damaged or
/// hostile file may still hold them.
pub fn printable(text: String) -> String {
    let hostile = |c: char| {
        c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
            || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}')
    };
    if !text.contains(hostile) {
        return text;
    }
    text.chars()
        .map(|c| match hostile(c) {
            true => c.escape_unicode().to_string(),
            false => c.to_string(),
        })
        .collect()
}

/// Display width of a cell (characters; the masked form's `…` counts as one).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// Prints a value as pretty JSON on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> CliResult<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A created key as JSON: every [`KeyInfo`] field plus the plaintext under `key`.
#[derive(Serialize)]
struct CreatedJson<'a> {
    #[serde(flatten)]
    info: &'a KeyInfo,
    key: &'a str,
}

/// Prints a freshly created or rolled key with its one-time plaintext. The key is already
/// committed: if stdout cannot take the text (a full disk, a closed pipe), the error says so
/// and how to get a new secret, instead of a crash report that blames the database.
pub fn print_created(json: bool, verb: &str, info: &KeyInfo, plaintext: &Secret) -> CliResult<()> {
    let mut out = std::io::stdout().lock();
    let written = if json {
        let value = CreatedJson {
            info,
            key: plaintext.expose(),
        };
        // Straight to stdout, as the text form: a string grown to hold it would leave
        // copies of the secret behind each reallocation.
        serde_json::to_writer_pretty(&mut out, &value)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        let summary = key_summary(info).indent(2).render();
        writeln!(out, "{verb} {} {}\n{summary}", noun(info), info.id)
            .and_then(|()| write_plaintext_once(&mut out, plaintext))
    };
    written.and_then(|()| out.flush()).map_err(|e| {
        CliError::new(format!(
            "{verb} {} {}, but its secret could not be written to stdout ({e}); it is shown \
             only once and stored nowhere: roll the {} for a new one",
            noun(info),
            info.id,
            noun(info)
        ))
    })
}

/// The one place a plaintext key is shown: on its own line, with the warning. Written
/// straight to `out`, so that no string of ours holds a copy.
pub fn write_plaintext_once(out: &mut impl Write, plaintext: &Secret) -> std::io::Result<()> {
    writeln!(out, "  {}", plaintext.expose())?;
    writeln!(
        out,
        "  ^ This is the only time the full key is shown. Store it now: it cannot be recovered."
    )
}

/// `API key` or `token`.
pub fn noun(info: &KeyInfo) -> &'static str {
    if info.id.starts_with("tok_") {
        "token"
    } else {
        "API key"
    }
}

/// The few fields worth showing right after a create.
fn key_summary(info: &KeyInfo) -> Table {
    let mut t = Table::bare();
    t.row(["name", info.name.as_str()]);
    t.row(["owner", info.owner.as_str()]);
    t.row(["masked", info.masked.as_str()]);
    if info.id.starts_with("tok_") {
        t.row(["type", &kind_label(&info.kind)]);
    }
    t.row([
        "permissions".to_owned(),
        list_or(&info.permissions, "(none)"),
    ]);
    t.row(["credits".to_owned(), credits(info)]);
    t.row(["expires".to_owned(), opt_time(info.expires_at, "never")]);
    t
}

/// Every public field of a key, one per line.
pub fn print_key(info: &KeyInfo) {
    let mut t = Table::bare();
    t.row(["id", info.id.as_str()]);
    t.row(["type", &kind_label(&info.kind)]);
    t.row(["class", &json_label(&info.class)]);
    t.row(["owner", info.owner.as_str()]);
    t.row(["name", info.name.as_str()]);
    t.row(["masked", info.masked.as_str()]);
    t.row(["status", status(info)]);
    t.row([
        "permissions".to_owned(),
        list_or(&info.permissions, "(none)"),
    ]);
    t.row(["ip allowlist".to_owned(), list_or(&info.ips, "(any)")]);
    t.row(["credits".to_owned(), credits(info)]);
    limit_rows(&mut t, &info.limits);
    for (k, v) in &info.metadata {
        t.row(["metadata".to_owned(), format!("{k}={v}")]);
    }
    t.row([
        "created".to_owned(),
        format!("{} by {}", time(info.created_at), info.created_by),
    ]);
    t.row([
        "updated".to_owned(),
        format!("{} by {}", time(info.updated_at), info.updated_by),
    ]);
    t.row(["expires".to_owned(), opt_time(info.expires_at, "never")]);
    t.row(["disabled".to_owned(), opt_time(info.disabled_at, "no")]);
    t.row(["last used".to_owned(), opt_time(info.last_used_at, "never")]);
    if let Some(until) = info.previous_secret_valid_until {
        t.row(["old secret until".to_owned(), time(until)]);
    }
    t.row(["hash scheme", info.hash_scheme.as_str()]);
    t.print();
}

/// Refill, low-balance threshold, rate limits and token window, one row each when set.
fn limit_rows(t: &mut Table, limits: &Limits) {
    if let Some(refill) = limits.refill {
        t.row(["refill".to_owned(), refill_text(refill)]);
    }
    if let Some(threshold) = limits.low_balance_threshold {
        t.row(["low balance at".to_owned(), threshold.to_string()]);
    }
    for rl in &limits.rate_limits {
        t.row([
            "rate limit".to_owned(),
            format!("{}: {}/{}s", rl.name, rl.limit, rl.window_secs),
        ]);
    }
    if let Some(tw) = limits.token_window {
        t.row([
            "token window".to_owned(),
            format!("{} tokens/{}s", tw.tokens, tw.window_secs),
        ]);
    }
}

/// `1000 daily` / `1000 monthly`: the balance a refill sets.
pub fn refill_text(refill: Refill) -> String {
    let every = match refill.interval {
        RefillInterval::Daily => "daily",
        RefillInterval::Monthly => "monthly",
    };
    format!("balance set to {} {every}", refill.amount)
}

/// A table of keys, masked; the status is as of `now`.
pub fn key_table<'a>(keys: impl IntoIterator<Item = &'a KeyInfo>, now: Timestamp) -> Table {
    let mut t = Table::new(["ID", "NAME", "KEY", "STATUS", "PERMISSIONS", "CREATED"]);
    for k in keys {
        t.row([
            k.id.to_string(),
            k.name.clone(),
            k.masked.clone(),
            status_at(k, now).to_owned(),
            list_or(&k.permissions, "-"),
            time(k.created_at),
        ]);
    }
    t
}

/// `active`, `disabled` or `expired`, as of the system clock.
pub fn status(info: &KeyInfo) -> &'static str {
    status_at(info, SystemClock.now())
}

/// `active`, `disabled` or `expired`, as of `now`.
pub fn status_at(info: &KeyInfo, now: Timestamp) -> &'static str {
    if info.disabled_at.is_some() {
        "disabled"
    } else if info.expires_at.is_some_and(|at| at <= now) {
        "expired"
    } else {
        "active"
    }
}

/// What is left, and what the key started with (not a bound: top-ups and refills add to
/// it), or `unmetered`.
fn credits(info: &KeyInfo) -> String {
    match (info.remaining_credits, info.limits.credits, &info.pool) {
        (Some(left), _, Some(pool)) => format!("{left} left in pool {pool} (shared)"),
        (Some(left), Some(start), None) => format!("{left} left (started with {start})"),
        (Some(left), None, None) => format!("{left} left"),
        (None, _, _) => "unmetered".to_owned(),
    }
}

/// Every public field of an account, one per line.
pub fn print_account(a: &Account) {
    let mut t = Table::bare();
    t.row(["id", a.id.as_str()]);
    t.row(["name", a.name.as_str()]);
    t.row(["status", a.status.as_str()]);
    t.row([
        "entitlements".to_owned(),
        list_or(&a.entitlements, "(none)"),
    ]);
    t.row([
        "created".to_owned(),
        format!("{} by {}", time(a.created_at), a.created_by),
    ]);
    t.row([
        "updated".to_owned(),
        format!("{} by {}", time(a.updated_at), a.updated_by),
    ]);
    t.print();
}

/// A table of accounts.
pub fn account_table<'a>(accounts: impl IntoIterator<Item = &'a Account>) -> Table {
    let mut t = Table::new(["ID", "NAME", "STATUS", "ENTITLEMENTS", "CREATED"]);
    for a in accounts {
        t.row([
            a.id.to_string(),
            a.name.clone(),
            a.status.as_str().to_owned(),
            list_or(&a.entitlements, "-"),
            time(a.created_at),
        ]);
    }
    t
}

/// A table of route rules.
pub fn route_table<'a>(rules: impl IntoIterator<Item = &'a RouteRule>) -> Table {
    let mut t = Table::new([
        "PREFIX",
        "PERMISSION",
        "ENTITLEMENT",
        "COST",
        "PRICE (µ/unit)",
    ]);
    for r in rules {
        t.row([
            r.prefix.clone(),
            r.permission.clone().unwrap_or_else(|| "-".into()),
            r.entitlement.clone().unwrap_or_else(|| "-".into()),
            r.cost.to_string(),
            r.price_micros.to_string(),
        ]);
    }
    t
}

/// A pool, one field per line.
pub fn pool_table(pool: &Pool) -> Table {
    let mut t = Table::bare();
    t.row(["id", pool.id.as_str()]);
    t.row(["owner", pool.owner.as_str()]);
    t.row(["name", pool.name.as_str()]);
    t.row(["credits".to_owned(), pool.remaining.to_string()]);
    if let Some(refill) = pool.refill {
        t.row(["refill".to_owned(), refill_text(refill)]);
    }
    if let Some(threshold) = pool.low_balance_threshold {
        t.row(["low balance at".to_owned(), threshold.to_string()]);
    }
    t
}

/// Credit and usage state of a key or pool, one field per line. A key that spends from a
/// pool shows the pool's credits left and no balance figures (it has no balance of its own).
pub fn usage_table(u: &Usage) -> Table {
    let mut t = Table::bare();
    t.row(["id", u.id.as_str()]);
    let account = u.id.starts_with("acct_");
    let remaining = match (u.remaining, &u.pool) {
        _ if account => "no balance of its own (its keys' usage summed below)".to_owned(),
        (Some(n), Some(pool)) => format!("{n} credits, drawn from pool {pool} (shared)"),
        (Some(n), None) => format!("{n} credits"),
        (None, _) => "unmetered".to_owned(),
    };
    t.row(["remaining".to_owned(), remaining]);
    if u.pool.is_none() && !account {
        t.row(["granted".to_owned(), u.granted.to_string()]);
        t.row(["spent".to_owned(), u.spent.to_string()]);
        t.row(["lost to crash".to_owned(), u.lost_to_crash.to_string()]);
        t.row(["leased".to_owned(), u.leased.to_string()]);
    }
    if !u.id.starts_with("pool_") {
        t.row(["requests".to_owned(), u.requests.to_string()]);
        t.row(["lifetime spent".to_owned(), u.lifetime_spent.to_string()]);
        t.row(["last used".to_owned(), opt_time(u.last_used_at, "never")]);
    }
    t
}

/// `requests: 4 left · tokens: 90 left · tier 100%` (limits the key does not have are left out).
pub fn rate_text(state: &RateState) -> String {
    let mut parts = Vec::new();
    if let Some(n) = state.requests_remaining {
        parts.push(format!("{n} requests left"));
    }
    if let Some(n) = state.tokens_remaining {
        parts.push(format!("{n} tokens left"));
    }
    if parts.is_empty() {
        parts.push("no limits".to_owned());
    }
    if state.tier > 0 {
        parts.push(format!(
            "spend tier {} ({}%)",
            state.tier, state.tier_multiplier_pct
        ));
    }
    parts.join(" · ")
}

/// A receipt as two lines' worth of rows: what was charged and what it costs.
pub fn receipt_rows(t: &mut Table, receipt: &Receipt) {
    let stats = &receipt.token_stats;
    let left = stats
        .remaining_credits
        .map_or_else(|| "unmetered".to_owned(), |n| format!("{n} credits left"));
    t.row([
        "token_stats".to_owned(),
        format!(
            "used {}, charged {}, uncovered {}; {left}",
            stats.used, stats.charged, stats.uncovered
        ),
    ]);
    let p = &receipt.pricing;
    t.row([
        "pricing".to_owned(),
        format!(
            "{} × {} µ = {} µ",
            p.units, p.unit_price_micros, p.total_micros
        ),
    ]);
}

/// A table of an owner's connections: metadata only (the vault never returns tokens here).
pub fn connection_table<'a>(connections: impl IntoIterator<Item = &'a ConnectionInfo>) -> Table {
    let mut t = Table::new([
        "PROVIDER", "SCOPES", "EXPIRES", "HEALTH", "REFRESH", "UPDATED",
    ]);
    for c in connections {
        let health = match c.health_reason {
            Some(reason) => format!("{} ({})", c.health.as_str(), reason.as_str()),
            None => c.health.as_str().to_owned(),
        };
        t.row([
            c.provider.as_str().to_owned(),
            list_or(&c.scopes, "-"),
            opt_time(c.expires_at, "-"),
            health,
            if c.has_refresh_token { "yes" } else { "no" }.to_owned(),
            time(c.updated_at),
        ]);
    }
    t
}

/// A table of an owner's secrets: names, hosts, versions and dates, never values.
pub fn secret_table<'a>(secrets: impl IntoIterator<Item = &'a SecretInfo>) -> Table {
    let mut t = Table::new([
        "NAME",
        "ALLOWED HOSTS",
        "VERSION",
        "CREATED",
        "UPDATED",
        "ROTATED",
    ]);
    for s in secrets {
        t.row([
            s.name.clone(),
            list_or(&s.allowed_hosts, "-"),
            s.version.to_string(),
            time(s.created_at),
            time(s.updated_at),
            opt_time(s.rotated_at, "-"),
        ]);
    }
    t
}

/// A table of audit events.
pub fn audit_table<'a>(events: impl IntoIterator<Item = &'a AuditEvent>) -> Table {
    let mut t = Table::new(["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "FIELDS"]);
    for e in events {
        t.row([
            e.seq.to_string(),
            time(e.at),
            e.actor.clone(),
            e.action.clone(),
            e.target.clone(),
            list_or(&e.fields, ""),
        ]);
    }
    t
}

/// Prints `next cursor: …` under a page when there is one.
pub fn print_next_cursor(cursor: Option<&str>, command_hint: &str) {
    match cursor {
        Some(c) => println!("\nnext page: {command_hint} --cursor {c}"),
        None => println!("\n(end of list)"),
    }
}

/// Items joined by `, `, or `empty` when there are none.
pub fn list_or<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I, empty: &str) -> String {
    let joined: Vec<String> = items.into_iter().map(|s| s.as_ref().to_owned()).collect();
    if joined.is_empty() {
        empty.to_owned()
    } else {
        joined.join(", ")
    }
}

/// The serde string form of a unit-like enum (`live`, `api`…).
/// `api key`, or `token (service)` for a token of type `service`.
fn kind_label(kind: &KeyKind) -> String {
    match kind {
        KeyKind::Api => "api key".into(),
        KeyKind::Token { token_type } => format!("token ({token_type})"),
    }
}

fn json_label<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// An optional timestamp, or `none`.
pub fn opt_time(at: Option<Timestamp>, none: &str) -> String {
    at.map_or_else(|| none.to_owned(), time)
}

/// A timestamp as `YYYY-MM-DD HH:MM:SSZ` (UTC).
pub fn time(at: Timestamp) -> String {
    let secs = at.as_millis() / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`, for non-negative day counts).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Masks a plaintext key the way listings do: first 12 and last 4 characters.
pub fn mask(plaintext: &str) -> String {
    let chars: Vec<char> = plaintext.chars().collect();
    if chars.len() <= 16 {
        return "…".to_owned();
    }
    let head: String = chars[..12].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_as_utc() {
        assert_eq!(time(Timestamp(0)), "1970-01-01 00:00:00Z");
        assert_eq!(time(Timestamp(951_782_400_000)), "2000-02-29 00:00:00Z");
        assert_eq!(time(Timestamp(1_767_225_599_000)), "2025-12-31 23:59:59Z");
    }

    #[test]
    fn tables_align_on_characters() {
        let mut t = Table::new(["A", "B"]);
        t.row(["x…y", "1"]);
        t.row(["long cell", "2"]);
        assert_eq!(t.render(), "A          B\nx…y        1\nlong cell  2\n");
    }

    /// A name from a damaged or hostile file cannot clear the screen or fake a line (found
    /// by a reviewer).
    #[test]
    fn cells_show_terminal_controls_as_escapes() {
        let mut t = Table::bare();
        t.row(["name", "\u{1b}[2J\u{1b}[Hfiller\nok  key_x\u{202E}\u{200F}"]);
        assert_eq!(
            t.render(),
            "name  \\u{1b}[2J\\u{1b}[Hfiller\\u{a}ok  key_x\\u{202e}\\u{200f}\n"
        );
    }

    #[test]
    fn masking_keeps_only_the_visible_parts() {
        let key = "vb_live_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789wxyz";
        assert_eq!(mask(key), "vb_live_ABCD…wxyz");
        assert_eq!(mask("short"), "…");
    }
}
