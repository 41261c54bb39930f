//! Credits across restarts: a clean close returns every lease, so the balance is exact; a
//! crash loses at most the outstanding leases, reported as `lost_to_crash`, and never lets a
//! key spend more than it was granted. `Ledger::check` agrees after both.

mod common;

use common::*;
use std::time::Duration;

use keyledger::{Durability, Ledger, MasterKey, NewKey, NewPool, Request};

/// Largest lease a meter ever holds (DESIGN §5).
const MAX_LEASE: u64 = 100_000;

fn spend_n(t: &TestLedger, plain: &str, n: u64, step_secs: u64) {
    for _ in 0..n {
        spend(&t.ledger, plain, "/x", 1, 1).expect("credits left");
        t.clock.advance_secs(step_secs);
    }
}

#[test]
fn a_clean_close_returns_every_lease() {
    for durability in [Durability::Leased, Durability::Exact] {
        let t = ledger_with(durability);
        let owner = t.account("Acme");
        let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(300));
        spend_n(&t, &plain, 137, 0);
        let before = t.ledger.credits().usage(&id).unwrap();
        assert_eq!((before.spent, before.remaining), (137, Some(163)));
        if durability == Durability::Leased {
            assert!(before.leased > 0, "a lease is in memory");
        }
        let t = t.close_and_reopen();
        assert_eq!(t.ledger.stats().lost_to_crash_at_open, 0);
        let u = t.ledger.credits().usage(&id).unwrap();
        assert_eq!(u.spent, 137, "{durability:?}");
        assert_eq!(u.remaining, Some(163));
        assert_eq!((u.leased, u.lost_to_crash, u.granted), (0, 0, 300));
        assert_eq!(u.requests, 137);
        assert_eq!(u.lifetime_spent, 137);
        assert_eq!(
            t.ledger.keys().get(&id).unwrap().remaining_credits,
            Some(163)
        );
        let (t, report) = t.checked();
        assert!(report.is_ok(), "{report:?}");
        assert_eq!(report.lost_to_crash, 0);
        // And the rest is spendable, exactly.
        spend_n(&t, &plain, 163, 0);
        assert_eq!(verify_code(&t.ledger, &plain, "/x"), "usage_exceeded");
    }
}

#[test]
fn dropping_the_last_handle_closes_cleanly_too() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(500));
    spend_n(&t, &plain, 40, 0);
    t.ledger.flush().unwrap();
    let t = t.reopen(); // drop, no explicit close
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!((u.spent, u.remaining, u.lost_to_crash), (40, Some(460), 0));
}

/// A ledger whose close waits `grace` for grants, with a key of 100 credits: its id and
/// plaintext.
fn closing_within(grace: Duration) -> (TestLedger, keyledger::PublicId, String) {
    let t = TestLedger::with_settings(MasterKey::generate().unwrap(), |b| b.close_grace(grace));
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(100));
    (t, id, plain)
}

/// A key of its own, with credits and a lease in memory, for [`until_closing`] to try.
fn probe(t: &TestLedger) -> String {
    let owner = t.account("Probe");
    let (_, plain) = create_key(&t.ledger, NewKey::new(owner, "probe").credits(1_000_000));
    assert_eq!(verify_code(&t.ledger, &plain, "/x"), "ok");
    plain
}

