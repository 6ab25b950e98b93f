//! The daemon tunnel end to end: an in-process control plane on 127.0.0.1 (real sled data dir
//! in a temp dir) and simulated daemons (`codemantle_tests::simdaemon`) doing the real
//! handshake over real sockets. The restart test runs the real server binary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use codemantle_control_plane::admin;
use codemantle_control_plane::api::routes::DeviceOp;
use codemantle_control_plane::api::{App, Server};
use codemantle_control_plane::client::{Client, Request, Response};
use codemantle_control_plane::registry::{self, NewDevice};
use codemantle_control_plane::store::sled::SledStore;
use codemantle_control_plane::store::{Role, Store, TenantId};
use codemantle_control_plane::tunnel::TunnelConfig;
use codemantle_protocol::codec::Codec;
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::message::Message;
use codemantle_tests::simdaemon::{self, Fault, SimConfig, SimDaemon};
use serde_json::{Value, json};

struct Harness {
    addr: SocketAddr,
    store: Arc<dyn Store>,
    owner: String,
    _dir: tempfile::TempDir,
}

fn test_config() -> TunnelConfig {
    let mut c = TunnelConfig::with_heartbeat(25);
    c.handshake_timeout = Duration::from_secs(2);
    c
}

impl Harness {
    fn start(config: TunnelConfig) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let sled = SledStore::open(&dir.path().join("data")).expect("open store");
        let owner = admin::init(&sled).expect("init").bearer;
        let store: Arc<dyn Store> = Arc::new(sled);
        let app = Arc::new(App::new(store.clone()).with_tunnel(config));
        let server = smol::block_on(Server::bind(
            "127.0.0.1:0".parse().expect("addr"),
            None,
            app,
        ))
        .expect("bind");
        let addr = server.local_addr().expect("addr");
        smol::spawn(server.run()).detach();
        Harness {
            addr,
            store,
            owner,
            _dir: dir,
        }
    }

    fn tenant(&self, tenant: &str) -> TenantId {
        let t = TenantId::parse(tenant).expect("tenant");
        if self.store.tenant(&t).expect("read").is_none() {
            registry::create_tenant(self.store.as_ref(), tenant, None, "test").expect("tenant");
        }
        t
    }

    fn token(&self, tenant: &str, role: Role) -> String {
        let t = self.tenant(tenant);
        registry::create_token(self.store.as_ref(), &t, "test", role, "test")
            .expect("token")
            .bearer
    }

    /// Registers a device; returns (id, secret).
    fn device(&self, tenant: &str, id: &str) -> (String, String) {
        self.labelled_device(tenant, id, &[])
    }

    /// Registers a device with labels; returns (id, secret).
    fn labelled_device(&self, tenant: &str, id: &str, labels: &[(&str, &str)]) -> (String, String) {
        let t = self.tenant(tenant);
        let (d, _) = registry::create_device(
            self.store.as_ref(),
            &t,
            NewDevice {
                name: id.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                id: Some(id.to_owned()),
            },
            "test",
        )
        .expect("device");
        (d.id, d.secret)
    }

    fn client(&self, token: &str) -> Client {
        let mut c = Client::new(
            &format!("http://{}", self.addr),
            Some(token.to_owned()),
            None,
        )
        .expect("client");
        c.timeout = Duration::from_secs(30);
        c
    }

    fn sim(&self, id: &str, secret: &str) -> SimConfig {
        SimConfig::new(self.addr, id, secret)
    }

    fn connect(&self, config: SimConfig) -> SimDaemon {
        let id = config.device_id.clone();
        let sim = smol::block_on(SimDaemon::connect(config))
            .expect("connect")
            .accepted();
        wait_status(&self.client(&self.owner), &id, "online");
        sim
    }
}

fn send(client: &Client, req: Request) -> Response {
    smol::block_on(client.send(req)).expect("request")
}

fn post(client: &Client, path: &str, body: Value) -> Response {
    send(client, Request::new("POST", path).json(&body))
}

fn get(client: &Client, path: &str) -> Response {
    send(client, Request::new("GET", path))
}

/// Appendix A's `build-box@1.0.0` (as an operator writes it: rules unsorted).
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

/// The Appendix A runtime digest of `build_box()` with the `docs@1` entry.
const BUILD_BOX_DIGEST: &str = "ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA";

/// Publishes `build_box()` and its MCP entry.
fn publish_build_box(owner: &Client) {
    let entry = json!({"serverId": "docs", "version": "1", "type": "remote", "url": "https://mcp.example.com/docs"});
    assert_status(
        &post(owner, "/config/mcp", json!({"entry": entry})),
        200,
        None,
    );
    assert_status(
        &post(owner, "/config/templates", json!({"template": build_box()})),
        200,
        None,
    );
}

#[track_caller]
fn assert_status(resp: &Response, status: u16, code: Option<&str>) {
    assert_eq!(resp.status, status, "body: {}", resp.text());
    if let Some(code) = code {
        assert_eq!(resp.json()["error"], code, "body: {}", resp.text());
    }
}

