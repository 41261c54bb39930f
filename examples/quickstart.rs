//! The README's library example: open a ledger, create an account and a key, then identify
//! a request's key the way server middleware would. Run: `cargo run --example quickstart`.

use keyledger::{Config, Ledger, NewAccount, NewKey, Presented};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?; // a real server: a fixed path and Config::from_env()?
    let ledger = Ledger::open(dir.path().join("keys.redb"), Config::ephemeral()?)?;

    let account = ledger.accounts().create(NewAccount::new("Acme Inc"))?;
    let created = ledger.keys().by("alice").create(
        NewKey::new(&account.id, "CI deploy key")
            .permissions(["quickhits:create"])
            .credits(10_000),
    )?;
    println!("new key (shown once): {}", created.plaintext.expose());
    println!("stored as: {} ({})", created.info.masked, created.info.id);

    // Per request, in middleware: take the key from `Authorization` or `x-api-key`.
    let header = format!("Bearer {}", created.plaintext.expose());
    let presented = Presented::from_headers(Some(&header), None)?;
    match ledger.authenticate(&presented) {
        Ok(key) => println!("authenticated {} owned by {}", key.id, key.owner),
        Err(denial) => println!("denied: {} (HTTP {})", denial.code(), denial.http_status()),
    }
    Ok(())
}
