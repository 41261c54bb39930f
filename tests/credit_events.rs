//! Low-balance and exhausted events as a host receives them (`Ledger::credit_events`): one
//! `LowBalance` per fall to or below the threshold, one `Exhausted` for the first refusal
//! since the balance last grew, whatever the timing of the requests around a top-up, a set or
//! a refill. Found by a reviewer of the events (the forty-second session): a refusal reported
//! late, after a growth, told an old run-out again or a new one early; one made just before a
//! refill came due was never told; a set below what a refusal had seen hid the next run-out.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::ThreadId;
use std::time::Duration;

use keyledger::{
    Clock, Config, CreditEventKind, Durability, KeyUpdate, Ledger, ManualClock, MasterKey,
    NewAccount, NewKey, NewPool, PoolUpdate, Presented, RefillInterval, Request, Timestamp,
};

/// Verifies a request of `cost` with key `plain` and commits it whole: `Err` is the
/// denial's code.
fn spend(ledger: &Ledger, plain: &str, cost: u64) -> Result<(), String> {
    let key = Presented::new(plain).unwrap();
    match ledger.verify(&Request::new(&key, "/x").cost(cost)) {
        Ok(g) => {
            g.commit(cost);
            Ok(())
        }
        Err(d) => Err(d.code().to_owned()),
    }
}

const DAY_MS: u64 = 86_400_000;

/// A ledger on `clock` with one key of `credits`, refilled to `refill` every day: the
/// scratch directory, the ledger, the key's public id and its plaintext.
fn daily_key(
    clock: impl Clock,
    credits: u64,
    refill: u64,
) -> (tempfile::TempDir, Ledger, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::builder()
        .master_key(MasterKey::generate().unwrap())
        .clock(clock)
        .build()
        .unwrap();
    let ledger = Ledger::open(dir.path().join("k.redb"), config).unwrap();
    let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let new = NewKey::new(owner.id.as_str(), "k")
        .credits(credits)
        .refill(refill, RefillInterval::Daily);
    let k = ledger.keys().create(new).unwrap();
    let (id, plain) = (k.info.id.to_string(), k.plaintext.expose().to_owned());
    (dir, ledger, id, plain)
}

/// A key of 150 credits (refilled to 100 a day) is refused a request of 200: told as
/// `Exhausted(150)`. Then `grow` gives it 100 credits, fewer than that refusal saw; their
/// running out is a run-out of its own, and must be told (found by a reviewer of the
/// events for a set, and by the reviewer of the session's diff for a refill: neither was
/// growth, being below the balance before).
fn a_lower_growth_after_a_big_refusal_is_news(grow: impl FnOnce(&Ledger, &str, &ManualClock)) {
    let clock = ManualClock::new(Timestamp(20_000 * DAY_MS + 1_000));
    let (_dir, ledger, id, plain) = daily_key(clock.clone(), 150, 100);
    let events = ledger.credit_events();
    assert!(spend(&ledger, &plain, 200).is_err(), "200 > 150 left");
    ledger.flush().unwrap();
    let got: Vec<_> = events.try_iter().map(|e| (e.kind, e.remaining)).collect();
    assert_eq!(got, [(CreditEventKind::Exhausted, 150)]);
    grow(&ledger, &id, &clock);
    let served = spent_until_refused(&ledger, &plain);
    ledger.flush().unwrap();
    assert_eq!(served, 100);
    let got: Vec<_> = events.try_iter().map(|e| (e.kind, e.remaining)).collect();
    assert_eq!(got, [(CreditEventKind::Exhausted, 0)], "the 100 ran out");
}

#[test]
fn running_out_after_a_set_lower_than_a_big_refusal_saw_is_reported() {
    a_lower_growth_after_a_big_refusal_is_news(|ledger, id, _| {
        ledger.credits().set(id, 100).unwrap();
    });
}

#[test]
fn running_out_after_a_refill_lower_than_a_big_refusal_saw_is_reported() {
    a_lower_growth_after_a_big_refusal_is_news(|_, _, clock| {
        clock.set(Timestamp(20_001 * DAY_MS + 1_000)); // the daily refill: 100
    });
}

