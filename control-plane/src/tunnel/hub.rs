//! The device hub: which connection serves which device, and request/reply correlation.
//!
//! Every connected device has one [`Conn`], shared between its connection task (which owns the
//! socket) and the HTTP handlers that dispatch commands to it. The handlers never touch the
//! socket: they encode a frame, park a [`Pending`] entry under a fresh request id and push the
//! frame into the connection's outbox; the connection task writes it and, when the reply comes
//! back, settles the pending entry. So a slow socket slows only its own device, and a heartbeat
//! never waits behind a dispatch (or the other way round).
//!
//! Why the outbox is a `VecDeque` behind the connection's mutex and not an `async_channel`: a
//! bounded `async_channel` allocates all its slots up front, for every idle device. A `VecDeque`
//! allocates on first use, and the bound (pending requests per device) is checked under the same
//! lock that inserts the pending entry.
//!
//! Correlation follows 0.1.50 (§2.6) with its gaps closed: a reply settles a request only if it
//! comes from the **same connection**, carries the **same request id** and is of the **expected
//! kind**; an `e` with that id fails it. Request ids are per connection, start at a random value
//! (so ids are not reused across reconnects, which keeps config-push status handles distinct),
//! skip 0 and ids still pending, and wrap. When a connection ends, every request pending on it
//! fails at once (`device_replaced` when a newer connection of the same device took over,
//! `device_disconnected` otherwise) instead of waiting for its timeout (0.1.50 §12.2 #9).
//!
//! Port-proxy answers ([`DeviceHub::proxy`]): the `pv` settles the request like any reply; a
//! streamed one (`ss:1`) also opens a *proxy stream* under the same id on the same connection,
//! which its `ps` chunks feed and its `pe` ends ([`ProxyBody`]). Only the connection that
//! answered can feed it (0.1.50 let any device inject into any stream, §12.1 #3). A stream
//! holds at most [`PROXY_STREAM_BUFFER_BYTES`] its HTTP client has not read yet: a client that
//! falls further behind is cut off instead of the control plane buffering without bound (the
//! daemon is told with `pe`, as when the client goes away). Native daemons never get that far:
//! they keep at most a window in flight and are granted more with `pw` as the client takes the
//! body ([`PROXY_CREDIT_BYTES`]), so a slow client slows the upstream down instead. Open
//! streams count against the device's pending-request cap.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_tungstenite::tungstenite::Message as WsMessage;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use codemantle_protocol::codec::{self, Codec};
use codemantle_protocol::error::{EncodeError, ErrorCode};
use codemantle_protocol::message::{
    Message, MessageKind, ProxyResponse, ProxyWindow, RequestOnly, StreamChunk,
};
use futures_lite::FutureExt as _;

use super::recorder::Recorder;
use crate::events::CommandRecord;
use crate::metrics::Metrics;
use crate::presence::ConnectionId;
use crate::store::{Device, Store, StoreResult, TenantId};

/// Timeouts and bounds of command dispatch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchConfig {
    /// Reply timeout of most commands (0.1.50 `REQUEST_TIMEOUT_MS`, 15 s).
    pub request_timeout: Duration,
    /// Reply timeout of git commands (clone/push/pull can take minutes; 0.1.50: 180 s).
    pub git_timeout: Duration,
    /// Reply timeout of port-proxy requests (0.1.50: 20 s).
    pub proxy_timeout: Duration,
    /// Reply timeout of a session start: the daemon waits up to its own `start_timeout_s`
    /// (30 s by default) for OpenCode to answer its health check, so this must be longer.
    pub session_start_timeout: Duration,
    /// Requests in flight per device before new ones get 429 `device_busy`.
    pub max_pending_per_device: usize,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            request_timeout: Duration::from_secs(15),
            git_timeout: Duration::from_secs(180),
            proxy_timeout: Duration::from_secs(20),
            session_start_timeout: Duration::from_secs(45),
            max_pending_per_device: 256,
        }
    }
}

/// Largest assembled session-log snapshot (`sl` → `sc`*): 200 lines of a few KiB each.
pub const MAX_SNAPSHOT_BYTES: usize = 4 * 1024 * 1024;

/// Frames that may wait in one outbox beyond the pending requests (acks, fire-and-forget).
const OUTBOX_SLACK: usize = 64;

/// Most bytes of one proxied response body waiting for its HTTP client (see the module doc).
pub const PROXY_STREAM_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A native daemon gets `pw` credit each time the HTTP client has taken this much more of a
/// stream. Must stay well under the daemon's window (2 MiB), or the two would wait for each
/// other.
pub const PROXY_CREDIT_BYTES: usize = 256 * 1024;

/// A piece of a streamed proxy answer.
#[derive(Debug)]
enum ProxyPiece {
    Data(Vec<u8>),
    End,
}

/// The sending side of an open proxy stream (in the connection's state).
struct ProxyTx {
    tx: async_channel::Sender<ProxyPiece>,
    /// Bytes sent and not yet taken by the HTTP body.
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// The answer to a port-proxy request: the `pv`, and its body stream when `pv.ss` is set.
pub struct ProxyReply {
    pub head: ProxyResponse,
    pub body: Option<ProxyBody>,
}

/// The body of a streamed proxy answer. Dropping it before the end (the HTTP client went
/// away) closes the stream and tells a native daemon to stop (`pe`).
pub struct ProxyBody {
    conn: Arc<Conn>,
    id: u32,
    rx: async_channel::Receiver<ProxyPiece>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
    ended: bool,
    /// Bytes taken by the client and not yet granted back to the daemon as `pw`.
    uncredited: usize,
}

/// How a streamed proxy body went on.
#[derive(Debug, PartialEq, Eq)]
pub enum ProxyNext {
    Data(Vec<u8>),
    /// The daemon sent `pe`: the body is complete.
    End,
    /// The stream was cut: the connection ended, or the client fell too far behind.
    Cut,
}

impl ProxyBody {
    /// The next piece of the body.
    pub async fn next(&mut self) -> ProxyNext {
        if self.ended {
            return ProxyNext::End;
        }
        match self.rx.recv().await {
            Ok(ProxyPiece::Data(d)) => {
                self.queued.fetch_sub(d.len(), Ordering::SeqCst);
                self.uncredited += d.len();
                if self.uncredited >= PROXY_CREDIT_BYTES {
                    self.conn.grant_proxy(self.id, self.uncredited);
                    self.uncredited = 0;
                }
                ProxyNext::Data(d)
            }
            Ok(ProxyPiece::End) => {
                self.ended = true;
                ProxyNext::End
            }
            Err(_) => {
                self.ended = true;
                ProxyNext::Cut
            }
        }
    }

    /// The request id the stream answers.
    pub fn request_id(&self) -> u32 {
        self.id
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.cancel_proxy(self.id);
        }
    }
}

