//! The OpenAPI 3.0 description of every route that exists, built in code so it ships inside
//! the binary and cannot drift from a separate file. Keep it in step with [`super::routes`]
//! (a test checks that every route path appears here).

use serde_json::{Value, json};

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
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "CodeMantle control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Drive OpenCode sessions on a fleet of hosts. Every error is \
                `{\"error\": CODE, \"message\": TEXT}`. Authenticate with \
                `Authorization: Bearer cmt_<id>_<secret>`. Resources of another tenant answer \
                404 like missing ones. Daemons connect with a WebSocket at `/ws` on the same \
                listener (not described here)."
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
                    "message": { "type": "string", "description": "what happened and what to do" } } },
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
                    "503": ok("The store failed its probe", json!({ "type": "object" })) } } },
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
    })
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
        ] {
            assert!(
                doc["paths"][path].is_object(),
                "{path} missing from OpenAPI"
            );
        }
    }
}
