//! End-to-end tests of the `keyledger` binary: each runs the real executable against a
//! database in a temporary directory.

use std::path::PathBuf;
use std::process::{Command, Output};

use keyledger::MasterKey;
use serde_json::Value;

/// A scratch directory with a database path and a master key in the environment.
struct Scratch {
    _dir: tempfile::TempDir,
    db: PathBuf,
    master_key: String,
}

impl Scratch {
    /// A fresh directory; the database is not created yet.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("test.redb");
        let master_key = MasterKey::generate()
            .expect("random")
            .to_hex()
            .expose()
            .to_owned();
        Scratch {
            _dir: dir,
            db,
            master_key,
        }
    }

    /// A fresh directory with an initialised database.
    fn initialised() -> Self {
        let s = Scratch::new();
        let out = s.run(&["init"]);
        assert_success(&out);
        s
    }

    /// The binary with `--db` set and no master key, key file or database in the environment.
    fn bare_command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keyledger"));
        cmd.env_remove("KEYLEDGER_DB")
            .env_remove("KEYLEDGER_MASTER_KEY")
            .env_remove("KEYLEDGER_MASTER_KEY_FILE")
            .arg("--db")
            .arg(&self.db);
        cmd
    }

    /// Runs the binary with `KEYLEDGER_MASTER_KEY` set.
    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = self.bare_command();
        cmd.env("KEYLEDGER_MASTER_KEY", &self.master_key).args(args);
        cmd.output().expect("run keyledger")
    }

    /// Runs with `--json` and parses stdout.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert_success(&out);
        serde_json::from_slice(&out.stdout).expect("stdout is JSON")
    }

    /// Creates an account and returns its id.
    fn account(&self, name: &str) -> String {
        string(&self.json(&["accounts", "create", "--name", name])["id"])
    }

    /// Creates a key and returns (id, plaintext).
    fn key(&self, owner: &str, name: &str) -> (String, String) {
        let v = self.json(&["keys", "create", "--owner", owner, "--name", name]);
        (string(&v["id"]), string(&v["key"]))
    }
}

fn string(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
        .to_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        stdout(out),
        stderr(out)
    );
}

#[test]
fn init_creates_the_database_and_a_private_key_file() {
    let s = Scratch::new();
    let out = s.bare_command().arg("init").output().expect("run");
    assert_success(&out);
    let key_file = PathBuf::from(format!("{}.key", s.db.display()));
    assert!(s.db.exists(), "database created");
    assert!(key_file.exists(), "key file created");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    assert!(stdout(&out).contains(&key_file.display().to_string()));

    // The key file next to the database is found without any configuration.
    let out = s
        .bare_command()
        .args(["accounts", "list"])
        .output()
        .expect("run");
    assert_success(&out);

    // A second init refuses to overwrite.
    let out = s.bare_command().arg("init").output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"));
}

#[test]
fn init_with_a_master_key_in_the_environment_writes_no_key_file() {
    let s = Scratch::new();
    assert_success(&s.run(&["init"]));
    assert!(s.db.exists());
    assert!(!PathBuf::from(format!("{}.key", s.db.display())).exists());
}

#[test]
fn accounts_create_json_has_a_public_id() {
    let s = Scratch::initialised();
    let v = s.json(&[
        "accounts",
        "create",
        "--name",
        "Acme",
        "--entitlement",
        "quickhits",
    ]);
    assert!(string(&v["id"]).starts_with("acct_"), "{v}");
    assert_eq!(v["name"], "Acme");
    assert_eq!(v["status"], "active");
    let shown = s.json(&["accounts", "show", &string(&v["id"])]);
    assert_eq!(shown["id"], v["id"]);
}