/// Why a command did not produce a reply.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DispatchError {
    /// No tunnel is open for the device.
    #[error("device {device_id} is not connected")]
    Offline { device_id: String },
    /// Too many requests are in flight on the device.
    #[error("{limit} requests are already in flight on this device")]
    Busy { limit: usize },
    /// The request breaks a limit the daemon enforces; it was not sent.
    #[error("the request cannot be sent: {0}")]
    Invalid(EncodeError),
    /// The request uses a field only native (CBOR) daemons understand, and this device speaks
    /// the 0.1.x JSON protocol, which would silently drop it.
    #[error("`{t}` carries an option that 0.1.x daemons do not support")]
    Unsupported { t: String },
    /// No reply within the operation's timeout.
    #[error("no reply within {} s", after.as_secs())]
    Timeout { after: Duration },
    /// A newer connection of the same device replaced the one the request was sent on.
    #[error("the device reconnected (a newer connection replaced this one)")]
    Replaced,
    /// The connection ended before the reply.
    #[error("the device disconnected")]
    Disconnected,
    /// The daemon answered with an `e` frame.
    #[error("the device answered {code}{}", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Remote {
        code: ErrorCode,
        message: Option<String>,
    },
    /// A streamed reply grew past its limit.
    #[error("the device's reply exceeds {limit} bytes")]
    TooLarge { limit: usize },
    /// The device ran a mutating command, but its `command` event could not be recorded (the
    /// store refused the write or its flush failed, e.g. on a full disk): answering success
    /// would leave a change the event log never shows. A retry with the same Idempotency-Key
    /// is answered from the daemon's journal and recorded then (found by `cm-soak`).
    #[error("the command ran but could not be recorded: {reason}")]
    Unrecorded { reason: String, storage_full: bool },
}

impl DispatchError {
    /// The `outcome` recorded in the command event (low cardinality).
    pub fn outcome(&self) -> String {
        match self {
            DispatchError::Offline { .. } => "device_offline".into(),
            DispatchError::Busy { .. } => "device_busy".into(),
            DispatchError::Invalid(_) => "invalid".into(),
            DispatchError::Unsupported { .. } => "unsupported".into(),
            DispatchError::Timeout { .. } => "timeout".into(),
            DispatchError::Replaced => "device_replaced".into(),
            DispatchError::Disconnected => "device_disconnected".into(),
            DispatchError::Remote { code, .. } => format!("E_{}", code.as_str()),
            DispatchError::TooLarge { .. } => "too_large".into(),
            DispatchError::Unrecorded { .. } => "unrecorded".into(),
        }
    }
}

/// Why the control plane ends a connection on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// A newer connection of the same device took over (1012 "replaced", as 0.1.50).
    Replaced,
    /// The device was removed from the inventory; its key no longer works.
    Removed,
    /// The server is shutting down.
    ShuttingDown,
}

impl CloseCause {
    /// WebSocket close code and reason.
    pub fn close_frame(self) -> (u16, &'static str) {
        match self {
            CloseCause::Replaced => (1012, "replaced"),
            CloseCause::Removed => (1008, "device removed"),
            CloseCause::ShuttingDown => (1001, "server shutting down"),
        }
    }

    /// What requests pending on the connection fail with.
    pub fn dispatch_error(self) -> DispatchError {
        match self {
            CloseCause::Replaced => DispatchError::Replaced,
            CloseCause::Removed | CloseCause::ShuttingDown => DispatchError::Disconnected,
        }
    }

    /// Reason recorded in the `device.disconnected` event.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCause::Replaced => "replaced",
            CloseCause::Removed => "removed",
            CloseCause::ShuttingDown => "server_shutdown",
        }
    }
}

/// Who is asking, for the command event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: TenantId,
    /// `token:<id>`, ...
    pub actor: String,
    /// The native-only `ik` to send with mutating requests (see [`idempotency_token`]).
    pub idempotency: Option<String>,
}

/// A device id whose tenant has been checked against the caller's. The only way to dispatch is
/// through one of these, so no command can reach another tenant's device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedDevice {
    tenant: TenantId,
    device_id: String,
}

impl CheckedDevice {
    /// Looks `device_id` up in `tenant`; `None` if it is missing or belongs to another tenant.
    pub fn lookup(
        store: &dyn Store,
        tenant: &TenantId,
        device_id: &str,
    ) -> StoreResult<Option<(CheckedDevice, Device)>> {
        Ok(store.device(tenant, device_id)?.map(|device| {
            (
                CheckedDevice {
                    tenant: tenant.clone(),
                    device_id: device.id.clone(),
                },
                device,
            )
        }))
    }

    pub fn id(&self) -> &str {
        &self.device_id
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }
}

/// The `ik` (idempotency key) sent to native daemons with a mutating request: derived from the
/// HTTP `Idempotency-Key` when there is one, so that a retry after a timeout or a control-plane
/// restart carries the same `ik` and the daemon's journal runs the command once; otherwise a
/// fresh random 128-bit id per HTTP request. Tenant-scoped: base64url(SHA-256(tenant | key)),
/// first 32 characters.
pub fn idempotency_token(tenant: &TenantId, http_key: Option<&str>) -> String {
    let mut token = match http_key {
        Some(key) => URL_SAFE_NO_PAD.encode(crate::secrets::sha256(
            format!("{}|{key}", tenant.as_str()).as_bytes(),
        )),
        None => URL_SAFE_NO_PAD.encode(crate::secrets::random_bytes::<16>()),
    };
    token.truncate(32);
    token
}

/// True for requests that change something on the host (they get an `ik`).
pub fn is_mutating(kind: MessageKind) -> bool {
    use MessageKind as K;
    matches!(
        kind,
        K::MakeDir
            | K::RemoveDir
            | K::Rename
            | K::StartSession
            | K::StopSession
            | K::Prompt
            | K::ConfigPush
            | K::SetupSave
            | K::JitKill
            | K::JitRenew
            | K::GitInit
            | K::GitClone
            | K::GitAdd
            | K::GitCommit
            | K::GitPush
            | K::GitPull
            | K::GitBranch
            | K::GitCheckout
            | K::GitConfig
    )
}

/// Sets the native-only `ik` of a mutating request (the one place requests get it).
fn set_idempotency_key(msg: &mut Message, ik: &str) {
    let ik = Some(ik.to_owned());
    match msg {
        Message::MakeDir(m) | Message::GitStatus(m) | Message::GitInit(m) => m.idempotency_key = ik,
        Message::RemoveDir(m) => m.idempotency_key = ik,
        Message::Rename(m) => m.idempotency_key = ik,
        Message::StartSession(m) => m.idempotency_key = ik,
        Message::StopSession(m) => m.idempotency_key = ik,
        Message::Prompt(m) => m.idempotency_key = ik,
        Message::SetupSave(m) => m.idempotency_key = ik,
        Message::ConfigPush(m) => m.idempotency_key = ik,
        Message::JitKill(m) => m.idempotency_key = ik,
        Message::JitRenew(m) => m.idempotency_key = ik,
        Message::GitClone(m) => m.idempotency_key = ik,
        Message::GitAdd(m) => m.idempotency_key = ik,
        Message::GitCommit(m) => m.idempotency_key = ik,
        Message::GitPush(m) | Message::GitPull(m) => m.idempotency_key = ik,
        Message::GitBranch(m) => m.idempotency_key = ik,
        Message::GitCheckout(m) => m.idempotency_key = ik,
        Message::GitConfig(m) => m.idempotency_key = ik,
        _ => {}
    }
}

