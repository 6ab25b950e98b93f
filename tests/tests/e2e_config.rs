//! Config pushes end to end with the real binaries: templates and MCP entries published
//! through the API, compiled and signed by the control plane with each device's own key,
//! verified and applied by real daemons, with the status of every push readable afterwards.
//!
//! - `build-box@1.0.0` (control-plane reference, Appendix A) lands in the project root as the
//!   canonical runtime JSON whose digest is the Appendix A digest;
//! - a read-only template that enables bash is refused when published (every reason listed),
//!   and a daemon whose operator set `[config_push] policy_floor = "read-only"` rejects
//!   `build-box` (bash on) with its reasons in the status record, writing nothing;
//! - a fleet push by label selector reaches only the matching daemon.
//!
//! SAFETY: every file is inside the tests' temp dirs (the daemons' project roots); the network
//! is 127.0.0.1 only.

use std::time::{Duration, Instant};

use codemantle_tests::harness::{ControlPlane, Daemon};
use serde_json::{Value, json};

/// Appendix A's runtime canonical JSON of `build-box@1.0.0` with `docs@1`, and its digest.
const RUNTIME_JSON: &str = r#"{"$schema":"https://opencode.ai/config.json","codemantle":{"mcpRefs":[{"alias":"docs","serverId":"docs","status":"allow","version":"1"}],"policy":{"mode":"off"},"routing":{"fallbackOrder":["anthropic/claude-sonnet-4","openai/gpt-5"],"intents":[{"id":"fix","match":"fix bug","priority":5,"rules":["a rule","b rule"]}],"priorityChain":["anthropic/claude-sonnet-4","openai/gpt-5"],"profiles":[]},"schemaVersion":"1.0.0","templateId":"build-box","templateVersion":"1.0.0"},"mcp":{"docs":{"enabled":true,"status":"allow","type":"remote","url":"https://mcp.example.com/docs"}},"model":"anthropic/claude-sonnet-4","permission":{"bash":"ask","edit":"deny"},"tools":{"bash":true,"edit":false}}"#;
const RUNTIME_DIGEST: &str = "ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA";
const APPLY_PATH: &str = ".opencode/opencode.json";

