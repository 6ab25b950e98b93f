//! Sessions end to end with the real binaries: the HTTP API starts an OpenCode session on a
//! real daemon (OpenCode is `cm-fake-opencode`, run through the process guard as `nobody` when
//! the tests run as root), prompts it, and reads the output stream over SSE
//! (`GET /sessions/:sid/stream?x=`): every delta the fake produces arrives exactly once and in
//! order — also when the control plane is killed (SIGKILL) mid-stream and restarted, after it
//! had acknowledged (so the daemon deleted) part of the stream.
//!
//! SAFETY RULES (these tests run as root on a shared machine):
//! - every file a test creates is inside its own temp dirs (the fake OpenCode binary is copied
//!   into the daemon's temp dir; the project root is there and chowned to `nobody`);
//! - the network is 127.0.0.1 only (control plane, fake OpenCode on a free port).

use std::time::{Duration, Instant};

use codemantle_control_plane::client::{Request, SseEvent, SseReader};
use codemantle_tests::harness::{ControlPlane, Daemon};
use codemantle_tests::session_rig;
use futures_lite::FutureExt as _;
use serde_json::{Value, json};

fn start() -> (ControlPlane, Daemon, String, String) {
    let mut cp = ControlPlane::start();
    let creds = cp.add_device("sessions");
    let daemon = Daemon::start_with(&cp.ws_url(), &creds, |dir| {
        session_rig::opencode_config(dir, "")
    });
    cp.wait_online(&creds.id);
    let (status, body) = cp.post(
        &format!("/devices/{}/session/start", creds.id),
        json!({ "path": "." }),
    );
    assert_eq!(status, 200, "session/start: {body}\n{}", daemon.log());
    let sid = body["s"]
        .as_str()
        .or_else(|| body["sessionId"].as_str())
        .unwrap_or_else(|| panic!("no session id in {body}"))
        .to_owned();
    (cp, daemon, creds.id, sid)
}

fn prompt(cp: &ControlPlane, device: &str, sid: &str, text: &str) -> String {
    let (status, body) = cp.post(
        &format!("/devices/{device}/prompt"),
        json!({ "sessionId": sid, "prompt": text }),
    );
    assert_eq!(status, 202, "prompt: {body}");
    body["x"].as_str().expect("x").to_owned()
}

fn open_sse(cp: &ControlPlane, sid: &str, x: &str, last_id: Option<u32>) -> SseReader {
    let mut req = Request::new("GET", &format!("/sessions/{sid}/stream?x={x}"));
    if let Some(id) = last_id {
        req = req.header("last-event-id", &id.to_string());
    }
    let resp = smol::block_on(cp.client().open(req)).expect("open stream");
    assert_eq!(resp.status, 200);
    resp.into_sse()
}

/// The next event; `None` when the response ended or broke (the control plane died).
fn next_event(sse: &mut SseReader) -> Option<SseEvent> {
    smol::block_on(async { sse.next_event().await.ok().flatten() }.or(async {
        smol::Timer::after(Duration::from_secs(30)).await;
        panic!("no SSE event within 30 s");
    }))
}

/// Reads chunks into `out` (seq, text) until `end` (true), the response ends (false), or
/// `stop_after` chunks were read in this call (false).
fn read(sse: &mut SseReader, out: &mut Vec<(u32, String)>, stop_after: Option<usize>) -> bool {
    let mut n = 0;
    while let Some(ev) = next_event(sse) {
        match ev.event.as_deref() {
            Some("chunk") => {
                let v: Value = serde_json::from_str(&ev.data).expect("json");
                let q = u32::try_from(v["q"].as_u64().expect("q")).expect("u32");
                assert_eq!(ev.id.as_deref(), Some(q.to_string().as_str()));
                out.push((q, v["d"].as_str().expect("d").to_owned()));
                n += 1;
                if stop_after.is_some_and(|s| n >= s) {
                    return false;
                }
            }
            Some("end") => return true,
            other => panic!("unexpected event {other:?}: {}", ev.data),
        }
    }
    false
}

/// Seqs 0..n exactly once, in order; returns the deltas of the stream's text.
fn deltas(chunks: &[(u32, String)]) -> Vec<String> {
    let seqs: Vec<u32> = chunks.iter().map(|c| c.0).collect();
    let expected: Vec<u32> = (0..u32::try_from(chunks.len()).unwrap()).collect();
    assert_eq!(seqs, expected, "every chunk once, in order");
    let text: String = chunks.iter().map(|c| c.1.as_str()).collect();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["type"] == "message.part.delta")
        .map(|e| e["properties"]["delta"].as_str().expect("delta").to_owned())
        .collect()
}

fn expected_deltas(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("part {i} ")).collect()
}

#[test]
fn prompt_output_arrives_exactly_once_even_across_a_control_plane_kill() {
    let (mut cp, daemon, device, sid) = start();
    // The fake OpenCode outlives the daemon by design: end it when the test is done.
    let (_, sv) = cp.post(
        &format!("/devices/{device}/session/status"),
        json!({ "path": "." }),
    );
    let fake_pid = sv["d"].as_u64().and_then(|p| u32::try_from(p).ok());

    // 1. A plain prompt, read to the end.
    let x = prompt(&cp, &device, &sid, "emit 5");
    let mut sse = open_sse(&cp, &sid, &x, None);
    let mut got = Vec::new();
    assert!(
        read(&mut sse, &mut got, None),
        "stream ended\n{}",
        daemon.log()
    );
    assert_eq!(deltas(&got), expected_deltas(5));
    drop(sse);

    // 2. A slow prompt; SIGKILL the control plane mid-stream, restart it, resume by
    //    Last-Event-ID.
    let n = 30;
    let x = prompt(&cp, &device, &sid, &format!("emit {n} gap 100"));
    let mut sse = open_sse(&cp, &sid, &x, None);
    let mut got = Vec::new();
    assert!(!read(&mut sse, &mut got, Some(6)), "ended too early");
    drop(sse);
    cp.kill();
    std::thread::sleep(Duration::from_millis(300));
    cp.spawn();
    cp.wait_online(&device);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = got.last().map(|c| c.0);
        let mut sse = open_sse(&cp, &sid, &x, last);
        if read(&mut sse, &mut got, None) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no end within 60 s\n{}",
            cp.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(deltas(&got), expected_deltas(n), "{}", cp.log());
    // The chunks acknowledged before the kill (the daemon deleted them) are served from the
    // store: a reader from the start gets the whole stream, no `truncated`.
    let mut again = Vec::new();
    assert!(read(&mut open_sse(&cp, &sid, &x, None), &mut again, None));
    assert_eq!(again, got);
    drop(daemon);
    if let Some(pid) = fake_pid {
        codemantle_tests::session_rig::kill_fake_group(pid);
    }
}
