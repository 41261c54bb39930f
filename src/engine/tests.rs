use redb::ReadableTable;

use super::limits::MAX_HELD;
use super::miss::MissRead;
use super::*;
use crate::ledger::Ledger;
use crate::limits::KeyLimits;
use crate::public_id::IdKind;
use crate::record::VerifyRecord;
use crate::{Config, KeyUpdate, NewAccount, NewKey, Presented, Request};

#[test]
fn evicted_rate_limit_states_are_held_while_running_and_at_most_max_held() {
    const SEC: u64 = 1_000_000_000;
    let configured = crate::record::Limits {
        rate_limits: vec![crate::record::RateLimit {
            name: "per-minute".into(),
            limit: 10,
            window_secs: 60,
        }],
        ..Default::default()
    };
    // A state with one arrival at `at` (seconds): running for the 6 s that follow.
    let state = |at: u64| {
        let limits = Arc::new(KeyLimits::new(&configured, 0, &[]));
        limits.acquire(|| at * SEC, 1).unwrap();
        limits
    };
    let mut live = LiveLimits::new(Vec::new());
    live.hold(1, &state(0), false, 7 * SEC);
    assert!(
        live.held.is_empty(),
        "its window had passed: a fresh state is the same"
    );
    live.hold(1, &state(0), true, 7 * SEC);
    assert_eq!(live.held.len(), 1, "passed, but a grant may yet charge it");
    let kept = state(0);
    live.hold(1, &kept, false, 5 * SEC);
    let fresh = |_| unreachable!("the held state is taken back");
    assert!(Arc::ptr_eq(
        &live.of(1, &configured, None, 0, fresh).unwrap().limits,
        &kept
    ));
    assert!(live.held.contains_key(&1), "until the new entry is cached");
    live.release(1, &kept);
    assert!(live.held.is_empty(), "taken back by the key's next entry");

    // Only the key's current state is held: not one of an older generation, nor one of the
    // current generation built from other limits (a miss that read while the change that
    // moved the generation on committed); either would take the current one's place, which
    // only `held` may keep (found by a reviewer).
    let mut narrowed = configured.clone();
    narrowed.rate_limits[0].limit = 1;
    let id = 1 << 40; // none of the ids below
    live.reconfigure(id, 2, &narrowed);
    let in_generation = |limits: &crate::record::Limits| {
        let mut state = KeyLimits::new(limits, 0, &[]);
        state.generation = 2;
        state.acquire(|| 10 * SEC, 1).unwrap();
        Arc::new(state)
    };
    let current = in_generation(&narrowed);
    live.hold(id, &current, false, 10 * SEC);
    live.hold(id, &state(10), true, 10 * SEC); // generation 0
    live.hold(id, &in_generation(&configured), true, 10 * SEC);
    assert!(
        Arc::ptr_eq(&live.held[&id], &current),
        "the current window stays"
    );
    live.held.clear();

    for id in 0..MAX_HELD as u64 {
        live.hold(id, &state(100), false, 100 * SEC);
    }
    assert_eq!(live.held.len(), MAX_HELD);
    live.hold(u64::MAX, &state(100), false, 100 * SEC);
    assert!(!live.held.contains_key(&u64::MAX), "full of running states");
    // All of them have run out; the sweep comes at most once a second.
    live.hold(u64::MAX, &state(200), false, 200 * SEC);
    assert_eq!(live.held.len(), 1, "swept, then kept");

    // Full of states that ran out since a sweep less than a second ago: room is made among
    // a few of them, not the new running one dropped (found by a reviewer).
    live.held.clear();
    for id in 0..MAX_HELD as u64 {
        live.hold(id, &state(300), false, 300 * SEC);
    }
    live.hold(u64::MAX, &state(305), false, 305 * SEC + SEC / 2);
    assert!(
        !live.held.contains_key(&u64::MAX),
        "swept: all still running"
    );
    let now = 306 * SEC + SEC / 5; // they ran out at 306 s, the sweep was at 305.5 s
    live.hold(u64::MAX, &state(306), false, now);
    assert!(
        live.held.contains_key(&u64::MAX),
        "kept in the room of run-out ones"
    );
    assert!(live.held.len() <= MAX_HELD);
}

struct Fixture {
    _dir: tempfile::TempDir,
    ledger: Ledger,
}

fn ledger() -> Fixture {
    ledger_with(|b| b)
}

/// A ledger whose config builder (a fresh master key set) goes through `settings`.
fn ledger_with(settings: impl FnOnce(crate::ConfigBuilder) -> crate::ConfigBuilder) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let builder = Config::builder().master_key(crate::MasterKey::generate().unwrap());
    let config = settings(builder).build().unwrap();
    let ledger = Ledger::open(dir.path().join("keys.redb"), config).unwrap();
    Fixture { _dir: dir, ledger }
}

/// Once the file is fenced off after a redb panic, calls that go through the writer fail
/// with the same storage error as direct calls, not as a conflict a caller might retry.
#[test]
fn a_fenced_file_fails_writer_calls_with_its_storage_error() {
    let f = ledger();
    let (id, _, _) = key(&f.ledger, |owner| NewKey::new(owner, "k").credits(5));
    let store = &f.ledger.inner.store;
    assert!(
        store
            .guard(|| -> Result<()> { panic!("simulated") })
            .is_err()
    );
    let storage = |e: Error| matches!(e, Error::Storage(_)) && e.to_string().contains("simulated");
    assert!(storage(f.ledger.flush().unwrap_err()));
    assert!(storage(f.ledger.credits().top_up(&id, 1).unwrap_err()));
    assert!(storage(f.ledger.close().unwrap_err()));
}

/// A host that does not drain its events loses the newest ones, and `stats` counts them;
/// the events it has not read are still there, oldest first.
#[test]
fn events_past_the_channels_capacity_are_dropped_and_counted() {
    let f = ledger();
    let events = f.ledger.credit_events();
    let shared = &f.ledger.inner.engine.shared;
    let event = |remaining| CreditEvent {
        kind: CreditEventKind::LowBalance,
        subject: f.ledger.inner.ids.encode(IdKind::Key, 1),
        remaining,
    };
    for remaining in 0..EVENT_CAPACITY as u64 + 3 {
        shared.send_event(event(remaining));
    }
    assert_eq!(f.ledger.stats().events_dropped, 3);
    assert_eq!(events.try_recv().unwrap(), event(0));
    assert_eq!(events.len(), EVENT_CAPACITY - 1);
}

/// Creates a key; returns its public id, internal id and plaintext.
fn key(ledger: &Ledger, new: impl FnOnce(&str) -> NewKey) -> (String, u64, String) {
    let owner = ledger
        .accounts()
        .create(NewAccount::new("Acme"))
        .unwrap()
        .id;
    let created = ledger.keys().create(new(owner.as_str())).unwrap();
    let public = created.info.id.to_string();
    let internal = ledger.keys().internal_id(&public).unwrap();
    (public, internal, created.plaintext.expose().to_owned())
}

