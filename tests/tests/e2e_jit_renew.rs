//! JIT credential renewal end to end with the real binaries: two sessions start through the
//! HTTP API with a 16 s credential (each on its own control plane + daemon, OpenCode is
//! `cm-fake-opencode` run through the process guard); one is renewed with
//! `POST /sessions/:sid/jit/renew` (`jr` → `ju` over the native tunnel), the other is not.
//! The one not renewed ends at its expiry (`jit_expired`); the renewed one is still running,
//! same OpenCode process, after its original expiry. Bad input is refused before anything is
//! sent, and an unknown session is a 404.
//!
//! SAFETY RULES (these tests run as root on a shared machine):
//! - every file is inside the harness's temp dirs (see `codemantle_tests::session_rig`);
//! - the network is 127.0.0.1 only.

use std::time::{Duration, Instant};

use codemantle_tests::harness::CpOptions;
use codemantle_tests::session_rig::SessionRig;
use serde_json::json;

const TTL_SECS: u64 = 16;

fn rig() -> SessionRig {
    SessionRig::start_with(
        CpOptions::default(),
        "",
        Some(json!({ "ttlSec": TTL_SECS, "ref": "e2e-renew" })),
    )
}

fn running(rig: &SessionRig) -> bool {
    rig.status()["o"] == 1
}

#[test]
fn a_renewed_session_outlives_its_first_expiry_and_one_not_renewed_ends() {
    let started = Instant::now();
    let renewed = rig();
    let plain = rig();
    let original_expiry = started + Duration::from_secs(TTL_SECS);
    let pid = renewed
        .opencode_pid()
        .expect("the renewed session's OpenCode runs");
    assert!(running(&plain));

    // Refused before anything is sent: ttl out of range or missing, unknown session.
    let path = format!("/sessions/{}/jit/renew", renewed.sid);
    for bad in [
        json!({ "ttl_secs": 14 }),
        json!({ "ttl_secs": 3601 }),
        json!({}),
        json!({ "ttl_secs": "60" }),
    ] {
        let (status, body) = renewed.cp.post(&path, bad.clone());
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"], "invalid_jit_ttl", "{bad}: {body}");
    }
    let (status, body) = renewed
        .cp
        .post("/sessions/ses_nobody/jit/renew", json!({ "ttl_secs": 60 }));
    assert_eq!(status, 404, "{body}");

    // Renew: the daemon answers with the new expiry, about 120 s from now.
    let before_ms = now_ms();
    let (status, body) = renewed.cp.post(&path, json!({ "ttl_secs": 120 }));
    assert_eq!(status, 200, "{body}\n{}", renewed.daemon.log());
    assert_eq!(body["t"], "ju", "{body}");
    assert_eq!(body["o"], 1, "{body}");
    let expires = body["e"].as_u64().expect("new expiry");
    assert!(
        expires >= before_ms + 120_000 && expires <= now_ms() + 120_000,
        "{expires} is not 120 s from now"
    );

    // The session that was not renewed ends at its expiry (the daemon sweeps every second).
    let deadline = original_expiry + Duration::from_secs(15);
    while running(&plain) {
        assert!(
            Instant::now() < deadline,
            "the session without renewal still runs"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(Instant::now() >= original_expiry - Duration::from_secs(1));
    let (status, body) = plain.cp.post(
        &format!("/sessions/{}/jit/renew", plain.sid),
        json!({ "ttl_secs": 60 }),
    );
    assert_eq!(status, 400, "an ended session cannot be renewed: {body}");
    assert_eq!(body["m"], "session_ended", "{body}");

    // Past its original expiry (plus two sweeps), the renewed one still runs, same process.
    while Instant::now() < original_expiry + Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(running(&renewed), "{}", renewed.daemon.log());
    assert_eq!(renewed.opencode_pid(), Some(pid));
    // And it still takes prompts.
    renewed.prompt("emit 1");

    // Each renewal is a `command` event like the other commands: one `jr` per control plane
    // (the refused requests never reached a device).
    for (rig, outcome) in [(&renewed, Some("ok")), (&plain, None)] {
        let (status, events) = rig.cp.get("/events?after=0&limit=500");
        assert_eq!(status, 200, "{events}");
        let renewals: Vec<&serde_json::Value> = events["events"]
            .as_array()
            .expect("events")
            .iter()
            .filter(|e| e["kind"] == "command" && e["detail"]["type"] == "jr")
            .collect();
        assert_eq!(renewals.len(), 1, "{events}");
        if let Some(outcome) = outcome {
            assert_eq!(renewals[0]["detail"]["outcome"], outcome, "{events}");
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