fn wait_status(client: &Client, id: &str, status: &str) -> Value {
    let start = Instant::now();
    loop {
        let d = get(client, &format!("/devices/{id}")).json();
        if d["device"]["status"] == status {
            return d["device"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "device {id} did not become {status}: {d}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn refusal(config: SimConfig) -> simdaemon::Refusal {
    smol::block_on(SimDaemon::connect(config))
        .expect("connect")
        .refused()
}

/// Keeps listing a directory on a good device through the API from another thread; the
/// returned closure stops it and reports (successes, failures, slowest request).
fn keep_listing(
    addr: SocketAddr,
    token: String,
    id: String,
) -> impl FnOnce() -> (u64, u64, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let slowest = Arc::new(std::sync::Mutex::new(Duration::ZERO));
    let handle = {
        let (stop, ok, bad, slowest) = (stop.clone(), ok.clone(), bad.clone(), slowest.clone());
        std::thread::spawn(move || {
            let client = Client::new(&format!("http://{addr}"), Some(token), None).expect("client");
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = smol::block_on(
                    client
                        .send(Request::new("POST", &format!("/devices/{id}/dir")).json(&json!({}))),
                );
                let took = started.elapsed();
                let mut s = slowest.lock().expect("lock");
                *s = (*s).max(took);
                match r {
                    Ok(r) if r.status == 200 && r.json()["t"] == "ds" => {
                        ok.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    move || {
        stop.store(true, Ordering::Relaxed);
        handle.join().expect("lister");
        let slowest = *slowest.lock().expect("lock");
        (
            ok.load(Ordering::Relaxed),
            bad.load(Ordering::Relaxed),
            slowest,
        )
    }
}

#[test]
fn native_and_json_daemons_connect_and_answer_directory_listings() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let (native_id, native_key) = h.device("default", "dev_native00000001");
    let (json_id, json_key) = h.device("default", "dev_json0000000001");
    assert_eq!(
        get(&owner, &format!("/devices/{native_id}")).json()["device"]["status"],
        "never-seen"
    );
    let native_cfg = h.sim(&native_id, &native_key);
    native_cfg
        .tree
        .lock()
        .expect("tree")
        .add_file("src/main.rs", 42);
    let native = h.connect(native_cfg);
    let json_sim = h.connect(h.sim(&json_id, &json_key).json());
    assert_eq!(native.codec, Codec::Cbor);
    assert_eq!(native.params.heartbeat_secs, 25);
    assert_eq!(native.params.max_chunk_bytes, 8192);

    // The connect record (host facts, agent version) is written on the recorder thread,
    // so it can land a moment after the daemon has its h2.
    let start = Instant::now();
    let d = loop {
        let d = get(&owner, &format!("/devices/{native_id}")).json()["device"].clone();
        if d["host"]["hostname"] == "sim-host" || start.elapsed() > Duration::from_secs(10) {
            break d;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(d["status"], "online");
    assert_eq!(d["host"]["hostname"], "sim-host");
    assert_eq!(d["agent_version"], "0.2.0-sim");

    let r = post(
        &owner,
        &format!("/devices/{native_id}/dir"),
        json!({"path": "src"}),
    );
    assert_status(&r, 200, None);
    let body = r.json();
    assert_eq!(body["t"], "ds");
    assert_eq!(
        body["e"],
        json!([["f", "main.rs", 42, 1_700_000_000_000u64]])
    );
    let r = post(&owner, &format!("/devices/{json_id}/dir"), json!({}));
    assert_status(&r, 200, None);
    assert_eq!(r.json()["e"], json!([]));
    assert_eq!(json_sim.count("dr"), 1);

    // Disconnect → offline, with last seen.
    native.close(1000);
    let d = wait_status(&owner, &native_id, "offline");
    assert!(d["last_seen_ms"].as_u64().is_some_and(|t| t > 0), "{d}");
    let r = post(&owner, &format!("/devices/{native_id}/dir"), json!({}));
    assert_status(&r, 409, Some("device_not_connected"));
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("last seen")
    );
}

#[test]
fn bad_handshakes_are_refused_while_another_device_keeps_working() {
    let mut config = test_config();
    config.max_unauthenticated = 200;
    let h = Harness::start(config);
    let (good_id, good_key) = h.device("default", "dev_good0000000001");
    let (bad_id, bad_key) = h.device("default", "dev_bad00000000001");
    let (other_id, _) = h.device("default", "dev_other000000001");
    let _good = h.connect(h.sim(&good_id, &good_key));
    let stop = keep_listing(h.addr, h.owner.clone(), good_id.clone());
    let bad = || h.sim(&bad_id, &bad_key);

    let check = |r: simdaemon::Refusal, code: ErrorCode, close: u16, reason: &str| {
        let e = r.error.unwrap_or_else(|| panic!("no e frame ({reason})"));
        assert_eq!(e.code, code, "{reason}");
        assert_eq!(
            r.close.as_ref().map(|c| c.0),
            Some(close),
            "{reason}: {:?}",
            r.close
        );
        assert_eq!(r.close.as_ref().map(|c| c.1.as_str()), Some(reason));
        e
    };
    check(
        refusal(bad().fault(Fault::WrongMac)),
        ErrorCode::Auth,
        1008,
        "invalid signature",
    );
    check(
        refusal(bad().json().fault(Fault::WrongMac)),
        ErrorCode::Auth,
        1008,
        "invalid signature",
    );
    check(
        refusal(bad().fault(Fault::SkewMs(120_000))),
        ErrorCode::Auth,
        1008,
        "timestamp skew",
    );
    check(
        refusal(bad().fault(Fault::SkewMs(-120_000))),
        ErrorCode::Auth,
        1008,
        "timestamp skew",
    );
    // A valid key claiming another device's id.
    check(
        refusal(bad().fault(Fault::ClaimDevice(other_id.clone()))),
        ErrorCode::Auth,
        1008,
        "invalid token",
    );
    // An unknown device.
    check(
        refusal(h.sim("dev_unknown00000001", &bad_key)),
        ErrorCode::Auth,
        1008,
        "invalid token",
    );
    let e = check(
        refusal(bad().fault(Fault::Version(0))),
        ErrorCode::UpdateRequired,
        1008,
        "update required",
    );
    assert_eq!(
        e.message.as_deref(),
        Some("agent_update_required:min_v1:received_v0")
    );
    let e = check(
        refusal(bad().json().fault(Fault::Version(2))),
        ErrorCode::UpdateRequired,
        1002,
        "unsupported protocol version",
    );
    assert_eq!(
        e.message.as_deref(),
        Some("protocol_not_supported:control_plane_v1:received_v2")
    );
    check(
        refusal(bad().fault(Fault::Oversize(64 * 1024))),
        ErrorCode::Limit,
        1009,
        "frame too large",
    );
    check(
        refusal(bad().json().fault(Fault::Garbage)),
        ErrorCode::Proto,
        1002,
        "invalid json",
    );
    check(
        refusal(bad().fault(Fault::Garbage)),
        ErrorCode::Proto,
        1002,
        "invalid frame",
    );
    check(
        refusal(bad().fault(Fault::UnknownFirst)),
        ErrorCode::Proto,
        1002,
        "expected handshake",
    );
    let mut silent = bad().fault(Fault::NeverSendH1);
    silent.timeout = Duration::from_secs(10);
    let started = Instant::now();
    let r = refusal(silent);
    assert_eq!(r.close.as_ref().map(|c| c.0), Some(1008), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Replay: the same h1 (nonce and timestamp) twice; the first one is accepted.
    let nonce = simdaemon::random_id(20);
    let ts = simdaemon::now_ms();
    let mut first = bad();
    first.nonce = Some(nonce.clone());
    first.ts_ms = Some(ts);
    let replayed = first.clone();
    let sim = smol::block_on(SimDaemon::connect(first))
        .expect("connect")
        .accepted();
    sim.close(1000);
    check(refusal(replayed), ErrorCode::Auth, 1008, "replay detected");

    let (ok, failed, slowest) = stop();
    assert!(ok > 5, "the good device answered only {ok} listings");
    assert_eq!(
        failed, 0,
        "listings on the good device failed during the bad handshakes"
    );
    assert!(
        slowest < Duration::from_secs(2),
        "a listing took {slowest:?}"
    );
}

#[test]
fn a_flood_of_unauthenticated_sockets_is_capped_and_does_not_stall_devices() {
    let mut config = test_config();
    config.max_unauthenticated = 200;
    config.handshake_timeout = Duration::from_secs(5);
    let h = Harness::start(config);
    let (good_id, good_key) = h.device("default", "dev_good0000000002");
    let _good = h.connect(h.sim(&good_id, &good_key));
    let stop = keep_listing(h.addr, h.owner.clone(), good_id.clone());
    let addr = h.addr;
    let refused = smol::block_on(async {
        let mut sockets = Vec::new();
        for _ in 0..300 {
            sockets.push(simdaemon::open(addr).await.expect("open"));
        }
        // The first 200 wait for their h1; the other 100 were closed at once with 1013.
        let mut refused = 0;
        for ws in sockets.iter_mut() {
            let r = simdaemon::read_refusal(ws, Duration::from_millis(50)).await;
            if r.close.as_ref().map(|c| c.0) == Some(1013) {
                refused += 1;
            }
        }
        refused
    });
    assert_eq!(
        refused, 100,
        "sockets beyond the cap must be closed with 1013"
    );
    let (ok, failed, slowest) = stop();
    assert!(ok > 5, "only {ok} listings");
    assert_eq!(failed, 0);
    assert!(
        slowest < Duration::from_secs(2),
        "a listing took {slowest:?}"
    );
}

#[test]
fn unknown_types_get_proto_and_the_connection_stays_but_garbage_closes_it() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_unknownt000001");
    let sim = h.connect(h.sim(&id, &key));
    sim.send(&Message::Unknown {
        t: "zz".into(),
        request_id: Some(7),
    });
    let start = Instant::now();
    while sim.errors().is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let errors = sim.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].code, ErrorCode::Proto);
    assert_eq!(errors[0].request_id, Some(7));
    assert!(!sim.is_closed());
    assert_status(
        &post(&owner, &format!("/devices/{id}/dir"), json!({})),
        200,
        None,
    );

    // Bytes that are not CBOR at all: e PROTO, then close 1002.
    sim.send_raw(async_tungstenite::tungstenite::Message::Binary(
        vec![0xff, 0xfe].into(),
    ));
    assert!(smol::block_on(sim.closed_within(Duration::from_secs(5))));
    assert_eq!(sim.close_frame().map(|c| c.0), Some(1002));
    wait_status(&owner, &id, "offline");
}

#[test]
fn a_second_connection_replaces_the_first_and_its_pending_request_fails_at_once() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_replace0000001");
    let first = h.connect(h.sim(&id, &key));
    first.hold(false);
    let pending = {
        let client = owner.clone();
        let path = format!("/devices/{id}/dir");
        std::thread::spawn(move || {
            let started = Instant::now();
            let r = smol::block_on(client.send(Request::new("POST", &path).json(&json!({}))));
            (r.expect("request"), started.elapsed())
        })
    };
    let start = Instant::now();
    while first.count("dr") == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "dr never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let replaced_at = Instant::now();
    let second = smol::block_on(SimDaemon::connect(h.sim(&id, &key)))
        .expect("connect")
        .accepted();
    let (resp, _) = pending.join().expect("request thread");
    let waited = replaced_at.elapsed();
    assert_status(&resp, 502, Some("device_replaced"));
    assert!(
        waited < Duration::from_secs(1),
        "the pending request took {waited:?} to fail"
    );
    assert!(smol::block_on(first.closed_within(Duration::from_secs(5))));
    assert_eq!(first.close_frame(), Some((1012, "replaced".to_owned())));
    // The new connection serves the device; it stays online.
    assert_status(
        &post(&owner, &format!("/devices/{id}/dir"), json!({})),
        200,
        None,
    );
    assert_eq!(second.count("dr"), 1);
    assert_eq!(wait_status(&owner, &id, "online")["status"], "online");
}

#[test]
fn a_silent_device_is_declared_dead_after_two_heartbeats() {
    let mut config = test_config();
    config.ping_interval = Duration::from_millis(200);
    config.dead_after = Duration::from_millis(600);
    let h = Harness::start(config);
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_silent00000001");
    let sim = h.connect(h.sim(&id, &key));
    // Answering pings keeps it alive well past dead_after.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(wait_status(&owner, &id, "online")["status"], "online");
    sim.freeze();
    let frozen_at = Instant::now();
    wait_status(&owner, &id, "offline");
    assert!(frozen_at.elapsed() < Duration::from_secs(3));
    let events = get(&owner, "/events?limit=100").json();
    let reasons: Vec<&Value> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "device.disconnected")
        .map(|e| &e["detail"]["reason"])
        .collect();
    assert_eq!(reasons, [&json!("heartbeat_timeout")]);
}

#[test]
fn every_device_route_answers_404_for_another_tenants_device() {
    let h = Harness::start(test_config());
    let (id, key) = h.device("default", "dev_tenantA0000001");
    let sim = h.connect(h.sim(&id, &key));
    let intruder = h.client(&h.token("other", Role::Owner));
    for op in DeviceOp::ALL {
        let r = post(
            &intruder,
            &format!("/devices/{id}/{}", op.path()),
            json!({}),
        );
        assert_status(&r, 404, Some("device_not_found"));
    }
    let r = get(&intruder, &format!("/devices/{id}/config/status/1"));
    assert_status(&r, 404, Some("device_not_found"));
    // A session of tenant A is invisible to tenant B.
    let owner = h.client(&h.owner);
    let r = post(
        &owner,
        &format!("/devices/{id}/session/start"),
        json!({"sessionId": "ses_tenantA"}),
    );
    assert_status(&r, 200, None);
    let r = get(&intruder, "/session/ses_tenantA/snapshot");
    assert_status(&r, 404, Some("snapshot_not_found"));
    // Nothing reached the device from the intruder.
    assert_eq!(sim.count("dr") + sim.count("md") + sim.count("gs"), 0);
}

#[test]
fn commands_are_logged_with_outcome_and_duration_and_idempotent_retries_dispatch_nothing() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_events00000001");
    let sim = h.connect(h.sim(&id, &key));
    let mkdir = |key: &str, path: &str| {
        send(
            &owner,
            Request::new("POST", &format!("/devices/{id}/mkdir"))
                .header("idempotency-key", key)
                .json(&json!({"path": path})),
        )
    };
    let first = mkdir("k-1", "build/out");
    assert_status(&first, 200, None);
    assert_eq!(first.json()["t"], "mr");
    assert_eq!(first.header("idempotent-replayed"), Some("false"));
    let retry = mkdir("k-1", "build/out");
    assert_status(&retry, 200, None);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.json(), first.json());
    assert_eq!(sim.count("md"), 1, "the retry must not reach the daemon");
    // Same key, different body: refused, nothing sent.
    assert_status(
        &mkdir("k-1", "elsewhere"),
        422,
        Some("idempotency_key_reused"),
    );
    assert_eq!(sim.count("md"), 1);

    // A path the daemon refuses: e PATH → 400 path_invalid.
    let r = post(
        &owner,
        &format!("/devices/{id}/dir"),
        json!({"path": "../etc"}),
    );
    assert_status(&r, 400, Some("path_invalid"));
    // A body the daemon would drop is refused before sending.
    let r = post(&owner, &format!("/devices/{id}/dir"), json!({"limit": 999}));
    assert_status(&r, 400, Some("invalid_request"));
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("`limit`")
    );
    let r = post(
        &owner,
        &format!("/devices/{id}/git/commit"),
        json!({"message": "x".repeat(2000)}),
    );
    assert_status(&r, 400, Some("invalid_request"));
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or("")
            .contains("`message`"),
        "{}",
        r.text()
    );
    assert_eq!(sim.count("gp"), 0);

    let events = get(&owner, "/events?limit=200").json();
    let commands: Vec<&Value> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "command")
        .collect();
    assert_eq!(commands.len(), 2, "{commands:?}");
    let md = commands[0];
    assert_eq!(md["detail"]["type"], "md");
    assert_eq!(md["detail"]["outcome"], "ok");
    assert_eq!(md["detail"]["device"], id.as_str());
    assert!(md["detail"]["duration_ms"].is_u64());
    assert!(md["actor"].as_str().unwrap_or("").starts_with("token:"));
    assert_eq!(commands[1]["detail"]["outcome"], "E_PATH");
    let metrics = get(&owner, "/metrics").text();
    assert!(
        metrics.contains("codemantle_commands_total{type=\"md\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
}

/// 0.1.50's accepted keys per message type (reference Appendix B, plus h2/e/sa).
fn compat_keys(t: &str) -> &'static [&'static str] {
    match t {
        "h2" => &["v", "t", "s", "n", "hb", "mx", "m"],
        "e" => &["v", "t", "c", "i", "m"],
        "sa" => &["v", "t", "x", "q"],
        "dr" => &["v", "t", "i", "r", "p", "l", "k"],
        "md" | "rd" | "gs" | "gi" => &["v", "t", "i", "r", "p"],
        "rn" => &["v", "t", "i", "r", "s", "d"],
        "si" => &["v", "t", "i", "s", "p", "j"],
        "st" => &["v", "t", "i", "s"],
        "sq" => &["v", "t", "i", "p"],
        "sl" => &["v", "t", "i", "x", "l"],
        "sp" => &["v", "t", "i", "x", "s", "p"],
        "cf" => &["v", "t", "i"],
        "cu" => &["v", "t", "i", "u", "a", "oc", "oh", "os", "op", "om", "rt"],
        "cc" => &[
            "v", "t", "i", "k", "ph", "sc", "tid", "tv", "ts", "ap", "pd", "alg", "sg", "pm", "cfg",
        ],
        "jk" => &["v", "t", "i", "s", "r", "x", "m"],
        "gk" => &["v", "t", "i", "r", "p", "u", "b"],
        "ga" => &["v", "t", "i", "r", "p", "f", "A"],
        "gp" => &["v", "t", "i", "r", "p", "m", "a"],
        "gh" | "gm" => &["v", "t", "i", "r", "p", "o", "b"],
        "gc" => &["v", "t", "i", "r", "p", "a", "n"],
        "gx" => &["v", "t", "i", "r", "p", "b", "c"],
        "gf" => &["v", "t", "i", "r", "p", "a", "n", "e", "g", "cm"],
        _ => &[],
    }
}