/// The reading half of a miss on an existing key.
fn read_miss(ledger: &Ledger, plaintext: &str) -> MissRead {
    let hash = ledger.hasher().hash_current(plaintext);
    let engine = &ledger.inner.engine;
    match engine.read_miss(ledger, &hash, plaintext, ledger.now()) {
        Ok(Ok(read)) => read,
        _ => panic!("the key exists"),
    }
}

fn code(ledger: &Ledger, plaintext: &str) -> &'static str {
    let key = Presented::new(plaintext).unwrap();
    match ledger.verify(&Request::new(&key, "/x")) {
        Ok(_) => "ok",
        Err(d) => d.code(),
    }
}

/// The scope of the cached key for `plaintext` (verifying it first, to cache it).
fn scope_of(ledger: &Ledger, plaintext: &str) -> Arc<Scope> {
    assert_ne!(code(ledger, plaintext), "not_found");
    let hash = ledger.hasher().hash_current(plaintext);
    let found = ledger.inner.engine.cache.with(&hash, |slot| match slot {
        crate::cache::Slot::Key(key) => Some(key.scope.clone()),
        crate::cache::Slot::Missing => None,
    });
    found.flatten().expect("cached")
}

#[test]
fn an_ipv4_mapped_range_stored_by_an_older_version_matches_its_ipv4_clients() {
    let f = ledger();
    let (_, _, plaintext) = key(&f.ledger, |o| NewKey::new(o, "k").ips(["10.0.0.1"]));
    let hash = f.ledger.hasher().hash_current(&plaintext);
    let txn = f.ledger.inner.store.begin_write().unwrap();
    {
        let mut index = txn.open_table(KEY_VERIFY).unwrap();
        let bytes = index.get(&hash).unwrap().unwrap().value().to_vec();
        let mut entry: VerifyRecord = crate::codec::decode(&bytes).unwrap();
        entry.ips = vec!["::ffff:10.0.0.1/128".parse().unwrap()];
        let bytes = crate::codec::encode(&entry);
        index.insert(&hash, bytes.as_slice()).unwrap();
    }
    txn.commit().unwrap();
    let (path, config) = (f.ledger.inner.path.clone(), f.ledger.inner.config.clone());
    f.ledger.close().unwrap();
    drop(f.ledger);
    let reopened = Ledger::open(path, config).unwrap();
    let key = Presented::new(&plaintext).unwrap();
    let refused = Request::new(&key, "/x").client_ip("10.0.0.2".parse().unwrap());
    assert_eq!(
        reopened.verify(&refused).err().map(|d| d.code()),
        Some("ip_not_allowed")
    );
    for from in ["10.0.0.1", "::ffff:10.0.0.1"] {
        let request = Request::new(&key, "/x").client_ip(from.parse().unwrap());
        assert!(reopened.verify(&request).is_ok(), "{from}");
    }
}

#[test]
fn keys_with_the_same_permissions_and_allowlist_share_one_scope() {
    let f = ledger();
    let scoped = |name: &str, ips: &[&str]| {
        let ips: Vec<String> = ips.iter().map(|s| s.to_string()).collect();
        key(&f.ledger, |o| {
            NewKey::new(o, name).permissions(["a:*"]).ips(ips.clone())
        })
    };
    let (_, _, a) = scoped("a", &[]);
    let (_, _, b) = scoped("b", &[]);
    let (_, _, c) = scoped("c", &["10.0.0.0/8"]);
    let (a, b, c) = (
        scope_of(&f.ledger, &a),
        scope_of(&f.ledger, &b),
        scope_of(&f.ledger, &c),
    );
    assert!(
        Arc::ptr_eq(&a, &b),
        "same permissions, no allowlist: one scope"
    );
    assert!(!Arc::ptr_eq(&a, &c), "an allowlist makes another");
    assert_eq!(c.ips.len(), 1);
    // A rolled key's previous secret has a deadline of its own: not shared, not kept.
    let (public, _, old) = scoped("d", &[]);
    f.ledger.keys().roll(&public, 60).unwrap();
    let kept = f.ledger.inner.engine.scopes.lock().len();
    let previous = scope_of(&f.ledger, &old);
    assert_ne!(previous.secret_valid_until, u64::MAX);
    assert_eq!(f.ledger.inner.engine.scopes.lock().len(), kept);
}

/// Account states and interned scopes go with the last cached key that holds them, not
/// only when their account is gone (found by a reviewer: both maps only grew, whatever the
/// cache's capacity).
#[test]
fn account_states_and_scopes_leave_with_their_keys() {
    let f = ledger_with(|b| b.cache_capacity(10));
    let engine = &f.ledger.inner.engine;
    for i in 0..1_100u32 {
        // An account and an allowlist (a scope) of its own for every key.
        let ip = format!("10.{}.{}.0/24", i / 256, i % 256);
        let (_, _, plain) = key(&f.ledger, |o| NewKey::new(o, "k").ips([ip]));
        assert_ne!(code(&f.ledger, &plain), "not_found");
    }
    let (accounts, scopes) = (engine.accounts.lock().len(), engine.scopes.lock().len());
    // Swept each time a map doubles past 1,024: at most that many more than the cache holds.
    assert!(accounts <= 1_024 + 10, "{accounts} account states");
    assert!(scopes <= 1_024 + 10, "{scopes} scopes");
}

/// A miss that takes an evicted key's held rate-limit state and then cannot cache the
/// entry (an admin change to any account raced its read: `Uncached`) leaves the state
/// held: the key's next miss still finds its window.
#[test]
fn a_held_rate_limit_state_survives_a_miss_that_could_not_cache() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (_, id, plaintext) = hourly_key(&f.ledger, 3);
    let other = f
        .ledger
        .accounts()
        .create(NewAccount::new("Other"))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(code(&f.ledger, &plaintext), "ok");
    }
    assert_eq!(code(&f.ledger, &plaintext), "rate_limited");
    engine.scheme_changed(); // a rotation empties the cache: the state is held
    for _ in 0..3 {
        f.ledger.flush().unwrap(); // the writer lets go of the evicted entry
    }
    assert!(engine.shared.limits.lock().held.contains_key(&id), "held");
    let read = read_miss(&f.ledger, &plaintext);
    // Any account change commits meanwhile: the miss must not cache what it read.
    f.ledger
        .accounts()
        .update(
            other.id.as_str(),
            crate::AccountUpdate::new().name("Renamed"),
        )
        .unwrap();
    assert!(matches!(engine.install(read), Some(Loaded::Uncached(_))));
    assert_eq!(
        code(&f.ledger, &plaintext),
        "rate_limited",
        "3 admitted this hour: the window must survive a miss that could not cache"
    );
}

