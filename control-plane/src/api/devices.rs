//! `/devices`: the tenant's device inventory, with live status from the presence registry.
//!
//! Every lookup goes through the store's tenant-scoped accessors, so another tenant's device
//! answers exactly like a missing one (404 `device_not_found`).

use std::collections::BTreeMap;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::http::{Body, JsonReply, json_response, parse_json, read_body};
use super::{App, idempotency};
use crate::auth::Principal;
use crate::presence::PresenceState;
use crate::registry::{self, NewDevice, RegistryError};
use crate::store::{Device, Role};

/// `online` / `offline` / `never-seen`.
pub fn status(device: &Device, presence: Option<PresenceState>) -> &'static str {
    match presence {
        Some(p) if p.is_online() => "online",
        Some(_) => "offline",
        None if device.last_seen_ms.is_some() => "offline",
        None => "never-seen",
    }
}

/// The public view of a device (never its secret).
pub fn view(device: &Device, presence: Option<PresenceState>) -> Value {
    let live_seen = presence.map(|p| p.last_seen_ms());
    let last_seen = match (live_seen, device.last_seen_ms) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let online_since = match presence {
        Some(PresenceState::Online { since_ms, .. }) => Some(since_ms),
        _ => None,
    };
    json!({
        "id": device.id,
        "name": device.name,
        "labels": device.labels,
        "status": status(device, presence),
        "online_since_ms": online_since,
        "last_seen_ms": last_seen,
        "first_seen_ms": device.first_seen_ms,
        "agent_version": device.agent_version,
        "host": device.host,
        "key_id": device.key_id,
        "created_ms": device.created_ms,
    })
}

/// Adds what the device's daemon last reported over its tunnel (`p`: uptime and RSS, `pl`:
/// ports it exposes for preview, the protocol it speaks), or `null` while it is not connected.
pub fn with_telemetry(mut view: Value, app: &App, device_id: &str) -> Value {
    let live = app.hub.get(device_id).map(|conn| {
        let t = conn.telemetry();
        json!({
            "uptime_secs": t.uptime_secs,
            "rss_bytes": t.rss_bytes,
            "ports": t.ports,
            "protocol": if conn.codec().is_native() { "native" } else { "json-0.1" },
        })
    });
    view["telemetry"] = live.unwrap_or(Value::Null);
    view
}

/// `GET /devices` (viewer).
pub async fn list(app: &Arc<App>, principal: &Principal) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Viewer)?;
    let (store, tenant) = (app.store.clone(), principal.tenant.clone());
    let devices = smol::unblock(move || store.devices(&tenant)).await?;
    let views: Vec<Value> = devices
        .iter()
        .map(|d| with_telemetry(view(d, app.presence.get(&d.id)), app, &d.id))
        .collect();
    Ok(json_response(StatusCode::OK, &json!({ "devices": views })))
}

/// `GET /devices/:id` (viewer).
pub async fn get(
    app: &Arc<App>,
    principal: &Principal,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Viewer)?;
    let device = app
        .store
        .device(&principal.tenant, id)?
        .ok_or_else(|| ApiError::not_found("device", id))?;
    let live = view(&device, app.presence.get(&device.id));
    let body = json!({ "device": with_telemetry(live, app, &device.id) });
    Ok(json_response(StatusCode::OK, &body))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    id: Option<String>,
}

/// `POST /devices` (admin, idempotent): registers a device and returns its secret once. With an
/// `Idempotency-Key`, the stored reply (secret included) is replayed to a retry for 24 h; it
/// sits in the same 0700 data dir as the device record, which holds the secret anyway.
pub async fn create(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let req: CreateBody = parse_json(&bytes)?;
    let path = parts.uri.path();
    idempotency::run(
        &app.store,
        principal,
        &parts.method,
        path,
        &parts.headers,
        &bytes,
        |_| async {
            let (store, tenant, actor) = (
                app.store.clone(),
                principal.tenant.clone(),
                principal.actor_id.clone(),
            );
            let new = NewDevice {
                name: req.name,
                labels: req.labels,
                id: req.id,
            };
            let (device, _event) = smol::unblock(move || {
                registry::create_device(store.as_ref(), &tenant, new, &actor)
            })
            .await?;
            Ok(JsonReply::created(json!({
                "device": view(&device, None),
                "secret": device.secret,
                "key_id": device.key_id,
                "note": "the secret is shown only now: install it on the host as the device key \
                         (e.g. /etc/codemantle/device.key, mode 0600)",
            })))
        },
    )
    .await
}

/// `DELETE /devices/:id` (admin, idempotent): the device's credential stops working and its
/// tunnel (if any) is closed.
pub async fn remove(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    id: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let path = parts.uri.path();
    idempotency::run(
        &app.store,
        principal,
        &parts.method,
        path,
        &parts.headers,
        &[],
        |_| async {
            let (store, tenant, actor, device_id) = (
                app.store.clone(),
                principal.tenant.clone(),
                principal.actor_id.clone(),
                id.to_owned(),
            );
            smol::unblock(move || store.remove_device(&tenant, &device_id, &actor))
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::NotFound { .. } => ApiError::not_found("device", id),
                    other => other.into(),
                })?;
            app.presence.forget(id);
            app.tunnel.device_removed(id);
            Ok(JsonReply::ok(json!({ "removed": id })))
        },
    )
    .await
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid { code, message } => ApiError::bad_request(code, message),
            RegistryError::Store(e) => e.into(),
        }
    }
}
