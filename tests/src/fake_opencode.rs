//! A fake `opencode serve` for tests: the few routes CodeMantle's daemon uses, the same auth
//! rules and the same SSE framing as OpenCode 1.18 (`shared/reference/opencode.md`), with a
//! scripted "model" so tests know exactly which events a prompt produces.
//!
//! It is plain `std` (threads, blocking sockets) plus `serde_json`, so it can be compiled into
//! any test executable: the daemon's session tests include this file with `#[path]` and run
//! their own test binary as the "opencode" program through the process guard (sandboxed, as the
//! run_as user), the way the process-guard tests run their probe. [`main_if_requested`] is the
//! entry point: it does nothing unless the process was started with [`MARKER`] among its
//! arguments, then serves forever.
//!
//! Routes (all require `Authorization: Basic base64(opencode:$OPENCODE_SERVER_PASSWORD)` when
//! that variable is set, else `401` with `www-authenticate`, as OpenCode does):
//!
//! - `GET /global/health` → `{"healthy":true,"version":"fake"}`
//! - `POST /session` → a Session object with a fresh `ses_fake…` id and the cwd as `directory`
//! - `POST /session/:id/prompt_async` `{"parts":[{"type":"text","text":…}]}` → `204`, then the
//!   scripted events on every `/event` subscriber; unknown id → `404 NotFoundError`; no
//!   `parts` → `400`
//! - `POST /session/:id/abort` → `true`
//! - `GET /event` → `text/event-stream`, chunked, `data: <json>\n\n` records: first
//!   `server.connected`, then `server.heartbeat` every second, plus the prompt events
//!
//! The prompt script (whitespace-separated words in the prompt text; anything else is
//! ignored):
//!
//! - `emit N`: N `message.part.delta` events (default 3), deltas `"part <i> "`
//! - `size S`: pad each delta to S bytes with `x`
//! - `env NAME`: one `fake.env` event with the variable's value (or `null`)
//! - `hang`: never end the turn (no `session.idle`)
//! - `gap MS`: sleep MS milliseconds between events
//! - `step`: before delta `i`, wait until the file [`STEP_FILE`] in the server's working
//!   directory (the session folder) holds a number greater than `i`, **and** until at least one
//!   `/event` subscriber's connection is still open. A test releases deltas in batches and can
//!   kill the daemon while nothing is in flight: every delta released so far was read, and the
//!   next one waits for the restarted daemon to subscribe again (a subscriber whose peer is gone
//!   — the killed daemon — is noticed with a non-blocking peek before each delta), so no delta is
//!   written into a dead connection. Real OpenCode has no such pacing; it loses what it emits
//!   while nobody listens, which the daemon marks with `codemantle.events.gap`.
//! - `fast`: with `emit N size S`, emit the deltas as fast as the subscribers take them (a
//!   bounded queue per subscriber, so a slow reader slows the script instead of growing memory;
//!   for throughput benches).
//!
//! Every prompt first emits `fake.prompt {"n": <prompts so far>, "text": …}` so a test can tell
//! a prompt that ran twice; a turn ends with `session.status {type:"idle"}` and
//! `session.idle {sessionID}`, as OpenCode's does.
//!
//! SAFETY: it binds only `127.0.0.1:<--port>`, writes nothing to disk and runs until killed.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

/// The file (in the server's working directory) that `step` reads: how many deltas may go out.
pub const STEP_FILE: &str = ".fake-step";

/// The argument that turns a test executable into the fake server.
pub const MARKER: &str = "fake-opencode-serve";

/// If this process was started as the fake (argv contains [`MARKER`]), serve forever on the
/// `--port` from argv; otherwise return at once.
pub fn main_if_requested() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == MARKER) {
        return;
    }
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse::<u16>().ok())
        .expect("fake opencode: --port <n> is required");
    let password = std::env::var("OPENCODE_SERVER_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty());
    serve(port, password);
}

/// Serve on `127.0.0.1:port` until the process is killed.
pub fn serve(port: u16, password: Option<String>) -> ! {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("fake opencode: bind");
    if password.is_none() {
        println!("Warning: OPENCODE_SERVER_PASSWORD is not set; server is unsecured.");
    }
    println!("opencode server listening on http://127.0.0.1:{port}");
    let _ = std::io::stdout().flush();
    let state = Arc::new(State {
        expected_auth: password
            .map(|p| format!("Basic {}", base64(format!("opencode:{p}").as_bytes()))),
        subscribers: Mutex::new(Vec::new()),
        sessions: Mutex::new(Vec::new()),
        next_id: AtomicU64::new(1),
        prompts: AtomicU64::new(0),
        watchers: Mutex::new(Vec::new()),
        bounded: Mutex::new(Vec::new()),
    });
    {
        let state = Arc::clone(&state);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(1));
                state.broadcast("server.heartbeat", json!({}));
            }
        });
    }
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let state = Arc::clone(&state);
        std::thread::spawn(move || {
            let _ = handle(conn, &state);
        });
    }
    unreachable!("the listener never ends");
}

