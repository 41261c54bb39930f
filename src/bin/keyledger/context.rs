//! Where the database and master key come from: master-key resolution, opening the ledger,
//! and `init`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use keyledger::{
    Config, ConfigError, ENV_MASTER_KEY, Ledger, MasterKey, names_a_master_key, shown_path,
};
use zeroize::Zeroizing;

use crate::cli::Prefixes;
use crate::output::print_json;
use crate::{CliError, CliResult};

/// The global options every command needs.
pub struct Context {
    /// The database file.
    pub db: PathBuf,
    /// `--key-file` (or `KEYLEDGER_MASTER_KEY_FILE`).
    pub key_file: Option<PathBuf>,
    /// JSON output.
    pub json: bool,
    /// Key prefixes (`None`: the defaults).
    pub prefixes: Prefixes,
    /// Who makes the changes (`--by`, default `cli`).
    pub actor: String,
}

/// Where a master key was found.
enum KeySource {
    Env,
    File(PathBuf),
}

impl Context {
    /// The default key file: `<db>.key`, next to the database.
    pub fn default_key_file(&self) -> PathBuf {
        let mut name = OsString::from(self.db.as_os_str());
        name.push(".key");
        PathBuf::from(name)
    }

    /// Refuses, before anything is read or made, a `--db` or `--key-file` whose file name is
    /// a master key (64 hex digits: the path and `KEYLEDGER_MASTER_KEY` swapped, or the key
    /// pasted where the path goes). Otherwise `init` creates files named
    /// by the key and prints their names, and every later listing of the directory shows it.
    pub fn refuse_master_keys_as_paths(&self) -> CliResult<()> {
        let given = [
            ("--db (KEYLEDGER_DB)", Some(&self.db)),
            (
                "--key-file (KEYLEDGER_MASTER_KEY_FILE)",
                self.key_file.as_ref(),
            ),
        ];
        for (what, path) in given {
            if path.is_some_and(|p| names_a_master_key(p)) {
                return Err(CliError::new(format!(
                    "{what} holds what looks like a master key (64 hex digits), not a path: not \
                     shown; give the file's path there, and the key in KEYLEDGER_MASTER_KEY or \
                     a key file"
                )));
            }
        }
        Ok(())
    }

    /// Resolves the master key: `KEYLEDGER_MASTER_KEY` (unless empty), else `--key-file`,
    /// else `<db>.key`.
    fn master_key(&self) -> CliResult<(MasterKey, KeySource)> {
        if let Some(key) = env_master_key(std::env::var_os(ENV_MASTER_KEY))? {
            return Ok((key, KeySource::Env));
        }
        let path = match &self.key_file {
            Some(path) => path.clone(),
            None => {
                let default = self.default_key_file();
                if !default.exists() {
                    return Err(missing_key(&default));
                }
                default
            }
        };
        let key = MasterKey::from_file(&path).map_err(|e| match e {
            // The others name the file already.
            ConfigError::MasterKeyEncoding { .. }
            | ConfigError::MasterKeyNotHex { .. }
            | ConfigError::MasterKeyLength { .. } => {
                CliError::new(format!("key file {}: {e}", shown_path(&path)))
            }
            e => e.into(),
        })?;
        Ok((key, KeySource::File(path)))
    }

    /// The config for this database.
    pub fn config(&self) -> CliResult<Config> {
        let (key, _) = self.master_key()?;
        let p = &self.prefixes;
        // Read as `Config::from_env` reads the same variables: trimmed, blank as unset.
        let given = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        let mut builder = Config::builder().master_key(key);
        if let Some(prefix) = given(&p.live_prefix) {
            builder = builder.live_prefix(prefix);
        }
        if let Some(prefix) = given(&p.test_prefix) {
            builder = builder.test_prefix(prefix);
        }
        if let Some(prefix) = given(&p.token_prefix) {
            builder = builder.token_prefix(prefix);
        }
        for prefix in p.legacy_prefixes.iter().map(|p| p.trim()) {
            if !prefix.is_empty() {
                builder = builder.legacy_prefix(prefix);
            }
        }
        Ok(builder.build()?)
    }

    /// Opens the existing database; refuses to create one implicitly.
    pub fn open(&self) -> CliResult<Ledger> {
        self.require_db()?;
        Ledger::open(&self.db, self.config()?).map_err(|e| self.explain(e))
    }

    /// `e`, with what to do when the database is held by another process.
    pub fn explain(&self, e: keyledger::Error) -> CliError {
        match e {
            keyledger::Error::InUse => CliError::new(format!(
                "another process (your server?) has {} open; stop it, or manage keys through \
                 the server",
                shown_path(&self.db)
            )),
            e => e.into(),
        }
    }

