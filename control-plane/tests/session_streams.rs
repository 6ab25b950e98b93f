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

// ---- durable chunks: the store under `Streams` -------------------------------------------

mod durable {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use codemantle_control_plane::store::sled::SledStore;
    use codemantle_control_plane::store::{Store, StoredChunk, TenantId};
    use codemantle_control_plane::streams::{Item, Read, Streams, StreamsConfig};
    use codemantle_protocol::message::StreamChunk;

    /// Opens the store, waiting while a previous instance (its pruning thread) lets go of it.
    fn open(dir: &Path) -> Arc<dyn Store> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match SledStore::open(&dir.join("data")) {
                Ok(s) => return Arc::new(s),
                Err(e) if Instant::now() > deadline => panic!("open store: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn sc(x: &str, q: u32, last: bool) -> StreamChunk {
        StreamChunk {
            stream_id: x.into(),
            seq: q,
            last,
            data: format!("chunk {q};"),
        }
    }

    fn seqs(r: &Read) -> Vec<u32> {
        r.items
            .iter()
            .filter_map(|i| match i {
                Item::Chunk(c) => Some(c.seq),
                Item::Truncated { .. } => None,
            })
            .collect()
    }

    #[test]
    fn acknowledged_chunks_survive_a_restart_and_resends_stay_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TenantId::parse("t").expect("tenant");
        let x = "xdurable01";
        {
            let store = open(dir.path());
            let s = Streams::with_store(StreamsConfig::default(), store.clone());
            s.register(&t, "dev", x, "ses1");
            for q in 0..5 {
                let ack = s.on_chunk(&t, "dev", sc(x, q, false)).expect("ack");
                assert_eq!(ack.seq, q);
            }
            // What was acked is in the store (flushed before the ack).
            let meta = store
                .stream_meta(&t, "dev", x)
                .expect("meta")
                .expect("some");
            assert_eq!((meta.next_seq, meta.ended), (5, false));
            assert_eq!(meta.session_id.as_deref(), Some("ses1"));
        } // "restart": memory gone, store reopened.
        let store = open(dir.path());
        let s = Streams::with_store(StreamsConfig::default(), store.clone());
        // The daemon re-sends 3 and 4 (it had not seen their acks): duplicates, acked again.
        assert_eq!(
            s.on_chunk(&t, "dev", sc(x, 3, false)).map(|a| a.seq),
            Some(4)
        );
        assert_eq!(
            s.on_chunk(&t, "dev", sc(x, 4, false)).map(|a| a.seq),
            Some(4)
        );
        assert_eq!(
            s.on_chunk(&t, "dev", sc(x, 5, true)).map(|a| a.seq),
            Some(5)
        );
        let r = s.read("dev", x, None, 100);
        assert!(!r.items.iter().any(|i| matches!(i, Item::Truncated { .. })));
        let mut got = seqs(&r);
        let mut after = got.last().copied();
        let mut ended = r.ended;
        while !ended {
            let r = s.read("dev", x, after, 100);
            got.extend(seqs(&r));
            after = got.last().copied();
            ended = r.ended;
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4, 5]);
        // A reader that attaches after the restart (watch loads the stream from the store).
        let fresh = Streams::with_store(StreamsConfig::default(), store.clone());
        assert!(fresh.watch(&t, "dev", x, "ses1").is_some());
        assert!(fresh.watch(&t, "dev", x, "other").is_none());
        assert_eq!(seqs(&fresh.read("dev", x, Some(2), 2)), vec![3, 4]);
        // Another tenant sees nothing of it.
        let other = TenantId::parse("u").expect("tenant");
        assert!(store.stream_meta(&other, "dev", x).expect("meta").is_none());
    }

    /// Collects the acks the commit thread hands to a connection.
    #[derive(Default)]
    struct Acks(std::sync::Mutex<Vec<u32>>);

    impl codemantle_control_plane::streams::AckSink for Acks {
        fn send_ack(&self, ack: codemantle_protocol::message::StreamAck) {
            self.0.lock().unwrap().push(ack.seq);
        }
    }

    #[test]
    fn the_commit_thread_acks_cumulatively_after_the_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TenantId::parse("t").expect("tenant");
        let x = "xcommit01";
        let n = 200u32;
        {
            let store = open(dir.path());
            let s = Streams::with_store(StreamsConfig::default(), store.clone());
            s.register(&t, "dev", x, "ses1");
            let sink = Arc::new(Acks::default());
            let dyn_sink: Arc<dyn codemantle_control_plane::streams::AckSink> = sink.clone();
            for q in 0..n {
                // New chunks are acknowledged by the commit thread, never inline.
                let inline = s.on_chunk_to(&t, "dev", sc(x, q, false), Arc::downgrade(&dyn_sink));
                assert!(inline.is_none(), "chunk {q} acked before its flush");
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while sink.0.lock().unwrap().last() != Some(&(n - 1)) {
                assert!(Instant::now() < deadline, "no ack for the last chunk");
                std::thread::sleep(Duration::from_millis(5));
            }
            let acks = sink.0.lock().unwrap().clone();
            assert!(
                acks.windows(2).all(|w| w[0] < w[1]),
                "acks only grow: {acks:?}"
            );
            assert!(acks.len() <= n as usize);
            // A re-sent duplicate is answered at once with what is durable.
            let again = s.on_chunk_to(&t, "dev", sc(x, 5, false), Arc::downgrade(&dyn_sink));
            assert_eq!(again.map(|a| a.seq), Some(n - 1));
            // A gone connection: nothing to deliver to, and nothing breaks.
            drop(dyn_sink);
            drop(sink);
            let gone: Arc<dyn codemantle_control_plane::streams::AckSink> =
                Arc::new(Acks::default());
            let weak = Arc::downgrade(&gone);
            drop(gone);
            assert!(s.on_chunk_to(&t, "dev", sc(x, n, true), weak).is_none());
        } // "restart": what was acknowledged is in the store.
        let store = open(dir.path());
        let meta = store
            .stream_meta(&t, "dev", x)
            .expect("meta")
            .expect("some");
        assert!(
            meta.next_seq >= n,
            "acked chunks survive: {}",
            meta.next_seq
        );
    }

    #[test]
    fn a_small_ring_reads_older_chunks_from_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TenantId::parse("t").expect("tenant");
        let s = Streams::with_store(
            StreamsConfig {
                max_bytes_per_stream: 20,
                ..StreamsConfig::default()
            },
            open(dir.path()),
        );
        for q in 0..10 {
            s.on_chunk(&t, "dev", sc("xring0001", q, q == 9));
        }
        let r = s.read("dev", "xring0001", None, 100);
        assert_eq!(seqs(&r), (0..10).collect::<Vec<_>>());
        assert!(r.ended);
    }

    #[test]
    fn the_store_cap_evicts_oldest_first_as_a_truncated_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TenantId::parse("t").expect("tenant");
        let store = open(dir.path());
        let s = Streams::with_store(
            StreamsConfig {
                max_bytes_per_stream: 16,
                max_stored_bytes_per_stream: 30, // three 9-byte chunks
                ..StreamsConfig::default()
            },
            store.clone(),
        );
        for q in 0..6 {
            s.on_chunk(&t, "dev", sc("xcap00001", q, false));
        }
        let meta = store
            .stream_meta(&t, "dev", "xcap00001")
            .expect("meta")
            .expect("some");
        assert_eq!((meta.first_kept, meta.next_seq), (3, 6));
        assert_eq!(meta.truncated(), Some((0, 2)));
        let r = s.read("dev", "xcap00001", None, 100);
        assert_eq!(r.items[0], Item::Truncated { from: 0, to: 2 });
        assert_eq!(seqs(&r), vec![3, 4, 5]);
        // Same after a restart.
        let fresh = Streams::with_store(StreamsConfig::default(), store.clone());
        assert!(fresh.watch(&t, "dev", "xcap00001", "s").is_some());
        let r = fresh.read("dev", "xcap00001", None, 100);
        assert_eq!(r.items[0], Item::Truncated { from: 0, to: 2 });
        assert_eq!(seqs(&r), vec![3, 4, 5]);
    }

    #[test]
    fn store_appends_are_in_order_and_ended_streams_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TenantId::parse("t").expect("tenant");
        let store = open(dir.path());
        let c = |q: u32, last: bool| StoredChunk {
            seq: q,
            data: format!("{q}"),
            last,
        };
        store
            .append_stream_chunk(&t, "dev", "xa", &c(0, false), 1 << 20, 1_000)
            .expect("append");
        // A gap is refused; a duplicate is a no-op.
        assert!(
            store
                .append_stream_chunk(&t, "dev", "xa", &c(2, false), 1 << 20, 1_000)
                .is_err()
        );
        let m = store
            .append_stream_chunk(&t, "dev", "xa", &c(0, false), 1 << 20, 1_000)
            .expect("dup");
        assert_eq!(m.next_seq, 1);
        store
            .append_stream_chunk(&t, "dev", "xa", &c(1, true), 1 << 20, 1_000)
            .expect("append");
        store
            .append_stream_chunk(&t, "dev", "xb", &c(0, false), 1 << 20, 5_000)
            .expect("append");
        let got = store
            .stream_chunks_after(&t, "dev", "xa", 0, 10)
            .expect("read");
        assert_eq!(got, vec![c(0, false), c(1, true)]);
        // xa ended at 1000: pruned with an ended-before of 2000; xb (live, 5000) stays.
        assert_eq!(store.prune_streams(2_000, 0).expect("prune"), 1);
        assert!(store.stream_meta(&t, "dev", "xa").expect("meta").is_none());
        assert!(
            store
                .stream_chunks_after(&t, "dev", "xa", 0, 10)
                .expect("read")
                .is_empty()
        );
        assert!(store.stream_meta(&t, "dev", "xb").expect("meta").is_some());
        // Abandoned (idle) streams go too.
        assert_eq!(store.prune_streams(2_000, 6_000).expect("prune"), 1);
    }

    /// What the durability point costs: one append + flush (fsync) per chunk, as `on_chunk`
    /// does, against appends alone. Prints the numbers (`--nocapture`); asserts only sanity.
    #[test]
    fn store_flush_cost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = TenantId::parse("t").expect("tenant");
        let store = open(dir.path());
        let n = 200u32;
        let data = "x".repeat(200);
        let start = Instant::now();
        for q in 0..n {
            let c = StoredChunk {
                seq: q,
                data: data.clone(),
                last: false,
            };
            store
                .append_stream_chunk(&t, "dev", "xnoflush", &c, 1 << 30, 1)
                .expect("append");
        }
        let no_flush = start.elapsed() / n;
        let start = Instant::now();
        for q in 0..n {
            let c = StoredChunk {
                seq: q,
                data: data.clone(),
                last: false,
            };
            store
                .append_stream_chunk(&t, "dev", "xflush", &c, 1 << 30, 1)
                .expect("append");
            store.flush().expect("flush");
        }
        let flushed = start.elapsed() / n;
        println!(
            "per 200-byte chunk: append {no_flush:?}, append + flush {flushed:?} (data dir {})",
            dir.path().display()
        );
        assert!(flushed < Duration::from_secs(1));
    }
}
