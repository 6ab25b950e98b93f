//! The real `opencode serve` end to end: real control plane + real daemon (OpenCode started by
//! the process guard, sandboxed with landlock, as `nobody` when the tests run as root) + the
//! real OpenCode (npm `opencode-ai`, pinned in `tests/opencode/install.sh`) answering from a
//! mock OpenAI-compatible LLM on 127.0.0.1 ([`codemantle_tests::mock_llm`]).
//!
//! start a session through the HTTP API → prompt through the API → the mock's reply text
//! arrives in the session's output stream (`GET /sessions/:sid/stream`, SSE) → the daemon is
//! killed (SIGKILL) and restarted: the same OpenCode process is re-adopted and answers a second
//! prompt the same way → stop → the session is not running any more and OpenCode's process
//! group is gone.
//!
//! How OpenCode finds the mock: the daemon passes `OPENCODE_CONFIG_CONTENT` (an inline
//! OpenCode config naming a provider `mock` whose `baseURL` is the mock) and
//! `OPENCODE_DISABLE_MODELS_FETCH` (and a loopback npm registry, so OpenCode's background
//! plugin install does not even look up registry.npmjs.org) from its own environment to
//! OpenCode through `process.env_pass`, as an operator would set them in the service's
//! environment; the sandbox lets OpenCode connect to the mock's port because it is the only
//! entry of `process.connect_ports`. Nothing leaves 127.0.0.1 (checked with strace on
//! OpenCode 1.18.33: without the registry override it resolves registry.npmjs.org).
//!
//! Installation: the test runs `tests/opencode/install.sh` (idempotent: nothing is downloaded
//! when the pinned version is in `target/opencode-ai/`), so a fresh machine needs node, npm and
//! the npm registry; without node/npm the test fails and says what to install.
//!
//! No timing assertions: OpenCode's first start can take seconds (a 185 MB binary), so the
//! waits are generous.
//!
//! SAFETY RULES (these tests run as root on a shared machine):
//! - every file a test creates is inside its own temp dirs (project, private HOME/TMPDIR,
//!   data dirs); OpenCode is installed under the workspace's `target/`, with a throw-away HOME;
//! - the network is 127.0.0.1 only (control plane, OpenCode, mock LLM).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use codemantle_control_plane::client::{Request, SseReader};
use codemantle_tests::harness::{ControlPlane, CpOptions, Daemon, free_port, wait_until};
use codemantle_tests::mock_llm::MockLlm;
use futures_lite::FutureExt as _;
use serde_json::{Value, json};

const NOBODY: u32 = 65534;
/// What the mock model answers; the test looks for it in the session stream.
const REPLY: &str = "Hello from the CodeMantle mock model, over the tunnel.";
/// The prompt; the test looks for it in what the mock received.
const PROMPT: &str = "Please greet the CodeMantle end-to-end test.";
/// A package registry that is not there (loopback, discard port, not in the sandbox's connect
/// ports): OpenCode's background plugin install fails at once, with no DNS lookup.
const NO_REGISTRY: &str = "http://127.0.0.1:9/";
/// The second prompt, after the daemon was restarted.
const PROMPT_AFTER_RESTART: &str = "Greet it once more, after the daemon restart.";

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `tests/opencode/install.sh` and returns the OpenCode binary it prints.
fn install_opencode() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("opencode/install.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} — is bash installed?", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "the OpenCode e2e test needs node and npm to install opencode-ai: {stderr}\
             install them (Debian: apt-get install nodejs npm), then run the tests again"
        ),
        _ => panic!(
            "{} failed ({}): {stderr}\nit installs opencode-ai from the npm registry, which \
             must be reachable",
            script.display(),
            out.status
        ),
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    assert!(
        path.is_absolute() && path.is_file(),
        "install.sh printed {stdout:?}, not an OpenCode binary"
    );
    path
}

/// `[process]` + `[session]`: OpenCode as the allowlisted program, connect only to the mock.
fn daemon_config(dir: &Path, opencode: &Path, mock_port: u16) -> String {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let project = dir.join("project");
    let run_as = if running_as_root() {
        std::os::unix::fs::lchown(&project, Some(NOBODY), Some(NOBODY)).unwrap();
        "run_as = \"nobody\"\n"
    } else {
        ""
    };
    let port = free_port();
    format!(
        "[process]\n{run_as}private_dir = {private:?}\n\
         env_pass = [\"OPENCODE_CONFIG_CONTENT\", \"OPENCODE_DISABLE_MODELS_FETCH\", \
         \"npm_config_registry\", \"BUN_CONFIG_REGISTRY\"]\n\
         connect_ports = [{mock_port}]\n\
         [process.allowlist]\nopencode = {opencode:?}\n\
         [session]\nport_range = \"{port}-{port}\"\nstart_timeout_s = 120\n",
        private = dir.join("private").display().to_string(),
        opencode = opencode.display().to_string(),
    )
}

