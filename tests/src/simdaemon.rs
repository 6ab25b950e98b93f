//! A simulated daemon: a real WebSocket client that does the real handshake
//! ([`ClientHandshake`]) and answers requests from an in-memory tree, without touching the
//! host. Tests, the load generator and the soak harness use it to stand in for hosts.
//!
//! - It speaks native CBOR or 0.1.x JSON ([`SimConfig::codec`]).
//! - It can misbehave during the handshake ([`Fault`]: wrong MAC, replayed nonce, skewed clock,
//!   claiming another device, `v=0`, oversize or garbage first frame, never sending `h1`), and
//!   afterwards on request ([`SimDaemon::send_raw`], [`SimDaemon::freeze`], [`SimDaemon::hold`]).
//! - It counts what it received ([`SimDaemon::count`]) and can keep the raw frames
//!   ([`SimConfig::record_frames`]) so a test can check exactly what went over the wire.
//!
//! Many connections per process are the point (fleet-scale load), so a connection is one task
//! with small WebSocket buffers; the file tree is behind an `Arc` and can be shared by many
//! simulated devices ([`SimConfig::tree`]).
//!
//! Requests answered: `dr` `md` `rd` `rn` (the tree), `sq` `si` `st` `sl` (a toy session table
//! and a log text), `cf` `cu` `cc` `jk`, and every git request with a canned success. `sp` is
//! counted and not answered (as 0.1.50). Anything else gets `e PROTO`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use async_tungstenite::tungstenite::{Bytes, Message as WsMessage};
use codemantle_protocol::codec::Codec;
use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::handshake::{ClientHandshake, H2Fields, SessionParams};
use codemantle_protocol::message::{
    ConfigOutcome, ConfigResult, DirEntry, DirListing, ErrorFrame, FsResult, GitBranchResult,
    GitCommitResult, GitConfigResult, GitResult, GitStatusResult, Hello, JitKillResult, Message,
    SessionResult, SessionStatus, SetupSaveResult, SetupStatus, StreamChunk, Telemetry,
    UnsupportedHello,
};
use futures_lite::{FutureExt as _, StreamExt as _};
use smol::net::TcpStream;

/// The socket type of a simulated daemon.
pub type Ws = WebSocketStream<TcpStream>;

/// How to misbehave during the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Fault {
    /// Behave.
    #[default]
    None,
    /// Send an `h1` whose MAC does not match.
    WrongMac,
    /// Stamp `h1` this many milliseconds away from the real clock.
    SkewMs(i64),
    /// Claim this device id (signed with our own key).
    ClaimDevice(String),
    /// Send an `h1` with this protocol version (and nothing else).
    Version(u64),
    /// Send this many bytes of binary junk instead of an `h1`.
    Oversize(usize),
    /// Send bytes that are neither JSON nor CBOR.
    Garbage,
    /// Send a valid frame of an unknown type instead of an `h1`.
    UnknownFirst,
    /// Never send an `h1`.
    NeverSendH1,
}

/// Everything a simulated daemon needs.
#[derive(Clone)]
pub struct SimConfig {
    /// Control plane address (127.0.0.1:port); the daemon connects to `ws://ADDR/ws`.
    pub addr: SocketAddr,
    pub device_id: String,
    /// The device key (or a 0.1.x shared token).
    pub secret: String,
    pub codec: Codec,
    pub fault: Fault,
    /// Use this nonce instead of a random one (replay tests).
    pub nonce: Option<String>,
    /// Use this timestamp instead of the clock (replay tests).
    pub ts_ms: Option<u64>,
    pub hostname: Option<String>,
    pub os: Option<String>,
    pub agent_version: Option<String>,
    /// Keep every frame received (as raw bytes) for inspection.
    pub record_frames: bool,
    /// The file tree; share one `Arc` among many simulated devices to save memory.
    pub tree: Arc<Mutex<Tree>>,
    /// Text returned to `sl` (the session log), split into `sc` chunks of ≤ 8192 bytes.
    pub log: Arc<str>,
    /// Send a `p` telemetry frame right after the handshake, as real daemons do.
    pub telemetry: bool,
    /// Time allowed for the handshake.
    pub timeout: Duration,
}

