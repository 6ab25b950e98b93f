//! The helpers the daemon and control plane use: reply pairing, constructors, encode-side limits.

use codemantle_protocol::codec::{Codec, decode, encode};
use codemantle_protocol::error::{EncodeError, ErrorCode};
use codemantle_protocol::message::*;

fn path_request(request_id: u32) -> PathRequest {
    PathRequest {
        idempotency_key: None,
        request_id,
        root: "cwd".into(),
        path: ".".into(),
    }
}

#[test]
fn requests_know_their_reply() {
    let pairs: Vec<(Message, &str)> = vec![
        (
            Message::DirList(DirList {
                request_id: 1,
                root: "cwd".into(),
                path: String::new(),
                limit: 5,
                cursor: None,
            }),
            "ds",
        ),
        (
            Message::StopSession(StopSession {
                idempotency_key: None,
                request_id: 1,
                session_id: "s".into(),
            }),
            "sr",
        ),
        (
            Message::SetupStatusQuery(RequestOnly { request_id: 1 }),
            "cg",
        ),
        (Message::MakeDir(path_request(1)), "mr"),
        (Message::GitStatus(path_request(1)), "gt"),
        (Message::GitInit(path_request(1)), "gj"),
        (
            Message::ReplayLog(ReplayLog {
                request_id: 1,
                stream_id: "abcdefgh".into(),
                lines: 5,
            }),
            "sc",
        ),
    ];
    for (req, tag) in pairs {
        assert_eq!(req.expected_reply_tag(), Some(tag), "{}", req.type_tag());
    }
    let cu = Message::SetupSave(SetupSave {
        idempotency_key: None,
        request_id: 2,
        control_plane_url: "wss://cp".into(),
        auth_token: String::new(),
        opencode_command: None,
        opencode_host: None,
        opencode_start_port: None,
        provider_id: None,
        model_id: None,
        request_timeout_ms: None,
    });
    assert_eq!(cu.expected_reply(), Some(MessageKind::SetupSaveResult));
    assert_eq!(cu.expected_reply_tag(), Some("cv"));
    assert_eq!(
        Message::SetupStatusQuery(RequestOnly { request_id: 1 }).expected_reply(),
        Some(MessageKind::SetupStatus)
    );
    assert_eq!(
        Message::ProxyEnd(RequestOnly { request_id: 1 }).expected_reply(),
        None
    );
    assert_eq!(
        Message::Prompt(Prompt {
            idempotency_key: None,
            request_id: 1,
            stream_id: "abcdefgh".into(),
            session_id: "s".into(),
            prompt: "hi".into()
        })
        .expected_reply(),
        None,
        "sp is fire-and-forget"
    );
}

#[test]
fn replies_match_by_kind_and_id() {
    let req = Message::MakeDir(path_request(9));
    let ok = Message::MakeDirResult(FsResult {
        request_id: 9,
        ok: true,
    });
    let wrong_kind = Message::RenameResult(FsResult {
        request_id: 9,
        ok: true,
    });
    let wrong_id = Message::MakeDirResult(FsResult {
        request_id: 8,
        ok: true,
    });
    let failed = Message::error(ErrorCode::Path, Some(9), None);
    assert!(req.is_answered_by(&ok));
    assert!(req.is_answered_by(&failed));
    assert!(!req.is_answered_by(&wrong_kind));
    assert!(!req.is_answered_by(&wrong_id));
    assert_eq!(ok.request_id(), Some(9));
    assert_eq!(ok.type_tag(), "mr");
    assert_eq!(ok.kind(), MessageKind::MakeDirResult);
}

#[test]
fn error_constructor() {
    let e = Message::error(
        ErrorCode::UpdateRequired,
        None,
        Some("protocol_not_supported"),
    );
    assert_eq!(
        encode(&e, Codec::Json).expect("encodes"),
        br#"{"v":1,"t":"e","c":"UPDATE_REQUIRED","m":"protocol_not_supported"}"#
    );
    assert_eq!(e.request_id(), None);
}

#[test]
fn encoder_refuses_what_the_receiver_would_drop() {
    let too_long = Message::SessionStatusQuery(SessionStatusQuery {
        request_id: 1,
        folder: "x".repeat(513),
    });
    assert_eq!(
        encode(&too_long, Codec::Json),
        Err(EncodeError::Limit {
            t: "sq",
            key: "p",
            why: "too long"
        })
    );
    let bad_id = Message::StopSession(StopSession {
        idempotency_key: None,
        request_id: 1,
        session_id: "../etc".into(),
    });
    assert!(matches!(
        encode(&bad_id, Codec::Cbor),
        Err(EncodeError::Limit { key: "s", .. })
    ));
    let empty_reason = Message::SessionResult(SessionResult {
        request_id: 1,
        session_id: "s".into(),
        ok: false,
        reason: Some(String::new()),
        url: None,
    });
    assert!(
        encode(&empty_reason, Codec::Json).is_err(),
        "0.1.50 rejects empty optional strings"
    );
    let unknown_with_known_tag = Message::Unknown {
        t: "dr".into(),
        request_id: None,
    };
    assert!(encode(&unknown_with_known_tag, Codec::Cbor).is_err());
    let not_object = Message::ConfigPush(ConfigPush {
        idempotency_key: None,
        request_id: 1,
        phase: None,
        scope: None,
        template_id: "build-box".into(),
        template_version: "1".into(),
        timestamp_ms: 0,
        apply_path: String::new(),
        digest: "ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA".into(),
        signature_alg: None,
        signature: None,
        policy_mode: None,
        config: serde_json::json!([1, 2]),
    });
    assert!(matches!(
        encode(&not_object, Codec::Json),
        Err(EncodeError::Limit { key: "cfg", .. })
    ));
}

