//! OpenCode sessions: `session/start` (`sq` then `si`), `session/status` (`sq`),
//! `session/terminate` (`st`), `prompt` (`sp`), and the log snapshot
//! `GET /session/:sessionId/snapshot` (`sl` → `sc`*; while the device is offline, or with
//! `source=store`, the session's stored output from the control plane's store instead).
//!
//! The session itself lives on the device; we keep its metadata in the store (device, folder,
//! state), so a snapshot still finds its device after a reconnect or a control-plane restart
//! (0.1.50 kept it in memory and answered 404 until someone called start/status again).
//!
//! Differences from 0.1.50, on purpose:
//! - a JIT credential is sent only when the body asks for one (`jit: {...}`): 0.1.50 always sent
//!   a 15-minute credential, and the daemon kills the session when it expires (§12.2 #3);
//! - session-init template injection (`templateId`) is refused with a 400 until the template
//!   compiler exists (it never worked against 0.1.50's daemon either, §6.6);
//! - the snapshot `tail` may be 1..200 (0.1.50 forced at least 50);
//! - the daemon's editor URL is passed on as is (the preview proxy that rewrites it to
//!   `/device/:id/port/:port/...` is not part of this control plane yet).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use codemantle_protocol::jit::{self as jit_token, JitClaims};
use codemantle_protocol::message::{
    JitCredential, JitRenew, Message, Prompt, ReplayLog, SessionResult, SessionStatusQuery,
    StartSession, StopSession,
};

use super::App;
use super::commands::{Command, check_id, checked_device, dispatch_error, json_reply, validate};
use super::error::ApiError;
use super::http::{Body, JsonReply, json_response, query_params, query_u64};
use crate::auth::Principal;
use crate::store::{Role, SessionRecord};
use crate::tunnel::{Caller, DispatchError};

/// Default and bounds of the snapshot `tail` (the daemon accepts 1..200 lines).
pub const DEFAULT_TAIL: u64 = 100;
pub const MAX_TAIL: u64 = 200;
/// Default JIT credential lifetime and its bounds (the daemon refuses more than 1 h).
pub const DEFAULT_JIT_TTL_SECS: u64 = 900;

fn dot() -> String {
    ".".to_owned()
}

