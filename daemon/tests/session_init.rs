//! Session-init payloads reach the session they were pushed for: a `cc` session-init push
//! accepted by the config applier is taken by the next session start in that folder and handed
//! to OpenCode as `OPENCODE_CONFIG_CONTENT`; one push initialises one session. Against the fake
//! OpenCode in the real sandbox.
//!
//! SAFETY: every file is inside each test's temp dir; only loopback ports of the fixture's
//! own range are bound.

mod session_support;

use std::time::Duration;

use codemantle_daemon::config_apply::{ApplySettings, ConfigApplier};
use codemantle_daemon::guard::path::RootDir;
use codemantle_daemon::session::{Clock as _, SessionManager, SystemClock};
use codemantle_protocol::canonical;
use codemantle_protocol::config_signature::sign_push;
use codemantle_protocol::handshake::Secret;
use codemantle_protocol::message::{
    ConfigOutcome, ConfigPhase, ConfigPush, ConfigScope, PolicyMode,
};
use serde_json::Value;
use session_support::{World, collect_stream, prompt, records, start, stop};

#[test]
fn fake_opencode_entry() {
    session_support::fake_opencode::main_if_requested();
}

const BASE: u16 = 46100;
const LONG: Duration = Duration::from_secs(20);
const SECRET: &str = "test-token-0123456789";
const VECTORS: &str = include_str!("../../protocol/tests/data/vectors.json");
const APPLY_PATH: &str = "proj-a/.opencode/opencode.json";

fn session_init_push(now_ms: u64) -> ConfigPush {
    let v: Value = serde_json::from_str(VECTORS).expect("vectors.json parses");
    let cfg: Value = serde_json::from_str(
        v["canonical"]["session_init"]["json"]
            .as_str()
            .expect("json"),
    )
    .expect("cfg");
    let mut push = ConfigPush {
        idempotency_key: None,
        request_id: 11,
        phase: Some(ConfigPhase::SessionInit),
        scope: Some(ConfigScope::SessionInit),
        template_id: "build-box".into(),
        template_version: "1.0.0".into(),
        timestamp_ms: now_ms,
        apply_path: APPLY_PATH.into(),
        digest: canonical::digest(&cfg),
        signature_alg: None,
        signature: None,
        policy_mode: Some(PolicyMode::Off),
        config: cfg,
    };
    sign_push(&mut push, &Secret::from(SECRET)).expect("signs");
    push
}

/// What the fake OpenCode of session `id` has in `OPENCODE_CONFIG_CONTENT`.
fn config_content(m: &SessionManager, id: &str, stream: &str) -> Value {
    assert_eq!(
        prompt(m, id, stream, "env OPENCODE_CONFIG_CONTENT emit 0"),
        None
    );
    let recs = records(&collect_stream(&m.streams(), stream, LONG));
    let env = recs
        .iter()
        .find(|r| r["type"] == "fake.env")
        .unwrap_or_else(|| panic!("no fake.env in {recs:?}"));
    env["properties"]["value"].clone()
}

#[test]
fn a_session_init_push_reaches_one_session_start_in_its_folder() {
    let w = World::new(BASE);
    let journal = w.journal();
    let m = w.manager(&journal);
    m.streams().link_up();

    let root = RootDir::open("cwd", &w.project).expect("root");
    let applier = ConfigApplier::new(
        root,
        &Secret::from(SECRET),
        ApplySettings {
            allowed_apply_paths: vec![APPLY_PATH.into()],
            ..ApplySettings::default()
        },
    )
    .expect("applier");
    m.set_session_init_store(applier.shared_session_inits());

    let now = SystemClock.now_ms();
    let r = applier.apply(&session_init_push(now), now);
    assert_eq!(r.outcome, ConfigOutcome::Applied, "{:?}", r.violations);
    assert_eq!(applier.session_inits().len(), 1);

    // A session in another folder does not take it.
    let sr = start(&m, "sessOther", "proj-b");
    assert!(sr.ok, "{sr:?}");
    assert_eq!(
        config_content(&m, "sessOther", "streamINIT000"),
        Value::Null
    );
    assert_eq!(applier.session_inits().len(), 1, "still waiting for proj-a");

    let sr = start(&m, "sessInit1", "proj-a");
    assert!(sr.ok, "{sr:?}");
    let content = config_content(&m, "sessInit1", "streamINIT001");
    let text = content.as_str().expect("OPENCODE_CONFIG_CONTENT is set");
    let cfg: Value = serde_json::from_str(text).expect("inline config is JSON");
    assert_eq!(cfg["model"], "anthropic/claude-sonnet-4", "{cfg}");
    assert_eq!(cfg["mcp"]["docs"]["enabled"], true, "{cfg}");
    assert_eq!(
        cfg.as_object().map(|o| o.len()),
        Some(2),
        "only model and mcp: {cfg}"
    );
    assert!(applier.session_inits().is_empty(), "taken, not copied");
    assert!(
        m.log_tail(1600).iter().all(|l| !l.contains(SECRET)),
        "no secret in the log"
    );

    // Consumed: the next start in the folder runs without it.
    assert!(stop(&m, "sessInit1").ok);
    let sr = start(&m, "sessInit2", "proj-a");
    assert!(sr.ok, "{sr:?}");
    assert_eq!(
        config_content(&m, "sessInit2", "streamINIT002"),
        Value::Null
    );
    assert!(stop(&m, "sessInit2").ok);
    assert!(stop(&m, "sessOther").ok);
}