/// A fall spent in memory just before a clean close is told once, by the closing batch or
/// after the reopen; the run-out after the reopen is told.
#[test]
fn a_fall_spent_in_memory_before_a_close_is_told_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.redb");
    let config = Config::builder()
        .master_key(MasterKey::generate().unwrap())
        .build()
        .unwrap();
    for spent_before_close in [49u64, 50, 51, 60] {
        let ledger = Ledger::open(&path, config.clone()).unwrap();
        let events = ledger.credit_events();
        let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
        let k = ledger
            .keys()
            .create(
                NewKey::new(owner.id.as_str(), "k")
                    .credits(100)
                    .low_balance_threshold(50),
            )
            .unwrap();
        let (id, plain) = (k.info.id.to_string(), k.plaintext.expose().to_owned());
        for _ in 0..spent_before_close {
            spend(&ledger, &plain, 1).unwrap();
        }
        ledger.close().unwrap();
        let before: Vec<_> = events.try_iter().map(|e| (e.kind, e.remaining)).collect();
        drop(ledger);
        let ledger = Ledger::open(&path, config.clone()).unwrap();
        let events = ledger.credit_events();
        let served = spent_before_close + spent_until_refused(&ledger, &plain);
        ledger.flush().unwrap();
        let after: Vec<_> = events.try_iter().map(|e| (e.kind, e.remaining)).collect();
        assert_eq!(served, 100);
        let lows = before
            .iter()
            .chain(&after)
            .filter(|e| e.0 == CreditEventKind::LowBalance);
        assert_eq!(
            lows.count(),
            1,
            "{spent_before_close}: {before:?} {after:?}"
        );
        let exh = after
            .iter()
            .filter(|e| e.0 == CreditEventKind::Exhausted)
            .count();
        assert_eq!(exh, 1);
        let _ = ledger.credits().usage(&id);
        ledger.close().unwrap();
    }
}

/// 23:59:59.000 UTC, the last second of a day.
const T0: u64 = 20_000 * DAY_MS + DAY_MS - 1_000;
const T1: u64 = 20_001 * DAY_MS; // midnight: the daily refill is due

/// A wall clock that moves from `T0` to `T1` at the `jump_at`-th read made by one thread.
#[derive(Clone)]
struct JumpClock(Arc<Inner>);
struct Inner {
    wall: AtomicU64,
    reads: AtomicU64,
    jump_at: AtomicU64,
    thread: parking_lot::Mutex<Option<ThreadId>>,
}

impl Clock for JumpClock {
    fn now(&self) -> Timestamp {
        let armed = *self.0.thread.lock() == Some(std::thread::current().id());
        if armed {
            let n = self.0.reads.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.0.jump_at.load(Ordering::SeqCst) {
                self.0.wall.store(T1, Ordering::SeqCst);
            }
        }
        Timestamp(self.0.wall.load(Ordering::SeqCst))
    }
}

/// A refusal made in memory at 23:59:59 and reported after midnight, when the daily refill
/// is due: the report looked at the clock again, found the balance no longer known empty,
/// and told nothing, and the refill found no mark to clear. A clock that reaches midnight at
/// a chosen read of the requesting thread places the jump at each point of the request.
#[test]
fn a_refusal_straddling_the_refill_time_is_reported() {
    let mut lost = Vec::new();
    for jump_at in 1..=12 {
        let clock = JumpClock(Arc::new(Inner {
            wall: AtomicU64::new(T0),
            reads: AtomicU64::new(0),
            jump_at: AtomicU64::new(0),
            thread: parking_lot::Mutex::new(None),
        }));
        let (_dir, ledger, _, plain) = daily_key(clock.clone(), 3, 3);
        let events = ledger.credit_events();
        for _ in 0..3 {
            assert_eq!(spend(&ledger, &plain, 1), Ok(()));
        }
        ledger.flush().unwrap(); // the balance is known empty until midnight
        assert_eq!(events.try_iter().count(), 0);
        // The next request: the clock reaches midnight at its `jump_at`-th read.
        *clock.0.thread.lock() = Some(std::thread::current().id());
        clock.0.jump_at.store(jump_at, Ordering::SeqCst);
        let answer = spend(&ledger, &plain, 1);
        *clock.0.thread.lock() = None;
        clock.0.wall.store(T1, Ordering::SeqCst);
        ledger.flush().unwrap();
        let exhausted = events
            .try_iter()
            .filter(|e| e.kind == CreditEventKind::Exhausted)
            .count();
        if answer.is_err() && exhausted == 0 {
            lost.push(jump_at);
        }
    }
    assert!(
        lost.is_empty(),
        "refused for want of credits, never reported (clock jump at read {lost:?})"
    );
}

