//! The demo's sections, in order. Each is a small method on [`Demo`].

use std::collections::BTreeSet;
use std::path::Path;

use keyledger::{
    Config, HashScheme, ImportKey, ImportedHash, KeyUpdate, Ledger, NewAccount, NewKey,
    PageRequest, RouteRule, SubscriptionStatus,
};
use sha2::{Digest, Sha256};

use super::Demo;
use super::probe::Probe;
use crate::output::{
    Table, account_table, audit_table, key_table, list_or, mask, route_table, write_plaintext_once,
};
use crate::{CliError, CliResult};

/// Grace period of the rolled key.
const GRACE_SECS: u64 = 3600;
/// Lifetime of the key that expires during the tour.
pub(super) const EXPIRES_IN_SECS: u64 = 86_400;
/// A route every Acme key with `quickhits:create` may call.
pub(super) const QUICKHITS: &str = "/api/v1/quickhits/create";

/// The two accounts of the tour.
pub(super) struct Accounts {
    /// Acme Robotics: active, entitled to `quickhits` and `reports`.
    pub acme: String,
    /// Globex: trialing, no entitlements.
    pub globex: String,
}

impl Demo {
    /// Runs every section; `scratch` is the temporary directory.
    pub(super) fn tour(&mut self, scratch: &Path) -> CliResult<()> {
        let accounts = self.accounts()?;
        self.routes()?;
        self.issue(&accounts)?;
        self.paginate(&accounts.acme)?;
        self.update()?;
        self.roll()?;
        self.commit_and_refund()?;
        self.pool(&accounts.acme)?;
        self.denials(&accounts)?;
        self.import(scratch, &accounts.acme)?;
        self.rotate_pepper()?;
        self.audit_tail()
    }

    /// 1. Two accounts.
    fn accounts(&mut self) -> CliResult<Accounts> {
        self.section("1. Accounts (the owners of keys)");
        let accounts = self.ledger.accounts().by("demo");
        let acme = accounts
            .create(NewAccount::new("Acme Robotics").entitlements(["quickhits", "reports"]))?;
        let globex =
            accounts.create(NewAccount::new("Globex").status(SubscriptionStatus::Trialing))?;
        self.summary.accounts_created += 2;
        self.table(&account_table([&acme, &globex]).indent(2));
        Ok(Accounts {
            acme: acme.id.to_string(),
            globex: globex.id.to_string(),
        })
    }

    /// 2. Route rules.
    fn routes(&mut self) -> CliResult<()> {
        self.section("2. Route rules (longest prefix wins)");
        let routes = self.ledger.routes().by("demo");
        let rules = [
            rule("/api/v1/quickhits/", Some("quickhits:create"), "quickhits")
                .cost(1)
                .price_micros(200),
            rule("/api/v1/reports/", Some("reports:read"), "reports")
                .cost(5)
                .price_micros(1_000),
            rule("/api/v1/exports/", None, "exports").cost(10),
        ];
        for r in &rules {
            routes.set(r.clone())?;
            self.summary.routes_set += 1;
        }
        self.table(&route_table(&rules).indent(2));
        Ok(())
    }

    /// 3. Six keys and a token for Acme, one key for Globex.
    fn issue(&mut self, accounts: &Accounts) -> CliResult<()> {
        self.section("3. Issuing keys");
        let acme = accounts.acme.as_str();
        let expires = self.now().plus_secs(EXPIRES_IN_SECS);
        let new_keys = [
            NewKey::new(acme, "CI deploy")
                .permissions(["quickhits:*"])
                .credits(10_000),
            NewKey::new(acme, "Staging")
                .permissions(["quickhits:read"])
                .test(),
            NewKey::new(acme, "Mobile app")
                .permissions(["quickhits:create"])
                .rate_limit("requests", 5, 60),
            NewKey::new(acme, "Partner sync")
                .permissions(["reports:read"])
                .expires_at(expires),
            NewKey::new(acme, "Analytics export").permissions(["reports:read"]),
            NewKey::new(acme, "Legacy cron").permissions(["*"]),
            NewKey::new(&accounts.globex, "Globex prod").permissions(["*"]),
        ];
        let mut created = Vec::new();
        for new in new_keys {
            let key = self.ledger.keys().by("demo").create(new)?;
            if created.is_empty() {
                self.say("  The customer sees a new key's plaintext once (here, \"CI deploy\"):");
                if !self.json {
                    write_plaintext_once(&mut std::io::stdout().lock(), &key.plaintext)?;
                }
                self.say("  keyledger stores only its hash; from now on it is shown masked.\n");
            }
            self.summary.keys_created += 1;
            created.push(key.info.clone());
            self.remember(&key.info, key.plaintext);
        }
        let token = self.ledger.tokens().by("demo").create(
            NewKey::token(acme, "webhook", "Webhook signer").permissions(["webhooks:sign"]),
        )?;
        self.summary.tokens_created += 1;
        created.push(token.info.clone());
        self.remember(&token.info, token.plaintext);
        self.table(&key_table(&created, self.now()).indent(2));
        Ok(())
    }

