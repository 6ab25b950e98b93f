//! Templates: validation (every problem, with paths), the compiler against the 0.1.50 vectors,
//! MCP entries and their redaction, signed pushes, "latest" by semver, label selectors.

use std::collections::BTreeMap;

use codemantle_control_plane::store::Role;
use codemantle_control_plane::templates::schema::REDACTED;
use codemantle_control_plane::templates::*;
use codemantle_protocol::canonical;
use codemantle_protocol::codec::{Codec, decode, encode};
use codemantle_protocol::config_signature::{ALG_HMAC_SHA256_DEVKEY_V1, verify_push};
use codemantle_protocol::handshake::Secret;
use codemantle_protocol::message::{ConfigPhase, ConfigScope, Message, PolicyMode};
use serde_json::{Value, json};

const VECTORS: &str = include_str!("../../protocol/tests/data/vectors.json");
const RUNTIME_DIGEST: &str = "ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA";
const SESSION_INIT_DIGEST: &str = "EVXZs_8_ELHbA1zpf9TNKUL6E8tyMZCOeSExeTkwems";

fn vectors() -> Value {
    serde_json::from_str(VECTORS).expect("vectors.json parses")
}

/// Appendix A's `build-box@1.0.0`, written the way an operator would (unsorted rules).
fn build_box() -> Value {
    json!({
        "schemaVersion": "1.0.0",
        "templateId": "build-box",
        "templateVersion": "1.0.0",
        "routing": {
            "defaultModel": "anthropic/claude-sonnet-4",
            "priorityChain": ["anthropic/claude-sonnet-4", "openai/gpt-5"],
            "intents": [
                { "id": "fix", "match": "fix bug", "priority": 5, "rules": ["b rule", "a rule"] }
            ]
        },
        "policy": { "mode": "off" },
        "tools": {
            "enabled": { "bash": true, "edit": false },
            "permissions": { "bash": "ask", "edit": "deny" }
        },
        "mcpRefs": [ { "serverId": "docs", "version": "1", "alias": "docs", "status": "allow" } ]
    })
}

fn docs_entry() -> Value {
    json!({ "serverId": "docs", "version": "1", "type": "remote", "url": "https://mcp.example.com/docs" })
}

fn registry(bodies: &[Value]) -> Vec<McpServer> {
    let r = parse_registry(bodies);
    assert!(r.invalid.is_empty(), "{:?}", r.invalid);
    r.servers
}

fn template(v: &Value) -> Template {
    Template::parse(v).unwrap_or_else(|e| panic!("template should be valid: {e}"))
}

fn codes(e: &ValidationErrors) -> Vec<(&str, &str)> {
    e.errors.iter().map(|f| (f.path.as_str(), f.code)).collect()
}

// ---- the vectors ---------------------------------------------------------------------------

#[test]
fn runtime_vector_is_bit_exact() {
    let v = vectors();
    let compiled = compile_runtime(
        &template(&build_box()),
        &registry(&[docs_entry()]),
        &CompileOptions::default(),
    )
    .expect("compiles");
    assert_eq!(compiled.canonical, v["canonical"]["runtime"]["json"]);
    assert_eq!(compiled.digest, v["canonical"]["runtime"]["digest"]);
    assert_eq!(compiled.digest, RUNTIME_DIGEST);
    assert_eq!(canonical::digest(&compiled.config), RUNTIME_DIGEST);
    assert_eq!(
        (compiled.phase, compiled.scope, compiled.policy_mode),
        (ConfigPhase::Runtime, ConfigScope::Full, PolicyMode::Off)
    );
}

#[test]
fn session_init_vector_is_bit_exact() {
    let v = vectors();
    let compiled = compile_session_init(
        &template(&build_box()),
        &registry(&[docs_entry()]),
        &CompileOptions::default(),
    )
    .expect("compiles");
    assert_eq!(compiled.canonical, v["canonical"]["session_init"]["json"]);
    assert_eq!(compiled.digest, SESSION_INIT_DIGEST);
    assert_eq!(
        (compiled.phase, compiled.scope),
        (ConfigPhase::SessionInit, ConfigScope::SessionInit)
    );
}

