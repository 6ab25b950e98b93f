//! `session`: OpenCode sessions — start, prompt, stream, stop — and their output, durably.
//!
//! # What a session is
//!
//! One `opencode serve` process per folder (as 0.1.50: one server per folder, a second `si` for
//! the same folder reuses it), started by the [`SessionManager`] through the process guard:
//! allowlist name `opencode`, the fixed argv `serve --hostname 127.0.0.1 --port <port>`, the
//! folder (opened through the path guard) as its only writable tree besides its private `HOME`
//! and `TMPDIR` (one pair per folder under `process.private_dir`, so OpenCode's own history
//! survives a restart of its server), landlock allowing it to **bind only its own port** and
//! connect only to the
//! configured ports, as the unprivileged `run_as` user. Its API is protected by a fresh random
//! `OPENCODE_SERVER_PASSWORD` per session (0.1.50 left it open to every local user); the daemon
//! talks to it with that password over [`http`].
//!
//! Ids: a session is keyed by the control plane's id (`si.s`), which is what `sr.s` returns and
//! what `st`/`sp` name; OpenCode's own `ses_…` id is kept alongside (and accepted too) and goes
//! into the editor URL. `sr.u`/`sv.u` are `http://127.0.0.1:<port>/<base64url(dir)>/session/<ses
//! id>` as 0.1.50 built them.
//!
//! # Lifecycle
//!
//! - `si` → revocation check, JIT check ([`codemantle_protocol::jit`]: fields, allowlisted env
//!   names, remaining lifetime in (15 s, 1 h]), folder through the path guard, port from
//!   `[session] port_range` (probed free, not used by another session), spawn, wait for
//!   `GET /global/health` (with auth) up to `start_timeout_s`, subscribe to `GET /event`,
//!   `POST /session`, then `sr {o:1, s, u}`. Failures answer `o:0` with 0.1.50's reason strings
//!   (`invalid_folder_path`, `invalid_jit_credential`, `opencode_port_unavailable`,
//!   `opencode_spawn_failed`, `opencode_start_timeout`, `opencode_invalid_session`,
//!   `http_<status>`), plus `jit_revoked` and `session_id_in_use`; the detail is in the log.
//! - `sq` → `sv` with port, pid, URL and, natively, `pt` (the sandbox the guard obtained).
//! - `sp {x, s, p}` → `POST /session/<ses>/prompt_async`; from then on OpenCode's events go to
//!   stream `x` until the turn ends (`session.idle`), which is the stream's last chunk (`e:1`).
//!   A re-sent `sp` (same `x`) is not prompted again. A failure closes `x` with a
//!   `codemantle.prompt.failed` record and answers `e INTERNAL` (0.1.50 ignored `sp`).
//! - `st` → SIGTERM to the process group, SIGKILL after `stop_grace`, `sr {o:1}`. The open
//!   stream, if any, ends with a `codemantle.session.ended` record.
//! - The process exiting by itself ends the session the same way (reason `exited`).
//!
//! # Output
//!
//! Events become chunks of the session's current stream in [`stream::StreamJournal`]: written
//! to sled before they are sent, deleted when acknowledged (`sa`), re-sent after a reconnect,
//! capped per session with explicit truncation markers (before the cap, the event reader
//! pauses while more than half of it is unacknowledged: backpressure, not loss, for a burst
//! faster than the link). `server.heartbeat`/`server.connected`
//! are not forwarded. Events also go (with lifecycle records) into the device-wide replay log
//! that `sl` reads ([`registry`]). Known secret values of the session (its password, the JIT
//! token and extra values) are replaced by `***REDACTED***` in both.
//!
//! # Restarts
//!
//! The registry is in sled. [`SessionManager::open`] re-adopts every session whose process is
//! still the same process (pid + start time, [`ProcessId::is_alive`]): it reconnects to its
//! events (a `codemantle.events.gap` record marks what the restart may have missed) and keeps
//! enforcing its JIT expiry. Sessions whose process is gone are recorded as ended
//! (`gone_while_daemon_down`, exit status unknown: a re-adopted process is not our child).
//!
//! # JIT credentials
//!
//! The token goes into the environment under its allowlisted name (`OPENCODE_SESSION_TOKEN`
//! by default) with `OPENCODE_JIT_TOKEN_EXPIRES_AT`, `OPENCODE_JIT_SCOPE` and the allowlisted
//! extra pairs; it is never logged. [`SessionManager::sweep`] (every second, from
//! [`SessionManager::run_sweeper`]) ends sessions whose credential expired (`jit_expired`);
//! there is no renewal message in v=1 yet, so a session lives at most as long as its
//! credential (the control plane asks for up to 1 h). `jk` revokes at once: the revocation is
//! written to sled and flushed first, then the affected sessions end (`jit_revoked`); a revoked
//! ref or session id cannot start again, across restarts.
//!
//! # Seams left for later
//!
//! - `jk x:1` (close the tunnel afterwards) is logged, not done: the dispatcher cannot close
//!   the link yet.
//! - The port proxy (`pr`) and `pl` announcements of session ports: [`SessionManager::ports`]
//!   and [`SessionManager::on_ports_changed`] are the hooks.
//! - A re-adopted OpenCode has no stdout/stderr reader: after a daemon restart its output
//!   pipes are closed, so it must not write to them (`opencode serve` without `--print-logs`
//!   prints only its start line).
//! - JIT values of a re-adopted session are no longer scrubbed from its output (the token is
//!   never stored); its password still is.
//! - Session-init payloads accepted by `cc` (providers, routing, MCP tools) are not applied to
//!   OpenCode yet; they wait in the config applier's store.
//! - Starts are serialised (port choice and per-folder reuse must see each other), so a slow
//!   OpenCode start delays other starts up to `start_timeout_s`.
//! - Private homes are kept after a session ends (OpenCode's history); nothing prunes them.

pub mod http;
pub mod registry;
pub mod stream;

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::jit::{self, EnvAllowlist};
use codemantle_protocol::message::{
    JitKill, JitKillResult, JitRenew, JitRenewResult, Message, Prompt, ReplayLog, SessionResult,
    SessionStatus, SessionStatusQuery, StartSession, StopSession, StreamAck, StreamChunk,
};
use futures_lite::FutureExt as _;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::config_apply::{OPENCODE_CONFIG_CONTENT_ENV, SessionInit, SessionInitStore};
use crate::guard::path::{RelPath, Roots};
use crate::guard::process::{GuardedChild, NetPolicy, ProcessGuard, ProcessId, SpawnSpec, procfs};
use crate::journal::{Journal, JournalError};
use crate::redact::{REDACTED, redact_text};

use self::http::{EventStream, OpenCodeClient, SseItem};
use self::registry::{JitBinding, Registry, Revocation, Revoked, SessionRecord, SessionState};
use self::stream::{StreamError, StreamJournal, StreamLimits, split_utf8};

/// The allowlist name of the OpenCode program.
pub const OPENCODE_PROGRAM: &str = "opencode";
/// The environment variable that protects OpenCode's API (HTTP Basic, user `opencode`).
pub const PASSWORD_ENV: &str = "OPENCODE_SERVER_PASSWORD";
/// Longest `sr.u` the control plane accepts.
const MAX_SR_URL: usize = 1024;
/// Longest `sv.u` the control plane accepts.
const MAX_SV_URL: usize = 512;

/// `[session]` settings.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The root whose folders sessions run in (`cwd`).
    pub root: String,
    /// Ports OpenCode servers may listen on (inclusive).
    pub port_range: (u16, u16),
    /// Ports OpenCode may connect to besides `process.connect_ports` (a local model, say).
    pub connect_ports: Vec<u16>,
    /// How long OpenCode may take to answer its health check after the spawn.
    pub start_timeout: Duration,
    /// Deadline of each request to OpenCode.
    pub request_timeout: Duration,
    /// Between SIGTERM and SIGKILL when a session is stopped.
    pub stop_grace: Duration,
    /// Cap on each session's unacknowledged output.
    pub limits: StreamLimits,
    /// Env names a JIT credential may set (the three built-in ones are always allowed).
    pub jit_env_allowlist: EnvAllowlist,
    /// Small events share chunks ([`StreamJournal::with_coalescing`]); off only for tests
    /// that count one chunk per event.
    pub coalesce_output: bool,
}

