//! Every message type, with arbitrary in-limit values, round-trips through both codecs.
//!
//! CBOR keeps everything. JSON keeps what a 0.1.x peer can see: the decoded message equals
//! [`Message::to_compat`] of the original (native-only fields at their defaults, 64-bit counts
//! clamped), and re-encoding it gives the same text.

use codemantle_protocol::codec::{Codec, decode, encode};
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::limits;
use codemantle_protocol::message::*;
use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Union};
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Field strategies
// ---------------------------------------------------------------------------------------------

/// `[A-Za-z0-9_-]{min,max}`.
fn id(min: usize, max: usize) -> BoxedStrategy<String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9_-]{{{min},{max}}}"))
        .expect("regex")
        .boxed()
}

/// Any text of `min..=max` UTF-16 units (capped at 300 to keep cases fast), including quotes,
/// backslashes, control characters, non-ASCII and astral characters.
fn text(min: usize, max: usize) -> BoxedStrategy<String> {
    let max = max.min(300);
    let ch = prop_oneof![
        4 => proptest::char::range(' ', '~'),
        1 => proptest::char::range('\0', '\u{1f}'),
        1 => Just('"'),
        1 => Just('\\'),
        1 => any::<char>(),
    ];
    proptest::collection::vec(ch, min..=max)
        .prop_map(|chars| chars.into_iter().collect::<String>())
        .prop_filter("within UTF-16 bounds", move |s| {
            let n = s.encode_utf16().count();
            n >= min && n <= max
        })
        .boxed()
}

fn limited(limit: limits::TextLimit) -> BoxedStrategy<String> {
    match limit.charset {
        limits::Charset::Any => text(limit.min, limit.max),
        limits::Charset::NoNul => text(limit.min, limit.max.min(200))
            .prop_filter("no NUL", |s| !s.contains('\0'))
            .boxed(),
        limits::Charset::Id => id(limit.min, limit.max),
        _ => unreachable!("use a dedicated strategy"),
    }
}

fn opt<T: std::fmt::Debug + Clone + 'static>(s: BoxedStrategy<T>) -> BoxedStrategy<Option<T>> {
    proptest::option::of(s).boxed()
}

fn path() -> BoxedStrategy<String> {
    text(0, 512)
}

fn root() -> BoxedStrategy<String> {
    id(1, 16)
}

fn session_id() -> BoxedStrategy<String> {
    id(1, 64)
}

fn stream_id() -> BoxedStrategy<String> {
    id(8, 24)
}

fn port() -> BoxedStrategy<u16> {
    (1u16..=65535).boxed()
}

fn digest() -> BoxedStrategy<String> {
    id(43, 43)
}

fn template_id() -> BoxedStrategy<String> {
    proptest::string::string_regex("[a-z0-9][a-z0-9_-]{2,63}")
        .expect("regex")
        .boxed()
}

fn template_version() -> BoxedStrategy<String> {
    proptest::string::string_regex("[A-Za-z0-9._-]{1,32}")
        .expect("regex")
        .boxed()
}

fn env_name() -> BoxedStrategy<String> {
    proptest::string::string_regex("[A-Z_][A-Z0-9_]{1,63}")
        .expect("regex")
        .boxed()
}

fn credential_ref() -> BoxedStrategy<String> {
    proptest::string::string_regex("[A-Za-z0-9._:-]{1,128}")
        .expect("regex")
        .boxed()
}

fn headers() -> BoxedStrategy<Vec<Header>> {
    let name = proptest::string::string_regex("[A-Za-z0-9-]{1,64}").expect("regex");
    proptest::collection::vec(
        (name, text(0, 4096)).prop_map(|(n, v)| Pair::new(n, v)),
        0..=limits::MAX_HEADERS,
    )
    .boxed()
}

fn body(max: usize) -> BoxedStrategy<Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max.min(2048)).boxed()
}

fn git_text() -> BoxedStrategy<Option<String>> {
    opt(text(0, 4096))
}

