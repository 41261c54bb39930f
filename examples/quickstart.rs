//! The README's library example: open a ledger, set a route rule, create an account and a
//! metered key, then verify and charge a request the way server middleware would.
//! Run: `cargo run --example quickstart`.

use keyledger::{Config, Ledger, NewAccount, NewKey, Presented, Request, RouteRule};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?; // a real server: a fixed path and Config::from_env()?
    let ledger = Ledger::open(dir.path().join("keys.redb"), Config::ephemeral()?)?;
    ledger
        .routes()
        .set(RouteRule::new("/api/v1/quickhits/").permission("quickhits:create"))?;

    let account = ledger.accounts().create(NewAccount::new("Acme Inc"))?;
    let created = ledger.keys().by("alice").create(
        NewKey::new(account.id, "CI deploy key")
            .permissions(["quickhits:*"])
            .credits(100),
    )?;
    println!("new key (shown once): {}", created.plaintext.expose());
    println!("stored as: {} ({})", created.info.masked, created.info.id);

    // Per request, in middleware: take the key from `Authorization` or `x-api-key`.
    let header = format!("Bearer {}", created.plaintext.expose());
    let presented = Presented::from_headers(Some(&header), None)?;
    let request = Request::new(&presented, "/api/v1/quickhits/create").cost(5);
    match ledger.verify(&request) {
        Ok(grant) => {
            // ...do the work, then settle what it really cost...
            let receipt = grant.commit(3);
            println!("charged {} credits", receipt.token_stats.charged);
        }
        Err(denial) => println!("denied: {} (HTTP {})", denial.code(), denial.http_status()),
    }
    let forbidden = Request::new(&presented, "/api/v1/quickhits/create");
    ledger.keys().update(
        &created.info.id,
        keyledger::KeyUpdate::new().permissions(["other"]),
    )?;
    let denial = ledger.verify(&forbidden).unwrap_err();
    println!(
        "after revoking the permission: {} (HTTP {})",
        denial.code(),
        denial.http_status()
    );
    println!(
        "credits left: {:?}",
        ledger.credits().usage(&created.info.id)?.remaining
    );
    Ok(())
}
