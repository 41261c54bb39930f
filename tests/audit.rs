//! The audit trail: one event per lifecycle change, with actor, action, public-id target,
//! changed field names and the clock's time; nothing for refused writes; never a secret.

mod common;

use common::*;
use keyledger::{
    AccountUpdate, AuditEvent, HashScheme, ImportKey, ImportedHash, KeyUpdate, NewAccount, NewKey,
    RouteRule, SubscriptionStatus,
};
use sha2::{Digest, Sha256};

/// `(actor, action, target, fields, at)` of an event, for compact comparisons.
fn summary(e: &AuditEvent) -> (String, String, String, Vec<String>, u64) {
    (
        e.actor.clone(),
        e.action.clone(),
        e.target.clone(),
        e.fields.clone(),
        e.at.as_millis(),
    )
}

fn ev(
    actor: &str,
    action: &str,
    target: &str,
    fields: &[&str],
    at: u64,
) -> (String, String, String, Vec<String>, u64) {
    let fields = fields.iter().map(|f| (*f).to_owned()).collect();
    (actor.into(), action.into(), target.into(), fields, at)
}

#[test]
fn every_key_lifecycle_change_is_audited_once_in_order() {
    let t = TestLedger::new();
    let s = |secs: u64| START.plus_secs(secs).as_millis();
    let owner = t
        .ledger
        .accounts()
        .by("ops")
        .create(NewAccount::new("Acme"))
        .unwrap()
        .id;

    t.clock.advance_secs(1);
    let created = t
        .ledger
        .keys()
        .by("alice")
        .create(NewKey::new(owner, "k").credits(5))
        .unwrap();
    let id = created.info.id.to_string();
    t.clock.advance_secs(1);
    let update = KeyUpdate::new()
        .name("renamed")
        .permissions(["a:*"])
        .credits(Some(9));
    t.ledger.keys().by("bob").update(&id, update).unwrap();
    t.clock.advance_secs(1);
    t.ledger.keys().by("carol").disable(&id).unwrap();
    t.clock.advance_secs(1);
    t.ledger.keys().by("carol").enable(&id).unwrap();
    t.clock.advance_secs(1);
    let rolled = t.ledger.keys().by("dave").roll(&id, 60).unwrap();
    t.clock.advance_secs(1);
    t.ledger.keys().by("erin").delete(&id).unwrap();

    let events = t.ledger.audit().since(0, 1000).unwrap();
    let got: Vec<_> = events.iter().map(summary).collect();
    assert_eq!(
        got,
        [
            ev("ops", "account.created", &owner, &[], s(0)),
            ev("alice", "key.created", &id, &[], s(1)),
            ev(
                "bob",
                "key.updated",
                &id,
                &["name", "permissions", "credits"],
                s(2)
            ),
            // The balance is set by the credit writer, after the settings: audited there, in
            // the order it took effect among other balance changes.
            ev("bob", "credits.set", &id, &["balance"], s(2)),
            ev("carol", "key.disabled", &id, &["disabled_at"], s(3)),
            ev("carol", "key.enabled", &id, &["disabled_at"], s(4)),
            ev("dave", "key.rolled", &id, &["secret"], s(5)),
            ev("erin", "key.deleted", &id, &[], s(6)),
        ]
    );
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=8).collect::<Vec<_>>(),
        "a gap-free sequence from 1"
    );
    for e in &events {
        let text = format!("{e:?}");
        assert!(!text.contains(created.plaintext.expose()));
        assert!(!text.contains(rolled.plaintext.expose()));
    }

    // `recent` is newest first; `since` pages forward.
    let recent = t.ledger.audit().recent(2).unwrap();
    assert_eq!(recent.iter().map(|e| e.seq).collect::<Vec<_>>(), [8, 7]);
    let after_three = t.ledger.audit().since(3, 2).unwrap();
    assert_eq!(
        after_three.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [4, 5]
    );
    assert!(t.ledger.audit().since(8, 10).unwrap().is_empty());
    assert!(t.ledger.audit().since(u64::MAX, 10).unwrap().is_empty());
    assert_eq!(t.ledger.audit().recent(usize::MAX).unwrap().len(), 8);
    assert!(t.ledger.audit().recent(0).unwrap().is_empty());
}