fn git_list() -> BoxedStrategy<Option<Vec<String>>> {
    opt(proptest::collection::vec(text(0, 80), 0..20).boxed())
}

fn phase() -> BoxedStrategy<ConfigPhase> {
    prop_oneof![Just(ConfigPhase::SessionInit), Just(ConfigPhase::Runtime)].boxed()
}

fn scope() -> BoxedStrategy<ConfigScope> {
    prop_oneof![Just(ConfigScope::SessionInit), Just(ConfigScope::Full)].boxed()
}

fn policy() -> BoxedStrategy<PolicyMode> {
    prop_oneof![
        Just(PolicyMode::Off),
        Just(PolicyMode::ReadOnly),
        Just(PolicyMode::Restricted)
    ]
    .boxed()
}

fn json_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        text(0, 40).prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(text(0, 12), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

fn json_object() -> BoxedStrategy<Value> {
    proptest::collection::btree_map(text(0, 12), json_value(), 0..6)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
        .boxed()
}

fn error_code() -> BoxedStrategy<ErrorCode> {
    prop_oneof![
        8 => proptest::sample::select(ErrorCode::KNOWN.to_vec()),
        1 => proptest::string::string_regex("[A-Z_]{1,32}")
            .expect("regex")
            .prop_filter("not a known code", |s| ErrorCode::from_known(s).is_none())
            .prop_map(ErrorCode::Other),
    ]
    .boxed()
}

fn dir_entry() -> BoxedStrategy<DirEntry> {
    prop_oneof![
        text(1, 255).prop_map(|name| DirEntry::Dir { name }),
        (
            text(1, 255),
            prop_oneof![0u64..100_000, any::<u64>()],
            prop_oneof![Just(4_294_967_295u64), any::<u64>()]
        )
            .prop_map(|(name, size, mtime_ms)| DirEntry::File {
                name,
                size,
                mtime_ms
            }),
    ]
    .boxed()
}

fn path_request() -> BoxedStrategy<PathRequest> {
    (any::<u32>(), root(), path())
        .prop_map(|(request_id, root, path)| PathRequest {
            idempotency_key: None,
            request_id,
            root,
            path,
        })
        .boxed()
}

fn git_result() -> BoxedStrategy<GitResult> {
    (any::<u32>(), any::<bool>(), git_text())
        .prop_map(|(request_id, ok, message)| GitResult {
            request_id,
            ok,
            message,
        })
        .boxed()
}

fn fs_result() -> BoxedStrategy<FsResult> {
    (any::<u32>(), any::<bool>())
        .prop_map(|(request_id, ok)| FsResult { request_id, ok })
        .boxed()
}

fn git_sync() -> BoxedStrategy<GitSync> {
    (
        any::<u32>(),
        root(),
        path(),
        opt(text(0, 64)),
        opt(text(0, 256)),
    )
        .prop_map(|(request_id, root, path, remote, branch)| GitSync {
            idempotency_key: None,
            request_id,
            root,
            path,
            remote,
            branch,
        })
        .boxed()
}

fn request_only() -> BoxedStrategy<RequestOnly> {
    any::<u32>()
        .prop_map(|request_id| RequestOnly { request_id })
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// One strategy per message type
// ---------------------------------------------------------------------------------------------

fn all_messages() -> Vec<(&'static str, BoxedStrategy<Message>)> {
    vec![
        (
            "h1",
            (
                id(12, 32),
                opt(text(1, 256)),
                opt(id(16, 32)),
                id(16, 24),
                any::<u64>(),
                id(43, 43),
                opt(any::<u32>().boxed()),
                opt(text(1, 64)),
                opt(text(1, 64)),
                opt(text(1, 32)),
            )
                .prop_map(|(d, at, ak, n, ts, m, c, hn, os, av)| {
                    Message::Hello(Hello {
                        device_id: d,
                        auth_token: at,
                        key_id: ak,
                        nonce: n,
                        timestamp_ms: ts,
                        mac: m,
                        fingerprint: c,
                        hostname: hn,
                        os,
                        agent_version: av,
                    })
                })
                .boxed(),
        ),
        (
            "h1 v≠1",
            any::<u64>()
                .prop_filter("not 1", |v| *v != 1)
                .prop_map(|version| Message::HelloUnsupported(UnsupportedHello { version }))
                .boxed(),
        ),
        (
            "h2",
            (
                id(12, 32),
                id(16, 24),
                5u32..=120,
                256u32..=8192,
                id(43, 43),
            )
                .prop_map(|(s, n, hb, mx, m)| {
                    Message::HelloAck(HelloAck {
                        connection_id: s,
                        nonce: n,
                        heartbeat_secs: hb,
                        max_chunk: mx,
                        mac: m,
                    })
                })
                .boxed(),
        ),
        (
            "e",
            (opt(any::<u32>().boxed()), error_code(), opt(text(1, 256)))
                .prop_map(|(request_id, code, message)| {
                    Message::Error(ErrorFrame {
                        request_id,
                        code,
                        message,
                    })
                })
                .boxed(),
        ),
        (
            "p",
            (any::<u64>(), any::<u64>(), any::<u16>())
                .prop_map(|(u, r, a)| {
                    Message::Telemetry(Telemetry {
                        uptime_secs: u,
                        rss_bytes: r,
                        active_handles: a,
                    })
                })
                .boxed(),
        ),
        (
            "pl",
            proptest::collection::vec(port(), 0..=limits::MAX_PORTS)
                .prop_map(|ports| Message::PortList(PortList { ports }))
                .boxed(),
        ),
        (
            "dr",
            (any::<u32>(), root(), path(), 1u16..=256, opt(text(0, 128)))
                .prop_map(|(request_id, root, path, limit, cursor)| {
                    Message::DirList(DirList {
                        request_id,
                        root,
                        path,
                        limit,
                        cursor,
                    })
                })
                .boxed(),
        ),
        (
            "ds",
            (
                any::<u32>(),
                opt(text(1, 128)),
                proptest::collection::vec(dir_entry(), 0..=40),
            )
                .prop_map(|(request_id, cursor, entries)| {
                    Message::DirListing(DirListing {
                        request_id,
                        cursor,
                        entries,
                    })
                })
                .boxed(),
        ),
        ("md", path_request().prop_map(Message::MakeDir).boxed()),
        ("mr", fs_result().prop_map(Message::MakeDirResult).boxed()),
        (
            "rd",
            (any::<u32>(), root(), path(), any::<bool>())
                .prop_map(|(request_id, root, path, recursive)| {
                    Message::RemoveDir(RemoveDir {
                        idempotency_key: None,
                        request_id,
                        root,
                        path,
                        recursive,
                    })
                })
                .boxed(),
        ),
        ("rr", fs_result().prop_map(Message::RemoveDirResult).boxed()),
        (
            "rn",
            (any::<u32>(), root(), path(), path(), any::<bool>())
                .prop_map(|(request_id, root, source, dest, overwrite)| {
                    Message::Rename(Rename {
                        idempotency_key: None,
                        request_id,
                        root,
                        source,
                        dest,
                        overwrite,
                    })
                })
                .boxed(),
        ),
        ("rp", fs_result().prop_map(Message::RenameResult).boxed()),
        (
            "si",
            (
                any::<u32>(),
                session_id(),
                opt(path()),
                opt((
                    text(16, 2048),
                    any::<u64>(),
                    opt(text(1, 128)),
                    opt(env_name()),
                    opt(credential_ref()),
                    proptest::collection::vec(
                        (env_name(), limited(limits::ENV_VALUE)).prop_map(|(n, v)| Pair::new(n, v)),
                        0..=limits::MAX_ENV_PAIRS,
                    ),
                )
                    .prop_map(
                        |(token, e, scope, env_name, credential_ref, env)| JitCredential {
                            token,
                            expires_at_ms: e,
                            scope,
                            env_name,
                            credential_ref,
                            env,
                        },
                    )
                    .boxed()),
            )
                .prop_map(|(request_id, session_id, folder, jit)| {
                    Message::StartSession(StartSession {
                        idempotency_key: None,
                        request_id,
                        session_id,
                        folder,
                        jit,
                    })
                })
                .boxed(),
        ),
        (
            "sr",
            (
                any::<u32>(),
                session_id(),
                any::<bool>(),
                opt(text(1, 96)),
                opt(text(1, 1024)),
            )
                .prop_map(|(request_id, session_id, ok, reason, url)| {
                    Message::SessionResult(SessionResult {
                        request_id,
                        session_id,
                        ok,
                        reason,
                        url,
                    })
                })
                .boxed(),
        ),
        (
            "st",
            (any::<u32>(), session_id())
                .prop_map(|(request_id, session_id)| {
                    Message::StopSession(StopSession {
                        idempotency_key: None,
                        request_id,
                        session_id,
                    })
                })
                .boxed(),
        ),
        (
            "sq",
            (any::<u32>(), path())
                .prop_map(|(request_id, folder)| {
                    Message::SessionStatusQuery(SessionStatusQuery { request_id, folder })
                })
                .boxed(),
        ),
        (
            "sv",
            (
                any::<u32>(),
                any::<bool>(),
                opt(session_id()),
                opt(port()),
                opt((1u32..=i32::MAX as u32).boxed()),
                opt(text(1, 512)),
                opt(text(1, 96)),
                opt(text(1, 64)),
            )
                .prop_map(
                    |(request_id, running, session_id, port, pid, url, reason, protection)| {
                        Message::SessionStatus(SessionStatus {
                            request_id,
                            running,
                            session_id,
                            port,
                            pid,
                            url,
                            reason,
                            protection,
                        })
                    },
                )
                .boxed(),
        ),
        (
            "sl",
            (any::<u32>(), stream_id(), 1u16..=200)
                .prop_map(|(request_id, stream_id, lines)| {
                    Message::ReplayLog(ReplayLog {
                        request_id,
                        stream_id,
                        lines,
                    })
                })
                .boxed(),
        ),
        (
            "sc",
            (stream_id(), any::<u32>(), any::<bool>(), text(0, 8192))
                .prop_map(|(stream_id, seq, last, data)| {
                    Message::StreamChunk(StreamChunk {
                        stream_id,
                        seq,
                        last,
                        data,
                    })
                })
                .boxed(),
        ),
        (
            "sa",
            (stream_id(), any::<u32>())
                .prop_map(|(stream_id, seq)| Message::StreamAck(StreamAck { stream_id, seq }))
                .boxed(),
        ),
        (
            "sp",
            (any::<u32>(), stream_id(), session_id(), text(1, 8000))
                .prop_map(|(request_id, stream_id, session_id, prompt)| {
                    Message::Prompt(Prompt {
                        idempotency_key: None,
                        request_id,
                        stream_id,
                        session_id,
                        prompt,
                    })
                })
                .boxed(),
        ),
        (
            "pr",
            (
                any::<u32>(),
                port(),
                proptest::string::string_regex("[A-Z]{3,10}").expect("regex"),
                text(1, 2048),
                headers(),
                body(limits::MAX_PROXY_REQUEST_BYTES),
            )
                .prop_map(|(request_id, port, method, target, headers, body)| {
                    Message::ProxyRequest(ProxyRequest {
                        request_id,
                        port,
                        method,
                        target,
                        headers,
                        body,
                    })
                })
                .boxed(),
        ),
        (
            "pv",
            (
                any::<u32>(),
                any::<bool>(),
                opt((100u16..=599).boxed()),
                opt(text(1, 128)),
                opt(headers()),
                opt(body(limits::MAX_PROXY_RESPONSE_BYTES)),
                opt(text(1, 256)),
                any::<bool>(),
            )
                .prop_map(
                    |(request_id, ok, status, status_text, headers, body, error, streaming)| {
                        Message::ProxyResponse(ProxyResponse {
                            request_id,
                            ok,
                            status,
                            status_text,
                            headers,
                            body,
                            error,
                            streaming,
                        })
                    },
                )
                .boxed(),
        ),
        (
            "ps",
            (any::<u32>(), body(limits::MAX_PROXY_RESPONSE_BYTES))
                .prop_map(|(request_id, data)| Message::ProxyChunk(ProxyChunk { request_id, data }))
                .boxed(),
        ),
        ("pe", request_only().prop_map(Message::ProxyEnd).boxed()),
        (
            "cf",
            request_only().prop_map(Message::SetupStatusQuery).boxed(),
        ),
        (
            "cg",
            (
                (
                    any::<u32>(),
                    any::<bool>(),
                    any::<bool>(),
                    opt(text(1, 512)),
                ),
                (
                    any::<bool>(),
                    opt(text(1, 256)),
                    opt(text(1, 128)),
                    opt(port()),
                ),
                (
                    opt(text(1, 128)),
                    opt(text(1, 128)),
                    opt((1000u32..=120_000).boxed()),
                    opt(text(1, 96)),
                ),
            )
                .prop_map(|((i, o, c, u), (a, oc, oh, os), (op, om, rt, m))| {
                    Message::SetupStatus(SetupStatus {
                        request_id: i,
                        ok: o,
                        configured: c,
                        control_plane_url: u,
                        has_token: a,
                        opencode_command: oc,
                        opencode_host: oh,
                        opencode_start_port: os,
                        provider_id: op,
                        model_id: om,
                        request_timeout_ms: rt,
                        message: m,
                    })
                })
                .boxed(),
        ),
        (
            "cu",
            (
                (any::<u32>(), text(0, 512), text(0, 512), opt(text(0, 256))),
                (
                    opt(text(0, 128)),
                    opt(port()),
                    opt(text(0, 128)),
                    opt(text(0, 128)),
                    opt((1000u32..=120_000).boxed()),
                ),
            )
                .prop_map(|((i, u, a, oc), (oh, os, op, om, rt))| {
                    Message::SetupSave(SetupSave {
                        idempotency_key: None,
                        request_id: i,
                        control_plane_url: u,
                        auth_token: a,
                        opencode_command: oc,
                        opencode_host: oh,
                        opencode_start_port: os,
                        provider_id: op,
                        model_id: om,
                        request_timeout_ms: rt,
                    })
                })
                .boxed(),
        ),
        (
            "cv setup",
            (any::<u32>(), any::<bool>(), opt(text(1, 96)))
                .prop_map(|(request_id, ok, message)| {
                    Message::SetupSaveResult(SetupSaveResult {
                        request_id,
                        ok,
                        message,
                    })
                })
                .boxed(),
        ),
        (
            "cc",
            (
                (any::<u32>(), opt(phase()), opt(scope()), template_id()),
                (template_version(), any::<u64>(), text(0, 256), digest()),
                (
                    opt(text(1, 64)),
                    opt(text(1, 512)),
                    opt(policy()),
                    json_object(),
                ),
            )
                .prop_map(|((i, ph, sc, tid), (tv, ts, ap, pd), (alg, sg, pm, cfg))| {
                    Message::ConfigPush(ConfigPush {
                        idempotency_key: None,
                        request_id: i,
                        phase: ph,
                        scope: sc,
                        template_id: tid,
                        template_version: tv,
                        timestamp_ms: ts,
                        apply_path: ap,
                        digest: pd,
                        signature_alg: alg,
                        signature: sg,
                        policy_mode: pm,
                        config: cfg,
                    })
                })
                .boxed(),
        ),
        (
            "cv cfg",
            (
                (any::<u32>(), opt(phase()), opt(scope()), any::<bool>()),
                (
                    template_id(),
                    template_version(),
                    prop_oneof![Just(ConfigOutcome::Applied), Just(ConfigOutcome::Rejected)],
                    digest(),
                ),
                (
                    any::<u64>(),
                    opt(text(0, 256)),
                    proptest::collection::vec(text(0, 160), 0..=limits::MAX_VIOLATIONS),
                    opt(text(1, 64)),
                ),
                (opt(text(1, 512)), opt(policy()), opt(text(1, 256))),
            )
                .prop_map(
                    |((i, ph, sc, o), (tid, tv, st, pd), (at, ap, vd, alg), (sg, pm, m))| {
                        Message::ConfigResult(ConfigResult {
                            request_id: i,
                            phase: ph,
                            scope: sc,
                            ok: o,
                            template_id: tid,
                            template_version: tv,
                            outcome: st,
                            digest: pd,
                            at_ms: at,
                            apply_path: ap,
                            violations: vd,
                            signature_alg: alg,
                            signature: sg,
                            policy_mode: pm,
                            message: m,
                        })
                    },
                )
                .boxed(),
        ),
        (
            "jk",
            (
                any::<u32>(),
                opt(session_id()),
                opt(credential_ref()),
                any::<bool>(),
                opt(text(0, 128)),
            )
                .prop_map(
                    |(request_id, session_id, credential_ref, close_tunnel, reason)| {
                        Message::JitKill(JitKill {
                            idempotency_key: None,
                            request_id,
                            session_id,
                            credential_ref,
                            close_tunnel,
                            reason,
                        })
                    },
                )
                .boxed(),
        ),
        (
            "jv",
            (any::<u32>(), any::<bool>(), any::<u32>(), opt(text(1, 160)))
                .prop_map(|(request_id, ok, affected, message)| {
                    Message::JitKillResult(JitKillResult {
                        request_id,
                        ok,
                        affected,
                        message,
                    })
                })
                .boxed(),
        ),
        (
            "jr",
            (any::<u32>(), session_id(), 15u32..=3600)
                .prop_map(|(request_id, session_id, ttl_secs)| {
                    Message::JitRenew(JitRenew {
                        idempotency_key: None,
                        request_id,
                        session_id,
                        ttl_secs,
                    })
                })
                .boxed(),
        ),
        (
            "ju",
            (
                any::<u32>(),
                any::<bool>(),
                opt(any::<u64>().boxed()),
                opt(text(1, 160)),
            )
                .prop_map(|(request_id, ok, expires_at_ms, message)| {
                    Message::JitRenewResult(JitRenewResult {
                        request_id,
                        ok,
                        expires_at_ms,
                        message,
                    })
                })
                .boxed(),
        ),
        (
            "pw",
            (any::<u32>(), 1u32..)
                .prop_map(|(request_id, bytes)| {
                    Message::ProxyWindow(ProxyWindow { request_id, bytes })
                })
                .boxed(),
        ),
        ("gs", path_request().prop_map(Message::GitStatus).boxed()),
        (
            "gt",
            (
                (any::<u32>(), any::<bool>(), git_text(), git_list()),
                (git_list(), git_list(), git_list(), git_text(), git_text()),
            )
                .prop_map(|((i, o, b, a), (m, u, d, c, e))| {
                    Message::GitStatusResult(GitStatusResult {
                        request_id: i,
                        ok: o,
                        branch: b,
                        added: a,
                        modified: m,
                        untracked: u,
                        deleted: d,
                        conflict: c,
                        error: e,
                    })
                })
                .boxed(),
        ),
        ("gi", path_request().prop_map(Message::GitInit).boxed()),
        ("gj", git_result().prop_map(Message::GitInitResult).boxed()),
        (
            "gk",
            (
                any::<u32>(),
                root(),
                path(),
                text(0, 2048),
                opt(text(0, 256)),
            )
                .prop_map(|(request_id, root, path, url, branch)| {
                    Message::GitClone(GitClone {
                        idempotency_key: None,
                        request_id,
                        root,
                        path,
                        url,
                        branch,
                    })
                })
                .boxed(),
        ),
        ("gl", git_result().prop_map(Message::GitCloneResult).boxed()),
        (
            "ga",
            (
                any::<u32>(),
                root(),
                path(),
                opt(text(0, 512)),
                any::<bool>(),
            )
                .prop_map(|(request_id, root, path, pathspec, all)| {
                    Message::GitAdd(GitAdd {
                        idempotency_key: None,
                        request_id,
                        root,
                        path,
                        pathspec,
                        all,
                    })
                })
                .boxed(),
        ),
        ("gb", git_result().prop_map(Message::GitAddResult).boxed()),
        (
            "gp",
            (any::<u32>(), root(), path(), text(0, 1024), any::<bool>())
                .prop_map(|(request_id, root, path, message, amend)| {
                    Message::GitCommit(GitCommit {
                        idempotency_key: None,
                        request_id,
                        root,
                        path,
                        message,
                        amend,
                    })
                })
                .boxed(),
        ),
        (
            "go",
            (any::<u32>(), any::<bool>(), git_text(), git_text())
                .prop_map(|(request_id, ok, hash, message)| {
                    Message::GitCommitResult(GitCommitResult {
                        request_id,
                        ok,
                        hash,
                        message,
                    })
                })
                .boxed(),
        ),
        ("gh", git_sync().prop_map(Message::GitPush).boxed()),
        ("gd", git_result().prop_map(Message::GitPushResult).boxed()),
        ("gm", git_sync().prop_map(Message::GitPull).boxed()),
        ("gn", git_result().prop_map(Message::GitPullResult).boxed()),
        (
            "gc",
            (
                any::<u32>(),
                root(),
                path(),
                opt(prop_oneof![
                    Just(BranchAction::List),
                    Just(BranchAction::Create),
                    Just(BranchAction::Delete)
                ]
                .boxed()),
                opt(text(0, 256)),
            )
                .prop_map(|(request_id, root, path, action, name)| {
                    Message::GitBranch(GitBranch {
                        idempotency_key: None,
                        request_id,
                        root,
                        path,
                        action,
                        name,
                    })
                })
                .boxed(),
        ),
        (
            "gu",
            (
                any::<u32>(),
                any::<bool>(),
                git_list(),
                git_text(),
                git_text(),
            )
                .prop_map(|(request_id, ok, branches, current, message)| {
                    Message::GitBranchResult(GitBranchResult {
                        request_id,
                        ok,
                        branches,
                        current,
                        message,
                    })
                })
                .boxed(),
        ),
        (
            "gx",
            (any::<u32>(), root(), path(), text(0, 256), any::<bool>())
                .prop_map(|(request_id, root, path, branch, create)| {
                    Message::GitCheckout(GitCheckout {
                        idempotency_key: None,
                        request_id,
                        root,
                        path,
                        branch,
                        create,
                    })
                })
                .boxed(),
        ),
        (
            "gy",
            git_result().prop_map(Message::GitCheckoutResult).boxed(),
        ),
        (
            "gf",
            (
                (any::<u32>(), root(), path()),
                (
                    prop_oneof![Just(GitConfigAction::Get), Just(GitConfigAction::Set)],
                    opt(text(0, 256)),
                    opt(text(0, 256)),
                    any::<bool>(),
                    any::<bool>(),
                ),
            )
                .prop_map(|((i, r, p), (a, n, e, g, cm))| {
                    Message::GitConfig(GitConfig {
                        idempotency_key: None,
                        request_id: i,
                        root: r,
                        path: p,
                        action: a,
                        name: n,
                        email: e,
                        global: g,
                        credential_manager: cm,
                    })
                })
                .boxed(),
        ),
        (
            "gv",
            (
                any::<u32>(),
                any::<bool>(),
                opt(text(0, 256)),
                opt(text(0, 256)),
                opt(text(0, 128)),
                opt(any::<bool>().boxed()),
                opt(text(0, 1200)),
            )
                .prop_map(
                    |(request_id, ok, name, email, helper, auth_ready, message)| {
                        Message::GitConfigResult(GitConfigResult {
                            request_id,
                            ok,
                            name,
                            email,
                            helper,
                            auth_ready,
                            message,
                        })
                    },
                )
                .boxed(),
        ),
        (
            "gq",
            (
                any::<u32>(),
                prop_oneof![
                    Just(GitLogStream::Meta),
                    Just(GitLogStream::Out),
                    Just(GitLogStream::Err)
                ],
                text(1, 500),
            )
                .prop_map(|(request_id, stream, line)| {
                    Message::GitLog(GitLog {
                        request_id,
                        stream,
                        line,
                    })
                })
                .boxed(),
        ),
        (
            "unknown",
            (
                proptest::string::string_regex("[a-z]{1,3}|[A-Za-z0-9_.-]{4,16}").expect("regex"),
                opt(any::<u32>().boxed()),
            )
                .prop_filter("not a known tag", |(t, _)| {
                    !KNOWN_TAGS.contains(&t.as_str())
                })
                .prop_map(|(t, request_id)| Message::Unknown { t, request_id })
                .boxed(),
        ),
    ]
}

const KNOWN_TAGS: &[&str] = &[
    "h1", "h2", "e", "p", "pl", "dr", "ds", "md", "mr", "rd", "rr", "rn", "rp", "si", "sr", "st",
    "sq", "sv", "sl", "sc", "sa", "sp", "pr", "pv", "ps", "pe", "cf", "cg", "cu", "cv", "cc", "jk",
    "jv", "jr", "ju", "pw", "gs", "gt", "gi", "gj", "gk", "gl", "ga", "gb", "gp", "go", "gh", "gd",
    "gm", "gn", "gc", "gu", "gx", "gy", "gf", "gv", "gq",
];

fn any_message() -> impl Strategy<Value = Message> {
    // Mutating requests may carry the native `ik`; set it on a share of them.
    (
        Union::new(all_messages().into_iter().map(|(_, s)| s)),
        opt(id(8, 64)),
    )
        .prop_map(|(mut msg, key)| {
            msg.set_idempotency_key(key);
            msg
        })
}

fn uses_native_error_code(m: &Message) -> bool {
    matches!(
        m,
        Message::Error(ErrorFrame {
            code: ErrorCode::Other(_),
            ..
        })
    )
}

fn check_round_trip(msg: &Message) -> Result<(), TestCaseError> {
    let cbor = encode(msg, Codec::Cbor).map_err(|e| TestCaseError::fail(format!("{e}")))?;
    prop_assert_eq!(&decode(&cbor, Codec::Cbor), &Ok(msg.clone()), "CBOR");

    match encode(msg, Codec::Json) {
        Err(e) => prop_assert!(uses_native_error_code(msg), "JSON refused: {}", e),
        Ok(text) => {
            prop_assert!(std::str::from_utf8(&text).is_ok());
            let back = decode(&text, Codec::Json);
            prop_assert_eq!(
                &back,
                &Ok(msg.to_compat()),
                "JSON: {}",
                String::from_utf8_lossy(&text)
            );
            let again = encode(&msg.to_compat(), Codec::Json)
                .map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(again, text, "JSON re-encoding is stable");
            // The JSON text is valid JSON for any other parser too.
            prop_assert!(
                serde_json::from_slice::<Value>(&encode(msg, Codec::Json).unwrap_or_default())
                    .is_ok()
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn every_message_round_trips(msg in any_message()) {
        check_round_trip(&msg)?;
    }
}

#[test]
fn every_type_is_covered() {
    let names: Vec<&str> = all_messages().iter().map(|(n, _)| *n).collect();
    for tag in KNOWN_TAGS {
        assert!(
            names.iter().any(|n| n.split(' ').next() == Some(*tag)),
            "no strategy for {tag}"
        );
    }
    // Each strategy on its own, so a rare type is not starved by the union.
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    for (name, strategy) in all_messages() {
        runner
            .run(&strategy, |msg| check_round_trip(&msg))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