fn random_id(prefix: &str, chars: usize) -> String {
    let mut s = URL_SAFE_NO_PAD.encode(crate::secrets::random_bytes::<18>());
    s.truncate(chars);
    format!("{prefix}{s}")
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JitBody {
    token: Option<String>,
    scope: Option<String>,
    env: Option<String>,
    #[serde(rename = "ref")]
    credential_ref: Option<String>,
    ttl_sec: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartBody {
    session_id: Option<String>,
    #[serde(default = "dot")]
    path: String,
    template_id: Option<String>,
    template_version: Option<String>,
    jit: Option<JitBody>,
}

fn jit_credential(
    b: &JitBody,
    device_id: &str,
    session_id: &str,
) -> Result<JitCredential, ApiError> {
    let ttl = b.ttl_sec.unwrap_or(DEFAULT_JIT_TTL_SECS);
    // The daemon wants an expiry more than 15 s away when the `si` arrives.
    if !(16..=3600).contains(&ttl) {
        return Err(ApiError::bad_request(
            "invalid_jit_ttl",
            format!("`jit.ttlSec` must be 16..3600 seconds, got {ttl}"),
        ));
    }
    let expires_at_ms = crate::time::now_ms() + ttl * 1000;
    let scope = b
        .scope
        .clone()
        .unwrap_or_else(|| jit_token::DEFAULT_SCOPE.to_owned());
    let token = match &b.token {
        Some(t) => t.clone(),
        None => {
            // 0.1.50 without a signing key: an unsigned token whose payload says what it is
            // for; nothing verifies it, it is an opaque value for the OpenCode process.
            let claims = JitClaims {
                device_id: device_id.to_owned(),
                session_id: session_id.to_owned(),
                scope: scope.clone(),
                expires_at_ms,
                nonce: random_id("", 12),
            };
            format!(
                "jit.{}.{}",
                URL_SAFE_NO_PAD.encode(jit_token::payload_json(&claims)),
                random_id("", 24)
            )
        }
    };
    Ok(JitCredential {
        token,
        expires_at_ms,
        scope: Some(scope),
        env_name: Some(
            b.env
                .clone()
                .unwrap_or_else(|| jit_token::DEFAULT_ENV_VAR.to_owned()),
        ),
        credential_ref: Some(
            b.credential_ref
                .clone()
                .unwrap_or_else(|| random_id("", 12)),
        ),
        env: Vec::new(),
    })
}

/// Records session metadata (best effort: the command already happened on the device).
async fn record_session(cmd: &Command<'_>, session_id: &str, folder: &str, state: &str) {
    let now = crate::time::now_ms();
    let (store, tenant) = (cmd.app.store.clone(), cmd.principal.tenant.clone());
    let (sid, device, folder, state, actor) = (
        session_id.to_owned(),
        cmd.device.id().to_owned(),
        folder.to_owned(),
        state.to_owned(),
        cmd.principal.actor_id.clone(),
    );
    let result = smol::unblock(move || {
        let created_ms = store
            .session(&tenant, &sid)?
            .filter(|s| s.device_id == device)
            .map_or(now, |s| s.created_ms);
        store.put_session(
            &SessionRecord {
                session_id: sid,
                device_id: device,
                tenant,
                folder,
                state,
                created_ms,
                updated_ms: now,
            },
            &actor,
        )
    })
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not record session metadata");
    }
}

/// The session id a running folder reports: `s`, else `/session/<id>` in its URL.
fn session_from_status(s: Option<&str>, url: Option<&str>) -> Option<String> {
    if let Some(s) = s {
        return Some(s.to_owned());
    }
    let url = url?;
    let (_, rest) = url.split_once("/session/")?;
    let id: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    (!id.is_empty()).then_some(id)
}

/// `POST /devices/:id/session/start` → `sq`; reuse the running session, else `si` → `sr` (200
/// also when `o:0`, as 0.1.50).
pub async fn start(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: StartBody = cmd.body()?;
    let session_id = match &b.session_id {
        Some(s) => {
            check_id("sessionId", s, (1, 64), "invalid_session_id")?;
            s.clone()
        }
        None => random_id("ses_", 14),
    };
    if b.template_version.is_some() && b.template_id.is_none() {
        return Err(ApiError::bad_request(
            "template_id_required_for_template_version",
            "`templateVersion` needs `templateId`",
        ));
    }
    if b.template_id.is_some() {
        return Err(ApiError::bad_request(
            "template_injection_unavailable",
            "session-init template injection is not available yet; push the config with \
             POST /devices/:id/config/push first, then start the session without templateId",
        ));
    }
    let jit = b
        .jit
        .as_ref()
        .map(|j| jit_credential(j, cmd.device.id(), &session_id))
        .transpose()?;
    let folder = b.path.clone();
    let build = |id| {
        Message::StartSession(StartSession {
            idempotency_key: None,
            request_id: id,
            session_id: session_id.clone(),
            folder: Some(folder.clone()),
            jit: jit.clone(),
        })
    };
    validate(build)?;
    validate(|id| {
        Message::SessionStatusQuery(SessionStatusQuery {
            request_id: id,
            folder: folder.clone(),
        })
    })?;
    let (folder, session_id) = (&folder, &session_id);
    cmd.run(true, |key| async move {
        let status = cmd
            .request(key.as_ref(), |id| {
                Message::SessionStatusQuery(SessionStatusQuery {
                    request_id: id,
                    folder: folder.clone(),
                })
            })
            .await?;
        if let Message::SessionStatus(sv) = &status {
            if sv.running && sv.url.is_some() {
                let effective = session_from_status(sv.session_id.as_deref(), sv.url.as_deref())
                    .unwrap_or_else(|| session_id.clone());
                record_session(cmd, &effective, folder, "running").await;
                let reused = Message::SessionResult(SessionResult {
                    request_id: 0,
                    session_id: effective,
                    ok: true,
                    reason: Some("session_reused".into()),
                    url: sv.url.clone(),
                });
                return Ok(json_reply(&reused, false));
            }
        }
        let reply = cmd.request(key.as_ref(), build).await?;
        if let Message::SessionResult(sr) = &reply {
            if sr.ok {
                record_session(cmd, &sr.session_id, folder, "running").await;
            }
        }
        Ok(json_reply(&reply, false))
    })
    .await
}

#[derive(Deserialize)]
struct StatusBody {
    #[serde(default = "dot")]
    path: String,
}

/// `POST /devices/:id/session/status` → `sq` → `sv` (200).
pub async fn status(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: StatusBody = cmd.body()?;
    let build = |id| {
        Message::SessionStatusQuery(SessionStatusQuery {
            request_id: id,
            folder: b.path.clone(),
        })
    };
    validate(build)?;
    let path = &b.path;
    cmd.run(false, |key| async move {
        let reply = cmd.request(key.as_ref(), build).await?;
        if let Message::SessionStatus(sv) = &reply {
            if sv.running {
                if let Some(sid) = session_from_status(sv.session_id.as_deref(), sv.url.as_deref())
                {
                    record_session(cmd, &sid, path, "running").await;
                }
            }
        }
        Ok(json_reply(&reply, false))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TerminateBody {
    session_id: Option<String>,
}

/// `POST /devices/:id/session/terminate` → `st` → `sr` (200 also when `o:0`). Without
/// `sessionId`, the device's most recently started running session.
pub async fn terminate(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: TerminateBody = cmd.body()?;
    let session_id = match b.session_id.filter(|s| !s.is_empty()) {
        Some(s) => {
            check_id("sessionId", &s, (1, 64), "invalid_session_id")?;
            s
        }
        None => {
            let (store, tenant, device) = (
                cmd.app.store.clone(),
                cmd.principal.tenant.clone(),
                cmd.device.id().to_owned(),
            );
            let sessions = smol::unblock(move || store.sessions(&tenant, Some(&device))).await?;
            sessions
                .into_iter()
                .filter(|s| s.state == "running")
                .max_by_key(|s| s.updated_ms)
                .map(|s| s.session_id)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_session_id",
                        "no `sessionId` given and no running session is known for this device",
                    )
                })?
        }
    };
    let build = |id| {
        Message::StopSession(StopSession {
            idempotency_key: None,
            request_id: id,
            session_id: session_id.clone(),
        })
    };
    validate(build)?;
    cmd.run(true, |key| async move {
        let reply = cmd.request(key.as_ref(), build).await?;
        if let Message::SessionResult(sr) = &reply {
            if sr.ok {
                let (store, tenant, sid) = (
                    cmd.app.store.clone(),
                    cmd.principal.tenant.clone(),
                    sr.session_id.clone(),
                );
                let folder = smol::unblock(move || store.session(&tenant, &sid))
                    .await
                    .ok()
                    .flatten()
                    .map_or_else(|| ".".to_owned(), |s| s.folder);
                record_session(cmd, &sr.session_id, &folder, "terminated").await;
            }
        }
        Ok(json_reply(&reply, false))
    })
    .await
}

#[derive(Deserialize)]
struct RenewBody {
    ttl_secs: Option<Value>,
}

/// `POST /sessions/:sessionId/jit/renew` `{"ttl_secs": N}` → `jr` → `ju` (200, or 400 when
/// `o:0`). The session's device comes from the store (tenant-checked: another tenant's session
/// is a 404). Only native daemons know `jr`: a 0.1.x device is a 409 `jit_renew_unsupported`,
/// and nothing is sent to it.
pub async fn jit_renew(
    app: &std::sync::Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
    session_id: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Operator)?;
    check_id("sessionId", session_id, (1, 64), "invalid_session_id")?;
    let (store, tenant, sid) = (
        app.store.clone(),
        principal.tenant.clone(),
        session_id.to_owned(),
    );
    let session = smol::unblock(move || store.session(&tenant, &sid))
        .await?
        .ok_or_else(|| ApiError::not_found("session", session_id))?;
    let (device, record) = checked_device(app, principal, &session.device_id).await?;
    let body = super::http::read_body(body, app.options.max_body_bytes).await?;
    let cmd = Command {
        app,
        principal,
        parts,
        device,
        record,
        body,
    };
    let b: RenewBody = cmd.body()?;
    let bad_ttl = |got: &str| {
        ApiError::bad_request(
            "invalid_jit_ttl",
            format!("`ttl_secs` must be an integer 15..3600 (seconds from now), got {got}"),
        )
    };
    let ttl_secs = match &b.ttl_secs {
        None => return Err(bad_ttl("nothing")),
        Some(v) => v
            .as_u64()
            .filter(|t| (15..=3600).contains(t))
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| bad_ttl(&v.to_string()))?,
    };
    let build = |id| {
        Message::JitRenew(JitRenew {
            idempotency_key: None,
            request_id: id,
            session_id: session_id.to_owned(),
            ttl_secs,
        })
    };
    validate(build)?;
    let cmd = &cmd;
    cmd.run(true, |key| async move {
        let reply = cmd
            .app
            .hub
            .request(&cmd.caller(key.as_ref()), &cmd.device, build)
            .await
            .map_err(|e| match e {
                DispatchError::Unsupported { .. } => ApiError::new(
                    StatusCode::CONFLICT,
                    "jit_renew_unsupported",
                    format!(
                        "device {} runs a 0.1.x daemon (JSON protocol), which cannot renew a JIT \
                         credential; the session ends at its expiry — start a new session with a \
                         fresh credential, or upgrade the daemon",
                        cmd.record.id
                    ),
                ),
                e => dispatch_error(e, &cmd.record),
            })?;
        Ok(json_reply(&reply, true))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptBody {
    session_id: Option<String>,
    prompt: Option<String>,
    stream_id: Option<String>,
}

/// `POST /devices/:id/prompt` → `sp` (fire-and-forget) → 202 `{o:1, x, i}`.
pub async fn prompt(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: PromptBody = cmd.body()?;
    let session_id = b.session_id.unwrap_or_default();
    check_id("sessionId", &session_id, (1, 64), "invalid_session_id")?;
    let text = b.prompt.unwrap_or_default().trim().to_owned();
    if text.is_empty() || text.chars().count() > 8000 {
        return Err(ApiError::bad_request(
            "invalid_prompt",
            "`prompt` must be 1..8000 characters (after trimming)",
        ));
    }
    let stream_id = match b.stream_id {
        Some(x) => {
            check_id("streamId", &x, (8, 24), "invalid_stream_id")?;
            x
        }
        None => random_id("", 16),
    };
    let build = |id| {
        Message::Prompt(Prompt {
            idempotency_key: None,
            request_id: id,
            stream_id: stream_id.clone(),
            session_id: session_id.clone(),
            prompt: text.clone(),
        })
    };
    validate(build)?;
    let stream_id = &stream_id;
    // Before sending: the output may arrive before this handler returns.
    cmd.app.hub.streams.register(
        &cmd.principal.tenant,
        cmd.device.id(),
        stream_id,
        &session_id,
    );
    cmd.run(true, |key| async move {
        let sent = cmd
            .app
            .hub
            .send(&cmd.caller(key.as_ref()), &cmd.device, build)
            .await
            .map_err(|e| dispatch_error(e, &cmd.record))?;
        Ok(JsonReply {
            status: StatusCode::ACCEPTED,
            body: json!({ "o": 1, "x": stream_id, "i": sent.request_id }),
        })
    })
    .await
}

/// `GET /session/:sessionId/snapshot?tail=N` (operator) → `sl` → assembled `sc` chunks →
/// `{o:1, s, d, e:[entries]}`. The log is the device's, not only this session's (0.1.x daemons
/// keep one log per device).
pub async fn snapshot(
    app: &std::sync::Arc<App>,
    principal: &Principal,
    parts: &Parts,
    _body: Incoming,
    session_id: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Operator)?;
    check_id("sessionId", session_id, (1, 64), "invalid_session_id")?;
    let params = query_params(parts.uri.query());
    let tail = query_u64(&params, "tail")?
        .unwrap_or(DEFAULT_TAIL)
        .clamp(1, MAX_TAIL);
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "snapshot_not_found",
            format!(
                "no session {session_id:?} is known in your tenant; start it (or ask its status) \
                 through this control plane first"
            ),
        )
    };
    let (store, tenant, sid) = (
        app.store.clone(),
        principal.tenant.clone(),
        session_id.to_owned(),
    );
    let session = smol::unblock(move || store.session(&tenant, &sid))
        .await?
        .ok_or_else(not_found)?;
    let (device, record) = checked_device(app, principal, &session.device_id)
        .await
        .map_err(|_| not_found())?;
    let from_store = match params
        .iter()
        .rev()
        .find(|(k, _)| k == "source")
        .map(|(_, v)| v)
    {
        None => !app.hub.is_connected(device.id()),
        Some(v) if v == "store" => true,
        Some(v) if v == "device" => false,
        Some(v) => {
            return Err(ApiError::bad_request(
                "invalid_source",
                format!(
                    "`source` must be `device` (the daemon's log) or `store` (the session's stored output), got {v:?}"
                ),
            ));
        }
    };
    if from_store {
        let entries = stored_output_entries(app, principal, device.id(), session_id, tail)
            .await?
            .ok_or_else(not_found)?;
        let body = json!({
            "o": 1,
            "s": session_id,
            "d": device.id(),
            "source": "store",
            "e": entries,
        });
        return Ok(json_response(StatusCode::OK, &body));
    }
    let caller = Caller {
        tenant: principal.tenant.clone(),
        actor: principal.actor_id.clone(),
        idempotency: None,
    };
    let lines = u16::try_from(tail).unwrap_or(100);
    let text = app
        .hub
        .request_stream(&caller, &device, |id, x| {
            Message::ReplayLog(ReplayLog {
                request_id: id,
                stream_id: x.to_owned(),
                lines,
            })
        })
        .await
        .map_err(|e| match e {
            DispatchError::Timeout { after } => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "snapshot_timeout",
                format!(
                    "device {} did not send its log within {} s; retry",
                    record.id,
                    after.as_secs()
                ),
            ),
            other => dispatch_error(other, &record),
        })?;
    let body = json!({
        "o": 1,
        "s": session_id,
        "d": device.id(),
        "source": "device",
        "e": log_entries(&text, crate::time::now_ms()),
    });
    Ok(json_response(StatusCode::OK, &body))
}