/// An admin change carries the evicted entry over to the key's rebuild; beyond
/// `MAX_CARRIED` carried entries are forgotten. A rate window still counting survives that.
#[test]
fn a_rate_limit_window_survives_its_carried_entry_being_forgotten() {
    let clock = crate::ManualClock::new(crate::Timestamp(1_000_000));
    let Fixture { _dir, ledger } = ledger_with(|b| b.clock(clock.clone()));
    let limited = |o: &str| NewKey::new(o, "k").rate_limit("hourly", 3, 3_600);
    let (public, _, plaintext) = key(&ledger, limited);
    for _ in 0..3 {
        assert_eq!(code(&ledger, &plaintext), "ok");
    }
    assert_eq!(code(&ledger, &plaintext), "rate_limited");
    let renamed = crate::KeyUpdate::default().name("renamed");
    ledger.keys().update(&public, renamed).unwrap();
    // The writer lets go of the old entry once it has flushed its usage and found it idle.
    for _ in 0..3 {
        clock.advance_secs(60);
        ledger.flush().unwrap();
    }
    ledger.inner.engine.carried.lock().clear(); // as `carry` does past `MAX_CARRIED`
    assert_eq!(
        code(&ledger, &plaintext),
        "rate_limited",
        "3 an hour, 3 used 3 minutes ago"
    );
}

/// A request refused in memory looks at the balance (known empty), then marks the
/// exhaustion reported. A top-up committed between the two cleared the mark first: the
/// mark set after it must not hide the exhaustion of the topped-up balance.
#[test]
fn a_refusal_reported_across_a_top_up_does_not_hide_the_next_exhaustion() {
    let f = ledger();
    let (public, internal, plaintext) = key(&f.ledger, |o| NewKey::new(o, "k").credits(0));
    assert_eq!(code(&f.ledger, &plaintext), "usage_exceeded");
    let events = f.ledger.credit_events();
    assert_eq!(events.try_iter().count(), 1, "the first exhaustion");
    let engine = &f.ledger.inner.engine;
    let meter = engine
        .shared
        .meters
        .lock()
        .get(internal)
        .expect("in memory");
    assert!(
        meter.empty_at(f.ledger.now().0),
        "known empty: refused in memory"
    );
    let growths = meter.growths();
    // The top-up commits after the request found the balance known empty...
    f.ledger.credits().top_up(&public, 1).unwrap();
    // ...and before it marks the exhaustion reported: the top-up answered it.
    engine.report_exhausted(&meter, growths);
    assert_eq!(
        events.try_iter().count(),
        0,
        "a refusal of the run-out already told, made before the top-up"
    );
    let spend = || {
        let key = Presented::new(&plaintext).unwrap();
        match f.ledger.verify(&Request::new(&key, "/x")) {
            Ok(grant) => grant.commit(1).token_stats.charged.to_string(),
            Err(d) => d.code().to_owned(),
        }
    };
    assert_eq!(spend(), "1");
    assert_eq!(spend(), "usage_exceeded");
    assert_eq!(
        events.try_iter().count(),
        1,
        "the topped-up balance ran out: news again"
    );
}

/// A miss that could not cache (an admin change to any account raced its read) and found
/// no state to take back builds a fresh one and serves a request on it: the key's next
/// miss must count that request, not start the window afresh. (Found by a reviewer.)
#[test]
fn a_window_started_by_a_miss_that_could_not_cache_is_kept() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (_, _, plaintext) = hourly_key(&f.ledger, 1);
    let other = f
        .ledger
        .accounts()
        .create(NewAccount::new("Other"))
        .unwrap();
    let read = read_miss(&f.ledger, &plaintext);
    f.ledger
        .accounts()
        .update(
            other.id.as_str(),
            crate::AccountUpdate::new().name("Renamed"),
        )
        .unwrap();
    let Some(Loaded::Uncached(k)) = engine.install(read) else {
        panic!("uncached")
    };
    // The request it serves (verify.rs step 7, as `check` does with an Uncached key).
    let limits = k.limits.as_ref().unwrap();
    assert!(limits.acquire(|| f.ledger.monotonic_ns(), 0).is_ok());
    drop(k);
    assert_eq!(
        code(&f.ledger, &plaintext),
        "rate_limited",
        "1 an hour, 1 admitted a moment ago"
    );
}

/// A rotation (or an eviction for room: both go through `retire`) takes a miss's new
/// entry out right after the miss cached it, while the miss is held up by locks, and
/// holds its state: the miss must not let go of that state afterwards. (Found by a
/// reviewer.)
#[test]
fn an_eviction_between_insert_and_release_keeps_the_window() {
    let clock = crate::ManualClock::new(crate::Timestamp(1_000_000));
    let Fixture { _dir, ledger } = ledger_with(|b| b.clock(clock.clone()));
    let engine = &ledger.inner.engine;
    let (public, id, a) = key(&ledger, |o| {
        NewKey::new(o, "a").rate_limit("hourly", 1, 3_600)
    });
    assert_eq!(code(&ledger, &a), "ok");
    assert_eq!(code(&ledger, &a), "rate_limited");
    // An admin change carries the entry (so `install` locks `carried` after inserting).
    ledger
        .keys()
        .update(&public, crate::KeyUpdate::default().name("renamed"))
        .unwrap();
    for _ in 0..3 {
        clock.advance_secs(60);
        ledger.flush().unwrap();
    }
    let read = read_miss(&ledger, &a);
    let limits_lock = engine.shared.limits.lock();
    std::thread::scope(|s| {
        let miss = s.spawn(|| matches!(engine.install(read), Some(Loaded::Cached(_))));
        std::thread::sleep(std::time::Duration::from_millis(200)); // blocked in `of`
        let carried_lock = engine.carried.lock();
        drop(limits_lock); // the miss takes its state, inserts, then waits for `carried`
        std::thread::sleep(std::time::Duration::from_millis(200));
        engine.scheme_changed(); // the new entry leaves the cache: its state is held
        assert!(engine.shared.limits.lock().held.contains_key(&id), "held");
        drop(carried_lock);
        assert!(miss.join().unwrap(), "cached");
    });
    assert_eq!(
        code(&ledger, &a),
        "rate_limited",
        "1 an hour, 1 admitted 3 minutes ago"
    );
}

/// A limits change while a key has two secrets (a roll's grace), and a miss of the
/// previous secret that read the old limits before the change and installs after it
/// (uncached): both secrets must go on sharing one state of the new limits, not admit
/// the full rate each. (Found by a reviewer.)
#[test]
fn a_stale_miss_does_not_split_a_key_into_two_states() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (public, _, old) = hourly_key(&f.ledger, 2);
    let new = f
        .ledger
        .keys()
        .roll(&public, 3_600)
        .unwrap()
        .plaintext
        .expose()
        .to_owned();
    assert_eq!(code(&f.ledger, &old), "ok"); // the state runs: held at the change
    let stale = read_miss(&f.ledger, &old); // reads limit 2
    let limits = vec![crate::record::RateLimit {
        name: "hourly".into(),
        limit: 3,
        window_secs: 3_600,
    }];
    f.ledger
        .keys()
        .update(&public, crate::KeyUpdate::default().rate_limits(limits))
        .unwrap();
    assert_eq!(code(&f.ledger, &new), "ok"); // cached with a state for limit 3
    assert!(
        engine.install(stale).is_none(),
        "reconfigured since: read again"
    );
    let mut admitted = 1;
    for _ in 0..6 {
        for secret in [&old, &new] {
            if code(&f.ledger, secret) == "ok" {
                admitted += 1;
            }
        }
    }
    assert_eq!(admitted, 3, "3 an hour for the key, both secrets together");
}

