//! A real control plane and a real daemon whose `opencode` is the fake
//! ([`crate::fake_opencode`], the `cm-fake-opencode` binary run through the daemon's process
//! guard, as `nobody` when the tests run as root), with one session started through the HTTP
//! API — the set-up that session-stream tests and the stream bench share.
//!
//! The fake OpenCode runs in its own session and process group (the daemon's guard puts it
//! there so that it survives a daemon restart), so killing the daemon does not end it:
//! [`SessionRig`]'s drop kills its process group (found by pid through the session status
//! and checked to still be `cm-fake-opencode` before the signal).
//!
//! SAFETY: every file is inside the harness's temp dirs (the fake binary is copied into the
//! daemon's temp dir; the project root there is chowned to `nobody`); network 127.0.0.1 only.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::Duration;

use codemantle_control_plane::client::{Request, SseEvent, SseReader};
use futures_lite::FutureExt as _;
use serde_json::{Value, json};

use crate::bins::bin_path;
use crate::harness::{ControlPlane, CpOptions, Daemon, free_port};

const NOBODY: u32 = 65534;

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `[process]` + `[session]` of a daemon whose `opencode` is the fake, copied into its temp dir
/// (`dir`); `session_extra` is appended inside `[session]` (e.g. `journal_max_bytes = …`).
pub fn opencode_config(dir: &Path, session_extra: &str) -> String {
    opencode_config_on(dir, free_port(), session_extra)
}

