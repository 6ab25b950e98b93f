//! Events are never visible before they are durable: `kill -9` of a real control plane at
//! random moments, several times, while clients drive commands and keep reading the event log
//! (`GET /events` and the SSE stream `GET /events/stream`), then a restart on the same data dir.
//!
//! What it proves, over every crash:
//! - every event any client ever saw is still in the log after the restarts, with the same seq
//!   and identical content (a seen event was durable; its seq is never handed to another event);
//! - the log is gap-free from seq 1 and seqs only grow;
//! - no reader ever saw a gap or a repeat: each reader's next event is always its last seq + 1,
//!   across the crashes (the readers resume by seq, as real clients do);
//! - every command and token creation that was answered has its event in the log.
//!
//! Traffic: simulated daemons that reconnect by themselves after each crash (their
//! `device.connected` events ride the tunnel's recorder), two threads of `dr` commands through
//! the HTTP API (one `command` event each) and a thread creating API tokens (entity changes).
//! The kill moments come from a seeded generator; the seed is printed, and
//! `CM_DURABILITY_SEED=<n>` replays a run's schedule.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codemantle_control_plane::client::{Client, Request};
use codemantle_tests::fleet::{self, Fleet, FleetConfig, SplitMix64};
use codemantle_tests::harness::{ControlPlane, assert_gap_free, wait_until};
use futures_lite::FutureExt as _;
use serde_json::{Value, json};

const DEVICES: usize = 8;
const CRASHES: usize = 5;

/// Everything the clients saw, and what was wrong with it.
#[derive(Default)]
struct Seen {
    events: Mutex<BTreeMap<u64, (String, Value)>>,
    problems: Mutex<Vec<String>>,
}

impl Seen {
    /// Records `event` as seen by reader `who`, whose previous event had seq `*last`.
    fn note(&self, who: &str, event: &Value, last: &mut u64) {
        let Some(seq) = event["seq"].as_u64() else {
            self.problem(format!("{who}: an event without a seq: {event}"));
            return;
        };
        if seq != *last + 1 {
            self.problem(format!(
                "{who}: after seq {last} the next event was {seq} (a gap or a repeat)"
            ));
        }
        *last = (*last).max(seq);
        let mut events = self.events.lock().expect("seen");
        match events.get(&seq) {
            Some((first, known)) if known != event => self.problem(format!(
                "seq {seq} names two different events: {first} saw {known}, {who} saw {event}"
            )),
            Some(_) => {}
            None => {
                events.insert(seq, (who.to_owned(), event.clone()));
            }
        }
    }

    fn problem(&self, p: String) {
        eprintln!("PROBLEM: {p}");
        self.problems.lock().expect("problems").push(p);
    }
}

fn client(url: &str, token: &str) -> Client {
    let mut c = Client::new(url, Some(token.to_owned()), None).expect("client");
    c.timeout = Duration::from_secs(5);
    c
}