#[test]
fn a_json_daemon_never_receives_a_key_it_does_not_know() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_legacyjson0001");
    let mut cfg = h.sim(&id, &key).json().recording();
    cfg.log = Arc::from("{\"k\":\"log\",\"m\":\"hello\"}\nplain");
    let sim = h.connect(cfg);
    let dev = |op: &str| format!("/devices/{id}/{op}");
    publish_build_box(&owner);
    let calls: Vec<(&str, Value)> = vec![
        ("dir", json!({"path": ".", "cursor": "c1", "limit": 5})),
        ("mkdir", json!({"path": "a/b"})),
        (
            "rename",
            json!({"source": "a/b", "dest": "a/c", "overwrite": true}),
        ),
        ("rmdir", json!({"path": "a/c"})),
        (
            "session/start",
            json!({"sessionId": "ses_json", "path": ".", "jit": {"ttlSec": 600}}),
        ),
        ("session/status", json!({"path": "."})),
        (
            "prompt",
            json!({"sessionId": "ses_json", "prompt": "hello"}),
        ),
        ("setup/status", json!({})),
        ("setup/save", json!({"opencodeModelId": "gpt-x"})),
        ("jit/kill", json!({"sessionId": "ses_json"})),
        ("git/status", json!({})),
        (
            "git/clone",
            json!({"url": "https://example.invalid/r.git", "branch": "main"}),
        ),
        ("git/add", json!({"all": true})),
        ("git/commit", json!({"message": "m", "amend": 1})),
        ("git/push", json!({})),
        ("git/branch", json!({"action": "create", "branch": "b1"})),
        ("git/checkout", json!({"branch": "b1", "create": true})),
        (
            "git/config",
            json!({"action": "set", "name": "n", "email": "e@x"}),
        ),
        (
            "config/push",
            json!({"templateId": "build-box", "templateVersion": "1.0.0"}),
        ),
        ("session/terminate", json!({"sessionId": "ses_json"})),
    ];
    for (op, body) in calls {
        let r = post(&owner, &dev(op), body);
        assert!(
            r.status == 200 || r.status == 202,
            "{op}: {} {}",
            r.status,
            r.text()
        );
    }
    let snap = get(&owner, "/session/ses_json/snapshot?tail=10");
    assert_status(&snap, 200, None);
    // Native-only options are refused, not silently dropped.
    let r = post(
        &owner,
        &dev("rmdir"),
        json!({"path": "a", "recursive": true}),
    );
    assert_status(&r, 400, Some("unsupported_by_device"));
    let r = post(
        &owner,
        &dev("rename"),
        json!({"source": "a", "dest": "b", "overwrite": false}),
    );
    assert_status(&r, 400, Some("unsupported_by_device"));
    // Without `overwrite`, a rename replaces nothing: a 0.1.x daemon (which always replaces)
    // needs the caller to ask.
    let r = post(&owner, &dev("rename"), json!({"source": "a", "dest": "b"}));
    assert_status(&r, 400, Some("overwrite_required"));

    let frames = sim.frames();
    let mut seen = std::collections::BTreeSet::new();
    for raw in &frames {
        let text = std::str::from_utf8(raw).expect("text frame");
        let v: Value = serde_json::from_str(text).expect("json");
        let t = v["t"].as_str().expect("t").to_owned();
        let allowed = compat_keys(&t);
        assert!(!allowed.is_empty(), "unexpected message type {t}: {text}");
        for k in v.as_object().expect("object").keys() {
            assert!(
                allowed.contains(&k.as_str()),
                "key {k:?} sent to a 0.1.x daemon in {text}"
            );
        }
        seen.insert(t);
    }
    for t in [
        "dr", "md", "rn", "rd", "si", "sq", "sp", "cf", "cu", "jk", "gs", "gk", "gp", "gc", "cc",
        "st", "sl", "sa",
    ] {
        assert!(seen.contains(t), "{t} was never sent; seen {seen:?}");
    }
}

