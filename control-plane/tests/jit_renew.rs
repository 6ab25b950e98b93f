//! `POST /sessions/:sid/jit/renew` through an in-process control plane (real sled store in a
//! temp dir) against a simulated 0.1.x daemon (JSON protocol, real handshake over a loopback
//! socket): `jr` is native-only, so the route answers 409 `jit_renew_unsupported` and the
//! daemon receives nothing; the route is tenant-checked (another tenant's session is a 404)
//! and needs the operator role. The native path is covered by `tests/tests/e2e_jit_renew.rs`
//! with the real daemon.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use codemantle_control_plane::admin;
use codemantle_control_plane::api::{App, Server};
use codemantle_control_plane::client::{Client, Request, Response};
use codemantle_control_plane::registry::{self, NewDevice};
use codemantle_control_plane::store::sled::SledStore;
use codemantle_control_plane::store::{Role, Store, TenantId};
use codemantle_control_plane::tunnel::TunnelConfig;
use codemantle_tests::simdaemon::{SimConfig, SimDaemon};
use serde_json::{Value, json};

fn client(addr: SocketAddr, token: &str) -> Client {
    let mut c =
        Client::new(&format!("http://{addr}"), Some(token.to_owned()), None).expect("client");
    c.timeout = Duration::from_secs(30);
    c
}

fn post(c: &Client, path: &str, body: Value) -> Response {
    smol::block_on(c.send(Request::new("POST", path).json(&body))).expect("request")
}

fn assert_status(resp: &Response, status: u16, code: Option<&str>) {
    assert_eq!(resp.status, status, "body: {}", resp.text());
    if let Some(code) = code {
        assert_eq!(resp.json()["error"], code, "body: {}", resp.text());
    }
}

fn token(store: &dyn Store, tenant: &str, role: Role) -> String {
    let t = TenantId::parse(tenant).expect("tenant");
    if store.tenant(&t).expect("read").is_none() {
        registry::create_tenant(store, tenant, None, "test").expect("tenant");
    }
    registry::create_token(store, &t, "test", role, "test")
        .expect("token")
        .bearer
}

#[test]
fn a_json_daemon_cannot_renew_and_gets_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sled = SledStore::open(&dir.path().join("data")).expect("open store");
    let owner = admin::init(&sled).expect("init").bearer;
    let store: Arc<dyn Store> = Arc::new(sled);
    let mut config = TunnelConfig::with_heartbeat(25);
    config.handshake_timeout = Duration::from_secs(2);
    let app = Arc::new(App::new(store.clone()).with_tunnel(config));
    let server = smol::block_on(Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        None,
        app,
    ))
    .expect("bind");
    let addr = server.local_addr().expect("addr");
    smol::spawn(server.run()).detach();

    let t = TenantId::parse("default").expect("tenant");
    let (device, _) = registry::create_device(
        store.as_ref(),
        &t,
        NewDevice {
            name: "legacy".to_owned(),
            labels: Default::default(),
            id: Some("dev_legacyrenew01".to_owned()),
        },
        "test",
    )
    .expect("device");
    let sim = smol::block_on(SimDaemon::connect(
        SimConfig::new(addr, &device.id, &device.secret)
            .json()
            .recording(),
    ))
    .expect("connect")
    .accepted();
    let owner = client(addr, &owner);
    let start = Instant::now();
    loop {
        let d = smol::block_on(owner.send(Request::new("GET", &format!("/devices/{}", device.id))))
            .expect("get")
            .json();
        if d["device"]["status"] == "online" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "not online: {d}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = post(
        &owner,
        &format!("/devices/{}/session/start", device.id),
        json!({"sessionId": "ses_legacy", "path": ".", "jit": {"ttlSec": 600}}),
    );
    assert_status(&r, 200, None);

    let renew = "/sessions/ses_legacy/jit/renew";
    let r = post(&owner, renew, json!({"ttl_secs": 600}));
    assert_status(&r, 409, Some("jit_renew_unsupported"));
    // Bad input is a 400 before the device is looked at.
    assert_status(
        &post(&owner, renew, json!({"ttl_secs": 5})),
        400,
        Some("invalid_jit_ttl"),
    );
    // Another tenant's session does not exist for the caller; a viewer may not renew.
    let other = client(addr, &token(store.as_ref(), "othertenant", Role::Admin));
    assert_status(&post(&other, renew, json!({"ttl_secs": 600})), 404, None);
    let viewer = client(addr, &token(store.as_ref(), "default", Role::Viewer));
    assert_status(&post(&viewer, renew, json!({"ttl_secs": 600})), 403, None);

    // The 0.1.x daemon received the start, never a `jr`.
    let tags: Vec<String> = sim
        .frames()
        .iter()
        .filter_map(|raw| serde_json::from_slice::<Value>(raw).ok())
        .filter_map(|v| v["t"].as_str().map(str::to_owned))
        .collect();
    assert!(tags.iter().any(|t| t == "si"), "{tags:?}");
    assert!(!tags.iter().any(|t| t == "jr"), "{tags:?}");
}