#[test]
fn session_init_for_a_0_1_json_daemon_uses_codenucleus() {
    let opts = CompileOptions {
        session_init_root: SessionInitRoot::for_peer(true),
        ..CompileOptions::default()
    };
    let compiled = compile_session_init(&template(&build_box()), &registry(&[docs_entry()]), &opts)
        .expect("compiles");
    let obj = compiled.config.as_object().expect("object");
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["codenucleus"]);
    let expected = vectors()["canonical"]["session_init"]["json"]
        .as_str()
        .expect("json")
        .replacen("{\"codemantle\":", "{\"codenucleus\":", 1);
    assert_eq!(compiled.canonical, expected);
    assert_eq!(compiled.digest, canonical::digest_text(&expected));
    assert_ne!(compiled.digest, SESSION_INIT_DIGEST);
    assert_eq!(
        SessionInitRoot::for_peer(false),
        SessionInitRoot::CodeMantle
    );
}

#[test]
fn same_template_with_fallback_order_and_stringly_numbers_compiles_the_same() {
    // fallbackOrder instead of priorityChain gives the same chain; 5.0 is the integer 5 in JS.
    let mut t = build_box();
    let routing = t["routing"].as_object_mut().expect("routing");
    routing.remove("priorityChain");
    routing.insert(
        "fallbackOrder".into(),
        json!(["openai/gpt-5", "anthropic/claude-sonnet-4", "openai/gpt-5"]),
    );
    t["routing"]["intents"][0]["priority"] = json!(5.0);
    let parsed = template(&t);
    assert_eq!(
        parsed.routing.chain,
        ["anthropic/claude-sonnet-4", "openai/gpt-5"]
    );
    let compiled = compile_runtime(
        &parsed,
        &registry(&[docs_entry()]),
        &CompileOptions::default(),
    )
    .expect("compiles");
    // Only the chain is in the runtime form, so the payload is the vector's.
    assert_eq!(compiled.digest, RUNTIME_DIGEST);
}

// ---- validation ----------------------------------------------------------------------------

#[test]
fn every_problem_is_reported_with_its_path() {
    let t = json!({
        "schemaVersion": "2.0.0",
        "templateId": "BB",
        "templateVersion": "1.0",
        "name": "",
        "extra": 1,
        "routing": {
            "defaultModel": "",
            "priorityChain": [],
            "intents": [
                { "id": "fix", "match": "x", "rules": ["ok", ""] },
                { "id": "fix", "match": "", "priority": 2000, "rules": [] },
                "not an object"
            ],
            "profiles": [ { "id": "p", "priorityChain": ["m"], "rules": ["r"] } ],
            "surprise": true
        },
        "policy": { "mode": "paranoid" },
        "tools": {
            "enabled": { "bash": "yes", "bad name": true },
            "permissions": { "edit": "maybe" }
        },
        "mcpRefs": [
            { "serverId": "docs", "version": "1", "alias": "d" },
            { "serverId": "docs", "version": "1", "alias": "dd", "status": "on" },
            { "serverId": "x", "version": "v 1", "alias": "dd" }
        ]
    });
    let err = Template::parse(&t).expect_err("invalid");
    let got = codes(&err);
    let expected = [
        ("extra", "template_has_unknown_keys"),
        ("schemaVersion", "unsupported_schema_version"),
        ("templateId", "invalid_template_id"),
        ("templateVersion", "invalid_template_version"),
        ("name", "invalid_template_name"),
        ("routing.surprise", "routing_has_unknown_keys"),
        ("routing.defaultModel", "invalid_default_model"),
        ("routing.priorityChain", "invalid_priority_chain"),
        ("routing.intents[0].rules[1]", "invalid_intent_rule"),
        ("routing.intents[1].id", "duplicate_intent_id"),
        ("routing.intents[1].match", "invalid_intent_match"),
        ("routing.intents[1].priority", "invalid_intent_priority"),
        ("routing.intents[1].rules", "invalid_intent_rules"),
        ("routing.intents[2]", "invalid_intent_entry"),
        ("routing.profiles[0].id", "invalid_routing_profile_id"),
        ("policy.mode", "invalid_policy_mode"),
        ("tools.enabled.bad name", "invalid_tool_enabled_entry"),
        ("tools.enabled.bash", "invalid_tool_enabled_entry"),
        ("tools.permissions.edit", "invalid_tool_permission_value"),
        ("mcpRefs[0].alias", "invalid_mcp_ref_alias"),
        ("mcpRefs[1].status", "invalid_mcp_status"),
        ("mcpRefs[2].serverId", "invalid_mcp_ref_server_id"),
        ("mcpRefs[2].version", "invalid_mcp_ref_version"),
        ("mcpRefs[2].alias", "duplicate_mcp_alias"),
    ];
    for e in &expected {
        assert!(got.contains(e), "missing {e:?} in {got:#?}");
    }
    assert_eq!(got.len(), expected.len(), "{got:#?}");
    // Messages say what is expected; Display lists them all.
    let text = err.to_string();
    assert!(text.starts_with("24 problems: "), "{text}");
    assert!(text.contains("templateId: 3..64 characters"), "{text}");
    assert_eq!(err.to_json().as_array().map(Vec::len), Some(24));
    assert!(err.codes().contains(&"invalid_intent_rule"));
}

