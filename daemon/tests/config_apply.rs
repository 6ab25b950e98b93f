//! Config pushes on the real filesystem: integrity, signatures, policy modes, apply-path
//! confinement, atomic writes with rollback, session-init payloads.
//!
//! SAFETY: every file these tests create, change or delete is inside the fixture's temp dir
//! (`root` and its sibling `outside`); planted symlinks point only into `outside`. Apply paths
//! that are absolute point into the temp dir too, so even a broken guard could not write to a
//! real system path.

mod common;

use std::os::unix::fs::{PermissionsExt as _, symlink};

use codemantle_daemon::config_apply::{
    ApplyError, ApplyFault, ApplySettings, ConfigApplier, DEFAULT_APPLY_PATH, SessionInitStore,
    folder_key_of_session,
};
use codemantle_daemon::guard::path::{RelPath, Resolver};
use codemantle_daemon::journal::Journal;
use codemantle_protocol::canonical;
use codemantle_protocol::codec::{Codec, encode};
use codemantle_protocol::config_signature::sign_push;
use codemantle_protocol::handshake::Secret;
use codemantle_protocol::message::{
    ConfigOutcome, ConfigPhase, ConfigPush, ConfigResult, ConfigScope, Message, PolicyMode,
};
use common::{Fixture, names_in};
use serde_json::{Value, json};

const VECTORS: &str = include_str!("../../protocol/tests/data/vectors.json");
const SECRET: &str = "test-token-0123456789";
const NOW: u64 = 1_700_000_000_000;

fn secret() -> Secret {
    Secret::from(SECRET)
}

fn vector(kind: &str) -> (Value, String) {
    let v: Value = serde_json::from_str(VECTORS).expect("vectors.json parses");
    let json = v["canonical"][kind]["json"].as_str().expect("json");
    let digest = v["canonical"][kind]["digest"].as_str().expect("digest");
    (serde_json::from_str(json).expect("cfg"), digest.to_owned())
}

fn fixture() -> Fixture {
    Fixture::new(Resolver::Walk)
}

fn applier(f: &Fixture, settings: ApplySettings) -> ConfigApplier {
    let root = codemantle_daemon::guard::path::RootDir::open("cwd", &f.root_path).expect("root");
    ConfigApplier::new(root, &secret(), settings).expect("settings")
}

/// A push of `cfg` with its correct digest, signed with the device key.
fn push_of(cfg: Value, phase: ConfigPhase, pm: PolicyMode, apply_path: &str) -> ConfigPush {
    let mut push = ConfigPush {
        idempotency_key: None,
        request_id: 11,
        phase: Some(phase),
        scope: Some(match phase {
            ConfigPhase::Runtime => ConfigScope::Full,
            ConfigPhase::SessionInit => ConfigScope::SessionInit,
        }),
        template_id: "build-box".into(),
        template_version: "1.0.0".into(),
        timestamp_ms: NOW,
        apply_path: apply_path.into(),
        digest: canonical::digest(&cfg),
        signature_alg: None,
        signature: None,
        policy_mode: Some(pm),
        config: cfg,
    };
    sign_push(&mut push, &secret()).expect("signs");
    push
}

fn runtime(cfg: Value, pm: PolicyMode) -> ConfigPush {
    push_of(cfg, ConfigPhase::Runtime, pm, DEFAULT_APPLY_PATH)
}

/// A runtime config declaring `mode` the way the compiler does.
fn cfg_with_mode(mut cfg: Value, mode: &str) -> Value {
    cfg["codemantle"]["policy"] = json!({ "mode": mode });
    cfg
}

fn assert_rejected(r: &ConfigResult, code: &str) {
    assert_eq!(r.outcome, ConfigOutcome::Rejected, "{r:?}");
    assert!(!r.ok);
    assert!(
        r.violations.iter().any(|v| v == code),
        "expected {code} in {:?}",
        r.violations
    );
    assert_eq!(r.apply_path, None);
    // Every reply must fit the wire limits.
    encode(&Message::ConfigResult(r.clone()), Codec::Json).expect("reply encodes");
}