/// Returns once a close begun on another thread has stopped requests reserving from the
/// leases in memory, found by verifying `probe` (its grants, dropped, refund into its lease):
/// the writer's first closing pass stops every lease at once. A close reads, and may prune,
/// before it begins, and a request made before that pass is rightly granted from memory: on
/// a loaded machine a fixed sleep did not reach it (a probe with no lease yet, refused by
/// the writer as soon as the close began, did not either).
fn until_closing(ledger: &Ledger, probe: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while verify_code(ledger, probe, "/x") != "unavailable" {
        assert!(
            std::time::Instant::now() < deadline,
            "the close never began"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A graceful shutdown: the server stops taking requests and closes the ledger while one is
/// still running. `close` waits for that request's grant to settle, refusing new requests
/// meanwhile, so the balance is exact and nothing counts as lost to a crash. (Found by a
/// reviewer: the 10 units reserved stayed leased, were reported as lost to a crash at the
/// next open, and the receipt named a charge that was never written.)
#[test]
fn close_waits_for_the_grants_still_held() {
    for durability in [Durability::Leased, Durability::Exact] {
        let t = ledger_with(durability);
        let owner = t.account("Acme");
        let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(100));
        let key = presented(&plain);
        let grant = t.ledger.verify(&Request::new(&key, "/x").cost(10)).unwrap();
        std::thread::scope(|s| {
            let closing = s.spawn(|| t.ledger.close());
            std::thread::sleep(Duration::from_millis(100));
            assert!(!closing.is_finished(), "close waits for the grant");
            assert_eq!(
                verify_code(&t.ledger, &plain, "/x"),
                "unavailable",
                "a new request while closing"
            );
            assert_eq!(grant.commit(3).token_stats.charged, 3);
            closing.join().unwrap().expect("a clean close");
        });
        let (t, report) = t.checked();
        assert_eq!(report.lost_to_crash, 0, "{durability:?}: {report:?}");
        let u = t.ledger.credits().usage(&id).unwrap();
        assert_eq!((u.spent, u.remaining, u.lost_to_crash), (3, Some(97), 0));
    }
}

/// A grant that reserved no credits — an unmetered key's, or a peek (`cost(0)`) that then
/// commits its real cost — is waited for as one that reserved units is: what it commits is
/// written before `close` returns, and a new request of the kind is refused meanwhile. (Found
/// by a reviewer: `close` waited only while units were leased, returned at once, and the
/// commit's charge and usage landed nowhere — a peek's work was done for free.)
#[test]
fn close_waits_for_grants_that_reserved_no_credits() {
    for peek in [false, true] {
        let (t, _, _) = closing_within(Duration::from_secs(30));
        let owner = t.account("Acme");
        let new = NewKey::new(owner, "k");
        let (id, plain) = create_key(&t.ledger, if peek { new.credits(100) } else { new });
        let key = presented(&plain);
        let cost = if peek { 0 } else { 1 };
        let grant = t
            .ledger
            .verify(&Request::new(&key, "/x").cost(cost))
            .unwrap();
        std::thread::scope(|s| {
            let closing = s.spawn(|| t.ledger.close());
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                !closing.is_finished(),
                "peek {peek}: close waits for the grant"
            );
            let again = t.ledger.verify(&Request::new(&key, "/x").cost(cost));
            assert_eq!(
                again.map(|_| ()).unwrap_err().code(),
                "unavailable",
                "peek {peek}: a new request while closing"
            );
            assert_eq!(grant.commit(7).token_stats.charged, 7, "peek {peek}");
            closing.join().unwrap().expect("a clean close");
        });
        let t = t.reopen();
        let u = t.ledger.credits().usage(&id).unwrap();
        let spent = if peek { 7 } else { 0 };
        assert_eq!(
            (u.spent, u.lifetime_spent, u.requests),
            (spent, 7, 1),
            "peek {peek}: the commit written before the close returned"
        );
    }
}

/// A close under traffic: every commit that got a grant is in the key's and the account's
/// usage after it, and the close itself succeeds — metered or not. (Found by a reviewer: a
/// metered commit spent its reservation before counting its usage, so a close could end
/// between the two and the usage was never written (3 closes in 50); and a request refused
/// for the close, counted for an instant, could make the close report a grant still held.)
#[test]
fn a_close_under_traffic_records_every_commit_and_succeeds() {
    for round in 0..200u32 {
        let metered = round % 2 == 0;
        let t = TestLedger::with_settings(MasterKey::generate().unwrap(), |b| {
            b.close_grace(Duration::from_secs(30))
        });
        let owner = t.account("Acme");
        let new = NewKey::new(owner, "k");
        let new = if metered {
            new.credits(10_000_000)
        } else {
            new
        };
        let (id, plain) = create_key(&t.ledger, new);
        let key = presented(&plain);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (charged, granted, closed) = std::thread::scope(|s| {
            let workers: Vec<_> = (0..6u64)
                .map(|w| {
                    let (t, key, stop) = (&t, &key, &stop);
                    s.spawn(move || {
                        let (mut charged, mut granted) = (0, 0);
                        // Requests keep coming while the server shuts down: refused, then.
                        for i in w.. {
                            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                                break;
                            }
                            let request = Request::new(key, "/x").cost(i % 3);
                            if let Ok(grant) = t.ledger.verify(&request) {
                                granted += 1;
                                charged += grant.commit(i % 5).token_stats.charged;
                            }
                        }
                        (charged, granted)
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(5));
            let closed = t.ledger.close();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let counts = workers.into_iter().map(|w| w.join().unwrap());
            let (charged, granted) = counts.fold((0, 0), |(c, g), (wc, wg)| (c + wc, g + wg));
            (charged, granted, closed)
        });
        closed.unwrap_or_else(|e| panic!("round {round}, metered {metered}: {e}"));
        let t = t.reopen();
        for id in [id.as_str(), owner.as_str()] {
            let u = t.ledger.credits().usage(id).unwrap();
            assert_eq!(
                (u.lifetime_spent, u.requests),
                (charged, granted),
                "round {round}, metered {metered}: {id}"
            );
        }
    }
}

/// A grant that reserved nothing and is still held when the close grace ends: `close` says
/// so, since what it commits later is not recorded.
#[test]
fn close_names_grants_without_credits_held_past_its_grace() {
    let (t, _, _) = closing_within(Duration::from_millis(50));
    let owner = t.account("Acme");
    let (_, plain) = create_key(&t.ledger, NewKey::new(owner, "unmetered"));
    let key = presented(&plain);
    let grant = t.ledger.verify(&Request::new(&key, "/x")).unwrap();
    let error = t.ledger.close().unwrap_err().to_string();
    assert!(
        error.contains("1 grants that reserved no credits"),
        "{error}"
    );
    drop(grant);
}

/// A grant still held when the close grace ends stays leased, counted as lost at the next
/// open (never re-granted), and `close` says how many units that is.
#[test]
fn close_names_the_units_of_grants_held_past_its_grace() {
    let (t, id, plain) = closing_within(Duration::from_millis(50));
    let key = presented(&plain);
    let grant = t.ledger.verify(&Request::new(&key, "/x").cost(10)).unwrap();
    let error = t.ledger.close().unwrap_err().to_string();
    assert!(error.contains("10 units"), "{error}");
    drop(grant);
    // Before the reopen too (found by a reviewer: the refund of the grant dropped after the
    // close counted as left, 100, though nothing will ever return it to the balance).
    let u = t.ledger.credits().usage(&id).unwrap();
    let figures = (u.spent, u.remaining, u.lost_to_crash, u.leased);
    assert_eq!(figures, (0, Some(90), 10, 0), "after the close");
    let t = t.reopen();
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!((u.spent, u.remaining, u.lost_to_crash), (0, Some(90), 10));
}

/// A request that ends while the ledger closes refunds its units; a new request must not
/// reserve them again, or a close under traffic would keep finding grants to wait for and
/// run out its grace. (Found by a reviewer.)
#[test]
fn units_refunded_while_closing_are_not_reserved_again() {
    let (t, _, plain) = closing_within(Duration::from_secs(5));
    let probe = probe(&t);
    let key = presented(&plain);
    let grant = t.ledger.verify(&Request::new(&key, "/x").cost(10)).unwrap();
    std::thread::scope(|s| {
        let closing = s.spawn(|| t.ledger.close());
        until_closing(&t.ledger, &probe);
        drop(grant); // the request ends: its 10 units go back into the lease
        let code = verify_code(&t.ledger, &plain, "/x");
        assert!(closing.join().unwrap().is_ok());
        assert_eq!(code, "unavailable", "a new request while closing");
    });
}

/// Nor after a commit that charged beyond its reservation, or an admin top-up, while the
/// close waits: each told the key's meter when its next refill is due, which let requests
/// reserve from memory again until the next closing pass, so a refund landing then went to a
/// brand-new request (found by a reviewer: about one round in two; the late request, still
/// running at the end of the grace, failed the close and its units counted as lost).
#[test]
fn a_shortfall_or_a_top_up_while_closing_lets_no_new_request_in() {
    type Door = fn(&TestLedger, &keyledger::PublicId, keyledger::Grant<'_>);
    let shortfall: Door = |_, _, grant| assert_eq!(grant.commit(15).token_stats.charged, 15);
    let top_up: Door = |t, id, grant| {
        t.ledger.credits().top_up(id.as_str(), 5).unwrap();
        grant.commit(10);
    };
    for (door, name) in [(shortfall, "shortfall"), (top_up, "top-up")] {
        for round in 0..20 {
            let (t, id, plain) = closing_within(Duration::from_millis(300));
            let probe = probe(&t);
            let key = presented(&plain);
            let grants: Vec<_> = (0..3)
                .map(|_| t.ledger.verify(&Request::new(&key, "/x").cost(10)).unwrap())
                .collect();
            let [first, second, third] = <[_; 3]>::try_from(grants).ok().unwrap();
            std::thread::scope(|s| {
                let closing = s.spawn(|| t.ledger.close());
                until_closing(&t.ledger, &probe);
                door(&t, &id, first);
                drop(second); // its 10 units go back into the lease
                let late = t.ledger.verify(&Request::new(&key, "/x").cost(10));
                let case = format!("{name}, round {round}");
                assert_eq!(
                    late.as_ref().err().map(|d| d.code()),
                    Some("unavailable"),
                    "{case}"
                );
                drop(third);
                closing.join().unwrap().expect(&case);
            });
            let u = t.reopen().ledger.credits().usage(&id).unwrap();
            assert_eq!(u.lost_to_crash, 0, "{name}, round {round}");
        }
    }
}

/// A grant that outlived its key's balance (the key made unmetered, then given credits
/// again) commits beyond its reservation through the old, retired meter. That must not
/// cancel the lease the key's new meter was granted in the same batch: the units stayed
/// leased on disk with no meter holding them, and a clean close reported them as lost
/// (found by a reviewer: 9 rounds in 40).
#[test]
fn a_shortfall_through_a_retired_meter_leaves_its_successors_lease_alone() {
    use keyledger::KeyUpdate;
    for round in 0..40u64 {
        let (t, id, plain) = closing_within(Duration::from_millis(100));
        let owner = t.ledger.keys().get(&id).unwrap().owner;
        let (_, other) = create_key(&t.ledger, NewKey::new(owner, "other").credits(1_000));
        let key = presented(&plain);
        let grant = t.ledger.verify(&Request::new(&key, "/x").cost(5)).unwrap();
        let keys = t.ledger.keys();
        keys.update(&id, KeyUpdate::new().credits(None)).unwrap();
        keys.update(&id, KeyUpdate::new().credits(Some(1_000)))
            .unwrap();
        // A peek caches the key with its new meter, which has no lease yet.
        spend(&t.ledger, &plain, "/x", 0, 0).unwrap();
        std::thread::scope(|s| {
            // The writer kept busy, so that the new meter's lease and the old grant's
            // shortfall tend to share a batch, lease first.
            s.spawn(|| {
                for _ in 0..3 {
                    let _ = spend(&t.ledger, &other, "/x", 1, 1);
                    t.ledger.flush().unwrap();
                }
            });
            let leasing = s.spawn(|| spend(&t.ledger, &plain, "/x", 1, 1).unwrap());
            let spin = std::time::Instant::now();
            while spin.elapsed() < Duration::from_micros(50 + 20 * (round % 10)) {}
            grant.commit(500);
            leasing.join().unwrap();
        });
        let closed = t.ledger.close();
        let u = t.reopen().ledger.credits().usage(&id).unwrap();
        let case = format!("round {round}: {closed:?} {u:?}");
        assert!(closed.is_ok(), "{case}");
        assert_eq!(u.lost_to_crash, 0, "{case}");
        assert_eq!(u.spent + u.remaining.unwrap(), u.granted, "{case}");
    }
}

/// A graceful shutdown under steady traffic: the requests running when `close` starts are
/// the last; it is clean, and nothing counts as lost.
#[test]
fn close_under_steady_traffic_is_clean() {
    for durability in [Durability::Leased, Durability::Exact] {
        let t = TestLedger::with_settings(MasterKey::generate().unwrap(), |b| {
            b.durability(durability)
                .close_grace(Duration::from_secs(30))
        });
        let owner = t.account("Acme");
        let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(1_000_000));
        let key = presented(&plain);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let spent = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if let Ok(grant) = t.ledger.verify(&Request::new(&key, "/x").cost(5)) {
                            std::thread::sleep(Duration::from_millis(1));
                            let charged = grant.commit(2).token_stats.charged;
                            spent.fetch_add(charged, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
            std::thread::sleep(Duration::from_millis(50));
            let closed = t.ledger.close();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            closed.expect("a clean close");
        });
        let spent = spent.into_inner();
        assert!(spent > 0, "traffic ran");
        let t = t.reopen();
        let u = t.ledger.credits().usage(&id).unwrap();
        assert_eq!(u.lost_to_crash, 0, "{durability:?}");
        assert_eq!((u.spent, u.remaining), (spent, Some(1_000_000 - spent)));
    }
}

/// A second `close` while the first is still waiting for a grant waits too, and reports how
/// the close ended, not "closed" at once. (Found by a reviewer.)
#[test]
fn a_second_close_reports_how_the_first_ended() {
    let (t, _, plain) = closing_within(Duration::from_millis(300));
    let key = presented(&plain);
    let grant = t.ledger.verify(&Request::new(&key, "/x").cost(10)).unwrap();
    std::thread::scope(|s| {
        let first = s.spawn(|| t.ledger.close());
        std::thread::sleep(Duration::from_millis(100));
        let second = t.ledger.close();
        let first = first.join().unwrap();
        assert!(first.is_err(), "the grant was held past the grace");
        let second = second.expect_err("the close failed").to_string();
        assert!(second.contains("10 units"), "{second}");
        assert_eq!(second.matches("conflict").count(), 1, "said once: {second}");
    });
    drop(grant);
}

/// A grace too long to add to the clock (`Duration::MAX`: "as long as it takes") is no
/// deadline, not a panic in `close` or in drop. (Found by a reviewer.)
#[test]
fn a_close_grace_of_duration_max_waits_as_long_as_it_takes() {
    let (t, _, plain) = closing_within(Duration::MAX);
    let key = presented(&plain);
    let grant = t.ledger.verify(&Request::new(&key, "/x").cost(10)).unwrap();
    std::thread::scope(|s| {
        let closing = s.spawn(|| t.ledger.close());
        std::thread::sleep(Duration::from_millis(50));
        grant.commit(3);
        closing.join().unwrap().expect("a clean close");
    });
}

/// A prefetch queued by the last verify and a close arriving together.
#[test]
fn closing_right_after_traffic_loses_nothing() {
    for round in 0..20 {
        let t = TestLedger::new();
        let owner = t.account("Acme");
        let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(10_000));
        // 13 of the first 16-unit lease: below a quarter left, the verify queues a prefetch.
        spend_n(&t, &plain, 13, 0);
        let t = t.close_and_reopen();
        let u = t.ledger.credits().usage(&id).unwrap();
        assert_eq!(
            (u.spent, u.remaining, u.lost_to_crash),
            (13, Some(9_987), 0),
            "round {round}"
        );
    }
}

#[test]
fn a_crash_loses_at_most_the_outstanding_lease() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(1_000));
    // Two seconds between requests, and the writer idle before each (a prefetch lands
    // before the next request): leases stay at their initial size (16) or shrink.
    for _ in 0..20 {
        spend(&t.ledger, &plain, "/x", 1, 1).unwrap();
        t.ledger.flush().unwrap();
        t.clock.advance_secs(2);
    }
    let before = t.ledger.credits().usage(&id).unwrap();
    let outstanding = before.leased;
    assert!(outstanding > 0 && outstanding <= 16, "{before:?}");

    let t = t.crash_and_reopen();
    assert_eq!(t.ledger.stats().lost_to_crash_at_open, outstanding);
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!(u.spent, 20);
    assert_eq!(u.lost_to_crash, outstanding);
    assert_eq!(u.leased, 0);
    assert_eq!(u.spent + u.lost_to_crash + u.remaining.unwrap(), u.granted);
    assert_eq!(u.remaining, Some(1_000 - 20 - outstanding));
    // The lost units are never granted again.
    let left = u.remaining.unwrap();
    spend_n(&t, &plain, left, 0);
    assert_eq!(verify_code(&t.ledger, &plain, "/x"), "usage_exceeded");

    let (t, report) = t.checked();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.lost_to_crash, outstanding);
    // A second open finds nothing new to recover.
    let t = t.reopen();
    assert_eq!(t.ledger.stats().lost_to_crash_at_open, 0);
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!((u.lost_to_crash, u.remaining), (outstanding, Some(0)));
}

