//! Fault: `kill -9` of a real daemon with a command in flight, then a restart.
//!
//! "In flight" is made deterministic with `SIGSTOP`: the stopped daemon holds its socket, so the
//! control plane dispatches the request into it, and nothing runs until we say so.
//!
//! - Killed before it ran the command: the API answers 502 `device_disconnected` at once, the
//!   device goes offline, the restarted daemon reconnects (offline → online, last-seen and
//!   online-since advance), and the retry with the same `Idempotency-Key` runs the command
//!   exactly once; a further retry is replayed by the control plane.
//! - Killed after it ran the command but before the control plane got the answer (the request
//!   had timed out): the retry with the same key reaches the restarted daemon with the same
//!   `ik`, and the daemon answers from its journal (which survived `kill -9`) instead of
//!   running the command again.

use std::time::{Duration, Instant};

use codemantle_control_plane::client::{Request, Response};
use codemantle_tests::fault::{freeze, tcp_rx_queue, thaw};
use codemantle_tests::harness::{ControlPlane, CpOptions, Daemon, names, wait_until};
use serde_json::{Value, json};

fn rename(cp: &ControlPlane, id: &str, key: &str, from: &str, to: &str) -> Response {
    cp.send(
        Request::new("POST", &format!("/devices/{id}/rename"))
            .header("idempotency-key", key)
            .json(&json!({"source": from, "dest": to})),
    )
}

fn device(cp: &ControlPlane, id: &str) -> Value {
    let (status, body) = cp.get(&format!("/devices/{id}"));
    assert_eq!(status, 200, "{body}");
    body["device"].clone()
}

fn assert_error_body(r: &Response, code: &str) {
    let body = r.json();
    assert_eq!(body["error"], code, "{} {}", r.status, r.text());
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.text()
    );
}

#[test]
fn killed_before_running_the_command_then_the_retry_runs_it_once() {
    let t0 = Instant::now();
    let mut cp = ControlPlane::start();
    let dev = cp.add_device("fault-kill-a");
    let id = dev.id.clone();
    let before = device(&cp, &id);
    assert_eq!(before["status"], "never-seen", "{before}");
    assert!(before["last_seen_ms"].is_null(), "{before}");

    let mut daemon = Daemon::start(&cp.ws_url(), &dev);
    cp.wait_online(&id);
    let first = device(&cp, &id);
    let since_1 = first["online_since_ms"].as_u64().expect("online since");
    let seen_1 = first["last_seen_ms"].as_u64().expect("last seen");
    std::fs::create_dir(daemon.path("a")).unwrap();

    // The daemon hangs; the rename is dispatched into its socket and waits there.
    let pid = daemon.pid().expect("daemon running");
    freeze(pid);
    let unread = tcp_rx_queue(pid, cp.port).expect("the daemon's tunnel socket");
    let answer = std::thread::scope(|s| {
        let call = s.spawn(|| rename(&cp, &id, "kill-a-0001", "a", "b"));
        wait_until(
            Duration::from_secs(10),
            "the request in the stopped daemon's socket",
            || tcp_rx_queue(pid, cp.port).is_some_and(|n| n > unread),
        );
        let killed_at = Instant::now();
        daemon.kill();
        let answer = call.join().expect("request thread");
        // The control plane notices the dead socket at once, not after its request timeout.
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "answered {:?} after the kill",
            killed_at.elapsed()
        );
        answer
    });
    assert_eq!(answer.status, 502, "{}", answer.text());
    assert_error_body(&answer, "device_disconnected");
    assert_eq!(
        names(&daemon.root),
        ["a"],
        "the stopped daemon never ran it"
    );

    wait_until(Duration::from_secs(10), "device offline", || {
        device(&cp, &id)["status"] == "offline"
    });
    let offline = device(&cp, &id);
    assert!(offline["online_since_ms"].is_null(), "{offline}");
    assert!(
        offline["last_seen_ms"].as_u64().expect("last seen") >= seen_1,
        "{offline}"
    );

    // Same data dir (journal), new process.
    daemon.spawn();
    cp.wait_online(&id);
    let again = device(&cp, &id);
    let since_2 = again["online_since_ms"].as_u64().expect("online since");
    let seen_2 = again["last_seen_ms"].as_u64().expect("last seen");
    assert!(since_2 > since_1, "online since {since_1} → {since_2}");
    assert!(seen_2 > seen_1, "last seen {seen_1} → {seen_2}");

    // The retry runs the rename (the key was released by the failure) — once.
    let retry = rename(&cp, &id, "kill-a-0001", "a", "b");
    assert_eq!(retry.status, 200, "{}\n{}", retry.text(), daemon.log());
    assert_eq!(retry.header("idempotent-replayed"), Some("false"));
    assert_eq!(names(&daemon.root), ["b"]);
    // And again: answered from the control plane's record, nothing sent.
    let replay = rename(&cp, &id, "kill-a-0001", "a", "b");
    assert_eq!(replay.status, 200, "{}", replay.text());
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, retry.body);
    assert_eq!(names(&daemon.root), ["b"]);

    // The event log tells the story: connected, disconnected, connected, and the commands.
    let (status, events) = cp.get("/events?after=0&limit=1000");
    assert_eq!(status, 200);
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["detail"]["device"] == id.as_str())
        .filter_map(|e| e["kind"].as_str())
        .collect();
    let lifecycle: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| matches!(*k, "device.connected" | "device.disconnected"))
        .collect();
    assert_eq!(
        lifecycle,
        [
            "device.connected",
            "device.disconnected",
            "device.connected"
        ],
        "{kinds:?}"
    );
    eprintln!("daemon kill before the command ran: {:?}", t0.elapsed());
}