struct State {
    expected_auth: Option<String>,
    subscribers: Mutex<Vec<mpsc::Sender<String>>>,
    sessions: Mutex<Vec<String>>,
    next_id: AtomicU64,
    prompts: AtomicU64,
    /// The connections of `/event` subscribers, to tell whether one is still open (`step`).
    watchers: Mutex<Vec<TcpStream>>,
    /// Bounded queues of `/event` subscribers, used by `fast` (blocking when full).
    bounded: Mutex<Vec<mpsc::SyncSender<String>>>,
}

impl State {
    fn broadcast(&self, kind: &str, properties: Value) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let event =
            json!({"id": format!("evt_{id}"), "type": kind, "properties": properties}).to_string();
        let mut subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|tx| tx.send(event.clone()).is_ok());
    }

    /// Whether at least one `/event` subscriber's peer has not closed its connection; forgets
    /// the closed ones.
    fn has_open_subscriber(&self) -> bool {
        let mut watchers = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        watchers.retain(peer_open);
        !watchers.is_empty()
    }

    /// `broadcast` through the bounded queues: waits while a subscriber's queue is full.
    fn broadcast_bounded(&self, kind: &str, properties: Value) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let event =
            json!({"id": format!("evt_{id}"), "type": kind, "properties": properties}).to_string();
        let mut subs = self.bounded.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|tx| tx.send(event.clone()).is_ok());
    }
}

/// Whether the peer of `conn` has not closed it: a non-blocking peek that finds neither data
/// nor end-of-stream (the subscriber never sends after its request, so data means open too).
fn peer_open(conn: &TcpStream) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut byte = 0u8;
    // SAFETY: recv into a one-byte buffer we own, on a socket fd that `conn` keeps open.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            (&raw mut byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n > 0 {
        return true;
    }
    if n == 0 {
        return false;
    }
    let err = std::io::Error::last_os_error();
    err.kind() == std::io::ErrorKind::WouldBlock || err.kind() == std::io::ErrorKind::Interrupted
}

/// How many deltas `step` may emit: the number in [`STEP_FILE`], 0 while it is missing or
/// half-written.
fn released() -> usize {
    std::fs::read_to_string(STEP_FILE)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

fn read_request(conn: &TcpStream) -> std::io::Result<Option<Request>> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut authorization = None;
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.to_owned());
            } else if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length.min(1 << 20)];
    reader.read_exact(&mut body)?;
    Ok(Some(Request {
        method,
        path,
        authorization,
        body,
    }))
}

fn respond(conn: &mut TcpStream, status: &str, extra: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    conn.flush()
}