#[test]
fn non_object_and_missing_required_fields() {
    let err = Template::parse(&json!([1])).expect_err("array");
    assert_eq!(codes(&err), [("", "template_must_be_object")]);
    let err = Template::parse(&json!({})).expect_err("empty");
    let got = codes(&err);
    for e in [
        ("schemaVersion", "unsupported_schema_version"),
        ("templateId", "invalid_template_id"),
        ("templateVersion", "invalid_template_version"),
        ("routing", "invalid_routing"),
        ("mcpRefs", "invalid_mcp_refs"),
    ] {
        assert!(got.contains(&e), "missing {e:?} in {got:?}");
    }
}

#[test]
fn normalisation_sorts_and_fills_defaults() {
    let t = json!({
        "schemaVersion": "1.0.0",
        "templateId": "sorter",
        "templateVersion": "2.1.0-rc.1",
        "routing": {
            "defaultModel": "a/m",
            "priorityChain": ["b/m", "a/m", "b/m"],
            "intents": [
                { "id": "zeta", "match": "z", "rules": ["r"] },
                { "id": "beta", "match": "b", "priority": -1, "rules": ["r"] },
                { "id": "alpha", "match": "a", "rules": ["r"] },
                { "id": "top", "match": "t", "priority": 9, "rules": ["Bash", "apply", "_x"] }
            ],
            "profiles": [
                { "id": "zz", "priorityChain": ["x/y"], "rules": ["r"] },
                { "id": "aa", "match": "m", "priorityChain": ["x/y"], "rules": ["r"] }
            ]
        },
        "mcpRefs": [
            { "serverId": "s1", "version": "1", "alias": "zed" },
            { "serverId": "s2", "version": "1", "alias": "abc", "status": "ask" }
        ]
    });
    let parsed = template(&t);
    assert_eq!(parsed.routing.chain, ["a/m", "b/m"]);
    let ids: Vec<&str> = parsed
        .routing
        .intents
        .iter()
        .map(|i| i.id.as_str())
        .collect();
    assert_eq!(ids, ["top", "alpha", "zeta", "beta"]);
    assert_eq!(parsed.routing.intents[0].rules, ["_x", "apply", "Bash"]);
    let profiles: Vec<&str> = parsed
        .routing
        .profiles
        .iter()
        .map(|p| p.id.as_str())
        .collect();
    assert_eq!(profiles, ["aa", "zz"]);
    let aliases: Vec<&str> = parsed.mcp_refs.iter().map(|r| r.alias.as_str()).collect();
    assert_eq!(aliases, ["abc", "zed"]);
    assert_eq!(parsed.policy.mode, PolicyMode::Off);

    let doc = parsed.to_value();
    assert_eq!(doc["policy"], json!({ "mode": "off" }));
    assert_eq!(doc["tools"], json!({ "enabled": {}, "permissions": {} }));
    assert_eq!(doc["mcpRefs"][1]["status"], "disabled");
    assert_eq!(doc["routing"]["priorityChain"], json!(["a/m", "b/m"]));
    // The normalised document is itself a valid template that normalises to itself.
    assert_eq!(template(&doc), parsed);
}