impl Default for SessionSettings {
    fn default() -> SessionSettings {
        SessionSettings {
            root: "cwd".to_owned(),
            port_range: (4100, 4199),
            connect_ports: Vec::new(),
            start_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(3),
            limits: StreamLimits::default(),
            jit_env_allowlist: EnvAllowlist::default(),
            coalesce_output: true,
        }
    }
}

/// Wall-clock time in Unix milliseconds, injectable so tests can expire credentials.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told (tests, simulations).
#[derive(Debug)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn new(now_ms: u64) -> ManualClock {
        ManualClock(AtomicU64::new(now_ms))
    }

    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(
            u64::try_from(by.as_millis()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Why the session manager could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("[session] port_range {0}-{1} is empty or below 1024 — use a range like 4100-4199")]
    PortRange(u16, u16),
}

/// A session as the manager sees it (for status pages, tests and telemetry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: String,
    pub opencode_id: Option<String>,
    pub folder: String,
    pub port: u16,
    pub process: ProcessId,
    pub protection: String,
    pub stream: Option<String>,
    pub jit_expires_at_ms: Option<u64>,
    /// OpenCode's event stream is subscribed right now (after a restart or an OpenCode hiccup
    /// it is re-subscribed in the background).
    pub events_connected: bool,
}

type PortsHook = Box<dyn Fn(Vec<u16>) + Send + Sync>;

/// The session manager; see the module doc. Dropping it stops its background work (event
/// readers, exit watchers) but never the OpenCode processes: a restarted daemon re-adopts them.
pub struct SessionManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionManager")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

struct Inner {
    settings: SessionSettings,
    roots: Arc<Roots>,
    guard: Arc<ProcessGuard>,
    registry: Registry,
    streams: Arc<StreamJournal>,
    clock: Arc<dyn Clock>,
    live: Mutex<HashMap<String, Live>>,
    /// Held for a whole [`Inner::finish`]: a second finisher of the same session (the exit
    /// watcher racing a stop or an expiry) waits until the first has stored the ended record,
    /// so nobody returns while the session is neither live nor recorded as ended.
    finish_lock: Mutex<()>,
    /// Starts are serialised: port choice and per-folder reuse must see each other.
    start_lock: smol::lock::Mutex<()>,
    ports_hook: Mutex<Option<PortsHook>>,
    /// Session-init payloads the config applier stored; a session start takes its folder's.
    session_inits: Mutex<Option<Arc<SessionInitStore>>>,
}

/// A running session.
struct Live {
    record: SessionRecord,
    client: OpenCodeClient,
    /// Values replaced by `***REDACTED***` in its output.
    secrets: Vec<String>,
    /// Set when the daemon is ending it, so the exit watcher records why.
    stopping: Option<String>,
    /// OpenCode's event stream is subscribed (output is being captured).
    events_up: Arc<std::sync::atomic::AtomicBool>,
    /// Dropped with the session: its background tasks end.
    _stop: async_channel::Sender<()>,
}

impl Live {
    fn process(&self) -> ProcessId {
        ProcessId {
            pid: self.record.pid,
            start_time: self.record.start_time,
        }
    }
}

/// A failed start: the `sr.m` reason and what to log.
struct StartFailure {
    reason: String,
    detail: String,
}

impl StartFailure {
    fn new(reason: &str, detail: impl Into<String>) -> StartFailure {
        StartFailure {
            reason: reason.to_owned(),
            detail: detail.into(),
        }
    }
}

impl SessionManager {
    /// Open the registry and the output journal in `journal`, and re-adopt (or record as
    /// ended) the sessions a previous run left. Must be called within a smol runtime's reach
    /// (background tasks go to smol's global executor).
    pub fn open(
        settings: SessionSettings,
        roots: Arc<Roots>,
        guard: Arc<ProcessGuard>,
        journal: &Journal,
        clock: Arc<dyn Clock>,
    ) -> Result<SessionManager, SessionError> {
        let (lo, hi) = settings.port_range;
        if lo < 1024 || hi < lo {
            return Err(SessionError::PortRange(lo, hi));
        }
        let registry = Registry::open(journal)?;
        let streams = Arc::new(
            StreamJournal::open(journal, settings.limits)?
                .with_coalescing(settings.coalesce_output),
        );
        let inner = Arc::new(Inner {
            settings,
            roots,
            guard,
            registry,
            streams,
            clock,
            live: Mutex::new(HashMap::new()),
            finish_lock: Mutex::new(()),
            start_lock: smol::lock::Mutex::new(()),
            ports_hook: Mutex::new(None),
            session_inits: Mutex::new(None),
        });
        inner.recover();
        Ok(SessionManager { inner })
    }

    /// Deliver session-init payloads from `store` (the one the config applier fills): each new
    /// OpenCode takes its folder's payload (nearest ancestor's otherwise) as
    /// `OPENCODE_CONFIG_CONTENT`; see [`SessionInit::opencode_config`]. One payload, one start.
    pub fn set_session_init_store(&self, store: Arc<SessionInitStore>) {
        *self
            .inner
            .session_inits
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(store);
    }

    /// The output journal (the tunnel link sends from it).
    pub fn streams(&self) -> Arc<StreamJournal> {
        Arc::clone(&self.inner.streams)
    }

    /// Running sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let live = self.inner.lock_live();
        let mut out: Vec<SessionInfo> = live
            .values()
            .map(|l| SessionInfo {
                id: l.record.id.clone(),
                opencode_id: l.record.opencode_id.clone(),
                folder: l.record.folder.clone(),
                port: l.record.port,
                process: l.process(),
                protection: l.record.protection.clone(),
                stream: l.record.stream.clone(),
                jit_expires_at_ms: l.record.jit.as_ref().map(|j| j.expires_at_ms),
                events_connected: l.events_up.load(Ordering::SeqCst),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The stored record of a session (running or ended).
    pub fn record(&self, id: &str) -> Option<SessionRecord> {
        self.inner.registry.get(id)
    }

    /// Ports of running OpenCode servers (for `pl`), ascending.
    pub fn ports(&self) -> Vec<u16> {
        self.inner.ports()
    }

    /// Called with [`SessionManager::ports`] whenever a session starts or ends.
    pub fn on_ports_changed(&self, hook: impl Fn(Vec<u16>) + Send + Sync + 'static) {
        *self
            .inner
            .ports_hook
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Box::new(hook));
    }

    /// The last `n` lines of the replay log (what `sl` sends).
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        self.inner.registry.log_tail(n)
    }

