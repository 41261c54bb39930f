//! Load run: requests per second through the auth middleware (`Ledger::verify` + commit)
//! versus the same server with auth switched off, over loopback, as a ratio.
//!
//! ```sh
//! cargo run --release --example load            # ≈ 27 s
//! ```
//!
//! One process: the example server's router (`examples/server/app`) served by tokio on two
//! ports of 127.0.0.1 — one with auth on, one with `AuthMode::Off` (what `KEYLEDGER_AUTH=off`
//! does for the real binary) — on a scratch database, and `LOAD_CONNECTIONS` (default 4)
//! client threads with keep-alive connections posting `/api/v1/quickhits/create`. Phases
//! alternate off/on, `LOAD_ROUNDS` (default 6) times `LOAD_SECS` (default 2) seconds per side
//! after a short warm-up, so drift in the machine's speed hits both sides alike; the ratio
//! reported is the median of the rounds' ratios. Clients and server share the machine's
//! cores, as they would with `wrk` on the same host.

#[path = "server/app/mod.rs"]
#[allow(dead_code)] // the load run uses a part of the app
mod app;
#[path = "../tests/server_support/http.rs"]
#[allow(dead_code)]
mod http;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keyledger::{Config, Ledger};

use app::{App, AuthMode};

const ROUTE: &str = "/api/v1/quickhits/create";
const BODY: &str = r#"{"prompt":"Explain photosynthesis","mode":"narrow"}"#;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Requests/s, latency percentiles in microseconds, and process CPU time per request (server
/// and clients together; `None` where `/proc` is missing) of one phase.
struct Phase {
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    cpu_us: Option<f64>,
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (Linux; its
/// clock ticks are 1/100 s, `USER_HZ`).
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// `connections` clients posting as fast as they can for `duration`.
fn drive(addr: SocketAddr, key: &str, connections: u64, duration: Duration) -> Phase {
    let auth = format!("Bearer {key}");
    let cpu_before = cpu_secs();
    let start = Instant::now();
    let deadline = start + duration;
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let auth = auth.clone();
            std::thread::spawn(move || {
                let mut conn = http::Connection::open(addr).expect("connect");
                let headers = [
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                ];
                let mut latencies = Vec::with_capacity(1 << 16);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let r = conn
                        .send("POST", ROUTE, &headers, Some(BODY))
                        .expect("request");
                    assert_eq!(r.status, 200, "{}", r.body);
                    latencies.push(sent.elapsed().as_micros() as u64);
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_before.zip(cpu_secs()).map(|(a, b)| b - a);
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    Phase {
        rps: latencies.len() as f64 / elapsed,
        p50_us: at(0.50),
        p99_us: at(0.99),
        cpu_us: cpu.map(|c| c * 1e6 / latencies.len() as f64),
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The middleware's ledger work without HTTP, same key, one thread: what auth can cost at
/// most per request, for scale.
fn in_process(ledger: &Ledger, key: &str) -> Result<(), Box<dyn std::error::Error>> {
    let header = format!("Bearer {key}");
    let n = 200_000u32;
    let started = Instant::now();
    for _ in 0..n {
        let presented = keyledger::Presented::from_headers(Some(&header), None)?;
        let grant = ledger.verify(&keyledger::Request::new(&presented, ROUTE))?;
        let reserved = grant.reserved();
        std::hint::black_box(grant.commit(reserved));
    }
    let verify_ns = started.elapsed().as_nanos() as f64 / f64::from(n);
    let presented = keyledger::Presented::from_headers(Some(&header), None)?;
    let grant = ledger.verify(&keyledger::Request::new(&presented, "/v2/keys"))?;
    let started = Instant::now();
    for _ in 0..n {
        std::hint::black_box((grant.key_id(), grant.owner_id()));
    }
    let ids_ns = started.elapsed().as_nanos() as f64 / f64::from(n);
    drop(grant);
    println!(
        "in-process, one key: from_headers + verify + commit {verify_ns:.0} ns; \
         Grant::key_id + owner_id {ids_ns:.0} ns"
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secs = env_or("LOAD_SECS", 2).clamp(1, 10);
    // Bounded: at most ≈ 28 s of measuring, whatever is asked.
    let rounds = env_or("LOAD_ROUNDS", 6).clamp(1, (14 / secs).max(1));
    let connections = env_or("LOAD_CONNECTIONS", 4).clamp(1, 64);
    let dir = tempfile::tempdir()?;
    let ledger = Ledger::open(dir.path().join("keys.redb"), Config::ephemeral()?)?;
    let boot = app::bootstrap(&ledger)?;
    let admin = boot
        .admin_key
        .as_ref()
        .ok_or("fresh database")?
        .expose()
        .to_owned();
    if let Some(pool) = &boot.pool {
        ledger.credits().top_up(pool, 1_000_000_000)?; // never the limiting factor
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut addrs = Vec::new();
    for auth in [AuthMode::Off, AuthMode::On] {
        let state = Arc::new(App {
            ledger: ledger.clone(),
            auth,
            default_owner: boot.account,
            request_deadline: std::time::Duration::from_secs(30),
            header_deadline: std::time::Duration::from_secs(10),
            max_connections: app::MAX_CONNECTIONS,
        });
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        addrs.push(listener.local_addr()?);
        runtime.spawn(async move {
            app::serve(listener, state, std::future::pending()).await;
        });
    }
    in_process(&ledger, &admin)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "load: POST {ROUTE} over loopback, {connections} keep-alive connections, \
         {rounds} rounds of {secs} s per side, {cores} cores shared by clients and server"
    );
    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu = [Vec::new(), Vec::new()];
    for round in 1..=rounds {
        let mut pair = [0.0; 2];
        for (side, addr) in addrs.iter().enumerate() {
            drive(*addr, &admin, connections, Duration::from_millis(200)); // warm-up
            let p = drive(*addr, &admin, connections, Duration::from_secs(secs));
            let name = ["auth off", "auth on "][side];
            println!(
                "  round {round} {name}: {:>8.0} req/s   p50 {:>4} µs   p99 {:>5} µs   \
                 CPU {:>5.1} µs/request",
                p.rps,
                p.p50_us,
                p.p99_us,
                p.cpu_us.unwrap_or(f64::NAN)
            );
            pair[side] = p.rps;
            cpu[side].extend(p.cpu_us);
        }
        off.push(pair[0]);
        on.push(pair[1]);
        ratios.push(pair[1] / pair[0]);
    }
    let (off, on) = (median(&mut off), median(&mut on));
    let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let highest = ratios.iter().copied().fold(0.0, f64::max);
    println!("auth off: {off:.0} req/s (median of rounds)");
    println!("auth on:  {on:.0} req/s (verify + commit + receipt in the envelope)");
    println!(
        "ratio on/off: {:.3} (median of the rounds' ratios, which ranged {lowest:.2}–\
         {highest:.2}); auth adds ≈ {:.1} µs of wall time per request at saturation",
        median(&mut ratios),
        (1.0 / on - 1.0 / off) * 1e6
    );
    if cpu.iter().all(|c| c.len() == rounds as usize) {
        let (off, on) = (median(&mut cpu[0]), median(&mut cpu[1]));
        println!(
            "CPU per request (server + clients, medians): off {off:.1} µs, on {on:.1} µs: \
             auth costs {:.1} µs of CPU, {:.1}% of the request",
            on - off,
            (on - off) / on * 100.0
        );
    }
    let usage = ledger
        .credits()
        .usage(&boot.admin_key_id.ok_or("admin id")?)?;
    println!(
        "admin key: {} verified requests (one of them a free /v2 peek), {} credits charged",
        usage.requests, usage.lifetime_spent
    );
    runtime.shutdown_background();
    ledger.close()?;
    Ok(())
}