fn assert_applied(r: &ConfigResult) {
    assert_eq!(r.outcome, ConfigOutcome::Applied, "{:?}", r.violations);
    assert!(r.ok && r.violations.is_empty());
    encode(&Message::ConfigResult(r.clone()), Codec::Json).expect("reply encodes");
}

fn config_file(f: &Fixture) -> std::path::PathBuf {
    f.p(DEFAULT_APPLY_PATH)
}

// ---- applying ------------------------------------------------------------------------------

#[test]
fn vector_runtime_config_is_written_canonically_and_atomically() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (cfg, digest) = vector("runtime");
    let push = runtime(cfg, PolicyMode::Off);
    assert_eq!(push.digest, digest);

    let r = a.apply(&push, NOW);
    assert_applied(&r);
    assert_eq!(r.digest, digest);
    assert_eq!(r.at_ms, NOW);
    assert_eq!(r.apply_path.as_deref(), Some(DEFAULT_APPLY_PATH));
    assert_eq!(r.message.as_deref(), Some("config_applied"));
    assert_eq!(r.request_id, 11);
    assert_eq!(r.signature_alg, push.signature_alg, "alg echoed");
    assert_eq!(r.policy_mode, Some(PolicyMode::Off));

    let (canonical_json, _) = {
        let v: Value = serde_json::from_str(VECTORS).expect("vectors");
        (
            v["canonical"]["runtime"]["json"]
                .as_str()
                .expect("json")
                .to_owned(),
            (),
        )
    };
    let written = std::fs::read_to_string(config_file(&f)).expect("written");
    assert_eq!(written, format!("{canonical_json}\n"));
    let meta = std::fs::metadata(config_file(&f)).expect("meta");
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    let dir_meta = std::fs::metadata(f.p(".opencode")).expect("dir");
    // 0750, narrowed further by a strict umask if the operator has one.
    assert_eq!(dir_meta.permissions().mode() & 0o777 & !0o750, 0);
    assert_eq!(
        names_in(&f.p(".opencode")),
        ["opencode.json"],
        "no temp files"
    );
    f.assert_outside_untouched();
}

#[test]
fn second_apply_keeps_prev_and_rollback_restores_it() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (cfg, _) = vector("runtime");
    assert_applied(&a.apply(&runtime(cfg.clone(), PolicyMode::Off), NOW));
    let first = std::fs::read(config_file(&f)).expect("first");

    let mut second_cfg = cfg;
    second_cfg["model"] = json!("openai/gpt-5");
    assert_applied(&a.apply(&runtime(second_cfg, PolicyMode::Off), NOW + 1));
    let second = std::fs::read(config_file(&f)).expect("second");
    assert_ne!(first, second);
    assert_eq!(
        std::fs::read(f.p(".opencode/opencode.json.prev")).expect("prev"),
        first
    );
    assert_eq!(
        names_in(&f.p(".opencode")),
        ["opencode.json", "opencode.json.prev"]
    );

    a.rollback(DEFAULT_APPLY_PATH).expect("rolls back");
    assert_eq!(std::fs::read(config_file(&f)).expect("rolled back"), first);
    assert_eq!(names_in(&f.p(".opencode")), ["opencode.json"]);
    assert!(matches!(
        a.rollback(DEFAULT_APPLY_PATH),
        Err(ApplyError::NothingToRollBack { .. })
    ));
    assert!(matches!(
        a.rollback("../x.json"),
        Err(ApplyError::Refused {
            code: "invalid_apply_path",
            ..
        })
    ));
    assert!(matches!(
        a.rollback("other.json"),
        Err(ApplyError::Refused {
            code: "apply_path_not_allowed",
            ..
        })
    ));
    f.assert_outside_untouched();
}