    /// `si` → `sr`.
    pub async fn start(&self, req: StartSession) -> Message {
        let inner = &self.inner;
        let id = req.session_id.clone();
        let reply = |ok: bool, s: &str, reason: Option<&str>, url: Option<String>| {
            Message::SessionResult(SessionResult {
                request_id: req.request_id,
                session_id: s.to_owned(),
                ok,
                reason: reason.map(str::to_owned),
                url,
            })
        };
        let fail = |reason: &str, detail: &str| {
            tracing::warn!(session = %id, reason, "session start refused: {}", redact_text(detail));
            reply(false, &id, Some(reason), None)
        };
        let now = inner.clock.now_ms();
        if inner.registry.is_revoked(Revoked::Session(&id)) {
            return fail(
                "jit_revoked",
                "this session id was revoked by the kill switch (jk) and cannot start again — start a new session id",
            );
        }
        let credential = match &req.jit {
            None => None,
            Some(j) => {
                let credential = wire_credential(j);
                if let Err(e) = credential.check_usable(now, &inner.settings.jit_env_allowlist) {
                    return fail("invalid_jit_credential", &e.to_string());
                }
                if inner
                    .registry
                    .is_revoked(Revoked::Ref(&credential.effective_ref()))
                {
                    return fail(
                        "jit_revoked",
                        "this credential was revoked by the kill switch (jk) — mint a new one",
                    );
                }
                Some(credential)
            }
        };
        let folder_text = req.folder.as_deref().unwrap_or(".");
        let Ok(rel) = RelPath::parse(folder_text) else {
            return fail(
                "invalid_folder_path",
                "the folder is not a valid relative path",
            );
        };
        let folder = folder_key(&rel);

        let _serial = inner.start_lock.lock().await;
        let dir = match inner.open_folder(&rel).await {
            Ok(fd) => fd,
            Err(e) => return fail("invalid_folder_path", &e),
        };
        match inner.reuse_decision(&id, &folder, credential.as_ref()) {
            Reuse::Existing(record) => {
                tracing::info!(session = %record.id, folder = %folder, "session reused");
                let url = editor_url(&record).filter(|u| u.len() <= MAX_SR_URL);
                return reply(true, &record.id, Some("session_reused"), url);
            }
            Reuse::IdInUse(other) => {
                return fail(
                    "session_id_in_use",
                    &format!(
                        "session {id} already runs for folder {other} — stop it first or use another id"
                    ),
                );
            }
            Reuse::Rotate(old) => {
                tracing::info!(session = %old, "a different JIT credential for the folder: restarting its OpenCode");
                inner.end_session(&old, "jit_credential_rotated").await;
            }
            Reuse::None => {}
        }
        let store = inner
            .session_inits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let init = store
            .as_ref()
            .and_then(|s| s.take_for_session(&rel, inner.clock.now_ms()));
        match Arc::clone(inner)
            .launch(&id, folder, dir, credential, init.as_ref())
            .await
        {
            Ok(record) => {
                if let Some(init) = &init {
                    tracing::info!(
                        session = %id,
                        template_id = %init.template_id,
                        template_version = %init.template_version,
                        digest = %init.digest,
                        from_folder = %init.folder,
                        "session-init payload applied"
                    );
                }
                let url = editor_url(&record).filter(|u| u.len() <= MAX_SR_URL);
                reply(true, &id, None, url)
            }
            Err(f) => {
                // Not delivered: keep it for the next start.
                if let (Some(store), Some(init)) = (store, init) {
                    if let Err(e) = store.put(init) {
                        tracing::warn!(session = %id, "cannot keep the session-init payload: {e}");
                    }
                }
                fail(&f.reason, &f.detail)
            }
        }
    }

    /// `st` → `sr`.
    pub async fn stop(&self, req: StopSession) -> Message {
        let inner = &self.inner;
        let reply = |ok: bool, reason: Option<&str>| {
            Message::SessionResult(SessionResult {
                request_id: req.request_id,
                session_id: req.session_id.clone(),
                ok,
                reason: reason.map(str::to_owned),
                url: None,
            })
        };
        match inner.resolve(&req.session_id) {
            Some(id) => {
                inner.end_session(&id, "stopped").await;
                reply(true, None)
            }
            None => match inner.registry.get(&req.session_id) {
                Some(r) if r.is_ended() => reply(true, Some("session_not_running")),
                _ => reply(false, Some("session_not_found")),
            },
        }
    }

    /// `sq` → `sv`.
    pub async fn status(&self, req: SessionStatusQuery) -> Message {
        let inner = &self.inner;
        let mut sv = SessionStatus {
            request_id: req.request_id,
            running: false,
            session_id: None,
            port: None,
            pid: None,
            url: None,
            reason: None,
            protection: None,
        };
        let Ok(rel) = RelPath::parse(&req.folder) else {
            sv.reason = Some("invalid_folder_path".to_owned());
            return Message::SessionStatus(sv);
        };
        let folder = folder_key(&rel);
        let found = {
            let live = inner.lock_live();
            live.values()
                .find(|l| l.record.folder == folder)
                .map(|l| (l.record.clone(), l.process()))
        };
        match found {
            Some((record, process)) if process.is_alive() => {
                sv.running = true;
                sv.url = editor_url(&record).filter(|u| u.len() <= MAX_SV_URL);
                sv.session_id = Some(record.id);
                sv.port = Some(record.port);
                sv.pid = u32::try_from(record.pid).ok();
                sv.protection = Some(record.protection).filter(|p| !p.is_empty());
            }
            Some((record, _)) => {
                inner.finish(&record.id, "exited", None);
                sv.reason = Some("not_running".to_owned());
            }
            None => {
                sv.reason = Some(match inner.open_folder(&rel).await {
                    Ok(_) => "not_running".to_owned(),
                    Err(_) => "invalid_folder_path".to_owned(),
                });
            }
        }
        Message::SessionStatus(sv)
    }

    /// `sp`: prompt a session; its output goes to stream `x`. `None` when it worked (or was a
    /// re-send of a prompt already sent); an `e INTERNAL` saying why otherwise.
    pub async fn prompt(&self, req: Prompt) -> Option<Message> {
        let inner = &self.inner;
        let x = req.stream_id.clone();
        if inner.streams.stream(&x).is_some() {
            tracing::info!(stream = %x, "sp for a stream that already exists: a re-send, not prompted again");
            return None;
        }
        let error = |why: String| {
            tracing::warn!(stream = %x, session = %req.session_id, "prompt failed: {why}");
            // `e.m` holds at most 256 characters.
            let full = redact_text(&why);
            let m = if full.chars().count() > 255 {
                full.chars().take(254).collect::<String>() + "…"
            } else {
                full
            };
            Some(Message::error(
                ErrorCode::Internal,
                Some(req.request_id),
                Some(&m),
            ))
        };
        let target = inner.resolve(&req.session_id).and_then(|id| {
            let live = inner.lock_live();
            let l = live.get(&id)?;
            Some((id, l.client.clone(), l.record.opencode_id.clone()?))
        });
        let Some((id, client, opencode_id)) = target else {
            inner.fail_stream(&x, &req.session_id, "session_not_running");
            return error(format!(
                "prompt_failed: session {} is not running on this device — start it (si) first",
                req.session_id
            ));
        };
        if let Err(e) = inner.streams.open_stream(&x, &id) {
            return error(format!(
                "prompt_failed: cannot record the output stream: {e}"
            ));
        }
        {
            let mut live = inner.lock_live();
            if let Some(l) = live.get_mut(&id) {
                if let Some(previous) = l.record.stream.replace(x.clone()) {
                    let marker = record_line(
                        "codemantle.stream.superseded",
                        json!({"sessionID": id, "by": x}),
                    );
                    let _ = inner.streams.append_event(&previous, &marker, true);
                }
                inner.save(&l.record);
            }
        }
        let path = format!("/session/{opencode_id}/prompt_async");
        let body = json!({"parts": [{"type": "text", "text": req.prompt}]});
        let outcome = match client.post_json(&path, &body).await {
            Ok(r) if r.is_success() => Ok(()),
            Ok(r) => Err(http_failure(&r)),
            Err(e) => Err(if e.is_down() {
                format!("opencode_down: {e}")
            } else {
                format!("opencode_timeout: {e}")
            }),
        };
        match outcome {
            Ok(()) => {
                tracing::info!(session = %id, stream = %x, "prompt sent");
                None
            }
            Err(why) => {
                {
                    let mut live = inner.lock_live();
                    if let Some(l) = live.get_mut(&id) {
                        if l.record.stream.as_deref() == Some(x.as_str()) {
                            l.record.stream = None;
                            inner.save(&l.record);
                        }
                    }
                }
                inner.fail_stream(&x, &id, &why);
                error(format!("prompt_failed: {why}"))
            }
        }
    }