fn is_git(kind: MessageKind) -> bool {
    use MessageKind as K;
    matches!(
        kind,
        K::GitStatus
            | K::GitInit
            | K::GitClone
            | K::GitAdd
            | K::GitCommit
            | K::GitPush
            | K::GitPull
            | K::GitBranch
            | K::GitCheckout
            | K::GitConfig
    )
}

/// Whether a reply reports success (`o:1`); replies without a success flag count as success.
pub fn reply_ok(reply: &Message) -> bool {
    match reply {
        Message::MakeDirResult(r) | Message::RemoveDirResult(r) | Message::RenameResult(r) => r.ok,
        Message::SessionResult(r) => r.ok,
        Message::SetupStatus(r) => r.ok,
        Message::SetupSaveResult(r) => r.ok,
        Message::ConfigResult(r) => r.ok,
        Message::JitKillResult(r) => r.ok,
        Message::JitRenewResult(r) => r.ok,
        Message::GitStatusResult(r) => r.ok,
        Message::GitInitResult(r)
        | Message::GitCloneResult(r)
        | Message::GitAddResult(r)
        | Message::GitPushResult(r)
        | Message::GitPullResult(r)
        | Message::GitCheckoutResult(r) => r.ok,
        Message::GitCommitResult(r) => r.ok,
        Message::GitBranchResult(r) => r.ok,
        Message::GitConfigResult(r) => r.ok,
        Message::ProxyResponse(r) => r.ok,
        _ => true,
    }
}

/// Encodes `msg` for a peer: native peers get CBOR in a binary frame; 0.1.x peers get the
/// compat form (native-only fields dropped) as JSON in a text frame.
pub fn encode_frame(msg: &Message, codec: Codec) -> Result<WsMessage, EncodeError> {
    match codec {
        Codec::Cbor => Ok(WsMessage::Binary(codec::encode(msg, codec)?.into())),
        Codec::Json => {
            let bytes = codec::encode(&msg.to_compat(), codec)?;
            // The JSON encoder writes UTF-8 only; a failure here would be an encoder bug.
            let text = String::from_utf8(bytes).map_err(|_| EncodeError::Limit {
                t: "?",
                key: "?",
                why: "the JSON encoder produced invalid UTF-8",
            })?;
            Ok(WsMessage::Text(text.into()))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One connection

/// Last telemetry of a connection (`p`, `pl`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Telemetry {
    pub uptime_secs: u64,
    pub rss_bytes: u64,
    pub ports: Vec<u16>,
}

enum Expect {
    Reply(MessageKind),
    Stream { stream_id: Box<str>, text: String },
}

enum Settled {
    Reply(Message),
    Stream(String),
    /// A streamed `pv` and the receiving end of its stream.
    Proxy(
        ProxyResponse,
        async_channel::Receiver<ProxyPiece>,
        Arc<std::sync::atomic::AtomicUsize>,
    ),
}

struct Pending {
    expect: Expect,
    tx: async_channel::Sender<Result<Settled, DispatchError>>,
}

/// What an idle connection keeps is what every device costs, so the state holds nothing
/// between requests: the outbox's buffer is freed when it empties, and the request maps live
/// in boxes that exist only while something is in flight ([`LazyMap`]).
#[derive(Default)]
struct ConnState {
    outbox: VecDeque<WsMessage>,
    waker: Option<Waker>,
    closing: Option<CloseCause>,
    pending: LazyMap<u32, Pending>,
    /// Stream id → request id, for `sc` chunks (they carry no `i`).
    streams: LazyMap<Box<str>, u32>,
    /// Open proxy streams by request id, for `ps`/`pe`.
    proxy: LazyMap<u32, ProxyTx>,
    telemetry: Telemetry,
}

/// A `HashMap` that takes one pointer while empty (an empty `HashMap` is 48 bytes, and keeps
/// its table once it has had entries): it is boxed on the first insert and freed when its last
/// entry goes.
#[allow(
    clippy::box_collection,
    reason = "an empty map costs one pointer per device instead of a 48-byte HashMap"
)]
struct LazyMap<K, V>(Option<Box<HashMap<K, V>>>);

impl<K, V> Default for LazyMap<K, V> {
    fn default() -> Self {
        LazyMap(None)
    }
}

impl<K: std::hash::Hash + Eq, V> LazyMap<K, V> {
    fn get<Q>(&self, k: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.as_ref()?.get(k)
    }

    fn get_mut<Q>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.as_mut()?.get_mut(k)
    }

    fn contains_key<Q>(&self, k: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.get(k).is_some()
    }

    fn insert(&mut self, k: K, v: V) {
        self.0.get_or_insert_with(Default::default).insert(k, v);
    }

    fn remove<Q>(&mut self, k: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let map = self.0.as_mut()?;
        let v = map.remove(k);
        if map.is_empty() {
            self.0 = None;
        }
        v
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    /// Empties the map, returning its entries.
    fn take(&mut self) -> impl Iterator<Item = (K, V)> {
        self.0.take().into_iter().flat_map(|m| m.into_iter())
    }
}

/// What the connection task should do next (see [`Conn::poll_outgoing`]).
pub enum Outgoing {
    Frame(WsMessage),
    Close(CloseCause),
}

/// One live connection of a device, shared by its connection task and the dispatchers.
pub struct Conn {
    device_id: Arc<str>,
    tenant: TenantId,
    codec: Codec,
    presence: ConnectionId,
    next_id: AtomicU32,
    state: Mutex<ConnState>,
}

impl Conn {
    pub fn new(device_id: &str, tenant: TenantId, codec: Codec, presence: ConnectionId) -> Conn {
        let start = u32::from_le_bytes(crate::secrets::random_bytes::<4>());
        Conn {
            device_id: device_id.into(),
            tenant,
            codec,
            presence,
            next_id: AtomicU32::new(start),
            state: Mutex::new(ConnState::default()),
        }
    }

    pub fn device_id(&self) -> &str {
        &self.device_id
    }

    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    pub fn codec(&self) -> Codec {
        self.codec
    }