/// Most chunks read from the store for one snapshot (the stored stream is capped anyway).
const SNAPSHOT_MAX_CHUNKS: usize = 4096;

/// The last `tail` lines of the session's latest output stream as snapshot entries, from the
/// control plane's store (no daemon involved): `{ts, k:"log", src:"opencode", m, sid}`, as the
/// daemon's own log records OpenCode events. `None` if the session has no stored stream.
async fn stored_output_entries(
    app: &std::sync::Arc<App>,
    principal: &Principal,
    device: &str,
    session_id: &str,
    tail: u64,
) -> Result<Option<Vec<Value>>, ApiError> {
    let x = match app.hub.streams.latest_for_session(device, session_id) {
        Some(x) => x,
        None => {
            let (store, tenant, dev, sid) = (
                app.store.clone(),
                principal.tenant.clone(),
                device.to_owned(),
                session_id.to_owned(),
            );
            match smol::unblock(move || store.latest_stream_for_session(&tenant, &dev, &sid))
                .await?
            {
                Some(x) => x,
                None => return Ok(None),
            }
        }
    };
    let (store, tenant, dev) = (
        app.store.clone(),
        principal.tenant.clone(),
        device.to_owned(),
    );
    let chunks = smol::unblock(move || {
        // The newest chunks: the tail is at the end of the stream.
        let next = store
            .stream_meta(&tenant, &dev, &x)?
            .map_or(0, |m| m.next_seq);
        let from = next.saturating_sub(SNAPSHOT_MAX_CHUNKS as u32);
        store.stream_chunks_after(&tenant, &dev, &x, from, SNAPSHOT_MAX_CHUNKS)
    })
    .await?;
    let text: String = chunks.iter().map(|c| c.data.as_str()).collect();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let skip = lines
        .len()
        .saturating_sub(usize::try_from(tail).unwrap_or(usize::MAX));
    let now = crate::time::format_rfc3339(crate::time::now_ms());
    let entries = lines[skip..]
        .iter()
        .map(|line| {
            let m: String = line.chars().take(4000).collect();
            json!({ "ts": now, "k": "log", "src": "opencode", "m": m, "sid": session_id })
        })
        .collect();
    Ok(Some(entries))
}

