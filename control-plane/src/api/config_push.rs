//! Config push (`POST /devices/:id/config/push` → `cc` → `cv`) and its status
//! (`GET /devices/:id/config/status/:requestId`).
//!
//! The request id the push was sent with is its handle. Its status is kept in the store
//! (`pending` before the frame can be answered, then `applied` / `rejected` from the daemon's
//! `cv`, or `failed` with the error code), each change with a `config.push` event. Request ids
//! start at a random value per connection, so handles of different connections do not collide.
//!
//! The payload comes from [`compile_for_push`], the single place to swap for the template
//! compiler (issue 6). Until then the caller sends the compiled OpenCode config as `config`
//! together with `templateId`/`templateVersion`, and we compute the digest the daemon checks
//! (`codemantle_protocol::canonical::digest`, bit-exact with 0.1.50).

use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use codemantle_protocol::message::{ConfigPhase, ConfigPush, ConfigScope, Message, PolicyMode};

use super::App;
use super::commands::{Command, checked_device, json_reply, validate};
use super::error::ApiError;
use super::http::{Body, json_response};
use crate::auth::Principal;
use crate::store::{ConfigPushRecord, Role, Store, TenantId};

/// Where 0.1.x daemons write a runtime config.
pub const DEFAULT_APPLY_PATH: &str = ".opencode/opencode.json";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PushBody {
    template_id: Option<String>,
    template_version: Option<String>,
    config: Option<Value>,
    apply_path: Option<String>,
    signature_algorithm: Option<String>,
    signature: Option<String>,
    policy_mode: Option<String>,
}

/// What a push sends.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledConfig {
    pub template_id: String,
    pub template_version: String,
    pub config: Value,
    /// `canonical::digest(config)`: what the daemon recomputes and compares.
    pub digest: String,
    pub policy_mode: Option<PolicyMode>,
}

/// Produces the payload of a push. **The one place to swap for the template compiler**: today
/// the compiled config comes in the request (`config`, a JSON object) and is used as is.
pub fn compile_for_push(
    _store: &dyn Store,
    _tenant: &TenantId,
    template_id: &str,
    template_version: &str,
    config: Option<&Value>,
    policy_mode: Option<PolicyMode>,
) -> Result<CompiledConfig, ApiError> {
    let config = match config {
        Some(c @ Value::Object(_)) => c.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`config` must be a JSON object: the compiled OpenCode config to write (until \
                 the template compiler lands, the caller compiles)",
            ));
        }
    };
    Ok(CompiledConfig {
        template_id: template_id.to_owned(),
        template_version: template_version.to_owned(),
        digest: codemantle_protocol::canonical::digest(&config),
        config,
        policy_mode,
    })
}

/// `POST /devices/:id/config/push` (admin).
pub async fn push(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: PushBody = cmd.body()?;
    let template_id = b
        .template_id
        .clone()
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ApiError::bad_request("invalid_template_id", "`templateId` is required"))?;
    let policy_mode = match b.policy_mode.as_deref() {
        None => None,
        Some(p) => Some(PolicyMode::parse(p).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_request",
                format!("`policyMode` must be off, read-only or restricted, got {p:?}"),
            )
        })?),
    };
    let (store, tenant) = (cmd.app.store.clone(), cmd.principal.tenant.clone());
    let template_version = match b.template_version.clone().filter(|s| !s.is_empty()) {
        Some(v) => v,
        None => {
            let (store, tenant, tid) = (store.clone(), tenant.clone(), template_id.clone());
            smol::unblock(move || store.latest_template(&tenant, &tid))
                .await?
                .map(|t| t.version)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_request",
                        format!(
                            "`templateVersion` is required (template {template_id:?} has no \
                             published version to default to)"
                        ),
                    )
                })?
        }
    };
    let compiled = compile_for_push(
        store.as_ref(),
        &tenant,
        &template_id,
        &template_version,
        b.config.as_ref(),
        policy_mode,
    )?;
    let apply_path = b
        .apply_path
        .clone()
        .unwrap_or_else(|| DEFAULT_APPLY_PATH.to_owned());
    let ts = crate::time::now_ms();
    let build = |id| {
        Message::ConfigPush(ConfigPush {
            idempotency_key: None,
            request_id: id,
            phase: Some(ConfigPhase::Runtime),
            scope: Some(ConfigScope::Full),
            template_id: compiled.template_id.clone(),
            template_version: compiled.template_version.clone(),
            timestamp_ms: ts,
            apply_path: apply_path.clone(),
            digest: compiled.digest.clone(),
            signature_alg: b.signature_algorithm.clone().filter(|s| !s.is_empty()),
            signature: b.signature.clone().filter(|s| !s.is_empty()),
            policy_mode: compiled.policy_mode,
            config: compiled.config.clone(),
        })
    };
    validate(build)?;
    let base = ConfigPushRecord {
        tenant: tenant.clone(),
        device_id: cmd.device.id().to_owned(),
        request_id: 0,
        template_id: compiled.template_id.clone(),
        template_version: compiled.template_version.clone(),
        status: ConfigPushRecord::PENDING.to_owned(),
        digest: compiled.digest.clone(),
        phase: Some(ConfigPhase::Runtime.as_str().to_owned()),
        scope: Some(ConfigScope::Full.as_str().to_owned()),
        policy_mode: compiled.policy_mode.map(|p| p.as_str().to_owned()),
        applied_path: Some(apply_path.clone()),
        violations: Vec::new(),
        message: None,
        responded_ms: ts,
    };
    let actor = cmd.principal.actor_id.clone();
    cmd.run(true, |key| async move {
        let queued: Mutex<Option<(u32, smol::Task<()>)>> = Mutex::new(None);
        let outcome = cmd
            .app
            .hub
            .request_with(&cmd.caller(key.as_ref()), &cmd.device, build, |id| {
                let record = ConfigPushRecord {
                    request_id: id,
                    ..base.clone()
                };
                let task = spawn_record(store.clone(), record, actor.clone());
                *queued.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, task));
            })
            .await;
        let queued = queued.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some((request_id, pending_written)) = queued else {
            // Never sent (offline, busy): nothing to record.
            return Err(super::commands::dispatch_error(
                outcome
                    .err()
                    .unwrap_or(crate::tunnel::DispatchError::Disconnected),
                &cmd.record,
            ));
        };
        // The pending record goes first, so the log reads pending → outcome.
        pending_written.await;
        let mut record = ConfigPushRecord {
            request_id,
            responded_ms: crate::time::now_ms(),
            ..base.clone()
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
        spawn_record(store.clone(), record, actor.clone()).await;
        let reply = outcome.map_err(|e| super::commands::dispatch_error(e, &cmd.record))?;
        let mut reply = json_reply(&reply, true);
        if let Value::Object(o) = &mut reply.body {
            // The handle for GET /devices/:id/config/status/:requestId is the reply's `i`.
            o.entry("i").or_insert(json!(request_id));
        }
        Ok(reply)
    })
    .await
}

fn spawn_record(store: Arc<dyn Store>, record: ConfigPushRecord, actor: String) -> smol::Task<()> {
    smol::spawn(async move {
        let id = record.request_id;
        if let Err(e) = smol::unblock(move || store.put_config_push(&record, &actor)).await {
            tracing::warn!(error = %e, request_id = id, "could not record a config push status");
        }
    })
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
                    "no config push {rid} to device {device_id}; use the `i` of the push reply"
                ),
            )
        })?;
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
    ];
    for (k, v) in optional {
        if let Some(v) = v {
            body[k] = v;
        }
    }
    Ok(json_response(StatusCode::OK, &body))
}
