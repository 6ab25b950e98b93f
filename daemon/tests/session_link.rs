//! Sessions over the real link: the daemon's tunnel (in-process) against a fake control plane
//! on 127.0.0.1 (real WebSocket, real `h1` check, signed `h2`, CBOR), with the dispatcher and
//! the session manager wired as `main` wires them, and the fake OpenCode in the real sandbox.
//! What it shows end to end: `si` → `sr`, `sp` → `sc` frames on the link, `sa` deletes, a
//! dropped link re-sends exactly the unacknowledged chunks on the next one, `sl` replays, `st`.
//!
//! SAFETY: every file is inside the test's temp dir; the network is loopback only.

mod session_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message as WsMessage;
use codemantle_daemon::config;
use codemantle_daemon::dispatch::Dispatcher;
use codemantle_daemon::tunnel::{self, Tunnel};
use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::handshake::{Credential, H1Fields, Verifier, h2_mac};
use codemantle_protocol::message::{
    HelloAck, Message, Prompt, ReplayLog, StartSession, StopSession, StreamAck, StreamChunk,
};
use futures_lite::{FutureExt as _, StreamExt as _};
use session_support::{World, kinds, records, wait_until};

#[test]
fn fake_opencode_entry() {
    session_support::fake_opencode::main_if_requested();
}

const BASE: u16 = 45100;
const SECRET: &str = "test-device-key-0123456789";
const DEVICE: &str = "test-device-0001";
const SERVER_NONCE: &str = "SrvNonceSrvNonce00";

async fn within<T>(what: &str, secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    let what = what.to_owned();
    fut.or(async move {
        smol::Timer::after(Duration::from_secs(secs)).await;
        panic!("timed out after {secs} s: {what}");
    })
    .await
}

/// A control plane that accepts the daemon, checks `h1`, answers `h2` and speaks CBOR.
struct FakeCp {
    listener: smol::net::TcpListener,
    addr: SocketAddr,
    verifier: Verifier,
}

struct Conn {
    ws: WebSocketStream<smol::net::TcpStream>,
}

impl FakeCp {
    async fn bind() -> FakeCp {
        let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        FakeCp {
            listener,
            addr,
            verifier: Verifier::default(),
        }
    }

    async fn accept_session(&mut self, sid: &str) -> Conn {
        let (tcp, _) = within("the daemon dials", 25, self.listener.accept())
            .await
            .unwrap();
        let ws = async_tungstenite::accept_async(tcp).await.unwrap();
        let mut conn = Conn { ws };
        let Message::Hello(h1) = conn.recv().await else {
            panic!("expected h1")
        };
        let lookup = |_: &str| {
            Some(Credential::Device {
                device_id: DEVICE.to_owned(),
                secret: SECRET.into(),
            })
        };
        let fields = H1Fields {
            version: 1,
            device_id: &h1.device_id,
            key_id: h1.key_id.as_deref(),
            token: h1.auth_token.as_deref(),
            nonce: &h1.nonce,
            ts_ms: h1.timestamp_ms,
            mac: &h1.mac,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        self.verifier
            .verify(&fields, now, &lookup)
            .expect("h1 verifies");
        let mac = h2_mac(SECRET.as_bytes(), sid, SERVER_NONCE, 30, 8192, &h1.nonce);
        conn.send(&Message::HelloAck(HelloAck {
            connection_id: sid.to_owned(),
            nonce: SERVER_NONCE.to_owned(),
            heartbeat_secs: 30,
            max_chunk: 8192,
            mac,
        }))
        .await;
        conn
    }
}

impl Conn {
    async fn recv(&mut self) -> Message {
        within("a frame from the daemon", 20, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Binary(b))) => {
                        return codec::decode(&b, Codec::Cbor).unwrap();
                    }
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    other => panic!("expected a binary frame, got {other:?}"),
                }
            }
        })
        .await
    }

    /// The next message that is not telemetry or a port list.
    async fn recv_reply(&mut self) -> Message {
        loop {
            let msg = self.recv().await;
            if !matches!(msg, Message::Telemetry(_) | Message::PortList(_)) {
                return msg;
            }
        }
    }

    /// `sc` frames of stream `x` until its last one (other frames skipped).
    async fn recv_stream(&mut self, x: &str) -> Vec<StreamChunk> {
        let mut out = Vec::new();
        loop {
            if let Message::StreamChunk(c) = self.recv_reply().await {
                if c.stream_id == x {
                    let last = c.last;
                    out.push(c);
                    if last {
                        return out;
                    }
                }
            }
        }
    }

    async fn send(&mut self, msg: &Message) {
        let bytes = codec::encode(msg, Codec::Cbor).unwrap();
        self.ws.send(WsMessage::binary(bytes)).await.unwrap();
    }
}