/// Chunks formatted per wake-up of an SSE reader.
const STREAM_BATCH: usize = 64;

/// `GET /sessions/:sessionId/stream?x=<stream id>&after=<seq>` (operator): the output of one
/// prompt as `text/event-stream`. `x` is the stream id `POST /devices/:id/prompt` returned
/// (default: the session's most recent prompt through this control plane). Events:
/// - `chunk` (`id: <seq>`): `data: {"q": seq, "d": text}` — the chunk text as the daemon sent
///   it (newline-delimited OpenCode events, possibly split across chunks), JSON-wrapped because
///   it contains newlines;
/// - `truncated` (`id: <to>`): `data: {"from": a, "to": b}` — chunks `a..=b` are no longer
///   held (evicted from the bounded buffer, or acknowledged before a control-plane restart);
/// - `end`: `data: {"q": last seq}` after the last chunk; then the response ends.
///
/// The response names its stream in `X-Stream-Id` (useful when `x` was not given: the
/// session's latest stream — from memory, else from the store after a restart).
///
/// Position: `Last-Event-ID`, else `after`, else from the first chunk. Each chunk is sent once
/// per position: a client that reconnects with the last id it saw misses and repeats nothing.
///
/// `follow=0` (or `false`): serve what is stored now and end the response instead of waiting
/// for more (`codemantle sessions logs` without `-f`); an `end` event is sent only if the
/// stream has ended. Works while the device is offline: the chunks come from the control
/// plane's store.
pub async fn stream(
    app: &std::sync::Arc<App>,
    principal: &Principal,
    parts: &Parts,
    session_id: &str,
) -> Result<Response<Body>, ApiError> {
    use futures_lite::FutureExt as _;
    use http_body_util::{BodyExt as _, StreamBody};
    use hyper::body::{Bytes, Frame};
    use hyper::header::{self, HeaderValue};

    principal.require(Role::Operator)?;
    check_id("sessionId", session_id, (1, 64), "invalid_session_id")?;
    let params = query_params(parts.uri.query());
    let bad_position = || {
        ApiError::bad_request(
            "invalid_last_event_id",
            "Last-Event-ID / `after` must be a chunk seq (0..4294967295)",
        )
    };
    let after: Option<u32> = match parts.headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(bad_position)?,
        ),
        None => query_u64(&params, "after")?
            .map(|a| u32::try_from(a).map_err(|_| bad_position()))
            .transpose()?,
    };
    let follow = match params
        .iter()
        .rev()
        .find(|(k, _)| k == "follow")
        .map(|(_, v)| v)
    {
        None => true,
        Some(v) if v == "1" || v == "true" => true,
        Some(v) if v == "0" || v == "false" => false,
        Some(v) => {
            return Err(ApiError::bad_request(
                "invalid_follow",
                format!(
                    "`follow` must be 1/true (wait for more output) or 0/false (only what is stored), got {v:?}"
                ),
            ));
        }
    };
    let not_found = || {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "stream_not_found",
            format!("no session {session_id:?} (or no such stream of it) in your tenant"),
        )
    };
    let (store, tenant, sid) = (
        app.store.clone(),
        principal.tenant.clone(),
        session_id.to_owned(),
    );
    let session = smol::unblock(move || store.session(&tenant, &sid))
        .await?
        .ok_or_else(not_found)?;
    let device = session.device_id.clone();
    let streams = &app.hub.streams;
    let x = match params.iter().rev().find(|(k, _)| k == "x").map(|(_, v)| v) {
        Some(x) => {
            check_id("x", x, (1, 64), "invalid_stream_id")?;
            x.clone()
        }
        None => match streams.latest_for_session(&device, session_id) {
            Some(x) => x,
            // Not in memory (a control-plane restart, or evicted): the store knows.
            None => {
                let (store, tenant, dev, sid) = (
                    app.store.clone(),
                    principal.tenant.clone(),
                    device.clone(),
                    session_id.to_owned(),
                );
                smol::unblock(move || store.latest_stream_for_session(&tenant, &dev, &sid))
                    .await?
                    .ok_or_else(not_found)?
            }
        },
    };
    let rx = streams
        .watch(&principal.tenant, &device, &x, session_id)
        .ok_or_else(not_found)?;
    let stream_header = HeaderValue::from_str(&x).ok();
    struct State {
        app: std::sync::Arc<App>,
        device: String,
        x: String,
        after: Option<u32>,
        rx: async_channel::Receiver<()>,
        started: bool,
        done: bool,
    }
    let state = State {
        app: app.clone(),
        device,
        x,
        after,
        rx,
        started: false,
        done: false,
    };
    let keepalive = app.options.sse_keepalive;
    let frames = futures_lite::stream::unfold(state, move |mut st| async move {
        if st.done {
            return None;
        }
        if !st.started {
            st.started = true;
            return Some((Ok(Frame::data(Bytes::from_static(b"retry: 2000\n\n"))), st));
        }
        loop {
            let read = st
                .app
                .hub
                .streams
                .read(&st.device, &st.x, st.after, STREAM_BATCH);
            let mut out = String::new();
            for item in &read.items {
                match item {
                    crate::streams::Item::Truncated { from, to } => {
                        out.push_str(&format!(
                            "id: {to}\nevent: truncated\ndata: {}\n\n",
                            json!({ "from": from, "to": to })
                        ));
                        st.after = Some(*to);
                    }
                    crate::streams::Item::Chunk(c) => {
                        out.push_str(&format!(
                            "id: {}\nevent: chunk\ndata: {}\n\n",
                            c.seq,
                            json!({ "q": c.seq, "d": c.data })
                        ));
                        st.after = Some(c.seq);
                    }
                }
            }
            if read.ended {
                let last = st.after.unwrap_or(0);
                out.push_str(&format!("event: end\ndata: {}\n\n", json!({ "q": last })));
                st.done = true;
            }
            if !out.is_empty() {
                return Some((
                    Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(out))),
                    st,
                ));
            }
            if !follow {
                // Everything stored has been served.
                return None;
            }
            let woke = async { st.rx.recv().await.is_ok() }
                .or(async {
                    smol::Timer::after(keepalive).await;
                    false
                })
                .await;
            if !woke {
                if st.rx.is_closed() {
                    // The stream was evicted: end; the client reconnects and learns what is left.
                    return None;
                }
                return Some((Ok(Frame::data(Bytes::from_static(b": keepalive\n\n"))), st));
            }
        }
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(x) = stream_header {
        // Which stream this is (a client that named only the session resumes this one).
        h.insert("x-stream-id", x);
    }
    Ok(resp)
}

