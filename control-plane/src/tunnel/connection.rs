//! One task per connection: handshake, registration, then a loop that multiplexes the socket,
//! the connection's outbox and its heartbeat timer.
//!
//! The loop waits on three things at once — an outgoing frame (or a close order) from the
//! [`Conn`], the ping timer, an incoming frame — and handles whichever is ready, outbox first
//! (it is bounded, so it cannot starve reading). Every write has a deadline: a peer that stops
//! reading is declared stalled instead of blocking its task forever.
//!
//! What arrives from the device:
//! - replies settle their pending request; `e` with an id fails it; `sc` chunks feed the
//!   snapshot waiting for their stream and are acknowledged with `sa` (as 0.1.50 does);
//! - `p` / `pl` update telemetry; any frame (including pongs) counts as a sign of life;
//! - an unknown `t` is answered `e PROTO` and the connection stays (0.1.50 §2.1); a frame that
//!   is well-formed but breaks a message rule likewise;
//! - bytes that are not JSON/CBOR at all get `e PROTO` and close 1002 (0.1.50 closes on
//!   invalid JSON); a frame above the size limit gets `e LIMIT` and close 1009.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::protocol::Role;
use async_tungstenite::tungstenite::{Bytes, Error as WsError, Message as WsMessage};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use codemantle_protocol::codec::Codec;
use codemantle_protocol::error::{DecodeError, ErrorCode};
use codemantle_protocol::message::{HelloAck, Message, StreamAck};
use futures_lite::{AsyncRead, AsyncWrite, StreamExt as _};

use super::handshake::{
    self, CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN_LATER, close_now, linger,
    with_timeout,
};
use super::hub::{CloseCause, Conn, DeviceHub, DispatchError, Outgoing, encode_frame};
use super::{
    MAX_CHUNK_BYTES, TunnelShared, UnauthenticatedSlot, handshake_ws_config, session_ws_config,
};
use crate::store::{ConnectInfo, HostFacts, StoreError};

/// Serves one upgraded socket from handshake to close. Never panics on wire data. `head`, if
/// any, is written first (the `101` of an upgrade the listener answered itself).
///
/// Only the loop's state lives as long as the connection: handshake, setup and teardown run in
/// boxed futures that are freed when they finish, and the arguments only they need are moved
/// into the first of them (an `async fn`'s arguments stay in its state for its whole life). The
/// size of what stays is checked in `tests::the_long_lived_task_state_is_small`.
pub fn serve<S>(
    shared: Arc<TunnelShared>,
    io: S,
    remote: SocketAddr,
    slot: Option<UnauthenticatedSlot>,
    head: Option<String>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = BurstRead::new(io);
    let open: Opening<BurstRead<S>> = Box::pin(open(shared.clone(), io, remote, slot, head));
    session(shared, open)
}

/// Largest read of a socket while data flows: a few 8 KiB `sc` frames per syscall.
pub const BURST_READ_BYTES: usize = 32 * 1024;
/// A burst read at least this large means data is still flowing: the buffer is kept for the
/// next read instead of being freed when drained.
const BURST_KEEP_BYTES: usize = 4 * 1024;

/// The socket under the WebSocket: small reads while a device is idle, large while data flows.
///
/// tungstenite reads at most its read buffer size per call ([`super::READ_BUFFER_BYTES`],
/// 256 bytes, to keep idle devices small), so an 8 KiB `sc` frame used to cost ~32 `read`
/// syscalls and capped session output. Here a read that fills the caller's buffer is taken
/// as "more is waiting": the next socket read goes into a lazily allocated
/// [`BURST_READ_BYTES`] buffer, from which tungstenite's small reads are then served from
/// memory. The buffer is freed as soon as it is drained and the socket has nothing more
/// (`Pending`) or the last read was small, so an idle device holds no burst buffer: what it
/// reads (pongs, telemetry) is read directly, as before.
pub struct BurstRead<S> {
    io: S,
    burst: Option<Box<[u8]>>,
    /// Unread bytes of `burst`: `start..end`.
    start: usize,
    end: usize,
    /// The last socket read filled its buffer (or was a large burst): read big next time.
    flowing: bool,
}

