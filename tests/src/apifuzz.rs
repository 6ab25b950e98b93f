//! A seeded HTTP API fuzzer for a real control plane (`cm-apifuzz`, `tests/fuzz/api-fuzz.sh`,
//! and a short run in `tests/tests/fault_api_fuzz.rs`).
//!
//! Requests are written as raw bytes over TCP, so they can be wrong at every level: bad
//! methods, path tricks (`/devices/../tokens`, `%2e%2e`, `%00`, overlong ids, unicode, raw
//! NUL and non-ASCII bytes), garbage queries, missing/garbage/duplicated auth, odd
//! `Idempotency-Key`s, malformed JSON, wrong types, deep nesting, huge bodies, lying
//! `Content-Length`, chunked garbage, too many headers. Each case starts from one of the real
//! routes (with real ids of a registered, connected device), so many requests get past the
//! router into handlers and device commands.
//!
//! What every answer must satisfy:
//! - no 5xx other than the documented ones: 502 (device error or disconnect), 503 (store
//!   unavailable), 504 (device timeout), 507 (storage full) — never 500;
//! - every error (≥ 400, except to `HEAD`) has a JSON object body with string `error` and
//!   `message`; the one exception is a request broken at the HTTP level (the HTTP parser
//!   refuses it before any handler runs), which may get a bare status;
//! - every JSON answer parses; a well-formed request gets an answer within
//!   [`ANSWER_LIMIT`];
//! - the server stays up (checked every [`ALIVE_EVERY`] requests and at the end).
//!
//! The generator is deterministic for a seed (each worker `w` uses `seed + w`); which requests
//! run depends on the time budget.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fleet::SplitMix64;
use crate::harness::{ControlPlane, CpOptions};
use crate::simdaemon::{SimConfig, SimDaemon};

/// Longest wait for an answer to a well-formed request.
pub const ANSWER_LIMIT: Duration = Duration::from_secs(10);
/// How often (in requests, per worker) the server's liveness is checked.
pub const ALIVE_EVERY: u64 = 100;
/// 5xx statuses the API documents.
pub const DOCUMENTED_5XX: [u16; 4] = [502, 503, 504, 507];
/// Violations kept verbatim in the report (all are counted).
const KEEP_VIOLATIONS: usize = 50;
/// The control plane's default body limit (`max_body_bytes`).
const BODY_LIMIT: usize = 1024 * 1024;

/// What to fuzz.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// An owner token (`cmt_...`).
    pub token: String,
    /// A registered, connected device: commands reach a daemon.
    pub device: String,
    /// A device the fuzzer may delete.
    pub victim_device: String,
    /// A token id the fuzzer may revoke (never the one it uses).
    pub victim_token: String,
}

/// How long and how hard.
#[derive(Debug, Clone)]
pub struct Settings {
    pub seed: u64,
    pub duration: Duration,
    pub workers: usize,
}

/// What a run saw.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub requests: u64,
    pub by_status: BTreeMap<u16, u64>,
    /// Requests per generator category.
    pub by_kind: BTreeMap<&'static str, u64>,
    /// Requests that got no answer (allowed for HTTP-level garbage and oversize uploads).
    pub unanswered: u64,
    pub violation_count: u64,
    pub violations: Vec<String>,
    pub slowest: Duration,
    /// The slowest request and how it ended.
    pub slowest_case: String,
    pub elapsed: Duration,
    pub server_died: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violation_count == 0 && !self.server_died
    }

    /// Counts, one per line.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} requests in {:.1?} ({:.0}/s), slowest {:?}, unanswered {}, violations {}{}\n",
            self.requests,
            self.elapsed,
            self.requests as f64 / self.elapsed.as_secs_f64().max(0.001),
            self.slowest,
            self.unanswered,
            self.violation_count,
            if self.server_died {
                ", SERVER DIED"
            } else {
                ""
            },
        );
        if !self.slowest_case.is_empty() {
            s.push_str(&format!("slowest: {}\n", self.slowest_case));
        }
        s.push_str("by status:");
        for (k, v) in &self.by_status {
            s.push_str(&format!(" {k}={v}"));
        }
        s.push_str("\nby kind:");
        for (k, v) in &self.by_kind {
            s.push_str(&format!(" {k}={v}"));
        }
        s.push('\n');
        for v in &self.violations {
            s.push_str("VIOLATION ");
            s.push_str(v);
            s.push('\n');
        }
        s
    }
}

/// One generated request.
struct Case {
    kind: &'static str,
    bytes: Vec<u8>,
    /// Broken at the HTTP level: the parser may answer with a bare status or just close.
    wire_malformed: bool,
    /// Body above the limit: the server may answer 413 and close before reading it all.
    oversize: bool,
    head: bool,
    /// Shut our write side after the request (the body is shorter than announced). The HTTP
    /// layer drops a connection whose client half-closed (hyper's default), so only then.
    half_close: bool,
}

