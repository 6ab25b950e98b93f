//! The tunnel against a fake control plane on 127.0.0.1, built on the protocol crate: a real
//! WebSocket server (async-tungstenite, optionally TLS), a real `h1` check
//! (`handshake::Verifier`) and a correctly signed (or deliberately wrong) `h2`.
//!
//! Most tests run the tunnel in-process (a thread running `Tunnel::run`) and observe it through
//! its event hook; the restart test runs the real binary twice. Every file these tests touch is
//! inside their own temp directory; the network is loopback only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::Message as WsMessage;
use async_tungstenite::tungstenite::protocol::CloseFrame;
use async_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use codemantle_daemon::config;
use codemantle_daemon::dispatch::Dispatcher;
use codemantle_daemon::guard::path::Roots;
use codemantle_daemon::journal::Journal;
use codemantle_daemon::tunnel::{self, Tunnel, TunnelEvent};
use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::handshake::{Credential, H1Fields, Verifier, h2_mac};
use codemantle_protocol::message::{
    DirEntry, DirList, ErrorFrame, HelloAck, Message, PathRequest, Rename, StartSession,
};
use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_lite::{FutureExt as _, StreamExt as _};

const SECRET: &str = "test-device-key-0123456789";
const DEVICE: &str = "test-device-0001";
const SERVER_NONCE: &str = "SrvNonceSrvNonce00";