impl SimConfig {
    /// A well-behaved native daemon.
    pub fn new(addr: SocketAddr, device_id: &str, secret: &str) -> SimConfig {
        SimConfig {
            addr,
            device_id: device_id.to_owned(),
            secret: secret.to_owned(),
            codec: Codec::Cbor,
            fault: Fault::None,
            nonce: None,
            ts_ms: None,
            hostname: Some("sim-host".into()),
            os: Some("linux".into()),
            agent_version: Some("0.2.0-sim".into()),
            record_frames: false,
            tree: Arc::new(Mutex::new(Tree::default())),
            log: Arc::from(""),
            telemetry: true,
            timeout: Duration::from_secs(15),
        }
    }

    pub fn json(mut self) -> Self {
        self.codec = Codec::Json;
        self
    }

    pub fn fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    pub fn recording(mut self) -> Self {
        self.record_frames = true;
        self
    }
}

/// How a refused handshake was answered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Refusal {
    /// The `e` frame, if one came.
    pub error: Option<ErrorFrame>,
    /// Close code and reason, if a close frame came.
    pub close: Option<(u16, String)>,
}

/// Outcome of [`SimDaemon::connect`].
pub enum Handshake {
    Accepted(SimDaemon),
    Refused(Refusal),
}

impl Handshake {
    /// The daemon, or a panic naming how it was refused (for tests that expect success).
    pub fn accepted(self) -> SimDaemon {
        match self {
            Handshake::Accepted(d) => d,
            Handshake::Refused(r) => panic!("handshake refused: {r:?}"),
        }
    }

    /// The refusal, or a panic (for tests that expect a refusal).
    pub fn refused(self) -> Refusal {
        match self {
            Handshake::Accepted(d) => panic!("handshake unexpectedly accepted ({})", d.device_id),
            Handshake::Refused(r) => r,
        }
    }
}

/// A small in-memory file tree: paths relative to the root `cwd`, `/`-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Dir,
    File { size: u64, mtime_ms: u64 },
}

impl Default for Tree {
    fn default() -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(String::new(), Node::Dir);
        Tree { nodes }
    }
}

impl Tree {
    /// Adds a directory (and its parents).
    pub fn add_dir(&mut self, path: &str) {
        if let Some(p) = normalize(path) {
            self.mkdirs(&p);
        }
    }

    /// Adds a file (and its parent directories).
    pub fn add_file(&mut self, path: &str, size: u64) {
        if let Some(p) = normalize(path) {
            if let Some((parent, _)) = p.rsplit_once('/') {
                self.mkdirs(parent);
            }
            self.nodes.insert(
                p,
                Node::File {
                    size,
                    mtime_ms: 1_700_000_000_000,
                },
            );
        }
    }

    /// Whether `path` is a directory.
    pub fn is_dir(&self, path: &str) -> bool {
        normalize(path).is_some_and(|p| self.nodes.get(&p) == Some(&Node::Dir))
    }

    /// Whether anything exists at `path`.
    pub fn exists(&self, path: &str) -> bool {
        normalize(path).is_some_and(|p| self.nodes.contains_key(&p))
    }

    fn mkdirs(&mut self, p: &str) {
        let mut cur = String::new();
        for part in p.split('/').filter(|s| !s.is_empty()) {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(part);
            self.nodes.entry(cur.clone()).or_insert(Node::Dir);
        }
    }

