//! Model-based tests: proptest sequences of public API operations (create, verify + commit or
//! refund at random costs, top-up, set, disable, enable, delete, rename, usage, paginated
//! listing, deleting the keys' account) run against a ledger and a plain reference model; balances, key states, denial
//! codes and pagination results must agree after every step. Failing sequences shrink to a
//! minimal one (and proptest records it under `proptest-regressions/`).

use keyledger::{
    Config, Durability, Error, KeyUpdate, Ledger, ManualClock, MasterKey, NewAccount, NewKey,
    PageRequest, Presented, RefillInterval, Request, Timestamp,
};
use proptest::prelude::*;

const START: Timestamp = Timestamp(1_750_000_000_000);

#[derive(Debug, Clone)]
enum Op {
    Create {
        credits: Option<u8>,
    },
    Verify {
        key: usize,
        cost: u8,
        actual: u8,
        commit: bool,
    },
    TopUp {
        key: usize,
        units: u8,
    },
    Set {
        key: usize,
        units: u8,
    },
    Disable {
        key: usize,
    },
    Enable {
        key: usize,
    },
    Delete {
        key: usize,
    },
    Rename {
        key: usize,
        n: u8,
    },
    Usage {
        key: usize,
    },
    List {
        limit: u8,
    },
    /// Deletes the account: refused while a key of it is left.
    DeleteAccount,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => proptest::option::of(0u8..40).prop_map(|credits| Op::Create { credits }),
        8 => (any::<usize>(), 0u8..6, 0u8..9, any::<bool>())
            .prop_map(|(key, cost, actual, commit)| Op::Verify { key, cost, actual, commit }),
        2 => (any::<usize>(), 0u8..20).prop_map(|(key, units)| Op::TopUp { key, units }),
        1 => (any::<usize>(), 0u8..20).prop_map(|(key, units)| Op::Set { key, units }),
        1 => any::<usize>().prop_map(|key| Op::Disable { key }),
        1 => any::<usize>().prop_map(|key| Op::Enable { key }),
        1 => any::<usize>().prop_map(|key| Op::Delete { key }),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(key, n)| Op::Rename { key, n }),
        2 => any::<usize>().prop_map(|key| Op::Usage { key }),
        1 => (1u8..5).prop_map(|limit| Op::List { limit }),
        1 => Just(Op::DeleteAccount),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone)]
struct MKey {
    id: String,
    plaintext: String,
    name: String,
    credits: Option<u64>,
    granted: u64,
    spent: u64,
    disabled: bool,
    deleted: bool,
}

fn config(clock: &ManualClock, durability: Durability) -> Config {
    Config::builder()
        .master_key(MasterKey::from_bytes(&[9u8; 32]).unwrap())
        .clock(clock.clone())
        .durability(durability)
        .build()
        .unwrap()
}

