//! The demo's requests: one [`Probe`] is one `verify` a server would make, settled the way a
//! server would settle it, counted in the summary.

use std::net::IpAddr;

use keyledger::{Denial, Ledger, Receipt, Request};

use super::Demo;
use crate::misc::present;
use crate::output::mask;
use crate::verify::GrantView;
use crate::{CliError, CliResult};

/// What happens to a grant once the "work" is done.
#[derive(Debug, Clone, Copy)]
pub(super) enum Settle {
    /// Commit the reserved cost.
    Reserved,
    /// Commit this actual cost.
    Actual(u64),
    /// Drop the grant uncommitted: the reservation is refunded.
    Drop,
}

/// One request: route, client address, cost and how to settle a grant.
#[derive(Debug, Clone, Copy)]
pub(super) struct Probe<'a> {
    route: &'a str,
    ip: Option<IpAddr>,
    cost: Option<u64>,
    settle: Settle,
}

impl<'a> Probe<'a> {
    /// A request for `route`, committed at the reserved cost.
    pub(super) fn on(route: &'a str) -> Self {
        Probe {
            route,
            ip: None,
            cost: None,
            settle: Settle::Reserved,
        }
    }

    /// From this client address.
    pub(super) fn from(mut self, ip: IpAddr) -> Self {
        self.ip = Some(ip);
        self
    }

    /// Reserving `cost` instead of the route's cost.
    pub(super) fn cost(mut self, cost: u64) -> Self {
        self.cost = Some(cost);
        self
    }

    /// Settled this way.
    pub(super) fn settle(mut self, settle: Settle) -> Self {
        self.settle = settle;
        self
    }
}

/// What a probe got.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Granted; the receipt unless the grant was dropped.
    Granted {
        view: Box<GrantView>,
        receipt: Option<Receipt>,
    },
    /// Refused.
    Denied(Denial),
}

impl Outcome {
    /// `granted`, or the denial's code.
    pub(super) fn code(&self) -> &'static str {
        match self {
            Outcome::Granted { .. } => "granted",
            Outcome::Denied(denial) => denial.code(),
        }
    }

    /// Credits left after the request (from the receipt, else the grant).
    pub(super) fn remaining(&self) -> Option<u64> {
        match self {
            Outcome::Granted {
                receipt: Some(r), ..
            } => r.token_stats.remaining_credits,
            Outcome::Granted { view, .. } => view.remaining_credits,
            Outcome::Denied(_) => None,
        }
    }

    /// `granted key_…`, or `denied: code (HTTP n)`.
    fn verdict(&self) -> String {
        match self {
            Outcome::Granted { view, .. } => format!("granted  {}", view.key_id),
            Outcome::Denied(d) => format!("denied: {} (HTTP {})", d.code(), d.http_status()),
        }
    }
}

/// Runs one verify and settles a grant as the probe says.
fn run(ledger: &Ledger, plaintext: &str, probe: &Probe<'_>) -> CliResult<Outcome> {
    let presented = match present(plaintext)? {
        Ok(p) => p,
        Err(denial) => return Ok(Outcome::Denied(denial)),
    };
    let mut request = Request::new(&presented, probe.route);
    if let Some(ip) = probe.ip {
        request = request.client_ip(ip);
    }
    if let Some(cost) = probe.cost {
        request = request.cost(cost);
    }
    let grant = match ledger.verify(&request) {
        Ok(grant) => grant,
        Err(denial) => return Ok(Outcome::Denied(denial)),
    };
    let view = GrantView::of(&grant);
    let receipt = match probe.settle {
        Settle::Reserved => Some(grant.commit(view.reserved)),
        Settle::Actual(cost) => Some(grant.commit(cost)),
        Settle::Drop => {
            drop(grant);
            None
        }
    };
    Ok(Outcome::Granted {
        view: Box::new(view),
        receipt,
    })
}

impl Demo {
    /// Verifies `plaintext`, counts the outcome, and stops the demo unless it is `want`
    /// (`granted` or a denial code).
    pub(super) fn verify(
        &mut self,
        plaintext: &str,
        probe: &Probe<'_>,
        want: &str,
    ) -> CliResult<Outcome> {
        let outcome = self.verify_any(plaintext, probe)?;
        if outcome.code() != want {
            return Err(CliError::new(format!(
                "demo: {} on {}: expected {want}, got {}",
                mask(plaintext),
                probe.route,
                outcome.code()
            )));
        }
        Ok(outcome)
    }

    /// Verifies `plaintext` and counts the outcome, whatever it is.
    pub(super) fn verify_any(&mut self, plaintext: &str, probe: &Probe<'_>) -> CliResult<Outcome> {
        let outcome = run(&self.ledger, plaintext, probe)?;
        match &outcome {
            Outcome::Granted { receipt, .. } => {
                self.summary.verifies_granted += 1;
                match receipt {
                    Some(r) => {
                        self.summary.grants_committed += 1;
                        self.summary.credits_charged += r.token_stats.charged;
                    }
                    None => self.summary.grants_refunded += 1,
                }
            }
            Outcome::Denied(denial) => {
                *self
                    .summary
                    .denials
                    .entry(denial.code().to_owned())
                    .or_default() += 1;
            }
        }
        Ok(outcome)
    }

    /// [`verify`](Self::verify), printing one aligned line.
    pub(super) fn expect(
        &mut self,
        label: &str,
        plaintext: &str,
        probe: &Probe<'_>,
        want: &str,
    ) -> CliResult<Outcome> {
        let outcome = self.verify(plaintext, probe, want)?;
        self.say(format!(
            "  verify {label:<26} {:<18} → {}",
            mask(plaintext),
            outcome.verdict()
        ));
        Ok(outcome)
    }

    /// [`expect`](Self::expect) with the stored plaintext of the key named `name`.
    pub(super) fn expect_named(
        &mut self,
        label: &str,
        name: &str,
        probe: &Probe<'_>,
        want: &str,
    ) -> CliResult<Outcome> {
        let plaintext = self.plaintext(name);
        self.expect(label, &plaintext, probe, want)
    }

    /// The stored plaintext of the key named `name` (empty if unknown), zeroized on drop.
    pub(super) fn plaintext(&self, name: &str) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(
            self.secrets
                .get(name)
                .map(|s| s.expose().to_owned())
                .unwrap_or_default(),
        )
    }
}