#[test]
fn restricted_policy_allowlists_must_fit_the_template() {
    let mut t = build_box();
    t["policy"] =
        json!({ "mode": "restricted", "allowedTools": ["read"], "allowedKeys": ["model"] });
    let err = Template::parse(&t).expect_err("bash is enabled but not allowlisted");
    let got = codes(&err);
    assert!(got.contains(&("tools.enabled.bash", "policy_tool_not_allowlisted")));
    assert!(got.contains(&("policy.allowedKeys", "policy_key_not_allowlisted")));

    t["policy"] = json!({
        "mode": "restricted",
        "allowedTools": ["bash", "read"],
        "allowedKeys": ["tools", "model", "permission", "mcp"]
    });
    let parsed = template(&t);
    let compiled = compile_runtime(
        &parsed,
        &registry(&[docs_entry()]),
        &CompileOptions::default(),
    )
    .expect("compiles");
    assert_eq!(
        compiled.config["codemantle"]["policy"],
        json!({
            "mode": "restricted",
            "allowedKeys": ["mcp", "model", "permission", "tools"],
            "allowedTools": ["bash", "read"]
        })
    );
    assert_eq!(compiled.policy_mode, PolicyMode::Restricted);

    t["policy"] = json!({ "mode": "off", "allowedTools": ["bash"] });
    let err = Template::parse(&t).expect_err("allowlists need restricted");
    assert_eq!(
        codes(&err),
        [("policy", "policy_allowlist_requires_restricted")]
    );
}

#[test]
fn read_only_templates_must_switch_write_tools_off() {
    let mut t = build_box();
    t["policy"] = json!({ "mode": "read-only" });
    let err = Template::parse(&t).expect_err("bash is on, permission ask");
    let got = codes(&err);
    assert!(
        got.contains(&("tools.enabled.bash", "policy_tool_not_disabled")),
        "{got:?}"
    );
    assert!(
        got.contains(&("tools.permissions.bash", "policy_permission_not_deny")),
        "{got:?}"
    );
    // edit/write/patch/multiedit are off through `edit: deny`.
    assert_eq!(got.len(), 2, "{got:?}");

    t["tools"] = json!({
        "enabled": { "bash": false, "read": true },
        "permissions": { "bash": "deny", "edit": "deny" }
    });
    let parsed = template(&t);
    assert!(parsed.tools.disables("write"));

    // A local MCP server cannot be part of a read-only config.
    t["mcpRefs"] =
        json!([{ "serverId": "fsx", "version": "1", "alias": "fsx", "status": "allow" }]);
    let reg = registry(&[
        json!({ "serverId": "fsx", "version": "1", "type": "local", "command": ["fsx"] }),
    ]);
    let err =
        compile_runtime(&template(&t), &reg, &CompileOptions::default()).expect_err("local server");
    assert_eq!(err.api_code(), "local_mcp_not_allowed:fsx");
    assert!(compile_session_init(&template(&t), &reg, &CompileOptions::default()).is_err());
}

// ---- MCP entries ---------------------------------------------------------------------------

#[test]
fn mcp_entries_validate_and_report_all() {
    let err = McpServer::parse(&json!({
        "serverId": "X",
        "version": "",
        "type": "remote",
        "url": "ftp://nope",
        "headers": { "Bad Header": "v", "X-Key": "" },
        "command": ["x"]
    }))
    .expect_err("invalid");
    let got = codes(&err);
    for e in [
        ("serverId", "invalid_server_id"),
        ("version", "invalid_server_version"),
        ("command", "mcp_field_not_for_type"),
        ("url", "invalid_mcp_url"),
        ("headers.Bad Header", "invalid_mcp_header_name"),
        ("headers.X-Key", "invalid_mcp_header_value"),
    ] {
        assert!(got.contains(&e), "missing {e:?} in {got:?}");
    }

    let err = McpServer::parse(&json!({ "serverId": "ab", "version": "1", "type": "remote" }))
        .expect_err("no endpoint");
    assert_eq!(codes(&err), [("", "mcp_endpoint_missing")]);

    let err = McpServer::parse(&json!({ "serverId": "ab", "version": "1", "type": "ws" }))
        .expect_err("type");
    assert_eq!(codes(&err), [("type", "unsupported_mcp_type")]);

    let err = McpServer::parse(&json!({
        "serverId": "ab", "version": "1", "type": "local", "command": [], "url": "https://x.y"
    }))
    .expect_err("local");
    let got = codes(&err);
    assert!(got.contains(&("url", "mcp_field_not_for_type")));
    assert!(got.contains(&("command", "invalid_mcp_command")));
}

