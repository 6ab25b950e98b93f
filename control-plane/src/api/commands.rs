//! Device commands: `POST /devices/:id/<op>` (the 0.1.x panel's paths and JSON field names).
//!
//! Every command goes through the same steps, in this order:
//! 1. role check (per route, as 0.1.50's table);
//! 2. **tenant check**: the device must belong to the caller's tenant, else 404
//!    `device_not_found`, before anything is read or sent;
//! 3. the body is parsed and the protocol message built and **validated against the daemon's
//!    limits** (0.1.50 sent anything and the daemon silently dropped what it disliked, so the
//!    caller waited 15–180 s for a 504): a bad field is a 400 that names the body field;
//! 4. mutating commands run under [`idempotency::run`] (a retry with the same
//!    `Idempotency-Key` replays the first answer and sends nothing), and carry an `ik` to
//!    native daemons ([`crate::tunnel::hub::idempotency_token`]); they are refused with 507
//!    `storage_full` while the store cannot write (a command must not run unrecorded);
//! 5. dispatch through the [`crate::tunnel::DeviceHub`] (which records the `command` event);
//! 6. the daemon's reply is returned as 0.1.x JSON (`{v,t,i,...}`), with 200, or 400 when the
//!    route is "200/400" and the reply says `o:0`.
//!
//! How failures map to HTTP (0.1.50 answered most with 404/500/502/504):
//! - not connected → **409** `device_not_connected` (the code 0.1.x panels know; 409 because the
//!   request is fine and the device's state is what is wrong — retry once it is online);
//! - too many requests in flight → 429 `device_busy`; the daemon's `e FLOW` too;
//! - no reply in time → 504 `request_timeout`;
//! - connection replaced / lost while waiting → 502 `device_replaced` / `device_disconnected`;
//! - daemon `e`: `PATH` → 400 `path_invalid`, `ROOT` → 400 `root_unknown`, `LIMIT` → 400
//!   `limit_exceeded` (the *request* is what is too big for the host: 400, not 413 which is about
//!   our body limit), `AUTH` → 403 `device_refused`, `FLOW` → 429 `device_busy`, `PROTO` → 502
//!   `device_protocol_error`, `INTERNAL` (and anything else) → 502 `device_error`. The message
//!   carries `remote error: <CODE>` as 0.1.50 did, plus the daemon's text.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::error::{EncodeError, ErrorCode};
use codemantle_protocol::message::{DirEntry, Message};

use super::error::ApiError;
use super::http::{Body, JsonReply, parse_json, read_body};
use super::idempotency::{self, IdempotencyKey};
use super::routes::{DeviceOp, GitOp};
use super::{App, files, git, sessions, setup};
use crate::auth::Principal;
use crate::store::{Device, Role};
use crate::tunnel::hub::{idempotency_token, reply_ok};
use crate::tunnel::{Caller, CheckedDevice, DispatchError};

impl DeviceOp {
    /// The least role allowed to run this command (0.1.50's table).
    pub fn role(self) -> Role {
        match self {
            DeviceOp::JitKill | DeviceOp::SetupSave | DeviceOp::ConfigPush => Role::Admin,
            _ => Role::Operator,
        }
    }

    /// Whether the command changes something on the host (runs under `Idempotency-Key`).
    pub fn is_mutating(self) -> bool {
        !matches!(
            self,
            DeviceOp::Dir
                | DeviceOp::SessionStatus
                | DeviceOp::SetupStatus
                | DeviceOp::Git(GitOp::Status)
        )
    }
}

/// One device command in flight: everything a route needs.
pub struct Command<'a> {
    pub app: &'a Arc<App>,
    pub principal: &'a Principal,
    pub parts: &'a Parts,
    pub device: CheckedDevice,
    pub record: Device,
    pub body: hyper::body::Bytes,
}