impl<S> BurstRead<S> {
    pub fn new(io: S) -> Self {
        BurstRead {
            io,
            burst: None,
            start: 0,
            end: 0,
            flowing: false,
        }
    }

    /// Bytes read from the socket and not yet handed out.
    fn buffered(&self) -> &[u8] {
        match &self.burst {
            Some(b) => &b[self.start..self.end],
            None => &[],
        }
    }

    /// Copies buffered bytes into `out`; frees the buffer when drained and data stopped.
    fn hand_out(&mut self, out: &mut [u8]) -> usize {
        let n = self.buffered().len().min(out.len());
        out[..n].copy_from_slice(&self.buffered()[..n]);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if !self.flowing {
                self.burst = None;
            }
        }
        n
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for BurstRead<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        out: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if !this.buffered().is_empty() {
            return Poll::Ready(Ok(this.hand_out(out)));
        }
        if !this.flowing || out.len() >= BURST_READ_BYTES {
            this.burst = None;
            let read = std::pin::Pin::new(&mut this.io).poll_read(cx, out);
            this.flowing = matches!(read, Poll::Ready(Ok(n)) if n > 0 && n == out.len());
            return read;
        }
        let burst = this
            .burst
            .get_or_insert_with(|| vec![0; BURST_READ_BYTES].into_boxed_slice());
        match std::pin::Pin::new(&mut this.io).poll_read(cx, burst) {
            Poll::Ready(Ok(n)) => {
                this.flowing = n >= BURST_KEEP_BYTES;
                this.start = 0;
                this.end = n;
                Poll::Ready(Ok(this.hand_out(out)))
            }
            Poll::Pending => {
                // Nothing waiting: no buffer is held while the socket is quiet. The next read
                // is still a large one (a device that goes idle pays one transient buffer).
                this.burst = None;
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                this.flowing = false;
                this.burst = None;
                Poll::Ready(Err(e))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for BurstRead<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_close(cx)
    }
}

/// The boxed [`open`] future.
type Opening<S> =
    std::pin::Pin<Box<dyn Future<Output = Option<(WebSocketStream<S>, Arc<Conn>)>> + Send>>;

async fn session<S>(shared: Arc<TunnelShared>, open: Opening<S>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((mut ws, conn)) = open.await else {
        return;
    };
    let end = run(&shared, &mut ws, &conn).await;
    Box::pin(finish(&shared, &mut ws, &conn, end)).await;
}

/// Handshake and setup: the authenticated socket (rebuilt with session limits) and its
/// registered connection, or `None` if the peer was refused or went away.
async fn open<S>(
    shared: Arc<TunnelShared>,
    mut io: S,
    remote: SocketAddr,
    slot: Option<UnauthenticatedSlot>,
    head: Option<String>,
) -> Option<(WebSocketStream<S>, Arc<Conn>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shared = &shared;
    if let Some(head) = head {
        use futures_lite::AsyncWriteExt as _;
        let limit = shared.config.write_timeout;
        if !matches!(
            with_timeout(limit, io.write_all(head.as_bytes())).await,
            Some(Ok(()))
        ) {
            tracing::debug!(%remote, "tunnel upgrade: could not write the 101");
            return None;
        }
    }
    let mut ws =
        WebSocketStream::from_raw_socket(io, Role::Server, Some(handshake_ws_config())).await;
    let Some(slot) = slot else {
        close_now(
            &mut ws,
            CLOSE_TRY_AGAIN_LATER,
            "too many pending handshakes",
        )
        .await;
        return None;
    };
    let accepted = handshake::run(shared, &mut ws, remote).await;
    drop(slot);
    let accepted = accepted?;
    let codec = accepted.codec;
    // `h2` goes out on the handshake stream: the session stream then starts with an empty
    // write buffer (tungstenite keeps a buffer's capacity once it has written through it).
    let (conn, info) = start_session(shared, &mut ws, accepted, remote).await?;
    // Same socket, session limits (see the module docs of `tunnel`).
    let io = ws.into_inner();
    let mut ws =
        WebSocketStream::from_raw_socket(io, Role::Server, Some(session_ws_config(codec))).await;
    record_connect(shared, &mut ws, &conn, info).await?;
    Some((ws, conn))
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The peer closed (close frame or EOF).
    PeerClosed,
    /// The socket failed.
    Broken(String),
    /// No sign of life for `dead_after`.
    Dead,
    /// A write did not finish within `write_timeout`.
    Stalled,
    /// The hub ordered the close (replaced, removed, shutdown).
    Ordered(CloseCause),
    /// We refused a frame with an `e` and close with this code.
    Violation { code: u16, reason: &'static str },
}

impl End {
    fn reason(&self) -> String {
        match self {
            End::PeerClosed => "closed_by_device".into(),
            End::Broken(_) => "connection_lost".into(),
            End::Dead => "heartbeat_timeout".into(),
            End::Stalled => "write_stalled".into(),
            End::Ordered(cause) => cause.as_str().into(),
            End::Violation { reason, .. } => format!("protocol_violation: {reason}"),
        }
    }
}

/// Registers the connection and sends `h2`; returns what [`record_connect`] records. `None` if
/// the session ended already (it has been torn down).
async fn start_session<S>(
    shared: &Arc<TunnelShared>,
    ws: &mut WebSocketStream<S>,
    accepted: super::handshake::Accepted,
    remote: SocketAddr,
) -> Option<(Arc<Conn>, ConnectInfo)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let device_id = accepted.device_id.clone();
    let codec = accepted.codec;
    let now = crate::time::now_ms();
    let presence_id = shared.presence.set_online(&device_id, now);
    let conn = Arc::new(Conn::new(
        &device_id,
        accepted.tenant.clone(),
        codec,
        presence_id,
    ));
    // Registered before h2 goes out, as 0.1.50 does; a previous connection of this device is
    // closed with 1012 and its pending requests fail now.
    shared.hub.register(conn.clone());

    let hb = shared.config.heartbeat_secs;
    let (sid, server_nonce) = (random_id(), random_id());
    let h2 = match accepted.peer.sign_h2(
        &sid,
        &server_nonce,
        u64::from(hb),
        u64::from(MAX_CHUNK_BYTES),
    ) {
        Ok(mac) => Message::HelloAck(HelloAck {
            connection_id: sid,
            nonce: server_nonce,
            heartbeat_secs: hb,
            max_chunk: MAX_CHUNK_BYTES,
            mac,
        }),
        Err(e) => {
            tracing::error!(error = %e, "cannot sign h2 (heartbeat config out of range?)");
            finish(shared, ws, &conn, End::Broken(e.to_string())).await;
            return None;
        }
    };
    let write_timeout = shared.config.write_timeout;
    if !send_message(ws, &h2, codec, write_timeout).await {
        finish(shared, ws, &conn, End::Stalled).await;
        return None;
    }

    let hello = &accepted.hello;
    let info = ConnectInfo {
        at_ms: now,
        agent_version: hello.agent_version.clone(),
        host: HostFacts {
            hostname: hello.hostname.clone(),
            os: hello.os.clone(),
            arch: None,
        },
        peer: Some(remote.to_string()),
        mode: Some(if codec.is_native() { "native" } else { "json" }.to_owned()),
    };
    tracing::info!(
        device = %device_id, tenant = %accepted.tenant, %remote,
        mode = if codec.is_native() { "native" } else { "json" },
        agent_version = hello.agent_version.as_deref().unwrap_or("-"),
        "device connected"
    );
    Some((conn, info))
}

/// Records the connect (on the hub's recorder). `None` if the device was removed meanwhile:
/// the session has then been torn down (closed 1008).
async fn record_connect<S>(
    shared: &Arc<TunnelShared>,
    ws: &mut WebSocketStream<S>,
    conn: &Arc<Conn>,
    info: ConnectInfo,
) -> Option<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let store = shared.store.clone();
    let id = conn.device_id().to_owned();
    let recorded = shared
        .hub
        .recorder()
        .run(move || store.device_connected(&id, &info))
        .await;
    match recorded {
        Ok(_) => Some(()),
        Err(StoreError::NotFound { .. }) => {
            // Removed between the credential lookup and now.
            finish(shared, ws, conn, End::Ordered(CloseCause::Removed)).await;
            None
        }
        Err(e) => {
            tracing::warn!(device = %conn.device_id(), error = %e, "could not record the connect");
            Some(())
        }
    }
}