fn open_sse(cp: &ControlPlane, sid: &str, x: &str) -> SseReader {
    let req = Request::new("GET", &format!("/sessions/{sid}/stream?x={x}"));
    let resp = smol::block_on(cp.client().open(req)).expect("open stream");
    assert_eq!(resp.status, 200);
    resp.into_sse()
}

/// Reads the stream to its `end` event and returns its text (the chunks' `d`, in seq order).
fn read_stream(sse: &mut SseReader, daemon: &Daemon) -> String {
    let mut text = String::new();
    let mut next_seq = 0u64;
    loop {
        let ev = smol::block_on(async { sse.next_event().await }.or(async {
            smol::Timer::after(Duration::from_secs(180)).await;
            panic!(
                "no SSE event within 180 s; stream so far:\n{text}\ndaemon log:\n{}",
                daemon.log()
            );
        }))
        .expect("stream read")
        .unwrap_or_else(|| panic!("stream closed before `end`:\n{text}"));
        match ev.event.as_deref() {
            Some("chunk") => {
                let v: Value = serde_json::from_str(&ev.data).expect("chunk json");
                assert_eq!(
                    v["q"].as_u64(),
                    Some(next_seq),
                    "chunks in order, once each"
                );
                next_seq += 1;
                text.push_str(v["d"].as_str().expect("d"));
            }
            Some("end") => return text,
            other => panic!("unexpected event {other:?}: {}", ev.data),
        }
    }
}

/// Prompts `sid` with `text` through the API and asserts that the mock's reply arrives in the
/// prompt's output stream and that OpenCode sent `text` to the mock.
fn prompt_and_expect_reply(
    cp: &ControlPlane,
    daemon: &Daemon,
    mock: &MockLlm,
    device: &str,
    sid: &str,
    text: &str,
) {
    let (status, body) = cp.post(
        &format!("/devices/{device}/prompt"),
        json!({ "sessionId": sid, "prompt": text }),
    );
    assert_eq!(status, 202, "prompt: {body}");
    let x = body["x"].as_str().expect("x").to_owned();
    let stream = read_stream(&mut open_sse(cp, sid, &x), daemon);
    let events: Vec<Value> = stream
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let streamed: String = events
        .iter()
        .filter(|e| e["type"] == "message.part.delta" && e["properties"]["field"] == "text")
        .filter_map(|e| e["properties"]["delta"].as_str())
        .collect();
    let asked: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        streamed.contains(mock.reply()),
        "the mock's reply in the stream's text deltas; got {streamed:?}\nmock saw {asked:?}\n\
         stream:\n{stream}\ndaemon log:\n{}",
        daemon.log()
    );
    assert!(
        events.iter().any(|e| e["type"] == "session.idle"),
        "the turn ended with session.idle: {stream}"
    );
    assert!(
        mock.requests()
            .iter()
            .any(|r| r.path == "/v1/chat/completions" && r.body.contains(text)),
        "OpenCode sent the prompt {text:?} to the mock; it saw {asked:?}"
    );
}

/// Kills (SIGKILL, whole process group) every process whose working directory is under `dir`
/// when dropped: sessions outlive a daemon by design (they are re-adopted after a restart), so
/// a test that fails before stopping its session would otherwise leave OpenCode running.
struct SessionReaper(std::path::PathBuf);