/// Normalises the log text as 0.1.50 does: one entry per non-blank line; JSON objects keep
/// `ts` (≤ 64 chars), `k` (meta/log/legacy), `src` (opencode/git/session), `m` (≤ 4000),
/// `sid` (≤ 64), `fp` (≤ 2048), `md` (object); other lines become `legacy` entries.
pub fn log_entries(text: &str, now_ms: u64) -> Vec<Value> {
    let now = crate::time::format_rfc3339(now_ms);
    let short = |v: &Value, max: usize| {
        v.as_str()
            .filter(|s| s.chars().count() <= max)
            .map(|s| Value::String(s.to_owned()))
    };
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => {
                let mut e = Map::new();
                e.insert(
                    "ts".into(),
                    o.get("ts")
                        .and_then(|v| short(v, 64))
                        .unwrap_or_else(|| Value::String(now.clone())),
                );
                let k = o
                    .get("k")
                    .and_then(Value::as_str)
                    .filter(|k| ["meta", "log", "legacy"].contains(k))
                    .unwrap_or("log");
                e.insert("k".into(), k.into());
                let src = o
                    .get("src")
                    .and_then(Value::as_str)
                    .filter(|s| ["opencode", "git", "session"].contains(s))
                    .unwrap_or("session");
                e.insert("src".into(), src.into());
                for (key, max) in [("m", 4000), ("sid", 64), ("fp", 2048)] {
                    if let Some(v) = o.get(key).and_then(|v| short(v, max)) {
                        e.insert(key.into(), v);
                    }
                }
                if let Some(md) = o.get("md").filter(|v| v.is_object()) {
                    e.insert("md".into(), md.clone());
                }
                Value::Object(e)
            }
            _ => json!({ "ts": now, "k": "legacy", "src": "session", "m": line }),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_normalised() {
        let text = "{\"ts\":\"t1\",\"k\":\"meta\",\"src\":\"git\",\"m\":\"hi\",\"x\":1}\r\n\nplain line\r{\"k\":\"weird\"}";
        let e = log_entries(text, 0);
        assert_eq!(e.len(), 3);
        assert_eq!(e[0], json!({"ts":"t1","k":"meta","src":"git","m":"hi"}));
        assert_eq!(e[1]["k"], "legacy");
        assert_eq!(e[1]["m"], "plain line");
        assert_eq!(e[2]["k"], "log");
        assert_eq!(e[2]["src"], "session");
    }

    #[test]
    fn session_ids_come_from_status_or_url() {
        assert_eq!(
            session_from_status(None, Some("http://127.0.0.1:4096/x/session/ses_abc?y=1")),
            Some("ses_abc".into())
        );
        assert_eq!(session_from_status(Some("s1"), None), Some("s1".into()));
        assert_eq!(session_from_status(None, Some("http://h/")), None);
    }
}
