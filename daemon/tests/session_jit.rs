//! JIT credentials on sessions: checks at start, injection into OpenCode's environment (never
//! into its output), expiry (with an injected clock), and the kill switch, whose revocations
//! survive a restart. Against the fake OpenCode in the real sandbox.
//!
//! SAFETY: every file is inside each test's temp dir; only loopback ports of the fixture's
//! own range are bound.

mod session_support;

use std::sync::Arc;
use std::time::Duration;

use codemantle_daemon::guard::process::procfs;
use codemantle_daemon::session::registry::SessionState;
use codemantle_daemon::session::{Clock, SessionManager};
use codemantle_protocol::message::{JitCredential, JitKill, Message, Pair};
use session_support::{
    World, collect_stream, manual_clock, prompt, records, si, start, start_with, wait_until,
};

#[test]
fn fake_opencode_entry() {
    session_support::fake_opencode::main_if_requested();
}

const BASE: u16 = 44100;
const LONG: Duration = Duration::from_secs(20);
const TOKEN: &str = "jit.test-token-0123456789abcdef";

fn credential(expires_at_ms: u64, credential_ref: Option<&str>) -> JitCredential {
    JitCredential {
        token: TOKEN.to_owned(),
        expires_at_ms,
        scope: Some("opencode:session".to_owned()),
        env_name: None,
        credential_ref: credential_ref.map(str::to_owned),
        env: Vec::new(),
    }
}

fn kill(m: &SessionManager, session: Option<&str>, credential_ref: Option<&str>) -> (bool, u32) {
    let req = JitKill {
        request_id: 9,
        session_id: session.map(str::to_owned),
        credential_ref: credential_ref.map(str::to_owned),
        close_tunnel: false,
        reason: Some("test".to_owned()),
        idempotency_key: None,
    };
    match smol::block_on(m.kill_switch(req)) {
        Message::JitKillResult(r) => (r.ok, r.affected),
        other => panic!("expected jv, got {other:?}"),
    }
}

fn ended_reason(m: &SessionManager, id: &str) -> String {
    match m.record(id).map(|r| r.state) {
        Some(SessionState::Ended { reason, .. }) => reason,
        other => panic!("{id} has not ended: {other:?}"),
    }
}

#[test]
fn unusable_credentials_are_refused_before_anything_starts() {
    let w = World::new(BASE);
    let journal = w.journal();
    let clock = manual_clock();
    let m = w.manager_with_clock(&journal, clock.clone());
    let now = clock.now_ms();
    let mut short = credential(now + 60_000, None);
    short.token = "too-short".to_owned();
    let mut bad_env = credential(now + 60_000, None);
    bad_env.env_name = Some("LD_PRELOAD".to_owned());
    let mut bad_pair = credential(now + 60_000, None);
    bad_pair.env = vec![Pair::new("HOME_DIR", "x")];
    for (what, j) in [
        ("expires within 15 s", credential(now + 10_000, None)),
        ("already expired", credential(now - 5_000, None)),
        ("longer than 1 h", credential(now + 2 * 3_600_000, None)),
        ("token too short", short),
        ("env name not allowlisted", bad_env),
        ("extra pair not allowlisted", bad_pair),
    ] {
        let sr = start_with(&m, si("sessJit", "proj-a", Some(j)));
        assert!(!sr.ok, "{what}");
        assert_eq!(
            sr.reason.as_deref(),
            Some("invalid_jit_credential"),
            "{what}"
        );
    }
    assert!(m.sessions().is_empty());
}

#[test]
fn the_token_reaches_opencode_not_the_output_and_expiry_ends_the_session() {
    let w = World::new(BASE + 200);
    let journal = w.journal();
    let clock = manual_clock();
    let m = w.manager_with_clock(&journal, clock.clone());
    let streams = m.streams();
    streams.link_up();
    let expires = clock.now_ms() + 60_000;
    let sr = start_with(
        &m,
        si(
            "sessJit",
            "proj-a",
            Some(credential(expires, Some("ref-exp"))),
        ),
    );
    assert!(sr.ok, "{sr:?}");
    assert_eq!(m.sessions()[0].jit_expires_at_ms, Some(expires));

    // Injected under the default name (and scrubbed from what the control plane sees).
    assert_eq!(
        prompt(
            &m,
            "sessJit",
            "streamJIT001",
            "env OPENCODE_SESSION_TOKEN emit 0"
        ),
        None
    );
    let recs = records(&collect_stream(&streams, "streamJIT001", LONG));
    let env = recs.iter().find(|r| r["type"] == "fake.env").unwrap();
    assert_eq!(env["properties"]["value"], "***REDACTED***", "{env}");
    assert!(!m.log_tail(1600).join("\n").contains(TOKEN));
    // The expiry and scope next to it, as 0.1.50 sets them.
    assert_eq!(
        prompt(
            &m,
            "sessJit",
            "streamJIT002",
            "env OPENCODE_JIT_TOKEN_EXPIRES_AT emit 0"
        ),
        None
    );
    let recs = records(&collect_stream(&streams, "streamJIT002", LONG));
    let env = recs.iter().find(|r| r["type"] == "fake.env").unwrap();
    assert_eq!(env["properties"]["value"], expires.to_string());

    // Not yet expired: the sweep leaves it alone.
    clock.advance(Duration::from_secs(59));
    smol::block_on(m.sweep());
    assert_eq!(m.sessions().len(), 1);
    let process = m.sessions()[0].process;

    // Expired: the sweep ends it, process group and all; the open stream says why.
    assert_eq!(prompt(&m, "sessJit", "streamJIT003", "hang emit 1"), None);
    wait_until("the turn's first output", LONG, || {
        !streams.stored("streamJIT003").is_empty()
    });
    clock.advance(Duration::from_secs(1));
    smol::block_on(m.sweep());
    assert!(m.sessions().is_empty());
    assert!(!process.is_alive());
    assert!(procfs::group_members(process.pid).is_empty());
    assert_eq!(ended_reason(&m, "sessJit"), "jit_expired");
    let recs = records(&collect_stream(&streams, "streamJIT003", LONG));
    let end = recs.last().unwrap();
    assert_eq!(end["type"], "codemantle.session.ended");
    assert_eq!(end["properties"]["reason"], "jit_expired");
}