// Each phase of the concurrency test: the balance is run out and reported; spender threads
// hammer it (refused); the main thread grows it (top-up, set, refill or a pool's top-up);
// the spenders run it out again. Expected per phase: one LowBalance and one Exhausted, and
// exactly the growth granted. `KEYLEDGER_EVENT_PHASES` sets the phases per variant.

const START: Timestamp = Timestamp(1_750_000_000_000);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Grow {
    TopUp,
    Set,
    Refill,
    PoolTopUp,
}

#[derive(Clone, Copy, Debug)]
struct Variant {
    grow: Grow,
    exact: bool,
    cache: usize,
    noise: bool,
    threshold_flips: bool,
    x: u64,
    t: u64,
    threads: usize,
    phases: usize,
}

fn run(v: Variant) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START);
    let mut b = Config::builder()
        .master_key(MasterKey::generate().unwrap())
        .clock(clock.clone())
        .cache_capacity(v.cache);
    if v.exact {
        b = b.durability(Durability::Exact);
    }
    let ledger = Ledger::open(dir.path().join("k.redb"), b.build().unwrap()).unwrap();
    let events = ledger.credit_events();
    let owner = ledger.accounts().create(NewAccount::new("Acme")).unwrap();
    let owner = owner.id.as_str().to_owned();
    let (subject, plains): (String, Vec<String>) = if v.grow == Grow::PoolTopUp {
        let pool = ledger
            .credits()
            .create_pool(
                NewPool::new(&owner, "p")
                    .credits(0)
                    .low_balance_threshold(v.t),
            )
            .unwrap();
        let plains = (0..2)
            .map(|i| {
                let k = ledger
                    .keys()
                    .create(NewKey::new(&owner, format!("k{i}")).pool(pool.id.as_str()))
                    .unwrap();
                k.plaintext.expose().to_owned()
            })
            .collect();
        (pool.id.to_string(), plains)
    } else {
        let mut nk = NewKey::new(&owner, "k")
            .credits(0)
            .low_balance_threshold(v.t);
        if v.grow == Grow::Refill {
            nk = nk.refill(v.x, RefillInterval::Daily);
        }
        let k = ledger.keys().create(nk).unwrap();
        (k.info.id.to_string(), vec![k.plaintext.expose().to_owned()])
    };
    let noise_plain = v.noise.then(|| {
        let k = ledger
            .keys()
            .create(NewKey::new(&owner, "noise").credits(u64::MAX / 4))
            .unwrap();
        k.plaintext.expose().to_owned()
    });
    // Phase 0: run out and report.
    assert!(spend(&ledger, &plains[0], 1).is_err());
    ledger.flush().unwrap();
    let first: Vec<_> = events.try_iter().collect();
    assert_eq!(first.len(), 1, "{first:?}");
    let mut problems = Vec::new();
    let stop_noise = Arc::new(AtomicBool::new(false));
    std::thread::scope(|s| {
        if let Some(np) = &noise_plain {
            let (ledger, stop) = (&ledger, stop_noise.clone());
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = spend(ledger, np, 1);
                }
            });
        }
        for phase in 0..v.phases {
            let grown = AtomicBool::new(false);
            let after = AtomicU64::new(0);
            let granted = AtomicU64::new(0);
            let early_ok = AtomicU64::new(0);
            std::thread::scope(|s2| {
                for i in 0..v.threads {
                    let plain = &plains[i % plains.len()];
                    let (ledger, grown, after, granted, early_ok) =
                        (&ledger, &grown, &after, &granted, &early_ok);
                    s2.spawn(move || {
                        loop {
                            let g = grown.load(Ordering::Acquire);
                            match spend(ledger, plain, 1) {
                                Ok(()) => {
                                    granted.fetch_add(1, Ordering::Relaxed);
                                    if !g {
                                        early_ok.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Err(_) if g => {
                                    if after.fetch_add(1, Ordering::Relaxed) > 8 {
                                        break;
                                    }
                                }
                                Err(_) => {}
                            }
                            if after.load(Ordering::Relaxed) > 8 {
                                break;
                            }
                        }
                    });
                }
                std::thread::sleep(Duration::from_micros(300 + (phase as u64 % 7) * 200));
                let flip = if phase % 2 == 0 { v.t } else { v.t * 2 };
                std::thread::scope(|s3| {
                    if v.threshold_flips {
                        let (ledger, subject) = (&ledger, &subject);
                        s3.spawn(move || {
                            if v.grow == Grow::PoolTopUp {
                                let u = PoolUpdate::new().low_balance_threshold(Some(flip));
                                ledger.credits().update_pool(subject, u).unwrap();
                            } else {
                                let u = KeyUpdate::new().low_balance_threshold(Some(flip));
                                ledger.keys().update(subject, u).unwrap();
                            }
                        });
                    }
                    match v.grow {
                        Grow::TopUp | Grow::PoolTopUp => {
                            ledger.credits().top_up(&subject, v.x).unwrap();
                        }
                        Grow::Set => {
                            ledger.credits().set(&subject, v.x).unwrap();
                        }
                        Grow::Refill => {
                            let next = (keyledger::Clock::now(&clock).0 / DAY_MS + 1) * DAY_MS;
                            clock.set(Timestamp(next + (phase as u64 % 3)));
                        }
                    }
                });
                grown.store(true, Ordering::Release);
            });
            ledger.flush().unwrap();
            let evs: Vec<_> = events.try_iter().collect();
            let exh: Vec<_> = evs
                .iter()
                .filter(|e| e.kind == CreditEventKind::Exhausted)
                .collect();
            let low: Vec<_> = evs
                .iter()
                .filter(|e| e.kind == CreditEventKind::LowBalance)
                .collect();
            let g = granted.load(Ordering::Relaxed);
            let bad_fig =
                exh.iter().any(|e| e.remaining != 0) || low.iter().any(|e| e.remaining > v.t * 2);
            if exh.len() != 1 || (!v.threshold_flips && low.len() != 1) || bad_fig || g != v.x {
                problems.push(format!(
                    "{:?} phase {phase}: granted {g} (early {}), events {:?}",
                    v.grow,
                    early_ok.load(Ordering::Relaxed),
                    evs.iter()
                        .map(|e| (e.kind, e.remaining))
                        .collect::<Vec<_>>()
                ));
            }
        }
        stop_noise.store(true, Ordering::Relaxed);
    });
    problems
}

