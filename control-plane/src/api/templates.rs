//! The config registry: agent templates (`GET/POST /config/templates`, `GET
//! /config/template/schema`, `POST /config/templates/:templateId/compile`) and MCP server
//! entries (`GET/POST /config/mcp`), with 0.1.x's body shapes (`{template}`, `{entry}`) and
//! answers (`{o:1, key}`).
//!
//! Every document is validated by the template compiler's own parser ([`Template::parse`],
//! [`McpServer::parse`]) before it is stored, so what is stored always compiles the same way;
//! a refusal lists **every** problem (`errors: [{path, code, message}]`, and the distinct codes
//! joined by commas as `error`, as 0.1.x did with its single code). The normalised form is
//! stored (rules and intents sorted, defaults filled in), so re-publishing the same template
//! written differently is recognised as unchanged.
//!
//! Differences from 0.1.50, on purpose:
//! - a published template version is **immutable**: publishing the same content again is a
//!   no-op (200, `unchanged`), different content under an existing version is 409
//!   `template_version_exists` (0.1.50 overwrote silently, so two hosts "on 1.2.0" could run
//!   different configs). MCP entries likewise (409 `mcp_version_exists`): a template pins
//!   `serverId@version`, and a template version must compile to the same config tomorrow;
//! - template versions must be semver (and fit the wire's `tv`), so "latest" is well defined;
//! - MCP credentials (`headers`, local `environment`) are shown to admins only; others see the
//!   names with `<redacted>` values (0.1.50 showed them to viewers);
//! - compiling (and so reading a template's compiled MCP headers) is for admins, as in 0.1.x.
//!
//! [`compile_stored`] is the one place that turns a stored template into a push payload (config
//! push, fleet push and the compile route all use it).

use std::sync::{Arc, Mutex};

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
use crate::store::{McpEntry, Role, StoreError, TemplateVersion, TenantId};
use crate::templates::{
    CompileOptions, Compiled, McpServer, Template, ValidationErrors, compile_runtime,
    parse_registry, template_json_schema,
};

/// Semver that fits the wire's `tv` (`^[A-Za-z0-9._-]{1,32}$`, so no build metadata).
fn valid_template_version(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-')
        && crate::semver::Version::parse(s).is_some()
}

/// 400 for a document that failed validation: `error` = the distinct codes joined by commas,
/// `message` = every problem, `errors` = `[{path, code, message}]`.
fn invalid(what: &str, e: &ValidationErrors) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        e.codes().join(","),
        format!("the {what} is invalid — {e}; fix these fields and post it again"),
    )
    .with_details(e.to_json())
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

/// `GET /config/template/schema` (viewer): `{schema}`, the JSON Schema of a template.
pub fn schema(principal: &Principal) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Viewer)?;
    Ok(json_response(
        StatusCode::OK,
        &json!({ "schema": template_json_schema() }),
    ))
}

#[derive(Deserialize)]
struct PublishBody {
    template: Option<Value>,
}

/// `POST /config/templates` (admin, idempotent): `{template}` → `{o:1, key, digest}`.
pub async fn publish(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let b: PublishBody = parse_json(&bytes)?;
    let doc = match b.template {
        Some(t @ Value::Object(_)) => t,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_template",
                "the body must be {\"template\": {...}} with a template object",
            ));
        }
    };
    let template = Template::parse(&doc).map_err(|e| invalid("template", &e))?;
    let (id, version) = (
        template.template_id.clone(),
        template.template_version.clone(),
    );
    if !valid_template_version(&version) {
        return Err(ApiError::bad_request(
            "invalid_template_version",
            "`template.templateVersion` must be a semantic version such as 1.2.0 (at most 32 \
             characters, no +build part), so that \"latest\" is well defined",
        ));
    }
    let normalised = template.to_value();
    let digest = codemantle_protocol::canonical::digest(&normalised);
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
                body: normalised,
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompileBody {
    template_version: Option<String>,
}

/// `POST /config/templates/:templateId/compile` (admin): `{templateVersion?}` → `{o:1,
/// templateId, templateVersion, digest, policyMode, config}` — exactly what a push would send.
pub async fn compile(
    app: &Arc<App>,
    principal: &Principal,
    body: Incoming,
    template_id: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let b: CompileBody = parse_json(&bytes)?;
    let compiled = compile_stored(
        app,
        &principal.tenant,
        template_id,
        b.template_version.as_deref(),
    )
    .await?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "o": 1,
            "templateId": compiled.template_id,
            "templateVersion": compiled.template_version,
            "digest": compiled.digest,
            "policyMode": compiled.policy_mode.as_str(),
            "config": compiled.config,
        }),
    ))
}