    fn children(&self, dir: &str) -> Vec<DirEntry> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        self.nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, _)| !k.is_empty() && !k[prefix.len()..].contains('/'))
            .map(|(k, n)| {
                let name = k[prefix.len()..].to_owned();
                match *n {
                    Node::Dir => DirEntry::Dir { name },
                    Node::File { size, mtime_ms } => DirEntry::File {
                        name,
                        size,
                        mtime_ms,
                    },
                }
            })
            .collect()
    }

    fn subtree(&self, p: &str) -> Vec<String> {
        let prefix = format!("{p}/");
        self.nodes
            .keys()
            .filter(|k| *k == p || k.starts_with(&prefix))
            .cloned()
            .collect()
    }
}

/// `a/./b/` → `a/b`; `.` and `` → root; absolute paths and `..` → `None` (PATH).
fn normalize(path: &str) -> Option<String> {
    if path.starts_with('/') || path.contains('\0') || path.contains('\\') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// What the simulated daemon observed, shared with its handle.
#[derive(Default)]
struct Observed {
    counts: HashMap<String, u64>,
    frames: Vec<Vec<u8>>,
    errors: Vec<ErrorFrame>,
    close: Option<(u16, String)>,
    sessions: HashMap<String, String>,
}

struct Shared {
    observed: Mutex<Observed>,
    answering: AtomicBool,
    frozen: AtomicBool,
    ended: AtomicBool,
    frames_in: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Observed> {
        self.observed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Ctl {
    Send(WsMessage),
    Close(u16),
}

/// A connected simulated daemon; dropping it drops the connection.
pub struct SimDaemon {
    pub device_id: String,
    pub params: SessionParams,
    pub codec: Codec,
    shared: Arc<Shared>,
    ctl: smol::channel::Sender<Ctl>,
    task: Option<smol::Task<()>>,
}

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(32 * 1024 * 1024)
}

/// Opens a WebSocket to `ws://addr/ws` without any handshake on top.
pub async fn open(addr: SocketAddr) -> std::io::Result<Ws> {
    let tcp = TcpStream::connect(addr).await?;
    let url = format!("ws://{addr}/ws");
    let (ws, _resp) = async_tungstenite::client_async_with_config(url, tcp, Some(ws_config()))
        .await
        .map_err(std::io::Error::other)?;
    Ok(ws)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A random base64url string of `len` characters (not cryptographic; unique enough for nonces).
pub fn random_id(len: usize) -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u64(now_ms());
        h.write_u32(std::process::id());
        let mut v = h.finish();
        for _ in 0..10 {
            if out.len() == len {
                break;
            }
            out.push(ALPHABET[(v & 63) as usize] as char);
            v >>= 6;
        }
    }
    out
}

/// Encodes a message as a frame of `codec`.
pub fn frame(msg: &Message, codec: Codec) -> WsMessage {
    match codec {
        Codec::Cbor => WsMessage::Binary(msg.encode(codec).unwrap_or_default().into()),
        Codec::Json => {
            let bytes = msg.to_compat().encode(codec).unwrap_or_default();
            WsMessage::Text(String::from_utf8(bytes).unwrap_or_default().into())
        }
    }
}

/// Decodes a data frame (text as JSON, binary as CBOR).
pub fn decode(frame: &WsMessage) -> Option<Message> {
    match frame {
        WsMessage::Text(t) => Message::decode(t.as_bytes(), Codec::Json).ok(),
        WsMessage::Binary(b) => Message::decode(b, Codec::Cbor).ok(),
        _ => None,
    }
}

/// Reads until the peer closes: returns the `e` frame and close frame seen (for refusals).
pub async fn read_refusal(ws: &mut Ws, limit: Duration) -> Refusal {
    let mut refusal = Refusal::default();
    let _ = async {
        while let Some(Ok(f)) = ws.next().await {
            match &f {
                WsMessage::Close(c) => {
                    refusal.close = c
                        .as_ref()
                        .map(|c| (u16::from(c.code), c.reason.to_string()));
                    break;
                }
                other => {
                    if let Some(Message::Error(e)) = decode(other) {
                        refusal.error = Some(e);
                    }
                }
            }
        }
        Some(())
    }
    .or(async {
        smol::Timer::after(limit).await;
        None
    })
    .await;
    refusal
}

impl SimDaemon {
    /// Connects, runs the handshake (with the configured fault), and on success starts
    /// answering requests in a background task.
    pub async fn connect(config: SimConfig) -> std::io::Result<Handshake> {
        let ws = open(config.addr).await?;
        Self::connect_over(config, ws).await
    }

    /// [`SimDaemon::connect`] over a WebSocket the caller opened (the load generator does its
    /// own, lighter upgrade).
    pub async fn connect_over(config: SimConfig, mut ws: Ws) -> std::io::Result<Handshake> {
        let nonce = config.nonce.clone().unwrap_or_else(|| random_id(20));
        let real_now = now_ms();
        let ts = match (&config.fault, config.ts_ms) {
            (_, Some(ts)) => ts,
            (Fault::SkewMs(skew), None) => real_now.saturating_add_signed(*skew),
            _ => real_now,
        };
        let claimed = match &config.fault {
            Fault::ClaimDevice(other) => other.clone(),
            _ => config.device_id.clone(),
        };
        let (client, h1) = ClientHandshake::new(config.secret.as_str(), &claimed, &nonce, ts)
            .map_err(|e| std::io::Error::other(format!("cannot build h1: {e}")))?;
        let mut mac = h1.mac.clone();
        if config.fault == Fault::WrongMac {
            let flipped = if mac.starts_with('A') { "B" } else { "A" };
            mac.replace_range(0..1, flipped);
        }
        let hello = Message::Hello(Hello {
            device_id: h1.device_id.clone(),
            auth_token: None,
            key_id: Some(h1.key_id.clone()),
            nonce: h1.nonce.clone(),
            timestamp_ms: h1.ts_ms,
            mac,
            fingerprint: None,
            hostname: config.hostname.clone(),
            os: config.os.clone(),
            agent_version: config.agent_version.clone(),
        });
        let first = match &config.fault {
            Fault::NeverSendH1 => None,
            Fault::Version(v) => Some(frame(
                &Message::HelloUnsupported(UnsupportedHello { version: *v }),
                config.codec,
            )),
            Fault::Oversize(n) => Some(WsMessage::Binary(vec![0xA5u8; *n].into())),
            Fault::Garbage => Some(match config.codec {
                Codec::Json => WsMessage::Text("{\"v\":1,\"t\":\"h1\",".into()),
                Codec::Cbor => WsMessage::Binary(Bytes::from_static(&[0xff, 0x00, 0x13])),
            }),
            Fault::UnknownFirst => Some(frame(
                &Message::Unknown {
                    t: "zz".into(),
                    request_id: None,
                },
                config.codec,
            )),
            _ => Some(frame(&hello, config.codec)),
        };
        if let Some(f) = first {
            // A refused oversize frame may already be answered before it is fully written.
            let _ = ws.send(f).await;
        }
        let deadline = smol::Timer::after(config.timeout);
        let answer = async {
            let mut refusal = Refusal::default();
            while let Some(Ok(f)) = ws.next().await {
                match decode(&f) {
                    Some(Message::HelloAck(ack)) => {
                        let fields = H2Fields {
                            sid: &ack.connection_id,
                            server_nonce: &ack.nonce,
                            hb: u64::from(ack.heartbeat_secs),
                            mx: u64::from(ack.max_chunk),
                            mac: &ack.mac,
                        };
                        return match client.handle_h2(&fields) {
                            Ok(params) => Ok(params),
                            Err(e) => Err(Refusal {
                                error: Some(ErrorFrame {
                                    request_id: None,
                                    code: ErrorCode::Auth,
                                    message: Some(format!("bad h2: {e}")),
                                }),
                                close: None,
                            }),
                        };
                    }
                    Some(Message::Error(e)) => refusal.error = Some(e),
                    _ => {
                        if let WsMessage::Close(c) = &f {
                            refusal.close = c
                                .as_ref()
                                .map(|c| (u16::from(c.code), c.reason.to_string()));
                            break;
                        }
                    }
                }
            }
            Err(refusal)
        }
        .or(async {
            deadline.await;
            Err(Refusal::default())
        })
        .await;
        let params = match answer {
            Ok(p) => p,
            Err(refusal) => return Ok(Handshake::Refused(refusal)),
        };
        Ok(Handshake::Accepted(Self::start(config, ws, params)))
    }

    fn start(config: SimConfig, ws: Ws, params: SessionParams) -> SimDaemon {
        let shared = Arc::new(Shared {
            observed: Mutex::new(Observed::default()),
            answering: AtomicBool::new(true),
            frozen: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            frames_in: AtomicU64::new(0),
        });
        let (ctl_tx, ctl_rx) = smol::channel::unbounded();
        let device_id = config.device_id.clone();
        let codec = config.codec;
        let task = smol::spawn(run(config, ws, shared.clone(), ctl_rx));
        SimDaemon {
            device_id,
            params,
            codec,
            shared,
            ctl: ctl_tx,
            task: Some(task),
        }
    }

    /// How many requests of type `t` arrived.
    pub fn count(&self, t: &str) -> u64 {
        self.shared.lock().counts.get(t).copied().unwrap_or(0)
    }

    /// Every frame received after the handshake (if recording).
    pub fn frames(&self) -> Vec<Vec<u8>> {
        self.shared.lock().frames.clone()
    }

    /// Every `e` frame received after the handshake.
    pub fn errors(&self) -> Vec<ErrorFrame> {
        self.shared.lock().errors.clone()
    }

    /// The close frame the control plane sent, if any.
    pub fn close_frame(&self) -> Option<(u16, String)> {
        self.shared.lock().close.clone()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.ended.load(Ordering::Acquire)
    }

    /// Waits up to `limit` for the connection to end.
    pub async fn closed_within(&self, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if self.is_closed() {
                return true;
            }
            smol::Timer::after(Duration::from_millis(20)).await;
        }
        self.is_closed()
    }

    /// Stop (false) or resume (true) answering requests; they are still counted.
    pub fn hold(&self, answer: bool) {
        self.shared.answering.store(answer, Ordering::Release);
    }

    /// Stop reading the socket altogether: no replies, no pongs (a hung host).
    pub fn freeze(&self) {
        self.shared.frozen.store(true, Ordering::Release);
    }

    /// Sends a raw frame.
    pub fn send_raw(&self, frame: WsMessage) {
        let _ = self.ctl.try_send(Ctl::Send(frame));
    }

    /// Sends a message in this daemon's codec.
    pub fn send(&self, msg: &Message) {
        self.send_raw(frame(msg, self.codec));
    }

    /// Closes the connection with `code`.
    pub fn close(&self, code: u16) {
        let _ = self.ctl.try_send(Ctl::Close(code));
    }

    /// Frames received so far (any kind, after the handshake).
    pub fn frames_received(&self) -> u64 {
        self.shared.frames_in.load(Ordering::Relaxed)
    }
}