#[test]
fn tokens_accounts_routes_imports_and_rotations_are_audited() {
    let t = TestLedger::new();
    let acct = t
        .ledger
        .accounts()
        .create(NewAccount::new("Acme"))
        .unwrap()
        .id;
    let tok = t
        .ledger
        .tokens()
        .by("svc-admin")
        .create(NewKey::token(acct, "svc", "t"))
        .unwrap();
    let tok_id = tok.info.id.to_string();
    t.ledger.tokens().by("svc-admin").roll(&tok_id, 0).unwrap();
    t.ledger.tokens().by("svc-admin").delete(&tok_id).unwrap();

    let update = AccountUpdate::new()
        .status(SubscriptionStatus::PastDue)
        .entitlements(["x"]);
    t.ledger
        .accounts()
        .by("billing")
        .update(&acct, update)
        .unwrap();
    t.ledger
        .accounts()
        .by("billing")
        .set_status(&acct, SubscriptionStatus::Active)
        .unwrap();

    t.ledger
        .routes()
        .by("ops")
        .set(RouteRule::new("/api/").cost(2))
        .unwrap();
    t.ledger.routes().by("ops").remove("/api/").unwrap();

    let legacy = formatted_key("vb_live_", 5);
    let hash = ImportedHash::Sha256(Sha256::digest(legacy.as_bytes()).into());
    let import = ImportKey::new(acct, "old", hash, &legacy[..12], &legacy[42..]);
    let imported = t.ledger.keys().by("migrator").import(import).unwrap();
    t.ledger
        .rotate_hash_scheme(HashScheme::HmacSha256 { pepper: 2 })
        .unwrap();

    let events = t.ledger.audit().since(0, 1000).unwrap();
    let actions: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.actor.as_str(), e.action.as_str(), e.target.as_str()))
        .collect();
    assert_eq!(
        actions,
        [
            ("system", "account.created", acct.as_str()),
            ("svc-admin", "token.created", tok_id.as_str()),
            ("svc-admin", "token.rolled", tok_id.as_str()),
            ("svc-admin", "token.deleted", tok_id.as_str()),
            ("billing", "account.updated", acct.as_str()),
            ("billing", "account.updated", acct.as_str()),
            ("ops", "route.set", "/api/"),
            ("ops", "route.removed", "/api/"),
            ("migrator", "key.imported", imported.id.as_str()),
            ("system", "hash_scheme.rotated", "hmac-sha256/v2"),
        ]
    );
    assert_eq!(events[4].fields, ["status", "entitlements"]);
    assert_eq!(events[5].fields, ["status"]);

    // Authenticating (and the rehash it triggers) never logs the plaintext.
    assert!(t.auth(&legacy).is_ok());
    let all = format!("{:?}", t.ledger.audit().recent(1000).unwrap());
    assert!(!all.contains(&legacy) && !all.contains(&legacy[8..]));
    assert!(!all.contains(tok.plaintext.expose()));
}

#[test]
fn refused_writes_append_nothing_and_the_trail_survives_a_reopen() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let (key, _) = t.key(&owner, "k");
    let before = t.ledger.audit().recent(1000).unwrap();

    assert!(t.ledger.keys().create(NewKey::new(owner, "")).is_err());
    assert!(
        t.ledger
            .keys()
            .update(&key.id, KeyUpdate::new().ips(["nope"]))
            .is_err()
    );
    assert!(
        t.ledger
            .keys()
            .owned_by(&t.account("Other"))
            .unwrap()
            .delete(&key.id)
            .is_err()
    );
    let after_other_account = t.ledger.audit().recent(1000).unwrap();
    assert_eq!(
        after_other_account.len(),
        before.len() + 1,
        "only the new account"
    );
    assert!(t.ledger.keys().roll("key_forged", 0).is_err());
    assert!(t.ledger.routes().remove("/missing/").is_err());
    assert!(
        t.ledger
            .rotate_hash_scheme(HashScheme::Sha256Imported)
            .is_err()
    );
    assert!(
        t.ledger
            .accounts()
            .create(NewAccount::new("x").entitlements(["bad scope"]))
            .is_err()
    );
    assert_eq!(t.ledger.audit().recent(1000).unwrap(), after_other_account);

    let t = t.reopen();
    assert_eq!(t.ledger.audit().recent(1000).unwrap(), after_other_account);
    t.ledger.keys().disable(&key.id).unwrap();
    let newest = &t.ledger.audit().recent(1).unwrap()[0];
    assert_eq!(
        newest.seq,
        after_other_account[0].seq + 1,
        "the sequence continues"
    );
    assert_eq!(newest.action, "key.disabled");
}

