//! JIT credential renewal (`jr` → `ju`, native only): a renewed session outlives its first
//! expiry, one not renewed ends at it; the new expiry survives a daemon restart; a revoked
//! credential, an ended or unknown session, a session without a credential and a lifetime
//! outside 15..=3600 s are refused with a clear code and change nothing. Against the fake
//! OpenCode in the real sandbox, with an injected clock.
//!
//! SAFETY: every file is inside each test's temp dir; only loopback ports of the fixture's
//! own range are bound.

mod session_support;

use std::time::Duration;

use codemantle_daemon::guard::process::procfs;
use codemantle_daemon::session::registry::SessionState;
use codemantle_daemon::session::{Clock, SessionManager};
use codemantle_protocol::message::{JitCredential, JitKill, JitRenew, Message};
use session_support::{World, manual_clock, si, start, start_with, wait_until};

#[test]
fn fake_opencode_entry() {
    session_support::fake_opencode::main_if_requested();
}

const BASE: u16 = 47100;
const LONG: Duration = Duration::from_secs(20);

fn credential(expires_at_ms: u64, credential_ref: &str) -> JitCredential {
    JitCredential {
        token: format!("jit.renew-test-token-{credential_ref}"),
        expires_at_ms,
        scope: Some("opencode:session".to_owned()),
        env_name: None,
        credential_ref: Some(credential_ref.to_owned()),
        env: Vec::new(),
    }
}

/// `jr` → (`o`, `e`, `m`).
fn renew(m: &SessionManager, session: &str, ttl_secs: u32) -> (bool, Option<u64>, Option<String>) {
    let req = JitRenew {
        request_id: 5,
        session_id: session.to_owned(),
        ttl_secs,
        idempotency_key: None,
    };
    match smol::block_on(m.renew_credential(req)) {
        Message::JitRenewResult(r) => {
            assert_eq!(r.request_id, 5);
            (r.ok, r.expires_at_ms, r.message)
        }
        other => panic!("expected ju, got {other:?}"),
    }
}

fn expiry_of(m: &SessionManager, id: &str) -> Option<u64> {
    m.sessions()
        .into_iter()
        .find(|s| s.id == id)
        .and_then(|s| s.jit_expires_at_ms)
}

fn ended_reason(m: &SessionManager, id: &str) -> String {
    match m.record(id).map(|r| r.state) {
        Some(SessionState::Ended { reason, .. }) => reason,
        other => panic!("{id} has not ended: {other:?}"),
    }
}

fn running(m: &SessionManager) -> Vec<String> {
    m.sessions().into_iter().map(|s| s.id).collect()
}

#[test]
fn a_renewed_session_outlives_its_first_expiry_and_one_not_renewed_ends() {
    let w = World::new(BASE);
    let clock = manual_clock();
    let journal = w.journal();
    let m = w.manager_with_clock(&journal, clock.clone());
    let first = clock.now_ms() + 30_000;
    assert!(
        start_with(
            &m,
            si("sessRenew", "proj-a", Some(credential(first, "ref-r")))
        )
        .ok
    );
    assert!(
        start_with(
            &m,
            si("sessKeep", "proj-b", Some(credential(first, "ref-k")))
        )
        .ok
    );

    clock.advance(Duration::from_secs(10));
    let (ok, expires, why) = renew(&m, "sessRenew", 120);
    assert!(ok, "{why:?}");
    assert_eq!(why, None);
    // 120 s from the daemon's now, not from the first expiry.
    let renewed = clock.now_ms() + 120_000;
    assert_eq!(expires, Some(renewed));
    assert_eq!(expiry_of(&m, "sessRenew"), Some(renewed));
    assert_eq!(expiry_of(&m, "sessKeep"), Some(first));
    let process = m
        .sessions()
        .into_iter()
        .find(|s| s.id == "sessRenew")
        .unwrap()
        .process;

    // Past the first expiry: only the session that was not renewed ends.
    clock.advance(Duration::from_secs(21));
    smol::block_on(m.sweep());
    assert_eq!(running(&m), ["sessRenew"]);
    assert_eq!(ended_reason(&m, "sessKeep"), "jit_expired");
    assert!(process.is_alive());
    // An ended session cannot be renewed.
    let (ok, expires, why) = renew(&m, "sessKeep", 120);
    assert!(!ok);
    assert_eq!(expires, None);
    assert_eq!(why.as_deref(), Some("session_ended"));

    // The renewed expiry is enforced in turn.
    clock.advance(Duration::from_millis(renewed - clock.now_ms()));
    smol::block_on(m.sweep());
    assert!(running(&m).is_empty());
    assert_eq!(ended_reason(&m, "sessRenew"), "jit_expired");
    wait_until("the renewed session's group to be gone", LONG, || {
        procfs::group_members(process.pid).is_empty()
    });
}