/// What woke the loop.
enum Wake {
    Out(Outgoing),
    Tick,
    Frame(Option<Result<WsMessage, WsError>>),
}

/// What to do after an incoming frame.
enum Action {
    Nothing,
    Reply(Message),
    Refuse {
        reply: Message,
        code: u16,
        reason: &'static str,
    },
}

/// An [`Action`] with its reply already encoded: a `Message` is large, and whatever is alive
/// across an `.await` is part of the task's state for the connection's whole life.
enum Encoded {
    Nothing,
    Reply(Option<WsMessage>),
    Refuse(Option<WsMessage>, u16, &'static str),
}

fn encode_action(action: Action, codec: Codec) -> Encoded {
    let encode = |m: &Message| match encode_frame(m, codec) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(error = %e, t = m.type_tag(), "cannot encode a frame for a device");
            None
        }
    };
    match action {
        Action::Nothing => Encoded::Nothing,
        Action::Reply(m) => Encoded::Reply(encode(&m)),
        Action::Refuse {
            reply,
            code,
            reason,
        } => Encoded::Refuse(encode(&reply), code, reason),
    }
}

async fn run<S>(shared: &TunnelShared, ws: &mut WebSocketStream<S>, conn: &Conn) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = &shared.config;
    let mut ticker = smol::Timer::interval(config.ping_interval);
    let mut last_heard = Instant::now();
    loop {
        let wake = std::future::poll_fn(|cx| {
            if let Poll::Ready(out) = conn.poll_outgoing(cx) {
                return Poll::Ready(Wake::Out(out));
            }
            if ticker.poll_next(cx).is_ready() {
                return Poll::Ready(Wake::Tick);
            }
            ws.poll_next(cx).map(Wake::Frame)
        })
        .await;
        // Deciding is synchronous, so nothing of it stays in this future's state; the write is
        // the loop's only other await point, and its future is boxed: it exists only while a
        // frame is being written, instead of taking ~300 bytes of every idle connection.
        match turn(shared, conn, wake, &mut ticker, &mut last_heard) {
            Turn::Stop(end) => return end,
            Turn::Quiet => {}
            Turn::Write(frame, then) => {
                let sent = Box::pin(send_frame(ws, frame, config.write_timeout)).await;
                if let Some(end) = then {
                    return end;
                }
                if !sent {
                    return End::Stalled;
                }
            }
        }
    }
}