#[test]
fn a_miss_that_read_a_key_deleted_meanwhile_registers_no_meter_for_it() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (public, id, plaintext) = key(&f.ledger, |o| NewKey::new(o, "k").credits(10));
    let read = read_miss(&f.ledger, &plaintext);
    // The deletion commits and finds no meter in memory to retire …
    f.ledger.keys().delete(&public).unwrap();
    assert!(engine.shared.meters.lock().get(id).is_none());
    // … so the miss that read the key before must not register one now.
    assert!(engine.install(read).is_none(), "read again");
    assert!(engine.shared.meters.lock().get(id).is_none());
    assert_eq!(code(&f.ledger, &plaintext), "not_found");
}

#[test]
fn units_handed_to_a_waiting_request_carry_the_epoch_they_were_leased_under() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (public, id, plaintext) = key(&f.ledger, |o| NewKey::new(o, "k").credits(10));
    assert_eq!(code(&f.ledger, &plaintext), "ok"); // cached, with its meter
    let meter = engine.shared.meters.lock().get(id).expect("registered");
    // A request reads the epoch, then a `set` runs before the writer leases for it.
    let read_before = meter.epoch();
    f.ledger.credits().set(&public, 100).unwrap();
    match engine.lease_now(&meter, 5) {
        Some(Handoff::Units { units: 5, epoch }) => {
            // The units come out of the new balance: the grant must carry the new epoch,
            // or its refund would be discarded as if reserved before the set.
            assert_ne!(epoch, read_before);
            assert_eq!(epoch, meter.epoch());
            // Back into the lease, as the request's refund would: held, they would keep
            // the close waiting.
            let _ = meter.give_back_up_to(5, MAX_LEASED, epoch);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_miss_with_no_removal_meanwhile_registers_and_caches_at_once() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (_, id, plaintext) = key(&f.ledger, |o| NewKey::new(o, "k").credits(10));
    // Another key's deletion is a removal too, but not one that came during the read.
    let (other, _, _) = key(&f.ledger, |o| NewKey::new(o, "other").credits(1));
    f.ledger.keys().delete(&other).unwrap();
    let read = read_miss(&f.ledger, &plaintext);
    assert!(matches!(engine.install(read), Some(Loaded::Cached(_))));
    assert!(engine.shared.meters.lock().get(id).is_some());
    assert_eq!(code(&f.ledger, &plaintext), "ok");
}

#[test]
fn a_miss_that_raced_a_change_leaves_the_evicted_rate_limit_state_to_the_rebuild() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (public, _, plaintext) = key(&f.ledger, |o| {
        NewKey::new(o, "k").rate_limit("per_minute", 2, 60)
    });
    assert_eq!(code(&f.ledger, &plaintext), "ok");
    assert_eq!(code(&f.ledger, &plaintext), "ok");
    assert_eq!(code(&f.ledger, &plaintext), "rate_limited");
    // A settings change evicts the key, keeping its snapshot for the rebuild.
    let rename = KeyUpdate::new().name("renamed");
    f.ledger.keys().update(&public, rename).unwrap();
    // A miss whose read an unrelated change overtook serves one request uncached …
    let read = read_miss(&f.ledger, &plaintext);
    engine.cache.invalidate();
    assert!(matches!(engine.install(read), Some(Loaded::Uncached(_))));
    // … and the rebuild still finds the limit spent: no fresh window from the race.
    assert_eq!(code(&f.ledger, &plaintext), "rate_limited");
}

/// A miss that read a pooled key before the key and then its pool were deleted gets a
/// meter for its one request, but none stays registered for the deleted pool.
#[test]
fn a_miss_racing_a_pools_deletion_registers_no_meter_for_it() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let owner = f
        .ledger
        .accounts()
        .create(NewAccount::new("Acme"))
        .unwrap()
        .id;
    let credits = f.ledger.credits();
    let now = f.ledger.now();
    // A miss that read pool `name` (created now), with `between` done before its meter.
    let miss = |name: &str, between: &dyn Fn(&str)| {
        let pool = credits
            .create_pool(crate::NewPool::new(owner, name).credits(10))
            .unwrap()
            .id;
        let id = f.ledger.inner.ids.decode(IdKind::Pool, &pool).unwrap();
        let read_began = engine.shared.meter_resets.load(Ordering::Acquire);
        between(&pool);
        engine.pool_meter(id, None, None, now, read_began).unwrap();
        engine.shared.meters.lock().get(id).is_some()
    };
    let delete = |pool: &str| {
        credits.delete_pool(pool).unwrap();
    };
    assert!(!miss("deleted", &delete));
    assert!(
        miss("live", &|_| ()),
        "a pool that still exists is registered"
    );
}

/// A key limited to `n` requests an hour: its public id, internal id and plaintext.
fn hourly_key(ledger: &Ledger, n: u64) -> (String, u64, String) {
    key(ledger, |o| {
        NewKey::new(o, "k").rate_limit("hourly", n, 3_600)
    })
}

fn hourly(n: u64) -> Vec<crate::record::RateLimit> {
    let name = "hourly".into();
    vec![crate::record::RateLimit {
        name,
        limit: n,
        window_secs: 3_600,
    }]
}

/// A key whose limits were changed and changed back, used up: a miss that reads it but
/// cannot cache (an account change raced it) must not leave the old window to the next.
/// (Found by a reviewer, with the first fix's mark that such a miss consumed.)
#[test]
fn limits_changed_back_start_new_windows_even_after_an_uncached_miss() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (public, _, plaintext) = hourly_key(&f.ledger, 2);
    let other = f.ledger.accounts().create(NewAccount::new("Other"));
    let other = other.unwrap().id;
    for expected in ["ok", "ok", "rate_limited"] {
        assert_eq!(code(&f.ledger, &plaintext), expected);
    }
    let keys = f.ledger.keys();
    keys.update(&public, KeyUpdate::default().rate_limits(hourly(3)))
        .unwrap();
    keys.update(&public, KeyUpdate::default().rate_limits(hourly(2)))
        .unwrap();
    let read = read_miss(&f.ledger, &plaintext);
    let rename = crate::AccountUpdate::new().name("Renamed");
    f.ledger.accounts().update(other.as_str(), rename).unwrap();
    let Some(Loaded::Uncached(k)) = engine.install(read) else {
        panic!("uncached")
    };
    let limits = k.limits.as_ref().unwrap();
    assert!(limits.acquire(|| f.ledger.monotonic_ns(), 0).is_ok());
    drop(k);
    assert_eq!(
        code(&f.ledger, &plaintext),
        "ok",
        "2 an hour on new windows, 1 used by the uncached miss"
    );
}

/// The same, with a miss that read the limits between the two changes. (Reviewer.)
#[test]
fn limits_changed_back_start_new_windows_even_after_a_stale_miss() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (public, _, plaintext) = hourly_key(&f.ledger, 2);
    for expected in ["ok", "ok", "rate_limited"] {
        assert_eq!(code(&f.ledger, &plaintext), expected);
    }
    let keys = f.ledger.keys();
    keys.update(&public, KeyUpdate::default().rate_limits(hourly(3)))
        .unwrap();
    let stale = read_miss(&f.ledger, &plaintext);
    keys.update(&public, KeyUpdate::default().rate_limits(hourly(2)))
        .unwrap();
    assert!(
        engine.install(stale).is_none(),
        "reconfigured since: read again"
    );
    assert_eq!(
        code(&f.ledger, &plaintext),
        "ok",
        "changed back: new windows"
    );
}