    /// Fails unless the database file exists and is not empty (an empty file, say from a
    /// failed copy, would otherwise become a new ledger that looks healthy).
    pub fn require_db(&self) -> CliResult<()> {
        if std::fs::metadata(&self.db).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        if self.db.exists() {
            return Err(CliError::new(format!(
                "{} is empty: not a database (restore it, or remove it and run `keyledger init`)",
                shown_path(&self.db)
            )));
        }
        Err(CliError::new(format!(
            "no database at {}: run `keyledger init` first, or pass --db / set KEYLEDGER_DB",
            shown_path(&self.db)
        )))
    }
}

/// The master key in `KEYLEDGER_MASTER_KEY`'s value, if it holds one. Empty or blank counts
/// as unset (`KEYLEDGER_MASTER_KEY=` is a common way to leave it out); errors name the
/// variable, never the value.
fn env_master_key(value: Option<OsString>) -> CliResult<Option<MasterKey>> {
    let Some(value) = value else {
        return Ok(None);
    };
    let text = Zeroizing::new(
        value
            .into_string()
            .map_err(|_| CliError::new(format!("{ENV_MASTER_KEY} is not valid UTF-8")))?,
    );
    if text.trim().is_empty() {
        return Ok(None);
    }
    let key =
        MasterKey::parse(&text).map_err(|e| CliError::new(format!("{ENV_MASTER_KEY}: {e}")))?;
    Ok(Some(key))
}

/// The missing-key error, with the default key file it also looked for.
fn missing_key(default: &Path) -> CliError {
    CliError::new(format!(
        "{}; without either, keyledger reads {} next to the database",
        ConfigError::MissingMasterKey,
        shown_path(default)
    ))
}

/// `init`: creates the database and, unless a key is configured, a new key file `<db>.key`.
pub fn init(ctx: &Context) -> CliResult<u8> {
    if ctx.db.exists() {
        return Err(CliError::new(format!(
            "{} already exists; `init` never overwrites a database",
            shown_path(&ctx.db)
        )));
    }
    let (key, source, written) = init_key(ctx)?;
    let config = Config::builder().master_key(key).build()?;
    if let Err(e) = Ledger::open(&ctx.db, config).and_then(|ledger| ledger.close()) {
        if let Some(path) = &written {
            let _ = std::fs::remove_file(path);
        }
        return Err(e.into());
    }
    report_init(ctx, &source, written.is_some())
}

/// The key `init` uses: the configured one, or a new one written to a new key file.
fn init_key(ctx: &Context) -> CliResult<(MasterKey, KeySource, Option<PathBuf>)> {
    if let Some(key) = env_master_key(std::env::var_os(ENV_MASTER_KEY))? {
        return Ok((key, KeySource::Env, None));
    }
    if ctx.key_file.as_ref().is_some_and(|p| p.exists()) {
        let (key, source) = ctx.master_key()?;
        return Ok((key, source, None));
    }
    let path = ctx
        .key_file
        .clone()
        .unwrap_or_else(|| ctx.default_key_file());
    let key = MasterKey::generate()?;
    key.write_new_file(&path)?;
    Ok((key, KeySource::File(path.clone()), Some(path)))
}

/// Tells the user where the database and key are and how to use them.
fn report_init(ctx: &Context, source: &KeySource, wrote_key: bool) -> CliResult<u8> {
    let key_file = match source {
        KeySource::File(p) => Some(p),
        KeySource::Env => None,
    };
    let is_default = key_file.is_some_and(|p| *p == ctx.default_key_file());
    let key_file = key_file.map(|p| shown_path(p));
    if ctx.json {
        let value = serde_json::json!({
            "database": shown_path(&ctx.db),
            "key_file": key_file,
            "key_file_created": wrote_key,
            "master_key_from_env": key_file.is_none(),
        });
        print_json(&value)?;
        return Ok(0);
    }
    println!("Created database  {}", shown_path(&ctx.db));
    match (key_file, wrote_key) {
        (Some(path), true) => {
            println!(
                "Created key file  {path}  (mode 0600: the master key; back it up, keep it private)"
            );
            if is_default {
                println!(
                    "\nkeyledger finds `<db>.key` next to the database by itself. Elsewhere, use"
                );
            } else {
                println!("\nGive every later command the same key file:");
            }
            println!("  --key-file {path}   or   KEYLEDGER_MASTER_KEY_FILE={path}");
        }
        (Some(path), false) => println!("Master key from    {path}"),
        (None, _) => println!("Master key from    {ENV_MASTER_KEY} (no key file written)"),
    }
    println!(
        "\nNext: keyledger --db {} accounts create --name \"Acme\"",
        shown_path(&ctx.db)
    );
    Ok(0)
}
