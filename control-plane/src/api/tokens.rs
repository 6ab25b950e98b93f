//! `/tokens`: API tokens of the caller's tenant.
//!
//! Rules: listing, minting and revoking need admin. Nobody mints a role above their own. Only
//! an installation owner (owner of the default tenant) mints for another tenant. Nobody
//! revokes a token whose role is above their own. The secret is returned once, at creation;
//! the store keeps only its hash.

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
use crate::registry;
use crate::store::{ApiToken, Role, StoreError, TenantId};

/// The public view of a token (never its hash).
pub fn view(t: &ApiToken) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "role": t.role,
        "tenant": t.tenant,
        "created_ms": t.created_ms,
        "created_by": t.created_by,
        "revoked": t.revoked,
        "revoked_ms": t.revoked_ms,
    })
}

/// `GET /tokens` (admin).
pub async fn list(app: &Arc<App>, principal: &Principal) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let (store, tenant) = (app.store.clone(), principal.tenant.clone());
    let tokens = smol::unblock(move || store.api_tokens(&tenant)).await?;
    let views: Vec<Value> = tokens.iter().map(view).collect();
    Ok(json_response(StatusCode::OK, &json!({ "tokens": views })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    role: String,
    #[serde(default)]
    tenant: Option<String>,
}

/// `POST /tokens` (admin): mints a token and returns its bearer string once. Not idempotent
/// on purpose: replaying would mean storing the secret.
pub async fn create(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    if parts.headers.contains_key(idempotency::HEADER) {
        return Err(ApiError::bad_request(
            "idempotency_not_supported",
            "POST /tokens does not take an Idempotency-Key (a replay would have to store the \
             secret); if unsure whether a token was minted, list tokens and revoke extras",
        ));
    }
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let req: CreateBody = parse_json(&bytes)?;
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_role",
            format!(
                "role {:?} is not one of viewer, operator, admin, owner",
                req.role
            ),
        )
    })?;
    if role > principal.role {
        return Err(ApiError::forbidden(format!(
            "you cannot mint a token with role {role}: it is above your own role {}",
            principal.role
        )));
    }
    let tenant = match req.tenant.as_deref() {
        None => principal.tenant.clone(),
        Some(t) => TenantId::parse(t)
            .map_err(|e| ApiError::bad_request("invalid_tenant", e.to_string()))?,
    };
    if tenant != principal.tenant && !principal.is_installation_owner() {
        return Err(ApiError::forbidden(
            "only an owner of the default tenant can mint tokens for another tenant",
        ));
    }
    let (store, actor) = (app.store.clone(), principal.actor_id.clone());
    let name = req.name;
    let created = smol::unblock(move || {
        registry::create_token(store.as_ref(), &tenant, &name, role, &actor)
    })
    .await
    .map_err(|e| match e {
        registry::RegistryError::Store(StoreError::NotFound { .. }) => ApiError::new(
            StatusCode::NOT_FOUND,
            "tenant_not_found",
            "that tenant does not exist; create it with `codemantle-control-plane tenant add`",
        ),
        other => other.into(),
    })?;
    Ok(JsonReply::created(json!({
        "token": view(&created.token),
        "secret": created.bearer,
        "note": "the secret is shown only now; store it in a secret manager",
    }))
    .into_response())
}

/// `POST /tokens/:id/revoke` (admin, idempotent).
pub async fn revoke(
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
            let target = app
                .store
                .api_token(id)?
                .filter(|t| t.tenant == principal.tenant)
                .ok_or_else(|| ApiError::not_found("token", id))?;
            if target.role > principal.role {
                return Err(ApiError::forbidden(format!(
                    "you cannot revoke a token with role {}: it is above your own role {}",
                    target.role, principal.role
                )));
            }
            let (store, tenant, actor, token_id) = (
                app.store.clone(),
                principal.tenant.clone(),
                principal.actor_id.clone(),
                id.to_owned(),
            );
            let now = crate::time::now_ms();
            let revoked =
                smol::unblock(move || store.revoke_api_token(&tenant, &token_id, &actor, now))
                    .await?;
            let (token, already) = match revoked {
                Some((token, _event)) => (token, false),
                None => (target, true),
            };
            Ok(JsonReply::ok(
                json!({ "token": view(&token), "already_revoked": already }),
            ))
        },
    )
    .await
}