/// The same under three threads of traffic: requests that found memory empty at a
/// take-back reach the writer while the fresh lease is in memory, and must not double it
/// (found by a reviewer: each top-up or set doubled the lease, to 100,000 units lost in a
/// crash after 453 spent, for a pool and for a key's own balance).
#[test]
fn leases_taken_back_under_concurrent_traffic_stay_within_the_lease_bound() {
    /// Sets the flag when dropped (a thread ending, by panic too).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    for (pooled, by_set) in [(true, false), (false, false), (true, true)] {
        let t = TestLedger::new();
        let owner = t.account("Acme");
        let (balance, keys) = if pooled {
            let new = NewPool::new(owner, "p").credits(1_000_000);
            let pool = t.ledger.credits().create_pool(new).unwrap();
            let keys: Vec<String> = (0..3)
                .map(|i| create_key(&t.ledger, NewKey::new(owner, format!("k{i}")).pool(pool.id)).1)
                .collect();
            (pool.id.to_string(), keys)
        } else {
            let (id, key) = create_key(&t.ledger, NewKey::new(owner, "k").credits(1_000_000));
            (id.to_string(), vec![key; 3])
        };
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let spenders: Vec<_> = keys
                .iter()
                .map(|key| {
                    let t = &t;
                    let stop = &stop;
                    s.spawn(move || {
                        // A spender that fails stops the changes too, or the scope would
                        // wait for them for ever.
                        let _stop_on_panic = StopOnDrop(stop);
                        for _ in 0..150 {
                            let spent = spend(&t.ledger, key, "/x", 1, 1);
                            assert!(spent.is_ok(), "{spent:?}");
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    })
                })
                .collect();
            s.spawn(|| {
                let mut round = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let credits = t.ledger.credits();
                    match by_set {
                        true => assert!(credits.set(&balance, 1_000_000 - round).is_ok()),
                        false => assert!(credits.top_up(&balance, 1).is_ok()),
                    }
                    round += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            for spender in spenders {
                spender.join().unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        // A lease in memory after the last take-back: what a crash would lose.
        for key in &keys {
            assert!(spend(&t.ledger, key, "/x", 1, 1).is_ok());
        }
        t.ledger.flush().unwrap();
        let t = t.crash_and_reopen();
        let u = t.ledger.credits().usage(&balance).unwrap();
        assert_eq!(u.spent + u.lost_to_crash + u.remaining.unwrap(), u.granted);
        assert!(
            u.lost_to_crash <= 2 * u.spent + 32,
            "pooled {pooled}, by set {by_set}: lost {} after spending {}",
            u.lost_to_crash,
            u.spent
        );
    }
}

#[test]
fn a_crash_with_growing_leases_stays_within_the_lease_bound() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(1_000_000));
    // A frozen clock: every lease lasts < 1 s, so lease sizes double.
    spend_n(&t, &plain, 3_000, 0);
    t.ledger.flush().unwrap();
    let outstanding = t.ledger.credits().usage(&id).unwrap().leased;
    assert!(outstanding > 0);
    let t = t.crash_and_reopen();
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!(u.lost_to_crash, outstanding);
    assert!(u.lost_to_crash <= MAX_LEASE);
    // Each lease at most doubles the last, so what is outstanding is about what was spent.
    assert!(
        u.lost_to_crash <= 2 * u.spent + 32,
        "lost {} after spending {}",
        u.lost_to_crash,
        u.spent
    );
    assert_eq!(u.spent + u.lost_to_crash + u.remaining.unwrap(), 1_000_000);
}

/// A lease taken back unspent — by a top-up, a set, or the key leaving a full cache — is
/// no sign of a busy key: the next lease is not doubled for it. Before (found by a
/// reviewer), each take-back doubled the next lease, so a key topped up or evicted between
/// requests soon held its whole balance in memory, and a crash lost it.
#[test]
fn leases_taken_back_unspent_do_not_grow_the_next_one() {
    for taken_back_by in ["top_up", "set", "eviction"] {
        let master = MasterKey::generate().unwrap();
        let t = TestLedger::with_settings(master, |b| b.cache_capacity(1));
        let owner = t.account("Acme");
        let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(1_000_000));
        let (_, other) = create_key(&t.ledger, NewKey::new(owner, "o").credits(1_000_000));
        // A frozen clock, as for a busy key: only spent leases may grow the next.
        for round in 0..40u64 {
            spend(&t.ledger, &plain, "/x", 1, 1).expect("credits left");
            match taken_back_by {
                "top_up" => assert!(t.ledger.credits().top_up(&id, 1).is_ok()),
                "set" => assert!(t.ledger.credits().set(&id, 1_000_000 - round).is_ok()),
                _ => assert!(spend(&t.ledger, &other, "/x", 1, 1).is_ok()),
            }
        }
        spend(&t.ledger, &plain, "/x", 1, 1).expect("credits left");
        t.ledger.flush().unwrap();
        let before = t.ledger.credits().usage(&id).unwrap();
        let t = t.crash_and_reopen();
        let u = t.ledger.credits().usage(&id).unwrap();
        assert_eq!(u.lost_to_crash, before.leased, "{taken_back_by}");
        assert!(
            u.lost_to_crash <= 2 * u.spent + 32,
            "{taken_back_by}: lost {} after spending {}",
            u.lost_to_crash,
            u.spent
        );
    }
}

