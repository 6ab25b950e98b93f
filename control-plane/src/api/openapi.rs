//! The OpenAPI 3.0 description of every route that exists, built in code so it ships inside
//! the binary and cannot drift from a separate file. Keep it in step with [`super::routes`]
//! (a test checks that every route path appears here).

use serde_json::{Value, json};

use super::routes::{DeviceOp, GitOp};

/// The document served at `GET /openapi.json`.
pub fn document() -> Value {
    let err = |desc: &str| {
        json!({ "description": desc, "content": { "application/json": {
            "schema": { "$ref": "#/components/schemas/Error" } } } })
    };
    let ok = |desc: &str, schema: Value| json!({ "description": desc, "content": { "application/json": { "schema": schema } } });
    let r = |name: &str| json!({ "$ref": format!("#/components/schemas/{name}") });
    let id_param = |name: &str, desc: &str| {
        json!({ "name": name, "in": "path", "required": true, "description": desc,
                "schema": { "type": "string" } })
    };
    let idem = json!({ "$ref": "#/components/parameters/IdempotencyKey" });
    let auth_errors = |mut responses: Value| {
        responses["401"] = err(
            "No, malformed, unknown or revoked token (`auth_required`, `invalid_token`, `token_revoked`)",
        );
        responses["403"] = err("Role too low (`forbidden`)");
        responses
    };
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "CodeMantle control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Drive OpenCode sessions on a fleet of hosts. Every error is \
                `{\"error\": CODE, \"message\": TEXT}`. Authenticate with \
                `Authorization: Bearer cmt_<id>_<secret>`. Resources of another tenant answer \
                404 like missing ones. Any request that writes may answer 503 \
                `store_unavailable` (retry shortly) or 507 `storage_full` (the server's disk is \
                full: nothing was changed; free space, then retry). Daemons connect with a \
                WebSocket at `/ws` on the same listener (not described here)."
        },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "parameters": {
                "IdempotencyKey": {
                    "name": "Idempotency-Key", "in": "header", "required": false,
                    "description": "Retrying with the same key returns the first response and \
                        changes nothing (kept 24 h). Same key, different request → 422 \
                        `idempotency_key_reused`.",
                    "schema": { "type": "string", "minLength": 1, "maxLength": 255 }
                }
            },
            "schemas": {
                "Error": { "type": "object", "required": ["error", "message"], "properties": {
                    "error": { "type": "string", "description": "stable code" },
                    "message": { "type": "string", "description": "what happened and what to do" },
                    "errors": { "type": "array", "description": "validation routes: every problem",
                        "items": { "type": "object", "properties": { "path": { "type": "string" },
                            "code": { "type": "string" }, "message": { "type": "string" } } } } } },
                "HostFacts": { "type": "object", "properties": {
                    "hostname": { "type": "string" }, "os": { "type": "string" }, "arch": { "type": "string" } } },
                "Device": { "type": "object", "properties": {
                    "id": { "type": "string", "pattern": "^[A-Za-z0-9_-]{12,32}$" },
                    "name": { "type": "string" },
                    "labels": { "type": "object", "additionalProperties": { "type": "string" } },
                    "status": { "type": "string", "enum": ["online", "offline", "never-seen"] },
                    "online_since_ms": { "type": "integer", "nullable": true },
                    "last_seen_ms": { "type": "integer", "nullable": true },
                    "first_seen_ms": { "type": "integer", "nullable": true },
                    "agent_version": { "type": "string", "nullable": true },
                    "host": r("HostFacts"),
                    "key_id": { "type": "string", "description": "handshake key id (`ak`)" },
                    "telemetry": { "type": "object", "nullable": true,
                        "description": "last report over the open tunnel; null when not connected",
                        "properties": { "uptime_secs": { "type": "integer" }, "rss_bytes": { "type": "integer" },
                            "ports": { "type": "array", "items": { "type": "integer" } },
                            "protocol": { "type": "string", "enum": ["native", "json-0.1"] } } },
                    "created_ms": { "type": "integer" } } },
                "NewDevice": { "type": "object", "required": ["name"], "additionalProperties": false, "properties": {
                    "name": { "type": "string", "minLength": 1, "maxLength": 120 },
                    "labels": { "type": "object", "additionalProperties": { "type": "string", "maxLength": 256 } },
                    "id": { "type": "string", "pattern": "^[A-Za-z0-9_-]{12,32}$",
                            "description": "optional chosen id (e.g. an existing 0.1.x device id)" } } },
                "CreatedDevice": { "type": "object", "properties": {
                    "device": r("Device"),
                    "secret": { "type": "string", "description": "device key; shown only once" },
                    "key_id": { "type": "string" }, "note": { "type": "string" } } },
                "Token": { "type": "object", "properties": {
                    "id": { "type": "string" }, "name": { "type": "string" },
                    "role": { "type": "string", "enum": ["viewer", "operator", "admin", "owner"] },
                    "tenant": { "type": "string" }, "created_ms": { "type": "integer" },
                    "created_by": { "type": "string" }, "revoked": { "type": "boolean" },
                    "revoked_ms": { "type": "integer", "nullable": true } } },
                "NewToken": { "type": "object", "required": ["name", "role"], "additionalProperties": false, "properties": {
                    "name": { "type": "string" },
                    "role": { "type": "string", "enum": ["viewer", "operator", "admin", "owner"],
                              "description": "at most the caller's own role" },
                    "tenant": { "type": "string", "description": "another tenant: installation owners only" } } },
                "CreatedToken": { "type": "object", "properties": {
                    "token": r("Token"),
                    "secret": { "type": "string", "description": "`cmt_<id>_<secret>`; shown only once" },
                    "note": { "type": "string" } } },
                "Event": { "type": "object", "properties": {
                    "seq": { "type": "integer", "description": "global, monotonic" },
                    "tenant": { "type": "string" }, "ts_ms": { "type": "integer" },
                    "actor": { "type": "string" },
                    "kind": { "type": "string", "example": "device.added" },
                    "detail": { "type": "object" } } }
            }
        },
        "security": [ { "bearer": [] } ],
        "paths": {
            "/health": { "get": {
                "summary": "Liveness and store probe", "security": [],
                "responses": {
                    "200": ok("Healthy", json!({ "type": "object", "properties": {
                        "ok": { "type": "boolean" }, "store": { "type": "string" } } })),
                    "503": ok("The store failed its probe (`store_unavailable`), or the disk is full (`storage_full`, `\"store\":\"full\"`: reads work, writes do not)", json!({ "type": "object" })) } } },
            "/openapi.json": { "get": {
                "summary": "This document", "security": [],
                "responses": { "200": ok("OpenAPI 3.0 document", json!({ "type": "object" })) } } },
            "/metrics": { "get": {
                "summary": "Prometheus metrics (installation-wide: default-tenant tokens only)",
                "responses": auth_errors(json!({ "200": { "description": "Prometheus text format",
                    "content": { "text/plain": { "schema": { "type": "string" } } } } })) } },
            "/devices": {
                "get": { "summary": "List devices (viewer)", "responses": auth_errors(json!({
                    "200": ok("Devices", json!({ "type": "object", "properties": {
                        "devices": { "type": "array", "items": r("Device") } } })) })) },
                "post": { "summary": "Register a device (admin); returns its secret once",
                    "parameters": [idem],
                    "requestBody": { "required": true, "content": { "application/json": { "schema": r("NewDevice") } } },
                    "responses": auth_errors(json!({
                        "201": ok("Registered", r("CreatedDevice")),
                        "400": err("`invalid_json_body`, `invalid_request`, `invalid_name`, `invalid_labels`, `invalid_device_id`"),
                        "409": err("`device_exists`, `idempotency_key_in_progress`"),
                        "413": err("`payload_too_large`"),
                        "422": err("`idempotency_key_reused`") })) } },
            "/devices/{id}": {
                "parameters": [ id_param("id", "device id") ],
                "get": { "summary": "Show a device (viewer)", "responses": auth_errors(json!({
                    "200": ok("Device", json!({ "type": "object", "properties": { "device": r("Device") } })),
                    "404": err("`device_not_found` (also for another tenant's device)") })) },
                "delete": { "summary": "Remove a device (admin); its key stops working", "parameters": [idem],
                    "responses": auth_errors(json!({
                        "200": ok("Removed", json!({ "type": "object", "properties": { "removed": { "type": "string" } } })),
                        "404": err("`device_not_found`") })) } },
            "/tokens": {
                "get": { "summary": "List API tokens of your tenant (admin)", "responses": auth_errors(json!({
                    "200": ok("Tokens", json!({ "type": "object", "properties": {
                        "tokens": { "type": "array", "items": r("Token") } } })) })) },
                "post": { "summary": "Mint an API token (admin); returns the secret once",
                    "requestBody": { "required": true, "content": { "application/json": { "schema": r("NewToken") } } },
                    "responses": auth_errors(json!({
                        "201": ok("Minted", r("CreatedToken")),
                        "400": err("`invalid_role`, `invalid_name`, `invalid_tenant`, `idempotency_not_supported`"),
                        "404": err("`tenant_not_found`") })) } },
            "/tokens/{id}/revoke": {
                "parameters": [ id_param("id", "token id") ],
                "post": { "summary": "Revoke a token (admin)", "parameters": [idem],
                    "responses": auth_errors(json!({
                        "200": ok("Revoked", json!({ "type": "object", "properties": {
                            "token": r("Token"), "already_revoked": { "type": "boolean" } } })),
                        "404": err("`token_not_found`") })) } },
            "/events": { "get": {
                "summary": "Page through your tenant's event log (viewer)",
                "parameters": [
                    { "name": "after", "in": "query", "schema": { "type": "integer", "minimum": 0 },
                      "description": "events with a higher seq; omitted: the most recent ones" },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } } ],
                "responses": auth_errors(json!({
                    "200": ok("Events, ascending", json!({ "type": "object", "properties": {
                        "events": { "type": "array", "items": r("Event") },
                        "last_seq": { "type": "integer", "description": "pass as `after` for the next page" } } })),
                    "400": err("`invalid_query`") })) } },
            "/events/stream": { "get": {
                "summary": "Live event stream (SSE, viewer): replays after the position, then live, without gaps or duplicates",
                "parameters": [
                    { "name": "after", "in": "query", "schema": { "type": "integer", "minimum": 0 },
                      "description": "start after this seq; omitted: from now" },
                    { "name": "Last-Event-ID", "in": "header", "schema": { "type": "integer" },
                      "description": "set by EventSource on reconnect; wins over `after`" } ],
                "responses": auth_errors(json!({ "200": { "description":
                    "`text/event-stream`: `id: <seq>`, `event: <kind>`, `data: <Event JSON>`",
                    "content": { "text/event-stream": { "schema": { "type": "string" } } } } })) } }
        }
    });
    device_routes(&mut doc);
    doc
}