#[test]
fn keys_create_json_includes_the_plaintext_once() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let v = s.json(&[
        "keys",
        "create",
        "--owner",
        &owner,
        "--name",
        "CI deploy",
        "--permission",
        "quickhits:*",
        "--credits",
        "100",
        "--metadata",
        "team=infra",
        "--rate-limit",
        "requests=10/60",
    ]);
    assert!(string(&v["id"]).starts_with("key_"), "{v}");
    assert!(string(&v["key"]).starts_with("vb_live_"), "{v}");
    assert_eq!(v["remaining_credits"], 100);
    assert_eq!(v["metadata"]["team"], "infra");

    // `show` never carries the plaintext.
    let shown = s.json(&["keys", "show", &string(&v["id"])]);
    assert!(shown.get("key").is_none());
    assert!(!shown.to_string().contains(&string(&v["key"])));
}

#[test]
fn keys_list_shows_masked_keys_never_plaintext() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let (id, plaintext) = s.key(&owner, "first");
    let masked = string(&s.json(&["keys", "show", &id])["masked"]);
    let out = s.run(&["keys", "list", "--owner", &owner]);
    assert_success(&out);
    let text = stdout(&out);
    assert!(text.contains(&masked), "{text}");
    assert!(!text.contains(&plaintext), "plaintext leaked: {text}");
    for args in [
        vec!["keys", "show", id.as_str()],
        vec!["audit"],
        vec!["keys", "find", &plaintext[..12]],
    ] {
        let out = s.run(&args);
        assert_success(&out);
        assert!(
            !stdout(&out).contains(&plaintext),
            "plaintext leaked by {args:?}"
        );
    }
}

#[test]
fn pagination_follows_the_cursor_without_repeats() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let created: Vec<String> = (0..5)
        .map(|i| s.key(&owner, &format!("key {i}")).0)
        .collect();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut args = vec!["keys", "list", "--owner", &owner, "--limit", "2"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let page = s.json(&args);
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 2);
        seen.extend(items.iter().map(|k| string(&k["id"])));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, created);

    // The human listing prints the next cursor.
    let out = s.run(&["keys", "list", "--owner", &owner, "--limit", "2"]);
    assert!(stdout(&out).contains("--cursor "), "{}", stdout(&out));

    let out = s.run(&["keys", "list", "--owner", &owner, "--cursor", "forged"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cursor"));
}

#[test]
fn a_disabled_key_is_denied_with_exit_code_3() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let (id, plaintext) = s.key(&owner, "soon disabled");
    let out = s.run(&["authenticate", &plaintext]);
    assert_success(&out);
    assert!(stdout(&out).contains(&id));

    assert_success(&s.run(&["keys", "disable", &id]));
    let out = s.run(&["authenticate", &plaintext]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout(&out).contains("disabled"), "{}", stdout(&out));

    assert_success(&s.run(&["keys", "enable", &id]));
    assert_success(&s.run(&["authenticate", &plaintext]));
}

#[test]
fn a_rolled_key_prints_its_new_plaintext_and_the_old_one_stops() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let (id, old) = s.key(&owner, "rolled");
    let v = s.json(&["keys", "roll", &id]);
    let new = string(&v["key"]);
    assert_ne!(new, old);
    assert_success(&s.run(&["authenticate", &new]));
    let out = s.run(&["authenticate", &old]);
    assert_eq!(out.status.code(), Some(3));
    assert!(stdout(&out).contains("not_found"));
}

#[test]
fn a_mistyped_key_is_malformed() {
    let s = Scratch::initialised();
    let out = s.run(&["--json", "authenticate", "vb_live_nope"]);
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["code"], "malformed");
}

