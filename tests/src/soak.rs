//! The soak harness behind `cm-soak` and `tests/soak_short.rs`: a real control plane, real
//! daemons and a fleet of simulated ones under a continuous workload, with faults injected on a
//! schedule, and invariants checked while it runs and at the end.
//!
//! # What runs
//!
//! Everything lives in two network namespaces of its own (see [`Namespaces`]): the caller's
//! thread (the whole `cm-soak` process) joins `soak`, where the control plane listens on every
//! address of that namespace — its loopback for the fleet and two daemons, and one end of a veth
//! pair whose other end is in `part`, where the third daemon runs. Nothing touches the host's
//! interfaces, and loopback traffic never leaves the namespace.
//!
//! - the control plane: heartbeat 5 s, request timeout 10 s, its data dir on a tmpfs of its own
//!   (so the disk can be filled and freed);
//! - daemon `files`: plain, on loopback; the one that gets `kill -9`;
//! - daemon `session`: its `opencode` is `cm-fake-opencode`; one session, prompted in a loop
//!   ("emit N gap MS": a numbered sequence of deltas), its output followed over
//!   `GET /sessions/:sid/stream` with `Last-Event-ID` resume;
//! - daemon `netns`: in the `part` namespace, over the veth pair; the one that gets partitioned;
//! - `fleet` simulated daemons ([`crate::fleet`]), reconnecting with the daemon's full jitter.
//!
//! # Workload (continuous)
//!
//! - per real daemon, a worker that creates `soak-w-K` (mkdir) and renames it to `soak-r-K`,
//!   each with its own `Idempotency-Key`, retrying every transient failure (transport error,
//!   409/429/5xx) with the *same* key until acknowledged;
//! - the session stream reader above;
//! - an `/events/stream` follower that resumes by `Last-Event-ID` and records every event.
//!
//! # Faults (round-robin, one per slot of `fault_every`)
//!
//! `kill -9` + restart of the control plane; `kill -9` + restart of daemon `files`; the `netns`
//! daemon's link down for `partition`, then up; the data disk filled (until `ENOSPC`) for
//! `disk_full`, then freed; every simulated daemon dropped and re-dialled at once (a storm).
//!
//! # Invariants (see [`Report::violations`])
//!
//! No acknowledged command without its effect on disk, none applied twice (a retry answered
//! "already exists"/"no such source", or a `soak-w-K` back after its rename), no command left
//! unacknowledged; every stream chunk exactly once (no seq gap or repeat, no `truncated`, every
//! delta once); the event log gap-free, the follower's view gap-free and identical to the final
//! log (a seq the follower saw with other content = a lost event whose seq was reused), and at
//! least one `command` event with outcome `ok` per acknowledged command; after every
//! control-plane restart the fleet is back and its reconnects are spread (no 100 ms window holds
//! more than half of it).
//!
//! SAFETY: files only in temp dirs (the tmpfs is mounted in one, see [`crate::fault::Tmpfs`]);
//! network only inside the two namespaces; signals only to our own children.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use codemantle_control_plane::client::{Client, ClientError, Request, Response, SseReader};
use futures_lite::FutureExt as _;
use serde_json::{Value, json};

use crate::bins::bin_path;
use crate::fault::{NetNs, Tmpfs, raise_nofile};
use crate::fleet::{self, Fleet, FleetConfig, FleetDevice, peak_per_bucket};
use crate::harness::{ControlPlane, CpOptions, Daemon, free_port};

/// The control plane's address on the veth pair (the `netns` daemon dials it).
const CP_VETH_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 9, 2);
const CP_VETH_CIDR: &str = "10.213.9.2/30";
const PART_VETH_CIDR: &str = "10.213.9.1/30";
const PART_IF: &str = "cmsoak-d";
const CP_IF: &str = "cmsoak-cp";
/// Width of the connection-rate buckets.
const BUCKET: Duration = Duration::from_millis(100);
const NOBODY: u32 = 65534;

/// Settings of one soak run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub duration: Duration,
    /// Simulated daemons.
    pub fleet: usize,
    /// One fault per slot of this length, kinds round-robin.
    pub fault_every: Duration,
    /// How long the `netns` daemon's link stays down.
    pub partition: Duration,
    /// How long the data disk stays full.
    pub disk_full: Duration,
    /// How long the control plane stays down after `kill -9`.
    pub cp_down: Duration,
    /// Size of the control plane's tmpfs.
    pub tmpfs_bytes: u64,
    /// Pause between two commands of one worker.
    pub command_pause: Duration,
    /// Deltas per prompt and the fake model's pause between them.
    pub prompt_deltas: u32,
    pub prompt_gap_ms: u32,
    /// How long a command is retried before it counts as never acknowledged.
    pub give_up_after: Duration,
}

impl SoakConfig {
    /// Defaults for a run of `duration` with `fleet` simulated daemons.
    pub fn new(duration: Duration, fleet: usize) -> SoakConfig {
        SoakConfig {
            duration,
            fleet,
            fault_every: Duration::from_secs(20),
            partition: Duration::from_secs(12),
            disk_full: Duration::from_secs(5),
            cp_down: Duration::from_secs(1),
            tmpfs_bytes: 256 * 1024 * 1024,
            command_pause: Duration::from_millis(100),
            prompt_deltas: 40,
            prompt_gap_ms: 50,
            give_up_after: Duration::from_secs(420),
        }
    }
}