/// Setting a route rule to what it already is appends nothing either (found by a
/// reviewer: it was audited with no fields changed); a real change is audited with its
/// fields.
#[test]
fn a_route_rule_set_again_unchanged_appends_nothing() {
    let t = TestLedger::new();
    let rule = RouteRule::new("/api/").permission("api:read").cost(2);
    t.ledger.routes().by("ops").set(rule.clone()).unwrap();
    let before = t.ledger.audit().recent(100).unwrap().len();
    t.ledger.routes().by("ops").set(rule.clone()).unwrap();
    assert_eq!(t.ledger.audit().recent(100).unwrap().len(), before);
    assert_invalid(t.ledger.routes().by("bell\u{7}").set(rule.clone()), "actor");
    t.ledger.routes().by("ops").set(rule.cost(3)).unwrap();
    let newest = &t.ledger.audit().recent(1).unwrap()[0];
    assert_eq!(
        (newest.action.as_str(), newest.fields.as_slice()),
        ("route.set", &["cost".to_owned()][..])
    );
}

/// An account update that changes nothing writes nothing: no event, no new `updated_at`
/// (as for keys).
#[test]
fn an_account_update_that_changes_nothing_appends_nothing() {
    let t = TestLedger::new();
    let acct = t.account("Acme");
    let before = t.ledger.audit().recent(100).unwrap().len();
    let info = t.ledger.accounts().get(&acct).unwrap();
    t.clock.advance_secs(5);
    for update in [
        AccountUpdate::new(),
        AccountUpdate::new().name("Acme"),
        AccountUpdate::new().status(info.status),
    ] {
        let after = t.ledger.accounts().by("ops").update(&acct, update).unwrap();
        assert_eq!(after.updated_at, info.updated_at);
    }
    assert_eq!(t.ledger.audit().recent(100).unwrap().len(), before);
}

/// A handle's `Debug` names its owner by public id, never by internal id.
#[test]
fn a_keys_handle_prints_its_owner_by_public_id() {
    let t = TestLedger::new();
    let acct = t.account("Acme");
    let printed = format!("{:?}", t.ledger.keys().owned_by(&acct).unwrap());
    assert!(printed.contains(acct.as_str()), "{printed}");
}

#[test]
fn an_actor_that_could_forge_an_audit_line_is_refused_and_changes_nothing() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let (id, _) = create_key(&t.ledger, NewKey::new(owner, "k").credits(10));
    let before = t.ledger.audit().recent(100).unwrap().len();
    let forged = "alice\n2026-11-30T15:06:40Z  admin  key.deleted  key_XXXX";
    let long = "x".repeat(255);
    let separated = forged.replace('\n', "\u{2028}");
    let reordered = "\u{202E}eteled.yek  nimda";
    for actor in [forged, &separated, reordered, &long, "", "  ", "bell\u{7}"] {
        assert_invalid(
            t.ledger
                .accounts()
                .by(actor)
                .create(keyledger::NewAccount::new("Other")),
            "actor",
        );
        assert_invalid(t.ledger.credits().by(actor).top_up(&id, 5), "actor");
        assert_invalid(
            t.ledger
                .keys()
                .by(actor)
                .update(&id, keyledger::KeyUpdate::new().credits(Some(20))),
            "actor",
        );
    }
    assert_eq!(t.ledger.audit().recent(100).unwrap().len(), before);
    assert_eq!(
        t.ledger.keys().get(&id).unwrap().remaining_credits,
        Some(10)
    );
    // An e-mail address, up to 254 characters, is an actor.
    let email = format!("{}@example.com", "a".repeat(242));
    t.ledger
        .credits()
        .by(email.as_str())
        .top_up(&id, 5)
        .unwrap();
    assert_eq!(t.ledger.audit().recent(1).unwrap()[0].actor, email);
}

#[test]
fn a_route_change_is_audited_with_the_fields_it_changed() {
    let t = TestLedger::new();
    let routes = t.ledger.routes();
    routes
        .set(RouteRule::new("/q/").permission("q:read"))
        .unwrap();
    routes
        .set(RouteRule::new("/q/").permission("q:read").price_micros(5))
        .unwrap();
    routes
        .set(RouteRule::new("/q/").price_micros(5).cost(2))
        .unwrap();
    let events = t.ledger.audit().recent(3).unwrap();
    let fields: Vec<Vec<String>> = events.iter().map(|e| e.fields.clone()).collect();
    assert_eq!(
        fields,
        [
            vec!["permission".to_owned(), "cost".to_owned()],
            vec!["price_micros".to_owned()],
            vec![
                "permission".to_owned(),
                "entitlement".to_owned(),
                "cost".to_owned(),
                "price_micros".to_owned()
            ],
        ],
        "newest first"
    );
}