impl Command<'_> {
    /// The request body as `T` (an empty body is `{}`).
    pub fn body<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        parse_json(&self.body)
    }

    /// The caller, with the `ik` derived from `key` (or a fresh random one).
    pub fn caller(&self, key: Option<&IdempotencyKey>) -> Caller {
        Caller {
            tenant: self.principal.tenant.clone(),
            actor: self.principal.actor_id.clone(),
            idempotency: Some(idempotency_token(
                &self.principal.tenant,
                key.map(|k| k.key.as_str()),
            )),
        }
    }

    /// Runs `handler` under the request's `Idempotency-Key` when `mutating`, else directly.
    pub async fn run<F, Fut>(&self, mutating: bool, handler: F) -> Result<Response<Body>, ApiError>
    where
        F: FnOnce(Option<IdempotencyKey>) -> Fut,
        Fut: Future<Output = Result<JsonReply, ApiError>>,
    {
        if !mutating {
            return handler(None).await.map(JsonReply::into_response);
        }
        let store = self.app.store.clone();
        smol::unblock(move || store.check_writable()).await?;
        idempotency::run(
            &self.app.store,
            self.principal,
            &self.parts.method,
            self.parts.uri.path(),
            &self.parts.headers,
            &self.body,
            handler,
        )
        .await
    }

    /// Sends the request `build` makes and waits for the reply.
    pub async fn request(
        &self,
        key: Option<&IdempotencyKey>,
        build: impl FnOnce(u32) -> Message,
    ) -> Result<Message, ApiError> {
        self.app
            .hub
            .request(&self.caller(key), &self.device, build)
            .await
            .map_err(|e| dispatch_error(e, &self.record))
    }

    /// Sends, then answers with the daemon's reply: 200, or 400 when `ok_or_400` and `o:0`.
    pub async fn reply(
        &self,
        key: Option<&IdempotencyKey>,
        ok_or_400: bool,
        build: impl FnOnce(u32) -> Message,
    ) -> Result<JsonReply, ApiError> {
        let reply = self.request(key, build).await?;
        Ok(json_reply(&reply, ok_or_400))
    }
}

/// `POST /devices/:id/<op>`.
pub async fn handle(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
    id: &str,
    op: DeviceOp,
) -> Result<Response<Body>, ApiError> {
    principal.require(op.role())?;
    let (device, record) = checked_device(app, principal, id).await?;
    let body = read_body(body, app.options.max_body_bytes).await?;
    let cmd = Command {
        app,
        principal,
        parts,
        device,
        record,
        body,
    };
    match op {
        DeviceOp::Dir => files::dir(&cmd).await,
        DeviceOp::Mkdir => files::mkdir(&cmd).await,
        DeviceOp::Rmdir => files::rmdir(&cmd).await,
        DeviceOp::Rename => files::rename(&cmd).await,
        DeviceOp::SessionStart => sessions::start(&cmd).await,
        DeviceOp::SessionStatus => sessions::status(&cmd).await,
        DeviceOp::SessionTerminate => sessions::terminate(&cmd).await,
        DeviceOp::Prompt => sessions::prompt(&cmd).await,
        DeviceOp::JitKill => setup::jit_kill(&cmd).await,
        DeviceOp::SetupStatus => setup::status(&cmd).await,
        DeviceOp::SetupSave => setup::save(&cmd).await,
        DeviceOp::ConfigPush => super::config_push::push(&cmd).await,
        DeviceOp::Git(g) => git::handle(&cmd, g).await,
    }
}

/// The device `id` of the caller's tenant, or 404 `device_not_found` (also for another
/// tenant's device).
pub async fn checked_device(
    app: &Arc<App>,
    principal: &Principal,
    id: &str,
) -> Result<(CheckedDevice, Device), ApiError> {
    let (store, tenant, device_id) = (app.store.clone(), principal.tenant.clone(), id.to_owned());
    smol::unblock(move || CheckedDevice::lookup(store.as_ref(), &tenant, &device_id))
        .await?
        .ok_or_else(|| ApiError::not_found("device", id))
}

/// Checks a request against the daemon's limits before anything is sent: builds it with a
/// placeholder id and encodes it natively. A broken limit is a 400 naming the body field.
pub fn validate(build: impl FnOnce(u32) -> Message) -> Result<(), ApiError> {
    let msg = build(1);
    codec::encode(&msg, Codec::Cbor)
        .map(drop)
        .map_err(|e| invalid_field(msg.type_tag(), &e))
}