    /// 4. Acme's keys three at a time, with a key created between pages.
    fn paginate(&mut self, acme: &str) -> CliResult<()> {
        self.section("4. Listing Acme's keys, 3 per page, while a new key is created");
        let mut seen: Vec<(u64, keyledger::KeyInfo)> = Vec::new();
        let mut request = PageRequest::first().limit(3);
        let mut late_id = None;
        loop {
            let page = self.ledger.keys().list(acme, &request)?;
            self.summary.pages_walked += 1;
            let number = self.summary.pages_walked;
            seen.extend(page.items.into_iter().map(|k| (number, k)));
            if number == 1 {
                late_id = Some(self.create_late_key(acme)?);
            }
            match page.next_cursor {
                Some(cursor) => request = PageRequest::first().limit(3).after(cursor),
                None => break,
            }
        }
        self.summary.keys_listed += seen.len() as u64;
        self.show_pages(&seen, late_id.as_deref())
    }

    /// Creates the key that appears while paging; returns its id.
    fn create_late_key(&mut self, acme: &str) -> CliResult<String> {
        let key = self
            .ledger
            .keys()
            .by("demo")
            .create(NewKey::new(acme, "Late arrival"))?;
        self.summary.keys_created += 1;
        self.say(format!(
            "  (after page 1: created \"Late arrival\" {})",
            key.info.id
        ));
        let id = key.info.id.to_string();
        self.remember(&key.info, key.plaintext);
        Ok(id)
    }

    /// Prints the pages and checks: no key twice, the late key on a later page.
    fn show_pages(&self, seen: &[(u64, keyledger::KeyInfo)], late: Option<&str>) -> CliResult<()> {
        let mut t = Table::new(["PAGE", "ID", "NAME", "KEY"]).indent(2);
        for (page, k) in seen {
            t.row([
                page.to_string(),
                k.id.to_string(),
                k.name.clone(),
                k.masked.clone(),
            ]);
        }
        self.table(&t);
        let unique: BTreeSet<&str> = seen.iter().map(|(_, k)| k.id.as_str()).collect();
        let late_page = seen
            .iter()
            .find(|(_, k)| Some(k.id.as_str()) == late)
            .map(|(p, _)| *p);
        if unique.len() != seen.len() || late_page.is_none_or(|p| p < 2) {
            return Err(CliError::new(
                "demo: pagination returned a key twice or lost one",
            ));
        }
        self.say(format!(
            "  {} keys on {} pages, none twice; \"Late arrival\" showed up on page {}.",
            seen.len(),
            self.summary.pages_walked,
            late_page.unwrap_or_default()
        ));
        Ok(())
    }

    /// 5. Rename a key, change its permissions, restrict it to an address range.
    fn update(&mut self) -> CliResult<()> {
        self.section("5. Updating a key");
        let id = self.id("Analytics export");
        let before = self.ledger.keys().get(&id)?;
        let after = self.ledger.keys().by("demo").update(
            &id,
            KeyUpdate::new()
                .name("Analytics export (EU)")
                .permissions(["reports:read", "reports:export"])
                .ips(["10.0.0.0/8"]),
        )?;
        self.summary.keys_updated += 1;
        let mut t = Table::new(["", "BEFORE", "AFTER"]).indent(2);
        t.row(["name", before.name.as_str(), after.name.as_str()]);
        t.row([
            "permissions".to_owned(),
            list_or(&before.permissions, "-"),
            list_or(&after.permissions, "-"),
        ]);
        t.row([
            "ip allowlist".to_owned(),
            list_or(&before.ips, "(any)"),
            list_or(&after.ips, "(any)"),
        ]);
        self.say(format!("  {id}"));
        self.table(&t);
        Ok(())
    }

    /// 6. Roll with a grace period: both secrets work, then only the new one.
    fn roll(&mut self) -> CliResult<()> {
        self.section("6. Rolling a key with a 1 h grace period");
        let id = self.id("Mobile app");
        let rolled = self.ledger.keys().by("demo").roll(&id, GRACE_SECS)?;
        self.summary.keys_rolled += 1;
        self.say(format!(
            "  rolled {id}: new secret {} (shown once to its owner)",
            rolled.info.masked
        ));
        let old = self.secrets.insert("Mobile app".into(), rolled.plaintext);
        let old = zeroize::Zeroizing::new(old.map(|s| s.expose().to_owned()).unwrap_or_default());
        let probe = Probe::on(QUICKHITS);
        self.expect("old secret (in grace)", &old, &probe, "granted")?;
        self.expect_named("new secret", "Mobile app", &probe, "granted")?;
        self.advance(GRACE_SECS + 1, "past the grace period");
        self.expect("old secret (grace over)", &old, &probe, "not_found")?;
        self.expect_named("new secret", "Mobile app", &probe, "granted")?;
        Ok(())
    }