fn run(ops: &[Op], durability: Durability) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.redb");
    let clock = ManualClock::new(START);
    let mut ledger = Ledger::open(&path, config(&clock, durability)).unwrap();
    let account = ledger
        .accounts()
        .create(NewAccount::new("Acme"))
        .unwrap()
        .id
        .to_string();
    let mut keys: Vec<MKey> = Vec::new();
    let mut account_deleted = false;
    for op in ops {
        let pick = |i: usize| (!keys.is_empty()).then(|| i % keys.len());
        match *op {
            Op::Create { credits } => {
                let name = format!("key {}", keys.len());
                let mut new = NewKey::new(&account, &name);
                if let Some(c) = credits {
                    new = new.credits(u64::from(c));
                }
                let created = match ledger.keys().create(new) {
                    Err(Error::NotFound { what: "account" }) if account_deleted => continue,
                    created => created.unwrap(),
                };
                prop_assert!(!account_deleted, "a key made for a deleted account");
                keys.push(MKey {
                    id: created.info.id.to_string(),
                    plaintext: created.plaintext.expose().to_owned(),
                    name,
                    credits: credits.map(u64::from),
                    granted: credits.map_or(0, u64::from),
                    spent: 0,
                    disabled: false,
                    deleted: false,
                });
            }
            Op::Verify {
                key,
                cost,
                actual,
                commit,
            } => {
                let Some(i) = pick(key) else { continue };
                let (cost, actual) = (u64::from(cost), u64::from(actual));
                let k = &mut keys[i];
                let presented = Presented::new(&k.plaintext).unwrap();
                let result = ledger.verify(&Request::new(&presented, "/api/run").cost(cost));
                let expected = if k.deleted {
                    "not_found"
                } else if k.disabled {
                    "disabled"
                } else if k.credits.is_some_and(|c| cost > 0 && cost > c) {
                    "usage_exceeded"
                } else {
                    "ok"
                };
                let got = result.as_ref().map_or_else(|d| d.code(), |_| "ok");
                prop_assert_eq!(got, expected, "verify k{} cost {}", i, cost);
                if let Ok(grant) = result {
                    if commit {
                        let receipt = grant.commit(actual);
                        let expected_charge = match k.credits {
                            None => actual,
                            Some(c) => actual.min(c),
                        };
                        prop_assert_eq!(receipt.token_stats.charged, expected_charge);
                        if let Some(c) = k.credits.as_mut() {
                            *c -= expected_charge;
                            k.spent += expected_charge;
                            prop_assert_eq!(receipt.token_stats.remaining_credits, Some(*c));
                        }
                    } else {
                        drop(grant);
                    }
                }
            }
            Op::TopUp { key, units } | Op::Set { key, units } => {
                let Some(i) = pick(key) else { continue };
                let k = &mut keys[i];
                let units = u64::from(units);
                let top_up = matches!(op, Op::TopUp { .. });
                let result = if top_up {
                    ledger.credits().top_up(&k.id, units)
                } else {
                    ledger.credits().set(&k.id, units)
                };
                match (&mut k.credits, k.deleted, result) {
                    (_, true, Err(Error::NotFound { .. })) => {}
                    // An unmetered key has no balance to change, and says so.
                    (None, false, Err(Error::InvalidInput { field: "id", .. })) => {}
                    (Some(c), false, Ok(balance)) => {
                        if top_up {
                            *c += units;
                            k.granted += units;
                        } else {
                            k.granted = k.granted - *c + units;
                            *c = units;
                        }
                        prop_assert_eq!(balance, *c);
                    }
                    (_, _, other) => prop_assert!(false, "adjust k{}: {:?}", i, other),
                }
            }
            Op::Disable { key } | Op::Enable { key } => {
                let Some(i) = pick(key) else { continue };
                let k = &mut keys[i];
                let disable = matches!(op, Op::Disable { .. });
                let result = if disable {
                    ledger.keys().disable(&k.id)
                } else {
                    ledger.keys().enable(&k.id)
                };
                if k.deleted {
                    prop_assert!(
                        matches!(result, Err(Error::NotFound { .. })),
                        "expected not found"
                    );
                } else {
                    prop_assert_eq!(result.unwrap().disabled_at.is_some(), disable);
                    k.disabled = disable;
                }
            }
            Op::Delete { key } => {
                let Some(i) = pick(key) else { continue };
                let k = &mut keys[i];
                let result = ledger.keys().delete(&k.id);
                if k.deleted {
                    prop_assert!(
                        matches!(result, Err(Error::NotFound { .. })),
                        "expected not found"
                    );
                } else {
                    prop_assert!(result.is_ok());
                    k.deleted = true;
                }
            }
            Op::Rename { key, n } => {
                let Some(i) = pick(key) else { continue };
                let k = &mut keys[i];
                let name = format!("renamed {n}");
                let result = ledger.keys().update(&k.id, KeyUpdate::new().name(&name));
                if k.deleted {
                    prop_assert!(
                        matches!(result, Err(Error::NotFound { .. })),
                        "expected not found"
                    );
                } else {
                    prop_assert_eq!(&result.unwrap().name, &name);
                    k.name = name;
                }
            }
            Op::Usage { key } => {
                let Some(i) = pick(key) else { continue };
                let k = &keys[i];
                match (ledger.credits().usage(&k.id), k.deleted) {
                    (Err(Error::NotFound { .. }), true) => {}
                    (Ok(u), false) => {
                        prop_assert_eq!(u.remaining, k.credits);
                        if k.credits.is_some() {
                            prop_assert_eq!(u.granted, k.granted);
                            prop_assert_eq!(u.spent, k.spent);
                            prop_assert_eq!(u.lost_to_crash, 0);
                        }
                    }
                    (other, deleted) => {
                        prop_assert!(false, "usage {:?} deleted={}", other, deleted)
                    }
                }
            }
            Op::List { limit } => {
                let mut listed = Vec::new();
                let mut page = PageRequest::first().limit(usize::from(limit));
                loop {
                    let p = match ledger.keys().list(&account, &page) {
                        Err(Error::NotFound { what: "account" }) if account_deleted => break,
                        p => p.unwrap(),
                    };
                    prop_assert!(p.items.len() <= usize::from(limit));
                    listed.extend(p.items.into_iter().map(|k| (k.id.to_string(), k.name)));
                    match p.next_cursor {
                        Some(c) => page = PageRequest::first().limit(usize::from(limit)).after(c),
                        None => break,
                    }
                }
                let expected: Vec<(String, String)> = keys
                    .iter()
                    .filter(|k| !k.deleted)
                    .map(|k| (k.id.clone(), k.name.clone()))
                    .collect();
                prop_assert_eq!(listed, expected);
            }
            Op::DeleteAccount => {
                let left = keys.iter().filter(|k| !k.deleted).count();
                match (ledger.accounts().delete(&account), account_deleted, left) {
                    (Ok(()), false, 0) => account_deleted = true,
                    (Err(Error::NotFound { what: "account" }), true, 0) => {}
                    (Err(Error::Conflict(said)), false, n) if n > 0 => {
                        let plural = if n == 1 { "" } else { "s" };
                        let owns = format!("still owns {n} key{plural}:");
                        prop_assert!(said.contains(&owns), "{}", said);
                    }
                    (other, deleted, n) => {
                        prop_assert!(
                            false,
                            "delete account {:?} deleted={} left={}",
                            other,
                            deleted,
                            n
                        )
                    }
                }
            }
            Op::Reopen => {
                ledger.close().unwrap();
                drop(ledger);
                ledger = Ledger::open(&path, config(&clock, durability)).unwrap();
            }
        }
        // Key states after every step.
        for (i, k) in keys.iter().enumerate() {
            match ledger.keys().get(&k.id) {
                Ok(info) => {
                    prop_assert!(!k.deleted, "k{} is back", i);
                    prop_assert_eq!(&info.name, &k.name);
                    prop_assert_eq!(info.disabled_at.is_some(), k.disabled);
                    prop_assert_eq!(info.remaining_credits, k.credits, "k{}", i);
                }
                Err(Error::NotFound { .. }) => prop_assert!(k.deleted, "k{} is missing", i),
                Err(e) => prop_assert!(false, "get k{}: {}", i, e),
            }
        }
    }
    drop(ledger);
    let report = Ledger::check(&path, config(&clock, durability)).unwrap();
    prop_assert!(report.is_ok(), "{:?}", report.problems);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn public_api_matches_the_model_leased(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops, Durability::Leased)?;
    }

    #[test]
    fn public_api_matches_the_model_exact(ops in prop::collection::vec(op(), 1..40)) {
        run(&ops, Durability::Exact)?;
    }
}