/// Parses `90`, `90s`, `10m`, `1h`, `500ms`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    match unit {
        "" | "s" => Some(Duration::from_secs(n)),
        "ms" => Some(Duration::from_millis(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        "h" => Some(Duration::from_secs(n.checked_mul(3600)?)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces

/// The soak's two network namespaces and the veth pair between them.
pub struct Namespaces {
    /// Where this process, the control plane, the fleet and two daemons live.
    pub soak: NetNs,
    /// Where the partitioned daemon lives.
    pub part: NetNs,
}

impl Namespaces {
    /// Creates both namespaces and the veth pair, and moves the calling thread into `soak`.
    /// Call it before any other thread exists (threads inherit their creator's namespace).
    pub fn create_and_enter() -> std::io::Result<Namespaces> {
        let soak = NetNs::create("soak")?;
        let part = NetNs::create("part")?;
        NetNs::veth_pair(&part, PART_IF, PART_VETH_CIDR, &soak, CP_IF, CP_VETH_CIDR)?;
        soak.enter()?;
        Ok(Namespaces { soak, part })
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers (each worker has its own client; the port survives restarts)

#[derive(Clone)]
struct Api {
    url: String,
    token: String,
}

impl Api {
    fn client(&self) -> Client {
        let mut c = Client::new(&self.url, Some(self.token.clone()), None).expect("client");
        c.timeout = Duration::from_secs(30);
        c
    }

    fn send(&self, req: Request) -> Result<Response, ClientError> {
        smol::block_on(self.client().send(req))
    }

    fn get(&self, path: &str) -> Option<(u16, Value)> {
        self.send(Request::new("GET", path))
            .ok()
            .map(|r| (r.status, r.json()))
    }
}

/// Whether a failed attempt may be retried with the same key: transport errors, the device not
/// (yet) connected or busy, a key still in progress, 5xx (disconnected, timeout, disk full).
fn transient(status: u16) -> bool {
    matches!(status, 409 | 429) || status >= 500
}

/// How a keyed request ended.
#[derive(Debug, Default, Clone)]
struct Attempts {
    attempts: u32,
    /// The final answer (status, body), if any came back acknowledged or as a hard failure.
    status: Option<u16>,
    body: Value,
    replayed: bool,
    /// From the first attempt to the final answer.
    took: Duration,
    /// Transient statuses seen, by code (`transport` for no answer).
    transient: Vec<String>,
}

/// Sends `body` to `path` with `key` until it is answered with a non-transient status (or
/// `give_up` passes, or `stop_hard` is set).
fn send_keyed(
    api: &Api,
    path: &str,
    key: &str,
    body: &Value,
    give_up: Duration,
    stop_hard: &AtomicBool,
) -> Attempts {
    let started = Instant::now();
    let mut out = Attempts::default();
    loop {
        out.attempts += 1;
        let req = Request::new("POST", path)
            .header("idempotency-key", key)
            .json(body);
        match api.send(req) {
            Ok(r) if !transient(r.status) => {
                out.status = Some(r.status);
                out.replayed = r.header("idempotent-replayed") == Some("true");
                out.body = r.json();
                out.took = started.elapsed();
                return out;
            }
            Ok(r) => {
                let code = r.json()["error"].as_str().unwrap_or("").to_owned();
                out.transient.push(format!("{} {code}", r.status));
            }
            Err(_) => out.transient.push("transport".into()),
        }
        if started.elapsed() > give_up || stop_hard.load(Ordering::Relaxed) {
            out.took = started.elapsed();
            return out;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------------
// Command workers

/// One acknowledged command.
#[derive(Debug, Clone)]
pub struct Ack {
    /// Protocol type: `md` (mkdir) or `rn` (rename).
    pub t: &'static str,
    pub key: String,
    /// Wall clock (ms since the epoch) of the first attempt and of the answer.
    pub start_ms: u64,
    pub end_ms: u64,
    pub attempts: u32,
    pub transient: Vec<String>,
}

/// What one command worker did.
#[derive(Debug, Default, Clone)]
pub struct CommandStats {
    pub daemon: String,
    pub device: String,
    /// Distinct commands (keys).
    pub issued: u64,
    /// Answered 200.
    pub succeeded: u64,
    /// Needed more than one attempt.
    pub retried: u64,
    pub attempts: u64,
    /// Answered from the control plane's idempotency store.
    pub replayed: u64,
    /// Acknowledged mkdirs and renames (for matching events).
    pub acked_md: u64,
    pub acked_rn: u64,
    /// Every acknowledged command: type, key, wall-clock window, attempts (to name the
    /// command whose event is missing).
    pub acks: Vec<Ack>,
    /// Never acknowledged within `give_up_after`.
    pub gave_up: Vec<String>,
    /// A hard error on the first attempt (should not happen: names are unique).
    pub failed: Vec<String>,
    /// A retry answered "exists"/"no source": the first attempt ran and the retry ran again.
    pub duplicate_signals: Vec<String>,
    /// Found at the end.
    pub lost: Vec<String>,
    pub duplicated_on_disk: Vec<String>,
    /// Longest time from first attempt to acknowledgement.
    pub longest: Duration,
    /// Transient answers by status/code.
    pub transient: BTreeMap<String, u64>,
    /// Index of every pair: k → (mkdir acked, rename acked).
    pairs: Vec<(bool, bool)>,
}

fn command_worker(
    api: Api,
    name: String,
    device: String,
    cfg: SoakConfig,
    stop: Arc<AtomicBool>,
    stop_hard: Arc<AtomicBool>,
) -> CommandStats {
    let mut st = CommandStats {
        daemon: name.clone(),
        device: device.clone(),
        ..CommandStats::default()
    };
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let w = format!("soak-w-{k:06}");
        let r = format!("soak-r-{k:06}");
        let md = run_one(
            &api,
            &mut st,
            &format!("/devices/{device}/mkdir"),
            &format!("soak-{name}-{k}-md"),
            &json!({ "path": w }),
            &cfg,
            &stop_hard,
        );
        let rn = md
            && run_one(
                &api,
                &mut st,
                &format!("/devices/{device}/rename"),
                &format!("soak-{name}-{k}-rn"),
                &json!({ "source": w, "dest": r }),
                &cfg,
                &stop_hard,
            );
        if md {
            st.acked_md += 1;
        }
        if rn {
            st.acked_rn += 1;
        }
        st.pairs.push((md, rn));
        k += 1;
        std::thread::sleep(cfg.command_pause);
    }
    st
}

/// One keyed command; returns whether its effect is in place (acknowledged, or a duplicate run
/// that found it in place).
fn run_one(
    api: &Api,
    st: &mut CommandStats,
    path: &str,
    key: &str,
    body: &Value,
    cfg: &SoakConfig,
    stop_hard: &AtomicBool,
) -> bool {
    st.issued += 1;
    let start_ms = crate::simdaemon::now_ms();
    let a = send_keyed(api, path, key, body, cfg.give_up_after, stop_hard);
    let end_ms = crate::simdaemon::now_ms();
    st.attempts += u64::from(a.attempts);
    if a.attempts > 1 {
        st.retried += 1;
    }
    for t in &a.transient {
        *st.transient.entry(t.clone()).or_default() += 1;
    }
    match a.status {
        Some(200) => {
            st.succeeded += 1;
            if a.replayed {
                st.replayed += 1;
            }
            st.longest = st.longest.max(a.took);
            st.acks.push(Ack {
                t: if path.ends_with("/rename") {
                    "rn"
                } else {
                    "md"
                },
                key: key.to_owned(),
                start_ms,
                end_ms,
                attempts: a.attempts,
                transient: a.transient.clone(),
            });
            true
        }
        Some(status) if a.attempts > 1 => {
            st.duplicate_signals.push(format!(
                "{key}: retry #{} got {status} {}",
                a.attempts, a.body
            ));
            false
        }
        Some(status) => {
            st.failed.push(format!("{key}: {status} {}", a.body));
            false
        }
        None => {
            st.gave_up.push(format!(
                "{key}: {} attempts over {:?}, last {:?}",
                a.attempts,
                a.took,
                a.transient.last()
            ));
            false
        }
    }
}

/// Compares a worker's acknowledged pairs with the daemon's project root.
fn check_disk(st: &mut CommandStats, root: &Path) {
    let present: std::collections::HashSet<String> = match std::fs::read_dir(root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("soak-"))
            .collect(),
        Err(e) => {
            st.lost.push(format!("cannot list {}: {e}", root.display()));
            return;
        }
    };
    for (k, &(md, rn)) in st.pairs.iter().enumerate() {
        let w = format!("soak-w-{k:06}");
        let r = format!("soak-r-{k:06}");
        match (md, rn) {
            (true, true) => {
                if !present.contains(&r) {
                    st.lost.push(format!("{r} (rename acknowledged)"));
                }
                if present.contains(&w) {
                    st.duplicated_on_disk
                        .push(format!("{w} exists again after its rename"));
                }
            }
            (true, false) if !present.contains(&w) && !present.contains(&r) => {
                st.lost.push(format!("{w} (mkdir acknowledged)"));
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Session stream reader

/// What the session stream reader saw.
#[derive(Debug, Default, Clone)]
pub struct StreamStats {
    pub prompts: u64,
    pub prompts_retried: u64,
    pub prompts_failed: Vec<String>,
    pub chunks: u64,
    pub chunks_lost: u64,
    pub chunks_duplicated: u64,
    pub truncated: u64,
    pub deltas: u64,
    pub deltas_lost: u64,
    pub deltas_duplicated: u64,
    /// Re-opened streams (`Last-Event-ID`).
    pub resumes: u64,
    pub streams_unfinished: Vec<String>,
    pub problems: Vec<String>,
}

enum Next {
    Event(codemantle_control_plane::client::SseEvent),
    Ended,
    Stalled,
}

fn next_sse(sse: &mut SseReader, limit: Duration) -> Next {
    smol::block_on(
        async {
            match sse.next_event().await {
                Ok(Some(ev)) => Next::Event(ev),
                _ => Next::Ended,
            }
        }
        .or(async {
            smol::Timer::after(limit).await;
            Next::Stalled
        }),
    )
}

fn stream_worker(
    api: Api,
    device: String,
    sid: String,
    cfg: SoakConfig,
    stop: Arc<AtomicBool>,
    stop_hard: Arc<AtomicBool>,
) -> StreamStats {
    let mut st = StreamStats::default();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let a = send_keyed(
            &api,
            &format!("/devices/{device}/prompt"),
            &format!("soak-prompt-{n}"),
            &json!({
                "sessionId": sid,
                "prompt": format!("emit {} gap {}", cfg.prompt_deltas, cfg.prompt_gap_ms),
            }),
            cfg.give_up_after,
            &stop_hard,
        );
        st.prompts += 1;
        if a.attempts > 1 {
            st.prompts_retried += 1;
        }
        let x = match (a.status, a.body["x"].as_str()) {
            (Some(202), Some(x)) => x.to_owned(),
            _ => {
                st.prompts_failed.push(format!(
                    "prompt {n}: {:?} {} after {} attempts",
                    a.status, a.body, a.attempts
                ));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        follow_stream(&api, &sid, &x, &cfg, &mut st, &stop_hard);
    }
    st
}

/// Reads stream `x` to its end, resuming after breaks; checks seqs and deltas.
fn follow_stream(
    api: &Api,
    sid: &str,
    x: &str,
    cfg: &SoakConfig,
    st: &mut StreamStats,
    stop_hard: &AtomicBool,
) {
    let started = Instant::now();
    let mut last: Option<u32> = None;
    let mut text = String::new();
    let mut opened = false;
    let ended = 'outer: loop {
        if started.elapsed() > cfg.give_up_after || stop_hard.load(Ordering::Relaxed) {
            break false;
        }
        let mut req = Request::new("GET", &format!("/sessions/{sid}/stream?x={x}"));
        if let Some(q) = last {
            req = req.header("last-event-id", &q.to_string());
        }
        if opened {
            st.resumes += 1;
        }
        let resp = match smol::block_on(api.client().open(req)) {
            Ok(r) if r.status == 200 => r,
            Ok(r) if transient(r.status) => {
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            Ok(r) => {
                let status = r.status;
                let body = smol::block_on(async {
                    let mut r = r;
                    r.read_to_end().await.unwrap_or_default()
                });
                st.problems.push(format!(
                    "stream {x}: {status} {}",
                    String::from_utf8_lossy(&body)
                ));
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
        };
        opened = true;
        let mut sse = resp.into_sse();
        loop {
            match next_sse(&mut sse, Duration::from_secs(30)) {
                Next::Event(ev) => match ev.event.as_deref() {
                    Some("chunk") => {
                        let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        let Some(q) = v["q"].as_u64().and_then(|q| u32::try_from(q).ok()) else {
                            st.problems
                                .push(format!("stream {x}: bad chunk {}", ev.data));
                            continue;
                        };
                        st.chunks += 1;
                        let expected = last.map_or(0, |l| l + 1);
                        if q < expected {
                            st.chunks_duplicated += 1;
                            continue;
                        }
                        if q > expected {
                            st.chunks_lost += u64::from(q - expected);
                        }
                        last = Some(q);
                        text.push_str(v["d"].as_str().unwrap_or(""));
                    }
                    Some("end") => break 'outer true,
                    Some("truncated") => {
                        st.truncated += 1;
                        st.problems
                            .push(format!("stream {x}: truncated {}", ev.data));
                    }
                    _ => {}
                },
                Next::Ended | Next::Stalled => {
                    std::thread::sleep(Duration::from_millis(250));
                    continue 'outer;
                }
            }
        }
    };
    if !ended {
        st.streams_unfinished
            .push(format!("stream {x}: no end after {:?}", started.elapsed()));
        return;
    }
    let mut seen: HashMap<String, u64> = HashMap::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if e["type"] == "message.part.delta" {
            let d = e["properties"]["delta"].as_str().unwrap_or("").to_owned();
            *seen.entry(d).or_default() += 1;
            st.deltas += 1;
        }
    }
    for i in 0..cfg.prompt_deltas {
        match seen.remove(&format!("part {i} ")) {
            None => st.deltas_lost += 1,
            Some(c) => st.deltas_duplicated += c - 1,
        }
    }
    st.deltas_duplicated += seen.values().sum::<u64>();
}

// ---------------------------------------------------------------------------------------------
// Event follower

/// What the `/events/stream` follower saw.
#[derive(Debug, Default, Clone)]
pub struct FollowerStats {
    pub events: Vec<Value>,
    /// Seq jumps (missing seqs) in the live view.
    pub gaps: Vec<(u64, u64)>,
    pub reconnects: u64,
}

fn event_follower(api: Api, stop: Arc<AtomicBool>, seen: Arc<AtomicU64>) -> FollowerStats {
    let mut st = FollowerStats::default();
    let mut last = 0u64;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        if !first {
            st.reconnects += 1;
        }
        first = false;
        let req = Request::new("GET", "/events/stream").header("last-event-id", &last.to_string());
        let resp = match smol::block_on(api.client().open(req)) {
            Ok(r) if r.status == 200 => r,
            _ => {
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
        };
        let mut sse = resp.into_sse();
        while !stop.load(Ordering::Relaxed) {
            match next_sse(&mut sse, Duration::from_secs(1)) {
                Next::Event(ev) => {
                    let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                        continue;
                    };
                    let Some(seq) = v["seq"].as_u64() else {
                        continue;
                    };
                    if seq != last + 1 {
                        st.gaps.push((last, seq));
                    }
                    last = seq;
                    seen.store(seq, Ordering::Relaxed);
                    st.events.push(v);
                }
                Next::Stalled => {}
                Next::Ended => break,
            }
        }
    }
    st
}

// ---------------------------------------------------------------------------------------------
// Faults

/// The fault kinds, in schedule order.
pub const FAULT_KINDS: [&str; 5] = ["cp_kill", "daemon_kill", "partition", "disk_full", "storm"];

/// One control-plane restart or storm: how the fleet came back.
#[derive(Debug, Clone)]
pub struct Wave {
    pub kind: &'static str,
    pub at: Duration,
    /// Simulated daemons back / in the fleet.
    pub back: usize,
    pub of: usize,
    /// From the restart (or the storm's start) to the last reconnect.
    pub all_back_after: Option<Duration>,
    /// Most reconnects in any 100 ms window.
    pub peak_per_100ms: usize,
    pub span: Duration,
}

/// One fault and how it healed.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub kind: &'static str,
    pub at: Duration,
    pub healed_after: Duration,
    pub note: String,
}

// ---------------------------------------------------------------------------------------------
// The run

/// Everything a run measured.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub config_line: String,
    pub elapsed: Duration,
    pub faults: Vec<FaultRecord>,
    pub waves: Vec<Wave>,
    pub commands: Vec<CommandStats>,
    pub stream: StreamStats,
    pub follower_events: usize,
    pub follower_gaps: Vec<(u64, u64)>,
    pub follower_reconnects: u64,
    /// Seqs the follower saw with other content than the final log has (lost, then reused).
    pub seq_reused: Vec<String>,
    /// Seqs the follower saw that the final log does not have.
    pub seq_vanished: Vec<u64>,
    pub log_events: usize,
    pub log_gaps: Vec<String>,
    /// Per device and type: acknowledged minus `ok` command events, where positive.
    pub events_missing: Vec<String>,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_peak_kib: u64,
    /// Bytes used on the control plane's data tmpfs at the end (its size).
    pub disk_used: u64,
    pub disk_size: u64,
    pub anomalies: Vec<String>,
    pub cp_log_tail: String,
}

impl Report {
    pub fn faults_of(&self, kind: &str) -> usize {
        self.faults.iter().filter(|f| f.kind == kind).count()
    }

    fn sum(&self, f: impl Fn(&CommandStats) -> u64) -> u64 {
        self.commands.iter().map(f).sum()
    }

    fn all(&self, f: impl Fn(&CommandStats) -> &Vec<String>) -> Vec<String> {
        self.commands
            .iter()
            .flat_map(|c| f(c).iter().map(move |s| format!("{}: {s}", c.daemon)))
            .collect()
    }

    pub fn lost_effects(&self) -> usize {
        self.all(|c| &c.lost).len()
    }

    pub fn duplicated_effects(&self) -> usize {
        self.all(|c| &c.duplicate_signals).len() + self.all(|c| &c.duplicated_on_disk).len()
    }

    /// Every broken invariant, one line each; empty when the run passed.
    pub fn violations(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut add = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                let shown: Vec<String> = items.iter().take(5).cloned().collect();
                v.push(format!("{what}: {} ({})", items.len(), shown.join("; ")));
            }
        };
        add("commands with a lost effect", self.all(|c| &c.lost));
        add(
            "commands applied twice (retry re-ran it)",
            self.all(|c| &c.duplicate_signals),
        );
        add(
            "commands applied twice (on disk)",
            self.all(|c| &c.duplicated_on_disk),
        );
        add("commands never acknowledged", self.all(|c| &c.gave_up));
        add("commands failed", self.all(|c| &c.failed));
        let s = &self.stream;
        let mut stream = Vec::new();
        if s.chunks_lost > 0 {
            stream.push(format!("{} chunks lost", s.chunks_lost));
        }
        if s.chunks_duplicated > 0 {
            stream.push(format!("{} chunks duplicated", s.chunks_duplicated));
        }
        if s.truncated > 0 {
            stream.push(format!("{} truncated ranges", s.truncated));
        }
        if s.deltas_lost > 0 || s.deltas_duplicated > 0 {
            stream.push(format!(
                "{} deltas lost, {} duplicated",
                s.deltas_lost, s.deltas_duplicated
            ));
        }
        stream.extend(s.streams_unfinished.iter().cloned());
        stream.extend(s.prompts_failed.iter().cloned());
        if s.prompts == 0 {
            stream.push("no prompt ran".into());
        }
        add("session stream", stream);
        add(
            "follower saw seq gaps",
            self.follower_gaps
                .iter()
                .map(|(a, b)| format!("{a} -> {b}"))
                .collect(),
        );
        add(
            "follower saw a seq whose event changed (lost, seq reused)",
            self.seq_reused.clone(),
        );
        add(
            "follower saw seqs the log no longer has",
            self.seq_vanished.iter().map(u64::to_string).collect(),
        );
        add("event log gaps", self.log_gaps.clone());
        add(
            "acknowledged commands without a command event",
            self.events_missing.clone(),
        );
        add(
            "fleet not fully back or reconnects not spread",
            self.waves
                .iter()
                .filter(|w| {
                    w.all_back_after.is_none()
                        || (w.kind == "cp_kill" && w.of >= 50 && w.peak_per_100ms > w.of / 2)
                })
                .map(|w| format!("{} at {:?}: {}/{} back", w.kind, w.at, w.back, w.of))
                .collect(),
        );
        add(
            "fault kinds never injected",
            FAULT_KINDS
                .iter()
                .filter(|k| self.faults_of(k) == 0)
                .map(|k| (*k).to_owned())
                .collect(),
        );
        v
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let must = |n: u64| {
            if n == 0 {
                "ok (must be 0)"
            } else {
                "VIOLATION (must be 0)"
            }
        };
        let _ = writeln!(t, "== cm-soak: {} ==", self.config_line);
        let _ = writeln!(t, "{:<46} {:>10}", "ran for", fmt_dur(self.elapsed));
        let _ = writeln!(t, "-- faults injected");
        for k in FAULT_KINDS {
            let healed: Vec<Duration> = self
                .faults
                .iter()
                .filter(|f| f.kind == k)
                .map(|f| f.healed_after)
                .collect();
            let worst = healed.iter().max().copied().unwrap_or_default();
            let _ = writeln!(
                t,
                "{:<46} {:>10}   healed within {} each (worst)",
                k,
                healed.len(),
                fmt_dur(worst)
            );
        }
        let _ = writeln!(t, "-- commands (mkdir + rename, Idempotency-Key, retried)");
        let issued = self.sum(|c| c.issued);
        let _ = writeln!(t, "{:<46} {:>10}", "issued", issued);
        let _ = writeln!(t, "{:<46} {:>10}", "succeeded", self.sum(|c| c.succeeded));
        let _ = writeln!(
            t,
            "{:<46} {:>10}   ({} attempts, {} answered by replay)",
            "retried (more than one attempt)",
            self.sum(|c| c.retried),
            self.sum(|c| c.attempts),
            self.sum(|c| c.replayed)
        );
        let longest = self
            .commands
            .iter()
            .map(|c| c.longest)
            .max()
            .unwrap_or_default();
        let _ = writeln!(
            t,
            "{:<46} {:>10}",
            "longest until acknowledged",
            fmt_dur(longest)
        );
        let lost = self.lost_effects() as u64;
        let dup = self.duplicated_effects() as u64;
        let never = (self.all(|c| &c.gave_up).len() + self.all(|c| &c.failed).len()) as u64;
        let _ = writeln!(t, "{:<46} {:>10}   {}", "lost effect", lost, must(lost));
        let _ = writeln!(t, "{:<46} {:>10}   {}", "duplicated effect", dup, must(dup));
        let _ = writeln!(
            t,
            "{:<46} {:>10}   {}",
            "never acknowledged / failed",
            never,
            must(never)
        );
        for c in &self.commands {
            let transient: Vec<String> = c
                .transient
                .iter()
                .map(|(k, n)| format!("{k}×{n}"))
                .collect();
            let _ = writeln!(
                t,
                "   {:<43} {:>10}   transient: {}",
                format!("{} ({})", c.daemon, c.device),
                c.succeeded,
                if transient.is_empty() {
                    "none".to_owned()
                } else {
                    transient.join(", ")
                }
            );
        }
        let s = &self.stream;
        let _ = writeln!(t, "-- session stream (fake OpenCode, numbered deltas)");
        let _ = writeln!(
            t,
            "{:<46} {:>10}   ({} retried)",
            "prompts", s.prompts, s.prompts_retried
        );
        let _ = writeln!(t, "{:<46} {:>10}", "chunks received", s.chunks);
        let _ = writeln!(t, "{:<46} {:>10}", "resumes with Last-Event-ID", s.resumes);
        let _ = writeln!(t, "{:<46} {:>10}", "deltas received", s.deltas);
        let sl = s.chunks_lost + s.deltas_lost + s.truncated;
        let sd = s.chunks_duplicated + s.deltas_duplicated;
        let _ = writeln!(
            t,
            "{:<46} {:>10}   {}",
            "chunks/deltas lost (incl. truncated)",
            sl,
            must(sl)
        );
        let _ = writeln!(
            t,
            "{:<46} {:>10}   {}",
            "chunks/deltas duplicated",
            sd,
            must(sd)
        );
        let _ = writeln!(t, "-- event log");
        let _ = writeln!(t, "{:<46} {:>10}", "events in the log", self.log_events);
        let _ = writeln!(
            t,
            "{:<46} {:>10}   ({} reconnects)",
            "events seen by the /events/stream follower",
            self.follower_events,
            self.follower_reconnects
        );
        let gaps = (self.follower_gaps.len() + self.log_gaps.len()) as u64;
        let reused = (self.seq_reused.len() + self.seq_vanished.len()) as u64;
        let missing = self.events_missing.len() as u64;
        let _ = writeln!(
            t,
            "{:<46} {:>10}   {}",
            "seq gaps (follower + log)",
            gaps,
            must(gaps)
        );
        let _ = writeln!(
            t,
            "{:<46} {:>10}   {}",
            "seqs reused / vanished after a crash",
            reused,
            must(reused)
        );
        let _ = writeln!(
            t,
            "{:<46} {:>10}   {}",
            "acknowledged commands missing their event",
            missing,
            must(missing)
        );
        let _ = writeln!(t, "-- fleet reconnects (connection rate per 100 ms bucket)");
        for w in &self.waves {
            let _ = writeln!(
                t,
                "   {:<9} at {:>8}: {:>5}/{:<5} back in {:>8}, peak {:>4}/100 ms ({:>5}/s), span {}",
                w.kind,
                fmt_dur(w.at),
                w.back,
                w.of,
                w.all_back_after
                    .map(fmt_dur)
                    .unwrap_or_else(|| "NEVER".into()),
                w.peak_per_100ms,
                w.peak_per_100ms * 10,
                fmt_dur(w.span)
            );
        }
        let _ = writeln!(t, "-- control plane memory (VmRSS)");
        let _ = writeln!(
            t,
            "{:<46} {:>10}",
            "before (fleet connected)",
            format!("{} MiB", self.rss_before_kib / 1024)
        );
        let _ = writeln!(
            t,
            "{:<46} {:>10}",
            "after (end of run)",
            format!("{} MiB", self.rss_after_kib / 1024)
        );
        let _ = writeln!(
            t,
            "{:<46} {:>10}",
            "peak seen",
            format!("{} MiB", self.rss_peak_kib / 1024)
        );
        let _ = writeln!(
            t,
            "{:<46} {:>10}   (of a {} MiB tmpfs)",
            "data dir used at the end",
            format!("{} MiB", self.disk_used / (1024 * 1024)),
            self.disk_size / (1024 * 1024)
        );
        if !self.anomalies.is_empty() {
            let _ = writeln!(t, "-- notes");
            for a in &self.anomalies {
                let _ = writeln!(t, "   {a}");
            }
        }
        let violations = self.violations();
        if violations.is_empty() {
            let _ = writeln!(t, "RESULT: PASS (every invariant held)");
        } else {
            let _ = writeln!(t, "RESULT: FAIL");
            for v in &violations {
                let _ = writeln!(t, "   {v}");
            }
        }
        t
    }

    /// One JSON line with the counts (for `soak_short` and scripts).
    pub fn summary_json(&self) -> Value {
        let faults: serde_json::Map<String, Value> = FAULT_KINDS
            .iter()
            .map(|k| ((*k).to_owned(), json!(self.faults_of(k))))
            .collect();
        json!({
            "faults": faults,
            "commands_issued": self.sum(|c| c.issued),
            "commands_succeeded": self.sum(|c| c.succeeded),
            "commands_retried": self.sum(|c| c.retried),
            "lost_effects": self.lost_effects(),
            "duplicated_effects": self.duplicated_effects(),
            "prompts": self.stream.prompts,
            "chunks": self.stream.chunks,
            "chunks_lost": self.stream.chunks_lost + self.stream.deltas_lost + self.stream.truncated,
            "chunks_duplicated": self.stream.chunks_duplicated + self.stream.deltas_duplicated,
            "events_log": self.log_events,
            "events_followed": self.follower_events,
            "events_missing": self.events_missing.len() + self.follower_gaps.len()
                + self.log_gaps.len() + self.seq_reused.len() + self.seq_vanished.len(),
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "violations": self.violations(),
        })
    }
}

fn fmt_dur(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// `[process]` + `[session]` of a daemon whose `opencode` is the fake, copied into its temp dir
/// (as in `tests/e2e_sessions.rs`: run as `nobody` when we are root).
fn opencode_config(dir: &Path) -> String {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() == 0 };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).expect("chmod");
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).expect("bin dir");
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let fake = bin_dir.join("cm-fake-opencode");
    std::fs::copy(bin_path("cm-fake-opencode"), &fake).expect("copy the fake opencode");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let project = dir.join("project");
    let run_as = if root {
        std::os::unix::fs::lchown(&project, Some(NOBODY), Some(NOBODY)).expect("chown");
        "run_as = \"nobody\"\n"
    } else {
        ""
    };
    let port = free_port();
    format!(
        "[process]\n{run_as}private_dir = {private:?}\n[process.allowlist]\nopencode = {fake:?}\n\
         [session]\nport_range = \"{port}-{port}\"\nstart_timeout_s = 30\n",
        private = dir.join("private").display().to_string(),
        fake = fake.display().to_string(),
    )
}

fn device_status(api: &Api, id: &str) -> String {
    api.get(&format!("/devices/{id}"))
        .filter(|(s, _)| *s == 200)
        .and_then(|(_, b)| b["device"]["status"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Polls `ok` every 100 ms up to `limit`; returns how long it took, if it held.
fn within(limit: Duration, mut ok: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn log(t0: Instant, msg: impl std::fmt::Display) {
    eprintln!("[soak {:>7.1}s] {msg}", t0.elapsed().as_secs_f64());
}

/// Runs a soak inside `ns` (already entered by the calling thread) and returns its report.
pub fn run(cfg: &SoakConfig, ns: &Namespaces) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    raise_nofile();
    let tmpfs = Tmpfs::mount(cfg.tmpfs_bytes)?;
    let mut cp = ControlPlane::start_with(CpOptions {
        config: Some("[tunnel]\nheartbeat_secs = 5\nrequest_timeout_secs = 10\n".into()),
        data_dir: Some(tmpfs.path().join("data")),
        listen_ip: Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        connect_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ..CpOptions::default()
    });
    let devices = fleet::register(&mut cp, "soak", cfg.fleet + 3);
    let (real, sims): (&[FleetDevice], &[FleetDevice]) = devices.split_at(3);
    let creds: Vec<_> = real.iter().map(|d| d.credentials(cp.dir.path())).collect();
    let mut files = Daemon::start(&cp.ws_url(), &creds[0]);
    let session = Daemon::start_with(&cp.ws_url(), &creds[1], opencode_config);
    let part_url = format!("ws://{CP_VETH_IP}:{}/ws", cp.port);
    let netns_daemon = ns.part.run(|| Daemon::start(&part_url, &creds[2]));
    for d in real {
        cp.wait_online(&d.id);
    }
    let api = Api {
        url: cp.url(),
        token: cp.token.clone(),
    };
    let (status, body) = cp.post(
        &format!("/devices/{}/session/start", real[1].id),
        json!({ "path": "." }),
    );
    anyhow::ensure!(
        status == 200,
        "session/start: {status} {body}\n{}",
        session.log()
    );
    let sid = body["s"]
        .as_str()
        .or_else(|| body["sessionId"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no session id in {body}"))?
        .to_owned();
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), cp.port);
    let fleet_cfg = FleetConfig::new(addr);
    let mut fleet = Fleet::start(&fleet_cfg, sims);
    let setup_limit = Duration::from_secs(60 + cfg.fleet as u64 / 20);
    anyhow::ensure!(
        fleet.wait(setup_limit, |f| f.online() == f.len()),
        "only {} of {} simulated daemons connected",
        fleet.online(),
        fleet.len()
    );
    let mut report = Report {
        config_line: format!(
            "{} run, fleet {} simulated + 3 real daemons, a fault every {}",
            fmt_dur(cfg.duration),
            cfg.fleet,
            fmt_dur(cfg.fault_every)
        ),
        ..Report::default()
    };
    std::thread::sleep(Duration::from_secs(1));
    report.rss_before_kib = rss_kib(cp.pid());
    report.rss_peak_kib = report.rss_before_kib;
    log(
        t0,
        format!(
            "set up: 3 daemons + {} simulated online, session {sid}; control plane RSS {} MiB",
            cfg.fleet,
            report.rss_before_kib / 1024
        ),
    );

    // Workload.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_hard = Arc::new(AtomicBool::new(false));
    let follower_stop = Arc::new(AtomicBool::new(false));
    let roots = [
        files.root.clone(),
        session.root.clone(),
        netns_daemon.root.clone(),
    ];
    let workers: Vec<_> = ["files", "session", "netns"]
        .iter()
        .zip(real)
        .map(|(name, dev)| {
            let (api, name, id, cfg) =
                (api.clone(), (*name).to_owned(), dev.id.clone(), cfg.clone());
            let (stop, stop_hard) = (stop.clone(), stop_hard.clone());
            std::thread::Builder::new()
                .name(format!("soak-cmd-{name}"))
                .spawn(move || command_worker(api, name, id, cfg, stop, stop_hard))
                .expect("spawn worker")
        })
        .collect();
    let streamer = {
        let (api, id, sid, cfg) = (api.clone(), real[1].id.clone(), sid.clone(), cfg.clone());
        let (stop, stop_hard) = (stop.clone(), stop_hard.clone());
        std::thread::Builder::new()
            .name("soak-stream".into())
            .spawn(move || stream_worker(api, id, sid, cfg, stop, stop_hard))
            .expect("spawn stream reader")
    };
    let follower_seen = Arc::new(AtomicU64::new(0));
    let follower = {
        let (api, stop, seen) = (api.clone(), follower_stop.clone(), follower_seen.clone());
        std::thread::Builder::new()
            .name("soak-events".into())
            .spawn(move || event_follower(api, stop, seen))
            .expect("spawn follower")
    };

    // Faults, one per slot.
    let run_start = Instant::now();
    let slots = (cfg.duration.as_millis() / cfg.fault_every.as_millis().max(1))
        .max(FAULT_KINDS.len() as u128) as u32;
    let sims_n = sims.len();
    for slot in 0..slots {
        // Mid-slot, so the first fault hits a running workload and the last one has time
        // to heal before the end.
        let slot_start = run_start + cfg.fault_every * slot + cfg.fault_every / 2;
        if let Some(wait) = slot_start.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        // Every kind at least once, even when slow heals pushed the schedule past the end.
        if run_start.elapsed() >= cfg.duration && slot as usize >= FAULT_KINDS.len() {
            break;
        }
        let kind = FAULT_KINDS[slot as usize % FAULT_KINDS.len()];
        let at = run_start.elapsed();
        let began = Instant::now();
        let note;
        match kind {
            "cp_kill" => {
                let rss = rss_kib(cp.pid());
                report.rss_peak_kib = report.rss_peak_kib.max(rss);
                cp.kill();
                std::thread::sleep(cfg.cp_down);
                let restarted = Instant::now();
                cp.spawn();
                let limit = Duration::from_secs(60 + sims_n as u64 / 20);
                fleet.wait(limit, |f| {
                    f.first_connect_after(restarted).iter().all(Option::is_some)
                });
                let firsts = fleet.first_connect_after(restarted);
                let times: Vec<Instant> = firsts.iter().flatten().copied().collect();
                let (peak, span) = peak_per_bucket(restarted, &times, BUCKET);
                let last = times.iter().max().map(|t| t.duration_since(restarted));
                report.waves.push(Wave {
                    kind: "cp_kill",
                    at,
                    back: times.len(),
                    of: sims_n,
                    all_back_after: if times.len() == sims_n { last } else { None },
                    peak_per_100ms: peak,
                    span,
                });
                let real_back = within(Duration::from_secs(30), || {
                    real.iter().all(|d| device_status(&api, &d.id) == "online")
                });
                note = format!(
                    "RSS before kill {} MiB; real daemons online again after {:?}",
                    rss / 1024,
                    real_back
                );
            }
            "daemon_kill" => {
                files.kill();
                std::thread::sleep(Duration::from_millis(500));
                files.spawn();
                let back = within(Duration::from_secs(30), || {
                    device_status(&api, &real[0].id) == "online"
                });
                note = format!("files daemon online again after {back:?}");
            }
            "partition" => {
                ns.part.ip(&["link", "set", PART_IF, "down"])?;
                std::thread::sleep(cfg.partition);
                let st = device_status(&api, &real[2].id);
                ns.part.ip(&["link", "set", PART_IF, "up"])?;
                let back = within(Duration::from_secs(30), || {
                    device_status(&api, &real[2].id) == "online"
                });
                note = format!(
                    "status at the end of the cut: {st}; online again {back:?} after the heal"
                );
            }
            "disk_full" => {
                let filler = tmpfs.fill("filler");
                let free = tmpfs.free_bytes();
                std::thread::sleep(cfg.disk_full);
                let health = api
                    .get("/health")
                    .map(|(s, b)| format!("{s} {}", b["error"]));
                std::fs::remove_file(&filler)?;
                // Healthy at once, unless sled hit ENOSPC itself (it then refuses every write
                // until a restart; in production the systemd watchdog restarts it).
                let ok = within(Duration::from_secs(10), || {
                    api.get("/health").is_some_and(|(s, _)| s == 200)
                });
                note = format!(
                    "free while full {free} B, /health while full: {health:?}; healthy again \
                     after {ok:?}"
                );
                if ok.is_none() {
                    report.anomalies.push(format!(
                        "disk_full at {}: /health not 200 within 10 s after freeing (sled hit \
                         ENOSPC: restart required); restarted the control plane, as the \
                         watchdog would",
                        fmt_dur(at)
                    ));
                    cp.kill();
                    cp.spawn();
                }
            }
            "storm" => {
                fleet.stop();
                drop(fleet);
                std::thread::sleep(Duration::from_millis(200));
                let storm = Instant::now();
                fleet = Fleet::start(&fleet_cfg, sims);
                let limit = Duration::from_secs(60 + sims_n as u64 / 20);
                fleet.wait(limit, |f| {
                    f.first_connect_after(storm).iter().all(Option::is_some)
                });
                let times: Vec<Instant> = fleet
                    .first_connect_after(storm)
                    .into_iter()
                    .flatten()
                    .collect();
                let (peak, span) = peak_per_bucket(storm, &times, BUCKET);
                let last = times.iter().max().map(|t| t.duration_since(storm));
                report.waves.push(Wave {
                    kind: "storm",
                    at,
                    back: times.len(),
                    of: sims_n,
                    all_back_after: if times.len() == sims_n { last } else { None },
                    peak_per_100ms: peak,
                    span,
                });
                note = format!("{} dial failures in the storm", fleet.failures());
            }
            _ => unreachable!(),
        }
        let healed_after = began.elapsed();
        report.rss_peak_kib = report.rss_peak_kib.max(rss_kib(cp.pid()));
        log(
            t0,
            format!("fault #{slot} {kind}: healed after {healed_after:?}; {note}"),
        );
        report.faults.push(FaultRecord {
            kind,
            at,
            healed_after,
            note,
        });
    }
    if let Some(rest) = cfg.duration.checked_sub(run_start.elapsed()) {
        std::thread::sleep(rest);
    }

    // Wind down: workers finish their current command (retrying until acknowledged).
    log(t0, "stopping the workload");
    stop.store(true, Ordering::Relaxed);
    let hard_deadline = Instant::now() + cfg.give_up_after;
    let mut commands = Vec::new();
    for (w, root) in workers.into_iter().zip(&roots) {
        while !w.is_finished() && Instant::now() < hard_deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop_hard.store(Instant::now() >= hard_deadline, Ordering::Relaxed);
        let mut st = w.join().expect("command worker");
        check_disk(&mut st, root);
        commands.push(st);
    }
    stop_hard.store(true, Ordering::Relaxed);
    report.stream = streamer.join().expect("stream reader");
    report.commands = commands;
    report.rss_after_kib = rss_kib(cp.pid());
    report.rss_peak_kib = report.rss_peak_kib.max(report.rss_after_kib);

    // The log, and the follower caught up with it.
    let log_events = cp.events_after(0);
    let last_seq = log_events
        .last()
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0);
    let caught_up = within(Duration::from_secs(30), || {
        follower_seen.load(Ordering::Relaxed) >= last_seq
    });
    if caught_up.is_none() {
        report.anomalies.push(format!(
            "the /events/stream follower did not reach seq {last_seq} within 30 s (at {})",
            follower_seen.load(Ordering::Relaxed)
        ));
    }
    follower_stop.store(true, Ordering::Relaxed);
    let follower_view = follower.join().expect("event follower");
    // Events appended meanwhile (disconnects at shutdown, ...) are in the log too: re-read.
    let log_events = cp.events_after(0);
    check_events(&mut report, &log_events, &follower_view);
    report.elapsed = t0.elapsed();
    report.disk_size = cfg.tmpfs_bytes;
    report.disk_used = cfg.tmpfs_bytes.saturating_sub(tmpfs.free_bytes());
    let cp_log = cp.log();
    let lines: Vec<&str> = cp_log.lines().collect();
    report.cp_log_tail = lines[lines.len().saturating_sub(40)..].join("\n");
    for (name, log) in [
        ("files", files.log()),
        ("session", session.log()),
        ("netns", netns_daemon.log()),
    ] {
        if log.contains("panicked") {
            report
                .anomalies
                .push(format!("daemon {name} log has a panic"));
        }
    }
    // Warnings and errors of the control plane: what it said about the faults (at most 12
    // distinct messages, with counts).
    let mut warned: Vec<(String, u64)> = Vec::new();
    for line in cp_log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
    {
        let text = line.split_once(' ').map_or(line, |(_, rest)| rest);
        let key: String = text.chars().take(120).collect();
        if let Some((_, n)) = warned.iter_mut().find(|(k, _)| *k == key) {
            *n += 1;
        } else if warned.len() < 12 {
            warned.push((key, 1));
        }
    }
    for (text, n) in warned {
        report
            .anomalies
            .push(format!("control plane log ×{n}: {text}"));
    }
    if cp_log.contains("panicked") {
        report
            .anomalies
            .push("control plane log has a panic".into());
    }
    drop(fleet);
    drop(files);
    drop(session);
    drop(netns_daemon);
    drop(cp);
    drop(tmpfs);
    Ok(report)
}

/// Fills the event-log fields of `report` from the final log and the follower's view.
fn check_events(report: &mut Report, log: &[Value], follower: &FollowerStats) {
    report.log_events = log.len();
    for (i, e) in log.iter().enumerate() {
        let expected = i as u64 + 1;
        if e["seq"].as_u64() != Some(expected) {
            report.log_gaps.push(format!(
                "log[{i}] has seq {} (expected {expected})",
                e["seq"]
            ));
            break;
        }
    }
    let by_seq: HashMap<u64, &Value> = log
        .iter()
        .filter_map(|e| Some((e["seq"].as_u64()?, e)))
        .collect();
    report.follower_events = follower.events.len();
    report.follower_gaps = follower.gaps.clone();
    report.follower_reconnects = follower.reconnects;
    for e in &follower.events {
        let Some(seq) = e["seq"].as_u64() else {
            continue;
        };
        match by_seq.get(&seq) {
            None => report.seq_vanished.push(seq),
            Some(l) if *l != e => report.seq_reused.push(format!(
                "seq {seq}: follower saw {} {}, log has {} {}",
                e["kind"], e["detail"], l["kind"], l["detail"]
            )),
            Some(_) => {}
        }
    }
    // Acknowledged commands vs `command` events with outcome ok.
    let mut ok: HashMap<(String, String), u64> = HashMap::new();
    for e in log {
        if e["kind"] == "command" && e["detail"]["outcome"] == "ok" {
            let dev = e["detail"]["device"].as_str().unwrap_or("").to_owned();
            let t = e["detail"]["type"].as_str().unwrap_or("").to_owned();
            *ok.entry((dev, t)).or_default() += 1;
        }
    }
    for c in &report.commands {
        for (t, acked) in [("md", c.acked_md), ("rn", c.acked_rn)] {
            let have = ok
                .get(&(c.device.clone(), t.to_owned()))
                .copied()
                .unwrap_or(0);
            if have < acked {
                let named = unmatched_acks(log, &c.device, t, &c.acks);
                report.events_missing.push(format!(
                    "{} {t}: {acked} acknowledged, {have} ok command events; no event for: {}",
                    c.daemon,
                    named.join(", ")
                ));
            }
        }
    }
}

/// The acknowledged commands of type `t` on `device` that no `ok` command event matches:
/// commands of one worker run one at a time, so acknowledgements and events pair in order, an
/// event within the command's window (± 2 s for clock and flush slack).
fn unmatched_acks(log: &[Value], device: &str, t: &str, acks: &[Ack]) -> Vec<String> {
    let mut events: Vec<u64> = log
        .iter()
        .filter(|e| {
            e["kind"] == "command"
                && e["detail"]["outcome"] == "ok"
                && e["detail"]["device"] == device
                && e["detail"]["type"] == t
        })
        .filter_map(|e| e["ts_ms"].as_u64())
        .collect();
    events.sort_unstable();
    let mut i = 0;
    let mut out = Vec::new();
    for a in acks.iter().filter(|a| a.t == t) {
        while i < events.len() && events[i] + 2000 < a.start_ms {
            i += 1;
        }
        if i < events.len() && events[i] <= a.end_ms + 2000 {
            i += 1;
        } else {
            out.push(format!(
                "{} (answered at {} ms after {} attempts, transient {:?})",
                a.key, a.end_ms, a.attempts, a.transient
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("75s"), Some(Duration::from_secs(75)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("m"), None);
    }

    #[test]
    fn a_changed_or_missing_event_is_reported() {
        let log = vec![
            json!({"seq": 1, "kind": "a", "detail": {}}),
            json!({"seq": 2, "kind": "b", "detail": {}}),
        ];
        let follower = FollowerStats {
            events: vec![
                json!({"seq": 1, "kind": "a", "detail": {}}),
                json!({"seq": 2, "kind": "lost", "detail": {}}),
                json!({"seq": 3, "kind": "gone", "detail": {}}),
            ],
            ..FollowerStats::default()
        };
        let mut r = Report::default();
        check_events(&mut r, &log, &follower);
        assert_eq!(r.seq_reused.len(), 1, "{:?}", r.seq_reused);
        assert_eq!(r.seq_vanished, vec![3]);
        assert!(r.log_gaps.is_empty());
        assert!(!r.violations().is_empty());
    }

    #[test]
    fn acknowledged_commands_need_their_events() {
        let log = vec![
            json!({"seq": 1, "ts_ms": 1005, "kind": "command", "detail": {"device": "d", "type": "md", "outcome": "ok"}}),
            json!({"seq": 3, "kind": "command", "detail": {"device": "d", "type": "rn", "outcome": "timeout"}}),
        ];
        let mut r = Report {
            commands: vec![CommandStats {
                daemon: "files".into(),
                device: "d".into(),
                acked_md: 1,
                acked_rn: 1,
                acks: vec![
                    Ack {
                        t: "md",
                        key: "k-md".into(),
                        start_ms: 1000,
                        end_ms: 1010,
                        attempts: 1,
                        transient: Vec::new(),
                    },
                    Ack {
                        t: "rn",
                        key: "k-rn".into(),
                        start_ms: 1020,
                        end_ms: 1030,
                        attempts: 1,
                        transient: Vec::new(),
                    },
                ],
                ..CommandStats::default()
            }],
            ..Report::default()
        };
        check_events(&mut r, &log, &FollowerStats::default());
        assert_eq!(r.log_gaps.len(), 1);
        assert_eq!(r.events_missing.len(), 1, "{:?}", r.events_missing);
        assert!(
            r.events_missing[0].contains("no event for: k-rn"),
            "{:?}",
            r.events_missing
        );
    }

    #[test]
    fn disk_check_finds_lost_and_twice_applied_effects() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("soak-r-000000")).unwrap();
        std::fs::create_dir(dir.path().join("soak-w-000001")).unwrap();
        std::fs::create_dir(dir.path().join("soak-r-000001")).unwrap();
        let mut st = CommandStats {
            pairs: vec![(true, true), (true, true), (true, true)],
            ..CommandStats::default()
        };
        check_disk(&mut st, dir.path());
        assert_eq!(st.lost, vec!["soak-r-000002 (rename acknowledged)"]);
        assert_eq!(
            st.duplicated_on_disk.len(),
            1,
            "{:?}",
            st.duplicated_on_disk
        );
    }
}