#[test]
fn rollback_without_any_apply_has_nothing_to_do() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    assert!(matches!(
        a.rollback(DEFAULT_APPLY_PATH),
        Err(ApplyError::NothingToRollBack { .. })
    ));
    assert!(
        names_in(&f.root_path).is_empty(),
        "rollback creates nothing"
    );
}

// ---- integrity and signatures --------------------------------------------------------------

#[test]
fn tampered_payload_is_rejected_and_nothing_written() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (cfg, digest) = vector("runtime");
    let mut push = runtime(cfg, PolicyMode::Off);
    push.config["tools"]["edit"] = json!(true);
    let r = a.apply(&push, NOW);
    assert_rejected(&r, "digest_mismatch");
    assert_eq!(r.message.as_deref(), Some("config_rejected"));
    assert_ne!(
        r.digest, digest,
        "the reply carries the digest the daemon computed"
    );
    assert!(names_in(&f.root_path).is_empty(), "nothing created");
}

#[test]
fn wrong_digest_is_rejected() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (cfg, _) = vector("runtime");
    let mut push = runtime(cfg, PolicyMode::Off);
    let (_, other_digest) = vector("session_init");
    push.digest = other_digest;
    // Re-sign so only the digest is wrong, not the signature.
    sign_push(&mut push, &secret()).expect("signs");
    let r = a.apply(&push, NOW);
    assert_rejected(&r, "digest_mismatch");
    assert_eq!(r.violations, ["digest_mismatch"]);
}

#[test]
fn bad_signatures_are_rejected() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (cfg, _) = vector("runtime");

    // Signed with another device's key.
    let mut push = runtime(cfg.clone(), PolicyMode::Off);
    sign_push(&mut push, &Secret::from("another-device")).expect("signs");
    assert_rejected(&a.apply(&push, NOW), "signature_invalid");

    // Signed for another apply path, then re-aimed.
    let mut push = push_of(
        cfg.clone(),
        ConfigPhase::Runtime,
        PolicyMode::Off,
        "other/opencode.json",
    );
    push.apply_path = DEFAULT_APPLY_PATH.into();
    let r = a.apply(&push, NOW);
    assert_rejected(&r, "signature_invalid");
    assert_eq!(r.violations, ["signature_invalid"]);

    // An opaque 0.1.50-style signature.
    let mut push = runtime(cfg.clone(), PolicyMode::Off);
    push.signature_alg = Some("operator-sig".into());
    assert_rejected(&a.apply(&push, NOW), "signature_alg_unsupported");

    // Only one of the two fields.
    let mut push = runtime(cfg, PolicyMode::Off);
    push.signature = None;
    assert_rejected(&a.apply(&push, NOW), "signature_invalid");

    assert!(names_in(&f.root_path).is_empty(), "nothing created");
}

#[test]
fn missing_signature_depends_on_settings_and_mode() {
    let f = fixture();
    let (cfg, _) = vector("runtime");
    let mut unsigned = runtime(cfg, PolicyMode::Off);
    unsigned.signature_alg = None;
    unsigned.signature = None;

    let strict = applier(&f, ApplySettings::default());
    assert_rejected(&strict.apply(&unsigned, NOW), "signature_required");

    let lenient = applier(
        &f,
        ApplySettings {
            require_signature: false,
            ..ApplySettings::default()
        },
    );
    let r = lenient.apply(&unsigned, NOW);
    assert_applied(&r);
    assert_eq!(r.signature_alg, None, "not echoed when absent");

    // Restricted always needs one, whatever the settings.
    let restricted_cfg = cfg_with_mode(
        json!({
            "$schema": "https://opencode.ai/config.json",
            "codemantle": {},
            "model": "a/b",
            "tools": { "read": true, "bash": false, "edit": false, "write": false,
                       "patch": false, "multiedit": false }
        }),
        "restricted",
    );
    let mut push = runtime(restricted_cfg, PolicyMode::Restricted);
    assert_applied(&lenient.apply(&push, NOW));
    push.signature_alg = None;
    push.signature = None;
    assert_rejected(&lenient.apply(&push, NOW), "signature_required");
}