#[test]
fn a_crash_before_the_spend_is_flushed_never_over_spends() {
    for durability in [Durability::Leased, Durability::Exact] {
        let t = ledger_with(durability);
        let owner = t.account("Acme");
        let credits = 300;
        let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(credits));
        let granted = 123;
        spend_n(&t, &plain, granted, 0);
        // No flush: some spend may still be in memory only.
        let t = t.crash_and_reopen();
        let u = t.ledger.credits().usage(&id).unwrap();
        assert_eq!(
            u.spent + u.lost_to_crash + u.remaining.unwrap(),
            u.granted,
            "{durability:?}"
        );
        assert!(u.spent <= granted);
        assert!(
            u.remaining.unwrap() <= credits - granted,
            "a crash must never hand back spent units ({durability:?}: {u:?})"
        );
        let left = u.remaining.unwrap();
        assert_eq!(
            (0..credits)
                .filter(|_| spend(&t.ledger, &plain, "/x", 1, 1).is_ok())
                .count() as u64,
            left
        );
    }
}

#[test]
fn exact_mode_loses_only_reservations_in_flight() {
    let t = ledger_with(Durability::Exact);
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(100));
    spend_n(&t, &plain, 30, 0);
    // A request in flight when the process dies: 5 reserved, never settled.
    let clone = t.ledger.clone();
    let key = presented(&plain);
    let grant = clone.verify(&Request::new(&key, "/x").cost(5)).unwrap();
    std::mem::forget(grant);
    drop(clone);
    t.ledger.flush().unwrap();
    let t = t.crash_and_reopen();
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!(u.lost_to_crash, 5);
    assert_eq!(t.ledger.stats().lost_to_crash_at_open, 5);
    assert_eq!((u.spent, u.remaining), (30, Some(65)));
}

