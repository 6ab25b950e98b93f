//! The HTTP API on a real socket (127.0.0.1, ephemeral port) over a real sled data dir.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use codemantle_control_plane::api::{App, Server};
use codemantle_control_plane::client::{Client, Request, Response};
use codemantle_control_plane::registry;
use codemantle_control_plane::store::sled::SledStore;
use codemantle_control_plane::store::{Role, Store, TenantId};
use codemantle_control_plane::{admin, time};
use serde_json::{Value, json};

struct TestServer {
    addr: SocketAddr,
    store: Arc<dyn Store>,
    app: Arc<App>,
    owner: String,
    _dir: tempfile::TempDir,
}

impl TestServer {
    fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled = SledStore::open(&dir.path().join("data")).expect("open store");
        let owner = admin::init(&sled).expect("init").bearer;
        let store: Arc<dyn Store> = Arc::new(sled);
        let app = Arc::new(App::new(store.clone()));
        let server = smol::block_on(Server::bind(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            app.clone(),
        ))
        .expect("bind");
        let addr = server.local_addr().expect("addr");
        smol::spawn(server.run()).detach();
        TestServer {
            addr,
            store,
            app,
            owner,
            _dir: dir,
        }
    }

    fn client(&self, token: Option<&str>) -> Client {
        Client::new(
            &format!("http://{}", self.addr),
            token.map(str::to_owned),
            None,
        )
        .expect("client")
    }

    fn token(&self, tenant: &str, role: Role) -> String {
        let t = TenantId::parse(tenant).expect("tenant");
        if self.store.tenant(&t).expect("read").is_none() {
            registry::create_tenant(self.store.as_ref(), tenant, None, "test").expect("tenant");
        }
        registry::create_token(self.store.as_ref(), &t, "test", role, "test")
            .expect("token")
            .bearer
    }
}

fn send(client: &Client, req: Request) -> Response {
    smol::block_on(client.send(req)).expect("request")
}

fn get(client: &Client, path: &str) -> Response {
    send(client, Request::new("GET", path))
}

fn post(client: &Client, path: &str, body: Value) -> Response {
    send(client, Request::new("POST", path).json(&body))
}

fn assert_error(resp: &Response, status: u16, code: &str) {
    let body = resp.json();
    assert_eq!(
        (resp.status, body["error"].as_str()),
        (status, Some(code)),
        "body: {body}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "every error explains itself: {body}"
    );
}

#[test]
fn health_openapi_and_metrics_are_well_formed() {
    let s = TestServer::start();
    let anon = s.client(None);
    let health = get(&anon, "/health");
    assert_eq!(
        (health.status, health.json()),
        (200, json!({ "ok": true, "store": "ok" }))
    );

    let doc = get(&anon, "/openapi.json");
    assert_eq!(doc.status, 200);
    let doc: Value = serde_json::from_slice(&doc.body).expect("OpenAPI is JSON");
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/devices",
        "/devices/{id}",
        "/tokens",
        "/tokens/{id}/revoke",
        "/events",
        "/events/stream",
        "/metrics",
        "/health",
    ] {
        assert!(doc["paths"][path].is_object(), "{path}");
    }

    assert_error(&get(&anon, "/metrics"), 401, "auth_required");
    let owner = s.client(Some(&s.owner));
    let dev = s
        .app
        .store
        .device(&TenantId::default_tenant(), "x")
        .expect("read");
    assert!(dev.is_none());
    s.app
        .presence
        .set_online("dev_metrics_0001", time::now_ms());
    s.app
        .metrics
        .record_command("dr", "ok", Duration::from_millis(30));
    let metrics = get(&owner, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain"))
    );
    let text = metrics.text();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, value) = line.rsplit_once(' ').expect("name value");
        assert!(name.starts_with("codemantle_"), "{line}");
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("numeric value in {line:?}"));
    }
    assert!(text.contains("codemantle_devices_connected 1\n"));
    assert!(text.contains("codemantle_commands_total{type=\"dr\",outcome=\"ok\"} 1\n"));
    assert!(text.contains("codemantle_command_duration_seconds_bucket{le=\"0.05\"} 1\n"));
    assert!(text.contains("codemantle_http_requests_total{code=\"200\"}"));
    assert!(text.contains("codemantle_http_requests_total{code=\"401\"} 1\n"));
    // Metrics are installation-wide: another tenant's token may not read them.
    let other = s.client(Some(&s.token("acme", Role::Owner)));
    assert_error(&get(&other, "/metrics"), 403, "forbidden");
}