// ---- policy modes --------------------------------------------------------------------------

fn read_only_cfg() -> Value {
    cfg_with_mode(
        json!({
            "$schema": "https://opencode.ai/config.json",
            "codemantle": {},
            "model": "anthropic/claude-sonnet-4",
            "tools": { "bash": false, "edit": false, "write": false, "patch": false,
                       "multiedit": false, "read": true },
            "permission": { "bash": "deny", "edit": "deny" },
            "mcp": { "docs": { "type": "remote", "url": "https://mcp.example.com/docs",
                               "enabled": true } }
        }),
        "read-only",
    )
}

#[test]
fn read_only_refuses_write_and_exec() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());

    assert_applied(&a.apply(&runtime(read_only_cfg(), PolicyMode::ReadOnly), NOW));

    let mut cfg = read_only_cfg();
    cfg["tools"]["bash"] = json!(true);
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::ReadOnly), NOW),
        "read_only_tool_enabled:bash",
    );

    // Not mentioning a write tool is not disabling it (OpenCode enables it by default).
    let mut cfg = read_only_cfg();
    cfg["tools"].as_object_mut().expect("tools").remove("patch");
    assert_applied(&a.apply(&runtime(cfg.clone(), PolicyMode::ReadOnly), NOW));
    // …only because `permission.edit = deny` also covers patch; without it, patch is on.
    cfg["permission"]
        .as_object_mut()
        .expect("perm")
        .remove("edit");
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::ReadOnly), NOW),
        "read_only_tool_not_disabled:patch",
    );

    let mut cfg = read_only_cfg();
    cfg["permission"]["bash"] = json!("ask");
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::ReadOnly), NOW),
        "read_only_permission_not_deny:bash",
    );

    let mut cfg = read_only_cfg();
    cfg["mcp"]["fsx"] = json!({ "type": "local", "command": ["fsx"] });
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::ReadOnly), NOW),
        "local_mcp_not_allowed:fsx",
    );

    let mut cfg = read_only_cfg();
    cfg["plugin"] = json!(["evil-plugin"]);
    cfg["agent"] = json!({ "build": { "tools": { "bash": true } } });
    let r = a.apply(&runtime(cfg, PolicyMode::ReadOnly), NOW);
    assert_rejected(&r, "read_only_exec_key:plugin");
    assert_rejected(&r, "read_only_agent_tool_enabled:build.bash");

    let mut cfg = read_only_cfg();
    cfg["tools"]["*"] = json!(true);
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::ReadOnly), NOW),
        "read_only_tool_enabled:*",
    );
}

#[test]
fn policy_floor_applies_whatever_the_push_says() {
    let f = fixture();
    let a = applier(
        &f,
        ApplySettings {
            policy_floor: PolicyMode::ReadOnly,
            ..ApplySettings::default()
        },
    );
    // The vector is mode off with bash enabled.
    let (cfg, _) = vector("runtime");
    let r = a.apply(&runtime(cfg, PolicyMode::Off), NOW);
    assert_rejected(&r, "read_only_tool_enabled:bash");
    assert!(!config_file(&f).exists());
}

#[test]
fn push_mode_must_match_the_declared_mode() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    // The payload says off (the vector); the push claims read-only.
    let (cfg, _) = vector("runtime");
    let r = a.apply(&runtime(cfg, PolicyMode::ReadOnly), NOW);
    assert_rejected(&r, "policy_mode_mismatch");
    // Both modes' checks ran: read-only ones too.
    assert_rejected(&r, "read_only_tool_enabled:bash");

    // 0.1.x's key is read as well.
    let cfg = json!({ "codenucleus": { "policy": { "mode": "restricted" } }, "model": "a/b" });
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::Off), NOW),
        "policy_mode_mismatch",
    );
}

