//! The dispatcher's git and config-push arms: git off → `o:0` with how to enable it (in
//! 0.1.x shapes for JSON peers), git on → real git through the real guard with `gq` lines
//! queued on the link before the reply, mutating git requests and `cc` answered from the
//! journal when re-sent, `cc` applied through the config applier.
//!
//! SAFETY (these tests run as root on a shared machine): every file is created inside the
//! test's temp dir (the root, the journal, the guard's private dir); git runs as `nobody` in
//! the landlock sandbox, confined to the root; no symlinks; no network.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use codemantle_daemon::config::ProcessConfig;
use codemantle_daemon::config_apply::{ApplySettings, ConfigApplier, DEFAULT_APPLY_PATH};
use codemantle_daemon::dispatch::{Dispatcher, GIT_NOT_ENABLED, Outbound, Peer};
use codemantle_daemon::git::GitRunner;
use codemantle_daemon::guard::path::{RootDir, Roots};
use codemantle_daemon::guard::process::{AllowedProgram, ProcessGuard, RunAs};
use codemantle_daemon::journal::Journal;
use codemantle_protocol::canonical;
use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::config_signature::sign_push;
use codemantle_protocol::handshake::Secret;
use codemantle_protocol::message::{
    ConfigOutcome, ConfigPhase, ConfigPush, ConfigScope, GitSync, Message, PathRequest, PolicyMode,
};
use serde_json::json;

const NOBODY: u32 = 65534;
const DEVICE_KEY: &str = "dispatch-test-device-key-0001";

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

struct World {
    tmp: tempfile::TempDir,
    dispatcher: Dispatcher,
}