/// A 400 for an [`EncodeError`], naming the body field behind the wire key.
pub fn invalid_field(t: &str, e: &EncodeError) -> ApiError {
    match e {
        EncodeError::Limit { key, why, .. } => {
            let field = body_field(t, key);
            ApiError::bad_request(
                "invalid_request",
                format!("`{field}` is not accepted by the daemon: {why} (wire field {t}.{key})"),
            )
        }
        EncodeError::FrameTooLarge { len, max } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request would be a {len}-byte frame; the daemon accepts at most {max}"),
        ),
    }
}

/// The body field (0.1.x panel names) a wire key of message `t` comes from.
pub fn body_field(t: &str, key: &str) -> &'static str {
    match (t, key) {
        (_, "r") if t != "jk" => "root",
        ("jk", "r") => "credentialRef",
        ("dr", "l") => "limit",
        ("dr", "k") => "cursor",
        ("rn", "s") => "source",
        ("rn", "d") => "dest",
        ("rn", "ow") => "overwrite",
        ("rd", "rc") => "recursive",
        ("si" | "st" | "sp" | "jk", "s") => "sessionId",
        ("si", "j") => "jit",
        ("sp", "p") => "prompt",
        ("sp" | "sl", "x") => "streamId",
        ("sl", "l") => "tail",
        ("jk", "m") => "reason",
        ("jk", "x") => "closeTunnel",
        ("gk", "u") => "url",
        ("gk" | "gh" | "gm" | "gx", "b") => "branch",
        ("gc", "n") => "branch",
        ("ga", "f") => "files",
        ("ga", "A") => "all",
        ("gp", "m") => "message",
        ("gp", "a") => "amend",
        ("gh" | "gm", "o") => "remote",
        ("gc" | "gf", "a") => "action",
        ("gx", "c") => "create",
        ("gf", "n") => "name",
        ("gf", "e") => "email",
        ("gf", "g") => "global",
        ("gf", "cm") => "credentialManager",
        ("cu", "u") => "controlPlaneUrl",
        ("cu", "a") => "agentAuthToken",
        ("cu", "oc") => "opencodeCommand",
        ("cu", "oh") => "opencodeHost",
        ("cu", "os") => "opencodeStartPort",
        ("cu", "op") => "opencodeProviderId",
        ("cu", "om") => "opencodeModelId",
        ("cu", "rt") => "requestTimeoutMs",
        ("cc", "tid") => "templateId",
        ("cc", "tv") => "templateVersion",
        ("cc", "ap") => "applyPath",
        ("cc", "alg") => "signatureAlgorithm",
        ("cc", "sg") => "signature",
        ("cc", "pm") => "policyMode",
        ("cc", "cfg") => "config",
        (_, "p") => "path",
        _ => "(a field)",
    }
}

/// The daemon's reply as the 0.1.x JSON a panel expects (`{v,t,i,...}`). Directory entries
/// keep their full size and mtime (0.1.x clamps them to uint32 on the wire). A session
/// status keeps the native `pt` (how the session's process is confined), an extra key a 0.1.x
/// panel ignores, so API clients can see the protection level the host got.
pub fn reply_json(reply: &Message) -> Value {
    let compat = reply.to_compat();
    let mut value = codec::encode(&compat, Codec::Json)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .unwrap_or_else(|| json!({ "v": 1, "t": reply.type_tag() }));
    if let Message::DirListing(ds) = reply {
        value["e"] = ds
            .entries
            .iter()
            .map(|e| match e {
                DirEntry::Dir { name } => json!(["d", name, 0]),
                DirEntry::File {
                    name,
                    size,
                    mtime_ms,
                } => json!(["f", name, size, mtime_ms]),
            })
            .collect();
    }
    if let Message::SessionStatus(sv) = reply {
        if let Some(pt) = &sv.protection {
            value["pt"] = json!(pt);
        }
    }
    value
}