#[test]
fn sessions_snapshots_setup_and_config_push_round_trip() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_sessions000001");
    let mut cfg = h.sim(&id, &key);
    let long_line = "y".repeat(5000);
    cfg.log = Arc::from(format!(
        "{{\"ts\":\"2026-01-01T00:00:00Z\",\"k\":\"meta\",\"src\":\"opencode\",\"m\":\"started\"}}\n{long_line}\n{long_line}\nlast"
    ));
    let sim = h.connect(cfg);
    let dev = |op: &str| format!("/devices/{id}/{op}");

    let r = post(&owner, &dev("session/start"), json!({"path": "proj"}));
    assert_status(&r, 200, None);
    let sr = r.json();
    assert_eq!((sr["t"].clone(), sr["o"].clone()), (json!("sr"), json!(1)));
    let sid = sr["s"].as_str().expect("session id").to_owned();
    assert!(sid.starts_with("ses_"));
    // Starting again reuses the running session.
    let again = post(&owner, &dev("session/start"), json!({"path": "proj"})).json();
    assert_eq!(again["m"], "session_reused");
    assert_eq!(again["s"], sid.as_str());
    assert_eq!(sim.count("si"), 1);

    // The snapshot spans several sc chunks (2 × 5000 bytes > 8192), each acknowledged.
    let snap = get(&owner, &format!("/session/{sid}/snapshot?tail=10"));
    assert_status(&snap, 200, None);
    let s = snap.json();
    assert_eq!(s["d"], id.as_str());
    let entries = s["e"].as_array().expect("entries");
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[0]["k"], "meta");
    assert_eq!(entries[1]["k"], "legacy");
    assert_eq!(entries[3]["m"], "last");
    assert!(sim.count("sa") >= 2, "every chunk is acknowledged");

    let r = post(
        &owner,
        &dev("prompt"),
        json!({"sessionId": sid, "prompt": "  build it  "}),
    );
    assert_status(&r, 202, None);
    assert_eq!(r.json()["o"], 1);
    let r = post(
        &owner,
        &dev("prompt"),
        json!({"sessionId": sid, "prompt": "   "}),
    );
    assert_status(&r, 400, Some("invalid_prompt"));

    let r = post(&owner, &dev("session/terminate"), json!({}));
    assert_status(&r, 200, None);
    assert_eq!(r.json()["s"], sid.as_str());
    assert_eq!(r.json()["o"], 1);

    let r = post(&owner, &dev("setup/status"), json!({}));
    assert_eq!(r.json()["t"], "cg");
    let r = post(
        &owner,
        &dev("setup/save"),
        json!({"agentAuthToken": "secret"}),
    );
    assert_status(&r, 400, Some("agent_auth_token_must_be_set_locally"));
    let r = post(&owner, &dev("setup/save"), json!({"opencodeModelId": "m1"}));
    assert_status(&r, 200, None);
    assert_eq!(r.json()["m"], "saved_restart_required");

    // Config push: compiled from the published template, signed with the device key; the
    // status is kept under the reply's request id.
    let r = post(
        &owner,
        &dev("config/push"),
        json!({"templateId": "build-box", "templateVersion": "1.0.0"}),
    );
    assert_status(&r, 404, Some("template_not_found"));
    publish_build_box(&owner);
    let r = post(
        &owner,
        &dev("config/push"),
        json!({"templateId": "build-box"}),
    );
    assert_status(&r, 200, None);
    let cv = r.json();
    assert_eq!(cv["st"], "applied");
    assert_eq!(
        cv["pd"], BUILD_BOX_DIGEST,
        "latest version, Appendix A digest"
    );
    assert_eq!(cv["alg"], "hmac-sha256-devkey-v1");
    let rid = cv["i"].as_u64().expect("request id");
    let status = get(&owner, &dev(&format!("config/status/{rid}"))).json();
    assert_eq!(status["status"], "applied", "{status}");
    assert_eq!(status["templateId"], "build-box");
    assert_eq!(status["templateVersion"], "1.0.0");
    assert_status(
        &get(&owner, &dev("config/status/0")),
        400,
        Some("invalid_request_id"),
    );
    assert_status(
        &get(
            &owner,
            &dev(&format!("config/status/{}", rid.wrapping_add(1))),
        ),
        404,
        Some("config_status_not_found"),
    );
    // What a caller may no longer choose: the payload, the signature, another policy mode.
    for body in [
        json!({"templateId": "build-box", "config": {"model": "m"}}),
        json!({"templateId": "build-box", "signature": "x", "signatureAlgorithm": "y"}),
        json!({"templateId": "build-box", "policyMode": "restricted"}),
    ] {
        assert_status(
            &post(&owner, &dev("config/push"), body),
            400,
            Some("invalid_request"),
        );
    }
    assert_status(
        &post(&owner, &dev("config/push"), json!({})),
        400,
        Some("invalid_template_id"),
    );

    // A viewer cannot dispatch; an operator cannot push config.
    let viewer = h.client(&h.token("default", Role::Viewer));
    assert_status(
        &post(&viewer, &dev("dir"), json!({})),
        403,
        Some("forbidden"),
    );
    let operator = h.client(&h.token("default", Role::Operator));
    assert_status(
        &post(
            &operator,
            &dev("config/push"),
            json!({"templateId": "build-box"}),
        ),
        403,
        Some("forbidden"),
    );
}