/// Pages through `GET /events?after=` from where it stopped, forever (until `stop`).
fn poll_events(url: String, token: String, seen: Arc<Seen>, stop: Arc<AtomicBool>) -> u64 {
    let client = client(&url, &token);
    let mut last = 0;
    while !stop.load(Ordering::Acquire) {
        let req = Request::new("GET", &format!("/events?after={last}&limit=1000"));
        match smol::block_on(client.send(req)) {
            Ok(r) if r.status == 200 => {
                let body = r.json();
                let page = body["events"].as_array().cloned().unwrap_or_default();
                for e in &page {
                    seen.note("poller", e, &mut last);
                }
                if page.is_empty() {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            // Down (being killed or restarting): try again.
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    last
}

/// Follows `GET /events/stream`, resuming with `Last-Event-ID` after each crash.
fn follow_stream(url: String, token: String, seen: Arc<Seen>, stop: Arc<AtomicBool>) -> u64 {
    let client = client(&url, &token);
    let mut last = 0;
    while !stop.load(Ordering::Acquire) {
        smol::block_on(async {
            let req = Request::new("GET", "/events/stream?after=0")
                .header("Last-Event-ID", &last.to_string());
            let Ok(stream) = client.open(req).await else {
                return;
            };
            if stream.status != 200 {
                return;
            }
            let mut sse = stream.into_sse();
            while !stop.load(Ordering::Acquire) {
                let next = async { Some(sse.next_event().await) }
                    .or(async {
                        smol::Timer::after(Duration::from_millis(200)).await;
                        None
                    })
                    .await;
                match next {
                    None => continue,
                    Some(Ok(Some(ev))) => {
                        let Ok(data) = serde_json::from_str::<Value>(&ev.data) else {
                            seen.problem(format!("stream: data is not JSON: {:?}", ev.data));
                            return;
                        };
                        if ev.id.as_deref().and_then(|i| i.parse::<u64>().ok())
                            != data["seq"].as_u64()
                        {
                            seen.problem(format!("stream: id {:?} but seq {}", ev.id, data["seq"]));
                        }
                        seen.note("stream", &data, &mut last);
                    }
                    // Ended or broken (the server died): reconnect.
                    Some(_) => return,
                }
            }
        });
        std::thread::sleep(Duration::from_millis(20));
    }
    last
}

/// `dr` on random devices through the API, one `command` event each (when the device is up).
fn drive_commands(
    url: String,
    token: String,
    devices: Vec<String>,
    seed: u64,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) {
    let client = client(&url, &token);
    let mut rng = SplitMix64::new(seed);
    while !stop.load(Ordering::Acquire) {
        let id = &devices[rng.below(devices.len() as u64) as usize];
        let req = Request::new("POST", &format!("/devices/{id}/dir")).json(&json!({}));
        match smol::block_on(client.send(req)) {
            Ok(r) if r.status == 200 => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Entity changes: a new API token every few milliseconds.
fn create_tokens(url: String, token: String, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>) {
    let client = client(&url, &token);
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let req = Request::new("POST", "/tokens")
            .json(&json!({ "name": format!("crash-{n}"), "role": "viewer" }));
        match smol::block_on(client.send(req)) {
            Ok(r) if r.status == 201 => {
                ok.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn seed() -> u64 {
    match std::env::var("CM_DURABILITY_SEED") {
        Ok(s) => s.parse().expect("CM_DURABILITY_SEED is a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    }
}

#[test]
fn seen_events_survive_kill_9_with_their_seq_and_content() {
    let seed = seed();
    eprintln!("CM_DURABILITY_SEED={seed}");
    let mut rng = SplitMix64::new(seed);
    let mut cp = ControlPlane::start();
    let devices = fleet::register(&mut cp, "durab", DEVICES);
    let ids: Vec<String> = devices.iter().map(|d| d.id.clone()).collect();
    let addr = format!("127.0.0.1:{}", cp.port).parse().expect("addr");
    let mut config = FleetConfig::new(addr);
    config.cap = Duration::from_millis(500);
    let mut sims = Fleet::start(&config, &devices);
    assert!(
        sims.wait(Duration::from_secs(30), |f| f.online() == DEVICES),
        "{} of {DEVICES} simulated daemons connected",
        sims.online()
    );

    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let commands_ok = Arc::new(AtomicU64::new(0));
    let tokens_ok = Arc::new(AtomicU64::new(0));
    let (url, token) = (cp.url(), cp.token.clone());
    let readers = vec![
        std::thread::spawn({
            let (url, token, seen, stop) = (url.clone(), token.clone(), seen.clone(), stop.clone());
            move || poll_events(url, token, seen, stop)
        }),
        std::thread::spawn({
            let (url, token, seen, stop) = (url.clone(), token.clone(), seen.clone(), stop.clone());
            move || follow_stream(url, token, seen, stop)
        }),
    ];
    let mut writers = Vec::new();
    for i in 0..2u64 {
        let (url, token, ids, stop, ok) = (
            url.clone(),
            token.clone(),
            ids.clone(),
            stop.clone(),
            commands_ok.clone(),
        );
        let seed = seed.wrapping_add(i);
        writers.push(std::thread::spawn(move || {
            drive_commands(url, token, ids, seed, stop, ok)
        }));
    }
    writers.push(std::thread::spawn({
        let (url, token, stop, ok) = (url.clone(), token.clone(), stop.clone(), tokens_ok.clone());
        move || create_tokens(url, token, stop, ok)
    }));

    let started = Instant::now();
    for crash in 1..=CRASHES {
        // Wait for some traffic to be seen, then a random moment more.
        let seen_before = seen.events.lock().expect("seen").len();
        wait_until(
            Duration::from_secs(30),
            "events seen since the restart",
            || seen.events.lock().expect("seen").len() > seen_before + 20,
        );
        std::thread::sleep(Duration::from_millis(rng.below(700)));
        let last_seen = seen
            .events
            .lock()
            .expect("seen")
            .keys()
            .next_back()
            .copied();
        cp.kill();
        eprintln!(
            "crash {crash}: kill -9 with seq {last_seen:?} the highest seen; {} commands and {} \
             tokens answered so far",
            commands_ok.load(Ordering::Relaxed),
            tokens_ok.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        cp.spawn();
    }
    // A last stretch of traffic on the final instance, then everything stops.
    let seen_before = seen.events.lock().expect("seen").len();
    wait_until(
        Duration::from_secs(30),
        "events seen after the last restart",
        || seen.events.lock().expect("seen").len() > seen_before + 20,
    );
    stop.store(true, Ordering::Release);
    for w in writers {
        w.join().expect("writer thread");
    }
    sims.stop();
    let lasts: Vec<u64> = readers
        .into_iter()
        .map(|r| r.join().expect("reader thread"))
        .collect();

    let all = cp.events_after(0);
    assert_gap_free(&all, 1);
    let seen_events = seen.events.lock().expect("seen").clone();
    let mut problems = seen.problems.lock().expect("problems").clone();
    for (seq, (who, event)) in &seen_events {
        match all.get((*seq - 1) as usize) {
            Some(now) if now == event => {}
            Some(now) => problems.push(format!(
                "{who} saw seq {seq} as {event}; after the crashes it is {now}"
            )),
            None => problems.push(format!(
                "{who} saw seq {seq} ({event}); after the crashes the log ends at {}",
                all.len()
            )),
        }
    }
    eprintln!(
        "{CRASHES} crashes in {:?}: {} events in the log, {} seen by clients (readers ended \
         at {lasts:?}), {} commands and {} tokens answered",
        started.elapsed(),
        all.len(),
        seen_events.len(),
        commands_ok.load(Ordering::Relaxed),
        tokens_ok.load(Ordering::Relaxed)
    );
    assert!(
        problems.is_empty(),
        "{} problems (CM_DURABILITY_SEED={seed}):\n{}",
        problems.len(),
        problems.join("\n")
    );
    // An answered command or token creation was durable before its answer: its event is in
    // the log (there may be more: a crash between the flush and the answer).
    let count = |kind: &str| all.iter().filter(|e| e["kind"] == kind).count() as u64;
    let dr_ok = all
        .iter()
        .filter(|e| e["kind"] == "command" && e["detail"]["outcome"] == "ok")
        .count() as u64;
    assert!(
        dr_ok >= commands_ok.load(Ordering::Relaxed),
        "{} commands answered 200 but only {dr_ok} recorded",
        commands_ok.load(Ordering::Relaxed)
    );
    assert!(
        count("token.created") >= tokens_ok.load(Ordering::Relaxed),
        "{} tokens created but only {} token.created events",
        tokens_ok.load(Ordering::Relaxed),
        count("token.created")
    );
    assert!(
        commands_ok.load(Ordering::Relaxed) > 0,
        "no command answered"
    );
    assert!(
        seen_events.len() > 100,
        "too little traffic to prove anything"
    );
}

/// Group commit figures (printed with `--nocapture`; run with `--release` for real numbers):
/// - appends nobody waits for (the recorder's connects and commands): appends/s, and how many
///   flushes made them durable;
/// - `C` writers that each wait for their own event to be durable before the next append (an
///   entity change, or a command's HTTP reply): events/s, events per flush, and the latency of
///   append + wait against append alone.
///
/// Asserts only that every event became durable and visible, in order.
#[test]
fn group_commit_figures() {
    use codemantle_control_plane::events::{EventDraft, kind};
    use codemantle_control_plane::store::sled::SledStore;
    use codemantle_control_plane::store::{Store, TenantId};

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SledStore::open(dir.path()).expect("open"));
    let t = TenantId::default_tenant();
    let draft = |n: u64| {
        EventDraft::new(
            &t,
            n,
            "token:bench",
            kind::COMMAND,
            json!({"device": "dev_bench0000000001", "request_id": n.to_string(), "type": "dr",
                   "outcome": "ok", "duration_ms": 1}),
        )
    };

    // Fire and forget.
    let n = 10_000u64;
    let before = store.flush_stats();
    let started = Instant::now();
    let mut last = 0;
    for i in 0..n {
        last = store.append_event(draft(i)).expect("append").seq;
    }
    let appended = started.elapsed();
    store.when_durable(last).wait_blocking().expect("durable");
    let durable = started.elapsed();
    let after = store.flush_stats();
    println!(
        "fire-and-forget: {n} appends in {appended:?} ({:.0} appends/s, {:.1} µs each); all \
         durable after {durable:?} using {} flushes",
        n as f64 / appended.as_secs_f64(),
        appended.as_secs_f64() * 1e6 / n as f64,
        after.flushes - before.flushes
    );

    // Writers that wait for their own event.
    for (writers, per_writer) in [(1u64, 200u64), (8, 150), (64, 40)] {
        let before = store.flush_stats();
        let started = Instant::now();
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let store = store.clone();
                let t = t.clone();
                std::thread::spawn(move || {
                    let mut latencies = Vec::with_capacity(per_writer as usize);
                    for i in 0..per_writer {
                        let begun = Instant::now();
                        let ev = store
                            .append_event(EventDraft::new(
                                &t,
                                w * 1_000_000 + i,
                                "token:bench",
                                kind::COMMAND,
                                json!({"writer": w, "n": i}),
                            ))
                            .expect("append");
                        store.when_durable(ev.seq).wait_blocking().expect("durable");
                        latencies.push(begun.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies: Vec<Duration> = threads
            .into_iter()
            .flat_map(|h| h.join().expect("writer"))
            .collect();
        let took = started.elapsed();
        let after = store.flush_stats();
        latencies.sort_unstable();
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        let events = writers * per_writer;
        let flushes = after.flushes - before.flushes;
        println!(
            "{writers} waiting writers: {events} events in {took:?} ({:.0} events/s), {flushes} \
             flushes ({:.1} events per flush); append + wait p50 {:?} p99 {:?} max {:?}",
            events as f64 / took.as_secs_f64(),
            events as f64 / flushes.max(1) as f64,
            pct(0.5),
            pct(0.99),
            latencies[latencies.len() - 1]
        );
    }

    // Everything is durable, served in order, nothing else.
    let total = store.last_event_seq().expect("seq");
    let mut after = 0;
    let mut count = 0;
    loop {
        let page = store.events(&t, after, 1000).expect("events");
        let Some(last) = page.last() else { break };
        for e in &page {
            assert_eq!(e.seq, after + 1, "gap-free");
            after = e.seq;
        }
        count += page.len();
        assert_eq!(last.seq, after);
    }
    assert_eq!(count as u64, total);
    assert_eq!(total, 10_000 + 200 + 8 * 150 + 64 * 40);
}