/// The reply with 200, or 400 if `ok_or_400` and the daemon said `o:0`.
pub fn json_reply(reply: &Message, ok_or_400: bool) -> JsonReply {
    let status = if ok_or_400 && !reply_ok(reply) {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    JsonReply {
        status,
        body: reply_json(reply),
    }
}

/// Maps a dispatch failure to the API error an operator can act on.
pub fn dispatch_error(e: DispatchError, device: &Device) -> ApiError {
    let id = &device.id;
    match e {
        DispatchError::Offline { .. } => {
            let seen = device
                .last_seen_ms
                .map(|ms| format!("last seen {}", crate::time::format_rfc3339(ms)))
                .unwrap_or_else(|| "never seen".to_owned());
            ApiError::new(
                StatusCode::CONFLICT,
                "device_not_connected",
                format!(
                    "device {id} is not connected ({seen}); check that its daemon runs and can \
                     reach this control plane (on the host: systemctl status codemantle-daemon), \
                     then retry once GET /devices/{id} shows status online"
                ),
            )
        }
        DispatchError::Busy { limit } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "device_busy",
            format!("device {id} already has {limit} requests in flight; retry in a moment"),
        ),
        DispatchError::Invalid(err) => invalid_field("?", &err),
        DispatchError::Unsupported { t } => ApiError::bad_request(
            "unsupported_by_device",
            format!(
                "device {id} runs a 0.1.x daemon (JSON protocol), which would silently ignore an \
                 option of this request (`{t}`); leave the option out or upgrade the daemon"
            ),
        ),
        DispatchError::Timeout { after } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "request_timeout",
            format!(
                "device {id} did not answer within {} s; it may still be working on it — check \
                 GET /events, and retry with the same Idempotency-Key to avoid running it twice",
                after.as_secs()
            ),
        ),
        DispatchError::Replaced => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "device_replaced",
            format!(
                "device {id} reconnected while the request was in flight, so its answer is lost; \
                 retry (with the same Idempotency-Key if the request changes something)"
            ),
        ),
        DispatchError::Disconnected => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "device_disconnected",
            format!(
                "device {id} disconnected before answering; retry once it is online again \
                 (with the same Idempotency-Key if the request changes something)"
            ),
        ),
        DispatchError::Remote { code, message } => remote_error(id, &code, message.as_deref()),
        DispatchError::TooLarge { limit } => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "reply_too_large",
            format!("device {id} sent more than {limit} bytes; ask for less (e.g. a lower tail)"),
        ),
        DispatchError::Unrecorded {
            reason,
            storage_full,
        } => ApiError::new(
            if storage_full {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            },
            if storage_full {
                "storage_full"
            } else {
                "store_unavailable"
            },
            format!(
                "device {id} ran the command, but the control plane could not record it \
                 ({reason}); free space on its data disk if it is full, then retry with the same \
                 Idempotency-Key: the daemon answers from its journal without running it again"
            ),
        ),
    }
}

fn remote_error(id: &str, code: &ErrorCode, message: Option<&str>) -> ApiError {
    let (status, api_code, hint) = match code {
        ErrorCode::Path => (
            StatusCode::BAD_REQUEST,
            "path_invalid",
            "the path is outside the root, does not exist, or is not allowed there",
        ),
        ErrorCode::Root => (
            StatusCode::BAD_REQUEST,
            "root_unknown",
            "the daemon has no such root; use \"cwd\"",
        ),
        ErrorCode::Limit => (
            StatusCode::BAD_REQUEST,
            "limit_exceeded",
            "the request exceeds a limit of the daemon; ask for less",
        ),
        ErrorCode::Auth => (
            StatusCode::FORBIDDEN,
            "device_refused",
            "the daemon refused the request",
        ),
        ErrorCode::Flow => (
            StatusCode::TOO_MANY_REQUESTS,
            "device_busy",
            "the daemon is busy; retry in a moment",
        ),
        ErrorCode::Proto => (
            StatusCode::BAD_GATEWAY,
            "device_protocol_error",
            "the daemon did not understand the request; its version may be too old",
        ),
        _ => (
            StatusCode::BAD_GATEWAY,
            "device_error",
            "the daemon failed while handling the request; see its log",
        ),
    };
    let detail = message.map(|m| format!(" ({m})")).unwrap_or_default();
    ApiError::new(
        status,
        api_code,
        format!("remote error: {code}{detail} from device {id}: {hint}"),
    )
}