/// A charge settled in `Exact` mode is written within the writer's gather window, not at the
/// next flush round: a crash soon after finds it spent, not lost. (Found by a reviewer: the
/// last request of each key until the next flush round, 30 s by default, was reported
/// `lost_to_crash` though nothing was in flight.)
#[test]
fn exact_mode_writes_a_settled_charge_without_waiting_for_a_flush() {
    let t = ledger_with(Durability::Exact);
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(100));
    let commits = t.ledger.stats().writer_commits;
    spend_n(&t, &plain, 1, 0);
    // The reservation's commit, then the settlement's (no `flush`: it would write it anyway).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while t.ledger.stats().writer_commits < commits + 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let t = t.crash_and_reopen();
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!(
        (u.spent, u.lost_to_crash, u.remaining),
        (1, 0, Some(99)),
        "{u:?}"
    );
}

#[test]
fn a_refund_in_exact_mode_goes_back_to_the_durable_balance() {
    let t = ledger_with(Durability::Exact);
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(1_000));
    // Reserves 500, charges 1: the 499 left must not wait in memory for the next request.
    assert_eq!(
        spend(&t.ledger, &plain, "/x", 500, 1)
            .unwrap()
            .token_stats
            .charged,
        1
    );
    let key = presented(&plain);
    let before = t.ledger.stats().writer_commits;
    let grant = t.ledger.verify(&Request::new(&key, "/x").cost(1)).unwrap();
    assert_eq!(
        t.ledger.stats().writer_commits - before,
        1,
        "every reservation is a group-committed write"
    );
    grant.commit(1);
    drop(t.ledger.verify(&Request::new(&key, "/x").cost(7)).unwrap()); // refunded whole
    t.ledger.flush().unwrap();
    let t = t.crash_and_reopen();
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!((u.lost_to_crash, u.spent, u.remaining), (0, 2, Some(998)));
}