/// A miss that reads a key's new limits while the change is still evicting its entries
/// (held up here by the meter registry's lock) builds the window the key keeps: a rename
/// afterwards must not start another. (Found by a reviewer, with the first fix, which
/// marked the key only after the eviction.) The miss installs once the lock is free, as
/// every install takes it: before or after the change's meter step, which must not matter.
#[test]
fn a_miss_racing_a_limits_change_builds_the_window_the_key_keeps() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (public, _, plaintext) = hourly_key(&f.ledger, 2);
    let meters = engine.shared.meters.lock();
    std::thread::scope(|s| {
        let update = s.spawn(|| {
            let one = KeyUpdate::default().rate_limits(hourly(1));
            f.ledger.keys().update(&public, one).unwrap();
        });
        // Committed and evicted; `key_changed` waits for the registry.
        std::thread::sleep(std::time::Duration::from_millis(300));
        let read = read_miss(&f.ledger, &plaintext);
        drop(meters);
        assert!(matches!(engine.install(read), Some(Loaded::Cached(_))));
        update.join().unwrap();
    });
    assert_eq!(code(&f.ledger, &plaintext), "ok");
    assert_eq!(code(&f.ledger, &plaintext), "rate_limited");
    let rename = KeyUpdate::default().name("renamed");
    f.ledger.keys().update(&public, rename).unwrap();
    assert_eq!(
        code(&f.ledger, &plaintext),
        "rate_limited",
        "1 an hour, used a moment ago: a rename keeps the window"
    );
}

/// A miss that read a key's limits before a change and installs after it must not build
/// a fresh state of the old limits: its request would be admitted on top of the new
/// windows. (Found by a reviewer.)
#[test]
fn a_miss_that_read_the_limits_before_a_change_reads_again() {
    let f = ledger();
    let engine = &f.ledger.inner.engine;
    let (public, _, plaintext) = hourly_key(&f.ledger, 2);
    for expected in ["ok", "ok", "rate_limited"] {
        assert_eq!(code(&f.ledger, &plaintext), expected);
    }
    let stale = read_miss(&f.ledger, &plaintext); // reads 2 an hour
    let three = KeyUpdate::default().rate_limits(hourly(3));
    f.ledger.keys().update(&public, three).unwrap();
    assert!(engine.install(stale).is_none(), "read again");
    let mut admitted = 0;
    while code(&f.ledger, &plaintext) == "ok" {
        admitted += 1;
    }
    assert_eq!(admitted, 3, "3 an hour on new windows");
}

/// A limit narrowed to 1 an hour admits 1 after the update returns, even with a miss of the
/// key that read the old limits while the update committed and installs late. Such a miss
/// saw the generation the change had already moved on: its state passed for the new
/// limits' and, held by its uncached install, took the one `held` slot of the key from the
/// new window's running state (evicted for room). The next miss started a fresh window: 2
/// admitted in the hour. (Found by a reviewer.)
#[test]
fn a_miss_that_read_during_a_limits_change_does_not_drop_the_new_window() {
    let Fixture { _dir, ledger } = ledger_with(|b| b.cache_capacity(1));
    let engine = &ledger.inner.engine;
    let (public, _, plaintext) = hourly_key(&ledger, 1_000);
    let (_, _, other) = key(&ledger, |o| NewKey::new(o, "other"));
    assert_eq!(code(&ledger, &plaintext), "ok");
    let narrow = || {
        let narrowed = KeyUpdate::new().rate_limits(hourly(1));
        ledger.keys().update(&public, narrowed).unwrap();
    };
    // The update is about to commit: the old limits are still the stored ones.
    let stale = while_committing(&ledger.inner.store.before_commit, narrow, || {
        read_miss(&ledger, &plaintext)
    });
    assert_eq!(code(&ledger, &plaintext), "ok", "the new window's one");
    assert_eq!(
        code(&ledger, &other),
        "ok",
        "evicts the key: its window held"
    );
    assert!(!matches!(engine.install(stale), Some(Loaded::Cached(_))));
    assert_eq!(code(&ledger, &plaintext), "rate_limited", "1 an hour");
}

/// The same limit narrowed, with a miss after the update committed and before its effects
/// ran: it reads the new limits and its request counts in the new window, which the key
/// keeps. (Found by a reviewer of the first fix, which moved the generation on again once
/// committed: this window was then left behind, and 1 an hour admitted 2.)
#[test]
fn a_miss_between_a_limits_commit_and_its_effects_builds_the_window_the_key_keeps() {
    let f = ledger();
    let (public, _, plaintext) = hourly_key(&f.ledger, 1_000);
    let narrow = || {
        let narrowed = KeyUpdate::new().rate_limits(hourly(1));
        f.ledger.keys().update(&public, narrowed).unwrap();
    };
    let during = while_committing(&f.ledger.inner.store.after_commit, narrow, || {
        code(&f.ledger, &plaintext)
    });
    assert_eq!(during, "ok", "the new window's one");
    assert_eq!(code(&f.ledger, &plaintext), "rate_limited", "1 an hour");
}

/// Runs `change` on a thread of its own, paused at `point` of its commit
/// (`Store::before_commit`, `Store::after_commit`) while `meanwhile` runs; returns what
/// `meanwhile` returned once the change is done.
fn while_committing<T>(
    point: &parking_lot::Mutex<Option<(std::thread::ThreadId, crate::store::Pause)>>,
    change: impl FnOnce() + Send,
    meanwhile: impl FnOnce() -> T,
) -> T {
    let (paused, resume) = (channel::bounded(1), channel::bounded::<()>(1));
    std::thread::scope(|s| {
        let changing = s.spawn(|| {
            let pause = move || {
                paused.0.send(()).unwrap();
                resume.1.recv().unwrap();
            };
            *point.lock() = Some((std::thread::current().id(), Box::new(pause)));
            change();
        });
        paused.1.recv().unwrap();
        let out = meanwhile();
        resume.0.send(()).unwrap();
        changing.join().unwrap();
        out
    })
}