impl World {
    fn new(with_git: bool) -> World {
        let tmp = tempfile::tempdir().unwrap();
        // `nobody` must be able to pass through to the root.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        if running_as_root() {
            std::os::unix::fs::lchown(&root, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        let roots = Roots::open(&[("cwd".to_owned(), root.clone())].into_iter().collect()).unwrap();
        let journal = Arc::new(Journal::open(&tmp.path().join("journal"), 3600).unwrap());
        let applier = ConfigApplier::new(
            RootDir::open("cwd", &root).unwrap(),
            &Secret::new(DEVICE_KEY.as_bytes()),
            ApplySettings::default(),
        )
        .unwrap();
        let mut dispatcher =
            Dispatcher::new(Arc::new(roots), journal).with_config_applier(Arc::new(applier));
        if with_git {
            let mut config = ProcessConfig {
                private_dir: tmp.path().join("private"),
                run_as: running_as_root().then_some(RunAs {
                    uid: NOBODY,
                    gid: NOBODY,
                    name: Some("nobody".to_owned()),
                }),
                ..ProcessConfig::default()
            };
            config.allowlist.insert(
                "git".to_owned(),
                AllowedProgram {
                    path: git_binary(),
                    args: Vec::new(),
                },
            );
            let guard = Arc::new(ProcessGuard::new(&config).expect("process guard"));
            dispatcher = dispatcher.with_git(Arc::new(GitRunner::new(guard)));
        }
        World { tmp, dispatcher }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    /// Handles `msg` on a link whose queued frames are returned with the reply.
    fn handle(&self, msg: Message, codec: Codec) -> (Message, Vec<Message>) {
        let (tx, rx) = async_channel::unbounded();
        let peer = Peer {
            codec,
            sid: "SidSidSidSid0001".to_owned(),
            outbound: Some(Outbound::new(tx)),
        };
        let reply = smol::block_on(self.dispatcher.handle(msg, &peer)).expect("a reply");
        let mut frames = Vec::new();
        while let Ok(m) = rx.try_recv() {
            frames.push(m);
        }
        (reply, frames)
    }
}

fn git_binary() -> PathBuf {
    ["/usr/bin/git", "/usr/local/bin/git"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("a git binary")
}

fn path_req(id: u32, path: &str, ik: Option<&str>) -> PathRequest {
    PathRequest {
        request_id: id,
        root: "cwd".into(),
        path: path.into(),
        idempotency_key: ik.map(str::to_owned),
    }
}

/// The reply as a 0.1.x JSON peer receives it.
fn as_json(msg: &Message) -> serde_json::Value {
    let shaped = codemantle_daemon::dispatch::shape_reply(msg.clone(), Codec::Json);
    serde_json::from_slice(&codec::encode(&shaped, Codec::Json).unwrap()).unwrap()
}

#[test]
fn git_off_answers_o0_with_how_to_enable_it_in_0_1_shapes() {
    let w = World::new(false);
    let (reply, frames) = w.handle(Message::GitStatus(path_req(3, ".", None)), Codec::Json);
    assert!(frames.is_empty());
    assert_eq!(
        as_json(&reply),
        json!({"v": 1, "t": "gt", "i": 3, "o": 0, "e": GIT_NOT_ENABLED})
    );
    let (reply, _) = w.handle(Message::GitInit(path_req(4, ".", None)), Codec::Json);
    assert_eq!(
        as_json(&reply),
        json!({"v": 1, "t": "gj", "i": 4, "o": 0, "m": GIT_NOT_ENABLED})
    );
    let sync = GitSync {
        request_id: 5,
        root: "cwd".into(),
        path: ".".into(),
        remote: Some("origin".into()),
        branch: None,
        idempotency_key: Some("ikPushKey0001".into()),
    };
    let (reply, _) = w.handle(Message::GitPush(sync), Codec::Cbor);
    match reply {
        Message::GitPushResult(r) => {
            assert!(!r.ok);
            assert_eq!(r.message.as_deref(), Some(GIT_NOT_ENABLED));
        }
        other => panic!("{other:?}"),
    }
    // Nothing was created by a refused request.
    assert_eq!(std::fs::read_dir(w.root()).unwrap().count(), 0);
}

#[test]
fn git_lines_are_queued_before_the_reply_and_a_resend_does_not_run_again() {
    let w = World::new(true);
    let (reply, frames) = w.handle(
        Message::GitInit(path_req(7, "repo", Some("ikInitKey0001"))),
        Codec::Cbor,
    );
    match &reply {
        Message::GitInitResult(r) => assert!(r.ok, "{r:?}"),
        other => panic!("{other:?}"),
    }
    assert!(w.root().join("repo/.git").is_dir());
    assert!(!frames.is_empty(), "gq lines while git ran");
    for f in &frames {
        match f {
            Message::GitLog(l) => assert_eq!(l.request_id, 7),
            other => panic!("only gq frames before the reply, got {other:?}"),
        }
    }
    let first = match &frames[0] {
        Message::GitLog(l) => l.line.clone(),
        _ => unreachable!(),
    };
    assert!(first.contains("git") && first.contains("init"), "{first}");

    // The same `ik` again (a re-send after a reconnect, with a new `i`): the recorded reply,
    // re-addressed, and git does not run (no lines).
    let (again, frames) = w.handle(
        Message::GitInit(path_req(8, "repo", Some("ikInitKey0001"))),
        Codec::Cbor,
    );
    assert!(frames.is_empty(), "{frames:?}");
    match again {
        Message::GitInitResult(r) => assert!(r.ok && r.request_id == 8),
        other => panic!("{other:?}"),
    }

    // Status is a read: it runs every time.
    let (status, frames) = w.handle(Message::GitStatus(path_req(9, "repo", None)), Codec::Cbor);
    assert!(!frames.is_empty());
    match status {
        Message::GitStatusResult(r) => assert!(r.ok, "{r:?}"),
        other => panic!("{other:?}"),
    }

    // A path outside the root is the guard's `e PATH`, and git never starts.
    let (escape, frames) = w.handle(Message::GitStatus(path_req(10, "../", None)), Codec::Cbor);
    assert!(frames.is_empty());
    assert!(matches!(escape, Message::Error(_)), "{escape:?}");
    // An unknown root is `e ROOT`.
    let mut req = path_req(11, ".", None);
    req.root = "nope".into();
    let (unknown, _) = w.handle(Message::GitStatus(req), Codec::Cbor);
    match unknown {
        Message::Error(e) => assert_eq!(e.code.as_str(), "ROOT"),
        other => panic!("{other:?}"),
    }
}

fn signed_push(id: u32, ik: &str) -> ConfigPush {
    let cfg = json!({
        "$schema": "https://opencode.ai/config.json",
        "codemantle": {"policy": {"mode": "off"}, "templateId": "build-box", "templateVersion": "1.0.0"},
        "model": "anthropic/claude-sonnet-4",
        "tools": {"bash": true},
    });
    let mut push = ConfigPush {
        idempotency_key: Some(ik.to_owned()),
        request_id: id,
        phase: Some(ConfigPhase::Runtime),
        scope: Some(ConfigScope::Full),
        template_id: "build-box".into(),
        template_version: "1.0.0".into(),
        timestamp_ms: 1_700_000_000_000,
        apply_path: DEFAULT_APPLY_PATH.into(),
        digest: canonical::digest(&cfg),
        signature_alg: None,
        signature: None,
        policy_mode: Some(PolicyMode::Off),
        config: cfg,
    };
    sign_push(&mut push, &Secret::new(DEVICE_KEY.as_bytes())).unwrap();
    push
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn config_push_is_applied_once_per_idempotency_key() {
    let w = World::new(false);
    let push = signed_push(21, "ikConfigKey001");
    let digest = push.digest.clone();
    let (reply, _) = w.handle(Message::ConfigPush(push), Codec::Cbor);
    let r = match reply {
        Message::ConfigResult(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(r.outcome, ConfigOutcome::Applied, "{:?}", r.violations);
    assert_eq!(r.digest, digest);
    let file = w.root().join(DEFAULT_APPLY_PATH);
    let written = read(&file);
    assert!(written.ends_with('\n') && written.contains("claude-sonnet-4"));

    // The operator edits the file; a re-send of the same push is answered from the journal
    // and does not overwrite the edit.
    std::fs::write(&file, "{}\n").unwrap();
    let (again, _) = w.handle(
        Message::ConfigPush(signed_push(22, "ikConfigKey001")),
        Codec::Cbor,
    );
    match again {
        Message::ConfigResult(r) => {
            assert_eq!((r.request_id, r.outcome), (22, ConfigOutcome::Applied))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(read(&file), "{}\n");

    // A push signed with another key is rejected, with the reason.
    let mut forged = signed_push(23, "ikConfigKey002");
    sign_push(&mut forged, &Secret::new(&b"another-device-key"[..])).unwrap();
    let (reply, _) = w.handle(Message::ConfigPush(forged), Codec::Cbor);
    match reply {
        Message::ConfigResult(r) => {
            assert_eq!(r.outcome, ConfigOutcome::Rejected);
            assert!(
                r.violations.iter().any(|v| v == "signature_invalid"),
                "{:?}",
                r.violations
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(read(&file), "{}\n");
}