fn handle(mut conn: TcpStream, state: &Arc<State>) -> std::io::Result<()> {
    let Some(req) = read_request(&conn)? else {
        return Ok(());
    };
    if let Some(expected) = &state.expected_auth {
        if req.authorization.as_deref() != Some(expected.as_str()) {
            let head = "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"Secure Area\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            return conn.write_all(head.as_bytes());
        }
    }
    let path = req.path.split('?').next().unwrap_or("").to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["global", "health"]) => respond(
            &mut conn,
            "200 OK",
            "",
            r#"{"healthy":true,"version":"fake"}"#,
        ),
        ("POST", ["session"]) => {
            let n = state.next_id.fetch_add(1, Ordering::Relaxed);
            let id = format!("ses_fake{n}");
            state
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(id.clone());
            let dir = std::env::current_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            let body = json!({"id": id, "slug": "fake", "projectID": "global", "directory": dir, "title": "fake", "version": "fake"});
            respond(&mut conn, "200 OK", "", &body.to_string())
        }
        ("POST", ["session", id, "prompt_async"]) => {
            let known = state
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|s| s == id);
            if !known {
                let body = json!({"name":"NotFoundError","data":{"message": format!("Session not found: {id}")}});
                return respond(&mut conn, "404 Not Found", "", &body.to_string());
            }
            let parsed: Option<Value> = serde_json::from_slice(&req.body).ok();
            let Some(text) = parsed
                .as_ref()
                .and_then(|v| v.get("parts"))
                .and_then(|p| p.get(0))
                .and_then(|p| p.get("text"))
                .and_then(Value::as_str)
                .map(str::to_owned)
            else {
                let body = r#"{"name":"BadRequest","data":{"message":"Missing key\n  at [\"parts\"]","kind":"Payload"}}"#;
                return respond(&mut conn, "400 Bad Request", "", body);
            };
            let head = "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
            conn.write_all(head.as_bytes())?;
            conn.flush()?;
            drop(conn);
            run_script(state, id, &text);
            Ok(())
        }
        ("POST", ["session", _, "abort"]) => respond(&mut conn, "200 OK", "", "true"),
        ("GET", ["event"]) => {
            let (tx, rx) = mpsc::channel::<String>();
            let (btx, brx) = mpsc::sync_channel::<String>(256);
            let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
            conn.write_all(head.as_bytes())?;
            let first = json!({"id":"evt_0","type":"server.connected","properties":{}}).to_string();
            write_chunk(&mut conn, &first)?;
            state
                .subscribers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(tx);
            state
                .bounded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(btx);
            if let Ok(watch) = conn.try_clone() {
                state
                    .watchers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(watch);
            }
            // Bounded (`fast`) events are written by a second thread on a clone of the
            // connection; both write whole HTTP chunks under one lock.
            let conn = Arc::new(Mutex::new(conn));
            {
                let conn = Arc::clone(&conn);
                std::thread::spawn(move || {
                    let mut batch = String::new();
                    while let Ok(event) = brx.recv() {
                        // Coalesce what is queued into one write (as a real server's buffered
                        // writer would).
                        batch.clear();
                        push_record(&mut batch, &event);
                        while let Ok(more) = brx.try_recv() {
                            push_record(&mut batch, &more);
                            if batch.len() > 256 << 10 {
                                break;
                            }
                        }
                        if batch.is_empty() {
                            continue;
                        }
                        let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
                        if c.write_all(batch.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
            for event in rx {
                let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
                write_chunk(&mut c, &event)?;
            }
            Ok(())
        }
        _ => respond(
            &mut conn,
            "404 Not Found",
            "",
            r#"{"name":"NotFoundError","data":{"message":"no such route"}}"#,
        ),
    }
}

/// Appends one SSE record as one HTTP chunk to `out` (nothing for an empty event).
fn push_record(out: &mut String, event: &str) {
    use std::fmt::Write as _;
    if event.is_empty() {
        return;
    }
    let record = format!("data: {event}\n\n");
    let _ = write!(out, "{:x}\r\n{record}\r\n", record.len());
}

/// One SSE record as one HTTP chunk.
fn write_chunk(conn: &mut TcpStream, event: &str) -> std::io::Result<()> {
    let record = format!("data: {event}\n\n");
    write!(conn, "{:x}\r\n{record}\r\n", record.len())?;
    conn.flush()
}

fn run_script(state: &State, session: &str, text: &str) {
    let n = state.prompts.fetch_add(1, Ordering::Relaxed) + 1;
    let words: Vec<&str> = text.split_whitespace().collect();
    let arg = |name: &str| -> Option<&str> {
        words
            .iter()
            .position(|w| *w == name)
            .and_then(|i| words.get(i + 1))
            .copied()
    };
    let count: usize = arg("emit").and_then(|v| v.parse().ok()).unwrap_or(3);
    let size: usize = arg("size").and_then(|v| v.parse().ok()).unwrap_or(0);
    let gap = Duration::from_millis(arg("gap").and_then(|v| v.parse().ok()).unwrap_or(0));
    let step = words.contains(&"step");
    let fast = words.contains(&"fast");
    // `fast` sends every event of the turn through the bounded queues, so they stay in order.
    let emit = |kind: &str, properties: Value| {
        if fast {
            state.broadcast_bounded(kind, properties);
        } else {
            state.broadcast(kind, properties);
        }
    };
    emit(
        "fake.prompt",
        json!({"sessionID": session, "n": n, "text": text}),
    );
    emit(
        "session.status",
        json!({"sessionID": session, "status": {"type": "busy"}}),
    );
    if let Some(name) = arg("env") {
        let value = std::env::var(name).ok();
        emit(
            "fake.env",
            json!({"sessionID": session, "name": name, "value": value}),
        );
    }
    for i in 0..count {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
        if step {
            while released() <= i || !state.has_open_subscriber() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let mut delta = format!("part {i} ");
        while delta.len() < size {
            delta.push('x');
        }
        emit(
            "message.part.delta",
            json!({"sessionID": session, "messageID": "msg_fake", "partID": "prt_fake", "field": "text", "delta": delta}),
        );
    }
    if words.contains(&"hang") {
        return;
    }
    emit(
        "session.status",
        json!({"sessionID": session, "status": {"type": "idle"}}),
    );
    emit("session.idle", json!({"sessionID": session}));
}

/// Standard base64 with padding (enough for the auth header; no dependency).
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(super::base64(b"opencode:s3cret"), "b3BlbmNvZGU6czNjcmV0");
        assert_eq!(super::base64(b"a"), "YQ==");
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b""), "");
    }
}
