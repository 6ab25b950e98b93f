//! Shared fixture for the session tests: a real [`ProcessGuard`] (landlock, `nobody` when the
//! tests run as root), a temp dir with a project root and a journal, and a fake OpenCode — this
//! very test executable, re-executed by the guard as the allowlisted `opencode` program
//! (`tests/src/fake_opencode.rs`, included below; each test file has
//! `#[test] fn fake_opencode_entry()`).
//!
//! SAFETY RULES (these tests run as root): everything a test or a fake OpenCode writes is inside
//! the fixture's temp dir; the fake binds only loopback ports from the fixture's own range;
//! no symlink points anywhere outside the temp dir.

#![allow(dead_code)]

#[path = "../../../tests/src/fake_opencode.rs"]
pub mod fake_opencode;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use codemantle_daemon::config::ProcessConfig;
use codemantle_daemon::guard::path::Roots;
use codemantle_daemon::guard::process::{AllowedProgram, ProcessGuard, RunAs};
use codemantle_daemon::journal::Journal;
use codemantle_daemon::session::stream::{StreamJournal, StreamLimits};
use codemantle_daemon::session::{
    Clock, ManualClock, SessionManager, SessionSettings, SystemClock,
};
use codemantle_protocol::message::{
    JitCredential, Message, Prompt, SessionResult, SessionStatus, SessionStatusQuery, StartSession,
    StopSession, StreamChunk,
};
use futures_lite::FutureExt as _;
use serde_json::Value;

/// The unprivileged user sessions run as when the tests run as root.
pub const NOBODY: u32 = 65534;

pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown_child_user(path: &Path) {
    if running_as_root() {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(NOBODY)),
            Some(nix::unistd::Gid::from_raw(NOBODY)),
        )
        .unwrap();
    }
}

/// The fake's allowlist entry: this test executable, told to run only `fake_opencode_entry`,
/// with the marker that makes it serve.
pub fn fake_program() -> AllowedProgram {
    AllowedProgram {
        path: std::env::current_exe().unwrap(),
        args: [
            "fake_opencode_entry",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
            "--",
            fake_opencode::MARKER,
        ]
        .into_iter()
        .map(OsString::from)
        .collect(),
    }
}

/// Ports handed out to fixtures of this process: each fixture gets its own range, so tests
/// running in parallel never race for a port.
static NEXT_RANGE: AtomicU16 = AtomicU16::new(0);
const RANGE_SIZE: u16 = 8;

/// A temp-dir world for one test.
pub struct World {
    pub tmp: tempfile::TempDir,
    /// The `cwd` root, owned by the session user, with folders `proj-a` and `proj-b`.
    pub project: PathBuf,
    pub data_dir: PathBuf,
    pub guard: Arc<ProcessGuard>,
    pub roots: Arc<Roots>,
    pub settings: SessionSettings,
}

impl World {
    /// A world whose port range starts at `base` + a per-fixture offset (give each test file
    /// its own `base`).
    pub fn new(base: u16) -> World {
        World::with_settings(base, |_| {})
    }

    pub fn with_settings(base: u16, tweak: impl FnOnce(&mut SessionSettings)) -> World {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o755);
        let project = tmp.path().join("project");
        for dir in [
            project.clone(),
            project.join("proj-a"),
            project.join("proj-b"),
        ] {
            std::fs::create_dir(&dir).unwrap();
            chmod(&dir, 0o755);
            chown_child_user(&dir);
        }
        let private = tmp.path().join("private");
        let mut config = ProcessConfig {
            private_dir: private,
            run_as: running_as_root().then_some(RunAs {
                uid: NOBODY,
                gid: NOBODY,
                name: Some("nobody".to_owned()),
            }),
            connect_ports: Vec::new(),
            ..ProcessConfig::default()
        };
        config.limits.max_open_files = 512;
        config.limits.max_processes = 2000;
        config
            .allowlist
            .insert("opencode".to_owned(), fake_program());
        let guard = Arc::new(ProcessGuard::new(&config).expect("process guard"));
        let mut roots = std::collections::BTreeMap::new();
        roots.insert("cwd".to_owned(), project.clone());
        let roots = Arc::new(Roots::open(&roots).unwrap());
        let slot = NEXT_RANGE.fetch_add(1, Ordering::SeqCst);
        let lo = base + slot * RANGE_SIZE;
        let mut settings = SessionSettings {
            port_range: (lo, lo + RANGE_SIZE - 1),
            start_timeout: Duration::from_secs(20),
            stop_grace: Duration::from_secs(2),
            // These tests count one chunk per event.
            coalesce_output: false,
            ..SessionSettings::default()
        };
        tweak(&mut settings);
        World {
            data_dir: tmp.path().join("data"),
            tmp,
            project,
            guard,
            roots,
            settings,
        }
    }

    /// Open the journal. After a simulated restart, background work of the dropped manager
    /// (a flush on the blocking pool) may hold sled's lock for a moment: retry briefly.
    pub fn journal(&self) -> Journal {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Journal::open(&self.data_dir, 3600) {
                Ok(j) => return j,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("journal busy ({e}); retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("journal: {e}"),
            }
        }
    }

    /// A session manager over `journal` with the system clock.
    pub fn manager(&self, journal: &Journal) -> SessionManager {
        self.manager_with_clock(journal, Arc::new(SystemClock))
    }

    pub fn manager_with_clock(&self, journal: &Journal, clock: Arc<dyn Clock>) -> SessionManager {
        SessionManager::open(
            self.settings.clone(),
            Arc::clone(&self.roots),
            Arc::clone(&self.guard),
            journal,
            clock,
        )
        .expect("session manager")
    }
}