#[test]
fn mcp_credentials_are_redacted_for_non_admins() {
    let remote = McpServer::parse(&json!({
        "serverId": "search", "version": "2", "type": "remote",
        "url": "https://mcp.example.com/search",
        "headers": { "Authorization": "Bearer s3cr3t" }
    }))
    .expect("valid");
    let local = McpServer::parse(&json!({
        "serverId": "fsx", "version": "1", "type": "local",
        "command": ["/usr/bin/fsx", "--stdio"],
        "environment": { "FSX_TOKEN": "t0k3n" }
    }))
    .expect("valid");

    for role in [Role::Viewer, Role::Operator] {
        let r = remote.redacted_for(role);
        assert_eq!(r["headers"]["Authorization"], REDACTED, "{role}");
        assert_eq!(r["url"], "https://mcp.example.com/search");
        let l = local.redacted_for(role);
        assert_eq!(l["environment"]["FSX_TOKEN"], REDACTED);
        assert_eq!(l["command"], json!(["/usr/bin/fsx", "--stdio"]));
    }
    for role in [Role::Admin, Role::Owner] {
        assert_eq!(
            remote.redacted_for(role)["headers"]["Authorization"],
            "Bearer s3cr3t"
        );
        assert_eq!(
            local.redacted_for(role)["environment"]["FSX_TOKEN"],
            "t0k3n"
        );
    }
    let debug = format!("{remote:?} {local:?}");
    assert!(
        !debug.contains("s3cr3t") && !debug.contains("t0k3n"),
        "{debug}"
    );
    assert!(debug.contains("Authorization"), "{debug}");
}

#[test]
fn missing_refs_are_all_listed() {
    let mut t = build_box();
    t["mcpRefs"] = json!([
        { "serverId": "docs", "version": "1", "alias": "docs", "status": "allow" },
        { "serverId": "gone", "version": "3", "alias": "gone" },
        { "serverId": "via-gw", "version": "1", "alias": "gw" },
        { "serverId": "docs", "version": "9", "alias": "docs9" }
    ]);
    let reg = registry(&[
        docs_entry(),
        json!({ "serverId": "via-gw", "version": "1", "type": "remote",
                "gatewayRef": { "gatewayId": "unknown-gw", "serverPath": "/tools/x" } }),
    ]);
    let parsed = template(&t);
    let err = compile_runtime(&parsed, &reg, &CompileOptions::default()).expect_err("missing");
    assert_eq!(
        err,
        CompileError::MissingMcpRefs {
            refs: vec![
                "docs@9".into(),
                "gone@3".into(),
                "via-gw@1:gateway_resolution_failed".into(),
            ]
        }
    );
    assert_eq!(
        err.api_code(),
        "missing_mcp_refs:docs@9,gone@3,via-gw@1:gateway_resolution_failed"
    );
    assert!(err.to_string().contains("POST /config/mcp"));
    // Session-init does not resolve endpoints, but missing entries still fail.
    let err = compile_session_init(&parsed, &reg, &CompileOptions::default()).expect_err("missing");
    assert_eq!(err.api_code(), "missing_mcp_refs:docs@9,gone@3");
}

#[test]
fn gateways_and_local_servers_compile() {
    let mut t = build_box();
    t["mcpRefs"] = json!([
        { "serverId": "via-gw", "version": "1", "alias": "gw", "status": "ask" },
        { "serverId": "fsx", "version": "1", "alias": "fsx" }
    ]);
    let reg = registry(&[
        json!({ "serverId": "via-gw", "version": "1", "type": "remote",
                "url": "https://ignored.example.com",
                "gatewayRef": { "gatewayId": "main", "serverPath": "\\tools/x" },
                "headers": { "X-Key": "k" } }),
        json!({ "serverId": "fsx", "version": "1", "type": "local", "command": ["fsx"] }),
    ]);
    let (gateways, skipped) = parse_gateways("main=https://gw.example.com/");
    assert!(skipped.is_empty());
    let opts = CompileOptions {
        gateways,
        ..CompileOptions::default()
    };
    let compiled = compile_runtime(&template(&t), &reg, &opts).expect("compiles");
    assert_eq!(
        compiled.config["mcp"],
        json!({
            "gw": {
                "type": "remote", "url": "https://gw.example.com/tools/x", "enabled": true,
                "status": "ask", "headers": { "X-Key": "k" },
                "gatewayRef": { "gatewayId": "main", "serverPath": "tools/x" }
            },
            "fsx": { "type": "local", "command": ["fsx"], "enabled": false, "status": "disabled" }
        })
    );
    let si = compile_session_init(&template(&t), &reg, &opts).expect("compiles");
    assert_eq!(
        si.config["codemantle"]["sessionInit"]["mcp"]["tools"],
        json!([
            { "alias": "fsx", "serverId": "fsx", "version": "1", "type": "local", "status": "disabled" },
            { "alias": "gw", "serverId": "via-gw", "version": "1", "type": "remote", "status": "ask" }
        ])
    );
    assert!(
        !si.canonical.contains("https://"),
        "no URLs in session-init"
    );
    assert!(
        !si.canonical.contains("X-Key"),
        "no headers in session-init"
    );
}