#[test]
fn a_refund_of_a_large_reservation_keeps_at_most_a_full_lease_in_memory() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(10_000_000));
    let key = presented(&plain);
    let grant = t
        .ledger
        .verify(&Request::new(&key, "/x").cost(2_000_000))
        .unwrap();
    grant.commit(1);
    t.ledger.flush().unwrap();
    let t = t.crash_and_reopen();
    let u = t.ledger.credits().usage(&id).unwrap();
    assert!(u.lost_to_crash <= 100_000, "lost {}", u.lost_to_crash);
    assert_eq!(
        u.spent + u.lost_to_crash + u.remaining.unwrap(),
        10_000_000,
        "{u:?}"
    );
}

#[test]
fn check_reports_the_crash_before_the_ledger_is_reopened() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let pool = t
        .ledger
        .credits()
        .create_pool(NewPool::new(owner, "p").credits(1_000))
        .unwrap();
    let (_, a) = create_key(&t.ledger, NewKey::new(owner, "a").pool(pool.id));
    let (_, b) = create_key(&t.ledger, NewKey::new(owner, "b").pool(pool.id));
    spend_n(&t, &a, 10, 2);
    spend_n(&t, &b, 10, 2);
    t.ledger.flush().unwrap();
    let outstanding = t.ledger.credits().usage(&pool.id).unwrap().leased;
    assert!(outstanding > 0);
    let config = t.config();
    let TestLedger {
        dir, path, ledger, ..
    } = t;
    ledger.simulate_crash();
    let report = Ledger::check(&path, config.clone()).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.lost_to_crash, outstanding);
    let ledger = Ledger::open(&path, config).unwrap();
    let u = ledger.credits().usage(&pool.id).unwrap();
    assert_eq!(u.spent, 20);
    assert_eq!(u.lost_to_crash, outstanding);
    assert_eq!(u.remaining, Some(1_000 - 20 - outstanding));
    drop(ledger);
    drop(dir);
}