    /// 10. Import a key from another system by its SHA-256; rehashed on first use.
    fn import(&mut self, scratch: &Path, acme: &str) -> CliResult<()> {
        self.section("10. Importing a key by its SHA-256 hash");
        let plaintext = legacy_key(scratch)?;
        let (prefix, suffix) = visible_parts(&plaintext);
        // Built in place: the only copy of the digest is the one wiped with `import`.
        let import = ImportKey::new(
            acme,
            "Imported from v1",
            ImportedHash::Sha256(Sha256::digest(plaintext.as_bytes()).into()),
            prefix,
            suffix,
        )
        .permissions(["quickhits:create"]);
        let info = self.ledger.keys().by("demo").import(import)?;
        self.summary.keys_imported += 1;
        self.say(format!(
            "  the old system knew {} only by SHA-256 → imported as {}, hash {}",
            mask(&plaintext),
            info.id,
            info.hash_scheme
        ));
        let probe = Probe::on(QUICKHITS);
        self.expect("imported key, first use", &plaintext, &probe, "granted")?;
        let after = self.ledger.keys().get(&info.id)?;
        self.note_rehash(&info.hash_scheme, &after.hash_scheme);
        Ok(())
    }

    /// Reports (and counts) a hash-scheme change.
    fn note_rehash(&mut self, before: &str, after: &str) {
        if before != after {
            self.summary.keys_rehashed += 1;
        }
        self.say(format!(
            "  hash scheme: {before} → {after} (rehashed on successful use)"
        ));
    }

    /// 11. Rotate the pepper: old keys keep working and move to v2 on use.
    fn rotate_pepper(&mut self) -> CliResult<()> {
        self.section("11. Rotating the hash pepper to v2");
        self.say(format!("  before: {}", self.scheme_counts()?));
        self.ledger
            .rotate_hash_scheme(HashScheme::HmacSha256 { pepper: 2 })?;
        self.say("  rotated: new keys are hashed with hmac-sha256/v2");
        let id = self.id("CI deploy");
        let before = self.ledger.keys().get(&id)?.hash_scheme;
        let probe = Probe::on(QUICKHITS).cost(0);
        self.expect_named("key issued under v1", "CI deploy", &probe, "granted")?;
        let after = self.ledger.keys().get(&id)?.hash_scheme;
        self.note_rehash(&before, &after);
        self.say(format!("  after:  {}", self.scheme_counts()?));
        Ok(())
    }

    /// `scheme ×count, …`
    fn scheme_counts(&self) -> CliResult<String> {
        let counts = self.ledger.hash_scheme_counts()?;
        let parts = counts
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(s, n)| format!("{} ×{n}", s.label()));
        Ok(parts.collect::<Vec<_>>().join(", "))
    }

    /// 12. The newest audit events, oldest first.
    fn audit_tail(&mut self) -> CliResult<()> {
        self.section("12. Audit trail (last 8 events; names and ids, never secrets)");
        let mut events = self.ledger.audit().recent(8)?;
        events.reverse();
        self.table(&audit_table(&events).indent(2));
        Ok(())
    }
}

/// A route rule needing `entitlement` and, if given, `permission`.
fn rule(prefix: &str, permission: Option<&str>, entitlement: &str) -> RouteRule {
    let rule = RouteRule::new(prefix).entitlement(entitlement);
    match permission {
        Some(p) => rule.permission(p),
        None => rule,
    }
}

/// A key issued by "another system": a throwaway ledger in the scratch directory.
fn legacy_key(scratch: &Path) -> CliResult<zeroize::Zeroizing<String>> {
    let legacy = Ledger::open(scratch.join("legacy.redb"), Config::ephemeral()?)?;
    let owner = legacy
        .accounts()
        .create(NewAccount::new("Legacy customer"))?;
    let key = legacy.keys().create(NewKey::new(owner.id, "Legacy key"))?;
    Ok(zeroize::Zeroizing::new(key.plaintext.expose().to_owned()))
}

/// The first 12 and last 4 characters of a key.
fn visible_parts(key: &str) -> (String, String) {
    let chars: Vec<char> = key.chars().collect();
    let head = chars.iter().take(12).collect();
    let tail = chars[chars.len().saturating_sub(4)..].iter().collect();
    (head, tail)
}

/// The key with one body character changed, as a typo would.
pub(super) fn mistype(key: &str) -> zeroize::Zeroizing<String> {
    let mut chars: Vec<char> = key.chars().collect();
    // Index 11 is the last visible character of the masked form, so the typo shows.
    if let Some(c) = chars.get_mut(11) {
        *c = if *c == 'x' { 'y' } else { 'x' };
    }
    zeroize::Zeroizing::new(chars.into_iter().collect())
}