    /// `sl`: the last `l` replay-log lines as `sc` chunks on stream `x`, 0.1.50's way (at most
    /// 8192 bytes each, `q` from 0, `e:1` on the last; one empty chunk for an empty log). They
    /// are one-off frames for the requesting link, not journaled: the control plane asks again
    /// if the link drops.
    pub fn replay(&self, req: &ReplayLog) -> Vec<Message> {
        let text = self
            .inner
            .registry
            .log_tail(usize::from(req.lines))
            .join("\n");
        let pieces = split_utf8(&text, stream::MAX_CHUNK_BYTES);
        let n = pieces.len();
        pieces
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                Message::StreamChunk(StreamChunk {
                    stream_id: req.stream_id.clone(),
                    seq: u32::try_from(i).unwrap_or(u32::MAX),
                    last: i + 1 == n,
                    data: d.to_owned(),
                })
            })
            .collect()
    }

    /// `sa`.
    pub fn ack(&self, ack: &StreamAck) {
        if let Err(e) = self.inner.streams.ack(&ack.stream_id, ack.seq) {
            tracing::error!(stream = %ack.stream_id, "recording an output ack failed: {e}");
        }
    }

    /// `jk` → `jv`.
    pub async fn kill_switch(&self, req: JitKill) -> Message {
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        let reply = |ok: bool, affected: u32, message: Option<&str>| {
            Message::JitKillResult(JitKillResult {
                request_id: req.request_id,
                ok,
                affected,
                message: message.map(str::to_owned),
            })
        };
        let session = req.session_id.as_deref().and_then(|s| inner.resolve(s));
        let targets: Vec<(String, Option<String>)> = {
            let live = inner.lock_live();
            live.values()
                .filter(|l| {
                    let by_session = session.as_deref() == Some(l.record.id.as_str());
                    let by_ref = req.credential_ref.is_some()
                        && l.record.jit.as_ref().map(|j| &j.credential_ref)
                            == req.credential_ref.as_ref();
                    let all = req.session_id.is_none()
                        && req.credential_ref.is_none()
                        && l.record.jit.is_some();
                    by_session || by_ref || all
                })
                .map(|l| {
                    (
                        l.record.id.clone(),
                        l.record.jit.as_ref().map(|j| j.credential_ref.clone()),
                    )
                })
                .collect()
        };
        let revocation = Revocation {
            at_ms: now,
            reason: req.reason.clone().filter(|r| !r.is_empty()),
        };
        let mut revoked: Vec<Revoked<'_>> = Vec::new();
        if let Some(s) = &req.session_id {
            revoked.push(Revoked::Session(s));
        }
        if let Some(s) = &session {
            revoked.push(Revoked::Session(s));
        }
        if let Some(r) = &req.credential_ref {
            revoked.push(Revoked::Ref(r));
        }
        if req.session_id.is_none() && req.credential_ref.is_none() {
            revoked.extend(
                targets
                    .iter()
                    .filter_map(|(_, r)| r.as_deref().map(Revoked::Ref)),
            );
        }
        for what in revoked {
            if let Err(e) = inner.registry.revoke(what, &revocation) {
                tracing::error!("the kill switch could not record the revocation: {e}");
                return reply(false, 0, Some("kill_switch_failed"));
            }
        }
        if req.close_tunnel {
            tracing::warn!(
                "jk asked to close the tunnel afterwards (x:1); this daemon does not do that yet"
            );
        }
        let mut affected = 0u32;
        for (id, credential_ref) in targets {
            inner.end_session(&id, "jit_revoked").await;
            if credential_ref.is_some() {
                affected += 1;
            }
        }
        tracing::warn!(affected, "JIT kill switch: revoked");
        reply(true, affected, None)
    }

    /// `jr` → `ju`: renew a running session's JIT credential — its expiry becomes `ttl_secs`
    /// (15..=3600) from now, stored in the registry first so a restarted daemon keeps it.
    ///
    /// Only the daemon-side expiry moves: OpenCode's environment (the token and
    /// `OPENCODE_JIT_TOKEN_EXPIRES_AT`) keeps the values it started with, because a running
    /// process's environment cannot be changed from outside. A revoked credential or session
    /// (kill switch) cannot be renewed, and neither can a session that has ended or never had a
    /// credential.
    pub async fn renew_credential(&self, req: JitRenew) -> Message {
        let inner = &self.inner;
        let reply = |expires_at_ms: Option<u64>, message: Option<&str>| {
            Message::JitRenewResult(JitRenewResult {
                request_id: req.request_id,
                ok: message.is_none(),
                expires_at_ms,
                message: message.map(str::to_owned),
            })
        };
        let ttl_ms = u64::from(req.ttl_secs).saturating_mul(1000);
        if !(jit::MIN_TTL_MS..=jit::MAX_TTL_MS).contains(&ttl_ms) {
            return reply(None, Some("invalid_ttl"));
        }
        let Some(id) = inner.resolve(&req.session_id) else {
            // Not running: say whether the kill switch ended it, it ended otherwise, or it
            // never was.
            let why = match inner.registry.get(&req.session_id) {
                None => "session_not_found",
                Some(r) => {
                    let ref_revoked = r.jit.as_ref().is_some_and(|j| {
                        inner.registry.is_revoked(Revoked::Ref(&j.credential_ref))
                    });
                    if ref_revoked || inner.registry.is_revoked(Revoked::Session(&r.id)) {
                        "jit_revoked"
                    } else {
                        "session_ended"
                    }
                }
            };
            return reply(None, Some(why));
        };
        let now = inner.clock.now_ms();
        let record = {
            let mut live = inner.lock_live();
            let Some(l) = live.get_mut(&id) else {
                return reply(None, Some("session_not_found"));
            };
            let Some(binding) = l.record.jit.as_ref() else {
                return reply(None, Some("no_jit_credential"));
            };
            if inner
                .registry
                .is_revoked(Revoked::Ref(&binding.credential_ref))
                || inner.registry.is_revoked(Revoked::Session(&id))
            {
                return reply(None, Some("jit_revoked"));
            }
            if now >= binding.expires_at_ms {
                // Expired but not swept yet: it ends at the next sweep, not later.
                return reply(None, Some("jit_expired"));
            }
            let mut record = l.record.clone();
            if let Some(j) = record.jit.as_mut() {
                j.expires_at_ms = now + ttl_ms;
            }
            record
        };
        // Durable before it counts: a failed write leaves the old expiry in force.
        if let Err(e) = inner.registry.save(&record) {
            tracing::error!(session = %id, "cannot store the renewed JIT expiry: {e}");
            return reply(None, Some("renew_failed"));
        }
        let expires_at_ms = record.jit.as_ref().map(|j| j.expires_at_ms);
        if let Some(l) = inner.lock_live().get_mut(&id) {
            l.record.jit = record.jit.clone();
        }
        tracing::info!(session = %id, ttl_secs = req.ttl_secs, ?expires_at_ms, "JIT credential renewed");
        reply(expires_at_ms, None)
    }

    /// End sessions whose JIT credential expired or was revoked. [`SessionManager::run_sweeper`]
    /// calls it every second; tests call it after moving their clock.
    pub async fn sweep(&self) {
        let inner = &self.inner;
        let now = inner.clock.now_ms();
        let due: Vec<(String, &'static str)> = {
            let live = inner.lock_live();
            live.values()
                .filter_map(|l| {
                    let id = l.record.id.clone();
                    if let Some(j) = &l.record.jit {
                        if now >= j.expires_at_ms {
                            return Some((id, "jit_expired"));
                        }
                        if inner.registry.is_revoked(Revoked::Ref(&j.credential_ref)) {
                            return Some((id, "jit_revoked"));
                        }
                    }
                    inner
                        .registry
                        .is_revoked(Revoked::Session(&id))
                        .then_some((id, "jit_revoked"))
                })
                .collect()
        };
        for (id, reason) in due {
            tracing::warn!(session = %id, reason, "ending session");
            inner.end_session(&id, reason).await;
        }
    }

    /// Run [`SessionManager::sweep`] every second, forever.
    pub async fn run_sweeper(&self) {
        loop {
            smol::Timer::after(Duration::from_secs(1)).await;
            self.sweep().await;
        }
    }
}