#[test]
fn a_missing_master_key_is_a_clear_error() {
    let s = Scratch::initialised();
    let out = s
        .bare_command()
        .args(["accounts", "list"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("KEYLEDGER_MASTER_KEY"), "{err}");
    assert!(err.contains(".key"), "{err}");
}

#[test]
fn a_51_character_name_is_refused_cleanly() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let name = "x".repeat(51);
    let out = s.run(&["keys", "create", "--owner", &owner, "--name", &name]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: ") && err.contains("50 characters"),
        "{err}"
    );
    let out = s.run(&["accounts", "create", "--name", &name]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn bad_input_is_an_error_never_a_panic() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let cases: Vec<Vec<&str>> = vec![
        vec!["keys", "show", "key_forged"],
        vec!["keys", "show", &owner],
        vec!["accounts", "show", "acct_"],
        vec!["keys", "list", "--owner", "nobody"],
        vec![
            "keys",
            "create",
            "--owner",
            &owner,
            "--name",
            "x",
            "--ip",
            "999.0.0.1",
        ],
        vec!["keys", "find", "vb"],
        vec!["routes", "set", "no-slash"],
        vec!["routes", "remove", "/missing"],
        vec!["keys", "update", "key_forged", "--name", "x"],
    ];
    for args in cases {
        let out = s.run(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("error: "),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{args:?}");
    }
    let out = s.run(&[
        "keys", "import", "--owner", &owner, "--name", "x", "--sha256", "zz", "--prefix", "p",
        "--suffix", "s",
    ]);
    assert_eq!(out.status.code(), Some(2), "usage error");
}

#[test]
fn tokens_routes_and_hash_rotation() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let t = s.json(&[
        "tokens", "create", "--owner", &owner, "--name", "hook", "--type", "webhook",
    ]);
    assert!(string(&t["id"]).starts_with("tok_"));
    assert_eq!(t["type"], "webhook");
    assert_success(&s.run(&["authenticate", &string(&t["key"])]));

    let rule = s.json(&[
        "routes",
        "set",
        "/api/v1/",
        "--permission",
        "read",
        "--cost",
        "3",
    ]);
    assert_eq!(rule["cost"], 3);
    assert_eq!(
        s.json(&["routes", "list"]).as_array().map(Vec::len),
        Some(1)
    );

    let (_, plaintext) = s.key(&owner, "old pepper");
    assert_success(&s.run(&["keys", "rotate-hash", "--pepper", "2"]));
    assert_success(&s.run(&["authenticate", &plaintext]));
    let status = s.json(&["keys", "hash-status"]);
    assert_eq!(status["current"], "hmac-sha256/v2");
    assert_eq!(status["schemes"]["hmac-sha256/v2"], 1, "{status}");
}

#[test]
fn check_passes_on_a_healthy_database() {
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    s.key(&owner, "one");
    let out = s.run(&["check"]);
    assert_success(&out);
    assert!(stdout(&out).contains("check: ok"));
    assert_eq!(s.json(&["check"])["ok"], true);
}

#[test]
fn demo_runs_without_setup_and_prints_a_summary() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .env_remove("KEYLEDGER_MASTER_KEY")
        .env_remove("KEYLEDGER_MASTER_KEY_FILE")
        .env_remove("KEYLEDGER_DB")
        .current_dir(dir.path())
        .arg("demo")
        .output()
        .expect("run");
    assert_success(&out);
    let text = stdout(&out);
    for expected in [
        "Summary",
        "not_found",
        "disabled",
        "expired",
        "malformed",
        "check: ok",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("ls").count(),
        0,
        "demo wrote no files here"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_keyledger"))
        .env_remove("KEYLEDGER_MASTER_KEY")
        .args(["--json", "demo"])
        .output()
        .expect("run");
    assert_success(&out);
    let v: Value = serde_json::from_slice(&out.stdout).expect("json summary");
    assert_eq!(v["check_ok"], true);
    assert_eq!(v["pages_walked"], 3);
}

#[test]
fn authenticate_reads_the_key_from_stdin() {
    use std::io::Write;
    use std::process::Stdio;
    let s = Scratch::initialised();
    let owner = s.account("Acme");
    let (id, plaintext) = s.key(&owner, "piped");
    let mut cmd = s.bare_command();
    cmd.env("KEYLEDGER_MASTER_KEY", &s.master_key)
        .args(["authenticate", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "{plaintext}").expect("write");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert_success(&out);
    assert!(stdout(&out).contains(&id));
}