// ---------------------------------------------------------------------------------------------
// Setup: a temp dir with config, key, data dir and a root

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    /// `top` goes before the first section, `server` into `[server]`, `reconnect` replaces the
    /// default `[reconnect]` body.
    fn new(url: &str, top: &str, server: &str, reconnect: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("root")).unwrap();
        std::fs::write(d.join("root/a.txt"), b"hello").unwrap();
        std::fs::create_dir(d.join("root/sub")).unwrap();
        let key = d.join("device.key");
        std::fs::write(&key, format!("{SECRET}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let reconnect = if reconnect.is_empty() {
            "base_ms = 50\ncap_ms = 200\nstable_after_s = 60\n"
        } else {
            reconnect
        };
        let text = format!(
            "data_dir = \"{data}\"\nhandshake_timeout_s = 5\n{top}\n\
             [server]\nurl = \"{url}\"\n{server}\n\
             [device]\nid = \"{DEVICE}\"\nkey_file = \"{key}\"\n\
             [roots]\ncwd = \"{root}\"\n\
             [reconnect]\n{reconnect}\n",
            data = d.join("data").display(),
            key = key.display(),
            root = d.join("root").display(),
        );
        std::fs::write(d.join("daemon.toml"), text).unwrap();
        Setup { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn config_path(&self) -> PathBuf {
        self.path("daemon.toml")
    }

    fn load(&self) -> config::DaemonConfig {
        match config::load(
            &self.config_path(),
            true,
            Vec::<(String, String)>::new(),
            config::Layer::default(),
        ) {
            Ok(l) => l.config,
            Err(e) => panic!("test config refused: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon, in-process

#[derive(Default)]
struct Events {
    list: Mutex<Vec<TunnelEvent>>,
}

impl Events {
    fn snapshot(&self) -> Vec<TunnelEvent> {
        self.list.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&TunnelEvent) -> bool) -> TunnelEvent {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = self.list.lock().unwrap().iter().find(|e| pred(e)) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; events: {:?}",
                self.snapshot()
            );
            smol::Timer::after(Duration::from_millis(10)).await;
        }
    }
}

struct Daemon {
    events: Arc<Events>,
    dispatcher: Arc<Dispatcher>,
    trigger: tunnel::ShutdownTrigger,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(setup: &Setup) -> Daemon {
        let config = setup.load();
        let key = config::read_device_key(&config.device.key_file).unwrap();
        let roots = Roots::open(&config.roots).unwrap();
        let journal =
            Arc::new(Journal::open(&config.data_dir, config.idempotency.retention_s).unwrap());
        let dispatcher = Arc::new(Dispatcher::new(Arc::new(roots), journal));
        let events = Arc::new(Events::default());
        let hook: tunnel::EventHook = {
            let events = Arc::clone(&events);
            Arc::new(move |e: &TunnelEvent| events.list.lock().unwrap().push(e.clone()))
        };
        let tunnel = Tunnel::new(
            Arc::new(config),
            key,
            Arc::clone(&dispatcher),
            Instant::now(),
            hook,
        )
        .unwrap();
        let (trigger, shutdown) = tunnel::shutdown_pair();
        let thread = std::thread::spawn(move || smol::block_on(tunnel.run(shutdown)));
        Daemon {
            events,
            dispatcher,
            trigger,
            thread: Some(thread),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.trigger.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The fake control plane

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct FakeCp {
    listener: smol::net::TcpListener,
    addr: SocketAddr,
    tls: Option<futures_rustls::TlsAcceptor>,
    verifier: Verifier,
}

struct Conn {
    ws: WebSocketStream<Box<dyn Io>>,
    /// The codec of the last `h1` (frame type).
    codec: Codec,
    h1_nonce: String,
}

async fn within<T>(what: &str, secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    let what = what.to_owned();
    fut.or(async move {
        smol::Timer::after(Duration::from_secs(secs)).await;
        panic!("timed out after {secs} s: {what}");
    })
    .await
}

impl FakeCp {
    async fn bind(tls: Option<futures_rustls::TlsAcceptor>) -> FakeCp {
        let listener = smol::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        FakeCp {
            listener,
            addr,
            tls,
            verifier: Verifier::default(),
        }
    }

    fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}/ws", self.addr.port())
    }

    /// Accept one connection and its WebSocket upgrade (TLS first if configured).
    async fn try_accept(&self) -> Result<Conn, String> {
        let (tcp, _) = within("daemon dials", 25, self.listener.accept())
            .await
            .map_err(|e| e.to_string())?;
        let io: Box<dyn Io> = match &self.tls {
            Some(acceptor) => Box::new(acceptor.accept(tcp).await.map_err(|e| e.to_string())?),
            None => Box::new(tcp),
        };
        let ws = async_tungstenite::accept_async(io)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Conn {
            ws,
            codec: Codec::Cbor,
            h1_nonce: String::new(),
        })
    }

    async fn accept(&self) -> Conn {
        self.try_accept().await.unwrap()
    }

    /// Accept, verify `h1` and answer a valid `h2` in the same codec.
    async fn accept_session(&mut self, sid: &str, hb: u32) -> Conn {
        let mut conn = self.accept().await;
        conn.expect_h1(&mut self.verifier).await;
        conn.send_h2(sid, hb, SECRET).await;
        conn
    }
}

impl Conn {
    /// The next data or close frame (pings and pongs skipped); `None` once the socket ends.
    async fn next_frame(&mut self) -> Option<WsMessage> {
        within("a frame from the daemon", 20, async {
            loop {
                match self.ws.next().await {
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    Some(Ok(m)) => return Some(m),
                    Some(Err(_)) | None => return None,
                }
            }
        })
        .await
    }

    /// The next message, decoded by frame type (binary CBOR, text JSON).
    async fn recv(&mut self) -> (Message, Codec) {
        match self.next_frame().await {
            Some(WsMessage::Binary(b)) => (codec::decode(&b, Codec::Cbor).unwrap(), Codec::Cbor),
            Some(WsMessage::Text(t)) => (
                codec::decode(t.as_bytes(), Codec::Json).unwrap(),
                Codec::Json,
            ),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The next message that is not telemetry or a port list.
    async fn recv_reply(&mut self) -> Message {
        loop {
            let (msg, _) = self.recv().await;
            if !matches!(msg, Message::Telemetry(_) | Message::PortList(_)) {
                return msg;
            }
        }
    }

    /// The next text frame that is not telemetry (JSON mode).
    async fn recv_text(&mut self) -> String {
        loop {
            match self.next_frame().await {
                Some(WsMessage::Text(t)) if t.as_str().starts_with(r#"{"v":1,"t":"p","#) => {}
                Some(WsMessage::Text(t)) => return t.as_str().to_owned(),
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    async fn expect_h1(&mut self, verifier: &mut Verifier) -> codemantle_protocol::message::Hello {
        let (msg, codec) = self.recv().await;
        let Message::Hello(h1) = msg else {
            panic!("expected h1, got {msg:?}")
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
        verifier.verify(&fields, now, &lookup).expect("h1 verifies");
        self.codec = codec;
        self.h1_nonce = h1.nonce.clone();
        h1
    }

    /// Answer `h2`, MAC'd with `secret` (pass another secret to forge a bad one).
    async fn send_h2(&mut self, sid: &str, hb: u32, secret: &str) {
        let mac = h2_mac(
            secret.as_bytes(),
            sid,
            SERVER_NONCE,
            u64::from(hb),
            8192,
            &self.h1_nonce,
        );
        let h2 = Message::HelloAck(HelloAck {
            connection_id: sid.to_owned(),
            nonce: SERVER_NONCE.to_owned(),
            heartbeat_secs: hb,
            max_chunk: 8192,
            mac,
        });
        self.send(&h2).await;
    }

    async fn send(&mut self, msg: &Message) {
        let bytes = codec::encode(msg, self.codec).unwrap();
        let frame = match self.codec {
            Codec::Cbor => WsMessage::binary(bytes),
            Codec::Json => WsMessage::text(String::from_utf8(bytes).unwrap()),
        };
        self.ws.send(frame).await.unwrap();
    }

    async fn send_text(&mut self, text: &str) {
        self.ws
            .send(WsMessage::text(text.to_owned()))
            .await
            .unwrap();
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            }))
            .await;
    }

    /// Read until the daemon's close frame; its code.
    async fn expect_close(&mut self) -> Option<u16> {
        loop {
            match self.next_frame().await {
                Some(WsMessage::Close(c)) => return c.map(|c| u16::from(c.code)),
                Some(_) => continue,
                None => return None,
            }
        }
    }
}

fn dr(i: u32, path: &str, limit: u16, cursor: Option<&str>) -> Message {
    Message::DirList(DirList {
        request_id: i,
        root: "cwd".to_owned(),
        path: path.to_owned(),
        limit,
        cursor: cursor.map(str::to_owned),
    })
}

fn rn(i: u32, from: &str, to: &str) -> Message {
    rn_ik(i, from, to, None)
}

/// A rename without overwrite, optionally with a native idempotency key.
fn rn_ik(i: u32, from: &str, to: &str, ik: Option<&str>) -> Message {
    Message::Rename(Rename {
        request_id: i,
        root: "cwd".to_owned(),
        source: from.to_owned(),
        dest: to.to_owned(),
        overwrite: false,
        idempotency_key: ik.map(str::to_owned),
    })
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn native_handshake_and_dir_listing_over_cbor() {
    smol::block_on(async {
        let mut cp = FakeCp::bind(None).await;
        let setup = Setup::new(&cp.url(), "exposed_ports = [8080, 3000]", "", "");
        let daemon = Daemon::start(&setup);

        let mut conn = cp.accept().await;
        let h1 = conn.expect_h1(&mut cp.verifier).await;
        assert_eq!(conn.codec, Codec::Cbor, "native daemons start in CBOR");
        assert_eq!(h1.device_id, DEVICE);
        assert_eq!(h1.nonce.len(), 20);
        assert_eq!(h1.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
        assert!(h1.os.as_deref().unwrap().starts_with("linux/"));
        assert!(h1.fingerprint.is_some());
        conn.send_h2("SessionCbor0001", 5, SECRET).await;

        // Telemetry first, then the configured ports.
        let (p, _) = conn.recv().await;
        let Message::Telemetry(p) = p else {
            panic!("expected p, got {p:?}")
        };
        assert!(p.rss_bytes > 0);
        let (pl, _) = conn.recv().await;
        assert_eq!(
            pl,
            Message::PortList(codemantle_protocol::message::PortList {
                ports: vec![3000, 8080]
            })
        );
        daemon
            .events
            .wait_for("Connected", |e| {
                matches!(
                    e,
                    TunnelEvent::Connected {
                        codec: Codec::Cbor,
                        hb: 5,
                        ..
                    }
                )
            })
            .await;

        // A full listing, sorted by name, real sizes and mtimes.
        conn.send(&dr(1, "", 10, None)).await;
        let Message::DirListing(ds) = conn.recv_reply().await else {
            panic!("expected ds")
        };
        assert_eq!(ds.request_id, 1);
        assert_eq!(ds.cursor, None);
        assert_eq!(ds.entries.len(), 2);
        match &ds.entries[0] {
            DirEntry::File {
                name,
                size,
                mtime_ms,
            } => {
                assert_eq!((name.as_str(), *size), ("a.txt", 5));
                assert!(*mtime_ms > 1_600_000_000_000 && mtime_ms % 1000 == 0);
            }
            other => panic!("expected a.txt, got {other:?}"),
        }
        assert_eq!(
            ds.entries[1],
            DirEntry::Dir {
                name: "sub".to_owned()
            }
        );

        // Paging: the cursor of page 1 resumes after it.
        conn.send(&dr(2, "", 1, None)).await;
        let Message::DirListing(page1) = conn.recv_reply().await else {
            panic!("expected ds")
        };
        assert_eq!(page1.entries.len(), 1);
        let cursor = page1.cursor.expect("a next-page cursor");
        conn.send(&dr(3, "", 1, Some(&cursor))).await;
        let Message::DirListing(page2) = conn.recv_reply().await else {
            panic!("expected ds")
        };
        assert_eq!(page2.entries[0].name(), "sub");
        assert_eq!(page2.cursor, None);

        // Errors carry the guard's code and, natively, a reason.
        conn.send(&dr(4, "../etc", 10, None)).await;
        let Message::Error(e) = conn.recv_reply().await else {
            panic!("expected e")
        };
        assert_eq!((e.request_id, e.code.clone()), (Some(4), ErrorCode::Root));
        assert!(e.message.is_some());

        // Unknown t → e PROTO with i; the link stays up.
        conn.send(&Message::Unknown {
            t: "zz".to_owned(),
            request_id: Some(9),
        })
        .await;
        let Message::Error(e) = conn.recv_reply().await else {
            panic!("expected e")
        };
        assert_eq!((e.request_id, e.code), (Some(9), ErrorCode::Proto));

        // Sessions not enabled (no opencode allowlisted) → a typed `sr o:0`.
        conn.send(&Message::StartSession(StartSession {
            request_id: 10,
            session_id: "s1".to_owned(),
            folder: None,
            jit: None,
            idempotency_key: None,
        }))
        .await;
        let Message::SessionResult(sr) = conn.recv_reply().await else {
            panic!("expected sr")
        };
        assert_eq!(
            (sr.request_id, sr.ok, sr.reason.as_deref()),
            (10, false, Some("opencode_not_enabled"))
        );

        // Pings are answered.
        conn.ws
            .send(WsMessage::Ping(vec![7u8].into()))
            .await
            .unwrap();
        let pong = within("pong", 5, async {
            loop {
                match conn.ws.next().await {
                    Some(Ok(WsMessage::Pong(p))) => return p,
                    Some(Ok(_)) => continue,
                    other => panic!("socket ended: {other:?}"),
                }
            }
        })
        .await;
        assert_eq!(pong.as_ref(), [7u8]);

        // Still the same link: no reconnect happened.
        assert!(
            !daemon
                .events
                .snapshot()
                .iter()
                .any(|e| matches!(e, TunnelEvent::Disconnected { .. }))
        );
        drop(daemon);
    });
}

#[test]
fn falls_back_to_json_for_a_0_1_x_control_plane() {
    smol::block_on(async {
        let cp = FakeCp::bind(None).await;
        let setup = Setup::new(&cp.url(), "", "", "");
        std::fs::write(setup.path("root/b.txt"), b"old").unwrap();
        let daemon = Daemon::start(&setup);

        // 0.1.x parses the binary h1 as JSON, fails, answers PROTO as text and closes 1002.
        let mut first = cp.accept().await;
        assert!(matches!(
            first.next_frame().await,
            Some(WsMessage::Binary(_))
        ));
        first.send_text(r#"{"v":1,"t":"e","c":"PROTO"}"#).await;
        first.close(1002, "invalid json").await;

        // The daemon dials again at once, in JSON.
        let mut conn = cp.accept().await;
        let h1_text = match conn.ws.next().await {
            Some(Ok(WsMessage::Text(t))) => t.as_str().to_owned(),
            other => panic!("expected a JSON h1, got {other:?}"),
        };
        assert!(
            h1_text.starts_with(&format!(r#"{{"v":1,"t":"h1","d":"{DEVICE}","ak":""#)),
            "{h1_text}"
        );
        for key in [
            r#""n":"#, r#""ts":"#, r#""m":"#, r#""c":"#, r#""hn":"#, r#""os":"#, r#""av":"#,
        ] {
            assert!(h1_text.contains(key), "{key} missing in {h1_text}");
        }
        let Ok(Message::Hello(h1)) = codec::decode(h1_text.as_bytes(), Codec::Json) else {
            panic!("h1 does not decode")
        };
        conn.codec = Codec::Json;
        conn.h1_nonce = h1.nonce.clone();
        conn.send_h2("SessionJson0001", 25, SECRET).await;
        let p = conn.next_frame().await;
        assert!(
            matches!(&p, Some(WsMessage::Text(t)) if t.as_str().starts_with(r#"{"v":1,"t":"p","u":"#)),
            "{p:?}"
        );

        // Exactly 0.1.x's shapes.
        let exchanges = [
            (
                r#"{"v":1,"t":"dr","i":7,"r":"cwd","p":"","l":10}"#,
                r#"{"v":1,"t":"ds","i":7,"e":[["f","a.txt",5,4294967295],["f","b.txt",3,4294967295],["d","sub",0]]}"#,
            ),
            (
                r#"{"v":1,"t":"dr","i":8,"r":"cwd","p":"missing","l":10}"#,
                r#"{"v":1,"t":"e","i":8,"c":"PATH"}"#,
            ),
            (
                r#"{"v":1,"t":"dr","i":9,"r":"nope","p":"","l":10}"#,
                r#"{"v":1,"t":"e","i":9,"c":"ROOT"}"#,
            ),
            (
                r#"{"v":1,"t":"md","i":10,"r":"cwd","p":"newdir"}"#,
                r#"{"v":1,"t":"mr","i":10,"o":1}"#,
            ),
            // 0.1.x semantics: rename overwrites.
            (
                r#"{"v":1,"t":"rn","i":11,"r":"cwd","s":"a.txt","d":"b.txt"}"#,
                r#"{"v":1,"t":"rp","i":11,"o":1}"#,
            ),
            (
                r#"{"v":1,"t":"sq","i":12,"p":"."}"#,
                r#"{"v":1,"t":"sv","i":12,"o":0,"m":"opencode_not_enabled"}"#,
            ),
            (
                r#"{"v":1,"t":"zz","i":13}"#,
                r#"{"v":1,"t":"e","i":13,"c":"PROTO"}"#,
            ),
        ];
        for (request, expected) in exchanges {
            conn.send_text(request).await;
            assert_eq!(conn.recv_text().await, expected, "reply to {request}");
        }
        assert!(setup.path("root/newdir").is_dir());
        assert_eq!(std::fs::read(setup.path("root/b.txt")).unwrap(), b"hello");

        let events = daemon.events.snapshot();
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == TunnelEvent::JsonFallback)
                .count(),
            1
        );
        assert!(events.iter().any(|e| matches!(
            e,
            TunnelEvent::Connected {
                codec: Codec::Json,
                ..
            }
        )));
        drop(daemon);
    });
}

#[test]
fn wrong_h2_mac_is_refused_and_retried() {
    smol::block_on(async {
        let mut cp = FakeCp::bind(None).await;
        let setup = Setup::new(&cp.url(), "", "", "");
        let daemon = Daemon::start(&setup);

        let mut conn = cp.accept().await;
        conn.expect_h1(&mut cp.verifier).await;
        conn.send_h2("SessionBadMac01", 25, "not-the-device-key")
            .await;
        assert_eq!(conn.expect_close().await, Some(1008), "invalid ack");

        // It retries; a correct h2 then gets through.
        let _conn = cp.accept_session("SessionGoodMac1", 25).await;
        daemon
            .events
            .wait_for("Connected", |e| matches!(e, TunnelEvent::Connected { .. }))
            .await;
        let events = daemon.events.snapshot();
        let first_disconnect = events
            .iter()
            .find_map(|e| match e {
                TunnelEvent::Disconnected { reason } => Some(reason.clone()),
                _ => None,
            })
            .expect("the bad h2 ended the first attempt");
        assert!(first_disconnect.contains("h2"), "{first_disconnect}");
        let connected = events
            .iter()
            .filter(|e| matches!(e, TunnelEvent::Connected { .. }))
            .count();
        assert_eq!(connected, 1, "{events:?}");
        drop(daemon);
    });
}

#[test]
fn silent_control_plane_is_declared_dead_after_three_heartbeats() {
    smol::block_on(async {
        let mut cp = FakeCp::bind(None).await;
        let setup = Setup::new(&cp.url(), "", "", "");
        let daemon = Daemon::start(&setup);

        // hb = 5 (the protocol minimum); then the control plane never reads or writes again,
        // so the daemon's pings go unanswered.
        let mut silent = cp.accept_session("SessionSilent01", 5).await;
        let _ = silent.recv().await; // p
        let went_silent = Instant::now();

        let _next = within("reconnect after 3×hb", 30, cp.accept()).await;
        let elapsed = went_silent.elapsed();
        assert!(
            elapsed >= Duration::from_secs(14) && elapsed < Duration::from_secs(22),
            "declared dead after {elapsed:?}, expected about 15 s"
        );
        let reason = daemon
            .events
            .wait_for("Disconnected", |e| {
                matches!(e, TunnelEvent::Disconnected { .. })
            })
            .await;
        assert!(format!("{reason:?}").contains("3×hb"), "{reason:?}");
        drop(silent);
        drop(daemon);
    });
}

#[test]
fn rejected_handshake_backs_off_at_the_cap() {
    smol::block_on(async {
        let mut cp = FakeCp::bind(None).await;
        let setup = Setup::new(
            &cp.url(),
            "",
            "",
            "base_ms = 10\ncap_ms = 1000\nstable_after_s = 60\n",
        );
        let daemon = Daemon::start(&setup);

        for (code, name) in [
            (ErrorCode::Auth, "AUTH"),
            (ErrorCode::UpdateRequired, "UPDATE_REQUIRED"),
        ] {
            let mut conn = cp.accept().await;
            conn.expect_h1(&mut cp.verifier).await;
            conn.send(&Message::Error(ErrorFrame {
                request_id: None,
                code,
                message: None,
            }))
            .await;
            assert_eq!(conn.expect_close().await, Some(1008));
            let refused_at = Instant::now();
            daemon
                .events
                .wait_for(
                    name,
                    |e| matches!(e, TunnelEvent::Rejected { code } if code == name),
                )
                .await;
            let _ = within("next dial", 10, cp.listener.accept())
                .await
                .map(|(tcp, _)| drop(tcp));
            let waited = refused_at.elapsed();
            assert!(
                waited >= Duration::from_millis(450),
                "after {name} the daemon redialled after {waited:?}; expected at least cap/2"
            );
        }
        // A key revoked while connected: e AUTH on an established link is a rejection too.
        let mut conn = cp.accept_session("SessionRevoked1", 25).await;
        let _ = conn.recv().await; // p
        conn.send(&Message::Error(ErrorFrame {
            request_id: None,
            code: ErrorCode::Auth,
            message: None,
        }))
        .await;
        assert_eq!(conn.expect_close().await, Some(1008));
        let deadline = Instant::now() + Duration::from_secs(10);
        while daemon
            .events
            .snapshot()
            .iter()
            .filter(|e| matches!(e, TunnelEvent::Rejected { .. }))
            .count()
            < 3
        {
            assert!(Instant::now() < deadline, "{:?}", daemon.events.snapshot());
            smol::Timer::after(Duration::from_millis(10)).await;
        }

        // Every delay after a rejection sits in [cap/2, cap], far above base (10 ms).
        let delays: Vec<Duration> = daemon
            .events
            .snapshot()
            .iter()
            .filter_map(|e| match e {
                TunnelEvent::Retrying { delay, .. } => Some(*delay),
                _ => None,
            })
            .collect();
        assert!(delays.len() >= 2, "{delays:?}");
        for d in &delays[..2] {
            assert!(
                *d >= Duration::from_millis(500) && *d <= Duration::from_millis(1000),
                "{delays:?}"
            );
        }
        drop(daemon);
    });
}

#[test]
fn resent_mutation_is_answered_from_the_journal() {
    smol::block_on(async {
        let mut cp = FakeCp::bind(None).await;
        let setup = Setup::new(&cp.url(), "", "", "");
        let daemon = Daemon::start(&setup);
        let sid = "SessionIdem0001";

        // The control plane sends rn, then loses the link before reading the reply.
        let mut conn = cp.accept_session(sid, 25).await;
        conn.send(&rn(5, "a.txt", "b.txt")).await;
        drop(conn);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !setup.path("root/b.txt").exists() {
            assert!(Instant::now() < deadline, "rename never happened");
            smol::Timer::after(Duration::from_millis(10)).await;
        }

        // Same session, same request: answered from the record (running it again would fail
        // with PATH, a.txt is gone).
        let mut conn = cp.accept_session(sid, 25).await;
        conn.send(&rn(5, "a.txt", "b.txt")).await;
        assert_eq!(
            conn.recv_reply().await,
            Message::RenameResult(codemantle_protocol::message::FsResult {
                request_id: 5,
                ok: true
            })
        );
        assert!(!setup.path("root/a.txt").exists());
        assert_eq!(std::fs::read(setup.path("root/b.txt")).unwrap(), b"hello");

        // A different request id is a different request: it runs (and fails: a.txt is gone).
        conn.send(&rn(6, "a.txt", "b.txt")).await;
        let Message::Error(e) = conn.recv_reply().await else {
            panic!("expected e")
        };
        assert_eq!(e.code, ErrorCode::Path);

        // md is recorded too.
        let md = Message::MakeDir(PathRequest {
            request_id: 7,
            root: "cwd".to_owned(),
            path: "made".to_owned(),
            idempotency_key: None,
        });
        conn.send(&md).await;
        assert!(matches!(conn.recv_reply().await, Message::MakeDirResult(r) if r.ok));

        // With a native idempotency key the record outlives the control-plane session: a
        // restarted control plane (new sid, request ids from 1 again) re-sends under the same
        // `ik` and gets the recorded outcome, re-addressed to its new `i`.
        let ik = "ikRenameBtoC0001";
        conn.send(&rn_ik(8, "b.txt", "c.txt", Some(ik))).await;
        assert!(
            matches!(conn.recv_reply().await, Message::RenameResult(r) if r.ok && r.request_id == 8)
        );
        drop(conn);
        let mut conn = cp.accept_session("SessionIdemNew1", 25).await;
        conn.send(&rn_ik(1, "b.txt", "c.txt", Some(ik))).await;
        assert_eq!(
            conn.recv_reply().await,
            Message::RenameResult(codemantle_protocol::message::FsResult {
                request_id: 1,
                ok: true
            })
        );
        assert!(!setup.path("root/b.txt").exists());
        assert_eq!(std::fs::read(setup.path("root/c.txt")).unwrap(), b"hello");
        assert_eq!(daemon.dispatcher.journal().outcome_count(), 4);
        drop(daemon);
    });
}

// ---------------------------------------------------------------------------------------------
// The real binary: restart keeps the journal; SIGTERM closes with 1000 and exits 0

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_daemon(setup: &Setup, log: &str) -> Child {
    let stderr = std::fs::File::create(setup.path(log)).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_codemantle-daemon"))
        .arg("--config")
        .arg(setup.config_path())
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    Child(child)
}

fn wait_exit(child: &mut Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "daemon did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn journal_survives_a_daemon_restart() {
    smol::block_on(async {
        let mut cp = FakeCp::bind(None).await;
        let setup = Setup::new(&cp.url(), "", "", "");
        let ik = "ikRestartRename1";

        let mut first = spawn_daemon(&setup, "run1.log");
        let mut conn = cp.accept_session("SessionRestart1", 25).await;
        conn.send(&rn_ik(3, "a.txt", "b.txt", Some(ik))).await;
        assert!(matches!(conn.recv_reply().await, Message::RenameResult(r) if r.ok));
        // Killed hard: nothing after the reply gets a chance to run.
        first.0.kill().unwrap();
        first.0.wait().unwrap();
        drop(conn);

        // The control plane re-sends on the new link (its own restart would change sid and i;
        // the idempotency key stays).
        let mut second = spawn_daemon(&setup, "run2.log");
        let mut conn = cp.accept_session("SessionRestart2", 25).await;
        conn.send(&rn_ik(41, "a.txt", "b.txt", Some(ik))).await;
        assert!(
            matches!(conn.recv_reply().await, Message::RenameResult(r) if r.ok && r.request_id == 41),
            "the re-sent rename must be answered from the journal"
        );
        assert!(!setup.path("root/a.txt").exists());

        // SIGTERM: close 1000, exit 0.
        let pid = nix::unistd::Pid::from_raw(i32::try_from(second.0.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        assert_eq!(conn.expect_close().await, Some(1000));
        let status = wait_exit(&mut second, 10);
        let log = std::fs::read_to_string(setup.path("run2.log")).unwrap();
        assert!(status.success(), "exit {status:?}; log:\n{log}");
        assert!(log.contains("answered from the journal"), "{log}");
        assert!(!log.contains(SECRET), "the device key leaked into the log");
    });
}

// ---------------------------------------------------------------------------------------------
// wss://

struct Pki {
    ca_pem: String,
    leaf_der: Vec<u8>,
    acceptor: futures_rustls::TlsAcceptor,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "CodeMantle test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
    Pki {
        ca_pem: ca.pem(),
        leaf_der: leaf.der().to_vec(),
        acceptor: futures_rustls::TlsAcceptor::from(Arc::new(server)),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(der: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(der))
}

#[test]
fn wss_trusts_the_configured_ca() {
    smol::block_on(async {
        let pki = pki();
        let mut cp = FakeCp::bind(Some(pki.acceptor.clone())).await;
        let ca_dir = tempfile::tempdir().unwrap();
        let ca_file = ca_dir.path().join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).unwrap();
        let setup = Setup::new(
            &cp.url(),
            "",
            &format!("ca_file = \"{}\"", ca_file.display()),
            "",
        );
        let daemon = Daemon::start(&setup);
        let mut conn = cp.accept_session("SessionTls00001", 25).await;
        daemon
            .events
            .wait_for("Connected over TLS", |e| {
                matches!(e, TunnelEvent::Connected { .. })
            })
            .await;
        conn.send(&dr(1, "", 10, None)).await;
        assert!(matches!(conn.recv_reply().await, Message::DirListing(_)));
        drop(daemon);
    });
}

#[test]
fn wss_pin_accepts_the_pinned_certificate_only() {
    smol::block_on(async {
        let pki = pki();

        // Pinned to this exact leaf: accepted without any CA.
        let mut cp = FakeCp::bind(Some(pki.acceptor.clone())).await;
        let setup = Setup::new(
            &cp.url(),
            "",
            &format!("pin_sha256 = \"{}\"", sha256_hex(&pki.leaf_der)),
            "",
        );
        let daemon = Daemon::start(&setup);
        let _conn = cp.accept_session("SessionPinned01", 25).await;
        daemon
            .events
            .wait_for("Connected with the pin", |e| {
                matches!(e, TunnelEvent::Connected { .. })
            })
            .await;
        drop(daemon);

        // Pinned to another certificate: refused in the TLS handshake, never connected.
        let cp = FakeCp::bind(Some(pki.acceptor.clone())).await;
        let setup = Setup::new(
            &cp.url(),
            "",
            &format!("pin_sha256 = \"{}\"", "ab".repeat(32)),
            "",
        );
        let daemon = Daemon::start(&setup);
        assert!(cp.try_accept().await.is_err(), "TLS must fail");
        let reason = daemon
            .events
            .wait_for("Disconnected", |e| {
                matches!(e, TunnelEvent::Disconnected { .. })
            })
            .await;
        assert!(format!("{reason:?}").contains("TLS"), "{reason:?}");
        assert!(
            !daemon
                .events
                .snapshot()
                .iter()
                .any(|e| matches!(e, TunnelEvent::Connected { .. }))
        );
        drop(daemon);
    });
}