/// What a running session's background tasks need.
struct SessionTasks {
    client: OpenCodeClient,
    process: ProcessId,
    /// Already subscribed (a fresh start subscribes before replying `sr`).
    events: Option<EventStream>,
    events_up: Arc<std::sync::atomic::AtomicBool>,
    /// Our own child (reaped, exit status known); `None` for a re-adopted process.
    child: Option<GuardedChild>,
    stop: async_channel::Receiver<()>,
}

/// What `si` does about an existing session.
enum Reuse {
    Existing(Box<SessionRecord>),
    IdInUse(String),
    Rotate(String),
    None,
}

impl Inner {
    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, record: &SessionRecord) {
        if let Err(e) = self.registry.save(record) {
            tracing::error!(session = %record.id, "cannot store the session record: {e}");
        }
    }

    fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.lock_live().values().map(|l| l.record.port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    fn ports_changed(&self) {
        let ports = self.ports();
        if let Some(hook) = &*self.ports_hook.lock().unwrap_or_else(|p| p.into_inner()) {
            hook(ports);
        }
    }

    /// Our id for `id` (ours or OpenCode's), if the session is running.
    fn resolve(&self, id: &str) -> Option<String> {
        let live = self.lock_live();
        if live.contains_key(id) {
            return Some(id.to_owned());
        }
        live.values()
            .find(|l| l.record.opencode_id.as_deref() == Some(id))
            .map(|l| l.record.id.clone())
    }

    async fn open_folder(&self, rel: &RelPath) -> Result<OwnedFd, String> {
        let root = self
            .roots
            .get(&self.settings.root)
            .map_err(|e| e.to_string())?;
        root.open_dir(rel).map_err(|e| e.to_string())
    }

    fn reuse_decision(
        &self,
        id: &str,
        folder: &str,
        credential: Option<&jit::JitCredential>,
    ) -> Reuse {
        let live = self.lock_live();
        if let Some(l) = live.get(id) {
            if l.record.folder != folder {
                return Reuse::IdInUse(l.record.folder.clone());
            }
        }
        let Some(l) = live.values().find(|l| l.record.folder == folder) else {
            return Reuse::None;
        };
        if !l.process().is_alive() {
            return Reuse::None;
        }
        match (credential, &l.record.jit) {
            (Some(c), Some(b)) if c.fingerprint() != b.fingerprint => {
                Reuse::Rotate(l.record.id.clone())
            }
            (Some(_), None) => Reuse::Rotate(l.record.id.clone()),
            _ => Reuse::Existing(Box::new(l.record.clone())),
        }
    }

    /// Spawn OpenCode for `folder` and bring it up; see the module doc.
    async fn launch(
        self: Arc<Self>,
        id: &str,
        folder: String,
        dir: OwnedFd,
        credential: Option<jit::JitCredential>,
        init: Option<&SessionInit>,
    ) -> Result<SessionRecord, StartFailure> {
        let record_folder = folder.clone();
        let directory = std::fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let port = self.pick_port().ok_or_else(|| {
            StartFailure::new(
                "opencode_port_unavailable",
                format!(
                    "no free port in [session] port_range {}-{} — widen the range or stop sessions",
                    self.settings.port_range.0, self.settings.port_range.1
                ),
            )
        })?;
        let password = random_secret().map_err(|e| {
            StartFailure::new(
                "opencode_spawn_failed",
                format!("no randomness for the password: {e}"),
            )
        })?;
        let mut env: Vec<(String, OsString)> = Vec::new();
        let mut secrets = vec![password.clone()];
        if let Some(c) = &credential {
            env.extend(credential_env(c));
            secrets.push(c.token.clone());
            secrets.extend(c.env_pairs.iter().map(|(_, v)| v.clone()));
        }
        if let Some(cfg) = init.and_then(SessionInit::opencode_config) {
            // After the credential's variables: the pushed session-init wins over a JIT env
            // pair of the same name.
            env.retain(|(n, _)| n != OPENCODE_CONFIG_CONTENT_ENV);
            env.push((
                OPENCODE_CONFIG_CONTENT_ENV.to_owned(),
                cfg.to_string().into(),
            ));
        }
        // Last, so nothing a credential sets can replace it.
        env.push((PASSWORD_ENV.to_owned(), password.clone().into()));
        let args: Vec<OsString> = ["serve", "--hostname", "127.0.0.1", "--port"]
            .into_iter()
            .map(OsString::from)
            .chain([OsString::from(port.to_string())])
            .collect();
        let net = NetPolicy {
            bind_ports: vec![port],
            connect_ports: self.settings.connect_ports.clone(),
        };
        let guard = Arc::clone(&self.guard);
        let key = private_key(&record_folder);
        let spawned = smol::unblock(move || {
            let private = guard.private_dirs(&key)?;
            guard.spawn(SpawnSpec {
                program: OPENCODE_PROGRAM,
                args,
                project_dir: dir.as_fd(),
                cwd: None,
                private: &private,
                extra_env: env,
                net,
            })
        })
        .await;
        let mut child =
            spawned.map_err(|e| StartFailure::new("opencode_spawn_failed", e.to_string()))?;
        let process = child.id();
        let now = self.clock.now_ms();
        let mut record = SessionRecord {
            id: id.to_owned(),
            opencode_id: None,
            folder,
            directory,
            port,
            pid: child.pid,
            start_time: child.start_time,
            password: password.clone(),
            protection: child.protection.short(),
            jit: credential.as_ref().map(|c| JitBinding {
                credential_ref: c.effective_ref(),
                expires_at_ms: c.expires_at_ms,
                fingerprint: c.fingerprint(),
            }),
            stream: None,
            started_at_ms: now,
            state: SessionState::Starting,
        };
        self.save(&record);
        if let Err(e) = self.registry.flush() {
            tracing::warn!("cannot flush the session registry: {e}");
        }
        tracing::info!(
            session = %id,
            port,
            pid = child.pid,
            protection = %child.protection,
            "opencode started"
        );
        drain_output(&mut child, id, port, &secrets);

        let client = OpenCodeClient::new(port, &password, self.settings.request_timeout);
        let brought_up = async {
            self.wait_ready(&client, process).await?;
            // Subscribe before the session exists, so no event of a first prompt is missed.
            let events = client
                .events()
                .await
                .map_err(|e| StartFailure::new("opencode_down", e.to_string()))?;
            if !events.is_open() {
                return Err(StartFailure::new(
                    &format!("http_{}", events.status),
                    "GET /event did not answer with an event stream",
                ));
            }
            let opencode_id = create_opencode_session(&client).await?;
            Ok((events, opencode_id))
        }
        .await;
        let (events, opencode_id) = match brought_up {
            Ok(up) => up,
            Err(f) => {
                kill_process(process, self.settings.stop_grace).await;
                record.state = SessionState::Ended {
                    reason: f.reason.clone(),
                    at_ms: self.clock.now_ms(),
                    exit: None,
                };
                self.save(&record);
                drop(child);
                return Err(f);
            }
        };
        record.opencode_id = Some(opencode_id);
        record.state = SessionState::Running;
        self.save(&record);
        if let Err(e) = self.registry.flush() {
            tracing::warn!("cannot flush the session registry: {e}");
        }
        self.registry.log(
            self.clock.now_ms(),
            "session",
            &format!("start session={id}"),
            Some(id),
        );
        let (stop_tx, stop_rx) = async_channel::bounded::<()>(1);
        let events_up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        self.lock_live().insert(
            id.to_owned(),
            Live {
                record: record.clone(),
                client: client.clone(),
                secrets,
                stopping: None,
                events_up: Arc::clone(&events_up),
                _stop: stop_tx,
            },
        );
        let tasks = SessionTasks {
            client,
            process,
            events: Some(events),
            events_up,
            child: Some(child),
            stop: stop_rx,
        };
        self.spawn_tasks(id, tasks);
        self.ports_changed();
        Ok(record)
    }

    /// Poll `GET /global/health` until OpenCode answers 200, it exits, or the start timeout.
    async fn wait_ready(
        &self,
        client: &OpenCodeClient,
        process: ProcessId,
    ) -> Result<(), StartFailure> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            if !process.is_alive() {
                return Err(StartFailure::new(
                    "opencode_spawn_failed",
                    "opencode exited during startup — run it by hand as the run_as user in the folder to see why",
                ));
            }
            match client.get("/global/health").await {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) if r.status == 401 => {
                    return Err(StartFailure::new(
                        "http_401",
                        "opencode refused the session's password — is the allowlisted program really opencode?",
                    ));
                }
                Ok(r) => tracing::debug!(status = r.status, "opencode not healthy yet"),
                Err(e) => tracing::trace!("opencode not up yet: {e}"),
            }
            if started.elapsed() >= self.settings.start_timeout {
                return Err(StartFailure::new(
                    "opencode_start_timeout",
                    format!(
                        "opencode did not answer /global/health within {} s — raise [session] start_timeout_s on a slow host",
                        self.settings.start_timeout.as_secs()
                    ),
                ));
            }
            smol::Timer::after(delay).await;
            delay = (delay * 2).min(Duration::from_secs(1));
        }
    }

    fn pick_port(&self) -> Option<u16> {
        let (lo, hi) = self.settings.port_range;
        let used: HashSet<u16> = self.lock_live().values().map(|l| l.record.port).collect();
        let span = u32::from(hi - lo) + 1;
        let mut seed = [0u8; 4];
        let start = match getrandom::getrandom(&mut seed) {
            Ok(()) => u32::from_le_bytes(seed) % span,
            Err(_) => 0,
        };
        (0..span)
            .filter_map(|i| u16::try_from(u32::from(lo) + (start + i) % span).ok())
            .find(|&p| !used.contains(&p) && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
    }

    /// The background work of a running session: its event reader and its exit watcher. Both
    /// end when the session's `stop` sender is dropped (or the manager is gone).
    fn spawn_tasks(self: &Arc<Self>, id: &str, tasks: SessionTasks) {
        let SessionTasks {
            client,
            process,
            events,
            events_up,
            child,
            stop,
        } = tasks;
        let weak = Arc::downgrade(self);
        let stopped = {
            let stop = stop.clone();
            async move {
                let _ = stop.recv().await;
            }
        };
        let pump = pump_events(
            weak.clone(),
            id.to_owned(),
            client,
            process,
            events,
            events_up,
        );
        smol::spawn(pump.or(stopped)).detach();
        let sid = id.to_owned();
        let watch = async move {
            let exit = match child {
                Some(child) => match child.wait_exit().await {
                    Ok(exit) => Some(format!("{exit:?}")),
                    Err(e) => Some(format!("unknown ({e})")),
                },
                None => {
                    process.wait_exit(Duration::from_secs(1)).await;
                    None
                }
            };
            if let Some(inner) = weak.upgrade() {
                inner.on_exit(&sid, process, exit);
            }
        };
        smol::spawn(watch.or(async move {
            let _ = stop.recv().await;
        }))
        .detach();
    }

    /// The OpenCode process of session `id` exited on its own (or was stopped).
    fn on_exit(&self, id: &str, process: ProcessId, exit: Option<String>) {
        let reason = {
            let live = self.lock_live();
            match live.get(id) {
                Some(l) if l.process() == process => {
                    l.stopping.clone().unwrap_or_else(|| "exited".to_owned())
                }
                _ => return,
            }
        };
        tracing::info!(session = %id, exit = exit.as_deref().unwrap_or("unknown"), reason = %reason, "opencode exited");
        self.finish(id, &reason, exit);
    }

    /// Stop session `id`'s process group and record it as ended with `reason`.
    async fn end_session(&self, id: &str, reason: &str) {
        let process = {
            let mut live = self.lock_live();
            let Some(l) = live.get_mut(id) else { return };
            l.stopping = Some(reason.to_owned());
            l.process()
        };
        kill_process(process, self.settings.stop_grace).await;
        self.finish(id, reason, None);
    }

    /// Forget running session `id`: close its stream, store it as ended, tell the port hook.
    fn finish(&self, id: &str, reason: &str, exit: Option<String>) {
        let _finishing = self.finish_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut live) = self.lock_live().remove(id) else {
            return;
        };
        let now = self.clock.now_ms();
        if let Some(x) = live.record.stream.take() {
            let line = record_line(
                "codemantle.session.ended",
                json!({"sessionID": id, "reason": reason, "exit": exit}),
            );
            if let Err(e) = self.streams.append_event(&x, &line, true) {
                tracing::error!(stream = %x, "cannot close the output stream: {e}");
            }
        }
        live.record.state = SessionState::Ended {
            reason: reason.to_owned(),
            at_ms: now,
            exit,
        };
        self.save(&live.record);
        if let Err(e) = self.registry.flush() {
            tracing::warn!("cannot flush the session registry: {e}");
        }
        self.registry.log(
            now,
            "session",
            &format!("terminate session={id} reason={reason}"),
            Some(id),
        );
        tracing::info!(session = %id, reason, "session ended");
        drop(live);
        self.ports_changed();
    }

    /// Open `x` (if new) and end it at once with a `codemantle.prompt.failed` record.
    fn fail_stream(&self, x: &str, session: &str, why: &str) {
        if let Ok(true) = self.streams.open_stream(x, session) {
            let line = record_line(
                "codemantle.prompt.failed",
                json!({"sessionID": session, "reason": redact_text(why)}),
            );
            let _ = self.streams.append_event(x, &line, true);
        }
    }

    /// One item from session `id`'s event stream.
    fn on_event(&self, id: &str, item: SseItem) {
        let mut live = self.lock_live();
        let Some(l) = live.get_mut(id) else { return };
        let now = self.clock.now_ms();
        let (text, end) = match item {
            SseItem::Event(text) => {
                let parsed: Option<Value> = serde_json::from_str(&text).ok();
                let kind = parsed
                    .as_ref()
                    .and_then(|v| v.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if matches!(kind, "server.heartbeat" | "server.connected") {
                    return;
                }
                let end = kind == "session.idle"
                    && parsed
                        .as_ref()
                        .and_then(|v| v.pointer("/properties/sessionID"))
                        .and_then(Value::as_str)
                        == l.record.opencode_id.as_deref();
                let text = scrub(&text, &l.secrets);
                // The device log (1600 lines, for `sl` and diagnostics) gets the session's
                // events but not its token stream: the deltas are in the session's own durable
                // output, and a reply's thousands of them would evict everything else from the
                // log within a second (and double what the daemon writes per event).
                if kind != "message.part.delta" {
                    self.registry.log(now, "opencode", &text, Some(id));
                }
                (format!("{text}\n"), end)
            }
            SseItem::Oversized(bytes) => (
                record_line(
                    "codemantle.event.oversized",
                    json!({"bytes": bytes, "limit": http::MAX_EVENT_BYTES}),
                ),
                false,
            ),
        };
        let Some(x) = l.record.stream.clone() else {
            return;
        };
        if let Err(e) = self.streams.append_event(&x, &text, end) {
            tracing::error!(stream = %x, "cannot store session output: {e}");
        }
        if end {
            l.record.stream = None;
            self.save(&l.record);
        }
    }

    /// Session `id`'s events may have a hole (reconnect, daemon restart): say so in its stream.
    fn on_gap(&self, id: &str, why: &str) {
        let live = self.lock_live();
        let Some(x) = live.get(id).and_then(|l| l.record.stream.clone()) else {
            return;
        };
        let line = record_line(
            "codemantle.events.gap",
            json!({"sessionID": id, "reason": why}),
        );
        let _ = self.streams.append_event(&x, &line, false);
    }

    /// At open: re-adopt live sessions, record dead ones as ended.
    fn recover(self: &Arc<Self>) {
        let now = self.clock.now_ms();
        for mut record in self.registry.load() {
            let process = ProcessId {
                pid: record.pid,
                start_time: record.start_time,
            };
            match record.state {
                SessionState::Ended { .. } => continue,
                SessionState::Starting => {
                    // Nobody got its `sr`: stop what is left of it.
                    if process.is_alive() {
                        let _ = process.signal_group(Signal::SIGKILL);
                    }
                    record.state = SessionState::Ended {
                        reason: "start_interrupted".to_owned(),
                        at_ms: now,
                        exit: None,
                    };
                    self.save(&record);
                    continue;
                }
                SessionState::Running => {}
            }
            if !process.is_alive() {
                tracing::warn!(session = %record.id, pid = record.pid, "session's opencode is gone (ended while the daemon was down)");
                let (stop_tx, _) = async_channel::bounded(1);
                let events_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let id = record.id.clone();
                self.lock_live().insert(
                    id.clone(),
                    Live {
                        client: OpenCodeClient::new(
                            record.port,
                            &record.password,
                            self.settings.request_timeout,
                        ),
                        secrets: vec![record.password.clone()],
                        record,
                        stopping: None,
                        events_up: Arc::clone(&events_up),
                        _stop: stop_tx,
                    },
                );
                self.finish(&id, "gone_while_daemon_down", None);
                continue;
            }
            tracing::info!(session = %record.id, pid = record.pid, port = record.port, "re-adopted a running session");
            let client =
                OpenCodeClient::new(record.port, &record.password, self.settings.request_timeout);
            let id = record.id.clone();
            let has_stream = record.stream.is_some();
            let (stop_tx, stop_rx) = async_channel::bounded(1);
            let events_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
            self.lock_live().insert(
                id.clone(),
                Live {
                    client: client.clone(),
                    secrets: vec![record.password.clone()],
                    record,
                    stopping: None,
                    events_up: Arc::clone(&events_up),
                    _stop: stop_tx,
                },
            );
            if has_stream {
                self.on_gap(
                    &id,
                    "the daemon restarted; events while it was down are missing",
                );
            }
            let tasks = SessionTasks {
                client,
                process,
                events: None,
                events_up,
                child: None,
                stop: stop_rx,
            };
            self.spawn_tasks(&id, tasks);
        }
        if let Err(e) = self.registry.flush() {
            tracing::warn!("cannot flush the session registry: {e}");
        }
        self.ports_changed();
    }
}