fn restricted_cfg() -> Value {
    cfg_with_mode(
        json!({
            "$schema": "https://opencode.ai/config.json",
            "codemantle": {},
            "model": "anthropic/claude-sonnet-4",
            "tools": { "read": true, "grep": true, "bash": false, "edit": false,
                       "write": false, "patch": false, "multiedit": false },
            "permission": { "bash": "deny" }
        }),
        "restricted",
    )
}

#[test]
fn restricted_allows_only_allowlisted_keys_and_tools() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    assert_applied(&a.apply(&runtime(restricted_cfg(), PolicyMode::Restricted), NOW));

    let mut cfg = restricted_cfg();
    cfg["provider"] = json!({ "x": { "options": { "baseURL": "https://exfil.example" } } });
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::Restricted), NOW),
        "restricted_key_not_allowed:provider",
    );

    let mut cfg = restricted_cfg();
    cfg["tools"]["webfetch"] = json!(true);
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::Restricted), NOW),
        "restricted_tool_not_allowed:webfetch",
    );

    // The payload cannot widen the daemon's allowlist…
    let mut cfg = restricted_cfg();
    cfg["codemantle"]["policy"]["allowedKeys"] =
        json!(["model", "tools", "permission", "provider"]);
    cfg["codemantle"]["policy"]["allowedTools"] = json!(["read", "grep", "bash"]);
    cfg["provider"] = json!({});
    cfg["tools"]["bash"] = json!(true);
    let r = a.apply(&runtime(cfg, PolicyMode::Restricted), NOW);
    assert_rejected(&r, "restricted_key_not_allowed:provider");
    assert_rejected(&r, "restricted_tool_not_allowed:bash");

    // …but it can narrow it.
    let mut cfg = restricted_cfg();
    cfg["codemantle"]["policy"]["allowedTools"] = json!(["read"]);
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::Restricted), NOW),
        "restricted_tool_not_allowed:grep",
    );

    // An operator can allow more on this host.
    let wide = applier(
        &f,
        ApplySettings {
            restricted_tools: vec!["read".into(), "grep".into(), "bash".into()],
            ..ApplySettings::default()
        },
    );
    let mut cfg = restricted_cfg();
    cfg["tools"]["bash"] = json!(true);
    cfg["permission"]["bash"] = json!("ask");
    assert_applied(&wide.apply(&runtime(cfg, PolicyMode::Restricted), NOW));
}

#[test]
fn restricted_requires_the_default_path() {
    let f = fixture();
    let a = applier(
        &f,
        ApplySettings {
            allowed_apply_paths: vec![DEFAULT_APPLY_PATH.into(), "sub/opencode.json".into()],
            ..ApplySettings::default()
        },
    );
    let push = push_of(
        restricted_cfg(),
        ConfigPhase::Runtime,
        PolicyMode::Restricted,
        "sub/opencode.json",
    );
    assert_rejected(&a.apply(&push, NOW), "restricted_policy_path_violation");
}

// ---- apply paths ---------------------------------------------------------------------------

#[test]
fn apply_path_escapes_and_unlisted_paths_are_refused() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (cfg, _) = vector("runtime");
    let outside_abs = format!("{}/opencode.json", f.outside.display());
    let cases = [
        ("../outside/opencode.json", "apply_path_escape"),
        (".opencode/../../outside/x.json", "apply_path_escape"),
        (outside_abs.as_str(), "apply_path_escape"),
        ("other.json", "apply_path_not_allowed"),
        (".opencode/opencode.toml", "invalid_apply_path"),
        ("", "invalid_apply_path"),
        ("a\0b.json", "invalid_apply_path"),
    ];
    for (path, code) in cases {
        let push = push_of(cfg.clone(), ConfigPhase::Runtime, PolicyMode::Off, path);
        let r = a.apply(&push, NOW);
        assert_rejected(&r, code);
    }
    assert!(names_in(&f.root_path).is_empty(), "nothing created");
    f.assert_outside_untouched();

    // A spelling that normalises to an allowed path is that path.
    let push = push_of(
        cfg,
        ConfigPhase::Runtime,
        PolicyMode::Off,
        "./.opencode//opencode.json",
    );
    let r = a.apply(&push, NOW);
    assert_applied(&r);
    assert_eq!(r.apply_path.as_deref(), Some(DEFAULT_APPLY_PATH));
}

