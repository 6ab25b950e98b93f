//! Fault: `kill -9` of the control plane while a request with an `Idempotency-Key` is in
//! flight, then a restart and the client's retry with the same key.
//!
//! The key's claim was already in the store when the server died, with no response. The retry
//! must run at once (the claim is left over: nobody works on it any more) and reach the daemon
//! with the same derived request id, so the daemon's journal answers if the command already ran
//! — not get 409 `idempotency_key_in_progress` until the claim's 5-minute lease runs out.
//! (Found by the soak, `cm-soak`: every control-plane kill that caught a request mid-flight
//! stalled its client for the whole lease.)
//!
//! "In flight" is made deterministic with `SIGSTOP` on the daemon: the request sits in its
//! socket, so the control plane has claimed the key and dispatched, and nothing answers.

use std::time::Duration;

use codemantle_control_plane::client::{Client, Request, Response};
use codemantle_tests::fault::{freeze, tcp_rx_queue, thaw};
use codemantle_tests::harness::{ControlPlane, CpOptions, Daemon, names, wait_until};
use serde_json::json;

fn mkdir(cp: &ControlPlane, id: &str, key: &str, path: &str) -> Response {
    let mut client = cp.client();
    client.timeout = Duration::from_secs(60);
    send_mkdir(&client, id, key, path)
}

fn send_mkdir(client: &Client, id: &str, key: &str, path: &str) -> Response {
    smol::block_on(
        client.send(
            Request::new("POST", &format!("/devices/{id}/mkdir"))
                .header("idempotency-key", key)
                .json(&json!({ "path": path })),
        ),
    )
    .unwrap_or_else(|e| Response {
        status: 0,
        headers: Vec::new(),
        body: e.to_string().into_bytes(),
    })
}

#[test]
fn a_request_cut_by_a_control_plane_kill_is_retried_at_once_and_runs_once() {
    let mut cp = ControlPlane::start_with(CpOptions {
        // Long enough that only the kill ends the first request.
        config: Some("[tunnel]\nrequest_timeout_secs = 60\n".into()),
        ..CpOptions::default()
    });
    let dev = cp.add_device("cut-mid-request");
    let mut daemon = Daemon::start(&cp.ws_url(), &dev);
    cp.wait_online(&dev.id);

    let pid = daemon.pid().expect("daemon running");
    freeze(pid);
    let unread = tcp_rx_queue(pid, cp.port).expect("the daemon's tunnel socket");
    let mut client = cp.client();
    client.timeout = Duration::from_secs(60);
    let port = cp.port;
    std::thread::scope(|s| {
        let first = s.spawn(|| send_mkdir(&client, &dev.id, "cut-0001", "made"));
        wait_until(
            Duration::from_secs(10),
            "the request in the stopped daemon's socket",
            || tcp_rx_queue(pid, port).is_some_and(|n| n > unread),
        );
        // The claim is written before dispatch; let the store's periodic flush (500 ms) make
        // it durable, as a crash a little later would find it.
        std::thread::sleep(Duration::from_millis(1500));
        cp.kill();
        let answer = first.join().expect("request thread");
        assert_ne!(
            answer.status, 200,
            "the first request cannot have been answered"
        );
    });
    thaw(pid);
    cp.spawn();
    cp.wait_online(&dev.id);

    // The retry with the same key runs now, not after the lease.
    let retry = mkdir(&cp, &dev.id, "cut-0001", "made");
    assert_eq!(
        retry.status,
        200,
        "{}\n--- control plane log ---\n{}",
        retry.text(),
        cp.log()
    );
    assert_eq!(names(&daemon.root), ["made"]);
    // A further retry is a replay; the directory is still made once.
    let again = mkdir(&cp, &dev.id, "cut-0001", "made");
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(names(&daemon.root), ["made"]);
    daemon.kill();
}