/// Read session events until the session ends, reconnecting `/event` when it drops.
async fn pump_events(
    weak: Weak<Inner>,
    id: String,
    client: OpenCodeClient,
    process: ProcessId,
    first: Option<EventStream>,
    events_up: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut next = first;
    let mut connected_before = next.is_some();
    let mut delay = Duration::from_millis(200);
    // Set when a backpressure wait timed out: read on (the cap decides) until output drains.
    let mut gave_up = false;
    loop {
        let mut events = match next.take() {
            Some(events) => events,
            None => match client.events().await {
                Ok(events) if events.is_open() => {
                    if connected_before {
                        if let Some(inner) = weak.upgrade() {
                            inner.on_gap(&id, "the event stream from opencode was reconnected");
                        }
                    }
                    events
                }
                Ok(events) => {
                    tracing::warn!(session = %id, status = events.status, "opencode refused the event stream");
                    if !process.is_alive() {
                        return;
                    }
                    smol::Timer::after(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(e) => {
                    tracing::debug!(session = %id, "cannot open opencode's event stream: {e}");
                    if !process.is_alive() {
                        return;
                    }
                    smol::Timer::after(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        connected_before = true;
        events_up.store(true, Ordering::SeqCst);
        delay = Duration::from_millis(200);
        loop {
            match events.next().await {
                Ok(Some(item)) => {
                    gave_up = !wait_for_room(&weak, &id, gave_up).await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.on_event(&id, item);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(session = %id, "opencode's event stream broke: {e}");
                    break;
                }
            }
        }
        events_up.store(false, Ordering::SeqCst);
        if !process.is_alive() {
            return;
        }
        smol::Timer::after(delay).await;
    }
}

/// Longest pause of a session's event reader while its unacknowledged output is high.
const ROOM_WAIT: Duration = Duration::from_secs(2);

/// Backpressure before the cap: while session `id` has more than half its cap of output
/// unacknowledged, wait (up to [`ROOM_WAIT`]) for acks instead of reading on. OpenCode's event
/// stream then waits in the socket (TCP flow control), so a burst faster than the link is
/// slowed down rather than cut. Returns false when the wait timed out (the control plane is
/// not acknowledging — offline, say); with `gave_up` (the previous wait timed out and output
/// has not drained below half since) it does not wait again, so the reader keeps up with
/// OpenCode and the cap drops output with its explicit markers instead of stalling OpenCode.
async fn wait_for_room(weak: &Weak<Inner>, id: &str, gave_up: bool) -> bool {
    let deadline = Instant::now() + ROOM_WAIT;
    loop {
        let high = {
            let Some(inner) = weak.upgrade() else {
                return true;
            };
            let limits = inner.streams.limits();
            let usage = inner.streams.usage(id);
            usage.bytes > limits.max_unacked_bytes / 2
                || usage.chunks > limits.max_unacked_chunks / 2
        };
        if !high {
            return true;
        }
        if gave_up || Instant::now() >= deadline {
            return false;
        }
        smol::Timer::after(Duration::from_millis(2)).await;
    }
}

/// SIGTERM the process group, SIGKILL whatever is left after `grace`, and wait (briefly) until
/// nothing of the group runs.
async fn kill_process(process: ProcessId, grace: Duration) {
    match process.signal_group(Signal::SIGTERM) {
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(pid = process.pid, "stopping opencode: {e}");
            return;
        }
    }
    let deadline = Instant::now() + grace;
    while process.is_alive() && Instant::now() < deadline {
        smol::Timer::after(Duration::from_millis(25)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = procfs::group_members(process.pid);
        if left.is_empty() {
            return;
        }
        if let Err(e) = process.signal_group(Signal::SIGKILL) {
            tracing::warn!(pid = process.pid, "killing opencode's process group: {e}");
            return;
        }
        if Instant::now() >= deadline {
            tracing::error!(pid = process.pid, left = ?left, "processes of a stopped session are still running after SIGKILL");
            return;
        }
        smol::Timer::after(Duration::from_millis(25)).await;
    }
}

/// `POST /session` → OpenCode's session id.
async fn create_opencode_session(client: &OpenCodeClient) -> Result<String, StartFailure> {
    let r = client
        .post_json("/session", &json!({}))
        .await
        .map_err(|e| {
            let reason = if e.is_down() {
                "opencode_down"
            } else {
                "opencode_timeout"
            };
            StartFailure::new(reason, e.to_string())
        })?;
    if !r.is_success() {
        return Err(StartFailure::new(&http_failure(&r), "POST /session failed"));
    }
    r.json()
        .as_ref()
        .and_then(|v| v.get("id"))
        .and_then(Value::as_str)
        .filter(|id| valid_opencode_id(id))
        .map(str::to_owned)
        .ok_or_else(|| {
            StartFailure::new(
                "opencode_invalid_session",
                "POST /session answered without a valid `id` (ses…)",
            )
        })
}

/// `^ses[A-Za-z0-9_-]{1,61}$` (fits the 64-character session-id limit of the wire).
fn valid_opencode_id(id: &str) -> bool {
    id.len() <= 64
        && id.len() > 3
        && id.starts_with("ses")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// 0.1.50's failure text: `http_<status>[:<name>]`, at most 96 characters.
fn http_failure(r: &http::Response) -> String {
    let mut s = format!("http_{}", r.status);
    let detail = r.json().and_then(|v| {
        v.get("name")
            .and_then(Value::as_str)
            .or_else(|| v.get("message").and_then(Value::as_str))
            .map(str::to_owned)
    });
    if let Some(d) = detail {
        s.push(':');
        s.push_str(&d);
    }
    if s.chars().count() > 96 {
        s = s.chars().take(93).collect::<String>() + "...";
    }
    s
}

/// Read OpenCode's stdout and stderr (so it never blocks on a full pipe) and log them,
/// redacted, at debug.
fn drain_output(child: &mut GuardedChild, id: &str, port: u16, secrets: &[String]) {
    use std::io::BufRead as _;
    let readers: [(Option<Box<dyn std::io::Read + Send>>, &'static str); 2] = [
        (child.stdout.take().map(|s| Box::new(s) as _), "stdout"),
        (child.stderr.take().map(|s| Box::new(s) as _), "stderr"),
    ];
    for (reader, which) in readers {
        let Some(reader) = reader else { continue };
        let id = id.to_owned();
        let secrets = secrets.to_vec();
        let _ = std::thread::Builder::new()
            .name(format!("opencode-{port}-{which}"))
            .spawn(move || {
                for line in std::io::BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    let line = scrub(&line, &secrets);
                    tracing::debug!(session = %id, port, "opencode {which}: {}", line.trim_end());
                }
            });
    }
}

/// `text` with every known secret value, and every `SECRET_NAME=value`, replaced.
fn scrub(text: &str, secrets: &[String]) -> String {
    let mut out = redact_text(text);
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), REDACTED);
        }
    }
    out
}

/// One `codemantle.*` record line for a stream.
fn record_line(kind: &str, properties: Value) -> String {
    format!("{}\n", json!({"type": kind, "properties": properties}))
}

/// The folder as a registry key: normalised components, `.` for the root.
fn folder_key(rel: &RelPath) -> String {
    if rel.is_root() {
        ".".to_owned()
    } else {
        rel.components().collect::<Vec<_>>().join("/")
    }
}

/// `http://127.0.0.1:<port>/<base64url(directory)>/session/<ses id>` (0.1.50 §7.6).
fn editor_url(record: &SessionRecord) -> Option<String> {
    let slug = URL_SAFE_NO_PAD.encode(record.directory.as_bytes());
    let mut url = format!("http://127.0.0.1:{}/{slug}", record.port);
    if let Some(id) = &record.opencode_id {
        url.push_str("/session/");
        url.push_str(id);
    }
    Some(url)
}

/// The private `HOME`/`TMPDIR` key of a folder: OpenCode keeps its own state (conversation
/// history, config, caches) in `HOME`, so one home per folder lets a restarted server for the
/// same folder find its history, while different folders never share one.
fn private_key(folder: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(folder.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("opencode-{hex}")
}

/// 32 random bytes, base64url: a per-session password.
fn random_secret() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// The wire `j` as the protocol crate's credential type.
fn wire_credential(j: &codemantle_protocol::message::JitCredential) -> jit::JitCredential {
    jit::JitCredential {
        token: j.token.clone(),
        expires_at_ms: j.expires_at_ms,
        scope: j.scope.clone(),
        env_name: j.env_name.clone(),
        credential_ref: j.credential_ref.clone(),
        env_pairs: j
            .env
            .iter()
            .map(|p| (p.name.clone(), p.value.clone()))
            .collect(),
    }
}

/// What a credential puts in OpenCode's environment (0.1.50 §8.3): the token under its name,
/// the expiry and scope, then the extra pairs (none may replace the token).
fn credential_env(c: &jit::JitCredential) -> Vec<(String, OsString)> {
    let token_name = c.token_env_name().to_owned();
    let mut env = vec![
        (token_name.clone(), OsString::from(&c.token)),
        (
            jit::ENV_EXPIRES_AT.to_owned(),
            OsString::from(c.expires_at_ms.to_string()),
        ),
    ];
    if let Some(scope) = &c.scope {
        env.push((jit::ENV_SCOPE.to_owned(), OsString::from(scope)));
    }
    for (name, value) in &c.env_pairs {
        if *name != token_name {
            env.push((name.clone(), OsString::from(value)));
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_ids() {
        let record = SessionRecord {
            id: "cp1".into(),
            opencode_id: Some("ses_abc123".into()),
            folder: "proj-a".into(),
            directory: "/home/ci/work/proj-a".into(),
            port: 10023,
            pid: 1,
            start_time: 1,
            password: "x".into(),
            protection: "none".into(),
            jit: None,
            stream: None,
            started_at_ms: 0,
            state: SessionState::Running,
        };
        assert_eq!(
            editor_url(&record).unwrap(),
            "http://127.0.0.1:10023/L2hvbWUvY2kvd29yay9wcm9qLWE/session/ses_abc123"
        );
        assert!(valid_opencode_id("ses_df4cdf8f0ffeKLtiQRxJlY53FF"));
        assert!(!valid_opencode_id("ses"));
        assert!(!valid_opencode_id("abc"));
        assert!(!valid_opencode_id("ses/../x"));
    }

    #[test]
    fn private_keys_are_plain_names_per_folder() {
        let a = private_key("proj-a");
        assert_eq!(a.len(), "opencode-".len() + 32);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        assert_eq!(a, private_key("proj-a"));
        assert_ne!(a, private_key("proj-b"));
    }

    #[test]
    fn folder_keys_are_normalised() {
        assert_eq!(folder_key(&RelPath::parse(".").unwrap()), ".");
        assert_eq!(folder_key(&RelPath::parse("").unwrap()), ".");
        assert_eq!(folder_key(&RelPath::parse("a//b/./").unwrap()), "a/b");
    }

    #[test]
    fn secrets_are_scrubbed() {
        let s = scrub(
            r#"{"value":"tok-1234567890","x":"API_KEY=abc"}"#,
            &["tok-1234567890".to_owned(), "short".to_owned()],
        );
        assert!(!s.contains("tok-1234567890") && !s.contains("abc"), "{s}");
    }

    #[test]
    fn credential_environment() {
        let c = jit::JitCredential {
            token: "jit.token.value-0123456789".into(),
            expires_at_ms: 1_735_690_500_000,
            scope: Some("opencode:session".into()),
            env_name: None,
            credential_ref: Some("ref-1".into()),
            env_pairs: vec![
                ("OPENCODE_SESSION_TOKEN".into(), "override".into()),
                ("EXTRA_ONE".into(), "v".into()),
            ],
        };
        let env = credential_env(&c);
        let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "OPENCODE_SESSION_TOKEN",
                "OPENCODE_JIT_TOKEN_EXPIRES_AT",
                "OPENCODE_JIT_SCOPE",
                "EXTRA_ONE"
            ]
        );
        assert_eq!(env[0].1, "jit.token.value-0123456789");
        assert_eq!(env[1].1, "1735690500000");
    }

    #[test]
    fn http_failures_are_short() {
        let r = http::Response {
            status: 404,
            body: br#"{"name":"NotFoundError","data":{}}"#.to_vec(),
        };
        assert_eq!(http_failure(&r), "http_404:NotFoundError");
        let r = http::Response {
            status: 500,
            body: format!("{{\"message\":\"{}\"}}", "x".repeat(200)).into_bytes(),
        };
        assert_eq!(http_failure(&r).chars().count(), 96);
    }
}
