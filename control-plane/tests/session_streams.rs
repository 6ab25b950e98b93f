//! Prompt output streams end to end: an in-process control plane on 127.0.0.1 (sled in a temp
//! dir), a simulated daemon sending `sc` chunks (with re-sends and gaps), SSE readers on
//! `GET /sessions/:sid/stream`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use codemantle_control_plane::admin;
use codemantle_control_plane::api::{App, Server};
use codemantle_control_plane::client::{Client, Request, Response, SseEvent, SseReader};
use codemantle_control_plane::registry::{self, NewDevice};
use codemantle_control_plane::store::sled::SledStore;
use codemantle_control_plane::store::{Role, Store, TenantId};
use codemantle_control_plane::tunnel::TunnelConfig;
use codemantle_protocol::message::{Message, StreamChunk};
use codemantle_tests::simdaemon::{SimConfig, SimDaemon};
use futures_lite::FutureExt as _;
use serde_json::{Value, json};

struct Harness {
    addr: SocketAddr,
    store: Arc<dyn Store>,
    owner: String,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn start() -> Harness {
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
        Harness {
            addr,
            store,
            owner,
            _dir: dir,
        }
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

    fn device(&self, id: &str) -> (String, String) {
        let t = TenantId::parse("default").expect("tenant");
        let (d, _) = registry::create_device(
            self.store.as_ref(),
            &t,
            NewDevice {
                name: id.to_owned(),
                labels: Default::default(),
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

    fn connect(&self, id: &str, secret: &str) -> SimDaemon {
        let sim = smol::block_on(SimDaemon::connect(
            SimConfig::new(self.addr, id, secret).recording(),
        ))
        .expect("connect")
        .accepted();
        let owner = self.client(&self.owner);
        let start = Instant::now();
        while get(&owner, &format!("/devices/{id}")).json()["device"]["status"] != "online" {
            assert!(start.elapsed() < Duration::from_secs(10), "never online");
            std::thread::sleep(Duration::from_millis(20));
        }
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

fn chunk(x: &str, q: u32, last: bool) -> Message {
    Message::StreamChunk(StreamChunk {
        stream_id: x.to_owned(),
        seq: q,
        last,
        data: text(q),
    })
}

fn text(q: u32) -> String {
    format!("{{\"type\":\"message.part.updated\",\"n\":{q}}}\n")
}

fn open_sse(client: &Client, path: &str, last_id: Option<u32>) -> SseReader {
    let mut req = Request::new("GET", path);
    if let Some(id) = last_id {
        req = req.header("last-event-id", &id.to_string());
    }
    let resp = smol::block_on(client.open(req)).expect("open");
    assert_eq!(resp.status, 200);
    resp.into_sse()
}

fn next_event(sse: &mut SseReader) -> Option<SseEvent> {
    smol::block_on(async { sse.next_event().await.expect("sse") }.or(async {
        smol::Timer::after(Duration::from_secs(10)).await;
        panic!("no SSE event within 10 s");
    }))
}

/// Reads until `end` (or the response ends); returns the chunk seqs, checking each chunk's text.
fn read_until_end(sse: &mut SseReader) -> (Vec<u32>, bool) {
    let mut seqs = Vec::new();
    while let Some(ev) = next_event(sse) {
        match ev.event.as_deref() {
            Some("chunk") => {
                let v: Value = serde_json::from_str(&ev.data).expect("json");
                let q = u32::try_from(v["q"].as_u64().expect("q")).expect("u32");
                assert_eq!(ev.id.as_deref(), Some(q.to_string().as_str()));
                assert_eq!(v["d"], text(q));
                seqs.push(q);
            }
            Some("end") => return (seqs, true),
            other => panic!("unexpected event {other:?}: {}", ev.data),
        }
    }
    (seqs, false)
}

/// Largest `q` the daemon received in an `sa` for stream `x`.
fn acked(sim: &SimDaemon, x: &str) -> Option<u32> {
    sim.frames()
        .iter()
        .filter_map(|f| Message::decode(f, sim.codec).ok())
        .filter_map(|m| match m {
            Message::StreamAck(a) if a.stream_id == x => Some(a.seq),
            _ => None,
        })
        .max()
}

fn wait_acked(sim: &SimDaemon, x: &str, q: u32) {
    let start = Instant::now();
    while acked(sim, x) != Some(q) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ack {q} never came (last {:?})",
            acked(sim, x)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn prompt_output_reaches_readers_exactly_once_across_resends_and_late_joins() {
    let h = Harness::start();
    let owner = h.client(&h.owner);
    let (id, key) = h.device("dev_streams0000001");
    let sim = h.connect(&id, &key);
    let r = post(
        &owner,
        &format!("/devices/{id}/session/start"),
        json!({"sessionId": "ses_stream1"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        &owner,
        &format!("/devices/{id}/prompt"),
        json!({"sessionId": "ses_stream1", "prompt": "hello"}),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let x = r.json()["x"].as_str().expect("x").to_owned();
    let path = format!("/sessions/ses_stream1/stream?x={x}");

    // A reader connected before any output.
    let mut early = open_sse(&owner, &path, None);
    for q in 0..10 {
        sim.send(&chunk(&x, q, false));
    }
    wait_acked(&sim, &x, 9);
    // A gap (12 before 10, 11): held back, not acknowledged past 9.
    sim.send(&chunk(&x, 12, false));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(acked(&sim, &x), Some(9));

    // The link drops; the daemon reconnects and re-sends everything unacknowledged — here,
    // pessimistically, from 5 — then carries on.
    drop(sim);
    let sim = h.connect(&id, &key);
    for q in 5..20 {
        sim.send(&chunk(&x, q, false));
    }
    wait_acked(&sim, &x, 19);
    // Duplicates are acknowledged again (cumulatively).
    sim.send(&chunk(&x, 3, false));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(acked(&sim, &x), Some(19));

    // A late reader resuming after 14.
    let mut late = open_sse(&owner, &path, Some(14));
    sim.send(&chunk(&x, 20, true));
    wait_acked(&sim, &x, 20);

    let (seqs, ended) = read_until_end(&mut early);
    assert!(ended);
    assert_eq!(seqs, (0..=20).collect::<Vec<_>>());
    let (seqs, ended) = read_until_end(&mut late);
    assert!(ended);
    assert_eq!(seqs, (15..=20).collect::<Vec<_>>());

    // `after=` works the same; after the last chunk only `end` is left. Without `x`, the
    // session's latest prompt is followed.
    let mut sse = open_sse(&owner, "/sessions/ses_stream1/stream?after=18", None);
    assert_eq!(read_until_end(&mut sse), (vec![19, 20], true));
    let mut sse = open_sse(&owner, &path, Some(20));
    assert_eq!(read_until_end(&mut sse), (vec![], true));

    // Another tenant sees nothing; neither does an unknown session.
    let intruder = h.client(&h.token("other", Role::Owner));
    let r = get(&intruder, &path);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], "stream_not_found");
    let r = get(&owner, &format!("/sessions/ses_nope/stream?x={x}"));
    assert_eq!(r.status, 404);
    let r = send(
        &owner,
        Request::new("GET", &path).header("last-event-id", "nope"),
    );
    assert_eq!(r.status, 400);
}