#[test]
fn killed_after_running_the_command_then_the_retry_is_answered_from_its_journal() {
    let t0 = Instant::now();
    let mut cp = ControlPlane::start_with(CpOptions {
        // A short request timeout, and the tunnel's debug log to see the late reply arrive.
        config: Some("[tunnel]\nrequest_timeout_secs = 2\n".into()),
        env: vec![(
            "CODEMANTLE_LOG".into(),
            "info,codemantle_control_plane::tunnel=debug".into(),
        )],
        ..CpOptions::default()
    });
    let dev = cp.add_device("fault-kill-b");
    let id = dev.id.clone();
    let mut daemon = Daemon::start(&cp.ws_url(), &dev);
    cp.wait_online(&id);
    std::fs::create_dir(daemon.path("c")).unwrap();

    let pid = daemon.pid().expect("daemon running");
    freeze(pid);
    let timed_out = rename(&cp, &id, "kill-b-0001", "c", "d");
    assert_eq!(timed_out.status, 504, "{}", timed_out.text());
    assert_error_body(&timed_out, "request_timeout");
    assert_eq!(names(&daemon.root), ["c"]);

    // The daemon wakes up, runs the rename, records the outcome, answers — too late.
    thaw(pid);
    wait_until(Duration::from_secs(10), "the late reply", || {
        cp.log().contains("reply nobody waits for")
    });
    assert_eq!(names(&daemon.root), ["d"]);
    daemon.kill();
    daemon.spawn();
    cp.wait_online(&id);

    // Same key → same `ik` → the daemon's journal answers; running it again would fail
    // (there is no `c` any more), as a fresh key shows.
    let retry = rename(&cp, &id, "kill-b-0001", "c", "d");
    assert_eq!(retry.status, 200, "{}\n{}", retry.text(), daemon.log());
    assert_eq!(retry.json()["o"], 1, "{}", retry.text());
    assert_eq!(names(&daemon.root), ["d"]);
    assert!(
        daemon
            .log()
            .contains("re-sent request answered from the journal"),
        "{}",
        daemon.log()
    );
    let fresh = rename(&cp, &id, "kill-b-0002", "c", "d");
    assert_eq!(fresh.status, 400, "{}", fresh.text());
    assert_eq!(names(&daemon.root), ["d"]);
    eprintln!("daemon kill after the command ran: {:?}", t0.elapsed());
}