/// Flush rounds write every key's spend and usage without a `flush`: a crash after one loses
/// only the unreserved lease, not what was spent before it (with the default 30 s interval
/// the same crash would count the spend as lost).
#[test]
fn a_flush_round_writes_spend_and_usage_before_a_crash() {
    let t = TestLedger::with_settings(keyledger::MasterKey::generate().unwrap(), |b| {
        b.usage_flush_interval(Duration::from_millis(5))
    });
    let owner = t.account("Acme");
    let (id, plain) = create_key(&t.ledger, NewKey::new(owner, "k").credits(100));
    spend_n(&t, &plain, 5, 1); // within the first lease (16): no renewal writes the spend
    let before = t.ledger.stats().writer_commits;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.ledger.stats().writer_commits == before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(t.ledger.stats().writer_commits > before, "no round in 10 s");
    let t = t.crash_and_reopen();
    let u = t.ledger.credits().usage(&id).unwrap();
    assert_eq!(u.spent, 5, "{u:?}");
    assert_eq!(u.requests, 5, "{u:?}");
    assert_eq!(u.spent + u.lost_to_crash + u.remaining.unwrap(), u.granted);
    assert!(u.lost_to_crash <= 16 - 5, "{u:?}");
}

/// Balances as large as they come: two keys of `u64::MAX` credits each crash holding a grant
/// of all of it. Reopening counts both as lost (the total saturates, each key's is exact),
/// and `check` reads the file without overflowing.
#[test]
fn a_crash_holding_two_whole_u64_balances_reopens() {
    let t = TestLedger::new();
    let owner = t.account("Acme");
    let grants =
        ["a", "b"].map(|name| create_key(&t.ledger, NewKey::new(owner, name).credits(u64::MAX)));
    let keys = grants.clone().map(|(_, plain)| presented(&plain));
    let held: Vec<_> = keys
        .iter()
        .map(|k| {
            t.ledger
                .verify(&Request::new(k, "/x").cost(u64::MAX))
                .unwrap()
        })
        .collect();
    std::mem::forget(held); // still in flight when the process dies
    let t = t.crash_and_reopen();
    assert_eq!(t.ledger.stats().lost_to_crash_at_open, u64::MAX);
    for (id, _) in &grants {
        let usage = t.ledger.credits().usage(id).unwrap();
        assert_eq!((usage.lost_to_crash, usage.remaining), (u64::MAX, Some(0)));
    }
    let (_t, report) = t.checked();
    assert_eq!(report.lost_to_crash, u64::MAX);
    assert!(report.is_ok(), "{:?}", report.problems);
}