#[test]
fn session_init_providers_come_from_every_model() {
    let t = json!({
        "schemaVersion": "1.0.0", "templateId": "multi", "templateVersion": "1.0.0",
        "routing": {
            "defaultModel": "openai/gpt-5",
            "intents": [ { "id": "ux", "match": "ui", "model": "google/gemini", "rules": ["r"] } ],
            "profiles": [ { "id": "cheap", "priorityChain": ["zai/glm", "no-provider"], "rules": ["r"] } ]
        },
        "mcpRefs": []
    });
    let si = compile_session_init(&template(&t), &[], &CompileOptions::default()).expect("ok");
    assert_eq!(
        si.config["codemantle"]["sessionInit"]["providers"],
        json!(["google", "openai", "zai"])
    );
    let rt = compile_runtime(&template(&t), &[], &CompileOptions::default()).expect("ok");
    assert!(rt.config.get("mcp").is_none(), "no mcp key without refs");
}

#[test]
fn oversized_payload_is_refused_at_compile_time() {
    let rules: Vec<String> = (0..32)
        .map(|i| format!("{i:03}{}", "r".repeat(397)))
        .collect();
    let intents: Vec<Value> = (0..64)
        .map(|i| json!({ "id": format!("i{i:02}"), "match": "m", "rules": rules }))
        .collect();
    let mut t = build_box();
    t["routing"]["intents"] = Value::Array(intents);
    let err = compile_runtime(
        &template(&t),
        &registry(&[docs_entry()]),
        &CompileOptions::default(),
    )
    .expect_err("too large");
    assert!(matches!(err, CompileError::TooLarge { bytes } if bytes > MAX_CONFIG_BYTES));
    assert_eq!(err.api_code(), "config_payload_too_large");
}

// ---- pushes --------------------------------------------------------------------------------

#[test]
fn build_push_signs_with_the_device_key_and_encodes_for_both_codecs() {
    let secret = Secret::from("test-token-0123456789");
    let compiled = compile_runtime(
        &template(&build_box()),
        &registry(&[docs_entry()]),
        &CompileOptions::default(),
    )
    .expect("compiles");
    let push =
        build_push(&compiled, &secret, DEFAULT_APPLY_PATH, 7, 1_700_000_000_000).expect("builds");
    assert_eq!(push.phase, Some(ConfigPhase::Runtime));
    assert_eq!(push.scope, Some(ConfigScope::Full));
    assert_eq!(push.policy_mode, Some(PolicyMode::Off));
    assert_eq!(push.digest, RUNTIME_DIGEST);
    assert_eq!(
        push.signature_alg.as_deref(),
        Some(ALG_HMAC_SHA256_DEVKEY_V1)
    );
    // The frozen protocol vector for exactly these fields.
    assert_eq!(
        push.signature.as_deref(),
        Some("g9NLGkRoq0bv5zsESZGiBG1l5tOF4IF1_vbjJy9jWgo")
    );
    assert_eq!(verify_push(&push, &secret), Ok(()));
    assert!(verify_push(&push, &Secret::from("other-device")).is_err());

    let msg = Message::ConfigPush(push);
    for codec in [Codec::Json, Codec::Cbor] {
        let frame = encode(&msg, codec).expect("encodes");
        let back = decode(&frame, codec).expect("decodes");
        let Message::ConfigPush(p) = &back else {
            panic!("not a push: {back:?}")
        };
        assert_eq!(canonical::digest(&p.config), RUNTIME_DIGEST, "{codec:?}");
        assert_eq!(verify_push(p, &secret), Ok(()), "{codec:?}");
    }

    let si = compile_session_init(
        &template(&build_box()),
        &registry(&[docs_entry()]),
        &CompileOptions::default(),
    )
    .expect("compiles");
    let push = build_push(&si, &secret, DEFAULT_APPLY_PATH, 8, 0).expect("builds");
    assert_eq!(push.phase, Some(ConfigPhase::SessionInit));
    assert_eq!(push.scope, Some(ConfigScope::SessionInit));
    assert_eq!(
        push.signature.as_deref(),
        Some("WhtkPJ5g_qn8zuTrX-Che0gWRZMmlHkoE73iC-HWq4Q")
    );
}