/// A daemon config file for the fixture (fast reconnects, the fixture's project as `cwd`).
fn load_config(w: &World, url: &str) -> config::DaemonConfig {
    use std::os::unix::fs::PermissionsExt as _;
    let d = w.tmp.path();
    let key = d.join("device.key");
    std::fs::write(&key, format!("{SECRET}\n")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = format!(
        "data_dir = \"{data}\"\nhandshake_timeout_s = 5\n\
         [server]\nurl = \"{url}\"\n\
         [device]\nid = \"{DEVICE}\"\nkey_file = \"{key}\"\n\
         [roots]\ncwd = \"{root}\"\n\
         [reconnect]\nbase_ms = 50\ncap_ms = 200\nstable_after_s = 60\n",
        data = w.data_dir.display(),
        key = key.display(),
        root = w.project.display(),
    );
    let path = d.join("daemon.toml");
    std::fs::write(&path, text).unwrap();
    match config::load(
        &path,
        true,
        Vec::<(String, String)>::new(),
        config::Layer::default(),
    ) {
        Ok(l) => l.config,
        Err(e) => panic!("test config refused: {e}"),
    }
}

#[test]
fn output_survives_a_dropped_link_over_the_real_tunnel() {
    let w = World::new(BASE);
    smol::block_on(async {
        let mut cp = FakeCp::bind().await;
        let config = load_config(&w, &format!("ws://127.0.0.1:{}/ws", cp.addr.port()));
        let key = config::read_device_key(&config.device.key_file).unwrap();
        let journal = Arc::new(w.journal());
        let sessions = Arc::new(w.manager(&journal));
        let dispatcher = Arc::new(
            Dispatcher::new(Arc::clone(&w.roots), Arc::clone(&journal))
                .with_sessions(Arc::clone(&sessions)),
        );
        let tunnel = Tunnel::new(
            Arc::new(config),
            key,
            dispatcher,
            Instant::now(),
            Arc::new(|_: &tunnel::TunnelEvent| {}),
        )
        .unwrap()
        .with_outbox(sessions.streams());
        let (trigger, shutdown) = tunnel::shutdown_pair();
        let thread = std::thread::spawn(move || smol::block_on(tunnel.run(shutdown)));

        let mut conn = cp.accept_session("SessionLink0001").await;
        conn.send(&Message::StartSession(StartSession {
            request_id: 1,
            session_id: "sessLink".to_owned(),
            folder: Some("proj-a".to_owned()),
            jit: None,
            idempotency_key: Some("ikStartLink01".to_owned()),
        }))
        .await;
        let Message::SessionResult(sr) = conn.recv_reply().await else {
            panic!("expected sr")
        };
        assert!(sr.ok, "{sr:?}");
        assert_eq!(sr.session_id, "sessLink");

        conn.send(&Message::Prompt(Prompt {
            request_id: 2,
            stream_id: "streamLNK001".to_owned(),
            session_id: "sessLink".to_owned(),
            prompt: "emit 6".to_owned(),
            idempotency_key: None,
        }))
        .await;
        let first = conn.recv_stream("streamLNK001").await;
        let n = first.len() as u32;
        assert_eq!(
            first.iter().map(|c| c.seq).collect::<Vec<_>>(),
            (0..n).collect::<Vec<_>>()
        );
        let k = kinds(&records(&first));
        assert_eq!(k.iter().filter(|t| *t == "message.part.delta").count(), 6);
        assert_eq!(k.last().unwrap(), "session.idle");

        // The control plane acknowledges up to q=3, then the link drops.
        conn.send(&Message::StreamAck(StreamAck {
            stream_id: "streamLNK001".to_owned(),
            seq: 3,
        }))
        .await;
        let streams = sessions.streams();
        wait_until("the ack to be applied", Duration::from_secs(10), || {
            streams.stored("streamLNK001").len() as u32 == n - 4
        });
        drop(conn);

        // The next link gets exactly the unacknowledged chunks, in order, unchanged.
        let mut conn = cp.accept_session("SessionLink0002").await;
        let again = conn.recv_stream("streamLNK001").await;
        assert_eq!(again[..], first[4..]);
        conn.send(&Message::StreamAck(StreamAck {
            stream_id: "streamLNK001".to_owned(),
            seq: n - 1,
        }))
        .await;
        wait_until("everything acknowledged", Duration::from_secs(10), || {
            streams.stored("streamLNK001").is_empty()
        });

        // A re-sent si (same ik) is answered from the journal, not started twice.
        conn.send(&Message::StartSession(StartSession {
            request_id: 5,
            session_id: "sessLink".to_owned(),
            folder: Some("proj-a".to_owned()),
            jit: None,
            idempotency_key: Some("ikStartLink01".to_owned()),
        }))
        .await;
        let Message::SessionResult(again) = conn.recv_reply().await else {
            panic!("expected sr")
        };
        assert_eq!((again.request_id, again.ok), (5, true));
        assert_eq!(again.reason, None, "answered from the record, not reused");
        assert_eq!(sessions.sessions().len(), 1);

        // sl replays the log tail as one-off chunks on the requested stream.
        conn.send(&Message::ReplayLog(ReplayLog {
            request_id: 3,
            stream_id: "replayLNK001".to_owned(),
            lines: 50,
        }))
        .await;
        let replay = conn.recv_stream("replayLNK001").await;
        let text: String = replay.iter().map(|c| c.data.as_str()).collect();
        assert!(text.contains("start session=sessLink"), "{text}");
        assert!(text.lines().all(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .is_ok_and(|v| v["k"] == "log" && v["ts"].is_string())
        }));

        conn.send(&Message::StopSession(StopSession {
            request_id: 4,
            session_id: "sessLink".to_owned(),
            idempotency_key: None,
        }))
        .await;
        let Message::SessionResult(sr) = conn.recv_reply().await else {
            panic!("expected sr")
        };
        assert!(sr.ok, "{sr:?}");
        assert!(sessions.sessions().is_empty());

        trigger.trigger();
        thread.join().unwrap();
    });
}