impl Drop for SimDaemon {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            drop(task);
        }
    }
}

async fn run(
    config: SimConfig,
    mut ws: Ws,
    shared: Arc<Shared>,
    ctl: smol::channel::Receiver<Ctl>,
) {
    let codec = config.codec;
    if config.telemetry {
        let p = Message::Telemetry(Telemetry {
            uptime_secs: 1,
            rss_bytes: 8 * 1024 * 1024,
            active_handles: 0,
        });
        let _ = ws.send(frame(&p, codec)).await;
    }
    loop {
        if shared.frozen.load(Ordering::Acquire) {
            // A hung host: read nothing (so no pongs), wait for an explicit close.
            match ctl.recv().await {
                Ok(Ctl::Close(_)) | Err(_) => break,
                Ok(Ctl::Send(_)) => continue,
            }
        }
        enum Ev {
            Frame(Option<WsMessage>),
            Ctl(Option<Ctl>),
        }
        let ev = async { Ev::Frame(ws.next().await.and_then(Result::ok)) }
            .or(async { Ev::Ctl(ctl.recv().await.ok()) })
            .await;
        match ev {
            Ev::Ctl(Some(Ctl::Send(f))) => {
                let _ = ws.send(f).await;
            }
            Ev::Ctl(Some(Ctl::Close(code))) => {
                let _ = ws
                    .close(Some(CloseFrame {
                        code: code.into(),
                        reason: "sim close".into(),
                    }))
                    .await;
                break;
            }
            Ev::Ctl(None) | Ev::Frame(None) => break,
            Ev::Frame(Some(f)) => {
                shared.frames_in.fetch_add(1, Ordering::Relaxed);
                if let WsMessage::Close(c) = &f {
                    shared.lock().close = c
                        .as_ref()
                        .map(|c| (u16::from(c.code), c.reason.to_string()));
                    continue;
                }
                if config.record_frames && matches!(f, WsMessage::Text(_) | WsMessage::Binary(_)) {
                    let raw = match &f {
                        WsMessage::Text(t) => t.as_bytes().to_vec(),
                        WsMessage::Binary(b) => b.to_vec(),
                        _ => Vec::new(),
                    };
                    shared.lock().frames.push(raw);
                }
                let Some(msg) = decode(&f) else {
                    continue;
                };
                let t = msg.type_tag().to_owned();
                *shared.lock().counts.entry(t).or_insert(0) += 1;
                if let Message::Error(e) = &msg {
                    shared.lock().errors.push(e.clone());
                    continue;
                }
                if !shared.answering.load(Ordering::Acquire) {
                    continue;
                }
                for reply in answer(&config, &shared, msg) {
                    if ws.send(frame(&reply, codec)).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    shared.ended.store(true, Ordering::Release);
}

fn path_error(id: u32) -> Message {
    Message::error(ErrorCode::Path, Some(id), None)
}

/// The replies to one request (usually one; `sl` gets a stream of chunks).
fn answer(config: &SimConfig, shared: &Shared, msg: Message) -> Vec<Message> {
    let mut tree = config.tree.lock().unwrap_or_else(|p| p.into_inner());
    let reply = match msg {
        Message::DirList(r) => {
            if r.root != "cwd" {
                return vec![Message::error(ErrorCode::Root, Some(r.request_id), None)];
            }
            match normalize(&r.path) {
                Some(p) if tree.nodes.get(&p) == Some(&Node::Dir) => {
                    let mut entries = tree.children(&p);
                    entries.truncate(usize::from(r.limit));
                    Message::DirListing(DirListing {
                        request_id: r.request_id,
                        cursor: r.cursor.filter(|c| !c.is_empty()),
                        entries,
                    })
                }
                _ => path_error(r.request_id),
            }
        }
        Message::MakeDir(r) => match normalize(&r.path) {
            Some(p) if !matches!(tree.nodes.get(&p), Some(Node::File { .. })) => {
                tree.mkdirs(&p);
                Message::MakeDirResult(FsResult {
                    request_id: r.request_id,
                    ok: true,
                })
            }
            _ => path_error(r.request_id),
        },
        Message::RemoveDir(r) => match normalize(&r.path) {
            Some(p) if !p.is_empty() && tree.nodes.get(&p) == Some(&Node::Dir) => {
                let sub = tree.subtree(&p);
                let ok = r.recursive || sub.len() == 1;
                if ok {
                    for k in sub {
                        tree.nodes.remove(&k);
                    }
                }
                Message::RemoveDirResult(FsResult {
                    request_id: r.request_id,
                    ok,
                })
            }
            _ => path_error(r.request_id),
        },
        Message::Rename(r) => match (normalize(&r.source), normalize(&r.dest)) {
            (Some(s), Some(d)) if !s.is_empty() && !d.is_empty() && tree.nodes.contains_key(&s) => {
                if tree.nodes.contains_key(&d) && !r.overwrite {
                    Message::RenameResult(FsResult {
                        request_id: r.request_id,
                        ok: false,
                    })
                } else {
                    for k in tree.subtree(&d) {
                        tree.nodes.remove(&k);
                    }
                    for k in tree.subtree(&s) {
                        if let Some(n) = tree.nodes.remove(&k) {
                            tree.nodes.insert(format!("{d}{}", &k[s.len()..]), n);
                        }
                    }
                    if let Some((parent, _)) = d.rsplit_once('/') {
                        tree.mkdirs(parent);
                    }
                    Message::RenameResult(FsResult {
                        request_id: r.request_id,
                        ok: true,
                    })
                }
            }
            _ => path_error(r.request_id),
        },
        Message::SessionStatusQuery(q) => {
            let folder = normalize(&q.folder).unwrap_or_default();
            let session = shared.lock().sessions.get(&folder).cloned();
            Message::SessionStatus(SessionStatus {
                request_id: q.request_id,
                running: session.is_some(),
                port: session.as_ref().map(|_| 4096),
                pid: session.as_ref().map(|_| 4242),
                url: session
                    .as_ref()
                    .map(|s| format!("http://127.0.0.1:4096/{folder}/session/{s}")),
                reason: session.is_none().then(|| "not_running".to_owned()),
                session_id: session,
                protection: None,
            })
        }
        Message::StartSession(s) => {
            let folder = normalize(s.folder.as_deref().unwrap_or(".")).unwrap_or_default();
            shared
                .lock()
                .sessions
                .insert(folder.clone(), s.session_id.clone());
            Message::SessionResult(SessionResult {
                request_id: s.request_id,
                url: Some(format!(
                    "http://127.0.0.1:4096/{folder}/session/{}",
                    s.session_id
                )),
                session_id: s.session_id,
                ok: true,
                reason: None,
            })
        }
        Message::StopSession(s) => {
            let mut observed = shared.lock();
            let before = observed.sessions.len();
            observed.sessions.retain(|_, v| *v != s.session_id);
            let ok = observed.sessions.len() < before;
            Message::SessionResult(SessionResult {
                request_id: s.request_id,
                session_id: s.session_id,
                ok,
                reason: (!ok).then(|| "not_running".to_owned()),
                url: None,
            })
        }
        Message::ReplayLog(r) => {
            let text: String = config
                .log
                .lines()
                .rev()
                .take(usize::from(r.lines))
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return chunks(&r.stream_id, &text);
        }
        Message::SetupStatusQuery(q) => Message::SetupStatus(SetupStatus {
            request_id: q.request_id,
            ok: true,
            configured: true,
            control_plane_url: Some(format!("ws://{}/ws", config.addr)),
            has_token: true,
            opencode_command: Some("opencode".into()),
            opencode_host: None,
            opencode_start_port: Some(4096),
            provider_id: None,
            model_id: None,
            request_timeout_ms: Some(10_000),
            message: None,
        }),
        Message::SetupSave(s) => Message::SetupSaveResult(SetupSaveResult {
            request_id: s.request_id,
            ok: true,
            message: Some("saved_restart_required".into()),
        }),
        Message::ConfigPush(c) => Message::ConfigResult(ConfigResult {
            request_id: c.request_id,
            phase: c.phase,
            scope: c.scope,
            ok: true,
            template_id: c.template_id,
            template_version: c.template_version,
            outcome: ConfigOutcome::Applied,
            digest: codemantle_protocol::canonical::digest(&c.config),
            at_ms: now_ms(),
            apply_path: Some(c.apply_path),
            violations: Vec::new(),
            signature_alg: c.signature_alg,
            signature: c.signature,
            policy_mode: c.policy_mode,
            message: Some("config_applied".into()),
        }),
        Message::JitKill(k) => Message::JitKillResult(JitKillResult {
            request_id: k.request_id,
            ok: true,
            affected: 0,
            message: None,
        }),
        Message::GitStatus(r) => Message::GitStatusResult(GitStatusResult {
            request_id: r.request_id,
            ok: true,
            branch: Some("main".into()),
            added: Some(Vec::new()),
            modified: Some(vec!["README.md".into()]),
            untracked: Some(Vec::new()),
            deleted: Some(Vec::new()),
            conflict: None,
            error: None,
        }),
        Message::GitCommit(r) => Message::GitCommitResult(GitCommitResult {
            request_id: r.request_id,
            ok: true,
            hash: Some("abc1234".into()),
            message: Some(r.message),
        }),
        Message::GitBranch(r) => Message::GitBranchResult(GitBranchResult {
            request_id: r.request_id,
            ok: true,
            branches: Some(vec!["main".into()]),
            current: Some("main".into()),
            message: None,
        }),
        Message::GitConfig(r) => Message::GitConfigResult(GitConfigResult {
            request_id: r.request_id,
            ok: true,
            name: r.name,
            email: r.email,
            helper: None,
            auth_ready: Some(false),
            message: None,
        }),
        Message::GitInit(r) => git_ok(Message::GitInitResult, r.request_id),
        Message::GitClone(r) => git_ok(Message::GitCloneResult, r.request_id),
        Message::GitAdd(r) => git_ok(Message::GitAddResult, r.request_id),
        Message::GitPush(r) => git_ok(Message::GitPushResult, r.request_id),
        Message::GitPull(r) => git_ok(Message::GitPullResult, r.request_id),
        Message::GitCheckout(r) => git_ok(Message::GitCheckoutResult, r.request_id),
        // Fire-and-forget and acknowledgements: counted, never answered.
        Message::Prompt(_) | Message::StreamAck(_) | Message::HelloAck(_) => return Vec::new(),
        other => Message::error(ErrorCode::Proto, other.request_id(), None),
    };
    vec![reply]
}

fn git_ok(variant: fn(GitResult) -> Message, request_id: u32) -> Message {
    variant(GitResult {
        request_id,
        ok: true,
        message: Some("done".into()),
    })
}

/// Splits `text` into `sc` chunks of at most 8192 bytes (on char boundaries).
fn chunks(stream_id: &str, text: &str) -> Vec<Message> {
    let mut out = Vec::new();
    let mut rest = text;
    let mut seq = 0u32;
    loop {
        let mut cut = rest.len().min(8192);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        out.push(Message::StreamChunk(StreamChunk {
            stream_id: stream_id.to_owned(),
            seq,
            last: tail.is_empty(),
            data: head.to_owned(),
        }));
        if tail.is_empty() {
            return out;
        }
        rest = tail;
        seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_operations() {
        let mut t = Tree::default();
        t.add_file("src/main.rs", 10);
        t.add_dir("docs");
        assert!(t.is_dir("src") && t.is_dir("./docs/") && t.exists("src/main.rs"));
        let names: Vec<String> = t.children("").iter().map(|e| e.name().to_owned()).collect();
        assert_eq!(names, ["docs", "src"]);
        assert_eq!(normalize("../x"), None);
        assert_eq!(normalize("/etc"), None);
        assert_eq!(normalize("a/./b/").as_deref(), Some("a/b"));
    }

    #[test]
    fn log_chunks_cover_the_text() {
        let text = "x".repeat(20_000);
        let c = chunks("stream0001", &text);
        assert_eq!(c.len(), 3);
        assert!(matches!(&c[2], Message::StreamChunk(s) if s.last && s.seq == 2));
        assert!(
            matches!(&chunks("stream0001", "")[0], Message::StreamChunk(s) if s.last && s.data.is_empty())
        );
    }

    #[test]
    fn random_ids_are_base64url_and_differ() {
        let a = random_id(20);
        assert_eq!(a.len(), 20);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(a, random_id(20));
    }
}