    pub fn presence_id(&self) -> ConnectionId {
        self.presence
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // Nothing in the state can be left half-updated by a panic; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Next frame to write, or a close order. Registers the waker when there is nothing.
    pub fn poll_outgoing(&self, cx: &mut Context<'_>) -> Poll<Outgoing> {
        let mut st = self.lock();
        if let Some(cause) = st.closing {
            return Poll::Ready(Outgoing::Close(cause));
        }
        if let Some(frame) = st.outbox.pop_front() {
            if st.outbox.is_empty() {
                st.outbox = VecDeque::new();
            }
            return Poll::Ready(Outgoing::Frame(frame));
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Orders the connection task to close, and fails every pending request now.
    pub fn shutdown(&self, cause: CloseCause) {
        let mut st = self.lock();
        if st.closing.is_none() {
            st.closing = Some(cause);
        }
        fail_all(&mut st, &cause.dispatch_error());
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }

    /// Fails every pending request with `err` (the connection ended).
    pub fn fail_pending(&self, err: &DispatchError) {
        fail_all(&mut self.lock(), err);
    }

    /// Settles the pending request `reply` answers, if any. Returns false if nothing was
    /// waiting for it (unknown id, or not the expected kind: ignored, as in 0.1.50).
    pub fn settle(&self, reply: Message) -> bool {
        let reply = match reply {
            Message::ProxyChunk(ps) => {
                return self.proxy_piece(ps.request_id, ProxyPiece::Data(ps.data));
            }
            Message::ProxyEnd(pe) => return self.proxy_piece(pe.request_id, ProxyPiece::End),
            Message::ProxyResponse(pv) if pv.streaming => return self.settle_proxy(pv),
            reply => reply,
        };
        let Some(id) = reply.request_id() else {
            return false;
        };
        let mut st = self.lock();
        let expected = match st.pending.get(&id) {
            Some(Pending {
                expect: Expect::Reply(kind),
                ..
            }) => *kind,
            _ => return false,
        };
        if reply.kind() != expected {
            return false;
        }
        if let Some(p) = st.pending.remove(&id) {
            let _ = p.tx.try_send(Ok(Settled::Reply(reply)));
        }
        true
    }

    /// Fails request `id` with the daemon's `e` frame. False if nothing was pending under it.
    pub fn fail(&self, id: u32, code: ErrorCode, message: Option<String>) -> bool {
        let mut st = self.lock();
        let Some(p) = st.pending.remove(&id) else {
            return false;
        };
        if let Expect::Stream { stream_id, .. } = &p.expect {
            st.streams.remove(stream_id);
        }
        let _ = p.tx.try_send(Err(DispatchError::Remote { code, message }));
        true
    }

    /// Whether a snapshot request waits for stream `x` (else its chunks are prompt output).
    pub fn awaits_stream(&self, x: &str) -> bool {
        self.lock().streams.contains_key(x)
    }

    /// Adds a chunk to the snapshot it belongs to. False if no request waits for its stream.
    pub fn stream_chunk(&self, chunk: StreamChunk) -> bool {
        let mut st = self.lock();
        let Some(&id) = st.streams.get(chunk.stream_id.as_str()) else {
            return false;
        };
        let Some(pending) = st.pending.get_mut(&id) else {
            st.streams.remove(chunk.stream_id.as_str());
            return false;
        };
        let Expect::Stream { text, .. } = &mut pending.expect else {
            return false;
        };
        let outcome = if text.len() + chunk.data.len() > MAX_SNAPSHOT_BYTES {
            Some(Err(DispatchError::TooLarge {
                limit: MAX_SNAPSHOT_BYTES,
            }))
        } else {
            text.push_str(&chunk.data);
            chunk
                .last
                .then(|| Ok(Settled::Stream(std::mem::take(text))))
        };
        if let Some(result) = outcome {
            st.streams.remove(chunk.stream_id.as_str());
            if let Some(p) = st.pending.remove(&id) {
                let _ = p.tx.try_send(result);
            }
        }
        true
    }

    /// Records `p` telemetry.
    pub fn set_usage(&self, uptime_secs: u64, rss_bytes: u64) {
        let mut st = self.lock();
        st.telemetry.uptime_secs = uptime_secs;
        st.telemetry.rss_bytes = rss_bytes;
    }

    /// Records the exposed ports (`pl`).
    pub fn set_ports(&self, ports: Vec<u16>) {
        self.lock().telemetry.ports = ports;
    }

    pub fn telemetry(&self) -> Telemetry {
        self.lock().telemetry.clone()
    }

    /// Number of requests waiting for a reply.
    pub fn pending_count(&self) -> usize {
        self.lock().pending.len()
    }

    /// Puts a frame in the outbox unconditionally (used by the connection task itself).
    pub fn push_frame(&self, frame: WsMessage) {
        let mut st = self.lock();
        st.outbox.push_back(frame);
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }

    /// Allocates an id, builds and encodes the request, and queues it. With `expect`, a pending
    /// entry is parked and its receiver returned; without, the request is fire-and-forget.
    fn enqueue(
        &self,
        max_pending: usize,
        build: impl FnOnce(u32, Option<&str>) -> Message,
        mode: Mode,
        idempotency: Option<&str>,
    ) -> Result<Queued, DispatchError> {
        let mut st = self.lock();
        if let Some(cause) = st.closing {
            return Err(cause.dispatch_error());
        }
        if st.pending.len() + st.proxy.len() >= max_pending
            || st.outbox.len() >= max_pending + OUTBOX_SLACK
        {
            return Err(DispatchError::Busy { limit: max_pending });
        }
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !st.pending.contains_key(&id) {
                break id;
            }
        };
        let stream_id = matches!(mode, Mode::Stream).then(new_stream_id);
        let mut msg = build(id, stream_id.as_deref());
        let kind = msg.kind();
        // A 0.1.x (JSON) daemon would drop a native-only field or not know a native-only
        // message (`jr`): refuse instead of sending something it cannot honour.
        let check_compat =
            !self.codec.is_native() && (msg.is_native_only() || msg.to_compat() != msg);
        if let (true, Some(ik)) = (self.codec.is_native() && is_mutating(kind), idempotency) {
            set_idempotency_key(&mut msg, ik);
        }
        if check_compat {
            return Err(DispatchError::Unsupported {
                t: msg.type_tag().to_owned(),
            });
        }
        let frame = encode_frame(&msg, self.codec).map_err(DispatchError::Invalid)?;
        let rx = match mode {
            Mode::FireAndForget => None,
            Mode::Reply | Mode::Stream => {
                let expect = match (&stream_id, msg.expected_reply()) {
                    (Some(x), _) => Expect::Stream {
                        stream_id: x.as_str().into(),
                        text: String::new(),
                    },
                    (None, Some(kind)) => Expect::Reply(kind),
                    (None, None) => {
                        return Err(DispatchError::Invalid(EncodeError::Limit {
                            t: "?",
                            key: "t",
                            why: "this message type expects no reply",
                        }));
                    }
                };
                let (tx, rx) = async_channel::bounded(1);
                st.pending.insert(id, Pending { expect, tx });
                if let Some(x) = &stream_id {
                    st.streams.insert(x.as_str().into(), id);
                }
                Some(rx)
            }
        };
        st.outbox.push_back(frame);
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        Ok(Queued {
            id,
            kind,
            stream_id,
            rx,
        })
    }

    /// A streamed `pv`: settles its request and opens the stream its `ps` chunks feed.
    fn settle_proxy(&self, pv: ProxyResponse) -> bool {
        let id = pv.request_id;
        let mut st = self.lock();
        match st.pending.get(&id) {
            Some(Pending {
                expect: Expect::Reply(MessageKind::ProxyResponse),
                ..
            }) => {}
            _ => {
                // Nobody waits any more (timed out): the daemon need not stream it.
                self.push_cancel(&mut st, id);
                return false;
            }
        }
        let Some(p) = st.pending.remove(&id) else {
            return false;
        };
        let (tx, rx) = async_channel::unbounded();
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        if p.tx
            .try_send(Ok(Settled::Proxy(pv, rx, queued.clone())))
            .is_ok()
        {
            st.proxy.insert(id, ProxyTx { tx, queued });
        }
        true
    }

    /// A `ps`/`pe` for proxy stream `id`. False if no such stream is open on this connection.
    fn proxy_piece(&self, id: u32, piece: ProxyPiece) -> bool {
        let mut st = self.lock();
        let Some(stream) = st.proxy.get(&id) else {
            // A stream nobody reads (cut, or its request timed out): tell the daemon again.
            if matches!(piece, ProxyPiece::Data(_)) {
                self.push_cancel(&mut st, id);
            }
            return false;
        };
        let cut = match &piece {
            ProxyPiece::End => {
                let _ = stream.tx.try_send(piece);
                st.proxy.remove(&id);
                return true;
            }
            ProxyPiece::Data(d) => {
                let len = d.len();
                let queued = stream.queued.fetch_add(len, Ordering::SeqCst) + len;
                queued > PROXY_STREAM_BUFFER_BYTES || stream.tx.try_send(piece).is_err()
            }
        };
        if cut {
            tracing::info!(device = %self.device_id, id, "proxy stream cut: its client is gone or too far behind");
            st.proxy.remove(&id);
            self.push_cancel(&mut st, id);
        }
        true
    }

    /// The HTTP side of proxy stream `id` is gone: forget the stream and tell the daemon.
    fn cancel_proxy(&self, id: u32) {
        let mut st = self.lock();
        if st.proxy.remove(&id).is_some() {
            self.push_cancel(&mut st, id);
        }
    }

    /// Queues `pw {i, n}` for a native daemon whose stream `id` is still open: its client
    /// took `n` more bytes.
    fn grant_proxy(&self, id: u32, n: usize) {
        let mut st = self.lock();
        if !self.codec.is_native() || st.closing.is_some() || !st.proxy.contains_key(&id) {
            return;
        }
        let msg = Message::ProxyWindow(ProxyWindow {
            request_id: id,
            bytes: u32::try_from(n).unwrap_or(u32::MAX),
        });
        if let Ok(frame) = encode_frame(&msg, self.codec) {
            st.outbox.push_back(frame);
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
    }

    /// Queues `pe {i}` for a native daemon (it stops streaming); 0.1.x daemons know no cancel.
    fn push_cancel(&self, st: &mut ConnState, id: u32) {
        if !self.codec.is_native() || st.closing.is_some() {
            return;
        }
        let msg = Message::ProxyEnd(RequestOnly { request_id: id });
        if let Ok(frame) = encode_frame(&msg, self.codec) {
            st.outbox.push_back(frame);
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
    }

    /// Proxy streams open on this connection.
    pub fn proxy_stream_count(&self) -> usize {
        self.lock().proxy.len()
    }

    fn forget(&self, id: u32) {
        let mut st = self.lock();
        if let Some(p) = st.pending.remove(&id) {
            if let Expect::Stream { stream_id, .. } = p.expect {
                st.streams.remove(&stream_id);
            }
        }
    }
}

fn fail_all(st: &mut ConnState, err: &DispatchError) {
    for (_, p) in st.pending.take() {
        let _ = p.tx.try_send(Err(err.clone()));
    }
    st.streams.take().for_each(drop);
    st.proxy.take().for_each(drop);
    st.outbox = VecDeque::new();
}

fn new_stream_id() -> String {
    let mut id = URL_SAFE_NO_PAD.encode(crate::secrets::random_bytes::<12>());
    id.truncate(16);
    id
}

#[derive(Clone, Copy)]
enum Mode {
    Reply,
    Stream,
    FireAndForget,
}

struct Queued {
    id: u32,
    kind: MessageKind,
    stream_id: Option<String>,
    rx: Option<async_channel::Receiver<Result<Settled, DispatchError>>>,
}

/// Removes a pending entry when the waiting request goes away (timeout, or the HTTP client
/// disconnected and its handler future was dropped).
struct PendingGuard<'a> {
    conn: &'a Conn,
    id: u32,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.conn.forget(self.id);
    }
}

// ---------------------------------------------------------------------------------------------
// The hub

/// A request that was sent without waiting for a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub request_id: u32,
}

/// Registry of live connections, and the dispatcher.
pub struct DeviceHub {
    devices: Mutex<HashMap<Arc<str>, Arc<Conn>>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    config: DispatchConfig,
    /// Session output streams (`sc` of prompts), shared with the API.
    pub streams: crate::streams::Streams,
    /// Command records here; the tunnel's connects and disconnects too (one ordered queue).
    recorder: Recorder,
}

impl DeviceHub {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>, config: DispatchConfig) -> Self {
        DeviceHub {
            devices: Mutex::new(HashMap::new()),
            streams: crate::streams::Streams::with_store(Default::default(), store.clone()),
            store,
            metrics,
            config,
            recorder: Recorder::new(),
        }
    }