#[test]
fn build_push_refuses_bad_apply_paths() {
    let secret = Secret::from("k");
    let compiled = compile_runtime(
        &template(&build_box()),
        &registry(&[docs_entry()]),
        &CompileOptions::default(),
    )
    .expect("compiles");
    for bad in [
        "",
        "/etc/opencode.json",
        "../opencode.json",
        "x/opencode.toml",
    ] {
        assert!(
            matches!(
                build_push(&compiled, &secret, bad, 1, 0),
                Err(PushError::InvalidApplyPath { .. })
            ),
            "{bad:?}"
        );
    }
}

// ---- latest, schema, selectors -------------------------------------------------------------

#[test]
fn latest_is_semver_not_string_order() {
    assert_eq!(latest_version(["1.9.0", "1.10.0", "1.2.0"]), Some("1.10.0"));
    assert_eq!(latest_version(["2.0.0-rc.1", "1.99.0"]), Some("2.0.0-rc.1"));
    assert_eq!(latest_version(["2.0.0-rc.1", "2.0.0"]), Some("2.0.0"));
    assert_eq!(latest_version(["9", "10", "1.0.0"]), Some("1.0.0"));
    assert_eq!(latest_version(["abc"]), None);
    assert_eq!(latest_version(std::iter::empty()), None);
}

#[test]
fn json_schema_describes_the_template() {
    let s = template_json_schema();
    assert_eq!(s["$id"], schema::SCHEMA_ID);
    assert_eq!(s["additionalProperties"], false);
    assert_eq!(
        s["properties"]["policy"]["properties"]["mode"]["enum"],
        json!(["off", "read-only", "restricted"])
    );
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn label_selectors_parse_and_match() {
    let prod_build = labels(&[("env", "prod"), ("role", "build"), ("gpu", "")]);
    let prod_canary = labels(&[("env", "prod"), ("role", "canary")]);
    let staging = labels(&[("env", "staging")]);

    let sel = LabelSelector::parse("env=prod, role!=canary").expect("parses");
    assert!(sel.matches(&prod_build));
    assert!(!sel.matches(&prod_canary));
    assert!(!sel.matches(&staging));
    assert_eq!(sel.to_string(), "env=prod,role!=canary");

    // `k!=v` holds when the label is missing.
    let sel: LabelSelector = "role!=canary".parse().expect("parses");
    assert!(sel.matches(&staging));

    let sel = LabelSelector::parse("gpu").expect("parses");
    assert!(sel.matches(&prod_build), "exists, even with an empty value");
    assert!(!sel.matches(&prod_canary));

    let sel = LabelSelector::parse("!gpu,env==prod").expect("parses");
    assert!(sel.matches(&prod_canary));
    assert!(!sel.matches(&prod_build));
    assert_eq!(
        sel.terms(),
        [
            Term::NotExists { key: "gpu".into() },
            Term::Equals {
                key: "env".into(),
                value: "prod".into()
            }
        ]
    );

    let sel = LabelSelector::parse("gpu=").expect("parses");
    assert!(sel.matches(&prod_build));
    assert!(!sel.matches(&staging));

    let sel = LabelSelector::parse("team/area=a.b-c_d").expect("parses");
    assert!(sel.matches(&labels(&[("team/area", "a.b-c_d")])));
}

#[test]
fn label_selector_errors_say_what_is_accepted() {
    assert_eq!(LabelSelector::parse("  "), Err(SelectorError::Empty));
    for bad in [
        "env=prod,",
        ",env=prod",
        "bad key=x",
        "=x",
        "!",
        "a=b!=c",
        "e\u{1}=x",
    ] {
        let err = LabelSelector::parse(bad).expect_err(bad);
        assert_eq!(err.code(), "invalid_selector");
        assert!(
            matches!(err, SelectorError::BadTerm { .. }),
            "{bad:?}: {err:?}"
        );
        assert!(err.to_string().contains("`k=v`"), "{err}");
    }
    let many = (0..33)
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join(",");
    assert_eq!(
        LabelSelector::parse(&many),
        Err(SelectorError::TooManyTerms)
    );
    assert_eq!(
        LabelSelector::parse(&"k".repeat(5000)),
        Err(SelectorError::TooLong)
    );
}