fn base(grow: Grow) -> Variant {
    Variant {
        grow,
        exact: false,
        cache: 10_000,
        noise: false,
        threshold_flips: false,
        x: 200,
        t: 50,
        threads: 4,
        phases: std::env::var("KEYLEDGER_EVENT_PHASES")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(60),
    }
}

fn check(v: Variant) {
    let problems = run(v);
    for p in &problems {
        eprintln!("{p}");
    }
    assert!(
        problems.is_empty(),
        "{} bad phases of {:?}",
        problems.len(),
        v
    );
}

#[test]
fn each_fall_told_once_around_top_up() {
    check(base(Grow::TopUp));
}
#[test]
fn each_fall_told_once_around_set() {
    check(base(Grow::Set));
}
#[test]
fn each_fall_told_once_around_refill() {
    check(base(Grow::Refill));
}
#[test]
fn each_fall_told_once_around_pool_top_up() {
    check(base(Grow::PoolTopUp));
}
#[test]
fn each_fall_told_once_around_exact_top_up() {
    check(Variant {
        exact: true,
        x: 60,
        ..base(Grow::TopUp)
    });
}
#[test]
fn each_fall_told_once_around_evictions_top_up() {
    check(Variant {
        cache: 1,
        noise: true,
        ..base(Grow::TopUp)
    });
}
#[test]
fn each_fall_told_once_around_evictions_refill() {
    check(Variant {
        cache: 1,
        noise: true,
        ..base(Grow::Refill)
    });
}
#[test]
fn each_fall_told_once_around_evictions_pool() {
    check(Variant {
        cache: 2,
        noise: true,
        ..base(Grow::PoolTopUp)
    });
}
#[test]
fn each_fall_told_once_around_threshold_flips() {
    check(Variant {
        threshold_flips: true,
        x: 2_000,
        t: 10,
        ..base(Grow::TopUp)
    });
}
#[test]
fn each_fall_told_once_around_threshold_flips_pool() {
    check(Variant {
        threshold_flips: true,
        x: 2_000,
        t: 10,
        ..base(Grow::PoolTopUp)
    });
}

/// Spends 1 unit at a time with key `plain` until refused: the units spent.
fn spent_until_refused(ledger: &Ledger, plain: &str) -> u64 {
    let mut spent = 0;
    while spend(ledger, plain, 1).is_ok() {
        spent += 1;
    }
    spent
}