/// [`opencode_config`] with the session port range pinned to `port` (a test that must know
/// the session's port before it starts, e.g. to proxy to it).
pub fn opencode_config_on(dir: &Path, port: u16, session_extra: &str) -> String {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::set_permissions(&bin_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake = bin_dir.join("cm-fake-opencode");
    std::fs::copy(bin_path("cm-fake-opencode"), &fake).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let project = dir.join("project");
    let run_as = if running_as_root() {
        std::os::unix::fs::lchown(&project, Some(NOBODY), Some(NOBODY)).unwrap();
        "run_as = \"nobody\"\n"
    } else {
        ""
    };
    format!(
        "[process]\n{run_as}private_dir = {private:?}\n[process.allowlist]\nopencode = {fake:?}\n\
         [session]\nport_range = \"{port}-{port}\"\nstart_timeout_s = 30\n{session_extra}\n",
        private = dir.join("private").display().to_string(),
        fake = fake.display().to_string(),
    )
}

/// A control plane, a daemon and one running session on it.
pub struct SessionRig {
    pub cp: ControlPlane,
    pub daemon: Daemon,
    pub device: String,
    pub sid: String,
    /// The session's OpenCode as first started (killed with its group on drop).
    fake_pid: Option<u32>,
}

impl SessionRig {
    /// Starts everything with default settings and starts a session on folder `.`.
    pub fn start() -> SessionRig {
        SessionRig::start_with(CpOptions::default(), "", None)
    }

    /// [`SessionRig::start`] with control-plane options, `[session]` settings for the daemon and
    /// an optional `jit` object for the start body.
    pub fn start_with(options: CpOptions, session_extra: &str, jit: Option<Value>) -> SessionRig {
        let mut cp = ControlPlane::start_with(options);
        let creds = cp.add_device("sessions");
        let daemon = Daemon::start_with(&cp.ws_url(), &creds, |dir| {
            opencode_config(dir, session_extra)
        });
        cp.wait_online(&creds.id);
        let mut body = json!({ "path": "." });
        if let Some(jit) = jit {
            body["jit"] = jit;
        }
        let (status, reply) = cp.post(&format!("/devices/{}/session/start", creds.id), body);
        assert_eq!(status, 200, "session/start: {reply}\n{}", daemon.log());
        assert_eq!(reply["o"], 1, "session/start: {reply}\n{}", daemon.log());
        let sid = reply["s"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {reply}"))
            .to_owned();
        let mut rig = SessionRig {
            cp,
            daemon,
            device: creds.id,
            sid,
            fake_pid: None,
        };
        rig.fake_pid = rig.opencode_pid();
        rig
    }

    /// `POST /devices/:id/prompt` → the stream id `x`.
    pub fn prompt(&self, text: &str) -> String {
        let (status, body) = self.cp.post(
            &format!("/devices/{}/prompt", self.device),
            json!({ "sessionId": self.sid, "prompt": text }),
        );
        assert_eq!(status, 202, "prompt: {body}");
        body["x"].as_str().expect("x").to_owned()
    }

    /// `POST /devices/:id/session/status` for folder `.` (the `sv` as JSON).
    pub fn status(&self) -> Value {
        let (status, body) = self.cp.post(
            &format!("/devices/{}/session/status", self.device),
            json!({ "path": "." }),
        );
        assert_eq!(status, 200, "session/status: {body}");
        body
    }

    /// `GET /sessions/:sid/stream?x=` (resuming after `last_id`).
    pub fn open_stream(&self, x: &str, last_id: Option<u32>) -> SseReader {
        let mut req = Request::new("GET", &format!("/sessions/{}/stream?x={x}", self.sid));
        if let Some(id) = last_id {
            req = req.header("last-event-id", &id.to_string());
        }
        let resp = smol::block_on(self.cp.client().open(req)).expect("open stream");
        assert_eq!(resp.status, 200);
        resp.into_sse()
    }

    /// The process id of the session's OpenCode (the fake), if it runs.
    pub fn opencode_pid(&self) -> Option<u32> {
        self.status()["d"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
    }
}

impl Drop for SessionRig {
    fn drop(&mut self) {
        // The fake outlives a killed daemon by design; end it (only if that pid is still it).
        self.daemon.kill();
        if let Some(pid) = self.fake_pid {
            kill_fake_group(pid);
        }
    }
}

/// SIGKILL the process group of `pid` if `pid` is a `cm-fake-opencode` process.
pub fn kill_fake_group(pid: u32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("cm-fake-opencode") {
        return;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) of the fake's own process group (it is a group leader: the guard calls
    // setsid), checked above to be the fake.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
}

/// The next SSE event; `None` when the response ended or broke. Panics after `limit` without
/// one (a hung stream must fail the test, not hang it).
pub fn next_event(sse: &mut SseReader, limit: Duration) -> Option<SseEvent> {
    smol::block_on(async { sse.next_event().await.ok().flatten() }.or(async {
        smol::Timer::after(limit).await;
        panic!("no SSE event within {limit:?}");
    }))
}

/// One `chunk` event: (seq, text), checking that its `id` is its seq.
pub fn parse_chunk(ev: &SseEvent) -> (u32, String) {
    let v: Value = serde_json::from_str(&ev.data).expect("chunk data is JSON");
    let q = u32::try_from(v["q"].as_u64().expect("q")).expect("q fits u32");
    assert_eq!(
        ev.id.as_deref(),
        Some(q.to_string().as_str()),
        "chunk id is its seq"
    );
    (q, v["d"].as_str().expect("d").to_owned())
}

/// The OpenCode events in a stream's text (one JSON object per line, possibly split across
/// chunks), in order.
pub fn stream_events(chunks: &[(u32, String)]) -> Vec<Value> {
    let text: String = chunks.iter().map(|c| c.1.as_str()).collect();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect()
}

/// The deltas of `message.part.delta` events.
pub fn deltas(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "message.part.delta")
        .map(|e| e["properties"]["delta"].as_str().expect("delta").to_owned())
        .collect()
}

/// Writes `n` to the fake's step file in `project` (atomically, readable by the fake).
pub fn release_deltas(project: &Path, n: usize) {
    let tmp = project.join(".fake-step.tmp");
    std::fs::write(&tmp, n.to_string()).expect("write step file");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::rename(&tmp, project.join(crate::fake_opencode::STEP_FILE)).expect("rename");
}