#[test]
fn templates_are_validated_and_immutable_and_mcp_credentials_are_for_admins() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let r = post(
        &owner,
        "/config/templates",
        json!({"template": build_box()}),
    );
    assert_status(&r, 200, None);
    assert_eq!(r.json()["key"], "build-box@1.0.0");
    // The same template written differently (rules in another order) is the same version.
    let mut reordered = build_box();
    reordered["routing"]["intents"][0]["rules"] = json!(["a rule", "b rule"]);
    let r = post(&owner, "/config/templates", json!({"template": reordered}));
    assert_status(&r, 200, None);
    assert_eq!(r.json()["unchanged"], true);
    let mut changed = build_box();
    changed["routing"]["defaultModel"] = json!("openai/gpt-5");
    let r = post(&owner, "/config/templates", json!({"template": changed}));
    assert_status(&r, 409, Some("template_version_exists"));
    let mut not_semver = build_box();
    not_semver["templateVersion"] = json!("v1");
    let r = post(&owner, "/config/templates", json!({"template": not_semver}));
    assert_status(&r, 400, Some("invalid_template_version"));
    // Every problem at once, with its path.
    let mut broken = build_box();
    broken["routing"]["intents"][0]["id"] = json!("Bad Id");
    broken["policy"] = json!({"mode": "read-only"});
    broken["extra"] = json!(1);
    let r = post(&owner, "/config/templates", json!({"template": broken}));
    assert_eq!(r.status, 400, "{}", r.text());
    let body = r.json();
    let paths: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    for p in ["routing.intents[0].id", "tools.enabled.bash", "extra"] {
        assert!(paths.contains(&p), "{p} not in {body}");
    }
    assert!(
        body["error"].as_str().unwrap_or("").contains(','),
        "codes joined: {body}"
    );
    let list = get(&owner, "/config/templates").json();
    assert_eq!(
        list["templates"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    assert_eq!(
        list["templates"][0]["routing"]["intents"][0]["rules"],
        json!(["a rule", "b rule"]),
        "stored normalised"
    );
    let schema = get(
        &h.client(&h.token("default", Role::Viewer)),
        "/config/template/schema",
    );
    assert_status(&schema, 200, None);
    assert!(schema.json()["schema"].is_object());

    let entry = json!({"serverId": "docs", "version": "1", "type": "remote", "url": "https://mcp.example/docs", "headers": {"Authorization": "Bearer x"}});
    assert_status(
        &post(&owner, "/config/mcp", json!({"entry": entry})),
        200,
        None,
    );
    let r = post(&owner, "/config/mcp", json!({"entry": entry}));
    assert_status(&r, 200, None);
    assert_eq!(r.json()["unchanged"], true);
    let mut other = entry.clone();
    other["url"] = json!("https://elsewhere.example/docs");
    assert_status(
        &post(&owner, "/config/mcp", json!({"entry": other})),
        409,
        Some("mcp_version_exists"),
    );
    let r = post(
        &owner,
        "/config/mcp",
        json!({"entry": {"serverId": "X", "version": "", "type": "remote", "url": "ftp://x"}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["errors"].as_array().is_some_and(|e| e.len() >= 3),
        "{}",
        r.text()
    );
    let viewer = h.client(&h.token("default", Role::Viewer));
    assert_status(
        &post(&viewer, "/config/mcp", json!({"entry": entry})),
        403,
        Some("forbidden"),
    );
    let seen_by_viewer = get(&viewer, "/config/mcp").json();
    assert_eq!(
        seen_by_viewer["entries"][0]["url"],
        "https://mcp.example/docs"
    );
    assert_eq!(
        seen_by_viewer["entries"][0]["headers"]["Authorization"],
        "<redacted>"
    );
    let seen_by_owner = get(&owner, "/config/mcp").json();
    assert_eq!(
        seen_by_owner["entries"][0]["headers"]["Authorization"],
        "Bearer x"
    );

    // Compile: what a push would send (admins only: it carries the headers).
    let r = post(&owner, "/config/templates/build-box/compile", json!({}));
    assert_status(&r, 200, None);
    assert_eq!(
        r.json()["config"]["mcp"]["docs"]["headers"]["Authorization"],
        "Bearer x"
    );
    assert_status(
        &post(&viewer, "/config/templates/build-box/compile", json!({})),
        403,
        Some("forbidden"),
    );
    assert_status(
        &post(&owner, "/config/templates/nope-nope/compile", json!({})),
        404,
        Some("template_not_found"),
    );
}

#[test]
fn fleet_push_reaches_matching_online_devices_and_records_the_offline_ones() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    publish_build_box(&owner);
    let (prod_a, key_a) = h.labelled_device("default", "dev_fleetprod00001", &[("env", "prod")]);
    let (prod_off, _) = h.labelled_device("default", "dev_fleetprod00002", &[("env", "prod")]);
    let (dev_b, key_b) = h.labelled_device("default", "dev_fleetdevl00001", &[("env", "dev")]);
    let sim_a = h.connect(h.sim(&prod_a, &key_a).recording());
    let sim_b = h.connect(h.sim(&dev_b, &key_b).recording());

    let r = post(
        &owner,
        "/config/push",
        json!({"templateId": "build-box", "selector": "env=prod"}),
    );
    assert_status(&r, 202, None);
    let body = r.json();
    assert_eq!(body["matched"], 2, "{body}");
    assert_eq!(body["digest"], BUILD_BOX_DIGEST);
    let devices = body["devices"].as_array().expect("devices");
    let entry = |id: &str| {
        devices
            .iter()
            .find(|d| d["deviceId"] == id)
            .unwrap_or_else(|| panic!("{id} not in {body}"))
            .clone()
    };
    let online = entry(&prod_a);
    assert_eq!(online["status"], "pending");
    let offline = entry(&prod_off);
    assert_eq!(
        (offline["status"].clone(), offline["message"].clone()),
        (json!("failed"), json!("device_offline"))
    );
    assert!(devices.iter().all(|d| d["deviceId"] != dev_b.as_str()));

    // The online device's outcome arrives in its status record.
    let rid = online["requestId"].as_u64().expect("request id");
    let path = format!("/devices/{prod_a}/config/status/{rid}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = get(&owner, &path).json();
        if st["status"] == "applied" {
            assert_eq!(st["digest"], BUILD_BOX_DIGEST);
            break;
        }
        assert!(Instant::now() < deadline, "never applied: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rid = offline["requestId"].as_u64().expect("request id");
    let st = get(&owner, &format!("/devices/{prod_off}/config/status/{rid}")).json();
    assert_eq!(
        (st["status"].clone(), st["message"].clone()),
        (json!("failed"), json!("device_offline"))
    );
    assert_eq!(sim_a.count("cc"), 1);
    assert_eq!(sim_b.count("cc"), 0, "env=dev is not selected");

    // Bad selectors and unknown templates are refused before anything is sent.
    assert_status(
        &post(
            &owner,
            "/config/push",
            json!({"templateId": "build-box", "selector": "env=prod,"}),
        ),
        400,
        Some("invalid_selector"),
    );
    assert_status(
        &post(&owner, "/config/push", json!({"templateId": "build-box"})),
        400,
        None,
    );
    assert_status(
        &post(
            &owner,
            "/config/push",
            json!({"templateId": "nope-nope", "selector": "env=prod"}),
        ),
        404,
        Some("template_not_found"),
    );
    let operator = h.client(&h.token("default", Role::Operator));
    assert_status(
        &post(
            &operator,
            "/config/push",
            json!({"templateId": "build-box", "selector": "env=prod"}),
        ),
        403,
        Some("forbidden"),
    );
    assert_eq!(sim_a.count("cc"), 1);
}

#[test]
fn openapi_describes_every_device_route() {
    let h = Harness::start(test_config());
    let doc = get(&h.client(&h.owner), "/openapi.json").json();
    for op in DeviceOp::ALL {
        let path = format!("/devices/{{id}}/{}", op.path());
        assert!(doc["paths"][&path]["post"].is_object(), "{path} missing");
    }
    for path in [
        "/devices/{id}/config/status/{requestId}",
        "/session/{sessionId}/snapshot",
        "/config/templates",
        "/config/mcp",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing");
    }
}

#[test]
fn telemetry_and_ports_show_on_the_device() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_telemetry00001");
    let sim = h.connect(h.sim(&id, &key));
    sim.send(&Message::PortList(codemantle_protocol::message::PortList {
        ports: vec![3000, 5173],
    }));
    let start = Instant::now();
    loop {
        let d = get(&owner, &format!("/devices/{id}")).json()["device"].clone();
        if d["telemetry"]["ports"] == json!([3000, 5173]) {
            assert_eq!(d["telemetry"]["rss_bytes"], 8 * 1024 * 1024);
            assert_eq!(d["telemetry"]["protocol"], "native");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{d}");
        std::thread::sleep(Duration::from_millis(10));
    }
    sim.close(1000);
    let d = wait_status(&owner, &id, "offline");
    assert_eq!(d["telemetry"], Value::Null);
}

#[test]
fn legacy_shared_tokens_work_only_when_enabled_and_only_for_their_devices() {
    let mut config = test_config();
    config.allow_legacy_tokens = true;
    let h = Harness::start(config);
    let (id, _) = h.device("default", "dev_legacy00000001");
    let (other, _) = h.device("default", "dev_legacy00000002");
    let (foreign, _) = h.device("other", "dev_legacyforeign1");
    let add = |token: &str, devices: Option<Vec<String>>| {
        let t = codemantle_control_plane::store::LegacyToken {
            key_id: codemantle_control_plane::secrets::key_id(token),
            tenant: TenantId::default_tenant(),
            token: token.to_owned(),
            devices,
            created_ms: 1,
            revoked: false,
        };
        h.store.add_legacy_token(&t, "test").expect("legacy token");
    };
    add("shared-token-unbound-0001", None);
    add("shared-token-bound-000002", Some(vec![id.clone()]));
    // Unbound: any registered device of its tenant, as 0.1.x (but not another tenant's).
    let sim = h.connect(h.sim(&other, "shared-token-unbound-0001").json());
    assert_status(
        &post(
            &h.client(&h.owner),
            &format!("/devices/{other}/dir"),
            json!({}),
        ),
        200,
        None,
    );
    drop(sim);
    let r = refusal(h.sim(&foreign, "shared-token-unbound-0001"));
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::Auth));
    let r = refusal(h.sim("dev_legacynotthere1", "shared-token-unbound-0001"));
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::Auth));
    // Bound: only the listed ids.
    let _ok = h.connect(h.sim(&id, "shared-token-bound-000002"));
    let r = refusal(h.sim(&other, "shared-token-bound-000002"));
    assert_eq!(r.error.map(|e| e.code), Some(ErrorCode::Auth));
    assert_eq!(r.close.map(|c| c.0), Some(1008));

    // Disabled: the same token is unknown.
    let h2 = Harness::start(test_config());
    let (id2, _) = h2.device("default", "dev_legacy00000003");
    let t = codemantle_control_plane::store::LegacyToken {
        key_id: codemantle_control_plane::secrets::key_id("shared-token-unbound-0003"),
        tenant: TenantId::default_tenant(),
        token: "shared-token-unbound-0003".into(),
        devices: None,
        created_ms: 1,
        revoked: false,
    };
    h2.store.add_legacy_token(&t, "test").expect("legacy token");
    let r = refusal(h2.sim(&id2, "shared-token-unbound-0003"));
    assert_eq!(
        r.close.map(|c| (c.0, c.1)),
        Some((1008, "invalid token".to_owned()))
    );
}