/// The runtime config of the stored template `template_id` at `version` (the latest by
/// semver when `None` or empty), with the tenant's MCP registry. Errors say what to publish or
/// fix: 404 `template_not_found`, 400 with the compiler's code (`missing_mcp_refs:…`,
/// `local_mcp_not_allowed:…`, `config_payload_too_large`), 409 `invalid_stored_template` for a
/// stored document that no longer validates.
pub async fn compile_stored(
    app: &Arc<App>,
    tenant: &TenantId,
    template_id: &str,
    version: Option<&str>,
) -> Result<Compiled, ApiError> {
    let version = version.filter(|v| !v.is_empty()).map(str::to_owned);
    let (store, t, id, v) = (
        app.store.clone(),
        tenant.clone(),
        template_id.to_owned(),
        version.clone(),
    );
    let (stored, mcp) = smol::unblock(move || {
        let stored = match &v {
            Some(v) => store.template_version(&t, &id, v)?,
            None => store.latest_template(&t, &id)?,
        };
        Ok::<_, StoreError>((stored, store.mcp_entries(&t)?))
    })
    .await?;
    let stored = stored.ok_or_else(|| {
        let which = match &version {
            Some(v) => format!("{template_id}@{v}"),
            None => format!("{template_id} (any version)"),
        };
        ApiError::new(
            StatusCode::NOT_FOUND,
            "template_not_found",
            format!(
                "no template {which} is published in your tenant; publish it with POST \
                 /config/templates, or check GET /config/templates"
            ),
        )
    })?;
    let template = Template::parse(&stored.body).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            "invalid_stored_template",
            format!(
                "the stored {}@{} does not validate any more ({e}); publish a corrected \
                 version",
                stored.template_id, stored.version
            ),
        )
        .with_details(e.to_json())
    })?;
    let bodies: Vec<Value> = mcp.into_iter().map(|e| e.body).collect();
    let registry = parse_registry(&bodies);
    for (i, errors) in &registry.invalid {
        tracing::warn!(entry = %bodies[*i]["serverId"], version = %bodies[*i]["version"], "stored MCP entry does not validate and is ignored: {errors}");
    }
    compile_runtime(&template, &registry.servers, &CompileOptions::default())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.api_code(), e.to_string()))
}

/// `GET /config/mcp` (viewer): `{entries: [entry]}` by `serverId@version`; credential values
/// only for admins ([`McpServer::redacted_for`]).
pub async fn mcp_list(app: &Arc<App>, principal: &Principal) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Viewer)?;
    let (store, tenant) = (app.store.clone(), principal.tenant.clone());
    let mut all = smol::unblock(move || store.mcp_entries(&tenant)).await?;
    all.sort_by(|a, b| (&a.server_id, &a.version).cmp(&(&b.server_id, &b.version)));
    let entries: Vec<Value> = all
        .into_iter()
        .map(|e| match McpServer::parse(&e.body) {
            Ok(server) => server.redacted_for(principal.role),
            // Stored before validation existed: never show its credentials to non-admins.
            Err(_) => {
                let mut body = e.body;
                if principal.role < Role::Admin {
                    if let Value::Object(o) = &mut body {
                        o.remove("headers");
                        o.remove("environment");
                    }
                }
                body
            }
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

/// Serialises MCP saves of this process, so "exists with other content?" and the write cannot
/// interleave (the store's put replaces).
static MCP_SAVE: Mutex<()> = Mutex::new(());

/// `POST /config/mcp` (admin, idempotent): `{entry}` → `{o:1, key}`; an existing
/// `serverId@version` with the same content is a no-op (`unchanged`), with other content 409.
pub async fn mcp_save(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Admin)?;
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let b: SaveBody = parse_json(&bytes)?;
    let doc = match b.entry {
        Some(e @ Value::Object(_)) => e,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_mcp_entry",
                "the body must be {\"entry\": {...}} with an MCP entry object",
            ));
        }
    };
    let server = McpServer::parse(&doc).map_err(|e| invalid("MCP entry", &e))?;
    idempotency::run(
        &app.store,
        principal,
        &parts.method,
        parts.uri.path(),
        &parts.headers,
        &bytes,
        |_| async move {
            let key = server.key();
            let record = McpEntry {
                tenant: principal.tenant.clone(),
                server_id: server.server_id.clone(),
                version: server.version.clone(),
                body: server.to_value(),
                updated_ms: crate::time::now_ms(),
            };
            let (store, actor) = (app.store.clone(), principal.actor_id.clone());
            let unchanged = smol::unblock(move || {
                let _serial = MCP_SAVE.lock().unwrap_or_else(|p| p.into_inner());
                let existing =
                    store.mcp_entry(&record.tenant, &record.server_id, &record.version)?;
                match existing {
                    Some(e) if e.body == record.body => Ok(true),
                    Some(_) => Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "mcp_version_exists",
                        format!(
                            "{}@{} is already registered with different content; entries are \
                             immutable because templates pin them: save it as a new version \
                             and reference that",
                            record.server_id, record.version
                        ),
                    )),
                    None => store
                        .put_mcp_entry(&record, &actor)
                        .map(|_| false)
                        .map_err(ApiError::from),
                }
            })
            .await?;
            let mut reply = json!({ "o": 1, "key": key });
            if unchanged {
                reply["unchanged"] = json!(true);
            }
            Ok(JsonReply::ok(reply))
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_versions_are_semver() {
        assert!(valid_template_version("1.0.0"));
        assert!(valid_template_version("1.0.0-rc.1"));
        assert!(!valid_template_version("1.0"));
        assert!(!valid_template_version("1.0.0+build"));
    }
}