/// A 0.1.x-style flag: `true`/`false`, `1`/`0`, or absent/null (false).
pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(b),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(true),
        Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(false),
        Some(other) => Err(serde::de::Error::custom(format!(
            "expected true/false or 1/0, got {other}"
        ))),
    }
}

/// A 0.1.x-style optional flag (absent stays `None`).
pub fn opt_flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => flag(v).map(Some).map_err(serde::de::Error::custom),
    }
}

/// Text of at most `max` characters, or 400 naming `field`.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    let n = value.chars().count();
    if n > max {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("`{field}` has {n} characters; at most {max} are allowed"),
        ));
    }
    Ok(())
}

/// `^[A-Za-z0-9_-]{min,max}$`, or 400 `code` naming `field`.
pub fn check_id(
    field: &str,
    value: &str,
    (min, max): (usize, usize),
    code: &'static str,
) -> Result<(), ApiError> {
    let ok = (min..=max).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            code,
            format!("`{field}` must be {min}..{max} characters of A-Z a-z 0-9 _ -"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codemantle_protocol::message::{DirList, DirListing};

    #[test]
    fn validation_names_the_body_field() {
        let err = validate(|id| {
            Message::DirList(DirList {
                request_id: id,
                root: "cwd".into(),
                path: "x".repeat(600),
                limit: 10,
                cursor: None,
            })
        })
        .expect_err("path too long");
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("`path`"), "{}", err.message);
        let err = validate(|id| {
            Message::DirList(DirList {
                request_id: id,
                root: "cwd".into(),
                path: ".".into(),
                limit: 0,
                cursor: None,
            })
        })
        .expect_err("limit 0");
        assert!(err.message.contains("`limit`"), "{}", err.message);
    }

    #[test]
    fn listings_keep_full_mtimes() {
        let ds = Message::DirListing(DirListing {
            request_id: 7,
            cursor: None,
            entries: vec![
                DirEntry::Dir { name: "src".into() },
                DirEntry::File {
                    name: "a".into(),
                    size: 5,
                    mtime_ms: 1_700_000_000_123,
                },
            ],
        });
        let v = reply_json(&ds);
        assert_eq!(v["t"], "ds");
        assert_eq!(v["i"], 7);
        assert_eq!(v["e"][1], json!(["f", "a", 5, 1_700_000_000_123u64]));
    }

    #[test]
    fn remote_codes_map_to_statuses() {
        let d = Device {
            id: "dev_ABCDEFGHIJKLMNOP".into(),
            tenant: crate::store::TenantId::default_tenant(),
            name: "x".into(),
            labels: Default::default(),
            secret: String::new(),
            key_id: String::new(),
            created_ms: 0,
            first_seen_ms: None,
            last_seen_ms: None,
            agent_version: None,
            host: Default::default(),
        };
        let remote = |code| {
            dispatch_error(
                DispatchError::Remote {
                    code,
                    message: None,
                },
                &d,
            )
        };
        assert_eq!(remote(ErrorCode::Path).code, "path_invalid");
        assert_eq!(remote(ErrorCode::Path).status, StatusCode::BAD_REQUEST);
        assert_eq!(remote(ErrorCode::Internal).status, StatusCode::BAD_GATEWAY);
        assert_eq!(remote(ErrorCode::Auth).status, StatusCode::FORBIDDEN);
        let offline = dispatch_error(
            DispatchError::Offline {
                device_id: d.id.clone(),
            },
            &d,
        );
        assert_eq!(
            (offline.status, offline.code.as_ref()),
            (StatusCode::CONFLICT, "device_not_connected")
        );
    }
}
