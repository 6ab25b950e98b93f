//! Config pushes: a published template, compiled and signed, sent to one device
//! (`POST /devices/:id/config/push`) or to every device of the tenant that matches a label
//! selector (`POST /config/push`), and the status of each (`GET
//! /devices/:id/config/status/:requestId`).
//!
//! # What is sent
//!
//! The runtime OpenCode config of the stored template ([`super::templates::compile_stored`]:
//! `templateId`, `templateVersion` or else the latest by semver, the tenant's MCP registry),
//! as a `cc` frame signed with **the device's own key** ([`build_push`], alg
//! `hmac-sha256-devkey-v1`), carrying an `ik` so that a re-send after a reconnect or a retry
//! with the same `Idempotency-Key` is applied once by the daemon. The caller no longer sends a
//! compiled config, a signature or a policy mode: those come from the template and the device,
//! so an operator cannot push something that was never published, or sign for another device.
//!
//! Devices that authenticate with a 0.1.x shared token: we still sign with the device's own
//! key and never with the shared token. A shared token is known to every device that uses
//! it, so a signature made with it would let any of them forge pushes for the others. A 0.1.x
//! daemon does not verify `sg` (it only checks presence), so nothing changes for it; a native
//! daemon whose key file holds a shared token rejects the push with `signature_invalid`, and
//! the status route then says how to fix it (give the device its own key). Refusing before
//! sending needs the tunnel to record which credential a connection used; it does not yet.
//!
//! # Status records
//!
//! The request id a push was sent with is its handle. Its status is kept in the store
//! (`pending` before the frame can be answered, then `applied` / `rejected` with the daemon's
//! violations from its `cv`, or `failed` with the error code), each change with a
//! `config.push` event. Request ids start at a random value per connection, so handles of
//! different connections do not collide. A fleet push records an offline device as `failed`
//! with message `device_offline` under a fresh random id, so every matched device has a handle.
//!
//! # One device vs. the fleet
//!
//! The single-device route waits for the daemon's `cv` and answers with it (0.1.x shape, 200 if
//! applied, 400 if not). The fleet route answers 202 as soon as every online device has its
//! frame queued, with one `{deviceId, requestId, status}` per matched device; the outcomes
//! arrive in the status records (poll the status route, or follow `config.push` events).

use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use codemantle_protocol::handshake::Secret;
use codemantle_protocol::message::{ConfigPush, Message, PolicyMode};

use super::App;
use super::commands::{Command, checked_device, json_reply, validate};
use super::error::ApiError;
use super::http::{Body, JsonReply, json_response, parse_json, read_body};
use super::idempotency;
use crate::auth::Principal;
use crate::store::{ConfigPushRecord, Device, Role, Store, TenantId};
use crate::templates::{Compiled, DEFAULT_APPLY_PATH, LabelSelector, PushError, build_push};
use crate::tunnel::hub::idempotency_token;
use crate::tunnel::{Caller, CheckedDevice, DispatchError};

/// The status message of a push that was never sent because the device was not connected.
pub const DEVICE_OFFLINE: &str = "device_offline";

/// What the daemon says when a push's signature does not verify, and what to do about it.
const SIGNATURE_HINT: &str = "the daemon verifies pushes with the key in its device.key_file; \
    pushes are signed with the device's own key (never a shared 0.1.x token), so if this \
    daemon authenticates with a shared token, register the device with its own key and install \
    that key on the host";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PushBody {
    template_id: Option<String>,
    template_version: Option<String>,
    apply_path: Option<String>,
    /// Refused: the config is compiled from the template (an interim API took it).
    config: Option<Value>,
    /// Refused when non-empty: the control plane signs (0.1.x passed these through).
    signature_algorithm: Option<String>,
    signature: Option<String>,
    /// Must agree with the template's mode when given.
    policy_mode: Option<String>,
}

impl PushBody {
    /// The template id, after refusing the fields the caller may no longer set.
    fn checked(&self) -> Result<String, ApiError> {
        if self.config.is_some() {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`config` is not accepted: the control plane compiles the config from the \
                 published template; publish it with POST /config/templates and send only \
                 templateId (and templateVersion)",
            ));
        }
        let non_empty = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
        if non_empty(&self.signature) || non_empty(&self.signature_algorithm) {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`signature`/`signatureAlgorithm` are not accepted: the control plane signs \
                 every push with the device's own key; leave them out",
            ));
        }
        self.template_id
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ApiError::bad_request("invalid_template_id", "`templateId` is required"))
    }

    /// 400 if `policyMode` is given and is not the template's.
    fn check_policy_mode(&self, compiled: &Compiled) -> Result<(), ApiError> {
        let Some(p) = self.policy_mode.as_deref().filter(|p| !p.is_empty()) else {
            return Ok(());
        };
        match PolicyMode::parse(p) {
            Some(mode) if mode == compiled.policy_mode => Ok(()),
            Some(_) | None => Err(ApiError::bad_request(
                "invalid_request",
                format!(
                    "`policyMode` {p:?} does not match the template: {}@{} has policy mode {}; \
                     the mode is part of the template, so publish a version with the mode you \
                     want (or leave policyMode out)",
                    compiled.template_id, compiled.template_version, compiled.policy_mode
                ),
            )),
        }
    }

    fn apply_path(&self) -> String {
        self.apply_path
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_APPLY_PATH.to_owned())
    }
}