/// What the loop does after a wake.
enum Turn {
    /// Nothing to write.
    Quiet,
    /// Write this frame, then end the session if an [`End`] is given.
    Write(WsMessage, Option<End>),
    /// End the session now.
    Stop(End),
}

/// Handles one wake of the loop.
fn turn(
    shared: &TunnelShared,
    conn: &Conn,
    wake: Wake,
    ticker: &mut smol::Timer,
    last_heard: &mut Instant,
) -> Turn {
    let config = &shared.config;
    let write = |frame: Option<WsMessage>, then: Option<End>| match (frame, then) {
        (Some(frame), then) => Turn::Write(frame, then),
        (None, Some(end)) => Turn::Stop(end),
        (None, None) => Turn::Quiet,
    };
    match wake {
        Wake::Out(Outgoing::Close(cause)) => Turn::Stop(End::Ordered(cause)),
        Wake::Out(Outgoing::Frame(frame)) => Turn::Write(frame, None),
        Wake::Tick if last_heard.elapsed() >= config.dead_after => Turn::Stop(End::Dead),
        Wake::Tick => {
            // Next wake: the next ping, or the moment the silence reaches `dead_after` if
            // that is sooner. A pong lands just after each ping, so on ping ticks alone the
            // silence is always a hair under 2×hb at the second tick and a dead peer was
            // only seen at the third (3×hb).
            let next_ping = Instant::now() + config.ping_interval;
            let dead_at = *last_heard + config.dead_after;
            ticker.set_interval_at(next_ping.min(dead_at), config.ping_interval);
            Turn::Write(WsMessage::Ping(Bytes::new()), None)
        }
        Wake::Frame(None) => Turn::Stop(End::PeerClosed),
        Wake::Frame(Some(Err(WsError::Capacity(e)))) => {
            tracing::info!(device = %conn.device_id(), error = %e, "oversize frame");
            let reply = Message::error(ErrorCode::Limit, None, Some("frame_too_large"));
            let end = End::Violation {
                code: CLOSE_TOO_BIG,
                reason: "frame too large",
            };
            write(encode_frame(&reply, conn.codec()).ok(), Some(end))
        }
        Wake::Frame(Some(Err(e))) => Turn::Stop(End::Broken(e.to_string())),
        Wake::Frame(Some(Ok(frame))) => {
            *last_heard = Instant::now();
            shared
                .presence
                .touch(conn.device_id(), conn.presence_id(), crate::time::now_ms());
            let action = match frame {
                WsMessage::Text(text) => on_data(&shared.hub, conn, text.as_bytes(), Codec::Json),
                WsMessage::Binary(bytes) => {
                    // A 0.1.x peer's binary frames are JSON too (0.1.50 decodes them so).
                    let codec = if conn.codec().is_native() {
                        Codec::Cbor
                    } else {
                        Codec::Json
                    };
                    on_data(&shared.hub, conn, &bytes, codec)
                }
                WsMessage::Close(_) => return Turn::Stop(End::PeerClosed),
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => Action::Nothing,
            };
            match encode_action(action, conn.codec()) {
                Encoded::Nothing => Turn::Quiet,
                Encoded::Reply(frame) => write(frame, None),
                Encoded::Refuse(frame, code, reason) => {
                    write(frame, Some(End::Violation { code, reason }))
                }
            }
        }
    }
}