#[test]
fn a_restart_keeps_enforcing_expiry() {
    let w = World::new(BASE + 400);
    let clock = manual_clock();
    let process = {
        let journal = w.journal();
        let m = w.manager_with_clock(&journal, clock.clone());
        let j = credential(clock.now_ms() + 30_000, Some("ref-restart"));
        assert!(start_with(&m, si("sessJitR", "proj-a", Some(j))).ok);
        m.sessions()[0].process
    };
    let journal = w.journal();
    let m = w.manager_with_clock(&journal, clock.clone());
    assert_eq!(m.sessions().len(), 1);
    clock.advance(Duration::from_secs(31));
    smol::block_on(m.sweep());
    assert!(m.sessions().is_empty());
    assert_eq!(ended_reason(&m, "sessJitR"), "jit_expired");
    wait_until("the re-adopted group to be gone", LONG, || {
        procfs::group_members(process.pid).is_empty()
    });
}

#[test]
fn the_kill_switch_ends_sessions_and_its_revocations_survive_a_restart() {
    let w = World::new(BASE + 600);
    let clock = manual_clock();
    let journal = w.journal();
    let m = w.manager_with_clock(&journal, clock.clone());
    let e = clock.now_ms() + 600_000;
    let mut other = credential(e, Some("ref-two"));
    other.token = "jit.another-token-0123456789".to_owned();
    assert!(
        start_with(
            &m,
            si("sessOne", "proj-a", Some(credential(e, Some("ref-one"))))
        )
        .ok
    );
    assert!(start_with(&m, si("sessTwo", "proj-b", Some(other))).ok);
    assert!(start(&m, "sessPlain", ".").ok);
    let one = m.sessions()[0].process;

    // By credential ref: only that session.
    assert_eq!(kill(&m, None, Some("ref-one")), (true, 1));
    assert!(procfs::group_members(one.pid).is_empty());
    assert_eq!(ended_reason(&m, "sessOne"), "jit_revoked");
    let ids: Vec<String> = m.sessions().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["sessPlain", "sessTwo"]);
    // The revoked ref cannot start again, whatever the session id.
    let sr = start_with(
        &m,
        si("sessThree", "proj-a", Some(credential(e, Some("ref-one")))),
    );
    assert_eq!(sr.reason.as_deref(), Some("jit_revoked"));

    // Neither session nor ref: every JIT-bound session, not the plain one.
    assert_eq!(kill(&m, None, None), (true, 1));
    let ids: Vec<String> = m.sessions().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["sessPlain"]);

    // By session: ends it even without a credential (nothing counted), and the id is revoked.
    assert_eq!(kill(&m, Some("sessPlain"), None), (true, 0));
    assert!(m.sessions().is_empty());
    assert_eq!(ended_reason(&m, "sessPlain"), "jit_revoked");

    // After a restart every revocation still holds.
    drop(m);
    drop(journal);
    let journal = w.journal();
    let m = w.manager_with_clock(&journal, Arc::clone(&clock) as Arc<dyn Clock>);
    for (id, folder, j) in [
        ("sessNew1", "proj-a", Some(credential(e, Some("ref-one")))),
        ("sessNew2", "proj-b", Some(credential(e, Some("ref-two")))),
        ("sessPlain", ".", None),
    ] {
        let sr = start_with(&m, si(id, folder, j));
        assert!(!sr.ok, "{id}");
        assert_eq!(sr.reason.as_deref(), Some("jit_revoked"), "{id}");
    }
    // A fresh credential still works.
    let sr = start_with(
        &m,
        si("sessNew3", "proj-a", Some(credential(e, Some("ref-new")))),
    );
    assert!(sr.ok, "{sr:?}");
    assert_eq!(kill(&m, Some("sessNew3"), None), (true, 1));
    assert!(m.sessions().is_empty());
}