/// Request body fields of each device command (0.1.x panel names).
fn device_op_body(op: DeviceOp) -> Value {
    let s = |desc: &str| json!({ "type": "string", "description": desc });
    let b = |desc: &str| json!({ "type": "boolean", "description": desc });
    let i = |desc: &str, min: u64, max: u64| json!({ "type": "integer", "minimum": min, "maximum": max, "description": desc });
    let root = s("root alias (default `cwd`, the only one 0.1.x daemons know)");
    let path = s("path relative to the root, ≤ 512 characters (default `.`)");
    let props = match op {
        DeviceOp::Dir => json!({ "root": root, "path": path,
            "cursor": s("paging cursor from a previous listing (≤ 128)"),
            "limit": i("most entries (default 128)", 1, 256) }),
        DeviceOp::Mkdir => json!({ "root": root, "path": path }),
        DeviceOp::Rmdir => json!({ "root": root, "path": path,
            "recursive": b("remove contents too (native daemons only)") }),
        DeviceOp::Rename => {
            json!({ "root": root, "source": s("source path"), "dest": s("destination path"),
            "overwrite": b("replace an existing destination (default false: a rename replaces nothing unless asked; a 0.1.x daemon always replaces, so on one it needs true)") })
        }
        DeviceOp::SessionStart => json!({
            "sessionId": s("^[A-Za-z0-9_-]{1,64}$; default ses_<random>"),
            "path": s("folder (default `.`)"),
            "jit": { "type": "object", "description": "optional JIT credential for the OpenCode process; the daemon ends the session when it expires",
                "properties": { "ttlSec": i("lifetime (default 900)", 16, 3600), "scope": s("scope"),
                    "env": s("env var receiving the token"), "ref": s("credential ref for the kill switch"),
                    "token": s("use this token instead of minting one (16..2048)") } } }),
        DeviceOp::SessionStatus => json!({ "path": s("folder (default `.`)") }),
        DeviceOp::SessionTerminate => {
            json!({ "sessionId": s("default: the device's latest running session") })
        }
        DeviceOp::Prompt => {
            json!({ "sessionId": s("session id"), "prompt": s("1..8000 characters"),
            "streamId": s("8..24 characters; default random") })
        }
        DeviceOp::JitKill => {
            json!({ "sessionId": s("only this session"), "credentialRef": s("only this credential"),
            "reason": s("≤ 128 (default abnormal_behavior)"), "closeTunnel": b("the daemon reconnects afterwards") })
        }
        DeviceOp::SetupStatus => json!({}),
        DeviceOp::SetupSave => json!({
            "controlPlaneUrl": s("ws:// or wss://; default: keep the daemon's current one"),
            "opencodeCommand": s("≤ 256"), "opencodeHost": s("≤ 128"),
            "opencodeStartPort": i("first OpenCode port", 1, 65535),
            "opencodeProviderId": s("≤ 128"), "opencodeModelId": s("≤ 128"),
            "requestTimeoutMs": i("daemon request timeout", 1000, 120000),
            "agentAuthToken": s("must be absent or empty: keys are installed on the host") }),
        DeviceOp::ConfigPush => config_push_body(),
        DeviceOp::Git(g) => {
            let mut p = json!({ "root": root, "path": path });
            let extra = match g {
                GitOp::Clone => {
                    json!({ "url": s("repository URL, ≤ 2048 (required)"), "branch": s("≤ 256") })
                }
                GitOp::Add => json!({ "files": s("pathspec, ≤ 512"), "all": b("add -A") }),
                GitOp::Commit => json!({ "message": s("≤ 1024 (required)"), "amend": b("amend") }),
                GitOp::Push | GitOp::Pull => {
                    json!({ "remote": s("default origin, ≤ 64"), "branch": s("≤ 256") })
                }
                GitOp::Branch => {
                    json!({ "action": { "type": "string", "enum": ["list", "create", "delete"] },
                    "branch": s("≤ 256; required for create/delete") })
                }
                GitOp::Checkout => {
                    json!({ "branch": s("≤ 256 (required)"), "create": b("checkout -b") })
                }
                GitOp::Config => json!({ "action": { "type": "string", "enum": ["get", "set"] },
                    "name": s("user.name"), "email": s("user.email"), "global": b("global scope"),
                    "credentialManager": b("enable the credential manager") }),
                GitOp::Status | GitOp::Init => json!({}),
            };
            if let (Value::Object(p), Value::Object(e)) = (&mut p, extra) {
                p.extend(e);
            }
            p
        }
    };
    json!({ "type": "object", "properties": props })
}