/// A manual clock at the real current time.
pub fn manual_clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::new(SystemClock.now_ms()))
}

pub fn si(id: &str, folder: &str, jit: Option<JitCredential>) -> StartSession {
    StartSession {
        request_id: 1,
        session_id: id.to_owned(),
        folder: Some(folder.to_owned()),
        jit,
        idempotency_key: None,
    }
}

pub fn start(m: &SessionManager, id: &str, folder: &str) -> SessionResult {
    start_with(m, si(id, folder, None))
}

pub fn start_with(m: &SessionManager, req: StartSession) -> SessionResult {
    match smol::block_on(m.start(req)) {
        Message::SessionResult(r) => r,
        other => panic!("expected sr, got {other:?}"),
    }
}

pub fn stop(m: &SessionManager, id: &str) -> SessionResult {
    let req = StopSession {
        request_id: 2,
        session_id: id.to_owned(),
        idempotency_key: None,
    };
    match smol::block_on(m.stop(req)) {
        Message::SessionResult(r) => r,
        other => panic!("expected sr, got {other:?}"),
    }
}

pub fn status(m: &SessionManager, folder: &str) -> SessionStatus {
    let req = SessionStatusQuery {
        request_id: 3,
        folder: folder.to_owned(),
    };
    match smol::block_on(m.status(req)) {
        Message::SessionStatus(s) => s,
        other => panic!("expected sv, got {other:?}"),
    }
}

pub fn prompt(m: &SessionManager, session: &str, stream: &str, text: &str) -> Option<Message> {
    smol::block_on(m.prompt(Prompt {
        request_id: 4,
        stream_id: stream.to_owned(),
        session_id: session.to_owned(),
        prompt: text.to_owned(),
        idempotency_key: None,
    }))
}

/// Frames of stream `x` as the link would send them, until its last chunk (`e:1`). Frames of
/// other streams are consumed and ignored.
pub fn collect_stream(streams: &StreamJournal, x: &str, timeout: Duration) -> Vec<StreamChunk> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    smol::block_on(async {
        loop {
            let frame = async { Some(streams.next_frame().await) }
                .or(async {
                    smol::Timer::at(deadline).await;
                    None
                })
                .await;
            match frame {
                Some(Message::StreamChunk(c)) if c.stream_id == x => {
                    let last = c.last;
                    out.push(c);
                    if last {
                        return;
                    }
                }
                Some(_) => {}
                None => panic!(
                    "stream {x}: no last chunk within {timeout:?}; got {} chunks: {out:#?}",
                    out.len()
                ),
            }
        }
    });
    out
}

/// Whatever the link would send right now (waits `quiet` for more before returning).
pub fn drain_now(streams: &StreamJournal, quiet: Duration) -> Vec<Message> {
    let mut out = Vec::new();
    smol::block_on(async {
        loop {
            let frame = async { Some(streams.next_frame().await) }
                .or(async {
                    smol::Timer::after(quiet).await;
                    None
                })
                .await;
            match frame {
                Some(f) => out.push(f),
                None => return,
            }
        }
    });
    out
}

/// The NDJSON records of a stream's chunks (the concatenated text, one JSON per line).
pub fn records(chunks: &[StreamChunk]) -> Vec<Value> {
    let text: String = chunks.iter().map(|c| c.data.as_str()).collect();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub fn kinds(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["type"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// Wait until `cond` holds (or panic after `timeout`).
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The stream limits of a fixture with a tiny cap.
pub fn tiny_cap(chunks: u64) -> StreamLimits {
    StreamLimits {
        max_unacked_bytes: 1 << 20,
        max_unacked_chunks: chunks,
    }
}