#[test]
fn symlinked_parent_is_an_escape() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    // `.opencode` → the outside dir (inside the temp dir; see the safety note).
    symlink(f.outside.join("subdir"), f.p(".opencode")).expect("symlink");
    let (cfg, _) = vector("runtime");
    let r = a.apply(&runtime(cfg, PolicyMode::Off), NOW);
    assert_rejected(&r, "apply_path_escape");
    f.assert_outside_untouched();

    // Even a link that stays inside the root is not followed.
    std::fs::remove_file(f.p(".opencode")).expect("unlink");
    std::fs::create_dir(f.p("real")).expect("mkdir");
    symlink("real", f.p(".opencode")).expect("symlink");
    let (cfg, _) = vector("runtime");
    assert_rejected(
        &a.apply(&runtime(cfg, PolicyMode::Off), NOW),
        "apply_path_escape",
    );
    assert!(names_in(&f.p("real")).is_empty());
}

#[test]
fn symlinked_target_is_refused() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    std::fs::create_dir(f.p(".opencode")).expect("mkdir");
    symlink(
        f.outside.join(common::OUTSIDE_SECRET),
        f.p(".opencode/opencode.json"),
    )
    .expect("symlink");
    let (cfg, _) = vector("runtime");
    let r = a.apply(&runtime(cfg, PolicyMode::Off), NOW);
    assert_rejected(&r, "apply_path_symlink_not_allowed");
    f.assert_outside_untouched();
    assert_eq!(
        names_in(&f.p(".opencode")),
        ["opencode.json"],
        "no temp file"
    );
}

#[test]
fn bad_settings_are_reported_at_start() {
    let f = fixture();
    for bad in ["../x.json", "/etc/opencode.json", "conf.toml", "."] {
        let root =
            codemantle_daemon::guard::path::RootDir::open("cwd", &f.root_path).expect("root");
        let err = ConfigApplier::new(
            root,
            &secret(),
            ApplySettings {
                allowed_apply_paths: vec![bad.into()],
                ..ApplySettings::default()
            },
        )
        .expect_err(bad);
        assert!(
            err.to_string().contains("relative to the project root"),
            "{err}"
        );
    }
}

// ---- interrupted writes --------------------------------------------------------------------

#[test]
fn interrupted_write_leaves_the_old_file_and_no_temp() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (cfg, _) = vector("runtime");
    assert_applied(&a.apply(&runtime(cfg.clone(), PolicyMode::Off), NOW));
    let original = std::fs::read(config_file(&f)).expect("original");

    let mut next = cfg;
    next["model"] = json!("openai/gpt-5");

    a.inject_fault(Some(ApplyFault::FailAfterPartialWrite));
    let r = a.apply(&runtime(next.clone(), PolicyMode::Off), NOW);
    assert_rejected(&r, "write_failed");
    assert_eq!(r.message.as_deref(), Some("config_apply_failed"));
    assert_eq!(std::fs::read(config_file(&f)).expect("intact"), original);
    assert_eq!(
        names_in(&f.p(".opencode")),
        ["opencode.json"],
        "no temp file"
    );

    a.inject_fault(Some(ApplyFault::FailRename));
    let r = a.apply(&runtime(next.clone(), PolicyMode::Off), NOW);
    assert_rejected(&r, "write_failed");
    assert_eq!(std::fs::read(config_file(&f)).expect("intact"), original);
    let names = names_in(&f.p(".opencode"));
    assert!(
        names.iter().all(|n| !n.contains(".tmp-")),
        "no temp file: {names:?}"
    );

    // The fault is one-shot: the next push goes through.
    let r = a.apply(&runtime(next, PolicyMode::Off), NOW);
    assert_applied(&r);
    assert_ne!(std::fs::read(config_file(&f)).expect("new"), original);
    assert_eq!(
        std::fs::read(f.p(".opencode/opencode.json.prev")).expect("prev"),
        original
    );
}