/// The signed `cc` for one device (request id 0: the hub assigns it; it is not signed).
fn signed_push(
    compiled: &Compiled,
    device: &Device,
    apply_path: &str,
) -> Result<ConfigPush, ApiError> {
    let secret = Secret::new(device.secret.as_bytes());
    build_push(compiled, &secret, apply_path, 0, crate::time::now_ms()).map_err(|e| match e {
        PushError::InvalidApplyPath { .. } => ApiError::bad_request(
            "invalid_apply_path",
            format!("`applyPath`: {e} (the daemon's [config_push] allowed_apply_paths decides which are accepted; the default is {DEFAULT_APPLY_PATH})"),
        ),
        PushError::Signature(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "signing_failed",
            format!("the push could not be signed: {e}"),
        ),
    })
}

/// The record of a push to `device_id` before it is answered.
fn base_record(
    tenant: &TenantId,
    device_id: &str,
    push: &ConfigPush,
    at_ms: u64,
) -> ConfigPushRecord {
    ConfigPushRecord {
        tenant: tenant.clone(),
        device_id: device_id.to_owned(),
        request_id: 0,
        template_id: push.template_id.clone(),
        template_version: push.template_version.clone(),
        status: ConfigPushRecord::PENDING.to_owned(),
        digest: push.digest.clone(),
        phase: push.phase.map(|p| p.as_str().to_owned()),
        scope: push.scope.map(|s| s.as_str().to_owned()),
        policy_mode: push.policy_mode.map(|p| p.as_str().to_owned()),
        applied_path: Some(push.apply_path.clone()),
        violations: Vec::new(),
        message: None,
        responded_ms: at_ms,
    }
}

/// Sends `push` to `device` and records its status (pending once queued, then the outcome).
/// `on_queued(request_id)` is called once the frame is queued. Returns the request id (if the
/// frame was queued) and the daemon's reply or why there is none.
async fn send_and_record(
    app: &App,
    caller: &Caller,
    device: &CheckedDevice,
    push: ConfigPush,
    base: ConfigPushRecord,
    on_queued: impl FnOnce(u32),
) -> (Option<u32>, Result<Message, DispatchError>) {
    let store = app.store.clone();
    let actor = caller.actor.clone();
    let queued: Mutex<Option<(u32, smol::Task<()>)>> = Mutex::new(None);
    let outcome = app
        .hub
        .request_with(
            caller,
            device,
            |id| {
                Message::ConfigPush(ConfigPush {
                    request_id: id,
                    ..push
                })
            },
            |id| {
                let record = ConfigPushRecord {
                    request_id: id,
                    ..base.clone()
                };
                let task = spawn_record(store.clone(), record, actor.clone());
                *queued.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, task));
                on_queued(id);
            },
        )
        .await;
    let queued = queued.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some((request_id, pending_written)) = queued else {
        // Never sent (offline, busy): nothing recorded here.
        return (None, outcome);
    };
    // The pending record goes first, so the log reads pending → outcome.
    pending_written.await;
    let mut record = ConfigPushRecord {
        request_id,
        responded_ms: crate::time::now_ms(),
        ..base
    };
    match &outcome {
        Ok(Message::ConfigResult(cv)) => {
            record.status = cv.outcome.as_str().to_owned();
            record.digest = cv.digest.clone();
            record.violations = cv.violations.clone();
            record.message = cv.message.clone();
            record.responded_ms = cv.at_ms;
            if let Some(ap) = &cv.apply_path {
                record.applied_path = Some(ap.clone());
            }
            if let Some(pm) = cv.policy_mode {
                record.policy_mode = Some(pm.as_str().to_owned());
            }
        }
        Ok(other) => {
            record.status = "failed".into();
            record.message = Some(format!("unexpected reply {}", other.type_tag()));
        }
        Err(e) => {
            record.status = "failed".into();
            record.message = Some(e.outcome());
        }
    }
    spawn_record(store, record, caller.actor.clone()).await;
    (Some(request_id), outcome)
}

