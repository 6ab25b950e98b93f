//! End to end with the real binaries on loopback: the HTTP API drives a real daemon's file
//! operations through the real control plane, survives a control-plane crash, and does not run
//! a retried mutating command twice.

use codemantle_control_plane::client::Request;
use codemantle_tests::harness::{ControlPlane, Daemon, names};
use serde_json::json;

fn setup() -> (ControlPlane, Daemon, String) {
    let mut cp = ControlPlane::start();
    let dev = cp.add_device("e2e-files");
    let daemon = Daemon::start(&cp.ws_url(), &dev);
    cp.wait_online(&dev.id);
    (cp, daemon, dev.id)
}

#[test]
fn list_mkdir_rename_rmdir_through_the_api() {
    let (cp, daemon, id) = setup();
    std::fs::write(daemon.path("hello.txt"), b"hello world").unwrap();
    std::fs::create_dir(daemon.path("src")).unwrap();

    let (status, ds) = cp.post(&format!("/devices/{id}/dir"), json!({"path": "."}));
    assert_eq!(status, 200, "{ds}");
    let entries = ds["e"].as_array().expect("entries").clone();
    assert_eq!(entries.len(), 2, "{ds}");
    assert_eq!(entries[0][0], "f");
    assert_eq!(entries[0][1], "hello.txt");
    assert_eq!(entries[0][2], 11, "real size");
    assert_eq!(entries[1][0], "d");
    assert_eq!(entries[1][1], "src");

    let (status, body) = cp.post(&format!("/devices/{id}/mkdir"), json!({"path": "build"}));
    assert_eq!(status, 200, "{body}");
    assert!(daemon.path("build").is_dir());

    let (status, body) = cp.post(
        &format!("/devices/{id}/rename"),
        json!({"source": "build", "dest": "out"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&daemon.root), ["hello.txt", "out", "src"]);

    let (status, body) = cp.post(&format!("/devices/{id}/rmdir"), json!({"path": "out"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&daemon.root), ["hello.txt", "src"]);

    // The guard answers an escape with a clear error, and nothing outside changes.
    let (status, body) = cp.post(
        &format!("/devices/{id}/mkdir"),
        json!({"path": "../escaped"}),
    );
    assert!((400..500).contains(&status), "{status} {body}");
    assert!(!daemon.root.parent().unwrap().join("escaped").exists());

    // Every command is in the event log with its outcome.
    let (status, events) = cp.get("/events?after=0&limit=500");
    assert_eq!(status, 200);
    let commands: Vec<&serde_json::Value> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "command")
        .collect();
    assert!(commands.len() >= 5, "{events}");
}

#[test]
fn control_plane_crash_and_restart_then_the_next_command_works() {
    let (mut cp, daemon, id) = setup();
    cp.kill();
    cp.spawn();
    cp.wait_online(&id);
    let (status, body) = cp.post(
        &format!("/devices/{id}/mkdir"),
        json!({"path": "after-restart"}),
    );
    assert_eq!(status, 200, "{body}\n{}", daemon.log());
    assert!(daemon.path("after-restart").is_dir());
}

#[test]
fn a_retried_mutating_command_runs_once() {
    let (cp, daemon, id) = setup();
    std::fs::create_dir(daemon.path("a")).unwrap();
    let rename = |key: &str| {
        cp.send(
            Request::new("POST", &format!("/devices/{id}/rename"))
                .header("idempotency-key", key)
                .json(&json!({"source": "a", "dest": "b"})),
        )
    };
    let first = rename("retry-0001");
    assert_eq!(first.status, 200, "{}", first.text());
    // A second rename a→b would fail (a no longer exists): the retry must be answered from
    // the record, with the same body, and change nothing.
    let second = rename("retry-0001");
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(second.body, first.body);
    assert_eq!(names(&daemon.root), ["b"]);
    // A different key is a new command: it runs, and fails because `a` is gone.
    let third = rename("retry-0002");
    assert!(
        (400..500).contains(&third.status),
        "{} {}",
        third.status,
        third.text()
    );
}