#[test]
fn a_key_update_names_only_the_fields_it_changed() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let created = t
        .ledger
        .keys()
        .create(NewKey::new(owner, "k").permissions(["a:read"]).credits(100))
        .unwrap();
    let id = created.info.id.to_string();
    let fields = |update: KeyUpdate| {
        t.ledger.keys().update(&id, update).unwrap();
        t.ledger.audit().recent(1).unwrap()[0].fields.clone()
    };
    let passed_again = KeyUpdate::new()
        .name("k")
        .permissions(["a:read"])
        .expires_at(Some(t.now().plus_secs(60)));
    assert_eq!(fields(passed_again), ["expires_at"]);
    // Credits set a key's balance even at the plan's amount: the set is audited on its own,
    // after the settings, and the plan is not named, as it did not change.
    let renamed_and_reset = KeyUpdate::new().name("k2").credits(Some(100));
    assert_eq!(fields(renamed_and_reset), ["balance"]);
    let newest = t.ledger.audit().recent(2).unwrap();
    let seen: Vec<_> = newest
        .iter()
        .map(|e| (e.action.as_str(), e.fields.clone()))
        .collect();
    assert_eq!(
        seen,
        [
            ("credits.set", vec!["balance".to_owned()]),
            ("key.updated", vec!["name".to_owned()])
        ]
    );
}

#[test]
fn an_account_update_names_only_the_fields_it_changed() {
    let t = TestLedger::new();
    let acct = t.account("Acme");
    let update = AccountUpdate::new()
        .name("Acme")
        .status(SubscriptionStatus::PastDue);
    t.ledger.accounts().update(&acct, update).unwrap();
    let last = &t.ledger.audit().recent(1).unwrap()[0];
    assert_eq!(last.action, "account.updated");
    assert_eq!(last.fields, ["status"]);
}

/// A key update that resets the balance and a top-up racing it are recorded in the order
/// they took effect: whichever balance change the trail shows last is the one the balance
/// holds (found by a reviewer: the update's event was written with its settings, before its
/// balance was set, so a top-up landing between the two came after it in the trail, though
/// the set then wiped it out).
#[test]
fn a_balance_reset_racing_a_top_up_is_recorded_in_the_order_it_took_effect() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let created = t.ledger.keys().create(NewKey::new(owner, "k").credits(5));
    let id = created.unwrap().info.id.to_string();
    for round in 0..200u64 {
        // A new plan each round: the update writes its settings, then sets the balance.
        let plan = 1_000 + round;
        let barrier = std::sync::Barrier::new(2);
        let topped_up = std::thread::scope(|s| {
            s.spawn(|| {
                barrier.wait();
                let reset = KeyUpdate::new().credits(Some(plan));
                t.ledger.keys().update(&id, reset).unwrap();
            });
            barrier.wait();
            t.ledger.credits().top_up(&id, 1).unwrap()
        });
        let remaining = t.ledger.credits().usage(&id).unwrap().remaining.unwrap();
        let last = t.ledger.audit().recent(1).unwrap().remove(0).action;
        if remaining == plan {
            assert_eq!(last, "credits.set", "round {round}: the set came last");
        } else {
            assert_eq!(remaining, plan + 1, "round {round}");
            assert_eq!(
                last, "credits.topped_up",
                "round {round}: top-up said {topped_up}"
            );
        }
    }
}

/// Rotating to the scheme already current records nothing (found by a reviewer: each call
/// appended a `hash_scheme.rotated` event and dropped every cached key); an actor the rules
/// refuse is refused all the same.
#[test]
fn rotating_to_the_current_scheme_records_nothing() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let (_, plain) = t.key(&owner, "k");
    t.ledger.routes().set(RouteRule::new("/")).unwrap();
    assert_eq!(verify_code(&t.ledger, &plain, "/x"), "ok");
    let cached = t.ledger.stats().cached_entries;
    assert!(cached > 0);
    let current = t.ledger.hash_scheme();
    let before = t.ledger.audit().recent(usize::MAX).unwrap().len();
    t.ledger.rotate_hash_scheme(current).unwrap();
    assert_eq!(t.ledger.audit().recent(usize::MAX).unwrap().len(), before);
    assert_eq!(t.ledger.stats().cached_entries, cached, "the cache is kept");
    let refused = t.ledger.rotate_hash_scheme_by(current, "line\nforged");
    assert!(matches!(
        refused,
        Err(keyledger::Error::InvalidInput { field: "actor", .. })
    ));
    let next = HashScheme::HmacSha256 { pepper: 2 };
    t.ledger.rotate_hash_scheme(next).unwrap();
    t.ledger.rotate_hash_scheme(next).unwrap();
    let events = t.ledger.audit().recent(usize::MAX).unwrap();
    assert_eq!(events.len(), before + 1);
    assert_eq!(events[0].action, "hash_scheme.rotated");
    // A closed ledger answers as to any change (found by a reviewer: it answered `Ok`).
    t.ledger.close().unwrap();
    let closed = t.ledger.rotate_hash_scheme(next);
    assert!(
        matches!(closed, Err(keyledger::Error::Closed)),
        "{closed:?}"
    );
}