#[test]
fn token_auth_and_roles() {
    let s = TestServer::start();
    assert_error(&get(&s.client(None), "/devices"), 401, "auth_required");
    assert_error(
        &get(&s.client(Some("not-a-token")), "/devices"),
        401,
        "invalid_token",
    );
    let viewer = s.token("default", Role::Viewer);
    // Right id, wrong secret.
    let (id, _) = viewer
        .strip_prefix("cmt_")
        .and_then(|r| r.split_once('_'))
        .expect("shape");
    let forged = format!("cmt_{id}_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    assert_error(
        &get(&s.client(Some(&forged)), "/devices"),
        401,
        "invalid_token",
    );

    let as_viewer = s.client(Some(&viewer));
    assert_eq!(get(&as_viewer, "/devices").status, 200);
    assert_error(
        &post(&as_viewer, "/devices", json!({ "name": "x" })),
        403,
        "forbidden",
    );
    assert_error(&get(&as_viewer, "/tokens"), 403, "forbidden");

    let admin = s.client(Some(&s.token("default", Role::Admin)));
    assert_error(
        &post(&admin, "/tokens", json!({ "name": "x", "role": "owner" })),
        403,
        "forbidden",
    );
    assert_error(
        &post(
            &admin,
            "/tokens",
            json!({ "name": "x", "role": "admin", "tenant": "acme" }),
        ),
        403,
        "forbidden",
    );
    assert_error(
        &post(&admin, "/tokens", json!({ "name": "x", "role": "boss" })),
        400,
        "invalid_role",
    );
    let minted = post(
        &admin,
        "/tokens",
        json!({ "name": "ci", "role": "operator" }),
    );
    assert_eq!(minted.status, 201, "{}", minted.text());
    let secret = minted.json()["secret"].as_str().expect("secret").to_owned();
    let minted_id = minted.json()["token"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_eq!(get(&s.client(Some(&secret)), "/devices").status, 200);

    let revoked = post(&admin, &format!("/tokens/{minted_id}/revoke"), json!({}));
    assert_eq!(
        (revoked.status, revoked.json()["already_revoked"].as_bool()),
        (200, Some(false))
    );
    assert_error(
        &get(&s.client(Some(&secret)), "/devices"),
        401,
        "token_revoked",
    );
    let again = post(&admin, &format!("/tokens/{minted_id}/revoke"), json!({}));
    assert_eq!(again.json()["already_revoked"], json!(true));
    // An admin cannot revoke the owner's token.
    let owner_id = s
        .owner
        .strip_prefix("cmt_")
        .and_then(|r| r.split_once('_'))
        .expect("shape")
        .0;
    assert_error(
        &post(&admin, &format!("/tokens/{owner_id}/revoke"), json!({})),
        403,
        "forbidden",
    );

    // The installation owner may mint for another existing tenant, not for a missing one.
    let owner = s.client(Some(&s.owner));
    s.token("acme", Role::Viewer);
    let cross = post(
        &owner,
        "/tokens",
        json!({ "name": "acme-admin", "role": "admin", "tenant": "acme" }),
    );
    assert_eq!(cross.status, 201, "{}", cross.text());
    assert_error(
        &post(
            &owner,
            "/tokens",
            json!({ "name": "x", "role": "admin", "tenant": "ghost" }),
        ),
        404,
        "tenant_not_found",
    );
}

#[test]
fn request_validation_and_routing_errors() {
    let s = TestServer::start();
    let owner = s.client(Some(&s.owner));
    let raw = |body: &[u8]| {
        let mut req = Request::new("POST", "/devices").header("content-type", "application/json");
        req.body = Some(body.to_vec());
        send(&owner, req)
    };
    assert_error(&raw(b"{not json"), 400, "invalid_json_body");
    assert_error(&raw(b"[1,2]"), 400, "invalid_json_body");
    assert_error(
        &raw(br#"{"name":"x","colour":"red"}"#),
        400,
        "invalid_request",
    );
    assert_error(&raw(br#"{"name":""}"#), 400, "invalid_name");
    assert_error(
        &raw(br#"{"name":"x","id":"bad id!"}"#),
        400,
        "invalid_device_id",
    );
    assert_error(
        &raw(br#"{"name":"x","labels":{"bad key":"v"}}"#),
        400,
        "invalid_labels",
    );
    let big = format!(r#"{{"name":"{}"}}"#, "x".repeat(2 * 1024 * 1024));
    assert_error(&raw(big.as_bytes()), 413, "payload_too_large");
    assert_error(&get(&owner, "/nope"), 404, "not_found");
    assert_error(
        &send(&owner, Request::new("PUT", "/devices")),
        405,
        "method_not_allowed",
    );
    assert_error(&get(&owner, "/events?after=-3"), 400, "invalid_query");
    assert_error(&get(&s.client(None), "/ws"), 501, "tunnel_unavailable");
    // A chosen id that exists → 409.
    assert_eq!(raw(br#"{"name":"x","id":"dev_chosen_0001"}"#).status, 201);
    assert_error(
        &raw(br#"{"name":"y","id":"dev_chosen_0001"}"#),
        409,
        "device_exists",
    );
}

#[test]
fn devices_of_another_tenant_are_indistinguishable_from_missing_ones() {
    let s = TestServer::start();
    let a = s.client(Some(&s.token("tenant-a", Role::Owner)));
    let b = s.client(Some(&s.token("tenant-b", Role::Owner)));
    let created = post(&b, "/devices", json!({ "name": "b-box" }));
    assert_eq!(created.status, 201);
    let b_dev = created.json()["device"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let missing = "dev_doesnotexist0";

    for id in [b_dev.as_str(), missing] {
        let shown = get(&a, &format!("/devices/{id}"));
        assert_error(&shown, 404, "device_not_found");
        let removed = send(&a, Request::new("DELETE", &format!("/devices/{id}")));
        assert_error(&removed, 404, "device_not_found");
        let keyed = send(
            &a,
            Request::new("DELETE", &format!("/devices/{id}")).header("idempotency-key", id),
        );
        assert_error(&keyed, 404, "device_not_found");
    }
    // Same bodies for "other tenant" and "missing", apart from the id itself.
    let other = get(&a, &format!("/devices/{b_dev}")).json();
    let absent = get(&a, &format!("/devices/{missing}")).json();
    assert_eq!(
        other["message"].as_str().map(|m| m.replace(&b_dev, "ID")),
        absent["message"].as_str().map(|m| m.replace(missing, "ID"))
    );

    assert_eq!(get(&a, "/devices").json()["devices"], json!([]));
    let b_list = get(&b, "/devices").json();
    assert_eq!(b_list["devices"][0]["id"], json!(b_dev));
    // B's device survived A's attempts; B's events are not in A's log.
    assert_eq!(get(&b, &format!("/devices/{b_dev}")).status, 200);
    let a_events = get(&a, "/events?after=0").json();
    assert!(
        a_events["events"]
            .as_array()
            .expect("events")
            .iter()
            .all(|e| e["tenant"] == "tenant-a")
    );
    // Tokens are tenant-scoped too.
    let b_token_id = get(&b, "/tokens").json()["tokens"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_error(
        &post(&a, &format!("/tokens/{b_token_id}/revoke"), json!({})),
        404,
        "token_not_found",
    );
}

#[test]
fn device_status_comes_from_presence() {
    let s = TestServer::start();
    let owner = s.client(Some(&s.owner));
    let created = post(
        &owner,
        "/devices",
        json!({ "name": "box", "labels": { "rack": "r1" } }),
    );
    let id = created.json()["device"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let status = || get(&owner, &format!("/devices/{id}")).json()["device"]["status"].clone();
    assert_eq!(status(), "never-seen");
    let conn = s.app.presence.set_online(&id, time::now_ms());
    assert_eq!(status(), "online");
    assert!(s.app.presence.set_offline(&id, conn, time::now_ms()));
    assert_eq!(status(), "offline");
    let dev = get(&owner, "/devices").json()["devices"][0].clone();
    assert_eq!(
        (dev["labels"]["rack"].as_str(), dev["last_seen_ms"].is_u64()),
        (Some("r1"), true)
    );
    assert!(dev.get("secret").is_none(), "the secret is never listed");
}

#[test]
fn idempotency_key_replays_the_first_response_and_appends_no_second_event() {
    let s = TestServer::start();
    let owner = s.client(Some(&s.owner));
    let tenant = TenantId::default_tenant();
    let before = s.store.events(&tenant, 0, 1000).expect("events").len();
    let req = || {
        Request::new("POST", "/devices")
            .json(&json!({ "name": "once" }))
            .header("Idempotency-Key", "k-123")
    };
    let first = send(&owner, req());
    let second = send(&owner, req());
    assert_eq!(first.status, 201);
    assert_eq!((second.status, second.json()), (first.status, first.json()));
    assert_eq!(first.header("idempotent-replayed"), Some("false"));
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    let after = s.store.events(&tenant, 0, 1000).expect("events");
    assert_eq!(after.len(), before + 1, "exactly one device.added");
    assert_eq!(
        get(&owner, "/devices").json()["devices"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // Same key, different body or route → 422.
    let other_body = Request::new("POST", "/devices")
        .json(&json!({ "name": "twice" }))
        .header("Idempotency-Key", "k-123");
    assert_error(&send(&owner, other_body), 422, "idempotency_key_reused");
    let id = first.json()["device"]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let other_route =
        Request::new("DELETE", &format!("/devices/{id}")).header("Idempotency-Key", "k-123");
    assert_error(&send(&owner, other_route), 422, "idempotency_key_reused");
    // The same key in another tenant is a different key.
    let acme = s.client(Some(&s.token("acme", Role::Admin)));
    assert_eq!(send(&acme, req()).status, 201);
    // A failed request releases its key: the retry runs.
    let bad = || {
        Request::new("POST", "/devices")
            .json(&json!({ "name": "x", "id": id }))
            .header("Idempotency-Key", "k-dup")
    };
    assert_error(&send(&owner, bad()), 409, "device_exists");
    assert_error(&send(&owner, bad()), 409, "device_exists");
    assert_error(
        &send(
            &owner,
            Request::new("DELETE", &format!("/devices/{id}")).header("Idempotency-Key", " "),
        ),
        400,
        "invalid_idempotency_key",
    );
    // Tokens refuse keys (a replay would need the secret stored).
    let tok = Request::new("POST", "/tokens")
        .json(&json!({ "name": "n", "role": "viewer" }))
        .header("Idempotency-Key", "k-9");
    assert_error(&send(&owner, tok), 400, "idempotency_not_supported");
}

#[test]
fn events_page_and_stream_replay_then_live_without_gaps_or_duplicates() {
    let s = TestServer::start();
    let owner = s.client(Some(&s.owner));
    let tenant = TenantId::default_tenant();
    // init wrote seq 1 (tenant) and 2 (token).
    let page = get(&owner, "/events?after=0&limit=1").json();
    assert_eq!(
        (page["events"][0]["seq"].as_u64(), page["last_seq"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(page["events"][0]["kind"], "tenant.created");
    let tail = get(&owner, "/events?limit=1").json();
    assert_eq!(tail["events"][0]["kind"], "token.created");

    // Writers race the stream's replay→live switch.
    let writer_store = s.store.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..40 {
            let new = registry::NewDevice {
                name: format!("box {i}"),
                ..Default::default()
            };
            registry::create_device(
                writer_store.as_ref(),
                &TenantId::default_tenant(),
                new,
                "test",
            )
            .expect("add");
            if i % 8 == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    });
    let seqs = smol::block_on(async {
        let stream = owner
            .open(Request::new("GET", "/events/stream?after=0"))
            .await
            .expect("open");
        assert_eq!(stream.status, 200);
        assert_eq!(stream.header("content-type"), Some("text/event-stream"));
        let mut sse = stream.into_sse();
        let mut seqs = Vec::new();
        while seqs.len() < 42 {
            let ev = sse.next_event().await.expect("read").expect("stream open");
            let data: Value = serde_json::from_str(&ev.data).expect("json data");
            assert_eq!(
                ev.id.as_deref().and_then(|i| i.parse().ok()),
                data["seq"].as_u64()
            );
            assert_eq!(ev.event.as_deref(), data["kind"].as_str());
            seqs.push(data["seq"].as_u64().expect("seq"));
        }
        seqs
    });
    writer.join().expect("writer");
    assert_eq!(
        seqs,
        (1..=42).collect::<Vec<u64>>(),
        "in order, no gap, no duplicate"
    );
    assert_eq!(s.store.last_event_seq().expect("seq"), 42);

    // Resume with Last-Event-ID (wins over ?after), then a live event.
    let resumed = smol::block_on(async {
        let req = Request::new("GET", "/events/stream?after=0").header("Last-Event-ID", "40");
        let mut sse = owner.open(req).await.expect("open").into_sse();
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(sse.next_event().await.expect("read").expect("event").id);
        }
        let live = registry::create_device(
            s.store.as_ref(),
            &tenant,
            registry::NewDevice {
                name: "late".into(),
                ..Default::default()
            },
            "test",
        )
        .expect("add")
        .1;
        got.push(sse.next_event().await.expect("read").expect("event").id);
        (got, live.seq)
    });
    assert_eq!(
        resumed.0,
        vec![
            Some("41".into()),
            Some("42".into()),
            Some(resumed.1.to_string())
        ]
    );
}

/// TLS termination with a self-signed certificate, generated with the `openssl` CLI (which
/// `.ci/run` installs): operators make their certificates the same way.
#[test]
fn serves_https_from_pem_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let generated = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output();
    match generated {
        Ok(out) => assert!(
            out.status.success(),
            "openssl could not make a test certificate: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("this test needs the openssl CLI (apt-get install openssl): {e}"),
    }
    let tls = codemantle_control_plane::api::tls::server_config(&cert, &key).expect("tls config");
    let sled = SledStore::open(&dir.path().join("data")).expect("open");
    let app = Arc::new(App::new(Arc::new(sled)));
    let server = smol::block_on(Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        Some(tls),
        app,
    ))
    .expect("bind");
    assert_eq!(server.scheme(), "https");
    let addr = server.local_addr().expect("addr");
    smol::spawn(server.run()).detach();

    let client = Client::new(
        &format!("https://127.0.0.1:{}", addr.port()),
        None,
        Some(&cert),
    )
    .expect("client");
    let health = get(&client, "/health");
    assert_eq!(
        (health.status, health.json()["ok"].as_bool()),
        (200, Some(true))
    );
    // Plain HTTP to the TLS port gets no API answer.
    let plain =
        Client::new(&format!("http://127.0.0.1:{}", addr.port()), None, None).expect("client");
    assert!(smol::block_on(plain.send(Request::new("GET", "/health"))).is_err());
    // Missing files are reported with the path.
    let err = codemantle_control_plane::api::tls::server_config(&dir.path().join("nope.pem"), &key)
        .expect_err("a missing file must fail");
    assert!(err.to_string().contains("nope.pem"));
}
