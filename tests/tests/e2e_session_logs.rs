//! `codemantle sessions logs` — the real CLI binary against a real control plane and daemon
//! (fake OpenCode in `step` mode, so the test decides when output appears):
//!
//! - `logs SID -f` follows the session's output stream live, prints every chunk as it
//!   arrives, survives a `kill -9` + restart of the control plane mid-stream (it reconnects
//!   with `Last-Event-ID`; nothing printed twice or skipped) and exits 0 when the stream ends;
//! - `logs SID` (no `-f`) prints the stored output and exits — also with the daemon stopped
//!   and the control plane restarted (served from the control plane's store, which also says
//!   which stream is the session's latest);
//! - an unknown session is a clear error (exit code ≠ 0, `stream_not_found`);
//! - `GET /session/:sid/snapshot` while the device is offline serves the tail of the stored
//!   output from the control plane's store (`source: "store"`).
//!
//! SAFETY: temp dirs only (see `session_rig`); network 127.0.0.1 only; every process started
//! here is killed at the end (the CLI child by a guard).

use std::io::Read as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use codemantle_tests::bins::bin_path;
use codemantle_tests::session_rig::{SessionRig, deltas, release_deltas};
use serde_json::Value;

/// Kills the CLI child on drop (a failed assertion leaves nothing behind).
struct Cli(Child);

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cli(rig: &SessionRig, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path("codemantle"));
    cmd.env("CODEMANTLE_SERVER", rig.cp.url())
        .env("CODEMANTLE_TOKEN", &rig.cp.token)
        .env_remove("CODEMANTLE_CA_CERT")
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// The deltas in NDJSON output text (one OpenCode event per line).
fn output_deltas(text: &str) -> Vec<String> {
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("line {l:?}: {e}")))
        .collect();
    deltas(&events)
}

fn expected(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("part {i} ")).collect()
}

#[test]
fn logs_follows_resumes_after_a_control_plane_kill_and_prints_stored_output() {
    let mut rig = SessionRig::start();
    let project = rig.daemon.root.clone();
    let n = 24;

    // An unknown session: a clear error.
    let missing = cli(&rig, &["sessions", "logs", "ses_nosuchsession"])
        .output()
        .expect("run codemantle");
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("stream_not_found"), "{err}");

    release_deltas(&project, 0);
    rig.prompt(&format!("emit {n} step"));
    release_deltas(&project, 8);

    // Follow: stdout through a pipe read on a thread (the CLI writes as chunks arrive).
    let mut child = Cli(cli(&rig, &["sessions", "logs", &rig.sid, "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start codemantle sessions logs -f"));
    let mut stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut printed = String::new();
    let wait_for = |printed: &mut String, deltas: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while output_deltas(complete_lines(printed)).len() < deltas {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "the CLI printed only {printed:?}");
            if let Ok(piece) = rx.recv_timeout(left) {
                printed.push_str(&String::from_utf8_lossy(&piece));
            }
        }
    };
    wait_for(&mut printed, 8);

    // kill -9 the control plane mid-stream; the CLI reconnects to the restarted one.
    rig.cp.kill();
    std::thread::sleep(Duration::from_millis(300));
    rig.cp.spawn();
    rig.cp.wait_online(&rig.device);
    release_deltas(&project, n);

    // It exits by itself when the stream ends.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the CLI did not exit at the end of the stream"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert!(status.success(), "exit {status:?}: {stderr}");
    while let Ok(piece) = rx.recv_timeout(Duration::from_secs(5)) {
        printed.push_str(&String::from_utf8_lossy(&piece));
    }
    assert_eq!(output_deltas(&printed), expected(n), "stderr: {stderr}");
    assert!(
        stderr.contains("interrupted") || stderr.contains("reconnecting"),
        "the CLI saw the control plane go away: {stderr}"
    );
    assert!(printed.trim_end().ends_with("}"), "{printed}");
    let last: Value = serde_json::from_str(printed.lines().last().expect("a line")).expect("json");
    assert_eq!(last["type"], "session.idle");

    // Without -f: the stored output, also while the device is offline and after a restart of
    // the control plane (the session's latest stream is then found in the store).
    rig.daemon.kill();
    rig.cp.kill();
    rig.cp.spawn();
    let stored = cli(&rig, &["sessions", "logs", &rig.sid])
        .output()
        .expect("run codemantle");
    assert!(
        stored.status.success(),
        "{}",
        String::from_utf8_lossy(&stored.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&stored.stdout), printed);

    // The snapshot route, device offline: the tail of the stored output, from the store.
    let (status, snap) = rig.cp.get(&format!("/session/{}/snapshot?tail=3", rig.sid));
    assert_eq!(status, 200, "{snap}");
    assert_eq!(snap["source"], "store", "{snap}");
    let entries = snap["e"].as_array().expect("entries");
    let tail: Vec<&str> = printed.lines().rev().take(3).collect::<Vec<_>>();
    let got: Vec<&str> = entries
        .iter()
        .rev()
        .map(|e| e["m"].as_str().expect("m"))
        .collect();
    assert_eq!(got, tail, "{snap}");
    assert!(
        entries
            .iter()
            .all(|e| e["src"] == "opencode" && e["sid"] == rig.sid.as_str())
    );
    // Asking the device while it is offline is a clear 409.
    let (status, body) = rig
        .cp
        .get(&format!("/session/{}/snapshot?source=device", rig.sid));
    assert_eq!(status, 409, "{body}");
    let (status, body) = rig
        .cp
        .get(&format!("/session/{}/snapshot?source=disk", rig.sid));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_source"))
    );
}

/// `text` up to its last newline.
fn complete_lines(text: &str) -> &str {
    text.rfind('\n').map_or("", |i| &text[..=i])
}