/// Handles one data frame.
fn on_data(hub: &DeviceHub, conn: &Conn, bytes: &[u8], codec: Codec) -> Action {
    let msg = match Message::decode(bytes, codec) {
        Ok(msg) => msg,
        Err(DecodeError::FrameTooLarge { .. }) => {
            return Action::Refuse {
                reply: Message::error(ErrorCode::Limit, None, Some("frame_too_large")),
                code: CLOSE_TOO_BIG,
                reason: "frame too large",
            };
        }
        Err(e) if handshake::is_garbage(&e) => {
            tracing::info!(device = %conn.device_id(), error = %e, "undecodable frame; closing");
            return Action::Refuse {
                reply: Message::error(ErrorCode::Proto, None, None),
                code: CLOSE_PROTOCOL_ERROR,
                reason: if codec == Codec::Json {
                    "invalid json"
                } else {
                    "invalid frame"
                },
            };
        }
        Err(e) => {
            tracing::debug!(device = %conn.device_id(), error = %e, "invalid message");
            let mut text = e.to_string();
            truncate(&mut text, 200);
            return Action::Reply(Message::error(ErrorCode::Proto, None, Some(&text)));
        }
    };
    match msg {
        Message::Telemetry(t) => conn.set_usage(t.uptime_secs, t.rss_bytes),
        Message::PortList(p) => conn.set_ports(p.ports),
        Message::Error(e) => match e.request_id {
            Some(id) => {
                if !conn.fail(id, e.code.clone(), e.message.clone()) {
                    tracing::debug!(device = %conn.device_id(), id, code = %e.code, "error for no pending request");
                }
            }
            None => tracing::warn!(
                device = %conn.device_id(), code = %e.code,
                message = e.message.as_deref().unwrap_or(""),
                "device reported an error"
            ),
        },
        Message::StreamChunk(chunk) => {
            if !conn.awaits_stream(&chunk.stream_id) {
                // Prompt output: de-duplicated, stored, and acked once durable (group commit)
                // by the streams module, through this connection's outbox.
                let sink = hub
                    .get(conn.device_id())
                    .filter(|c| std::ptr::eq(&**c, conn));
                let acked = match sink {
                    Some(c) => {
                        let sink: Arc<dyn crate::streams::AckSink> = c;
                        let weak = Arc::downgrade(&sink);
                        hub.streams
                            .on_chunk_to(conn.tenant(), conn.device_id(), chunk, weak)
                    }
                    None => hub.streams.on_chunk(conn.tenant(), conn.device_id(), chunk),
                };
                return match acked {
                    Some(ack) => Action::Reply(Message::StreamAck(ack)),
                    None => Action::Nothing,
                };
            }
            let ack = Message::StreamAck(StreamAck {
                stream_id: chunk.stream_id.clone(),
                seq: chunk.seq,
            });
            if !conn.stream_chunk(chunk) {
                tracing::debug!(device = %conn.device_id(), "chunk of a stream nobody waits for");
            }
            return Action::Reply(ack);
        }
        Message::GitLog(line) => {
            tracing::debug!(device = %conn.device_id(), id = line.request_id, stream = %line.stream, "git: {}", line.line);
        }
        Message::Unknown { t, request_id } => {
            tracing::debug!(device = %conn.device_id(), t = %t, "unknown message type");
            let text = format!("unknown_type:{t}");
            return Action::Reply(Message::error(ErrorCode::Proto, request_id, Some(&text)));
        }
        Message::Hello(_) | Message::HelloUnsupported(_) => {
            return Action::Reply(Message::error(
                ErrorCode::Proto,
                None,
                Some("already_authenticated"),
            ));
        }
        other => {
            let t = other.type_tag().to_owned();
            if !conn.settle(other) {
                tracing::debug!(device = %conn.device_id(), t = %t, "reply nobody waits for (late, or wrong kind)");
            }
        }
    }
    Action::Nothing
}