#[test]
fn a_retry_after_a_timeout_carries_the_same_idempotency_key_to_the_daemon() {
    let mut config = test_config();
    config.dispatch.request_timeout = Duration::from_millis(500);
    let h = Harness::start(config);
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_ikretry0000001");
    let sim = h.connect(h.sim(&id, &key).recording());
    let mkdir = || {
        send(
            &owner,
            Request::new("POST", &format!("/devices/{id}/mkdir"))
                .header("idempotency-key", "retry-me")
                .json(&json!({"path": "out"})),
        )
    };
    sim.hold(false);
    assert_status(&mkdir(), 504, Some("request_timeout"));
    sim.hold(true);
    assert_status(&mkdir(), 200, None);
    let iks: Vec<String> = sim
        .frames()
        .iter()
        .filter_map(|f| match Message::decode(f, Codec::Cbor) {
            Ok(Message::MakeDir(m)) => m.idempotency_key,
            _ => None,
        })
        .collect();
    let expected = codemantle_control_plane::tunnel::hub::idempotency_token(
        &TenantId::default_tenant(),
        Some("retry-me"),
    );
    assert_eq!(iks, [expected.clone(), expected]);
    // Without a key, each request gets its own.
    post(
        &owner,
        &format!("/devices/{id}/mkdir"),
        json!({"path": "a"}),
    );
    post(
        &owner,
        &format!("/devices/{id}/mkdir"),
        json!({"path": "a"}),
    );
    let all: Vec<String> = sim
        .frames()
        .iter()
        .filter_map(|f| match Message::decode(f, Codec::Cbor) {
            Ok(Message::MakeDir(m)) => m.idempotency_key,
            _ => None,
        })
        .collect();
    assert_eq!(all.len(), 4);
    assert_ne!(all[2], all[3]);
    let events = get(&owner, "/events?limit=100").json();
    let outcomes: Vec<&Value> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["kind"] == "command")
        .map(|e| &e["detail"]["outcome"])
        .collect();
    assert_eq!(outcomes[0], "timeout");
}

#[test]
fn an_oversize_frame_after_the_handshake_gets_limit_and_1009() {
    let h = Harness::start(test_config());
    let owner = h.client(&h.owner);
    let (id, key) = h.device("default", "dev_oversize000001");
    let sim = h.connect(h.sim(&id, &key));
    let huge = vec![0u8; codemantle_protocol::limits::MAX_CBOR_FRAME_BYTES + 1];
    sim.send_raw(async_tungstenite::tungstenite::Message::Binary(huge.into()));
    assert!(smol::block_on(sim.closed_within(Duration::from_secs(10))));
    assert_eq!(sim.close_frame().map(|c| c.0), Some(1009));
    assert_eq!(
        sim.errors().first().map(|e| e.code.clone()),
        Some(ErrorCode::Limit)
    );
    wait_status(&owner, &id, "offline");
}