#[test]
fn the_renewed_expiry_survives_a_restart() {
    let w = World::new(BASE + 200);
    let clock = manual_clock();
    let first = clock.now_ms() + 30_000;
    let renewed = {
        let journal = w.journal();
        let m = w.manager_with_clock(&journal, clock.clone());
        assert!(
            start_with(
                &m,
                si("sessRestart", "proj-a", Some(credential(first, "ref-s")))
            )
            .ok
        );
        let (ok, expires, why) = renew(&m, "sessRestart", 600);
        assert!(ok, "{why:?}");
        expires.unwrap()
    };
    assert_eq!(renewed, clock.now_ms() + 600_000);
    let journal = w.journal();
    let m = w.manager_with_clock(&journal, clock.clone() as std::sync::Arc<dyn Clock>);
    assert_eq!(expiry_of(&m, "sessRestart"), Some(renewed));
    clock.advance(Duration::from_secs(31));
    smol::block_on(m.sweep());
    assert_eq!(running(&m), ["sessRestart"]);
    assert!(renew(&m, "sessRestart", 15).0);
    let stop = session_support::stop(&m, "sessRestart");
    assert!(stop.ok, "{stop:?}");
}

#[test]
fn refused_renewals_change_nothing() {
    let w = World::new(BASE + 400);
    let clock = manual_clock();
    let journal = w.journal();
    let m = w.manager_with_clock(&journal, clock.clone());
    let first = clock.now_ms() + 60_000;
    assert!(
        start_with(
            &m,
            si("sessBad", "proj-a", Some(credential(first, "ref-b")))
        )
        .ok
    );
    assert!(start(&m, "sessPlain", "proj-b").ok);

    for (session, ttl, code) in [
        ("sessBad", 14, "invalid_ttl"),
        ("sessBad", 0, "invalid_ttl"),
        ("sessBad", 3601, "invalid_ttl"),
        ("sessPlain", 600, "no_jit_credential"),
        ("sessNever", 600, "session_not_found"),
    ] {
        let (ok, expires, why) = renew(&m, session, ttl);
        assert!(!ok, "{session} {ttl}");
        assert_eq!(expires, None);
        assert_eq!(why.as_deref(), Some(code), "{session} {ttl}");
    }
    assert_eq!(expiry_of(&m, "sessBad"), Some(first));
    // The bounds themselves are accepted.
    assert!(renew(&m, "sessBad", 15).0);
    assert!(renew(&m, "sessBad", 3600).0);
    assert_eq!(expiry_of(&m, "sessBad"), Some(clock.now_ms() + 3_600_000));

    // Revoked by the kill switch: cannot be renewed, and the revocation is what it says.
    let kill = JitKill {
        request_id: 9,
        session_id: None,
        credential_ref: Some("ref-b".to_owned()),
        close_tunnel: false,
        reason: Some("test".to_owned()),
        idempotency_key: None,
    };
    match smol::block_on(m.kill_switch(kill)) {
        Message::JitKillResult(r) => assert_eq!((r.ok, r.affected), (true, 1)),
        other => panic!("expected jv, got {other:?}"),
    }
    let (ok, _, why) = renew(&m, "sessBad", 600);
    assert!(!ok);
    assert_eq!(why.as_deref(), Some("jit_revoked"));
    // Still after a restart.
    drop(m);
    drop(journal);
    let journal = w.journal();
    let m = w.manager_with_clock(&journal, clock.clone() as std::sync::Arc<dyn Clock>);
    let (ok, _, why) = renew(&m, "sessBad", 600);
    assert!(!ok);
    assert_eq!(why.as_deref(), Some("jit_revoked"));
    assert!(session_support::stop(&m, "sessPlain").ok);
}
