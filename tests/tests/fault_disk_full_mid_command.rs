//! Fault: the control plane's disk fills up while a mutating command is in flight.
//!
//! The command passed the "disk full?" check before dispatch and ran on the daemon, but its
//! `command` event can no longer be recorded. Answering 200 would leave a change the event log
//! never shows (found by `cm-soak`: acknowledged commands without their event). What it
//! proves:
//! - the answer is 507 `storage_full`, saying the command ran but was not recorded and to retry
//!   with the same Idempotency-Key;
//! - after freeing space (and a restart if sled latched its own ENOSPC, as the watchdog would
//!   do), the retry is answered 200 from the daemon's journal, the directory exists once, and
//!   the log has the command's `ok` event.
//!
//! "In flight" is deterministic: the daemon is stopped (`SIGSTOP`) while the request sits in
//! its socket, the disk is filled, then the daemon resumes. Needs root (tmpfs mount).

use std::time::Duration;

use codemantle_control_plane::client::{Request, Response};
use codemantle_tests::fault::{Tmpfs, freeze, tcp_rx_queue, thaw};
use codemantle_tests::harness::{ControlPlane, CpOptions, Daemon, names, wait_until};
use serde_json::json;

fn mkdir(cp: &ControlPlane, id: &str) -> Response {
    cp.send(
        Request::new("POST", &format!("/devices/{id}/mkdir"))
            .header("idempotency-key", "full-mid-0001")
            .json(&json!({ "path": "made" })),
    )
}

#[test]
fn a_command_that_ran_but_could_not_be_recorded_is_not_answered_as_done() {
    let tmpfs = Tmpfs::mount(16 * 1024 * 1024).unwrap_or_else(|e| panic!("{e}"));
    let mut cp = ControlPlane::start_with(CpOptions {
        data_dir: Some(tmpfs.path().join("data")),
        ..CpOptions::default()
    });
    let dev = cp.add_device("full-mid-command");
    let daemon = Daemon::start(&cp.ws_url(), &dev);
    cp.wait_online(&dev.id);

    let pid = daemon.pid().expect("daemon running");
    freeze(pid);
    let unread = tcp_rx_queue(pid, cp.port).expect("the daemon's tunnel socket");
    let filler = std::thread::scope(|s| {
        let first = s.spawn(|| mkdir(&cp, &dev.id));
        wait_until(
            Duration::from_secs(10),
            "the request in the stopped daemon's socket",
            || tcp_rx_queue(pid, cp.port).is_some_and(|n| n > unread),
        );
        let filler = tmpfs.fill("filler");
        thaw(pid);
        let answer = first.join().expect("request thread");
        let body = answer.json();
        assert_eq!(answer.status, 507, "{}\n{}", answer.text(), cp.log());
        assert_eq!(body["error"], "storage_full", "{body}");
        let message = body["message"].as_str().unwrap_or("");
        assert!(
            message.contains("could not record") && message.contains("Idempotency-Key"),
            "the message should say the command ran unrecorded and how to retry: {message:?}"
        );
        filler
    });
    // It did run on the host.
    assert_eq!(names(&daemon.root), ["made"]);

    std::fs::remove_file(&filler).expect("remove the filler");
    let healthy = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        cp.get("/health").0 == 200
    });
    if !healthy {
        // sled latched its own ENOSPC: a restart brings writes back (the watchdog's job).
        cp.kill();
        cp.spawn();
        cp.wait_online(&dev.id);
    }
    let retry = mkdir(&cp, &dev.id);
    assert_eq!(retry.status, 200, "{}\n{}", retry.text(), cp.log());
    assert_eq!(names(&daemon.root), ["made"], "ran once");
    let recorded = cp.events_after(0).iter().any(|e| {
        e["kind"] == "command"
            && e["detail"]["device"] == dev.id.as_str()
            && e["detail"]["type"] == "md"
            && e["detail"]["outcome"] == "ok"
    });
    assert!(recorded, "no ok md command event in the log");
    drop(daemon);
    drop(cp);
    drop(tmpfs);
}