fn spawn_record(store: Arc<dyn Store>, record: ConfigPushRecord, actor: String) -> smol::Task<()> {
    smol::spawn(async move {
        let id = record.request_id;
        if let Err(e) = smol::unblock(move || store.put_config_push(&record, &actor)).await {
            tracing::warn!(error = %e, request_id = id, "could not record a config push status");
        }
    })
}

/// `POST /devices/:id/config/push` (admin): `{templateId, templateVersion?, applyPath?}` → the
/// daemon's `cv` (200 applied, 400 rejected), with `i` the handle for the status route.
pub async fn push(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: PushBody = cmd.body()?;
    let template_id = b.checked()?;
    let compiled = super::templates::compile_stored(
        cmd.app,
        &cmd.principal.tenant,
        &template_id,
        b.template_version.as_deref(),
    )
    .await?;
    b.check_policy_mode(&compiled)?;
    let push = signed_push(&compiled, &cmd.record, &b.apply_path())?;
    validate(|id| {
        Message::ConfigPush(ConfigPush {
            request_id: id,
            ..push.clone()
        })
    })?;
    let base = base_record(
        &cmd.principal.tenant,
        cmd.device.id(),
        &push,
        crate::time::now_ms(),
    );
    cmd.run(true, |key| async move {
        let caller = cmd.caller(key.as_ref());
        let (request_id, outcome) =
            send_and_record(cmd.app, &caller, &cmd.device, push, base, |_| {}).await;
        let reply = outcome.map_err(|e| super::commands::dispatch_error(e, &cmd.record))?;
        let mut reply = json_reply(&reply, true);
        if let (Value::Object(o), Some(id)) = (&mut reply.body, request_id) {
            // The handle for GET /devices/:id/config/status/:requestId is the reply's `i`.
            o.entry("i").or_insert(json!(id));
        }
        Ok(reply)
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FleetBody {
    #[serde(flatten)]
    push: PushBody,
    selector: Option<String>,
}

/// `POST /config/push` (admin, idempotent): `{templateId, templateVersion?, selector,
/// applyPath?}` → 202 `{o:1, templateId, templateVersion, digest, selector, matched,
/// devices:[{deviceId, requestId, status, message?}]}`.
pub async fn fleet_push(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let b: FleetBody = parse_json(&bytes)?;
    let template_id = b.push.checked()?;
    let selector_text = b.selector.clone().unwrap_or_default();
    let selector = LabelSelector::parse(&selector_text).map_err(|e| {
        ApiError::bad_request(
            e.code(),
            format!(
                "`selector`: {e} — e.g. \"env=prod,role!=canary\"; every device of the tenant \
                 whose labels match receives the push"
            ),
        )
    })?;
    let compiled = super::templates::compile_stored(
        app,
        &principal.tenant,
        &template_id,
        b.push.template_version.as_deref(),
    )
    .await?;
    b.push.check_policy_mode(&compiled)?;
    let apply_path = b.push.apply_path();
    // Refuse a bad apply path before anything is sent or recorded.
    crate::templates::check_apply_path(&apply_path)
        .map_err(|e| ApiError::bad_request("invalid_apply_path", format!("`applyPath`: {e}")))?;
    let (store, tenant, sel) = (
        app.store.clone(),
        principal.tenant.clone(),
        selector.clone(),
    );
    let matched: Vec<(CheckedDevice, Device)> = smol::unblock(move || {
        let mut matched = Vec::new();
        for d in store.devices(&tenant)? {
            if sel.matches(&d.labels) {
                matched.extend(CheckedDevice::lookup(store.as_ref(), &tenant, &d.id)?);
            }
        }
        Ok::<_, crate::store::StoreError>(matched)
    })
    .await?;

    idempotency::run(
        &app.store,
        principal,
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        &bytes,
        |key| async move {
            let http_key = key.as_ref().map(|k| k.key.clone());
            let mut waiting = Vec::new();
            let mut results: Vec<Value> = Vec::new();
            for (checked, device) in matched {
                let push = signed_push(&compiled, &device, &apply_path)?;
                let base = base_record(&principal.tenant, &device.id, &push, crate::time::now_ms());
                if !app.hub.is_connected(&device.id) {
                    results.push(record_unsent(app, principal, base, DEVICE_OFFLINE).await?);
                    continue;
                }
                let caller = Caller {
                    tenant: principal.tenant.clone(),
                    actor: principal.actor_id.clone(),
                    // One ik per device and HTTP key: a retry re-sends the same ik.
                    idempotency: Some(idempotency_token(
                        &principal.tenant,
                        http_key
                            .as_ref()
                            .map(|k| format!("{k}|{}", device.id))
                            .as_deref(),
                    )),
                };
                let (tx, rx) = async_channel::bounded::<u32>(1);
                let task_app = Arc::clone(app);
                let task_base = base.clone();
                let task = smol::spawn(async move {
                    send_and_record(&task_app, &caller, &checked, push, task_base, move |id| {
                        let _ = tx.try_send(id);
                    })
                    .await
                });
                waiting.push((device.id, base, rx, task));
            }
            for (device_id, base, rx, task) in waiting {
                match rx.recv().await {
                    Ok(request_id) => {
                        // The outcome is recorded by the task; nobody waits for it here.
                        task.detach();
                        results.push(json!({
                            "deviceId": device_id,
                            "requestId": request_id,
                            "status": ConfigPushRecord::PENDING,
                        }));
                    }
                    Err(_) => {
                        // Never queued: the task ended with the reason.
                        let (_, outcome) = task.await;
                        let why = outcome
                            .err()
                            .map_or_else(|| "not_sent".to_owned(), |e| e.outcome());
                        results.push(record_unsent(app, principal, base, &why).await?);
                    }
                }
            }
            let mut reply = JsonReply::ok(json!({
                "o": 1,
                "templateId": compiled.template_id,
                "templateVersion": compiled.template_version,
                "digest": compiled.digest,
                "selector": selector.to_string(),
                "matched": results.len(),
                "devices": results,
            }));
            reply.status = StatusCode::ACCEPTED;
            Ok(reply)
        },
    )
    .await
}

/// Records a push that was never sent (`failed` with `why`) under a fresh request id, and
/// returns its entry for the fleet reply.
async fn record_unsent(
    app: &Arc<App>,
    principal: &Principal,
    base: ConfigPushRecord,
    why: &str,
) -> Result<Value, ApiError> {
    let store = app.store.clone();
    let actor = principal.actor_id.clone();
    let why = why.to_owned();
    let record = smol::unblock(move || {
        // A random id no other push to this device has (ids of live connections are random
        // too; a clash is improbable, and checked).
        let request_id = loop {
            let id = u32::from_le_bytes(crate::secrets::random_bytes::<4>());
            if id != 0
                && store
                    .config_push(&base.tenant, &base.device_id, id)?
                    .is_none()
            {
                break id;
            }
        };
        let record = ConfigPushRecord {
            request_id,
            status: "failed".to_owned(),
            message: Some(why),
            responded_ms: crate::time::now_ms(),
            ..base
        };
        store.put_config_push(&record, &actor)?;
        Ok::<_, crate::store::StoreError>(record)
    })
    .await?;
    Ok(json!({
        "deviceId": record.device_id,
        "requestId": record.request_id,
        "status": record.status,
        "message": record.message,
    }))
}

/// `GET /devices/:id/config/status/:requestId` (operator).
pub async fn status(
    app: &Arc<App>,
    principal: &Principal,
    _parts: &Parts,
    _body: Incoming,
    device_id: &str,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Operator)?;
    let (device, _) = checked_device(app, principal, device_id).await?;
    let rid = request_id
        .parse::<u32>()
        .ok()
        .filter(|n| *n > 0 && request_id.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_request_id",
                "the request id is the `i` of the push reply: an integer 1..4294967295",
            )
        })?;
    let (store, tenant, id) = (
        app.store.clone(),
        principal.tenant.clone(),
        device.id().to_owned(),
    );
    let record = smol::unblock(move || store.config_push(&tenant, &id, rid))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "config_status_not_found",
                format!(
                    "no config push {rid} to device {device_id}; use the `i` of the push reply \
                     (or the requestId of a fleet push)"
                ),
            )
        })?;
    let hint = record
        .violations
        .iter()
        .any(|v| v.starts_with("signature_"))
        .then_some(SIGNATURE_HINT);
    let mut body = json!({
        "deviceId": record.device_id,
        "requestId": record.request_id,
        "templateId": record.template_id,
        "templateVersion": record.template_version,
        "status": record.status,
        "digest": record.digest,
        "respondedAt": record.responded_ms,
    });
    let optional = [
        ("phase", record.phase.map(Value::from)),
        ("scope", record.scope.map(Value::from)),
        ("policyMode", record.policy_mode.map(Value::from)),
        ("appliedPath", record.applied_path.map(Value::from)),
        ("message", record.message.map(Value::from)),
        (
            "violations",
            (!record.violations.is_empty()).then(|| Value::from(record.violations)),
        ),
        ("hint", hint.map(Value::from)),
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            body[k] = v;
        }
    }
    Ok(json_response(StatusCode::OK, &body))
}