/// Appendix A's `build-box@1.0.0` as an operator writes it (rules unsorted).
fn build_box(version: &str) -> Value {
    json!({
        "schemaVersion": "1.0.0",
        "templateId": "build-box",
        "templateVersion": version,
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

/// A read-only template done right: every write/exec tool switched off.
fn read_box() -> Value {
    json!({
        "schemaVersion": "1.0.0",
        "templateId": "read-box",
        "templateVersion": "1.0.0",
        "routing": { "defaultModel": "anthropic/claude-sonnet-4", "intents": [] },
        "policy": { "mode": "read-only" },
        "tools": {
            "enabled": { "bash": false, "edit": false, "read": true },
            "permissions": { "bash": "deny", "edit": "deny" }
        },
        "mcpRefs": []
    })
}

#[track_caller]
fn assert_ok(what: &str, (status, body): (u16, Value)) -> Value {
    assert_eq!(status, 200, "{what}: {body}");
    body
}

/// Polls the status route until the push is no longer pending.
fn final_status(cp: &ControlPlane, device: &str, request_id: u64) -> Value {
    let path = format!("/devices/{device}/config/status/{request_id}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = cp.get(&path);
        assert_eq!(status, 200, "{body}");
        if body["status"] != "pending" {
            return body;
        }
        assert!(Instant::now() < deadline, "still pending: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(daemon: &Daemon, rel: &str) -> Option<String> {
    std::fs::read_to_string(daemon.path(rel)).ok()
}

#[test]
fn templates_pushed_signed_applied_rejected_and_by_selector() {
    let mut cp = ControlPlane::start();
    let prod = cp.add_device_with_labels("e2e-cfg-prod", &[("env", "prod"), ("role", "build")]);
    let locked = cp.add_device_with_labels("e2e-cfg-locked", &[("env", "dev")]);
    let prod_daemon = Daemon::start(&cp.ws_url(), &prod);
    // This host's operator allows only configs that neither write nor execute.
    let locked_daemon = Daemon::start_with(&cp.ws_url(), &locked, |_| {
        "[config_push]\npolicy_floor = \"read-only\"\n".to_owned()
    });
    cp.wait_online(&prod.id);
    cp.wait_online(&locked.id);

    // Publish through the API.
    let r = assert_ok(
        "mcp",
        cp.post("/config/mcp", json!({ "entry": docs_entry() })),
    );
    assert_eq!(r["key"], "docs@1");
    let r = assert_ok(
        "template",
        cp.post(
            "/config/templates",
            json!({ "template": build_box("1.0.0") }),
        ),
    );
    assert_eq!(r["key"], "build-box@1.0.0");

    // Push build-box to the prod daemon: applied, the Appendix A bytes on disk.
    let (status, cv) = cp.post(
        &format!("/devices/{}/config/push", prod.id),
        json!({ "templateId": "build-box", "templateVersion": "1.0.0" }),
    );
    assert_eq!(status, 200, "{cv}\n{}", prod_daemon.log());
    assert_eq!(
        (cv["st"].clone(), cv["pd"].clone()),
        (json!("applied"), json!(RUNTIME_DIGEST))
    );
    let written = read(&prod_daemon, APPLY_PATH).expect("config file written");
    assert_eq!(written, format!("{RUNTIME_JSON}\n"));
    assert_eq!(
        codemantle_protocol::canonical::digest_text(written.trim_end_matches('\n')),
        RUNTIME_DIGEST
    );
    let rid = cv["i"].as_u64().expect("request id");
    let st = final_status(&cp, &prod.id, rid);
    assert_eq!(st["status"], "applied", "{st}");
    assert_eq!(st["digest"], RUNTIME_DIGEST);
    assert_eq!(st["appliedPath"], APPLY_PATH);
    assert_eq!(st["templateVersion"], "1.0.0");

    // A read-only template that enables bash is refused at publication, with every reason.
    let mut bad = read_box();
    bad["templateId"] = json!("bad-box");
    bad["tools"] = json!({ "enabled": { "bash": true }, "permissions": { "bash": "allow" } });
    let (status, body) = cp.post("/config/templates", json!({ "template": bad }));
    assert_eq!(status, 400, "{body}");
    let paths: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(paths.contains(&"tools.enabled.bash"), "{body}");
    assert!(paths.contains(&"tools.permissions.bash"), "{body}");

    // The daemon with a read-only floor rejects build-box (bash on) and says why.
    let (status, cv) = cp.post(
        &format!("/devices/{}/config/push", locked.id),
        json!({ "templateId": "build-box" }),
    );
    assert_eq!(status, 400, "{cv}");
    assert_eq!(cv["st"], "rejected");
    let st = final_status(&cp, &locked.id, cv["i"].as_u64().expect("request id"));
    assert_eq!(st["status"], "rejected", "{st}");
    let violations: Vec<&str> = st["violations"]
        .as_array()
        .expect("violations")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    eprintln!("read-only floor rejected build-box with {violations:?}");
    assert!(
        violations.iter().any(|v| v.contains("bash")),
        "the reasons name bash: {violations:?}"
    );
    assert_eq!(read(&locked_daemon, APPLY_PATH), None, "nothing written");
    // A proper read-only template passes the same daemon.
    assert_ok(
        "read-box",
        cp.post("/config/templates", json!({ "template": read_box() })),
    );
    let (status, cv) = cp.post(
        &format!("/devices/{}/config/push", locked.id),
        json!({ "templateId": "read-box" }),
    );
    assert_eq!((status, cv["st"].clone()), (200, json!("applied")), "{cv}");
    let locked_config = read(&locked_daemon, APPLY_PATH).expect("read-box written");

    // Fleet push of a new version by selector: only env=prod receives it.
    let mut v110 = build_box("1.1.0");
    v110["routing"]["defaultModel"] = json!("openai/gpt-5");
    assert_ok(
        "1.1.0",
        cp.post("/config/templates", json!({ "template": v110 })),
    );
    let (status, fleet) = cp.post(
        "/config/push",
        json!({ "templateId": "build-box", "selector": "env=prod,role=build" }),
    );
    assert_eq!(status, 202, "{fleet}");
    assert_eq!(fleet["templateVersion"], "1.1.0", "latest by semver");
    let devices = fleet["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{fleet}");
    assert_eq!(devices[0]["deviceId"], prod.id.as_str());
    let st = final_status(
        &cp,
        &prod.id,
        devices[0]["requestId"].as_u64().expect("request id"),
    );
    assert_eq!(st["status"], "applied", "{st}");
    assert_eq!(st["templateVersion"], "1.1.0");
    let written = read(&prod_daemon, APPLY_PATH).expect("config file");
    assert!(written.contains("\"model\":\"openai/gpt-5\""), "{written}");
    assert_eq!(
        codemantle_protocol::canonical::digest_text(written.trim_end_matches('\n')),
        st["digest"].as_str().expect("digest")
    );
    assert_eq!(
        read(&locked_daemon, APPLY_PATH).as_deref(),
        Some(locked_config.as_str()),
        "the env=dev daemon was not selected"
    );

    // An offline matching device is recorded, not forgotten (registering it restarts the
    // control plane; the daemons reconnect).
    let gone = cp.add_device_with_labels("e2e-cfg-offline", &[("env", "prod"), ("role", "build")]);
    cp.wait_online(&prod.id);
    let (status, fleet) = cp.post(
        "/config/push",
        json!({ "templateId": "build-box", "selector": "env=prod" }),
    );
    assert_eq!(status, 202, "{fleet}");
    let offline = fleet["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .find(|d| d["deviceId"] == gone.id.as_str())
        .cloned()
        .expect("offline device listed");
    assert_eq!(offline["status"], "failed");
    assert_eq!(offline["message"], "device_offline");
    let st = final_status(
        &cp,
        &gone.id,
        offline["requestId"].as_u64().expect("request id"),
    );
    assert_eq!(
        (st["status"].clone(), st["message"].clone()),
        (json!("failed"), json!("device_offline"))
    );
}
