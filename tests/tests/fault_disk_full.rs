//! Fault: the control plane's disk fills up.
//!
//! The data dir sits on an 8 MiB tmpfs mounted inside the test's temp dir; a filler file takes
//! every free byte. What it proves:
//! - mutating API calls (device and token creation, device commands with and without an
//!   `Idempotency-Key`) fail with 507 `{"error":"storage_full","message":...}` telling the
//!   operator the disk is full and what to do; nothing is half-done (no device created, no
//!   command run on the host);
//! - reads keep working (devices, events, a read-only device command), `/health` says
//!   `storage_full`, and the server stays up;
//! - once the filler is deleted, writes work again without a restart;
//! - after a restart everything committed before is still there, nothing refused is, and the
//!   event sequence has no gap.

use std::time::Duration;

use codemantle_control_plane::client::{Request, Response};
use codemantle_control_plane::store::sled::MIN_FREE_BYTES;
use codemantle_tests::fault::Tmpfs;
use codemantle_tests::harness::{ControlPlane, CpOptions, Daemon, assert_gap_free, names};
use serde_json::{Value, json};

const TMPFS_BYTES: u64 = 8 * 1024 * 1024;

fn device_names(cp: &ControlPlane) -> Vec<String> {
    let (status, body) = cp.get("/devices");
    assert_eq!(status, 200, "{body}");
    let mut v: Vec<String> = body["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["name"].as_str().unwrap_or("").to_owned())
        .collect();
    v.sort();
    v
}

fn mkdir(cp: &ControlPlane, id: &str, path: &str, key: Option<&str>) -> Response {
    let mut req =
        Request::new("POST", &format!("/devices/{id}/mkdir")).json(&json!({ "path": path }));
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    cp.send(req)
}

fn assert_storage_full(status: u16, body: &Value) {
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"], "storage_full", "{body}");
    let message = body["message"].as_str().unwrap_or("");
    assert!(
        message.contains("full") && message.contains("Free space"),
        "the message should say the disk is full and what to do: {message:?}"
    );
}

#[test]
fn a_full_disk_refuses_writes_clearly_then_recovers() {
    let tmpfs = Tmpfs::mount(TMPFS_BYTES).unwrap_or_else(|e| panic!("{e}"));
    let mut cp = ControlPlane::start_with(CpOptions {
        data_dir: Some(tmpfs.path().join("data")),
        ..CpOptions::default()
    });
    let dev = cp.add_device("disk-full");
    let daemon = Daemon::start(&cp.ws_url(), &dev);
    cp.wait_online(&dev.id);

    // Committed before the disk fills.
    let (status, body) = cp.post("/devices", json!({"name": "before-full"}));
    assert_eq!(status, 201, "{body}");
    let (status, body) = cp.post("/tokens", json!({"name": "ci", "role": "viewer"}));
    assert_eq!(status, 201, "{body}");
    let r = mkdir(&cp, &dev.id, "before", Some("full-0001"));
    assert_eq!(r.status, 200, "{}", r.text());
    // Let the store's periodic flush (500 ms) write what is pending, so the filler below only
    // competes with the writes this test makes.
    std::thread::sleep(Duration::from_millis(1200));
    let events_before = cp.events_after(0);
    assert_gap_free(&events_before, 1);

    let filler = tmpfs.fill("filler");
    assert!(tmpfs.free_bytes() < MIN_FREE_BYTES);

    // Writes: refused, clearly, and nothing happens.
    let (status, body) = cp.post("/devices", json!({"name": "while-full"}));
    assert_storage_full(status, &body);
    let (status, body) = cp.post("/tokens", json!({"name": "full", "role": "viewer"}));
    assert_storage_full(status, &body);
    let r = mkdir(&cp, &dev.id, "while-full-keyed", Some("full-0002"));
    assert_storage_full(r.status, &r.json());
    let r = mkdir(&cp, &dev.id, "while-full", None);
    assert_storage_full(r.status, &r.json());
    assert_eq!(names(&daemon.root), ["before"], "no command ran unrecorded");

    // Reads: fine. /health tells what is wrong.
    assert_eq!(device_names(&cp), ["before-full", "disk-full"]);
    assert_eq!(cp.events_after(0), events_before);
    let (status, body) = cp.post(&format!("/devices/{}/dir", dev.id), json!({"path": "."}));
    assert_eq!(status, 200, "{body}");
    let (status, health) = cp.get("/health");
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["error"], "storage_full", "{health}");
    assert_eq!(health["store"], "full", "{health}");

    // Space again: writes work at once, no restart.
    std::fs::remove_file(&filler).expect("remove the filler");
    let (status, health) = cp.get("/health");
    assert_eq!(status, 200, "{health}\n{}", cp.log());
    let (status, body) = cp.post("/devices", json!({"name": "after-free"}));
    assert_eq!(status, 201, "{body}\n{}", cp.log());
    // The refused keyed request left no claim behind: its key is free for a new request.
    let r = mkdir(&cp, &dev.id, "after", Some("full-0002"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(names(&daemon.root), ["after", "before"]);
    let events_freed = cp.events_after(0);
    assert_gap_free(&events_freed, 1);
    assert_eq!(&events_freed[..events_before.len()], &events_before[..]);

    // A restart finds everything committed, nothing refused, and no gap.
    cp.stop();
    cp.spawn();
    assert_eq!(
        device_names(&cp),
        ["after-free", "before-full", "disk-full"]
    );
    let events_after = cp.events_after(0);
    assert_gap_free(&events_after, 1);
    assert_eq!(&events_after[..events_freed.len()], &events_freed[..]);
    let (status, tokens) = cp.get("/tokens");
    assert_eq!(status, 200, "{tokens}");
    let token_names: Vec<&str> = tokens["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(token_names.contains(&"ci"), "{tokens}");
    assert!(!token_names.contains(&"full"), "{tokens}");
    assert!(!cp.log().contains("panicked"), "{}", cp.log());
    drop(daemon);
    drop(cp);
    drop(tmpfs);
}
