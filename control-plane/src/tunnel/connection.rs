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
};
use super::hub::{CloseCause, Conn, DeviceHub, DispatchError, Outgoing, encode_frame};
use super::{
    MAX_CHUNK_BYTES, TunnelShared, UnauthenticatedSlot, handshake_ws_config, session_ws_config,
};
use crate::store::{ConnectInfo, HostFacts, StoreError};

/// Serves one upgraded socket from handshake to close. Never panics on wire data.
///
/// Only the loop's state lives as long as the connection: handshake, setup and teardown run in
/// boxed futures that are freed when they finish (the size of what stays is checked in
/// `tests::the_long_lived_task_state_is_small`).
pub async fn serve<S>(
    shared: Arc<TunnelShared>,
    io: S,
    remote: SocketAddr,
    slot: Option<UnauthenticatedSlot>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((mut ws, conn)) = Box::pin(open(&shared, io, remote, slot)).await else {
        return;
    };
    let end = run(&shared, &mut ws, &conn).await;
    Box::pin(finish(&shared, &mut ws, &conn, end)).await;
}

/// Handshake and setup: the authenticated socket (rebuilt with session limits) and its
/// registered connection, or `None` if the peer was refused or went away.
async fn open<S>(
    shared: &Arc<TunnelShared>,
    io: S,
    remote: SocketAddr,
    slot: Option<UnauthenticatedSlot>,
) -> Option<(WebSocketStream<S>, Arc<Conn>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
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
    // Same socket, session limits (see the module docs of `tunnel`).
    let io = ws.into_inner();
    let mut ws =
        WebSocketStream::from_raw_socket(io, Role::Server, Some(session_ws_config(accepted.codec)))
            .await;
    let conn = start_session(shared, &mut ws, accepted, remote).await?;
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

/// Registers the connection, sends `h2` and records the connect. `None` if the session ended
/// already (it has been torn down).
async fn start_session<S>(
    shared: &Arc<TunnelShared>,
    ws: &mut WebSocketStream<S>,
    accepted: super::handshake::Accepted,
    remote: SocketAddr,
) -> Option<Arc<Conn>>
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
    let store = shared.store.clone();
    let id = device_id.clone();
    match smol::unblock(move || store.device_connected(&id, &info)).await {
        Ok(_) => {}
        Err(StoreError::NotFound { .. }) => {
            // Removed between the credential lookup and now.
            finish(shared, ws, &conn, End::Ordered(CloseCause::Removed)).await;
            return None;
        }
        Err(e) => tracing::warn!(device = %device_id, error = %e, "could not record the connect"),
    }
    tracing::info!(
        device = %device_id, tenant = %accepted.tenant, %remote,
        mode = if codec.is_native() { "native" } else { "json" },
        agent_version = hello.agent_version.as_deref().unwrap_or("-"),
        "device connected"
    );
    Some(conn)
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
        // One write per turn, at a single await point (each await point adds to the state).
        let (write, then) = match wake {
            Wake::Out(Outgoing::Close(cause)) => return End::Ordered(cause),
            Wake::Out(Outgoing::Frame(frame)) => (Some(frame), None),
            Wake::Tick if last_heard.elapsed() >= config.dead_after => return End::Dead,
            Wake::Tick => {
                // Next wake: the next ping, or the moment the silence reaches `dead_after` if
                // that is sooner. A pong lands just after each ping, so on ping ticks alone the
                // silence is always a hair under 2×hb at the second tick and a dead peer was
                // only seen at the third (3×hb).
                let next_ping = Instant::now() + config.ping_interval;
                let dead_at = last_heard + config.dead_after;
                ticker.set_interval_at(next_ping.min(dead_at), config.ping_interval);
                (Some(WsMessage::Ping(Bytes::new())), None)
            }
            Wake::Frame(None) => return End::PeerClosed,
            Wake::Frame(Some(Err(WsError::Capacity(e)))) => {
                tracing::info!(device = %conn.device_id(), error = %e, "oversize frame");
                let reply = Message::error(ErrorCode::Limit, None, Some("frame_too_large"));
                let end = End::Violation {
                    code: CLOSE_TOO_BIG,
                    reason: "frame too large",
                };
                (encode_frame(&reply, conn.codec()).ok(), Some(end))
            }
            Wake::Frame(Some(Err(e))) => return End::Broken(e.to_string()),
            Wake::Frame(Some(Ok(frame))) => {
                last_heard = Instant::now();
                shared
                    .presence
                    .touch(conn.device_id(), conn.presence_id(), crate::time::now_ms());
                let action = match frame {
                    WsMessage::Text(text) => {
                        on_data(&shared.hub, conn, text.as_bytes(), Codec::Json)
                    }
                    WsMessage::Binary(bytes) => {
                        // A 0.1.x peer's binary frames are JSON too (0.1.50 decodes them so).
                        let codec = if conn.codec().is_native() {
                            Codec::Cbor
                        } else {
                            Codec::Json
                        };
                        on_data(&shared.hub, conn, &bytes, codec)
                    }
                    WsMessage::Close(_) => return End::PeerClosed,
                    WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {
                        Action::Nothing
                    }
                };
                match encode_action(action, conn.codec()) {
                    Encoded::Nothing => (None, None),
                    Encoded::Reply(frame) => (frame, None),
                    Encoded::Refuse(frame, code, reason) => {
                        (frame, Some(End::Violation { code, reason }))
                    }
                }
            }
        };
        if let Some(frame) = write {
            if !send_frame(ws, frame, config.write_timeout).await && then.is_none() {
                return End::Stalled;
            }
        }
        if let Some(end) = then {
            return end;
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
                // Prompt output: de-duplicated, buffered and acked by the streams module.
                return match hub.streams.on_chunk(conn.tenant(), conn.device_id(), chunk) {
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
        let recorded = smol::unblock(move || store.device_disconnected(&id, now, &why)).await;
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
        let fut = serve(tunnel.shared().clone(), a, addr, None);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection task state: {size} bytes");
        // 4.5 KiB before setup/teardown were boxed and the loop got a single write await.
        assert!(size <= 1280, "the connection future grew to {size} bytes");
    }
}