    pub fn config(&self) -> &DispatchConfig {
        &self.config
    }

    /// The queue of bookkeeping writes (see [`super::recorder`]).
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Arc<Conn>>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `conn` the device's connection. A previous connection of the device is told to
    /// close (1012 "replaced") and its pending requests fail at once.
    pub fn register(&self, conn: Arc<Conn>) {
        let old = self.lock().insert(conn.device_id.clone(), conn);
        if let Some(old) = old {
            old.shutdown(CloseCause::Replaced);
        }
    }

    /// Removes `conn` if it is still its device's connection; true if it was.
    pub fn unregister(&self, conn: &Arc<Conn>) -> bool {
        let mut devices = self.lock();
        match devices.get(conn.device_id()) {
            Some(current) if Arc::ptr_eq(current, conn) => {
                devices.remove(conn.device_id());
                true
            }
            _ => false,
        }
    }

    /// Closes the device's connection, if any.
    pub fn close_device(&self, device_id: &str, cause: CloseCause) {
        let conn = self.lock().remove(device_id);
        if let Some(conn) = conn {
            conn.shutdown(cause);
        }
    }

    /// Closes every connection (server shutdown).
    pub fn close_all(&self, cause: CloseCause) {
        let all: Vec<Arc<Conn>> = self.lock().drain().map(|(_, c)| c).collect();
        for conn in all {
            conn.shutdown(cause);
        }
    }