/// A miss that could not cache points the key back at its previous state, so a flush
/// raises that one; the next miss reuses the state the failed miss held, which must
/// count the lifetime spend that miss reads. (Found by a reviewer.)
#[test]
fn a_state_reused_after_an_uncached_miss_counts_the_flushed_spend() {
    let Fixture { _dir, ledger } = ledger_with(|b| {
        let tier = crate::SpendTier::multiplier(10, 300);
        b.spend_tiers([tier])
            .usage_flush_interval(std::time::Duration::from_secs(3_600))
    });
    let engine = &ledger.inner.engine;
    let (public, _, plaintext) = hourly_key(&ledger, 5);
    let other = ledger.accounts().create(NewAccount::new("Other")).unwrap();
    let presented = Presented::new(&plaintext).unwrap();
    let in_flight = ledger.verify(&Request::new(&presented, "/x")).unwrap();
    let four = KeyUpdate::default().rate_limits(hourly(4));
    ledger.keys().update(&public, four).unwrap();
    let read = read_miss(&ledger, &plaintext);
    let rename = crate::AccountUpdate::new().name("R");
    ledger.accounts().update(other.id.as_str(), rename).unwrap();
    assert!(matches!(engine.install(read), Some(Loaded::Uncached(_))));
    assert_eq!(in_flight.commit(10).token_stats.charged, 10);
    ledger.flush().unwrap();
    let grant = ledger
        .verify(&Request::new(&presented, "/x").cost(0))
        .unwrap();
    let tier = grant.rate_limit().tier_multiplier_pct;
    assert_eq!(tier, 300, "10 spent and flushed");
}

/// A miss that read the limits generation after a rename's bump but the record before
/// the rename committed (the commit's fsync is the window) builds a state of the old
/// names in the new generation; the next miss must not take it for the renamed limits'
/// state, whose tier rates differ (found by a reviewer: names were not compared, and the
/// renamed limit kept its old name's explicit tier rate).
#[test]
fn a_state_built_under_a_limits_old_name_is_not_reused_after_a_rename() {
    let Fixture { _dir, ledger } = ledger_with(|b| {
        b.spend_tiers([crate::SpendTier::explicit(1).rate_limit("hourly", 50, 3_600)])
    });
    let engine = &ledger.inner.engine;
    let (public, _, plaintext) = hourly_key(&ledger, 5);
    let presented = Presented::new(&plaintext).unwrap();
    ledger
        .verify(&Request::new(&presented, "/x"))
        .unwrap()
        .commit(1);
    ledger.flush().unwrap(); // the tier is reached
    let mut stale = read_miss(&ledger, &plaintext); // still "hourly"
    let renamed = vec![crate::record::RateLimit {
        name: "renamed".into(),
        limit: 5,
        window_secs: 3_600,
    }];
    ledger
        .keys()
        .update(&public, KeyUpdate::default().rate_limits(renamed))
        .unwrap();
    stale.generation = engine.shared.limits_generation.load(Ordering::Acquire);
    drop(engine.install(stale).expect("the racing miss installs"));
    let mut admitted = 0;
    while admitted < 100 && code(&ledger, &plaintext) == "ok" {
        admitted += 1;
    }
    assert_eq!(admitted, 5, "no tier names \"renamed\": 5 an hour");
}

#[test]
fn a_route_change_that_fails_is_not_stored_and_one_that_succeeds_is_enforced_at_once() {
    let fixture = ledger();
    let ledger = &fixture.ledger;
    let (_, _, plaintext) = key(ledger, |owner| NewKey::new(owner, "k"));
    let damage = |prefix: &str| {
        let txn = ledger.inner.store.begin_write().unwrap();
        txn.open_table(ROUTES)
            .unwrap()
            .insert(prefix, [0xffu8, 0xff].as_slice())
            .unwrap();
        txn.commit().unwrap();
    };
    let stored = |prefix: &str| {
        let read = ledger.inner.store.begin_read().unwrap();
        let table = read.open_table(ROUTES).unwrap();
        table.get(prefix).unwrap().is_some()
    };
    damage("/broken");
    let admin = crate::RouteRule::new("/admin").permission("admin:*");
    let set = ledger.routes().set(admin.clone());
    assert!(matches!(set, Err(Error::Codec(_))), "{set:?}");
    assert!(
        !stored("/admin"),
        "a change reported failed must not be stored"
    );
    // The damaged rule removed, the same change goes through and applies to the next verify.
    ledger.routes().remove("/broken").unwrap();
    ledger.routes().set(admin).unwrap();
    assert_eq!(code(ledger, &plaintext), "ok");
    let presented = Presented::new(plaintext.as_str()).unwrap();
    let request = Request::new(&presented, "/admin/users");
    assert_eq!(ledger.verify(&request).unwrap_err().code(), "forbidden");
}

/// Two changes to one key from two threads take effect in memory in the order they
/// committed. Here the first sets the key's low-balance threshold to 10 and the second,
/// while the first is between its commit and its effects, to 60. Before, the second's
/// effects could run first: the meter then kept the first's threshold, 10, against the
/// stored 60, and a fall to 55 went unreported.
#[test]
fn changes_racing_from_two_threads_take_effect_in_commit_order() {
    let f = ledger();
    let (id, _, plaintext) = key(&f.ledger, |o| NewKey::new(o, "k").credits(100));
    let events = f.ledger.credit_events();
    assert_eq!(code(&f.ledger, &plaintext), "ok", "cached, with a meter");
    let (paused, resume) = (channel::bounded(1), channel::bounded::<()>(1));
    std::thread::scope(|s| {
        let first = s.spawn(|| {
            let pause = move || {
                paused.0.send(()).unwrap();
                // Its turn holds the second back; without turns, the second runs now.
                let _ = resume.1.recv_timeout(std::time::Duration::from_millis(300));
            };
            let me = std::thread::current().id();
            *f.ledger.inner.store.after_commit.lock() = Some((me, Box::new(pause)));
            let low = KeyUpdate::new().low_balance_threshold(Some(10));
            f.ledger.keys().update(&id, low).unwrap();
        });
        paused.1.recv().unwrap();
        let higher = KeyUpdate::new().low_balance_threshold(Some(60));
        f.ledger.keys().update(&id, higher).unwrap();
        let _ = resume.0.send(());
        first.join().unwrap();
    });
    let presented = Presented::new(plaintext.as_str()).unwrap();
    let grant = f
        .ledger
        .verify(&Request::new(&presented, "/x").cost(45))
        .unwrap();
    assert_eq!(grant.commit(45).token_stats.remaining_credits, Some(55));
    f.ledger.flush().unwrap();
    let kinds: Vec<_> = events.try_iter().map(|e| (e.kind, e.remaining)).collect();
    assert_eq!(kinds, [(CreditEventKind::LowBalance, 55)]);
}

/// Listing what an id of no account holds answers `NotFound`, for its pools as for its
/// keys (the id is sealed by hand: the API hands out none such).
#[test]
fn listing_what_an_id_of_no_account_holds_is_not_found() {
    let f = ledger();
    let nobody = f.ledger.inner.ids.encode(IdKind::Account, 999);
    let keys = f.ledger.keys().list(&nobody, &crate::PageRequest::first());
    for listed in [f.ledger.credits().pools(&nobody).map(drop), keys.map(drop)] {
        assert!(matches!(listed, Err(Error::NotFound { what: "account" })));
    }
}

