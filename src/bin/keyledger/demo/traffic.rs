//! The demo's traffic sections: verify → commit with a receipt, a refund, a pool shared by
//! two keys, and every denial code in chain order.

use std::net::{IpAddr, Ipv4Addr};

use keyledger::{NewKey, NewPool, SubscriptionStatus, Usage};

use super::Demo;
use super::probe::{Outcome, Probe, Settle};
use super::tour::{Accounts, EXPIRES_IN_SECS, QUICKHITS, mistype};
use crate::output::{Table, list_or, rate_text};
use crate::verify::retry_after_secs;
use crate::{CliError, CliResult};

/// Every denial code `verify` gives, in the order the chain checks them (DESIGN §4).
pub(super) const DENIAL_CODES: [&str; 10] = [
    "malformed",
    "not_found",
    "disabled",
    "expired",
    "forbidden",
    "ip_not_allowed",
    "subscription_inactive",
    "not_entitled",
    "rate_limited",
    "usage_exceeded",
];

/// The pool's starting credits.
const POOL_CREDITS: u64 = 10;

impl Demo {
    /// 7. A request's life: verify reserves, commit settles, a dropped grant refunds.
    pub(super) fn commit_and_refund(&mut self) -> CliResult<()> {
        self.section("7. Verify, do the work, commit (or drop the grant to refund)");
        let key = self.plaintext("CI deploy");
        let reserve = Probe::on(QUICKHITS).cost(3).settle(Settle::Actual(2));
        let outcome = self.verify(&key, &reserve, "granted")?;
        let Outcome::Granted {
            view,
            receipt: Some(receipt),
        } = &outcome
        else {
            return Err(CliError::new("demo: a committed grant has a receipt"));
        };
        self.say(format!(
            "  verify \"CI deploy\" {QUICKHITS}, reserving 3 → granted {}",
            view.key_id
        ));
        self.say(format!(
            "    owner {} · permissions {} · {} credits left · {}",
            view.owner,
            list_or(&view.permissions, "-"),
            view.remaining_credits.unwrap_or_default(),
            rate_text(&view.rate_limit)
        ));
        let (stats, price) = (receipt.token_stats, receipt.pricing);
        self.say(format!(
            "  commit(2) → receipt  token_stats: used {}, charged {}, uncovered {}, {} left",
            stats.used,
            stats.charged,
            stats.uncovered,
            stats.remaining_credits.unwrap_or_default()
        ));
        self.say(format!(
            "                       pricing: {} × {} µ = {} µ",
            price.units, price.unit_price_micros, price.total_micros
        ));
        let refund = Probe::on(QUICKHITS).cost(5).settle(Settle::Drop);
        let held = self.verify(&key, &refund, "granted")?.remaining();
        let after = self.usage(&self.id("CI deploy"))?;
        self.say(format!(
            "  verify reserving 5 ({} left while held), then drop the grant (the work failed)",
            held.unwrap_or_default()
        ));
        self.say(format!(
            "    → refunded: {} left",
            after.remaining.unwrap_or_default()
        ));
        let peek = self.verify(&key, &Probe::on(QUICKHITS).cost(0), "granted")?;
        self.say(format!(
            "  verify with cost 0 (a peek) → granted, {} left",
            peek.remaining().unwrap_or_default()
        ));
        let usage = self.usage(&self.id("CI deploy"))?;
        self.say(format!("  usage {}:", usage.id));
        self.say(format!("    {}", usage_line(&usage)));
        Ok(())
    }

    /// 8. Two keys spending one pool.
    pub(super) fn pool(&mut self, acme: &str) -> CliResult<()> {
        self.section("8. A credit pool shared by two keys");
        let pool = self
            .ledger
            .credits()
            .by("demo")
            .create_pool(NewPool::new(acme, "Acme shared").credits(POOL_CREDITS))?;
        self.summary.pools_created += 1;
        self.pool_id = pool.id.to_string();
        for name in ["Worker A", "Worker B"] {
            let key = self.ledger.keys().by("demo").create(
                NewKey::new(acme, name)
                    .permissions(["quickhits:create"])
                    .pool(pool.id),
            )?;
            self.summary.keys_created += 1;
            self.remember(&key.info, key.plaintext);
        }
        self.say(format!(
            "  pool {} \"Acme shared\": {POOL_CREDITS} credits; \"Worker A\" and \"Worker B\" spend from it",
            pool.id
        ));
        for (name, cost) in [("Worker A", 6), ("Worker B", 3)] {
            let key = self.plaintext(name);
            let outcome = self.verify(&key, &Probe::on(QUICKHITS).cost(cost), "granted")?;
            self.say(format!(
                "  verify \"{name}\", cost {cost}, commit → pool has {} left",
                outcome.remaining().unwrap_or_default()
            ));
        }
        let usage = self.usage(&pool.id)?;
        self.say(format!("  usage {}:", usage.id));
        self.say(format!("    {}", usage_line(&usage)));
        Ok(())
    }