/// Tears a session down: closes the socket (best effort), fails what is pending, marks the
/// device offline and records the disconnect — the last two only if this connection was still
/// the device's current one (a replaced connection leaves its successor alone).
async fn finish<S>(shared: &TunnelShared, ws: &mut WebSocketStream<S>, conn: &Arc<Conn>, end: End)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let was_current = shared.hub.unregister(conn);
    let pending_error = match &end {
        End::Ordered(cause) => cause.dispatch_error(),
        _ => DispatchError::Disconnected,
    };
    conn.fail_pending(&pending_error);
    let now = crate::time::now_ms();
    let went_offline = shared
        .presence
        .set_offline(conn.device_id(), conn.presence_id(), now);
    let reason = end.reason();
    match &end {
        End::Broken(e) => {
            tracing::info!(device = %conn.device_id(), error = %e, "device connection lost")
        }
        _ => tracing::info!(device = %conn.device_id(), reason = %reason, "device disconnected"),
    }
    if was_current || went_offline {
        let store = shared.store.clone();
        let (id, why) = (conn.device_id().to_owned(), reason.clone());
        let recorded = shared
            .hub
            .recorder()
            .run(move || store.device_disconnected(&id, now, &why))
            .await;
        match recorded {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(device = %conn.device_id(), error = %e, "could not record the disconnect")
            }
        }
    }
    match end {
        End::Ordered(cause) => {
            let (code, text) = cause.close_frame();
            close_now(ws, code, text).await;
        }
        End::Violation { code, reason } => close_now(ws, code, reason).await,
        End::Dead => close_now(ws, 1001, "heartbeat timeout").await,
        // The peer's close was answered by tungstenite; reading flushes that answer.
        End::PeerClosed => linger(ws).await,
        End::Broken(_) | End::Stalled => {}
    }
}

async fn send_message<S>(
    ws: &mut WebSocketStream<S>,
    msg: &Message,
    codec: Codec,
    limit: Duration,
) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match encode_frame(msg, codec) {
        Ok(frame) => send_frame(ws, frame, limit).await,
        Err(e) => {
            tracing::error!(error = %e, t = msg.type_tag(), "cannot encode a frame for a device");
            true
        }
    }
}

/// Writes one frame within `limit`; false if it failed or timed out. Not written as
/// `with_timeout(limit, ws.send(frame))`: nested `async` wrappers copy their arguments at every
/// level, and this future is part of the connection's long-lived state (616 bytes that way).
async fn send_frame<S>(ws: &mut WebSocketStream<S>, frame: WsMessage, limit: Duration) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut send = std::pin::pin!(ws.send(frame));
    let mut timer = smol::Timer::after(limit);
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(result) = send.as_mut().poll(cx) {
            return Poll::Ready(result.is_ok());
        }
        std::pin::Pin::new(&mut timer).poll(cx).map(|_| false)
    })
    .await
}