#[test]
fn config_push_carries_the_vector_payload_in_both_codecs() {
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("data/vectors.json")).expect("vectors parse");
    let runtime = &vectors["canonical"]["runtime"];
    let cfg: serde_json::Value =
        serde_json::from_str(runtime["json"].as_str().expect("json")).expect("cfg parses");
    let msg = Message::ConfigPush(ConfigPush {
        idempotency_key: None,
        request_id: 12,
        phase: Some(ConfigPhase::Runtime),
        scope: Some(ConfigScope::Full),
        template_id: "build-box".into(),
        template_version: "1.0.0".into(),
        timestamp_ms: 1_700_000_000_000,
        apply_path: ".opencode/opencode.json".into(),
        digest: runtime["digest"].as_str().expect("digest").into(),
        signature_alg: None,
        signature: None,
        policy_mode: Some(PolicyMode::Off),
        config: cfg,
    });
    for codec in [Codec::Json, Codec::Cbor] {
        let frame = encode(&msg, codec).expect("encodes");
        assert_eq!(decode(&frame, codec), Ok(msg.clone()), "{codec:?}");
    }
    let text = String::from_utf8(encode(&msg, Codec::Json).expect("encodes")).expect("utf-8");
    assert!(text.starts_with(
        r#"{"v":1,"t":"cc","i":12,"k":"cfg","ph":"runtime","sc":"full","tid":"build-box","tv":"1.0.0","ts":1700000000000,"ap":".opencode/opencode.json","pd":"ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA","pm":"off","cfg":{"#
    ));
}

#[test]
fn compat_view_drops_native_fields() {
    let listing = Message::DirListing(DirListing {
        request_id: 1,
        cursor: None,
        entries: vec![DirEntry::File {
            name: "a".into(),
            size: 1,
            mtime_ms: 1_732_000_000_000,
        }],
    });
    let Message::DirListing(compat) = listing.to_compat() else {
        panic!("kind changed")
    };
    assert_eq!(
        compat.entries[0],
        DirEntry::File {
            name: "a".into(),
            size: 1,
            mtime_ms: u64::from(u32::MAX)
        }
    );
    let plain = Message::GitInit(path_request(3));
    assert_eq!(plain.to_compat(), plain);
}

#[test]
fn idempotency_key_is_native_only() {
    let mut msg = Message::MakeDir(PathRequest {
        idempotency_key: None,
        request_id: 7,
        root: "cwd".into(),
        path: "build".into(),
    });
    assert!(msg.set_idempotency_key(Some("ik_0123456789abcdef".into())));
    assert_eq!(msg.idempotency_key(), Some("ik_0123456789abcdef"));

    let native = encode(&msg, Codec::Cbor).expect("cbor");
    assert_eq!(decode(&native, Codec::Cbor).expect("decodes"), msg);

    let json = String::from_utf8(encode(&msg, Codec::Json).expect("json")).expect("utf8");
    assert_eq!(json, r#"{"v":1,"t":"md","i":7,"r":"cwd","p":"build"}"#);

    let mut reply = Message::error(ErrorCode::Path, Some(7), None);
    assert!(!reply.set_idempotency_key(Some("ik_0123456789abcdef".into())));
    assert_eq!(reply.idempotency_key(), None);
}

#[test]
fn jit_renewal_is_a_native_only_request_reply_pair() {
    let renew = Message::JitRenew(JitRenew {
        idempotency_key: Some("ik_0123456789abcdef".into()),
        request_id: 21,
        session_id: "ses_renew1".into(),
        ttl_secs: 600,
    });
    assert!(renew.is_native_only());
    assert_eq!(renew.expected_reply_tag(), Some("ju"));
    assert_eq!(renew.idempotency_key(), Some("ik_0123456789abcdef"));
    let native = encode(&renew, Codec::Cbor).expect("cbor");
    assert_eq!(decode(&native, Codec::Cbor).expect("decodes"), renew);

    let ok = Message::JitRenewResult(JitRenewResult {
        request_id: 21,
        ok: true,
        expires_at_ms: Some(1_732_000_600_000),
        message: None,
    });
    assert!(ok.is_native_only());
    assert!(renew.is_answered_by(&ok));
    assert!(renew.is_answered_by(&Message::error(ErrorCode::Internal, Some(21), None)));
    let native = encode(&ok, Codec::Cbor).expect("cbor");
    assert_eq!(decode(&native, Codec::Cbor).expect("decodes"), ok);
    let refused = Message::JitRenewResult(JitRenewResult {
        request_id: 22,
        ok: false,
        expires_at_ms: None,
        message: Some("jit_revoked".into()),
    });
    assert!(!renew.is_answered_by(&refused), "another request id");

    // The 0.1.x messages are not native-only.
    assert!(!Message::GitInit(path_request(3)).is_native_only());

    // The lifetime is 15..=3600 s, as at the start: anything else is not sent.
    for ttl_secs in [0, 14, 3601] {
        let bad = Message::JitRenew(JitRenew {
            idempotency_key: None,
            request_id: 1,
            session_id: "ses_renew1".into(),
            ttl_secs,
        });
        assert!(
            matches!(
                encode(&bad, Codec::Cbor),
                Err(EncodeError::Limit { key: "tl", .. })
            ),
            "ttl {ttl_secs}"
        );
    }
}