/// A parsed answer.
struct Answer {
    status: u16,
    headers: Headers,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Runs the fuzzer for `settings.duration`; `alive` says whether the server process is still
/// running (and answering), checked every [`ALIVE_EVERY`] requests per worker and at the end.
pub fn run(target: &Target, settings: &Settings, alive: &(dyn Fn() -> bool + Sync)) -> Report {
    let started = Instant::now();
    let deadline = started + settings.duration;
    let report = Mutex::new(Report::default());
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    std::thread::scope(|s| {
        for w in 0..settings.workers.max(1) {
            let (report, stop, total) = (&report, &stop, &total);
            let seed = settings.seed.wrapping_add(w as u64);
            s.spawn(move || {
                let mut rng = SplitMix64::new(seed);
                let mut n = 0u64;
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let case = generate(&mut rng, target);
                    let t = Instant::now();
                    let answer = exchange(target.addr, &case);
                    let took = t.elapsed();
                    let problems = check(&case, &answer, took);
                    total.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                        r.requests += 1;
                        *r.by_kind.entry(case.kind).or_default() += 1;
                        match &answer {
                            Ok(a) => *r.by_status.entry(a.status).or_default() += 1,
                            Err(_) => r.unanswered += 1,
                        }
                        if took > r.slowest {
                            r.slowest = took;
                            r.slowest_case = format!(
                                "[{}] {} → {}",
                                case.kind,
                                show(&case.bytes, 200),
                                match &answer {
                                    Ok(a) => a.status.to_string(),
                                    Err(e) => e.clone(),
                                }
                            );
                        }
                        for p in problems {
                            r.violation_count += 1;
                            if r.violations.len() < KEEP_VIOLATIONS {
                                r.violations.push(format!(
                                    "[{}] {p}\n    request: {}",
                                    case.kind,
                                    show(&case.bytes, 300)
                                ));
                            }
                        }
                    }
                    n += 1;
                    if n % ALIVE_EVERY == 0 && !alive() {
                        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
                        r.server_died = true;
                        r.violations.push(format!(
                            "the server stopped answering after a [{}] request: {}",
                            case.kind,
                            show(&case.bytes, 300)
                        ));
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let mut report = report.into_inner().unwrap_or_else(|p| p.into_inner());
    if !report.server_died && !alive() {
        report.server_died = true;
        report
            .violations
            .push("the server was not alive at the end of the run".into());
    }
    report.elapsed = started.elapsed();
    report
}

fn check(case: &Case, answer: &Result<Answer, String>, took: Duration) -> Vec<String> {
    let mut problems = Vec::new();
    let a = match answer {
        Ok(a) => a,
        Err(e) => {
            if !case.wire_malformed && !case.oversize {
                problems.push(format!("no answer to a well-formed request: {e}"));
            }
            return problems;
        }
    };
    if took > ANSWER_LIMIT {
        problems.push(format!("answered after {took:?}"));
    }
    if a.status >= 500 && !DOCUMENTED_5XX.contains(&a.status) {
        problems.push(format!("undocumented {}: {}", a.status, show(&a.body, 300)));
    }
    let content_type = a.header("content-type").unwrap_or("").to_ascii_lowercase();
    if a.status >= 400 && !case.head {
        let bare_ok = case.wire_malformed && a.body.is_empty();
        if !bare_ok {
            match serde_json::from_slice::<Value>(&a.body) {
                Ok(v) if v["error"].is_string() && v["message"].is_string() => {}
                _ => problems.push(format!(
                    "{} without an {{\"error\",\"message\"}} body: {}",
                    a.status,
                    show(&a.body, 300)
                )),
            }
        }
    } else if content_type.starts_with("application/json")
        && !case.head
        && serde_json::from_slice::<Value>(&a.body).is_err()
    {
        problems.push(format!(
            "{} with a JSON content type but invalid JSON: {}",
            a.status,
            show(&a.body, 300)
        ));
    }
    problems
}

/// Bytes as text for a report line: printable ASCII kept, the rest escaped, cut at `max`.
fn show(bytes: &[u8], max: usize) -> String {
    let mut s = String::new();
    for &b in bytes.iter().take(max) {
        match b {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            0x20..=0x7e => s.push(b as char),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    if bytes.len() > max {
        s.push_str(&format!("… ({} bytes)", bytes.len()));
    }
    s
}

// ---- a target to fuzz --------------------------------------------------------------------------

/// A control plane set up for fuzzing, with what the fuzzer needs to know about it.
pub struct Prepared {
    pub cp: ControlPlane,
    pub target: Target,
    /// The simulated daemon behind [`Target::device`]; dropping it disconnects the device.
    pub daemon: SimDaemon,
}

/// Starts a control plane with short device timeouts (so commands a daemon never answers cost
/// 2 s, not 15–180 s) and a quiet log, registers and connects a simulated daemon, and creates a
/// device and a token the fuzzer may delete and revoke.
pub fn prepare() -> Prepared {
    let mut cp = ControlPlane::start_with(CpOptions {
        config: Some(
            "[tunnel]\nrequest_timeout_secs = 2\ngit_timeout_secs = 2\nproxy_timeout_secs = 2\n"
                .into(),
        ),
        env: vec![("CODEMANTLE_LOG".into(), "warn".into())],
        ..CpOptions::default()
    });
    let dev = cp.add_device("fuzz-target");
    let secret = std::fs::read_to_string(&dev.key_file).expect("device key");
    let addr: SocketAddr = format!("{}:{}", cp.ip(), cp.port).parse().expect("address");
    let daemon = smol::block_on(SimDaemon::connect(SimConfig::new(
        addr,
        &dev.id,
        secret.trim(),
    )))
    .expect("connect the simulated daemon")
    .accepted();
    cp.wait_online(&dev.id);
    let (status, body) = cp.post("/devices", json!({"name": "fuzz-victim"}));
    assert_eq!(status, 201, "{body}");
    let victim_device = body["device"]["id"].as_str().expect("device id").to_owned();
    let (status, body) = cp.post("/tokens", json!({"name": "fuzz-victim", "role": "viewer"}));
    assert_eq!(status, 201, "{body}");
    let victim_token = body["token"]["id"].as_str().expect("token id").to_owned();
    let target = Target {
        addr,
        token: cp.token.clone(),
        device: dev.id,
        victim_device,
        victim_token,
    };
    Prepared { cp, target, daemon }
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // `pid (comm) S ...`: the state follows the last `)`.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Whether the prepared server is up: its process runs and `/health` answers 200 within 5 s.
pub fn server_alive(cp: &ControlPlane) -> bool {
    let Some(pid) = cp.pid() else {
        return false;
    };
    if !process_alive(pid) {
        return false;
    }
    let mut client = cp.client();
    client.timeout = Duration::from_secs(5);
    smol::block_on(client.send(codemantle_control_plane::client::Request::new(
        "GET", "/health",
    )))
    .is_ok_and(|r| r.status == 200)
}

// ---- the exchange ----------------------------------------------------------------------------

fn exchange(addr: SocketAddr, case: &Case) -> Result<Answer, String> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(ANSWER_LIMIT + Duration::from_secs(1)))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(ANSWER_LIMIT))
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    // A refused upload may be cut short by the server; try to read its answer anyway.
    let wrote = tcp.write_all(&case.bytes);
    if case.half_close {
        let _ = tcp.shutdown(Shutdown::Write);
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let started = Instant::now();
    loop {
        if let Some(a) = parse_complete(&raw) {
            return Ok(a);
        }
        if started.elapsed() > ANSWER_LIMIT {
            return Err("timed out".into());
        }
        match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return parse_eof(&raw).ok_or_else(|| {
                    format!(
                        "read: {e}{}",
                        wrote
                            .as_ref()
                            .err()
                            .map(|w| format!(" (write: {w})"))
                            .unwrap_or_default()
                    )
                });
            }
        }
    }
    parse_eof(&raw).ok_or_else(|| {
        format!(
            "closed after {} bytes without a complete answer{}",
            raw.len(),
            wrote
                .err()
                .map(|w| format!(" (write: {w})"))
                .unwrap_or_default()
        )
    })
}

/// Header names and values.
type Headers = Vec<(String, String)>;

/// The head: status, headers, and where the body starts.
fn parse_head(raw: &[u8]) -> Option<(u16, Headers, usize)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&raw[..end]);
    let mut lines = text.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Some((status, headers, end))
}

/// A complete answer if `raw` holds one (length known, or chunked and finished, or SSE head).
fn parse_complete(raw: &[u8]) -> Option<Answer> {
    let (status, headers, start) = parse_head(raw)?;
    let answer = |body: Vec<u8>| Answer {
        status,
        headers: headers.clone(),
        body,
    };
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    if find("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
        // A live stream never ends; the head is the answer.
        return Some(answer(Vec::new()));
    }
    if status == 101 || status == 204 || status == 304 {
        return Some(answer(Vec::new()));
    }
    if find("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        return dechunk(&raw[start..]).map(answer);
    }
    if let Some(len) = find("content-length").and_then(|l| l.parse::<usize>().ok()) {
        return (raw.len() >= start + len).then(|| answer(raw[start..start + len].to_vec()));
    }
    None
}

/// The answer once the server closed: a body delimited by the end of the stream.
fn parse_eof(raw: &[u8]) -> Option<Answer> {
    if let Some(a) = parse_complete(raw) {
        return Some(a);
    }
    let (status, headers, start) = parse_head(raw)?;
    Some(Answer {
        status,
        headers,
        body: raw[start..].to_vec(),
    })
}

/// A complete chunked body, or `None` while it is incomplete.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

// ---- the generator ---------------------------------------------------------------------------

/// A route to start from: method, path template (`{dev}` etc. are substituted), body template.
type Route = (&'static str, &'static str, fn(&mut SplitMix64) -> Value);

fn no_body(_: &mut SplitMix64) -> Value {
    Value::Null
}

fn empty(_: &mut SplitMix64) -> Value {
    json!({})
}

fn path_body(rng: &mut SplitMix64) -> Value {
    let names = ["src", "a/b/c", ".", "build", "x y", "日本"];
    json!({ "path": names[rng.below(names.len() as u64) as usize], "root": "cwd", "recursive": rng.below(2) == 1 })
}

fn rename_body(rng: &mut SplitMix64) -> Value {
    json!({ "source": format!("f{}", rng.below(4)), "dest": format!("g{}", rng.below(4)), "overwrite": rng.below(2) == 1 })
}

fn device_body(rng: &mut SplitMix64) -> Value {
    json!({ "name": format!("fuzz-{}", rng.below(1000)), "labels": {"env": "fuzz"} })
}

fn token_body(rng: &mut SplitMix64) -> Value {
    let roles = ["viewer", "operator", "admin", "owner", "root", ""];
    json!({ "name": format!("fuzz-{}", rng.below(1000)), "role": roles[rng.below(roles.len() as u64) as usize] })
}

fn session_body(rng: &mut SplitMix64) -> Value {
    json!({ "folder": "proj", "sessionId": format!("ses_fuzz{}", rng.below(100)), "prompt": "hi", "model": "x/y" })
}

fn git_body(rng: &mut SplitMix64) -> Value {
    let refs = ["main", "--upload-pack=evil", "../x", "feature/a", "-x", ""];
    json!({ "root": "cwd", "path": ".", "message": "m", "branch": refs[rng.below(refs.len() as u64) as usize],
            "url": "file:///tmp/x", "name": "n", "email": "e@x", "paths": ["a", "--", "-rf"] })
}

fn template_body(rng: &mut SplitMix64) -> Value {
    json!({ "id": format!("fuzz-{}", rng.below(50)), "version": "1.0.0", "template": {"opencode": {"permission": {"bash": "deny"}}} })
}

fn mcp_body(rng: &mut SplitMix64) -> Value {
    json!({ "id": format!("mcp-{}", rng.below(50)), "version": "1.0.0", "type": "remote", "url": "https://x.invalid/mcp" })
}

fn push_body(_: &mut SplitMix64) -> Value {
    json!({ "template": "fuzz-1", "selector": {"env": "fuzz"}, "scope": "project", "apply_path": "opencode.json" })
}

/// Every route, as `(method, path template, body template)`.
const ROUTES: &[Route] = &[
    ("GET", "/health", no_body),
    ("GET", "/openapi.json", no_body),
    ("GET", "/metrics", no_body),
    ("GET", "/devices", no_body),
    ("POST", "/devices", device_body),
    ("GET", "/devices/{dev}", no_body),
    ("DELETE", "/devices/{victim}", no_body),
    ("GET", "/tokens", no_body),
    ("POST", "/tokens", token_body),
    ("POST", "/tokens/{tok}/revoke", empty),
    ("GET", "/events?after={n}&limit={n}", no_body),
    ("GET", "/events/stream?after={n}", no_body),
    ("GET", "/devices/{dev}/config/status/{n}", no_body),
    ("POST", "/devices/{dev}/dir", path_body),
    ("POST", "/devices/{dev}/mkdir", path_body),
    ("POST", "/devices/{dev}/rmdir", path_body),
    ("POST", "/devices/{dev}/rename", rename_body),
    ("POST", "/devices/{dev}/session/start", session_body),
    ("POST", "/devices/{dev}/session/status", session_body),
    ("POST", "/devices/{dev}/session/terminate", session_body),
    ("POST", "/devices/{dev}/prompt", session_body),
    ("POST", "/devices/{dev}/jit/kill", empty),
    ("POST", "/devices/{dev}/setup/status", empty),
    ("POST", "/devices/{dev}/setup/save", empty),
    ("POST", "/devices/{dev}/config/push", push_body),
    ("POST", "/devices/{dev}/git/status", git_body),
    ("POST", "/devices/{dev}/git/init", git_body),
    ("POST", "/devices/{dev}/git/clone", git_body),
    ("POST", "/devices/{dev}/git/add", git_body),
    ("POST", "/devices/{dev}/git/commit", git_body),
    ("POST", "/devices/{dev}/git/push", git_body),
    ("POST", "/devices/{dev}/git/pull", git_body),
    ("POST", "/devices/{dev}/git/branch", git_body),
    ("POST", "/devices/{dev}/git/checkout", git_body),
    ("POST", "/devices/{dev}/git/config", git_body),
    ("GET", "/sessions/{sid}/stream", no_body),
    ("POST", "/sessions/{sid}/jit/renew", empty),
    ("GET", "/session/{sid}/snapshot", no_body),
    ("GET", "/config/templates", no_body),
    ("POST", "/config/templates", template_body),
    ("GET", "/config/template/schema", no_body),
    ("POST", "/config/templates/{tid}/compile", empty),
    ("POST", "/config/push", push_body),
    ("GET", "/config/mcp", no_body),
    ("POST", "/config/mcp", mcp_body),
    ("GET", "/ws", no_body),
];

fn pick<'a, T>(rng: &mut SplitMix64, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len() as u64) as usize]
}

fn chance(rng: &mut SplitMix64, percent: u64) -> bool {
    rng.below(100) < percent
}

fn random_text(rng: &mut SplitMix64, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-";
    (0..len).map(|_| *pick(rng, ALPHABET) as char).collect()
}

/// An id for a path segment: real, random, or a trick (raw bytes allowed).
fn id_variant(rng: &mut SplitMix64, real: &str) -> (Vec<u8>, &'static str, bool) {
    // (bytes, kind, wire-malformed)
    match rng.below(24) {
        0..=9 => (real.as_bytes().to_vec(), "real-id", false),
        10 => (b"..".to_vec(), "dotdot", false),
        11 => (b"%2e%2e".to_vec(), "pct-dotdot", false),
        12 => (b"%2E%2e%2F%2e%2e%2Ftokens".to_vec(), "pct-slash", false),
        13 => (b"%00".to_vec(), "pct-nul", false),
        14 => (b"%ff%fe".to_vec(), "pct-not-utf8", false),
        15 => (b"%zz".to_vec(), "pct-malformed", false),
        16 => (
            "d\u{e9}v_\u{65e5}\u{672c}".as_bytes().to_vec(),
            "raw-unicode",
            true,
        ),
        17 => (
            "%F0%9F%92%A5%E2%80%AE".as_bytes().to_vec(),
            "pct-unicode",
            false,
        ),
        18 => (random_text(rng, 300).into_bytes(), "long-id", false),
        19 => (random_text(rng, 9000).into_bytes(), "overlong-id", false),
        20 => (b"a\0b".to_vec(), "raw-nul", true),
        21 => (format!("{real}%2F..").into_bytes(), "id-slash", false),
        22 => (b"%20".to_vec(), "space-id", false),
        _ => (random_text(rng, 16).into_bytes(), "random-id", false),
    }
}

fn number_variant(rng: &mut SplitMix64) -> String {
    pick(
        rng,
        &[
            "0",
            "1",
            "-1",
            "1000",
            "1001",
            "abc",
            "",
            "99999999999999999999999",
            "1e3",
            "%zz",
            "0x10",
            "18446744073709551615",
        ],
    )
    .to_string()
}

fn generate(rng: &mut SplitMix64, t: &Target) -> Case {
    let &(route_method, route_path, route_body) = pick(rng, ROUTES);
    let mut kind = "route";
    let mut wire_malformed = false;
    let mut oversize = false;

    // Method.
    let method: Vec<u8> = if chance(rng, 80) {
        route_method.as_bytes().to_vec()
    } else {
        kind = "method";
        let m = *pick(
            rng,
            &[
                "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "get", "FOO",
                "G\tET", "POST\x01", "",
            ],
        );
        if m.contains(['\t', '\x01']) || m.is_empty() {
            wire_malformed = true;
        }
        m.as_bytes().to_vec()
    };
    let head = method == b"HEAD";
    let deleting = method == b"DELETE";

    // Path: ids substituted, maybe tricked.
    let mut path: Vec<u8> = Vec::new();
    let template = route_path;
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        path.extend_from_slice(&rest.as_bytes()[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c);
        let name = &rest[open + 1..close];
        let real = match name {
            // Never delete the device the fuzzer drives.
            "dev" if deleting => t.victim_device.clone(),
            "dev" => t.device.clone(),
            "victim" => t.victim_device.clone(),
            "tok" => t.victim_token.clone(),
            "sid" => format!("ses_{}", random_text(rng, 12)),
            "tid" => "fuzz-1".to_owned(),
            _ => String::new(),
        };
        if name == "n" {
            path.extend_from_slice(number_variant(rng).as_bytes());
        } else {
            let (bytes, k, wire) = id_variant(rng, &real);
            if k != "real-id" {
                kind = k;
            }
            wire_malformed |= wire;
            path.extend_from_slice(&bytes);
        }
        rest = &rest[(close + 1).min(rest.len())..];
    }
    path.extend_from_slice(rest.as_bytes());
    if chance(rng, 15) {
        kind = "path-trick";
        let trick = rng.below(12);
        path = match trick {
            0 => [b"/".as_slice(), &path].concat(),
            1 => [b"/./".as_slice(), &path[1..]].concat(),
            2 => b"/devices/../tokens".to_vec(),
            3 => b"/%2e%2e/%2e%2e/etc/passwd".to_vec(),
            4 => [&path[..], b"/"].concat(),
            5 => path.to_ascii_uppercase(),
            6 => [&path[..], b";jsessionid=1"].concat(),
            7 => [&path[..], b"?x=%zz&&=&limit=-1#frag"].concat(),
            8 => {
                wire_malformed = true;
                b"*".to_vec()
            }
            9 => [b"http://evil.invalid".as_slice(), &path].concat(),
            10 => {
                // Long enough that the parser may refuse the URI.
                wire_malformed = true;
                [&path[..], b"/", random_text(rng, 70_000).as_bytes()].concat()
            }
            _ => {
                wire_malformed = true;
                [&path[..], b" HTTP/1.0"].concat()
            }
        };
    }

    // Headers.
    let mut headers: Vec<Vec<u8>> = vec![
        b"host: fuzz.invalid".to_vec(),
        b"connection: close".to_vec(),
    ];
    let bearer = format!("authorization: Bearer {}", t.token);
    match rng.below(20) {
        0 => kind = "auth-missing",
        1 => {
            kind = "auth-garbage";
            headers.push(b"authorization: Bearer garbage".to_vec());
        }
        2 => {
            kind = "auth-garbage";
            headers.push(b"authorization: Bearer".to_vec());
        }
        3 => {
            kind = "auth-garbage";
            headers.push(format!("authorization: bearer {}", t.token).into_bytes());
        }
        4 => {
            kind = "auth-garbage";
            headers.push(format!("authorization: Bearer {}x", t.token).into_bytes());
        }
        5 => {
            kind = "auth-garbage";
            headers.push(b"authorization: Basic Zm9vOmJhcg==".to_vec());
        }
        6 => {
            kind = "auth-duplicate";
            headers.push(bearer.clone().into_bytes());
            headers.push(b"authorization: Bearer cmt_0000000000000000_x".to_vec());
        }
        7 => {
            kind = "auth-garbage";
            headers.push(format!("authorization: Bearer {}", "A".repeat(8000)).into_bytes());
        }
        8 => {
            kind = "auth-garbage";
            headers.push(b"authorization: Bearer \xff\xfe\xc3".to_vec());
        }
        _ => headers.push(bearer.into_bytes()),
    }
    if chance(rng, 25) {
        let key: Vec<u8> = match rng.below(7) {
            0 => random_text(rng, 24).into_bytes(),
            1 => Vec::new(),
            2 => random_text(rng, 300).into_bytes(),
            3 => b"with spaces inside".to_vec(),
            4 => "cl\u{e9}-\u{65e5}".as_bytes().to_vec(),
            5 => b"fuzz-fixed-key".to_vec(),
            _ => {
                wire_malformed = true;
                b"ctl\x01char".to_vec()
            }
        };
        headers.push([b"idempotency-key: ".as_slice(), &key].concat());
    }
    if chance(rng, 10) {
        headers.push(format!("last-event-id: {}", number_variant(rng)).into_bytes());
    }
    if chance(rng, 3) {
        kind = "many-headers";
        wire_malformed = true;
        for i in 0..150 {
            headers.push(format!("x-fuzz-{i}: {i}").into_bytes());
        }
    }
    if chance(rng, 3) {
        kind = "upgrade";
        headers.push(b"upgrade: h2c".to_vec());
    }

    // Body.
    let template_body = route_body(rng);
    let mut body: Vec<u8> = if template_body.is_null() {
        Vec::new()
    } else {
        serde_json::to_vec(&template_body).unwrap_or_default()
    };
    if chance(rng, 45) {
        kind = "body";
        body = mutate_body(rng, &template_body, &mut kind, &mut oversize);
    }
    if !body.is_empty() || chance(rng, 50) {
        let ct: &[u8] = match rng.below(8) {
            0 => b"content-type: text/plain",
            1 => b"content-type: application/json; charset=utf-16",
            2 => b"content-type: multipart/form-data; boundary=x",
            _ => b"content-type: application/json",
        };
        headers.push(ct.to_vec());
    }
    // Framing.
    let mut framing_broken = false;
    match rng.below(25) {
        0 => {
            // Announce more than is sent (the write side is shut afterwards).
            kind = "length-lie";
            framing_broken = true;
            headers.push(format!("content-length: {}", body.len() + 100).into_bytes());
        }
        1 => {
            kind = "chunked";
            headers.push(b"transfer-encoding: chunked".to_vec());
            let mut chunked = format!("{:x}\r\n", body.len()).into_bytes();
            chunked.extend_from_slice(&body);
            chunked.extend_from_slice(b"\r\n0\r\n\r\n");
            body = chunked;
        }
        2 => {
            kind = "chunked-garbage";
            wire_malformed = true;
            headers.push(b"transfer-encoding: chunked".to_vec());
            body = b"zz\r\nhello\r\n-1\r\n".to_vec();
        }
        3 => {
            kind = "smuggle";
            wire_malformed = true;
            // A body that is not valid chunked framing, so the parser fails at once instead of
            // waiting for chunks that never come.
            if body.is_empty() {
                body = b"x".to_vec();
            }
            headers.push(b"transfer-encoding: chunked".to_vec());
            headers.push(format!("content-length: {}", body.len()).into_bytes());
        }
        4 => {
            kind = "content-length-garbage";
            wire_malformed = true;
            headers.push(b"content-length: -5".to_vec());
        }
        _ => headers.push(format!("content-length: {}", body.len()).into_bytes()),
    }
    if framing_broken {
        // The server waits for the rest, sees the end of the stream, and must still answer
        // (or close, which the HTTP layer may do for a truncated body).
        wire_malformed = true;
    }

    let mut bytes = Vec::with_capacity(body.len() + 512);
    bytes.extend_from_slice(&method);
    bytes.push(b' ');
    bytes.extend_from_slice(&path);
    bytes.extend_from_slice(b" HTTP/1.1\r\n");
    for h in &headers {
        bytes.extend_from_slice(h);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(&body);
    Case {
        kind,
        bytes,
        wire_malformed,
        oversize,
        head,
        half_close: framing_broken,
    }
}

fn mutate_body(
    rng: &mut SplitMix64,
    template: &Value,
    kind: &mut &'static str,
    oversize: &mut bool,
) -> Vec<u8> {
    let wrong_values = [
        json!(null),
        json!(true),
        json!(-1),
        json!(1.5),
        json!(18446744073709551615u64),
        json!(""),
        json!("\u{0}\u{202e}\u{fffd}"),
        json!([]),
        json!({}),
        json!([1, "a", null]),
        json!({"nested": {"deeper": [{}]}}),
    ];
    match rng.below(16) {
        0..=2 => {
            // Wrong type for one field.
            *kind = "wrong-type";
            let mut v = if template.is_object() {
                template.clone()
            } else {
                json!({})
            };
            if let Some(obj) = v.as_object_mut() {
                let keys: Vec<String> = obj.keys().cloned().collect();
                let key = if keys.is_empty() {
                    "x".to_owned()
                } else {
                    pick(rng, &keys).clone()
                };
                obj.insert(key, pick(rng, &wrong_values).clone());
            }
            serde_json::to_vec(&v).unwrap_or_default()
        }
        3 => {
            *kind = "missing-fields";
            b"{}".to_vec()
        }
        4 => {
            *kind = "unknown-field";
            let mut v = if template.is_object() {
                template.clone()
            } else {
                json!({})
            };
            v["__proto__"] = json!({"admin": true});
            v["zzz_unknown"] = json!(1);
            serde_json::to_vec(&v).unwrap_or_default()
        }
        5 => {
            *kind = "deep-nesting";
            let depth = 5000 + rng.below(5000) as usize;
            let mut b = Vec::with_capacity(depth * 2 + 8);
            b.extend_from_slice(b"{\"a\":");
            b.extend(std::iter::repeat_n(b'[', depth));
            b.extend(std::iter::repeat_n(b']', depth));
            b.push(b'}');
            b
        }
        6 => {
            *kind = "huge-string";
            let mut v = if template.is_object() {
                template.clone()
            } else {
                json!({})
            };
            v["name"] = json!("x".repeat(200_000));
            v["path"] = json!("a/".repeat(50_000));
            serde_json::to_vec(&v).unwrap_or_default()
        }
        7 => {
            *kind = "huge-body";
            *oversize = true;
            let n = BODY_LIMIT + 1 + rng.below(BODY_LIMIT as u64) as usize;
            let mut b = b"{\"name\":\"".to_vec();
            b.extend(std::iter::repeat_n(b'x', n));
            b.extend_from_slice(b"\"}");
            b
        }
        8 => {
            *kind = "truncated-json";
            let full = serde_json::to_vec(template).unwrap_or_default();
            let cut = rng.below(full.len().max(1) as u64) as usize;
            full[..cut].to_vec()
        }
        9 => {
            *kind = "not-utf8";
            b"{\"name\":\"\xff\xfe\xc3\x28\",\"path\":\"\xed\xa0\x80\"}".to_vec()
        }
        10 => {
            *kind = "escapes";
            br#"{"name":"\ud800","path":"\u0000..\u002f..","root":"\ud83d\ude00"}"#.to_vec()
        }
        11 => {
            *kind = "not-object";
            pick(
                rng,
                &[
                    b"null".as_slice(),
                    b"[]",
                    b"\"str\"",
                    b"0",
                    b"1e999",
                    b"-",
                    b"\xef\xbb\xbf{}",
                    b"{\"a\":1,\"a\":2}",
                    b"{\"a\":NaN}",
                ],
            )
            .to_vec()
        }
        12 => {
            *kind = "random-bytes";
            let n = rng.below(512) as usize;
            (0..n).map(|_| rng.next_u64() as u8).collect()
        }
        13 => {
            *kind = "huge-number";
            let mut v = if template.is_object() {
                template.clone()
            } else {
                json!({})
            };
            v["limit"] = json!(u64::MAX);
            let mut b = serde_json::to_vec(&v).unwrap_or_default();
            // An integer far beyond u64, written by hand.
            if b.ends_with(b"}") {
                b.pop();
                b.extend_from_slice(b",\"lines\":123456789012345678901234567890}");
            }
            b
        }
        14 => {
            *kind = "many-keys";
            let mut obj = serde_json::Map::new();
            for i in 0..5000 {
                obj.insert(format!("k{i}"), json!(i));
            }
            serde_json::to_vec(&Value::Object(obj)).unwrap_or_default()
        }
        _ => {
            *kind = "empty-body";
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_answers() {
        let raw = b"HTTP/1.1 404 Not Found\r\ncontent-length: 5\r\n\r\nhello";
        let a = parse_complete(raw).expect("complete");
        assert_eq!((a.status, a.body.as_slice()), (404, b"hello".as_slice()));
        assert!(parse_complete(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nhi").is_none());
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
        assert_eq!(parse_complete(chunked).expect("chunked").body, b"hi");
        let sse = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
        assert_eq!(parse_complete(sse).expect("sse").status, 200);
    }

    #[test]
    fn generation_is_seeded_and_covers_routes() {
        let t = Target {
            addr: "127.0.0.1:1".parse().expect("addr"),
            token: "cmt_x".into(),
            device: "dev_fuzz00000001".into(),
            victim_device: "dev_victim000001".into(),
            victim_token: "0011223344556677".into(),
        };
        let run = |seed| {
            let mut rng = SplitMix64::new(seed);
            (0..50)
                .map(|_| generate(&mut rng, &t).bytes)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
        // The driven device is never the target of a DELETE.
        let mut rng = SplitMix64::new(9);
        for _ in 0..2000 {
            let c = generate(&mut rng, &t);
            if c.bytes.starts_with(b"DELETE ") {
                assert!(!c.bytes.windows(16).any(|w| w == b"dev_fuzz00000001"));
            }
        }
    }

    #[test]
    fn checks_error_bodies_and_statuses() {
        let case = |wire| Case {
            kind: "t",
            bytes: Vec::new(),
            wire_malformed: wire,
            oversize: false,
            head: false,
            half_close: false,
        };
        let answer = |status, body: &str| {
            Ok(Answer {
                status,
                headers: vec![("content-type".into(), "application/json".into())],
                body: body.as_bytes().to_vec(),
            })
        };
        let d = Duration::from_millis(1);
        assert!(
            check(
                &case(false),
                &answer(404, r#"{"error":"x","message":"y"}"#),
                d
            )
            .is_empty()
        );
        assert_eq!(check(&case(false), &answer(400, ""), d).len(), 1);
        assert!(check(&case(true), &answer(400, ""), d).is_empty());
        assert_eq!(
            check(
                &case(false),
                &answer(500, r#"{"error":"x","message":"y"}"#),
                d
            )
            .len(),
            1
        );
        assert!(
            check(
                &case(false),
                &answer(507, r#"{"error":"x","message":"y"}"#),
                d
            )
            .is_empty()
        );
        assert_eq!(check(&case(false), &Err("closed".into()), d).len(), 1);
    }
}