    /// The device's live connection.
    pub fn get(&self, device_id: &str) -> Option<Arc<Conn>> {
        self.lock().get(device_id).cloned()
    }

    pub fn is_connected(&self, device_id: &str) -> bool {
        self.lock().contains_key(device_id)
    }

    pub fn connected_count(&self) -> usize {
        self.lock().len()
    }

    /// The reply timeout of a request of this kind.
    pub fn timeout_for(&self, kind: MessageKind) -> Duration {
        if is_git(kind) {
            self.config.git_timeout
        } else if kind == MessageKind::ProxyRequest {
            self.config.proxy_timeout
        } else if kind == MessageKind::StartSession {
            self.config
                .session_start_timeout
                .max(self.config.request_timeout)
        } else {
            self.config.request_timeout
        }
    }

    /// Sends a request built by `build(request_id)` and waits for its reply (or its `e`, or
    /// the timeout). Records a `command` event and metrics for everything that was sent.
    pub async fn request(
        &self,
        caller: &Caller,
        device: &CheckedDevice,
        build: impl FnOnce(u32) -> Message,
    ) -> Result<Message, DispatchError> {
        self.request_with(caller, device, build, |_| {}).await
    }

    /// [`DeviceHub::request`], calling `on_queued(request_id)` once the request is queued and
    /// before its reply can be handled (e.g. to record a `pending` status under its id).
    pub async fn request_with(
        &self,
        caller: &Caller,
        device: &CheckedDevice,
        build: impl FnOnce(u32) -> Message,
        on_queued: impl FnOnce(u32),
    ) -> Result<Message, DispatchError> {
        match self
            .dispatch(caller, device, Mode::Reply, |id, _| build(id), on_queued)
            .await?
        {
            Settled::Reply(m) => Ok(m),
            _ => Err(DispatchError::Disconnected),
        }
    }

    /// Sends a request answered by a stream of `sc` chunks (`sl`): `build(request_id,
    /// stream_id)`; returns the assembled text once the last chunk arrived. Every chunk is
    /// acknowledged with `sa` by the connection task.
    pub async fn request_stream(
        &self,
        caller: &Caller,
        device: &CheckedDevice,
        build: impl FnOnce(u32, &str) -> Message,
    ) -> Result<String, DispatchError> {
        let out = self
            .dispatch(
                caller,
                device,
                Mode::Stream,
                |id, x| build(id, x.unwrap_or("")),
                |_| {},
            )
            .await?;
        match out {
            Settled::Stream(text) => Ok(text),
            _ => Err(DispatchError::Disconnected),
        }
    }

    /// Sends a message that expects no reply (`sp`). The command event's outcome is `sent`.
    pub async fn send(
        &self,
        caller: &Caller,
        device: &CheckedDevice,
        build: impl FnOnce(u32) -> Message,
    ) -> Result<Sent, DispatchError> {
        let conn = self.connection(device)?;
        let started = Instant::now();
        let queued = conn.enqueue(
            self.config.max_pending_per_device,
            |id, _| build(id),
            Mode::FireAndForget,
            caller.idempotency.as_deref(),
        )?;
        // A prompt that was sent but not recorded is answered like any unrecorded command.
        if let Err(e) = self
            .record(caller, device, &queued, "sent".into(), started)
            .await
            && is_mutating(queued.kind)
        {
            return Err(DispatchError::Unrecorded {
                storage_full: matches!(e, crate::store::StoreError::StorageFull { .. }),
                reason: e.to_string(),
            });
        }
        Ok(Sent {
            request_id: queued.id,
        })
    }

    /// Sends a port-proxy request (`pr`) and waits for its `pv` (the proxy timeout covers only
    /// that much); a streamed answer comes with its body ([`ProxyBody`]).
    pub async fn proxy(
        &self,
        caller: &Caller,
        device: &CheckedDevice,
        build: impl FnOnce(u32) -> Message,
    ) -> Result<ProxyReply, DispatchError> {
        let conn = self.connection(device)?;
        match self
            .dispatch(caller, device, Mode::Reply, |id, _| build(id), |_| {})
            .await?
        {
            Settled::Reply(Message::ProxyResponse(head)) => Ok(ProxyReply { head, body: None }),
            Settled::Proxy(head, rx, queued) => {
                let id = head.request_id;
                Ok(ProxyReply {
                    head,
                    body: Some(ProxyBody {
                        conn,
                        id,
                        rx,
                        queued,
                        ended: false,
                        uncredited: 0,
                    }),
                })
            }
            _ => Err(DispatchError::Disconnected),
        }
    }

    fn connection(&self, device: &CheckedDevice) -> Result<Arc<Conn>, DispatchError> {
        self.get(device.id())
            .filter(|c| c.tenant == device.tenant)
            .ok_or_else(|| DispatchError::Offline {
                device_id: device.id().to_owned(),
            })
    }

    async fn dispatch(
        &self,
        caller: &Caller,
        device: &CheckedDevice,
        mode: Mode,
        build: impl FnOnce(u32, Option<&str>) -> Message,
        on_queued: impl FnOnce(u32),
    ) -> Result<Settled, DispatchError> {
        let conn = self.connection(device)?;
        let started = Instant::now();
        let mut queued = conn.enqueue(
            self.config.max_pending_per_device,
            build,
            mode,
            caller.idempotency.as_deref(),
        )?;
        on_queued(queued.id);
        let guard = PendingGuard {
            conn: &conn,
            id: queued.id,
        };
        let timeout = self.timeout_for(queued.kind);
        let outcome = match queued.rx.take() {
            None => Err(DispatchError::Disconnected),
            Some(rx) => {
                async { rx.recv().await.unwrap_or(Err(DispatchError::Disconnected)) }
                    .or(async {
                        smol::Timer::after(timeout).await;
                        Err(DispatchError::Timeout { after: timeout })
                    })
                    .await
            }
        };
        drop(guard);
        let label = match &outcome {
            Ok(Settled::Reply(m)) if !reply_ok(m) => "failed".to_owned(),
            Ok(_) => "ok".to_owned(),
            Err(e) => e.outcome(),
        };
        let recorded = self.record(caller, device, &queued, label, started).await;
        match recorded {
            Err(e) if outcome.is_ok() && is_mutating(queued.kind) => {
                Err(DispatchError::Unrecorded {
                    storage_full: matches!(e, crate::store::StoreError::StorageFull { .. }),
                    reason: e.to_string(),
                })
            }
            _ => outcome,
        }
    }