// ---- session-init --------------------------------------------------------------------------

#[test]
fn session_init_is_remembered_not_written() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (cfg, digest) = vector("session_init");
    let push = push_of(
        cfg,
        ConfigPhase::SessionInit,
        PolicyMode::Off,
        DEFAULT_APPLY_PATH,
    );
    let r = a.apply(&push, NOW);
    assert_applied(&r);
    assert_eq!(r.message.as_deref(), Some("config_session_init_applied"));
    assert_eq!(r.digest, digest);
    assert!(names_in(&f.root_path).is_empty(), "nothing written");

    let folder = folder_key_of_session(&RelPath::parse(".").expect("rel"));
    let init = a.session_inits().get(&folder, NOW + 1).expect("stored");
    assert_eq!(init.template_id, "build-box");
    assert_eq!(init.digest, digest);
    assert_eq!(init.providers, ["anthropic", "openai"]);
    assert_eq!(init.mcp_tools.len(), 1);
    assert_eq!(init.mcp_tools[0].status, "allow");
    assert_eq!(init.routing["defaultModel"], "anthropic/claude-sonnet-4");

    // One push, one session.
    assert!(a.session_inits().take(&folder, NOW + 2).is_some());
    assert!(a.session_inits().take(&folder, NOW + 3).is_none());
}

#[test]
fn a_session_takes_the_nearest_folders_session_init() {
    let f = fixture();
    let a = applier(
        &f,
        ApplySettings {
            allowed_apply_paths: vec![
                DEFAULT_APPLY_PATH.into(),
                "app/.opencode/opencode.json".into(),
            ],
            ..ApplySettings::default()
        },
    );
    let (cfg, _) = vector("session_init");
    for path in [DEFAULT_APPLY_PATH, "app/.opencode/opencode.json"] {
        let push = push_of(cfg.clone(), ConfigPhase::SessionInit, PolicyMode::Off, path);
        assert_applied(&a.apply(&push, NOW));
    }
    let rel = |p: &str| RelPath::parse(p).expect("rel");
    let store = a.session_inits();
    assert_eq!(
        store
            .take_for_session(&rel("app/web"), NOW)
            .map(|i| i.folder),
        Some("app".to_owned()),
        "nearest ancestor"
    );
    assert_eq!(
        store
            .take_for_session(&rel("app/web"), NOW)
            .map(|i| i.folder),
        Some(".".to_owned()),
        "then the root's"
    );
    assert!(store.take_for_session(&rel("app/web"), NOW).is_none());
}

#[test]
fn session_init_accepts_the_0_1_key_and_expires() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (mut cfg, _) = vector("session_init");
    let body = cfg
        .as_object_mut()
        .and_then(|o| o.remove("codemantle"))
        .expect("body");
    cfg["codenucleus"] = body;
    let push = push_of(
        cfg,
        ConfigPhase::SessionInit,
        PolicyMode::Off,
        DEFAULT_APPLY_PATH,
    );
    assert_applied(&a.apply(&push, NOW));
    assert!(a.session_inits().get(".", NOW + 1).is_some());
    assert!(
        a.session_inits()
            .get(
                ".",
                NOW + codemantle_daemon::config_apply::SESSION_INIT_TTL_MS
            )
            .is_none(),
        "expired"
    );
}

