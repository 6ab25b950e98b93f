//! Remote daemon setup (`setup/status` → `cf`, `setup/save` → `cu`) and the JIT kill switch
//! (`jit/kill` → `jk`).
//!
//! `setup/save` sends **only the fields the caller gave**. 0.1.50 sent every field, with `""`
//! for the missing ones and its own defaults for the port and timeout, and the daemon wrote them
//! over its settings (reference §12.2 #4): saving just a model id wiped the OpenCode command.
//! The wire needs a control-plane URL (`u`); when the caller leaves it out we read the daemon's
//! current one with `cf` first, so it is kept. A token is never set remotely: a non-empty
//! `agentAuthToken` is refused (install keys on the host).

use hyper::Response;
use serde::Deserialize;
use serde_json::Value;

use codemantle_protocol::message::{JitKill, Message, RequestOnly, SetupSave};

use super::commands::{Command, check_id, check_len, flag, json_reply, validate};
use super::error::ApiError;
use super::http::Body;

/// `POST /devices/:id/setup/status` (operator) → `cf` → `cg` (200).
pub async fn status(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let build = |id| Message::SetupStatusQuery(RequestOnly { request_id: id });
    cmd.run(false, |key| async move {
        cmd.reply(key.as_ref(), false, build).await
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SaveBody {
    control_plane_url: Option<String>,
    opencode_command: Option<String>,
    opencode_host: Option<String>,
    opencode_start_port: Option<Value>,
    opencode_provider_id: Option<String>,
    opencode_model_id: Option<String>,
    request_timeout_ms: Option<Value>,
    agent_auth_token: Option<String>,
}

fn int_field(field: &str, v: &Option<Value>, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|x| (min..=max).contains(&x)) => {
            Ok(n.as_u64())
        }
        Some(other) => Err(ApiError::bad_request(
            "invalid_request",
            format!("`{field}` must be an integer {min}..{max}, got {other}"),
        )),
    }
}

/// `POST /devices/:id/setup/save` (admin) → (`cf`) → `cu` → `cv` (200, or 400 if `o:0`).
pub async fn save(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: SaveBody = cmd.body()?;
    if b.agent_auth_token.as_deref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request(
            "agent_auth_token_must_be_set_locally",
            "the daemon's key is never sent over the tunnel; install it on the host (mode 0600) \
             and leave `agentAuthToken` out",
        ));
    }
    if let Some(u) = &b.control_plane_url {
        if !(u.starts_with("ws://") || u.starts_with("wss://")) {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("`controlPlaneUrl` must start with ws:// or wss://, got {u:?}"),
            ));
        }
    }
    let port = int_field("opencodeStartPort", &b.opencode_start_port, 1, 65_535)?;
    let timeout = int_field("requestTimeoutMs", &b.request_timeout_ms, 1_000, 120_000)?;
    let save = SetupSave {
        idempotency_key: None,
        request_id: 0,
        control_plane_url: b.control_plane_url.clone().unwrap_or_default(),
        auth_token: String::new(),
        opencode_command: b.opencode_command.clone(),
        opencode_host: b.opencode_host.clone(),
        opencode_start_port: port.and_then(|p| u16::try_from(p).ok()),
        provider_id: b.opencode_provider_id.clone(),
        model_id: b.opencode_model_id.clone(),
        request_timeout_ms: timeout.and_then(|t| u32::try_from(t).ok()),
    };
    validate(|id| {
        Message::SetupSave(SetupSave {
            request_id: id,
            ..save.clone()
        })
    })?;
    let keep_url = b.control_plane_url.is_none();
    cmd.run(true, |key| async move {
        let mut save = save;
        if keep_url {
            // Keep the daemon's current URL (the wire has no "unchanged" for it).
            let current = cmd
                .request(key.as_ref(), |id| {
                    Message::SetupStatusQuery(RequestOnly { request_id: id })
                })
                .await?;
            match current {
                Message::SetupStatus(cg) if cg.control_plane_url.is_some() => {
                    save.control_plane_url = cg.control_plane_url.unwrap_or_default();
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_request",
                        "`controlPlaneUrl` is required: the daemon did not report its current one",
                    ));
                }
            }
        }
        cmd.reply(key.as_ref(), true, move |id| {
            Message::SetupSave(SetupSave {
                request_id: id,
                ..save
            })
        })
        .await
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KillBody {
    session_id: Option<String>,
    credential_ref: Option<String>,
    jit_ref: Option<String>,
    reason: Option<String>,
    #[serde(default, deserialize_with = "flag")]
    close_tunnel: bool,
}

/// `POST /devices/:id/jit/kill` (admin) → `jk` → `jv` (200, or 400 if `o:0`). Without a
/// session or credential ref the daemon revokes **every** JIT-bound session on the device.
pub async fn jit_kill(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: KillBody = cmd.body()?;
    let session_id = b.session_id.filter(|s| !s.is_empty());
    if let Some(s) = &session_id {
        check_id("sessionId", s, (1, 64), "invalid_session_id")?;
    }
    let credential_ref = b.credential_ref.or(b.jit_ref).filter(|r| !r.is_empty());
    if let Some(r) = &credential_ref {
        if !codemantle_protocol::jit::valid_ref(r) {
            return Err(ApiError::bad_request(
                "invalid_jit_ref",
                "`credentialRef` must be 1..128 characters of A-Z a-z 0-9 . _ : -",
            ));
        }
    }
    let reason = b
        .reason
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "abnormal_behavior".to_owned());
    check_len("reason", &reason, 128)?;
    let build = |id| {
        Message::JitKill(JitKill {
            idempotency_key: None,
            request_id: id,
            session_id: session_id.clone(),
            credential_ref: credential_ref.clone(),
            close_tunnel: b.close_tunnel,
            reason: Some(reason.clone()),
        })
    };
    validate(build)?;
    cmd.run(true, |key| async move {
        let reply = cmd.request(key.as_ref(), build).await?;
        Ok(json_reply(&reply, true))
    })
    .await
}