/// The body of a config push (one device or the fleet): which published template to send.
fn config_push_body() -> Value {
    json!({
        "templateId": { "type": "string", "description": "^[a-z0-9][a-z0-9_-]{2,63}$ (required): a published template" },
        "templateVersion": { "type": "string", "description": "default: the latest published version by semver" },
        "applyPath": { "type": "string", "description": "default .opencode/opencode.json; the daemon's [config_push] allowed_apply_paths decides" },
        "policyMode": { "type": "string", "enum": ["off", "read-only", "restricted"],
            "description": "optional check: must equal the template's mode (the mode comes from the template)" },
        "signature": { "type": "string", "description": "not accepted: the control plane signs with the device's own key" },
        "signatureAlgorithm": { "type": "string", "description": "not accepted (see signature)" } })
}

/// Adds the device command routes and the config registry.
fn device_routes(doc: &mut Value) {
    let err = |desc: &str| {
        json!({ "description": desc, "content": { "application/json": {
            "schema": { "$ref": "#/components/schemas/Error" } } } })
    };
    let reply = |desc: &str| {
        json!({ "description": desc, "content": { "application/json": {
            "schema": { "type": "object", "description": "the daemon's reply as 0.1.x JSON: {v, t, i, ...}" } } } })
    };
    let id_param = json!({ "name": "id", "in": "path", "required": true,
        "description": "device id", "schema": { "type": "string" } });
    let idem = json!({ "$ref": "#/components/parameters/IdempotencyKey" });
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for op in DeviceOp::ALL {
        let always_200 = matches!(
            op,
            DeviceOp::Dir
                | DeviceOp::SessionStart
                | DeviceOp::SessionStatus
                | DeviceOp::SessionTerminate
                | DeviceOp::SetupStatus
                | DeviceOp::Git(GitOp::Status | GitOp::Branch)
        );
        let mut responses = json!({
            "200": reply(if always_200 { "The daemon's reply" } else { "The daemon's reply with o:1" }),
            "400": err(if always_200 {
                "A body field the daemon would refuse (`invalid_request`, naming the field), `path_invalid`, `root_unknown`, `limit_exceeded`, `unsupported_by_device`"
            } else {
                "The daemon's reply with o:0 (its JSON), or a refused body field (`invalid_request`, naming it), `path_invalid`, `root_unknown`, `limit_exceeded`, `unsupported_by_device`"
            }),
            "401": err("No or bad token"),
            "403": err(&format!("Role below {} (`forbidden`); the daemon refused (`device_refused`)", op.role())),
            "404": err("`device_not_found` (also for another tenant's device)"),
            "409": err("`device_not_connected` (retry when the device is online), `idempotency_key_in_progress`"),
            "429": err("`device_busy`"),
            "502": err("`device_disconnected`, `device_replaced`, `device_protocol_error`, `device_error`"),
            "504": err("`request_timeout`")
        });
        if op.is_mutating() {
            responses["507"] = err(
                "`storage_full`: the control plane cannot record the command (disk full); nothing was sent",
            );
        }
        if op == DeviceOp::Prompt {
            responses["202"] = json!({ "description": "Sent (fire-and-forget): {o:1, x: stream id, i: request id}",
                "content": { "application/json": { "schema": { "type": "object" } } } });
        }
        if op.is_mutating() {
            responses["422"] = err("`idempotency_key_reused`");
        }
        let mut parameters = vec![id_param.clone()];
        if op.is_mutating() {
            parameters.push(idem.clone());
        }
        paths.insert(
            format!("/devices/{{id}}/{}", op.path()),
            json!({ "post": {
                "summary": format!("{} (→ daemon; {}; role {})", op.path(), if op.is_mutating() { "idempotent" } else { "read-only" }, op.role()),
                "parameters": parameters,
                "requestBody": { "required": false, "content": { "application/json": { "schema": device_op_body(op) } } },
                "responses": responses } }),
        );
    }
    paths.insert(
        "/devices/{id}/config/status/{requestId}".into(),
        json!({ "get": {
            "summary": "Status of a config push (operator): pending, applied, rejected or failed",
            "parameters": [ id_param, { "name": "requestId", "in": "path", "required": true,
                "description": "the `i` of the push reply", "schema": { "type": "integer", "minimum": 1 } } ],
            "responses": {
                "200": { "description": "{deviceId, requestId, templateId, templateVersion, status, digest, phase?, scope?, policyMode?, appliedPath?, violations? (the daemon's reasons for `rejected`), message? (`device_offline`, `timeout`, … for `failed`), hint?, respondedAt}; works for single and fleet pushes",
                    "content": { "application/json": { "schema": { "type": "object" } } } },
                "400": err("`invalid_request_id`"),
                "404": err("`device_not_found`, `config_status_not_found`") } } }),
    );
    let proxy_op = |method: &str| {
        json!({
            "summary": format!("{method} through the port proxy to 127.0.0.1:{{port}} on the device (operator)"),
            "description": "Proxies to a port of one of the device's running sessions (its OpenCode \
        server; the daemon adds the session's password) or a port in the daemon's `exposed_ports`. `{path}` \
        stands for the rest of the path, any number of segments (default `/`); the query string is passed on. \
        Never forwarded: `Authorization` (the API token), `Cookie` (on this origin), `Host`, hop-by-hop headers, \
        `Accept-Encoding`. At most 64 headers of ≤4096 bytes (32 KiB in all) and a 1.5 MB body. The response is \
        the upstream's status, headers (hop-by-hop removed) and body; chunked, event-stream and large bodies are \
        streamed as they arrive. On this origin responses carry `Content-Security-Policy: sandbox …` and lose \
        `Set-Cookie`, `Strict-Transport-Security`, `Clear-Site-Data`, `Alt-Svc`. When the server has a \
        `preview_host`, this route answers 421 and the same request goes to \
        `<port>-<device id>.<preview_host>` with the upstream path as the whole path (cookies pass there; \
        nothing but proxied content is served on preview hosts).",
            "parameters": [
                { "name": "id", "in": "path", "required": true, "schema": { "type": "string" } },
                { "name": "port", "in": "path", "required": true, "schema": { "type": "integer", "minimum": 1, "maximum": 65535 } },
                { "name": "path", "in": "path", "required": true, "description": "the upstream path (may contain `/`)", "schema": { "type": "string" } } ],
            "responses": {
                "default": { "description": "the upstream's answer, as is" },
                "400": err("`invalid_port`, `invalid_header`, `proxy_refused` (the daemon refused the request: bad target or header)"),
                "403": err("`port_not_exposed` (neither a running session's port nor exposed by the daemon), `forbidden` (role)"),
                "404": err("`device_not_found` (also another tenant's device)"),
                "405": err("`method_not_allowed` (CONNECT, TRACE, …)"),
                "409": err("`device_not_connected`"),
                "413": err("`payload_too_large` (body over 1.5 MB)"),
                "414": err("`uri_too_long` (path + query over 2048 bytes)"),
                "421": err("`preview_origin_required`: use the preview host named in the message"),
                "429": err("`device_busy` (pending requests and open streams of the device at the cap)"),
                "431": err("`header_too_large`, `too_many_headers`"),
                "502": err("`upstream_unreachable`, `upstream_failed`, `upstream_malformed`, `device_disconnected`"),
                "504": err("`request_timeout` (no answer head from the device in time), `upstream_timeout`") }
        })
    };
    paths.insert(
        "/devices/{id}/port/{port}/{path}".into(),
        json!({
            "get": proxy_op("GET"), "head": proxy_op("HEAD"), "post": proxy_op("POST"),
            "put": proxy_op("PUT"), "patch": proxy_op("PATCH"), "delete": proxy_op("DELETE"),
            "options": proxy_op("OPTIONS") }),
    );
    paths.insert(
        "/session/{sessionId}/snapshot".into(),
        json!({ "get": {
            "summary": "The device's session log, last `tail` lines, normalised (operator)",
            "description": "With the device connected: its log (`sl`). While it is offline, or with `source=store`: \
the last `tail` lines of the session's latest output stream from the control plane's store (`source` in the \
reply says which).",
            "parameters": [
                { "name": "sessionId", "in": "path", "required": true, "schema": { "type": "string" } },
                { "name": "tail", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 200, "default": 100 } },
                { "name": "source", "in": "query", "description": "`device` or `store` (default: device when connected, else store)", "schema": { "type": "string", "enum": ["device", "store"] } } ],
            "responses": {
                "200": { "description": "{o:1, s, d, source, e:[{ts, k, src, m?, sid?, fp?, md?}]}",
                    "content": { "application/json": { "schema": { "type": "object" } } } },
                "400": err("`invalid_source`"),
                "404": err("`snapshot_not_found` (unknown session, or another tenant's, or nothing stored while offline)"),
                "409": err("`device_not_connected` (with `source=device`)"),
                "504": err("`snapshot_timeout`") } } }),
    );
    paths.insert(
        "/sessions/{sessionId}/jit/renew".into(),
        json!({ "post": {
            "summary": "Renew a session's JIT credential (operator)",
            "description": "Sends `jr` to the session's device: the daemon moves the session's credential expiry to \
`ttl_secs` from its now (the expiry timer only — the environment of the running OpenCode keeps the token and \
expiry it started with). Without renewal the session ends at its expiry. A revoked credential (kill switch), an \
ended or unknown session or one started without a credential cannot be renewed (`o:0` with `m`: \
`jit_revoked`, `session_ended`, `session_not_found`, `no_jit_credential`, `jit_expired`). Only native (CBOR) \
daemons can renew; 0.1.x daemons get nothing. Supports `Idempotency-Key`.",
            "parameters": [
                { "name": "sessionId", "in": "path", "required": true, "schema": { "type": "string" } } ],
            "requestBody": { "required": true, "content": { "application/json": { "schema": {
                "type": "object", "required": ["ttl_secs"],
                "properties": { "ttl_secs": { "type": "integer", "minimum": 15, "maximum": 3600 } } } } } },
            "responses": {
                "200": { "description": "{v, t:\"ju\", i, o:1, e: new expiry (ms since the epoch)}",
                    "content": { "application/json": { "schema": { "type": "object" } } } },
                "400": err("`invalid_jit_ttl`, `invalid_session_id`, or the daemon refused (`o:0`, reply as 200)"),
                "404": err("`session_not_found` (unknown session, or another tenant's)"),
                "409": err("`device_not_connected`, `jit_renew_unsupported` (the device runs a 0.1.x daemon)") } } }),
    );
    paths.insert(
        "/sessions/{sessionId}/stream".into(),
        json!({ "get": {
            "summary": "The output of one prompt, live and resumable (operator, SSE)",
            "description": "One stream per prompt: `POST /devices/{id}/prompt` returns its stream id `x`; \
follow it with `GET /sessions/{sessionId}/stream?x=<x>` (without `x`: the session's latest prompt sent through \
this control plane). Events: `chunk` (`id: <seq>`, data `{q, d}`: `d` is the chunk text as the daemon sent it, \
newline-delimited OpenCode events possibly split across chunks); `truncated` (`id: <to>`, data `{from, to}`: \
chunks no longer held — evicted from the bounded per-stream buffer, or acknowledged before a control-plane \
restart); `end` (data `{q}`: the last seq), after which the response ends. Resume with `Last-Event-ID` (or \
`after`): every chunk after that seq exactly once, in order.",
            "parameters": [
                { "name": "sessionId", "in": "path", "required": true, "schema": { "type": "string" } },
                { "name": "x", "in": "query", "description": "stream id returned by the prompt route", "schema": { "type": "string" } },
                { "name": "after", "in": "query", "description": "resume after this chunk seq (the `Last-Event-ID` header wins)", "schema": { "type": "integer", "minimum": 0 } },
                { "name": "follow", "in": "query", "description": "0/false: serve what is stored and end the response (no waiting; `end` only if the stream ended); works while the device is offline", "schema": { "type": "boolean", "default": true } } ],
            "responses": {
                "200": { "description": "`text/event-stream`", "content": { "text/event-stream": { "schema": { "type": "string" } } } },
                "400": err("`invalid_last_event_id`, `invalid_stream_id`, `invalid_session_id`, `invalid_follow`"),
                "404": err("`stream_not_found` (unknown session or stream, or another tenant's)") } } }),
    );
    paths.insert(
        "/config/templates".into(),
        json!({
            "get": { "summary": "Published templates (viewer): {templates:[template]}",
                "responses": { "200": { "description": "by id, then semver",
                    "content": { "application/json": { "schema": { "type": "object" } } } } } },
            "post": { "summary": "Publish a template version (admin); validated, stored normalised, versions immutable",
                "parameters": [idem],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["template"], "properties": { "template": {
                        "type": "object", "description": "an agent template (GET /config/template/schema)",
                        "required": ["schemaVersion", "templateId", "templateVersion", "routing", "tools", "mcpRefs"] } } } } } },
                "responses": {
                    "200": { "description": "{o:1, key, digest, unchanged?}",
                        "content": { "application/json": { "schema": { "type": "object" } } } },
                    "400": err("Every problem at once: `error` = the codes joined by commas (e.g. `invalid_intent_id,policy_tool_not_disabled`), `errors` = [{path, code, message}]; `invalid_template`, `invalid_template_version` (not semver)"),
                    "409": err("`template_version_exists` (same version, different content)") } } }),
    );
    paths.insert(
        "/config/template/schema".into(),
        json!({ "get": { "summary": "The JSON Schema of an agent template (viewer): {schema}",
            "responses": { "200": { "description": "{schema}",
                "content": { "application/json": { "schema": { "type": "object" } } } } } } }),
    );
    paths.insert(
        "/config/templates/{templateId}/compile".into(),
        json!({ "post": { "summary": "Compile a published template to the runtime OpenCode config a push would send (admin: MCP credentials are included)",
            "parameters": [ { "name": "templateId", "in": "path", "required": true, "schema": { "type": "string" } } ],
            "requestBody": { "required": false, "content": { "application/json": { "schema": {
                "type": "object", "properties": { "templateVersion": { "type": "string", "description": "default: latest by semver" } } } } } },
            "responses": {
                "200": { "description": "{o:1, templateId, templateVersion, digest, policyMode, config}",
                    "content": { "application/json": { "schema": { "type": "object" } } } },
                "400": err("`missing_mcp_refs:<serverId@version,…>`, `local_mcp_not_allowed:<aliases>`, `config_payload_too_large`"),
                "404": err("`template_not_found`"),
                "409": err("`invalid_stored_template`") } } }),
    );
    paths.insert(
        "/config/push".into(),
        json!({ "post": { "summary": "Push a published template to every device of the tenant whose labels match a selector (admin, idempotent)",
            "parameters": [idem],
            "requestBody": { "required": true, "content": { "application/json": { "schema": {
                "type": "object", "required": ["templateId", "selector"],
                "properties": {
                    "selector": { "type": "string", "description": "label selector: `k=v`, `k==v`, `k!=v`, `k` (exists), `!k`, comma-separated (all must hold), e.g. env=prod,role!=canary" },
                    "templateId": config_push_body()["templateId"].clone(),
                    "templateVersion": config_push_body()["templateVersion"].clone(),
                    "applyPath": config_push_body()["applyPath"].clone(),
                    "policyMode": config_push_body()["policyMode"].clone() } } } } },
            "responses": {
                "202": { "description": "{o:1, templateId, templateVersion, digest, selector, matched, devices:[{deviceId, requestId, status: pending|failed, message?}]}: online devices have their push queued (outcome in GET /devices/{id}/config/status/{requestId} and `config.push` events); offline ones are recorded `failed` with message `device_offline`",
                    "content": { "application/json": { "schema": { "type": "object" } } } },
                "400": err("`invalid_selector`, `invalid_template_id`, `invalid_apply_path`, `invalid_request`, `missing_mcp_refs:…`"),
                "401": err("No or bad token"),
                "403": err("Role below admin (`forbidden`)"),
                "404": err("`template_not_found`"),
                "422": err("`idempotency_key_reused`") } } }),
    );
    paths.insert(
        "/config/mcp".into(),
        json!({
            "get": { "summary": "MCP registry entries (viewer; header and environment values shown to admins only, `<redacted>` for others): {entries:[entry]}",
                "responses": { "200": { "description": "by serverId@version",
                    "content": { "application/json": { "schema": { "type": "object" } } } } } },
            "post": { "summary": "Register an MCP entry (admin); validated, immutable per serverId@version", "parameters": [idem],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["entry"], "properties": { "entry": {
                        "type": "object", "required": ["serverId", "version", "type"],
                        "description": "remote: {url | gatewayRef, headers?}; local: {command, environment?}" } } } } } },
                "responses": {
                    "200": { "description": "{o:1, key, unchanged?}",
                        "content": { "application/json": { "schema": { "type": "object" } } } },
                    "400": err("Every problem at once: `error` = the codes joined by commas (e.g. `invalid_server_id,invalid_mcp_url`), `errors` = [{path, code, message}]; `invalid_mcp_entry`"),
                    "409": err("`mcp_version_exists` (same serverId@version, different content)") } } }),
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn describes_every_route() {
        let doc = super::document();
        for path in [
            "/health",
            "/openapi.json",
            "/metrics",
            "/devices",
            "/devices/{id}",
            "/tokens",
            "/tokens/{id}/revoke",
            "/events",
            "/events/stream",
            "/devices/{id}/config/status/{requestId}",
            "/session/{sessionId}/snapshot",
            "/sessions/{sessionId}/stream",
            "/sessions/{sessionId}/jit/renew",
            "/devices/{id}/port/{port}/{path}",
            "/config/templates",
            "/config/template/schema",
            "/config/templates/{templateId}/compile",
            "/config/push",
            "/config/mcp",
        ] {
            assert!(
                doc["paths"][path].is_object(),
                "{path} missing from OpenAPI"
            );
        }
        for op in super::DeviceOp::ALL {
            let path = format!("/devices/{{id}}/{}", op.path());
            assert!(doc["paths"][&path]["post"].is_object(), "{path} missing");
        }
    }
}