/// Keys that spend from a pool or not at all, missed again and again through a cache too
/// small for them: each keeps one home while its usage waits for the writer (before, every
/// miss left a new one listed until the writer's next idle round: 640 here), the usage
/// counted on it is all there, and homes leave memory once evicted and flushed.
#[test]
fn a_key_cached_again_counts_on_the_home_its_usage_waits_in() {
    let Fixture { _dir, ledger } = ledger_with(|b| {
        b.cache_capacity(4)
            .usage_flush_interval(std::time::Duration::from_secs(3_600))
    });
    let owner = ledger
        .accounts()
        .create(NewAccount::new("Acme"))
        .unwrap()
        .id;
    let new_pool = crate::NewPool::new(owner.as_str(), "shared").credits(1_000);
    let pool = ledger.credits().create_pool(new_pool).unwrap().id;
    let keys: Vec<_> = (0..16)
        .map(|i| {
            let new = NewKey::new(owner.as_str(), format!("k{i}"));
            let new = if i % 2 == 0 {
                new
            } else {
                new.pool(pool.as_str())
            };
            let created = ledger.keys().create(new).unwrap();
            let plaintext = created.plaintext.expose().to_owned();
            (created.info.id.to_string(), plaintext)
        })
        .collect();
    // The home of `plaintext`'s entry, verified (and so cached) just now.
    let home_of = |plaintext: &str| {
        let hash = ledger.hasher().hash_current(plaintext);
        let engine = &ledger.inner.engine;
        let home = engine.cache.with(&hash, |slot| match slot {
            crate::cache::Slot::Key(key) => Arc::downgrade(&key.home_arc()),
            _ => panic!("a key"),
        });
        home.expect("cached")
    };
    let mut first: Vec<std::sync::Weak<CachedKey>> = Vec::new();
    for round in 0..40 {
        for (i, (_, plaintext)) in keys.iter().enumerate() {
            let presented = Presented::new(plaintext).unwrap();
            let grant = ledger.verify(&Request::new(&presented, "/x")).unwrap();
            grant.commit(1);
            let home = home_of(plaintext);
            match round {
                0 => first.push(home),
                _ => assert!(home.ptr_eq(&first[i]), "key {i}, round {round}: a new home"),
            }
        }
    }
    for (public, _) in &keys {
        let usage = ledger.credits().usage(public).unwrap();
        assert_eq!((usage.requests, usage.lifetime_spent), (40, 40), "{public}");
    }
    // Flushed and found idle: the writer lets go of them, and so does the registry.
    for _ in 0..3 {
        ledger.flush().unwrap();
    }
    let alive = |homes: &[std::sync::Weak<CachedKey>]| {
        homes.iter().filter(|h| h.strong_count() > 0).count()
    };
    assert_eq!(alive(&first), 4, "the cached ones only");
    // Those four, unlisted, leave memory when they are evicted: by misses of the others.
    let cached: Vec<usize> = (0..16).filter(|&i| first[i].strong_count() > 0).collect();
    for (i, (_, plaintext)) in keys.iter().enumerate() {
        if !cached.contains(&i) {
            let presented = Presented::new(plaintext).unwrap();
            drop(ledger.verify(&Request::new(&presented, "/x")).unwrap());
        }
    }
    let still_cached = |i: usize| {
        let hash = ledger.hasher().hash_current(&keys[i].1);
        ledger.inner.engine.cache.with(&hash, |_| ()).is_some()
    };
    let evicted = cached.iter().filter(|&&i| !still_cached(i)).count();
    assert!(
        evicted > 0,
        "twelve misses through a cache of four evict some"
    );
    for i in cached {
        assert_eq!(first[i].strong_count() > 0, still_cached(i), "key {i}");
    }
}

/// A key's home that only the registry would still hold leaves memory when the key is
/// deleted, or moved to a balance of its own, while cached with its usage written (found
/// by a reviewer: it waited for the registry's next sweep, holding its account state).
#[test]
fn the_home_of_a_key_deleted_or_given_credits_leaves_memory() {
    let Fixture { _dir, ledger } =
        ledger_with(|b| b.usage_flush_interval(std::time::Duration::from_secs(3_600)));
    let (deleted, _, deleted_plain) = key(&ledger, |o| NewKey::new(o, "d"));
    let (moved, _, moved_plain) = key(&ledger, |o| NewKey::new(o, "m"));
    let home_of = |plaintext: &str| {
        assert_eq!(code(&ledger, plaintext), "ok");
        let hash = ledger.hasher().hash_current(plaintext);
        let home = ledger.inner.engine.cache.with(&hash, |slot| match slot {
            crate::cache::Slot::Key(key) => Arc::downgrade(&key.home_arc()),
            _ => panic!("a key"),
        });
        home.expect("cached")
    };
    let (deleted_home, moved_home) = (home_of(&deleted_plain), home_of(&moved_plain));
    for _ in 0..3 {
        ledger.flush().unwrap(); // written, then unlisted: the cache and the registry hold them
    }
    ledger.keys().delete(&deleted).unwrap();
    assert_eq!(deleted_home.strong_count(), 0, "deleted");
    let credits = KeyUpdate::default().credits(Some(10));
    ledger.keys().update(&moved, credits).unwrap();
    assert_eq!(
        code(&ledger, &moved_plain),
        "ok",
        "cached again, on its own meter"
    );
    assert_eq!(moved_home.strong_count(), 0, "given credits");
}

/// A miss that read a key's old limits before a change narrowing them, stalled while other
/// keys' changes fill the generation map and prune it of this key (no state of it known
/// then), installs after the key's new window started and was held on eviction. Absent from
/// the map, the key would count as generation 0, and the stale state as its current one:
/// held over the running window, it handed the next miss a fresh one (1 an hour admitted
/// 2). A miss whose read began before a prune reads again. (Found by a reviewer; the
/// control runs the same without the prune.)
#[test]
fn a_miss_that_read_before_the_generations_were_pruned_reads_again() {
    stale_miss_after(true);
    stale_miss_after(false);
}

fn stale_miss_after(prune: bool) {
    let clock = crate::ManualClock::new(crate::Timestamp(1_000_000));
    let Fixture { _dir, ledger } = ledger_with(|b| b.cache_capacity(1).clock(clock.clone()));
    let engine = &ledger.inner.engine;
    let (public, _, plaintext) = hourly_key(&ledger, 1_000);
    let (_, _, other) = key(&ledger, |o| NewKey::new(o, "other"));
    let stale = read_miss(&ledger, &plaintext); // 1,000 an hour
    let narrowed = KeyUpdate::new().rate_limits(hourly(1));
    ledger.keys().update(&public, narrowed).unwrap();
    let other_limits = crate::record::Limits {
        rate_limits: hourly(5),
        ..Default::default()
    };
    for i in 0..=MAX_HELD as u64 * u64::from(prune) {
        engine.limits_reconfigured((1 << 40) + i, &other_limits);
    }
    assert_eq!(code(&ledger, &plaintext), "ok", "the new window's one");
    assert_eq!(
        code(&ledger, &other),
        "ok",
        "evicts the key: its window held"
    );
    // The writer lets go of the evicted entry once it has flushed its usage and found it
    // idle: the window is then kept by `held` alone.
    for _ in 0..3 {
        clock.advance_secs(60);
        ledger.flush().unwrap();
    }
    assert!(!matches!(engine.install(stale), Some(Loaded::Cached(_))));
    assert_eq!(
        code(&ledger, &plaintext),
        "rate_limited",
        "1 an hour ({prune})"
    );
}