    async fn record(
        &self,
        caller: &Caller,
        device: &CheckedDevice,
        queued: &Queued,
        outcome: String,
        started: Instant,
    ) -> crate::store::StoreResult<()> {
        let record = CommandRecord {
            tenant: caller.tenant.clone(),
            actor: caller.actor.clone(),
            device_id: device.id().to_owned(),
            request_id: queued.id.to_string(),
            command_type: queued.kind.tag().unwrap_or("?").to_owned(),
            outcome,
            duration: started.elapsed(),
            at_ms: crate::time::now_ms(),
        };
        let (store, metrics) = (self.store.clone(), self.metrics.clone());
        let stream = queued.stream_id.clone();
        let result = self
            .recorder
            .run(move || crate::events::record_command(store.as_ref(), &metrics, &record))
            .await;
        // The answer waits until the record is durable (one flush shared with every write
        // meanwhile), so a command that was answered is in the event log after any crash.
        let durable = match result {
            Ok(event) => self.store.when_durable(event.seq).wait().await,
            Err(e) => Err(e),
        };
        if let Err(e) = &durable {
            tracing::warn!(error = %e, stream = ?stream, "could not record a command event");
        }
        durable.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use codemantle_protocol::message::{DirList, FsResult, PathRequest};

    fn conn(codec: Codec) -> Conn {
        Conn::new(
            "dev_ABCDEFGHIJKLMNOP",
            TenantId::default_tenant(),
            codec,
            ConnectionId(1),
        )
    }

    fn proxy_request(id: u32) -> Message {
        Message::ProxyRequest(codemantle_protocol::message::ProxyRequest {
            request_id: id,
            port: 4100,
            method: "GET".into(),
            target: "/event".into(),
            headers: vec![],
            body: vec![],
        })
    }

    fn ps(id: u32, data: &[u8]) -> Message {
        Message::ProxyChunk(codemantle_protocol::message::ProxyChunk {
            request_id: id,
            data: data.to_vec(),
        })
    }

    /// Sends a `pr`, answers it with a streamed `pv`; returns the open body.
    fn open_proxy_stream(c: &Arc<Conn>) -> ProxyBody {
        let q = c
            .enqueue(4, |id, _| proxy_request(id), Mode::Reply, None)
            .expect("queued");
        c.lock().outbox.clear();
        let rx = q.rx.expect("pending");
        // A chunk before the pv belongs to no open stream (and a native daemon is told to
        // stop sending it).
        assert!(!c.settle(ps(q.id, b"early")));
        let told = outbox(c);
        assert_eq!(told.len(), usize::from(c.codec.is_native()));
        c.lock().outbox.clear();
        let pv = ProxyResponse {
            request_id: q.id,
            ok: true,
            status: Some(200),
            status_text: Some("OK".into()),
            headers: Some(vec![]),
            body: Some(vec![]),
            error: None,
            streaming: true,
        };
        assert!(c.settle(Message::ProxyResponse(pv)));
        let Ok(Ok(Settled::Proxy(head, rx, queued))) = rx.try_recv() else {
            panic!("no streamed pv settled")
        };
        assert!(head.streaming);
        assert_eq!(c.pending_count(), 0);
        ProxyBody {
            conn: c.clone(),
            id: q.id,
            rx,
            queued,
            ended: false,
            uncredited: 0,
        }
    }

    fn outbox(c: &Conn) -> Vec<Message> {
        c.lock()
            .outbox
            .iter()
            .map(|f| match f {
                WsMessage::Binary(b) => codec::decode(b, Codec::Cbor).expect("cbor"),
                WsMessage::Text(t) => codec::decode(t.as_bytes(), Codec::Json).expect("json"),
                other => panic!("unexpected frame {other:?}"),
            })
            .collect()
    }

    #[test]
    fn proxy_streams_are_fed_only_by_their_own_connection_and_count_against_the_cap() {
        let c = Arc::new(conn(Codec::Cbor));
        let mut body = open_proxy_stream(&c);
        let id = body.request_id();
        assert_eq!(c.proxy_stream_count(), 1);
        // The open stream takes a slot of the pending cap.
        assert!(matches!(
            c.enqueue(1, |id, _| mkdir(id), Mode::Reply, None),
            Err(DispatchError::Busy { limit: 1 })
        ));
        assert!(c.settle(ps(id, b"one")));
        assert_eq!(
            smol::block_on(body.next()),
            ProxyNext::Data(b"one".to_vec())
        );
        // Another device's connection cannot inject into it (0.1.50 §12.1 #3).
        let other = conn(Codec::Cbor);
        assert!(!other.settle(ps(id, b"evil")));
        assert!(c.settle(Message::ProxyEnd(RequestOnly { request_id: id })));
        assert_eq!(smol::block_on(body.next()), ProxyNext::End);
        assert_eq!(c.proxy_stream_count(), 0);
        drop(body);
        assert!(outbox(&c).is_empty(), "a finished stream is not cancelled");
    }

    #[test]
    fn a_native_daemon_is_granted_credit_as_the_client_takes_the_body() {
        let c = Arc::new(conn(Codec::Cbor));
        let mut body = open_proxy_stream(&c);
        let id = body.request_id();
        let chunk = vec![b'x'; 64 * 1024];
        let per_grant = PROXY_CREDIT_BYTES / chunk.len();
        for _ in 0..per_grant * 2 {
            assert!(c.settle(ps(id, &chunk)));
        }
        assert!(outbox(&c).is_empty(), "nothing taken yet, nothing granted");
        for _ in 0..per_grant - 1 {
            smol::block_on(body.next());
        }
        assert!(outbox(&c).is_empty());
        smol::block_on(body.next());
        let grant = Message::ProxyWindow(ProxyWindow {
            request_id: id,
            bytes: u32::try_from(PROXY_CREDIT_BYTES).unwrap(),
        });
        assert_eq!(outbox(&c), vec![grant]);
        // A 0.1.x daemon gets none.
        let j = Arc::new(conn(Codec::Json));
        let mut body = open_proxy_stream(&j);
        let id = body.request_id();
        for _ in 0..per_grant {
            assert!(j.settle(ps(id, &chunk)));
            smol::block_on(body.next());
        }
        assert!(outbox(&j).is_empty());
    }

    #[test]
    fn a_proxy_client_that_falls_behind_is_cut_and_the_daemon_told_to_stop() {
        let c = Arc::new(conn(Codec::Cbor));
        let mut body = open_proxy_stream(&c);
        let id = body.request_id();
        let mib = vec![b'x'; 1024 * 1024];
        let fits = PROXY_STREAM_BUFFER_BYTES / mib.len();
        for _ in 0..fits {
            assert!(c.settle(ps(id, &mib)));
        }
        assert_eq!(c.proxy_stream_count(), 1);
        assert!(outbox(&c).is_empty());
        // One more than the buffer holds: cut, and `pe` goes to the daemon.
        assert!(c.settle(ps(id, &mib)));
        assert_eq!(c.proxy_stream_count(), 0);
        assert_eq!(
            outbox(&c),
            vec![Message::ProxyEnd(RequestOnly { request_id: id })]
        );
        for _ in 0..fits {
            assert!(matches!(smol::block_on(body.next()), ProxyNext::Data(_)));
        }
        assert_eq!(smol::block_on(body.next()), ProxyNext::Cut);
    }

    #[test]
    fn a_client_leaving_cancels_the_stream_on_native_daemons_only() {
        let c = Arc::new(conn(Codec::Cbor));
        let body = open_proxy_stream(&c);
        let id = body.request_id();
        drop(body);
        assert_eq!(c.proxy_stream_count(), 0);
        assert_eq!(
            outbox(&c),
            vec![Message::ProxyEnd(RequestOnly { request_id: id })]
        );
        // A 0.1.x daemon knows no cancel: nothing is sent.
        let j = Arc::new(conn(Codec::Json));
        let body = open_proxy_stream(&j);
        drop(body);
        assert_eq!(j.proxy_stream_count(), 0);
        assert!(outbox(&j).is_empty());
        // The connection ending ends open streams.
        let mut body = open_proxy_stream(&c);
        c.shutdown(CloseCause::Replaced);
        assert_eq!(smol::block_on(body.next()), ProxyNext::Cut);
    }

    fn mkdir(id: u32) -> Message {
        Message::MakeDir(PathRequest {
            request_id: id,
            root: "cwd".into(),
            path: "a".into(),
            idempotency_key: None,
        })
    }

    #[test]
    fn replies_settle_only_their_own_request_and_kind() {
        let c = conn(Codec::Cbor);
        let q = c
            .enqueue(4, |id, _| mkdir(id), Mode::Reply, None)
            .expect("queued");
        let rx = q.rx.expect("pending");
        // Wrong kind with the right id: ignored.
        let wrong = Message::RemoveDirResult(FsResult {
            request_id: q.id,
            ok: true,
        });
        assert!(!c.settle(wrong));
        // Right kind, wrong id: ignored.
        let other = Message::MakeDirResult(FsResult {
            request_id: q.id.wrapping_add(7),
            ok: true,
        });
        assert!(!c.settle(other));
        assert!(rx.try_recv().is_err());
        let right = Message::MakeDirResult(FsResult {
            request_id: q.id,
            ok: true,
        });
        assert!(c.settle(right.clone()));
        assert!(matches!(rx.try_recv(), Ok(Ok(Settled::Reply(m))) if m == right));
        assert_eq!(c.pending_count(), 0);
    }

    #[test]
    fn shutdown_fails_pending_at_once_and_refuses_new_requests() {
        let c = conn(Codec::Cbor);
        let q = c
            .enqueue(4, |id, _| mkdir(id), Mode::Reply, None)
            .expect("queued");
        c.shutdown(CloseCause::Replaced);
        assert!(matches!(
            q.rx.expect("rx").try_recv(),
            Ok(Err(DispatchError::Replaced))
        ));
        assert!(matches!(
            c.enqueue(4, |id, _| mkdir(id), Mode::Reply, None),
            Err(DispatchError::Replaced)
        ));
    }

    #[test]
    fn pending_cap_and_ids_skip_zero() {
        let c = conn(Codec::Cbor);
        c.next_id.store(u32::MAX, Ordering::Relaxed);
        let a = c
            .enqueue(2, |id, _| mkdir(id), Mode::Reply, None)
            .expect("a");
        let b = c
            .enqueue(2, |id, _| mkdir(id), Mode::Reply, None)
            .expect("b");
        assert_eq!((a.id, b.id), (u32::MAX, 1));
        assert!(matches!(
            c.enqueue(2, |id, _| mkdir(id), Mode::Reply, None),
            Err(DispatchError::Busy { limit: 2 })
        ));
    }

    #[test]
    fn invalid_requests_are_not_queued_and_json_peers_refuse_native_options() {
        let c = conn(Codec::Json);
        let too_many = |id| {
            Message::DirList(DirList {
                request_id: id,
                root: "cwd".into(),
                path: ".".into(),
                limit: 999,
                cursor: None,
            })
        };
        assert!(matches!(
            c.enqueue(4, |id, _| too_many(id), Mode::Reply, None),
            Err(DispatchError::Invalid(_))
        ));
        let recursive = |id| {
            Message::RemoveDir(codemantle_protocol::message::RemoveDir {
                request_id: id,
                root: "cwd".into(),
                path: "a".into(),
                recursive: true,
                idempotency_key: None,
            })
        };
        assert!(matches!(
            c.enqueue(4, |id, _| recursive(id), Mode::Reply, None),
            Err(DispatchError::Unsupported { .. })
        ));
        assert_eq!(c.pending_count(), 0);
    }

    #[test]
    fn jit_renewal_goes_to_native_daemons_only() {
        let renew = |id| {
            Message::JitRenew(codemantle_protocol::message::JitRenew {
                request_id: id,
                session_id: "ses_renew".into(),
                ttl_secs: 60,
                idempotency_key: None,
            })
        };
        let json = conn(Codec::Json);
        assert!(matches!(
            json.enqueue(4, |id, _| renew(id), Mode::Reply, None),
            Err(DispatchError::Unsupported { t }) if t == "jr"
        ));
        assert_eq!(json.pending_count(), 0);
        let native = conn(Codec::Cbor);
        assert!(
            native
                .enqueue(4, |id, _| renew(id), Mode::Reply, None)
                .is_ok()
        );
        assert_eq!(native.pending_count(), 1);
        assert!(is_mutating(MessageKind::JitRenew));
    }

    #[test]
    fn native_peers_get_the_idempotency_key_and_json_peers_never_do() {
        let frame_of = |codec| {
            let c = conn(codec);
            c.enqueue(
                4,
                |id, _| mkdir(id),
                Mode::Reply,
                Some("ik-0123456789abcdef"),
            )
            .expect("queued");
            let mut st = c.lock();
            st.outbox.pop_front().expect("frame")
        };
        let WsMessage::Binary(native) = frame_of(Codec::Cbor) else {
            panic!("native peers get binary frames");
        };
        match Message::decode(&native, Codec::Cbor) {
            Ok(Message::MakeDir(m)) => {
                assert_eq!(m.idempotency_key.as_deref(), Some("ik-0123456789abcdef"))
            }
            other => panic!("unexpected {other:?}"),
        }
        let WsMessage::Text(json) = frame_of(Codec::Json) else {
            panic!("0.1.x peers get text frames");
        };
        assert!(!json.as_str().contains("\"ik\""), "{}", json.as_str());
    }

    #[test]
    fn idempotency_tokens_are_tenant_scoped_and_stable() {
        let a = TenantId::parse("a").expect("tenant");
        let b = TenantId::parse("b").expect("tenant");
        let t = idempotency_token(&a, Some("k1"));
        assert_eq!(t.len(), 32);
        assert_eq!(t, idempotency_token(&a, Some("k1")));
        assert_ne!(t, idempotency_token(&b, Some("k1")));
        assert_ne!(idempotency_token(&a, None), idempotency_token(&a, None));
    }
}