/// 18 random base64url characters (`h2` `s` and `n`, as 0.1.50's `randomToken(18)`).
fn random_id() -> String {
    let mut id = URL_SAFE_NO_PAD.encode(crate::secrets::random_bytes::<14>());
    id.truncate(18);
    id
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    /// A socket with `data` waiting; `Pending` once it is all read. Counts its reads.
    struct Source {
        data: Vec<u8>,
        pos: usize,
        reads: usize,
    }

    impl futures_lite::AsyncRead for Source {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            out: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.pos == self.data.len() {
                return std::task::Poll::Pending;
            }
            self.reads += 1;
            let n = out.len().min(self.data.len() - self.pos);
            out[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            std::task::Poll::Ready(Ok(n))
        }
    }

    /// Reads `r` in `step`-byte calls until it is pending; returns what was read.
    fn drain(r: &mut super::BurstRead<Source>, step: usize) -> Vec<u8> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut got = Vec::new();
        let mut buf = vec![0u8; step];
        while let std::task::Poll::Ready(n) =
            futures_lite::AsyncRead::poll_read(std::pin::Pin::new(&mut *r), &mut cx, &mut buf)
        {
            let n = n.expect("read");
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[test]
    fn burst_reads_are_large_while_data_flows_and_hold_nothing_when_idle() {
        let small: Vec<u8> = (0..100u8).collect();
        let mut r = super::BurstRead::new(Source {
            data: small.clone(),
            pos: 0,
            reads: 0,
        });
        assert_eq!(drain(&mut r, 256), small);
        assert_eq!(r.io.reads, 1, "a pong is one direct read");
        assert!(r.burst.is_none(), "an idle device holds no burst buffer");

        // 64 KiB arrive while the caller reads 256 bytes at a time (tungstenite's reads).
        let big: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 % 251) as u8).collect();
        r.io.data.extend_from_slice(&big);
        let got = drain(&mut r, 256);
        assert_eq!(got.len(), big.len());
        assert!(got == big, "bytes arrive intact and in order");
        // One direct 256-byte read, then 32 KiB reads: not 256 reads of 256 bytes.
        assert!(
            r.io.reads - 1 <= 1 + big.len() / super::BURST_READ_BYTES + 1,
            "{} socket reads for 64 KiB",
            r.io.reads - 1
        );
        assert!(
            r.burst.is_none(),
            "the buffer is freed once the socket is quiet"
        );
    }

    use super::*;
    use crate::metrics::Metrics;
    use crate::presence::MemoryPresence;
    use crate::store::Store;
    use crate::store::sled::SledStore;
    use crate::tunnel::{DeviceHub, DispatchConfig, Tunnel, TunnelConfig};

    /// An idle connection is mostly this future; keep it small (the fleet goal is a few KiB per
    /// device in total). Handshake, setup and teardown are boxed, so this is the loop.
    #[test]
    fn the_long_lived_task_state_is_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(DeviceHub::new(
            store.clone(),
            metrics.clone(),
            DispatchConfig::default(),
        ));
        let tunnel = Tunnel::new(
            store,
            Arc::new(MemoryPresence::new()),
            metrics,
            hub,
            TunnelConfig::default(),
        );
        let (a, _b) = smol::block_on(async {
            let l = smol::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let c = smol::net::TcpStream::connect(l.local_addr().expect("addr"))
                .await
                .expect("connect");
            (l.accept().await.expect("accept").0, c)
        });
        let addr = a.peer_addr().expect("peer");
        let fut = serve(tunnel.shared().clone(), a, addr, None, None);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection task state: {size} bytes");
        // 4.5 KiB before setup/teardown were boxed and the loop got a single write await;
        // 1168 before the write future was boxed too. 400 of it is the WebSocketStream.
        assert!(size <= 768, "the connection future grew to {size} bytes");
    }
}