impl Drop for SessionReaper {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<libc::pid_t>().ok())
            else {
                continue;
            };
            let in_dir = std::fs::read_link(entry.path().join("cwd"))
                .is_ok_and(|cwd| cwd.starts_with(&self.0));
            if in_dir && pid > 1 {
                // SAFETY: kill(2) on a process (group) of this test's own session.
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

fn pid_exists(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let alive = unsafe { libc::kill(pid, 0) == 0 };
    alive || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

#[test]
fn real_opencode_answers_a_prompt_from_the_mock_model_through_the_api() {
    let opencode = install_opencode();
    let mock = MockLlm::start(REPLY);
    // The daemon hands these to OpenCode through `process.env_pass` (see the module doc).
    // SAFETY: this test file has one test; nothing else reads the environment concurrently
    // while it is set (the processes started later inherit it).
    unsafe {
        std::env::set_var(
            "OPENCODE_CONFIG_CONTENT",
            mock.opencode_config().to_string(),
        );
        std::env::set_var("OPENCODE_DISABLE_MODELS_FETCH", "1");
        // OpenCode installs its plugin package with npm in the background at first start;
        // a loopback registry keeps that from even resolving registry.npmjs.org (the sandbox
        // denies TCP to it, but not DNS over UDP).
        std::env::set_var("npm_config_registry", NO_REGISTRY);
        std::env::set_var("BUN_CONFIG_REGISTRY", NO_REGISTRY);
    }

    // OpenCode's first start (a 185 MB binary, cold page cache, first-run setup in its HOME)
    // can take longer than the default 15 s reply timeout of `si`.
    let mut cp = ControlPlane::start_with(CpOptions {
        config: Some("[tunnel]\nrequest_timeout_secs = 150\n".to_owned()),
        ..CpOptions::default()
    });
    let creds = cp.add_device("opencode");
    let mut daemon = Daemon::start_with(&cp.ws_url(), &creds, |dir| {
        daemon_config(dir, &opencode, mock.port())
    });
    cp.wait_online(&creds.id);
    let _reaper = SessionReaper(daemon.dir.path().to_path_buf());
    let device = creds.id.clone();

    // Start.
    let start = Instant::now();
    let (status, body) = cp.post(
        &format!("/devices/{device}/session/start"),
        json!({ "path": "." }),
    );
    assert_eq!(status, 200, "session/start: {body}\n{}", daemon.log());
    assert_eq!(
        body["o"],
        json!(1),
        "session/start: {body}\n{}",
        daemon.log()
    );
    let sid = body["s"].as_str().expect("session id").to_owned();
    let start_took = start.elapsed();
    let (status, sv) = cp.post(
        &format!("/devices/{device}/session/status"),
        json!({ "path": "." }),
    );
    assert_eq!(status, 200, "{sv}");
    assert_eq!(sv["o"], json!(1), "running: {sv}");
    let pid = i32::try_from(sv["d"].as_u64().expect("pid in sv")).unwrap();
    // The API's `sv` carries the protection the daemon's process guard got (`pt`), and the
    // daemon logs it at spawn.
    let pt = sv["pt"]
        .as_str()
        .unwrap_or_else(|| panic!("pt in sv: {sv}"));
    assert!(pt.starts_with("landlock") && pt.contains("net"), "{sv}");
    let log = daemon.log();
    let started = log
        .lines()
        .find(|l| l.contains("opencode started") && l.contains(&format!("pid={pid} ")))
        .unwrap_or_else(|| panic!("no start line for pid {pid}:\n{log}"));
    assert!(
        started.contains("protection=landlock") && started.contains("+net"),
        "OpenCode runs sandboxed (fs and net): {started}"
    );
    assert!(pid_exists(pid));

    // Prompt, and read the reply from the stream.
    let prompt_sent = Instant::now();
    prompt_and_expect_reply(&cp, &daemon, &mock, &device, &sid, PROMPT);
    let turn_took = prompt_sent.elapsed();

    // The daemon crashes (SIGKILL) and restarts: OpenCode lives on (same process), is
    // re-adopted, and answers the next prompt in the same session.
    daemon.kill();
    daemon.spawn();
    cp.wait_online(&device);
    let (status, sv) = cp.post(
        &format!("/devices/{device}/session/status"),
        json!({ "path": "." }),
    );
    assert_eq!(status, 200, "{sv}");
    assert_eq!(
        sv["o"],
        json!(1),
        "still running after the daemon restart: {sv}"
    );
    assert_eq!(
        sv["d"].as_i64(),
        Some(i64::from(pid)),
        "the same OpenCode: {sv}"
    );
    prompt_and_expect_reply(&cp, &daemon, &mock, &device, &sid, PROMPT_AFTER_RESTART);

    // Stop.
    let (status, body) = cp.post(
        &format!("/devices/{device}/session/terminate"),
        json!({ "sessionId": sid }),
    );
    assert_eq!(status, 200, "terminate: {body}");
    assert_eq!(body["o"], json!(1), "terminate: {body}\n{}", daemon.log());
    wait_until(
        Duration::from_secs(30),
        "OpenCode's process group gone",
        || !pid_exists(pid) && !pid_exists(-pid),
    );
    let (status, sv) = cp.post(
        &format!("/devices/{device}/session/status"),
        json!({ "path": "." }),
    );
    assert_eq!(status, 200, "{sv}");
    assert_ne!(sv["o"], json!(1), "not running after stop: {sv}");
    let asked: Vec<String> = mock
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    // Figures only (no assertion on them): how long the sandboxed OpenCode took.
    eprintln!(
        "e2e_opencode: session/start (spawn + OpenCode health + session) {start_took:?}; \
         prompt to end of stream {turn_took:?}; the mock saw {} requests: {asked:?}",
        mock.requests().len()
    );
}