    /// 9. Each denial code once, in chain order, with a grant where a fix lets it through.
    pub(super) fn denials(&mut self, accounts: &Accounts) -> CliResult<()> {
        self.section("9. Every denial, in the order verify checks (stable codes)");
        let mut rows = Table::new(["OUTCOME", "HTTP", "REQUEST"]).indent(2);
        let ci = self.plaintext("CI deploy");
        let quick = Probe::on(QUICKHITS);

        let typo = mistype(&ci);
        let o = self.verify(&typo, &quick, "malformed")?;
        row(&mut rows, &o, "\"CI deploy\" with one character mistyped");

        self.ledger.keys().by("demo").delete(&self.id("Staging"))?;
        self.summary.keys_deleted += 1;
        let o = self.verify(&self.plaintext("Staging"), &quick, "not_found")?;
        row(&mut rows, &o, "\"Staging\", just deleted");

        let legacy = self.id("Legacy cron");
        self.ledger.keys().by("demo").disable(&legacy)?;
        self.summary.keys_disabled += 1;
        let o = self.verify(&self.plaintext("Legacy cron"), &quick, "disabled")?;
        row(&mut rows, &o, "\"Legacy cron\", just disabled");

        self.clock.advance_secs(EXPIRES_IN_SECS);
        let reports = Probe::on("/api/v1/reports/daily");
        let o = self.verify(&self.plaintext("Partner sync"), &reports, "expired")?;
        row(
            &mut rows,
            &o,
            "\"Partner sync\", clock +1 d past its expiry",
        );

        let weekly = Probe::on("/api/v1/reports/weekly");
        let o = self.verify(&ci, &weekly, "forbidden")?;
        row(
            &mut rows,
            &o,
            "\"CI deploy\" (quickhits:*) on /api/v1/reports/…",
        );

        let analytics = self.plaintext("Analytics export");
        let outside = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        let o = self.verify(&analytics, &reports.from(outside), "ip_not_allowed")?;
        row(
            &mut rows,
            &o,
            "\"Analytics export\" from 203.0.113.7 (allows 10.0.0.0/8)",
        );
        let inside = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let o = self.verify(&analytics, &reports.from(inside), "granted")?;
        row(&mut rows, &o, "  … the same key from 10.1.2.3");

        self.ledger.accounts().by("demo").update(
            &accounts.globex,
            keyledger::AccountUpdate::new().status(SubscriptionStatus::Canceled),
        )?;
        let o = self.verify(
            &self.plaintext("Globex prod"),
            &quick,
            "subscription_inactive",
        )?;
        row(&mut rows, &o, "\"Globex prod\" (*), after Globex canceled");

        let exports = Probe::on("/api/v1/exports/csv");
        let o = self.verify(&ci, &exports, "not_entitled")?;
        row(
            &mut rows,
            &o,
            "\"CI deploy\" on /api/v1/exports/ (Acme lacks `exports`)",
        );

        self.rate_limited(&mut rows)?;
        self.exhausted(&mut rows)?;

        self.table(&rows);
        let all = DENIAL_CODES
            .iter()
            .all(|code| self.summary.denials.contains_key(*code));
        if !all {
            return Err(CliError::new("demo: a denial code was not shown"));
        }
        Ok(())
    }

    /// `rate_limited`: a burst on "Mobile app" (5 requests per 60 s) until one is refused.
    fn rate_limited(&mut self, rows: &mut Table) -> CliResult<()> {
        let key = self.plaintext("Mobile app");
        let probe = Probe::on(QUICKHITS);
        let mut granted = 0;
        let o = loop {
            match self.verify_any(&key, &probe)? {
                Outcome::Granted { .. } if granted < 10 => granted += 1,
                other => break other,
            }
        };
        if o.code() != "rate_limited" {
            return Err(CliError::new(format!(
                "demo: burst on \"Mobile app\": expected rate_limited, got {}",
                o.code()
            )));
        }
        let wait = match &o {
            Outcome::Denied(d) => d.retry_after().map(retry_after_secs).unwrap_or_default(),
            Outcome::Granted { .. } => 0,
        };
        row(
            rows,
            &o,
            &format!(
                "\"Mobile app\" (5 per 60 s): {granted} granted in a burst, the next waits {wait} s"
            ),
        );
        Ok(())
    }

    /// `usage_exceeded`: the shared pool cannot cover a request; a top-up lets it through.
    fn exhausted(&mut self, rows: &mut Table) -> CliResult<()> {
        let key = self.plaintext("Worker B");
        let probe = Probe::on(QUICKHITS).cost(2);
        let left = self.usage(&self.pool_id.clone())?.remaining.unwrap_or(0);
        let o = self.verify(&key, &probe, "usage_exceeded")?;
        row(
            rows,
            &o,
            &format!("\"Worker B\" asking 2 credits, the shared pool has {left}"),
        );
        let pool = self.pool_id.clone();
        self.ledger.credits().by("demo").top_up(&pool, 100)?;
        self.summary.top_ups += 1;
        let o = self.verify(&key, &probe, "granted")?;
        row(rows, &o, "  … after `credits top-up` of the pool by 100");
        Ok(())
    }

    /// Credit and usage figures of a key or pool.
    fn usage(&self, id: &str) -> CliResult<Usage> {
        Ok(self.ledger.credits().usage(id)?)
    }
}

/// Adds one outcome to the denial table.
fn row(rows: &mut Table, outcome: &Outcome, request: &str) {
    let (what, status) = match outcome {
        Outcome::Granted { .. } => ("granted".to_owned(), "200".to_owned()),
        Outcome::Denied(d) => (d.code().to_owned(), d.http_status().to_string()),
    };
    rows.row([what, status, request.to_owned()]);
}

/// `9,998 of 10,000 granted left · 2 spent · 0 lost to crash · 3 requests`.
fn usage_line(u: &Usage) -> String {
    let remaining = u
        .remaining
        .map_or_else(|| "unmetered".to_owned(), |n| n.to_string());
    let mut line = format!(
        "remaining {remaining} · granted {} · spent {} · lost_to_crash {} · leased {}",
        u.granted, u.spent, u.lost_to_crash, u.leased
    );
    if !u.id.starts_with("pool_") {
        line.push_str(&format!(" · requests {}", u.requests));
    }
    line
}