/// A refill *replaces* the balance each period (DESIGN §5): in a new month a key can spend
/// the refill amount, no more. Units leased into memory in the previous month must not stay
/// spendable on top of it.
#[test]
fn a_refilled_key_spends_at_most_the_refill_amount_in_a_new_period() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let ledger = Ledger::open(
        dir.path().join("r.redb"),
        config(&clock, Durability::Leased),
    )
    .unwrap();
    let account = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let created = ledger
        .keys()
        .create(
            NewKey::new(account.id, "monthly")
                .credits(10)
                .refill(10, RefillInterval::Monthly),
        )
        .unwrap();
    let presented = Presented::new(created.plaintext.expose()).unwrap();
    for _ in 0..2 {
        let _ = ledger
            .verify(&Request::new(&presented, "/r").cost(1))
            .unwrap()
            .commit(1);
    }
    clock.advance_secs(32 * 86_400);
    let mut granted_in_new_period = 0;
    for _ in 0..30 {
        match ledger.verify(&Request::new(&presented, "/r").cost(1)) {
            Ok(g) => {
                let _ = g.commit(1);
                granted_in_new_period += 1;
            }
            Err(d) => assert_eq!(d.code(), "usage_exceeded"),
        }
    }
    assert_eq!(
        granted_in_new_period, 10,
        "the new period's refill is 10 credits; {granted_in_new_period} were granted"
    );
}

/// Refills are "strictly ordered with manual top-ups and sets" (DESIGN §5): a `set` made after
/// a period began is not undone by that period's refill applied lazily afterwards.
#[test]
fn a_set_after_the_period_boundary_is_not_undone_by_the_lazy_refill() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let ledger = Ledger::open(
        dir.path().join("s.redb"),
        config(&clock, Durability::Leased),
    )
    .unwrap();
    let account = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let created = ledger
        .keys()
        .create(
            NewKey::new(account.id, "monthly")
                .credits(10)
                .refill(25, RefillInterval::Monthly),
        )
        .unwrap();
    clock.advance_secs(32 * 86_400);
    assert_eq!(ledger.credits().set(&created.info.id, 0).unwrap(), 0);
    let presented = Presented::new(created.plaintext.expose()).unwrap();
    let code = ledger
        .verify(&Request::new(&presented, "/r").cost(1))
        .map_or_else(|d| d.code(), |_| "ok");
    assert_eq!(
        code, "usage_exceeded",
        "set(0) after the boundary must stick"
    );
}
