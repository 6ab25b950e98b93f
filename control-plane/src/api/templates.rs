//! The config registry: agent templates (`GET/POST /config/templates`) and MCP server entries
//! (`GET/POST /config/mcp`), with 0.1.x's body shapes (`{template}`, `{entry}`) and answers
//! (`{o:1, key}`).
//!
//! Differences from 0.1.50, on purpose:
//! - a published template version is **immutable**: publishing the same content again is a
//!   no-op (200), different content under an existing version is 409 `template_version_exists`
//!   (0.1.50 overwrote silently, so two hosts "on 1.2.0" could run different configs);
//! - template versions must be semver (and fit the wire's `tv`), so "latest" is well defined;
//! - MCP entry `headers` (typically API keys) are shown to admins only (0.1.50 showed them to
//!   viewers).
//!
//! Validation of a template's *contents* belongs to the template compiler (issue 6); here we
//! check identity, version and shape only.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::App;
use super::error::ApiError;
use super::http::{Body, JsonReply, json_response, parse_json, read_body};
use super::idempotency;
use crate::auth::Principal;
use crate::store::{McpEntry, Role, StoreError, TemplateVersion};

/// `^[a-z0-9][a-z0-9_-]{2,63}$` (the wire's `tid`).
fn valid_template_id(s: &str) -> bool {
    let b = s.as_bytes();
    (3..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Semver that fits the wire's `tv` (`^[A-Za-z0-9._-]{1,32}$`, so no build metadata).
fn valid_template_version(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
        && crate::semver::Version::parse(s).is_some()
}

/// `GET /config/templates` (viewer): `{templates: [template]}` by id, then semver.
pub async fn list(app: &Arc<App>, principal: &Principal) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Viewer)?;
    let (store, tenant) = (app.store.clone(), principal.tenant.clone());
    let all = smol::unblock(move || store.templates(&tenant)).await?;
    let templates: Vec<Value> = all.into_iter().map(|t| t.body).collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "templates": templates }),
    ))
}

#[derive(Deserialize)]
struct PublishBody {
    template: Option<Value>,
}

/// `POST /config/templates` (admin, idempotent): `{template}` → `{o:1, key}`.
pub async fn publish(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let b: PublishBody = parse_json(&bytes)?;
    let template = match b.template {
        Some(t @ Value::Object(_)) => t,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_template",
                "the body must be {\"template\": {...}} with a template object",
            ));
        }
    };
    let id = template["templateId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !valid_template_id(&id) {
        return Err(ApiError::bad_request(
            "invalid_template_id",
            "`template.templateId` must be 3..64 characters of a-z 0-9 _ -, starting with a \
             letter or digit",
        ));
    }
    let version = template["templateVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !valid_template_version(&version) {
        return Err(ApiError::bad_request(
            "invalid_template_version",
            "`template.templateVersion` must be a semantic version such as 1.2.0 (at most 32 \
             characters, no +build part)",
        ));
    }
    let digest = codemantle_protocol::canonical::digest(&template);
    idempotency::run(
        &app.store,
        principal,
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        &bytes,
        |_| async move {
            let key = format!("{id}@{version}");
            let record = TemplateVersion {
                tenant: principal.tenant.clone(),
                template_id: id.clone(),
                version: version.clone(),
                body: template,
                digest: Some(digest.clone()),
                published_ms: crate::time::now_ms(),
                published_by: principal.actor_id.clone(),
            };
            let store = app.store.clone();
            let actor = principal.actor_id.clone();
            let published = {
                let (store, record) = (store.clone(), record.clone());
                smol::unblock(move || store.publish_template(&record, &actor)).await
            };
            match published {
                Ok(_) => Ok(JsonReply::ok(
                    json!({ "o": 1, "key": key, "digest": digest }),
                )),
                Err(StoreError::AlreadyExists { .. }) => {
                    let tenant = principal.tenant.clone();
                    let existing =
                        smol::unblock(move || store.template_version(&tenant, &id, &version))
                            .await?;
                    if existing.is_some_and(|e| e.digest.as_deref() == Some(digest.as_str())) {
                        Ok(JsonReply::ok(
                            json!({ "o": 1, "key": key, "digest": digest, "unchanged": true }),
                        ))
                    } else {
                        Err(ApiError::new(
                            StatusCode::CONFLICT,
                            "template_version_exists",
                            format!(
                                "{key} is already published with different content; published \
                                 versions are immutable: publish it as a new version"
                            ),
                        ))
                    }
                }
                Err(e) => Err(e.into()),
            }
        },
    )
    .await
}

/// `GET /config/mcp` (viewer): `{entries: [entry]}` by `serverId@version`; `headers` only for
/// admins.
pub async fn mcp_list(app: &Arc<App>, principal: &Principal) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Viewer)?;
    let (store, tenant) = (app.store.clone(), principal.tenant.clone());
    let mut all = smol::unblock(move || store.mcp_entries(&tenant)).await?;
    all.sort_by(|a, b| (&a.server_id, &a.version).cmp(&(&b.server_id, &b.version)));
    let show_headers = principal.role >= Role::Admin;
    let entries: Vec<Value> = all
        .into_iter()
        .map(|e| {
            let mut body = e.body;
            if !show_headers {
                if let Value::Object(o) = &mut body {
                    o.remove("headers");
                }
            }
            body
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        &json!({ "entries": entries }),
    ))
}

#[derive(Deserialize)]
struct SaveBody {
    entry: Option<Value>,
}

/// `POST /config/mcp` (admin, idempotent): `{entry}` → `{o:1, key}` (creates or replaces).
pub async fn mcp_save(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let b: SaveBody = parse_json(&bytes)?;
    let entry = match b.entry {
        Some(e @ Value::Object(_)) => e,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_mcp_entry",
                "the body must be {\"entry\": {...}} with an MCP entry object",
            ));
        }
    };
    let server_id = entry["serverId"].as_str().unwrap_or_default().to_owned();
    if crate::store::validate_slug("server id", &server_id).is_err() {
        return Err(ApiError::bad_request(
            "invalid_mcp_server_id",
            "`entry.serverId` must be 2..64 characters of a-z 0-9 _ -, starting with a letter \
             or digit",
        ));
    }
    let version = entry["version"].as_str().unwrap_or_default().to_owned();
    if !(1..=32).contains(&version.len())
        || !version
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
    {
        return Err(ApiError::bad_request(
            "invalid_mcp_version",
            "`entry.version` must be 1..32 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    idempotency::run(
        &app.store,
        principal,
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        &bytes,
        |_| async move {
            let key = format!("{server_id}@{version}");
            let record = McpEntry {
                tenant: principal.tenant.clone(),
                server_id,
                version,
                body: entry,
                updated_ms: crate::time::now_ms(),
            };
            let (store, actor) = (app.store.clone(), principal.actor_id.clone());
            smol::unblock(move || store.put_mcp_entry(&record, &actor)).await?;
            Ok(JsonReply::ok(json!({ "o": 1, "key": key })))
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_identity_rules() {
        assert!(valid_template_id("build-box"));
        assert!(!valid_template_id("ab"));
        assert!(!valid_template_id("Build"));
        assert!(valid_template_version("1.0.0"));
        assert!(valid_template_version("1.0.0-rc.1"));
        assert!(!valid_template_version("1.0"));
        assert!(!valid_template_version("1.0.0+build"));
    }
}