#[test]
fn session_init_rules_are_enforced() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let (base, _) = vector("session_init");

    let mut cfg = base.clone();
    cfg["codemantle"]["sessionInit"]["routing"]["url"] = json!("https://x.example");
    cfg["codemantle"]["sessionInit"]["mcp"]["tools"][0]["headers"] = json!({ "a": "b" });
    let r = a.apply(
        &push_of(
            cfg,
            ConfigPhase::SessionInit,
            PolicyMode::Off,
            DEFAULT_APPLY_PATH,
        ),
        NOW,
    );
    assert_rejected(&r, "forbidden_field:cfg.codemantle.sessionInit.routing.url");
    assert_rejected(
        &r,
        "forbidden_field:cfg.codemantle.sessionInit.mcp.tools[0].headers",
    );
    assert_rejected(&r, "session_init_mcp_scope_violation");

    let mut cfg = base.clone();
    cfg["model"] = json!("x/y");
    assert_rejected(
        &a.apply(
            &push_of(
                cfg,
                ConfigPhase::SessionInit,
                PolicyMode::Off,
                DEFAULT_APPLY_PATH,
            ),
            NOW,
        ),
        "session_init_scope_violation",
    );

    // A session-init payload pushed as runtime/full is still checked as what it says it is.
    let mut push = push_of(
        base.clone(),
        ConfigPhase::SessionInit,
        PolicyMode::Off,
        DEFAULT_APPLY_PATH,
    );
    push.scope = Some(ConfigScope::Full);
    sign_push(&mut push, &secret()).expect("signs");
    assert_rejected(&a.apply(&push, NOW), "session_init_scope_mismatch");

    // Local MCP servers are refused in read-only mode.
    let mut cfg = base;
    cfg["codemantle"]["policy"]["mode"] = json!("read-only");
    cfg["codemantle"]["sessionInit"]["mcp"]["tools"][0]["type"] = json!("local");
    assert_rejected(
        &a.apply(
            &push_of(
                cfg,
                ConfigPhase::SessionInit,
                PolicyMode::ReadOnly,
                DEFAULT_APPLY_PATH,
            ),
            NOW,
        ),
        "local_mcp_not_allowed:docs",
    );
    assert!(a.session_inits().is_empty());
    assert!(names_in(&f.root_path).is_empty());
}

#[test]
fn session_init_store_survives_a_restart_in_the_journal() {
    let f = fixture();
    let data = tempfile::tempdir().expect("data dir");
    let (cfg, _) = vector("session_init");
    let push = push_of(
        cfg,
        ConfigPhase::SessionInit,
        PolicyMode::Off,
        "app/.opencode/opencode.json",
    );
    let settings = || ApplySettings {
        allowed_apply_paths: vec!["app/.opencode/opencode.json".into()],
        ..ApplySettings::default()
    };
    {
        let journal = Journal::open(data.path(), 3600).expect("journal");
        let store = SessionInitStore::with_tree(journal.tree("session_init").expect("tree"))
            .expect("store");
        let a = applier(&f, settings()).with_session_init_store(store);
        assert_applied(&a.apply(&push, NOW));
    }
    let journal = Journal::open(data.path(), 3600).expect("journal reopens");
    let store =
        SessionInitStore::with_tree(journal.tree("session_init").expect("tree")).expect("store");
    let init = store.take("app", NOW + 10).expect("survived");
    assert_eq!(init.folder, "app");
    drop(store);
    let store =
        SessionInitStore::with_tree(journal.tree("session_init").expect("tree")).expect("store");
    assert!(
        store.is_empty(),
        "taking it removed it from the journal too"
    );
}

// ---- replies -------------------------------------------------------------------------------

#[test]
fn many_violations_fit_the_reply_limits() {
    let f = fixture();
    let a = applier(&f, ApplySettings::default());
    let mut servers = serde_json::Map::new();
    for i in 0..40 {
        servers.insert(
            format!("local{i:02}"),
            json!({ "type": "local", "command": ["x"] }),
        );
    }
    let mut cfg = read_only_cfg();
    cfg["mcp"] = Value::Object(servers);
    let mut push = runtime(cfg, PolicyMode::ReadOnly);
    push.digest = "A".repeat(43);
    let r = a.apply(&push, NOW);
    assert_eq!(r.violations.len(), 32);
    assert!(
        r.violations[31].starts_with("more_violations:"),
        "{:?}",
        r.violations
    );
    assert_rejected(&r, "digest_mismatch");
}