/// An audit read waits for the write turn (a writer batch, an admin change) only when a
/// commit made without a sync is visible to it. (Found by a reviewer: it began a write
/// transaction every time, behind any change, however slow its sync.)
#[test]
fn an_audit_read_with_nothing_unsynced_does_not_wait_for_a_write() {
    let Fixture { _dir, ledger } = ledger();
    let (public, _, _) = hourly_key(&ledger, 10);
    let (paused, resume) = (channel::bounded(1), channel::bounded::<()>(1));
    let waited = std::thread::scope(|s| {
        let update = s.spawn(|| {
            let pause = move || {
                paused.0.send(()).unwrap();
                resume.1.recv().unwrap();
            };
            let me = std::thread::current().id();
            *ledger.inner.store.before_commit.lock() = Some((me, Box::new(pause)));
            let five = KeyUpdate::new().rate_limits(hourly(5));
            ledger.keys().update(&public, five).unwrap();
        });
        paused.1.recv().unwrap(); // the change holds the write turn, about to commit
        let (done_tx, done_rx) = channel::bounded(1);
        let ledger = &ledger;
        let reader = s.spawn(move || {
            let events = ledger.audit().recent(10);
            done_tx.send(()).unwrap();
            events.map(|e| e.len())
        });
        let waited = done_rx.recv_timeout(std::time::Duration::from_secs(3));
        resume.0.send(()).unwrap();
        update.join().unwrap();
        reader.join().unwrap().unwrap();
        waited.is_err()
    });
    assert!(
        !waited,
        "the audit read waited for an unrelated write transaction"
    );
}

/// A close makes a rehash that raced its last writer batch durable; when that commit
/// fails, the close says so. (Found by a reviewer: the result was dropped, and the close
/// answered `Ok` with the store fenced.)
#[test]
fn a_close_whose_own_commit_fails_reports_it() {
    let backend = crate::fuzzing::CrashBackend::new();
    let config = Config::builder()
        .master_key(crate::MasterKey::generate().unwrap())
        .build()
        .unwrap();
    let ledger = Ledger::open_with_backend(backend.clone(), config).unwrap();
    let (_, _, plaintext) = key(&ledger, |o| NewKey::new(o, "k"));
    let v2 = crate::HashScheme::HmacSha256 { pepper: 2 };
    ledger.rotate_hash_scheme(v2).unwrap();
    // The close's writer part is done (its last batch committed) ...
    ledger.inner.engine.stop_writer().unwrap();
    // ... when a first use after the rotation rehashes the key (no sync of its own).
    let presented = Presented::new(&plaintext).unwrap();
    assert!(ledger.authenticate(&presented).is_ok());
    backend.fail_sync(1);
    let closed = ledger.close();
    assert!(
        backend.has_failed(),
        "the close tried to make the rehash durable"
    );
    assert!(closed.is_err(), "the close's failed commit is reported");
}

/// A verify that hashed a key before a hash-scheme rotation and missed after it (finding the
/// key under the old scheme, and rehashing it) does not cache it under the old hash: no admin
/// change evicts that one (they evict the record's hashes, the new scheme's), so it served
/// the key as it was, after a disable, to verifies that also hashed before the rotation
/// (found by a reviewer).
#[test]
fn a_miss_straddling_a_rotation_caches_nothing_a_change_cannot_reach() {
    let f = ledger();
    let (id, _, plaintext) = key(&f.ledger, |owner| NewKey::new(owner, "k"));
    let engine = &f.ledger.inner.engine;
    let old_hash = f.ledger.hasher().hash_current(&plaintext);
    let next = crate::HashScheme::HmacSha256 { pepper: 2 };
    f.ledger.rotate_hash_scheme(next).unwrap();
    let loaded = engine.load(&f.ledger, &old_hash, &plaintext, f.ledger.now());
    assert!(matches!(loaded, Ok(Loaded::Uncached(_))));
    f.ledger.keys().disable(&id).unwrap();
    assert_eq!(code(&f.ledger, &plaintext), "disabled");
    let stale = engine.cache.with(&old_hash, |slot| match slot {
        crate::cache::Slot::Key(key) => !key.disabled(),
        crate::cache::Slot::Missing => false,
    });
    assert_ne!(
        stale,
        Some(true),
        "served enabled under its pre-rotation hash"
    );
}

/// An account change that commits while a miss reads that account (not yet in memory)
/// leaves nothing stale behind: the miss answers its own request from what it read, but
/// keeps neither the key nor the account's state, so the next verify of the account's keys
/// sees the change. (Kept, the state read before a suspension went on granting the
/// account's keys until a restart.)
#[test]
fn an_account_suspended_while_a_miss_reads_it_is_not_remembered_active() {
    let f = ledger();
    let (public, _, plaintext) = key(&f.ledger, |owner| NewKey::new(owner, "k"));
    let owner = f.ledger.keys().get(&public).unwrap().owner;
    let engine = &f.ledger.inner.engine;
    let (read, wait_for_read) = crossbeam::channel::bounded::<()>(0);
    let (go_on, wait_to_go_on) = crossbeam::channel::bounded::<()>(0);
    *engine.shared.after_account_read.lock() = Some(Box::new(move || {
        read.send(()).unwrap();
        wait_to_go_on.recv().unwrap();
    }));
    std::thread::scope(|s| {
        let request = s.spawn(|| code(&f.ledger, &plaintext));
        let wait = std::time::Duration::from_secs(10);
        wait_for_read
            .recv_timeout(wait)
            .expect("the miss read the account");
        let suspend = crate::AccountUpdate::new().status(crate::SubscriptionStatus::Suspended);
        f.ledger.accounts().update(owner.as_str(), suspend).unwrap();
        go_on.send(()).unwrap();
        assert_eq!(request.join().unwrap(), "ok", "answered from its own read");
    });
    assert_eq!(code(&f.ledger, &plaintext), "subscription_inactive");
    assert_eq!(
        code(&f.ledger, &plaintext),
        "subscription_inactive",
        "cached so"
    );
}

/// A pool's meter is made knowing its balance (`init_meter`): peeks at a cached key that
/// spends from a pool answer its credits left from memory, as every cache hit answers,
/// even once the store can no longer be read (its reads would answer 0).
#[test]
fn a_peek_at_a_pooled_key_answers_its_credits_left_from_memory() {
    let f = ledger();
    let (_, _, plaintext) = key(&f.ledger, |owner| {
        let new_pool = crate::NewPool::new(owner, "shared").credits(100);
        let pool = f.ledger.credits().create_pool(new_pool).unwrap().id;
        NewKey::new(owner, "k").pool(pool.as_str())
    });
    let key = Presented::new(&plaintext).unwrap();
    let peek = || {
        let grant = f.ledger.verify(&Request::new(&key, "/x").cost(0)).unwrap();
        grant.remaining_credits()
    };
    assert_eq!(peek(), Some(100), "the miss");
    let store = &f.ledger.inner.store;
    assert!(
        store
            .guard(|| -> Result<()> { panic!("simulated") })
            .is_err()
    );
    assert_eq!(peek(), Some(100), "a cache hit");
}
